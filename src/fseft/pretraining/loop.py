"""Supervised pre-training on an assembly of partially labelled datasets (FSEFT paper, sec. 3.1).

Every volume carries its annotation vector w_n (1 for the catalogue classes its dataset
annotates); the model has one sigmoid output per catalogue class and learns from the masked
BCE + Dice of `fseft.training.losses.partial_label_loss`. Runs on one process or on torch DDP
(`torchrun --nproc_per_node N -m fseft pretrain ...`).

Run folder (``--out DIR``): ``assembly.json`` (the resolved configuration), ``cache/`` (each
volume preprocessed once), ``checkpoint.pt`` (resumable, after every epoch), ``log.jsonl``
(one line per epoch: loss per class and, with a ``validation:`` dataset, its Dice per class
every few epochs), ``log.csv`` (the same as a table) and, at the end, ``model.safetensors`` (an fseft model
file for `fseft.models.load_model` / ``fseft predict --model``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fseft.data.preprocessing import PreprocessConfig
from fseft.data.structures import canonical_name, canonical_names
from fseft.training.distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    broadcast_object,
    distributed_context,
    unwrap_model,
    wrap_model,
)
from fseft.errors import ConfigError, FseftError, InputFileError
from fseft.utils import atomic_path, check_keys, read_yaml_mapping, seed_everything, unknown_key_error, write_json, write_text

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.safetensors"
LOG_NAME = "log.jsonl"
CSV_LOG_NAME = "log.csv"
_CACHE_VERSION = 1
_SOFT_LABEL_STEPS = 255  # cached label fractions: uint8 steps of 1/255


# ---------------------------------------------------------------------------- configuration


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@dataclass
class DatasetEntry:
    """One dataset of the assembly.

    path: the dataset folder (nnU-Net, TotalSegmentator or FLARE22 layout, see
    `fseft.data.datasets.open_dataset`). structures: the catalogue classes it annotates
    (empty: every structure its label map names). layout: ``auto`` or a layout name.
    name: for logs (default: the folder name). label_map: label value -> structure name,
    replacing the dataset's own map (multilabel datasets only).
    """

    path: Path
    structures: tuple[str, ...] = ()
    layout: str = "auto"
    name: str = ""
    label_map: dict[int, str] | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()
        if isinstance(self.structures, str):
            self.structures = canonical_names(self.structures)
        self.structures = canonical_names(list(self.structures or ()))
        self.name = str(self.name or self.path.name)
        if self.label_map is not None:
            if not isinstance(self.label_map, Mapping):
                raise ConfigError(f"dataset {self.name!r}: label_map must map label values to names")
            parsed: dict[int, str] = {}
            for value, name in self.label_map.items():
                try:
                    parsed[int(value)] = canonical_name(str(name))
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"dataset {self.name!r}: label_map key {value!r} is not an integer label value") from exc
            self.label_map = parsed


@dataclass
class ValidationConfig:
    """A held-out labelled dataset scored during pre-training (the ``validation:`` section).

    Every `every` epochs (and after the last), rank 0 segments its first `max_cases` cases
    (all when None) whole, in model space, and logs the Dice of each catalogue class the
    dataset annotates (sigmoid > 0.5, no post-processing) to ``log.jsonl`` / ``log.csv``, so a
    run shows which structure lags. It neither trains nor picks the model; after the last epoch
    it decides, per class, whether `fseft predict` keeps only the largest component
    (`choose_postprocessing`).
    """

    path: Path
    every: int = 5
    max_cases: int | None = None
    layout: str = "auto"

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()
        for name, optional in (("every", False), ("max_cases", True)):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"validation.{name} must be a positive integer, got {value!r}")


@dataclass
class PretrainConfig:
    """Training hyper-parameters (the ``train:`` section of an assembly YAML).

    epochs: passes over `volumes_per_epoch` volumes (default: every volume once).
    batch_size: volumes per step per process; each gives `patches_per_volume` patches of
    `patch_size` voxels, centred on a structure with probability pos / (pos + neg).
    sampling: ``foreground`` (centred on any structure: large organs own most patches) or
    ``classes`` (on a structure drawn uniformly among those present; see
    `fseft.training.sampling.patch_transforms`).
    augment: flips along `flip_axes`, axial 90-degree rotations (`rotate90`), intensity
    scaling and shifts. In RAS space axis 0 is left-right: flipping it mirrors left and right
    organs without swapping their labels (on the phantom assembly, dropping all flips and
    rotations still lowered the validation Dice at 8 cases per dataset; README).
    head_prior: initialise every output's bias to logit(head_prior), the expected foreground
    fraction of a class, instead of 0 (p = 0.5 everywhere), so that the first steps do not
    spend themselves pushing the background down (RetinaNet's prior initialisation).
    balance_datasets: draw volumes so that each dataset is equally likely.
    balance_classes: draw datasets with the probabilities that give the least-annotated class
    the largest share of steps (`fseft.training.sampling.class_balanced_group_weights`): a class
    only one dataset of three annotates gets half the steps instead of a third; datasets that
    annotate the same classes share their total by size. Implies dataset-level sampling
    (overrides `balance_datasets`).
    lr / weight_decay: AdamW; warmup_epochs of linear warm-up, then cosine decay to 0.
    soft_labels: masks enter model space as fractions (trilinear, `fseft.data.preprocessing.
    preprocess`) instead of nearest-neighbour 0/1, and BCE + soft Dice train on them: a thin
    structure's boundary is no longer shifted by up to half a source voxel (README: model v5).
    Validation Dice thresholds those fractions at 0.5.
    bf16: bfloat16 autocast. grad_checkpointing: the model's `use_checkpoint`.
    device: ``auto``, ``cpu``, ``cuda`` (each torchrun process takes its LOCAL_RANK GPU).
    """

    epochs: int = 100
    batch_size: int = 2
    patches_per_volume: int = 2
    patch_size: tuple[int, int, int] = (96, 96, 96)
    pos: float = 1.0
    neg: float = 1.0
    sampling: str = "foreground"
    balance_datasets: bool = False
    balance_classes: bool = False
    volumes_per_epoch: int | None = None
    augment: bool = True
    flip_axes: tuple[int, ...] = (0, 1, 2)
    rotate90: bool = True
    head_prior: float | None = None
    soft_labels: bool = False
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_epochs: float = 1.0
    bf16: bool = False
    grad_checkpointing: bool = False
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        def number(name: str, kind: type, minimum: float | None = None, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
                raise ConfigError(f"PretrainConfig.{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
            value = kind(value)
            if minimum is not None and value < minimum:
                raise ConfigError(f"PretrainConfig.{name} must be >= {minimum}, got {value}")
            setattr(self, name, value)

        for name in ("epochs", "batch_size", "patches_per_volume"):
            number(name, int, 1)
        number("volumes_per_epoch", int, 1, optional=True)
        number("num_workers", int, 0)
        number("seed", int)
        for name in ("pos", "neg", "weight_decay", "warmup_epochs"):
            number(name, float, 0)
        number("lr", float, 0)
        if self.pos + self.neg == 0:
            raise ConfigError("PretrainConfig.pos and .neg cannot both be 0")
        number("head_prior", float, 0, optional=True)
        if self.head_prior is not None and not 0 < self.head_prior < 1:
            raise ConfigError(f"PretrainConfig.head_prior must be in (0, 1), got {self.head_prior}")
        from fseft.training.sampling import check_sampling_options

        try:
            self.flip_axes = check_sampling_options(self.sampling, self.flip_axes)  # type: ignore[assignment]
        except ConfigError as exc:
            raise ConfigError(f"PretrainConfig.{exc}") from exc
        for name in ("balance_datasets", "balance_classes", "augment", "rotate90", "soft_labels", "bf16",
                     "grad_checkpointing", "tensorboard", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"PretrainConfig.{name} must be true or false, got {getattr(self, name)!r}")
        patch = self.patch_size
        if isinstance(patch, int) and not isinstance(patch, bool):
            patch = (patch,) * 3
        try:
            patch = tuple(int(s) for s in patch)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"PretrainConfig.patch_size must be 3 positive integers, got {self.patch_size!r}") from exc
        if len(patch) != 3 or min(patch) < 1:
            raise ConfigError(f"PretrainConfig.patch_size must be 3 positive integers, got {self.patch_size!r}")
        self.patch_size = patch  # type: ignore[assignment]
        self.device = str(self.device)


@dataclass
class AssemblyConfig:
    """Datasets, model and training of one pre-training run (an assembly YAML).

    classes: the catalogue, one model output per class (default: the union of the datasets'
    structures, in order of appearance). `source` is the YAML file (for messages).
    """

    datasets: list[DatasetEntry]
    arch: str = "swin_unetr"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: PretrainConfig = field(default_factory=PretrainConfig)
    source: str = "<assembly>"
    save_dtype: str = "float32"  # storage dtype of the final model file (float16 halves it)
    #: weights to start from (a zoo id or an fseft model file; the assembly's `init`), or None
    #: for random weights. See `transfer_weights`.
    init: str | None = None
    validation: ValidationConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, the shape of the YAML (paths absolute)."""
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, list):
                return [plain(v) for v in value]
            return value

        return {
            "datasets": [
                {k: plain(v) for k, v in dataclasses.asdict(d).items() if v is not None} for d in self.datasets
            ],
            "model": {"arch": self.arch, "arch_kwargs": plain(self.arch_kwargs), "classes": list(self.classes),
                      "save_dtype": self.save_dtype, **({"init": self.init} if self.init else {})},
            "preprocess": self.preprocess.to_dict(),
            "train": plain(dataclasses.asdict(self.train)),
            **({"validation": plain(dataclasses.asdict(self.validation))} if self.validation else {}),
        }


