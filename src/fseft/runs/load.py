"""An `fseft adapt` run folder: the base model a run is made on, its record, and loading it
for inference.

Run folder: ``adapter_model.safetensors`` and ``adapter_config.json`` (the run format of
`fseft.runs.format`: the method's tensors and its record, with the run's information in
``extra``, `run_extra`), ``metrics.json`` and, with ``--save-predictions``,
``predictions/<case>.nii.gz``.

`load_adapted_model(run_dir)` reads the run record (`fseft.runs.format.read_run_record`,
every format fseft has written), loads the recorded base model (checked against its weights
fingerprint) and rebuilds the adaptation by the kind of the recorded method (the registry):
an `AdaptedModel` (feature adapter on the base features) or an `AdaptedNetwork` (a network
method on the base). `fseft predict --adapter` and `fseft adapt` itself use these modules, so a
run predicts what it was evaluated with. A run folder is a reusable model: copied anywhere, its
base is found again (`load_recorded_base`: the recorded file, a zoo id's current file, or the
one given with ``--model``). `list_runs` / `format_run_table` list the runs under a folder
(`fseft models --adapters DIR`). Both `fseft.adaptation.runner` and `fseft.prediction.segmenter` import
this module; it imports neither.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fseft.data.preprocessing import PreprocessConfig
from fseft.errors import ConfigError, InputFileError
from fseft.inference.feature_cache import compute_features, model_fingerprint
from fseft.inference.sliding_window import InferenceConfig
from fseft.methods.features import adapter_on, predict_cached
from fseft.methods.registry import available_methods, get_method
from fseft.models.checkpoint import require_finite_tensors
from fseft.models.zoo import (
    MODEL_SPECS,
    WEIGHTS_DIR_ENV,
    describe_model,
    find_weights,
    load_model,
    model_reference,
    weight_candidates,
)
from fseft.runs import format as run_format
from fseft.runs.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_run_record

METRICS_FILE = "metrics.json"
#: what a run writes into its folder (an earlier run's are replaced, see `fseft.adaptation.runner`)
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

        cfg = cfg or InferenceConfig()
        features = compute_features(self.base, image, cfg)[0]
        return predict_cached(self.adapter, features, self.multiclass, slab, cfg.device, cfg.bf16)[None]


class AdaptedNetwork(nn.Module):
    """A network method's adapted model (trained, or `fseft.runs.format.load_adapted`, or merged) for
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


#: how a run whose recorded base cannot be used is given its base model
_GIVE_BASE = ("give the base model with --model ID|PATH (in Python: load_adapted_model(run, base=...)); it is "
              "checked against the weights fingerprint the run recorded")


def load_recorded_base(
    base_info: dict[str, Any], record_path: Path, run_dir: Path, device: str | torch.device,
    base: str | os.PathLike | nn.Module | None = None, weights: str | os.PathLike | None = None,
) -> nn.Module:
    """The base model of a run, checked against its recorded weights fingerprint, in eval mode.

    The run folder may have been copied anywhere: nothing here depends on where it is or on the
    working directory. Which model:

    - `base` when given (a zoo id, with `weights` for its file; a model file; or a model object,
      copied): the base model moved, or the run was made on an in-memory model;
    - a recorded zoo id: its recorded weights file while that exists, else the zoo's current
      file for the id (`find_weights`: the package moved, another machine), or `weights`;
    - a recorded model file: that file; gone, an `InputFileError` naming the run, the file and
      the fix (`base` / ``--model``).

    Whichever it is, weights other than the recorded fingerprint are an `InputFileError` naming
    the model and the run.
    """

    try:
        model_id, model_path, fingerprint = base_info["id"], base_info["path"], base_info["fingerprint"]
    except (KeyError, TypeError) as exc:
        raise InputFileError(f"{record_path}: incomplete base model record ({exc})") from exc
    if base is not None:
        if isinstance(base, nn.Module):
            source, model = "the given base model", load_base(base, str(device), fresh=True)[0]
        else:
            source, model = str(base), load_model(str(base), weights=weights, device=str(device))
    elif model_id is None and model_path is None:
        raise InputFileError(f"{record_path}: the adapter was trained on an in-memory model (no zoo id or model "
                             f"file recorded); {_GIVE_BASE}")
    elif model_id is not None:
        if model_id not in MODEL_SPECS:
            raise InputFileError(f"{run_dir}: its base model is the zoo id {model_id!r}, which this fseft does not "
                                 f"know; {_GIVE_BASE}")
        recorded = Path(model_path) if model_path else None
        path = (Path(weights) if weights is not None else recorded if recorded is not None and recorded.is_file()
                else find_weights(MODEL_SPECS[model_id]))
        if path is None:
            looked = ", ".join(str(p) for p in weight_candidates(MODEL_SPECS[model_id]))
            raise InputFileError(
                f"{run_dir}: the weights of its base model {model_id!r} are neither at the recorded {model_path} nor "
                f"in the zoo (looked in {looked}); put them at ${WEIGHTS_DIR_ENV}/{model_id}.pth, pass --weights "
                f"PATH, or {_GIVE_BASE}")
        source, model = f"model {model_id!r} ({path})", load_model(model_id, weights=path, device=str(device))
    else:
        if weights is not None:
            raise ConfigError(f"--weights is only for zoo ids; the base model of {run_dir} is the model file "
                              f"{model_path}: give it with --model PATH")
        if not Path(model_path).is_file():
            raise InputFileError(f"{run_dir}: its base model file {model_path} is not there (moved or deleted); "
                                 f"{_GIVE_BASE}")
        source, model = str(model_path), load_model(str(model_path), device=str(device))
    found = model_fingerprint(model)
    if found != fingerprint:
        raise InputFileError(
            f"{source}: its weights differ from those the adapter in {run_dir} was trained on (weights fingerprint "
            f"{found[:12]}, the run recorded {str(fingerprint)[:12]}); give the base model the run was made on "
            "with --model ID|PATH")
    return model.eval().requires_grad_(False)


