"""Figures of a benchmark: Dice against the number of support volumes (the FSEFT paper's
Fig. 2a; a grouped bar chart when the experiment has a single k) and axial overlays of ground
truth and predictions (its Fig. 3).

The plotting functions write one PNG atomically (`fseft.utils.atomic_path`) with matplotlib's
Agg backend, so they work without a display. The summary dict is the one
`fseft.evaluation.tables.summarize` produces (see that module).

Sizes: figures meant for the report are `PAGE_WIDTH_IN` inches wide at `DPI` (about 1100
pixels, the report page's width), so they show at their own size, and their text at its
point size, in a browser at page width.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fseft.errors import ConfigError
from fseft.evaluation.tables import cell_at
from fseft.utils import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
PAGE_WIDTH_IN = 9.2  # inches: 1104 pixels at DPI, the report page's width
PANEL_IN = PAGE_WIDTH_IN / 4  # an overlay panel's width: four per row at page width
GT_COLOUR = "#00d000"  # green
PRED_COLOUR = "#ff2020"  # red
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_METRIC_NAMES = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)"}


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    # matplotlib only when a figure is drawn (~0.7 s): `fseft --help` imports this module through
    # the experiment grid. pyplot after the backend is chosen: importing it picks one.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------- Dice vs k


def _check_summary(summary: Mapping[str, Any]) -> None:
    for key in ("methods", "structures", "ks", "cells"):
        if key not in summary:
            raise ConfigError(f"benchmark summary lacks the key {key!r}")
    if not summary["methods"] or not summary["ks"]:
        raise ConfigError("benchmark summary has no methods or no k values to plot")


def method_colours(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method (tab10, tab20 beyond ten methods), in `methods` order."""
    import matplotlib  # only when a figure is drawn, as in _pyplot

    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _cell_value(summary: Mapping[str, Any], method: str, k: int, column: str) -> tuple[float, float]:
    """(mean, std) of one cell: mean NaN for a missing cell, std 0 unless the cell has n > 1."""
    cell = cell_at(summary, method, k, column)
    if cell is None or cell.get("mean") is None or not math.isfinite(float(cell["mean"])):
        return math.nan, 0.0
    std = float(cell["std"]) if int(cell.get("n", 1)) > 1 and cell.get("std") is not None else 0.0
    return float(cell["mean"]), std


def dice_figure(summary: Mapping[str, Any]) -> Any:
    """The matplotlib figure `plot_dice_vs_k` saves (the caller closes it): with several ks a
    line plot against k, with a single k a grouped bar chart (see `plot_dice_vs_k`)."""
    _check_summary(summary)
    if len(summary["ks"]) == 1:
        return _bar_figure(summary)
    return _line_figure(summary)


