"""Experiment runner (`fseft benchmark`): methods x k x seeds x structures on one dataset and
model, with one shared feature cache, resumable, reported like the FSEFT paper's Table 1.

An experiment file (YAML; `examples/` has the paper's set-ups)::

    name: phantom-demo
    model: phantom                  # zoo id or model file (relative to this file)
    data: ../runs/phantom_target    # dataset folder (relative to this file)
    structures: [liver, gallbladder]
    k: [1, 5]
    seeds: [0, 1, 2]
    holdout: 3                      # optional fixed query cases (the same for every k and seed)
    adapt: {epochs: 50, patience: 0}    # AdaptConfig defaults for every method
    methods:
      - generalization              # a method id, or a mapping:
      - {name: spatial-adapter+ti, method: spatial-adapter, transductive: true}
      - {name: lora+dec, method: lora, options: {decoder: fine-tuned}, max_steps: 16}
    overlays: true                  # qualitative figure (saves the needed query predictions)
    cpus_per_run: 4                 # optional: torch threads per run (with --workers also Ray's CPUs)
    gpus_per_run: 0.25              # optional, with --workers: GPU share per run (4 runs per GPU)

A method entry's keys besides ``name``, ``method`` and ``options`` (method options, e.g.
``decoder``, ``rank``) are `AdaptConfig` fields overriding the ``adapt`` defaults. Each
structure is its own binary task (the paper's protocol). A method that evaluates the model's
own head (``generalization``) is skipped for structures the model does not know.

Output folder::

    experiment.json                 the parsed experiment
    runs/<method>/k<k>/seed<s>/<structure>/   adapt's run folder (metrics.json, adapter, run.json, run.log)
    results.json / results.csv / results.md   the table (mean over seeds, with the spread)
    records.json                    one record per run (every metric)
    dice_vs_k.png, overlays.png, report.html

A run whose folder holds ``metrics.json`` and a ``run.json`` equal to its current settings is
finished and skipped, so an interrupted benchmark continues with ``fseft benchmark`` again,
and a changed setting reruns exactly the runs it affects. A run folder appears whole (written
aside, then renamed), and a run that fails leaves only its ``run.json`` and ``run.log`` (with
the traceback); the others go on, and the benchmark ends with `RunsFailedError` naming them.
With ``--workers N`` (`fseft.adaptation.executor`) the runs are Ray tasks; the folders, records and
resume are the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel.orientations as nio
import numpy as np
import torch
from tqdm.auto import tqdm

from fseft.adaptation import AdaptConfig, adapt
from fseft.adaptation.config import AUTO, AUTO_OPTIONS
from fseft.adaptation.executor import (
    ExecutorConfig,
    RunsFailedError,
    Task,
    check_resources,
    failure_summary,
    fault_point,
    make_executor,
)
from fseft.adaptation.method_choice import DEFAULT_CANDIDATES, MethodEntry, parse_candidates
from fseft.data.datasets import Dataset, open_dataset
from fseft.data.io import read_labels
from fseft.data.structures import canonical_names
from fseft.data.tasks import FewShotTask, eligible_cases
from fseft.errors import ConfigError
from fseft.evaluation.figures import OverlayPanel, plot_dice_vs_k, plot_overlay_sections
from fseft.evaluation.html_report import write_report_html
from fseft.evaluation.tables import RunRecord, auto_choices_markdown, summarize, to_csv, to_markdown
from fseft.methods import get_method
from fseft.models.zoo import MODEL_SPECS, describe_model, model_reference
from fseft.runs.load import METRICS_FILE
from fseft.utils import atomic_dir, check_keys, read_yaml_mapping, unknown_key_error, write_json, write_text

RUN_SPEC = "run.json"
RUN_LOG = "run.log"
_TOP_KEYS = ("name", "model", "data", "structures", "k", "seeds", "holdout", "adapt", "methods", "overlays", "title",
             "cpus_per_run", "gpus_per_run")
_ENTRY_KEYS = ("name", "method", "options")

logger = logging.getLogger(__name__)


@dataclass
class ExperimentConfig:
    """A parsed experiment file (module docstring). `source`: the file, for messages."""

    model: str
    data: str
    structures: tuple[str, ...]
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    methods: list[MethodEntry]
    adapt: dict[str, Any] = field(default_factory=dict)
    holdout: int | None = None
    overlays: bool = True
    name: str = "experiment"
    title: str | None = None
    source: str = "<experiment>"
    cpus_per_run: int | None = None  # `fseft.adaptation.executor.ExecutorConfig`; gpus_per_run with --workers only
    gpus_per_run: float | None = None

    def adapt_config(self, entry: MethodEntry, **extra: Any) -> Any:
        """The `AdaptConfig` of one method entry (experiment defaults, then the entry's)."""

        fields = {**self.adapt, **entry.overrides, **extra, "method": entry.method, "method_options": dict(entry.options)}
        try:
            return AdaptConfig(**fields)
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: method {entry.name!r}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["structures"], out["ks"], out["seeds"] = list(self.structures), list(self.ks), list(self.seeds)
        return out


def _int_list(value: Any, key: str, source: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ConfigError(f"{source}: {key!r} must be an integer or a list of integers, got {value!r}")
    return tuple(dict.fromkeys(values))


def _adapt_fields() -> list[str]:
    return [name for name in AdaptConfig.option_names() if name not in ("method", "method_options")]


def _parse_entry(raw: Any, i: int, source: str) -> MethodEntry:
    where = f"methods[{i}]"
    if isinstance(raw, str):
        raw = {"method": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where} must be a method name or a mapping, got {raw!r}")
    valid = [*_ENTRY_KEYS, *_adapt_fields()]
    for key in raw:
        if key not in valid:
            raise unknown_key_error(key, valid, where, source)
    if "method" not in raw:
        raise ConfigError(f"{source}: {where} has no 'method'")
    method = str(raw["method"])
    try:
        options = dict(raw.get("options") or {})
        if method == AUTO:  # its candidates are resolved against the other rows (`_resolve_candidates`)
            if options:
                raise ConfigError("method auto has no options (its candidates have theirs)")
        else:
            get_method(method).make_config(**options)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {where}: {exc}") from exc
    overrides = {k: v for k, v in raw.items() if k not in _ENTRY_KEYS}
    return MethodEntry(str(raw.get("name", method)), method, options, overrides)


def _resolve_candidates(entry: MethodEntry, rows: Sequence[MethodEntry], source: str) -> MethodEntry:
    """An ``auto`` row's candidates, each the experiment's row of that name (method, options,
    overrides) or else a candidate name (`fseft.adaptation.method_choice.parse_candidate`)."""

    if entry.method != AUTO:
        return entry
    named = {row.name: row for row in rows if row.method != AUTO}
    given = entry.overrides.get("candidates")
    names = DEFAULT_CANDIDATES if given is None else given
    if isinstance(names, str) or not isinstance(names, list | tuple):
        raise ConfigError(f"{source}: method {entry.name!r}: 'candidates' must be a list of method rows or names")
    candidates = [named[n].to_dict() if isinstance(n, str) and n in named else n for n in names]
    try:
        parse_candidates(candidates)
    except ConfigError as exc:
        raise ConfigError(f"{source}: method {entry.name!r}: {exc}") from exc
    return dataclasses.replace(entry, overrides={**entry.overrides, "candidates": candidates})


def experiment_from_dict(data: Mapping[str, Any], source: str = "<experiment>",
                         base_dir: str | os.PathLike | None = None) -> ExperimentConfig:
    """Parse an experiment mapping strictly: unknown keys, unknown methods or method options and
    invalid `AdaptConfig` values raise `ConfigError` naming the file and the key."""

    top = check_keys(data, _TOP_KEYS, "the top level", source)
    for key in ("model", "data", "structures", "k", "methods"):
        if key not in top:
            raise ConfigError(f"{source}: missing key {key!r} (required: model, data, structures, k, methods)")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    model = str(top["model"])
    if model not in MODEL_SPECS and not Path(model).is_absolute():
        model = str((base / model).resolve())
    data_dir = Path(str(top["data"]))
    data_dir = data_dir if data_dir.is_absolute() else (base / data_dir).resolve()
    structures = canonical_names(top["structures"])
    if not structures:
        raise ConfigError(f"{source}: 'structures' is empty")
    ks = _int_list(top["k"], "k", source)
    seeds = _int_list(top.get("seeds", [0]), "seeds", source)
    if any(k < 1 for k in ks):
        raise ConfigError(f"{source}: every k must be >= 1, got {list(ks)}")
    raw_methods = top["methods"]
    if not isinstance(raw_methods, list) or not raw_methods:
        raise ConfigError(f"{source}: 'methods' must be a non-empty list")
    methods = [_parse_entry(raw, i, source) for i, raw in enumerate(raw_methods)]
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: method names must be unique (give each a 'name'): {', '.join(duplicates)}")
    methods = [_resolve_candidates(entry, methods, source) for entry in methods]
    adapt = dict(top.get("adapt") or {})
    valid = _adapt_fields()
    for key in adapt:
        if key not in valid:
            raise unknown_key_error(key, valid, "adapt", source)
    holdout = top.get("holdout")
    if holdout is not None and (isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 1):
        raise ConfigError(f"{source}: 'holdout' must be an integer >= 1 (number of fixed query cases), got {holdout!r}")
    check_resources(top.get("cpus_per_run"), top.get("gpus_per_run"), where=f"{source}: ")
    exp = ExperimentConfig(model=model, data=str(data_dir), structures=structures, ks=ks, seeds=seeds,
                           methods=methods, adapt=adapt, holdout=holdout, overlays=bool(top.get("overlays", True)),
                           name=str(top.get("name", "experiment")), title=top.get("title"), source=source,
                           cpus_per_run=top.get("cpus_per_run"), gpus_per_run=top.get("gpus_per_run"))
    for entry in methods:
        exp.adapt_config(entry)  # invalid values now, not after hours of runs
    return exp


def load_experiment(path: str | os.PathLike) -> ExperimentConfig:
    """Read an experiment YAML; `model` and `data` paths are relative to its folder."""

    path = Path(path)
    data = read_yaml_mapping(path, "experiment file", _TOP_KEYS)
    return experiment_from_dict(data, source=str(path), base_dir=path.parent)


# ---------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlannedRun:
    """One adaptation run of the benchmark."""

    entry: MethodEntry
    k: int
    seed: int
    structure: str
    folder: str  # relative to the benchmark folder

    def spec(self, exp: ExperimentConfig, cfg: AdaptConfig, partition: tuple[Sequence[str], Sequence[str]] | None,
             model_sha256: str | None) -> dict[str, Any]:
        """What `run.json` records: everything that decides the run's result (the model file's
        hash too, so that new weights rerun every run; not where the cache lives)."""
        settings = {k: v for k, v in cfg.to_dict().items() if k not in ("cache_dir", "progress")}
        for key in AUTO_OPTIONS:  # --method auto's own: runs finished before it stay finished
            if settings.get(key) is None:
                settings.pop(key, None)
        return {"method": self.entry.name, "model": exp.model, "model_sha256": model_sha256, "data": exp.data,
                "structure": self.structure, "k": self.k, "seed": self.seed, "partition": partition,
                "adapt": settings}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


def run_folder(method: str, k: int, seed: int, structure: str) -> str:
    """A run's folder, relative to the benchmark folder."""
    return f"runs/{_slug(method)}/k{k}/seed{seed}/{_slug(structure)}"


def holdout_partition(dataset: Dataset, structures: Sequence[str], n_test: int, cache_dir: str | os.PathLike | None = None,
                      ) -> tuple[list[str], list[str]]:
    """A fixed ``(train ids, test ids)`` split of the cases where every structure is labelled:
    `n_test` test cases drawn with a fixed seed, so every k and seed is scored on the same queries."""

    eligible = eligible_cases(dataset, structures, cache_dir=cache_dir)
    if n_test >= len(eligible):
        raise ConfigError(f"holdout: {n_test} query cases requested, but only {len(eligible)} cases of dataset "
                          f"{dataset.name!r} have {', '.join(structures)} non-empty (the rest is the support pool)")
    order = [eligible[i] for i in np.random.default_rng(0).permutation(len(eligible))]
    return sorted(order[n_test:]), sorted(order[:n_test])


def plan_runs(exp: ExperimentConfig, class_names: Sequence[str]) -> tuple[list[PlannedRun], list[str]]:
    """Every run of the experiment (method-major, as the table reads), and notes on the
    combinations skipped (a head-only method for a structure the model does not know)."""

    runs, notes = [], []
    for entry in exp.methods:
        head_only = entry.method != AUTO and get_method(entry.method).config_cls.needs_known_structures
        for structure in exp.structures:
            if head_only and structure not in class_names:
                notes.append(f"{entry.name}: skipped for {structure} (not one of the model's classes)")
                continue
            for k in exp.ks:
                for seed in exp.seeds:
                    runs.append(PlannedRun(entry, k, seed, structure, run_folder(entry.name, k, seed, structure)))
    return runs, notes


def _finished_metrics(folder: Path, spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """A finished run's metrics: None when the folder has no run of this `spec`, or its
    ``metrics.json`` is unreadable (then the run is done again, with a warning)."""

    try:
        if json.loads((folder / RUN_SPEC).read_text()) != json.loads(json.dumps(spec)):
            return None
        metrics = json.loads((folder / METRICS_FILE).read_text())
    except OSError:
        return None
    except ValueError as exc:
        logger.warning("%s: unreadable (%s); running that run again", folder / METRICS_FILE, exc)
        return None
    return metrics if isinstance(metrics, dict) else None


def _record(run: PlannedRun, metrics: Mapping[str, Any]) -> RunRecord:
    mean = (metrics.get("mean") or {}).get(run.structure) or {}
    return RunRecord(method=run.entry.name, k=run.k, seed=run.seed, structure=run.structure,
                     dice=mean.get("dice"), nsd=mean.get("nsd"), hd95=mean.get("hd95"),
                     trainable_params=metrics.get("trainable_params"), train_seconds=metrics.get("train_seconds"),
                     run=run.folder, chosen=(metrics.get("auto") or {}).get("chosen"))


# ---------------------------------------------------------------------------- running


@contextlib.contextmanager
def _run_log(path: Path) -> Iterator[logging.Logger]:
    """Log records of fseft (INFO and up) and Python warnings into `path` for the block."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root, package = logging.getLogger(), logging.getLogger("fseft")
    level = package.level
    root.addHandler(handler)
    package.setLevel(logging.INFO)  # a handler alone would see nothing below the default WARNING
    logging.captureWarnings(True)
    try:
        yield package
    finally:
        logging.captureWarnings(False)
        package.setLevel(level)
        root.removeHandler(handler)
        handler.close()


def execute_run(model: str, data: str, structure: str, k: int, seed: int, folder: str, spec: Mapping[str, Any],
                cfg: AdaptConfig, partition: tuple[Sequence[str], Sequence[str]] | None = None) -> dict[str, Any]:
    """One planned run into `folder` (absolute), the same sequentially or on a Ray worker: the run
    is written into a hidden folder beside it, renamed onto `folder` when done, so `folder` is
    either the whole run or its predecessor. A run that raises leaves ``run.json`` and ``run.log``
    (the traceback) in `folder` and raises again. Returns the run's metrics."""
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.partial"):  # left by a killed worker or Ctrl-C
        shutil.rmtree(stale, ignore_errors=True)
    error: Exception | None = None
    with atomic_dir(target, overwrite=True) as tmp:
        write_json(tmp / RUN_SPEC, dict(spec))
        with _run_log(tmp / RUN_LOG) as log:
            log.info("run %s: %s, k = %d, seed %d, %s; %d torch thread(s)", folder, spec.get("method"), k, seed,
                     structure, torch.get_num_threads())
            fault_point(str(folder))
            try:
                metrics = adapt(model, data, structure, k, seed, tmp, cfg, partition=partition)
            except Exception as exc:
                log.exception("run failed: %s: %s", type(exc).__name__, exc)
                error = exc
            else:
                dice = ((metrics.get("mean") or {}).get(structure) or {}).get("dice")
                log.info("run finished: mean query Dice %s, %.1f s training", dice, metrics.get("train_seconds") or 0.0)
        if error is not None:  # no half-written run: only what says what failed and why
            for child in tmp.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                elif child.name not in (RUN_SPEC, RUN_LOG):
                    child.unlink()
    if error is not None:
        raise error
    return metrics


@dataclass
class BenchmarkResult:
    """What `run_benchmark` produced: the summary (`fseft.evaluation.tables.summarize`), one
    record per run, the skipped combinations, and the files written."""

    summary: dict[str, Any]
    records: list[RunRecord]
    notes: list[str]
    files: dict[str, Path]
    runs_done: int  # runs computed in this call (the others were finished before)
    seconds: float
    failed: list[Any] = field(default_factory=list)  # `fseft.adaptation.executor.Outcome` of each failed run


def run_benchmark(
    exp: ExperimentConfig,
    out: str | os.PathLike,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    executor: ExecutorConfig | None = None,
) -> BenchmarkResult:
    """Run every planned run not yet finished, then write the tables, figures and report.

    The feature cache is shared by all runs (``adapt.cache_dir``, default ``OUT/cache``). The
    tasks are validated (k against the eligible cases, the holdout) before any training.
    executor: an `fseft.adaptation.executor.ExecutorConfig` (``workers``: the runs as Ray tasks;
    its unset resources from the experiment's ``cpus_per_run`` / ``gpus_per_run``, the threads of
    each run in either mode); None: in this process, one after another. Runs that fail are left out of the tables, which are written
    from the others; then `RunsFailedError` (its ``result``: this call's `BenchmarkResult`).
    """

    start = time.perf_counter()
    out = Path(out).absolute()  # Ray workers have their own working folder
    out.mkdir(parents=True, exist_ok=True)
    if "cache_dir" not in exp.adapt:
        exp = dataclasses.replace(exp, adapt={**exp.adapt, "cache_dir": str((out / "cache").resolve())})
    write_json(out / "experiment.json", exp.to_dict())
    _, _, class_names = describe_model(exp.model)
    model_sha256 = model_reference(exp.model)["file_sha256"]
    dataset = open_dataset(exp.data)
    cache_dir = exp.adapt.get("cache_dir")
    partition = None
    if exp.holdout is not None:
        partition = holdout_partition(dataset, exp.structures, exp.holdout, cache_dir)
    runs, notes = plan_runs(exp, class_names)
    tasks = {  # every task is valid before anything trains
        (structure, k, seed): FewShotTask.sample(dataset, structure, k, seed, exp.adapt.get("n_query"),
                                                 partition=partition, cache_dir=cache_dir)
        for structure in exp.structures for k in exp.ks for seed in exp.seeds
    }

    overlay_k, overlay_seed = min(exp.ks), exp.seeds[0]
    finished: dict[str, dict[str, Any]] = {}
    todo: list[Task] = []
    for run in runs:
        save = exp.overlays and run.k == overlay_k and run.seed == overlay_seed
        cfg = exp.adapt_config(run.entry, progress=False, save_predictions=save)
        spec = run.spec(exp, cfg, partition, model_sha256)
        metrics = _finished_metrics(out / run.folder, spec)
        if metrics is not None:
            finished[run.folder] = metrics
            continue
        todo.append(Task(run.folder, execute_run, (exp.model, exp.data, run.structure, run.k, run.seed,
                                                  str(out / run.folder), spec, cfg, partition)))

    settings = (executor or ExecutorConfig()).with_defaults(exp.cpus_per_run, exp.gpus_per_run)
    failed, running = [], set()
    bar = tqdm(total=len(runs), initial=len(finished), desc=f"benchmark {exp.name}", unit="run",
               disable=not progress)

    def show(task: Task | None = None) -> None:
        if task is not None:
            running.add(task.key)
        now = f"; {next(iter(running))}" if len(running) == 1 else ""
        bar.set_postfix_str(f"done {len(finished)}, failed {len(failed)}, running {len(running)}{now}")

    try:
        with make_executor(settings) as pool:
            for outcome in pool.imap(todo, on_start=show):
                running.discard(outcome.key)
                if outcome.ok:
                    finished[outcome.key] = outcome.value
                else:
                    failed.append(outcome)
                    logger.warning("%s failed: %s", outcome.key, outcome.error)
                bar.update()
                show()
    finally:
        bar.close()
    done = len(todo) - len(failed)
    records = [_record(run, finished[run.folder]) for run in runs if run.folder in finished]  # the plan's order
    notes = [*notes, *(f"{o.key}: failed ({o.error}); see its run.log, rerun fseft benchmark to retry" for o in failed)]

    methods = [m.name for m in exp.methods]
    summary = summarize(records, "dice", methods=methods, structures=exp.structures, ks=exp.ks)
    overlay_tasks = [tasks[(s, overlay_k, overlay_seed)] for s in exp.structures] if exp.overlays else None
    files = write_results(exp, out, records, summary, notes, dataset, overlay_tasks)
    seconds = time.perf_counter() - start
    log(f"{len(runs)} runs ({done} computed now, {len(runs) - len(todo)} finished before"
        f"{f', {len(failed)} failed' if failed else ''}) in {seconds:.0f} s; report: {files['report']}")
    result = BenchmarkResult(summary, records, notes, files, done, seconds, failed)
    if failed:
        raise RunsFailedError(f"{failure_summary(failed, len(runs))}\nthe tables and report of the other runs are "
                              f"in {out}; each failed run's traceback is in its run.log; run the same command again "
                              "to retry the failed runs (finished runs are kept)", failed, result)
    return result


# ---------------------------------------------------------------------------- outputs


def write_results(exp: ExperimentConfig, out: Path, records: Sequence[RunRecord], summary: Mapping[str, Any],
                  notes: Sequence[str], dataset: Dataset | None = None, overlay_tasks: Sequence[FewShotTask] | None = None,
                  ) -> dict[str, Path]:
    """Tables (JSON, CSV, Markdown), records, figures and ``report.html`` of a benchmark.
    `overlay_tasks`: one `FewShotTask` of `dataset` per structure for the overlay figure."""

    files = {name: out / name for name in ("results.json", "results.csv", "results.md", "records.json")}
    order = {"methods": summary["methods"], "structures": summary["structures"], "ks": summary["ks"]}
    write_json(files["results.json"], {
        "dice": summary,
        "nsd": summarize(records, "nsd", **order),
        "hd95": summarize(records, "hd95", **order),
        "notes": list(notes),
    })
    write_text(files["results.csv"], to_csv(summary))
    choices = auto_choices_markdown(records)
    write_text(files["results.md"], f"# {exp.title or exp.name}\n\n" + to_markdown(summary) + choices)
    write_json(files["records.json"], [r.to_dict() for r in records])
    figures: list[tuple[str, Path]] = []
    files["dice_vs_k"] = plot_dice_vs_k(summary, out / "dice_vs_k.png")
    figures.append(("Mean Dice against the number of support volumes k (mean over seeds; bars: std)" if len(summary["ks"]) > 1
                    else f"Mean Dice per structure and method at k = {summary['ks'][0]} "
                         "(mean over seeds; error bars: std over seeds)", files["dice_vs_k"]))
    if overlay_tasks:
        k, seed = overlay_tasks[0].k, overlay_tasks[0].seed
        path = write_overlays(exp, out, dataset, overlay_tasks)
        if path is not None:
            files["overlays"] = path
            figures.append((f"Axial slices, k = {k}, seed {seed}: a support volume and the first query "
                            "(green: ground truth, red: prediction)", path))
    report_notes = [
        f"Model: {exp.model}; data: {exp.data}.",
        f"Each cell: mean Dice over the query cases, then mean ± std over the seeds {list(exp.seeds)}.",
        *notes,
        *(f"{r.method}, {r.structure}, k = {r.k}, seed {r.seed}: chose {r.chosen} on the support set"
          for r in records if r.chosen),
    ]
    files["report"] = write_report_html(out / "report.html", summary, title=exp.title or f"fseft benchmark: {exp.name}",
                                        config=exp.to_dict(), figures=figures, notes=report_notes)
    return files


def _to_ras(volume: Any, array: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """`volume`'s voxels (or `array`, in its grid) reordered to RAS axes (nibabel's canonical
    orientation), and the voxel spacing along those axes."""

    ornt = nio.io_orientation(np.asarray(volume.affine))
    transform = nio.ornt_transform(ornt, nio.axcodes2ornt(("R", "A", "S")))
    spacing = [0.0, 0.0, 0.0]
    for axis, (out_axis, _) in enumerate(ornt):
        spacing[int(out_axis)] = volume.spacing[axis]
    data = volume.array if array is None else array
    return np.ascontiguousarray(nio.apply_orientation(data, transform)), tuple(spacing)


def write_overlays(exp: ExperimentConfig, out: Path, dataset: Dataset, tasks: Sequence[FewShotTask]) -> Path | None:
    """The qualitative figure (the paper's Fig. 3): per task (one per structure), a section
    headed by the structure: one support volume with its mask, then the first query case with
    each method's prediction, four panels a row. None when no run saved predictions."""

    sections: list[tuple[str, list[OverlayPanel]]] = []
    found = 0
    for task in tasks:
        panels: list[OverlayPanel] = []
        structure = task.structures[0]
        support = task.support_cases(dataset)[0]
        query = task.query_cases(dataset)[0]
        image, label = support.load([structure])
        ras_image, spacing = _to_ras(image)
        panels.append(OverlayPanel(f"support {support.case_id}", ras_image,
                                   _to_ras(label, label.array[0] > 0)[0], None, spacing))
        image, label = query.load([structure])
        (ras_image, spacing), ras_label = _to_ras(image), _to_ras(label, label.array[0] > 0)[0]
        for entry in exp.methods:
            pred_path = out / run_folder(entry.name, task.k, task.seed, structure) / "predictions" / f"{query.case_id}.nii.gz"
            pred = _to_ras(read_labels(pred_path))[0] > 0 if pred_path.is_file() else None
            found += pred is not None
            # a method without a prediction (not run for this structure) keeps its panel: GT only
            panels.append(OverlayPanel(f"{query.case_id}: {entry.name}" + ("" if pred is not None else " (n/a)"),
                                       ras_image, ras_label, pred, spacing))
        sections.append((structure, panels))
    if not found:
        return None
    return plot_overlay_sections(sections, out / "overlays.png", columns=4)
