"""Decode any image file into a square 8-bit RGB array.

Shared by `resize` (the training data) and by everything that classifies new
photos, so a photo is seen exactly the same way at training and at prediction.
Every failure is a `BadImage` whose message says what is wrong with the file.
"""

import contextlib
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ASPECT_POLICIES = ("pad", "center_crop", "stretch")


class BadImage(Exception):
    """The file cannot be used as an image; str(error) is the reason."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # (size, size, 3) uint8
    original_width: int
    original_height: int
    original_mode: str
    pixel_hash: str  # of the decoded RGB pixels before resizing: finds re-encoded duplicates


def _to_8bit_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Bring every Pillow mode to RGB: palette, grey, CMYK, 16-bit and float, alpha on `background`."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit greyscale is the common case for integer modes; float images come as 0..1 or 0..255.
        if image.mode == "F":
            scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0
        image = Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = image.convert("RGBA")
        composited = Image.new("RGB", rgba.size, background)
        composited.paste(rgba, mask=rgba.getchannel("A"))
        return composited
    return image.convert("RGB") if image.mode != "RGB" else image


def _fit_square(image: Image.Image, size: int, aspect: str, background: tuple[int, int, int],
                max_stretch: float = 1.0) -> Image.Image:
    resample = Image.Resampling.BILINEAR
    if aspect == "pad":
        if max_stretch > 1:
            # Lengthen the short side by up to max_stretch (never past the long one) in the same resize that
            # fits the photo in the square: a 4:3 photo then fills it instead of a quarter being letterbox.
            width, height = image.size
            scale = size / max(width, height)

            def lengthened(side):
                return min(size, max(1, round(side * scale * max_stretch)))

            image = image.resize((size, lengthened(height)) if width >= height else (lengthened(width), size),
                                 resample)
        return ImageOps.pad(image, (size, size), method=resample, color=background)
    if aspect == "center_crop":
        return ImageOps.fit(image, (size, size), method=resample)
    if aspect == "stretch":
        return image.resize((size, size), resample)
    raise ValueError(f"aspect must be one of {ASPECT_POLICIES}, got {aspect!r}")


def shared_aspect_ratio(sizes, share: float = 0.9) -> float:
    """The long-to-short side ratio (rounded to two decimals to group them) that at least `share` of the
    (width, height) `sizes` have, or 1.0 when no one ratio is that common: photos from one camera share
    one, product shots do not. At most 10, resize.max_stretch's own limit."""
    ratios = np.array([max(width, height) / min(width, height) for width, height in sizes if min(width, height) > 0])
    if len(ratios) == 0:
        return 1.0
    rounded = np.round(ratios, 2)
    keys, counts = np.unique(rounded, return_counts=True)
    common = keys[counts.argmax()]
    if counts.max() < share * len(ratios) or common == 1.0:
        return 1.0
    return float(min(ratios[rounded == common].max(), 10.0))


@contextlib.contextmanager
def _open_guarded(source, max_pixels: int):
    """Image.open with Pillow's decompression-bomb guard at `max_pixels`, its warning made an error too."""
    # The guard reads this module-level limit; it warns above it and raises above twice it.
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            yield image


def image_size(path, max_pixels: int = 89_478_485) -> tuple[int, int]:
    """(width, height) from the file's header alone, or (0, 0) when it is not an image decode_image would take."""
    try:
        with _open_guarded(path, max_pixels) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return 0, 0


def decode_image(
    source,
    size: int,
    aspect: str = "pad",
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = 89_478_485,
    max_stretch: float = 1.0,
) -> Decoded:
    """Open `source` (a path, bytes or a binary file object) and return it as a (size, size, 3) uint8 array.

    With aspect "pad", the short side is first lengthened by up to `max_stretch` (1: never) and the rest padded.
    """
    if not isinstance(source, (bytes, bytearray)) and not hasattr(source, "read"):
        with open(source, "rb") as file:
            source = file.read()
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise BadImage("empty file (0 bytes)")
        source = io.BytesIO(source)
    try:
        with _open_guarded(source, max_pixels) as image:
            width, height = image.size
            mode = image.mode
            # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT
            # coefficients, never smaller than asked: most of resize's speed comes from here.
            image.draft(None, (size, size))
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_8bit_rgb(image, background)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(
            f"too large: over the pixel limit of {max_pixels:,} (decompression-bomb guard);"
            " raise resize.max_pixels if you trust this file"
        ) from None
    except UnidentifiedImageError:
        raise BadImage("not an image (Pillow cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        if "truncated" in str(error).lower():
            raise BadImage("truncated: the file ends before the image data does") from None
        raise BadImage(f"corrupt: {error}") from None
    pixel_hash = hashlib.blake2b(rgb.tobytes(), digest_size=16)
    pixel_hash.update(f"{rgb.size}".encode())
    square = _fit_square(rgb, size, aspect, background, max_stretch)
    return Decoded(np.asarray(square, dtype=np.uint8), width, height, mode, pixel_hash.hexdigest())
