"""Sweeps on Ray (`fseft benchmark --workers`, `fseft adapt --method auto --workers`): the same
records as sequentially, failed and killed runs, Ctrl-C and resume, and no Ray without --workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_cases import write_tiny_experiment_inputs

from fseft.adaptation.executor import (
    CRASH_ONCE_ENV,
    ExecutorConfig,
    RunsFailedError,
    SequentialExecutor,
    Task,
    make_executor,
)
from fseft.cli import main
from fseft.errors import ConfigError
from fseft.experiments.grid import load_experiment, run_benchmark

SRC = str(Path(__file__).parents[2] / "src")
TINY = {"roi_size": [16, 16, 16], "patch_size": [16, 16, 16], "patches_per_volume": 2, "patience": 0}
# a black-box row and a network row (LoRA + fine-tuned decoder), tiny budgets
METHODS = ["lp", {"name": "lora+dec", "method": "lora", "options": {"decoder": "fine-tuned", "rank": 2}, "epochs": 2}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_experiment_inputs(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def ray_local():
    """One local 2-CPU Ray instance for the in-process tests (`RayExecutor` joins it); the CLI
    test in a subprocess starts its own, as `fseft benchmark --workers` does."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 1024**2)
    yield ray
    ray.shutdown()


def _experiment(root: Path, name: str, **changes) -> Path:
    exp = {"name": name, "model": str(root / "tiny.safetensors"), "data": "data", "structures": ["liver", "gallbladder"],
           "k": [2], "seeds": [0, 1], "holdout": 2, "adapt": {**TINY, "epochs": 3}, "methods": METHODS,
           "overlays": False, **changes}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def _without_times(value):
    """`value` without the wall-time fields, which differ from run to run."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _run_folders(out: Path) -> list[Path]:
    return sorted(p for p in (out / "runs").glob("*/k*/seed*/*") if not p.name.startswith("."))  # not partials


def _quiet(_: str) -> None:
    pass


@pytest.mark.slow
def test_two_workers_give_the_sequential_records_and_run_folders(setup, ray_local):
    root, _, _ = setup
    exp = load_experiment(_experiment(root, "same"))
    threads = torch.get_num_threads()
    # at equal torch threads (1 sequentially, 1 on each worker): torch's CPU results depend on the count
    seq = run_benchmark(exp, root / "seq", progress=False, log=_quiet, executor=ExecutorConfig(cpus_per_run=1))
    assert torch.get_num_threads() == threads  # the driver's own count is back
    par = run_benchmark(exp, root / "par", progress=False, log=_quiet,
                        executor=ExecutorConfig(workers=2, cpus_per_run=1))
    assert seq.runs_done == par.runs_done == len(seq.records) == 2 * 2 * 2

    # records in the plan's order, whatever order the workers finished in; every metric to 1e-6
    assert [r.run for r in par.records] == [r.run for r in seq.records]
    for a, b in zip(seq.records, par.records):
        assert _close(_without_times(a.to_dict()), _without_times(b.to_dict())), (a, b)
    assert par.summary["methods"] == seq.summary["methods"]
    assert (root / "par" / "results.md").is_file() and (root / "par" / "report.html").is_file()

    # the same folders with the same files; metrics.json equal but for wall times; a run.log each
    assert [p.relative_to(root / "seq") for p in _run_folders(root / "seq")] == \
           [p.relative_to(root / "par") for p in _run_folders(root / "par")]
    for folder in _run_folders(root / "par"):
        twin = root / "seq" / folder.relative_to(root / "par")
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in twin.iterdir())
        a, b = (json.loads((f / "metrics.json").read_text()) for f in (twin, folder))
        assert _close(_without_times(a), _without_times(b)), folder
        assert json.loads((folder / "run.json").read_text()) == json.loads((twin / "run.json").read_text())
        # the trained adapters too: the tiny runs' Dice is often 0 on both sides, their weights never are
        wa, wb = (load_file(f / "adapter_model.safetensors") for f in (twin, folder))
        assert wa.keys() == wb.keys() and any(t.abs().sum() > 0 for t in wa.values())
        assert all(torch.allclose(wa[n], wb[n], rtol=0, atol=1e-6) for n in wa), folder
        for log in ((folder / "run.log").read_text(), (twin / "run.log").read_text()):
            assert "1 torch thread(s)" in log and "run finished" in log  # cpus_per_run set torch's threads
        assert ".partial" not in (folder / "metrics.json").read_text()  # nothing names the folder it was written in
    assert not list((root / "par" / "runs").rglob("*.partial"))

    # resume across modes: the sequential rerun of the Ray-written folder computes nothing
    again = run_benchmark(exp, root / "par", progress=False, log=_quiet)
    assert again.runs_done == 0 and [r.dice for r in again.records] == [r.dice for r in par.records]


def _close(a, b) -> bool:
    """Equal JSON values, numbers to 1e-6."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, int | float):
        return abs(a - b) <= 1e-6
    return a == b