def run_extra(base_info: dict[str, Any], cfg: Any, preprocess_cfg: Any, task: Any, result: Any) -> dict[str, Any]:
    """The run's information in its record (``extra``, `fseft.runs.format.RUN_KEYS`):
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
    run_dir: str | os.PathLike, device: str | torch.device = "cpu", merge: bool = False,
    base: str | os.PathLike | nn.Module | None = None, weights: str | os.PathLike | None = None,
) -> AdaptedModel | AdaptedNetwork:
    """Rebuild base model + trained adaptation from an `fseft adapt` run folder, in eval mode.

    The run folder is a reusable model: copied anywhere, it loads the same. Its base model is
    the recorded zoo id or file, or `base` (a zoo id, with `weights` for its file, a model
    file or a model object: where the base moved), always checked against the recorded weights
    fingerprint (`InputFileError` if they differ; see `load_recorded_base`). The recorded
    method's kind (the registry) decides the rest: feature-adapter runs give an `AdaptedModel`;
    network runs an `AdaptedNetwork` around `fseft.runs.format.load_adapted`, with
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
                             "load it onto its base with fseft.runs.format.load_adapted")
    return _LOADERS[kind](run_dir, record, device, merge, base, weights)


def _load_network_run(run_dir: Path, record: dict[str, Any], device: str | torch.device, merge: bool,
                      base_model: Any = None, weights: Any = None) -> AdaptedNetwork:

    base = load_recorded_base(record["extra"]["base_model"], run_dir / ADAPTER_WEIGHTS, run_dir, device,
                              base_model, weights)
    model = run_format.load_adapted(base, run_dir)
    if merge:
        model = run_format.merge(model)
    preprocess = PreprocessConfig.from_dict(record["extra"]["preprocess"])
    return AdaptedNetwork(model, record["structures"], record["multiclass"], preprocess).to(device).eval()


def _load_features_run(run_dir: Path, record: dict[str, Any], device: str | torch.device, merge: bool,
                       base_model: Any = None, weights: Any = None) -> AdaptedModel:

    if merge:
        mergeable = [name for name in available_methods() if get_method(name).merge is not None]
        raise ConfigError(f"{run_dir}: merging folds a network method's updates ({', '.join(mergeable)}) into the base "
                          f"weights; this run trained a feature adapter ({record['method']}), which has nothing to merge")
    weights_path = run_dir / ADAPTER_WEIGHTS
    base = load_recorded_base(record["extra"]["base_model"], weights_path, run_dir, device, base_model, weights)
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


