"""Architecture options that change what the same weights compute: Swin-UNETR's patch merging
order and the U-Net's batch statistics at inference; recorded in model files, declared per zoo id."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fseft.errors import ConfigError, InputFileError
from fseft.models import MODEL_SPECS, create_model, load_model_file, save_model_file
from fseft.models.architectures import variant_options
from fseft.models.swin_unetr import LegacyPatchMerging
from fseft.models.unet import BatchStatisticsNorm3d


def test_legacy_patch_merging_concatenates_monai_0_9_sub_grids():
    """MONAI 0.9-1.4: offsets 000, 100, 010, 001, 101, 010, 001, 111 (010 and 001 twice)."""
    merge = LegacyPatchMerging(dim=1)
    seen = []
    merge.norm = torch.nn.Identity()
    merge.reduction = torch.nn.Identity()
    x = torch.arange(8.0).reshape(1, 2, 2, 2, 1)  # value = 4 d + 2 h + w
    out = merge(x)
    for value in out.flatten().tolist():
        value = int(value)
        seen.append((value // 4, value // 2 % 2, value % 2))
    assert seen == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
    odd = merge(torch.rand(1, 3, 5, 4, 1))  # odd sides are zero-padded, as MONAI's
    assert odd.shape == (1, 2, 3, 2, 8)


def test_patch_merging_changes_the_function_and_is_recorded_in_model_files(tmp_path):
    torch.manual_seed(0)
    current = create_model("swin_unetr", ["liver"], feature_size=12).eval()
    legacy = create_model("swin_unetr", ["liver"], feature_size=12, patch_merging="legacy").eval()
    legacy.load_state_dict(current.state_dict())  # same keys, same weights
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert (current(x) - legacy(x)).abs().max() > 1e-2
    assert current.arch_kwargs["patch_merging"] == "current"
    path = save_model_file(legacy, tmp_path / "legacy.safetensors")
    reloaded = load_model_file(path)
    assert isinstance(reloaded.swinViT.layers1[0].downsample, LegacyPatchMerging)
    with torch.no_grad():
        assert torch.equal(reloaded(x), legacy(x))


def test_a_model_file_without_the_record_is_read_as_the_current_order(tmp_path):
    """Files written before the option existed (the embedded model) were trained with MONAI >= 1.5."""
    torch.manual_seed(0)
    model = create_model("swin_unetr", ["liver"], feature_size=12).eval()
    path = save_model_file(model, tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(f.metadata()["fseft"])
    del config["arch_kwargs"]["patch_merging"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"fseft": json.dumps(config)})
    reloaded = load_model_file(old)
    assert reloaded.arch_kwargs["patch_merging"] == "current"
    assert variant_options("swin_unetr", config["arch_kwargs"]) == {"patch_merging": "current"}
    x = torch.rand(1, 1, 64, 64, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_the_embedded_model_file_runs_the_current_order():
    from fseft.models.zoo import find_weights
    from fseft.models.checkpoint import read_model_file_config

    path = find_weights(MODEL_SPECS["phantom"])
    if path is None:
        pytest.skip("embedded model not present")
    config = read_model_file_config(path)
    # v6 was written by a pretrain that records the order; files before it (v5) have no record
    assert config["arch_kwargs"].get("patch_merging", "current") == "current"
    assert variant_options(config["arch"], config["arch_kwargs"]) == {"patch_merging": "current"}


def test_every_public_swin_id_declares_the_legacy_order_and_suprem_unet_batch_statistics():
    for model_id, spec in MODEL_SPECS.items():
        if model_id == "phantom":
            continue
        options = variant_options(spec.arch, spec.arch_kwargs)
        expected = {"patch_merging": "legacy"} if spec.arch == "swin_unetr" else {"inference_norm": "batch"}
        assert options == expected, model_id
        assert spec.layouts and spec.zero_shot, model_id


def test_unknown_variant_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown patch_merging 'v2'; choose one of legacy, current"):
        create_model("swin_unetr", ["liver"], feature_size=12, patch_merging="v2")
    with pytest.raises(ConfigError, match="unknown inference_norm 'instance'"):
        create_model("unet3d", ["liver"], base_channels=2, inference_norm="instance")


def test_batch_statistics_at_inference_normalise_each_batch_and_leave_running_statistics_alone():
    torch.manual_seed(0)
    norm = BatchStatisticsNorm3d(3)
    norm.running_mean.fill_(5.0)
    norm.running_var.fill_(9.0)
    x = torch.randn(2, 3, 4, 4, 4) * 2 + 1
    reference = torch.nn.functional.batch_norm(x, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
    norm.eval()
    with torch.no_grad():
        assert torch.allclose(norm(x), reference, atol=1e-6)
    assert torch.equal(norm.running_mean, torch.full((3,), 5.0))  # not used, not updated
    norm.train()
    norm(x)
    assert not torch.equal(norm.running_mean, torch.full((3,), 5.0))  # training: as nn.BatchNorm3d


def test_unet_inference_norm_is_recorded_and_changes_eval_outputs(tmp_path):
    torch.manual_seed(0)
    running = create_model("unet3d", ["liver"], base_channels=2).eval()
    batch = create_model("unet3d", ["liver"], base_channels=2, inference_norm="batch").eval()
    batch.load_state_dict(running.state_dict())
    assert all(isinstance(m, BatchStatisticsNorm3d) for m in batch.modules() if isinstance(m, torch.nn.BatchNorm3d))
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(batch(x), running(x), atol=1e-3)
        reloaded = load_model_file(save_model_file(batch, tmp_path / "unet.safetensors"))
        assert reloaded.arch_kwargs["inference_norm"] == "batch"
        assert torch.equal(reloaded(x), batch(x))


def test_an_adapter_run_written_before_the_option_existed_was_the_default(tmp_path):
    """A run record without ``patch_merging`` was trained on the current order: a legacy base differs."""
    from fseft.runs.format import _check_base

    legacy = create_model("swin_unetr", ["liver"], feature_size=12, patch_merging="legacy")
    record = {"arch": "swin_unetr", "base_class_names": ["liver"],
              "arch_kwargs": {k: v for k, v in legacy.arch_kwargs.items() if k != "patch_merging"}}
    with pytest.raises(InputFileError, match=r"architecture options differ .*'patch_merging': \('legacy', 'current'\)"):
        _check_base(legacy, record, tmp_path)
    _check_base(create_model("swin_unetr", ["liver"], feature_size=12), record, tmp_path)
