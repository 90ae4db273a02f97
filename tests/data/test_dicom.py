"""decode_image on DICOM: what hospitals send (``application/dicom``) becomes the same model input.

Every file is built in memory with pydicom, so these tests need no data and no network.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_byte_corruptions_fail_cleanly

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pneumonia.data.preprocess import (  # noqa: E402
    SUPPORTED_FORMATS,
    ImageDecodeError,
    ImageTooLargeError,
    PreprocessSpec,
    decode_image,
)

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def make_dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    *,
    bits_stored: int | None = None,
    frames: int | None = None,
    syntax=ExplicitVRLittleEndian,
    pixel_data: bytes | None = None,
    preamble: bytes = b"\0" * 128,
    **elements,
) -> bytes:
    """A DICOM Part 10 file (preamble + DICM + file meta + dataset) holding ``pixels``.

    ``pixels`` is (rows, columns), (rows, columns, 3) or, with ``frames``, (frames, rows, columns).
    ``elements`` are set on the dataset last, so they can override anything (e.g. Rows).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(None, {}, file_meta=meta, preamble=preamble)
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    shape = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = shape[:2]
    if frames:
        ds.NumberOfFrames = frames
    colour = len(shape) == 3
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def bright_top(rows=40, columns=30, dark=1000, bright=1200, dtype=np.uint16) -> np.ndarray:
    """Top half bright, bottom half dark, in a narrow stored range (10-12 bits used out of 16)."""
    pixels = np.full((rows, columns), dark, dtype=dtype)
    pixels[: rows // 2] = bright
    return pixels


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes, spec: PreprocessSpec, **kwargs) -> np.ndarray:
    out = decode_image(data, spec, **kwargs)
    assert out.dtype == np.uint8 and out.shape == spec.shape
    return out


# --------------------------------------------------------------------------- grey levels


def test_16_bit_narrow_range_uses_the_full_8_bit_range_and_keeps_orientation():
    data = make_dicom(bright_top(), bits_stored=12)
    out = decode(data, PreprocessSpec(40, 1, "pad"))[..., 0]  # 40 tall: pad adds side bands only
    assert out[:20, 5:25].min() == 255 and out[20:, 5:25].max() == 0  # the bright top stays on top
    stretched = decode(data, PreprocessSpec(32, 1))[..., 0]
    assert stretched[:14].min() == 255 and stretched[-14:].max() == 0


def test_16_bit_dicom_gives_the_same_pixels_as_the_same_16_bit_png():
    values = np.random.default_rng(0).integers(300, 3800, (48, 64), dtype=np.uint16)
    for spec in (PreprocessSpec(48, 1), PreprocessSpec(32, 3, "pad")):
        dicom = decode(make_dicom(values, bits_stored=12), spec)
        png = decode(encode_png(values), spec)
        assert np.array_equal(dicom, png)
    square = values[:, :48]
    full = decode(make_dicom(square, bits_stored=12), PreprocessSpec(48, 1))[..., 0]  # no resize
    assert full.min() == 0 and full.max() == 255
    by_value = full.reshape(-1)[np.argsort(square.reshape(-1), kind="stable")]
    assert np.all(np.diff(by_value.astype(int)) >= 0)  # brighter stored values never get darker


def test_signed_pixels_keep_their_order():
    pixels = bright_top(dark=-900, bright=400, dtype=np.int16)
    pixels[:, :3] = -1500  # the darkest column
    out = decode(make_dicom(pixels), PreprocessSpec(40, 1, "pad"))[..., 0]
    assert out[:20, 10:20].min() > out[20:, 10:20].max() > out[:, 5:8].max() == 0


def test_monochrome1_is_inverted_so_that_bone_is_bright():
    pixels = np.random.default_rng(1).integers(0, 2048, (30, 30), dtype=np.uint16)
    pixels[:15] |= 2048  # top brighter as stored values
    spec = PreprocessSpec(30, 1)  # same size: no resampling
    mono2 = decode(make_dicom(pixels, "MONOCHROME2", bits_stored=12), spec)
    mono1 = decode(make_dicom(pixels, "MONOCHROME1", bits_stored=12), spec)
    assert np.array_equal(mono1.astype(int), 255 - mono2.astype(int))
    assert mono2[:15].mean() > 150 > 100 > mono2[15:].mean()
    assert mono1[:15].mean() < 100 < 150 < mono1[15:].mean()
    # Padding is background (black) in both: the inversion applies to the image, not the bands.
    wide = np.tile(pixels, (1, 2))
    padded = decode(make_dicom(wide, "MONOCHROME1", bits_stored=12), PreprocessSpec(30, 1, "pad"))
    assert padded[:6].max() == 0 and padded[-6:].max() == 0


