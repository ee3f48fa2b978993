"""Writes small synthetic CT DICOM series for tests, one file per slice: `write_dicom_series`
(SimpleITK, axial, files in slice order) and `write_ct_series` (pydicom: any orientation, files
in any order, the patient / study / frame-of-reference tags a DICOM SEG copies)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_dicom_series(
    folder: Path,
    hu_zyx: np.ndarray,
    series_uid: str,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    skip: Sequence[int] = (),
    prefix: str = "slice",
) -> list[Path]:
    """Write `hu_zyx` ``(Z, Y, X)`` HU as axial CT slices ``<prefix>NNN.dcm`` in `folder`
    (slices listed in `skip` left out, as an incomplete transfer would). Returns the files."""
    import locale

    import SimpleITK as sitk

    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer sets the C locale process-wide
    try:
        return _write(sitk, folder, hu_zyx, series_uid, spacing, skip, prefix)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write(sitk, folder, hu_zyx, series_uid, spacing, skip, prefix) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(hu_zyx).astype(np.int16))  # HU stored as is (GDCM sets the rescale)
    image.SetSpacing(spacing)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for z in range(image.GetDepth()):
        if z in skip:
            continue
        slice_ = image[:, :, z]
        position = "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z)))
        tags = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0020|000d": f"{series_uid}.0", "0020|000e": series_uid, "0008|0018": f"{series_uid}.{z + 1}",
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": position, "0020|0013": str(z + 1),
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        path = folder / f"{prefix}{z:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_)
        files.append(path)
    return files


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (2.0, 1.5, 3.0),
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin: tuple[float, float, float] = (-20.0, -15.0, 40.0),
    file_order: Sequence[int] | None = None,
) -> list[Path]:
    """Write a small CT series with pydicom: ``hu`` is ``(slices, rows, columns)`` int HU, slice
    k at ``origin + k * spacing[2] * normal`` (normal = row direction x column direction of
    `orientation`, the Image Orientation (Patient)); pixel spacing ``spacing[:2]`` (between rows,
    between columns). Stored values are HU + 1024 (RescaleIntercept -1024). Slice k is written
    to the file ``file_order.index(k)``-th, named ``IM<n>`` with InstanceNumber n + 1, so the
    file names and instance numbers need not follow the slice positions. Returns the files in
    slice order."""
    from pydicom.uid import generate_uid

    hu = np.asarray(hu)
    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = list(file_order) if file_order is not None else list(range(hu.shape[0]))
    files: dict[int, Path] = {}
    for n, k in enumerate(order):
        ds = _ct_slice_header(study, series, frame)
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


def write_volume_series(folder: Path, hu_xyz: np.ndarray, affine: np.ndarray, *, study_uid: str | None = None,
                        patient_id: str = "FSEFT-1") -> list[Path]:
    """Write a volume ``(X, Y, Z)`` HU with its RAS+ `affine` (any axis order, as a phantom case
    comes) as a CT series with pydicom, as a scanner would: slice k = voxels ``[:, :, k]``,
    column c = voxel axis X, row r = voxel axis Y, stored signed (int16, rescale 1 / 0). Returns
    the files in slice order; `study_uid` puts the series in an existing study."""
    from pydicom.uid import generate_uid

    hu_xyz, affine = np.asarray(hu_xyz), np.asarray(affine, float)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_dir = lps @ affine[:3, 0] / spacing[0]  # along a row: increasing column = voxel X
    col_dir = lps @ affine[:3, 1] / spacing[1]  # down a column: increasing row = voxel Y
    study, series, frame = study_uid or generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(hu_xyz.shape[2]):
        ds = _ct_slice_header(study, series, frame, patient_id)
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.ImagePositionPatient = [float(v) for v in lps @ (affine @ [0.0, 0.0, k, 1.0])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = hu_xyz.shape[1], hu_xyz.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "HU"
        ds.PixelData = np.ascontiguousarray(hu_xyz[:, :, k].T.astype(np.int16)).tobytes()  # (rows = Y, columns = X)
        path = folder / f"CT{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _ct_slice_header(study: str, series: str, frame: str, patient_id: str = "FSEFT-1"):  # -> pydicom Dataset
    """The header every synthetic CT slice shares: file meta, UIDs (a new SOP instance), modality,
    patient and study attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality, ds.Manufacturer, ds.ImageType = "CT", "fseft-tests", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", patient_id, "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "", ""
    return ds