@pytest.mark.slow
def test_a_run_that_raises_is_recorded_the_others_finish_and_the_command_names_it(setup, ray_local, capsys):
    root, _, _ = setup
    # a row asking for a GPU that no worker has: ConfigError inside those runs, on the workers
    methods = ["lp", {"name": "lp-gpu", "method": "lp", "device": "cuda:99"}]
    path = _experiment(root, "raises", structures=["liver"], methods=methods)
    out = root / "raises-out"
    assert main(["benchmark", "--config", str(path), "--out", str(out), "--no-progress", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "2 of 4 runs failed" in err and "runs/lp-gpu/k2/seed0/liver: ConfigError" in err and "cuda:99" in err
    assert "runs/lp/" not in err
    for seed in (0, 1):
        assert (out / f"runs/lp/k2/seed{seed}/liver/metrics.json").is_file()
        failed = out / f"runs/lp-gpu/k2/seed{seed}/liver"  # what failed and why, nothing half-written
        assert sorted(p.name for p in failed.iterdir()) == ["run.json", "run.log"]
        assert "cuda:99" in (failed / "run.log").read_text() and "Traceback" in (failed / "run.log").read_text()
    records = json.loads((out / "records.json").read_text())
    assert [r["method"] for r in records] == ["lp", "lp"]  # the table holds the runs that finished
    assert "lp-gpu/k2/seed0/liver: failed (ConfigError" in (out / "report.html").read_text()


@pytest.mark.slow
def test_a_killed_worker_is_retried_else_its_run_is_failed_and_a_rerun_finishes_it(setup, ray_local, monkeypatch):
    root, _, _ = setup
    exp = load_experiment(_experiment(root, "killed", structures=["liver"], methods=["lp"]))
    out = root / "killed-out"
    victim = "runs/lp/k2/seed1/liver"

    # no retries: the run whose worker died (os._exit mid-run) is failed; the other finishes
    monkeypatch.setenv(CRASH_ONCE_ENV, f"{victim}@{root / 'died-once'}")
    with pytest.raises(RunsFailedError, match=f"(?s)1 of 2 runs failed.*{victim}: WorkerCrashedError: its worker process died") as info:
        run_benchmark(exp, out, progress=False, log=_quiet, executor=ExecutorConfig(workers=2, max_retries=0))
    assert (root / "died-once").exists()
    assert [r.run for r in info.value.result.records] == ["runs/lp/k2/seed0/liver"]
    assert not (out / victim).exists()  # the dead worker's half-written copy is hidden beside it
    assert list((out / victim).parent.glob(".liver.*.partial"))

    # one retry: the worker dies again (a new marker), Ray restarts the task, the run finishes;
    # the finished run is not computed again, and the dead attempt's leftovers are gone
    monkeypatch.setenv(CRASH_ONCE_ENV, f"{victim}@{root / 'died-twice'}")
    result = run_benchmark(exp, out, progress=False, log=_quiet, executor=ExecutorConfig(workers=2, max_retries=1))
    assert (root / "died-twice").exists() and result.runs_done == 1 and not result.failed
    assert (out / victim / "metrics.json").is_file()
    assert not list((out / "runs").rglob("*.partial"))


@pytest.mark.slow
def test_ctrl_c_keeps_finished_runs_and_a_sequential_resume_recomputes_none_of_them(setup):
    root, _, _ = setup
    path = _experiment(root, "interrupt", structures=["liver"], seeds=[0, 1, 2])  # 6 runs
    out = root / "interrupt-out"
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "fseft", "benchmark", "--config", str(path), "--out", str(out),
                             "--no-progress", "--workers", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a suite started in the background (nohup, cmd &) ignores SIGINT, and so
                            # would the child: give it the default, so Python turns it into Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not list((out / "runs").rglob("metrics.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err

    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.json")}
    assert finished
    for folder in _run_folders(out):  # every visible run folder is a whole run
        assert (folder / "metrics.json").is_file(), folder
    result = run_benchmark(load_experiment(path), out, progress=False, log=_quiet)
    assert result.runs_done == 6 - len(finished) and len(result.records) == 6
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # nothing finished was computed again
    assert not list((out / "runs").rglob("*.partial"))


@pytest.mark.slow
def test_auto_folds_on_two_workers_choose_as_sequentially(setup, ray_local, tmp_path):
    from fseft.adaptation import AdaptConfig, adapt

    _, data, model = setup
    cfg = AdaptConfig(method="auto", candidates=["lp", "spatial-adapter"], auto_budget=40, roi_size=(16, 16, 16),
                      patch_size=(16, 16, 16), patches_per_volume=2, patience=0, epochs=4, progress=False,
                      cache_dir=str(tmp_path / "cache"))
    seq = adapt(str(model), data, "gallbladder", 3, 0, tmp_path / "seq", cfg)["auto"]
    par = adapt(str(model), data, "gallbladder", 3, 0, tmp_path / "par", cfg,
                executor=ExecutorConfig(workers=2, cpus_per_run=1))["auto"]
    assert par["chosen"] == seq["chosen"]
    for a, b in zip(seq["candidates"], par["candidates"]):
        assert a["name"] == b["name"] and b["fold_dice"] == pytest.approx(a["fold_dice"], abs=1e-6)
    with pytest.raises(ConfigError, match="--workers runs --method auto's leave-one-out folds"):
        adapt(str(model), data, "gallbladder", 3, 0, tmp_path / "lp", AdaptConfig(method="lp"),
              executor=ExecutorConfig(workers=2))


def test_without_workers_ray_is_never_imported_and_the_files_cpus_per_run_sets_the_threads(setup):
    root, _, _ = setup
    threads = torch.get_num_threads() + 1  # not the subprocess's default, whatever this machine's cores
    path = _experiment(root, "noray", structures=["liver"], seeds=[0], methods=["lp"], cpus_per_run=threads,
                       gpus_per_run=0.5)  # a GPU share means nothing in one process: not an error there
    code = ("import sys; from fseft.cli import main; "
            f"rc = main(['benchmark', '--config', {str(path)!r}, '--out', {str(root / 'noray-out')!r}, '--no-progress']); "
            "assert rc == 0, rc; assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (root / "noray-out" / "runs/lp/k2/seed0/liver/metrics.json").is_file()
    assert f"; {threads} torch thread(s)" in (root / "noray-out" / "runs/lp/k2/seed0/liver/run.log").read_text()


def test_resource_options_are_checked(setup, ray_local, capsys):
    root, _, _ = setup
    with pytest.raises(ConfigError, match="--gpus-per-run: options of --workers"):
        ExecutorConfig(cpus_per_run=2, gpus_per_run=0.5)
    with pytest.raises(ConfigError, match="--workers must be an integer >= 1"):
        ExecutorConfig(workers=0)
    with pytest.raises(ConfigError, match="--gpus-per-run must be a fraction"):
        ExecutorConfig(workers=2, gpus_per_run=1.5)
    path = _experiment(root, "badres", gpus_per_run=-1)
    assert main(["benchmark", "--config", str(path), "--out", str(root / "badres-out"), "--workers", "2"]) == 2
    assert "badres.yaml: gpus_per_run must be a fraction" in capsys.readouterr().err
    path = _experiment(root, "goodres", cpus_per_run=2, gpus_per_run=0.25)
    exp = load_experiment(path)
    assert (exp.cpus_per_run, exp.gpus_per_run) == (2, 0.25)
    merged = ExecutorConfig(workers=2, cpus_per_run=1).with_defaults(exp.cpus_per_run, exp.gpus_per_run)
    assert (merged.cpus_per_run, merged.gpus_per_run) == (1, 0.25)  # the command line wins
    # more than the cluster has: Ray would queue the runs forever, fseft says so at once
    from fseft.adaptation.executor import RayExecutor

    with pytest.raises(ConfigError, match="--gpus-per-run 4096: the Ray cluster has .* GPU"):
        RayExecutor(ExecutorConfig(workers=1, gpus_per_run=4096))
    with pytest.raises(ConfigError, match="--cpus-per-run 4096: the Ray cluster has 2 CPU"):
        RayExecutor(ExecutorConfig(workers=1, cpus_per_run=4096))
    assert ray_local.is_initialized()  # a joined instance is left running
    assert main(["adapt", "--model", "x", "--structures", "liver", "--dry-run", "--max-retries", "1"]) == 2
    assert "--max-retries: options of --workers" in capsys.readouterr().err


def _threads_or_raise(fail: bool) -> int:
    if fail:
        raise RuntimeError(f"failed at {torch.get_num_threads()} threads")
    return torch.get_num_threads()


def test_cpus_per_run_without_workers_sets_each_tasks_threads_and_restores_them():
    before = torch.get_num_threads()
    wanted = before + 1  # differs from the count in place on any machine
    cfg = ExecutorConfig(cpus_per_run=wanted)
    assert not cfg.distributed and cfg.cpus_per_run == wanted
    with pytest.raises(ConfigError, match="--cpus-per-run must be an integer >= 1"):
        ExecutorConfig(cpus_per_run=0)
    for bad in ({"address": "auto"}, {"gpus_per_run": 0.5}, {"max_retries": 1}):
        with pytest.raises(ConfigError, match="options of --workers"):
            ExecutorConfig(cpus_per_run=1, **bad)
    # an experiment file's resources: its CPUs apply sequentially too, its GPU share only on Ray
    merged = ExecutorConfig().with_defaults(cpus_per_run=3, gpus_per_run=0.25)
    assert (merged.workers, merged.cpus_per_run, merged.gpus_per_run) == (None, 3, None)
    assert ExecutorConfig(cpus_per_run=1).with_defaults(cpus_per_run=3).cpus_per_run == 1  # the command line wins

    pool = make_executor(cfg)
    assert isinstance(pool, SequentialExecutor)
    seen: list[int] = []
    tasks = [Task("ok", _threads_or_raise, (False,)), Task("raises", _threads_or_raise, (True,)),
             Task("after", _threads_or_raise, (False,))]
    outcomes = []
    for outcome in pool.imap(tasks, on_start=lambda _: seen.append(torch.get_num_threads())):
        seen.append(torch.get_num_threads())  # the caller's code between tasks: its own count
        outcomes.append(outcome)
    assert [o.value for o in outcomes] == [wanted, None, wanted]
    assert outcomes[1].error == f"RuntimeError: failed at {wanted} threads"  # a failed task ran at them too
    assert seen == [before] * 6 and torch.get_num_threads() == before
    # without cpus_per_run a task runs at the count in place
    assert [o.value for o in make_executor(ExecutorConfig()).imap(tasks[:1])] == [before]


def test_adapt_cpus_per_run_without_workers_sets_the_threads_of_each_fold_or_of_the_one_run(setup, tmp_path,
                                                                                            monkeypatch):
    from fseft.adaptation import AdaptConfig, runner

    _, data, model = setup
    before, wanted = torch.get_num_threads(), torch.get_num_threads() + 1
    calls: list[tuple[int, int]] = []
    real = runner.adapt

    def recording(*args, **kwargs):
        calls.append((args[3], torch.get_num_threads()))  # (k, threads) of each run: folds, the final one
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "adapt", recording)
    small = dict(roi_size=(16, 16, 16), patch_size=(16, 16, 16), patches_per_volume=2, patience=0, epochs=2,
                 progress=False, cache_dir=str(tmp_path / "cache"))
    cfg = AdaptConfig(method="auto", candidates=["lp"], auto_budget=6, **small)
    runner.adapt(str(model), data, "gallbladder", 3, 0, tmp_path / "auto", cfg,
                 executor=ExecutorConfig(cpus_per_run=wanted))
    # the 3 leave-one-out folds at the given count; the final run (k = 3) at this process's, as with --workers
    assert calls[0] == (3, before) and calls[1:4] == [(2, wanted)] * 3 and calls[4:] == [(3, before)]
    assert torch.get_num_threads() == before

    calls.clear()  # one run of another method: the run is the task
    runner.adapt(str(model), data, "gallbladder", 3, 0, tmp_path / "lp", AdaptConfig(method="lp", **small),
                 executor=ExecutorConfig(cpus_per_run=wanted))
    assert calls == [(3, before), (3, wanted)] and torch.get_num_threads() == before
