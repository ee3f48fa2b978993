"""Few-shot adaptation (`fseft adapt`): every registered method, one task protocol.

`adapt` draws the task (k support cases, the queries), loads the base model, and hands the run
to the runner of the method's kind (the registry's `MethodSpec.kind`):
`fseft.engine.adapt_features` (``"features"``: an adapter on cached frozen features) or
`fseft.engine.adapt_network` (``"network"``: the method applied to a copy of the base, trained
through the network). Both train with the one loop of `fseft.engine.training` (same loss,
optimiser, schedule, early stopping) and calling the method's hooks, then score the queries
the same way (`fseft.engine.queries`: threshold + largest connected component, in their
native geometry) and write the same ``metrics.json``.

Reference protocol (the FSEFT authors' run commands, ``../shared/protocols.md``): AdamW, one
warm-up epoch then cosine decay, one support volume per iteration with 6 patches of 96^3, and
per method its learning rate and epochs (`MethodConfig.default_*`: lp 1e-1 for 50 epochs,
spatial adapter and ft-last 1e-2 for 100, ft and scratch 1e-4 with 2 volumes of 3 patches,
encoder PEFT 1e-3 for 100), early stopping after 20 epochs without progress.

Run folder: see `fseft.engine.runs` (`load_adapted_model(run_dir)` rebuilds the adapted model
of either kind for inference).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fseft.engine.auto import AUTO, AUTO_OPTIONS
from fseft.engine.sliding_window import InferenceConfig
from fseft.engine.training import LOSSES, FitSettings
from fseft.errors import ConfigError
from fseft.methods.transductive import TransductiveConfig

OBJECTIVES = ("sigmoid", "multiclass")
#: `InferenceConfig` fields an `AdaptConfig` takes and reads as its own (its `inference`)
INFERENCE_OPTIONS = ("roi_size", "overlap", "sw_batch_size", "threshold", "largest_component", "device", "bf16",
                     "progress")


@dataclass(init=False)
class AdaptConfig:
    """Hyper-parameters of one adaptation run (defaults: the FSEFT reference protocol).

    method / method_options: a registered method (`fseft.methods.available_methods()`) and
        its config fields (e.g. ``{"kernel_size": 1}`` for the MLP-adapter ablation), or
        ``"auto"``: chosen among `candidates` on the support set (`fseft.engine.auto`).
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
        frozen features of the support (LP-FT, `fseft.engine.adapt_network.probe_head`); None:
        the method's default (`MethodConfig.warms_up_head`: on for pre-trained bases, off for
        scratch and a new decoder).
    n_query: number of query cases (None: every eligible case not in the support set).
    candidates / auto_budget: ``method="auto"`` only (`fseft.engine.auto`): the methods to choose
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
        from fseft.methods import get_method

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
        """What the training loop (`fseft.engine.training.fit`) reads of this config, resolved."""
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


