"""`fseft benchmark`: experiment files, planning, resumable runs, tables and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_cases import write_tiny_experiment_inputs

from fseft.cli import main
from fseft.experiments.grid import experiment_from_dict, load_experiment, run_benchmark
from fseft.errors import ConfigError

TINY = {"roi_size": [16, 16, 16], "patch_size": [16, 16, 16], "patches_per_volume": 2, "patience": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_experiment_inputs(tmp_path_factory.mktemp("bench"))


def _experiment(root: Path, data: Path, model: Path, **changes) -> Path:
    exp = {
        "name": "tiny",
        "model": str(model),
        "data": "data",  # relative to the experiment file
        "structures": ["liver", "gallbladder"],
        "k": [1, 2],
        "seeds": [0, 1],
        "holdout": 2,
        "adapt": {**TINY, "epochs": 3},
        "methods": ["generalization", "lp", {"name": "adapter", "method": "spatial-adapter", "epochs": 2}],
        **changes,
    }
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_typos_and_bad_values_are_reported_with_the_file(setup, tmp_path):
    root, data, model = setup
    base = {"model": str(model), "data": str(data), "structures": ["liver"], "k": [1], "methods": ["lp"]}
    with pytest.raises(ConfigError, match=r"exp.yaml: unknown key 'seed'.*did you mean 'seeds'"):
        experiment_from_dict({**base, "seed": [0]}, source="exp.yaml")
    with pytest.raises(ConfigError, match=r"methods\[0\].*did you mean 'epochs'"):
        experiment_from_dict({**base, "methods": [{"method": "lp", "epoch": 3}]}, source="exp.yaml")
    with pytest.raises(ConfigError, match="exp.yaml.*nope"):
        experiment_from_dict({**base, "methods": ["nope"]}, source="exp.yaml")
    with pytest.raises(ConfigError, match="exp.yaml: method 'lp'.*max_steps"):
        experiment_from_dict({**base, "methods": [{"method": "lp", "max_steps": 0}]}, source="exp.yaml")
    with pytest.raises(ConfigError, match="unique"):
        experiment_from_dict({**base, "methods": ["lp", "lp"]}, source="exp.yaml")
    with pytest.raises(ConfigError, match="missing key 'k'"):
        experiment_from_dict({k: v for k, v in base.items() if k != "k"}, source="exp.yaml")
    with pytest.raises(ConfigError, match="holdout"):
        run_benchmark(experiment_from_dict({**base, "holdout": 5}), tmp_path / "out", progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="k=4"):
        run_benchmark(experiment_from_dict({**base, "k": [4], "holdout": 2}), tmp_path / "out2", progress=False,
                      log=lambda s: None)
    assert not (tmp_path / "out2" / "runs").exists()  # checked before anything ran


def test_benchmark_runs_tables_report_and_resumes(setup):
    root, data, model = setup
    out = root / "out"
    exp = load_experiment(_experiment(root, data, model))
    assert exp.data == str(data.resolve())
    result = run_benchmark(exp, out, progress=False, log=lambda s: None)

    # generalization has no gallbladder output: skipped, so 2 + 4 + 4 structure-k pairs x 2 seeds
    assert result.runs_done == len(result.records) == (1 + 2 + 2) * 2 * 2
    assert any("generalization: skipped for gallbladder" in n for n in result.notes)
    s = result.summary
    assert s["methods"] == ["generalization", "lp", "adapter"] and s["ks"] == [1, 2]
    assert s["cells"]["generalization"]["1"]["gallbladder"] is None
    assert s["cells"]["generalization"]["1"]["mean"] is None
    cell = s["cells"]["lp"]["2"]["liver"]
    values = [r.dice for r in result.records if r.method == "lp" and r.k == 2 and r.structure == "liver"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(sum(values) / 2)
    # every run scored on the same fixed queries
    queries = {tuple(sorted(json.loads((out / r.run / "metrics.json").read_text())["queries"])) for r in result.records}
    assert len(queries) == 1 and len(next(iter(queries))) == 2
    spec = json.loads((out / result.records[0].run / "run.json").read_text())
    assert len(spec["model_sha256"]) == 64 and "cache_dir" not in spec["adapt"]  # new weights rerun every run
    # --method auto's options are not in other runs' settings: runs finished before auto existed stay finished
    assert "candidates" not in spec["adapt"] and "auto_budget" not in spec["adapt"]

    for name in ("results.json", "results.csv", "results.md", "records.json", "dice_vs_k.png", "overlays.png",
                 "report.html", "experiment.json"):
        assert (out / name).is_file(), name
    md = (out / "results.md").read_text()
    assert "### k = 1" in md and "| generalization |" in md and "—" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "adapter" in html

    # a second call computes nothing; changing one method's setting reruns only its runs
    again = run_benchmark(exp, out, progress=False, log=lambda s: None)
    assert again.runs_done == 0 and again.summary == result.summary
    changed = load_experiment(_experiment(root, data, model, methods=[
        "generalization", "lp", {"name": "adapter", "method": "spatial-adapter", "epochs": 1}]))
    third = run_benchmark(changed, out, progress=False, log=lambda s: None)
    assert third.runs_done == 2 * 2 * 2


def test_auto_row_chooses_among_the_experiment_rows_and_the_report_says_what(setup):
    root, data, model = setup
    out = root / "auto"
    rows = ["lp", {"name": "adapter", "method": "spatial-adapter", "epochs": 2},
            {"name": "auto", "method": "auto", "candidates": ["lp", "adapter", "spatial-adapter+ti"], "auto_budget": 60}]
    exp = load_experiment(_experiment(root, data, model, structures=["gallbladder"], k=[2], seeds=[0],
                                      methods=rows, overlays=False))
    auto = exp.methods[-1].overrides["candidates"]
    assert auto[1] == {"name": "adapter", "method": "spatial-adapter", "options": {}, "overrides": {"epochs": 2}}
    assert auto[2] == "spatial-adapter+ti"  # not a row: a candidate name
    result = run_benchmark(exp, out, progress=False, log=lambda s: None)
    record = next(r for r in result.records if r.method == "auto")
    assert record.chosen in ("lp", "adapter", "spatial-adapter+ti")
    chosen = next((r for r in result.records if r.method == record.chosen), None)
    if chosen is not None:  # the chosen row trained again on the same task: the same queries' Dice
        assert record.dice == pytest.approx(chosen.dice, abs=1e-6)
    assert f"| auto | gallbladder | 2 | 0 | {record.chosen} |" in (out / "results.md").read_text()
    assert f"chose {record.chosen} on the support set" in (out / "report.html").read_text()
    with pytest.raises(ConfigError, match="method 'auto'.*unknown method 'lorra'.*did you mean 'lora'"):
        experiment_from_dict({"model": str(model), "data": str(data), "structures": ["liver"], "k": [2],
                              "methods": [{"method": "auto", "candidates": ["lorra"]}]}, source="exp.yaml")


def test_cli_benchmark_prints_the_table(setup, capsys):
    root, data, model = setup
    path = _experiment(root, data, model, k=[1], seeds=[0], methods=["lp"], overlays=False)
    assert main(["benchmark", "--config", str(path), "--out", str(root / "cli"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "k = 1" in out and "lp" in out and "liver" in out
    assert not (root / "cli" / "overlays.png").exists()
    # a corrupt metrics.json of a finished run: that run is done again, with a warning, no traceback
    corrupt = next((root / "cli" / "runs").rglob("metrics.json"))
    corrupt.write_text("{junk")
    assert main(["benchmark", "--config", str(path), "--out", str(root / "cli"), "--no-progress"]) == 0
    assert json.loads(corrupt.read_text())["method"] == "lp"
    assert main(["benchmark", "--config", str(root / "missing.yaml"), "--out", str(root / "cli")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "examples").glob("experiment_*.yaml")),
                         ids=lambda p: p.name)
def test_example_experiment_files_parse(path):
    exp = load_experiment(path)
    assert exp.methods and exp.structures and exp.ks
