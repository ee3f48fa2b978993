"""Few-shot adaptation (`fseft adapt`): every registered method, one task protocol.

`adapt` draws the task (k support cases, the queries), loads the base model, and hands the run
to the runner of the method's kind (the registry's `MethodSpec.kind`):
`fseft.adaptation.feature_runner` (``"features"``: an adapter on cached frozen features) or
`fseft.adaptation.network_runner` (``"network"``: the method applied to a copy of the base, trained
through the network). Both train with the one loop of `fseft.training.fit` (same loss,
optimiser, schedule, early stopping) and calling the method's hooks, then score the queries
the same way (`fseft.adaptation.query_scoring`: threshold + largest connected component, in their
native geometry) and write the same ``metrics.json``.

Reference protocol (the FSEFT authors' run commands, ``../shared/protocols.md``): AdamW, one
warm-up epoch then cosine decay, one support volume per iteration with 6 patches of 96^3, and
per method its learning rate and epochs (`MethodConfig.default_*`: lp 1e-1 for 50 epochs,
spatial adapter and ft-last 1e-2 for 100, ft and scratch 1e-4 with 2 volumes of 3 patches,
encoder PEFT 1e-3 for 100), early stopping after 20 epochs without progress.

Run folder: see `fseft.runs.load` (`load_adapted_model(run_dir)` rebuilds the adapted model
of either kind for inference).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fseft.adaptation.config import AUTO, AdaptConfig
from fseft.adaptation.executor import ExecutorConfig, torch_threads
from fseft.adaptation.feature_runner import run_features
from fseft.adaptation.method_choice import adapt_auto
from fseft.adaptation.network_runner import run_network
from fseft.data.datasets import check_cases, open_dataset
from fseft.data.structures import UnknownStructureError, canonical_names, did_you_mean, is_known
from fseft.data.tasks import FewShotTask
from fseft.errors import ConfigError
from fseft.inference.sliding_window import (
    DEFAULT_ROI_SIZE,
    check_bf16_training,
    recommended_roi_size,
    warn_if_bf16_is_emulated,
)
from fseft.methods import available_methods, build_adapter, count_trainable_parameters, get_method
from fseft.methods.peft_methods import count_method_parameters, empty_weights
from fseft.models.architectures import create_model
from fseft.models.zoo import describe_model
from fseft.runs.load import METRICS_FILE, RUN_FILES, load_base
from fseft.utils import seed_everything


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
    executor: ExecutorConfig | None = None,
) -> dict[str, Any]:
    """Few-shot adaptation of a model to `structures` with `k` support volumes of `data`.

    executor: ``method="auto"``: with ``workers``, the candidates' leave-one-out folds run as Ray
    tasks (`fseft.adaptation.executor`), else one after another here; each fold at
    ``cpus_per_run`` torch threads where set (the final training at this process's count, as with
    workers). Other methods: only ``cpus_per_run``, the run's torch threads; ``workers`` is a
    `ConfigError`.

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
    run folder `out` (`fseft.runs.load`) and returns the metrics dict also written to
    ``metrics.json``.
    """

    if cfg is not None and cfg.method == AUTO:
        names = _structures(structures)
        _claim_run_folder(Path(out), overwrite)
        return adapt_auto(adapt, model, data, names, k, seed, Path(out), cfg, partition=partition, executor=executor)
    if executor is not None and executor.distributed:
        raise ConfigError(f"--workers runs --method auto's leave-one-out folds in parallel; method "
                          f"{(cfg or AdaptConfig()).method!r} is one run (fseft benchmark --workers runs many)")
    if executor is not None and executor.cpus_per_run is not None:  # one run, one task: at its threads
        with torch_threads(executor.cpus_per_run):
            return adapt(model, data, structures, k, seed, out, cfg, partition=partition, overwrite=overwrite)
    cfg = (cfg or AdaptConfig()).resolved()
    spec = get_method(cfg.method)
    spec.make_config(**cfg.method_options)  # option errors before any heavy work
    cfg.inference_config()  # the device (is CUDA there?) and window settings, likewise
    if cfg.bf16:
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
        cfg = dataclasses.replace(cfg, patch_size=recommended_roi_size(base) or DEFAULT_ROI_SIZE)
    _check_windows(base, cfg, network)
    if network and cfg.bf16:
        check_bf16_training(type(base), cfg.patch_size, cfg.device)
    seed_everything(seed)
    return _runner(spec.kind)(base, base_ref, dataset, task, names, cfg, out)


def _runner(kind: str) -> Callable[..., dict[str, Any]]:
    """The adaptation of a method kind: ``run(base, base_ref, dataset, task, names, cfg, out)``."""
    if kind == "network":
        return run_network

    return run_features


def _claim_run_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier run unless `overwrite`; then remove its predictions
    and metrics (the new run writes the rest over the old files)."""

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
