"""A volume and its voxel grid.

Every volume in fseft is a `Volume`: a NumPy array in voxel order ``(X, Y, Z)`` (or a stack
``(S, X, Y, Z)``) and a 4x4 affine mapping voxel indices to RAS+ world millimetres, the nibabel
convention. The functions here compare, align and flip voxel grids (`check_same_geometry`,
`align_to_grid`, `flip_axis`); reading and writing files is `fseft.data.io`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from fseft.errors import InputFileError

# Tolerance (mm) on affine entries when deciding that two volumes share one voxel grid.
GEOMETRY_ATOL_MM = 1e-3


@dataclass
class Volume:
    """An image or mask with its geometry.

    `array`: ``(X, Y, Z)`` for scans and label maps, ``(S, X, Y, Z)`` for a stack of binary
    masks. `affine`: ``(4, 4)`` voxel index -> RAS+ mm (nibabel convention). `source`: the file
    or folder it came from (used in error messages).
    """

    array: np.ndarray
    affine: np.ndarray
    source: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along X, Y, Z (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0))

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)``, also for a ``(S, X, Y, Z)`` stack."""
        return tuple(int(v) for v in self.array.shape[-3:])

    @property
    def axcodes(self) -> str:
        """Orientation codes of the voxel axes, e.g. ``"RAS"`` or ``"LAS"``."""
        return "".join(nib.aff2axcodes(np.asarray(self.affine)))


def flip_axis(array: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Reverse voxel axis `axis` (0, 1, 2 of the spatial axes) keeping the world positions.

    `array` is ``(..., X, Y, Z)``; returns the flipped array and the matching affine.
    """
    n = array.shape[array.ndim - 3 + axis]
    flip = np.eye(4)
    flip[axis, axis] = -1.0
    flip[axis, 3] = n - 1
    return np.flip(array, axis=array.ndim - 3 + axis), affine @ flip


def _corners_mm(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World positions ``(8, 3)`` of the centres of a grid's corner voxels."""
    idx = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    a = np.asarray(affine, float)
    return idx @ a[:3, :3].T + a[:3, 3]


def grid_displacement_mm(a: Volume, b: Volume) -> float:
    """Largest distance (mm) between where the two grids put the same corner voxel (equal
    spatial shapes): 0 for one grid, the size of the move for a shift, flip or rotation."""
    return float(np.max(np.linalg.norm(_corners_mm(a.affine, a.spatial_shape) - _corners_mm(b.affine, b.spatial_shape),
                                       axis=1)))


def is_reordered_grid(a: Volume, b: Volume, atol: float = GEOMETRY_ATOL_MM) -> bool:
    """Whether `b` covers the very voxel centres of `a` in another voxel order (axes permuted or
    reversed, as dcm2niix and SimpleITK may write one DICOM series): same corner positions as a
    set, shapes a permutation of each other."""
    if sorted(a.spatial_shape) != sorted(b.spatial_shape):
        return False
    ca, cb = _corners_mm(a.affine, a.spatial_shape), _corners_mm(b.affine, b.spatial_shape)
    distances = np.linalg.norm(ca[:, None, :] - cb[None, :, :], axis=2)  # (8, 8)
    return bool(distances.min(axis=1).max() <= atol and distances.min(axis=0).max() <= atol)


def reorient_to_grid(b: Volume, a: Volume, atol: float = GEOMETRY_ATOL_MM) -> Volume | None:
    """`b` in `a`'s voxel order when `b` is `a`'s grid with axes permuted or reversed (no
    resampling: a lossless reindexing of ``(..., X, Y, Z)``); None when it is not."""
    if not is_reordered_grid(a, b, atol):
        return None
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(b.affine),
                                                nib.orientations.io_orientation(a.affine))
    lead = b.array.ndim - 3
    array = np.moveaxis(b.array, tuple(range(lead)), tuple(range(-lead, 0))) if lead else b.array
    array = nib.orientations.apply_orientation(array, transform)  # spatial axes first
    array = np.ascontiguousarray(np.moveaxis(array, tuple(range(-lead, 0)), tuple(range(lead))) if lead else array)
    affine = np.asarray(b.affine) @ nib.orientations.inv_ornt_aff(transform, b.spatial_shape)
    out = Volume(array=array, affine=affine, source=b.source)
    if out.spatial_shape != a.spatial_shape or grid_displacement_mm(a, out) > atol:
        return None  # oblique grids whose closest orientation does not line up: refuse below
    return out


def align_to_grid(a: Volume, b: Volume, atol: float = GEOMETRY_ATOL_MM) -> Volume:
    """`b` on `a`'s voxel grid: `b` itself when they share it; reoriented losslessly (with a
    logged note naming the file) when `b` is the same physical grid in another voxel order,
    as dcm2niix and SimpleITK write one DICOM series; else `check_same_geometry`'s error."""
    same = a.spatial_shape == b.spatial_shape and grid_displacement_mm(a, b) <= atol
    if not same:
        reoriented = reorient_to_grid(b, a, atol)
        if reoriented is not None:
            logging.getLogger(__name__).warning(
                "%s: the same grid as %s in voxel order %s instead of %s; reoriented to it losslessly",
                b.source, a.source, b.axcodes, a.axcodes)
            return reoriented
        check_same_geometry(a, b)
    return b


def check_same_geometry(a: Volume, b: Volume, atol: float = GEOMETRY_ATOL_MM) -> None:
    """Raise `InputFileError` naming both sources unless `a` and `b` share one voxel grid.

    Compares the spatial shapes and where the grids put their corner voxels (within `atol` mm).
    The message says whether `b` is the same physical grid in another voxel order (nothing
    moves: reorient it) or how far, in mm, its voxels are from `a`'s.
    """
    same_shape = a.spatial_shape == b.spatial_shape
    moved = grid_displacement_mm(a, b) if same_shape else None
    if moved is not None and moved <= atol:
        return
    where = (f"orientation {b.axcodes} vs {a.axcodes}, spacing "
             f"{tuple(round(s, 4) for s in b.spacing)} vs {tuple(round(s, 4) for s in a.spacing)}")
    if is_reordered_grid(a, b, atol):
        raise InputFileError(
            f"{b.source}: the same physical grid as {a.source} in another voxel order ({where}); no voxel moves, "
            "but the arrays do not line up: reorient it to the image's orientation (e.g. nibabel "
            "as_closest_canonical on both, or SimpleITK DICOMOrient)"
        )
    if not same_shape:
        raise InputFileError(
            f"{b.source}: shape {b.spatial_shape} differs from {a.source} shape {a.spatial_shape}"
        )
    raise InputFileError(
        f"{b.source}: geometry differs from {a.source}: the same voxel lies up to {moved:.4g} mm apart ({where})"
    )