# ---------------------------------------------------------------------------- listing runs


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One run folder of `list_runs` (a row of `fseft models --adapters DIR`).

    Attributes:
        folder: the run folder, relative to the listed folder (``.`` for the folder itself).
        method, structures, k: from the run record (k: the recorded task, else ``metrics.json``).
        base: the base model: its zoo id, else its weights file name; None if not recorded.
        size: bytes of the adapter files (``adapter_model.safetensors``, ``adapter_config.json``).
        dice: mean query Dice over the structures (``metrics.json``); None without one.
        problem: why the folder cannot be read as a run (the other fields then empty), or None.
    """

    folder: Path
    method: str | None = None
    structures: tuple[str, ...] = ()
    k: int | None = None
    base: str | None = None
    size: int = 0
    dice: float | None = None
    problem: str | None = None


def list_runs(directory: str | os.PathLike) -> list[RunSummary]:
    """Every run folder under `directory` (recursively; `directory` itself included), sorted by
    folder: a folder holding ``adapter_model.safetensors``, read with `read_run_record`.

    Hidden folders (an adapt or benchmark still writing, ``.name.partial``) are skipped. A folder
    that is not a readable run is listed with a short `RunSummary.problem`, not raised, so that
    one broken run does not hide the others. `InputFileError` when `directory` is not a folder.
    """
    root = Path(directory)
    if not root.is_dir():
        raise InputFileError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}; "
                             "give the folder holding the run folders (fseft adapt --out, fseft benchmark --out)")
    found = (p.parent for p in root.rglob(ADAPTER_WEIGHTS) if p.is_file())
    folders = {f for f in found if not any(part.startswith(".") for part in f.relative_to(root).parts)}
    return [_summarise_run(root, folder) for folder in sorted(folders, key=lambda f: f.relative_to(root).parts)]


def _summarise_run(root: Path, run_dir: Path) -> RunSummary:
    folder = run_dir.relative_to(root)
    size = sum((run_dir / name).stat().st_size for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
               if (run_dir / name).is_file())
    try:
        record = read_run_record(run_dir)
    except InputFileError as exc:  # the reason without the folder (the row names it) nor the hint
        reason = str(exc).replace(f"{run_dir}{os.sep}", "").split("; ")[0]
        return RunSummary(folder, size=size, problem=reason)
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    metrics = metrics if isinstance(metrics, dict) else {}
    try:
        extra = record.get("extra") or {}
        base_info = extra.get("base_model") or {}
        base = base_info.get("id") or (Path(base_info["path"]).name if base_info.get("path") else None)
        if base is None and base_info:
            base = "in-memory"  # adapted from a model object: give its base with --model
        k = (extra.get("task") or {}).get("k", metrics.get("k"))
        structures = tuple(str(s) for s in record.get("structures") or ())
        return RunSummary(folder, _method_label(record), structures, None if k is None else int(k), base, size,
                          mean_query_dice(metrics, structures))
    except (AttributeError, TypeError, ValueError) as exc:
        return RunSummary(folder, size=size, problem=f"malformed run record ({exc})")


def _method_label(record: dict[str, Any]) -> str:
    """The method as ``--candidates`` names it: ``lora+dec`` (decoder fine-tuned; ``+newdec``
    re-initialised), ``spatial-adapter+ti`` (with the size constraint), else its id."""
    decoder = (record.get("options") or {}).get("decoder")
    suffix = {"fine-tuned": "+dec", "new": "+newdec"}.get(decoder, "")
    if (record.get("extra") or {}).get("transductive"):
        suffix += "+ti"
    return f"{record.get('method')}{suffix}"


def mean_query_dice(metrics: dict[str, Any], structures: Sequence[str], missing: float | None = None) -> float | None:
    """Mean over `structures` of a run's mean query Dice (``metrics.json``'s ``mean``).

    missing: what a structure without a Dice counts as; None leaves it out (the run listing),
    0.0 scores it as a failure (`fseft.adaptation.method_choice`'s leave-one-out). None when no value is left.
    """
    mean = metrics.get("mean")
    mean = mean if isinstance(mean, dict) else {}
    values = [row.get("dice") if isinstance(row, dict) else None for row in (mean.get(s) for s in structures)]
    values = [float(v) if isinstance(v, (int, float)) else missing for v in values]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _file_size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} KB"


def format_run_table(directory: str | os.PathLike) -> str:
    """The table `fseft models --adapters DIR` prints: one row per run folder of `list_runs`
    (an unreadable one: its folder and why), then how many there are."""
    rows = list_runs(directory)
    if not rows:
        return f"no run folders (holding {ADAPTER_WEIGHTS}) under {directory}"
    header = ("run", "method", "structures", "k", "base model", "size", "dice")
    cells = [header] + [
        (r.folder.as_posix(), r.method or "—", ",".join(r.structures) or "—", "—" if r.k is None else str(r.k),
         r.base or "—", _file_size(r.size), "—" if r.dice is None else f"{r.dice:.3f}")
        if r.problem is None else (r.folder.as_posix(), f"UNREADABLE: {r.problem}")
        for r in rows
    ]
    full = [line for line in cells if len(line) == len(header)]
    widths = [max(len(line[0]) for line in cells)] + [max(len(line[i]) for line in full) for i in range(1, len(header))]
    right = {3, 5, 6}  # the numbers
    text = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
            for line in cells]
    text.insert(1, "-" * len(text[0]))
    unreadable = sum(r.problem is not None for r in rows)
    text.append(f"{len(rows) - unreadable} run(s) under {directory}"
                + (f", {unreadable} unreadable" if unreadable else ""))
    return "\n".join(text)
