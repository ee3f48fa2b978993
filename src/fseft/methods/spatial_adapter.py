"""Spatial adapter (`spatial-adapter`, Silva-Rodríguez et al., FSEFT).

A residual block on the frozen features before a linear-probe head::

    Z' = Z + conv2(relu(conv1(Z)))      conv1, conv2: bias-free k x k x k convolutions, C -> C
    logits = head(Z')                   head: 1x1x1 convolution, as in `lp`

`conv2` starts at zero, so at step 0 the adapter reproduces the linear probe (the pre-trained
head's prediction when initialised from it). With C = 48 and k = 3 the block has
2 * 48 * 48 * 27 = 124,416 weights (+ 49 per structure in the head). ``kernel_size=1`` is the
paper's MLP-adapter ablation (a per-voxel two-layer MLP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from fseft.errors import ConfigError
from fseft.methods.features import FeatureAdapter
from fseft.methods.registry import MethodConfig, register_method


@dataclass
class SpatialAdapterConfig(MethodConfig):
    """Options of `spatial-adapter`: `kernel_size` of both convolutions (odd; 1 = MLP adapter)."""

    default_lr: ClassVar[float] = 1e-2
    default_epochs: ClassVar[int] = 100
    protocol_source: ClassVar[str] = ("FSEFT run commands: lr 1e-2, 100 epochs (the workshop paper states an "
                                      "initial lr of 0.5)")
    kernel_size: int = field(default=3, metadata={"help": "kernel size of both convolutions (odd; 1 = MLP adapter)"})

    def __post_init__(self) -> None:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"spatial-adapter: kernel_size must be odd and >= 1, got {self.kernel_size}")


class ResidualConvBlock(nn.Module):
    """``z + conv2(relu(conv1(z)))`` with bias-free, same-padded ``C -> C`` convolutions;
    `conv2` is zero-initialised so the block starts as the identity."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv3d(channels, channels, kernel_size, padding=pad, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size, padding=pad, bias=False)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, z):
        return z + self.conv2(self.act(self.conv1(z)))


@register_method("spatial-adapter", SpatialAdapterConfig)
class SpatialAdapter(FeatureAdapter):
    """Residual convolutional adapter on the frozen features, then a 1x1x1 head."""

    def __init__(self, feature_channels: int, num_outputs: int, cfg: MethodConfig | None = None) -> None:
        super().__init__(feature_channels, num_outputs)
        self.cfg = cfg if cfg is not None else SpatialAdapterConfig()
        k = int(self.cfg.kernel_size)
        self.trunk = ResidualConvBlock(feature_channels, k)
        # Two stacked k-wide convolutions read k // 2 voxels each side, twice.
        self.halo = 2 * (k // 2)
