"""`fseft evaluate`: metrics of a folder of predictions against ground truth, per case and mean,
written as JSON and CSV.

Predictions are matched to ground truth by case id (file name without extension):

- prediction folder: ``<case>.nii.gz`` multilabel files with their label map ``<case>.json``
  beside them (what `fseft predict` writes), or ``<case>/<structure>.nii.gz`` binary masks
  (``fseft predict --per-structure-files``);
- ground truth: a dataset folder (nnU-Net with dataset.json, TotalSegmentator, FLARE22; see
  `fseft.data.datasets.open_dataset`), or a folder of label files laid out like predictions,
  whose label map comes from ``<case>.json`` beside each file, the ``dataset.json`` of the
  folder or of its parent (nnU-Net ``labelsTr`` / ``labelsTs``), or ``label_map``.

Every case is evaluated in the ground truth's native geometry; a prediction on another voxel
grid is an error, as is a case present on one side only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fseft.data.datasets import detect_layout, open_dataset
from fseft.data.io import ITK_SUFFIXES, NIFTI_SUFFIXES, read_binary_masks, read_multilabel
from fseft.data.structures import canonical_name, canonical_names
from fseft.data.volume import Volume, align_to_grid
from fseft.errors import ConfigError, InputFileError
from fseft.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM, evaluate_masks
from fseft.utils import write_json, write_text

METRICS: tuple[str, ...] = ("dice", "nsd", "hd95")


# ---------------------------------------------------------------------------- label files


def read_label_map(path: str | os.PathLike) -> dict[int, str]:
    """A label map JSON -> ``{value: canonical name}`` (background 0 left out).

    Accepted forms: ``{"1": "liver", ...}`` (value -> name, as `write_mask` and
    TotalSegmentator write), ``{"liver": 1, ...}`` (name -> value) and an nnU-Net
    ``dataset.json`` (its ``labels`` entry).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path}: not a readable JSON label map ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("labels"), dict):
        data = data["labels"]
    if not isinstance(data, dict) or not data:
        raise InputFileError(f"{path}: expected a JSON object mapping label values to structure names")
    label_map: dict[int, str] = {}
    for key, value in data.items():
        if str(key).strip().isdigit() and isinstance(value, str):
            number, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):
            number, name = value, str(key)
        else:
            raise InputFileError(
                f"{path}: entry {key!r}: {value!r} is neither value -> name nor name -> value"
            )
        if number == 0 or name.strip().lower() in ("background", "ignore"):
            continue
        if number in label_map:
            raise InputFileError(f"{path}: label value {number} appears twice")
        label_map[number] = canonical_name(name)
    if not label_map:
        raise InputFileError(f"{path}: label map has no foreground labels")
    return label_map


@dataclass
class LabelSet:
    """One case's masks on disk: a multilabel `label` file with its `label_map`
    (value -> canonical name), or one binary file per structure (`files`)."""

    case_id: str
    label: Path | None = None
    label_map: Mapping[int, str] = field(default_factory=dict)
    files: Mapping[str, Path] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return str(self.label) if self.label is not None else str(next(iter(self.files.values())).parent)

    @property
    def structures(self) -> tuple[str, ...]:
        if self.files:
            return tuple(self.files)
        return tuple(dict.fromkeys(name for _, name in sorted(self.label_map.items())))

    def load(self, structures: Sequence[str]) -> Volume:
        """Binary masks ``(S, X, Y, Z)`` uint8 of `structures`."""
        if self.files:
            return read_binary_masks(self.files, structures)
        assert self.label is not None
        return read_multilabel(self.label, self.label_map, structures, unmapped="warn")


