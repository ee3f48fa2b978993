"""A benchmark's results as one static, self-contained HTML page.

The page opens offline and can be mailed as a single file: inline CSS, no scripts, no
external fonts, figures embedded as ``data:`` URIs. The results tables follow the FSEFT
paper's Table 1: one block per k, methods as rows, structures then "mean" as columns,
``mean ± std`` over seeds (the spread only over several seeds), the best value of each column
in bold. The summary dict is the one `fseft.evaluation.tables.summarize` produces.

All text is escaped (`html.escape`); the page is written as ASCII (other characters as
numeric character references), so it reads the same whatever encoding a viewer assumes.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fseft.errors import ConfigError, InputFileError
from fseft.evaluation.tables import cell_at, format_cell
from fseft.utils import write_text

DIGITS = 3
LOWER_IS_BETTER = frozenset({"hd95"})
_METRIC_NAMES = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)"}
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".svg": "image/svg+xml", ".webp": "image/webp"}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
.generated { color: #666; font-size: 0.9em; margin-top: 0; }
table { border-collapse: collapse; margin: 0.4em 0 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.7em; }
th { background: #e8ecf1; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.method { font-weight: 600; }
tbody tr:nth-child(even) { background: #f6f7f9; }
figure { margin: 1em 0 2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; font-size: 0.92em; margin-top: 0.3em; }
pre { background: #f6f7f9; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.caption { color: #555; font-size: 0.9em; }
summary { cursor: pointer; color: #444; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _best(values: Sequence[float | None], lower_is_better: bool) -> float | None:
    """The best of `values` as displayed (rounded), None when there is none."""
    shown = [round(v, DIGITS) for v in values if v is not None]
    if not shown:
        return None
    return min(shown) if lower_is_better else max(shown)


def _results_html(summary: Mapping[str, Any]) -> list[str]:
    metric = str(summary.get("metric", "dice"))
    lower = metric in LOWER_IS_BETTER
    methods = list(summary["methods"])
    columns = [*summary["structures"], "mean"]
    name = _METRIC_NAMES.get(metric, metric)
    out = [f'<p class="caption">Mean {_e(name)} over the query cases; mean &plusmn; std over seeds '
           f'(the std only with several seeds); best per column and k in bold '
           f'({"lower" if lower else "higher"} is better); &mdash; = no result.</p>']
    for k in summary["ks"]:
        out.append(f"<h3>k = {_e(k)}</h3>")
        out.append("<table>")
        out.append("<thead><tr><th>method</th>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr></thead>")
        grid = {(m, c): cell_at(summary, m, k, c) for m in methods for c in columns}
        best = {c: _best([None if grid[m, c] is None else float(grid[m, c]["mean"]) for m in methods], lower)
                for c in columns}
        out.append("<tbody>")
        for m in methods:
            cells = []
            for c in columns:
                cell = grid[m, c]
                text = _e(format_cell(cell))
                if cell is not None and best[c] is not None and round(float(cell["mean"]), DIGITS) == best[c]:
                    text = f"<b>{text}</b>"
                cells.append(f'<td class="num">{text}</td>')
            out.append(f'<tr><td class="method">{_e(m)}</td>' + "".join(cells) + "</tr>")
        out.append("</tbody></table>")
    return out


def _params_html(summary: Mapping[str, Any]) -> list[str]:
    params = summary.get("trainable_params") or {}
    seconds = summary.get("train_seconds") or {}
    out = ["<table>", "<thead><tr><th>method</th><th>trainable parameters</th>"
           "<th>train time (s, mean)</th></tr></thead>", "<tbody>"]
    for m in summary["methods"]:
        count = params.get(m)
        secs = seconds.get(m)
        count_text = "—" if count is None else f"{int(count):,}"
        secs_text = "—" if secs is None or not math.isfinite(float(secs)) else f"{float(secs):,.1f}"
        out.append(f'<tr><td class="method">{_e(m)}</td><td class="num">{_e(count_text)}</td>'
                   f'<td class="num">{_e(secs_text)}</td></tr>')
    out.append("</tbody></table>")
    return out


def _data_uri(path: str | os.PathLike) -> str:
    path = Path(path)
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise InputFileError(f"{path}: not an image the report can embed (expected {', '.join(sorted(_MIME))})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the figure ({exc.strerror or exc})") from exc
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def write_report_html(
    path: str | os.PathLike,
    summary: Mapping[str, Any],
    *,
    title: str,
    config: Mapping[str, Any],
    figures: Sequence[tuple[str, str | os.PathLike]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write the benchmark report page and return `path`.

    Sections: title and generation time, `notes` (a list), "Results" (one Table-1 block per
    k), "Trainable parameters" (count and mean training seconds per method), "Figures"
    (`figures`: ``(caption, image file)`` pairs, embedded as base64 data URIs) and
    "Configuration" (`config` as indented JSON, folded away in a ``<details>`` element that a
    click opens). A figure file that cannot be read raises `InputFileError` naming it, before
    anything is written. Written atomically.
    """
    for key in ("methods", "structures", "ks", "cells"):
        if key not in summary:
            raise ConfigError(f"benchmark summary lacks the key {key!r}")
    embedded = [(str(caption), _data_uri(file)) for caption, file in figures]  # all read first
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()

    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             f"<h1>{_e(title)}</h1>", f'<p class="generated">Generated {_e(generated)}</p>']
    if notes:
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Results</h2>")
    parts += _results_html(summary)
    parts.append("<h2>Trainable parameters</h2>")
    parts += _params_html(summary)
    if embedded:
        parts.append("<h2>Figures</h2>")
        for caption, uri in embedded:
            parts.append(f'<figure><img src="{uri}" alt="{_e(caption)}">'
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
    parts.append("<h2>Configuration</h2>")
    config_text = json.dumps(config, indent=2, default=str, ensure_ascii=False)
    parts.append("<details><summary>Configuration (the experiment as run, JSON)</summary>"
                 f"<pre>{html.escape(config_text, quote=False)}</pre></details>")  # readable JSON quotes
    parts += ["</body>", "</html>", ""]
    page = "\n".join(parts).encode("ascii", "xmlcharrefreplace").decode("ascii")
    write_text(path, page)
    return Path(path)
