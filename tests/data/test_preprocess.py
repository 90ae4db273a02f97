"""decode_image: every input a user might hand us becomes the same kind of model input, or a clear error."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia.data.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    PreprocessSpec,
    decode_image,
)
from tests.helpers import assert_byte_corruptions_fail_cleanly, real_data

DARK, BRIGHT = 30, 220




def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def halves(mode: str, size=(40, 30)) -> Image.Image:
    """Left half dark, right half bright, in the given mode."""
    width, height = size
    gray = np.full((height, width), DARK, dtype=np.uint8)
    gray[:, width // 2 :] = BRIGHT
    if mode == "L":
        return Image.fromarray(gray, mode="L")
    if mode == "RGB":
        return Image.fromarray(np.stack([gray] * 3, axis=2), mode="RGB")
    if mode == "RGBA":
        return Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], axis=2), mode="RGBA")
    if mode == "CMYK":
        return Image.fromarray(np.stack([gray] * 3, axis=2), mode="RGB").convert("CMYK")
    if mode == "P":
        rgb = Image.fromarray(np.stack([gray] * 3, axis=2), mode="RGB")
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    if mode == "1":
        return Image.fromarray(gray > 128).convert("1")
    if mode == "I;16":
        return Image.fromarray(np.where(gray == DARK, 1000, 3000).astype(np.uint16))
    raise AssertionError(mode)


def decode_with_shape(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    out = decode_image(data, spec)
    assert out.dtype == np.uint8
    assert out.shape == spec.shape == (spec.image_size, spec.image_size, spec.channels)
    return out


# --------------------------------------------------------------------------- spec


def test_spec_shape_and_validation():
    assert PreprocessSpec(64, 3).shape == (64, 64, 3)
    assert PreprocessSpec().shape == (150, 150, 1)
    with pytest.raises(ValueError, match="channels"):
        PreprocessSpec(64, 2)
    with pytest.raises(ValueError, match="resize"):
        PreprocessSpec(64, 1, "crop")
    with pytest.raises(ValueError, match="image_size"):
        PreprocessSpec(0)


# --------------------------------------------------------------------------- formats and modes

FORMATS = [
    ("JPEG", "L"),
    ("JPEG", "RGB"),
    ("JPEG", "CMYK"),
    ("PNG", "L"),
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "P"),
    ("PNG", "1"),
    ("PNG", "I;16"),
    ("BMP", "RGB"),
    ("TIFF", "L"),
    ("TIFF", "I;16"),
    ("GIF", "P"),
    ("WEBP", "RGB"),
]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("fmt", "mode"), FORMATS, ids=[f"{f}-{m}" for f, m in FORMATS])
def test_every_format_and_mode_gives_the_model_input(fmt, mode, channels):
    data = encode(halves(mode), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode  # the test really covers `mode`
    out = decode_with_shape(data, PreprocessSpec(32, channels))
    # The picture survives: the left side stays dark and the right side bright, in every channel.
    assert out[:, :12].mean() < 60
    assert out[:, -12:].mean() > 190
    if channels == 3:
        assert np.abs(out[..., 0].astype(int) - out[..., 2]).max() <= 8  # gray stays gray


def test_rgb_to_one_channel_uses_luminance_and_three_channels_keep_colour():
    red = Image.new("RGB", (32, 32), (220, 20, 20))
    data = encode(red, "PNG")
    gray = decode_image(data, PreprocessSpec(32, 1))
    expected = Image.new("RGB", (1, 1), (220, 20, 20)).convert("L").getpixel((0, 0))
    assert abs(int(gray[16, 16, 0]) - expected) <= 1
    colour = decode_image(data, PreprocessSpec(32, 3))
    assert tuple(colour[16, 16]) == (220, 20, 20)


def test_cmyk_jpeg_is_converted_to_its_visible_colour():
    data = encode(Image.new("RGB", (48, 48), (200, 50, 50)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    colour = decode_image(data, PreprocessSpec(32, 3))
    assert np.abs(colour[16, 16].astype(int) - (200, 50, 50)).max() <= 8
    gray = decode_image(data, PreprocessSpec(32, 1))
    expected = Image.new("RGB", (1, 1), (200, 50, 50)).convert("L").getpixel((0, 0))
    assert abs(int(gray[16, 16, 0]) - expected) <= 8


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_uses_the_full_8_bit_range_and_keeps_order(fmt):
    # 12 bits stored in 16 (a typical scanner): a fixed shift by 8 would give at most 15 (near black).
    rng = np.random.default_rng(0)
    values = rng.permutation(np.linspace(0, 4095, 48 * 48).astype(np.uint16)).reshape(48, 48)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = decode_with_shape(encode(image, fmt), PreprocessSpec(48, 1))[..., 0]  # same size: no resize
    assert out.min() == 0 and out.max() == 255
    by_value = out.reshape(-1)[np.argsort(values.reshape(-1), kind="stable")]
    assert np.all(np.diff(by_value.astype(int)) >= 0), "brighter 16-bit pixels must not become darker"
    assert len(np.unique(out)) > 200  # not collapsed to a few levels


def test_16_bit_narrow_range_is_stretched():
    values = np.linspace(1000, 1200, 32 * 32).reshape(32, 32).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(values), "PNG"), PreprocessSpec(32, 1))[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.reshape(-1).astype(int)) >= 0)


def test_float_tiff_is_scaled_to_8_bits():
    values = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    image = Image.fromarray(values, mode="F")
    out = decode_with_shape(encode(image, "TIFF"), PreprocessSpec(32, 1))[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.reshape(-1).astype(int)) >= 0)


@pytest.mark.parametrize("channels", [1, 3])
def test_transparent_areas_composite_to_black(channels):
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)
    pixels[..., :3] = 255  # white everywhere ...
    pixels[:, 16:, 3] = 255  # ... but only the right half is opaque
    pixels[:, :8, 3] = 0
    pixels[:, 8:16, 3] = 128  # half transparent
    out = decode_image(encode(Image.fromarray(pixels, "RGBA"), "PNG"), PreprocessSpec(32, channels))
    assert out[:, :7].max() == 0
    assert np.all(np.abs(out[:, 9:15].astype(int) - 128) <= 2)
    assert out[:, 17:].min() == 255


def test_transparent_gray_and_palette_images_composite_to_black():
    la = Image.new("LA", (32, 32), (255, 0))
    assert decode_image(encode(la, "PNG"), PreprocessSpec(32)).max() == 0
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * (256 * 3 - 6))
    palette.info["transparency"] = 1  # the white entry is fully transparent
    data = encode(palette, "PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert decode_image(data, PreprocessSpec(32)).max() == 0


def test_palette_image_uses_palette_colours():
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    palette.paste(1, (16, 0, 32, 16))  # top right white
    palette.paste(2, (0, 16, 16, 32))  # bottom left red
    out = decode_image(encode(palette, "PNG"), PreprocessSpec(32, 3))
    assert tuple(out[4, 4]) == (0, 0, 0)
    assert tuple(out[4, 28]) == (255, 255, 255)
    assert tuple(out[28, 4]) == (255, 0, 0)


def test_one_bit_image_becomes_black_and_white():
    image = Image.new("1", (32, 32), 0)
    image.paste(1, (16, 0, 32, 32))
    out = decode_image(encode(image, "PNG"), PreprocessSpec(32, 1))[..., 0]
    assert out[:, :15].max() == 0 and out[:, 17:].min() == 255


def test_exif_orientation_is_applied():
    # Stored 60 wide x 30 tall with the left third white; orientation 6 means "rotate 90 degrees
    # clockwise to display", so the viewer (and the radiologist) sees a tall image, white on top.
    stored = np.zeros((30, 60), dtype=np.uint8)
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, PreprocessSpec(30, 1, "stretch"))[..., 0]
    assert out[:8].mean() > 200 and out[-16:].mean() < 30  # white band at the top
    assert abs(float(out[:8, :10].mean()) - float(out[:8, -10:].mean())) < 10
    padded = decode_image(data, PreprocessSpec(60, 1, "pad"))[..., 0]
    assert padded[:, :12].max() < 10 and padded[:, -12:].max() < 10  # tall: bands left and right
    assert padded[:15, 20:40].mean() > 200


@pytest.mark.parametrize("size", [(5, 7), (7, 5), (3000, 2000)])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_input_size(size, channels):
    image = halves("L", size)
    out = decode_with_shape(encode(image, "JPEG", quality=90), PreprocessSpec(32, channels))
    assert out[:, :10].mean() < 80 and out[:, -10:].mean() > 170


def test_same_size_input_is_passed_through_unchanged():
    pixels = np.random.default_rng(1).integers(0, 256, (24, 24), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(pixels), "PNG"), PreprocessSpec(24, 1))
    assert np.array_equal(out[..., 0], pixels)


# --------------------------------------------------------------------------- resize modes


@pytest.mark.parametrize("channels", [1, 3])
def test_pad_keeps_aspect_ratio_with_black_bands(channels):
    wide = Image.new("L", (200, 100), 255)
    data = encode(wide, "PNG")
    padded = decode_image(data, PreprocessSpec(64, channels, "pad"))
    # 2:1 image in a square: a quarter of the height is black above and below.
    assert padded[:14].max() == 0 and padded[-14:].max() == 0
    assert padded[18:46].min() == 255
    assert 0.45 < (padded[..., 0] > 128).mean() < 0.55
    stretched = decode_image(data, PreprocessSpec(64, channels, "stretch"))
    assert stretched.min() == 255


def test_pad_on_a_tall_image_puts_bands_left_and_right():
    tall = Image.new("L", (50, 200), 255)
    padded = decode_image(encode(tall, "PNG"), PreprocessSpec(64, 1, "pad"))[..., 0]
    assert padded[:, :20].max() == 0 and padded[:, -20:].max() == 0
    assert padded[:, 26:38].min() == 255


def test_pad_and_stretch_agree_on_square_images():
    pixels = np.random.default_rng(2).integers(0, 256, (80, 80), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "PNG")
    assert np.array_equal(
        decode_image(data, PreprocessSpec(40, 1, "pad")), decode_image(data, PreprocessSpec(40, 1, "stretch"))
    )


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is a text file and not an X-ray\n" * 4,
        bytes(range(256)) * 8,
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n",
        b"\xff\xd8\xff",  # a JPEG start marker and nothing else
    ],
    ids=["empty", "text", "garbage", "pdf", "jpeg-magic-only"],
)
def test_unreadable_bytes_raise_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data, PreprocessSpec(32))


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PPM", "EPS"])
def test_formats_pillow_reads_but_we_do_not_support(fmt):
    try:
        data = encode(Image.new("RGB", (32, 32), (10, 20, 30)), fmt)
    except (OSError, KeyError) as error:  # e.g. EPS needs Ghostscript to write
        pytest.skip(f"Pillow cannot write {fmt} here: {error}")
    with pytest.raises(ImageDecodeError, match="unsupported|not a readable"):
        decode_image(data, PreprocessSpec(32))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_raises_instead_of_returning_a_partial_image(fmt):
    pixels = np.random.default_rng(3).integers(0, 256, (200, 300), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), fmt)
    decode_image(data, PreprocessSpec(32))  # the whole file is fine
    for cut in (len(data) // 2, len(data) * 9 // 10):
        with pytest.raises(ImageDecodeError) as raised:
            decode_image(data[:cut], PreprocessSpec(32))
        assert not isinstance(raised.value, ImageTooLargeError)


def _tiff_with_strip_offsets_type(field_type: int) -> bytes:
    """A valid 8x6 TIFF whose StripOffsets tag claims a wrong field type (a corrupt header)."""
    data = bytearray(encode(Image.new("RGB", (8, 6), (200, 200, 200)), "TIFF"))
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for index in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * index
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, entry + 2, field_type)
            return bytes(data)
    raise AssertionError("no StripOffsets tag")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("field_type", [2, 5, 12, 16], ids=["ascii", "rational", "double", "long8"])
def test_corrupt_tiff_header_raises_decode_error(field_type):
    # Pillow fails on these with TypeError or OverflowError; callers (load_images, summarize) only
    # catch ImageDecodeError, so anything else would crash a whole training run over one bad file.
    with pytest.raises(ImageDecodeError):
        decode_image(_tiff_with_strip_offsets_type(field_type), PreprocessSpec(32))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about odd TIFF tags
def test_corrupt_headers_never_escape_as_other_errors():
    """Every single-byte corruption of small image headers decodes or raises ImageDecodeError."""
    spec = PreprocessSpec(16)
    for fmt, image in [
        ("TIFF", Image.new("L", (4, 3), 90)),
        ("BMP", Image.new("RGB", (4, 3), (90, 120, 150))),
        ("GIF", Image.new("P", (4, 3), 1)),
        ("PNG", Image.new("RGB", (4, 3), (90, 120, 150))),
        ("JPEG", Image.new("L", (4, 3), 90)),
    ]:
        data = encode(image, fmt)
        assert_byte_corruptions_fail_cleanly(data, range(min(len(data), 160)), (0x00, 0x02, 0x05, 0x10, 0x7F, 0xFF),
                                             spec, fmt)


def test_image_above_max_pixels_is_refused():
    data = encode(Image.new("L", (100, 80), 128), "PNG")
    assert decode_image(data, PreprocessSpec(32), max_pixels=8000).shape == (32, 32, 1)  # at the limit
    with pytest.raises(ImageTooLargeError, match="8,000"):
        decode_image(data, PreprocessSpec(32), max_pixels=7999)
    jpeg = encode(Image.new("L", (100, 80), 128), "JPEG")
    with pytest.raises(ImageTooLargeError):
        decode_image(jpeg, PreprocessSpec(32), max_pixels=5000)
    assert issubclass(ImageTooLargeError, ImageDecodeError)  # callers that skip bad files skip these


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(10_000, 9_000), (100_000, 100_000)])
def test_decompression_bomb_header_is_refused_without_decoding(width, height):
    data = _png_header(width, height)
    assert len(data) < 100 and width * height > DEFAULT_MAX_PIXELS
    with pytest.raises(ImageTooLargeError):
        decode_image(data, PreprocessSpec(32))


# --------------------------------------------------------------------------- real chest X-rays


def _val16_files() -> list[Path]:
    files = sorted(real_data("chest_xray_val16").rglob("*.jpeg"))
    assert len(files) == 16
    return files


@pytest.mark.realdata
@pytest.mark.parametrize("spec", [PreprocessSpec(150, 1), PreprocessSpec(224, 3, "pad")], ids=["150-gray", "224-rgb-pad"])
def test_full_resolution_xrays_decode(spec):
    for path in _val16_files():
        out = decode_with_shape(path.read_bytes(), spec)
        assert out.std() > 20, f"{path.name} decoded to a nearly blank image"
        assert 30 < out.mean() < 220, path.name
        if spec.channels == 3:
            assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


@pytest.mark.realdata
def test_224_copies_decode_and_are_unchanged_at_their_own_size():
    root = real_data("chest_xray_224", "train")
    files = sorted((root / "NORMAL").glob("*.jpeg"))[:3] + sorted((root / "PNEUMONIA").glob("*.jpeg"))[:3]
    assert len(files) == 6
    for path in files:
        data = path.read_bytes()
        small = decode_with_shape(data, PreprocessSpec(150, 1))
        assert small.std() > 20, path.name
        same = decode_with_shape(data, PreprocessSpec(224, 3))
        assert np.array_equal(same, np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.realdata
@pytest.mark.parametrize("size", [64, 150, 224])
def test_dct_draft_decode_is_close_to_full_decode_and_resize(size):
    """The JPEG draft speed-up must not change what the model sees in any meaningful way."""
    for path in _val16_files():
        fast = decode_image(path.read_bytes(), PreprocessSpec(size, 1))[..., 0].astype(float)
        with Image.open(path) as image:
            assert image.width >= 4 * size  # big enough that the draft scale really kicks in
            full = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=float)
        assert np.abs(fast - full).mean() < 6, path.name
        assert np.corrcoef(fast.reshape(-1), full.reshape(-1))[0, 1] > 0.98, path.name


@pytest.mark.realdata
def test_truncated_real_xray_raises():
    data = _val16_files()[0].read_bytes()
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2], PreprocessSpec(150))