def _three_bands() -> np.ndarray:
    """Left third 1000, middle third a ramp 1900..2100, right third 3000 (stored values)."""
    pixels = np.empty((24, 90), dtype=np.uint16)
    pixels[:, :30] = 1000
    pixels[:, 30:60] = np.linspace(1900, 2100, 30).astype(np.uint16)
    pixels[:, 60:] = 3000
    return pixels


def test_window_center_and_width_isolate_a_band():
    pixels = _three_bands()
    spec = PreprocessSpec(90, 1, "stretch")  # 24 rows stretched to 90: columns map 1:1
    plain = decode(make_dicom(pixels, bits_stored=12), spec)[..., 0]
    windowed = decode(make_dicom(pixels, bits_stored=12, WindowCenter=2000, WindowWidth=200), spec)[..., 0]
    # Without a window the ramp is a narrow grey band between black and white ...
    assert plain[:, :29].max() == 0 and plain[:, 61:].min() == 255
    assert plain[:, 31:59].max() - plain[:, 31:59].min() < 30
    # ... with the window everything below it is black, above it white, and the ramp spans the range.
    assert windowed[:, :29].max() == 0 and windowed[:, 61:].min() == 255
    ramp = windowed[12, 30:60].astype(int)
    assert ramp.min() <= 10 and ramp.max() >= 245 and np.all(np.diff(ramp) >= 0)
    # A window between the ramp and the right band: the ramp goes black with the left band.
    high = decode(make_dicom(pixels, bits_stored=12, WindowCenter=2500, WindowWidth=100), spec)[..., 0]
    assert high[:, :58].max() == 0 and high[:, 62:].min() == 255


def test_window_is_applied_after_rescale_slope_and_intercept():
    # CT-style: stored = HU + 1024; the window (center 0 HU, width 100 HU) is in rescaled units.
    pixels = _three_bands() - 976  # 24, 924..1124, 2024 -> HU -1000, -100..100, 1000
    data = make_dicom(pixels, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=100)
    out = decode(data, PreprocessSpec(90, 1))[12, :, 0].astype(int)
    assert out[:29].max() == 0 and out[61:].min() == 255
    middle = out[30:60]
    assert middle[:7].max() == 0 and middle[-7:].min() == 255  # HU below -50 black, above 50 white
    assert 50 < middle[15] < 205  # around 0 HU: grey, i.e. the window was not read as stored values


def test_rescale_slope_and_intercept_are_applied():
    pixels = bright_top()
    spec = PreprocessSpec(40, 1, "pad")
    plain = decode(make_dicom(pixels, bits_stored=12), spec)
    scaled = decode(make_dicom(pixels, bits_stored=12, RescaleSlope=2.5, RescaleIntercept=-300), spec)
    assert np.array_equal(plain, scaled)  # a positive linear rescale does not change the picture
    flipped = decode(make_dicom(pixels, bits_stored=12, RescaleSlope=-1, RescaleIntercept=4095), spec)[..., 0]
    assert flipped[:20, 5:25].max() == 0 and flipped[20:, 5:25].min() == 255  # a negative slope inverts


def test_8_bit_dicom_is_used_as_stored_like_an_8_bit_png():
    pixels = np.random.default_rng(2).integers(40, 200, (36, 52), dtype=np.uint8)
    for spec in (PreprocessSpec(36, 1), PreprocessSpec(24, 3, "pad")):
        assert np.array_equal(decode(make_dicom(pixels), spec), decode(encode_png(pixels), spec))
    square = pixels[:, :36]
    assert np.array_equal(decode(make_dicom(square), PreprocessSpec(36, 1))[..., 0], square)  # untouched
    inverted = decode(make_dicom(square, "MONOCHROME1"), PreprocessSpec(36, 1))[..., 0]
    assert np.array_equal(inverted, 255 - square)


# --------------------------------------------------------------------------- colour, frames, shapes


def test_rgb_dicom_converts_like_an_rgb_image():
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:16, :16] = (220, 20, 20)
    pixels[:16, 16:] = (255, 255, 255)
    pixels[16:, :16] = (20, 200, 40)
    data = make_dicom(pixels, "RGB")
    colour = decode(data, PreprocessSpec(32, 3))
    assert np.array_equal(colour, pixels)
    gray = decode(data, PreprocessSpec(32, 1))[..., 0]
    assert np.array_equal(gray, np.asarray(Image.fromarray(pixels).convert("L")))


