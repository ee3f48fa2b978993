import numpy as np
import pytest
import torch

from fseft.errors import ConfigError
from fseft.methods import build_adapter
from fseft.methods.transductive import (
    TransductiveConfig,
    size_constraint_loss,
    size_constraint_step,
    target_sizes,
)


def test_target_size_is_the_mean_support_foreground():
    a = np.zeros((2, 4, 4, 4), np.uint8)
    b = np.zeros((2, 4, 4, 4), np.uint8)
    a[0, :2] = 1  # 32 voxels
    b[0, :1] = 1  # 16 voxels
    b[1, 0, 0, 0] = 1
    assert target_sizes([a, b]).tolist() == [24.0, 0.5]


def test_loss_is_zero_inside_the_margin_and_the_relative_error_beyond_it():
    target = torch.tensor([100.0])
    for inside in (70.0, 100.0, 140.0):  # |e| = 0.3, 0, 40 / 140 < 0.3
        assert size_constraint_loss(torch.tensor([inside]), target, gamma=0.3) == pytest.approx(0.0, abs=1e-6)
    low = size_constraint_loss(torch.tensor([50.0]), target, gamma=0.3)  # e = 50 / 100
    high = size_constraint_loss(torch.tensor([200.0]), target, gamma=0.3)  # e = 100 / 200
    assert low == pytest.approx(0.5 - 0.3)
    assert high == pytest.approx(0.5 - 0.3)


def test_gradient_pushes_the_size_back_into_the_band():
    target = torch.tensor([100.0, 100.0])
    size = torch.tensor([50.0, 150.0], requires_grad=True)
    size_constraint_loss(size, target, gamma=0.3).backward()
    assert size.grad[0] < 0  # too small: descending the loss grows it
    assert size.grad[1] > 0  # too large: descending the loss shrinks it


def test_config_is_validated():
    with pytest.raises(ConfigError, match="gamma"):
        TransductiveConfig(gamma=1.5)


@pytest.mark.parametrize("multiclass", [False, True])
def test_slabwise_step_gives_the_whole_volume_gradient(multiclass):
    torch.manual_seed(0)
    adapter = build_adapter("spatial-adapter", 3, 2 if multiclass else 1)
    torch.nn.init.normal_(adapter.trunk.conv2.weight, std=0.2)
    feats = torch.randn(3, 5, 4, 9)
    target = torch.tensor([5.0])
    cfg = TransductiveConfig(gamma=0.1, weight=1.0)
    loss = size_constraint_step(adapter, feats.numpy(), target, cfg, multiclass=multiclass, slab=2)
    slab_grads = [p.grad.clone() for p in adapter.parameters()]
    adapter.zero_grad()
    logits = adapter(feats[None])
    probs = torch.softmax(logits, 1)[:, 1:] if multiclass else torch.sigmoid(logits)
    ref = size_constraint_loss(probs.sum(dim=(0, 2, 3, 4)), target, 0.1)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-4)
    assert loss > 0
    for got, p in zip(slab_grads, adapter.parameters()):
        assert torch.allclose(got, p.grad, rtol=1e-3, atol=1e-6)


def test_step_inside_the_band_leaves_no_gradient():
    adapter = build_adapter("lp", 2, 1)
    torch.nn.init.zeros_(adapter.head.weight)
    torch.nn.init.zeros_(adapter.head.bias)  # p = 0.5 everywhere: size = 0.5 * 64 = 32
    loss = size_constraint_step(adapter, np.zeros((2, 4, 4, 4), np.float16), torch.tensor([32.0]), TransductiveConfig())
    assert loss == 0
    assert all(p.grad is None for p in adapter.parameters())