def _split_suffix(path: Path) -> tuple[str, str] | None:
    """(stem, suffix) of a NIfTI / NRRD / MetaImage file, None for other files."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *ITK_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def find_label_files(folder: str | os.PathLike, label_map: Mapping[int, str] | None = None) -> dict[str, LabelSet]:
    """Case id -> `LabelSet` for a folder of ``<case>.nii.gz`` label files and/or
    ``<case>/<structure>.nii.gz`` binary-mask folders.

    A multilabel file's label map is ``<case>.json`` beside it, else `label_map`, else the
    ``dataset.json`` of the folder or its parent; none of them -> `InputFileError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"{folder}: no such folder")
    dataset_json = next((p for p in (folder / "dataset.json", folder.parent / "dataset.json") if p.is_file()), None)
    shared_map: Mapping[int, str] | None = label_map
    cases: dict[str, LabelSet] = {}

    def add(case: LabelSet, path: Path) -> None:
        if case.case_id in cases:
            raise InputFileError(f"{folder}: two label sets for case {case.case_id!r} (one is {path.name})")
        cases[case.case_id] = case

    for entry in _visible(folder):
        if entry.is_dir():
            files = {}
            for mask in _visible(entry):
                split = _split_suffix(mask)
                if split and mask.is_file():
                    files[canonical_name(split[0])] = mask
            if files:
                add(LabelSet(entry.name, files=files), entry)
            continue
        split = _split_suffix(entry)
        if split is None:
            continue  # label-map JSONs, reports, stray files
        stem, _ = split
        beside = entry.with_name(stem + ".json")
        if beside.is_file():
            case_map: Mapping[int, str] = read_label_map(beside)
        elif shared_map is not None:
            case_map = shared_map
        elif dataset_json is not None:
            shared_map = case_map = read_label_map(dataset_json)
        else:
            raise InputFileError(
                f"{entry}: no label map (expected {beside.name} beside it or a dataset.json; "
                "or pass --label-map)"
            )
        add(LabelSet(stem, label=entry, label_map=dict(case_map)), entry)
    return cases


def find_ground_truth(path: str | os.PathLike, label_map: Mapping[int, str] | None = None) -> dict[str, LabelSet]:
    """Case id -> `LabelSet` of a ground-truth folder: a dataset (any layout `open_dataset`
    detects; its labelled cases) or a folder of label files (`find_label_files`). `label_map`
    replaces the map of multilabel files."""
    path = Path(path)
    if not path.is_dir():
        raise InputFileError(f"{path}: no such ground-truth folder")
    try:
        detect_layout(path)
        is_dataset = True
    except InputFileError:
        is_dataset = False
    if not is_dataset:
        return find_label_files(path, label_map)
    dataset = open_dataset(path)
    return {
        case.case_id: LabelSet(
            case.case_id, label=case.label,
            label_map=dict(label_map if label_map is not None and case.label is not None else case.label_map),
            files=dict(case.label_files),
        )
        for case in dataset.cases
        if case.is_labelled
    }


def _read_case_list(cases: Sequence[str] | str) -> list[str]:
    """A list of case ids, a comma-separated string, or a text file with one id per line."""
    if isinstance(cases, str):
        if Path(cases).is_file():
            lines = Path(cases).read_text(encoding="utf-8").splitlines()
            return [c.strip() for c in lines if c.strip() and not c.strip().startswith("#")]
        return [c.strip() for c in cases.split(",") if c.strip()]
    return list(cases)


# ---------------------------------------------------------------------------- the report


def _mean(values: list[float]) -> tuple[float, int]:
    finite = [v for v in values if not math.isnan(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(finite)


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


@dataclass
class EvaluationReport:
    """Per-case metrics ``cases[case][structure][metric]`` and their means.

    HD95 is NaN where exactly one of prediction / truth is empty; means skip NaN and
    `mean()` reports how many cases each HD95 mean covers (``hd95_n``).
    """

    structures: tuple[str, ...]
    tolerance_mm: float
    cases: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def mean(self) -> dict[str, dict[str, float]]:
        """``{structure: {"dice", "nsd", "hd95", "hd95_n"}}`` plus ``"all"`` (the mean of the
        per-structure means)."""
        out: dict[str, dict[str, float]] = {}
        for s in self.structures:
            row: dict[str, float] = {}
            for m in METRICS:
                row[m], n = _mean([self.cases[c][s][m] for c in self.cases])
            row["hd95_n"] = n
            out[s] = row
        if self.structures:
            out["all"] = {m: _mean([out[s][m] for s in self.structures])[0] for m in METRICS}
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN as null."""

        def clean(d: Mapping[str, Any]) -> dict[str, Any]:
            return {k: (clean(v) if isinstance(v, Mapping) else
                        _json_number(v) if isinstance(v, float) else v) for k, v in d.items()}

        return {
            "structures": list(self.structures),
            "nsd_tolerance_mm": self.tolerance_mm,
            "n_cases": len(self.cases),
            "mean": clean(self.mean()),
            "cases": clean(self.cases),
        }

    def to_csv(self) -> str:
        """Rows ``case,structure,dice,nsd,hd95``; the means follow with case ``mean``."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case", "structure", *METRICS])

        def fmt(v: float) -> str:
            return "" if math.isnan(v) else f"{v:.6g}"

        for case, per_structure in self.cases.items():
            for s in self.structures:
                writer.writerow([case, s, *(fmt(per_structure[s][m]) for m in METRICS)])
        for s, row in self.mean().items():
            writer.writerow(["mean", s, *(fmt(row[m]) for m in METRICS)])
        return buffer.getvalue()

    def write(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the JSON report to `path` and the CSV beside it (same name, ``.csv``), atomically."""
        path = Path(path)
        csv_path = path.with_suffix(".csv") if path.suffix else path.with_name(path.name + ".csv")
        if csv_path == path:
            raise ConfigError(f"{path}: the JSON report needs a name other than the CSV's (use metrics.json)")
        write_json(path, self.to_dict())
        write_text(csv_path, self.to_csv())
        return path, csv_path


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    structures: Sequence[str] | str | None = None,
    label_map: Mapping[int, str] | str | os.PathLike | None = None,
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    cases: Sequence[str] | str | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """`fseft evaluate`: Dice, NSD (at `tolerance_mm`) and HD95 of every predicted case.

    structures: default = those every prediction and every ground truth annotate.
    label_map: value -> name (or a JSON file) for label files without their own map.
    cases: evaluate only these (list, comma-separated string, or a file with one id per line);
        default = all cases, and then each side must hold exactly the other's cases.
    out: also write the report there (JSON, and CSV beside it).
    Raises `InputFileError` for a missing case or a prediction on another voxel grid than its
    ground truth, `ConfigError` for structures not annotated on both sides.
    """
    if not (tolerance_mm >= 0 and math.isfinite(tolerance_mm)):  # before any file is read
        raise ConfigError(f"the NSD tolerance must be a distance >= 0 mm, got --tolerance {tolerance_mm}")
    if label_map is not None and not isinstance(label_map, Mapping):
        label_map = read_label_map(label_map)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds = find_label_files(pred_dir, label_map)
    truths = find_ground_truth(gt_dir, label_map)
    if not preds:
        raise InputFileError(f"{pred_dir}: no prediction files (<case>.nii.gz or <case>/<structure>.nii.gz)")
    if cases is not None:
        wanted = _read_case_list(cases)
        for side, found, folder in (("prediction", preds, pred_dir), ("ground truth", truths, gt_dir)):
            missing = [c for c in wanted if c not in found]
            if missing:
                raise InputFileError(f"{folder}: no {side} for case(s) {', '.join(missing)}")
    else:
        no_truth = sorted(set(preds) - set(truths))
        if no_truth:
            raise InputFileError(f"{gt_dir}: no ground truth for predicted case(s) {', '.join(no_truth)}")
        no_pred = sorted(set(truths) - set(preds))
        if no_pred:
            raise InputFileError(
                f"{pred_dir}: no prediction for case(s) {', '.join(no_pred)} of {gt_dir} "
                "(pass --cases to evaluate a subset)"
            )
        wanted = sorted(preds)

    if structures is None:
        common = [s for s in preds[wanted[0]].structures
                  if all(s in preds[c].structures and s in truths[c].structures for c in wanted)]
        if not common:
            raise ConfigError(f"no structure is annotated in both {pred_dir} and {gt_dir}")
        names = tuple(common)
    else:
        names = canonical_names(structures)
        for c in wanted:
            for side, labels in (("prediction", preds[c]), ("ground truth", truths[c])):
                missing = [s for s in names if s not in labels.structures]
                if missing:
                    raise ConfigError(
                        f"{labels.source}: {side} of case {c!r} lacks {', '.join(missing)} "
                        f"(it has: {', '.join(labels.structures)})"
                    )

    report = EvaluationReport(structures=names, tolerance_mm=float(tolerance_mm))
    for case in tqdm(wanted, desc="evaluate", unit="case", disable=not progress):
        truth = truths[case].load(names)
        pred = preds[case].load(names)
        pred = align_to_grid(truth, pred)
        report.cases[case] = evaluate_masks(pred.array, truth.array, truth.spacing, names, tolerance_mm)
    if out is not None:
        report.write(out)
    return report
