import pytest
import torch
import torch.nn.functional as F

from mtcnn import boxes as box_ops
from mtcnn.box_coder import box_iou, crop_regions, decode_boxes
from mtcnn.boxes import batched_nms, crop_resize, host_integral_image, integral_image, square


def greedy_nms(boxes, scores, groups, threshold, mode, plus_one):
    """Plain sequential NMS, one box at a time: the definition the fast version must match."""
    order = sorted(range(len(scores)), key=lambda i: (groups[i], -scores[i]))
    kept = []
    for i in order:
        others = [j for j in kept if groups[j] == groups[i]]
        if others:
            overlap = box_iou(boxes[i:i + 1], boxes[others], plus_one=plus_one, mode=mode)
            if (overlap > threshold).any():
                continue
        kept.append(i)
    return kept


def random_boxes(count, seed, spread=200.0):
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=generator) * spread
    size = 10 + torch.rand(count, 2, generator=generator) * 60
    return torch.cat([corner, corner + size], dim=1), torch.rand(count, generator=generator)


@pytest.mark.parametrize("mode,plus_one", [("union", False), ("min", True), ("union", True)])
@pytest.mark.parametrize("block", [1024, 16])
def test_batched_nms_matches_sequential_greedy(monkeypatch, mode, plus_one, block):
    monkeypatch.setattr(box_ops, "_NMS_BLOCK", block)
    boxes, scores = random_boxes(300, seed=3)
    groups = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(4))
    expected = greedy_nms(boxes, scores, groups.tolist(), 0.4, mode, plus_one)
    assert batched_nms(boxes, scores, groups, 0.4, mode, plus_one).tolist() == expected
    # The device-agnostic path (used on GPUs) agrees with the OpenCV one used on CPUs.
    masked = box_ops.masked_nms(boxes, scores, groups, 0.4, mode, plus_one)
    assert masked[torch.argsort(groups[masked], stable=True)].tolist() == expected


@pytest.mark.parametrize("mode,plus_one", [("union", False), ("min", True)])
@pytest.mark.parametrize("threshold", [0.5, 0.0, 1.0])
def test_nms_of_window_grids_with_exact_ties(mode, plus_one, threshold):
    # P-Net's windows: one size per level on a 2-pixel grid, integer corners, so overlaps hit the
    # thresholds exactly (0.5, 0, 1) and scores tie; two levels as two groups.
    generator = torch.Generator().manual_seed(7)
    cells = torch.cartesian_prod(torch.arange(0, 60, 2.0), torch.arange(0, 40, 2.0))
    boxes = torch.cat([torch.cat([cells, cells + side], dim=1) for side in (12.0, 17.0)])
    scores = torch.randint(0, 5, (len(boxes),), generator=generator).float() / 4
    groups = torch.arange(len(boxes)) // len(cells)
    expected = greedy_nms(boxes, scores, groups.tolist(), threshold, mode, plus_one)
    assert batched_nms(boxes, scores, groups, threshold, mode, plus_one).tolist() == expected


