"""Dataset readers: nnU-Net v2 raw, TotalSegmentator and FLARE22 folders as one `Dataset` of `Case`s.

A `Case` only holds paths (an image, and either one multilabel file with its value -> name map
or one binary file per structure); nothing is read until `Case.load`, `check_cases` or
`fseft.data.inspection.voxel_counts`.
Every structure name is canonical (`fseft.data.structures.canonical_name`), so ``lKid`` in a
dataset.json and ``kidney_left.nii.gz`` in a TotalSegmentator folder are the same structure.

Layouts (``layout="auto"`` tries them in this order):

- ``nnunet``: ``dataset.json`` (``labels`` name -> value, ``file_ending``),
  ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``; ``imagesTs`` (with
  ``labelsTs`` where present) gives cases without labels.
- ``flare22``: the same folders without dataset.json, files named ``FLARE22_Tr_0001_0000.nii.gz``
  / ``FLARE22_Tr_0001.nii.gz``; label values from `FLARE22_LABELS`.
- ``totalseg``: ``<case>/ct.nii.gz`` and ``<case>/segmentations/<structure>.nii.gz``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fseft.data.io import read_binary_masks, read_image, read_multilabel
from fseft.data.structures import FLARE22_LABELS, canonical_name, canonical_names
from fseft.data.volume import Volume, align_to_grid
from fseft.errors import ConfigError, InputFileError

LAYOUTS: tuple[str, ...] = ("nnunet", "totalseg", "flare22")

# nnU-Net v2's "ignore" label marks unannotated voxels: a valid value, but not a structure.
IGNORE_LABEL = "ignore"

# What each layout expects, for the "matches no layout" error.
_LAYOUT_HELP: dict[str, str] = {
    "nnunet": "dataset.json (labels, file_ending) with imagesTr/<case>_0000<ending> "
    "and labelsTr/<case><ending>",
    "totalseg": "<case>/ct.nii.gz with <case>/segmentations/<structure>.nii.gz",
    "flare22": "imagesTr/FLARE22_Tr_0001_0000.nii.gz with labelsTr/FLARE22_Tr_0001.nii.gz "
    "(or images/ and labels/)",
}

_FLARE22_IMAGE = re.compile(r"^(FLARE22_[A-Za-z]+_\d+)_0000\.nii\.gz$")
# (images folder, labels folder) pairs of FLARE22 releases: nnU-Net-style and the original one.
_FLARE22_FOLDERS: tuple[tuple[str, str], ...] = (("imagesTr", "labelsTr"), ("images", "labels"))


# ---------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One scan and its annotation: a multilabel file (`label` + `label_map`, value -> canonical
    name) or one binary file per canonical structure (`label_files`). `label=None` and no
    `label_files`: an unlabelled case (nnU-Net ``imagesTs``)."""

    case_id: str
    image: Path
    label: Path | None = None
    label_files: Mapping[str, Path] = field(default_factory=dict, hash=False)
    label_map: Mapping[int, str] = field(default_factory=dict, hash=False)

    @property
    def is_labelled(self) -> bool:
        return self.label is not None or bool(self.label_files)

    @property
    def structures(self) -> tuple[str, ...]:
        """Canonical names of the structures this case annotates (label-value order for a
        multilabel file); empty for an unlabelled case."""
        if self.label_files:
            return tuple(self.label_files)
        if self.label is None:
            return ()
        return tuple(n for _, n in sorted(self.label_map.items()) if n != IGNORE_LABEL)

    def _requested(self, structures: Sequence[str] | str | None) -> tuple[str, ...]:
        if not self.is_labelled:
            raise ConfigError(f"case {self.case_id!r} has no labels (image {self.image})")
        names = self.structures if structures is None else canonical_names(structures)
        missing = [s for s in names if s not in self.structures]
        if missing:
            raise ConfigError(
                f"case {self.case_id!r} does not annotate {', '.join(missing)} "
                f"(it annotates: {', '.join(self.structures)})"
            )
        return names

    def load(self, structures: Sequence[str] | str | None = None, unmapped: str = "ignore") -> tuple[Volume, Volume]:
        """Read the scan and the binary masks of `structures` (default: all of the case's).

        Returns ``(image, labels)``: image ``(X, Y, Z)`` float32 HU, labels ``(S, X, Y, Z)``
        uint8 with channel ``i`` = ``structures[i]``, on the image's grid (`align_to_grid`: labels in
        another voxel order are reoriented, other geometries refused). `unmapped`: label values
        the map lacks, see `fseft.data.io.read_multilabel`.
        """
        names = self._requested(structures)
        image = read_image(self.image)
        if self.label_files:
            labels = read_binary_masks({s: self.label_files[s] for s in names}, names)
        else:
            assert self.label is not None
            labels = read_multilabel(self.label, dict(self.label_map), names, unmapped=unmapped)
        return image, align_to_grid(image, labels)

    def label_paths(self) -> list[Path]:
        """Every label file of the case (one multilabel file, or the binary files)."""
        if self.label_files:
            return list(self.label_files.values())
        return [self.label] if self.label is not None else []


