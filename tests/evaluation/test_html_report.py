import base64
import html
import re

import pytest

from fseft.errors import InputFileError
from fseft.evaluation.html_report import write_report_html
from fseft.evaluation.tables import format_cell

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(metric="dice"):
    def c(mean, std=0.034, n=3):
        return {"mean": mean, "std": std, "n": n}

    return {
        "metric": metric,
        "methods": ["generalization", "lp", "<script>alert(1)</script>"],
        "structures": ["liver", "gallbladder"],
        "ks": [1, 5],
        "cells": {
            "generalization": {"1": {"liver": c(0.9, 0.0, 1), "gallbladder": None, "mean": None}},
            "lp": {"1": {"liver": c(0.812), "gallbladder": c(0.3), "mean": c(0.556)},
                   "5": {"liver": c(0.85), "gallbladder": c(0.5), "mean": c(0.675)}},
            "<script>alert(1)</script>": {"5": {"liver": c(0.92), "gallbladder": c(0.7), "mean": c(0.81)}},
        },
        "trainable_params": {"lp": 13, "<script>alert(1)</script>": 1230637, "generalization": None},
        "train_seconds": {"lp": 3.2},
    }


def _png(path):
    path.write_bytes(PNG_MAGIC + b"fake image data")
    return path


def _block(page, k):
    """The table after the heading "k = k"."""
    start = page.index(f"<h3>k = {k}</h3>")
    return page[start:page.index("</table>", start)]


def test_format_cell():
    assert format_cell(None) == "—"
    assert format_cell({"mean": 0.8124, "std": 0.0341, "n": 3}) == "0.812 ± 0.034"
    assert format_cell({"mean": 0.8124, "std": 0.0, "n": 1}) == "0.812"


def test_report_content(tmp_path):
    fig = _png(tmp_path / "dice_vs_k.png")
    out = write_report_html(tmp_path / "rep" / "report.html", _summary(), title="Phantom <benchmark>",
                            config={"k": [1, 5], "note": "a&b"}, figures=[("Dice vs k", fig)],
                            notes=["synthetic phantom", "x < y"])
    assert out == tmp_path / "rep" / "report.html"
    raw = out.read_text(encoding="ascii")  # pure ASCII: non-ASCII as character references
    page = html.unescape(raw)

    assert page.startswith("<!DOCTYPE html>")
    assert "Phantom &lt;benchmark&gt;" in raw and "x &lt; y" in raw
    assert "<script>" not in raw  # the method name is escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw

    k1, k5 = _block(page, 1), _block(page, 5)
    assert "0.812 ± 0.034" in k1
    assert "<b>0.900</b>" in k1  # single seed: no std; best liver at k=1
    assert "<b>0.300 ± 0.034</b>" in k1  # only value in its column
    assert "0.812 ± 0.034</b>" not in k1
    assert "—" in k1  # None cells and the missing k=5 cells
    assert "<b>0.920 ± 0.034</b>" in k5 and "<b>0.810 ± 0.034</b>" in k5
    assert "<b>0.850" not in k5
    # row order follows summary["methods"]
    assert k5.index("generalization") < k5.index(">lp<") < k5.index("alert(1)")

    assert "1,230,637" in page and ">13<" in page and "3.2" in page
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', raw)
    assert m and base64.b64decode(m.group(1)) == fig.read_bytes()
    assert "Dice vs k" in page
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', raw, re.I)
    assert "http" not in raw
    assert '"note": "a&amp;b"' in raw  # config in a <pre>, escaped
    # the configuration is folded away: a closed <details> after its heading holds the <pre>
    config = raw[raw.index("<h2>Configuration</h2>"):]
    m = re.search(r"<details>\s*<summary>(.*?)</summary>\s*<pre>(.*?)</pre>\s*</details>", config, re.S)
    assert m and "Configuration" in m.group(1) and '"note": "a&amp;b"' in m.group(2)
    assert "<details open" not in raw and raw.count("<pre>") == 1
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def test_hd95_lower_is_better(tmp_path):
    s = _summary("hd95")
    out = write_report_html(tmp_path / "r.html", s, title="t", config={})
    k5 = _block(html.unescape(out.read_text()), 5)
    assert "<b>0.675 ± 0.034</b>" in k5 and "<b>0.850 ± 0.034</b>" in k5


def test_missing_figure(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputFileError, match="nope.png"):
        write_report_html(tmp_path / "r.html", _summary(), title="t", config={},
                          figures=[("ok", _png(tmp_path / "ok.png")), ("gone", missing)])
    assert not (tmp_path / "r.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]
