"""Reading and writing CT volumes and label masks as `Volume`s (`fseft.data.volume`).

A `Volume` is a NumPy array in voxel order ``(X, Y, Z)`` (or a stack ``(S, X, Y, Z)``) and a
4x4 affine mapping voxel indices to RAS+ world millimetres, the nibabel convention. Files read through SimpleITK (NRRD, MHA/MHD, DICOM) are converted from ITK's LPS
physical frame and ``(Z, Y, X)`` array order into that convention, so the rest of the code never
sees the difference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike

from fseft.data.dicom_series import dicom_series_files
from fseft.data.structures import UnknownStructureError, canonical_name, canonical_names, structure_color
from fseft.data.volume import Volume, align_to_grid, flip_axis
from fseft.errors import InputFileError
from fseft.utils import atomic_path, write_json, write_text

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"

# ITK's physical frame is LPS+, nibabel's RAS+: negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

class StructureNotInFileError(InputFileError, UnknownStructureError):
    """A requested structure that a label file (or a set of mask files) does not contain.

    Both an `InputFileError` (the file lacks it) and an `UnknownStructureError` (the name is
    not known there), so callers may catch either.
    """




# ------------------------------------------------------------------------------- reading


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        # `dataobj` applies scl_slope / scl_inter; keep the stored dtype when they are identity.
        array = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt / truncated files
        raise InputFileError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc})") from exc
    return array, np.asarray(img.affine, dtype=np.float64)


def _itk_to_numpy(image, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (array (X, Y, Z), RAS affine)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputFileError(
            f"{source}: not a scalar volume ({image.GetNumberOfComponentsPerPixel()} components per voxel)"
        )
    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise InputFileError(f"{source}: 4D image with {size[3]} volumes; expected one 3D volume")
        image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
        dim = 3
    if dim != 3:
        raise InputFileError(f"{source}: {dim}D image of size {image.GetSize()}; expected a 3D volume")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK (Z, Y, X) -> (X, Y, Z)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    lps[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return np.ascontiguousarray(array), _LPS_TO_RAS @ lps


def _read_itk_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputFileError(f"{path}: cannot read image file ({str(exc).strip().splitlines()[-1]})") from exc
    return _itk_to_numpy(image, path)


def _read_dicom_series(folder: Path, series_id: str | None) -> tuple[np.ndarray, np.ndarray]:
    names = dicom_series_files(folder, series_id)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        image = reader.Execute()  # applies RescaleSlope / RescaleIntercept -> HU
    except RuntimeError as exc:
        raise InputFileError(f"{folder}: cannot read DICOM series ({str(exc).strip().splitlines()[-1]})") from exc
    array, affine = _itk_to_numpy(image, folder)
    # dcm2niix stores DICOM rows bottom-up (flips the row axis): do the same, so that a series
    # comes out in the voxel grid of the NIfTI files converted from it (and labelled on them).
    return flip_axis(array, affine, axis=1)


def _read_array(path: str | os.PathLike, series_id: str | None = None) -> tuple[np.ndarray, np.ndarray, Path]:
    """Read any supported file or DICOM folder: (array (X, Y, Z) in the stored dtype, affine, path)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file or folder")
    if path.is_dir():
        array, affine = _read_dicom_series(path, series_id)
    else:
        suffix = _suffix(path)
        if suffix in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            array, affine = _read_itk_file(path)
        else:
            raise InputFileError(f"{path}: unsupported file type {suffix!r}; expected {SUPPORTED}")
    array, affine = _check_3d(array, affine, path)
    return array, affine, path