@dataclass
class Dataset:
    """Cases of one dataset folder, in case-id order. `original_names` maps a canonical
    structure name to the dataset's own spelling where they differ (``kidney_left -> lKid``)."""

    name: str
    layout: str
    root: Path
    cases: list[Case]
    original_names: dict[str, str] = field(default_factory=dict)

    @property
    def structures(self) -> tuple[str, ...]:
        """Canonical names of all structures annotated in at least one case (first-seen order)."""
        seen: dict[str, None] = {}
        for case in self.cases:
            for s in case.structures:
                seen.setdefault(s, None)
        return tuple(seen)

    @property
    def labelled_cases(self) -> list[Case]:
        return [c for c in self.cases if c.is_labelled]

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        preview = ", ".join(c.case_id for c in self.cases[:5])
        more = ", ..." if len(self.cases) > 5 else ""
        raise ConfigError(
            f"case {case_id!r} is not in dataset {self.name!r} ({self.root}); "
            f"its {len(self.cases)} cases are: {preview}{more}"
        )

    def __len__(self) -> int:
        return len(self.cases)


# ---------------------------------------------------------------------------- layout readers


def _visible(paths: Iterable[Path]) -> list[Path]:
    """Sorted, without hidden files (macOS ``._*``, our own atomic-write temporaries)."""
    return sorted(p for p in paths if not p.name.startswith("."))


def _is_nnunet(root: Path) -> bool:
    return (root / "dataset.json").is_file()


def _is_flare22(root: Path) -> bool:
    for images, _ in _FLARE22_FOLDERS:
        folder = root / images
        if folder.is_dir() and any(_FLARE22_IMAGE.match(p.name) for p in folder.iterdir()):
            return True
    return False


def _is_totalseg(root: Path) -> bool:
    return any((p / "ct.nii.gz").is_file() for p in root.iterdir() if p.is_dir())


