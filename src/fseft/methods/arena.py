"""`arena`: LoRA with an adaptive rank, chosen per layer by an L1 penalty on a rank gate.

Each targeted layer ``W`` gets ``delta W = (alpha / r) B diag(v) A`` with ``A (r, in)``,
``B (out, r)`` and a gate ``v (r,)``; the training objective adds ``l1 * ||v||_1``, solved by a
proximal (soft-threshold) step after each optimiser step (`proximal_step`)::

    v <- sign(v) * max(|v| - t, 0)

with ``t = lr * l1`` and ``lr`` the gate's current learning rate (schedulers apply). The
number of non-zero gates is the layer's effective rank (`effective_ranks`): it starts at ``r``
and shrinks where a direction does not pay its penalty; a zero gate comes back when its
gradient step outweighs the threshold.

With Adam / AdamW the gradient step on each gate is normalised to at most ``lr`` in size
(``lr * m_hat / sqrt(v_hat)``), so the threshold reads on the same scale: a gate survives only
while its normalised step ``|m_hat / sqrt(v_hat)|`` (how consistently its gradient pushes it
away from zero) exceeds ``l1``; ``l1`` in ``(0, 1)`` is scale-free, and ``l1 >= 1`` closes
every gate. A gate starting at 1 needs at least ``1 / (lr * l1)`` steps to close.

Initialisation as LoRA: ``A`` Kaiming-uniform, ``B = 0``, ``v = 1`` (full rank ``r``; the
network starts as the pre-trained one).

Targets: the Swin attention ``qkv`` (``nn.Linear``), or the U-Net encoder's 3x3x3 convolutions
(``A`` a convolution like the base one with ``r`` outputs, ``B`` a 1x1x1 convolution).
`merge_arena` folds ``delta W`` into the base weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fseft.errors import ConfigError
from fseft.methods.peft_methods import EncoderMethodConfig, ModelParts, low_rank_targets, matches_targets
from fseft.methods.registry import register_method


@dataclass
class ArenaConfig(EncoderMethodConfig):
    """Options of `arena`: `rank` (maximum rank ``r``), `alpha` (``alpha / r`` scales the
    update), `l1` (penalty on the gates; with AdamW, in ``(0, 1)``), `target_modules` (as peft's: name suffixes, or one
    regular expression matched against full names; None: the architecture's attention projections, or its encoder
    convolutions)."""

    default_lr: ClassVar[float] = 1e-3
    rank: int = field(default=16, metadata={"help": "rank r of the low-rank update (arena: its maximum)"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator (alpha / r scales the update)"})
    l1: float = field(default=0.5, metadata={"help": "L1 penalty on the rank gates, in (0, 1)"})
    target_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.rank) < 1:
            raise ConfigError(f"arena: rank must be >= 1, got {self.rank}")
        if float(self.l1) < 0:
            raise ConfigError(f"arena: l1 must be >= 0, got {self.l1}")


class AdaptiveRankLayer(nn.Module):
    """A frozen ``nn.Linear`` or ``nn.Conv3d`` plus ``scaling * up(gate * down(x))``.

    Linear: ``x (..., in) -> (..., out)``; ``down`` Linear(in, r), ``up`` Linear(r, out), the
    gate scales the last axis. Conv3d: ``x (B, in, X, Y, Z)``; ``down`` a bias-free copy of the
    base convolution's geometry with ``r`` outputs, ``up`` a 1x1x1 convolution ``r -> out``,
    the gate scales the channel axis.
    """

    def __init__(self, base: nn.Linear | nn.Conv3d, rank: int, alpha: float, l1: float) -> None:
        super().__init__()
        self.base = base
        self.rank = int(rank)
        self.scaling = float(alpha) / self.rank
        self.l1 = float(l1)
        w = base.weight
        if isinstance(base, nn.Linear):
            self.down: nn.Module = nn.Linear(base.in_features, self.rank, bias=False)
            self.up: nn.Module = nn.Linear(self.rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv3d):
            self.down = nn.Conv3d(base.in_channels, self.rank, base.kernel_size, base.stride,
                                  base.padding, base.dilation, base.groups, bias=False)
            self.up = nn.Conv3d(self.rank, base.out_channels, 1, bias=False)
        else:
            raise ConfigError(f"arena targets nn.Linear or nn.Conv3d layers, not {type(base).__name__}")
        self.gate = nn.Parameter(torch.ones(self.rank))
        self.down.to(device=w.device, dtype=w.dtype)
        self.up.to(device=w.device, dtype=w.dtype)
        self.gate.data = self.gate.data.to(device=w.device, dtype=w.dtype)
        if w.device.type != "meta":
            with torch.no_grad():
                nn.init.zeros_(self.up.weight)  # down keeps PyTorch's Kaiming-uniform init

    def _gate_view(self) -> torch.Tensor:
        return self.gate if isinstance(self.base, nn.Linear) else self.gate.view(1, -1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x) * self._gate_view()) * self.scaling

    def effective_rank(self) -> int:
        return int(torch.count_nonzero(self.gate.detach()))

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B diag(v) A`` in the base weight's shape."""
        a, b = self.down.weight, self.up.weight
        if isinstance(self.base, nn.Linear):
            return (b * self.gate) @ a * self.scaling
        # b: (out, r, 1, 1, 1), a: (r, in, kx, ky, kz)
        return torch.einsum("or,rikjl->oikjl", b.flatten(1) * self.gate, a) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with ``delta W`` added to its weight."""
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        return self.base


def arena_layers(model: nn.Module) -> list[tuple[str, AdaptiveRankLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptiveRankLayer)]


def effective_ranks(model: nn.Module) -> dict[str, int]:
    """Per ARENA layer (module name of the adapted layer): the number of non-zero gates."""
    return {name: layer.effective_rank() for name, layer in arena_layers(model)}


@torch.no_grad()
def proximal_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Soft-threshold every ARENA gate after ``optimizer.step()`` (see the module docstring).

    Uses the learning rate of the gate's parameter group (so that schedulers apply). Gates
    not in `optimizer` are left alone.
    """
    layers = arena_layers(model)
    if not layers:
        return
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for _, layer in layers:
        gate = layer.gate
        group = group_of.get(id(gate))
        if group is None or layer.l1 == 0.0:
            continue
        threshold = float(group["lr"]) * layer.l1
        gate.copy_(gate.sign() * (gate.abs() - threshold).clamp_min(0.0))


