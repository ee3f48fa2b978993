"""The model contract every fseft module codes against: a feature extractor and a 1x1x1 head.

Adapters (linear probes, PEFT, black-box adapters) build on the split: they replace `head`,
wrap `features`, or add modules between the two, without knowing the architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fseft.errors import ConfigError


@dataclass(frozen=True)
class ModelParts:
    """Top-level module names of an architecture's encoder, decoder, last decoder block and
    (Swin-UNETR) the convolutional blocks on its skip connections: what the fine-tuning methods
    mean by "encoder", "decoder" and "last block"."""

    encoder: tuple[str, ...]
    decoder: tuple[str, ...]
    last_block: tuple[str, ...]
    skip_blocks: tuple[str, ...] = ()
    head: str = "head"

    def decoder_modules(self, include_skip_blocks: bool = False) -> tuple[str, ...]:
        """What ``--decoder`` acts on."""
        return self.decoder + (self.skip_blocks if include_skip_blocks else ())


class SegmentationModel(nn.Module):
    """Volumetric segmentation network = `features` (backbone + decoder) then `head`.

    Attributes:
        arch: the architecture name used by `fseft.models.create_model` (e.g. ``"swin_unetr"``).
        class_names: canonical structure names, one output channel each (sigmoid, multi-label).
        feature_channels: channels of the map `features` returns.
        head: ``nn.Conv3d(feature_channels, len(class_names), kernel_size=1)``.
        arch_kwargs: the keyword arguments that rebuild this architecture (JSON-serialisable).
        split_points, parts, peft_targets: see the class attributes.
    """

    arch: ClassVar[str] = ""
    #: The encoder / decoder split the fine-tuning methods work on (None: they cannot adapt it).
    parts: ClassVar[ModelParts | None] = None
    #: The layers the encoder PEFT methods adapt, by kind: ``"attention"`` (projections),
    #: ``"mlp"`` (transformer MLP blocks), ``"conv"`` (encoder convolutions); each in peft's
    #: ``target_modules`` form (module-name suffixes, or one regular expression on full names).
    peft_targets: ClassVar[dict[str, list[str] | str]] = {}
    #: Optional frozen-prefix split (``point -> top-level modules computed after it``); an
    #: architecture that has one implements ``encode(x, point) -> dict`` and
    #: ``decode(tensors, point) -> features`` (`fseft.adaptation.encoder_cache` caches the prefix).
    split_points: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: The total downsampling of the deepest level (Swin-UNETR 32, the SuPreM U-Net 8): a window
    #: side ``s`` is seen at ``s, s / 2, ..., s / downsampling`` voxels.
    downsampling: ClassVar[int] = 1
    #: Architecture options that change the function the same weights compute (Swin-UNETR's
    #: ``patch_merging``, the U-Net's ``inference_norm``): a checkpoint must run with the ones it
    #: was trained with, so zoo ids declare them and model files record them.
    variant_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, class_names: Sequence[str], feature_channels: int) -> None:
        super().__init__()
        class_names = tuple(class_names)
        if not class_names:
            raise ConfigError("a segmentation model needs at least one class name")
        if len(set(class_names)) != len(class_names):
            raise ConfigError(f"duplicate class names: {class_names}")
        self.class_names: tuple[str, ...] = class_names
        self.feature_channels: int = int(feature_channels)
        self.head: nn.Conv3d = nn.Conv3d(self.feature_channels, len(class_names), kernel_size=1)
        self.arch_kwargs: dict[str, Any] = {}

    @classmethod
    def check_window(cls, size: Sequence[int]) -> None:
        """`ValueError` when a ``(D, H, W)`` input window cannot pass through the architecture
        (checked before any work: training patches, sliding windows); none by default."""

    def check_input(self, x: torch.Tensor) -> None:
        """`ValueError` unless ``x`` is ``(B, C, D, H, W)`` with a window `check_window` accepts."""
        if x.ndim != 5:
            raise ValueError(f"{self.arch} expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        self.check_window(x.shape[2:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last decoder feature map before the head.

        Args:
            x: ``(B, 1, D, H, W)`` preprocessed CT.
        Returns:
            ``(B, feature_channels, D, H, W)``, full input resolution.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, len(class_names), D, H, W)`` for ``x`` ``(B, 1, D, H, W)``; sigmoid per class."""
        return self.head(self.features(x))

    def extra_repr(self) -> str:
        return f"classes={len(self.class_names)}, feature_channels={self.feature_channels}"


def check_divisible(size: Sequence[int], divisor: int, arch: str) -> tuple[int, ...]:
    """A window ``(D, H, W)`` as ints; `ValueError` unless each side is a positive multiple of
    `divisor` (the architecture's total downsampling)."""
    size = tuple(int(s) for s in size)
    if any(s % divisor or s < divisor for s in size):
        raise ValueError(
            f"{arch}: spatial shape {size} must be divisible by {divisor} "
            "(pad the input or choose such a sliding-window roi_size)"
        )
    return size