def plot_dice_vs_k(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """The benchmark's metric figure (Dice for a Dice summary), written as one PNG atomically;
    returns `path`. Means over seeds; error bars = std over seeds where a cell has n > 1; None
    cells are left out. One colour (and marker) per method throughout.

    Several ks: mean metric against k, one subplot per structure and a last one for the mean
    over structures; one line per method (the line breaks at a missing cell). x: the ks of the
    summary at evenly spaced positions.

    A single k (a line plot of single points says little): one grouped bar chart at page width,
    one group per structure and a last one for the mean over structures, one bar per method in
    each group (a missing cell: no bar, "n/a" at its foot).
    """
    return _save(dice_figure(summary), path)


def _line_figure(summary: Mapping[str, Any]) -> Any:
    plt = _pyplot()
    from matplotlib.lines import Line2D  # only when a figure is drawn, as in _pyplot

    methods = list(summary["methods"])
    ks = [int(k) for k in summary["ks"]]
    columns = [*summary["structures"], "mean"]
    metric = str(summary.get("metric", "dice"))
    metric_name = _METRIC_NAMES.get(metric, metric)
    bounded = metric in ("dice", "nsd")

    n_cols = min(len(columns), 4)
    n_rows = math.ceil(len(columns) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols, 3.0 * n_rows + 1.0),
                             squeeze=False, layout="constrained")
    colours = method_colours(methods)
    x = np.arange(len(ks), dtype=float)
    width = 0.25 if len(methods) > 1 else 0.0  # dodge the methods so error bars do not overlap
    offsets = np.linspace(-width / 2, width / 2, len(methods)) if len(methods) > 1 else [0.0]

    for i, column in enumerate(columns):
        ax = axes[i // n_cols][i % n_cols]
        for j, method in enumerate(methods):
            values = [_cell_value(summary, method, k, column) for k in ks]
            means = np.array([v[0] for v in values])
            stds = np.array([v[1] for v in values])
            if np.isnan(means).all():
                continue
            ax.errorbar(x + offsets[j], means, yerr=stds if stds.any() else None, color=colours[method],
                        marker=_MARKERS[j % len(_MARKERS)], markersize=5, linewidth=1.5, capsize=3)
        ax.set_title("mean over structures" if column == "mean" else column, fontsize=10)
        ax.set_xticks(x, [str(k) for k in ks])
        ax.set_xlim(-0.5, len(ks) - 0.5)
        ax.set_xlabel("k (support volumes)")
        if i % n_cols == 0:
            ax.set_ylabel(f"mean {metric_name}")
        if bounded:
            ax.set_ylim(0.0, 1.0)
        ax.grid(True, alpha=0.3)
    for i in range(len(columns), n_rows * n_cols):
        axes[i // n_cols][i % n_cols].axis("off")

    handles = [Line2D([], [], color=colours[m], marker=_MARKERS[j % len(_MARKERS)], label=m)
               for j, m in enumerate(methods)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(methods), 5), frameon=False)
    fig.suptitle(f"Mean {metric_name} vs number of support volumes k")
    return fig


def _bar_figure(summary: Mapping[str, Any]) -> Any:
    plt = _pyplot()

    methods = list(summary["methods"])
    k = int(summary["ks"][0])
    columns = [*summary["structures"], "mean"]
    metric = str(summary.get("metric", "dice"))
    metric_name = _METRIC_NAMES.get(metric, metric)
    bounded = metric in ("dice", "nsd")

    fig, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 4.6), layout="constrained")
    colours = method_colours(methods)
    x = np.arange(len(columns), dtype=float)
    width = 0.8 / len(methods)  # the bars of a group fill 80% of its slot
    top = 1.0
    for j, method in enumerate(methods):
        values = [_cell_value(summary, method, k, column) for column in columns]
        means = np.array([v[0] for v in values])
        stds = np.array([v[1] for v in values])
        positions = x + (j - (len(methods) - 1) / 2) * width
        ax.bar(positions, np.nan_to_num(means, nan=0.0), width * 0.92, color=colours[method], label=method,
               yerr=np.where(np.isnan(means), 0.0, stds) if stds.any() else None,
               error_kw={"capsize": 3, "elinewidth": 1.2, "ecolor": "#333"})
        for pos, mean in zip(positions, means):
            if math.isnan(mean):
                ax.text(pos, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=8, color="#555")
        finite = means[~np.isnan(means)] + stds[~np.isnan(means)]
        top = max(top, float(finite.max(initial=0.0)))
    ax.set_xticks(x, ["mean over structures" if c == "mean" else c for c in columns], fontsize=11)
    ax.tick_params(axis="y", labelsize=10)
    ax.set_xlim(-0.5, len(columns) - 0.5)
    ax.set_ylabel(f"mean {metric_name}", fontsize=11)
    if bounded:
        ax.set_ylim(0.0, max(1.0, top))
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside lower center", ncol=min(len(methods), 6), frameon=False, fontsize=10)
    spread = "; error bars: std over seeds" if any(
        _cell_value(summary, m, k, c)[1] for m in methods for c in columns) else ""
    ax.set_title(f"Mean {metric_name} per structure and method at k = {k} (mean over seeds{spread})", fontsize=12)
    return fig


# ---------------------------------------------------------------------------- overlays


