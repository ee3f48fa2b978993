"""Black-box few-shot adaptation on cached frozen features (`fseft adapt`).

The base model is never changed: its features ``Z`` of every support and query volume are
computed once (`FeatureCache`), and a small adapter (`fseft.methods`: ``lp``,
``spatial-adapter``, or the model's own head for ``generalization``) is trained on patches of
``Z`` from the `k` support volumes, optionally with the transductive size constraint on the
unlabelled query volumes (``--ti``). The queries are then segmented (threshold + largest
connected component, in their native geometry) and scored with `fseft.evaluation`.

Reference protocol (FSEFT paper), all in `AdaptConfig`: AdamW, one warm-up epoch then cosine
decay, up to 200 epochs with early stopping, 6 patches of 96^3 per support volume per
iteration, one volume per iteration, learning rate 1e-2 (lp) / 1e-4 (spatial adapter).

Run folder: ``adapter_model.safetensors`` (the adapter's weights), ``adapter_config.json``
(method, structures, base model and its hash, preprocessing, hyper-parameters, task),
``metrics.json`` and, with `save_predictions`, ``predictions/<case>.nii.gz``.
`load_adapted_model(run_dir)` rebuilds base model + adapter as one `SegmentationModel`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fseft.errors import ConfigError, InputFileError
from fseft.methods.transductive import TransductiveConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METRICS_FILE = "metrics.json"
OBJECTIVES = ("sigmoid", "multiclass")


@dataclass
class AdaptConfig:
    """Hyper-parameters of one adaptation run (defaults: the FSEFT reference protocol).

    method / method_options: a registered method (`fseft.methods.available_methods()`) and
        its config fields (e.g. ``{"kernel_size": 1}`` for the MLP-adapter ablation).
    objective: "sigmoid" (one independent sigmoid per structure) or "multiclass" (softmax over
        background + structures).
    epochs: maximum epochs; an epoch is one pass over the k support volumes, one volume per
        iteration (`batch_size` volumes per optimiser step).
    patience / min_delta: early stopping when the epoch's mean training loss has not improved
        by a relative `min_delta` for `patience` epochs (with `transductive`, only once the
        size constraint is active).
    lr: AdamW learning rate; None takes the method's default (1e-2 lp, 1e-4 spatial adapter).
    warmup_epochs: linear warm-up before the cosine decay (MONAI `WarmupCosineSchedule`).
    patch_size / patches_per_volume / pos_ratio: training crops of the cached features, centred
        on a foreground voxel of the support masks with probability `pos_ratio`.
    transductive / ti: the organ-size constraint on the unlabelled queries (`TransductiveConfig`).
    n_query: number of query cases (None: every eligible case not in the support set).
    roi_size / overlap / sw_batch_size: sliding window that computes the cached features.
    threshold / largest_component: post-processing of the query predictions.
    slab: slices per slab when an adapter runs over a whole cached volume.
    """

    method: str = "lp"
    method_options: dict[str, Any] = field(default_factory=dict)
    objective: str = "sigmoid"
    epochs: int = 200
    patience: int = 20
    min_delta: float = 1e-3
    lr: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    batch_size: int = 1
    patch_size: tuple[int, int, int] = (96, 96, 96)
    patches_per_volume: int = 6
    pos_ratio: float = 0.5
    transductive: bool = False
    ti: TransductiveConfig = field(default_factory=TransductiveConfig)
    n_query: int | None = None
    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.25
    sw_batch_size: int = 1
    threshold: float = 0.5
    largest_component: bool = True
    slab: int = 32
    cache_dir: str | None = None
    device: str = "cpu"
    bf16: bool = False
    save_predictions: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.patch_size = _triple(self.patch_size, "patch_size")
        self.roi_size = _triple(self.roi_size, "roi_size")
        if isinstance(self.ti, dict):
            self.ti = TransductiveConfig(**self.ti)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("epochs", "patience", "warmup_epochs"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "patches_per_volume", "slab"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.pos_ratio <= 1.0:
            raise ConfigError(f"pos_ratio must be in [0, 1], got {self.pos_ratio}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"], out["roi_size"] = list(self.patch_size), list(self.roi_size)
        return out

    def inference_config(self) -> Any:
        from fseft.engine.inference import InferenceConfig

        return InferenceConfig(
            roi_size=self.roi_size, overlap=self.overlap, sw_batch_size=self.sw_batch_size,
            bf16=self.bf16, threshold=self.threshold, largest_component=self.largest_component,
            device=self.device, progress=self.progress,
        )


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    vals = [value] * 3 if isinstance(value, int) else list(value)
    if len(vals) != 3 or min(int(v) for v in vals) < 1:
        raise ConfigError(f"{name} must be one or three positive integers, got {value!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- model helpers


def _stored_preprocess(model: nn.Module) -> Any:
    """The model file's `PreprocessConfig` (``model.preprocess``), else the default one."""
    from fseft.data.preprocessing import PreprocessConfig

    stored = getattr(model, "preprocess", None)
    if isinstance(stored, PreprocessConfig):
        return stored
    return PreprocessConfig.from_dict(stored) if stored else PreprocessConfig()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def head_rows(class_names: Sequence[str], structures: Sequence[str], multiclass: bool) -> list[int | None]:
    """Base-head output channel of each adapter output (None: not in the catalogue, or the
    multiclass background channel)."""
    rows = [class_names.index(s) if s in class_names else None for s in structures]
    return [None, *rows] if multiclass else rows


