"""Figures of a benchmark: Dice against the number of support volumes (the FSEFT paper's
Fig. 2a) and axial overlays of ground truth and predictions (its Fig. 3).

Both functions write one PNG atomically (`fseft.utils.atomic_path`) with matplotlib's Agg
backend, so they work without a display. The summary dict is the one
`fseft.evaluation.tables.summarize` produces (see that module).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fseft.errors import ConfigError
from fseft.evaluation.tables import cell_at
from fseft.utils import atomic_path

DPI = 120
GT_COLOUR = "#00d000"  # green
PRED_COLOUR = "#ff2020"  # red
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_METRIC_NAMES = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)"}


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
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
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot_dice_vs_k(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Mean metric (Dice for a Dice summary) against k, one subplot per structure and a last
    one for the mean over structures; one line per method (same colour and marker in every
    subplot), error bars = std over seeds where a cell has n > 1. None cells are skipped
    (the line breaks there). x: the ks of the summary at evenly spaced positions.

    Writes one PNG atomically and returns `path`.
    """
    _check_summary(summary)
    plt = _pyplot()
    from matplotlib.lines import Line2D

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
            means = np.full(len(ks), np.nan)
            stds = np.zeros(len(ks))
            for t, k in enumerate(ks):
                cell = cell_at(summary, method, k, column)
                if cell is None or cell.get("mean") is None or not math.isfinite(float(cell["mean"])):
                    continue
                means[t] = float(cell["mean"])
                if int(cell.get("n", 1)) > 1 and cell.get("std") is not None:
                    stds[t] = float(cell["std"])
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
    return _save(fig, path)


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
    the ground-truth contour in green and the prediction contour in red.

    Display convention: radiological, as a CT viewer shows an axial slice seen from the feet:
    anterior at the top, the patient's right on the image's left. For an RAS ``(X, Y, Z)``
    array that is ``image[:, :, z].T`` with both axes reversed. Pixels keep their physical
    aspect ratio (``spacing[1] / spacing[0]``).

    Each panel shows ``choose_axial_slice(panel.label, panel.prediction)`` (the middle slice
    without masks) unless `slice_index` is given. Empty masks draw no contour.
    Writes one PNG atomically and returns `path`.
    """
    if not panels:
        raise ConfigError("plot_overlays needs at least one panel")
    if columns < 1:
        raise ConfigError(f"columns must be at least 1, got {columns}")
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if not hi > lo:
        raise ConfigError(f"hu_window must be (low, high) with low < high, got {hu_window}")
    for panel in panels:
        _check_panel(panel)
        if slice_index is not None and not 0 <= slice_index < np.shape(panel.image)[2]:
            raise ConfigError(f"panel {panel.title!r}: slice_index {slice_index} outside 0..{np.shape(panel.image)[2] - 1}")

    plt = _pyplot()
    from matplotlib.lines import Line2D

    n_cols = min(columns, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 3.4 * n_rows + 0.5),
                             squeeze=False, layout="constrained")
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
        ax.set_title(f"{panel.title} (z={z})", fontsize=9)
        ax.axis("off")
    for i in range(len(panels), n_rows * n_cols):
        axes[i // n_cols][i % n_cols].axis("off")

    handles = [Line2D([], [], color=GT_COLOUR, linewidth=2, label="ground truth"),
               Line2D([], [], color=PRED_COLOUR, linewidth=2, label="prediction")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False,
               title="green: ground truth, red: prediction (radiological view: patient's right on the left)",
               title_fontsize=8, fontsize=8)
    return _save(fig, path)
