"""`fseft adapt`: training on cached features, run folder, errors, reloading the adapted model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_cases import IntensityFeatures, tiny_model, write_tiny_dataset

from fseft.adaptation import AdaptConfig, adapt
from fseft.cli import main
from fseft.data.datasets import open_dataset
from fseft.data.structures import UnknownStructureError
from fseft.errors import ConfigError
from fseft.methods import adapter_on, predict_cached
from fseft.models.base import SegmentationModel
from fseft.runs.format import read_run_record
from fseft.runs.load import load_adapted_model
from fseft.training.sampling import sample_patch_slices

SMALL = dict(patch_size=(16, 16, 16), roi_size=(16, 16, 16), patches_per_volume=2, progress=False)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_cases=4)


def _record(run):
    """The run's information in its record (`read_run_record`, ``extra``)."""
    return read_run_record(run)["extra"]


def _cfg(tmp_path, **kw):
    return AdaptConfig(cache_dir=str(tmp_path / "cache"), **{**SMALL, **kw})


def test_lp_learns_a_new_structure_from_two_shots(data_root, tmp_path):
    # 40 epochs: the new output starts at the support's foreground prior (head_prior), from
    # which 20 epochs of lr 0.1 do not yet lift the gallbladder above 0.5
    cfg = _cfg(tmp_path, method="lp", epochs=40, lr=1e-1, patience=0)
    metrics = adapt(IntensityFeatures(), data_root, "liver,gallbladder", 2, 0, tmp_path / "run", cfg)
    assert metrics["trainable_params"] == 2 * (4 + 1)
    assert len(metrics["queries"]) == 2
    assert metrics["mean"]["liver"]["dice"] > 0.9
    assert metrics["mean"]["gallbladder"]["dice"] > 0.9
    training = _record(tmp_path / "run")["training"]
    assert training["losses"][-1] < 0.7 * training["losses"][0]


def test_bf16_adapters_train_on_bf16_patches_and_still_learn(data_root, tmp_path):
    """With bf16 the cached patches are read as bf16 (no mixed-precision sums); lp still learns
    and the spatial adapter's size constraint runs on bf16 query slabs."""
    from fseft.training.sampling import feature_patch_batch, feature_volume

    features = np.random.rand(4, 10, 10, 10).astype(np.float16)
    volume = feature_volume(features, np.ones((1, 10, 10, 10), np.uint8))
    feats, _ = feature_patch_batch(volume, [(slice(0, 4), slice(0, 4), slice(0, 4))], torch.device("cpu"), torch.bfloat16)
    assert feats.dtype == torch.bfloat16 and feats.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(feats[0].float(), torch.from_numpy(features[:, :4, :4, :4]).bfloat16().float())
    cfg = _cfg(tmp_path, method="lp", epochs=20, lr=1e-1, patience=0, bf16=True)
    metrics = adapt(IntensityFeatures(), data_root, "liver", 2, 0, tmp_path / "run", cfg)
    assert metrics["mean"]["liver"]["dice"] > 0.9
    cfg = _cfg(tmp_path, method="spatial-adapter", epochs=2, transductive=True, patience=0, bf16=True)
    adapt(tiny_model(), data_root, "liver", 2, 0, tmp_path / "run_ti", cfg)
    ti = _record(tmp_path / "run_ti")["training"]["ti_losses"]
    assert ti[0] == 0.0 and ti[1] > 0


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
    saved = _record(tmp_path / "run")
    assert saved["transductive"] == {"gamma": 0.3, "weight": 0.1, "start_fraction": 0.5}
    ti = saved["training"]["ti_losses"]
    assert ti[:2] == [0.0, 0.0] and all(v > 0 for v in ti[2:])  # random head: sizes far off


