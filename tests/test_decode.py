"""Decoding real encoded files of every accepted kind to RGB uint8, and the reasons for the rest."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from jobs.inputs.decode import DecodeError, decode_image, image_size

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def rgb():
    """A 96 x 128 RGB test card with distinct red, green and blue thirds."""
    image = np.zeros((96, 128, 3), np.uint8)
    image[:, :40] = (220, 30, 20)
    image[:, 40:80] = (20, 200, 40)
    image[:, 80:] = (10, 40, 230)
    return image


def encode(extension: str, pixels: np.ndarray, params=()) -> bytes:
    ok, data = cv2.imencode(extension, pixels, list(params))
    assert ok, extension
    return data.tobytes()


@pytest.mark.parametrize("extension", [".png", ".bmp", ".tiff", ".webp", ".jpg"])
def test_formats_decode_to_rgb_in_display_colours(rgb, extension):
    params = (cv2.IMWRITE_WEBP_QUALITY, 101) if extension == ".webp" else ()
    data = encode(extension, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    image = decode_image(data)
    assert image.dtype == np.uint8 and image.shape == (96, 128, 3)
    tolerance = 12 if extension == ".jpg" else 1
    # Column centres of each third keep their colour, so channels were not swapped.
    for column in (20, 60, 104):
        assert np.abs(image[48, column].astype(int) - rgb[48, column]).max() <= tolerance
    assert image_size(data) == (128, 96)


def test_grayscale_becomes_three_equal_channels(rgb):
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    image = decode_image(encode(".png", gray))
    assert image.shape == (96, 128, 3)
    assert np.array_equal(image[..., 0], gray) and np.array_equal(image[..., 2], gray)


def test_rgba_drops_alpha_keeps_colour(rgb):
    bgra = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
    bgra[:, :, 3] = 128
    image = decode_image(encode(".png", bgra))
    assert image.shape == (96, 128, 3)
    assert np.array_equal(image, rgb)


def test_16_bit_png_is_scaled_not_clipped(rgb):
    deep = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
    image = decode_image(encode(".png", deep))
    assert image.dtype == np.uint8
    assert np.array_equal(image, rgb)


def test_float_tiff_is_scaled(rgb):
    data = encode(".tiff", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.float32) / 255.0)
    assert np.abs(decode_image(data).astype(int) - rgb).max() <= 1


def test_cmyk_jpeg_matches_its_rgb_source():
    astronaut = cv2.cvtColor(cv2.imread(str(DATA / "astronaut.png")), cv2.COLOR_BGR2RGB)
    expected = cv2.resize(astronaut, (192, 192), interpolation=cv2.INTER_AREA).astype(int)
    image = decode_image((DATA / "cmyk.jpg").read_bytes())
    assert image.shape == (192, 192, 3)
    # Inverted or swapped CMYK would be off by ~100 levels; JPEG loss is a few.
    assert np.abs(image.astype(int) - expected).mean() < 8


def test_exif_orientation_is_applied():
    data = (DATA / "exif_rotated.jpg").read_bytes()
    assert image_size(data) == (144, 192)  # stored on its side
    image = decode_image(data)
    assert image.shape == (144, 192, 3)  # displayed upright: wider than high
    astronaut = cv2.cvtColor(cv2.imread(str(DATA / "astronaut.png")), cv2.COLOR_BGR2RGB)
    upright = cv2.resize(astronaut, (192, 192), interpolation=cv2.INTER_AREA)[:144]
    assert np.abs(image.astype(int) - upright.astype(int)).mean() < 8


def test_one_pixel_image():
    image = decode_image(encode(".png", np.full((1, 1, 3), 77, np.uint8)))
    assert image.shape == (1, 1, 3) and image[0, 0, 0] == 77


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    big = encode(".png", np.zeros((1000, 1200), np.uint8))
    with pytest.raises(DecodeError, match=r"1200x1000 = 1.2 megapixels.*--max-pixels"):
        decode_image(big, max_pixels=1_000_000)
    assert decode_image(big, max_pixels=1_200_000).shape == (1000, 1200, 3)
    # A header claiming 50000 x 50000 with no pixel data behind it: refused without allocating 7.5 GB.
    bomb = big[:16] + (50000).to_bytes(4, "big") + (50000).to_bytes(4, "big") + big[24:60]
    with pytest.raises(DecodeError, match="2500.0 megapixels"):
        decode_image(bomb)


@pytest.mark.parametrize("extension", [".jpg", ".png", ".webp", ".bmp", ".tiff"])
def test_header_sizes_of_each_format(extension):
    data = encode(extension, np.zeros((37, 53, 3), np.uint8))
    assert image_size(data) == (53, 37)


def test_truncated_empty_and_non_images_raise_with_reasons(rgb):
    jpeg = encode(".jpg", rgb)
    with pytest.raises(DecodeError, match="empty file"):
        decode_image(b"")
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(b"%PDF-1.7 this is not an image at all" * 10)
    with pytest.raises(DecodeError, match="truncated or corrupt"):
        decode_image(encode(".png", rgb)[:200])
    # libjpeg fills a cut-off scan with grey and only warns: the job must still call it truncated.
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(jpeg[:len(jpeg) // 2])
    with pytest.raises(DecodeError, match="truncated|not an image"):
        decode_image(jpeg[:120])
    big = encode(".png", np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8))
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(big[:len(big) // 2])


@pytest.mark.parametrize("extension", [".hdr", ".ppm", ".pgm", ".pbm", ".pam", ".pfm", ".ras", ".jp2",
                                       ".tiff", ".webp", ".bmp", ".png", ".jpg"])
def test_pixel_limit_holds_for_every_format_opencv_writes(extension):
    # A run-length HDR of 105 megapixels is 6.7 MB: the limit must come from the header, never
    # from decoding. Each format OpenCV can write is sized and refused before any pixel.
    pixels = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    if extension in (".pgm", ".pbm"):
        pixels = pixels[:, :, 0]
    if extension in (".hdr", ".pfm"):
        pixels = pixels.astype(np.float32) / 255
    ok, encoded = cv2.imencode(extension, pixels)
    assert ok
    assert image_size(encoded.tobytes()) == (300, 200)
    with pytest.raises(DecodeError, match="over the limit"):
        decode_image(encoded.tobytes(), max_pixels=1000)
    assert decode_image(encoded.tobytes()).shape == (200, 300, 3)


def test_a_format_whose_size_cannot_be_read_is_refused_before_decoding():
    header = b"\x00\x00\x00\x1cftypavif" + bytes(100)  # AVIF-like: no header parser
    with pytest.raises(DecodeError, match="size can be read before decoding"):
        decode_image(header)