def _check_windows(base: nn.Module, cfg: AdaptConfig, network: bool) -> None:
    """The sliding window (and, for network methods, the training patch) against the
    architecture, before any data is read."""
    windows = [("--roi-size", cfg.inference.for_model(base).roi_size)]
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
    from fseft.methods import available_methods, get_method

    if spec.config_cls.needs_known_structures:
        unknown = [s for s in structures if s not in class_names]
        if unknown:
            adapters = [n for n in available_methods("features") if get_method(n).config_cls.trainable]
            raise UnknownStructureError(
                f"method {spec.name!r} evaluates the model's own head, which has no output for "
                f"{', '.join(unknown)}; its classes are: {', '.join(class_names)}. "
                f"Train an adapter for new structures (--method {' or '.join(adapters)})."
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
    executor: Any = None,
) -> dict[str, Any]:
    """Few-shot adaptation of a model to `structures` with `k` support volumes of `data`.

    executor: ``method="auto"`` only: an `fseft.engine.executor.ExecutorConfig` whose
    ``workers`` run the candidates' leave-one-out folds as Ray tasks (None: one after another).

    overwrite: False refuses an `out` that already holds a run (`ConfigError`, before any
    work: ``fseft adapt`` without ``--overwrite``); True replaces it, its old ``predictions/``
    removed so that the two runs never mix.

    model: zoo id, fseft model file, or a `SegmentationModel` (never changed: network methods
    train a copy). data: a dataset folder (`open_dataset`). The task (support / query split) is
    `FewShotTask.sample(dataset, structures, k, seed, cfg.n_query, partition=partition)`
    (`partition`: ``(train ids, test ids)``, support drawn from train, queries from test, so that
    every k is scored on the same queries). The method's kind decides
    the training: ``"features"`` methods on cached frozen features (`run_features`),
    ``"network"`` methods on image patches through the network (`run_network`). Writes the
    run folder `out` (`fseft.engine.runs`) and returns the metrics dict also written to
    ``metrics.json``.
    """
    from fseft.data.datasets import check_cases, open_dataset
    from fseft.data.tasks import FewShotTask
    from fseft.engine.runs import load_base
    from fseft.methods import get_method
    from fseft.utils import seed_everything

    if cfg is not None and cfg.method == AUTO:
        from fseft.engine.auto import adapt_auto

        names = _structures(structures)
        _claim_run_folder(Path(out), overwrite)
        return adapt_auto(adapt, model, data, names, k, seed, Path(out), cfg, partition=partition, executor=executor)
    if executor is not None and getattr(executor, "distributed", False):
        raise ConfigError(f"--workers runs --method auto's leave-one-out folds in parallel; method "
                          f"{(cfg or AdaptConfig()).method!r} is one run (fseft benchmark --workers runs many)")
    cfg = (cfg or AdaptConfig()).resolved()
    spec = get_method(cfg.method)
    spec.make_config(**cfg.method_options)  # option errors before any heavy work
    cfg.inference_config()  # the device (is CUDA there?) and window settings, likewise
    if cfg.bf16:
        from fseft.engine.sliding_window import warn_if_bf16_is_emulated

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
    base, base_ref = load_base(model, cfg.device, fresh=network, grad_checkpointing=network and cfg.grad_checkpointing)
    _check_known_structures(spec, names, base.class_names)
    if cfg.patch_size is None:
        from fseft.engine.sliding_window import DEFAULT_ROI_SIZE, recommended_roi_size

        cfg = dataclasses.replace(cfg, patch_size=recommended_roi_size(base) or DEFAULT_ROI_SIZE)
    _check_windows(base, cfg, network)
    if network and cfg.bf16:
        from fseft.engine.sliding_window import check_bf16_training

        check_bf16_training(type(base), cfg.patch_size, cfg.device)
    seed_everything(seed)
    return _runner(spec.kind)(base, base_ref, dataset, task, names, cfg, out)


def _runner(kind: str) -> Callable[..., dict[str, Any]]:
    """The adaptation of a method kind: ``run(base, base_ref, dataset, task, names, cfg, out)``."""
    if kind == "network":
        from fseft.engine.adapt_network import run_network

        return run_network
    from fseft.engine.adapt_features import run_features

    return run_features


def _claim_run_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier run unless `overwrite`; then remove its predictions
    and metrics (the new run writes the rest over the old files)."""
    import shutil

    from fseft.engine.runs import METRICS_FILE, RUN_FILES

    held = [name for name in RUN_FILES if (out / name).exists()]
    if not held:
        return
    if not overwrite:
        raise ConfigError(f"{out} already holds a run ({', '.join(held)}); pass --overwrite to replace it, "
                          "or choose another --out")
    shutil.rmtree(out / "predictions", ignore_errors=True)
    (out / METRICS_FILE).unlink(missing_ok=True)


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
    from fseft.models.architectures import create_model
    from fseft.models.zoo import describe_model

    cfg = cfg or AdaptConfig()
    if cfg.method == AUTO:
        raise ConfigError("--dry-run: --method auto chooses among its --candidates when it runs; "
                          "dry-run a candidate's method instead")
    spec = get_method(cfg.method)
    mcfg = spec.make_config(**cfg.method_options)
    names = _structures(structures)
    arch, arch_kwargs, class_names = describe_model(model)
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
