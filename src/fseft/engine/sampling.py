"""Training patches: positive/negative-balanced random crops and augmentation (MONAI dict
transforms), reproducible per (seed, epoch, item) so that a resumed or distributed run draws
the very same patches as an uninterrupted single-process one.

A volume item is a dict ``{"image": (1, X, Y, Z) float in [0, 1], "label": (C, X, Y, Z) uint8,
...}`` in model space (see `fseft.data.preprocessing`); other keys (e.g. ``annotated``) are
copied to every patch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fseft.errors import ConfigError


def patch_transforms(
    patch_size: Sequence[int],
    patches_per_volume: int,
    pos: float = 1.0,
    neg: float = 1.0,
    augment: bool = True,
    keys: Sequence[str] = ("image", "label"),
    label_key: str = "label",
    image_key: str = "image",
) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """A MONAI `Compose` turning one volume dict into `patches_per_volume` patch dicts.

    Pads volumes smaller than `patch_size`, then `RandCropByPosNegLabeld` (a patch is centred
    on a voxel of any annotated structure with probability pos / (pos + neg)), then, with
    `augment`, the Swin-UNETR BTCV recipe: flips along each axis (p=0.1), 90-degree rotations in
    the axial plane (p=0.1; only when the patch is square in that plane), intensity scaling
    (+-10 %, p=0.1) and shifts (+-0.1, p=0.5).
    Output patches: image ``(1, *patch_size)``, label ``(C, *patch_size)``.
    """
    from monai.transforms import (
        Compose,
        CopyItemsd,
        DeleteItemsd,
        FgBgToIndicesd,
        Lambdad,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    patch = tuple(int(s) for s in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ConfigError(f"patch_size must be 3 positive integers, got {tuple(patch_size)}")
    if patches_per_volume < 1:
        raise ConfigError(f"patches_per_volume must be >= 1, got {patches_per_volume}")
    if pos < 0 or neg < 0 or pos + neg == 0:
        raise ConfigError(f"pos and neg sampling ratios must be >= 0 and not both 0, got {pos}, {neg}")
    keys = list(keys)
    union = f"{label_key}_union"
    steps: list[Any] = [
        SpatialPadd(keys=keys, spatial_size=patch),
        # MONAI reads a multi-channel label as one-hot with a background channel 0 and would
        # ignore our first class: locate foreground on the union of the channels instead.
        CopyItemsd(keys=label_key, names=union),
        Lambdad(keys=union, func=_union_of_channels),
        FgBgToIndicesd(keys=union),
        DeleteItemsd(keys=union),
        RandCropByPosNegLabeld(keys=keys, label_key=label_key, spatial_size=patch, pos=pos, neg=neg,
                               num_samples=patches_per_volume, fg_indices_key=f"{union}_fg_indices",
                               bg_indices_key=f"{union}_bg_indices"),
    ]
    if augment:
        steps += [RandFlipd(keys=keys, prob=0.1, spatial_axis=axis) for axis in range(3)]
        if patch[0] == patch[1]:
            steps.append(RandRotate90d(keys=keys, prob=0.1, max_k=3, spatial_axes=(0, 1)))
        steps += [
            RandScaleIntensityd(keys=image_key, factors=0.1, prob=0.1),
            RandShiftIntensityd(keys=image_key, offsets=0.1, prob=0.5),
        ]
    return Compose(steps)


def _union_of_channels(label: torch.Tensor) -> torch.Tensor:
    """``(C, X, Y, Z)`` masks -> ``(1, X, Y, Z)``: voxels inside any structure."""
    return label.amax(dim=0, keepdim=True)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one (run seed, epoch, item position) triple."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class EpochPatchDataset(torch.utils.data.Dataset):
    """Volumes -> random training patches, reproducible given (seed, epoch, position).

    `volumes[j]` returns a volume dict (it may read a cache file: nothing is kept here).
    An epoch has `length` positions (default: one per volume); `__getitem__(i)` returns the
    list of patch dicts of the volume at position i (collate with
    `monai.data.list_data_collate`). With `groups` (the source dataset of each volume), each
    epoch draws its volumes with replacement such that every group is equally likely
    (dataset-balanced sampling); otherwise position i is volume ``i % len(volumes)``. Call
    `set_epoch` before each epoch, as for `DistributedSampler`, which shuffles the positions.
    """

    def __init__(self, volumes: Sequence[Any], transform: Callable, seed: int = 0,
                 groups: Sequence[int] | None = None, length: int | None = None) -> None:
        if groups is not None and len(groups) != len(volumes):
            raise ConfigError(f"{len(groups)} group ids for {len(volumes)} volumes")
        if len(volumes) == 0:
            raise ConfigError("no volumes to sample patches from")
        self.volumes = volumes
        self.transform = transform
        self.seed = int(seed)
        self.groups = None if groups is None else np.asarray(groups)
        self.length = len(volumes) if length is None else int(length)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        n = len(self.volumes)
        if self.groups is None:
            self.order = np.arange(self.length) % n
            return
        # weight 1 / (size of its group): each group draws the same expected number of volumes
        _, inverse, counts = np.unique(self.groups, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        rng = np.random.default_rng(item_seed(self.seed, self.epoch, 0xFFFFFFFF))
        self.order = rng.choice(n, size=self.length, replace=True, p=weights / weights.sum())

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        volume = self.volumes[int(self.order[index])]
        self.transform.set_random_state(seed=item_seed(self.seed, self.epoch, index))
        patches = self.transform(volume)
        return patches if isinstance(patches, list) else [patches]
