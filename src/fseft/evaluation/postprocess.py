"""Post-processing of predicted probabilities into binary masks: threshold, then keep the
largest connected component per structure (organs are one connected piece; small islands
far from the organ are the typical false positives of sliding-window inference). Structures
made of several pieces (`fseft.data.structures.MULTI_PART_STRUCTURES`: the vertebral column,
lesions, vessel trees) are left whole."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import cc3d
import numpy as np

from fseft.data.structures import canonical_name, is_multi_part

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


def keep_largest_components(
    masks: np.ndarray, structures: Sequence[str] | None = None, keep_whole: Collection[str] = ()
) -> np.ndarray:
    """Reduce each channel of `masks` `(S, X, Y, Z)` to its largest connected component, except
    the channels whose structure (`structures[s]`, any spelling) is multi-part
    (`fseft.data.structures.is_multi_part`) or in `keep_whole` (canonical names: a model file's
    choice, `choose_largest_component`). Returns a new bool array of the same shape."""
    if structures is not None and len(structures) != masks.shape[0]:
        raise ValueError(f"{len(structures)} structure names for {masks.shape[0]} mask channels")
    out = np.asarray(masks, dtype=bool).copy()
    for s in range(out.shape[0]):
        if structures is None or not (is_multi_part(structures[s]) or canonical_name(structures[s]) in keep_whole):
            out[s] = largest_connected_component(out[s])
    return out


def choose_largest_component(with_step: Mapping[str, float], without_step: Mapping[str, float]) -> dict[str, bool]:
    """Per structure, whether to keep only the largest component, from validation Dice scores
    with and without that step (nnU-Net's rule: keep it unless it lowers the Dice). A
    prediction that breaks a thin organ into pieces loses the smaller pieces to the step."""
    return {name: bool(with_step[name] >= without_step[name]) for name in with_step if name in without_step}


def binarize(
    probabilities: np.ndarray,
    threshold: float = 0.5,
    largest_component: bool = True,
    structures: Sequence[str] | None = None,
    keep_whole: Collection[str] = (),
) -> np.ndarray:
    """Threshold sigmoid probabilities and (optionally) keep each structure's largest component.

    probabilities: `(S, X, Y, Z)` float in [0, 1], one sigmoid channel per structure.
    structures: the S structure names; multi-part ones keep all their components (see
        `keep_largest_components`), as are those in `keep_whole`. None: every channel is reduced.
    Returns `(S, X, Y, Z)` uint8 binary masks (voxel is foreground where probability > threshold).
    """
    if probabilities.ndim != 4:
        raise ValueError(f"binarize expects (S, X, Y, Z) probabilities, got shape {probabilities.shape}")
    masks = np.asarray(probabilities) > threshold
    if largest_component:
        masks = keep_largest_components(masks, structures, keep_whole)
    return masks.astype(np.uint8)
