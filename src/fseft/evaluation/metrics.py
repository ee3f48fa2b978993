"""Segmentation metrics in the scan's native geometry: Dice, normalised surface Dice (NSD) and
the 95th-percentile Hausdorff distance (HD95), distances in millimetres from the voxel spacing.

Surface metrics use MONAI's implementations (`compute_surface_dice`,
`compute_hausdorff_distance`, Euclidean distance transforms with the voxel spacing); fseft
only fixes the conventions for empty masks, which MONAI leaves as NaN / inf:

============================  ======  ======  ======
case                          Dice    NSD     HD95
============================  ======  ======  ======
prediction and truth empty    1.0     1.0     0.0
exactly one of them empty     0.0     0.0     NaN
============================  ======  ======  ======

HD95 has no finite value when one mask is empty (there is no surface to measure from); it is
NaN, written as ``null`` in JSON reports and left out of means (`fseft.evaluation.report`
counts how many cases a mean covers).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

# Default NSD tolerance: 2 mm, about one voxel at the 1.5 mm model spacing and within the
# inter-rater variability of abdominal organ contours (Nikolov et al., 2021, use organ-specific
# tolerances of 1-3 mm). Pass `tolerance_mm` to change it.
DEFAULT_NSD_TOLERANCE_MM = 2.0

Spacing = Sequence[float]


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"metrics expect (X, Y, Z) masks, got shape {pred.shape}")
    return pred, gt


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    # MONAI metrics take (B, C, X, Y, Z) one-hot tensors
    return torch.from_numpy(np.ascontiguousarray(mask))[None, None]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient 2|P ∩ G| / (|P| + |G|) of two `(X, Y, Z)` binary masks.

    Both empty: 1.0; exactly one empty: 0.0.
    """
    pred, gt = _pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Spacing, tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice (Nikolov et al., 2021) of two `(X, Y, Z)` binary masks.

    The fraction of both boundaries (boundary voxels of each mask) lying within `tolerance_mm`
    of the other mask's boundary; `spacing` is the voxel size in mm along X, Y, Z.
    Both empty: 1.0; exactly one empty: 0.0.
    """
    # heavy (seconds: it imports MONAI's transforms); Dice alone does not need it
    from monai.metrics import compute_surface_dice

    pred, gt = _pair(pred, gt)
    if tolerance_mm < 0:
        raise ValueError(f"NSD tolerance must be >= 0 mm, got {tolerance_mm}")
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 1.0
    if not p_any or not g_any:
        return 0.0
    with warnings.catch_warnings():  # MONAI's own call of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(
            _as_batch(pred), _as_batch(gt), class_thresholds=[float(tolerance_mm)],
            include_background=True, spacing=[float(s) for s in spacing],
        )
    return float(value.item())


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two `(X, Y, Z)` binary masks.

    The larger of the two directed 95th percentiles of boundary-to-boundary distances (MONAI's
    definition); `spacing` is the voxel size in mm along X, Y, Z.
    Both empty: 0.0; exactly one empty: NaN.
    """
    from monai.metrics import compute_hausdorff_distance  # heavy, as in nsd

    pred, gt = _pair(pred, gt)
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 0.0
    if not p_any or not g_any:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            _as_batch(pred), _as_batch(gt), include_background=True, percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(value.item())


def evaluate_masks(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Spacing,
    structures: Sequence[str],
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, dict[str, float]]:
    """Dice, NSD and HD95 of each structure.

    pred, gt: `(S, X, Y, Z)` binary masks in the same (native) geometry, channel s = structures[s].
    spacing: voxel size in mm along X, Y, Z.
    Returns ``{structure: {"dice": float, "nsd": float, "hd95": float}}`` (conventions for empty
    masks in the module docstring).
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if pred.ndim != 4 or pred.shape[0] != len(structures):
        raise ValueError(
            f"expected (S, X, Y, Z) masks with S = {len(structures)} structures, got shape {pred.shape}"
        )
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values (mm along X, Y, Z), got {spacing}")
    return {
        name: {
            "dice": dice(pred[s], gt[s]),
            "nsd": nsd(pred[s], gt[s], spacing, tolerance_mm),
            "hd95": hd95(pred[s], gt[s], spacing),
        }
        for s, name in enumerate(structures)
    }