def test_max_steps_caps_the_epochs_for_larger_k(data_root, tmp_path):
    # k = 2 support volumes, one volume per step: 5 steps fit in 3 epochs (ceil(5 / 2))
    cfg = _cfg(tmp_path, method="spatial-adapter", epochs=10, max_steps=5, patience=0)
    adapt(tiny_model(), data_root, "liver", 2, 0, tmp_path / "run", cfg)
    saved = _record(tmp_path / "run")
    assert saved["training"]["epochs_run"] == 3
    assert saved["hyperparameters"]["max_steps"] == 5
    with pytest.raises(ConfigError, match="max_steps"):
        AdaptConfig(max_steps=0)


@pytest.mark.parametrize("method,objective", [("lp", "sigmoid"), ("spatial-adapter", "multiclass")])
def test_adapted_model_reproduces_the_cached_prediction(data_root, tmp_path, method, objective):
    from fseft.data.preprocessing import PreprocessConfig, preprocess
    from fseft.inference.feature_cache import FeatureCache
    from fseft.models.checkpoint import save_model_file
    from fseft.prediction.segment import InferenceConfig, predict_probabilities

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
    adapter, _ = adapter_on(model, "lp", {}, ["liver", "gallbladder"], multiclass=True)
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
    config = json.loads((run / "adapter_config.json").read_text())  # the record, as in the safetensors metadata
    assert config == read_run_record(run) and config["format"] == "fseft-run-v2"
    assert config["method"] == "spatial-adapter" and config["extra"]["base_model"]["file_sha256"]
    assert config["extra"]["preprocess"]["spacing"] == [6.0, 6.0, 6.0]
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


# ---------------------------------------------------------------------------- network methods

METRICS_KEYS = {"method", "structures", "k", "seed", "trainable_params", "train_seconds", "queries", "mean"}


@pytest.fixture(scope="module")
def swin12_file(tmp_path_factory):
    from fseft.models.checkpoint import save_model_file
    from fseft.models.zoo import create_model

    torch.manual_seed(0)
    model = create_model("swin_unetr", ["liver", "spleen"], feature_size=12)
    return save_model_file(model, tmp_path_factory.mktemp("swin") / "swin12.safetensors",
                           preprocess={"spacing": [6.0, 6.0, 6.0]})


