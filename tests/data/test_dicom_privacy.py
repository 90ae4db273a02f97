"""Decoding a DICOM file never passes on its patient's identity: not in errors, warnings or logs.

The service, batch scoring and the CLI all report what :func:`decode_image` raises, so this is
where a header value could first leak; tests/serving/test_patient_privacy.py follows the same
files through every route and command.
"""

from __future__ import annotations

import logging
import warnings

import pytest

from pneumonia.data.preprocess import ImageDecodeError, PreprocessSpec, decode_image
from tests.patient_dicoms import IDENTITY, leaks, patient_dicom, patient_dicoms

pytest.importorskip("pydicom")

BROKEN = [name for name in patient_dicoms() if name != "valid"]


def test_the_valid_file_decodes_and_carries_the_identity():
    import io

    import pydicom

    data = patient_dicoms()["valid"]
    assert decode_image(data, PreprocessSpec(32)).shape == (32, 32, 1)
    assert str(pydicom.dcmread(io.BytesIO(data)).PatientName) == IDENTITY["PatientName"]  # the test's premise


@pytest.mark.parametrize("case", BROKEN)
def test_errors_warnings_and_logs_name_no_header_value(case, caplog):
    data = patient_dicoms()[case]
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            decode_image(data, PreprocessSpec(32))
            message = ""
        except ImageDecodeError as error:
            message = str(error)
    assert case == "bad-birth-date" or message  # every other case is refused
    assert not leaks(message), message
    assert not leaks(" ".join(str(warning.message) for warning in caught))
    assert not leaks(caplog.text), caplog.text


def test_a_header_value_where_a_number_belongs_is_not_echoed():
    """Before: 'DICOM NumberOfFrames is not a number: 'Zyxwood'' (and pydicom's log quoted it)."""
    data = patient_dicoms()["name-as-frame-count"]
    with pytest.raises(ImageDecodeError, match="^DICOM NumberOfFrames is not a number$"):
        decode_image(data, PreprocessSpec(32))


def test_truncated_pixel_data_is_explained_in_our_words():
    with pytest.raises(ImageDecodeError, match="pixel data is 3,340 bytes but its header needs 3,840"):
        decode_image(patient_dicoms()["truncated-pixels"], PreprocessSpec(32))


def test_an_unknown_transfer_syntax_is_named_only_when_it_is_a_uid():
    with pytest.raises(ImageDecodeError, match=r"transfer syntax '1\.2\.826\.0\.1\.3680043\.8\.498\.1' is not supported"):
        decode_image(patient_dicoms()["bad-transfer-syntax"], PreprocessSpec(32))
    # A value that is not a UID (pydicom refuses to write one, so the bytes are edited).
    data = patient_dicom(syntax="1.2.826.0.1.3680043.8.498.1234567").replace(b"498.1234567", b"Zyxwood^Qui")
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(data, PreprocessSpec(32))
    assert not leaks(str(raised.value)), raised.value


def test_pydicom_log_records_stay_out_of_the_process_logs(caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageDecodeError):
        decode_image(patient_dicoms()["name-as-frame-count"], PreprocessSpec(32))
    assert not [record for record in caplog.records if record.name.startswith("pydicom")]
