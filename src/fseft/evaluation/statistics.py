"""Per-structure statistics of a predicted mask in its scan: volume and Hounsfield units.

`fseft predict --statistics` writes them to ``statistics.json`` beside the masks, as
TotalSegmentator's ``--statistics`` does: for each structure its volume in millilitres (voxel
count x voxel volume of the native grid) and the mean and standard deviation of the scan's HU
under the mask, in native geometry (no resampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fseft.errors import InputFileError

if TYPE_CHECKING:
    from fseft.data.volume import Volume


def structure_statistics(image: Volume, masks: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    """Volume and HU of each structure of a mask in `image`'s geometry.

    image: the native scan, `array` ``(X, Y, Z)`` HU.
    masks: a label map ``(X, Y, Z)`` (value s + 1 = ``names[s]``, as `merge_masks` writes) or
        binary masks ``(S, X, Y, Z)`` (channel s = ``names[s]``; they may overlap).
    Returns ``{name: {"voxels", "volume_ml", "hu_mean", "hu_std"}}`` in the order of `names`:
    voxels = foreground voxel count; volume_ml = voxels x |det(affine)| mm^3 / 1000; hu_mean /
    hu_std = mean and population standard deviation (ddof 0) of the scan's values under the
    mask, None for an empty mask (whose volume is 0).
    """
    masks = np.asarray(masks)
    stack = masks.ndim == 4
    if masks.shape[-3:] != tuple(image.spatial_shape) or masks.ndim not in (3, 4) or (stack and masks.shape[0] != len(names)):
        raise InputFileError(f"{image.source}: masks of shape {masks.shape} do not fit the scan of shape "
                             f"{image.spatial_shape} and {len(names)} structure(s)")
    voxel_ml = abs(float(np.linalg.det(np.asarray(image.affine, dtype=np.float64)[:3, :3]))) / 1000.0
    hu = np.asarray(image.array)
    stats: dict[str, dict[str, float | int | None]] = {}
    for s, name in enumerate(names):
        inside = masks[s] > 0 if stack else masks == s + 1
        values = hu[inside].astype(np.float64)
        stats[name] = {
            "voxels": int(values.size),
            "volume_ml": round(values.size * voxel_ml, 4),
            "hu_mean": round(float(values.mean()), 2) if values.size else None,
            "hu_std": round(float(values.std()), 2) if values.size else None,
        }
    return stats
