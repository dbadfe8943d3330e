"""Image bytes -> H x W x 3 uint8 RGB, as displayed (EXIF orientation applied) or as stored, or a reason why not."""

from __future__ import annotations

import os
import re
import struct

#: Default cap on width x height, checked from the file header before any pixel is decoded.
DEFAULT_MAX_PIXELS = 100_000_000

# OpenCV's own pixel limit (default 2^30), read once per process at its first decode: set before
# cv2 loads so that even a format whose header this module could not size stops at the default.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))

import cv2  # noqa: E402 - after the limit above
import numpy as np  # noqa: E402

from jobs.common.storage import filesystem  # noqa: E402

#: Default cap on a file's size in bytes, checked before it is read whole.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

#: Formats whose header image_size reads; any other file is refused before decoding, since its
#: pixel count cannot be checked (a 6.7 MB run-length HDR decodes to 105 megapixels).
SIZED_FORMATS = "JPEG, PNG, BMP, GIF, WebP, TIFF, JPEG 2000, PNM/PAM/PFM, Radiance HDR, Sun raster"


class DecodeError(ValueError):
    """An image that cannot be annotated, with a reason a user can act on."""


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of any format in SIZED_FORMATS, or None if not found."""
    # OpenCV reads headers only inside imdecode, so the pixel limit needs its own small reader.
    head = bytes(data[:64])
    try:
        if head[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7", b"PF", b"Pf"):
            return _pnm_size(bytes(data[:4096]))
        if head.startswith((b"#?RADIANCE", b"#?RGBE")):
            return _hdr_size(bytes(data[:65536]))
        if head.startswith(b"\x59\xa6\x6a\x95") and len(head) >= 12:  # Sun raster
            return struct.unpack(">II", head[4:12])
        if head.startswith(b"\xff\x4f\xff\x51"):  # JPEG 2000 codestream: SIZ follows SOC
            return _j2k_size(head, 4)
        if head[4:12] == b"jP  \r\n\x87\n":  # JP2 file: boxes, the codestream inside
            return _jp2_size(bytes(data[:1 << 20]))
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
        if head.startswith(b"BM") and len(head) >= 26:
            width, height = struct.unpack("<ii", head[18:26])
            return abs(width), abs(height)  # negative height: rows stored top-down
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", head[6:10])
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            return _webp_size(head)
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except struct.error:
        return None  # header cut short: imdecode reports the file as truncated
    return None


def _pnm_size(head: bytes) -> tuple[int, int] | None:
    if head[:2] == b"P7":  # PAM: WIDTH and HEIGHT lines
        width = re.search(rb"\nWIDTH\s+(\d+)", head)
        height = re.search(rb"\nHEIGHT\s+(\d+)", head)
        return (int(width[1]), int(height[1])) if width and height else None
    # Width and height are the first two numbers after the magic, comments (#...) aside.
    body = re.sub(rb"#[^\n]*", b" ", head[2:])
    numbers = re.findall(rb"\d+", body[:1024])
    return (int(numbers[0]), int(numbers[1])) if len(numbers) >= 2 else None


def _hdr_size(head: bytes) -> tuple[int, int] | None:
    # After the header's blank line: "-Y height +X width" (or another of the 8 orientations).
    match = re.search(rb"\n\n([-+][YX])\s+(\d+)\s+([-+][YX])\s+(\d+)", head)
    if not match:
        return None
    first, second = int(match[2]), int(match[4])
    return (second, first) if match[1].endswith(b"Y") else (first, second)


def _j2k_size(data: bytes, siz: int) -> tuple[int, int] | None:
    # SIZ: marker, length, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz (grid size less the image offset).
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[siz + 6:siz + 22])
    return xsiz - xo, ysiz - yo


def _jp2_size(data: bytes) -> tuple[int, int] | None:
    position = 0
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"jp2h":  # header superbox: its first child is ihdr (height, width)
            if data[position + 12:position + 16] == b"ihdr":
                height, width = struct.unpack(">II", data[position + 16:position + 24])
                return width, height
            return None
        if length == 1:
            length = struct.unpack(">Q", data[position + 8:position + 16])[0]
        if length < 8:
            return None
        position += length
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        # Start-of-frame markers (all but DHT C4, JPG C8, DAC CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        position += 2 + length
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[offset:offset + 2])
    size = {}
    for index in range(count):
        entry = data[offset + 2 + 12 * index:offset + 14 + 12 * index]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt = order + ("H" if kind == 3 else "I")
            size[tag] = struct.unpack(fmt, entry[8:8 + struct.calcsize(fmt)])[0]
    if 256 in size and 257 in size:
        return size[256], size[257]
    return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, orientation: bool = True) -> np.ndarray:
    """RGB uint8 pixels of an encoded image, after checks of its size and completeness.

    orientation: rotate it as its EXIF orientation says it is displayed (False: the stored grid).
    """
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    size = image_size(data)
    if size is None:
        if _looks_truncated_header(data):
            raise DecodeError("truncated or corrupt image: its header is cut short")
        raise DecodeError(f"not an image whose size can be read before decoding (annotated formats: "
                          f"{SIZED_FORMATS}); convert it to one of them")
    width, height = size
    if width * height > max_pixels:
        raise DecodeError(f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, over "
                          f"the limit of {max_pixels / 1e6:g}; raise --max-pixels to annotate it")
    if width == 0 or height == 0:
        raise DecodeError(f"image header says {width}x{height}: no pixels")
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        # libjpeg fills a cut-off scan with grey and only warns; no end marker after the last
        # scan header means the file was cut short (a download or copy that did not finish).
        raise DecodeError("truncated JPEG: the file ends before the image data does")
    return decode_pixels(data, orientation, "truncated or corrupt image")


def decode_pixels(data: bytes, orientation: bool = True,
                  unreadable: str = "not an image OpenCV can read (expected JPEG, PNG, BMP, WebP or TIFF)"
                  ) -> np.ndarray:
    """RGB uint8 pixels of an encoded image, no limits checked: the one place images become RGB.

    orientation: rotate as the EXIF orientation says the image is displayed; False keeps the
    stored pixel grid (what dataset annotations refer to).
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
    # COLOR_RGB: gray, RGBA and CMYK come back as 3-channel RGB; ANYDEPTH keeps 16-bit and float
    # samples so they are scaled below rather than truncated.
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_ANYDEPTH
    if not orientation:
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(buffer, flags)
    except cv2.error as error:
        raise DecodeError(f"not a readable image: {str(error).strip().splitlines()[-1]}") from None
    if image is None or image.size == 0:
        raise DecodeError(unreadable)
    return to_uint8_rgb(image)


def read_rgb(path: str, storage_options: dict | None = None, orientation: bool = True,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file (local path or fsspec URL) as checked RGB pixels (decode_image)."""
    fs, inner = filesystem(path, storage_options)
    with fs.open(inner, "rb") as handle:
        return decode_image(handle.read(), max_pixels, orientation)


def _looks_truncated_header(data: bytes) -> bool:
    """Whether the file starts like a sized format but ends before its size fields."""
    return len(data) < 64 and data[:2] in (b"\xff\xd8", b"\x89P", b"BM", b"GI", b"RI", b"II", b"MM")


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Scale a 16-bit or float RGB image to uint8 (8-bit images pass through)."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.uint16:
        # 65535 / 257 = 255 exactly, so full range maps to full range.
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        # Float images (TIFF, EXR) use 0..1 for the displayable range.
        return (np.clip(np.nan_to_num(image), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.dtype == np.int8:
        return (image.astype(np.int16) + 128).astype(np.uint8)
    info = np.iinfo(image.dtype)
    scaled = (image.astype(np.float64) - info.min) / (info.max - info.min) * 255.0
    return (scaled + 0.5).astype(np.uint8)