def _dry_run_trainable(capsys, model_file, *args):
    assert main(["adapt", "--model", str(model_file), "--structures", "liver,gallbladder", *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.split()[:1] == ["trainable"])
    return int(line.split()[1].replace(",", "")), out


def test_dry_run_counts_every_kind_without_data(swin12_file, capsys):
    from fseft.methods import build_adapter, count_trainable_parameters
    from fseft.methods.peft_methods import count_method_parameters

    names, classes = ["liver", "gallbladder"], ["liver", "spleen"]
    arch_kwargs = {"feature_size": 12}
    cases = [
        (["--method", "lora", "--decoder", "fine-tuned", "--rank", "8"], "lora", {"decoder": "fine-tuned", "rank": 8}),
        (["--method", "arena", "--rank", "4"], "arena", {"rank": 4}),
        (["--method", "bitfit", "--decoder", "new", "--include-skip-blocks"], "bitfit",
         {"decoder": "new", "include_skip_blocks": True}),
        (["--method", "ft"], "ft", {}),
        (["--method", "decoder"], "decoder", {}),
    ]
    outputs = {}
    for args, method, options in cases:
        trainable, outputs[method] = _dry_run_trainable(capsys, swin12_file, *args)
        expected = count_method_parameters("swin_unetr", method, names, classes, arch_kwargs=arch_kwargs, **options)
        assert trainable == expected["trainable"] > 0, method
        assert f"{method} (network" in outputs[method] and f"{expected['decoder']:,}" in outputs[method]
    assert "protocol: lr 0.0001, 100 epochs, 2 volume(s) x 3 patches per step, loss bce+dice" in outputs["ft"]
    _, out = _dry_run_trainable(capsys, swin12_file, "--method", "lp")
    assert "protocol: lr 0.1, 50 epochs, 1 volume(s) x 6 patches per step" in out
    trainable, _ = _dry_run_trainable(capsys, swin12_file, "--method", "spatial-adapter", "--kernel-size", "1")
    assert trainable == count_trainable_parameters(build_adapter("spatial-adapter", 12, 2, kernel_size=1)) == 2 * 144 + 26
    assert _dry_run_trainable(capsys, swin12_file, "--method", "lp")[0] == 2 * 13


def test_unknown_method_and_misplaced_options_are_clear_errors(swin12_file, data_root, tmp_path, capsys, monkeypatch):
    from fseft.methods import available_methods

    base = ["adapt", "--model", str(swin12_file), "--structures", "liver"]
    assert main([*base, "--method", "lorra", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown adaptation method 'lorra'" in err
    assert all(name in err for name in available_methods()) and len(available_methods()) == 12
    assert main([*base, "--method", "lp", "--rank", "4", "--dry-run"]) == 2
    assert "method 'lp' has no option(s) rank" in capsys.readouterr().err
    assert main([*base, "--method", "lora"]) == 2
    assert "--data, --k, --out required" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--ti.*'lora' is trained through the network"):
        adapt(tiny_model(), data_root, "liver", 1, 0, tmp_path / "run", _cfg(tmp_path, method="lora", transductive=True))
    assert not (tmp_path / "run").exists()
    # bf16 network training on a CPU with the U-Net's 16-deep patch: a level 2 voxels deep
    from fseft.inference import sliding_window

    monkeypatch.setattr(sliding_window, "cpu_bf16_conv3d_gradient_is_wrong", lambda: True)
    with pytest.raises(ConfigError, match="patch 16 voxels deep"):
        adapt(tiny_model(), data_root, "liver", 1, 0, tmp_path / "run", _cfg(tmp_path, method="lora", bf16=True))
    assert not (tmp_path / "run").exists()


def test_network_method_trains_a_copy_of_an_in_memory_model(data_root, tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tmp_path, method="ft-last", epochs=1, lr=1e-2, n_query=1)
    metrics = adapt(model, data_root, "liver,gallbladder", 2, 0, tmp_path / "run", cfg)
    assert set(metrics) == METRICS_KEYS | {"encoder_cache"} and list(metrics["queries"]) and metrics["train_seconds"] > 0
    assert metrics["encoder_cache"]["point"] == "last"  # ft-last trains on cached encoder outputs
    assert metrics["trainable_params"] == sum(p.numel() for p in model.up_tr64.parameters()) + 2 * (4 + 1)
    assert model.class_names == ("liver", "spleen") and getattr(model, "fseft_method", None) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was trained
    assert read_run_record(tmp_path / "run")["method"] == "ft-last"


@pytest.mark.slow
def test_network_method_run_reloads_and_predict_reproduces_the_evaluation(data_root, tmp_path):
    import nibabel as nib

    from fseft.adaptation.runner import count_parameters
    from fseft.models.checkpoint import save_model_file
    from fseft.prediction.predict import predict_path
    from fseft.prediction.segment import InferenceConfig
    from fseft.runs.load import AdaptedNetwork

    model = tiny_model()
    model_file = save_model_file(model, tmp_path / "base.safetensors", preprocess=model.preprocess)
    cfg = _cfg(tmp_path, method="lora", method_options={"decoder": "fine-tuned", "rank": 2}, epochs=2, lr=1e-2,
               save_predictions=True)
    metrics = adapt(str(model_file), data_root, "liver,gallbladder", 2, 0, tmp_path / "run", cfg)
    assert set(metrics) == METRICS_KEYS and len(metrics["queries"]) == 2
    assert metrics["trainable_params"] == count_parameters(str(model_file), "liver,gallbladder", cfg)["trainable"]
    record = read_run_record(tmp_path / "run")
    assert record["method"] == "lora" and record["options"]["decoder"] == "fine-tuned"
    assert record["extra"]["base_model"]["file_sha256"] and record["extra"]["training"]["epochs_run"] == 2
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    adapted = load_adapted_model(tmp_path / "run")
    assert isinstance(adapted, AdaptedNetwork) and adapted.class_names == ("liver", "gallbladder")
    inf = InferenceConfig(roi_size=(16, 16, 16), progress=False)
    for case_id in metrics["queries"]:
        scan = data_root / "imagesTr" / f"{case_id}_0000.nii.gz"
        out = tmp_path / "pred" / f"{case_id}.nii.gz"
        predict_path(scan, out, None, cfg=inf, adapter=tmp_path / "run")
        evaluated = nib.load(tmp_path / "run" / "predictions" / f"{case_id}.nii.gz").get_fdata()
        assert np.array_equal(nib.load(out).get_fdata(), evaluated)


@pytest.mark.slow
def test_merge_folds_lora_and_refuses_feature_runs(data_root, tmp_path):
    from fseft.data.preprocessing import PreprocessConfig, preprocess
    from fseft.models.checkpoint import save_model_file
    from fseft.prediction.segment import InferenceConfig, predict_probabilities

    model = tiny_model()
    model_file = save_model_file(model, tmp_path / "base.safetensors", preprocess=model.preprocess)
    cfg = _cfg(tmp_path, method="lora", method_options={"rank": 2}, epochs=2, lr=5e-2, patience=0)
    adapt(str(model_file), data_root, "gallbladder", 1, 0, tmp_path / "run", cfg)
    adapted, merged = load_adapted_model(tmp_path / "run"), load_adapted_model(tmp_path / "run", merge=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert any("lora" in name for name, _ in adapted.named_parameters())
    image, _ = open_dataset(data_root).cases[0].load(["gallbladder"])
    x = preprocess(image, None, PreprocessConfig.from_dict(model.preprocess)).image[None]
    inf = InferenceConfig(roi_size=(16, 16, 16), progress=False)
    assert torch.allclose(predict_probabilities(adapted, x, inf), predict_probabilities(merged, x, inf), atol=1e-5)

    adapt(str(model_file), data_root, "liver", 1, 0, tmp_path / "lp", _cfg(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="feature adapter \\(lp\\), which has nothing to merge"):
        load_adapted_model(tmp_path / "lp", merge=True)


@pytest.mark.slow
def test_cli_adapt_lora_on_phantom_cases_then_predict_and_merge(swin12_file, tmp_path, capsys):
    import nibabel as nib
    from safetensors import safe_open

    from fseft.data.phantom import write_phantom_dataset
    from fseft.methods.peft_methods import count_method_parameters

    root = write_phantom_dataset(tmp_path / "phantom", 3, domain="target", structures="liver,gallbladder",
                                 progress=False)
    run = tmp_path / "run"
    assert main(["adapt", "--model", str(swin12_file), "--data", str(root), "--structures", "liver,gallbladder",
                 "--k", "1", "--method", "lora", "--decoder", "fine-tuned", "--out", str(run), "--epochs", "2",
                 "--patch-size", "64", "32", "32", "--roi-size", "64", "32", "32", "--patches-per-volume", "2",
                 "--no-progress"]) == 0
    assert "2 query case(s)" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == METRICS_KEYS and len(metrics["queries"]) == 2
    expected = count_method_parameters("swin_unetr", "lora", ["liver", "gallbladder"], ["liver", "spleen"],
                                       arch_kwargs={"feature_size": 12}, decoder="fine-tuned")
    assert metrics["trainable_params"] == expected["trainable"]
    # peft's files, not fseft's black-box adapter config
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with safe_open(str(run / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(".swinViT." in k and "lora_A" in k for k in keys)
    assert any(".decoder1." in k for k in keys) and any(".head." in k for k in keys)  # the trained copies
    assert not any(".swinViT." in k and "lora" not in k for k in keys)  # the frozen encoder stays out

    scan = sorted((root / "imagesTr").glob("*_0000.nii.gz"))[0]
    common = ["-i", str(scan), "--adapter", str(run), "--roi-size", "64", "32", "32", "--no-progress"]
    assert main(["predict", "-o", str(tmp_path / "plain.nii.gz"), *common]) == 0
    assert main(["predict", "-o", str(tmp_path / "merged.nii.gz"), "--merge", *common]) == 0
    plain, merged, source = (nib.load(tmp_path / "plain.nii.gz"), nib.load(tmp_path / "merged.nii.gz"), nib.load(scan))
    assert plain.shape == source.shape and np.allclose(plain.affine, source.affine, atol=1e-4)
    assert np.array_equal(plain.get_fdata(), merged.get_fdata())
    assert json.loads((tmp_path / "plain.json").read_text()) == {"1": "liver", "2": "gallbladder"}


@pytest.mark.parametrize("method", ["lp", "lora"])
def test_diverged_training_stops_with_an_error_and_saves_nothing(data_root, tmp_path, method, capsys):
    """A learning rate that overflows the weights: exit 2 naming the step, no run folder."""
    from fseft.models.checkpoint import save_model_file

    model_file = save_model_file(tiny_model(), tmp_path / "tiny.safetensors", tiny_model().preprocess)
    out = tmp_path / "run"
    args = ["adapt", "--model", str(model_file), "--data", str(data_root), "--structures", "liver", "--k", "1",
            "--method", method, "--lr", "1e25", "--epochs", "30", "--patience", "0", "--patch-size", "16", "16", "16",
            "--roi-size", "16", "16", "16", "--patches-per-volume", "1", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "nothing was saved" in err and "Traceback" not in err, err
    assert "at step" in err or "non-finite weights" in err
    assert not out.exists()


def test_non_finite_adapter_or_model_file_is_refused_when_loaded(data_root, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fseft.errors import InputFileError
    from fseft.models.checkpoint import save_model_file
    from fseft.models.zoo import load_model

    base = save_model_file(tiny_model(), tmp_path / "base.safetensors", preprocess=tiny_model().preprocess)
    cfg = _cfg(tmp_path, method="lp", epochs=2, lr=1e-2, patience=0)
    adapt(str(base), data_root, "liver", 1, 0, tmp_path / "run", cfg)
    weights = tmp_path / "run" / "adapter_model.safetensors"
    state = load_file(str(weights))
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(weights), metadata=metadata)  # a diverged run's file, record intact
    with pytest.raises(InputFileError, match="adapter_model.safetensors: non-finite values"):
        load_adapted_model(tmp_path / "run")

    model = tiny_model()
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    path = save_model_file(model, tmp_path / "bad.safetensors", model.preprocess)
    with pytest.raises(InputFileError, match=r"bad.safetensors: non-finite values .*head"):
        load_model(str(path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_any_work(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["adapt", "--model", "phantom", "--data", str(data_root), "--structures", "liver", "--k", "1",
            "--method", "lp", "--device", "cuda", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_new_structure_head_starts_at_the_support_prior_unless_no_head_prior(data_root, tmp_path):
    from fseft.models.checkpoint import save_model_file

    model_file = save_model_file(tiny_model(), tmp_path / "tiny.safetensors", tiny_model().preprocess)
    biases = {}
    for flag in ([], ["--no-head-prior"]):
        out = tmp_path / f"run{len(flag)}"
        assert main(["adapt", "--model", str(model_file), "--data", str(data_root), "--structures", "gallbladder",
                     "--k", "1", "--method", "lp", "--lr", "1e-9", "--epochs", "1", "--patch-size", "16", "16", "16",
                     "--roi-size", "16", "16", "16", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                     "--no-progress", *flag]) == 0
        assert _record(out)["hyperparameters"]["head_prior"] is (not flag)
        biases[bool(flag)] = float(load_file(str(out / "adapter_model.safetensors"))["head.bias"][0])
    assert biases[False] < -2.0  # logit of a small foreground fraction (lr 1e-9: as initialised)
    assert abs(biases[True]) < 1.0  # PyTorch's default initialisation, around p = 0.5


@pytest.mark.parametrize("multiclass", [False, True])
def test_dice_loss_is_the_bce_dice_loss_without_its_cross_entropy(multiclass):
    from fseft.training.fit import supervised_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 2 + int(multiclass), 6, 6, 6)
    labels = (torch.rand(2, 2, 6, 6, 6) > 0.8).to(torch.uint8)
    dice = supervised_loss(logits, labels, multiclass, "dice")
    both = supervised_loss(logits, labels, multiclass, "bce+dice")
    if multiclass:
        index = torch.zeros(2, 6, 6, 6, dtype=torch.long)
        for s in range(2):
            index[labels[:, s] > 0] = s + 1
        ce = torch.nn.functional.cross_entropy(logits, index)
    else:
        ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    assert float(both - dice) == pytest.approx(float(ce), rel=1e-5)
    with pytest.raises(ConfigError, match="loss must be one of"):
        AdaptConfig(loss="focal")


def test_unusable_numbers_are_exit_2_messages_not_tracebacks(swin12_file, data_root, tmp_path, capsys):
    """An overflowing --lr, a window the architecture cannot take, a negative NSD tolerance."""
    base = ["adapt", "--model", str(swin12_file), "--data", str(data_root), "--structures", "liver", "--k", "1",
            "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main([*base, "--lr", "1e39", "--out", str(tmp_path / "run")]) == 2
    assert "lr must be > 0 and a finite float32 number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    scan = sorted((data_root / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", "-i", str(scan), "-o", str(out), "--model", str(swin12_file),
                 "--roi-size", "50", "50", "50", "--no-progress"]) == 2
    assert "--roi-size 50 50 50 does not fit this model" in capsys.readouterr().err
    assert not out.exists()
    assert main(["evaluate", "--pred", str(data_root / "labelsTr"), "--gt", str(data_root / "labelsTr"),
                 "--tolerance", "-1", "--out", str(tmp_path / "m.json")]) == 2
    assert "NSD tolerance must be a distance >= 0 mm" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_cli_adapt_refuses_an_earlier_run_without_overwrite(swin12_file, data_root, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["adapt", "--model", str(swin12_file), "--data", str(data_root), "--structures", "liver", "--k", "1",
            "--method", "lp", "--epochs", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(run), "--save-predictions"]
    assert main(base) == 0
    stale = run / "predictions" / "stale.nii.gz"
    stale.write_bytes(b"an earlier run's prediction")
    assert main(base) == 2
    assert "already holds a run" in capsys.readouterr().err and stale.exists()
    assert main([*base, "--overwrite"]) == 0
    assert not stale.exists() and (run / "metrics.json").is_file()


def test_network_methods_start_from_the_linear_probe_head_unless_told_not_to(data_root, tmp_path):
    # LP-FT: with --head-warmup (the default for network methods on a pre-trained base) the
    # network's head starts as the `lp` run on the same support would end; lr 1e-12 keeps it there
    probe = adapt(tiny_model(), data_root, "liver,gallbladder", 2, 0, tmp_path / "lp",
                  _cfg(tmp_path, method="lp", patches_per_volume=None))  # the probe takes lp's own protocol
    lp_head = load_file(str(tmp_path / "lp" / "adapter_model.safetensors"))
    heads = {}
    for warmup in (None, False):
        out = tmp_path / f"ft-last-{warmup}"
        adapt(tiny_model(), data_root, "liver,gallbladder", 2, 0, out,
              _cfg(tmp_path, method="ft-last", epochs=1, lr=1e-12, head_warmup=warmup))
        tensors = load_file(str(out / "adapter_model.safetensors"))
        heads[warmup] = {k.rsplit(".", 1)[-1]: v for k, v in tensors.items() if k.rsplit(".", 2)[-2] == "head"}
        recorded = json.loads((out / "adapter_config.json").read_text())
        assert "head_warmup" in json.dumps(recorded)
    assert probe["mean"]["gallbladder"]["dice"] >= 0.0
    torch.testing.assert_close(heads[None]["weight"], lp_head["head.weight"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(heads[None]["bias"], lp_head["head.bias"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(heads[False]["weight"], lp_head["head.weight"], atol=1e-3)
    from fseft.methods import get_method

    assert not get_method("scratch").make_config().warms_up_head()
    assert not get_method("lora").make_config(decoder="new").warms_up_head()
    assert get_method("decoder").make_config().warms_up_head()
