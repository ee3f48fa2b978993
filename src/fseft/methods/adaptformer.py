"""`adaptformer`: a parallel bottleneck adapter beside each Swin MLP (Chen et al., 2022).

Each Swin block ``x -> x + attn(x)`` then ``x -> x + mlp(norm2(x))`` (tokens ``(B, X, Y, Z, C)``)
becomes, in its second half::

    x -> x + mlp(norm2(x)) + s * up(relu(down(x)))      down: Linear(C, d), up: Linear(d, C)

The adapter reads the same residual stream as the MLP branch, before ``norm2`` (AdaptFormer's
parallel design). ``up`` starts at zero, so the adapted network starts as the pre-trained one;
``s`` starts at 0.1, AdaptFormer's fixed scale, and is learnable unless ``learnable_scale=False``.

Parameters per block: ``2 C d + d + C`` (+1 for a learnable ``s``). With the default ``d = 16``
(the FSEFT reference bottleneck) the 48-channel encoder (``C`` = 48, 96, 192, 384, two blocks
each) has ``2 * (2 * 16 * 720 + 4 * 16 + 720)`` = 47,648 adapter weights and biases (the paper's
47.6K) plus 8 scales. Swin-UNETR only: the U-Net has no MLP blocks. Works with the blocks'
gradient checkpointing (``use_checkpoint=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from monai.networks.nets.swin_unetr import SwinTransformerBlock
from torch import nn
from torch.utils import checkpoint

from fseft.errors import ConfigError
from fseft.methods.peft_methods import EncoderMethodConfig, ModelParts, matches_targets, peft_targets
from fseft.methods.registry import register_method


@dataclass
class AdaptFormerConfig(EncoderMethodConfig):
    """Options of `adaptformer`: `bottleneck` width ``d``; `scale_init` of ``s``;
    `learnable_scale` (False: ``s`` fixed, as in AdaptFormer)."""

    default_lr: ClassVar[float] = 1e-3
    bottleneck: int = field(default=16, metadata={"help": "bottleneck width d of the adapters"})
    scale_init: float = 0.1
    learnable_scale: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.bottleneck) < 1:
            raise ConfigError(f"adaptformer: bottleneck must be >= 1, got {self.bottleneck}")
        if float(self.scale_init) == 0.0:
            # with s = 0 and up = 0 both receive zero gradient: the adapter could never learn
            raise ConfigError("adaptformer: scale_init must be non-zero")


class BottleneckAdapter(nn.Module):
    """``s * up(relu(down(x)))`` on tokens ``x (..., C)``; ``up`` zero-initialised."""

    #: every tensor of this module is saved with the adapter, the fixed scale included
    fseft_added: ClassVar[bool] = True

    def __init__(self, dim: int, bottleneck: int, scale_init: float = 0.1, learnable_scale: bool = True) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.up = nn.Linear(bottleneck, dim)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)), requires_grad=learnable_scale)
        if self.up.weight.device.type != "meta":
            with torch.no_grad():
                nn.init.zeros_(self.down.bias)  # down keeps PyTorch's Kaiming-uniform weights
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scale


class SwinBlockWithAdapter(nn.Module):
    """A (frozen) MONAI ``SwinTransformerBlock`` with a `BottleneckAdapter` parallel to its MLP.

    ``forward(x (B, X, Y, Z, C), mask_matrix)`` as the block's own, including its gradient
    checkpointing of each half.
    """

    def __init__(self, block: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.block = block
        self.adapter = adapter

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.forward_part2(x) + self.adapter(x)

    def forward(self, x: torch.Tensor, mask_matrix: torch.Tensor | None) -> torch.Tensor:
        block = self.block
        if block.use_checkpoint:
            attn = checkpoint.checkpoint(block.forward_part1, x, mask_matrix, use_reentrant=False)
        else:
            attn = block.forward_part1(x, mask_matrix)
        x = x + block.drop_path(attn)
        if block.use_checkpoint:
            return x + checkpoint.checkpoint(self._mlp_branch, x, use_reentrant=False)
        return x + self._mlp_branch(x)


@register_method("adaptformer", AdaptFormerConfig, "parallel bottleneck adapters beside the Swin MLPs", kind="network")
def _prepare_adaptformer(model: nn.Module, cfg: AdaptFormerConfig, parts: ModelParts) -> nn.Module:
    targets = peft_targets(model, "mlp")
    if not targets:
        raise ConfigError("adaptformer adapts the MLPs of Swin blocks; use it with a Swin-UNETR model")
    blocks = []  # the blocks holding the MLPs the architecture offers, in the encoder, in module order
    for top in parts.encoder:
        for name, _ in getattr(model, top).named_modules():
            if name and matches_targets(f"{top}.{name}", targets):
                blocks.append(f"{top}.{name}".rpartition(".")[0])
    for name in blocks:
        block = model.get_submodule(name)
        if not isinstance(block, SwinTransformerBlock):
            raise ConfigError(f"adaptformer wraps MONAI Swin transformer blocks; {name} is a {type(block).__name__}")
        ref = block.mlp.linear1.weight
        adapter = BottleneckAdapter(block.dim, int(cfg.bottleneck), float(cfg.scale_init), bool(cfg.learnable_scale))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SwinBlockWithAdapter(block, adapter.to(device=ref.device, dtype=ref.dtype)))
    return model