def test_nms_of_mixed_sizes_far_apart_and_degenerate_boxes():
    # Tiny boxes beside huge ones, coordinates near a million, boxes with no area and boxes
    # upside down: the grid's cells (one per largest side) must still find every overlap.
    tiny, tiny_scores = random_boxes(150, seed=11, spread=400.0)
    huge, huge_scores = random_boxes(40, seed=12, spread=300.0)
    huge[:, 2:] = huge[:, :2] + 150 + huge[:, 2:] - huge[:, :2]
    far, far_scores = random_boxes(60, seed=13)
    far += 1_000_000.0
    flat = torch.tensor([[5.0, 5.0, 5.0, 40.0], [30.0, 30.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    boxes = torch.cat([tiny, huge, far, flat])
    scores = torch.cat([tiny_scores, huge_scores, far_scores, torch.tensor([1.0, 1.0, 1.0])])
    groups = torch.zeros(len(boxes), dtype=torch.long)
    for mode, plus_one in [("union", False), ("min", True), ("min", False)]:
        expected = greedy_nms(boxes, scores, groups.tolist(), 0.3, mode, plus_one)
        assert batched_nms(boxes, scores, groups, 0.3, mode, plus_one).tolist() == expected
        as_doubles = batched_nms(boxes.double(), scores, groups, 0.3, mode, plus_one)
        assert as_doubles.tolist() == greedy_nms(boxes.double(), scores, groups.tolist(), 0.3, mode, plus_one)


def test_nms_with_infinite_boxes_or_negative_threshold_takes_the_general_path():
    boxes, scores = random_boxes(100, seed=5)
    groups = torch.zeros(100, dtype=torch.long)
    expected = greedy_nms(boxes, scores, groups.tolist(), -0.5, "union", False)
    assert batched_nms(boxes, scores, groups, -0.5).tolist() == expected == [int(scores.argmax())]
    nan_scores = scores.clone()
    nan_scores[7] = float("nan")
    assert batched_nms(boxes, nan_scores, groups, 0.4).tolist() == box_ops.masked_nms(boxes, nan_scores, groups, 0.4).tolist()
    boxes[3] = torch.tensor([0.0, 0.0, float("inf"), float("inf")])
    assert batched_nms(boxes, scores, groups, 0.4).tolist() == box_ops.masked_nms(boxes, scores, groups, 0.4).tolist()


@pytest.mark.parametrize("nms", [batched_nms, box_ops.masked_nms])
def test_long_suppression_chain(nms):
    # Each box overlaps only its neighbours: the greedy result alternates keep / drop.
    x = torch.arange(40, dtype=torch.float32) * 4.0
    boxes = torch.stack([x, torch.zeros(40), x + 10, torch.full((40,), 10.0)], dim=1)
    scores = torch.linspace(1.0, 0.5, 40)
    kept = nms(boxes, scores, torch.zeros(40, dtype=torch.long), 0.3).tolist()
    assert kept == list(range(0, 40, 2))


def test_empty_nms():
    assert batched_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0


def test_calibrate_and_square():
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert torch.equal(decode_boxes(box, torch.tensor([[0.1, 0.0, -0.1, 0.5]]), plus_one=False),
                       torch.tensor([[12.0, 20.0, 28.0, 80.0]]))
    assert torch.allclose(square(box), torch.tensor([[0.0, 20.0, 40.0, 60.0]]))


def test_crop_resize_is_area_interpolation_of_the_crop():
    generator = torch.Generator().manual_seed(5)
    image = torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8, generator=generator)
    boxes = torch.tensor([[10.7, 5.2, 70.9, 80.1], [100.0, 50.0, 150.0, 95.0], [-5.0, -5.0, 20.0, 14.0],
                          [30.0, 30.0, 45.0, 42.0]])
    regions = crop_regions(boxes, 120, 90)
    crops = crop_resize(integral_image(image), regions, 24)
    float_image = image.permute(2, 0, 1)[None].float()
    for crop, (x1, y1, x2, y2) in zip(crops, regions.long().tolist()):
        expected = F.interpolate(float_image[:, :, y1:y2, x1:x2], size=(24, 24), mode="area")[0]
        assert torch.allclose(crop, expected, atol=1e-3)


def test_crop_resize_reads_a_table_with_a_padding_lane_the_same():
    generator = torch.Generator().manual_seed(6)
    image = torch.randint(0, 256, (70, 90, 3), dtype=torch.uint8, generator=generator)
    padded = torch.cat([image, torch.full((70, 90, 1), 255, dtype=torch.uint8)], dim=2)
    regions = crop_regions(torch.tensor([[3.5, 4.0, 60.2, 66.0], [50.0, 10.0, 58.0, 17.0]]), 90, 70)
    table = integral_image(padded)
    assert table.dtype == torch.int32  # the packed 16-byte read path
    for size in (24, 48):
        assert torch.equal(crop_resize(table, regions, size, channels=3),
                           crop_resize(integral_image(image), regions, size))


def test_crop_resize_loops_equal_the_tensor_form_bit_for_bit():
    from mtcnn.boxes import _crop_resize_tensors

    generator = torch.Generator().manual_seed(7)
    image = torch.randint(0, 256, (83, 131, 3), dtype=torch.uint8, generator=generator)
    # Boxes larger and smaller than the output (down- and upscaling), at and past every edge,
    # and wholly outside (empty regions, which read one pixel).
    corners = torch.rand((300, 2), generator=generator) * torch.tensor([180.0, 130.0]) - 25.0
    sides = torch.rand((300, 1), generator=generator) * 90.0 + 1.0
    boxes = torch.cat([corners, corners + sides], dim=1)
    boxes = torch.cat([boxes, torch.tensor([[140.0, 90.0, 160.0, 99.0], [-30.0, -30.0, -2.0, -1.0]])])
    regions = crop_regions(boxes, 131, 83)
    for table, channels in ((integral_image(image), 3), (integral_image(image).long(), 3),
                            (host_integral_image(image.numpy()), 3)):
        for size in (12, 24, 48):
            crops = crop_resize(table, regions, size, channels=channels)
            assert crops.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(crops, _crop_resize_tensors(table, regions.long(), size, channels))


def test_crop_resize_refuses_regions_outside_the_image_instead_of_reading_past_it():
    table = integral_image(torch.zeros((20, 30, 3), dtype=torch.uint8))
    for region in ([25.0, 5.0, 45.0, 15.0], [-1.0, 0.0, 5.0, 5.0], [0.0, 20.0, 5.0, 21.0]):
        with pytest.raises(ValueError, match="inside the 30 x 20 image"):
            crop_resize(table, torch.tensor([region]), 12)


def test_crop_regions_clip_to_the_image():
    regions = crop_regions(torch.tensor([[-10.0, -3.0, 500.0, 40.5]]), 100, 50)
    assert regions.tolist() == [[0.0, 0.0, 100.0, 40.0]]