@torch.no_grad()
def merge_arena(model: nn.Module) -> nn.Module:
    """Replace every ARENA layer of `model` (in place) by its base layer with ``delta W`` merged."""
    for name, layer in arena_layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merged())
    return model


def _rank_lines(metrics: dict[str, Any]) -> list[str]:
    ranks = metrics.get("effective_ranks") or {}
    return ["effective ranks after training:", *(f"  {layer:<48} {rank}" for layer, rank in ranks.items())] if ranks else []


@register_method("arena", ArenaConfig, "LoRA with an adaptive (L1-gated) rank per layer", kind="network",
                 after_step=proximal_step, merge=merge_arena,
                 extra_metrics=lambda model: {"effective_ranks": effective_ranks(model)}, metrics_lines=_rank_lines)
def _prepare_arena(model: nn.Module, cfg: ArenaConfig, parts: ModelParts) -> nn.Module:
    targets = cfg.target_modules if cfg.target_modules is not None else low_rank_targets(model, "arena")
    chosen = [(name, m) for name, m in model.named_modules()
              if name and matches_targets(name, targets) and isinstance(m, (nn.Linear, nn.Conv3d))]
    if not chosen:
        raise ConfigError(f"arena: no nn.Linear / nn.Conv3d module matches target_modules={targets!r}")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = AdaptiveRankLayer(module, int(cfg.rank), float(cfg.alpha), float(cfg.l1))
        layer.down.requires_grad_(True)
        layer.up.requires_grad_(True)
        setattr(parent, child, layer)
    return model
