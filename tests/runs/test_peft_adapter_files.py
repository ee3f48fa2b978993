"""Adapters saved apart from the base: base + adapter reproduces the trained model; merge."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fseft.training.losses import per_class_bce_dice
from fseft.errors import ConfigError, InputFileError
from fseft.runs.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapted,
    merge,
    prepare_base_head,
    read_run_record,
    save_adapter,
)
from fseft.methods.peft_methods import apply_method, method_train_mode, post_step, trainable_parameters
from fseft.models.zoo import create_model

SWIN = dict(feature_size=12, depths=(1, 1, 1, 1))
SWIN_X = (1, 1, 32, 32, 64)
UNET_X = (2, 1, 16, 16, 16)




def _train(model: nn.Module, shape: tuple[int, ...], steps: int = 2, lr: float = 1e-2) -> None:
    """A few AdamW steps on random data, as the training loop runs them."""
    gen = torch.Generator().manual_seed(1)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=lr)
    method_train_mode(model)
    for _ in range(steps):
        x = torch.rand(shape, generator=gen)
        y = (torch.rand((shape[0], len(model.class_names), *shape[2:]), generator=gen) > 0.7).float()
        optimizer.zero_grad()
        per_class_bce_dice(model(x), y).mean().backward()
        optimizer.step()
        post_step(model, optimizer)
    model.eval()


CASES = [
    ("unet", "ft", {}),
    ("unet", "ft-last", {}),
    ("unet", "scratch", {}),
    ("unet", "bitfit", {"decoder": "fine-tuned"}),
    ("unet", "affine", {"decoder": "new"}),
    ("unet", "lora", {"decoder": "new"}),
    ("unet", "arena", {"rank": 2}),
    ("swin", "bitfit", {}),
    ("swin", "affine", {"decoder": "fine-tuned"}),
    ("swin", "lora", {"decoder": "fine-tuned"}),
    ("swin", "adaptformer", {"learnable_scale": False}),
    ("swin", "arena", {"rank": 4}),
]


@pytest.mark.parametrize("arch,method,options", CASES, ids=[f"{a}-{m}-{'-'.join(map(str, o.values()))}" for a, m, o in CASES])
def test_save_then_load_into_fresh_base_reproduces_outputs(tmp_path, swin_base, unet_base, arch, method, options):
    base = swin_base if arch == "swin" else unet_base
    shape = SWIN_X if arch == "swin" else UNET_X
    torch.manual_seed(2)
    model = apply_method(copy.deepcopy(base), method, ["liver", "gallbladder"], **options)
    _train(model, shape)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(expected[:, 0], base(x)[:, 0])  # training changed something
    sizes = save_adapter(model, tmp_path, extra={"base": "unit-test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert sizes[ADAPTER_WEIGHTS] == (tmp_path / ADAPTER_WEIGHTS).stat().st_size

    # only what was trained or added is in the file (plus BatchNorm statistics of trained norms)
    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    saved_scalars = sum(t.numel() for k, t in saved.items() if "running_" not in k and "num_batches" not in k)
    trained = sum(p.numel() for _, p in trainable_parameters(model))
    fixed_scales = 4 if method == "adaptformer" else 0  # one fixed scale per Swin block (4 stages x 1)
    assert saved_scalars == trained + fixed_scales
    if method in ("bitfit", "affine", "lora", "adaptformer", "arena") and "decoder" not in options:
        assert saved_scalars < 0.5 * sum(p.numel() for p in base.parameters())

    torch.manual_seed(123)  # a different random state: nothing may depend on it
    loaded = load_adapted(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        got = loaded(x)
    assert loaded.class_names == ("liver", "gallbladder")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    record = read_run_record(tmp_path)
    assert record["method"] == method and record["extra"] == {"base": "unit-test"}


def test_lora_folder_is_a_plain_peft_adapter(tmp_path, unet_base):
    from peft import PeftModel

    model = apply_method(copy.deepcopy(unet_base), "lora", ["liver", "gallbladder"], decoder="fine-tuned", rank=2)
    _train(model, UNET_X)
    x = torch.rand(UNET_X)
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert "up_tr64" in config["modules_to_save"] and "head" in config["modules_to_save"]
    keys = load_file(str(tmp_path / ADAPTER_WEIGHTS)).keys()
    assert any("lora_A" in k for k in keys) and not any("down_tr64.ops.0.conv1.base_layer" in k for k in keys)
    # peft's own loader, onto a base that has the run's head layout
    peft_model = PeftModel.from_pretrained(prepare_base_head(copy.deepcopy(unet_base), tmp_path), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "arena"])
def test_merge_folds_low_rank_updates_into_base_weights(unet_base, method):
    model = apply_method(copy.deepcopy(unet_base), method, ["liver"], decoder="fine-tuned", rank=2)
    _train(model, UNET_X)
    x = torch.rand(UNET_X)
    with torch.no_grad():
        expected = model(x)
        merged = merge(model).eval()
        assert type(merged).__name__ == "UNet3DSegmenter"
        assert not any("lora" in n or ".gate" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-5)


def test_merge_swin_lora(swin_base):
    model = apply_method(copy.deepcopy(swin_base), "lora", ["liver"], rank=2)
    _train(model, SWIN_X, steps=1)
    x = torch.rand(SWIN_X)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(merge(model).eval()(x), expected, rtol=0, atol=1e-5)


def test_loading_onto_the_wrong_base_or_folder_fails_clearly(tmp_path, unet_base):
    model = apply_method(copy.deepcopy(unet_base), "bitfit", ["liver"])
    save_adapter(model, tmp_path)
    other = create_model("unet3d", ["liver", "spleen"], base_channels=8)
    with pytest.raises(InputFileError, match="another base model.*base_channels"):
        load_adapted(other, tmp_path)
    with pytest.raises(InputFileError, match="another base model.*classes"):
        load_adapted(create_model("unet3d", ["liver"], base_channels=4), tmp_path)
    with pytest.raises(InputFileError, match="not found"):
        load_adapted(copy.deepcopy(unet_base), tmp_path / "missing")
    with pytest.raises(ConfigError, match="apply_method"):
        save_adapter(copy.deepcopy(unet_base), tmp_path / "plain")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ADAPTER_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(InputFileError, match="adapter_model.safetensors"):
        load_adapted(copy.deepcopy(unet_base), tmp_path / "bad")
