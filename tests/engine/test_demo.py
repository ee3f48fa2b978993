"""`fseft demo` end to end, on a budget far below the real demo's."""

from __future__ import annotations

import json

import pytest

from fseft.engine.demo import DemoConfig, demo_methods, run_demo
from fseft.errors import ConfigError


def test_demo_rows_are_the_issue_methods():
    names = [m.name for m in demo_methods(DemoConfig())]
    assert names == ["generalization", "lp", "spatial-adapter", "spatial-adapter+ti", "decoder", "lora+dec"]


def test_demo_refuses_too_few_cases(tmp_path):
    with pytest.raises(ConfigError, match="at least 8 cases"):
        run_demo(DemoConfig(out=str(tmp_path), cases=5), progress=False, log=lambda s: None)


@pytest.mark.slow
def test_tiny_demo_writes_table_figures_and_report(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), cases=4, holdout=2, ks=(1,), feature_steps=3, decoder_steps=2,
                     lora_steps=1, known="liver")
    lines: list[str] = []
    result = run_demo(cfg, progress=False, log=lines.append)
    out = tmp_path / "demo"
    assert (out / "report.html").is_file() and (out / "overlays.png").is_file() and (out / "dice_vs_k.png").is_file()
    assert "lora+dec" in "\n".join(lines) and "decoder" in "\n".join(lines) and "k = 1" in "\n".join(lines)
    s = result.summary
    assert s["structures"] == ["liver", "gallbladder"]
    assert s["cells"]["generalization"]["1"]["gallbladder"] is None
    assert s["cells"]["lp"]["1"]["liver"]["mean"] > 0.5  # the embedded model knows the liver
    metrics = json.loads((out / "runs/lora+dec/k1/seed0/gallbladder/metrics.json").read_text())
    assert metrics["method"] == "lora" and len(metrics["queries"]) == 2
    decoder = json.loads((out / "runs/decoder/k1/seed0/gallbladder/metrics.json").read_text())
    assert decoder["encoder_cache"]["point"] == "skips"  # trained on cached encoder outputs
    # the phantoms are reused by a second call, and every run is found finished
    again = run_demo(cfg, progress=False, log=lambda s: None)
    assert again.runs_done == 0


def test_recommendation_names_the_best_method_per_structure_at_the_largest_k():
    from fseft.engine.demo import recommendation

    cells = {
        "generalization": {"5": {"inferior_vena_cava": {"mean": 0.18}, "gallbladder": None}},
        "lp": {"5": {"inferior_vena_cava": {"mean": 0.40}, "gallbladder": {"mean": 0.37}}},
        "spatial-adapter": {"5": {"inferior_vena_cava": {"mean": 0.50}, "gallbladder": {"mean": 0.30}}},
        "lora+dec": {"5": {"inferior_vena_cava": {"mean": 0.45}, "gallbladder": {"mean": 0.55}}},
    }
    line = recommendation({"cells": cells}, DemoConfig())
    assert "(inferior_vena_cava) use spatial-adapter (0.50, +0.32 Dice" in line
    assert "(gallbladder) use lora+dec (0.55)" in line