_DETECTORS = {"nnunet": _is_nnunet, "flare22": _is_flare22, "totalseg": _is_totalseg}


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of a dataset folder (``nnunet``, ``flare22`` or ``totalseg``, tried in this
    order); `InputFileError` listing what each layout expects when none matches."""
    root = _check_folder(root)
    for layout, looks_like in _DETECTORS.items():
        if looks_like(root):
            return layout
    tried = "\n".join(f"  - {name}: {_LAYOUT_HELP[name]}" for name in _DETECTORS)
    raise InputFileError(f"{root}: matches no dataset layout; tried:\n{tried}")


def _check_folder(path: str | os.PathLike) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise InputFileError(f"{root}: no such dataset folder")
    if not root.is_dir():
        raise InputFileError(
            f"{root}: is a file, not a dataset folder (nnU-Net, TotalSegmentator or FLARE22 layout)"
        )
    return root


def _read_nnunet_labels(dataset_json: Path, labels: Any) -> tuple[dict[int, str], dict[str, str]]:
    """dataset.json ``labels`` -> (value -> canonical name, canonical -> original name)."""
    if not isinstance(labels, dict) or not labels:
        raise InputFileError(f"{dataset_json}: 'labels' must be a non-empty mapping name -> value")
    label_map: dict[int, str] = {}
    originals: dict[str, str] = {}
    for original, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise InputFileError(
                f"{dataset_json}: label {original!r} is region-based ({value}); fseft needs one "
                "integer value per structure (convert the regions to plain labels first)"
            )
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
            raise InputFileError(f"{dataset_json}: label {original!r} has value {value!r}, not an integer >= 0")
        value = int(value)
        if value == 0:  # background
            continue
        name = IGNORE_LABEL if original.strip().lower() == IGNORE_LABEL else canonical_name(original)
        if value in label_map:
            raise InputFileError(
                f"{dataset_json}: labels {label_map[value]!r} and {original!r} share value {value}"
            )
        if name in label_map.values():
            raise InputFileError(
                f"{dataset_json}: labels {originals.get(name, name)!r} and {original!r} are the "
                f"same structure ({name})"
            )
        label_map[value] = name
        if name != original:
            originals[name] = original
    return label_map, originals


def _paired_cases(
    images_dir: Path,
    labels_dir: Path | None,
    image_pattern: re.Pattern[str],
    ending: str,
    label_map: dict[int, str],
    labels_required: bool,
) -> list[Case]:
    """Cases from an images folder (``<case>_0000<ending>``) and its labels folder."""
    cases: list[Case] = []
    for image in _visible(images_dir.iterdir()):
        match = image_pattern.match(image.name)
        if not match:
            continue  # other channels (_0001), stray files
        case_id = match.group(1)
        label: Path | None = None
        if labels_dir is not None:
            label = labels_dir / f"{case_id}{ending}"
            if not label.is_file():
                if labels_required:
                    raise InputFileError(f"{image}: image without its label (expected {label})")
                label = None
        cases.append(Case(case_id, image, label, label_map=label_map if label else {}))
    if labels_dir is not None and labels_dir.is_dir() and labels_required:
        ids = {c.case_id for c in cases}
        for label in _visible(labels_dir.iterdir()):
            if label.name.endswith(ending) and label.name[: -len(ending)] not in ids:
                expected = images_dir / f"{label.name[: -len(ending)]}_0000{ending}"
                raise InputFileError(f"{label}: label without its image (expected {expected})")
    return cases


def _merge_splits(root: Path, *splits: list[Case]) -> list[Case]:
    cases: dict[str, Case] = {}
    for split in splits:
        for case in split:
            if case.case_id in cases:
                raise InputFileError(
                    f"{root}: case id {case.case_id!r} appears twice ({cases[case.case_id].image} "
                    f"and {case.image})"
                )
            cases[case.case_id] = case
    if not cases:
        raise InputFileError(f"{root}: dataset folder holds no cases")
    return sorted(cases.values(), key=lambda c: c.case_id)


def _read_nnunet(root: Path) -> Dataset:
    dataset_json = root / "dataset.json"
    if not dataset_json.is_file():
        raise InputFileError(f"{root}: no dataset.json; the nnunet layout expects {_LAYOUT_HELP['nnunet']}")
    try:
        meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{dataset_json}: not a readable JSON file ({exc})") from exc
    if not isinstance(meta, dict):
        raise InputFileError(f"{dataset_json}: expected a JSON object")
    if "labels" not in meta:
        raise InputFileError(f"{dataset_json}: no 'labels' entry (nnU-Net v2 dataset.json)")
    label_map, originals = _read_nnunet_labels(dataset_json, meta["labels"])
    ending = meta.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise InputFileError(f"{dataset_json}: 'file_ending' must be a string such as '.nii.gz', got {ending!r}")
    pattern = re.compile(rf"^(.+)_0000{re.escape(ending)}$")
    splits = []
    if (root / "imagesTr").is_dir():
        splits.append(_paired_cases(root / "imagesTr", root / "labelsTr", pattern, ending, label_map, True))
    if (root / "imagesTs").is_dir():
        splits.append(_paired_cases(root / "imagesTs", root / "labelsTs", pattern, ending, label_map, False))
    if not splits:
        raise InputFileError(f"{root}: nnU-Net dataset without an imagesTr/ (or imagesTs/) folder")
    name = meta.get("name") if isinstance(meta.get("name"), str) else root.name
    return Dataset(name, "nnunet", root, _merge_splits(root, *splits), originals)


def _read_flare22(root: Path) -> Dataset:
    label_map = dict(FLARE22_LABELS)
    splits = []
    for images, labels in _FLARE22_FOLDERS:
        if (root / images).is_dir():
            splits.append(_paired_cases(root / images, root / labels, _FLARE22_IMAGE, ".nii.gz", label_map, True))
    for images in ("imagesTs", "imagesVal"):
        if (root / images).is_dir():
            splits.append(_paired_cases(root / images, None, _FLARE22_IMAGE, ".nii.gz", label_map, False))
    if not splits:
        raise InputFileError(f"{root}: FLARE22 dataset without an imagesTr/ (or images/) folder")
    return Dataset(root.name, "flare22", root, _merge_splits(root, *splits))


def _read_totalseg(root: Path) -> Dataset:
    cases: list[Case] = []
    originals: dict[str, str] = {}
    for folder in _visible(p for p in root.iterdir() if p.is_dir()):
        image = folder / "ct.nii.gz"
        seg_dir = folder / "segmentations"
        if not image.is_file():
            if seg_dir.is_dir():
                raise InputFileError(f"{seg_dir}: labels without their image (expected {image})")
            continue
        if not seg_dir.is_dir():
            raise InputFileError(f"{image}: image without its labels (expected folder {seg_dir})")
        files: dict[str, Path] = {}
        for mask in _visible(seg_dir.glob("*.nii.gz")):
            stem = mask.name[: -len(".nii.gz")]
            name = canonical_name(stem)
            if name in files:
                raise InputFileError(f"{mask}: same structure ({name}) as {files[name]}")
            files[name] = mask
            if name != stem:
                originals[name] = stem
        if not files:
            raise InputFileError(f"{seg_dir}: no <structure>.nii.gz masks (image {image})")
        cases.append(Case(folder.name, image, label_files=files))
    if not cases:
        raise InputFileError(f"{root}: TotalSegmentator dataset holds no <case>/ct.nii.gz")
    return Dataset(root.name, "totalseg", root, cases, originals)


_READERS = {"nnunet": _read_nnunet, "totalseg": _read_totalseg, "flare22": _read_flare22}


def open_dataset(path: str | os.PathLike, layout: str = "auto") -> Dataset:
    """Read a dataset folder's file listing (no volumes are read).

    `layout` is ``"auto"`` (detected, see `detect_layout`) or one of `LAYOUTS`.
    Raises `InputFileError` for a missing folder, a folder matching no layout, an image without
    its label (or the reverse) and a malformed dataset.json; `ConfigError` for an unknown layout.
    """
    if layout not in ("auto", *LAYOUTS):
        raise ConfigError(f"unknown dataset layout {layout!r}; choose auto, {', '.join(LAYOUTS)}")
    root = _check_folder(path)
    if layout == "auto":
        layout = detect_layout(root)
    return _READERS[layout](root)


# ---------------------------------------------------------------------------- integrity


# Cases found sound in this process, by their files' (path, size, mtime) and the structures read:
# a benchmark checks each case once, not once per run.
_CHECKED: set[tuple] = set()


def _check_key(case: Case, structures: tuple[str, ...] | None) -> tuple | None:
    try:
        files = [case.image, *case.label_paths()]
        stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file())
    except OSError:
        return None
    return (stats, structures)


def check_cases(
    cases: Sequence[Case], structures: Sequence[str] | str | None = None, *, progress: bool = True,
) -> None:
    """Read every case as a run will, before the run's first step (nnU-Net's dataset integrity
    check): the scan (readable, 3D, finite), the masks of `structures` (default: each case's
    own; none for unlabelled cases), label values the map lacks, and one geometry for both
    (labels in another voxel order are fine: they are reoriented).

    Raises one `InputFileError` listing every case that fails, each with its file and problem.
    """
    wanted = None if structures is None else canonical_names(structures)
    problems = []
    for case in tqdm(cases, desc="checking cases", unit="case", disable=not progress or len(cases) < 2):
        key = _check_key(case, wanted)
        if key is not None and key in _CHECKED:
            continue
        try:
            if case.is_labelled:
                case.load(wanted, unmapped="error")
            else:
                read_image(case.image)
        except (InputFileError, ConfigError) as exc:
            problems.append(f"case {case.case_id!r}: {exc}")
            continue
        if key is not None:
            _CHECKED.add(key)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise InputFileError(f"{len(problems)} of {len(cases)} case(s) cannot be used:\n  " + "\n  ".join(shown))