def build_method_adapter(
    cfg: AdaptConfig, base: nn.Module, structures: Sequence[str]
) -> nn.Module:
    """The run's adapter, its head initialised from the base head where the method says so.

    Sigmoid objective: one output per structure. Multiclass: output 0 is the background, with
    zero weights (so that at step 0 the softmax ranks structures as the base head does).
    """
    from fseft.methods import build_adapter, get_method

    spec = get_method(cfg.method)
    mcfg = spec.make_config(**cfg.method_options)
    multiclass = cfg.objective == "multiclass"
    adapter = build_adapter(mcfg, base.feature_channels, len(structures) + int(multiclass))
    if multiclass:
        with torch.no_grad():
            adapter.head.weight[0].zero_()
            adapter.head.bias[0].zero_()
    if mcfg.init_from_head:
        adapter.init_head(base.head, head_rows(base.class_names, structures, multiclass))
    return adapter


# ---------------------------------------------------------------------------- patches


@dataclass
class _SupportVolume:
    features: np.ndarray  # (C, X, Y, Z) float16 memmap
    labels: np.ndarray  # (S, X, Y, Z) uint8
    fg: np.ndarray  # flat indices of foreground voxels (any structure)
    bg: np.ndarray


def _support_volume(features: np.ndarray, labels: np.ndarray) -> _SupportVolume:
    from monai.transforms.utils import map_binary_to_indices

    fg, bg = map_binary_to_indices(labels.any(axis=0)[None])
    return _SupportVolume(features, np.ascontiguousarray(labels), np.asarray(fg), np.asarray(bg))


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
    (`fseft.engine.sampling.patch_transforms` crops in-memory arrays, which would read the
    whole feature volume for every draw). A patch is smaller than `patch_size` along an axis
    where the volume is.
    """
    from monai.transforms import SpatialCrop
    from monai.transforms.utils import generate_pos_neg_label_crop_centers

    size = [min(int(p), int(s)) for p, s in zip(patch_size, label_shape)]
    centers = generate_pos_neg_label_crop_centers(
        size, num, pos_ratio, list(label_shape), fg_indices, bg_indices, rng, allow_smaller=True
    )
    return [tuple(SpatialCrop(roi_center=[int(c) for c in center], roi_size=size).slices) for center in centers]


def _patch_batch(
    volume: _SupportVolume, windows: Sequence[tuple[slice, slice, slice]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, C, *patch)`` float32 in ``channels_last_3d`` layout (the cache's own, and
    the fast one for CPU 3D convolutions) and labels ``(N, S, *patch)`` of the windows."""
    size = tuple(s.stop - s.start for s in windows[0])
    feats = torch.empty((len(windows), volume.features.shape[0], *size), memory_format=torch.channels_last_3d)
    for n, w in enumerate(windows):
        # (C, x, y, z) view of channels-last storage: copying keeps the layout, then one cast
        feats[n].copy_(torch.from_numpy(np.array(volume.features[(slice(None), *w)])))
    labels = np.stack([volume.labels[(slice(None), *w)] for w in windows])
    return feats.to(device), torch.from_numpy(labels).to(device)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """BCE + Dice per structure (sigmoid), or softmax cross-entropy + Dice over background and
    structures (multiclass; a voxel of overlapping masks takes the last structure).

    logits: ``(N, S or S+1, *patch)``; labels: ``(N, S, *patch)`` binary.
    """
    if not multiclass:
        from fseft.engine.losses import per_class_bce_dice

        return per_class_bce_dice(logits, labels).mean()
    from monai.losses import DiceCELoss

    index = torch.zeros_like(labels[:, :1], dtype=torch.long)
    for s in range(labels.shape[1]):
        index[labels[:, s : s + 1] > 0] = s + 1
    return DiceCELoss(softmax=True, to_onehot_y=True)(logits.float(), index)


