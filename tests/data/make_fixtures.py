"""Writes cmyk.jpg and exif_rotated.jpg from astronaut.png (needs Pillow; run once, outputs committed).

OpenCV cannot write CMYK JPEGs or EXIF tags, so these two fixtures are made with Pillow:
    /opt/refvenv/bin/python tests/data/make_fixtures.py
"""

from pathlib import Path

from PIL import Image

here = Path(__file__).parent
upright = Image.open(here / "astronaut.png").convert("RGB").resize((192, 192), Image.LANCZOS)

# CMYK JPEG: valid, unusual; decoders must convert it to RGB.
upright.convert("CMYK").save(here / "cmyk.jpg", quality=90)

# EXIF orientation 6 ("rotate 90 degrees clockwise to display"): the stored pixels lie on their side
# and only the EXIF tag makes the face upright; the face must be found in the displayed orientation.
stored = upright.crop((0, 0, 192, 144)).transpose(Image.Transpose.ROTATE_90)  # 144 wide, 192 high
exif = Image.Exif()
exif[0x0112] = 6
stored.save(here / "exif_rotated.jpg", quality=90, exif=exif)
