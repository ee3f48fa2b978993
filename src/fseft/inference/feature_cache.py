"""Frozen-feature cache: each volume's features computed once, reused by every adaptation run.

Black-box adapters never change the base model, so its features ``Z = model.features(x)`` of
a volume are the same across epochs, methods, seeds and values of k. `FeatureCache` computes
them once per volume (preprocess -> sliding-window `model.features` over the whole volume),
stores them as a float16 ``.npy`` file that training reads through a memory map, together with
the preprocessed labels, and hands them back on every later run.

Layout under the cache root (``--cache-dir``, default ``$FSEFT_CACHE_DIR`` or ``~/.cache/fseft``)::

    features-v2/<model fingerprint>/<entry key>/meta.json
                                               /features.npy        (X', Y', Z', C) float16
                                               /label-<key>.npy     (X', Y', Z') uint8, one per structure

Features are stored channels-last: a training patch is then a run of contiguous reads, and it
lands directly in PyTorch's ``channels_last_3d`` layout, where CPU 3D convolutions are up to
10x faster. `CachedCase.features` is the ``(C, X', Y', Z')`` view of that file (no copy).

The entry key hashes everything the features depend on: the model weights (a fingerprint of
its state dict), the volume file (resolved path, size, modification time), the preprocessing
config and the sliding-window settings (roi, overlap, blending). Anything changed gives a new
key, so features are never reused wrongly; `meta.json` repeats the key material and is checked
on every load (a mismatching or unreadable entry is rebuilt). Entries are written into a
temporary folder renamed into place when complete, so a full disk or Ctrl-C leaves nothing
half-written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fseft.data.datasets import Case
from fseft.data.io import read_image
from fseft.data.preprocessing import PreprocessConfig, preprocess
from fseft.errors import FseftError
from fseft.inference.sliding_window import InferenceConfig, sliding_window_map
from fseft.utils import apply_default_permissions, atomic_path, default_cache_dir, reserve_disk_space

logger = logging.getLogger(__name__)

CACHE_FORMAT = "features-v2"


class CacheError(FseftError):
    """The feature cache cannot be written or read (full disk, permissions, stale entry)."""


# ---------------------------------------------------------------------------- keys


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, shapes, dtypes and values).

    Identifies the weights whatever file or zoo id they came from, so two checkpoints with the
    same weights share cache entries and any change of weights gets new ones.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Resolved path, size and modification time of a file, or of every file in a folder
    (a DICOM series)."""
    path = Path(path).resolve()
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            stats = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
            return {"path": str(path), "files": stats}
        st = path.stat()
    except OSError as exc:
        raise FseftError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---------------------------------------------------------------------------- features


def compute_features(model: torch.nn.Module, image: torch.Tensor, cfg: InferenceConfig | None = None) -> torch.Tensor:
    """Sliding-window ``model.features`` over a whole preprocessed volume.

    `image`: ``(1, 1, X, Y, Z)`` on the CPU; `cfg`: an `InferenceConfig` (roi, overlap, blend,
    bf16, device). Returns ``(1, C, X, Y, Z)``
    float32 on the CPU, windows blended by MONAI's `sliding_window_inference` exactly as
    `predict_probabilities` blends logits; the head being a 1x1x1 convolution,
    ``head(features)`` equals the blended logits.
    """

    return sliding_window_map(model, image, cfg, model.features)


# ---------------------------------------------------------------------------- the cache