def _check_3d(array: np.ndarray, affine: np.ndarray, source: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One 3D volume (a trailing axis of one volume dropped) and a usable affine, else an
    `InputFileError` naming `source`."""
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise InputFileError(f"{source}: 4D image with {array.shape[3]} volumes {array.shape}; expected one 3D volume")
    if array.ndim != 3 or min(array.shape) < 1:
        raise InputFileError(f"{source}: {array.ndim}D array of shape {array.shape}; expected a 3D volume")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputFileError(f"{source}: invalid voxel-to-world affine {affine.tolist()}")
    return array, affine


def read_image(path: str | os.PathLike, *, series_id: str | None = None) -> Volume:
    """Read a CT scan: NIfTI, NRRD, MHA/MHD, or a folder holding one DICOM series.

    Returns a `Volume` with `array` ``(X, Y, Z)`` float32 HU and its RAS affine. A DICOM series
    comes out in the voxel order dcm2niix writes (rows flipped), e.g. LAS for axial slices.
    `series_id` picks one series in a folder holding several.

    Raises `InputFileError` (naming the path) for a missing, unreadable or corrupt file, an
    empty folder or one without DICOM series, a 2D or multi-volume 4D image, or NaN / inf values.
    """
    array, affine, path = _read_array(path, series_id)
    return _scan_volume(array, affine, path)


def volume_from_array(array: ArrayLike, affine: ArrayLike, source: str = "the array") -> Volume:
    """A scan held in memory as a `Volume`, checked as `read_image` checks a file.

    array: ``(X, Y, Z)`` (or ``(X, Y, Z, 1)``) real numbers, HU; affine: ``(4, 4)`` voxel index ->
    RAS+ mm (nibabel's ``img.affine``). Returns `array` as float32 (a copy unless it is float32
    already) with `affine` as float64. `InputFileError` naming `source` for another number of
    dimensions, a non-numeric or complex type, NaN / inf voxels, or an affine that is not a finite
    invertible 4x4 matrix; the warning of `hounsfield_problem` for values that do not look like HU.
    """
    try:
        array = np.asarray(array)
        affine = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputFileError(f"{source}: not a numeric array and affine ({exc})") from exc
    array, affine = _check_3d(array, affine, source)
    return _scan_volume(array, affine, source)


def _scan_volume(array: np.ndarray, affine: np.ndarray, source: str | os.PathLike[str]) -> Volume:
    """`read_image`'s checks of a 3D array: real numbers, finite, HU-like (else a warning)."""
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputFileError(f"{source}: voxel type {array.dtype} is not a real number type")
    array = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        n_bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputFileError(f"{source}: {n_bad} voxels are NaN or infinite")
    problem = hounsfield_problem(array)
    if problem:
        logging.getLogger(__name__).warning("%s: %s; the models expect CT in Hounsfield units", source, problem)
    return Volume(array=array, affine=affine, source=str(source))


def hounsfield_problem(array: np.ndarray) -> str | None:
    """Why an image does not look like CT in Hounsfield units, or None: one value everywhere,
    or no air (1st percentile above -200) with a median above 500, the signature of stored
    values without their rescale offset (+1024). Read on every 4th voxel along each axis."""
    sample = array[::4, ::4, ::4] if array.ndim == 3 else array
    if sample.size == 0:
        return None
    low, median = np.percentile(sample, [1, 50])
    if float(sample.min()) == float(sample.max()):
        return f"every voxel is {float(sample.min()):g}"
    if low > -200 and median > 500:
        return (f"no air (1st percentile {low:.0f}) and a median of {median:.0f}: values look offset, e.g. "
                "stored without the DICOM rescale (HU = stored - 1024)")
    return None


def read_labels(path: str | os.PathLike) -> Volume:
    """Read an integer label map (multilabel or binary mask) as `Volume` ``(X, Y, Z)`` int32.

    Raises `InputFileError` when the file is unreadable, not 3D, or holds non-integer values.
    """
    array, affine, path = _read_array(path)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputFileError(f"{path}: label file holds non-integer values; expected integer labels")
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise InputFileError(f"{path}: voxel type {array.dtype} is not an integer label type")
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        raise InputFileError(f"{path}: label values outside the int32 range")
    return Volume(array=np.asarray(array, dtype=np.int32), affine=affine, source=str(path))


def read_multilabel(
    path: str | os.PathLike, label_map: Mapping[int, str], structures: Sequence[str] | str,
    unmapped: str = "ignore",
) -> Volume:
    """One multilabel file -> binary masks ``(S, X, Y, Z)`` uint8, in the order of `structures`.

    `label_map`: label value -> structure name (any spelling; compared as canonical names).
    Several values may map to one structure; their union is its mask. A requested structure
    the map lacks raises `StructureNotInFileError` naming the file, the structure, and the
    structures the map has. A structure in the map with no voxels in the file gives an empty mask.
    `unmapped`: what to do when the file holds values its map lacks (those voxels would count
    as background): ``"ignore"``, ``"warn"`` (log naming the file: scoring a prediction) or
    ``"error"`` (`InputFileError`: checking a dataset, as nnU-Net's integrity check does).
    """
    if unmapped not in ("ignore", "warn", "error"):
        raise ValueError(f"unmapped must be ignore, warn or error, got {unmapped!r}")
    labels = read_labels(path)
    wanted = canonical_names(structures)
    values_of: dict[str, list[int]] = {}
    for value, name in label_map.items():
        values_of.setdefault(canonical_name(str(name)), []).append(int(value))
    missing = [s for s in wanted if s not in values_of]
    if missing:
        raise StructureNotInFileError(
            f"{labels.source}: no label for {', '.join(missing)}; its label map has: "
            + ", ".join(sorted(values_of))
        )
    extra = sorted(set(np.unique(labels.array).tolist()) - {0} - {int(v) for v in label_map}) if unmapped != "ignore" else []
    if extra:  # voxels no structure claims: a wrong label map, or a file of another dataset
        message = (f"{labels.source}: label value(s) {', '.join(map(str, extra[:10]))}{' ...' if len(extra) > 10 else ''} "
                   f"are not in its label map ({', '.join(f'{v}: {n}' for v, n in sorted(label_map.items()))})")
        if unmapped == "error":
            raise InputFileError(message)
        logging.getLogger(__name__).warning("%s; those voxels count as background", message)
    masks = np.zeros((len(wanted), *labels.array.shape), dtype=np.uint8)
    for i, name in enumerate(wanted):
        masks[i] = np.isin(labels.array, values_of[name])
    return Volume(array=masks, affine=labels.affine, source=labels.source)


def read_binary_masks(files: Mapping[str, str | os.PathLike], structures: Sequence[str] | str) -> Volume:
    """One binary mask file per structure -> ``(S, X, Y, Z)`` uint8 (voxel > 0 is foreground).

    `files`: structure name (any spelling) -> mask file. All masks must share one geometry
    (`align_to_grid`). A requested structure without a file raises
    `StructureNotInFileError` listing the structures that have one.
    """
    by_name = {canonical_name(str(k)): Path(v) for k, v in files.items()}
    wanted = canonical_names(structures)
    missing = [s for s in wanted if s not in by_name]
    if missing:
        parents = sorted({str(p.parent) for p in by_name.values()}) or ["(no files given)"]
        raise StructureNotInFileError(
            f"{', '.join(parents)}: no mask file for {', '.join(missing)}; masks there: "
            + (", ".join(sorted(by_name)) or "none")
        )
    if not wanted:
        raise InputFileError("read_binary_masks: no structures requested")
    first: Volume | None = None
    masks: np.ndarray | None = None
    for i, name in enumerate(wanted):
        mask = read_labels(by_name[name])
        if first is None:
            first = mask
            masks = np.zeros((len(wanted), *mask.array.shape), dtype=np.uint8)
        else:
            mask = align_to_grid(first, mask)
        masks[i] = mask.array > 0
    parents = {str(by_name[s].parent) for s in wanted}
    source = parents.pop() if len(parents) == 1 else first.source
    return Volume(array=masks, affine=first.affine, source=source)


# ------------------------------------------------------------------------------- writing


def _nifti_suffix(path: Path) -> str:
    suffix = _suffix(path)
    if suffix not in NIFTI_SUFFIXES:
        raise InputFileError(f"{path}: output must be a NIfTI file (.nii or .nii.gz)")
    return suffix


def _nifti_image(array: np.ndarray, affine: np.ndarray):
    img = nib.Nifti1Image(array, affine)
    # Both sform and qform, code 1 (scanner): ITK / 3D Slicer and nibabel then agree on placement.
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    return img


def _smallest_label_dtype(array: np.ndarray) -> type:
    if array.size == 0:
        return np.uint8
    lo, hi = int(array.min()), int(array.max())
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise InputFileError(f"label values {lo}..{hi} do not fit int32")


def label_image(array: np.ndarray, affine: np.ndarray):
    """The NIfTI image `write_mask` writes: integer labels ``(X, Y, Z)`` in the smallest type
    that holds them (uint8, int16, int32), `affine` ``(4, 4)`` as sform and qform (code 1), mm."""
    array = np.asarray(array)
    return _nifti_image(array.astype(_smallest_label_dtype(array)), np.asarray(affine, dtype=np.float64))


def write_mask(
    array: np.ndarray,
    reference: Volume,
    path: str | os.PathLike,
    label_map: Mapping[int, str] | None = None,
) -> Path:
    """Write integer labels ``(X, Y, Z)`` as NIfTI in `reference`'s geometry (shape and affine).

    The file is written atomically. With `label_map` (value -> name), ``<name>.json`` is written
    beside it (``case.nii.gz`` -> ``case.json``), and ``<name>.ctbl``, its 3D Slicer colour table
    (`write_color_table`). Returns the path written.
    """
    path = Path(path)
    suffix = _nifti_suffix(path)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise InputFileError(f"{path}: mask to write has non-integer values (dtype {array.dtype})")
    if tuple(array.shape) != reference.spatial_shape:
        raise InputFileError(
            f"{path}: mask of shape {tuple(array.shape)} does not match the shape "
            f"{reference.spatial_shape} of its reference {reference.source}"
        )
    img = label_image(array, reference.affine)
    with atomic_path(path, suffix=suffix) as tmp:
        img.to_filename(str(tmp))
        if label_map is not None:  # inside the block: a mask is never left without its label map
            stem = path.name[: -len(suffix)]
            write_json(path.with_name(stem + ".json"), {str(int(v)): str(n) for v, n in sorted(label_map.items())})
            write_color_table(path.with_name(stem + COLOR_TABLE_SUFFIX), label_map)
    return path


COLOR_TABLE_SUFFIX = ".ctbl"


def write_color_table(path: str | os.PathLike, label_map: Mapping[int, str]) -> Path:
    """Write a 3D Slicer colour table (``.ctbl``/``.txt`` format: ``# Color table file`` header
    lines, then one ``value name R G B A`` row per label), atomically, so that a label map opens
    in Slicer named and coloured. Row 0 is the transparent background; one row per entry of
    `label_map` (value -> name), coloured by `structure_color` (stable per structure). Names
    with spaces get underscores, as the format asks. Returns the path written.
    """
    path = Path(path)
    rows = {0: ("background", (0, 0, 0), 0)}
    for value, name in sorted((int(v), str(n)) for v, n in label_map.items()):
        if value <= 0:
            raise InputFileError(f"{path}: label value {value} for {name!r}; a colour table's labels are positive (0 is the background)")
        rows[value] = ("_".join(name.split()) or f"label_{value}", structure_color(name), 255)
    lines = [f"# Color table file {path.name}", f"# {len(rows)} values"]
    lines += [f"{value} {name} {r} {g} {b} {alpha}" for value, (name, (r, g, b), alpha) in rows.items()]
    write_text(path, "\n".join(lines) + "\n")
    return path


def write_image(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a scan ``(X, Y, Z)`` as NIfTI, atomically: int16 when all values are integral and
    fit int16 (HU), float32 otherwise. Returns the path written."""
    path = Path(path)
    suffix = _nifti_suffix(path)
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputFileError(f"{path}: image to write has shape {array.shape}; expected (X, Y, Z)")
    integral = (
        array.size > 0
        and np.all(np.isfinite(array))
        and np.array_equal(array, np.round(array))
        and array.min() >= np.iinfo(np.int16).min
        and array.max() <= np.iinfo(np.int16).max
    )
    array = array.astype(np.int16 if integral else np.float32)
    img = _nifti_image(array, np.asarray(volume.affine, dtype=np.float64))
    with atomic_path(path, suffix=suffix) as tmp:
        img.to_filename(str(tmp))
    return path
