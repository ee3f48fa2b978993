"""What a dataset holds: voxel counts per case and structure, and the `fseft datasets inspect` report.

`voxel_counts` reads each label file once and caches its value counts (one JSON per dataset
root, valid while a file's size and mtime match): few-shot tasks (`fseft.data.tasks`) keep the
cases where every structure is present, and pre-training checks its label values with them.
`summarize_dataset`, `format_summary` and `inspect_dataset` turn them into the report
``fseft datasets inspect`` prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fseft.data.datasets import Dataset, check_cases, open_dataset
from fseft.data.io import read_labels
from fseft.data.structures import canonical_names
from fseft.errors import InputFileError
from fseft.utils import default_cache_dir, write_json

# ---------------------------------------------------------------------------- voxel counts


def _value_counts(path: Path) -> dict[int, int]:
    """Voxel count of every value of a label file (read with `fseft.data.io.read_labels`)."""
    array = read_labels(path).array
    if array.min() >= 0:
        counts = np.bincount(array.ravel())  # much faster than np.unique on large volumes
        return {int(v): int(n) for v, n in enumerate(counts) if n}
    values, counts = np.unique(array, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}


class _CountCache:
    """Per-file value counts in one JSON per dataset root, valid while size and mtime match."""

    VERSION = 1

    def __init__(self, root: Path, cache_dir: Path):
        digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
        self.path = cache_dir / "voxel_counts" / f"{root.name}-{digest}.json"
        self.files: dict[str, Any] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") == self.VERSION and isinstance(data.get("files"), dict):
                self.files = data["files"]
        except (OSError, ValueError, AttributeError):
            pass  # no cache yet, or an unreadable one: recount

    def counts(self, path: Path) -> dict[int, int]:
        stat = path.stat()
        key = str(path.resolve())
        entry = self.files.get(key)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return {int(v): int(n) for v, n in entry["counts"].items()}
        counts = _value_counts(path)
        self.files[key] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "counts": {str(v): n for v, n in counts.items()},
        }
        self.dirty = True
        return counts

    def save(self) -> None:
        if self.dirty:
            write_json(self.path, {"version": self.VERSION, "files": self.files})
            self.dirty = False


def voxel_counts(
    dataset: Dataset,
    structures: Sequence[str] | str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Voxel count of each structure in each labelled case: ``{case_id: {structure: n}}``.

    `structures` defaults to all of the dataset's. A case's dict holds only the requested
    structures it annotates (a missing key = not annotated; 0 = annotated but empty).
    Counts are cached per label file (path, size, mtime) under `cache_dir`
    (default `fseft.utils.default_cache_dir()`), so a second call reads no volume.
    Raises `InputFileError` when a multilabel file holds a value absent from its label map.
    """
    names = dataset.structures if structures is None else canonical_names(structures)
    cache = _CountCache(dataset.root, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    result: dict[str, dict[str, int]] = {}
    cases = dataset.labelled_cases
    try:
        for case in tqdm(cases, desc=f"voxel counts {dataset.name}", unit="case", disable=not progress):
            per_case: dict[str, int] = {}
            if case.label_files:
                for s in names:
                    if s in case.label_files:
                        counts = cache.counts(case.label_files[s])
                        per_case[s] = sum(n for v, n in counts.items() if v > 0)  # as read_binary_masks
            else:
                assert case.label is not None
                counts = cache.counts(case.label)
                unknown = sorted(v for v in counts if v != 0 and v not in case.label_map)
                if unknown:
                    raise InputFileError(
                        f"{case.label}: label value(s) {unknown} are not in the label map of "
                        f"dataset {dataset.name!r} (known values: {sorted(case.label_map)})"
                    )
                by_name = {n: v for v, n in case.label_map.items()}
                for s in names:
                    if s in by_name:
                        per_case[s] = counts.get(by_name[s], 0)
            result[case.case_id] = per_case
    finally:
        cache.save()  # keep what was counted, even after Ctrl-C
    return result


# ---------------------------------------------------------------------------- inspection


def summarize_dataset(
    dataset: Dataset,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """JSON-ready summary: layout, case counts, per-structure voxel statistics, per-case counts.

    Per structure: ``annotated`` (cases with a label for it), ``present`` (cases where it is
    non-empty) and min / median / max voxels over the cases where it is present.
    """
    counts = voxel_counts(dataset, cache_dir=cache_dir, progress=progress)
    structures = []
    for s in dataset.structures:
        annotated = [c[s] for c in counts.values() if s in c]
        present = [n for n in annotated if n > 0]
        structures.append(
            {
                "name": s,
                "original": dataset.original_names.get(s),
                "annotated": len(annotated),
                "present": len(present),
                "min": min(present) if present else None,
                "median": float(statistics.median(present)) if present else None,
                "max": max(present) if present else None,
            }
        )
    return {
        "name": dataset.name,
        "layout": dataset.layout,
        "root": str(dataset.root),
        "cases": len(dataset.cases),
        "labelled_cases": len(dataset.labelled_cases),
        "structures": structures,
        "voxel_counts": counts,
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(header), *(fmt(r) for r in rows)]


def format_summary(summary: dict[str, Any], *, cases: bool = False) -> str:
    """The text report of `summarize_dataset` (what ``fseft datasets inspect`` prints)."""
    lines = [
        f"dataset  {summary['name']}",
        f"layout   {summary['layout']}",
        f"root     {summary['root']}",
        f"cases    {summary['cases']} ({summary['labelled_cases']} labelled, "
        f"{summary['cases'] - summary['labelled_cases']} unlabelled)",
        f"structures ({len(summary['structures'])}), voxels over the cases where present:",
    ]
    rows = []
    for s in summary["structures"]:
        original = s["original"] or ""
        stats = (
            [str(s["min"]), f"{s['median']:g}", str(s["max"])] if s["present"] else ["-", "-", "-"]
        )
        rows.append([s["name"], original, f"{s['present']}/{s['annotated']}", *stats])
    header = ["structure", "original", "present", "min", "median", "max"]
    lines += ["  " + line for line in _table(header, rows)]
    if cases:
        names = [s["name"] for s in summary["structures"]]
        case_rows = [
            [case_id, *(str(c[s]) if s in c else "-" for s in names)]
            for case_id, c in summary["voxel_counts"].items()
        ]
        lines.append("voxels per case ('-': not annotated):")
        lines += ["  " + line for line in _table(["case", *names], case_rows)]
    return "\n".join(lines)


def inspect_dataset(
    path: str | os.PathLike,
    layout: str = "auto",
    *,
    cases: bool = False,
    json_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    check: bool = False,
) -> str:
    """Open a dataset folder and return its report (layout, cases, structures with voxel
    statistics; the per-case table with `cases`). With `json_path`, also write the full
    summary there as JSON (atomically). With `check`, first read every case as a run would
    (`check_cases`): any unusable case raises `InputFileError` listing them all."""
    dataset = open_dataset(path, layout)
    if check:
        check_cases(dataset.cases, progress=progress)
    summary = summarize_dataset(dataset, cache_dir=cache_dir, progress=progress)
    if json_path is not None:
        write_json(json_path, summary)
    return format_summary(summary, cases=cases)
