"""Few-shot adaptation (`fseft adapt`): every registered method, one task protocol.

A method (`fseft.methods`) is of one of two kinds:

- ``"features"`` (black-box: ``generalization``, ``lp``, ``spatial-adapter``): the base model
  is never changed; its features ``Z`` of every support and query volume are computed once
  (`FeatureCache`) and a small adapter is trained on patches of ``Z`` from the `k` support
  volumes (`train_adapter`), optionally with the transductive size constraint on the
  unlabelled query volumes (``--ti``).
- ``"network"`` (``ft``, ``ft-last``, ``scratch``, ``bitfit``, ``affine``, ``lora``,
  ``adaptformer``, ``arena``): `fseft.methods.peft_methods.apply_method` prepares a copy of the
  base, trained end to end on patches of the preprocessed support images (`train_network`).

Both then segment the queries (threshold + largest connected component, in their native
geometry) and score them with `fseft.evaluation`, with the same task sampling, loss,
optimiser, schedule and ``metrics.json``.

Reference protocol (the FSEFT authors' run commands, ``../shared/protocols.md``): AdamW, one
warm-up epoch then cosine decay, one support volume per iteration with 6 patches of 96^3, and
per method its learning rate and epochs (`MethodConfig.default_*`: lp 1e-1 for 50 epochs,
spatial adapter and ft-last 1e-2 for 100, ft and scratch 1e-4 with 2 volumes of 3 patches,
encoder PEFT 1e-3 for 100), early stopping after 20 epochs without progress.

Run folder: ``adapter_model.safetensors`` and ``adapter_config.json`` (feature methods: the
adapter's weights and fseft's record of method, structures, base model and its hash,
preprocessing, hyper-parameters, task; network methods: `fseft.methods.adapter_io.save_adapter`'s
files, in peft's format for ``lora``, with that run information in the record's ``extra``),
``metrics.json`` and, with `save_predictions`, ``predictions/<case>.nii.gz``.
`load_adapted_model(run_dir)` rebuilds the adapted model of either kind for inference.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
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
LOSSES = ("dice", "bce+dice")


@dataclass
class AdaptConfig:
    """Hyper-parameters of one adaptation run (defaults: the FSEFT reference protocol).

    method / method_options: a registered method (`fseft.methods.available_methods()`) and
        its config fields (e.g. ``{"kernel_size": 1}`` for the MLP-adapter ablation).
    objective: "sigmoid" (one independent sigmoid per structure) or "multiclass" (softmax over
        background + structures).
    loss: "bce+dice" (BCE / cross-entropy plus soft Dice per structure and patch) or "dice"
        (the FSEFT adaptation runs' loss). Measured on the phantom gallbladder (k = 5, spatial
        adapter at the reference lr 1e-2): Dice alone drove the new output to an empty mask in
        3 of 3 seeds (support loss stuck at 1.0 from epoch 3), BCE + Dice in 1 of 3.
    epochs: maximum epochs; an epoch is one pass over the k support volumes, one volume per
        iteration (`batch_size` volumes per optimiser step). None takes the method's default.
    max_steps: optional cap on optimiser steps: the epochs become
        ``min(epochs, ceil(max_steps / steps per epoch))`` (schedule and TI phase follow), so
        that a larger k trains for the same budget as a smaller one (the demo's time bound).
    patience / min_delta: early stopping when the epoch's mean training loss has not improved
        by a relative `min_delta` for `patience` epochs (with `transductive`, only once the
        size constraint is active).
    lr: AdamW learning rate. epochs, lr, batch_size and patches_per_volume left at None take
        the method's protocol (`MethodConfig.default_*`, from the FSEFT authors' run commands;
        `resolved`).
    warmup_epochs: linear warm-up before the cosine decay (MONAI `WarmupCosineSchedule`).
    patch_size / patches_per_volume / pos_ratio: training crops (of the cached features, or of
        the preprocessed images for network methods: then a size the architecture accepts;
        None: the model's recommended window, as for `roi_size`),
        centred on a foreground voxel of the support masks with probability `pos_ratio`.
    transductive / ti: the organ-size constraint on the unlabelled queries (`TransductiveConfig`).
    head_prior: outputs of structures new to the base model start at the support's foreground
        fraction (`fseft.methods.init_head_prior`) instead of p = 0.5.
    head_warmup: network methods start from a head fitted as a linear probe on the base's
        frozen features of the support (LP-FT, `probe_head`); None: the method's default
        (`MethodConfig.warms_up_head`: on for pre-trained bases, off for scratch and a new decoder).
    n_query: number of query cases (None: every eligible case not in the support set).
    roi_size / overlap / sw_batch_size: sliding window that computes the cached features.
    threshold / largest_component: post-processing of the query predictions.
    slab: slices per slab when an adapter runs over a whole cached volume.
    bf16: bfloat16 autocast (training and inference).
    grad_checkpointing: network methods load a Swin-UNETR base with ``use_checkpoint=True``
        (less memory, slower).
    augment: network methods' patches get random intensity scaling (+-10 %, p = 0.1) and shifts
        (+-0.1, p = 0.5), no flips or rotations (they put a left organ where the right one was);
        off by default, so that every method sees the data the cached-feature methods see.
    encoder_cache / encoder_pool_epochs: a network method whose trainable weights all lie
        after a split point of the architecture (``decoder``, ``ft-last``) trains on cached
        outputs of the frozen encoder (`fseft.engine.encoder_cache`), for the distinct patches
        of the first `encoder_pool_epochs` epochs' draws; False trains through the network.
    """

    method: str = "lp"
    method_options: dict[str, Any] = field(default_factory=dict)
    objective: str = "sigmoid"
    loss: str = "bce+dice"
    epochs: int | None = None
    max_steps: int | None = None
    patience: int = 20
    min_delta: float = 1e-3
    lr: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    batch_size: int | None = None
    patch_size: tuple[int, int, int] | None = None  # None: the model's recommended window
    patches_per_volume: int | None = None
    pos_ratio: float = 0.5
    transductive: bool = False
    ti: TransductiveConfig = field(default_factory=TransductiveConfig)
    head_prior: bool = True
    head_warmup: bool | None = None
    n_query: int | None = None
    roi_size: tuple[int, int, int] | None = None  # None: the model's recommended window
    overlap: float = 0.25
    sw_batch_size: int = 1
    threshold: float = 0.5
    largest_component: bool = True
    slab: int = 32
    cache_dir: str | None = None
    device: str = "cpu"
    bf16: bool = False
    grad_checkpointing: bool = False
    augment: bool = False
    encoder_cache: bool = True
    encoder_pool_epochs: int = 2
    save_predictions: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.patch_size = None if self.patch_size is None else _triple(self.patch_size, "patch_size")
        self.roi_size = None if self.roi_size is None else _triple(self.roi_size, "roi_size")
        if isinstance(self.ti, dict):
            self.ti = TransductiveConfig(**self.ti)
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("epochs", "patience", "warmup_epochs"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "patches_per_volume", "slab", "encoder_pool_epochs"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise ConfigError(f"max_steps must be >= 1 (or None), got {self.max_steps}")
        if self.lr is not None and not 0 < self.lr <= float(np.finfo(np.float32).max):
            raise ConfigError(f"lr must be > 0 and a finite float32 number (the optimiser's), got {self.lr}")
        if not 0.0 <= self.pos_ratio <= 1.0:
            raise ConfigError(f"pos_ratio must be in [0, 1], got {self.pos_ratio}")

    def resolved(self) -> AdaptConfig:
        """This config with every protocol field left at None (epochs, lr, batch_size,
        patches_per_volume) set to the method's default (`MethodConfig.default_*`), and
        `head_warmup` to `MethodConfig.warms_up_head`."""
        from fseft.methods import get_method

        protocol = get_method(self.method).config_cls
        defaults = {"epochs": protocol.default_epochs, "lr": protocol.default_lr,
                    "batch_size": protocol.default_batch_size,
                    "patches_per_volume": protocol.default_patches_per_volume}
        missing = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.head_warmup is None:
            missing["head_warmup"] = get_method(self.method).make_config(**self.method_options).warms_up_head()
        return dataclasses.replace(self, **missing) if missing else self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = None if self.patch_size is None else list(self.patch_size)
        out["roi_size"] = None if self.roi_size is None else list(self.roi_size)
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


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (model files identify a base model by it)."""
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
    cfg: AdaptConfig, base: nn.Module, structures: Sequence[str], foreground: Sequence[float] | None = None
) -> nn.Module:
    """The run's adapter, its head initialised from the base head where the method says so.

    Sigmoid objective: one output per structure. Multiclass: output 0 is the background, with
    zero weights (so that at step 0 the softmax ranks structures as the base head does).
    foreground: the support's foreground fraction per structure; with it (and `cfg.head_prior`)
    outputs not copied from the base head start at that prior (`init_head_prior`).
    """
    from fseft.methods import build_adapter, get_method, init_head_prior

    spec = get_method(cfg.method)
    mcfg = spec.make_config(**cfg.method_options)
    multiclass = cfg.objective == "multiclass"
    adapter = build_adapter(mcfg, base.feature_channels, len(structures) + int(multiclass))
    if multiclass:
        with torch.no_grad():
            adapter.head.weight[0].zero_()
            adapter.head.bias[0].zero_()
    rows = head_rows(base.class_names, structures, multiclass) if mcfg.init_from_head else [None] * adapter.num_outputs
    adapter.init_head(base.head, rows)
    if foreground is not None and cfg.head_prior:
        init_head_prior(adapter.head, rows, foreground, multiclass)
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
    volume: _SupportVolume,
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


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, multiclass: bool, loss: str = "bce+dice") -> torch.Tensor:
    """Soft Dice per structure and patch (``loss="dice"``, the FSEFT adaptation runs' loss), plus
    BCE (``"bce+dice"``): sigmoid outputs; multiclass: softmax over background and structures
    (a voxel of overlapping masks takes the last structure), plus cross-entropy for ``bce+dice``.

    logits: ``(N, S or S+1, *patch)``; labels: ``(N, S, *patch)`` binary.
    """
    if loss not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    ce_weight = 0.0 if loss == "dice" else 1.0
    if not multiclass:
        from fseft.engine.losses import per_class_bce_dice

        return per_class_bce_dice(logits, labels, bce_weight=ce_weight).mean()
    from monai.losses import DiceCELoss

    index = torch.zeros_like(labels[:, :1], dtype=torch.long)
    for s in range(labels.shape[1]):
        index[labels[:, s : s + 1] > 0] = s + 1
    return DiceCELoss(softmax=True, to_onehot_y=True, lambda_ce=ce_weight)(logits.float(), index)


