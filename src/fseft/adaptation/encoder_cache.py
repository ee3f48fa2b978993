"""Encoder-output cache: train a decoder without running the frozen encoder at every step.

A network method whose trainable parameters all lie after a split point of the architecture
(`SegmentationModel.split_points`: e.g. ``decoder``, whose encoder and skip blocks are frozen,
or ``ft-last``, which trains the last decoder block) computes the same encoder outputs for a
patch at every epoch. `split_point_for` finds the deepest such point; `EncoderCache` runs the
frozen prefix (``model.encode(patch, point)``) once per distinct training patch and stores its
multi-scale outputs as float16 ``.npy`` files read back through memory maps; training then runs
``model.decode`` and the head only (`fseft.adaptation.network_runner.train_network`).

Patches come from a fixed pool per support volume (`PatchPool`): the first
``pool_epochs`` epochs of the very patch draws the through-network training would make
(`fseft.training.sampling.EpochPatchDataset`, same transform and seed), deduplicated by content.
A volume that fits in one patch (the phantoms at 3 mm in a 64^3 window) has one distinct
patch, so training on the cache is exactly the through-network training (up to float16
storage); a larger volume trains on its pool of windows instead of fresh windows every epoch.

Layout under the cache root (the feature cache's: ``--cache-dir``)::

    encoder-v1/<model fingerprint>/<point>/float16/<patch key>/meta.json
                                                               /<tensor name>.npy   (C, x, y, z)

The patch key hashes the image patch's bytes and shape, so the same patch is shared by every
seed, k and method that splits at the same point. Entries are written into a temporary folder
renamed into place when complete (nothing half-written on a full disk or Ctrl-C).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fseft.inference.feature_cache import CacheError, staged_entry
from fseft.methods.peft_methods import unwrap
from fseft.training.sampling import plain_tensor
from fseft.utils import default_cache_dir

CACHE_FORMAT = "encoder-v1"


def split_point_for(model: nn.Module) -> str | None:
    """The deepest split point of `model`'s architecture after which every trainable parameter
    lies (the head counts as after every point), or None: train through the network.

    `model`: a prepared network (`apply_method`), possibly a peft model around the
    `SegmentationModel`; any trainable parameter outside the architecture's top-level modules
    (a LoRA or AdaptFormer layer inside the encoder) gives None.
    """

    base = unwrap(model)
    points = getattr(base, "split_points", {}) or {}
    if not points or base is not model:
        return None
    trainable = {name.split(".")[0] for name, p in base.named_parameters() if p.requires_grad}
    trainable.discard("head")
    if not trainable:
        return None  # a head alone trains on the black-box feature cache (lp), not here
    fitting = [(len(after), point) for point, after in points.items() if trainable <= set(after)]
    return min(fitting)[1] if fitting else None


def patch_key(image: torch.Tensor) -> str:
    """The cache key of an image patch: a hash of its float32 values and shape."""
    array = np.ascontiguousarray(image.detach().cpu().numpy().astype(np.float32))
    digest = hashlib.sha256(f"{array.shape}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:32]


class EncoderCache:
    """The frozen prefix's outputs at `point` for image patches, computed once per patch.

    Args:
        model: the prepared model (its frozen prefix is the base model's, unchanged).
        point: a key of ``model.split_points`` (`split_point_for`).
        fingerprint: the base model's weights fingerprint (`model_fingerprint`).
        root: cache folder; default `fseft.utils.default_cache_dir()`.
        device: where the prefix runs.
        dtype: storage type, float16 (half the disk; on the phantom model's decoder, gradients
            within 3.5 % of the float32 ones, 0.3 % for the median tensor) or float32 (exact).
    """

    def __init__(self, model: nn.Module, point: str, fingerprint: str, root: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", dtype: Any = np.float16) -> None:

        self.model = unwrap(model)
        if point not in self.model.split_points:
            raise ValueError(f"{self.model.arch}: no split point {point!r}")
        self.point = point
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float16, np.float32):
            raise ValueError(f"encoder cache dtype must be float16 or float32, got {self.dtype}")
        self.dir = self.root / CACHE_FORMAT / fingerprint[:24] / point / self.dtype.name
        self.device = torch.device(device)
        self.hits = 0
        self.misses = 0

    def _read(self, entry: Path) -> dict[str, np.ndarray] | None:
        try:
            meta = json.loads((entry / "meta.json").read_text())
            tensors = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in meta["tensors"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if any(list(t.shape) != meta["tensors"][n] or t.dtype != self.dtype for n, t in tensors.items()):
            return None
        return tensors

    @torch.no_grad()
    def _write(self, image: torch.Tensor, entry: Path) -> None:
        was_training = self.model.training
        self.model.eval()  # frozen prefix: no dropout, fused attention; its norms have no running stats to move
        try:
            outputs = self.model.encode(image[None].float().to(self.device), self.point)
        finally:
            self.model.train(was_training)
        meta: dict[str, Any] = {"point": self.point, "tensors": {}}
        with staged_entry(entry, meta) as tmp:
            for name, tensor in outputs.items():
                array = tensor[0].float().cpu().numpy().astype(self.dtype)
                np.save(tmp / f"{name}.npy", array)
                meta["tensors"][name] = list(array.shape)

    def get(self, image: torch.Tensor, key: str | None = None) -> dict[str, np.ndarray]:
        """The prefix outputs ``{name: (C, x, y, z) memmap}`` of an image patch
        ``(1, X, Y, Z)``, computed and stored on the first call. `key`: the patch's
        `patch_key`, when the caller already has it."""
        entry = self.dir / (key or patch_key(image))
        tensors = self._read(entry)
        if tensors is None:
            self.misses += 1
            self._write(image, entry)
            tensors = self._read(entry)
            if tensors is None:
                raise CacheError(f"encoder cache entry {entry} could not be read back after writing it")
        else:
            self.hits += 1
        return tensors

    def size_bytes(self) -> int:
        """Bytes on disk of this model's entries at this point."""
        return sum(p.stat().st_size for p in self.dir.rglob("*.npy")) if self.dir.exists() else 0


class PatchPool:
    """Per support volume, the distinct training patches of the first `pool_epochs` epochs of
    `patches` (an `EpochPatchDataset`), with their cached prefix outputs.

    ``pool[v]`` is a list of ``{"cached": {name: memmap}, "label": (S, x, y, z) tensor}``.
    `draw(v, n, rng)` picks `n` of volume `v`'s patches (with replacement, uniformly).
    """

    def __init__(self, patches: Any, cache: EncoderCache, pool_epochs: int, progress: bool = False) -> None:
        self.pool: list[list[dict[str, Any]]] = [[] for _ in range(len(patches.volumes))]
        seen: list[set[str]] = [set() for _ in self.pool]
        for epoch in tqdm(range(pool_epochs), desc=f"encoder cache ({cache.point})", unit="epoch",
                          disable=not progress):
            patches.set_epoch(epoch)
            for position in range(len(patches)):
                volume = int(patches.order[position])
                for item in patches[position]:
                    image = plain_tensor(item["image"])
                    key = patch_key(image)
                    if key in seen[volume]:
                        continue
                    seen[volume].add(key)
                    self.pool[volume].append({"cached": cache.get(image, key), "label": plain_tensor(item["label"])})
        patches.set_epoch(0)

    def draw(self, volume: int, n: int, rng: np.random.RandomState) -> list[dict[str, Any]]:
        candidates = self.pool[volume]
        picks = rng.randint(len(candidates), size=n)
        if len(set(picks.tolist())) == 1:
            picks = picks[:1]  # n copies of one patch: the same mean loss from one pass
        return [candidates[int(i)] for i in picks]

    @staticmethod
    def batch(items: Sequence[Mapping[str, Any]], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Stacked prefix outputs ``{name: (N, C, x, y, z) float32}`` and labels ``(N, S, ...)``."""
        names = items[0]["cached"].keys()
        cached = {n: torch.from_numpy(np.stack([np.asarray(it["cached"][n]) for it in items])).float().to(device)
                  for n in names}
        labels = torch.stack([it["label"] for it in items]).to(device)
        return cached, labels
