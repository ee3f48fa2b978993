"""Training patches: positive/negative-balanced random crops and augmentation (MONAI dict
transforms), reproducible per (seed, epoch, item) so that a resumed or distributed run draws
the very same patches as an uninterrupted single-process one.

A volume item is a dict ``{"image": (1, X, Y, Z) float in [0, 1], "label": (C, X, Y, Z) uint8,
...}`` in model space (see `fseft.data.preprocessing`); other keys (e.g. ``annotated``) are
copied to every patch. Feature methods train on patches of cached feature volumes instead
(`FeatureVolume`, `sample_patch_slices`, `feature_patch_batch`): windows drawn as MONAI draws
them, read from the memory-mapped cache patch by patch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
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
    SpatialCrop,
    SpatialPadd,
)
from monai.transforms.utils import generate_pos_neg_label_crop_centers, map_binary_to_indices
from scipy.optimize import linprog

from fseft.errors import ConfigError
from fseft.training.class_crop import ClassBalancedCropd


def plain_tensor(x: Any) -> torch.Tensor:
    """A MONAI `MetaTensor` (or array) as a plain tensor: patches stack and train without
    carrying their metadata."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def patch_transforms(
    patch_size: Sequence[int],
    patches_per_volume: int,
    pos: float = 1.0,
    neg: float = 1.0,
    augment: bool = True,
    keys: Sequence[str] = ("image", "label"),
    label_key: str = "label",
    image_key: str = "image",
    sampling: str = "foreground",
    flip_axes: Sequence[int] = (0, 1, 2),
    rotate90: bool = True,
) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """A MONAI `Compose` turning one volume dict into `patches_per_volume` patch dicts.

    Pads volumes smaller than `patch_size`, then crops. `sampling`:

    - ``foreground``: `RandCropByPosNegLabeld`; a patch is centred on a voxel of any annotated
      structure with probability pos / (pos + neg), else on background. Large organs (the
      liver) own most foreground voxels, so they own most patches.
    - ``classes``: `RandCropByLabelClassesd`, nnU-Net-style class-balanced sampling; with
      probability pos / (pos + neg) a patch is centred on a structure chosen uniformly among
      those present in the volume (a small organ as often as the liver), else on background.

    With `augment`, the Swin-UNETR BTCV recipe: flips along each of `flip_axes` (p=0.1),
    90-degree rotations in the first two axes' plane (p=0.1, with `rotate90`; only when the
    patch is square in that plane), intensity scaling (+-10 %, p=0.1) and shifts (+-0.1,
    p=0.5). In RAS model space axis 0 is left-right: a flip along it (or a rotation) puts the
    left kidney where the right one was without swapping their labels.
    Output patches: image ``(1, *patch_size)``, label ``(C, *patch_size)``.
    """

    patch = tuple(int(s) for s in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ConfigError(f"patch_size must be 3 positive integers, got {tuple(patch_size)}")
    if patches_per_volume < 1:
        raise ConfigError(f"patches_per_volume must be >= 1, got {patches_per_volume}")
    if pos < 0 or neg < 0 or pos + neg == 0:
        raise ConfigError(f"pos and neg sampling ratios must be >= 0 and not both 0, got {pos}, {neg}")
    flip_axes = check_sampling_options(sampling, flip_axes)
    keys = list(keys)
    steps: list[Any] = [SpatialPadd(keys=keys, spatial_size=patch)]
    if sampling == "foreground":
        union = f"{label_key}_union"
        steps += [
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
    else:
        classes = f"{label_key}_classes"
        steps += [
            # channel 0 = background, then one channel per structure: MONAI drops the ratio of a
            # class absent from the volume (an unannotated one), so each present one is as likely
            CopyItemsd(keys=label_key, names=classes),
            Lambdad(keys=classes, func=_with_background_channel),
            ClassBalancedCropd(keys, classes, patch, pos, neg, patches_per_volume),
            DeleteItemsd(keys=classes),
        ]
    if augment:
        steps += [RandFlipd(keys=keys, prob=0.1, spatial_axis=axis) for axis in flip_axes]
        if rotate90 and patch[0] == patch[1]:
            steps.append(RandRotate90d(keys=keys, prob=0.1, max_k=3, spatial_axes=(0, 1)))
        steps += [
            RandScaleIntensityd(keys=image_key, factors=0.1, prob=0.1),
            RandShiftIntensityd(keys=image_key, offsets=0.1, prob=0.5),
        ]
    return Compose(steps)


SAMPLING_MODES = ("foreground", "classes")


def check_sampling_options(sampling: str, flip_axes: Any) -> tuple[int, ...]:
    """Check `patch_transforms`' ``sampling`` and ``flip_axes`` (importable without MONAI, so
    configs are checked before it loads); returns the axes as a tuple."""
    if sampling not in SAMPLING_MODES:
        raise ConfigError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")
    axes = list(flip_axes) if isinstance(flip_axes, (list, tuple)) else [flip_axes]
    if any(isinstance(a, bool) or a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ConfigError(f"flip_axes must list distinct axes among 0, 1, 2, got {flip_axes!r}")
    return tuple(int(a) for a in axes)


def _with_background_channel(label: torch.Tensor) -> torch.Tensor:
    """``(C, X, Y, Z)`` masks -> ``(1 + C, X, Y, Z)``, channel 0 the voxels outside every structure."""
    return torch.cat([1 - label.amax(dim=0, keepdim=True), label], dim=0)


def _union_of_channels(label: torch.Tensor) -> torch.Tensor:
    """``(C, X, Y, Z)`` masks -> ``(1, X, Y, Z)``: voxels inside any structure."""
    return label.amax(dim=0, keepdim=True)


def class_balanced_group_weights(annotates: np.ndarray, sizes: Sequence[int] | None = None) -> np.ndarray:
    """Dataset-drawing probabilities that maximise the share of steps of the least-covered class.

    annotates: ``(G, C)`` bool, True where dataset g annotates class c (every class by at least
    one dataset). In a partial-label assembly a class annotated by one dataset of three gets a
    third of the steps under dataset-balanced sampling; this linear programme (max t subject to
    ``annotates.T @ p >= t``, p a distribution) raises it as far as the other classes allow.
    sizes: ``(G,)`` volumes per dataset. Datasets that annotate the same classes share their
    total in proportion to `sizes` (each of their volumes equally likely, as if they were one
    dataset), or evenly without `sizes`; the programme alone may give one of them all of it.
    Returns ``(G,)`` probabilities; ties are broken towards uniform.
    """

    a = np.asarray(annotates, dtype=np.float64)
    groups, classes = a.shape
    if groups == 0 or not a.any(axis=0).all():
        raise ConfigError("every class must be annotated by at least one dataset to balance classes")
    # variables (p_1..p_G, t): minimise -t; t - sum_g p_g a[g, c] <= 0; sum p = 1
    a_ub = np.hstack([-a.T, np.ones((classes, 1))])
    best = linprog(np.r_[np.zeros(groups), -1.0], A_ub=a_ub, b_ub=np.zeros(classes),
                   A_eq=np.r_[np.ones(groups), 0.0][None], b_eq=[1.0], bounds=[(0, 1)] * groups + [(0, 1)])
    t = float(best.x[-1])
    # among the optimal distributions, the one closest to uniform (second programme on |p - 1/G|)
    u = np.full(groups, 1.0 / groups)
    c = np.r_[np.zeros(groups), np.ones(groups)]  # variables (p, d), d >= |p - u|
    a_ub = np.vstack([np.hstack([-a.T, np.zeros((classes, groups))]),
                      np.hstack([np.eye(groups), -np.eye(groups)]),
                      np.hstack([-np.eye(groups), -np.eye(groups)])])
    b_ub = np.r_[np.full(classes, -t + 1e-9), u, -u]
    near = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=np.r_[np.ones(groups), np.zeros(groups)][None], b_eq=[1.0],
                   bounds=[(0, 1)] * (2 * groups))
    p = np.clip(near.x[:groups] if near.success else best.x[:groups], 0, None)
    # identical rows give every class the same share whatever the split: split it by size
    size = np.ones(groups) if sizes is None else np.asarray(sizes, dtype=np.float64)
    if size.shape != (groups,) or (size <= 0).any():
        raise ConfigError(f"sizes must be {groups} positive volume counts, got {sizes!r}")
    _, same = np.unique(a, axis=0, return_inverse=True)
    same = same.reshape(-1)
    p = np.bincount(same, weights=p)[same] * size / np.bincount(same, weights=size)[same]
    return p / p.sum()


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one (run seed, epoch, item position) triple."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class EpochPatchDataset(torch.utils.data.Dataset):
    """Volumes -> random training patches, reproducible given (seed, epoch, position).

    `volumes[j]` returns a volume dict (it may read a cache file: nothing is kept here).
    An epoch has `length` positions (default: one per volume); `__getitem__(i)` returns the
    list of patch dicts of the volume at position i (collate with
    `monai.data.list_data_collate`). With `groups` (the source dataset of each volume, 0..G-1),
    each epoch draws its volumes with replacement such that group g is drawn with probability
    ``group_weights[g]`` (default: every group equally likely, dataset-balanced sampling);
    otherwise position i is volume ``i % len(volumes)``. Call `set_epoch` before each epoch, as
    for `DistributedSampler`, which shuffles the positions.
    """

    def __init__(self, volumes: Sequence[Any], transform: Callable, seed: int = 0,
                 groups: Sequence[int] | None = None, length: int | None = None,
                 group_weights: Sequence[float] | None = None) -> None:
        if groups is not None and len(groups) != len(volumes):
            raise ConfigError(f"{len(groups)} group ids for {len(volumes)} volumes")
        if group_weights is not None and (groups is None or len(group_weights) <= max(groups)
                                          or min(group_weights) < 0 or sum(group_weights) <= 0):
            raise ConfigError(f"group_weights {list(group_weights)} must give every group a weight >= 0, not all 0")
        if len(volumes) == 0:
            raise ConfigError("no volumes to sample patches from")
        self.volumes = volumes
        self.transform = transform
        self.seed = int(seed)
        self.groups = None if groups is None else np.asarray(groups)
        self.group_weights = None if group_weights is None else np.asarray(group_weights, dtype=np.float64)
        self.length = len(volumes) if length is None else int(length)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        n = len(self.volumes)
        if self.groups is None:
            self.order = np.arange(self.length) % n
            return
        # weight (group's weight) / (size of its group): each group draws its share of volumes
        labels, inverse, counts = np.unique(self.groups, return_inverse=True, return_counts=True)
        share = np.ones(len(labels)) if self.group_weights is None else self.group_weights[labels]
        weights = share[inverse] / counts[inverse]
        rng = np.random.default_rng(item_seed(self.seed, self.epoch, 0xFFFFFFFF))
        self.order = rng.choice(n, size=self.length, replace=True, p=weights / weights.sum())

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        volume = self.volumes[int(self.order[index])]
        self.transform.set_random_state(seed=item_seed(self.seed, self.epoch, index))
        patches = self.transform(volume)
        return patches if isinstance(patches, list) else [patches]


# ---------------------------------------------------------------------------- cached features


@dataclass
class FeatureVolume:
    """A support volume of cached features: ``features (C, X, Y, Z)`` float16 (a memmap, read
    patch by patch), ``labels (S, X, Y, Z)`` uint8, and the flat indices of its foreground
    (any structure) and background voxels."""

    features: np.ndarray
    labels: np.ndarray
    fg: np.ndarray
    bg: np.ndarray


def feature_volume(features: np.ndarray, labels: np.ndarray) -> FeatureVolume:
    fg, bg = map_binary_to_indices(labels.any(axis=0)[None])
    return FeatureVolume(features, np.ascontiguousarray(labels), np.asarray(fg), np.asarray(bg))


def sample_patch_slices(
    label_shape: Sequence[int],
    fg_indices: np.ndarray,
    bg_indices: np.ndarray,
    patch_size: Sequence[int],
    num: int,
    pos_ratio: float,
    rng: np.random.RandomState,
) -> list[tuple[slice, slice, slice]]:
    """Crop windows of a volume, centred on foreground with probability `pos_ratio`.

    The centres are MONAI's (`generate_pos_neg_label_crop_centers`, as
    `RandCropByPosNegLabeld` draws them) and the windows its `SpatialCrop` slices; windows are
    returned rather than crops so that a memory-mapped feature volume is read patch by patch
    (`patch_transforms` crops in-memory arrays, which would read the whole feature volume for
    every draw). A patch is smaller than `patch_size` along an axis where the volume is.
    """

    size = [min(int(p), int(s)) for p, s in zip(patch_size, label_shape)]
    centers = generate_pos_neg_label_crop_centers(
        size, num, pos_ratio, list(label_shape), fg_indices, bg_indices, rng, allow_smaller=True
    )
    return [tuple(SpatialCrop(roi_center=[int(c) for c in center], roi_size=size).slices) for center in centers]


def feature_patch_batch(
    volume: FeatureVolume,
    windows: Sequence[tuple[slice, slice, slice]],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, C, *patch)`` of `dtype` in ``channels_last_3d`` layout (the cache's own,
    and the fast one for CPU 3D convolutions) and labels ``(N, S, *patch)`` of the windows.

    Under bf16 autocast, pass ``dtype=torch.bfloat16``: the adapter's residual sum and head then
    stay in bf16 instead of mixing precisions (measured on 2 CPU cores, a 48-channel
    spatial-adapter step on six 96^3 patches: 6.2 s instead of 10.2 s)."""
    size = tuple(s.stop - s.start for s in windows[0])
    feats = torch.empty(
        (len(windows), volume.features.shape[0], *size), dtype=dtype, memory_format=torch.channels_last_3d
    )
    for n, w in enumerate(windows):
        # (C, x, y, z) view of channels-last storage: copying keeps the layout, then one cast
        feats[n].copy_(torch.from_numpy(np.array(volume.features[(slice(None), *w)])))
    labels = np.stack([volume.labels[(slice(None), *w)] for w in windows])
    return feats.to(device), torch.from_numpy(labels).to(device)
