"""Shared fixtures. Real CT examples live in ../shared/data/totalseg-examples beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "totalseg-examples"


@pytest.fixture(scope="session")
def totalseg_examples() -> Path:
    """The real CT examples folder; tests that need it are skipped where it is absent."""
    if not (SHARED_DATA / "example_ct_sm.nii.gz").exists():
        pytest.skip(f"real CT examples not found at {SHARED_DATA}")
    return SHARED_DATA


def write_ct_series(
    folder: Path,
    hu,
    *,
    spacing: tuple[float, float, float] = (2.0, 1.5, 3.0),
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin: tuple[float, float, float] = (-20.0, -15.0, 40.0),
    file_order=None,
) -> list[Path]:
    """Write a small CT series with pydicom: ``hu`` is ``(slices, rows, columns)`` int HU, slice
    k at ``origin + k * spacing[2] * normal`` (normal = row direction x column direction of
    `orientation`, the Image Orientation (Patient)); pixel spacing ``spacing[:2]`` (between rows,
    between columns). Stored values are HU + 1024 (RescaleIntercept -1024). Slice k is written
    to the file ``file_order.index(k)``-th, named ``IM<n>`` with InstanceNumber n + 1, so the
    file names and instance numbers need not follow the slice positions. Returns the files in
    slice order."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = np.asarray(hu)
    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = list(file_order) if file_order is not None else list(range(hu.shape[0]))
    files: dict[int, Path] = {}
    for n, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer, ds.ImageType = "CT", "fseft-tests", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "FSEFT-1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber = 2, n + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.PixelData = (hu[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        files[k] = folder / f"IM{n}"
        ds.save_as(files[k], enforce_file_format=True)
    return [files[k] for k in range(hu.shape[0])]


@pytest.fixture(scope="session")
def ct_series():
    """`write_ct_series`: writes a small synthetic CT series (pydicom) into a folder."""
    return write_ct_series
