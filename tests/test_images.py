"""decode_image: every colour mode becomes 8-bit RGB, every bad file a clear reason."""

import io

import numpy as np
import pytest
from PIL import Image

from imgcls.images import BadImage, decode_image, shared_aspect_ratio


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "I;16", "I", "F", "LA", "RGBA", "RGB"])
def test_every_mode_becomes_8bit_rgb(mode):
    image = Image.new("RGB", (30, 20), (200, 100, 50)).convert(mode)
    format = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    decoded = decode_image(encode(image, format), size=16)
    assert decoded.pixels.shape == (16, 16, 3)
    assert decoded.pixels.dtype == np.uint8
    assert decoded.original_mode == image.mode


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values)), size=8, aspect="stretch")
    assert abs(int(decoded.pixels[4, 4, 0]) - 128) <= 1


def test_alpha_is_composited_on_the_background():
    transparent = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    decoded = decode_image(encode(transparent), size=10, background=(0, 0, 255))
    assert tuple(decoded.pixels[5, 5]) == (0, 0, 255)


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = decode_image(encode(wide, "JPEG", exif=exif), size=40, aspect="stretch")
    assert decoded.original_width == 40
    # Displayed upright the photo is tall: with pad it would be letterboxed left and right.
    padded = decode_image(encode(wide, "JPEG", exif=exif), size=40, aspect="pad", background=(255, 255, 255))
    assert tuple(padded.pixels[20, 2]) == (255, 255, 255)
    assert padded.pixels[2, 20, 1] > 200 and padded.pixels[2, 20, 0] < 60


@pytest.mark.parametrize("aspect", ["pad", "center_crop", "stretch"])
def test_aspect_policies_give_a_square(aspect):
    decoded = decode_image(encode(Image.new("RGB", (90, 30), (10, 20, 30))), size=24, aspect=aspect)
    assert decoded.pixels.shape == (24, 24, 3)


def test_pad_letterboxes_with_the_background_colour():
    decoded = decode_image(encode(Image.new("RGB", (90, 30), (0, 0, 0))), size=30, aspect="pad", background=(9, 8, 7))
    assert tuple(decoded.pixels[0, 15]) == (9, 8, 7)
    assert tuple(decoded.pixels[15, 15]) == (0, 0, 0)


def test_max_stretch_fills_the_square_with_a_4_by_3_photo_and_pads_the_rest_of_a_longer_one():
    def background_rows(width, height, max_stretch):
        photo = encode(Image.new("RGB", (width, height), (0, 0, 0)))
        pixels = decode_image(photo, size=48, aspect="pad", background=(255, 255, 255),
                              max_stretch=max_stretch).pixels
        return int((pixels[:, 24, 0] > 128).sum())

    assert background_rows(64, 48, 1.0) == 12  # letterboxed: a quarter of the square is padding
    assert background_rows(64, 48, 1.34) == 0  # 4:3 lengthened by 4/3 fills it
    assert background_rows(90, 30, 1.34) == 48 - 21  # 3:1 lengthened by 1.34 at most (16 rows to 21), padded


def test_shared_aspect_ratio_is_the_shape_nine_in_ten_photos_have():
    assert shared_aspect_ratio([(4032, 3024)] * 9 + [(1920, 1080)]) == pytest.approx(4 / 3)
    assert shared_aspect_ratio([(3024, 4032), (4032, 3024), (640, 480), (256, 192)]) == pytest.approx(4 / 3)
    assert shared_aspect_ratio([(4032, 3024)] * 8 + [(1920, 1080)] * 2) == 1.0  # only 80% share one
    assert shared_aspect_ratio([(32, 32)] * 10) == 1.0
    assert shared_aspect_ratio([(0, 0)]) == 1.0  # unreadable files count for nothing
    assert shared_aspect_ratio([(1, 1000)] * 10) == 10.0  # resize.max_stretch's own limit


def test_pixel_hash_finds_re_encoded_duplicates():
    image = Image.new("RGB", (20, 20), (1, 2, 3))
    png = decode_image(encode(image, "PNG"), size=8)
    bmp = decode_image(encode(image, "BMP"), size=8)
    other = decode_image(encode(Image.new("RGB", (20, 20), (3, 2, 1))), size=8)
    assert png.pixel_hash == bmp.pixel_hash != other.pixel_hash


def jpeg_bytes() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", r"empty file \(0 bytes\)"),
        (b"hello, I am a text file\n", "not an image"),
        (jpeg_bytes()[:400], "truncated"),
        (jpeg_bytes()[:200] + bytes(range(256)) * 8, "corrupt"),
    ],
    ids=["zero-byte", "not-an-image", "truncated", "corrupt"],
)
def test_bad_files_raise_a_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_image(data, size=16)


def test_decompression_bomb_is_refused_with_the_param_to_change():
    huge = encode(Image.new("1", (2000, 2000)))  # 4 megapixels in a few kilobytes
    with pytest.raises(BadImage, match="too large.*resize.max_pixels"):
        decode_image(huge, size=16, max_pixels=1_000_000)
    assert decode_image(huge, size=16, max_pixels=5_000_000).pixels.shape == (16, 16, 3)
