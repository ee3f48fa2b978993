"""Where the independent runs of a sweep execute: one after another in this process
(`SequentialExecutor`, the default) or as Ray tasks (`RayExecutor`: ``--workers N``), on an
embedded local Ray instance or on a cluster (``--ray-address``). `fseft benchmark` hands it its
planned runs, ``fseft adapt --method auto`` its candidates' leave-one-out folds.

A task is a module-level function and its arguments (Ray pickles them to the worker, which
imports the function by name). Both executors yield one `Outcome` per task as it finishes: its
return value, or the exception it raised (the other tasks go on). Both run each task at
``cpus_per_run`` torch threads where it is set: torch's CPU results depend on the thread count,
and at equal counts the two modes give the same records. On Ray, a worker process that dies
(killed, out of memory) is retried up to ``max_retries`` times, then its task's outcome is a
failure too. Ray is imported only when a `RayExecutor` is made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fseft.errors import ConfigError, FseftError

logger = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 2
#: the driver's environment variables with this prefix are set on the workers for each task
#: (``FSEFT_WEIGHTS_DIR``, ``FSEFT_CACHE_DIR``, ...): a cluster node's own environment may differ
FORWARDED_ENV_PREFIX = "FSEFT_"
#: test hook (tests/adaptation/test_executor.py): ``KEY@MARKER`` makes the first worker that reaches
#: `fault_point` for a task whose key contains KEY exit at once (`os._exit`, as a kill would),
#: creating the file MARKER so that the retry goes through. Workers only; ignored in-process.
CRASH_ONCE_ENV = "FSEFT_TEST_CRASH_ONCE"

_IN_WORKER = False  # set in a Ray worker process while it runs a task


@dataclass(frozen=True)
class ExecutorConfig:
    """How to run a sweep's tasks. ``workers=None``: sequentially in this process; ``workers=N``:
    at most N tasks at a time as Ray tasks.

    cpus_per_run: torch's thread count in each task, in either mode (the previous count is
    restored after a task run in this process), and with workers the CPUs Ray reserves for it
    (default: torch's own sequentially; with workers this machine's cores / workers locally, 1 on
    a cluster). torch's CPU results depend on the thread count (the order of float sums), so a
    sequential run reproduces a worker's records only at equal threads. The rest only with
    workers: address: None starts an embedded local Ray instance (``workers * cpus_per_run``
    CPUs); ``"auto"`` or ``"HOST:PORT"`` joins a running cluster (``ray start``). gpus_per_run:
    GPUs per task, fractions (0.25: four runs packed on one GPU) or whole numbers (default 0).
    max_retries: how often Ray restarts a task whose worker process died (default 2); a task that
    raises is not retried.
    """

    workers: int | None = None
    address: str | None = None
    cpus_per_run: int | None = None
    gpus_per_run: float | None = None
    max_retries: int | None = None

    def __post_init__(self) -> None:
        check_resources(self.cpus_per_run, None, "--cpus-per-run")
        if self.workers is None:
            given = [flag for flag, value in (("--ray-address", self.address), ("--gpus-per-run", self.gpus_per_run),
                                              ("--max-retries", self.max_retries)) if value is not None]
            if given:
                raise ConfigError(f"{', '.join(given)}: options of --workers (runs on Ray); add --workers N")
            return
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"--workers must be an integer >= 1, got {self.workers!r}")
        check_resources(None, self.gpus_per_run, gpus_name="--gpus-per-run")
        if self.max_retries is not None and (isinstance(self.max_retries, bool) or self.max_retries < 0):
            raise ConfigError(f"--max-retries must be an integer >= 0, got {self.max_retries!r}")

    @property
    def distributed(self) -> bool:
        return self.workers is not None

    def with_defaults(self, cpus_per_run: int | None = None, gpus_per_run: float | None = None) -> ExecutorConfig:
        """This config with the resources it leaves open taken from an experiment file's (its GPU
        share only with workers: in one process the runs' ``device`` alone decides)."""
        gpus = self.gpus_per_run if self.gpus_per_run is not None or not self.distributed else gpus_per_run
        return ExecutorConfig(self.workers, self.address,
                              self.cpus_per_run if self.cpus_per_run is not None else cpus_per_run,
                              gpus, self.max_retries)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside the block, the previous count
    restored after it (None: left as it is)."""
    if threads is None:
        yield
        return
    import torch  # a task's caller has it loaded; the executor module itself stays light

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_resources(cpus: Any, gpus: Any, cpus_name: str = "cpus_per_run", gpus_name: str = "gpus_per_run",
                    where: str = "") -> None:
    """`ConfigError` for a CPU count that is not an integer >= 1 (torch's thread count) or a GPU
    share that Ray cannot schedule (a fraction in (0, 1) or a whole number)."""
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1):
        raise ConfigError(f"{where}{cpus_name} must be an integer >= 1 (threads of one run), got {cpus!r}")
    if gpus is None:
        return
    if isinstance(gpus, bool) or not isinstance(gpus, int | float) or gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        raise ConfigError(f"{where}{gpus_name} must be a fraction of one GPU (e.g. 0.25: four runs share a GPU) "
                          f"or a whole number of GPUs, got {gpus!r}")


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(*args, **kwargs)``; `fn` a module-level function (Ray pickles it
    by name). `key` names it in messages and progress (a run folder, a fold)."""

    key: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of a task: its `value`, or `error` (``"Type: message"``) with the exception
    (`exc`, when it could be brought back) and its traceback text. `seconds`: time in the task."""

    key: str
    value: Any = None
    error: str | None = None
    exc: BaseException | None = None
    traceback: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class RunsFailedError(FseftError):
    """Some tasks of a sweep failed (the others finished). `failures`: their outcomes; `result`:
    what the sweep produced from the rest (`fseft.experiments.grid.BenchmarkResult`)."""

    def __init__(self, message: str, failures: list[Outcome], result: Any = None) -> None:
        super().__init__(message)
        self.failures = failures
        self.result = result


def fault_point(key: str) -> None:
    """The `CRASH_ONCE_ENV` test hook (module constants); a no-op unless a test sets it."""
    spec = os.environ.get(CRASH_ONCE_ENV)
    if not _IN_WORKER or not spec or "@" not in spec:
        return
    match, marker = spec.rsplit("@", 1)
    if match not in key:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # only the first attempt dies
    except FileExistsError:
        return
    os._exit(77)


def _call(task: Task) -> Outcome:
    """Run `task` here; an exception becomes a failed outcome (KeyboardInterrupt goes through)."""
    start = time.perf_counter()
    try:
        value = task.fn(*task.args, **task.kwargs)
    except Exception as exc:
        return Outcome(task.key, error=f"{type(exc).__name__}: {exc}", exc=exc, traceback=traceback.format_exc(),
                       seconds=time.perf_counter() - start)
    return Outcome(task.key, value=value, seconds=time.perf_counter() - start)


class Executor:
    """Runs `Task`s; use as a context manager (`close` releases the workers)."""

    workers = 1

    def imap(self, tasks: Iterable[Task], on_start: Callable[[Task], None] | None = None) -> Iterator[Outcome]:
        """One `Outcome` per task as each finishes (not necessarily in order); `on_start` is
        called when a task is handed to a worker."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop what is still running and release the workers."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SequentialExecutor(Executor):
    """The tasks one after another in this process, in order, each at `threads` torch threads
    (None: this process's count), as a worker with ``cpus_per_run = threads`` runs them."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def imap(self, tasks: Iterable[Task], on_start: Callable[[Task], None] | None = None) -> Iterator[Outcome]:
        for task in tasks:
            if on_start is not None:
                on_start(task)
            with torch_threads(self.threads):
                outcome = _call(task)
            yield outcome  # outside the block: the caller's code between tasks keeps its own threads


def _run_on_worker(task: Task, threads: int | None, env: Mapping[str, str]) -> Outcome:
    """A Ray task: the driver's `FSEFT_*` environment, torch's threads set to the task's CPUs (N
    runs on N x C cores do not oversubscribe them), then `task`. The exception of a failed task
    travels back only if it pickles (else its message and traceback do)."""
    global _IN_WORKER

    os.environ.update(env)
    _IN_WORKER = True
    try:
        with torch_threads(threads):
            outcome = _call(task)
    finally:
        _IN_WORKER = False
    if outcome.exc is not None:
        try:
            pickle.dumps(outcome.exc)
        except Exception:
            outcome.exc = None
    return outcome


class RayExecutor(Executor):
    """At most `workers` tasks at a time as Ray tasks (`ExecutorConfig`)."""

    def __init__(self, cfg: ExecutorConfig) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError('--workers runs on Ray, which is not installed: pip install "fseft[distributed]"') from exc
        self._ray = ray
        self.workers = int(cfg.workers or 1)
        self.max_retries = DEFAULT_MAX_RETRIES if cfg.max_retries is None else int(cfg.max_retries)
        cpus = cfg.cpus_per_run
        if cpus is None:  # locally the cores are split among the workers; a cluster's nodes say their own
            cpus = max(1, (os.cpu_count() or 1) // self.workers) if cfg.address is None else 1
        self.cpus_per_run, self.gpus_per_run = int(cpus), float(cfg.gpus_per_run or 0)
        self._owns = False
        self._in_flight: dict[Any, Task] = {}
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                       "logging_level": logging.WARNING}
            if cfg.address is None:
                # only small records travel through the object store: keep it from taking 30 % of RAM
                options.update(num_cpus=self.workers * self.cpus_per_run, object_store_memory=128 * 1024 ** 2)
            else:
                options["address"] = cfg.address
            try:
                ray.init(**options)
            except ConnectionError as exc:
                raise ConfigError(f"--ray-address {cfg.address}: no Ray cluster there ({exc}); start one with "
                                  "ray start --head, or leave --ray-address out for a local instance") from exc
            self._owns = True
        have = ray.cluster_resources()
        for name, need, flag in (("CPU", self.cpus_per_run, "--cpus-per-run"), ("GPU", self.gpus_per_run, "--gpus-per-run")):
            if need > have.get(name, 0):  # Ray would wait for it forever
                self.close()
                raise ConfigError(f"{flag} {need:g}: the Ray cluster has {have.get(name, 0):g} {name}(s) in all, "
                                  f"so no run could start")
        self._remote = ray.remote(_run_on_worker).options(
            num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run, max_retries=self.max_retries,
            retry_exceptions=False)

    def imap(self, tasks: Iterable[Task], on_start: Callable[[Task], None] | None = None) -> Iterator[Outcome]:
        ray = self._ray
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIX)}
        pending = iter(tasks)
        try:
            while True:
                while len(self._in_flight) < self.workers:
                    task = next(pending, None)
                    if task is None:
                        break
                    self._in_flight[self._remote.remote(task, self.cpus_per_run, env)] = task
                    if on_start is not None:
                        on_start(task)
                if not self._in_flight:
                    return
                ready, _ = ray.wait(list(self._in_flight), num_returns=1)
                for ref in ready:
                    task = self._in_flight.pop(ref)
                    try:
                        yield ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # past `_call`: SystemExit and the like
                        cause = getattr(exc, "cause", None)
                        cause = cause if isinstance(cause, BaseException) else exc
                        yield Outcome(task.key, error=f"{type(cause).__name__}: {cause}", traceback=str(exc))
                    except ray.exceptions.RayError as exc:  # the worker died (after the retries) or was lost
                        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        yield Outcome(task.key, error=f"{type(exc).__name__}: its worker process died "
                                      f"(retried {self.max_retries} times; --max-retries): {reason}")
        finally:
            self._cancel()

    def _cancel(self) -> None:
        """Ctrl-C or a failure in the driver: stop every task still queued or running (finished
        ones have written their results already).

        On the local instance this process owns, nothing is cancelled: `close` shuts the instance
        down, which ends its workers. `ray.cancel` races with a task's completion reply inside
        Ray's core worker and can abort the driver ("Tried to complete task that was not pending";
        ray-project/ray#54798 fixed one path of it, 2.60 still hits another), which turned Ctrl-C
        into a crash with exit 1 in about one run in six. On a cluster that lives on, queued and
        running tasks must be cancelled; only those not yet finished are, which narrows the race.
        """
        if self._in_flight and not self._owns:
            _, unfinished = self._ray.wait(list(self._in_flight), num_returns=len(self._in_flight), timeout=0)
            for ref in unfinished:
                try:
                    self._ray.cancel(ref, force=True)
                except Exception as exc:  # already finished, or its node is gone
                    logger.debug("cancel %s: %s", self._in_flight[ref].key, exc)
        self._in_flight.clear()

    def close(self) -> None:
        self._cancel()
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False


def make_executor(cfg: ExecutorConfig | None) -> Executor:
    """`RayExecutor` for ``cfg.workers``, else `SequentialExecutor` at ``cfg.cpus_per_run``
    threads (and no Ray import)."""
    if cfg is None or not cfg.distributed:
        return SequentialExecutor(None if cfg is None else cfg.cpus_per_run)
    return RayExecutor(cfg)


def failure_summary(failures: list[Outcome], total: int, what: str = "runs") -> str:
    """``"2 of 24 runs failed: KEY: error; ..."`` (one line per failure)."""
    lines = [f"{len(failures)} of {total} {what} failed:"]
    lines += [f"  {o.key}: {o.error}" for o in failures]
    return "\n".join(lines)
