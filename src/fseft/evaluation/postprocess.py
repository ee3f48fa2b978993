"""Post-processing of predicted probabilities into binary masks: threshold, then keep the
largest connected component per structure (organs are one connected piece; small islands
far from the organ are the typical false positives of sliding-window inference)."""

from __future__ import annotations

import cc3d
import numpy as np

# 26-connectivity: voxels touching by a corner belong to the same component (cc3d's default,
# and the usual choice for organ masks).
CONNECTIVITY = 26


def largest_connected_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest 26-connected component of a binary mask.

    mask: `(X, Y, Z)` bool (or any array, non-zero = foreground). Returns a bool array of the
    same shape; an empty mask stays empty.
    """
    if mask.ndim != 3:
        raise ValueError(f"largest_connected_component expects an (X, Y, Z) mask, got shape {mask.shape}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    return cc3d.largest_k(mask, k=1, connectivity=CONNECTIVITY, binary_image=True).astype(bool)


def binarize(
    probabilities: np.ndarray, threshold: float = 0.5, largest_component: bool = True
) -> np.ndarray:
    """Threshold sigmoid probabilities and (optionally) keep each structure's largest component.

    probabilities: `(S, X, Y, Z)` float in [0, 1], one sigmoid channel per structure.
    Returns `(S, X, Y, Z)` uint8 binary masks (voxel is foreground where probability > threshold).
    """
    if probabilities.ndim != 4:
        raise ValueError(f"binarize expects (S, X, Y, Z) probabilities, got shape {probabilities.shape}")
    masks = np.asarray(probabilities) > threshold
    if largest_component:
        for s in range(masks.shape[0]):
            masks[s] = largest_connected_component(masks[s])
    return masks.astype(np.uint8)
