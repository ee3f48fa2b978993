import pytest
import torch
from torch import nn

from fseft.errors import ConfigError
from fseft.methods import (
    available_methods,
    build_adapter,
    count_trainable_parameters,
    get_method,
    init_head,
    iter_slab_logits,
)


def test_registry_lists_the_builtin_methods():
    assert set(available_methods("features")) == {"generalization", "lp", "spatial-adapter"}
    assert {"lora", "ft", "arena"} < set(available_methods())  # one registry of every method
    assert all(get_method(n).kind == "features" and get_method(n).module_cls for n in available_methods("features"))
    assert not get_method("generalization").config_cls.trainable


def test_default_protocols_are_the_reference_run_commands():
    """../shared/protocols.md: lp 1e-1 / 50 epochs, spatial adapter and ft-last 1e-2 / 100,
    ft and scratch 1e-4 with 2 volumes of 3 patches."""
    from fseft.adaptation import AdaptConfig

    def protocol(method):
        cfg = AdaptConfig(method=method).resolved()
        return cfg.lr, cfg.epochs, cfg.batch_size, cfg.patches_per_volume

    assert protocol("lp") == (pytest.approx(1e-1), 50, 1, 6)
    assert protocol("spatial-adapter") == (pytest.approx(1e-2), 100, 1, 6)
    assert protocol("ft-last") == (pytest.approx(1e-2), 100, 1, 6)
    assert protocol("ft") == (pytest.approx(1e-4), 100, 2, 3)
    assert protocol("scratch") == (pytest.approx(1e-4), 100, 2, 3)
    assert AdaptConfig(method="lp", lr=0.5, epochs=3).resolved().lr == 0.5  # given values stay
    assert AdaptConfig(method="lp", lr=0.5, epochs=3).resolved().epochs == 3


def test_unknown_method_and_option_are_config_errors():
    with pytest.raises(ConfigError, match="unknown adaptation method 'lorra'.*spatial-adapter.*lora"):
        get_method("lorra")
    with pytest.raises(ConfigError, match="'lora' is trained through the network.*spatial-adapter"):
        build_adapter("lora", 8, 1)
    with pytest.raises(ConfigError, match="no option.*rank"):
        build_adapter("lp", 8, 1, rank=4)
    with pytest.raises(ConfigError, match="kernel_size must be odd"):
        build_adapter("spatial-adapter", 8, 1, kernel_size=2)


def test_parameter_counts_for_the_48_channel_swin_unetr():
    # No forward pass: the counts follow from the shapes alone.
    assert count_trainable_parameters(build_adapter("lp", 48, 1)) == 49
    assert count_trainable_parameters(build_adapter("lp", 48, 3)) == 3 * 49
    spatial = build_adapter("spatial-adapter", 48, 1)
    assert count_trainable_parameters(spatial.trunk) == 124_416
    assert count_trainable_parameters(spatial) == 124_416 + 49
    mlp = build_adapter("spatial-adapter", 48, 1, kernel_size=1)
    assert count_trainable_parameters(mlp) == 2 * 48 * 48 + 49
    assert count_trainable_parameters(build_adapter("generalization", 48, 2)) == 0


def test_spatial_adapter_convolutions_are_bias_free_and_last_is_zero():
    spatial = build_adapter("spatial-adapter", 6, 1)
    assert spatial.trunk.conv1.bias is None and spatial.trunk.conv2.bias is None
    assert torch.count_nonzero(spatial.trunk.conv2.weight) == 0
    assert torch.count_nonzero(spatial.trunk.conv1.weight) > 0


def _head(channels: int, classes: int) -> nn.Conv3d:
    torch.manual_seed(3)
    head = nn.Conv3d(channels, classes, 1)
    nn.init.normal_(head.weight)
    nn.init.normal_(head.bias)
    return head


def test_lp_init_copies_the_head_rows_of_known_structures_only():
    base = _head(6, 4)
    lp = build_adapter("lp", 6, 2)
    before = lp.head.weight[1].clone()
    init_head(lp.head, base, [2, None])
    assert torch.equal(lp.head.weight[0], base.weight[2])
    assert torch.equal(lp.head.bias[0], base.bias[2])
    assert torch.equal(lp.head.weight[1], before)  # unknown structure: random init kept
    z = torch.randn(1, 6, 4, 5, 3)
    assert torch.allclose(lp(z)[:, :1], base(z)[:, 2:3], atol=1e-6)


def test_zero_init_spatial_adapter_reproduces_the_head_prediction_at_step_0():
    base = _head(6, 3)
    spatial = build_adapter("spatial-adapter", 6, 2)
    init_head(spatial.head, base, [1, 0])
    z = torch.randn(1, 6, 5, 6, 7)
    assert torch.allclose(spatial(z), base(z)[:, [1, 0]], atol=1e-5)


def test_zero_init_conv_still_receives_a_gradient():
    spatial = build_adapter("spatial-adapter", 4, 1)
    spatial(torch.randn(1, 4, 5, 5, 5)).sum().backward()
    assert spatial.trunk.conv2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method,options", [("lp", {}), ("spatial-adapter", {}), ("spatial-adapter", {"kernel_size": 5})])
def test_slab_logits_equal_one_whole_volume_forward(method, options):
    torch.manual_seed(0)
    adapter = build_adapter(method, 4, 2, **options)
    if method == "spatial-adapter":  # make the residual branch non-trivial
        nn.init.normal_(adapter.trunk.conv2.weight, std=0.1)
    feats = torch.randn(4, 6, 5, 11)
    whole = adapter(feats[None])
    parts = torch.cat([logits for _, logits in iter_slab_logits(adapter, feats.numpy(), slab=3)], dim=-1)
    assert parts.shape == whole.shape
    assert torch.allclose(parts, whole, atol=1e-5)


def test_new_structure_outputs_start_at_the_support_foreground_prior():
    import numpy as np
    import torch
    from torch import nn

    from fseft.methods import foreground_fractions, init_head_prior

    labels = [np.zeros((2, 10, 10, 10), np.uint8), np.zeros((2, 10, 10, 10), np.uint8)]
    labels[0][0, :5] = 1  # structure 0: half of volume 0, none of volume 1
    labels[1][1, 0, 0, :2] = 1  # structure 1: 2 voxels of 1,000 in volume 1
    fractions = foreground_fractions(labels)
    assert fractions == pytest.approx([0.25, 0.001])

    head = nn.Conv3d(4, 2, 1)
    before = head.bias.detach().clone()
    assert init_head_prior(head, [0, None], fractions) == [1]  # output 0 keeps its pre-trained row
    assert head.bias[0] == before[0]
    assert float(torch.sigmoid(head.bias[1])) == pytest.approx(0.001, rel=1e-4)

    multi = nn.Conv3d(4, 3, 1)
    with torch.no_grad():
        multi.bias.zero_()
    assert init_head_prior(multi, [None, None, 5], fractions, multiclass=True) == [1]  # background untouched
    assert float(multi.bias[0]) == 0.0 and float(multi.bias[2]) == 0.0
    assert float(multi.bias[1]) == pytest.approx(np.log(0.25 / (1 - 0.251)))
    with pytest.raises(ValueError, match="2 rows and 2 fractions for 3 outputs"):
        init_head_prior(multi, [None, None], fractions, multiclass=True)
