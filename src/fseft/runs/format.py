"""The run format: adapters saved apart from the base model, and loaded back onto it.

A run folder (of `fseft adapt`, or `save_adapter`) holds only what a method trained or added,
as two files named as HF peft names them:

- ``adapter_model.safetensors``: the tensors, and in its metadata key ``"fseft"`` the run
  record (JSON, `RUN_FORMAT`), the same for every method::

      {"format": "fseft-run-v2", "method", "options", "structures", "multiclass",
       "extra": {...}}      # `fseft adapt`: base_model, objective, transductive, preprocess,
                            # hyperparameters, task, training

  plus, for network methods, what `apply_method` records to rebuild the model on a base:
  ``head_rows``, ``base_class_names``, ``arch``, ``arch_kwargs``. Feature methods: the
  adapter's state dict. Network methods: the trainable parameters (plus the running statistics
  of trained BatchNorm layers, and any fixed tensor of an added module), under the adapted
  model's own names; peft methods (``lora``): peft's adapter state dict (the LoRA factors, and
  the ``modules_to_save`` copies: head and, when trained, decoder).
- ``adapter_config.json``: the same record; for peft methods peft's own ``LoraConfig`` JSON
  instead, so that ``peft.PeftModel.from_pretrained(base, run_dir)`` loads the folder (once the
  base has the run's head, see `prepare_base_head`).

`read_run_record(run_dir)` is the one reader: it also reads the two formats fseft wrote before
(``fseft-adapter-v1``: feature runs, the record in ``adapter_config.json``; ``fseft-peft-v1``:
network runs) as records of this one. ``load_adapted(base, run_dir)`` re-applies a network
method to a fresh base and loads the tensors: the result reproduces the trained model's outputs
exactly. ``merge(model)`` folds a method into the base weights (its ``merge`` hook).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fseft.errors import ConfigError, InputFileError
from fseft.methods.peft_methods import NORM_TYPES, apply_method, replace_head, unwrap
from fseft.methods.registry import get_method
from fseft.models.architectures import variant_options
from fseft.models.checkpoint import require_finite_tensors
from fseft.utils import atomic_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_FORMAT = "fseft-run-v2"
#: what earlier versions wrote: network runs (the record in the metadata, as now) and feature
#: runs (the record in adapter_config.json, with other keys; the metadata key "fseft_adapter")
PEFT_V1, ADAPTER_V1 = "fseft-peft-v1", "fseft-adapter-v1"
#: what `fseft adapt` keeps in a record's ``extra`` (the run's information)
RUN_KEYS = ("base_model", "objective", "transductive", "preprocess", "hyperparameters", "task", "training")


def method_record(model: nn.Module) -> dict[str, Any]:
    """The record `apply_method` attached to `model` (method, options, structures, ...)."""
    record = getattr(model, "fseft_method", None)
    if record is None:
        raise ConfigError("this model was not prepared with fseft.methods.peft_methods.apply_method")
    return record


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a non-peft method saves (see the module docstring), detached, on the CPU."""
    keep: set[str] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        owns_trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        added = bool(getattr(module, "fseft_added", False))
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad or added:
                keep.add(prefix + name)
        # running statistics of trained norms change in training; other buffers (e.g. Swin's
        # relative position index) are fixed functions of the architecture
        if (owns_trainable and isinstance(module, NORM_TYPES)) or added:
            keep.update(prefix + name for name, _ in module.named_buffers(recurse=False))
    state = model.state_dict()
    return {k: state[k].detach().cpu().contiguous().clone() for k in sorted(keep) if k in state}


