"""Methods of kind ``"features"`` (black-box): a small `FeatureAdapter` trained on the cached
frozen features of the base model::

    @register_method("lp", LinearProbeConfig)
    class LinearProbe(FeatureAdapter): ...

    adapter = build_adapter("spatial-adapter", feature_channels=48, num_outputs=2, kernel_size=1)

An adapter maps the frozen features ``Z (B, C, X, Y, Z)`` of `SegmentationModel.features` to
logits ``(B, num_outputs, X, Y, Z)``: ``forward(z) = head(trunk(z))`` with ``head`` a 1x1x1
``nn.Conv3d``, so that an adapter on top of a base model is again a `SegmentationModel`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fseft.methods.head import head_rows, init_head
from fseft.methods.registry import MethodConfig, get_method, spec_of_config


class FeatureAdapter(nn.Module):
    """A module on frozen features: ``forward(z (B, C, X, Y, Z)) -> logits (B, O, X, Y, Z)``.

    Subclasses set `trunk` (a module mapping ``C -> C`` channels; identity for a linear probe)
    and `halo`, the number of voxels of context each side the trunk reads (0 for pointwise
    modules), which `iter_slab_logits` uses to process a whole volume slab by slab exactly.
    """

    halo: int = 0

    def __init__(self, feature_channels: int, num_outputs: int) -> None:
        super().__init__()
        self.feature_channels = int(feature_channels)
        self.num_outputs = int(num_outputs)
        self.trunk: nn.Module = nn.Identity()
        self.head = nn.Conv3d(self.feature_channels, self.num_outputs, kernel_size=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(z))


def build_adapter(
    method: str | MethodConfig, feature_channels: int, num_outputs: int, **options: Any
) -> FeatureAdapter:
    """Build a method's adapter module (randomly initialised; see `adapter_on`).

    `method` is a registered name (then `options` are its config fields) or a config instance.
    """
    if isinstance(method, MethodConfig):
        spec, cfg = spec_of_config(method, "features"), method
    else:
        spec = get_method(method, kind="features")
        cfg = spec.make_config(**options)
    return spec.module_cls(feature_channels, num_outputs, cfg)


def adapter_on(base: nn.Module, method: str, options: dict[str, Any], structures: Sequence[str],
               multiclass: bool) -> tuple[FeatureAdapter, list[int | None]]:
    """The adapter of `method` on `base`'s features for `structures` (plus a background output 0
    when `multiclass`), its head started from the base head's rows where the method says so
    (`init_from_head`). Returns the adapter and, per output, the base row it started from."""
    cfg = get_method(method, kind="features").make_config(**options)
    adapter = build_adapter(cfg, base.feature_channels, len(structures) + int(multiclass))
    rows = head_rows(base.class_names, structures, multiclass) if cfg.init_from_head else [None] * adapter.num_outputs
    init_head(adapter.head, base.head, rows, multiclass)
    return adapter, rows


def count_trainable_parameters(module: nn.Module) -> int:
    """Number of scalar parameters with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def foreground_probabilities(logits: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """Per-structure probabilities ``(B, S, ...)`` from logits: sigmoid, or softmax over
    ``(background, structures...)`` with the background channel dropped."""
    if multiclass:
        return torch.softmax(logits.float(), dim=1)[:, 1:]
    return torch.sigmoid(logits.float())


def iter_slab_logits(
    adapter: FeatureAdapter,
    features: np.ndarray | torch.Tensor,
    slab: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Run `adapter` over a whole volume's features, slab by slab along the last axis.

    `features` is ``(C, X, Y, Z)`` (a NumPy memmap is read one slab at a time). Yields
    ``(z_slice, logits (1, O, X, Y, z_slice))``; each slab is read with `adapter.halo` extra
    slices on both sides and cropped back, so the concatenated logits equal one whole-volume
    forward. Gradients flow when called with grad enabled (the caller backpropagates each slab).
    `autocast_dtype` (e.g. ``torch.bfloat16``) runs the adapter under autocast, on slabs read in
    that dtype (no mixed-precision residual sums); otherwise slabs are read as `dtype`.
    """
    device = torch.device(device)
    depth = features.shape[-1]
    halo = int(adapter.halo)
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        a, b = max(0, z0 - halo), min(depth, z1 + halo)
        chunk = features[..., a:b]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.array(chunk))  # a writable copy of the slab only
        chunk = chunk.to(device=device, dtype=autocast_dtype or dtype).unsqueeze(0)
        amp = autocast_dtype is not None
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=amp):
            logits = adapter(chunk)
        yield slice(z0, z1), logits[..., z0 - a : z0 - a + (z1 - z0)]


@torch.no_grad()
def predict_cached(
    adapter: nn.Module, features: np.ndarray, multiclass: bool, slab: int = 32,
    device: str | torch.device = "cpu", bf16: bool = False,
) -> torch.Tensor:
    """Per-structure probabilities ``(S, X, Y, Z)`` float32 (CPU) of a whole cached volume
    ``(C, X, Y, Z)``."""
    adapter.eval()
    parts = [
        foreground_probabilities(logits, multiclass)[0].cpu()
        for _, logits in iter_slab_logits(
            adapter, features, slab, device, autocast_dtype=torch.bfloat16 if bf16 else None
        )
    ]
    return torch.cat(parts, dim=-1)