# ---------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    epochs_run: int
    losses: list[float]
    ti_losses: list[float]
    seconds: float
    stopped_early: bool


def train_adapter(
    adapter: nn.Module,
    support: Sequence[tuple[np.ndarray, np.ndarray]],
    cfg: AdaptConfig,
    seed: int = 0,
    queries: Sequence[np.ndarray] = (),
) -> TrainResult:
    """Train `adapter` on patches of cached support features.

    support: ``(features (C, X, Y, Z) float16, labels (S, X, Y, Z) uint8)`` per support volume.
    queries: cached query features ``(C, X, Y, Z)``, used (unlabelled) by the size constraint
    when `cfg.transductive`. Each iteration draws `patches_per_volume` patches from each of
    `batch_size` support volumes; with the constraint active, it also accumulates the size
    penalty of one query volume (taken in turn). Returns the per-epoch mean losses.
    """
    from monai.optimizers import WarmupCosineSchedule
    from tqdm.auto import tqdm

    from fseft.methods import get_method
    from fseft.methods.transductive import size_constraint_step, target_sizes

    device = torch.device(cfg.device)
    multiclass = cfg.objective == "multiclass"
    adapter.to(device, memory_format=torch.channels_last_3d).train()
    params = [p for p in adapter.parameters() if p.requires_grad]
    if not params or cfg.epochs == 0:
        return TrainResult(0, [], [], 0.0, False)
    if cfg.transductive and not queries:
        raise ConfigError("transductive inference needs query volumes")
    volumes = [_support_volume(f, lab) for f, lab in support]
    lr = cfg.lr if cfg.lr is not None else get_method(cfg.method).config_cls.default_lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    iters = math.ceil(len(volumes) / cfg.batch_size)
    scheduler = WarmupCosineSchedule(
        optimizer, warmup_steps=cfg.warmup_epochs * iters, t_total=max(1, cfg.epochs * iters),
        warmup_multiplier=0.1,  # the very first step already learns
    )
    target = target_sizes([v.labels for v in volumes]) if cfg.transductive else None
    ti_start = math.floor(cfg.ti.start_fraction * cfg.epochs) if cfg.transductive else cfg.epochs
    rng = np.random.RandomState(seed)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    amp_dtype = torch.bfloat16 if cfg.bf16 else None

    losses: list[float] = []
    ti_losses: list[float] = []
    best, stale, step, stopped = math.inf, 0, 0, False
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=f"adapt {cfg.method}", unit="epoch", disable=not cfg.progress)
    for epoch in bar:
        order = rng.permutation(len(volumes))
        epoch_loss, epoch_ti = 0.0, 0.0
        for it in range(iters):
            optimizer.zero_grad(set_to_none=True)
            batch = [volumes[i] for i in order[it * cfg.batch_size : (it + 1) * cfg.batch_size]]
            loss_value = 0.0
            for vol in batch:
                windows = sample_patch_slices(
                    vol.labels.shape[1:], vol.fg, vol.bg, cfg.patch_size, cfg.patches_per_volume, cfg.pos_ratio, rng
                )
                feats, labels = _patch_batch(vol, windows, device)
                with torch.autocast(**autocast):
                    logits = adapter(feats)
                loss = supervised_loss(logits, labels, multiclass) / len(batch)
                loss.backward()
                loss_value += float(loss.detach())
            if epoch >= ti_start:
                query = queries[step % len(queries)]
                epoch_ti += size_constraint_step(
                    adapter, query, target, cfg.ti, multiclass, cfg.slab, device, amp_dtype
                )
            optimizer.step()
            scheduler.step()
            step += 1
            epoch_loss += loss_value
        losses.append(epoch_loss / iters)
        ti_losses.append(epoch_ti / iters)
        monitored = losses[-1] + ti_losses[-1]
        bar.set_postfix(loss=f"{losses[-1]:.4f}", **({"ti": f"{ti_losses[-1]:.4f}"} if epoch >= ti_start else {}))
        if epoch + 1 < ti_start:
            continue  # the constrained phase must run: no early stop before it
        if monitored < best - cfg.min_delta * abs(best) or not math.isfinite(best):
            best, stale = monitored, 0
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                stopped = True
                break
    bar.close()
    adapter.eval()
    return TrainResult(len(losses), losses, ti_losses, time.perf_counter() - start, stopped)


