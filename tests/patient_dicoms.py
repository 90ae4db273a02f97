"""DICOM files carrying a made-up patient's identity, valid and broken, and the strings to look for.

Every identifying value is distinctive (no word of an error message, a log line or a metric
contains it by chance), so finding one anywhere in an output means it leaked. The attributes are
those of the DICOM PS3.15 basic de-identification profile that a chest X-ray usually carries.
"""

from __future__ import annotations

import io

import numpy as np

IDENTITY = {
    "PatientName": "Zyxwood^Quillon",
    "PatientID": "PIDQ7731X",
    "PatientBirthDate": "19450317",
    "PatientAddress": "17 Quarrelstone Lane",
    "OtherPatientIDs": "OPIDQ5520",
    "AccessionNumber": "ACCQ99812",
    "StudyID": "STQ4411",
    "InstitutionName": "Quillfield Infirmary",
    "InstitutionAddress": "Marrowgate Road",
    "ReferringPhysicianName": "Vexmoor^Odalysse",
    "PerformingPhysicianName": "Thrandlewick^Isembard",
    "OperatorsName": "Pellucid^Arnolfini",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77310001",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.77320002",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.77330003",
}
"""Attribute -> value, set on every file below."""

NEEDLES = sorted({
    *(value for value in IDENTITY.values() if "^" not in value),
    *(part for value in IDENTITY.values() if "^" in value for part in value.split("^")),
    "1945-03-17", "1945031", "Quarrelstone", "Quillfield", "Marrowgate", "77310001", "77320002", "77330003",
})
"""What must never appear: every value, each part of a person's name, the birth date as a date.
All at least 7 characters, so that none turns up by chance in a base64 picture."""

FILE_NAME = "Brightwater_Hollis.dcm"
"""A multipart part's file name that is a patient's name: answered back to its sender, never logged."""
FILE_NEEDLES = ("Brightwater", "Hollis")

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def patient_dicom(pixels: np.ndarray | None = None, *, syntax: str | None = None, pixel_data: bool = True,
                  **elements) -> bytes:
    """A Part 10 DICOM file of a 16-bit MONOCHROME2 chest X-ray stand-in carrying :data:`IDENTITY`."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    if pixels is None:
        pixels = np.random.default_rng(3).integers(800, 3000, (48, 40), dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = IDENTITY["SOPInstanceUID"]
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_STORAGE
    for keyword, value in IDENTITY.items():
        setattr(ds, keyword, value)
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixel_data:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def patient_dicoms() -> dict[str, bytes]:
    """Name -> file: a valid X-ray and broken ones, each carrying :data:`IDENTITY`."""
    valid = patient_dicom()
    name_at = valid.index(IDENTITY["PatientName"].encode())
    frames = patient_dicom(NumberOfFrames="1234567")
    return {
        "valid": valid,
        "bad-transfer-syntax": patient_dicom(syntax="1.2.826.0.1.3680043.8.498.1"),  # a private syntax
        "no-pixel-data": patient_dicom(pixel_data=False),
        "truncated-pixels": valid[: len(valid) - 500],
        "truncated-in-the-name": valid[: name_at + 6],
        # an identifying value where a number belongs (pydicom's warning quotes it)
        "name-as-frame-count": frames.replace(b"1234567 ", b"Zyxwood "),
        # an invalid date (pydicom warns, quoting it, when the element is read)
        "bad-birth-date": valid.replace(b"19450317", b"1945031X"),
    }


def leaks(text: str | bytes, needles=NEEDLES) -> list[str]:
    """The needles found in text, whatever their case."""
    haystack = (text.decode("utf-8", "replace") if isinstance(text, bytes) else text).lower()
    return [needle for needle in needles if needle.lower() in haystack]
