"""The features/head contract of both architectures, on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fseft.errors import ConfigError
from fseft.models import SwinUNETRSegmenter, UNet3DSegmenter, create_model
from fseft.models.zoo import parameter_count


@pytest.fixture(scope="module")
def tiny_swin() -> SwinUNETRSegmenter:
    torch.manual_seed(0)
    return create_model("swin_unetr", ["liver", "spleen", "aorta"], feature_size=12).eval()


def test_swin_features_are_decoder1_output_and_forward_is_head_of_features(tiny_swin):
    x = torch.rand(1, 1, 32, 32, 64)
    with torch.no_grad():
        z = tiny_swin.features(x)
    assert z.shape == (1, tiny_swin.feature_channels, 32, 32, 64)
    assert tiny_swin.feature_channels == 12 and tiny_swin.head.out_channels == 3
    assert tiny_swin.head.kernel_size == (1, 1, 1)
    # forward must go through `features` then `head` (adapters wrap/replace either), so a
    # wrapped `features` returning a known map gives exactly head(map).
    calls = []

    def spy(inp: torch.Tensor) -> torch.Tensor:
        calls.append(inp)
        return z

    tiny_swin.features = spy  # instance attribute shadows the method
    try:
        tiny_swin.head = nn.Conv3d(12, 5, kernel_size=1)
        with torch.no_grad():
            logits = tiny_swin(x)
        assert calls and calls[0] is x
        assert logits.shape == (1, 5, 32, 32, 64)
        assert torch.equal(logits, tiny_swin.head(z))
    finally:
        del tiny_swin.features
        tiny_swin.head = nn.Conv3d(12, 3, kernel_size=1)


def test_swin_keeps_monai_module_names():
    net = create_model("swin_unetr", ["a"], feature_size=12)
    top = {name for name, _ in net.named_children()}
    assert {"swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
            "decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "head"} == top
    assert "swinViT.layers1.0.blocks.0.mlp.linear1.weight" in net.state_dict()


def test_swin_rejects_inputs_the_pyramid_cannot_take(tiny_swin):
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny_swin.features(torch.zeros(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match="too small"):
        tiny_swin.features(torch.zeros(1, 1, 32, 32, 32))


def test_swin_gradient_checkpointing_is_passed_to_monai():
    net = create_model("swin_unetr", ["a"], feature_size=12, use_checkpoint=True)
    assert net.arch_kwargs["use_checkpoint"] is True
    assert net.swinViT.layers1[0].blocks[0].use_checkpoint is True


def test_unet_features_are_full_resolution_2b_channels():
    torch.manual_seed(0)
    net = create_model("unet", ["liver", "spleen"], base_channels=4).eval()
    assert isinstance(net, UNet3DSegmenter) and net.arch == "unet3d"
    x = torch.rand(1, 1, 16, 16, 24)
    with torch.no_grad():
        z = net.features(x)
        logits = net(x)
    assert z.shape == (1, 8, 16, 16, 24)
    assert logits.shape == (1, 2, 16, 16, 24)
    assert torch.allclose(logits, net.head(z))
    with pytest.raises(ValueError, match="divisible by 8"):
        net.features(torch.zeros(1, 1, 12, 16, 16))


def test_unet_public_key_names_and_channel_layout():
    net = UNet3DSegmenter(["a"], base_channels=32)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    # Models Genesis layout: 1 -> 32 -> 64, ..., bottleneck 256 -> 256 -> 512,
    # up_tr256: transposed 512 -> 512, concat skip 256 -> 768 -> 256 -> 256.
    assert shapes["down_tr64.ops.0.conv1.weight"] == (32, 1, 3, 3, 3)
    assert shapes["down_tr64.ops.1.conv1.weight"] == (64, 32, 3, 3, 3)
    assert shapes["down_tr512.ops.1.conv1.weight"] == (512, 256, 3, 3, 3)
    assert shapes["up_tr256.up_conv.weight"] == (512, 512, 2, 2, 2)
    assert shapes["up_tr256.ops.0.conv1.weight"] == (256, 768, 3, 3, 3)
    assert shapes["up_tr64.ops.1.bn1.running_mean"] == (64,)
    assert shapes["head.weight"] == (1, 64, 1, 1, 1)
    assert net.feature_channels == 64


def test_full_size_parameter_counts():
    # SuPreM publishes 19.08M parameters for its U-Net; Swin-UNETR f48 is ~62M.
    unet = parameter_count("unet3d", 25, {"base_channels": 32})
    swin = parameter_count("swin_unetr", 29, {"feature_size": 48})
    assert round(unet / 1e6, 2) == 19.08
    assert 61e6 < swin < 63e6
    assert parameter_count("swin_unetr", 30, {"feature_size": 48}) - swin == 48 + 1


def test_create_model_errors():
    with pytest.raises(ConfigError, match="unknown architecture"):
        create_model("vit", ["a"])
    with pytest.raises(ConfigError, match="invalid options"):
        create_model("unet3d", ["a"], feature_size=12)
    with pytest.raises(ConfigError, match="duplicate"):
        create_model("unet3d", ["a", "a"], base_channels=4)


def test_swin_fused_attention_matches_monai_explicit_attention():
    """The fused (scaled-dot-product) window attention used without gradients gives the
    explicit path's output, shifted windows included; training keeps the explicit path."""
    torch.manual_seed(0)
    model = SwinUNETRSegmenter(["a", "b"], feature_size=12).eval()
    assert model.fused_attention
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        fused = model(x)
        model.fused_attention = False
        assert not model.fused_attention
        explicit = model(x)
    assert torch.allclose(fused, explicit, atol=1e-4, rtol=1e-4)
    assert "fused_attention" not in model.arch_kwargs  # a runtime switch, not saved with the weights
    model.fused_attention = True
    model(x).sum().backward()  # grad enabled: MONAI's explicit path, gradients reach the attention
    assert model.swinViT.layers1[0].blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("arch, size, ok", [
    ("swin_unetr", (64, 64, 64), True), ("swin_unetr", (96, 64, 32), True), ("swin_unetr", (32, 32, 32), False),
    ("swin_unetr", (50, 50, 50), False), ("unet3d", (16, 24, 8), True), ("unet3d", (12, 16, 16), False),
])
def test_windows_are_checked_without_building_the_model(arch, size, ok):
    from fseft.models.zoo import check_window

    if ok:
        check_window(arch, size)
    else:
        with pytest.raises(ConfigError, match=arch):
            check_window(arch, size)


def test_a_pretraining_patch_the_architecture_cannot_take_is_refused_before_any_work(tmp_path):
    from fseft.pretraining import AssemblyConfig, PretrainConfig, pretrain

    assembly = AssemblyConfig(datasets=[str(tmp_path / "missing")], arch="swin_unetr", arch_kwargs={"feature_size": 12},
                              train=PretrainConfig(patch_size=(32, 32, 32)))
    with pytest.raises(ConfigError, match=r"patch_size \[32, 32, 32\].*too small"):
        pretrain(assembly, tmp_path / "out")
    assert not (tmp_path / "out").exists()