# ---------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_cached(
    adapter: nn.Module, features: np.ndarray, multiclass: bool, slab: int = 32,
    device: str | torch.device = "cpu", bf16: bool = False,
) -> torch.Tensor:
    """Per-structure probabilities ``(S, X, Y, Z)`` float32 (CPU) of a whole cached volume
    ``(C, X, Y, Z)``."""
    from fseft.methods import iter_slab_logits
    from fseft.methods.transductive import foreground_probabilities

    adapter.eval()
    parts = [
        foreground_probabilities(logits, multiclass)[0].cpu()
        for _, logits in iter_slab_logits(
            adapter, features, slab, device, autocast_dtype=torch.bfloat16 if bf16 else None
        )
    ]
    return torch.cat(parts, dim=-1)


def _masks(probs_native: np.ndarray, cfg: AdaptConfig, multiclass: bool) -> np.ndarray:
    """Binary masks ``(S, X, Y, Z)`` uint8 from native-space probabilities."""
    from fseft.evaluation.postprocess import binarize, largest_connected_component

    if not multiclass:
        return binarize(probs_native, cfg.threshold, cfg.largest_component)
    # argmax over (background, structures): background probability is 1 - sum(structures)
    background = 1.0 - probs_native.sum(axis=0, keepdims=True)
    winner = np.concatenate([background, probs_native]).argmax(axis=0)
    masks = np.stack([winner == s + 1 for s in range(probs_native.shape[0])])
    if cfg.largest_component:
        masks = np.stack([largest_connected_component(m) for m in masks])
    return masks.astype(np.uint8)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _mean_metrics(per_case: dict[str, dict[str, dict[str, float]]], structures: Sequence[str]) -> dict:
    mean: dict[str, dict[str, float | None]] = {}
    for s in structures:
        mean[s] = {}
        for metric in ("dice", "nsd", "hd95"):
            vals = [v[s][metric] for v in per_case.values() if v[s][metric] is not None]
            mean[s][metric] = _finite_or_none(float(np.mean(vals))) if vals else None
    return mean


