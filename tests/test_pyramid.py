import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtcnn.pyramid import build_pyramid, build_pyramid_tensor, level_size, pyramid_scales


def test_scales_stop_before_the_short_side_drops_below_the_window():
    scales = pyramid_scales(720, 1280, min_face_size=20, scale_factor=0.709)
    assert len(scales) == 11
    assert scales[0] == pytest.approx(12 / 20)
    assert min(720, 1280) * scales[-1] >= 12 > min(720, 1280) * scales[-1] * 0.709
    assert pyramid_scales(11, 500, 12, 0.709) == []


@pytest.fixture
def image():
    generator = np.random.default_rng(6)
    smooth = generator.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    import cv2
    return cv2.resize(smooth, (403, 301), interpolation=cv2.INTER_LINEAR)


def test_classic_and_dynamic_give_the_same_level_sizes(image):
    scales = pyramid_scales(*image.shape[:2], 20, 0.709)
    classic = build_pyramid(image, scales, "classic")
    dynamic = build_pyramid(image, scales, "dynamic")
    expected = [level_size(*image.shape[:2], s) for s in scales]
    assert [tuple(level.shape[:2]) for level in classic] == expected
    assert [tuple(level.shape[:2]) for level in dynamic] == expected
    # Resizing from the previous level changes pixels only slightly on smooth content; the
    # tiniest levels, resized most often, drift most.
    for a, b in zip(classic, dynamic):
        limit = 2.5 if min(a.shape[:2]) >= 24 else 8.0
        assert (a.float() - b.float()).abs().mean() < limit


def test_classic_levels_are_area_interpolation_of_the_full_image(image):
    scales = pyramid_scales(*image.shape[:2], 20, 0.709)
    full = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    for scale, level in zip(scales, build_pyramid(image, scales, "classic")):
        expected = F.interpolate(full, size=level_size(*image.shape[:2], scale), mode="area")
        assert torch.allclose(level, expected[0].permute(1, 2, 0), atol=1e-3)
    tensor_levels = build_pyramid_tensor(full, scales, "classic")
    assert [t.shape[-2:] for t in tensor_levels] == [l.shape[:2] for l in build_pyramid(image, scales)]


def test_host_levels_equal_the_tensor_form_bit_for_bit(image):
    from mtcnn.boxes import host_integral_image, integral_image
    from mtcnn.pyramid import _resize_from_table_tensors, resize_from_table

    tables = [host_integral_image(image), integral_image(torch.from_numpy(image)).long(),
              torch.from_numpy(cv2.integral(image, sdepth=cv2.CV_64F))]
    for table in tables:
        for size in [(301, 403), (213, 286), (13, 17), (400, 500)]:  # down, up and odd ratios
            assert torch.equal(resize_from_table(table, *size, 3), _resize_from_table_tensors(table[:, :, :3], *size))
    gray = np.ascontiguousarray(image[:, :, 0])
    levels = build_pyramid(gray, [0.5, 0.3], "classic")
    assert [tuple(level.shape) for level in levels] == [level_size(301, 403, s) for s in (0.5, 0.3)]
    assert torch.equal(levels[0], build_pyramid(np.ascontiguousarray(image[:, :, :1]), [0.5], "classic")[0][:, :, 0])


def test_unknown_pyramid_is_refused(image):
    with pytest.raises(ValueError, match="pyramid"):
        build_pyramid(image, [0.5], "pyramidal")


@pytest.mark.parametrize("variant", ["chain2", "octave"])
def test_fast_variants_keep_the_level_sizes_and_drift_less_than_dynamic(image, variant):
    scales = pyramid_scales(*image.shape[:2], 12, 0.709)
    classic = build_pyramid(image, scales, "classic")
    dynamic = build_pyramid(image, scales, "dynamic")
    levels = build_pyramid(image, scales, variant)
    assert [tuple(level.shape) for level in levels] == [tuple(level.shape) for level in classic]

    def deep_error(candidate):
        # The smallest levels are where resizing from resized levels compounds most.
        return sum((a.float() - b.float()).abs().mean() for a, b in zip(candidate[-4:], classic[-4:]))

    assert deep_error(levels) < deep_error(dynamic)


@pytest.mark.parametrize("variant", ["dynamic", "chain2", "octave"])
def test_tensor_variants_give_the_host_level_sizes(image, variant):
    scales = pyramid_scales(*image.shape[:2], 12, 0.709)
    full = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    tensor_levels = build_pyramid_tensor(full, scales, variant)
    assert [tuple(t.shape[-2:]) for t in tensor_levels] == [tuple(l.shape[:2]) for l in
                                                           build_pyramid(image, scales, variant)]
    # Every variant's first level comes straight from the full image.
    first = F.interpolate(full, size=tensor_levels[0].shape[-2:], mode="area")
    assert torch.equal(tensor_levels[0], first)


def test_grayscale_levels_keep_their_channel_axis(image):
    gray = np.ascontiguousarray(image[:, :, :1])
    for variant in ("chain2", "octave"):
        levels = build_pyramid(gray, [0.5, 0.3, 0.2], variant)
        assert all(level.shape[2] == 1 for level in levels)
