"""An `fseft adapt` run folder: the base model a run is made on, its record, and loading it
for inference.

Run folder: ``adapter_model.safetensors`` and ``adapter_config.json`` (the run format of
`fseft.methods.adapter_io`: the method's tensors and its record, with the run's information in
``extra``, `run_extra`), ``metrics.json`` and, with ``--save-predictions``,
``predictions/<case>.nii.gz``.

`load_adapted_model(run_dir)` reads the run record (`fseft.methods.adapter_io.read_run_record`,
every format fseft has written), loads the recorded base model (checked against its weights
fingerprint) and rebuilds the adaptation by the kind of the recorded method (the registry):
an `AdaptedModel` (feature adapter on the base features) or an `AdaptedNetwork` (a network
method on the base). `fseft predict --adapter` and `fseft adapt` itself use these modules, so a
run predicts what it was evaluated with. Both `fseft.engine.adapt` and
`fseft.engine.inference` import this module; it imports neither.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fseft.errors import ConfigError, InputFileError
from fseft.methods.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_run_record
from fseft.methods.registry import get_method

METRICS_FILE = "metrics.json"
#: what a run writes into its folder (an earlier run's are replaced, see `fseft.engine.adapt`)
RUN_FILES = (METRICS_FILE, ADAPTER_WEIGHTS, ADAPTER_CONFIG, "predictions")


def structure_logits(logits: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """Per-structure logits whose sigmoid is the structure's probability: the logits
    themselves (sigmoid objective), or ``logit(softmax)`` without the background (multiclass)."""
    if not multiclass:
        return logits
    probs = torch.softmax(logits.float(), dim=1)[:, 1:].clamp(1e-7, 1 - 1e-7)
    return torch.logit(probs)


class AdaptedModel(nn.Module):
    """Base model + feature adapter as one `SegmentationModel`-compatible module.

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
        return structure_logits(self.head(self.features(x)), self.multiclass)

    @torch.no_grad()
    def predict_volume(self, image: torch.Tensor, cfg: Any = None, slab: int = 32) -> torch.Tensor:
        """Probabilities ``(1, S, X, Y, Z)`` (CPU float32) of a preprocessed volume
        ``(1, 1, X, Y, Z)`` as `adapt` computes them: sliding-window base features
        (`InferenceConfig` `cfg`), then the adapter over the whole volume, slab by slab."""
        from fseft.engine.feature_cache import compute_features
        from fseft.engine.sliding_window import InferenceConfig
        from fseft.methods.features import predict_cached

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
        return structure_logits(self.network(x), self.multiclass)


# ---------------------------------------------------------------------------- the base model


def load_base(
    model: str | os.PathLike | nn.Module, device: str, *, fresh: bool = False, grad_checkpointing: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The base model of a run, frozen, and how to find it again (`model_reference`: zoo id
    and/or weights file, with the file's SHA-256; the run adds the weights fingerprint).

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
        from fseft.models.zoo import describe_model, load_model, model_reference

        text = str(model)
        overrides = {}
        if grad_checkpointing:
            arch = describe_model(text)[0]
            if arch != "swin_unetr":
                raise ConfigError(f"--grad-checkpointing: only Swin-UNETR models have it, {text} is a {arch}")
            overrides["use_checkpoint"] = True
        base = load_model(text, device=device, **overrides)
        ref = model_reference(text)
    base.eval().requires_grad_(False)
    return base, ref


def load_recorded_base(base_info: dict[str, Any], record_path: Path, run_dir: Path, device: str | torch.device) -> nn.Module:
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


def run_extra(base_info: dict[str, Any], cfg: Any, preprocess_cfg: Any, task: Any, result: Any) -> dict[str, Any]:
    """The run's information in its record (``extra``, `fseft.methods.adapter_io.RUN_KEYS`):
    the base model (`load_base`'s reference, weights fingerprint, classes), objective,
    transductive settings, preprocessing, hyper-parameters (`AdaptConfig`), task and training."""
    return {
        "base_model": base_info,
        "objective": cfg.objective,
        "transductive": dataclasses.asdict(cfg.ti) if cfg.transductive else None,
        "preprocess": preprocess_cfg.to_dict(),
        "hyperparameters": cfg.to_dict(),
        "task": task.to_dict(),
        "training": result.to_dict(),
    }


# ---------------------------------------------------------------------------- loading a run


def load_adapted_model(
    run_dir: str | os.PathLike, device: str | torch.device = "cpu", merge: bool = False
) -> AdaptedModel | AdaptedNetwork:
    """Rebuild base model + trained adaptation from an `fseft adapt` run folder, in eval mode.

    The base model is loaded from the recorded zoo id or file and checked against the recorded
    weights fingerprint (`InputFileError` if the file changed since the run). The recorded
    method's kind (the registry) decides the rest: feature-adapter runs give an `AdaptedModel`;
    network runs an `AdaptedNetwork` around `fseft.methods.adapter_io.load_adapted`, with
    `merge` folding the method into the base weights (its ``merge`` hook; a `ConfigError` for
    feature-adapter runs).
    """
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    try:
        kind = get_method(record["method"]).kind
    except ConfigError as exc:
        raise InputFileError(f"{run_dir / ADAPTER_WEIGHTS}: {exc}") from exc
    extra = record.get("extra") or {}
    if "base_model" not in extra or "preprocess" not in extra:
        raise InputFileError(f"{run_dir / ADAPTER_WEIGHTS}: no base model recorded (not written by `fseft adapt`); "
                             "load it onto its base with fseft.methods.adapter_io.load_adapted")
    return _LOADERS[kind](run_dir, record, device, merge)


def _load_network_run(run_dir: Path, record: dict[str, Any], device: str | torch.device, merge: bool) -> AdaptedNetwork:
    from fseft.data.preprocessing import PreprocessConfig
    from fseft.methods import adapter_io

    base = load_recorded_base(record["extra"]["base_model"], run_dir / ADAPTER_WEIGHTS, run_dir, device)
    model = adapter_io.load_adapted(base, run_dir)
    if merge:
        model = adapter_io.merge(model)
    preprocess = PreprocessConfig.from_dict(record["extra"]["preprocess"])
    return AdaptedNetwork(model, record["structures"], record["multiclass"], preprocess).to(device).eval()


def _load_features_run(run_dir: Path, record: dict[str, Any], device: str | torch.device, merge: bool) -> AdaptedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fseft.data.preprocessing import PreprocessConfig
    from fseft.methods.features import adapter_on
    from fseft.methods.registry import available_methods
    from fseft.models.checkpoint import require_finite_tensors

    if merge:
        mergeable = [name for name in available_methods() if get_method(name).merge is not None]
        raise ConfigError(f"{run_dir}: merging folds a network method's updates ({', '.join(mergeable)}) into the base "
                          f"weights; this run trained a feature adapter ({record['method']}), which has nothing to merge")
    weights_path = run_dir / ADAPTER_WEIGHTS
    base = load_recorded_base(record["extra"]["base_model"], weights_path, run_dir, device)
    adapter, _ = adapter_on(base, record["method"], dict(record["options"]), record["structures"], record["multiclass"])
    try:
        state = load_file(str(weights_path))
        adapter.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise InputFileError(f"{weights_path}: cannot load the adapter weights ({exc})") from exc
    require_finite_tensors(state, weights_path)
    preprocess = PreprocessConfig.from_dict(record["extra"]["preprocess"])
    model = AdaptedModel(base, adapter, record["structures"], record["multiclass"], preprocess)
    return model.to(device).eval()


_LOADERS: dict[str, Callable[..., nn.Module]] = {"features": _load_features_run, "network": _load_network_run}
