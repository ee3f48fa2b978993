"""The same benchmark runs sequentially and as Ray tasks (`fseft benchmark --workers N`): wall
times side by side, their ratio, and whether the records agree.

The demo's target-domain phantoms and embedded model, black-box rows (lp, spatial-adapter at
their protocols) by default: a single black-box run trains a small adapter on cached features
and leaves most of a machine's cores idle, which is what running several at once recovers. The
feature cache is built once before anything is timed (shared by both modes, as a cluster's
shared cache would be), so the timings are the runs themselves; the parallel time includes
starting the embedded Ray instance. With ``--device cuda --gpus-per-run 0.25`` the runs (add
network rows with ``--methods``) are packed four to a GPU against one after another on it.

    python benchmarks/bench_workers.py                         # 2 workers x 1 CPU, this machine
    python benchmarks/bench_workers.py --workers 4 --cpus-per-run 4
    python benchmarks/bench_workers.py --device cuda --workers 4 --gpus-per-run 0.25 \\
        --methods lp,spatial-adapter,decoder,lora+dec
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROWS = {  # the demo's rows (fseft.experiments.demo.demo_methods), by name
    "lp": {"method": "lp"},
    "spatial-adapter": {"method": "spatial-adapter"},
    "spatial-adapter+ti": {"method": "spatial-adapter", "transductive": True},
    "decoder": {"method": "decoder", "max_steps": 80},
    "lora+dec": {"method": "lora", "options": {"decoder": "fine-tuned"}, "max_steps": 16},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lp,spatial-adapter", help=f"rows, comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (method, structure) (default 3)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-run", type=int, default=None, help="default: cores / workers")
    parser.add_argument("--gpus-per-run", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", help="where the phantoms, cache and runs go (default: a temporary folder)")
    args = parser.parse_args(argv)

    from fseft.data.phantom import write_phantom_dataset
    from fseft.experiments.grid import experiment_from_dict, run_benchmark
    from fseft.adaptation.executor import ExecutorConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fseft-bench-workers-"))
    data = work / "phantom_target"
    if not (data / "dataset.json").is_file():
        write_phantom_dataset(data, 10, "target", 1, overwrite=True, progress=False, name="phantom_target")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose among {', '.join(ROWS)}")

    def experiment(methods: list[str]):
        return experiment_from_dict({
            "name": "bench-workers", "model": "phantom", "data": str(data),
            "structures": ["inferior_vena_cava", "gallbladder"], "k": [5], "seeds": list(range(args.seeds)),
            "holdout": 3, "overlays": False,
            "adapt": {"patience": 0, "device": args.device, "cache_dir": str(work / "cache")},
            "methods": [{"name": m, **ROWS[m]} for m in methods],
        }, source="bench_workers")

    quiet = lambda _: None  # noqa: E731
    tick = time.perf_counter()
    run_benchmark(experiment(["lp"]), work / "warm", progress=False, log=quiet)  # every case's features cached
    print(f"feature cache built in {time.perf_counter() - tick:.0f} s (not timed below)")

    exp = experiment(names)
    for folder in ("sequential", "workers"):  # a --workdir used before: time from scratch, no resume
        shutil.rmtree(work / folder, ignore_errors=True)
    tick = time.perf_counter()
    seq = run_benchmark(exp, work / "sequential", progress=False, log=quiet)
    t_seq = time.perf_counter() - tick
    pool = ExecutorConfig(workers=args.workers, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
    tick = time.perf_counter()
    par = run_benchmark(exp, work / "workers", progress=False, log=quiet, executor=pool)
    t_par = time.perf_counter() - tick

    worst = max(abs((a.dice or 0.0) - (b.dice or 0.0)) for a, b in zip(seq.records, par.records))
    same = [a.run for a in seq.records] == [b.run for b in par.records] and worst <= 1e-6
    resources = f"{args.cpus_per_run or 'cores/N'} CPU" + (f", {args.gpus_per_run} GPU" if args.gpus_per_run else "")
    print(f"{len(seq.records)} runs ({', '.join(names)}; 2 structures x k = 5 x {args.seeds} seeds), "
          f"device {args.device}")
    print(f"{'mode':<40} {'wall time':>10}")
    print(f"{'sequential (one process)':<40} {t_seq:>9.1f}s")
    print(f"{f'{args.workers} Ray workers ({resources} per run)':<40} {t_par:>9.1f}s")
    print(f"ratio sequential / workers: {t_seq / t_par:.2f}x")
    print(f"records: {'the same' if same else 'DIFFERENT'} (largest Dice difference {worst:.2e})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
