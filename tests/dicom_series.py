"""Writes small synthetic CT DICOM series for tests (SimpleITK, one file per slice)."""

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
