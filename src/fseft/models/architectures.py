"""The architectures by name: `create_model` and `check_window` without weights.

A leaf of `fseft.models`: it knows the architecture classes (`swin_unetr`, `unet3d`), and
`checkpoint` (rebuilding a model file) and `zoo` (the public checkpoints) build on it. Each
class declares what the adaptation methods need (`SegmentationModel.parts`,
`SegmentationModel.peft_targets`), so no method keeps a table of architectures.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from fseft.errors import ConfigError
from fseft.models.base import SegmentationModel
from fseft.models.swin_unetr import SwinUNETRSegmenter
from fseft.models.unet import UNet3DSegmenter

ARCHITECTURES: dict[str, type[SegmentationModel]] = {
    SwinUNETRSegmenter.arch: SwinUNETRSegmenter,
    UNet3DSegmenter.arch: UNet3DSegmenter,
}
ARCH_ALIASES = {"swinunetr": "swin_unetr", "swin-unetr": "swin_unetr", "unet": "unet3d", "unet_3d": "unet3d"}


def architecture(arch: str) -> type[SegmentationModel]:
    """The class of architecture `arch` (or one of its aliases); `ConfigError` listing them."""
    name = ARCH_ALIASES.get(arch.lower(), arch.lower())
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def create_model(arch: str, class_names: Sequence[str], **arch_kwargs: Any) -> SegmentationModel:
    """Build an architecture with random weights.

    Args:
        arch: ``"swin_unetr"`` or ``"unet3d"`` (aliases ``swinunetr``, ``unet``).
        class_names: one sigmoid output channel per structure.
        **arch_kwargs: architecture options, e.g. ``feature_size=12`` (Swin-UNETR),
            ``base_channels=8`` (U-Net), ``use_checkpoint=True``.
    """
    cls = architecture(arch)
    try:
        return cls(class_names, **arch_kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid options for architecture {cls.arch!r}: {exc}") from exc


def check_window(arch: str, size: Sequence[int]) -> None:
    """`ConfigError` when a window of `size` voxels cannot pass through architecture `arch`
    (its class's `check_window`), without building the model."""
    try:
        architecture(arch).check_window(size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def variant_options(arch: str, arch_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture's `SegmentationModel.variant_options` as ``arch_kwargs`` sets them, the
    architecture's default where absent (a model file written before the option existed), e.g.
    ``{"patch_merging": "current"}``."""
    cls = architecture(arch)
    defaults = inspect.signature(cls.__init__).parameters
    return {name: arch_kwargs.get(name, defaults[name].default) for name in cls.variant_options}
