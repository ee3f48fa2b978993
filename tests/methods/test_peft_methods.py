"""Encoder fine-tuning / PEFT methods: what each one trains, decoder modes, head, counts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fseft.errors import ConfigError
from fseft.methods import available_methods, get_method
from fseft.methods.peft_methods import (
    apply_method,
    count_method_parameters,
    method_train_mode,
    model_parts,
    trainable_parameters,
)
from fseft.models.zoo import create_model

SWIN = dict(feature_size=12, depths=(1, 1, 1, 1))




def _top(name: str) -> str:
    return name.removeprefix("base_model.model.").split(".")[0]


def test_registry_lists_all_methods():
    names = available_methods("network")
    assert set(names) == {"ft", "ft-last", "scratch", "decoder", "bitfit", "affine", "lora", "adaptformer", "arena"}
    assert all(get_method(n).kind == "network" and get_method(n).prepare for n in names)
    assert get_method("lora").uses_peft and not get_method("arena").uses_peft
    with pytest.raises(ConfigError, match="unknown adaptation method 'nope'.*spatial-adapter.*lora"):
        get_method("nope")
    with pytest.raises(ConfigError, match="'lp' is trained on cached features.*bitfit"):
        apply_method(create_model("unet3d", ["liver"], base_channels=4), "lp")
    with pytest.raises(ConfigError, match="no option"):
        apply_method(create_model("unet3d", ["liver"], base_channels=4), "lora", ranks=3)
    with pytest.raises(ConfigError, match="decoder must be one of"):
        apply_method(create_model("unet3d", ["liver"], base_channels=4), "bitfit", decoder="thawed")


@pytest.mark.parametrize("decoder", ["frozen", "fine-tuned", "new"])
@pytest.mark.parametrize("method", ["bitfit", "affine", "lora", "adaptformer", "arena"])
def test_swin_encoder_methods_train_encoder_decoder_and_head_as_asked(swin_base, method, decoder):
    base = copy.deepcopy(swin_base)
    model = apply_method(base, method, ["liver", "gallbladder"], decoder=decoder)
    parts = model_parts(model)
    tops = {_top(n) for n, _ in trainable_parameters(model)}
    assert "head" in tops
    assert "swinViT" in tops  # the method's own parameters live in the encoder
    assert not tops & set(parts.skip_blocks)  # encoder1..4, encoder10 stay frozen
    if decoder == "frozen":
        assert not tops & set(parts.decoder)
    else:
        assert set(parts.decoder) <= tops
    # What else than the method, decoder and head is trainable: nothing.
    assert tops <= {"swinViT", "head", *parts.decoder}
    names = [n for n, _ in trainable_parameters(model) if _top(n) == "swinViT"]
    if method == "bitfit":
        assert all(n.endswith(".bias") or n.endswith("relative_position_bias_table") for n in names)
        assert not any("norm" in n for n in names)
    elif method == "affine":
        assert all("norm" in n for n in names)
    elif method == "lora":
        assert names and all("lora_" in n and ".qkv." in n for n in names)
    elif method == "adaptformer":
        assert names and all(".adapter." in n for n in names)
    elif method == "arena":
        assert names and all(".qkv." in n and (".down." in n or ".up." in n or n.endswith("gate")) for n in names)


def test_decoder_modes_keep_or_reinitialise_weights(swin_base):
    ref = dict(swin_base.named_parameters())
    tuned = apply_method(copy.deepcopy(swin_base), "bitfit", ["liver"], decoder="fine-tuned")
    torch.manual_seed(1)
    new = apply_method(copy.deepcopy(swin_base), "bitfit", ["liver"], decoder="new")
    for name in ("decoder1.conv_block.conv1.conv.weight", "decoder5.transp_conv.conv.weight"):
        assert torch.equal(dict(tuned.named_parameters())[name], ref[name])
        assert not torch.equal(dict(new.named_parameters())[name], ref[name])
        assert dict(new.named_parameters())[name].requires_grad
    # the skip blocks keep their weights and stay frozen, unless asked
    assert torch.equal(dict(new.named_parameters())["encoder10.layer.conv1.conv.weight"], ref["encoder10.layer.conv1.conv.weight"])
    both = apply_method(copy.deepcopy(swin_base), "bitfit", ["liver"], decoder="fine-tuned", include_skip_blocks=True)
    assert dict(both.named_parameters())["encoder10.layer.conv1.conv.weight"].requires_grad


def test_head_rows_known_structures_start_from_pretrained_head(unet_base):
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = unet_base(x)
    model = apply_method(copy.deepcopy(unet_base), "bitfit", ["spleen", "gallbladder"], decoder="fine-tuned")
    assert model.class_names == ("spleen", "gallbladder")
    assert model.head.out_channels == 2
    with torch.no_grad():
        out = model.eval()(x)
    torch.testing.assert_close(out[:, 0], ref[:, 1])  # spleen: pre-trained row 1
    assert not torch.allclose(out[:, 1], ref[:, 0])  # gallbladder: a new row
    multi = apply_method(copy.deepcopy(unet_base), "affine", ["liver"], multiclass=True)
    assert multi.head.out_channels == 2 and torch.count_nonzero(multi.head.weight[0]) == 0


@pytest.mark.parametrize("method", ["ft", "ft-last", "scratch"])
def test_baselines(unet_base, method):
    torch.manual_seed(3)
    model = apply_method(copy.deepcopy(unet_base), method, ["liver"])
    tops = {_top(n) for n, _ in trainable_parameters(model)}
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for _, p in trainable_parameters(model))
    if method == "ft-last":
        assert tops == {"up_tr64", "head"}
    else:
        assert trained == total
    same = torch.equal(model.down_tr64.ops[0].conv1.weight, unet_base.down_tr64.ops[0].conv1.weight)
    assert same == (method != "scratch")


def test_unet_lora_targets_encoder_conv3d_and_arena_too(unet_base):
    lora = apply_method(copy.deepcopy(unet_base), "lora", ["liver"])
    names = [n for n, _ in trainable_parameters(lora) if _top(n) != "head"]
    assert names and all("down_tr" in n and "conv1.lora_" in n for n in names)
    assert type(lora.base_model.model.down_tr64.ops[0].conv1).__name__ == "Conv3d"  # peft's LoRA Conv3d
    arena = apply_method(copy.deepcopy(unet_base), "arena", ["liver"], rank=2)
    assert {_top(n) for n, _ in trainable_parameters(arena)} == {"down_tr64", "down_tr128", "down_tr256", "down_tr512", "head"}
    with pytest.raises(ConfigError, match="Swin-UNETR"):
        apply_method(copy.deepcopy(unet_base), "adaptformer", ["liver"])
    with pytest.raises(ConfigError, match="lora: cannot target"):
        apply_method(copy.deepcopy(unet_base), "lora", ["liver"], target_modules=["no_such_layer"])


def test_frozen_batchnorm_statistics_do_not_drift(unet_base):
    model = apply_method(copy.deepcopy(unet_base), "bitfit", ["liver"], decoder="fine-tuned")
    method_train_mode(model)
    assert not model.down_tr64.ops[0].bn1.training  # frozen encoder BN: eval statistics
    assert model.up_tr64.ops[0].bn1.training  # trained decoder BN
    before = model.down_tr64.ops[0].bn1.running_mean.clone()
    model(torch.randn(2, 1, 16, 16, 16))
    assert torch.equal(model.down_tr64.ops[0].bn1.running_mean, before)


def test_prepared_model_is_refused_twice(unet_base):
    model = apply_method(copy.deepcopy(unet_base), "lora", ["liver"])
    with pytest.raises(ConfigError, match="already prepared"):
        apply_method(model, "bitfit")


def test_parameter_counts_of_the_48_channel_swin_unetr():
    """Counts without weights (meta device) against the architecture's arithmetic, which is
    also that of the FSEFT paper's table (see the report for its LoRA figure)."""
    dims = [48, 96, 192, 384]  # Swin stages, two blocks each
    heads = [3, 6, 12, 24]
    table = 13**3  # (2 * 7 - 1)^3 relative positions per head

    def count(method, **options):
        return count_method_parameters("swin_unetr", method, ["gallbladder"], arch_kwargs={"feature_size": 48}, **options)

    # BitFit: qkv (3C), proj (C), fc1 (4C), fc2 (C) biases, bias tables, patch-embedding bias
    bitfit = sum(2 * 9 * c for c in dims) + sum(2 * table * h for h in heads) + 48
    assert count("bitfit")["encoder_method"] == bitfit == 210_738  # paper: 210.7K
    # LayerNorm affine: norm1, norm2 per block (4C) and the patch-merging norm (2 * 8C)
    assert count("affine")["encoder_method"] == sum(2 * 4 * c + 16 * c for c in dims) == 17_280  # 17.3K
    # AdaptFormer d=16 with biases: 2Cd + d + C per block (+1 scale when learnable)
    adaptformer = sum(2 * (2 * c * 16 + 16 + c) for c in dims)
    assert count("adaptformer", learnable_scale=False)["encoder_method"] == adaptformer == 47_648  # 47.6K
    assert count("adaptformer")["encoder_method"] == adaptformer + 8
    # LoRA rank r on the fused qkv: r (C + 3C) per block
    assert count("lora")["encoder_method"] == sum(2 * 4 * 4 * c for c in dims)
    assert count("lora", rank=12)["encoder_method"] == 69_120
    assert count("arena", rank=4)["encoder_method"] == sum(2 * (4 * 4 * c + 4) for c in dims)
    # decoder1..5: the paper's 19.6M; head: 48 + 1 per structure (linear probe: 49)
    tuned = count("lora", decoder="fine-tuned")
    assert round(tuned["decoder"] / 1e5) == 196 and tuned["head"] == 49
    assert count("ft-last")["trainable"] == count("ft-last")["decoder"] + 49
    assert count("ft")["trainable"] == count("ft")["total_model"]


def test_decoder_method_trains_the_decoder_and_head_only():
    model = apply_method(create_model("swin_unetr", ["liver"], feature_size=12), "decoder", ["liver", "gallbladder"])
    trainable = {_top(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "head"}
    with_skips = apply_method(create_model("swin_unetr", ["liver"], feature_size=12), "decoder", ["liver"],
                              include_skip_blocks=True)
    assert "encoder1" in {_top(n) for n, p in with_skips.named_parameters() if p.requires_grad}
    with pytest.raises(ConfigError, match="fine-tuned or new"):
        apply_method(create_model("swin_unetr", ["liver"], feature_size=12), "decoder", ["liver"], decoder="frozen")
