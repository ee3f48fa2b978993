"""Each assembly volume preprocessed once into the run's ``cache/`` (ranks share the work), read
back as `CachedVolumes` with its annotation vector."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fseft.data.datasets import Case
from fseft.data.inspection import voxel_counts
from fseft.data.preprocessing import PreprocessConfig
from fseft.data.preprocessing import preprocess as run_preprocess
from fseft.errors import ConfigError, FseftError, InputFileError
from fseft.pretraining.assembly import AssemblySource
from fseft.training.distributed import DistributedContext, barrier
from fseft.utils import atomic_path

_CACHE_VERSION = 1
_SOFT_LABEL_STEPS = 255  # cached label fractions: uint8 steps of 1/255

@dataclass(frozen=True)
class CachedVolume:
    path: Path  # .npz with "image" (1, X, Y, Z) float32 and "label" (S, X, Y, Z) uint8
    channels: tuple[int, ...]  # catalogue index of each label channel
    group: int  # source dataset index


class CachedVolumes(Sequence):
    """Preprocessed volumes read from the run's cache: item j is ``{"image": (1, X, Y, Z)
    float32, "label": (C, X, Y, Z) uint8 in catalogue order (0 where not annotated),
    "annotated": (C,) bool}``. With `soft_labels` the cache holds fractions as uint8 steps of
    1/255 and "label" is float32 in [0, 1]."""

    def __init__(self, volumes: Sequence[CachedVolume], num_classes: int, soft_labels: bool = False) -> None:
        self.volumes = list(volumes)
        self.num_classes = num_classes
        self.soft_labels = soft_labels

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        vol = self.volumes[index]
        with np.load(vol.path) as data:
            image, label = data["image"], data["label"]
        full = np.zeros((self.num_classes, *label.shape[1:]), dtype=np.uint8)
        full[list(vol.channels)] = label
        annotated = torch.zeros(self.num_classes, dtype=torch.bool)
        annotated[list(vol.channels)] = True
        target = torch.from_numpy(full)
        if self.soft_labels:
            target = target.float() / _SOFT_LABEL_STEPS
        return {"image": torch.from_numpy(image), "label": target, "annotated": annotated}


def _cache_key(case: Case, structures: Sequence[str], preprocess: PreprocessConfig, soft_labels: bool = False) -> str:
    files = [str(case.image)] + [str(p) for p in case.label_paths()]
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    parts = [_CACHE_VERSION, stats, list(structures), sorted(case.label_map.items()), preprocess.to_dict()]
    if soft_labels:  # appended only when set, so existing caches keep their keys
        parts.append("soft_labels")
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def check_label_values(sources: list[AssemblySource], cache_dir: Path, progress: bool) -> None:
    # voxel_counts raises InputFileError for a label value absent from the label map (cached).

    for source in sources:
        voxel_counts(source.dataset, source.structures, cache_dir=cache_dir, progress=progress)


def prepare_cache(sources: list[AssemblySource], catalogue: Sequence[str], preprocess: PreprocessConfig, cache_dir: Path,
                  ctx: DistributedContext, progress: bool = True, soft_labels: bool = False) -> CachedVolumes:
    """Preprocess every labelled case once into ``cache_dir`` (ranks share the work) and return
    the cached volumes. A cache file is reused while its inputs (files, sizes, mtimes),
    structures, preprocessing config and `soft_labels` are unchanged."""

    index = {c: i for i, c in enumerate(catalogue)}
    jobs: list[tuple[Any, tuple[str, ...], Path]] = []
    volumes: list[CachedVolume] = []
    for group, source in enumerate(sources):
        for case in source.dataset.cases:
            path = cache_dir / f"{_cache_key(case, source.structures, preprocess, soft_labels)}.npz"
            volumes.append(CachedVolume(path, tuple(index[s] for s in source.structures), group))
            jobs.append((case, source.structures, path))
    mine = [job for i, job in enumerate(jobs) if i % ctx.world_size == ctx.rank and not job[2].exists()]
    error = None
    try:
        for case, structures, path in tqdm(mine, desc="preprocess", unit="case", disable=not (progress and ctx.is_main)):
            image, labels = case.load(structures)
            prepared = run_preprocess(image, labels, preprocess, soft_labels=soft_labels)
            label = prepared.label.as_tensor().numpy()
            if soft_labels:
                label = np.rint(label * _SOFT_LABEL_STEPS)
            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, image=prepared.image.as_tensor().numpy().astype(np.float32), label=label.astype(np.uint8))
    except FseftError as exc:
        error = (type(exc).__name__, str(exc))
    errors = [error]
    if ctx.is_distributed:
        errors = [None] * ctx.world_size
        torch.distributed.all_gather_object(errors, error)
    for err in errors:
        if err is not None:
            raise (InputFileError if err[0] == "InputFileError" else ConfigError)(err[1])
    barrier(ctx)
    return CachedVolumes(volumes, len(catalogue), soft_labels)


