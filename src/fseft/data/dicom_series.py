"""Finding and checking the DICOM series in a folder, from the file headers only.

`dicom_series_files` lists the files of the series to read (the folder's only series, or the one
`series_id` names), sorted by slice position, and refuses an incomplete series
(`check_slice_spacing`), so that a run can check its scans before any work. Reading the pixels
is `fseft.data.io.read_image`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fseft.errors import InputFileError


def check_slice_spacing(folder: Path, names: Sequence[str], tolerance: float = 0.5) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along their normal.

    SimpleITK stacks the slices on an even grid whatever their positions, so a missing slice
    (an incomplete transfer from the PACS) would silently shift every slice after it. A gap
    more than ``1 + tolerance`` times the median spacing, or two slices at one position, raises
    `InputFileError` naming the files around it.
    """
    positions = []
    for name in names:
        info = sitk.ImageFileReader()
        info.SetFileName(str(name))
        try:
            info.ReadImageInformation()
            ipp = [float(v) for v in info.GetMetaData("0020|0032").split("\\")]
            iop = [float(v) for v in info.GetMetaData("0020|0037").split("\\")]
        except (RuntimeError, ValueError):
            return  # no usable position tags: nothing to check against (SimpleITK reports it)
        normal = np.cross(iop[:3], iop[3:])
        positions.append(float(np.dot(ipp, normal)))
    order = np.argsort(positions)
    steps = np.diff(np.asarray(positions)[order])
    if steps.size < 2:
        return
    median = float(np.median(steps))
    for i, step in enumerate(steps):
        if step < 1e-3 or step > (1 + tolerance) * median:
            before, after = Path(names[order[i]]).name, Path(names[order[i + 1]]).name
            what = "two slices at the same position" if step < 1e-3 else (
                f"a gap of {step:.2f} mm where the series steps {median:.2f} mm (about "
                f"{round(step / median) - 1} missing slice(s))")
            raise InputFileError(
                f"{folder}: {what} between {before} and {after}; fseft would misplace every slice "
                "after it. Export the complete series again"
            )


def dicom_series_files(folder: str | os.PathLike, series_id: str | None = None) -> list[str]:
    """The files of the DICOM series to read in `folder`, sorted by slice position.

    Reads headers only, so that a run can check its scans before any work: refuses an empty
    folder, one without a series, several series without `series_id` (listing them), an
    unknown `series_id`, a single slice, and uneven slice spacing (`check_slice_spacing`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"{folder}: no such folder; expected a folder holding a DICOM series")
    files = [p for p in folder.iterdir() if p.is_file()]
    if not files:
        raise InputFileError(f"{folder}: empty folder; expected a DICOM series")
    reader = sitk.ImageSeriesReader()
    try:
        ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise InputFileError(f"{folder}: cannot scan folder for DICOM series ({exc})") from exc
    if not ids:
        raise InputFileError(f"{folder}: no DICOM series found among its {len(files)} files")
    if series_id is None:
        if len(ids) > 1:
            counts = ", ".join(f"{i!r} ({len(reader.GetGDCMSeriesFileNames(str(folder), i))} files)" for i in ids)
            raise InputFileError(
                f"{folder}: holds {len(ids)} DICOM series ({counts}); choose one with --series-id "
                "(series_id in Python) or give a folder with a single series"
            )
        series_id = ids[0]
    elif series_id not in ids:
        raise InputFileError(f"{folder}: no DICOM series {series_id!r}; series there: {', '.join(map(repr, ids))}")
    names = list(reader.GetGDCMSeriesFileNames(str(folder), series_id))  # sorted by slice position
    if len(names) < 2:
        raise InputFileError(f"{folder}: DICOM series {series_id!r} has a single slice; expected a volume")
    check_slice_spacing(folder, names)
    return names
