"""The one decode + resize function shared by training, evaluation and serving.

A model must never see different pixels in production than in training, so every path that turns
file bytes into a model input goes through :func:`decode_image`. It uses Pillow only (no
TensorFlow), so a serving process can import it cheaply. Supported formats: JPEG, PNG, BMP, TIFF,
GIF, WebP (through Pillow) and DICOM (through pydicom, imported only when a DICOM file arrives).

Choices and why:
- JPEGs are decoded with libjpeg's DCT-domain downscaling (``Image.draft``) to the smallest scale
  that is still at least the target size: a full-resolution X-ray decodes about 3x faster and the
  final resize still does the anti-aliasing. Training decodes the same way, so there is no skew.
- High-bit-depth images (16-bit PNG, 32-bit integer or float) are min-max scaled to 8 bits: their
  meaningful range varies by scanner (often 10-12 bits stored in 16), and a fixed shift would
  leave many of them nearly black.
- Transparent images are composited on black (an X-ray's background), palette and CMYK images are
  converted, and EXIF orientation is applied.
- DICOM (what hospitals send, ``application/dicom``) is recognised by its content (``DICM`` at byte
  128 of a Part 10 file), never by its name. Its pixels go through the Modality LUT (rescale slope
  and intercept) and the VOI LUT or window, then min-max to 8 bits like any high-bit-depth image;
  MONOCHROME1 (high values dark) is inverted so bone is bright as in every other format; colour
  DICOM is treated as RGB; a multi-frame file gives its first frame. 8-bit grey data that no LUT
  changes is used as stored, exactly like an 8-bit PNG. From there on it takes the same mode
  conversion and resize as every other format.
- A DICOM file carries the patient's identity in its header (name, ID, birth date, accession
  number, institution, physicians, study and series UIDs...). Only the pixels and the attributes
  that say how to render them are read (:data:`DICOM_RENDERING_ATTRIBUTES`), and no pydicom
  message (its text can quote a value) reaches an error: errors name the attribute and the
  problem, with numbers of our own, the exception's type, and a transfer syntax or photometric
  interpretation only when it is a well-formed UID or code string. pydicom's log records (they
  quote invalid values) are dropped. Text burned into the pixels stays in the pixels, and so in
  any Grad-CAM overlay drawn over them (docs/security-data.md).
- Output is ``uint8`` of shape (size, size, channels); the model rescales to [0, 1] itself, so
  every caller sends the same bytes and the scaling lives with the weights it belongs to.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumonia.errors import PneumoniaError

DEFAULT_MAX_PIXELS = 64_000_000
"""Larger images are refused: a real chest X-ray is at most about 4k x 4k (16 Mpx)."""

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "MPO", "DICOM"})
"""Pillow format names we accept, plus DICOM (decoded by pydicom, see :func:`_open_dicom`)."""

_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"

DICOM_RENDERING_ATTRIBUTES = (
    "TransferSyntaxUID", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PlanarConfiguration",
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth",
    "VOILUTFunction", "VOILUTSequence", "RedPaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData", "SegmentedBluePaletteColorLookupTableData",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
)
"""What decoding a DICOM file reads of it (pydicom parses the whole header, lazily; nothing else is
looked at, kept or echoed): the pixels and how to render them."""
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CODE = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # a DICOM code string (CS), e.g. MONOCHROME2


NORMALIZATIONS = ("none", "standardize", "equalize")
STANDARD_MEAN, STANDARD_STD = 128.0, 48.0
"""``standardize`` maps every image to this mean and standard deviation (in uint8 units): about
2.7 standard deviations fit on each side before clipping, and the model keeps its uint8 input."""


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
    normalize: Literal["none", "standardize", "equalize"] = "none"

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        if self.resize not in ("stretch", "pad"):
            raise ValueError("resize must be 'stretch' or 'pad'")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}")
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
        except UnidentifiedImageError:
            raise ImageDecodeError("not a recognised image (expected JPEG, PNG or DICOM)") from None
        except (OSError, ValueError, SyntaxError) as error:
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
    return Image.fromarray(_stretch_to_uint8(pixels), mode="L")


def _stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric array to uint8 (a constant array becomes all zeros)."""
    low, high = float(pixels.min()), float(pixels.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.round((pixels - low) * scale).astype(np.uint8)


def _is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then ``DICM`` (whatever the file is called)."""
    end = _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)
    return len(data) >= end and data[_DICOM_MAGIC_OFFSET:end] == _DICOM_MAGIC


def _header_int(ds, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, None)
    if value is None or value == "":
        if default is None:
            raise ImageDecodeError(f"DICOM file has no {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):  # the value itself is never echoed: a header is the patient's
        raise ImageDecodeError(f"DICOM {keyword} is not a number") from None


def _shown(value, pattern: re.Pattern) -> str:
    """A header value fit for an error message: a UID or code string as it is, anything else not."""
    text = str(value).strip()
    return repr(text) if len(text) <= 64 and pattern.match(text) else "(not a valid value)"


def _quiet_pydicom() -> None:
    """Drop pydicom's log records (it quotes invalid header values in them) before any handler
    sees them: Ray's worker and Serve logs, or a handler attached to the ``pydicom`` logger itself.
    Idempotent; someone debugging pydicom removes :func:`_drop_record` from that logger."""
    logging.getLogger("pydicom").addFilter(_drop_record)


def _drop_record(record: logging.LogRecord) -> bool:
    return False


def _open_dicom(data: bytes, max_pixels: int) -> Image.Image:
    """Decode a DICOM file into an 8-bit 'L' or 'RGB' image (first frame, top row first)."""
    try:
        import pydicom.pixels  # noqa: F401 - imported here, not at module level: serving stays cheap
    except ImportError as error:  # pragma: no cover - pydicom is a dependency
        raise ImageDecodeError(f"DICOM support needs pydicom>=3.0 ({error})") from None
    _quiet_pydicom()
    with warnings.catch_warnings():
        # pydicom warns about every non-conforming element; what matters is whether pixels decode.
        warnings.simplefilter("ignore")
        try:
            return _dicom_to_image(data, max_pixels)
        except ImageDecodeError:
            raise
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001
            # pydicom parses lazily, so a corrupt element can fail on any access with almost any
            # exception type (InvalidDicomError, KeyError, struct.error, RuntimeError, ...); callers
            # must see one exception type. Its message is not passed on: it can quote header values.
            raise ImageDecodeError(f"corrupt or unsupported DICOM file ({type(error).__name__})") from None


def _monochrome_to_uint8(pixels: np.ndarray, to_display) -> np.ndarray:
    """Apply the elementwise ``to_display`` (Modality + VOI LUT) and scale the result to uint8.

    A uint8 result (8-bit data no LUT changed, or an 8-bit VOI LUT) is used as is; anything else is
    min-max scaled over the values present. Integer data goes through a table of its value range
    (at most 65,536 entries) instead of per pixel: the LUT functions work in float64 with boolean
    masks, about 80 ms for a 5-Mpx X-ray, while one table lookup costs a few ms. Same result.
    """
    if pixels.dtype.kind in "ui" and pixels.size:
        low, high = int(pixels.min()), int(pixels.max())
        base = min(low, 0)
        if high - base < 1 << 16:
            index = pixels if base == 0 else pixels.astype(np.int32) - base
            table = to_display(np.arange(base, high + 1, dtype=pixels.dtype))
            if table.dtype != np.uint8:
                seen = table[low - base :]
                steps = np.diff(seen)
                if not (np.all(steps >= 0) or np.all(steps <= 0)):  # not monotone: look at what is there
                    seen = table[np.flatnonzero(np.bincount(index.ravel()))]
                if not np.isfinite(seen).all():
                    raise ImageDecodeError("DICOM pixel data maps to NaN or infinite values")
                lowest, highest = float(seen.min()), float(seen.max())
                scale = 255.0 / (highest - lowest) if highest > lowest else 0.0
                table = np.clip(np.round((table - lowest) * scale), 0, 255).astype(np.uint8)
            return table[index]
    values = to_display(pixels)  # float pixel data, or 32-bit integers with a huge range
    if values.dtype == np.uint8:
        return values
    if not np.isfinite(values).all():
        raise ImageDecodeError("DICOM pixel data has NaN or infinite values")
    return _stretch_to_uint8(values)


def _dicom_to_image(data: bytes, max_pixels: int) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

    ds = pydicom.dcmread(io.BytesIO(data))
    if not any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageDecodeError("DICOM file has no pixel data (not an image)")

    # The size limit comes from the header, before a single pixel is decoded.
    rows, columns = _header_int(ds, "Rows"), _header_int(ds, "Columns")
    frames = _header_int(ds, "NumberOfFrames", default=1)
    if rows < 1 or columns < 1 or frames < 1:
        raise ImageDecodeError(f"DICOM image has no pixels ({columns}x{rows}, {frames} frames)")
    if rows * columns * frames > max_pixels:
        raise ImageTooLargeError(
            f"DICOM image is {columns}x{rows} x {frames} frame(s) = {rows * columns * frames:,} pixels, "
            f"above the limit of {max_pixels:,}"
        )

    syntax = ds.file_meta.get("TransferSyntaxUID", None)
    if not syntax:
        raise ImageDecodeError("DICOM file meta has no Transfer Syntax UID")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageDecodeError(f"DICOM transfer syntax {_shown(syntax, _UID)} is not supported") from None
    if not decoder.is_available:
        raise ImageDecodeError(
            f"DICOM transfer syntax '{syntax.name}' ({syntax}) cannot be decoded here: it needs one of "
            + "; ".join(decoder.missing_dependencies)
        )

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    _check_native_length(ds, syntax, rows, columns, frames)
    ds.pixel_array_options(index=0)  # the first frame only (multi-frame files)
    pixels = ds.pixel_array  # YBR_FULL(_422) comes back converted to RGB
    if pixels.shape[:2] != (rows, columns):
        raise ImageDecodeError(f"DICOM pixel data has shape {pixels.shape}, expected {rows}x{columns}")

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim != 2:
            raise ImageDecodeError(f"{photometric} DICOM pixel data has shape {pixels.shape}")
        slope, intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
        identity = slope in (None, "", 1) and intercept in (None, "", 0)

        def to_display(values: np.ndarray) -> np.ndarray:
            if ds.get("ModalityLUTSequence") or not identity:
                values = apply_modality_lut(values, ds)  # stored values -> modality units
            return apply_voi_lut(values, ds, index=0)  # VOI LUT or window (center/width)

        pixels = _monochrome_to_uint8(pixels, to_display)
        if photometric == "MONOCHROME1":
            pixels = 255 - pixels
        return Image.fromarray(np.ascontiguousarray(pixels), mode="L")

    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    elif pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageDecodeError(f"unsupported DICOM photometric interpretation "
                               f"{_shown(photometric, _CODE) if photometric else '(none)'}")
    if pixels.dtype != np.uint8:
        pixels = _stretch_to_uint8(pixels)  # one scale for all channels keeps the colours
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def _check_native_length(ds, syntax, rows: int, columns: int, frames: int) -> None:
    """Uncompressed pixel data shorter than its header says (a truncated file) is refused in our
    words; pydicom's own message for it is not passed on (see :func:`_open_dicom`)."""
    if syntax.is_compressed or "PixelData" not in ds:
        return
    bits = _header_int(ds, "BitsAllocated")
    samples = _header_int(ds, "SamplesPerPixel", default=1)
    if bits < 1 or samples < 1:
        raise ImageDecodeError("DICOM BitsAllocated or SamplesPerPixel is not positive")
    expected = (rows * columns * frames * samples * bits + 7) // 8
    stored = len(ds.PixelData)
    if stored < expected:
        raise ImageDecodeError(f"DICOM pixel data is {stored:,} bytes but its header needs {expected:,}: "
                               "a truncated file?")


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

    Accepts JPEG, PNG, BMP, TIFF, GIF, WebP and DICOM (recognised by content, whatever the name).
    Raises ImageDecodeError (or its subclass ImageTooLargeError) for anything that is not a
    readable image within the size limit; never returns garbage for a truncated file.
    """
    return prepare_image(open_image(data, spec, max_pixels), spec)


def open_image(data: bytes, spec: PreprocessSpec = PreprocessSpec(), max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The first half of :func:`decode_image`: bytes -> an upright 8-bit Pillow image ('L' or 'RGB').

    JPEGs are already downscaled in the DCT domain towards ``spec.image_size``. Exposed so that the
    stress validation (``pneumonia.data.shifts``) can change an image the way another site would before
    the second half, :func:`prepare_image`, runs exactly as in training and serving.
    """
    dicom = _is_dicom(data)
    image = _open_dicom(data, max_pixels) if dicom else _open(data, max_pixels)
    target_mode = "L" if spec.channels == 1 else "RGB"
    with _pillow_errors():
        if not dicom:  # a DICOM image arrives decoded, 8-bit and upright
            if image.format in ("JPEG", "MPO"):
                # DCT-domain downscale: the result stays >= the requested size on both sides.
                image.draft(target_mode, (spec.image_size, spec.image_size))
            image.load()
            image = ImageOps.exif_transpose(image)
        return _to_8bit(image)


@contextlib.contextmanager
def _pillow_errors():
    """Pillow's plugins fail on corrupt data with many types (a TIFF whose StripOffsets tag has
    the wrong type raises TypeError); callers must see one exception type."""
    try:
        yield
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            TypeError, OverflowError, IndexError, struct.error) as error:
        raise ImageDecodeError(f"corrupt or truncated image: {error}") from None