# ---------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    epochs_run: int
    losses: list[float]
    ti_losses: list[float]
    seconds: float
    stopped_early: bool


def epoch_budget(cfg: AdaptConfig, iters: int) -> int:
    """Epochs to run with `iters` optimiser steps per epoch: `cfg.epochs`, capped by `cfg.max_steps`."""
    cfg = cfg.resolved()
    if cfg.max_steps is None:
        return int(cfg.epochs)
    return min(int(cfg.epochs), math.ceil(int(cfg.max_steps) / max(1, iters)))


def _optimizer(params: list[nn.Parameter], cfg: AdaptConfig, iters: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (the method's default learning rate unless `cfg.lr`) with one warm-up epoch then
    cosine decay over `epoch_budget` epochs of `iters` steps: the schedule of every method."""
    from monai.optimizers import WarmupCosineSchedule

    cfg = cfg.resolved()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = WarmupCosineSchedule(
        optimizer, warmup_steps=cfg.warmup_epochs * iters, t_total=max(1, epoch_budget(cfg, iters) * iters),
        warmup_multiplier=0.1,  # the very first step already learns
    )
    return optimizer, scheduler


class _EarlyStopping:
    """Stop when the monitored epoch loss has not improved by a relative `min_delta` for
    `patience` epochs (0: never)."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best, self.stale = math.inf, 0

    def stop(self, value: float) -> bool:
        if value < self.best - self.min_delta * abs(self.best) or not math.isfinite(self.best):
            self.best, self.stale = value, 0
            return False
        self.stale += 1
        return bool(self.patience) and self.stale >= self.patience


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
    from tqdm.auto import tqdm

    from fseft.engine.losses import check_finite_loss, check_finite_parameters
    from fseft.methods.transductive import size_constraint_step, target_sizes

    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    multiclass = cfg.objective == "multiclass"
    adapter.to(device, memory_format=torch.channels_last_3d).train()
    params = [p for p in adapter.parameters() if p.requires_grad]
    if not params or cfg.epochs == 0:
        return TrainResult(0, [], [], 0.0, False)
    if cfg.transductive and not queries:
        raise ConfigError("transductive inference needs query volumes")
    volumes = [_support_volume(f, lab) for f, lab in support]
    iters = math.ceil(len(volumes) / cfg.batch_size)
    optimizer, scheduler = _optimizer(params, cfg, iters)
    epochs = epoch_budget(cfg, iters)
    target = target_sizes([v.labels for v in volumes]) if cfg.transductive else None
    ti_start = math.floor(cfg.ti.start_fraction * epochs) if cfg.transductive else epochs
    rng = np.random.RandomState(seed)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    amp_dtype = torch.bfloat16 if cfg.bf16 else None

    losses: list[float] = []
    ti_losses: list[float] = []
    step, stopped = 0, False
    stopping = _EarlyStopping(cfg.patience, cfg.min_delta)
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"adapt {cfg.method}", unit="epoch", disable=not cfg.progress)
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
                if all(w == windows[0] for w in windows[1:]):
                    windows = windows[:1]  # a volume within one patch: n copies give the mean loss of one
                feats, labels = _patch_batch(vol, windows, device, amp_dtype or torch.float32)
                with torch.autocast(**autocast):
                    logits = adapter(feats)
                loss = supervised_loss(logits, labels, multiclass, cfg.loss) / len(batch)
                check_finite_loss(loss, step + 1, optimizer.param_groups[0]["lr"], f"adapt {cfg.method}")
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
        if stopping.stop(monitored):
            stopped = True
            break
    bar.close()
    adapter.eval()
    check_finite_parameters(adapter, f"adapt {cfg.method}")
    return TrainResult(len(losses), losses, ti_losses, time.perf_counter() - start, stopped)


def train_network(
    model: nn.Module, support: Sequence[dict[str, Any]], cfg: AdaptConfig, seed: int = 0,
    encoder_cache: Any = None,
) -> TrainResult:
    """Train a network method (`fseft.methods.peft_methods.apply_method`) end to end on image
    patches of the support volumes.

    support: ``{"image": (1, X, Y, Z) in [0, 1], "label": (S, X, Y, Z) uint8}`` per support
    volume, preprocessed (model space). Each iteration draws `patches_per_volume` patches from
    each of `batch_size` volumes with `fseft.engine.sampling` (centred on foreground with
    probability `pos_ratio`, as the feature methods draw theirs; intensity augmentation only
    with `cfg.augment`, since cached features cannot be augmented). Same
    loss, optimiser, schedule and early stopping as `train_adapter`; ARENA's proximal step
    (`post_step`) after each optimiser step; frozen normalisation layers stay in eval mode
    (`method_train_mode`). bf16 autocast with `cfg.bf16`.

    encoder_cache: an `fseft.engine.encoder_cache.EncoderCache` at the model's split point
    (`split_point_for`): the frozen prefix runs once per distinct patch of a pool
    (`PatchPool`, the first `cfg.encoder_pool_epochs` epochs' draws) and each step runs only
    ``decode`` and the head on patches drawn from that pool.
    """
    from tqdm.auto import tqdm

    from fseft.engine.losses import check_finite_loss, check_finite_parameters
    from fseft.engine.sampling import EpochPatchDataset, patch_transforms, plain_tensor
    from fseft.methods.peft_methods import method_train_mode, post_step, unwrap

    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    multiclass = cfg.objective == "multiclass"
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or cfg.epochs == 0 or not support:
        return TrainResult(0, [], [], 0.0, False)
    transform = patch_transforms(cfg.patch_size, cfg.patches_per_volume, pos=cfg.pos_ratio,
                                 neg=1.0 - cfg.pos_ratio, augment=cfg.augment, flip_axes=(), rotate90=False)
    patches = EpochPatchDataset(support, transform, seed)
    iters = math.ceil(len(support) / cfg.batch_size)
    optimizer, scheduler = _optimizer(params, cfg, iters)
    epochs = epoch_budget(cfg, iters)
    stopping = _EarlyStopping(cfg.patience, cfg.min_delta)
    rng = np.random.RandomState(seed)
    arch = getattr(model, "arch", type(model).__name__)
    start = time.perf_counter()
    if encoder_cache is not None:
        from fseft.engine.encoder_cache import PatchPool

        pool = PatchPool(patches, encoder_cache, min(cfg.encoder_pool_epochs, epochs), cfg.progress)
        base = unwrap(model)
        draws = np.random.RandomState(seed + 1)  # apart from `rng`: the volume order stays the network path's

        def batch_logits(position: int) -> tuple[torch.Tensor, torch.Tensor]:
            cached, labels = pool.batch(pool.draw(position, cfg.patches_per_volume, draws), device)
            return base.head(base.decode(cached, encoder_cache.point)), labels
    else:
        def batch_logits(position: int) -> tuple[torch.Tensor, torch.Tensor]:
            items = patches[position]
            if all(torch.equal(plain_tensor(d["image"]), plain_tensor(items[0]["image"])) for d in items[1:]):
                items = items[:1]  # a volume within one patch: n copies give the mean loss of one
            images = torch.stack([plain_tensor(d["image"]) for d in items]).float().to(device)
            try:
                return model(images), torch.stack([plain_tensor(d["label"]) for d in items]).to(device)
            except ValueError as exc:  # the architecture's shape check
                raise ConfigError(f"patch_size {cfg.patch_size} does not fit the {arch} model: {exc}") from exc

    losses: list[float] = []
    stopped = False
    bar = tqdm(range(epochs), desc=f"adapt {cfg.method}", unit="epoch", disable=not cfg.progress)
    for epoch in bar:
        patches.set_epoch(epoch)
        method_train_mode(model)
        order = rng.permutation(len(support))
        epoch_loss = 0.0
        for it in range(iters):
            optimizer.zero_grad(set_to_none=True)
            batch = order[it * cfg.batch_size : (it + 1) * cfg.batch_size]
            for position in batch:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    logits, labels = batch_logits(int(position))
                loss = supervised_loss(logits, labels, multiclass, cfg.loss) / len(batch)
                check_finite_loss(loss, epoch * iters + it + 1, optimizer.param_groups[0]["lr"], f"adapt {cfg.method}")
                loss.backward()
                epoch_loss += float(loss.detach())
            optimizer.step()
            post_step(model, optimizer)
            scheduler.step()
        losses.append(epoch_loss / iters)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if stopping.stop(losses[-1]):
            stopped = True
            break
    bar.close()
    model.eval()
    check_finite_parameters(model, f"adapt {cfg.method}")
    return TrainResult(len(losses), losses, [], time.perf_counter() - start, stopped)


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


def _masks(probs_native: np.ndarray, cfg: AdaptConfig, multiclass: bool, structures: Sequence[str]) -> np.ndarray:
    """Binary masks ``(S, X, Y, Z)`` uint8 from native-space probabilities of `structures`."""
    from fseft.evaluation.postprocess import binarize, keep_largest_components

    if not multiclass:
        return binarize(probs_native, cfg.threshold, cfg.largest_component, structures)
    # argmax over (background, structures): background probability is 1 - sum(structures)
    background = 1.0 - probs_native.sum(axis=0, keepdims=True)
    winner = np.concatenate([background, probs_native]).argmax(axis=0)
    masks = np.stack([winner == s + 1 for s in range(probs_native.shape[0])])
    if cfg.largest_component:
        masks = keep_largest_components(masks, structures)
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


def cached_probabilities(adapter: nn.Module, cache: Any, cfg: AdaptConfig) -> Callable[[Any, Any], torch.Tensor]:
    """`evaluate_queries`' probability function of a feature adapter: the adapter over the
    query's cached features, the whole volume slab by slab."""
    from fseft.engine.feature_cache import CacheError

    def probabilities(case: Any, pre: Any) -> torch.Tensor:
        cached = cache.load(case)
        if tuple(pre.image.shape[1:]) != cached.spatial_shape:
            raise CacheError(
                f"cached features {cached.path} have shape {cached.spatial_shape} but {case.image} "
                f"preprocesses to {tuple(pre.image.shape[1:])}; delete that folder and run again"
            )
        return predict_cached(adapter, cached.features, cfg.objective == "multiclass", cfg.slab, cfg.device, cfg.bf16)

    return probabilities


def network_probabilities(model: nn.Module, cfg: AdaptConfig) -> Callable[[Any, Any], torch.Tensor]:
    """`evaluate_queries`' probability function of an adapted network (`AdaptedNetwork`): the
    project's sliding-window inference (`predict_probabilities`), as `fseft predict` runs it."""
    from fseft.engine.inference import predict_probabilities

    inference = cfg.inference_config()
    return lambda case, pre: predict_probabilities(model, pre.image[None], inference)[0]


def evaluate_queries(
    probabilities: Callable[[Any, Any], torch.Tensor],
    query_cases: Sequence[Any],
    structures: Sequence[str],
    cfg: AdaptConfig,
    preprocess_cfg: Any,
    predictions_dir: Path | None = None,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Segment each query and score it in native geometry.

    probabilities: ``(case, PreprocessedCase) -> (S, X', Y', Z')`` per-structure probabilities
    in model space (`cached_probabilities` or `network_probabilities`).
    Probabilities are resampled to the scan's grid (linear), then thresholded (or argmax for
    multiclass) and reduced to each structure's largest component; Dice / NSD / HD95 by
    `fseft.evaluation.metrics.evaluate_masks` (NaN written as null).
    """
    from tqdm.auto import tqdm

    from fseft.data.io import write_mask
    from fseft.data.preprocessing import preprocess, to_native
    from fseft.engine.inference import merge_masks
    from fseft.evaluation.metrics import evaluate_masks

    multiclass = cfg.objective == "multiclass"
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for case in tqdm(query_cases, desc="evaluate queries", unit="case", disable=not cfg.progress):
        image, gt = case.load(structures)
        pre = preprocess(image, None, preprocess_cfg)
        probs = probabilities(case, pre)
        masks = _masks(to_native(probs, pre, mode="linear"), cfg, multiclass, structures)
        scores = evaluate_masks(masks, gt.array, gt.spacing, structures)
        results[case.case_id] = {
            s: {m: _finite_or_none(v) for m, v in vals.items()} for s, vals in scores.items()
        }
        if predictions_dir is not None:  # the label map `fseft predict` writes (first structure keeps overlaps)
            write_mask(merge_masks(masks), image, predictions_dir / f"{case.case_id}.nii.gz",
                       label_map={s + 1: name for s, name in enumerate(structures)})
    return results


# ---------------------------------------------------------------------------- the run


def describe_base(model: str | os.PathLike | nn.Module) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """``(arch, arch_kwargs, class_names)`` of a base model without reading its weights: from a
    model object, an fseft model file's metadata, or the zoo (the metadata of the id's weights
    file when that is an fseft model file, else the zoo's spec)."""
    from fseft.models.checkpoint import read_model_file_config
    from fseft.models.zoo import MODEL_SPECS, find_weights, get_spec

    if isinstance(model, nn.Module):
        return str(model.arch), dict(model.arch_kwargs), tuple(model.class_names)
    text = str(model)
    if text in MODEL_SPECS:
        spec = MODEL_SPECS[text]
        weights = find_weights(spec)
        config = read_model_file_config(weights) if weights is not None and weights.suffix == ".safetensors" else None
        if config is None:
            if spec.class_names is None:
                raise InputFileError(f"model {text!r}: its weights file (which gives its classes) is not there; see `fseft models`")
            return spec.arch, dict(spec.arch_kwargs), tuple(spec.class_names)
    else:
        if not Path(text).exists():
            get_spec(text)  # ConfigError: neither a zoo id nor a file
        config = read_model_file_config(text)
        if config is None:
            raise InputFileError(f"{text}: a safetensors file without fseft metadata (not written by save_model_file)")
    return str(config["arch"]), dict(config["arch_kwargs"]), tuple(config["class_names"])


def _load_base(
    model: str | os.PathLike | nn.Module, device: str, *, fresh: bool = False, grad_checkpointing: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The base model and how to find it again: zoo id and/or model file, with the file's
    SHA-256 (`load_adapted_model` checks the weights fingerprint as well).

    fresh: a model object is copied (a network method changes its base in place).
    grad_checkpointing: load a Swin-UNETR with ``use_checkpoint=True``.
    """
    if isinstance(model, nn.Module):
        if grad_checkpointing:
            raise ConfigError("grad_checkpointing: build the model object with use_checkpoint=True, "
                              "or adapt from a model file or zoo id")
        base = (copy.deepcopy(model) if fresh else model).to(device)
        ref: dict[str, Any] = {"id": None, "path": None, "file_sha256": None}
    else:
        from fseft.models.zoo import MODEL_SPECS, load_model

        text = str(model)
        overrides = {}
        if grad_checkpointing:
            arch = describe_base(text)[0]
            if arch != "swin_unetr":
                raise ConfigError(f"--grad-checkpointing: only Swin-UNETR models have it, {text} is a {arch}")
            overrides["use_checkpoint"] = True
        base = load_model(text, device=device, **overrides)
        is_id = text in MODEL_SPECS
        weights = (getattr(base, "model_config", None) or {}).get("weights") if is_id else text
        path = Path(weights).expanduser().resolve() if weights else None
        ref = {
            "id": text if is_id else None,
            "path": str(path) if path else None,
            "file_sha256": file_sha256(path) if path and path.is_file() else None,
        }
    base.eval().requires_grad_(False)
    return base, ref


def _check_windows(base: nn.Module, cfg: AdaptConfig, network: bool) -> None:
    """The sliding window (and, for network methods, the training patch) against the
    architecture, before any data is read."""
    windows = [("--roi-size", cfg.inference_config().for_model(base).roi_size)]
    if network:
        windows.append(("--patch-size", cfg.patch_size))
    check = getattr(type(base), "check_window", None)
    for option, size in windows if check is not None else ():
        try:
            check(size)
        except ValueError as exc:
            raise ConfigError(f"{option} {' '.join(map(str, size))} does not fit this model: {exc}") from exc


def _check_known_structures(spec: Any, structures: Sequence[str], class_names: Sequence[str]) -> None:
    from fseft.data.structures import UnknownStructureError

    if spec.config_cls.needs_known_structures:
        unknown = [s for s in structures if s not in class_names]
        if unknown:
            raise UnknownStructureError(
                f"method {spec.name!r} evaluates the model's own head, which has no output for "
                f"{', '.join(unknown)}; its classes are: {', '.join(class_names)}. "
                "Train an adapter for new structures (--method lp or spatial-adapter)."
            )


def _structures(structures: Sequence[str] | str) -> tuple[str, ...]:
    """Canonical names; a name outside the catalogue is a new structure, but a near-miss of a
    catalogued one (``livr``) is most likely a typo, and is said."""
    import logging

    from fseft.data.structures import canonical_names, did_you_mean, is_known

    names = canonical_names(structures)
    if not names:
        raise ConfigError("adapt: no structure given (--structures NAME[,NAME...])")
    for name in names:
        hint = "" if is_known(name) else did_you_mean(name)
        if hint:
            logging.getLogger(__name__).warning(
                "structure %r is not in the catalogue%s; it is treated as a new structure", name, hint)
    return names


def adapt(
    model: str | os.PathLike | nn.Module,
    data: str | os.PathLike,
    structures: Sequence[str] | str,
    k: int,
    seed: int,
    out: str | os.PathLike,
    cfg: AdaptConfig | None = None,
    partition: tuple[Sequence[str], Sequence[str]] | None = None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Few-shot adaptation of a model to `structures` with `k` support volumes of `data`.

    overwrite: False refuses an `out` that already holds a run (`ConfigError`, before any
    work: ``fseft adapt`` without ``--overwrite``); True replaces it, its old ``predictions/``
    removed so that the two runs never mix.

    model: zoo id, fseft model file, or a `SegmentationModel` (never changed: network methods
    train a copy). data: a dataset folder (`open_dataset`). The task (support / query split) is
    `FewShotTask.sample(dataset, structures, k, seed, cfg.n_query, partition=partition)`
    (`partition`: ``(train ids, test ids)``, support drawn from train, queries from test, so that
    every k is scored on the same queries). The method's kind decides
    the training: ``"features"`` methods on cached frozen features (`train_adapter`),
    ``"network"`` methods on image patches through the network (`train_network`). Writes the
    run folder `out` (see module docstring) and returns the metrics dict also written to
    ``metrics.json``.
    """
    from fseft.data.datasets import check_cases, open_dataset
    from fseft.data.tasks import FewShotTask
    from fseft.methods import get_method
    from fseft.utils import seed_everything

    cfg = (cfg or AdaptConfig()).resolved()
    spec = get_method(cfg.method)
    spec.make_config(**cfg.method_options)  # option errors before any heavy work
    cfg.inference_config()  # the device (is CUDA there?) and window settings, likewise
    if cfg.bf16:
        from fseft.engine.inference import warn_if_bf16_is_emulated

        warn_if_bf16_is_emulated(torch.device(cfg.device))
    names = _structures(structures)
    network = spec.kind == "network"
    if network and cfg.transductive:
        raise ConfigError(
            f"the transductive size constraint (--ti) trains on cached query features; method "
            f"{cfg.method!r} is trained through the network"
        )
    out = Path(out)
    _claim_run_folder(out, overwrite)
    if cfg.epochs == 0 and spec.config_cls.trainable:
        import logging

        logging.getLogger(__name__).warning("epochs = 0: %s is not trained; the queries are scored with its "
                                            "initial weights", cfg.method)
    dataset = open_dataset(data)
    task = FewShotTask.sample(dataset, names, k, seed, cfg.n_query, partition=partition, cache_dir=cfg.cache_dir)
    # every case the run reads, queries included, before the first step: a bad query found
    # after training would cost the whole run
    check_cases([dataset.case(c) for c in (*task.support, *task.query)], names, progress=cfg.progress)
    base, base_ref = _load_base(model, cfg.device, fresh=network, grad_checkpointing=network and cfg.grad_checkpointing)
    _check_known_structures(spec, names, base.class_names)
    if cfg.patch_size is None:
        from fseft.engine.inference import DEFAULT_ROI_SIZE, recommended_roi_size

        cfg = dataclasses.replace(cfg, patch_size=recommended_roi_size(base) or DEFAULT_ROI_SIZE)
    _check_windows(base, cfg, network)
    seed_everything(seed)
    run = _adapt_network if network else _adapt_features
    return run(base, base_ref, dataset, task, names, cfg, out)


RUN_FILES = (METRICS_FILE, ADAPTER_WEIGHTS, ADAPTER_CONFIG, "predictions")


def _claim_run_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier run unless `overwrite`; then remove its predictions
    and metrics (the new run writes the rest over the old files)."""
    import shutil

    held = [name for name in RUN_FILES if (out / name).exists()]
    if not held:
        return
    if not overwrite:
        raise ConfigError(f"{out} already holds a run ({', '.join(held)}); pass --overwrite to replace it, "
                          "or choose another --out")
    shutil.rmtree(out / "predictions", ignore_errors=True)
    (out / METRICS_FILE).unlink(missing_ok=True)


def _metrics(cfg: AdaptConfig, names: Sequence[str], task: Any, trainable: int, result: TrainResult,
             per_case: dict[str, Any]) -> dict[str, Any]:
    """`metrics.json` (the same keys for every method)."""
    return {
        "method": cfg.method,
        "structures": list(names),
        "k": int(task.k),
        "seed": int(task.seed),
        "trainable_params": int(trainable),
        "train_seconds": round(result.seconds, 3),
        "queries": per_case,
        "mean": _mean_metrics(per_case, names),
    }


def _training_record(result: TrainResult) -> dict[str, Any]:
    return {"epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
            "losses": [round(v, 6) for v in result.losses], "ti_losses": [round(v, 6) for v in result.ti_losses]}


def _adapt_features(base: nn.Module, base_ref: dict[str, Any], dataset: Any, task: Any, names: tuple[str, ...],
                    cfg: AdaptConfig, out: Path) -> dict[str, Any]:
    """`adapt` for a ``"features"`` method: the base stays frozen, the adapter trains on its
    cached features."""
    from safetensors.torch import save_file

    from fseft.engine.feature_cache import FeatureCache
    from fseft.methods import count_trainable_parameters, foreground_fractions, get_method
    from fseft.utils import atomic_path, write_json

    spec = get_method(cfg.method)
    preprocess_cfg = _stored_preprocess(base)
    cache = FeatureCache(base, preprocess_cfg, cfg.cache_dir, cfg.inference_config())
    trainable = spec.config_cls.trainable and cfg.epochs > 0
    support, queries = [], []
    if trainable:
        support = [
            (c.features, c.labels)
            for c in (cache.load(case, names) for case in task.support_cases(dataset))
        ]
        if cfg.transductive:
            queries = [cache.load(case).features for case in task.query_cases(dataset)]
    foreground = foreground_fractions([lab for _, lab in support]) if support else None
    adapter = build_method_adapter(cfg, base, names, foreground).to(cfg.device)
    result = train_adapter(adapter, support, cfg, task.seed, queries) if trainable else TrainResult(0, [], [], 0.0, False)

    predictions = out / "predictions" if cfg.save_predictions else None
    per_case = evaluate_queries(cached_probabilities(adapter, cache, cfg), task.query_cases(dataset), names, cfg,
                                preprocess_cfg, predictions)
    n_trainable = count_trainable_parameters(adapter) if spec.config_cls.trainable else 0
    metrics = _metrics(cfg, names, task, n_trainable, result, per_case)
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
        "training": _training_record(result),
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in adapter.state_dict().items()}
    with atomic_path(out / ADAPTER_WEIGHTS, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"fseft_adapter": json.dumps({"method": cfg.method})})
    write_json(out / ADAPTER_CONFIG, adapter_config)
    write_json(out / METRICS_FILE, metrics)
    return metrics


def probe_head(base: nn.Module, preprocess_cfg: Any, dataset: Any, task: Any, names: tuple[str, ...],
               cfg: AdaptConfig) -> nn.Module:
    """A linear probe (the ``lp`` method with its protocol) fitted on the frozen base's cached
    features of the support: the head a network method starts from with `cfg.head_warmup`.

    LP-FT (Kumar et al., ICLR 2022): fine-tuning behind a random or mismatched head first
    spends its large early gradients distorting the pre-trained features; a head that already
    fits them leaves fine-tuning to refine. Costs one `lp` run (features cached as `lp`'s).
    """
    from fseft.engine.feature_cache import FeatureCache
    from fseft.methods import foreground_fractions

    cache = FeatureCache(base, preprocess_cfg, cfg.cache_dir, cfg.inference_config())
    support = [(c.features, c.labels) for c in (cache.load(case, names) for case in task.support_cases(dataset))]
    lp_cfg = dataclasses.replace(cfg, method="lp", method_options={}, epochs=None, lr=None, batch_size=None,
                                 patches_per_volume=None, max_steps=None, transductive=False).resolved()
    probe = build_method_adapter(lp_cfg, base, names, foreground_fractions([lab for _, lab in support]))
    train_adapter(probe.to(cfg.device), support, lp_cfg, task.seed)
    return probe.cpu()


def _adapt_network(base: nn.Module, base_ref: dict[str, Any], dataset: Any, task: Any, names: tuple[str, ...],
                   cfg: AdaptConfig, out: Path) -> dict[str, Any]:
    """`adapt` for a ``"network"`` method: `apply_method` on the base, training on patches of
    the preprocessed support volumes, evaluation by sliding-window inference. The run folder's
    ``adapter_config.json`` / ``adapter_model.safetensors`` are `save_adapter`'s (peft's format
    for ``lora``), the run's information in their record's ``extra``."""
    from fseft.data.preprocessing import preprocess
    from fseft.engine.encoder_cache import EncoderCache, split_point_for
    from fseft.engine.feature_cache import model_fingerprint
    from fseft.engine.sampling import plain_tensor
    from fseft.methods.adapter_io import save_adapter
    from fseft.methods import foreground_fractions, init_head_prior
    from fseft.methods.arena import effective_ranks
    from fseft.methods.peft_methods import apply_method, count_trainable, unwrap
    from fseft.utils import write_json

    multiclass = cfg.objective == "multiclass"
    preprocess_cfg = _stored_preprocess(base)
    base_info = {**base_ref, "fingerprint": model_fingerprint(base), "class_names": list(base.class_names)}
    probe = probe_head(base, preprocess_cfg, dataset, task, names, cfg) if cfg.head_warmup and cfg.epochs > 0 else None
    model = apply_method(base, cfg.method, names, multiclass=multiclass, **cfg.method_options)
    support = []
    if cfg.epochs > 0:
        for case in task.support_cases(dataset):
            image, labels = case.load(names)
            pre = preprocess(image, labels, preprocess_cfg)
            support.append({"image": pre.image, "label": pre.label})
    if probe is not None:
        with torch.no_grad():  # every copy of the head (peft keeps the original beside the trained one)
            for conv in (m for m in unwrap(model).head.modules() if isinstance(m, nn.Conv3d)):
                conv.weight.copy_(probe.head.weight)
                conv.bias.copy_(probe.head.bias)
    elif support and cfg.head_prior:
        init_head_prior(unwrap(model).head, model.fseft_method["head_rows"],
                        foreground_fractions([plain_tensor(v["label"]).numpy() for v in support]), multiclass)
    encoder_cache = None
    point = split_point_for(model) if cfg.encoder_cache and support else None
    if point is not None:
        encoder_cache = EncoderCache(model, point, base_info["fingerprint"], cfg.cache_dir, cfg.device)
    result = train_network(model, support, cfg, task.seed, encoder_cache)

    adapted = AdaptedNetwork(model, names, multiclass, preprocess_cfg).eval()
    predictions = out / "predictions" if cfg.save_predictions else None
    per_case = evaluate_queries(network_probabilities(adapted, cfg), task.query_cases(dataset), names, cfg,
                                preprocess_cfg, predictions)
    metrics = _metrics(cfg, names, task, count_trainable(model), result, per_case)
    ranks = effective_ranks(model)
    if ranks:
        metrics["effective_ranks"] = ranks
    if encoder_cache is not None:
        metrics["encoder_cache"] = {"point": encoder_cache.point, "patches_computed": encoder_cache.misses,
                                    "patches_reused": encoder_cache.hits}
    save_adapter(model, out, extra={
        "base_model": base_info,
        "objective": cfg.objective,
        "preprocess": preprocess_cfg.to_dict(),
        "hyperparameters": cfg.to_dict(),
        "task": task.to_dict(),
        "training": _training_record(result),
    })
    write_json(out / METRICS_FILE, metrics)
    return metrics


def count_parameters(
    model: str | os.PathLike | nn.Module, structures: Sequence[str] | str, cfg: AdaptConfig | None = None
) -> dict[str, Any]:
    """Trainable parameters of `cfg.method` on `model` for `structures`, without reading
    weights or data and without training (`fseft adapt --dry-run`).

    Returns ``{"method", "kind", "arch", "structures", "trainable", ...}`` with, for network
    methods, `parameter_breakdown`'s ``head``, ``encoder_method``, ``decoder``,
    ``total_model``; for feature methods ``head``, ``adapter`` (the trunk) and ``total_model``
    (the base network without its head, plus the adapter).
    """
    from fseft.methods import build_adapter, count_trainable_parameters, get_method
    from fseft.methods.peft_methods import count_method_parameters, empty_weights
    from fseft.models.zoo import create_model

    cfg = cfg or AdaptConfig()
    spec = get_method(cfg.method)
    mcfg = spec.make_config(**cfg.method_options)
    names = _structures(structures)
    arch, arch_kwargs, class_names = describe_base(model)
    _check_known_structures(spec, names, class_names)
    multiclass = cfg.objective == "multiclass"
    if spec.kind == "network":
        counts = count_method_parameters(arch, cfg.method, names, class_names, multiclass=multiclass,
                                         arch_kwargs=arch_kwargs, **cfg.method_options)
    else:
        if isinstance(model, nn.Module):
            base = model
        else:
            with empty_weights():
                base = create_model(arch, class_names, **arch_kwargs)
        adapter = build_adapter(mcfg, base.feature_channels, len(names) + int(multiclass))
        trainable = count_trainable_parameters(adapter) if mcfg.trainable else 0
        head = count_trainable_parameters(adapter.head) if mcfg.trainable else 0
        network = sum(p.numel() for p in base.parameters()) - sum(p.numel() for p in base.head.parameters())
        counts = {"trainable": trainable, "head": head, "adapter": trainable - head,
                  "total_model": network + sum(p.numel() for p in adapter.parameters())}
    return {"method": cfg.method, "kind": spec.kind, "arch": arch, "structures": list(names), **counts}


# ---------------------------------------------------------------------------- loading


def _structure_logits(logits: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """Per-structure logits whose sigmoid is the structure's probability: the logits
    themselves (sigmoid objective), or ``logit(softmax)`` without the background (multiclass)."""
    if not multiclass:
        return logits
    probs = torch.softmax(logits.float(), dim=1)[:, 1:].clamp(1e-7, 1 - 1e-7)
    return torch.logit(probs)


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
        return _structure_logits(self.head(self.features(x)), self.multiclass)

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


class AdaptedNetwork(nn.Module):
    """A network method's adapted model (trained, or `adapter_io.load_adapted`, or merged) for
    inference: `class_names` (the run's structures), `preprocess`, and ``forward(x)`` =
    per-structure logits ``(B, S, D, H, W)`` (multiclass: ``logit(softmax)``, as `AdaptedModel`).
    `adapt` evaluates the queries with this very module, so `fseft predict --adapter`
    reproduces the evaluated predictions."""

    arch = "adapted"

    def __init__(self, network: nn.Module, structures: Sequence[str], multiclass: bool, preprocess: Any = None) -> None:
        super().__init__()
        self.network = network
        self.class_names = tuple(structures)
        self.multiclass = bool(multiclass)
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _structure_logits(self.network(x), self.multiclass)


def _run_method(run_dir: Path) -> tuple[str, str]:
    """``(method, kind)`` of a run folder, from its ``adapter_model.safetensors`` metadata
    (``fseft``: `adapter_io`'s record of a network method; ``fseft_adapter``: a feature adapter)."""
    from safetensors import SafetensorError, safe_open

    from fseft.methods import get_method

    path = run_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise InputFileError(f"{path}: not found; is {run_dir} an `fseft adapt` run folder?")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise InputFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        method = json.loads(metadata["fseft"] if "fseft" in metadata else metadata["fseft_adapter"])["method"]
        return method, get_method(method).kind
    except (KeyError, json.JSONDecodeError, TypeError, ConfigError) as exc:
        raise InputFileError(f"{path}: no fseft adapter record in its metadata ({exc}); "
                             f"is {run_dir} an `fseft adapt` run folder?") from exc


def _load_recorded_base(base_info: dict[str, Any], record_path: Path, run_dir: Path, device: str | torch.device) -> nn.Module:
    """The base model a run recorded (zoo id or model file), checked against its weights
    fingerprint, in eval mode."""
    from fseft.engine.feature_cache import model_fingerprint
    from fseft.models.zoo import load_model

    try:
        model_id, model_path, fingerprint = base_info["id"], base_info["path"], base_info["fingerprint"]
    except (KeyError, TypeError) as exc:
        raise InputFileError(f"{record_path}: incomplete base model record ({exc})") from exc
    if model_id is None and model_path is None:
        raise InputFileError(
            f"{record_path}: the adapter was trained on an in-memory model (no zoo id or model file "
            "recorded); save the base model with save_model_file and adapt from that file"
        )
    ref = model_id or model_path
    base = load_model(model_id, weights=model_path, device=str(device)) if model_id else load_model(model_path, device=str(device))
    if model_fingerprint(base) != fingerprint:
        raise InputFileError(f"{ref}: its weights differ from those the adapter in {run_dir} was trained on")
    return base.eval().requires_grad_(False)


def load_adapted_model(
    run_dir: str | os.PathLike, device: str | torch.device = "cpu", merge: bool = False
) -> AdaptedModel | AdaptedNetwork:
    """Rebuild base model + trained adaptation from an `fseft adapt` run folder, in eval mode.

    The base model is loaded from the recorded zoo id or file and checked against the recorded
    weights fingerprint (`InputFileError` if the file changed since the run). Feature-adapter
    runs give an `AdaptedModel`; network runs an `AdaptedNetwork` around
    `fseft.methods.adapter_io.load_adapted`, with `merge` folding LoRA / ARENA updates into the
    base weights (`adapter_io.merge`; a `ConfigError` for feature-adapter runs).
    """
    run_dir = Path(run_dir)
    method, kind = _run_method(run_dir)
    if kind == "network":
        return _load_network_run(run_dir, device, merge)
    if merge:
        raise ConfigError(f"{run_dir}: merging folds LoRA / ARENA updates into the base weights; this run "
                          f"trained a feature adapter ({method}), which has nothing to merge")
    return _load_features_run(run_dir, device)


def _load_network_run(run_dir: Path, device: str | torch.device, merge: bool) -> AdaptedNetwork:
    from fseft.data.preprocessing import PreprocessConfig
    from fseft.methods import adapter_io

    record = adapter_io.read_adapter_record(run_dir)
    extra = record.get("extra") or {}
    weights_path = run_dir / ADAPTER_WEIGHTS
    if "base_model" not in extra or "preprocess" not in extra:
        raise InputFileError(f"{weights_path}: no base model recorded (not written by `fseft adapt`); "
                             "load it onto its base with fseft.methods.adapter_io.load_adapted")
    base = _load_recorded_base(extra["base_model"], weights_path, run_dir, device)
    model = adapter_io.load_adapted(base, run_dir)
    if merge:
        model = adapter_io.merge(model)
    preprocess = PreprocessConfig.from_dict(extra["preprocess"])
    return AdaptedNetwork(model, record["structures"], record["multiclass"], preprocess).to(device).eval()


def _load_features_run(run_dir: Path, device: str | torch.device) -> AdaptedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fseft.data.preprocessing import PreprocessConfig
    from fseft.models.checkpoint import require_finite_tensors

    cfg_path, weights_path = run_dir / ADAPTER_CONFIG, run_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise InputFileError(f"{cfg_path}: not found; is {run_dir} an `fseft adapt` run folder?")
    try:
        config = json.loads(cfg_path.read_text())
        base_info = config["base_model"]
        structures = config["structures"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputFileError(f"{cfg_path}: not a valid adapter config ({exc})") from exc
    base = _load_recorded_base(base_info, cfg_path, run_dir, device)
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
    require_finite_tensors(state, weights_path)
    preprocess = PreprocessConfig.from_dict(config["preprocess"])
    model = AdaptedModel(base, adapter, structures, config["objective"] == "multiclass", preprocess)
    return model.to(device).eval()
