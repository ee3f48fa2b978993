"""Print docs/real_ct.md's few-shot table from a finished `fseft benchmark` of
examples/experiment_realct.yaml: query Dice per method and (support -> query) patient pair,
which `results.md` averages away (it gives the mean over seeds, i.e. over support patients).

    python examples/realct_tables.py runs/bench_realct [STRUCTURE,...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pair_table(bench: str | Path, structures: list[str] | None = None) -> str:
    """One row per (structure, support -> query) pair, one column per method; a pair two seeds
    share (a structure only two patients show) lists both runs."""
    bench = Path(bench)
    exp = json.loads((bench / "experiment.json").read_text())
    methods = [entry["name"] for entry in exp["methods"]]
    cells: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    for method in methods:
        for structure in structures or exp["structures"]:
            for seed in exp["seeds"]:
                folder = bench / "runs" / method / "k1" / f"seed{seed}" / structure
                if not (folder / "metrics.json").is_file():
                    continue
                metrics = json.loads((folder / "metrics.json").read_text())
                support = _support(folder)
                for query, result in metrics["queries"].items():
                    cells.setdefault((structure, support, query), {}).setdefault(method, []).append(
                        result[structure]["dice"])
                seconds.setdefault(method, []).append(float(metrics.get("train_seconds") or 0.0))
    lines = ["| structure: support → query | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for (structure, support, query), row in sorted(cells.items()):
        values = " | ".join(" / ".join(f"{d:.3f}" for d in row[m]) if m in row else "—" for m in methods)
        lines.append(f"| {structure}: {support} → {query} | {values} |")
    times = " | ".join(f"{min(seconds[m]):.0f}-{max(seconds[m]):.0f} s" if m in seconds else "—" for m in methods)
    lines.append(f"| training per run | {times} |")
    return "\n".join(lines)


def _support(folder: Path) -> str:
    """The run's support case(s), from its run record (``extra.task``)."""
    from fseft.runs.format import read_run_record

    task = (read_run_record(folder).get("extra") or {}).get("task") or {}
    return ",".join(task.get("support", [])) or "?"


if __name__ == "__main__":
    print(pair_table(sys.argv[1] if len(sys.argv) > 1 else "runs/bench_realct", sys.argv[2].split(",") if len(sys.argv) > 2 else None))
