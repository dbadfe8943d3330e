import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mtcnn import DetectorConfig, Detections, FaceDetector
from mtcnn.box_coder import box_iou
from mtcnn.pyramid import level_size, pyramid_scales

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def astronaut():
    return cv2.cvtColor(cv2.imread(str(DATA / "astronaut.png")), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def reference():
    return json.loads((DATA / "astronaut_reference.json").read_text())


@pytest.fixture(scope="module")
def detector():
    return FaceDetector(weights="reference", pyramid="classic")


def assert_matches(found: Detections, boxes, scores, landmarks):
    """Every expected face is found with IoU >= 0.9, score within 0.01, landmarks within 2 px."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    assert len(found) == len(boxes)
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(found.boxes)).numpy()
    for row in range(len(boxes)):
        best = iou[row].argmax()
        assert iou[row, best] >= 0.9
        assert abs(found.scores[best] - scores[row]) <= 0.01
        assert np.abs(found.landmarks[best] - np.asarray(landmarks[row])).max() <= 2.0


def test_classic_pyramid_reproduces_the_reference(detector, astronaut, reference):
    found = detector.detect([astronaut])[0]
    assert_matches(found, reference["boxes"], reference["scores"], reference["landmarks"])
    assert found.boxes.dtype == found.scores.dtype == found.landmarks.dtype == np.float32
    assert found.landmarks.shape == (1, 5, 2)


@pytest.mark.parametrize("pyramid", ["dynamic", "chain2", "octave"])
def test_fast_pyramids_find_the_same_face(astronaut, reference, pyramid):
    found = FaceDetector(pyramid=pyramid).detect([astronaut])[0]
    assert len(found) == 1
    iou = box_iou(torch.from_numpy(found.boxes), torch.tensor(reference["boxes"]))
    assert iou.item() >= 0.85


def test_the_default_detector_is_the_exact_classic_fp32_one(astronaut, reference):
    assert DetectorConfig().pyramid == "classic" and DetectorConfig().precision == "fp32"
    found = FaceDetector().detect([astronaut])[0]
    assert_matches(found, reference["boxes"], reference["scores"], reference["landmarks"])


def test_bf16_finds_the_same_face_with_close_scores_and_landmarks(detector, astronaut):
    exact = detector.detect([astronaut])[0]
    rounded = FaceDetector(pyramid="classic", precision="bf16").detect([astronaut])[0]
    assert len(rounded) == len(exact) == 1
    iou = box_iou(torch.from_numpy(rounded.boxes), torch.from_numpy(exact.boxes))
    assert iou.item() >= 0.9
    assert abs(float(rounded.scores[0]) - float(exact.scores[0])) < 0.02
    assert np.abs(rounded.landmarks - exact.landmarks).max() < 3.0
    # fp32 stays the exact path: a bf16 detector changes nothing for an fp32 one made after it.
    assert np.array_equal(FaceDetector(pyramid="classic").detect([astronaut])[0].boxes, exact.boxes)


def test_fp16_is_refused_on_cpus_with_what_to_use_instead():
    with pytest.raises(ValueError, match="GPUs only.*'bf16' or 'fp32'"):
        FaceDetector(precision="fp16")


def test_landmarks_follow_the_image_left_convention(detector, astronaut):
    found = detector.detect([astronaut, np.ascontiguousarray(astronaut[:, ::-1])])
    for result in found:
        (left_eye, right_eye, nose, left_mouth, right_mouth) = result.landmarks[0]
        assert left_eye[0] < nose[0] < right_eye[0]
        assert left_mouth[0] < right_mouth[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    width = astronaut.shape[1]
    mirrored_box = width - 1 - found[1].boxes[0, [2, 0]]
    assert np.abs(mirrored_box - found[0].boxes[0, [0, 2]]).max() < 4.0


@pytest.mark.parametrize("concurrent_images", [True, False])
def test_batches_of_mixed_sizes_give_the_same_results_as_single_images(detector, astronaut, concurrent_images):
    small = cv2.resize(astronaut, (300, 260), interpolation=cv2.INTER_AREA)
    padded = cv2.copyMakeBorder(astronaut, 40, 0, 90, 0, cv2.BORDER_CONSTANT, value=(20, 60, 90))
    images = [astronaut, small, padded, astronaut]
    batch = FaceDetector(pyramid="classic", concurrent_images=concurrent_images).detect(images)
    for image, result in zip(images, batch):
        single = detector.detect([image])[0]
        assert np.allclose(result.boxes, single.boxes, atol=1e-3)
        assert np.allclose(result.scores, single.scores, atol=1e-5)
    # Padding moves the pyramid's sampling grid, so the box moves by the padding, give or take.
    assert np.allclose(batch[2].boxes[0], batch[0].boxes[0] + [90, 40, 90, 40], atol=4.0)


def test_level_bands_cover_every_output_row_once_and_share_the_work():
    from mtcnn.detector import _level_bands, _pnet_cells

    sizes = [level_size(1080, 1920, scale) for scale in pyramid_scales(1080, 1920, 20, 0.709)]
    assert [(b.first, b.stop) for b in _level_bands(sizes, 1)] == [(0, _pnet_cells(h)) for h, _ in sizes]
    for workers in (2, 3, 16):
        bands = _level_bands(sizes, workers)
        for depth, (height, width) in enumerate(sizes):
            mine = [band for band in bands if band.depth == depth]
            assert [b.first for b in mine[1:]] == [b.stop for b in mine[:-1]]
            assert mine[0].first == 0 and mine[-1].stop == _pnet_cells(height)
            # A band's input rows give exactly its output rows.
            assert all(_pnet_cells(b.input_rows(height)[1] - b.input_rows(height)[0]) == b.stop - b.first
                       for b in mine)
        largest = max(band.work(sizes[band.depth][1]) for band in bands)
        assert largest <= sum(band.work(sizes[band.depth][1]) for band in bands) / workers


@pytest.mark.parametrize("pyramid", ["classic", "dynamic"])
def test_one_image_over_several_threads_gives_what_one_thread_gives(astronaut, pyramid):
    """One image a call on a multi-threaded CPU: its levels (the largest in row bands) and window
    chunks go over the threads."""
    import threading

    crowd = np.concatenate([np.concatenate([astronaut] * 3, axis=1)] * 2, axis=0)  # six faces
    detector = FaceDetector(pyramid=pyramid, stage_batch_size=4)
    workers: set[str] = set()
    pnet_rows: list[int] = []
    forward, propose = detector._nets["rnet"].forward, detector._nets["pnet"].forward

    def watched(*args):
        workers.add(threading.current_thread().name)
        return forward(*args)

    def watched_pnet(pixels):
        pnet_rows.append(pixels.shape[2])
        return propose(pixels)

    detector._nets["rnet"].forward = watched
    detector._nets["pnet"].forward = watched_pnet
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = detector.detect([crowd])[0]
        levels, whole = len(pnet_rows), sorted(pnet_rows)
        workers.clear()
        pnet_rows.clear()
        torch.set_num_threads(3)
        spread = detector.detect([crowd])[0]
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert len(alone) == 6
    assert len([name for name in workers if name.startswith("mtcnn")]) >= 2
    # The first level went in bands: more P-Net passes, none as tall as the whole level.
    assert len(pnet_rows) > levels and max(pnet_rows) < whole[-1]
    np.testing.assert_array_equal(spread.boxes, alone.boxes)
    np.testing.assert_array_equal(spread.scores, alone.scores)
    np.testing.assert_array_equal(spread.landmarks, alone.landmarks)


def test_precision_auto_is_fp32_without_bf16_units(monkeypatch, astronaut):
    import mtcnn.detector as detector_module

    monkeypatch.setattr(detector_module, "has_native_bf16", lambda: False)
    monkeypatch.setattr(detector_module, "_auto_choices", {})
    detector = FaceDetector(precision="auto")
    assert detector.precision == "fp32" and detector.config.precision == "auto"
    assert not detector_module._auto_choices  # nothing timed: emulated bf16 is never faster
    exact = FaceDetector().detect([astronaut])[0]
    np.testing.assert_array_equal(detector.detect([astronaut])[0].boxes, exact.boxes)
    with pytest.warns(UserWarning, match="emulated"):
        FaceDetector(precision="bf16")


def test_precision_auto_with_bf16_units_keeps_what_times_faster(monkeypatch, astronaut):
    """With bf16 units (claimed here where the CPU lacks them) auto times both precisions once per
    process and thread count, and runs what it chose."""
    import mtcnn.detector as detector_module

    monkeypatch.setattr(detector_module, "has_native_bf16", lambda: True)
    monkeypatch.setattr(detector_module, "_auto_choices", {})
    timed = []
    real_timing = detector_module._time_nets

    def recorded(candidates, windows):
        seconds = real_timing(candidates, windows)
        timed.append(seconds)
        return seconds

    monkeypatch.setattr(detector_module, "_time_nets", recorded)
    chosen = FaceDetector(precision="auto")
    (seconds,) = timed
    assert sorted(seconds) == ["bf16", "fp32"] and all(value > 0 for value in seconds.values())
    assert chosen.precision == ("bf16" if seconds["bf16"] < 0.95 * seconds["fp32"] else "fp32")
    FaceDetector(precision="auto")
    assert len(timed) == 1  # the choice is kept for the process
    same = FaceDetector(precision=chosen.precision).detect([astronaut])[0]
    np.testing.assert_array_equal(chosen.detect([astronaut])[0].boxes, same.boxes)


def test_concurrent_calls_restore_the_thread_count(astronaut):
    """Images of a call run on threads with single-threaded ops; the count comes back after."""
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        detector = FaceDetector(pyramid="classic")
        images = [astronaut, astronaut[:300], astronaut[::2, ::2]]
        expected = [len(found) for found in detector.detect(images)]
        assert torch.get_num_threads() == 2
        # Two callers at once overlap their single-threaded spans; the last one out restores.
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(detector.detect, [images, images[::-1]]))
        assert [len(found) for found in results[0]] == expected
        assert [len(found) for found in results[1]] == expected[::-1]
        assert torch.get_num_threads() == 2
        proposals = detector.propose(images, up_to="rnet")
        assert len(proposals) == 3 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bounded_stage_batches_do_not_change_results(astronaut):
    default = FaceDetector(pyramid="classic").detect([astronaut])[0]
    tiny = FaceDetector(pyramid="classic", stage_batch_size=3).detect([astronaut])[0]
    assert np.allclose(default.boxes, tiny.boxes, atol=1e-3)


def test_empty_results_are_typed_arrays(detector):
    results = detector.detect([np.full((200, 300, 3), 128, np.uint8), np.zeros((1, 1, 3), np.uint8)])
    for result in results:
        assert result.boxes.shape == (0, 4) and result.boxes.dtype == np.float32
        assert result.scores.shape == (0,) and result.landmarks.shape == (0, 5, 2)
    assert detector.detect([]) == []


def test_grayscale_and_rgba_inputs(detector, astronaut):
    gray = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    found_gray, found_gray1, found_rgba = detector.detect([gray, gray[:, :, None], rgba])
    assert len(found_gray) == 1 and np.allclose(found_gray.boxes, found_gray1.boxes)
    assert np.allclose(found_rgba.boxes, detector.detect([astronaut])[0].boxes)


def test_candidates_after_each_stage(detector, astronaut):
    after_pnet = detector.propose([astronaut], up_to="pnet")[0]
    after_rnet = detector.propose([astronaut], up_to="rnet")[0]
    assert len(after_pnet) > len(after_rnet) >= 1
    squares = after_rnet.boxes[:, 2:] - after_rnet.boxes[:, :2]
    assert np.allclose(squares[:, 0], squares[:, 1], atol=1e-3)
    assert (after_pnet.scores >= 0.6).all() and (after_rnet.scores > 0.7).all()


@pytest.mark.parametrize("options, message", [
    ({"min_face_size": -5}, "min_face_size"),
    ({"thresholds": (0.6, 1.7, 0.7)}, "thresholds"),
    ({"thresholds": (0.6, 0.7)}, "thresholds"),
    ({"scale_factor": 1.2}, "scale_factor"),
    ({"pyramid": "pyramidal"}, "pyramid"),
    ({"precision": "fp8"}, "precision"),
    ({"device": "tpu"}, "device"),
    ({"min_size": 20}, "unknown detector options"),
])
def test_invalid_arguments_are_refused_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        FaceDetector(**options)


@pytest.mark.parametrize("image, message", [
    (np.zeros((20, 20, 3), np.float32), "uint8"),
    (np.zeros((20, 20, 2), np.uint8), "shape"),
    (np.zeros((0, 20, 3), np.uint8), "no pixels"),
])
def test_invalid_images_are_refused_clearly(detector, image, message):
    with pytest.raises(ValueError, match=message):
        detector.detect([image])


def test_accelerator_code_path_agrees_with_the_cpu_path(monkeypatch, astronaut):
    # What runs on a GPU (torch pyramid, torch summed-area tables, masked NMS) run here on the
    # CPU, so the path is checked on machines without one.
    from mtcnn import boxes as box_ops
    small = cv2.resize(astronaut, (320, 300), interpolation=cv2.INTER_AREA)
    host = FaceDetector(pyramid="classic").detect([astronaut, small])
    device_path = FaceDetector(pyramid="classic")
    device_path._host_kernels = False
    monkeypatch.setattr(box_ops, "_grid_nms", box_ops.masked_nms)
    for expected, found in zip(host, device_path.detect([astronaut, small])):
        assert np.allclose(expected.boxes, found.boxes, atol=1e-2)
        assert np.allclose(expected.landmarks, found.landmarks, atol=1e-2)
    dynamic = FaceDetector(pyramid="dynamic")
    dynamic._host_kernels = False
    assert len(dynamic.detect([astronaut])[0]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(astronaut, reference):
    found = FaceDetector(device="cuda", pyramid="classic").detect([astronaut])[0]
    assert_matches(found, reference["boxes"], reference["scores"], reference["landmarks"])


def test_cross_level_nms_is_skipped_only_when_it_cannot_remove_anything():
    from mtcnn.detector import _levels_may_overlap
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 11, 11], [0, 0, 12, 12], [50, 50, 80, 80]])
    one_image = torch.zeros(4, dtype=torch.long)
    # Areas 100 and 121: IoU can reach 0.83 > 0.7, so the NMS must run.
    assert _levels_may_overlap(boxes[:2], torch.tensor([0, 1]), one_image[:2], 0.5, 0.7)
    # Areas 100 and 144: IoU is at most 0.69, and 900 is further still.
    assert not _levels_may_overlap(boxes[[0, 2, 3]], torch.tensor([0, 1, 2]), one_image[:3], 0.5, 0.7)
    # Levels of different images never suppress each other.
    assert not _levels_may_overlap(boxes[:2], torch.tensor([0, 1 << 16]), torch.tensor([0, 1]), 0.5, 0.7)
    # A same-level threshold above the cross-level one leaves nothing to prove.
    assert _levels_may_overlap(boxes[[0, 3]], torch.tensor([0, 1]), one_image[:2], 0.8, 0.7)


def test_fine_pyramids_still_merge_levels(astronaut):
    # With a factor close to 1, adjacent levels' windows overlap and the cross-level NMS runs.
    found = FaceDetector(scale_factor=0.9, pyramid="classic").detect([astronaut])[0]
    assert len(found) == 1