@dataclass
class CachedCase:
    """A volume's cached entry: `features` ``(C, X', Y', Z')`` float16 (read-only memory map,
    a transposed view of the channels-last file), `labels` ``(S, X', Y', Z')`` uint8 for the
    requested structures (None when none were)."""

    case_id: str
    features: np.ndarray
    labels: np.ndarray | None
    path: Path

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.features.shape[1:])  # type: ignore[return-value]


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _write_error(path: Path, exc: OSError) -> CacheError:
    why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return CacheError(
        f"cannot write the feature cache at {path}: {why}; nothing was left half-written. "
        "Free some space or choose another --cache-dir (or $FSEFT_CACHE_DIR)."
    )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _host() -> str:
    """This machine's name as a staging folder carries it (no dots, which separate the parts)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def remove_orphaned_staging(entry: Path, max_age_s: float = 24 * 3600) -> list[Path]:
    """Remove the temporary folders of `entry` that a killed process left behind.

    `staged_entry` names its folder ``.<entry>.<pid>-<host>.<random>.tmp``; a process killed
    past its clean-up (SIGKILL, the OOM killer, a power cut) leaves it. A folder of this host
    whose process is gone is removed; one of another host (a cache on a filesystem that cluster
    nodes share: that pid means nothing here) or without a pid in its name (older fseft) once
    it is `max_age_s` old. Returns the folders removed.
    """

    removed = []
    here = _host()
    for tmp in entry.parent.glob(f".{entry.name}.*.tmp"):
        pid, _, host = tmp.name[len(entry.name) + 2:].split(".", 1)[0].partition("-")
        try:
            mine = pid.isdigit() and host in ("", here)  # no host: written before hosts were named
            orphan = not _process_alive(int(pid)) if mine else time.time() - tmp.stat().st_mtime > max_age_s
        except OSError:
            continue
        if orphan:
            _remove_tree(tmp)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def staged_entry(entry: Path, meta: dict[str, Any]) -> Iterator[Path]:
    """A temporary folder beside `entry` to write a cache entry's files into.

    On leaving the block, `meta` (which the block may still fill) is written as ``meta.json``
    and the folder renamed to `entry`, replacing a stale one; if another process finished the
    same entry first, theirs is kept. Any `OSError` (a full disk) becomes a `CacheError`, and
    the temporary folder is removed whatever happens: nothing is left half-written.
    """
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        remove_orphaned_staging(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.{os.getpid()}-{_host()}.", suffix=".tmp", dir=entry.parent))
        yield tmp
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        apply_default_permissions(tmp)
        if entry.exists():  # stale or unreadable: replace it
            _remove_tree(entry)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").exists():
                raise
            # Another process finished the same entry first: theirs is as good as ours.
    except OSError as exc:
        raise _write_error(entry.parent, exc) from exc
    finally:
        if tmp is not None:
            _remove_tree(tmp)


class FeatureCache:
    """Frozen features and preprocessed labels of volumes, computed once per (model,
    volume, preprocessing, window settings).

    Args:
        model: the frozen base model (`SegmentationModel`: `features`, `feature_channels`).
        preprocess: the `PreprocessConfig` that brings scans into the model's space.
        root: cache folder; default `fseft.utils.default_cache_dir()`.
        inference: `InferenceConfig` of the sliding window: roi, overlap, blend are part of
            the key; device, bf16, sw_batch_size, progress only say how features are computed.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: PreprocessConfig,
        root: str | os.PathLike | None = None,
        inference: InferenceConfig | None = None,
    ) -> None:

        self.model = model
        self.preprocess_config = preprocess
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.inference = (inference or InferenceConfig()).for_model(model)
        self.model_key = model_fingerprint(model)
        self.model_dir = self.root / CACHE_FORMAT / self.model_key[:24]
        self.hits = 0
        self.misses = 0

    # -- keys

    def key_material(self, image_path: str | os.PathLike) -> dict[str, Any]:
        """Everything a volume's features depend on (stored in `meta.json`)."""
        return {
            "format": CACHE_FORMAT,
            "model": self.model_key,
            "volume": file_identity(image_path),
            "preprocess": self.preprocess_config.to_dict(),
            "roi_size": list(self.inference.roi_size),
            "overlap": float(self.inference.overlap),
            "blend": self.inference.blend,
        }

    def entry_dir(self, image_path: str | os.PathLike) -> Path:
        return self.model_dir / _sha256(self.key_material(image_path))[:32]

    @staticmethod
    def _label_file(case: Any, structure: str) -> str:
        source = {
            "structure": structure,
            "files": [file_identity(p) for p in case.label_paths()],
            "label_map": {str(k): v for k, v in dict(case.label_map).items()},
        }
        return f"label-{_sha256(source)[:24]}.npy"

    # -- reading

    def _read_entry(self, entry: Path, material: Mapping[str, Any]) -> np.ndarray | None:
        """The entry's features memory map, or None (with the reason logged) if unusable."""
        meta_path = entry / "meta.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != json.loads(json.dumps(material, default=str)):
                logger.warning("feature cache entry %s was written for other inputs; recomputing", entry)
                return None
            stored = np.load(entry / "features.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:
            logger.warning("feature cache entry %s is unreadable (%s); recomputing", entry, exc)
            return None
        if stored.dtype != np.float16 or stored.ndim != 4 or list(stored.shape) != meta.get("shape"):
            logger.warning("feature cache entry %s has a wrong shape or dtype; recomputing", entry)
            return None
        return stored.transpose(3, 0, 1, 2)  # (X, Y, Z, C) file -> (C, X, Y, Z) view

    def _read_labels(self, entry: Path, names: Sequence[str], shape: tuple[int, ...]) -> np.ndarray | None:
        arrays = []
        for name in names:
            try:
                arr = np.load(entry / name, mmap_mode="r")
            except (OSError, ValueError):
                return None
            if arr.shape != shape or arr.dtype != np.uint8:
                return None
            arrays.append(arr)
        return np.stack(arrays) if arrays else None

    # -- writing

    def _build_entry(self, case: Any, structures: Sequence[str], material: Mapping[str, Any], entry: Path) -> None:
        if structures:
            image, labels = case.load(structures)
        else:
            image, labels = read_image(case.image), None
        pre = preprocess(image, labels, self.preprocess_config)
        feats = compute_features(self.model, pre.image[None], self.inference)[0]
        shape = (*feats.shape[1:], feats.shape[0])  # channels last
        with staged_entry(entry, {"key": material, "shape": list(shape), "case_id": case.case_id}) as tmp:
            out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float16, shape=shape)
            reserve_disk_space(tmp / "features.npy", out.offset, out.nbytes)  # ENOSPC now, not SIGBUS later
            for x in range(feats.shape[1]):  # one sagittal slice at a time: no second full-size copy
                out[x] = feats[:, x].permute(1, 2, 0).numpy()
            out.flush()
            del out
            for s, name in enumerate(structures):
                np.save(tmp / self._label_file(case, name), pre.label[s].as_tensor().numpy().astype(np.uint8))

    def _add_labels(self, case: Any, structures: Sequence[str], entry: Path, shape: tuple[int, ...]) -> None:
        image, labels = case.load(structures)
        pre = preprocess(image, labels, self.preprocess_config)
        if tuple(pre.label.shape[1:]) != shape:
            raise CacheError(
                f"feature cache entry {entry} holds features of shape {shape} but {case.image} "
                f"preprocesses to {tuple(pre.label.shape[1:])}; delete the entry and run again"
            )

        try:
            for s, name in enumerate(structures):
                with atomic_path(entry / self._label_file(case, name), suffix=".npy") as tmp:
                    np.save(tmp, pre.label[s].as_tensor().numpy().astype(np.uint8))
        except OSError as exc:
            raise _write_error(entry, exc) from exc

    # -- public

    def load(self, case: Case, structures: Sequence[str] = ()) -> CachedCase:
        """The cached features (and labels of `structures`) of `case`, computed if missing.

        `case` is a `fseft.data.datasets.Case`; `structures` canonical names it annotates
        (empty for an unlabelled query). Raises `CacheError` when the cache cannot be written.
        """
        structures = tuple(structures)
        material = self.key_material(case.image)
        entry = self.model_dir / _sha256(material)[:32]
        feats = self._read_entry(entry, material)
        if feats is None:
            self.misses += 1
            self._build_entry(case, structures, material, entry)
            feats = self._read_entry(entry, material)
            if feats is None:
                raise CacheError(f"feature cache entry {entry} could not be read back after writing it")
        else:
            self.hits += 1
        shape = tuple(feats.shape[1:])
        names = [self._label_file(case, s) for s in structures]
        labels = self._read_labels(entry, names, shape)
        if structures and labels is None:
            self._add_labels(case, structures, entry, shape)
            labels = self._read_labels(entry, names, shape)
        return CachedCase(case.case_id, feats, labels, entry)

    def size_bytes(self) -> int:
        """Bytes on disk of this model's cache entries."""
        if not self.model_dir.exists():
            return 0
        return sum(p.stat().st_size for p in self.model_dir.rglob("*") if p.is_file())

    def clear(self) -> None:
        """Delete this model's entries."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.model_dir)
