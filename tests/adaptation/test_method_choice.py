"""`fseft adapt --method auto`: candidates, the budget, leave-one-out on the support only, the k = 1 rule."""

from __future__ import annotations

import json
import math

import pytest
from tiny_cases import IntensityFeatures, tiny_model, write_tiny_dataset

from fseft.cli import main
from fseft.adaptation import runner as adapt_module
from fseft.adaptation.method_choice import FOLDS_DIR, parse_candidate, parse_candidates, share_budget
from fseft.errors import ConfigError
from fseft.runs.format import read_run_record

SMALL = dict(patch_size=(16, 16, 16), roi_size=(16, 16, 16), patches_per_volume=2, progress=False)


def _cfg(tmp_path, **kw):
    return adapt_module.AdaptConfig(cache_dir=str(tmp_path / "cache"), **{**SMALL, **kw})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_cases=5)


def test_candidate_names_parse_to_methods_options_and_overrides():
    ti = parse_candidate("spatial-adapter+ti")
    assert (ti.method, ti.options, ti.overrides) == ("spatial-adapter", {}, {"transductive": True})
    dec = parse_candidate("lora+dec")
    assert (dec.method, dec.options, dec.overrides) == ("lora", {"decoder": "fine-tuned"}, {})
    new = parse_candidate("lora+newdec")  # the label `fseft models --adapters` gives such a run
    assert (new.method, new.options, new.overrides) == ("lora", {"decoder": "new"}, {})
    assert [e.name for e in parse_candidates(None)] == ["spatial-adapter+ti", "spatial-adapter", "lp", "lora+dec"]
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        parse_candidate("lorra")
    with pytest.raises(ConfigError, match="trained through the network"):
        parse_candidate("lora+ti")
    with pytest.raises(ConfigError, match="no --decoder option"):
        parse_candidate("lp+dec")
    with pytest.raises(ConfigError, match="no --decoder option"):
        parse_candidate("spatial-adapter+newdec")
    with pytest.raises(ConfigError, match="given twice"):
        parse_candidates(["lp", "lp"])


def test_budget_is_shared_equally_and_a_capped_candidate_leaves_its_rest():
    assert share_budget([math.inf, math.inf], 100) == [50, 50]
    assert share_budget([80, math.inf, math.inf], 1000) == [80, 460, 460]
    assert share_budget([10, 20, 30], 1000) == [10, 20, 30]
    assert sum(share_budget([math.inf] * 3, 100)) <= 100


def _record_calls(monkeypatch):
    """Every `adapt` call (the leave-one-out runs and the final one): its k, partition and config."""
    calls = []
    real = adapt_module.adapt

    def recording(model, data, structures, k, seed, out, cfg=None, partition=None, overwrite=True):
        calls.append({"k": k, "partition": partition, "cfg": cfg, "out": out})
        return real(model, data, structures, k, seed, out, cfg, partition=partition, overwrite=overwrite)

    monkeypatch.setattr(adapt_module, "adapt", recording)
    return calls


def test_leave_one_out_uses_only_the_support_and_picks_the_candidate_that_learns(data_root, tmp_path, monkeypatch):
    calls = _record_calls(monkeypatch)
    stalled = {"name": "lp-stalled", "method": "lp", "overrides": {"lr": 1e-6}}
    learning = {"name": "lp-learning", "method": "lp", "overrides": {"lr": 1e-1}}
    cfg = _cfg(tmp_path, method="auto", candidates=[stalled, learning], auto_budget=600, epochs=60, patience=0)
    metrics = adapt_module.adapt(IntensityFeatures(), data_root, "gallbladder", 3, 0, tmp_path / "run", cfg)

    auto = metrics["auto"]
    assert auto["chosen"] == "lp-learning" and metrics["method"] == "lp"
    rows = {row["name"]: row for row in auto["candidates"]}
    assert rows["lp-learning"]["cv_dice"] > rows["lp-stalled"]["cv_dice"] + 0.3
    assert all(len(row["fold_dice"]) == 3 for row in rows.values())
    # 600 steps shared by 2 candidates x 3 folds; each candidate's protocol (60 epochs of 2 volumes) is more
    assert all(row["steps_per_fold"] == 100 for row in rows.values())

    task = read_run_record(tmp_path / "run")["extra"]["task"]
    support, query = set(task["support"]), set(task["query"])
    folds = [c for c in calls[1:] if c["k"] == 2]
    assert len(folds) == 6 and all(c["cfg"].max_steps == 100 for c in folds)
    for call in folds:  # trained on two support volumes, scored on the third: never a query
        train, test = call["partition"]
        assert len(test) == 1 and set(train) | set(test) == support and not (set(train) | set(test)) & query
    final = calls[-1]
    assert final["k"] == 3 and final["out"] == tmp_path / "run" and final["cfg"].lr == 1e-1
    assert not (tmp_path / "run" / FOLDS_DIR).exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["auto"]["chosen"] == "lp-learning"


def test_k1_rule_known_structure_black_box_new_structure_network(data_root, tmp_path):
    cfg = _cfg(tmp_path, method="auto", candidates=["lp", "ft-last"], epochs=1, n_query=1)
    known = adapt_module.adapt(IntensityFeatures(), data_root, "liver", 1, 0, tmp_path / "known", cfg)
    assert known["auto"]["chosen"] == "lp" and known["auto"]["candidates"] == []
    assert "known to the base model" in known["auto"]["reason"]
    novel = adapt_module.adapt(tiny_model(), data_root, "gallbladder", 1, 0, tmp_path / "novel", cfg)
    assert novel["auto"]["chosen"] == "ft-last" and novel["method"] == "ft-last"


def test_k1_without_a_candidate_for_the_rule_fails_before_any_work(data_root, tmp_path, monkeypatch):
    calls = _record_calls(monkeypatch)
    cfg = _cfg(tmp_path, method="auto", candidates=["lp", "spatial-adapter"])
    with pytest.raises(ConfigError, match="k = 1 .* new to the model .* add one \\(e.g. lora\\+dec\\)"):
        adapt_module.adapt(IntensityFeatures(), data_root, "gallbladder", 1, 0, tmp_path / "run", cfg)
    assert len(calls) == 1 and not (tmp_path / "run").exists()


def test_cli_auto_options_are_checked(tmp_path, capsys):
    base = ["adapt", "--model", "phantom", "--structures", "liver"]
    assert main([*base, "--candidates", "lp", "--data", str(tmp_path), "--k", "2", "--out", str(tmp_path / "r")]) == 2
    assert "--candidates and --auto-budget are options of --method auto" in capsys.readouterr().err
    assert main([*base, "--method", "auto", "--auto-budget", "0", "--data", str(tmp_path), "--k", "2",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--auto-budget must be" in capsys.readouterr().err
    assert main([*base, "--method", "auto", "--dry-run"]) == 2
    assert "dry-run a candidate's method instead" in capsys.readouterr().err