def test_ybr_full_dicom_comes_out_as_rgb():
    from pydicom.pixels import convert_color_space

    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[:, :16] = (200, 50, 50)
    rgb[:, 16:] = (40, 90, 220)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = decode(make_dicom(ybr, "YBR_FULL"), PreprocessSpec(32, 3)).astype(int)
    assert np.abs(out - rgb).max() <= 3


def test_multi_frame_uses_the_first_frame():
    first, second = bright_top(), bright_top()[::-1]
    frames = np.stack([first, second, second])
    out = decode(make_dicom(frames, frames=3, bits_stored=12), PreprocessSpec(40, 1, "pad"))[..., 0]
    assert out[:20, 5:25].min() == 255 and out[20:, 5:25].max() == 0


@pytest.mark.parametrize("resize", ["stretch", "pad"])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_for_every_spec(channels, resize):
    wide = np.full((50, 100), 3000, dtype=np.uint16)
    wide[0, 0] = 100  # one dark pixel so the image has a range
    out = decode(make_dicom(wide, bits_stored=12), PreprocessSpec(64, channels, resize))
    if resize == "pad":  # 2:1 in a square: black bands above and below, the image in between
        assert out[:14].max() == 0 and out[-14:].max() == 0 and out[20:44].min() == 255
    else:
        assert out[20:].min() == 255
    if channels == 3:
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


# --------------------------------------------------------------------------- compressed syntaxes


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_jpeg_baseline_dicom_decodes_when_a_decoder_is_installed():
    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG Baseline decoder plugin for pydicom here")
    pixels = np.zeros((40, 48), dtype=np.uint8)
    pixels[:20] = 230
    jpeg = _jpeg_bytes(pixels)
    data = make_dicom(pixels, syntax=JPEGBaseline8Bit, pixel_data=encapsulate([jpeg]))
    spec = PreprocessSpec(48, 1, "pad")
    assert np.array_equal(decode(data, spec), decode(jpeg, spec))  # same pixels as the bare JPEG


