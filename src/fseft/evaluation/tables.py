"""Results tables of a benchmark, in the layout of the FSEFT paper's Table 1.

A benchmark (`fseft.experiments.grid`) produces one `RunRecord` per (method, k, seed,
structure). `summarize` reduces them to a summary dict, the one input of every table, figure
and report:

```
{"metric": "dice",
 "methods": [row labels, in the experiment's order], "structures": [...], "ks": [...],
 "cells": {method: {str(k): {structure | "mean": None | {"mean", "std", "n"}}}},
 "trainable_params": {method: int | None}, "train_seconds": {method: float | None}}
```

A cell is the mean and spread over seeds. The "mean" column is, per seed, the mean over all
structures, then the mean and spread of that over seeds; it is None when the method lacks a
structure (``generalization`` has no result for a structure its model does not know), so that
means over different structure sets are never compared. The spread is the sample standard
deviation over seeds (0 for a single seed, which the tables then do not print).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

METRICS = ("dice", "nsd", "hd95")


@dataclass(frozen=True)
class RunRecord:
    """One structure's mean query metrics of one adaptation run (`metrics.json`'s ``mean``)."""

    method: str  # row label of the experiment (e.g. "lora+dec"), not necessarily the method id
    k: int
    seed: int
    structure: str
    dice: float | None
    nsd: float | None
    hd95: float | None
    trainable_params: int | None = None
    train_seconds: float | None = None
    run: str = ""  # run folder, relative to the benchmark folder
    chosen: str | None = None  # ``--method auto``: the candidate it chose on the support set

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def _ordered(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def summarize(
    records: Sequence[RunRecord],
    metric: str = "dice",
    methods: Sequence[str] | None = None,
    structures: Sequence[str] | None = None,
    ks: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The summary dict (module docstring) of `records` for one metric.

    methods / structures / ks: row, column and block order (default: order of appearance, ks
    sorted); combinations without records are None cells.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    methods = list(methods) if methods is not None else _ordered(r.method for r in records)
    structures = list(structures) if structures is not None else _ordered(r.structure for r in records)
    ks = sorted(ks if ks is not None else {r.k for r in records})
    by_key: dict[tuple[str, int, str], dict[int, float | None]] = {}
    for r in records:
        by_key.setdefault((r.method, r.k, r.structure), {})[r.seed] = getattr(r, metric)

    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for method in methods:
        cells[method] = {}
        for k in ks:
            row: dict[str, Any] = {}
            for s in structures:
                row[s] = _stats(list(by_key.get((method, k, s), {}).values()))
            # per seed: the mean over structures, only for seeds that have every structure
            per_structure = [by_key.get((method, k, s), {}) for s in structures]
            seeds = set.intersection(*(set(d) for d in per_structure)) if per_structure else set()
            seed_means = []
            for seed in sorted(seeds):
                vals = [d[seed] for d in per_structure]
                if all(v is not None and math.isfinite(float(v)) for v in vals):
                    seed_means.append(sum(float(v) for v in vals) / len(vals))
            complete = all(row[s] is not None for s in structures)
            row["mean"] = _stats(seed_means) if complete else None
            cells[method][str(k)] = row

    params: dict[str, int | None] = {}
    seconds: dict[str, float | None] = {}
    for method in methods:
        mine = [r for r in records if r.method == method]
        counts = [r.trainable_params for r in mine if r.trainable_params is not None]
        params[method] = max(counts) if counts else None
        times = [r.train_seconds for r in mine if r.train_seconds is not None]
        seconds[method] = sum(times) / len(times) if times else None
    return {"metric": metric, "methods": methods, "structures": structures, "ks": ks, "cells": cells,
            "trainable_params": params, "train_seconds": seconds}


def format_cell(cell: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``"0.812 ± 0.034"`` (the spread only over several seeds), ``"—"`` for no result."""
    if cell is None:
        return "—"
    text = f"{float(cell['mean']):.{digits}f}"
    if int(cell.get("n", 1)) > 1 and cell.get("std") is not None:
        text += f" ± {float(cell['std']):.{digits}f}"
    return text


def cell_at(summary: Mapping[str, Any], method: str, k: int | str, column: str) -> Mapping[str, Any] | None:
    """The cell of `method` at `k` in `column` (a structure or "mean"); None where any level
    is missing or None, or the mean is not a finite number."""
    row = ((summary.get("cells") or {}).get(method) or {}).get(str(k))
    cell = (row or {}).get(column)
    if cell is None or cell.get("mean") is None or not math.isfinite(float(cell["mean"])):
        return None
    return cell


def table_block(summary: Mapping[str, Any], k: int) -> tuple[list[str], list[list[str]]]:
    """Header and rows (method label, one cell per structure, mean) of the block for `k`."""
    header = ["method", *summary["structures"], "mean"]
    rows = [[m, *(format_cell(cell_at(summary, m, k, c)) for c in header[1:])] for m in summary["methods"]]
    return header, rows


def to_markdown(summary: Mapping[str, Any]) -> str:
    """One Markdown table per k (the paper's Table 1 blocks), mean ± std over seeds."""
    lines = [f"Mean {summary['metric']} over the query cases (mean ± std over seeds).", ""]
    for k in summary["ks"]:
        header, rows = table_block(summary, k)
        lines += [f"### k = {k}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def to_csv(summary: Mapping[str, Any]) -> str:
    """Long-format CSV: k, method, column, mean, std, n (one line per table cell)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["k", "method", "structure", f"{summary['metric']}_mean", f"{summary['metric']}_std", "n_seeds"])
    for k in summary["ks"]:
        for m in summary["methods"]:
            for column in [*summary["structures"], "mean"]:
                cell = cell_at(summary, m, k, column)
                if cell is None:
                    writer.writerow([k, m, column, "", "", 0])
                else:
                    writer.writerow([k, m, column, f"{cell['mean']:.6f}", f"{cell['std']:.6f}", cell["n"]])
    return buf.getvalue()


def to_text(summary: Mapping[str, Any]) -> str:
    """Fixed-width table for the terminal."""
    out = []
    for k in summary["ks"]:
        header, rows = table_block(summary, k)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        out.append(f"k = {k}")
        for row in [header, *rows]:
            out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        out.append("")
    return "\n".join(out)


def auto_choices_markdown(records: Sequence[RunRecord]) -> str:
    """What each ``auto`` run chose, and the Dice on the queries of that run, as a Markdown
    section (``""`` when no run chose)."""
    rows = [r for r in records if r.chosen]
    if not rows:
        return ""
    lines = ["", "## Methods chosen by auto (on the support set only)", "",
             "| row | structure | k | seed | chose | query Dice |", "|---|---|---:|---:|---|---:|"]
    for r in rows:
        dice = "n/a" if r.dice is None else f"{r.dice:.3f}"
        lines.append(f"| {r.method} | {r.structure} | {r.k} | {r.seed} | {r.chosen} | {dice} |")
    return "\n".join(lines) + "\n"