def save_adapter(model: nn.Module, run_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> dict[str, int]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of a network method's
    `model` into `run_dir` (`write_run_files`).

    `extra` (JSON) is stored in the record, e.g. the base model reference. Files are written
    atomically. Returns ``{file name: size in bytes}``.
    """
    record = dict(method_record(model))
    if extra:
        record["extra"] = extra
    if get_method(record["method"], kind="network").uses_peft:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in get_peft_model_state_dict(model).items()}
        config = model.peft_config["default"].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        return write_run_files(run_dir, tensors, record, json.dumps(config, indent=2, sort_keys=True, default=str),
                               {"format": "pt"})  # what peft writes
    return write_run_files(run_dir, adapter_state_dict(model), record)


def write_run_files(run_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], record: dict[str, Any],
                    config_text: str | None = None, metadata: dict[str, str] | None = None) -> dict[str, int]:
    """The one writer of the run format: `tensors` into ``adapter_model.safetensors`` with
    `record` (made a `RUN_FORMAT` record) in its metadata, and ``adapter_config.json`` (the
    record, or `config_text`: peft's config). Atomic. Returns ``{file name: size in bytes}``."""

    record = {"format": RUN_FORMAT, **{k: v for k, v in record.items() if k != "format"}}
    run_dir = Path(run_dir)
    with atomic_path(run_dir / ADAPTER_WEIGHTS, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={**(metadata or {}), "fseft": json.dumps(record)})
    with atomic_path(run_dir / ADAPTER_CONFIG, suffix=".json") as tmp:
        tmp.write_text((config_text if config_text is not None else json.dumps(record, indent=2)) + "\n", encoding="utf-8")
    return {name: (run_dir / name).stat().st_size for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The record of a run folder (`RUN_FORMAT`), whichever fseft version wrote it.

    `InputFileError` naming the file when the folder holds no readable run.
    """

    run_dir = Path(run_dir)
    path = run_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise InputFileError(f"{path}: not found; is {run_dir} an `fseft adapt` run folder?")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise InputFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        if "fseft" not in metadata and "fseft_adapter" in metadata:
            return _record_from_adapter_v1(run_dir)
        record = json.loads(metadata["fseft"])
        if record.get("format") not in (RUN_FORMAT, PEFT_V1):
            raise KeyError("format")
        return {**record, "format": RUN_FORMAT}
    except (KeyError, json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise InputFileError(f"{path}: no fseft run record in its metadata ({exc}); "
                             f"is {run_dir} an `fseft adapt` run folder?") from exc


def _record_from_adapter_v1(run_dir: Path) -> dict[str, Any]:
    """A feature run written as ``fseft-adapter-v1``, read as a `RUN_FORMAT` record."""
    path = run_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise InputFileError(f"{path}: not found; is {run_dir} an `fseft adapt` run folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        return {"format": RUN_FORMAT, "method": config["method"], "options": dict(config["method_options"]),
                "structures": list(config["structures"]), "multiclass": config["objective"] == "multiclass",
                "extra": {key: config.get(key) for key in RUN_KEYS}}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputFileError(f"{path}: not a valid adapter config ({exc})") from exc


def _check_base(base: nn.Module, record: dict[str, Any], run_dir: Path) -> None:
    model = unwrap(base)
    if getattr(model, "fseft_method", None) is not None or model is not base:
        raise ConfigError("load_adapted needs a fresh base model, not one already prepared for a method")
    problems = []
    if getattr(model, "arch", None) != record["arch"]:
        problems.append(f"architecture {getattr(model, 'arch', None)!r} != {record['arch']!r}")
    elif dict(model.arch_kwargs) != record["arch_kwargs"]:
        # a run written before a variant option existed was trained with its default
        recorded = {**variant_options(record["arch"], record["arch_kwargs"]), **record["arch_kwargs"]}
        diff = {k: (model.arch_kwargs.get(k), v) for k, v in recorded.items()
                if model.arch_kwargs.get(k) != v and k != "use_checkpoint"}
        if diff:
            problems.append(f"architecture options differ (base, adapter): {diff}")
    if list(model.class_names) != list(record["base_class_names"]):
        problems.append(f"classes {list(model.class_names)} != {record['base_class_names']}")
    if problems:
        raise InputFileError(f"{run_dir}: the adapter was trained on another base model: {'; '.join(problems)}")


def prepare_base_head(base: nn.Module, run_dir: str | os.PathLike) -> nn.Module:
    """Give a fresh `base` the head layout of the run (for ``PeftModel.from_pretrained``)."""
    record = read_run_record(run_dir)
    _check_base(base, record, Path(run_dir))
    replace_head(base, record["structures"], record["multiclass"], init_from_head=False)
    return base


def load_adapted(base: nn.Module, run_dir: str | os.PathLike) -> nn.Module:
    """Apply the run's method to a fresh `base` (changed in place) and load its tensors.

    Returns the adapted model in eval mode (a ``PeftModel`` for peft methods), whose outputs
    equal those of the model `save_adapter` wrote. `InputFileError` when the folder does not
    match `base` (architecture, classes, tensor names or shapes).
    """

    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    spec = get_method(record["method"], kind="network")
    _check_base(base, record, run_dir)
    options = {k: v for k, v in record["options"].items()}
    model = apply_method(base, spec.make_config(**options), record["structures"], multiclass=record["multiclass"])
    tensors = load_file(str(run_dir / ADAPTER_WEIGHTS))
    weights_path = run_dir / ADAPTER_WEIGHTS
    require_finite_tensors(tensors, weights_path)
    if spec.uses_peft:
        try:
            result = set_peft_model_state_dict(model, tensors)
        except RuntimeError as exc:
            raise InputFileError(f"{weights_path}: does not fit the base model ({exc})") from exc
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise InputFileError(f"{weights_path}: tensors the adapted model does not have: {unexpected[:5]}")
    else:
        expected = set(adapter_state_dict(model))
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise InputFileError(
                f"{weights_path}: does not match method {record['method']!r}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        try:
            model.load_state_dict(tensors, strict=False)
        except RuntimeError as exc:
            raise InputFileError(f"{weights_path}: does not fit the base model ({exc})") from exc
    return model.eval()


def merge(model: nn.Module) -> nn.Module:
    """Fold the method into plain base weights for inference (its ``merge`` hook: LoRA, ARENA);
    returns the `SegmentationModel`. Methods that train base weights in place (ft, bitfit,
    affine, ...) are already plain; AdaptFormer's ReLU bottleneck cannot be folded and stays.
    The merged model no longer carries the method record.
    """
    hook = get_method(method_record(model)["method"], kind="network").merge
    merged = hook(model) if hook is not None else model
    merged.__dict__.pop("fseft_method", None)
    return merged
