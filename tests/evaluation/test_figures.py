import numpy as np
import pytest

from fseft.errors import ConfigError
from fseft.evaluation.figures import OverlayPanel, choose_axial_slice, plot_dice_vs_k, plot_overlays

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
