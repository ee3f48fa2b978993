import numpy as np
import pytest

from fseft.errors import ConfigError
from fseft.evaluation.figures import (
    DPI,
    PAGE_WIDTH_IN,
    OverlayPanel,
    choose_axial_slice,
    dice_figure,
    overlay_figure,
    plot_dice_vs_k,
    plot_overlay_sections,
    plot_overlays,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary():
    def c(mean, std=0.02, n=3):
        return {"mean": mean, "std": std, "n": n}

    return {
        "metric": "dice",
        "methods": ["generalization", "lp", "lora+dec"],
        "structures": ["liver", "gallbladder"],
        "ks": [1, 5],
        "cells": {
            "generalization": {"1": {"liver": c(0.9, 0.0, 1), "gallbladder": None, "mean": None},
                               "5": {"liver": c(0.9, 0.0, 1), "gallbladder": None, "mean": None}},
            "lp": {"1": {"liver": c(0.8), "gallbladder": c(0.3), "mean": c(0.55)},
                   "5": {"liver": c(0.85), "gallbladder": c(0.5), "mean": c(0.67)}},
            "lora+dec": {"5": {"liver": c(0.92), "gallbladder": c(0.7), "mean": c(0.81)}},  # no k=1
        },
        "trainable_params": {"lp": 13},
        "train_seconds": {},
    }


def _sphere(shape=(20, 20, 8), centre=(10, 10, 5), radius=4.0, spacing=(1.0, 1.0, 2.5)):
    grid = np.indices(shape).astype(float)
    d2 = sum(((grid[i] - centre[i]) * spacing[i]) ** 2 for i in range(3))
    return d2 <= radius ** 2


def _image(shape=(20, 20, 8)):
    img = np.full(shape, -1000.0, np.float32)
    img[2:18, 2:18, :] = 40.0
    return img


def _read_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    return mpimg.imread(path)


def _green(rgb):
    return int(((rgb[..., 1] > 0.5) & (rgb[..., 0] < 0.35) & (rgb[..., 2] < 0.35)).sum())


def _red(rgb):
    return int(((rgb[..., 0] > 0.6) & (rgb[..., 1] < 0.35) & (rgb[..., 2] < 0.35)).sum())


def test_dice_vs_k_png(tmp_path):
    out = plot_dice_vs_k(_summary(), tmp_path / "fig" / "dice_vs_k.png")
    assert out == tmp_path / "fig" / "dice_vs_k.png"
    rgb = _read_png(out)
    assert rgb.ndim == 3 and rgb.shape[0] > 200 and rgb.shape[1] > 400
    assert rgb[..., :3].std() > 0.05  # not blank
    assert [p.name for p in out.parent.iterdir()] == ["dice_vs_k.png"]  # no temporary left


def test_dice_vs_k_all_none_method_and_bad_summary(tmp_path):
    s = _summary()
    s["cells"]["generalization"] = {}
    s["methods"].append("missing-method")
    plot_dice_vs_k(s, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000
    with pytest.raises(ConfigError):
        plot_dice_vs_k({"methods": [], "structures": [], "ks": [], "cells": {}}, tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()


def _single_k(summary, k=5):
    summary["ks"] = [k]
    return summary


def test_several_ks_draw_lines_against_k():
    import matplotlib.pyplot as plt

    fig = dice_figure(_summary())
    try:
        axes = [ax for ax in fig.axes if ax.axison]
        assert len(axes) == 3  # liver, gallbladder, mean
        assert all(not ax.containers or all(type(c).__name__ == "ErrorbarContainer" for c in ax.containers)
                   for ax in axes)
        assert [t.get_text() for t in axes[0].get_xticklabels()] == ["1", "5"]
    finally:
        plt.close(fig)


def test_single_k_draws_grouped_bars():
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    s = _single_k(_summary())
    fig = dice_figure(s)
    try:
        assert fig.get_size_inches()[0] == pytest.approx(PAGE_WIDTH_IN)  # shown 1:1 at page width
        (ax,) = fig.axes
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert [c.get_label() for c in bars] == s["methods"]  # one bar series per method
        assert all(len(c) == 3 for c in bars)  # one bar per structure and the mean
        assert [t.get_text() for t in ax.get_xticklabels()] == ["liver", "gallbladder", "mean over structures"]
        heights = {c.get_label(): [round(p.get_height(), 6) for p in c] for c in bars}
        assert heights["lp"] == [0.85, 0.5, 0.67]
        assert heights["lora+dec"] == [0.92, 0.7, 0.81]
        assert heights["generalization"] == [0.9, 0.0, 0.0]  # missing cells: no bar ...
        assert sum(t.get_text() == "n/a" for t in ax.texts) == 2  # ... and "n/a" at their foot
        # the seed spread as error bars (cells with n > 1): lp and lora+dec, not generalization
        assert bars[0].errorbar is None
        assert bars[1].errorbar is not None and bars[2].errorbar is not None
        assert "k = 5" in ax.get_title() and "error bars" in ax.get_title()
        # bars of one structure sit side by side within its group
        liver_x = sorted(c[0].get_x() for c in bars)
        assert liver_x[-1] + bars[0][0].get_width() < 0.5 and liver_x[0] > -0.5
    finally:
        plt.close(fig)


def test_single_k_single_seed_has_no_error_bars(tmp_path):
    import matplotlib.pyplot as plt

    s = _single_k(_summary(), k=1)
    for cells in s["cells"].values():
        for row in cells.values():
            for cell in row.values():
                if cell is not None:
                    cell.update(std=0.0, n=1)
    fig = dice_figure(s)
    try:
        (ax,) = fig.axes
        assert all(c.errorbar is None for c in ax.containers)
        assert "error bars" not in ax.get_title() and "k = 1" in ax.get_title()
    finally:
        plt.close(fig)
    rgb = _read_png(plot_dice_vs_k(s, tmp_path / "dice_vs_k.png"))
    assert rgb.shape[1] == round(PAGE_WIDTH_IN * DPI)


def test_choose_axial_slice():
    label = np.zeros((6, 6, 5), bool)
    label[1:3, 1:3, 1] = True
    label[0:5, 0:5, 3] = True
    assert choose_axial_slice(label) == 3
    pred = np.zeros_like(label)
    pred[:, :, 4] = True
    assert choose_axial_slice(label, pred) == 3  # ground truth wins
    assert choose_axial_slice(np.zeros_like(label), pred) == 4
    assert choose_axial_slice(None, pred) == 4
    assert choose_axial_slice(np.zeros_like(label), np.zeros_like(label)) == 2
    assert choose_axial_slice(np.zeros((4, 4, 7), bool)) == 3
    with pytest.raises(ConfigError):
        choose_axial_slice(None, None)


def test_radiological_orientation():
    from fseft.evaluation.figures import _radiological

    plane = np.zeros((4, 3))  # (X, Y)
    plane[3, 2] = 1  # most right (x max), most anterior (y max)
    shown = _radiological(plane)
    assert shown.shape == (3, 4)
    assert shown[0, 0] == 1  # top-left of the image: anterior, patient's right


def test_overlays_contours(tmp_path):
    label = _sphere()
    pred = _sphere(centre=(11, 9, 5))
    image = _image()
    panels = [
        OverlayPanel("support phantom_003 (liver)", image, label, None, (1.0, 1.0, 2.5)),
        OverlayPanel("query phantom_005: lp k=1", image, label, pred, (1.0, 1.0, 2.5)),
    ]
    out = plot_overlays(panels, tmp_path / "overlays.png")
    rgb = _read_png(out)[..., :3]
    assert rgb.shape[0] > 100 and rgb.shape[1] > 200

    bare = plot_overlays([OverlayPanel("no masks", image, None, None, (1.0, 1.0, 2.5)),
                          OverlayPanel("empty", image, np.zeros_like(label), np.zeros_like(label),
                                       (1.0, 1.0, 2.5))], tmp_path / "bare.png")
    bare_rgb = _read_png(bare)[..., :3]
    # legend lines are the only coloured pixels without masks; contours add many more
    assert _green(rgb) > _green(bare_rgb) + 50
    assert _red(rgb) > _red(bare_rgb) + 30


def test_overlays_anisotropic_slice_index_and_errors(tmp_path):
    label = _sphere()
    image = _image()
    out = plot_overlays([OverlayPanel("aniso", image, label, label, (0.7, 1.4, 3.0))] * 5,
                        tmp_path / "o.png", columns=2, slice_index=0, hu_window=(-100, 100))
    assert _read_png(out).shape[0] > 100
    with pytest.raises(ConfigError, match="slice_index"):
        plot_overlays([OverlayPanel("x", image, label, None, (1, 1, 1))], tmp_path / "e.png", slice_index=8)
    with pytest.raises(ConfigError, match="shape"):
        plot_overlays([OverlayPanel("x", image, label[:, :, :4], None, (1, 1, 1))], tmp_path / "e.png")
    with pytest.raises(ConfigError):
        plot_overlays([], tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


def test_overlay_sections_legible_at_page_width(tmp_path):
    import matplotlib.pyplot as plt

    label, image = _sphere(), _image()
    sp = (1.0, 1.0, 2.5)
    methods = ["generalization", "lp", "spatial-adapter", "spatial-adapter+ti", "decoder", "lora+dec"]
    sections = [(structure, [OverlayPanel("support phantom_003", image, label, None, sp)]
                 + [OverlayPanel(f"phantom_005: {m}", image, label, label, sp) for m in methods])
                for structure in ("liver", "gallbladder")]
    fig = overlay_figure(sections)
    try:
        assert fig.get_size_inches()[0] == pytest.approx(PAGE_WIDTH_IN)  # four panels a row
        assert [sf.get_suptitle() for sf in fig.subfigs] == ["liver", "gallbladder"]
        for sf in fig.subfigs:
            shown = [ax for ax in sf.axes if ax.images]
            assert len(shown) == 7  # 2 rows of 4, the last cell empty
            titles = [ax.title for ax in shown]
            assert all(t.get_fontsize() >= 10 for t in titles)
            assert all(max(map(len, t.get_text().splitlines())) <= 30 for t in titles)  # wrapped to the panel
        assert "spatial-adapter+ti" in fig.subfigs[0].axes[4].get_title()
    finally:
        plt.close(fig)
    out = plot_overlay_sections(sections, tmp_path / "overlays.png")
    assert _read_png(out).shape[1] == round(PAGE_WIDTH_IN * DPI)
    with pytest.raises(ConfigError):
        plot_overlay_sections([("liver", [])], tmp_path / "e.png")
