"""Safe checkpoint reading, key mapping of public checkpoints, and the fseft model file.

Loading never executes code stored in a file: PyTorch pickles are read with
``torch.load(weights_only=True)`` (tensors, containers and plain numbers only) and everything
else goes through safetensors. ``map_location`` makes a GPU checkpoint load on a CPU machine.

An fseft model file is one ``.safetensors`` file: the tensors of ``model.state_dict()`` and,
in its string metadata under ``"fseft"``, a JSON config ``{"format", "arch", "arch_kwargs",
"class_names", "preprocess", "fseft_version", "extra"}``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fseft import __version__
from fseft.data.preprocessing import PreprocessConfig
from fseft.errors import ConfigError, InputFileError
from fseft.models.architectures import create_model
from fseft.models.base import SegmentationModel
from fseft.utils import atomic_path

MODEL_FILE_FORMAT = "fseft-model/1"
METADATA_KEY = "fseft"
# Where the tensors live inside the dicts that public training scripts save.
STATE_DICT_CONTAINERS = ("state_dict", "net", "model", "model_state_dict", "module")


class CheckpointWarning(UserWarning):
    """Weights that were intentionally dropped, or modules left newly initialised, on loading."""


# ------------------------------------------------------------------------------ reading


def _numpy_safe_globals() -> list[Any]:
    """NumPy scalar / dtype reconstructors: data only, found in checkpoints that stored e.g.
    ``best_acc`` as a NumPy float. They build values; they cannot call arbitrary functions.

    The scalar reconstructor is allowed under both of its pickled names: ``numpy._core`` (files
    written under NumPy 2) and ``numpy.core`` (NumPy 1.x: MONAI's published BTCV checkpoint)."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed: list[Any] = [np.dtype, (scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar")]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Any, dict[str, str]]:
    """Read a checkpoint without executing code from it.

    Returns:
        ``(obj, metadata)``: for ``.safetensors`` a ``dict[str, Tensor]`` and the file's string
        metadata; for PyTorch files the unpickled object (usually a dict) and ``{}``.
    Raises:
        InputFileError: missing or unreadable file, or a pickle that needs anything beyond
        tensors and plain containers (such a file is refused, never run).
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: checkpoint file not found")
    device = str(map_location)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputFileError(f"{path}: not a readable safetensors file ({exc})") from exc
        return tensors, metadata
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(
            f"{path}: refused to load: the file holds Python objects beyond tensors and plain "
            f"containers, and fseft never runs code from a checkpoint ({first_line}). "
            "Re-save only the state_dict (torch.save(model.state_dict(), ...)) or use safetensors."
        ) from exc
    except Exception as exc:  # a junk file can fail anywhere in torch's legacy unpickler (KeyError, ...)
        raise InputFileError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    return obj, {}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: the object itself, or its ``state_dict`` / ``net`` /
    ``model`` entry (the layouts of MONAI, CLIP-Driven / SuPreM and plain ``torch.save``)."""
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_CONTAINERS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(map(str, list(obj)[:10]))
        raise InputFileError(
            f"{source}: no tensor dictionary found (top-level keys: {keys}; looked for the dict itself "
            f"and entries {', '.join(STATE_DICT_CONTAINERS)})"
        )
    raise InputFileError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")


# ------------------------------------------------------------------------------ key rules


@dataclass(frozen=True)
class KeyRules:
    """How a public checkpoint's keys become `SegmentationModel` keys.

    Applied in order to each source key: the first matching ``strip_prefixes`` entry is
    removed, ``add_prefix`` is prepended, then the ``renames`` regex substitutions run.
    Source keys matching a ``drop`` regex (tested on the original key) are discarded on
    purpose (heads that a 1x1x1 conv cannot represent, self-supervision heads).

    Attributes:
        strip_prefixes: e.g. ``("module.backbone.", "module.")`` (DDP / wrapper prefixes).
        add_prefix: e.g. ``"swinViT."`` for a checkpoint of the bare Swin encoder.
        renames: ``(pattern, replacement)`` regex pairs, e.g. ``(r"^out\\.conv\\.conv\\.", "head.")``.
        drop: regexes of source keys to discard, reported in a `CheckpointWarning`.
        new_modules: regexes of model keys the checkpoint does not provide on purpose (left
            at their initialisation, reported in a `CheckpointWarning`).
        head_rows: output channels of the checkpoint head kept, in order (BTCV: drop background 0).
        head_source_channels: output channels the checkpoint head must have (with ``head_rows``).
        head_relative_to: the background channel of a softmax head (with ``head_rows``): each kept
            row becomes its difference with this one, so the sigmoid of a kept logit is
            ``sigmoid(z_c - z_bg) = p_c / (p_c + p_bg)``, the softmax's "organ c rather than
            background"; above 0.5 exactly where c beats background in the published argmax.
    """

    strip_prefixes: tuple[str, ...] = ()
    add_prefix: str = ""
    renames: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    new_modules: tuple[str, ...] = ()
    head_rows: tuple[int, ...] | None = None
    head_source_channels: int | None = None
    head_relative_to: int | None = None


@dataclass(frozen=True)
class KeyLayout:
    """One key layout in which a public checkpoint is saved or loaded by its authors' scripts.

    Attributes:
        name: what users recognise it by, e.g. ``"CLIP-Driven pre-refactor (test.py)"``.
        rules: how its keys map onto the fseft model.
    """

    name: str
    rules: KeyRules


@dataclass
class LoadReport:
    """What `load_state_dict_checked` did: loaded, dropped and newly initialised keys."""

    source: str
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layout: str | None = None


def map_state_dict(
    state: Mapping[str, torch.Tensor], rules: KeyRules, source: str | os.PathLike
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Apply `rules` to ``state``. Returns ``(mapped, dropped_source_keys, notes)``."""
    drop = [re.compile(p) for p in rules.drop]
    renames = [(re.compile(p), r) for p, r in rules.renames]
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if any(p.search(key) for p in drop):
            dropped.append(key)
            continue
        new = key
        for prefix in rules.strip_prefixes:
            if new.startswith(prefix):
                new = new[len(prefix):]
                break
        new = rules.add_prefix + new
        for pattern, repl in renames:
            new = pattern.sub(repl, new)
        if new in mapped:
            raise InputFileError(f"{source}: keys collide after mapping: two entries become {new!r}")
        mapped[new] = value
    notes: list[str] = []
    if rules.head_rows is not None and "head.weight" in mapped:
        rows = mapped["head.weight"].shape[0]
        if rules.head_source_channels is not None and rows != rules.head_source_channels:
            raise InputFileError(
                f"{source}: the checkpoint head has {rows} output channels, expected "
                f"{rules.head_source_channels}: a checkpoint with other classes than this model id"
            )
        index = torch.tensor(rules.head_rows, dtype=torch.long)
        for name in ("head.weight", "head.bias"):
            if name in mapped:
                full = mapped[name]
                mapped[name] = full.index_select(0, index)
                if rules.head_relative_to is not None:
                    mapped[name] = mapped[name] - full[rules.head_relative_to : rules.head_relative_to + 1]
        kept = set(rules.head_rows)
        notes.append(f"head output channels {sorted(set(range(rows)) - kept)} of the checkpoint dropped")
        if rules.head_relative_to is not None:
            notes.append(f"the kept head channels are taken relative to channel {rules.head_relative_to} "
                         "(softmax head: sigmoid = organ rather than background)")
    return mapped, dropped, notes


def _summarise(keys: list[str], limit: int = 12, depth: int = 2) -> str:
    """Compact key list: grouped by their first `depth` components."""
    groups: dict[str, int] = {}
    for k in keys:
        g = ".".join(k.split(".")[:depth])
        groups[g] = groups.get(g, 0) + 1
    items = [f"{g}.* ({n})" if n > 1 else g for g, n in groups.items()]
    more = f", ... ({len(items) - limit} more groups)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf (a state dict, a file's tensors)."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def require_finite_tensors(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise `InputFileError` naming `source` when a floating-point tensor holds NaN or Inf:
    such a model or adapter (a diverged run, a corrupted file) would segment nothing, silently."""
    bad = non_finite_tensors(tensors)
    if bad:
        raise InputFileError(f"{source}: non-finite values (NaN or Inf) in {_summarise(bad)}: a diverged or "
                             "corrupted model; it cannot be used")


def load_state_dict_checked(
    model: SegmentationModel,
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    rules: KeyRules | None = None,
) -> LoadReport:
    """Load a checkpoint into ``model`` and account for every key.

    Keys dropped by `rules` and model keys listed as new are reported in one
    `CheckpointWarning`; any other missing or unexpected key, or a shape mismatch, raises
    `InputFileError` naming ``source``. Nothing is silently ignored.
    """
    rules = rules or KeyRules()
    mapped, dropped, notes = map_state_dict(state, rules, source)
    expected = model.state_dict()
    new_patterns = [re.compile(p) for p in rules.new_modules]

    unexpected = [k for k in mapped if k not in expected]
    missing = [k for k in expected if k not in mapped]
    # Old BatchNorm checkpoints lack the step counter; it is not a weight.
    benign = [k for k in missing if k.endswith("num_batches_tracked")]
    new = [k for k in missing if k not in benign and any(p.search(k) for p in new_patterns)]
    bad_missing = [k for k in missing if k not in benign and k not in new]

    matched = len(expected) - len(missing)
    if unexpected or bad_missing:
        arch = getattr(model, "arch", type(model).__name__)
        looks_wrong = matched < len(expected) // 2
        parts = [f"{source}: "]
        if looks_wrong:
            parts.append(
                f"does not look like a checkpoint of this architecture ({arch}, "
                f"{model.arch_kwargs}): only {matched} of {len(expected)} model keys found. "
            )
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(unexpected)}. ")
        if bad_missing:
            parts.append(f"missing keys: {_summarise(bad_missing)}. ")
        raise InputFileError("".join(parts).strip())

    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        head = [m for m in mismatched if m.startswith("head.")]
        if head and len(head) == len(mismatched):
            raise InputFileError(
                f"{source}: the checkpoint head has other classes than the model "
                f"({len(model.class_names)} classes: {', '.join(model.class_names)}): {'; '.join(head)}"
            )
        raise InputFileError(
            f"{source}: shape mismatch for {len(mismatched)} tensors (a checkpoint of another "
            f"architecture or size than {getattr(model, 'arch', '?')} {model.arch_kwargs}?): "
            + "; ".join(mismatched[:5])
        )

    require_finite_tensors(mapped, source)
    to_load = {k: v.to(dtype=expected[k].dtype) if v.is_floating_point() else v for k, v in mapped.items()}
    result = model.load_state_dict(to_load, strict=False)
    leftover = [k for k in result.missing_keys if k not in new and k not in benign]
    if result.unexpected_keys or leftover:  # pragma: no cover - guarded by the checks above
        raise InputFileError(f"{source}: could not load {result.unexpected_keys or leftover}")

    report = LoadReport(source=str(source), loaded=sorted(mapped), dropped=dropped, new=new, notes=notes)
    messages = []
    if dropped:
        messages.append(f"dropped {len(dropped)} checkpoint tensors on purpose: {_summarise(dropped)}")
    messages.extend(notes)
    if new:
        messages.append(f"newly initialised (not in the checkpoint): {_summarise(new, depth=1)}")
    if messages:
        warnings.warn(f"{source}: " + "; ".join(messages), CheckpointWarning, stacklevel=2)
    return report


def _layout_fit(model_keys: set[str], state: Mapping[str, torch.Tensor], layout: KeyLayout, source: str | os.PathLike) -> int:
    """How well ``layout`` explains ``state``: model keys it provides minus keys it leaves unexplained."""
    try:
        mapped, _, _ = map_state_dict(state, layout.rules, source)
    except InputFileError:  # keys collide under this layout's rules: not this layout
        return -len(state)
    return sum(k in model_keys for k in mapped) - sum(k not in model_keys for k in mapped)


def load_state_dict_layouts(
    model: SegmentationModel,
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    layouts: tuple[KeyLayout, ...],
) -> LoadReport:
    """Load a public checkpoint saved in one of ``layouts``: the layout that explains most of its
    keys is chosen, then `load_state_dict_checked` accounts for every key. When even that one
    leaves keys unmatched, the `InputFileError` lists them and names the layouts tried."""
    if not layouts:
        return load_state_dict_checked(model, state, source)
    model_keys = set(model.state_dict())
    best = max(layouts, key=lambda layout: _layout_fit(model_keys, state, layout, source))
    try:
        report = load_state_dict_checked(model, state, source, best.rules)
    except InputFileError as exc:
        if len(layouts) == 1:
            raise
        tried = "; ".join(layout.name for layout in layouts)
        raise InputFileError(f"{exc} (no published layout fits; tried: {tried}; closest: {best.name})") from exc
    report.layout = best.name
    return report


# ------------------------------------------------------------------------------ fseft model file


def _preprocess_dict(preprocess: PreprocessConfig | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if preprocess is None:
        return None
    if hasattr(preprocess, "to_dict"):
        return dict(preprocess.to_dict())
    if isinstance(preprocess, Mapping):
        return dict(preprocess)
    raise TypeError(f"preprocess must be a dict or have to_dict(), got {type(preprocess).__name__}")


def save_model_file(
    model: SegmentationModel,
    path: str | os.PathLike,
    preprocess: PreprocessConfig | Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as an fseft model file (``.safetensors`` + JSON config), atomically.

    Args:
        model: a `SegmentationModel` created by `create_model` (its ``arch``/``arch_kwargs``
            rebuild it).
        path: destination; should end in ``.safetensors``.
        preprocess: `PreprocessConfig` (anything with ``to_dict()``) or a plain dict, or None.
        extra: JSON-serialisable information kept in the config (training run, metrics...).
        dtype: storage dtype of the floating-point tensors (e.g. ``torch.float16`` halves the
            file of a shipped model); loading casts them back to the model's parameter dtype.
    Returns:
        ``path``.
    """
    path = Path(path)
    config = {
        "format": MODEL_FILE_FORMAT,
        "arch": model.arch,
        "arch_kwargs": dict(model.arch_kwargs),
        "class_names": list(model.class_names),
        "preprocess": _preprocess_dict(preprocess),
        "fseft_version": __version__,
        "extra": dict(extra or {}),
    }
    # clone(): safetensors refuses tensors that share storage; contiguous copies never do.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else _narrowest_int(v) for k, v in tensors.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(config)})
    return path


def _narrowest_int(tensor: torch.Tensor) -> torch.Tensor:
    """An integer tensor in the narrowest signed type that holds its values (Swin's int64
    relative-position indices fit int16: 7.5 of a feature-size-12 model's 15.7 MB were those
    indices); loading copies them back into the model's own buffers and their dtype."""
    if tensor.dtype not in (torch.int16, torch.int32, torch.int64) or tensor.numel() == 0:
        return tensor
    low, high = int(tensor.min()), int(tensor.max())
    for kind in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(kind)
        if info.min <= low and high <= info.max:
            return tensor.to(kind)
    return tensor


def read_model_file_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON config of an fseft model file (header only, no tensors read); None when ``path``
    is a safetensors file without fseft metadata."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    return _parse_config(metadata, path)


def _parse_config(metadata: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    if METADATA_KEY not in metadata:
        return None
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}: the fseft metadata is not valid JSON ({exc})") from exc
    for key in ("arch", "arch_kwargs", "class_names"):
        if key not in config:
            raise InputFileError(f"{path}: the fseft metadata lacks {key!r}")
    _check_recorded_choices(config, path)
    return config


def _check_recorded_choices(config: Mapping[str, Any], path: Path) -> None:
    """The records inference follows (`fseft.inference.sliding_window.recommended_roi_size`,
    `recorded_whole_structures`) have their written shape: `InputFileError` naming the file
    and the entry otherwise (a hand-edited file), not a Python error at prediction time."""
    extra = config.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise InputFileError(f"{path}: the fseft metadata's extra is not a mapping")
    for section in ("inference", "postprocess"):
        if extra.get(section) is not None and not isinstance(extra[section], Mapping):
            raise InputFileError(f"{path}: the fseft metadata's extra.{section} is not a mapping")
    roi = (extra.get("inference") or {}).get("roi_size")
    if roi is not None and not (isinstance(roi, list) and len(roi) == 3
                                and all(type(v) is int and v > 0 for v in roi)):
        raise InputFileError(f"{path}: extra.inference.roi_size must be three positive integers, got {roi!r}")
    choice = (extra.get("postprocess") or {}).get("largest_component")
    if choice is not None and not (isinstance(choice, Mapping)
                                   and all(isinstance(k, str) and type(v) is bool for k, v in choice.items())):
        raise InputFileError(f"{path}: extra.postprocess.largest_component must map structure names to "
                             f"true / false, got {choice!r}")


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu", **arch_overrides: Any) -> SegmentationModel:
    """Rebuild a model saved by `save_model_file`, in eval mode on ``device``.

    ``arch_overrides`` replace run-time options of the saved config (e.g. ``use_checkpoint``).
    The returned model carries ``model.preprocess`` (dict or None) and ``model.model_config``
    (the whole JSON config).
    """
    path = Path(path)
    tensors, metadata = read_checkpoint(path, map_location="cpu")
    config = _parse_config(metadata, path)
    if config is None:
        raise InputFileError(
            f"{path}: a safetensors file without fseft metadata (not written by save_model_file); "
            "load public weights with load_model(<zoo id>, weights=...)"
        )
    kwargs = {**config["arch_kwargs"], **arch_overrides}
    try:
        model = create_model(config["arch"], config["class_names"], **kwargs)
    except ConfigError as exc:
        raise InputFileError(f"{path}: its config cannot build a model: {exc}") from exc
    load_state_dict_checked(model, tensors, path)
    model.preprocess = config.get("preprocess")
    model.model_config = config
    return model.to(device).eval()
