"""The 3D U-Net of Models Genesis, used as backbone by SuPreM and the CLIP-Driven Universal Model.

Module names follow the public checkpoints (``down_tr64 .. down_tr512``, ``up_tr256 .. up_tr64``,
each ``ops.<i>.conv1`` / ``ops.<i>.bn1``, ``up_conv``); the public ``out_tr.final_conv`` is `head`.

Channel layout with ``base_channels=b`` (b = 32 in the public models): encoder stage ``d``
(0..3) maps to ``b*2^d`` then ``b*2^(d+1)`` channels; decoder stage ``d`` (2..0) upsamples
and concatenates the skip, then two convolutions to ``b*2^(d+1)`` channels. The feature map
before the head has ``2*b`` (64) channels at full resolution.

The public code normalises with batch statistics even at inference (SuPreM's ``ContBatchNorm3d``
always calls ``F.batch_norm`` in training mode): ``inference_norm="batch"`` does the same
(`BatchStatisticsNorm3d`, the default of the ``suprem_unet`` zoo id); ``"running"`` (the
architecture's default, that of fseft-trained U-Nets) is `nn.BatchNorm3d` following `train()` /
`eval()`, the running statistics in eval.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fseft.errors import ConfigError
from fseft.models.base import ModelParts, SegmentationModel, check_divisible


class BatchStatisticsNorm3d(nn.BatchNorm3d):
    """Batch norm that normalises with the statistics of the batch in eval mode too, as the
    public SuPreM / Models Genesis U-Net does. In training it is `nn.BatchNorm3d`; in eval the
    running statistics are neither used nor updated (the public block updates them at
    inference, a side effect that does not change its output).

    So the output for one volume depends on the other volumes (sliding windows) in its batch,
    as in the public model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


#: ``inference_norm`` option -> the U-Net's batch-norm class
INFERENCE_NORMS: dict[str, type[nn.BatchNorm3d]] = {"running": nn.BatchNorm3d, "batch": BatchStatisticsNorm3d}