def prepare_image(image: Image.Image, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """The second half of :func:`decode_image`: mode, resize and intensity normalisation."""
    target_mode = "L" if spec.channels == 1 else "RGB"
    with _pillow_errors():
        if image.mode != target_mode:
            image = image.convert(target_mode)
        image = _resize(image, spec.image_size, spec.resize)
    pixels = np.asarray(image, dtype=np.uint8)
    return prepare_pixels(pixels[:, :, None] if pixels.ndim == 2 else pixels, spec)


def prepare_pixels(pixels: np.ndarray, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """The last step of :func:`prepare_image`, alone: uint8 pixels already at the model's input
    shape (``spec.shape``) -> the model's input (the intensity normalisation).

    Every decoded file goes through it, and so do pixels a client resized itself (the serving
    protocol's ``pixels`` tensor): both reach the model normalised the same way. Anything that is
    not a uint8 array of ``spec.shape`` raises ImageDecodeError.
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape != spec.shape:
        got = f"{pixels.dtype} {list(pixels.shape)}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ImageDecodeError(f"pixels must be uint8 of shape {list(spec.shape)}, not {got}")
    return normalize_intensity(pixels, spec.normalize)


def normalize_intensity(pixels: np.ndarray, method: str) -> np.ndarray:
    """Remove a site's exposure and contrast from a uint8 image (any shape); uint8 out.

    Why: X-rays from another hospital (or another year) differ first in exposure, contrast and
    processing curve; a model trained on one site's intensities reads a darker or flatter image
    as a different one. ``standardize`` fixes each image's mean and spread (an affine change of
    intensities no longer changes the input, up to clipping); ``equalize`` spreads the
    histogram evenly (any monotone change of intensities no longer changes it, up to ties).
    Applied here, after resizing, so that training, evaluation and serving see the same pixels.
    """
    if method == "none":
        return pixels
    values = pixels.astype(np.float32)
    if method == "standardize":
        mean, std = float(values.mean()), float(values.std())
        scaled = (values - mean) * (STANDARD_STD / max(std, 1.0)) + STANDARD_MEAN
        return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    if method == "equalize":
        histogram = np.bincount(pixels.reshape(-1), minlength=256)
        cdf = np.cumsum(histogram).astype(np.float64)
        lowest = cdf[np.flatnonzero(histogram)[0]]
        if cdf[-1] == lowest:  # a constant image stays as it is
            return pixels
        table = np.round((cdf - lowest) / (cdf[-1] - lowest) * 255.0).clip(0, 255).astype(np.uint8)
        return table[pixels]
    raise ValueError(f"unknown normalisation {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