_TOP_KEYS = ("datasets", "model", "preprocess", "train", "validation")
_MODEL_KEYS = ("arch", "arch_kwargs", "classes", "save_dtype", "init")
_SAVE_DTYPES = ("float32", "float16", "bfloat16")


def _folder_entry(cls: type, raw: Any, where: str, source: str, base: Path) -> Any:
    """A `DatasetEntry` / `ValidationConfig` from its YAML mapping: keys checked, ``path``
    required, relative to `base`, and existing."""
    entry = check_keys(raw, _field_names(cls), where, source)
    if "path" not in entry:
        raise ConfigError(f"{source}: {where} has no 'path'")
    path = Path(str(entry["path"])).expanduser()
    entry["path"] = path if path.is_absolute() else base / path
    if not entry["path"].exists():
        raise ConfigError(f"{source}: {where}: dataset folder {entry['path']} does not exist")
    try:
        return cls(**entry)
    except FseftError as exc:
        raise ConfigError(f"{source}: {where}: {exc}") from exc


def assembly_from_dict(data: Mapping[str, Any], source: str = "<assembly>", base_dir: str | os.PathLike | None = None,
                       overrides: Mapping[str, Any] | None = None) -> AssemblyConfig:
    """Parse an assembly mapping strictly (unknown keys raise `ConfigError` naming the closest
    valid one). Relative dataset paths are taken from `base_dir`; `overrides` replace fields of
    the ``train`` section (CLI options such as ``epochs``, ``device``, ``bf16``)."""
    top = check_keys(data, _TOP_KEYS, "the top level", source)
    raw_datasets = top.get("datasets")
    if not isinstance(raw_datasets, list) or not raw_datasets:
        raise ConfigError(f"{source}: 'datasets' must be a non-empty list of datasets (each with a 'path')")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    datasets: list[DatasetEntry] = []
    for i, raw in enumerate(raw_datasets):
        where = f"datasets[{i}]"
        if isinstance(raw, str):
            raw = {"path": raw}
        datasets.append(_folder_entry(DatasetEntry, raw, where, source, base))
    names = [d.name for d in datasets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: several datasets are named {', '.join(duplicates)}; give each a distinct 'name'")

    model = check_keys(top.get("model"), _MODEL_KEYS, "model", source)
    arch_kwargs = model.get("arch_kwargs") or {}
    if not isinstance(arch_kwargs, Mapping):
        raise ConfigError(f"{source}: model.arch_kwargs must be a mapping")
    classes = model.get("classes") or ()
    save_dtype = str(model.get("save_dtype", "float32"))
    if save_dtype not in _SAVE_DTYPES:
        raise ConfigError(f"{source}: model.save_dtype must be one of {', '.join(_SAVE_DTYPES)}, got {save_dtype!r}")
    init = model.get("init")
    if init is not None:
        init = str(init)
        from fseft.models.zoo import MODEL_SPECS

        if init not in MODEL_SPECS:  # a model file, relative to the YAML like the datasets
            init_path = Path(init).expanduser()
            init_path = init_path if init_path.is_absolute() else base / init_path
            if not init_path.is_file():
                raise ConfigError(f"{source}: model.init: {init!r} is neither a zoo id "
                                  f"({', '.join(MODEL_SPECS)}) nor an existing model file ({init_path})")
            init = str(init_path)
    preprocess_raw = check_keys(top.get("preprocess"), _field_names(PreprocessConfig), "preprocess", source)
    train_raw = check_keys(top.get("train"), _field_names(PretrainConfig), "train", source)
    for key, value in (overrides or {}).items():
        if key not in _field_names(PretrainConfig):
            raise unknown_key_error(key, _field_names(PretrainConfig), "the overrides", "command line")
        train_raw[key] = value
    try:
        preprocess = PreprocessConfig(**preprocess_raw)
        train = PretrainConfig(**train_raw)
        classes = canonical_names(classes if isinstance(classes, str) else list(classes))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    validation = None
    if top.get("validation") is not None:
        validation = _folder_entry(ValidationConfig, top["validation"], "validation", source, base)
    return AssemblyConfig(datasets=datasets, arch=str(model.get("arch", "swin_unetr")), arch_kwargs=dict(arch_kwargs),
                          classes=classes, preprocess=preprocess, train=train, source=source, save_dtype=save_dtype,
                          validation=validation, init=init)


def load_assembly(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> AssemblyConfig:
    """Read an assembly YAML (see `examples/pretrain_phantom.yaml`); dataset paths are relative
    to the YAML's folder. `overrides`: ``train`` fields to replace (``None`` values ignored)."""
    path = Path(path)
    data = read_yaml_mapping(path, "assembly file", _TOP_KEYS)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    return assembly_from_dict(data, source=str(path), base_dir=path.parent, overrides=overrides)


# ---------------------------------------------------------------------------- datasets


@dataclass
class _Source:
    """A dataset of the assembly, opened and checked against the catalogue."""

    entry: DatasetEntry
    dataset: Any  # fseft.data.datasets.Dataset
    structures: tuple[str, ...]  # the catalogue classes it annotates, in catalogue order


def resolve_sources(assembly: AssemblyConfig) -> tuple[tuple[str, ...], list[_Source]]:
    """Open every dataset, apply label-map overrides and check it against the catalogue.

    Returns ``(catalogue, sources)``. Raises `ConfigError` for a structure a dataset does not
    annotate, a dataset annotating no catalogue class, an empty catalogue or dataset.
    """
    from fseft.data.datasets import open_dataset

    src = assembly.source
    sources: list[tuple[DatasetEntry, Any, tuple[str, ...]]] = []
    for entry in assembly.datasets:
        try:
            dataset = open_dataset(entry.path, entry.layout)
        except FseftError as exc:
            raise type(exc)(f"{src}: dataset {entry.name!r}: {exc}") from exc
        if entry.label_map is not None:
            if any(c.label_files for c in dataset.cases):
                raise ConfigError(f"{src}: dataset {entry.name!r} ({entry.path}) has one binary file per structure; "
                                  "label_map applies to multilabel datasets only")
            dataset.cases = [dataclasses.replace(c, label_map=dict(entry.label_map)) for c in dataset.cases]
        cases = dataset.labelled_cases
        if not cases:
            raise ConfigError(f"{src}: dataset {entry.name!r} ({entry.path}) has no labelled case")
        listed = entry.structures or dataset.structures
        for case in cases:
            missing = [s for s in listed if s not in case.structures]
            if missing:
                raise ConfigError(
                    f"{src}: dataset {entry.name!r}: case {case.case_id!r} does not annotate {', '.join(missing)} "
                    f"(its label map names: {', '.join(case.structures) or 'nothing'})")
        dataset.cases = cases
        sources.append((entry, dataset, listed))
    catalogue = canonical_names(list(assembly.classes)) or canonical_names([s for _, _, listed in sources for s in listed])
    if not catalogue:
        raise ConfigError(f"{src}: the catalogue is empty: list the structures of each dataset or model.classes")
    resolved: list[_Source] = []
    for entry, dataset, listed in sources:
        annotated = tuple(c for c in catalogue if c in listed)
        if not annotated:
            raise ConfigError(f"{src}: dataset {entry.name!r} annotates none of the catalogue classes "
                              f"({', '.join(catalogue)}); it annotates {', '.join(listed)}")
        resolved.append(_Source(entry, dataset, annotated))
    return catalogue, resolved


def resolve_validation(assembly: AssemblyConfig, catalogue: Sequence[str]) -> _Source | None:
    """Open the validation dataset (None without one): its labelled cases (the first
    `max_cases`) and the catalogue classes it annotates. Raises `ConfigError` when it
    annotates none of them."""
    from fseft.data.datasets import open_dataset

    val = assembly.validation
    if val is None:
        return None
    where = f"{assembly.source}: validation dataset {val.path}"
    try:
        dataset = open_dataset(val.path, val.layout)
    except FseftError as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    cases = dataset.labelled_cases[: val.max_cases]
    if not cases:
        raise ConfigError(f"{where} has no labelled case")
    annotated = tuple(c for c in catalogue if all(c in case.structures for case in cases))
    if not annotated:
        raise ConfigError(f"{where} annotates none of the catalogue classes ({', '.join(catalogue)})")
    dataset.cases = cases
    return _Source(DatasetEntry(val.path, annotated, val.layout, "validation"), dataset, annotated)


@dataclass(frozen=True)
class _CachedVolume:
    path: Path  # .npz with "image" (1, X, Y, Z) float32 and "label" (S, X, Y, Z) uint8
    channels: tuple[int, ...]  # catalogue index of each label channel
    group: int  # source dataset index


class CachedVolumes(Sequence):
    """Preprocessed volumes read from the run's cache: item j is ``{"image": (1, X, Y, Z)
    float32, "label": (C, X, Y, Z) uint8 in catalogue order (0 where not annotated),
    "annotated": (C,) bool}``. With `soft_labels` the cache holds fractions as uint8 steps of
    1/255 and "label" is float32 in [0, 1]."""

    def __init__(self, volumes: Sequence[_CachedVolume], num_classes: int, soft_labels: bool = False) -> None:
        self.volumes = list(volumes)
        self.num_classes = num_classes
        self.soft_labels = soft_labels

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        vol = self.volumes[index]
        with np.load(vol.path) as data:
            image, label = data["image"], data["label"]
        full = np.zeros((self.num_classes, *label.shape[1:]), dtype=np.uint8)
        full[list(vol.channels)] = label
        annotated = torch.zeros(self.num_classes, dtype=torch.bool)
        annotated[list(vol.channels)] = True
        target = torch.from_numpy(full)
        if self.soft_labels:
            target = target.float() / _SOFT_LABEL_STEPS
        return {"image": torch.from_numpy(image), "label": target, "annotated": annotated}


def _cache_key(case: Any, structures: Sequence[str], preprocess: PreprocessConfig, soft_labels: bool = False) -> str:
    files = [str(case.image)] + [str(p) for p in case.label_paths()]
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    parts = [_CACHE_VERSION, stats, list(structures), sorted(case.label_map.items()), preprocess.to_dict()]
    if soft_labels:  # appended only when set, so existing caches keep their keys
        parts.append("soft_labels")
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def _main_first(ctx: DistributedContext, fn: Any, *args: Any) -> Any:
    """Run `fn` on rank 0 and share its result, or its error, with every rank."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args)
        except FseftError as exc:
            error = (type(exc).__name__, str(exc))
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        kind = {"InputFileError": InputFileError}.get(error[0], ConfigError)
        raise kind(error[1])
    return result


def _check_label_values(sources: list[_Source], cache_dir: Path, progress: bool) -> None:
    # voxel_counts raises InputFileError for a label value absent from the label map (cached).
    from fseft.data.inspection import voxel_counts

    for source in sources:
        voxel_counts(source.dataset, source.structures, cache_dir=cache_dir, progress=progress)


def prepare_cache(sources: list[_Source], catalogue: Sequence[str], preprocess: PreprocessConfig, cache_dir: Path,
                  ctx: DistributedContext, progress: bool = True, soft_labels: bool = False) -> CachedVolumes:
    """Preprocess every labelled case once into ``cache_dir`` (ranks share the work) and return
    the cached volumes. A cache file is reused while its inputs (files, sizes, mtimes),
    structures, preprocessing config and `soft_labels` are unchanged."""
    from tqdm import tqdm

    from fseft.data.preprocessing import preprocess as run_preprocess

    index = {c: i for i, c in enumerate(catalogue)}
    jobs: list[tuple[Any, tuple[str, ...], Path]] = []
    volumes: list[_CachedVolume] = []
    for group, source in enumerate(sources):
        for case in source.dataset.cases:
            path = cache_dir / f"{_cache_key(case, source.structures, preprocess, soft_labels)}.npz"
            volumes.append(_CachedVolume(path, tuple(index[s] for s in source.structures), group))
            jobs.append((case, source.structures, path))
    mine = [job for i, job in enumerate(jobs) if i % ctx.world_size == ctx.rank and not job[2].exists()]
    error = None
    try:
        for case, structures, path in tqdm(mine, desc="preprocess", unit="case", disable=not (progress and ctx.is_main)):
            image, labels = case.load(structures)
            prepared = run_preprocess(image, labels, preprocess, soft_labels=soft_labels)
            label = prepared.label.as_tensor().numpy()
            if soft_labels:
                label = np.rint(label * _SOFT_LABEL_STEPS)
            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, image=prepared.image.as_tensor().numpy().astype(np.float32), label=label.astype(np.uint8))
    except FseftError as exc:
        error = (type(exc).__name__, str(exc))
    errors = [error]
    if ctx.is_distributed:
        errors = [None] * ctx.world_size
        torch.distributed.all_gather_object(errors, error)
    for err in errors:
        if err is not None:
            raise (InputFileError if err[0] == "InputFileError" else ConfigError)(err[1])
    barrier(ctx)
    return CachedVolumes(volumes, len(catalogue), soft_labels)


# ---------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, epoch: int,
                     identity: dict[str, Any]) -> None:
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng": _rng_state(),
        "identity": json.dumps(identity, sort_keys=True),
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        # Python's random state is a tuple of ints, within what weights_only allows. Loaded on
        # the CPU: the RNG states must stay there (load_state_dict moves weights and optimizer
        # state to the model's device).
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise InputFileError(f"{path}: not a readable fseft pre-training checkpoint ({exc})") from exc


# ---------------------------------------------------------------------------- training


def transfer_weights(donor: torch.nn.Module, model: torch.nn.Module) -> str:
    """Start ``model`` from ``donor``'s weights (`AssemblyConfig.init`: continued or warm-started
    pre-training); both are `fseft.models.SegmentationModel`.

    Every tensor but the head's must exist in both with the same shape (same architecture and
    size); head rows are copied by class name (`fseft.methods.head.head_rows` / `init_head`, as
    an adapted model's head starts) for the classes both share, when the donor's head was
    trained (``model_config["head_pretrained"]``, True for fseft files); the model's other
    classes keep their fresh initialisation. Returns a one-line summary of what was copied.

    Raises:
        ConfigError: another architecture or size (names both).
    """
    from fseft.methods.head import head_rows, init_head
    from fseft.models.architectures import variant_options

    ours, theirs = model.state_dict(), donor.state_dict()
    body = [k for k in ours if not k.startswith("head.")]
    absent = [k for k in body if k not in theirs]
    mismatched = [k for k in body if k in theirs and theirs[k].shape != ours[k].shape]
    if donor.arch == model.arch:
        donor_options = variant_options(donor.arch, donor.arch_kwargs)
        options = variant_options(model.arch, model.arch_kwargs)
        if donor_options != options:
            # same tensors, another function (e.g. a public Swin-UNETR's legacy patch merging)
            raise ConfigError(
                f"the initial weights were trained with {donor_options}, the assembly builds {options}: "
                "set them in the assembly's model.arch_kwargs")
    if donor.arch != model.arch or absent or mismatched:
        raise ConfigError(
            f"the initial weights are a {donor.arch} {donor.arch_kwargs}, the assembly builds a {model.arch} "
            f"{model.arch_kwargs}: they must be the same architecture and size"
            + (f" ({len(absent)} tensors missing, e.g. {absent[0]})" if absent else "")
            + (f" ({len(mismatched)} of another shape, e.g. {mismatched[0]})" if mismatched else ""))
    with torch.no_grad():
        for key in body:
            ours[key].copy_(theirs[key].to(ours[key].dtype))
    head_trained = bool((getattr(donor, "model_config", None) or {}).get("head_pretrained", True))
    rows = head_rows(donor.class_names, model.class_names, multiclass=False) if head_trained \
        else [None] * len(model.class_names)
    init_head(model.head, donor.head, rows)
    shared = [c for c, row in zip(model.class_names, rows) if row is not None]
    fresh = [c for c, row in zip(model.class_names, rows) if row is None]
    return (f"{len(body)} tensors of the network; head rows for {len(shared)} classes"
            + (f" ({', '.join(shared)})" if shared else "")
            + (f"; new head rows for {', '.join(fresh)}" if fresh else ""))


def _build_model(assembly: AssemblyConfig, catalogue: Sequence[str]) -> torch.nn.Module:
    from fseft.models.zoo import create_model

    kwargs = dict(assembly.arch_kwargs)
    if assembly.train.grad_checkpointing:
        kwargs["use_checkpoint"] = True
    try:
        return create_model(assembly.arch, list(catalogue), **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{assembly.source}: model: {exc}") from exc


def _train_epoch(model: torch.nn.Module, loader: Any, optimizer: Any, scheduler: Any, ctx: DistributedContext,
                 train: PretrainConfig, num_classes: int, desc: str) -> dict[str, Any]:
    """One pass over `loader`; returns this rank's sums: loss, steps, per-class loss and counts."""
    from tqdm import tqdm

    from fseft.training.losses import check_finite_loss, masked_class_losses, per_class_bce_dice
    from fseft.training.sampling import plain_tensor

    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64)
    class_sum = torch.zeros(num_classes, dtype=torch.float64)
    class_count = torch.zeros(num_classes, dtype=torch.float64)
    steps = 0
    bar = tqdm(loader, desc=desc, unit="step", leave=False, disable=not (train.progress and ctx.is_main))
    for batch in bar:
        image = plain_tensor(batch["image"]).to(ctx.device, non_blocking=True)
        label = plain_tensor(batch["label"]).to(ctx.device, non_blocking=True)
        annotated = plain_tensor(batch["annotated"]).to(ctx.device)
        with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=train.bf16):
            logits = model(image)
        per_class = per_class_bce_dice(logits, label)  # (B, C) float32
        loss = masked_class_losses(per_class, annotated)
        check_finite_loss(loss, scheduler.last_epoch + 1, optimizer.param_groups[0]["lr"], "pre-training")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        detached = per_class.detach().double().cpu()
        mask = annotated.cpu()
        class_sum += torch.where(mask, detached, torch.zeros_like(detached)).sum(0)
        class_count += mask.double().sum(0)
        loss_sum += loss.detach().double().cpu()
        steps += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return {"loss_sum": loss_sum, "steps": steps, "class_sum": class_sum, "class_count": class_count}


def validation_dice(model: torch.nn.Module, volumes: CachedVolumes, catalogue: Sequence[str],
                    roi_size: Sequence[int], device: torch.device, bf16: bool = False) -> dict[str, float]:
    """Mean Dice over `volumes` of each class they annotate: sigmoid > 0.5 of whole-volume
    sliding-window logits in model space (no largest-component step, no resampling)."""
    return _validation_scores(model, volumes, catalogue, roi_size, device, bf16)[0]


def _validation_scores(model: torch.nn.Module, volumes: CachedVolumes, catalogue: Sequence[str],
                       roi_size: Sequence[int], device: torch.device, bf16: bool = False,
                       largest_component: bool = False) -> tuple[dict[str, float], dict[str, float] | None]:
    """`validation_dice`, and with `largest_component` also the Dice after each mask is reduced
    to its largest connected component (multi-part structures excepted), from the same single
    inference pass; None without it."""
    from fseft.inference.sliding_window import InferenceConfig, predict_probabilities
    from fseft.evaluation.metrics import dice
    from fseft.evaluation.postprocess import keep_largest_components

    cfg = InferenceConfig(roi_size=tuple(roi_size), device=str(device), bf16=bf16, progress=False)
    plain: dict[str, list[float]] = {}
    reduced: dict[str, list[float]] = {}
    for item in volumes:
        annotated = item["annotated"].nonzero().flatten().tolist()
        probs = predict_probabilities(model, item["image"][None], cfg, channels=annotated)[0]
        masks = (probs > 0.5).numpy()
        largest = keep_largest_components(masks, [catalogue[c] for c in annotated]) if largest_component else None
        for j, c in enumerate(annotated):
            target = item["label"][c].numpy() > 0.5
            plain.setdefault(catalogue[c], []).append(dice(masks[j], target))
            if largest is not None:
                reduced.setdefault(catalogue[c], []).append(dice(largest[j], target))

    def mean(scores: dict[str, list[float]]) -> dict[str, float]:
        return {c: float(np.mean(scores[c])) for c in catalogue if c in scores}

    return mean(plain), (mean(reduced) if largest_component else None)


def _csv_log(history: Sequence[Mapping[str, Any]], catalogue: Sequence[str]) -> str:
    """``log.csv``: one row per epoch, training loss per class and validation Dice per class."""
    import csv
    import io

    has_val = any("val_dice" in r for r in history)
    header = ["epoch", "loss", "lr", "seconds"] + [f"loss_{c}" for c in catalogue]
    if has_val:
        header += [f"val_dice_{c}" for c in catalogue] + ["val_dice_mean"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in history:
        row = [r["epoch"], f"{r['loss']:.5f}", f"{r['lr']:.3e}", r["seconds"]]
        row += ["" if r["loss_per_class"].get(c) is None else f"{r['loss_per_class'][c]:.5f}" for c in catalogue]
        if has_val:
            val = r.get("val_dice") or {}
            row += ["" if c not in val else f"{val[c]:.4f}" for c in catalogue]
            row += ["" if not val else f"{np.mean(list(val.values())):.4f}"]
        writer.writerow(row)
    return buffer.getvalue()


def _open_tensorboard(out: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: TensorBoard is not installed (pip install tensorboard); logging to log.jsonl only", flush=True)
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _read_log(path: Path, upto_epoch: int) -> list[str]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= upto_epoch:
                lines.append(line)
        except ValueError:
            continue  # a torn line cannot occur with atomic writes; skip anything odd
    return lines


@dataclass
class PretrainResult:
    """What `pretrain` returns on every rank.

    model: the trained model (unwrapped from DDP, on the training device). model_path:
    ``out/model.safetensors`` on rank 0 once every epoch is done, else None. history: the
    per-epoch log records (``log.jsonl``) of the whole run, resumed epochs included.
    epochs_done: epochs completed so far.
    """

    model: torch.nn.Module
    model_path: Path | None
    history: list[dict[str, Any]]
    epochs_done: int
    rank: int = 0


def pretrain(assembly: AssemblyConfig, out: str | os.PathLike, *, resume: bool = False,
             until_epoch: int | None = None) -> PretrainResult:
    """Pre-train a model on the assembly (one process, or a torchrun DDP job: every rank calls
    this). Writes ``out/model.safetensors`` (rank 0) once all epochs are done.

    resume: continue from ``out/checkpoint.pt`` (model, optimizer, schedule, epoch, RNG).
    until_epoch: stop after this epoch in this call (the schedule still spans all `epochs`),
    for jobs cut into time slices; continue later with ``resume=True``.
    Raises `ConfigError` / `InputFileError` for a bad assembly or dataset before training starts.
    """
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    out = Path(out)
    train = assembly.train
    checkpoint_path = out / CHECKPOINT_NAME
    if resume and not checkpoint_path.exists():
        raise ConfigError(f"--resume: no checkpoint to resume from at {checkpoint_path}")
    if not resume and checkpoint_path.exists():
        raise ConfigError(f"{out} already holds a pre-training run ({checkpoint_path}); "
                          "pass --resume to continue it, or choose another --out")

    from fseft.models.zoo import check_window

    try:
        check_window(assembly.arch, train.patch_size)
    except ConfigError as exc:
        raise ConfigError(f"{assembly.source}: train.patch_size {list(train.patch_size)}: {exc}") from exc
    with distributed_context(train.device) as ctx:
        if train.bf16:
            from fseft.inference.sliding_window import check_bf16_training
            from fseft.models.architectures import architecture

            try:
                check_bf16_training(architecture(assembly.arch), train.patch_size, ctx.device)
            except ConfigError as exc:
                raise ConfigError(f"{assembly.source}: train.patch_size {list(train.patch_size)}: {exc}") from exc
        seed_everything(train.seed)  # identical initial weights on every rank
        catalogue, sources = resolve_sources(assembly)
        val_source = resolve_validation(assembly, catalogue)
        # built, and started from `init`, before anything is written: a bad init leaves no run folder
        model = _build_model(assembly, catalogue)
        if train.head_prior is not None:
            with torch.no_grad():
                model.head.bias.fill_(math.log(train.head_prior / (1 - train.head_prior)))
        if assembly.init is not None and not resume:  # a resumed run loads its own checkpoint below
            from fseft.models.zoo import load_model

            try:
                summary = transfer_weights(load_model(assembly.init), model)
            except ConfigError as exc:
                raise ConfigError(f"{assembly.source}: model.init: {exc}") from exc
            if ctx.is_main:
                print(f"initialised from {assembly.init}: {summary}", flush=True)
        identity = {"arch": assembly.arch, "arch_kwargs": assembly.arch_kwargs, "classes": list(catalogue),
                    "preprocess": assembly.preprocess.to_dict()}
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            resolved = assembly.to_dict()
            resolved["model"]["classes"] = list(catalogue)
            write_json(out / "assembly.json", {**resolved, "source": assembly.source})
        cache_dir = out / "cache"
        _main_first(ctx, _check_label_values, sources, cache_dir, train.progress)
        # MONAI takes seconds to import: only once the assembly has passed every check
        from monai.data import list_data_collate

        from fseft.training.losses import check_finite_parameters
        from fseft.training.sampling import EpochPatchDataset, class_balanced_group_weights, patch_transforms
        from fseft.training.fit import make_optimizer

        volumes = prepare_cache(sources, catalogue, assembly.preprocess, cache_dir, ctx, train.progress,
                                train.soft_labels)
        val_volumes = None if val_source is None else prepare_cache(
            [val_source], catalogue, assembly.preprocess, cache_dir, ctx, train.progress, train.soft_labels)

        if ctx.is_distributed and ctx.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm over the global batch
        model = wrap_model(model, ctx)
        transform = patch_transforms(train.patch_size, train.patches_per_volume, train.pos, train.neg, train.augment,
                                     sampling=train.sampling, flip_axes=train.flip_axes, rotate90=train.rotate90)
        groups, group_weights = None, None
        if train.balance_datasets or train.balance_classes:
            groups = [v.group for v in volumes.volumes]
        if train.balance_classes:
            annotates = np.array([[c in s.structures for c in catalogue] for s in sources])
            group_weights = class_balanced_group_weights(annotates, [len(s.dataset.cases) for s in sources])
            if ctx.is_main:
                share = annotates.T.astype(float) @ group_weights
                print("class-balanced dataset weights: "
                      + ", ".join(f"{s.entry.name} {w:.3f}" for s, w in zip(sources, group_weights))
                      + "; share of steps per class: "
                      + ", ".join(f"{c} {v:.2f}" for c, v in zip(catalogue, share)), flush=True)
        dataset = EpochPatchDataset(volumes, transform, seed=train.seed, groups=groups,
                                    length=train.volumes_per_epoch, group_weights=group_weights)
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=train.seed)
        loader = DataLoader(dataset, batch_size=train.batch_size, sampler=sampler, collate_fn=list_data_collate,
                            num_workers=train.num_workers, pin_memory=ctx.device.type == "cuda",
                            persistent_workers=False)
        steps_per_epoch = len(loader)
        optimizer, scheduler = make_optimizer(model.parameters(), train.lr, train.weight_decay,
                                              round(train.warmup_epochs * steps_per_epoch), train.epochs * steps_per_epoch)

        start_epoch = 0
        if resume:
            state = _load_checkpoint(checkpoint_path, ctx.device)
            saved = json.loads(state["identity"])
            if saved != json.loads(json.dumps(identity, sort_keys=True)):
                raise ConfigError(f"{checkpoint_path} was trained with another model, catalogue or preprocessing "
                                  f"({saved}); it cannot be resumed with {assembly.source}")
            unwrap_model(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            # a resume with another --epochs stretches the schedule to the new length
            scheduler.t_total = train.epochs * steps_per_epoch
            start_epoch = int(state["epoch"])
            _set_rng_state(state["rng"])
        log_lines = _read_log(out / LOG_NAME, start_epoch) if resume else []
        history = [json.loads(line) for line in log_lines]
        writer = _open_tensorboard(out, train.tensorboard) if ctx.is_main else None
        if ctx.is_main:
            print(f"pre-training {assembly.arch} on {len(volumes)} volumes from {len(sources)} datasets, "
                  f"{len(catalogue)} classes, {ctx.world_size} process(es) on {ctx.device}; "
                  f"{steps_per_epoch} steps/epoch, epochs {start_epoch + 1}..{train.epochs}", flush=True)

        last_epoch = train.epochs if until_epoch is None else min(train.epochs, until_epoch)
        for epoch in range(start_epoch, last_epoch):
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            started = time.perf_counter()
            sums = _train_epoch(model, loader, optimizer, scheduler, ctx, train, len(catalogue),
                                desc=f"epoch {epoch + 1}/{train.epochs}")
            seconds = time.perf_counter() - started
            packed = torch.cat([sums["loss_sum"].reshape(1), torch.tensor([float(sums["steps"])], dtype=torch.float64),
                                sums["class_sum"], sums["class_count"]])
            packed = all_reduce_sum(packed, ctx)
            n = len(catalogue)
            loss = float(packed[0] / packed[1])
            per_class = {c: (float(packed[2 + i] / packed[2 + n + i]) if packed[2 + n + i] > 0 else None)
                         for i, c in enumerate(catalogue)}
            record = {"epoch": epoch + 1, "loss": loss, "loss_per_class": per_class,
                      "lr": optimizer.param_groups[0]["lr"], "steps": steps_per_epoch,
                      "seconds": round(seconds, 2), "world_size": ctx.world_size}
            validate = val_volumes is not None and ((epoch + 1) % assembly.validation.every == 0
                                                    or epoch + 1 == train.epochs)
            if validate and ctx.is_main:
                record["val_dice"] = validation_dice(unwrap_model(model), val_volumes, catalogue, train.patch_size,
                                                     ctx.device, train.bf16)
            history.append(record)
            check_finite_parameters(unwrap_model(model), "pre-training")  # before the checkpoint is replaced
            if ctx.is_main:
                _save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch + 1, identity)
                log_lines.append(json.dumps(record))
                write_text(out / LOG_NAME, "\n".join(log_lines) + "\n")
                write_text(out / CSV_LOG_NAME, _csv_log(history, catalogue))
                classes = "  ".join(f"{c} {v:.3f}" for c, v in per_class.items() if v is not None)
                print(f"epoch {epoch + 1}/{train.epochs}  loss {loss:.4f}  lr {record['lr']:.2e}  "
                      f"{seconds:.1f}s  |  {classes}", flush=True)
                if "val_dice" in record:
                    dice = record["val_dice"]
                    print(f"  validation Dice (mean {np.mean(list(dice.values())):.3f}): "
                          + "  ".join(f"{c} {v:.3f}" for c, v in dice.items()), flush=True)
                if writer is not None:
                    writer.add_scalar("loss/total", loss, epoch + 1)
                    for c, v in per_class.items():
                        if v is not None:
                            writer.add_scalar(f"loss/{c}", v, epoch + 1)
                    writer.add_scalar("lr", record["lr"], epoch + 1)
                    for c, v in record.get("val_dice", {}).items():
                        writer.add_scalar(f"val_dice/{c}", v, epoch + 1)
                    writer.flush()
            barrier(ctx)
        if writer is not None:
            writer.close()

        trained = unwrap_model(model)
        if last_epoch < train.epochs:
            return PretrainResult(trained, None, history, last_epoch, ctx.rank)
        model_path = out / MODEL_NAME
        if ctx.is_main:
            postprocess = None
            if val_volumes is not None:
                postprocess = choose_postprocessing(trained, val_volumes, catalogue, train.patch_size, ctx.device,
                                                    train.bf16)
            _save_final_model(trained, model_path, assembly, sources, train.epochs, postprocess)
            print(f"wrote {model_path}", flush=True)
        barrier(ctx)
        return PretrainResult(trained, model_path if ctx.is_main else None, history, train.epochs, ctx.rank)


def choose_postprocessing(model: torch.nn.Module, volumes: CachedVolumes, catalogue: Sequence[str],
                          roi_size: Sequence[int], device: torch.device, bf16: bool = False) -> dict[str, Any]:
    """Whether each class the validation set annotates keeps only its largest component
    (`fseft.evaluation.postprocess.choose_largest_component` on the validation Dice with and
    without that step; multi-part classes are never reduced, so not chosen), as the model
    file's ``extra.postprocess``: ``{"largest_component": {class: bool}, "validation_dice":
    {class: [with, without]}}``. `fseft predict` follows it (`recorded_whole_structures`)."""
    from fseft.data.structures import is_multi_part
    from fseft.evaluation.postprocess import choose_largest_component

    without, with_step = _validation_scores(model, volumes, catalogue, roi_size, device, bf16, largest_component=True)
    single = [c for c in with_step if not is_multi_part(c)]
    choice = choose_largest_component({c: with_step[c] for c in single}, without)
    whole = [c for c, keep_largest in choice.items() if not keep_largest]
    print("post-processing chosen on the validation set: largest component for every class"
          + (f" except {', '.join(whole)} (kept whole: " + ", ".join(
              f"{c} {without[c]:.3f} against {with_step[c]:.3f}" for c in whole) + ")" if whole else ""), flush=True)
    return {"largest_component": choice,
            "validation_dice": {c: [with_step[c], without[c]] for c in single}}


def _save_final_model(model: torch.nn.Module, path: Path, assembly: AssemblyConfig, sources: list[_Source],
                      epochs: int, postprocess: dict[str, Any] | None = None) -> None:
    from fseft.models.checkpoint import save_model_file

    if getattr(model, "arch_kwargs", {}).get("use_checkpoint"):
        # checkpointing is a training-time memory trade; inference loads the plain model
        model.arch_kwargs = {**model.arch_kwargs, "use_checkpoint": False}
    model.eval()
    extra = {"inference": {"roi_size": list(assembly.train.patch_size)},  # the window it was trained on
             "pretrain": {"epochs": epochs,
                          "datasets": [{"name": s.entry.name, "structures": list(s.structures),
                                        "cases": len(s.dataset.cases)} for s in sources]}}
    if assembly.init is not None:  # where the weights started (a zoo id, or a model file's name)
        extra["pretrain"]["init"] = Path(assembly.init).name
    if postprocess is not None:
        extra["postprocess"] = postprocess
    save_model_file(model, path, assembly.preprocess, extra, dtype=getattr(torch, assembly.save_dtype))
