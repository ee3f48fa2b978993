"""Compare the records of two `fseft benchmark` output folders (e.g. sequential and ``--workers``):
every run folder's ``metrics.json``, all numeric values but wall times (``*seconds*``, ``*time*``),
and ``records.json``. Prints the largest absolute difference per metric and the runs compared;
exits 1 when a run is missing on one side, a non-numeric value differs, or a difference exceeds
``--tol`` (default 1e-6).

    python tools/compare_records.py runs/seq1 runs/w2 [--tol 1e-6]

A metric is named by the first and last keys of its path in ``metrics.json``
(``mean/dice``: the per-structure means, ``queries/dice``: each query case's, ``auto/fold_dice``),
so each row gathers that number over every run, structure and query case.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TIMING = ("seconds", "time", "elapsed")  # wall times differ from run to run by nature


def leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of every scalar in a JSON value, timing keys left out."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not any(t in key for t in TIMING):
                yield from leaves(item, (*path, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, (*path, str(i)))
    else:
        yield path, value


def metric_name(path: tuple[str, ...]) -> str:
    named = [p for p in path if not p.isdigit()]  # list positions are not part of a metric's name
    return "/".join(dict.fromkeys([named[0], named[-1]])) if named else "/".join(path)


def run_folders(out: Path) -> dict[str, Path]:
    """Finished run folders (holding ``metrics.json``) by their path under `out`; hidden partials left out."""
    found = {}
    for metrics in (out / "runs").rglob("metrics.json"):
        folder = metrics.parent
        if not any(part.startswith(".") for part in folder.relative_to(out).parts):
            found[str(folder.relative_to(out))] = folder
    return found


class Comparison:
    def __init__(self) -> None:
        self.max_diff: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.problems: list[str] = []

    def add(self, where: str, a: Any, b: Any) -> None:
        pa, pb = dict(leaves(a)), dict(leaves(b))
        for path in sorted(pa.keys() ^ pb.keys()):
            self.problems.append(f"{where}: {'/'.join(path)} only in {'the first' if path in pa else 'the second'}")
        for path in sorted(pa.keys() & pb.keys()):
            x, y = pa[path], pb[path]
            numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, y))
            if not numbers:
                if x != y:
                    self.problems.append(f"{where}: {'/'.join(path)}: {x!r} != {y!r}")
                continue
            name = metric_name(path)
            if math.isnan(x) and math.isnan(y):
                diff = 0.0
            elif math.isinf(x) or math.isinf(y) or math.isnan(x) or math.isnan(y):
                diff = 0.0 if x == y else math.inf
            else:
                diff = abs(float(x) - float(y))
            self.max_diff[name] = max(self.max_diff.get(name, 0.0), diff)
            self.count[name] = self.count.get(name, 0) + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--tol", type=float, default=1e-6, help="largest absolute difference allowed (default 1e-6)")
    args = parser.parse_args(argv)

    first, second = run_folders(args.first), run_folders(args.second)
    cmp = Comparison()
    for run in sorted(first.keys() ^ second.keys()):
        cmp.problems.append(f"{run}: finished only in {args.first if run in first else args.second}")
    both = sorted(first.keys() & second.keys())
    for run in both:
        cmp.add(run, *(json.loads((side[run] / "metrics.json").read_text()) for side in (first, second)))
    records = [out / "records.json" for out in (args.first, args.second)]
    if all(p.is_file() for p in records):
        a, b = (json.loads(p.read_text()) for p in records)
        cmp.add("records.json", {"records": a}, {"records": b})

    print(f"{len(both)} runs compared ({args.first} vs {args.second})")
    print("| metric | values | max abs difference |\n|---|---:|---:|")
    for name in sorted(cmp.max_diff):
        print(f"| {name} | {cmp.count[name]} | {cmp.max_diff[name]:.3g} |")
    over = [n for n, d in cmp.max_diff.items() if not d <= args.tol]
    for problem in cmp.problems:
        print("DIFF", problem)
    if over:
        print(f"over {args.tol:g}: {', '.join(sorted(over))}")
    ok = both and not over and not cmp.problems
    print("same records" if ok else "records differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
