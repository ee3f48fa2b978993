"""Adding a method is one module under `fseft.methods` that registers itself: the toy method of
tests/fixtures/methods/toy.py, found as `fseft.methods.toy` once its folder is on the
package's path, is listed, gets its command-line option, runs `fseft adapt --dry-run` and a
2-step adaptation with its hooks called, and its run loads back, with no other file changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_cases import tiny_model, write_tiny_dataset

from fseft.cli import main

TOY_FOLDER = Path(__file__).resolve().parents[1] / "fixtures" / "methods"


@pytest.fixture
def toy_method(monkeypatch):
    import fseft.methods
    from fseft.methods import registry

    monkeypatch.setattr(fseft.methods, "__path__", [*fseft.methods.__path__, str(TOY_FOLDER)])
    yield "toy"
    registry.unregister_method("toy")
    sys.modules.pop("fseft.methods.toy", None)


def test_the_toy_method_is_registered_by_its_module_alone(toy_method, capsys):
    from fseft.methods import available_methods, get_method

    assert "toy" in available_methods("network") and get_method("toy").description.startswith("the head alone")
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--toy-scale TOY_SCALE toy: factor on the pre-trained head rows (default: 1.0)" in help_text
    assert ", toy (trained through the network)" in help_text, help_text  # the --method help


def test_the_toy_method_dry_runs_and_adapts_in_two_steps(toy_method, tmp_path, capsys):
    from fseft.runs.load import load_adapted_model
    from fseft.models.checkpoint import save_model_file

    model = tiny_model()
    model_file = save_model_file(model, tmp_path / "base.safetensors", preprocess=model.preprocess)
    data = write_tiny_dataset(tmp_path / "data", n_cases=3)
    common = ["adapt", "--model", str(model_file), "--structures", "liver,gallbladder", "--method", "toy",
              "--toy-scale", "0.5"]
    assert main([*common, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "toy (network, toy_scale=0.5)" in out
    assert ["trainable", str(2 * (model.feature_channels + 1))] in [line.split() for line in out.splitlines()]

    run = tmp_path / "run"
    assert main([*common, "--data", str(data), "--k", "2", "--out", str(run), "--epochs", "1",
                 "--patch-size", "16", "16", "16", "--roi-size", "16", "16", "16", "--patches-per-volume", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "toy steps: 2" in out  # one epoch of k = 2 volumes, one per step: its after_step hook ran twice
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "toy" and metrics["toy_steps"] == 2
    assert metrics["trainable_params"] == 2 * (model.feature_channels + 1)  # the head only
    adapted = load_adapted_model(run)
    assert adapted.class_names == ("liver", "gallbladder")