@dataclass
class OverlayPanel:
    """One panel of `plot_overlays`: an axial slice of a CT with its masks' contours.

    Arrays are ``(X, Y, Z)`` in RAS voxel order (nibabel canonical, e.g. after
    ``nibabel.as_closest_canonical``): x increases towards the patient's Right, y towards
    Anterior, z towards Superior.
    """

    title: str  # e.g. "support phantom_003 (liver)" or "query phantom_005: lp k=1"
    image: np.ndarray  # (X, Y, Z) CT in HU, float
    label: np.ndarray | None  # (X, Y, Z) bool ground truth, or None
    prediction: np.ndarray | None  # (X, Y, Z) bool prediction, or None
    spacing: tuple[float, float, float]  # mm per voxel along X, Y, Z


def choose_axial_slice(label: np.ndarray | None, prediction: np.ndarray | None = None) -> int:
    """The z index (last axis of an ``(X, Y, Z)`` mask) with the largest ground-truth area;
    without any ground truth, the one with the largest predicted area; with both empty, the
    middle slice ``Z // 2``. Ties: the lowest index. Both None: `ConfigError`."""
    for mask in (label, prediction):
        if mask is not None:
            if np.ndim(mask) != 3:
                raise ConfigError(f"a mask must be (X, Y, Z), got shape {np.shape(mask)}")
            area = np.asarray(mask).astype(bool).sum(axis=(0, 1))
            if area.max(initial=0) > 0:
                return int(np.argmax(area))
    shaped = label if label is not None else prediction
    if shaped is None:
        raise ConfigError("choose_axial_slice needs a label or a prediction")
    return int(np.shape(shaped)[2] // 2)


def _radiological(plane: np.ndarray) -> np.ndarray:
    """An ``(X, Y)`` RAS plane as a displayed image: rows = anterior (top) to posterior,
    columns = the patient's right (left of the image) to the patient's left."""
    return np.asarray(plane)[::-1, ::-1].T


def _check_panel(panel: OverlayPanel) -> None:
    if np.ndim(panel.image) != 3:
        raise ConfigError(f"panel {panel.title!r}: the image must be (X, Y, Z), got shape {np.shape(panel.image)}")
    for what, mask in (("label", panel.label), ("prediction", panel.prediction)):
        if mask is not None and np.shape(mask) != np.shape(panel.image):
            raise ConfigError(f"panel {panel.title!r}: {what} shape {np.shape(mask)} differs from the "
                              f"image shape {np.shape(panel.image)}")
    if len(panel.spacing) != 3 or not all(float(s) > 0 for s in panel.spacing):
        raise ConfigError(f"panel {panel.title!r}: spacing must be three positive numbers, got {panel.spacing}")


def plot_overlays(
    panels: Sequence[OverlayPanel],
    path: str | os.PathLike,
    *,
    columns: int = 4,
    slice_index: int | None = None,
    hu_window: tuple[float, float] = (-175.0, 250.0),
) -> Path:
    """A grid of axial slices (the FSEFT paper's Fig. 3): the CT in grey within `hu_window`,
    the ground-truth contour in green and the prediction contour in red; `columns` panels per
    row, each `PANEL_IN` inches wide (four fill the report's page width at `DPI`), titles at
    10 points, wrapped to the panel's width.

    Display convention: radiological, as a CT viewer shows an axial slice seen from the feet:
    anterior at the top, the patient's right on the image's left. For an RAS ``(X, Y, Z)``
    array that is ``image[:, :, z].T`` with both axes reversed. Pixels keep their physical
    aspect ratio (``spacing[1] / spacing[0]``).

    Each panel shows ``choose_axial_slice(panel.label, panel.prediction)`` (the middle slice
    without masks) unless `slice_index` is given. Empty masks draw no contour.
    Writes one PNG atomically and returns `path`.
    """
    return plot_overlay_sections([("", panels)], path, columns=columns, slice_index=slice_index,
                                 hu_window=hu_window)


def plot_overlay_sections(
    sections: Sequence[tuple[str, Sequence[OverlayPanel]]],
    path: str | os.PathLike,
    *,
    columns: int = 4,
    slice_index: int | None = None,
    hu_window: tuple[float, float] = (-175.0, 250.0),
) -> Path:
    """`plot_overlays` in sections, one PNG: each ``(heading, panels)`` starts a new row under
    its heading (12 points, bold; none when empty), its panels wrapped at `columns` per row.
    A benchmark draws one section per structure. Writes one PNG atomically, returns `path`."""
    return _save(overlay_figure(sections, columns=columns, slice_index=slice_index, hu_window=hu_window), path)


def overlay_figure(
    sections: Sequence[tuple[str, Sequence[OverlayPanel]]],
    *,
    columns: int = 4,
    slice_index: int | None = None,
    hu_window: tuple[float, float] = (-175.0, 250.0),
) -> Any:
    """The matplotlib figure `plot_overlay_sections` saves (the caller closes it)."""
    sections = [(str(heading), list(panels)) for heading, panels in sections]
    all_panels = [panel for _, panels in sections for panel in panels]
    if not all_panels or any(not panels for _, panels in sections):
        raise ConfigError("plot_overlays needs at least one panel (in every section)")
    if columns < 1:
        raise ConfigError(f"columns must be at least 1, got {columns}")
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if not hi > lo:
        raise ConfigError(f"hu_window must be (low, high) with low < high, got {hu_window}")
    for panel in all_panels:
        _check_panel(panel)
        if slice_index is not None and not 0 <= slice_index < np.shape(panel.image)[2]:
            raise ConfigError(f"panel {panel.title!r}: slice_index {slice_index} outside 0..{np.shape(panel.image)[2] - 1}")

    plt = _pyplot()
    from matplotlib.lines import Line2D  # only when a figure is drawn, as in _pyplot

    n_cols = min(columns, max(len(panels) for _, panels in sections))
    rows = [math.ceil(len(panels) / n_cols) for _, panels in sections]
    row_in = PANEL_IN + 0.6  # the image and a two-line title
    heading_in = [0.4 if heading else 0.0 for heading, _ in sections]
    heights = [r * row_in + h for r, h in zip(rows, heading_in)]
    fig = plt.figure(figsize=(PANEL_IN * n_cols, sum(heights) + 0.7), layout="constrained")
    subfigs = fig.subfigures(len(sections), 1, height_ratios=heights, squeeze=False)[:, 0]
    wrap = max(12, int(PANEL_IN * 72 / 5.8))  # characters per title line at 10 points
    for subfig, (heading, panels), n_rows in zip(subfigs, sections, rows):
        if heading:
            subfig.suptitle(heading, fontsize=12, fontweight="bold")
        axes = subfig.subplots(n_rows, n_cols, squeeze=False)
        for i, panel in enumerate(panels):
            ax = axes[i // n_cols][i % n_cols]
            image = np.asarray(panel.image, dtype=np.float32)
            if slice_index is not None:
                z = slice_index
            elif panel.label is None and panel.prediction is None:
                z = image.shape[2] // 2
            else:
                z = choose_axial_slice(panel.label, panel.prediction)
            ax.imshow(_radiological(image[:, :, z]), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            for mask, colour in ((panel.label, GT_COLOUR), (panel.prediction, PRED_COLOUR)):
                if mask is None:
                    continue
                plane = _radiological(np.asarray(mask)[:, :, z].astype(bool)).astype(np.float32)
                if plane.any() and min(plane.shape) >= 2:
                    ax.contour(plane, levels=[0.5], colors=[colour], linewidths=1.5)
            ax.set_aspect(float(panel.spacing[1]) / float(panel.spacing[0]))
            ax.set_title(textwrap.fill(f"{panel.title} (z={z})", wrap, break_on_hyphens=False,
                                       break_long_words=False), fontsize=10)
            ax.axis("off")
        for i in range(len(panels), n_rows * n_cols):
            axes[i // n_cols][i % n_cols].axis("off")

    handles = [Line2D([], [], color=GT_COLOUR, linewidth=2, label="ground truth"),
               Line2D([], [], color=PRED_COLOUR, linewidth=2, label="prediction")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False,
               title=textwrap.fill("green: ground truth, red: prediction (radiological view: "
                                   "patient's right on the left)", max(30, int(PANEL_IN * n_cols * 72 / 5.2))),
               title_fontsize=9, fontsize=9)
    return fig