def evaluate_queries(
    adapter: nn.Module,
    cache: Any,
    query_cases: Sequence[Any],
    structures: Sequence[str],
    cfg: AdaptConfig,
    predictions_dir: Path | None = None,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Segment each query from its cached features and score it in native geometry.

    Probabilities are resampled to the scan's grid (linear), then thresholded (or argmax for
    multiclass) and reduced to each structure's largest component; Dice / NSD / HD95 by
    `fseft.evaluation.metrics.evaluate_masks` (NaN written as null).
    """
    from tqdm.auto import tqdm

    from fseft.data.io import write_mask
    from fseft.data.preprocessing import preprocess, to_native
    from fseft.engine.feature_cache import CacheError
    from fseft.evaluation.metrics import evaluate_masks

    multiclass = cfg.objective == "multiclass"
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for case in tqdm(query_cases, desc="evaluate queries", unit="case", disable=not cfg.progress):
        cached = cache.load(case)
        image, gt = case.load(structures)
        pre = preprocess(image, None, cache.preprocess_config)
        if tuple(pre.image.shape[1:]) != cached.spatial_shape:
            raise CacheError(
                f"cached features {cached.path} have shape {cached.spatial_shape} but {case.image} "
                f"preprocesses to {tuple(pre.image.shape[1:])}; delete that folder and run again"
            )
        probs = predict_cached(adapter, cached.features, multiclass, cfg.slab, cfg.device, cfg.bf16)
        masks = _masks(to_native(probs, pre, mode="linear"), cfg, multiclass)
        scores = evaluate_masks(masks, gt.array, gt.spacing, structures)
        results[case.case_id] = {
            s: {m: _finite_or_none(v) for m, v in vals.items()} for s, vals in scores.items()
        }
        if predictions_dir is not None:
            labels = np.zeros(masks.shape[1:], dtype=np.uint8)
            for s in range(masks.shape[0]):
                labels[masks[s] > 0] = s + 1
            write_mask(labels, image, predictions_dir / f"{case.case_id}.nii.gz",
                       label_map={s + 1: name for s, name in enumerate(structures)})
    return results


# ---------------------------------------------------------------------------- the run


def _load_base(model: str | os.PathLike | nn.Module, device: str) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen base model and how to find it again: zoo id and/or model file, with the
    file's SHA-256 (`load_adapted_model` checks the weights fingerprint as well)."""
    if isinstance(model, nn.Module):
        base = model.to(device)
        ref: dict[str, Any] = {"id": None, "path": None, "file_sha256": None}
    else:
        from fseft.models.zoo import MODEL_SPECS, load_model

        text = str(model)
        base = load_model(text, device=device)
        is_id = text in MODEL_SPECS
        weights = (getattr(base, "model_config", None) or {}).get("weights") if is_id else text
        path = Path(weights).expanduser().resolve() if weights else None
        ref = {
            "id": text if is_id else None,
            "path": str(path) if path else None,
            "file_sha256": _file_sha256(path) if path and path.is_file() else None,
        }
    base.eval().requires_grad_(False)
    return base, ref


