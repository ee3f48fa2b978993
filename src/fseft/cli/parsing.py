"""What every `fseft` sub-command's parser shares: the parser class whose options may be added
when it is used (`_Parser.complete`), list options, the executor options."""

from __future__ import annotations

import argparse
from collections.abc import Callable


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose `complete` callbacks add arguments the first time it parses or
    formats its help: `fseft adapt`'s method options come from the method registry, which
    imports torch, and `fseft --help` must not."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.complete: list[Callable[[argparse.ArgumentParser], None]] = []

    def _completed(self) -> None:
        while self.complete:
            self.complete.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def, override]
        self._completed()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._completed()
        return super().format_help()


def _csv(value: str) -> list[str]:
    """Parse a comma-separated list option (`--structures liver,spleen`)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_executor_options(p: argparse.ArgumentParser, what: str, each: str) -> None:
    """``--workers`` and its Ray options (`fseft.adaptation.executor.ExecutorConfig`). `what`:
    the tasks ("the experiment's runs"); `each`: what --cpus-per-run sets the threads of."""
    group = p.add_argument_group("parallel runs on Ray (pip install \"fseft[distributed]\"; docs/cluster.md)")
    group.add_argument("--workers", type=int, metavar="N",
                       help=f"run {what} as Ray tasks, at most N at a time (default: one after another, no Ray)")
    group.add_argument("--ray-address", metavar="auto|ADDR",
                       help="join a running Ray cluster (ray start) instead of starting a local instance")
    group.add_argument("--cpus-per-run", type=int, metavar="C",
                       help=f"torch threads of {each}, with or without --workers (results depend on the thread "
                       "count: compare modes at equal C), and with --workers the CPUs Ray reserves for each "
                       "(default: torch's own; with --workers this machine's cores / N, 1 on a cluster)")
    group.add_argument("--gpus-per-run", type=float, metavar="G",
                       help="GPUs per run; a fraction packs runs on one GPU (0.25: four per GPU) (default: 0)")
    group.add_argument("--max-retries", type=int, metavar="R",
                       help="restarts of a run whose worker process died (killed, out of memory) (default: 2)")


def _executor_config(args: argparse.Namespace) -> object:
    from fseft.adaptation.executor import ExecutorConfig  # Ray only once a RayExecutor is made

    return ExecutorConfig(workers=args.workers, address=args.ray_address, cpus_per_run=args.cpus_per_run,
                          gpus_per_run=args.gpus_per_run, max_retries=args.max_retries)


# ---------------------------------------------------------------------------- sub-commands
# Each `_add_<name>` function registers one sub-command; keep them in `SUBCOMMANDS` order.
