"""Benchmark summaries and the Table-1 layout."""

from __future__ import annotations

import pytest

from fseft.evaluation.tables import RunRecord, summarize, to_csv, to_markdown, to_text


def _records():
    out = []
    for seed, (liver, gb) in enumerate([(0.8, 0.4), (0.9, 0.6)]):
        out.append(RunRecord("lp", 1, seed, "liver", liver, 0.5, 3.0, 13, 1.0))
        out.append(RunRecord("lp", 1, seed, "gallbladder", gb, 0.5, 3.0, 13, 3.0))
        out.append(RunRecord("generalization", 1, seed, "liver", 0.7, 0.5, 3.0, 0, 0.0))
    return out


def test_cells_are_mean_and_sample_std_over_seeds_and_mean_needs_every_structure():
    s = summarize(_records())
    assert s["methods"] == ["lp", "generalization"] and s["structures"] == ["liver", "gallbladder"]
    liver = s["cells"]["lp"]["1"]["liver"]
    assert liver["mean"] == pytest.approx(0.85) and liver["std"] == pytest.approx(0.0707107, abs=1e-6)
    assert liver["n"] == 2
    # per seed: (0.8 + 0.4) / 2 = 0.6 and (0.9 + 0.6) / 2 = 0.75
    assert s["cells"]["lp"]["1"]["mean"]["mean"] == pytest.approx(0.675)
    assert s["cells"]["generalization"]["1"]["gallbladder"] is None
    assert s["cells"]["generalization"]["1"]["mean"] is None  # never a mean over other structures
    assert s["trainable_params"] == {"lp": 13, "generalization": 0}
    assert s["train_seconds"]["lp"] == pytest.approx(2.0)


def test_markdown_csv_and_text_layouts():
    s = summarize(_records(), methods=["generalization", "lp"], ks=[1, 5])
    md = to_markdown(s)
    assert "### k = 1" in md and "### k = 5" in md
    assert "| lp | 0.850 ± 0.071 | 0.500 ± 0.141 | 0.675 ± 0.106 |" in md
    assert "| generalization | 0.700 ± 0.000 | — | — |" in md
    csv_lines = to_csv(s).splitlines()
    assert csv_lines[0] == "k,method,structure,dice_mean,dice_std,n_seeds"
    assert "1,lp,liver,0.850000,0.070711,2" in csv_lines
    assert "5,lp,liver,,,0" in csv_lines
    assert to_text(s).splitlines()[0] == "k = 1"
    with pytest.raises(ValueError):
        summarize(_records(), metric="accuracy")