def test_rle_lossless_dicom_gives_the_same_pixels_as_uncompressed():
    pixels = np.random.default_rng(3).integers(0, 4096, (32, 40), dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    try:
        ds.compress(RLELossless)
    except (RuntimeError, ValueError) as error:
        pytest.skip(f"pydicom cannot RLE-encode here: {error}")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    spec = PreprocessSpec(32, 1)
    assert np.array_equal(decode(buffer.getvalue(), spec), decode(make_dicom(pixels, bits_stored=12), spec))


def test_compressed_syntax_without_a_decoder_is_a_clear_decode_error():
    missing = [uid for uid in (JPEGLSLossless, HTJ2KLossless, JPEGLosslessSV1) if not get_decoder(uid).is_available]
    if not missing:
        pytest.skip("every candidate syntax has a decoder installed here")
    pixels = bright_top(dark=10, bright=200, dtype=np.uint8)
    fragment = b"\xff\x4f\xff\x51" + bytes(64)  # never decoded: refused from the header
    data = make_dicom(pixels, syntax=missing[0], pixel_data=encapsulate([fragment]))
    with pytest.raises(ImageDecodeError, match="transfer syntax") as raised:
        decode_image(data, PreprocessSpec(32))
    assert not isinstance(raised.value, ImageTooLargeError)
    assert missing[0].name in str(raised.value)


# --------------------------------------------------------------------------- limits and errors


def test_header_above_max_pixels_is_refused_before_decoding():
    # The header claims 10,000 x 9,000 pixels but holds 4 bytes of pixel data: decoding would fail
    # with "less pixel data than expected", so ImageTooLargeError proves the header was checked first.
    data = make_dicom(bright_top(), pixel_data=bytes(4), Rows=10_000, Columns=9_000)
    with pytest.raises(ImageTooLargeError, match="90,000,000"):
        decode_image(data, PreprocessSpec(32))


def test_max_pixels_counts_every_frame():
    frames = np.stack([bright_top(10, 10)] * 3)
    data = make_dicom(frames, frames=3)
    assert decode(data, PreprocessSpec(8), max_pixels=300).shape == (8, 8, 1)  # at the limit
    with pytest.raises(ImageTooLargeError, match="300"):
        decode_image(data, PreprocessSpec(8), max_pixels=299)
    single = make_dicom(bright_top(10, 10))
    assert decode(single, PreprocessSpec(8), max_pixels=100).shape == (8, 8, 1)
    with pytest.raises(ImageTooLargeError):
        decode_image(single, PreprocessSpec(8), max_pixels=99)


def test_truncated_dicom_raises_decode_error():
    data = make_dicom(np.random.default_rng(4).integers(0, 4096, (64, 80), dtype=np.uint16), bits_stored=12)
    decode(data, PreprocessSpec(32))  # the whole file is fine
    for cut in (132, 140, 300, len(data) // 2, len(data) * 9 // 10, len(data) - 1):
        with pytest.raises(ImageDecodeError) as raised:
            decode_image(data[:cut], PreprocessSpec(32))
        assert not isinstance(raised.value, ImageTooLargeError)


@pytest.mark.parametrize(
    "tail",
    [b"", b"\0" * 64, bytes(range(256)) * 4, b"\x02\x00\x10\x00UI\xff\xff", np.random.default_rng(5).bytes(2000)],
    ids=["nothing", "zeros", "byte-ramp", "huge-length", "random"],
)
def test_dicm_magic_followed_by_garbage_raises_decode_error(tail):
    with pytest.raises(ImageDecodeError):
        decode_image(b"\0" * 128 + b"DICM" + tail, PreprocessSpec(32))


def test_dicom_without_pixel_data_raises_decode_error():
    data = make_dicom(bright_top())
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        decode_image(buffer.getvalue(), PreprocessSpec(32))


@pytest.mark.parametrize(
    "elements",
    [
        {"PhotometricInterpretation": "ARGB"},
        {"BitsAllocated": 12},
        {"Rows": 0},
        {"WindowCenter": 2000, "WindowWidth": 0},
        {"VOILUTFunction": "CUBIC", "WindowCenter": 2000, "WindowWidth": 100},
    ],
    ids=["photometric", "bits-allocated", "no-rows", "window-width-0", "voi-function"],
)
def test_inconsistent_headers_raise_decode_error(elements):
    with pytest.raises(ImageDecodeError):
        decode_image(make_dicom(bright_top(), bits_stored=12, **elements), PreprocessSpec(32))


def test_corrupt_dicom_headers_never_escape_as_other_errors():
    """Every single-byte corruption after the magic decodes or raises ImageDecodeError."""
    data = make_dicom(bright_top(6, 5), bits_stored=12, WindowCenter=1100, WindowWidth=300)
    spec = PreprocessSpec(8)
    header_end = len(data) - 6 * 5 * 2  # pixel data is last
    assert_byte_corruptions_fail_cleanly(data, range(132, header_end), (0x00, 0x07, 0x7F, 0xFF), spec, "DICOM")


# --------------------------------------------------------------------------- detection


def test_dicom_is_recognised_by_content_not_by_name(tmp_path):
    path = tmp_path / "chest.png"  # a PACS export with the wrong extension
    path.write_bytes(make_dicom(bright_top(), bits_stored=12))
    out = decode(path.read_bytes(), PreprocessSpec(40, 1, "pad"))[..., 0]
    assert out[:20, 5:25].min() == 255 and out[20:, 5:25].max() == 0


def test_dicom_with_a_tiff_preamble_is_read_as_dicom():
    # Dual-personality files put a TIFF header in the 128-byte preamble; the DICOM content wins.
    preamble = b"II*\x00" + b"\0" * 124
    data = make_dicom(bright_top(), bits_stored=12, preamble=preamble)
    assert data[:4] == b"II*\x00"
    out = decode(data, PreprocessSpec(40, 1, "pad"))[..., 0]
    assert out[:20, 5:25].min() == 255 and out[20:, 5:25].max() == 0


def test_dicm_elsewhere_does_not_make_a_png_dicom():
    pixels = np.full((20, 20), 77, dtype=np.uint8)
    png = encode_png(pixels)
    assert png[128:132] != b"DICM"
    assert decode(png, PreprocessSpec(20)).max() == 77
    with pytest.raises(ImageDecodeError):  # a too-short file with DICM near the start is not DICOM
        decode_image(b"DICM" + b"\0" * 20, PreprocessSpec(20))


def test_dicom_is_listed_as_supported():
    assert "DICOM" in SUPPORTED_FORMATS


def test_importing_preprocess_does_not_import_pydicom():
    code = "import sys, pneumonia.data.preprocess; print('pydicom' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"