def adapt(
    model: str | os.PathLike | nn.Module,
    data: str | os.PathLike,
    structures: Sequence[str] | str,
    k: int,
    seed: int,
    out: str | os.PathLike,
    cfg: AdaptConfig | None = None,
) -> dict[str, Any]:
    """Few-shot adaptation of a frozen model to `structures` with `k` support volumes of `data`.

    model: zoo id, fseft model file, or a `SegmentationModel`. data: a dataset folder
    (`open_dataset`). The task (support / query split) is `FewShotTask.sample(dataset,
    structures, k, seed, cfg.n_query)`. Writes the run folder `out` (see module docstring) and
    returns the metrics dict also written to ``metrics.json``.
    """
    from safetensors.torch import save_file

    from fseft.data.datasets import open_dataset
    from fseft.data.structures import UnknownStructureError, canonical_names
    from fseft.data.tasks import FewShotTask
    from fseft.engine.feature_cache import FeatureCache
    from fseft.methods import count_trainable_parameters, get_method
    from fseft.utils import atomic_path, seed_everything, write_json

    cfg = cfg or AdaptConfig()
    spec = get_method(cfg.method)
    spec.make_config(**cfg.method_options)  # option errors before any heavy work
    names = canonical_names(structures)
    if not names:
        raise ConfigError("adapt: no structure given (--structures NAME[,NAME...])")
    out = Path(out)
    base, base_ref = _load_base(model, cfg.device)
    if spec.config_cls.needs_known_structures:
        unknown = [s for s in names if s not in base.class_names]
        if unknown:
            raise UnknownStructureError(
                f"method {cfg.method!r} evaluates the model's own head, which has no output for "
                f"{', '.join(unknown)}; its classes are: {', '.join(base.class_names)}. "
                "Train an adapter for new structures (--method lp or spatial-adapter)."
            )
    dataset = open_dataset(data)
    task = FewShotTask.sample(dataset, names, k, seed, cfg.n_query, cache_dir=cfg.cache_dir)
    seed_everything(seed)

    preprocess_cfg = _stored_preprocess(base)
    cache = FeatureCache(base, preprocess_cfg, cfg.cache_dir, cfg.inference_config())
    adapter = build_method_adapter(cfg, base, names).to(cfg.device)
    trainable = spec.config_cls.trainable and cfg.epochs > 0
    support, queries = [], []
    if trainable:
        support = [
            (c.features, c.labels)
            for c in (cache.load(case, names) for case in task.support_cases(dataset))
        ]
        if cfg.transductive:
            queries = [cache.load(case).features for case in task.query_cases(dataset)]
    result = train_adapter(adapter, support, cfg, seed, queries) if trainable else TrainResult(0, [], [], 0.0, False)

    predictions = out / "predictions" if cfg.save_predictions else None
    per_case = evaluate_queries(adapter, cache, task.query_cases(dataset), names, cfg, predictions)
    metrics = {
        "method": cfg.method,
        "structures": list(names),
        "k": int(k),
        "seed": int(seed),
        "trainable_params": count_trainable_parameters(adapter) if spec.config_cls.trainable else 0,
        "train_seconds": round(result.seconds, 3),
        "queries": per_case,
        "mean": _mean_metrics(per_case, names),
    }
    adapter_config = {
        "format": "fseft-adapter-v1",
        "method": cfg.method,
        "method_options": spec.make_config(**cfg.method_options).to_dict(),
        "objective": cfg.objective,
        "structures": list(names),
        "transductive": dataclasses.asdict(cfg.ti) if cfg.transductive else None,
        "base_model": {**base_ref, "fingerprint": cache.model_key, "class_names": list(base.class_names),
                       "feature_channels": int(base.feature_channels)},
        "preprocess": preprocess_cfg.to_dict(),
        "hyperparameters": cfg.to_dict(),
        "task": task.to_dict(),
        "training": {"epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
                     "losses": [round(v, 6) for v in result.losses],
                     "ti_losses": [round(v, 6) for v in result.ti_losses]},
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in adapter.state_dict().items()}
    with atomic_path(out / ADAPTER_WEIGHTS, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"fseft_adapter": json.dumps({"method": cfg.method})})
    write_json(out / ADAPTER_CONFIG, adapter_config)
    write_json(out / METRICS_FILE, metrics)
    return metrics


# ---------------------------------------------------------------------------- loading


