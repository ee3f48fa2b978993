"""`fseft adapt`: training on cached features, run folder, errors, reloading the adapted model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_feature_cache import tiny_model, write_tiny_dataset

from fseft.cli import main
from fseft.data.datasets import open_dataset
from fseft.data.structures import UnknownStructureError
from fseft.engine.adapt import (
    AdaptConfig,
    adapt,
    build_method_adapter,
    load_adapted_model,
    predict_cached,
    sample_patch_slices,
)
from fseft.errors import ConfigError
from fseft.models.base import SegmentationModel

SMALL = dict(patch_size=(16, 16, 16), roi_size=(16, 16, 16), patches_per_volume=2, progress=False)


class IntensityFeatures(SegmentationModel):
    """A 'foundation model' whose features are radial basis functions of the voxel intensity,
    centred on the tiny datasets' air, gallbladder, body and liver intensities: a linear probe
    on them can segment every structure."""

    arch = "intensity_test"

    def __init__(self, class_names=("liver", "spleen")):
        torch.manual_seed(0)
        super().__init__(class_names, feature_channels=4)
        self.preprocess = {"spacing": [3.0, 3.0, 3.0], "crop_foreground": False}
        # window (-175, 250) HU -> [0, 1]: air 0, gallbladder -20 HU, body 40 HU, liver 120 HU
        self.register_buffer("centres", torch.tensor([0.0, 155 / 425, 215 / 425, 295 / 425]).view(1, 4, 1, 1, 1))

    def features(self, x):
        return torch.exp(-(((x - self.centres) / 0.05) ** 2))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_cases=4)


def _cfg(tmp_path, **kw):
    return AdaptConfig(cache_dir=str(tmp_path / "cache"), **{**SMALL, **kw})


def test_lp_learns_a_new_structure_from_two_shots(data_root, tmp_path):
    cfg = _cfg(tmp_path, method="lp", epochs=20, lr=1e-1, patience=0)
    metrics = adapt(IntensityFeatures(), data_root, "liver,gallbladder", 2, 0, tmp_path / "run", cfg)
    assert metrics["trainable_params"] == 2 * (4 + 1)
    assert len(metrics["queries"]) == 2
    assert metrics["mean"]["liver"]["dice"] > 0.9
    assert metrics["mean"]["gallbladder"]["dice"] > 0.9
    training = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["training"]
    assert training["losses"][-1] < 0.7 * training["losses"][0]


def test_generalization_uses_the_model_head_without_training(data_root, tmp_path):
    model = tiny_model(classes=("spleen", "liver"))
    metrics = adapt(model, data_root, "liver", 1, 0, tmp_path / "run", _cfg(tmp_path, method="generalization"))
    assert metrics["trainable_params"] == 0 and metrics["train_seconds"] == 0
    weights = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert torch.equal(weights["head.weight"][0], model.head.weight[1])
    assert set(metrics["queries"]) and set(metrics["mean"]["liver"]) == {"dice", "nsd", "hd95"}


def test_generalization_refuses_a_structure_the_model_does_not_know(data_root, tmp_path):
    with pytest.raises(UnknownStructureError, match="gallbladder.*lp or spatial-adapter"):
        adapt(tiny_model(), data_root, "gallbladder", 1, 0, tmp_path / "run", _cfg(tmp_path, method="generalization"))
    assert not (tmp_path / "run").exists()


def test_k_larger_than_the_labelled_cases_is_a_clear_error(data_root, tmp_path):
    with pytest.raises(ConfigError, match="k=9 support cases requested, but only 4"):
        adapt(tiny_model(), data_root, "liver", 9, 0, tmp_path / "run", _cfg(tmp_path))
    assert not (tmp_path / "run").exists()


def test_structure_unknown_to_the_dataset_is_a_clear_error(data_root, tmp_path):
    with pytest.raises(ConfigError, match="does not annotate pancreas"):
        adapt(tiny_model(), data_root, "pancreas", 1, 0, tmp_path / "run", _cfg(tmp_path))


def test_bad_method_options_fail_before_any_work(data_root, tmp_path):
    with pytest.raises(ConfigError, match="no option.*kernel_size"):
        adapt(tiny_model(), data_root, "liver", 1, 0, tmp_path / "run",
              _cfg(tmp_path, method="lp", method_options={"kernel_size": 1}))
    with pytest.raises(ConfigError, match="objective"):
        AdaptConfig(objective="softmax")


def test_patches_follow_the_positive_ratio():
    labels = np.zeros((30, 30, 30), bool)
    labels[2:5, 2:5, 2:5] = True
    fg, bg = np.flatnonzero(labels), np.flatnonzero(~labels)
    rng = np.random.RandomState(0)
    windows = sample_patch_slices(labels.shape, fg, bg, (8, 8, 8), 200, 1.0, rng)
    assert all(labels[w].any() for w in windows)
    assert all(tuple(s.stop - s.start for s in w) == (8, 8, 8) for w in windows)
    thin = labels[:6]
    small = sample_patch_slices(thin.shape, np.flatnonzero(thin), np.flatnonzero(~thin), (8, 8, 8), 3, 0.5, rng)
    assert all(w[0] == slice(0, 6) for w in small)  # smaller than the patch along x: whole axis


def test_transductive_constraint_only_in_the_last_half(data_root, tmp_path):
    cfg = _cfg(tmp_path, method="spatial-adapter", epochs=4, transductive=True, patience=0)
    adapt(tiny_model(), data_root, "liver", 2, 0, tmp_path / "run", cfg)
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["transductive"] == {"gamma": 0.1, "weight": 1.0, "start_fraction": 0.5}
    ti = saved["training"]["ti_losses"]
    assert ti[:2] == [0.0, 0.0] and all(v > 0 for v in ti[2:])  # random head: sizes far off


@pytest.mark.parametrize("method,objective", [("lp", "sigmoid"), ("spatial-adapter", "multiclass")])
def test_adapted_model_reproduces_the_cached_prediction(data_root, tmp_path, method, objective):
    from fseft.data.preprocessing import PreprocessConfig, preprocess
    from fseft.engine.feature_cache import FeatureCache
    from fseft.engine.inference import InferenceConfig, predict_probabilities
    from fseft.models.checkpoint import save_model_file

    model = tiny_model()
    model_file = save_model_file(model, tmp_path / "base.safetensors", preprocess=model.preprocess)
    cfg = _cfg(tmp_path, method=method, epochs=2, lr=1e-2, objective=objective)
    adapt(str(model_file), data_root, "liver,gallbladder", 2, 0, tmp_path / "run", cfg)

    adapted = load_adapted_model(tmp_path / "run")
    assert adapted.class_names == ("liver", "gallbladder")
    case = open_dataset(data_root).cases[0]
    image, _ = case.load(["liver"])
    pre = preprocess(image, None, PreprocessConfig.from_dict(model.preprocess))
    inf = InferenceConfig(roi_size=(16, 16, 16), progress=False)
    direct = predict_probabilities(adapted, pre.image[None], inf)[0]
    cached = FeatureCache(load_adapted_model(tmp_path / "run").base, adapted.preprocess, tmp_path / "cache", inf).load(case)
    from_cache = predict_cached(adapted.adapter, cached.features, objective == "multiclass")
    exact = adapted.predict_volume(pre.image[None], inf)[0]
    assert torch.allclose(exact, from_cache, atol=2e-3)  # fp16 cache rounding only
    if method == "lp":  # a linear adapter commutes with window blending
        assert torch.allclose(direct, from_cache, atol=2e-3)
    else:  # the spatial adapter sees zero padding at window borders
        assert (direct - from_cache).abs().mean() < 5e-3


def test_load_adapted_model_detects_changed_base_weights(data_root, tmp_path):
    from fseft.errors import InputFileError
    from fseft.models.checkpoint import save_model_file

    model = tiny_model()
    model_file = save_model_file(model, tmp_path / "base.safetensors", preprocess=model.preprocess)
    adapt(str(model_file), data_root, "liver", 1, 0, tmp_path / "run", _cfg(tmp_path, epochs=1))
    with torch.no_grad():
        model.head.bias.add_(1.0)
    save_model_file(model, model_file, preprocess=model.preprocess)
    with pytest.raises(InputFileError, match="weights differ"):
        load_adapted_model(tmp_path / "run")


def test_multiclass_head_starts_from_the_base_head():
    model = tiny_model(classes=("spleen", "liver"))
    adapter = build_method_adapter(AdaptConfig(method="lp", objective="multiclass"), model, ["liver", "gallbladder"])
    assert adapter.head.out_channels == 3
    assert torch.count_nonzero(adapter.head.weight[0]) == 0
    assert torch.equal(adapter.head.weight[1], model.head.weight[1])


@pytest.mark.slow
def test_cli_adapt_on_phantom_cases_writes_the_run_folder(tmp_path, capsys):
    from fseft.data.phantom import write_phantom_dataset
    from fseft.models.checkpoint import save_model_file
    from fseft.models.zoo import create_model

    root = write_phantom_dataset(tmp_path / "phantom", 3, domain="target", structures="liver,spleen,gallbladder",
                                 progress=False)
    torch.manual_seed(0)
    model = create_model("swin_unetr", ["liver", "spleen"], feature_size=12)
    model_file = save_model_file(model, tmp_path / "swin12.safetensors",
                                 preprocess={"spacing": [6.0, 6.0, 6.0]})
    run = tmp_path / "run"
    args = ["adapt", "--model", str(model_file), "--data", str(root), "--structures", "liver,gallbladder",
            "--k", "1", "--seed", "3", "--method", "spatial-adapter", "--ti", "--out", str(run),
            "--epochs", "2", "--patch-size", "32", "32", "32", "--roi-size", "64", "32", "32",
            "--patches-per-volume", "2", "--cache-dir", str(tmp_path / "cache"), "--save-predictions",
            "--no-progress"]
    assert main(args) == 0
    assert "2 query case(s)" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"method", "structures", "k", "seed", "trainable_params", "train_seconds", "queries", "mean"}
    assert metrics["trainable_params"] == 2 * 12 * 12 * 27 + 2 * 13
    assert metrics["structures"] == ["liver", "gallbladder"] and len(metrics["queries"]) == 2
    for scores in metrics["queries"].values():
        assert set(scores) == {"liver", "gallbladder"}
        assert set(scores["liver"]) == {"dice", "nsd", "hd95"}
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["method"] == "spatial-adapter" and config["base_model"]["file_sha256"]
    assert config["preprocess"]["spacing"] == [6.0, 6.0, 6.0]
    assert (run / "adapter_model.safetensors").stat().st_size < 100_000  # kilobytes, not megabytes
    predictions = sorted(p.name for p in (run / "predictions").glob("*.nii.gz"))
    assert predictions == sorted(f"{c}.nii.gz" for c in metrics["queries"])
    # a second run (other method, same model and data) reuses every cached volume
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("features.npy")}
    assert main([*args[:args.index("--method")], "--method", "lp", "--out", str(tmp_path / "run2"),
                 *args[args.index("--epochs"):]]) == 0
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("features.npy")}
    assert after == before and len(before) == 3
    # `fseft predict --adapter RUN` segments a scan with base model + adapter in its native geometry
    import nibabel as nib

    scan = sorted((root / "imagesTr").glob("*_0000.nii.gz"))[0]
    out = tmp_path / "predicted.nii.gz"
    assert main(["predict", "-i", str(scan), "-o", str(out), "--adapter", str(run),
                 "--roi-size", "64", "32", "32", "--no-progress"]) == 0
    written, source = nib.load(out), nib.load(scan)
    assert written.shape == source.shape
    assert np.allclose(written.affine, source.affine, atol=1e-4)
    assert json.loads(out.with_name("predicted.json").read_text()) == {"1": "liver", "2": "gallbladder"}
