"""The settings of one adaptation run (`AdaptConfig`), as `fseft adapt`'s options, an
experiment's ``adapt`` section and a run record's ``hyperparameters`` spell them.

Which fields a run reads depends on the method's kind (`fseft.methods.MethodSpec.kind`):
- every run: method, method_options (the method's config fields), objective, loss, the
  protocol (epochs, max_steps, patience, min_delta, lr, weight_decay, warmup_epochs,
  batch_size), the training crops (patch_size, patches_per_volume, pos_ratio), head_prior,
  n_query, cache_dir, save_predictions, and `inference` (`INFERENCE_OPTIONS`);
- feature methods (lp, generalization, spatial-adapter): transductive / ti (the size
  constraint on the queries), slab;
- network methods (ft, decoder, lora, ...): head_warmup, augment, grad_checkpointing,
  encoder_cache, encoder_pool_epochs;
- ``method="auto"``: candidates, auto_budget (`AUTO_OPTIONS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fseft.errors import ConfigError
from fseft.inference.sliding_window import InferenceConfig
from fseft.methods import get_method
from fseft.methods.transductive import TransductiveConfig
from fseft.training.fit import LOSSES, FitSettings

AUTO = "auto"
#: `AdaptConfig` fields that belong to ``method="auto"`` alone
AUTO_OPTIONS = ("candidates", "auto_budget")
OBJECTIVES = ("sigmoid", "multiclass")
#: `InferenceConfig` fields an `AdaptConfig` takes and reads as its own (its `inference`)
INFERENCE_OPTIONS = ("roi_size", "overlap", "sw_batch_size", "threshold", "largest_component", "device", "bf16",
                     "progress")


@dataclass(init=False)
class AdaptConfig:
    """Hyper-parameters of one adaptation run (defaults: the FSEFT reference protocol).

    method / method_options: a registered method (`fseft.methods.available_methods()`) and
        its config fields (e.g. ``{"kernel_size": 1}`` for the MLP-adapter ablation), or
        ``"auto"``: chosen among `candidates` on the support set (`fseft.adaptation.method_choice`).
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
        frozen features of the support (LP-FT, `fseft.adaptation.network_runner.probe_head`); None:
        the method's default (`MethodConfig.warms_up_head`: on for pre-trained bases, off for
        scratch and a new decoder).
    n_query: number of query cases (None: every eligible case not in the support set).
    candidates / auto_budget: ``method="auto"`` only (`fseft.adaptation.method_choice`): the methods to choose
        among (names such as ``lp``, ``spatial-adapter+ti``, ``lora+dec``; None: the default four)
        and the optimiser steps all their leave-one-out runs share (None: 2,000).
    inference: how the run computes features and predictions (an `InferenceConfig`): its
        `roi_size` / `overlap` / `sw_batch_size` (the sliding window of the cached features and
        of inference), `threshold` / `largest_component` (post-processing of the query
        predictions), `device`, `bf16` (bfloat16 autocast, training too) and `progress` are
        given and read as this config's own (``AdaptConfig(device="cuda")``, ``cfg.device``;
        `INFERENCE_OPTIONS`); a CUDA device is checked when the run starts (`inference_config`).
    slab: slices per slab when an adapter runs over a whole cached volume.
    grad_checkpointing: network methods load a Swin-UNETR base with ``use_checkpoint=True``
        (less memory, slower).
    augment: network methods' patches get random intensity scaling (+-10 %, p = 0.1) and shifts
        (+-0.1, p = 0.5), no flips or rotations (they put a left organ where the right one was);
        off by default, so that every method sees the data the cached-feature methods see.
    encoder_cache / encoder_pool_epochs: a network method whose trainable weights all lie
        after a split point of the architecture (``decoder``, ``ft-last``) trains on cached
        outputs of the frozen encoder (`fseft.adaptation.encoder_cache`), for the distinct patches
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
    slab: int = 32
    cache_dir: str | None = None
    grad_checkpointing: bool = False
    augment: bool = False
    encoder_cache: bool = True
    encoder_pool_epochs: int = 2
    save_predictions: bool = False
    candidates: tuple[Any, ...] | None = None
    auto_budget: int | None = None
    inference: InferenceConfig = field(default_factory=lambda: InferenceConfig(check_device=False))

    def __init__(self, **options: Any) -> None:
        """Keyword options: the fields, and the `INFERENCE_OPTIONS` (into `inference`)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - names - set(INFERENCE_OPTIONS))
        if unknown:
            raise TypeError(f"AdaptConfig got unexpected option(s) {', '.join(unknown)}")
        for f in dataclasses.fields(self):
            if f.name in options:
                setattr(self, f.name, options[f.name])
            else:
                setattr(self, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        given = {k: options[k] for k in INFERENCE_OPTIONS if k in options}
        if given.get("roi_size") is not None:
            given["roi_size"] = _triple(given["roi_size"], "roi_size")
        self.inference = dataclasses.replace(self.inference, check_device=False, **given)
        self.__post_init__()

    def __post_init__(self) -> None:
        self.patch_size = None if self.patch_size is None else _triple(self.patch_size, "patch_size")
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
        if self.method != AUTO and any(getattr(self, name) is not None for name in AUTO_OPTIONS):
            raise ConfigError("--candidates and --auto-budget are options of --method auto")
        if self.candidates is not None:
            self.candidates = tuple(self.candidates)
        if self.auto_budget is not None and (isinstance(self.auto_budget, bool) or int(self.auto_budget) < 1):
            raise ConfigError(f"--auto-budget must be a number of optimiser steps >= 1, got {self.auto_budget!r}")

    def resolved(self) -> AdaptConfig:
        """This config with every protocol field left at None (epochs, lr, batch_size,
        patches_per_volume) set to the method's default (`MethodConfig.default_*`), and
        `head_warmup` to `MethodConfig.warms_up_head`."""

        if self.method == AUTO:  # each candidate resolves its own protocol
            return self
        protocol = get_method(self.method).config_cls
        defaults = {"epochs": protocol.default_epochs, "lr": protocol.default_lr,
                    "batch_size": protocol.default_batch_size,
                    "patches_per_volume": protocol.default_patches_per_volume}
        missing = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.head_warmup is None:
            missing["head_warmup"] = get_method(self.method).make_config(**self.method_options).warms_up_head()
        return dataclasses.replace(self, **missing) if missing else self

    @classmethod
    def option_names(cls) -> list[str]:
        """Every keyword option (the fields but `inference`, then `INFERENCE_OPTIONS`): the keys
        of an experiment file's ``adapt`` section and of ``hyperparameters`` in a run record."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "inference"] + list(INFERENCE_OPTIONS)

    def to_dict(self) -> dict[str, Any]:
        """The options (`option_names`) as JSON values: what a run records of its settings."""
        out = dataclasses.asdict(self)
        inference = out.pop("inference")
        out.update({name: inference[name] for name in INFERENCE_OPTIONS})
        out["patch_size"] = None if self.patch_size is None else list(self.patch_size)
        out["roi_size"] = None if self.roi_size is None else list(self.roi_size)
        return out

    def fit_settings(self) -> FitSettings:
        """What the training loop (`fseft.training.fit.fit`) reads of this config, resolved."""
        cfg = self.resolved()
        return FitSettings(
            epochs=int(cfg.epochs), max_steps=cfg.max_steps, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay),
            warmup_epochs=int(cfg.warmup_epochs), batch_size=int(cfg.batch_size), patience=int(cfg.patience),
            min_delta=float(cfg.min_delta), loss=cfg.loss, multiclass=cfg.objective == "multiclass",
            bf16=bool(cfg.bf16), device=str(cfg.device), progress=bool(cfg.progress), desc=f"adapt {cfg.method}",
        )

    def inference_config(self) -> InferenceConfig:
        """`inference`, its device checked (`ConfigError` when CUDA is asked for and absent)."""
        return dataclasses.replace(self.inference)


def _inference_option(name: str) -> property:
    return property(lambda self: getattr(self.inference, name), doc=f"``inference.{name}``")


for _name in INFERENCE_OPTIONS:
    setattr(AdaptConfig, _name, _inference_option(_name))


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    vals = [value] * 3 if isinstance(value, int) else list(value)
    if len(vals) != 3 or min(int(v) for v in vals) < 1:
        raise ConfigError(f"{name} must be one or three positive integers, got {value!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]