class ConvBNAct(nn.Module):
    """3x3x3 convolution, batch norm, activation (key names ``conv1``, ``bn1``)."""

    def __init__(self, in_channels: int, out_channels: int, act: str, norm: type[nn.BatchNorm3d] = nn.BatchNorm3d) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = norm(out_channels)
        if act == "relu":
            self.activation: nn.Module = nn.ReLU(inplace=True)
        elif act == "prelu":
            self.activation = nn.PReLU(out_channels)
        elif act == "elu":
            self.activation = nn.ELU(inplace=True)
        else:
            raise ConfigError(f"unknown activation {act!r}; use relu, prelu or elu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class DownStage(nn.Module):
    """Two convolutions, then (except at the bottom) 2x max pooling; returns (pooled, skip)."""

    def __init__(self, in_channels: int, depth: int, base: int, act: str, pool: bool,
                 norm: type[nn.BatchNorm3d] = nn.BatchNorm3d) -> None:
        super().__init__()
        mid, out = base * 2**depth, base * 2 ** (depth + 1)
        self.ops = nn.Sequential(ConvBNAct(in_channels, mid, act, norm), ConvBNAct(mid, out, act, norm))
        self.maxpool = nn.MaxPool3d(2) if pool else nn.Identity()
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return self.maxpool(skip), skip


class UpStage(nn.Module):
    """2x transposed convolution, concatenation with the skip, two convolutions."""

    def __init__(self, in_channels: int, skip_channels: int, depth: int, base: int, act: str,
                 norm: type[nn.BatchNorm3d] = nn.BatchNorm3d) -> None:
        super().__init__()
        out = base * 2 ** (depth + 1)
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = nn.Sequential(ConvBNAct(in_channels + skip_channels, out, act, norm), ConvBNAct(out, out, act, norm))
        self.out_channels = out

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class UNet3DSegmenter(SegmentationModel):
    """Models Genesis / SuPreM 3D U-Net; `features` is the ``2*base_channels`` full-resolution map.

    Args:
        class_names: one output channel per structure.
        base_channels: 32 for the public checkpoints (64 feature channels); 4 or 8 for tests.
        act: ``"relu"`` (public checkpoints), ``"prelu"`` or ``"elu"``.
        in_channels: input channels (1 for CT).
        inference_norm: ``"running"`` (batch norm with running statistics in eval) or
            ``"batch"`` (batch statistics in eval too, as the public SuPreM U-Net:
            `BatchStatisticsNorm3d`). Recorded in model files; a file without it is ``"running"``.
    """

    arch = "unet3d"
    parts = ModelParts(
        encoder=("down_tr64", "down_tr128", "down_tr256", "down_tr512"),
        decoder=("up_tr256", "up_tr128", "up_tr64"),
        last_block=("up_tr64",),
    )
    #: the encoder's 3x3x3 convolutions (the U-Net has no attention or MLP)
    peft_targets = {"conv": r"down_tr\d+\.ops\.\d+\.conv1"}

    def __init__(
        self,
        class_names: Sequence[str],
        base_channels: int = 32,
        act: str = "relu",
        in_channels: int = 1,
        inference_norm: str = "running",
    ) -> None:
        b = int(base_channels)
        super().__init__(class_names, feature_channels=2 * b)
        if inference_norm not in INFERENCE_NORMS:
            raise ConfigError(f"unet3d: unknown inference_norm {inference_norm!r}; choose one of {', '.join(INFERENCE_NORMS)}")
        norm = INFERENCE_NORMS[inference_norm]
        self.down_tr64 = DownStage(in_channels, 0, b, act, pool=True, norm=norm)
        self.down_tr128 = DownStage(2 * b, 1, b, act, pool=True, norm=norm)
        self.down_tr256 = DownStage(4 * b, 2, b, act, pool=True, norm=norm)
        self.down_tr512 = DownStage(8 * b, 3, b, act, pool=False, norm=norm)
        self.up_tr256 = UpStage(16 * b, 8 * b, 2, b, act, norm)
        self.up_tr128 = UpStage(8 * b, 4 * b, 1, b, act, norm)
        self.up_tr64 = UpStage(4 * b, 2 * b, 0, b, act, norm)
        self.arch_kwargs = {"base_channels": b, "act": act, "in_channels": int(in_channels),
                            "inference_norm": inference_norm}

    variant_options = ("inference_norm",)
    downsampling = 8

    @classmethod
    def check_window(cls, size: Sequence[int]) -> None:
        """`ValueError` unless each side of a ``(D, H, W)`` window is a positive multiple of 8."""
        check_divisible(size, cls.downsampling, "unet3d")

    #: Split points (see `SwinUNETRSegmenter.split_points`): ``skips`` = the bottleneck and the
    #: three skip tensors the decoder reads; ``last`` = the inputs of the last up stage.
    split_points = {"skips": ("up_tr256", "up_tr128", "up_tr64"), "last": ("up_tr64",)}

    def encode(self, x: torch.Tensor, point: str) -> dict[str, torch.Tensor]:
        """Tensors at `point`: ``skips``: ``x512`` (1/8) and ``skip256``, ``skip128``, ``skip64``
        (1/4, 1/2, full resolution); ``last``: ``up128`` (1/2) and ``skip64``."""
        self.check_input(x)
        if point not in self.split_points:
            raise ValueError(f"unet3d: no split point {point!r}; choose one of {', '.join(self.split_points)}")
        x64, skip64 = self.down_tr64(x)
        x128, skip128 = self.down_tr128(x64)
        x256, skip256 = self.down_tr256(x128)
        x512, _ = self.down_tr512(x256)
        out = {"x512": x512, "skip256": skip256, "skip128": skip128, "skip64": skip64}
        if point == "skips":
            return out
        return {"up128": self.up_tr128(self.up_tr256(x512, skip256), skip128), "skip64": skip64}

    def decode(self, tensors: dict[str, torch.Tensor], point: str) -> torch.Tensor:
        """The `features` from the tensors `encode` gave at `point`."""
        if point not in self.split_points:
            raise ValueError(f"unet3d: no split point {point!r}; choose one of {', '.join(self.split_points)}")
        if point == "skips":
            up256 = self.up_tr256(tensors["x512"], tensors["skip256"])
            tensors = {"up128": self.up_tr128(up256, tensors["skip128"]), "skip64": tensors["skip64"]}
        return self.up_tr64(tensors["up128"], tensors["skip64"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> ``(B, 2*base_channels, D, H, W)``; D, H, W divisible by 8."""
        return self.decode(self.encode(x, "skips"), "skips")