class AdaptedModel(nn.Module):
    """Base model + adapter as one `SegmentationModel`-compatible module.

    ``features(x)`` = the adapter's trunk on the base features ``(B, C, D, H, W)``;
    ``forward(x)`` = per-structure logits ``(B, S, D, H, W)`` (sigmoid -> probabilities). For a
    multiclass adapter these are ``logit(softmax)`` of each structure, so that the sigmoid of
    the output is the structure's softmax probability and sigmoid-based inference applies.

    Sliding-window inference of `forward` runs a spatial adapter inside each window (zero
    padding at window borders), while `adapt` trained and evaluated it on the blended
    whole-volume features: probabilities differ by ~1e-2 near window borders.
    `predict_volume` reproduces the evaluated prediction exactly (identical for `lp`).
    """

    arch = "adapted"

    def __init__(self, base: nn.Module, adapter: nn.Module, structures: Sequence[str], multiclass: bool,
                 preprocess: Any = None) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.class_names = tuple(structures)
        self.feature_channels = int(base.feature_channels)
        self.head = adapter.head
        self.multiclass = bool(multiclass)
        self.preprocess = preprocess

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.trunk(self.base.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        if not self.multiclass:
            return logits
        probs = torch.softmax(logits.float(), dim=1)[:, 1:].clamp(1e-7, 1 - 1e-7)
        return torch.logit(probs)

    @torch.no_grad()
    def predict_volume(self, image: torch.Tensor, cfg: Any = None, slab: int = 32) -> torch.Tensor:
        """Probabilities ``(1, S, X, Y, Z)`` (CPU float32) of a preprocessed volume
        ``(1, 1, X, Y, Z)`` as `adapt` computes them: sliding-window base features
        (`InferenceConfig` `cfg`), then the adapter over the whole volume, slab by slab."""
        from fseft.engine.feature_cache import compute_features
        from fseft.engine.inference import InferenceConfig

        cfg = cfg or InferenceConfig()
        features = compute_features(self.base, image, cfg)[0]
        return predict_cached(self.adapter, features, self.multiclass, slab, cfg.device, cfg.bf16)[None]


def load_adapted_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> AdaptedModel:
    """Rebuild base model + trained adapter from an `fseft adapt` run folder, in eval mode.

    The base model is loaded from the recorded zoo id or file and checked against the recorded
    weights fingerprint (`InputFileError` if the file changed since the run).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fseft.data.preprocessing import PreprocessConfig
    from fseft.engine.feature_cache import model_fingerprint
    from fseft.models.zoo import load_model

    run_dir = Path(run_dir)
    cfg_path, weights_path = run_dir / ADAPTER_CONFIG, run_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise InputFileError(f"{p}: not found; is {run_dir} an `fseft adapt` run folder?")
    try:
        config = json.loads(cfg_path.read_text())
        base_info = config["base_model"]
        structures = config["structures"]
        model_id, model_path = base_info["id"], base_info["path"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputFileError(f"{cfg_path}: not a valid adapter config ({exc})") from exc
    if model_id is None and model_path is None:
        raise InputFileError(
            f"{cfg_path}: the adapter was trained on an in-memory model (no zoo id or model file "
            "recorded); save the base model with save_model_file and adapt from that file"
        )
    ref = model_id or model_path
    base = load_model(model_id, weights=model_path, device=str(device)) if model_id else load_model(model_path, device=str(device))
    if model_fingerprint(base) != base_info["fingerprint"]:
        raise InputFileError(
            f"{ref}: its weights differ from those the adapter in {run_dir} was trained on"
        )
    base.eval().requires_grad_(False)
    run_cfg = AdaptConfig(
        method=config["method"], method_options={k: v for k, v in config["method_options"].items()},
        objective=config["objective"],
    )
    adapter = build_method_adapter(run_cfg, base, structures)
    try:
        state = load_file(str(weights_path))
        adapter.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise InputFileError(f"{weights_path}: cannot load the adapter weights ({exc})") from exc
    preprocess = PreprocessConfig.from_dict(config["preprocess"])
    model = AdaptedModel(base, adapter, structures, config["objective"] == "multiclass", preprocess)
    return model.to(device).eval()
