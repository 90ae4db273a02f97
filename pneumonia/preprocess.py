"""The one decode + resize function shared by training, evaluation and serving.

A model must never see different pixels in production than in training, so every path that turns
file bytes into a model input goes through :func:`decode_image`. It uses Pillow only (no
TensorFlow), so a serving process can import it cheaply.

Choices and why:
- JPEGs are decoded with libjpeg's DCT-domain downscaling (``Image.draft``) to the smallest scale
  that is still at least the target size: a full-resolution X-ray decodes about 3x faster and the
  final resize still does the anti-aliasing. Training decodes the same way, so there is no skew.
- High-bit-depth images (16-bit PNG, 32-bit integer or float) are min-max scaled to 8 bits: their
  meaningful range varies by scanner (often 10-12 bits stored in 16), and a fixed shift would
  leave many of them nearly black.
- Transparent images are composited on black (an X-ray's background), palette and CMYK images are
  converted, and EXIF orientation is applied.
- Output is ``uint8`` of shape (size, size, channels); the model rescales to [0, 1] itself, so
  every caller sends the same bytes and the scaling lives with the weights it belongs to.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumonia.errors import PneumoniaError

DEFAULT_MAX_PIXELS = 64_000_000
"""Larger images are refused: a real chest X-ray is at most about 4k x 4k (16 Mpx)."""

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "MPO"})


class ImageDecodeError(PneumoniaError):
    """The bytes are not a readable image (empty, truncated, corrupt or unsupported)."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed (a decompression bomb or a wrong file)."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that determines the pixels a model sees; stored with every checkpoint."""

    image_size: int = 150
    channels: int = 1
    resize: Literal["stretch", "pad"] = "stretch"

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        if self.resize not in ("stretch", "pad"):
            raise ValueError("resize must be 'stretch' or 'pad'")
        if self.image_size < 1:
            raise ValueError("image_size must be positive")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file")
    with warnings.catch_warnings():
        # Pillow warns (then errors at 2x) on large images; we apply our own, explicit limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise ImageTooLargeError(str(error)) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise ImageDecodeError(f"not a readable image: {error}") from None
    if image.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError(f"unsupported image format {image.format}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError("image has no pixels")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,}"
        )
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Bring any mode to 'L' or 'RGB' 8-bit, keeping the visible content."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in ("1", "LA", "RGBA", "RGBX", "YCbCr", "CMYK", "HSV", "LAB") or mode == "P":
        if mode == "P":
            image = image.convert("RGBA")
            mode = "RGBA"
        if mode in ("LA", "RGBA"):
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB" if mode != "1" else "L")
    # High bit depth: I;16, I;16B, I;16L, I, F and friends.
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim == 3:
        pixels = pixels.mean(axis=2)
    low, high = float(pixels.min()), float(pixels.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(np.round((pixels - low) * scale).astype(np.uint8), mode="L")


def _resize(image: Image.Image, size: int, resize: str) -> Image.Image:
    if resize == "pad" and image.width != image.height:
        side = max(image.width, image.height)
        canvas = Image.new(image.mode, (side, side), 0)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image


def decode_image(
    data: bytes,
    spec: PreprocessSpec = PreprocessSpec(),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode image bytes into the model's input: uint8 array of shape ``spec.shape``.

    Raises ImageDecodeError (or its subclass ImageTooLargeError) for anything that is not a
    readable image within the size limit; never returns garbage for a truncated file.
    """
    image = _open(data, max_pixels)
    target_mode = "L" if spec.channels == 1 else "RGB"
    try:
        if image.format in ("JPEG", "MPO"):
            # DCT-domain downscale: the result stays >= the requested size on both sides.
            image.draft(target_mode, (spec.image_size, spec.image_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_8bit(image)
        if image.mode != target_mode:
            image = image.convert(target_mode)
        image = _resize(image, spec.image_size, spec.resize)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            TypeError, OverflowError, IndexError, struct.error) as error:
        # Pillow's plugins fail on corrupt headers with TypeError/OverflowError/... too (a TIFF
        # whose StripOffsets tag has the wrong type); callers must see one exception type.
        raise ImageDecodeError(f"corrupt or truncated image: {error}") from None
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels
