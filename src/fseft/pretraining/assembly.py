"""The pre-training assembly: the YAML of `fseft pretrain` (datasets, model, preprocess, train,
validation) as typed configs, and its datasets resolved against the structure catalogue."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fseft.data.datasets import Dataset, open_dataset
from fseft.data.preprocessing import PreprocessConfig
from fseft.data.structures import canonical_name, canonical_names
from fseft.errors import ConfigError, FseftError
from fseft.models.zoo import MODEL_SPECS, create_model
from fseft.training.sampling import check_sampling_options
from fseft.utils import check_keys, read_yaml_mapping, unknown_key_error

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
class AssemblySource:
    """A dataset of the assembly, opened and checked against the catalogue."""

    entry: DatasetEntry
    dataset: Dataset
    structures: tuple[str, ...]  # the catalogue classes it annotates, in catalogue order


def resolve_sources(assembly: AssemblyConfig) -> tuple[tuple[str, ...], list[AssemblySource]]:
    """Open every dataset, apply label-map overrides and check it against the catalogue.

    Returns ``(catalogue, sources)``. Raises `ConfigError` for a structure a dataset does not
    annotate, a dataset annotating no catalogue class, an empty catalogue or dataset.
    """

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
    resolved: list[AssemblySource] = []
    for entry, dataset, listed in sources:
        annotated = tuple(c for c in catalogue if c in listed)
        if not annotated:
            raise ConfigError(f"{src}: dataset {entry.name!r} annotates none of the catalogue classes "
                              f"({', '.join(catalogue)}); it annotates {', '.join(listed)}")
        resolved.append(AssemblySource(entry, dataset, annotated))
    return catalogue, resolved


def resolve_validation(assembly: AssemblyConfig, catalogue: Sequence[str]) -> AssemblySource | None:
    """Open the validation dataset (None without one): its labelled cases (the first
    `max_cases`) and the catalogue classes it annotates. Raises `ConfigError` when it
    annotates none of them."""

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
    return AssemblySource(DatasetEntry(val.path, annotated, val.layout, "validation"), dataset, annotated)


def build_model(assembly: AssemblyConfig, catalogue: Sequence[str]) -> torch.nn.Module:
    kwargs = dict(assembly.arch_kwargs)
    if assembly.train.grad_checkpointing:
        kwargs["use_checkpoint"] = True
    try:
        return create_model(assembly.arch, list(catalogue), **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{assembly.source}: model: {exc}") from exc
