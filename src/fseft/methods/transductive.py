"""Transductive inference with an organ-size constraint (FSEFT paper, eq. 2 and 3).

The unlabelled query volumes take part in training through one prior: the size of each
structure. The target size ``S`` is the mean foreground size (voxels, in model space) of the
support masks; a query's predicted size is the sum of its foreground probabilities over the
whole volume, ``s = sum_v p_v``. The penalty is the FSEFT authors' (their released
``ProportionConstraint``): an L1 hinge on the size error relative to the larger of the two
sizes, zero inside a margin ``gamma``::

    e = (S - s) / max(s, S),      L_TI(s) = relu(|e| - gamma)

so sizes within ``[(1 - gamma) S, S / (1 - gamma)]`` cost nothing, and outside it the gradient
has a bounded, scale-free magnitude (a relative error, comparable across organs of any size).
Their runs use ``gamma = 0.3`` (0.5 for the left kidney) and ``lambda = 0.1``, the defaults
here (`TransductiveConfig`), with the constraint on for the last half of the epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fseft.errors import ConfigError
from fseft.methods.features import FeatureAdapter, foreground_probabilities, iter_slab_logits


@dataclass
class TransductiveConfig:
    """`gamma`: the margin of relative size error that costs nothing; `weight`: lambda;
    `start_fraction`: the constraint is applied from this fraction of the epochs on (the last
    half). Defaults: the FSEFT run commands (margin 0.3, lambda 0.1, last 50 of 100 epochs)."""

    gamma: float = 0.3
    weight: float = 0.1
    start_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma < 1.0:
            raise ConfigError(f"transductive gamma must be in [0, 1), got {self.gamma}")
        if self.weight < 0:
            raise ConfigError(f"transductive weight (lambda) must be >= 0, got {self.weight}")
        if not 0.0 <= self.start_fraction <= 1.0:
            raise ConfigError(f"transductive start_fraction must be in [0, 1], got {self.start_fraction}")


def target_sizes(support_labels: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """Mean foreground size per structure over the support masks.

    `support_labels`: one ``(S, X, Y, Z)`` binary array per support volume (model space).
    Returns ``(S,)`` float32 voxel counts.
    """
    if not support_labels:
        raise ValueError("target_sizes needs at least one support mask")
    counts = [
        torch.as_tensor(np.asarray(lab).reshape(lab.shape[0], -1).sum(axis=1, dtype=np.int64))
        for lab in support_labels
    ]
    return torch.stack(counts).double().mean(dim=0).float()


def size_constraint_loss(predicted: torch.Tensor, target: torch.Tensor, gamma: float = 0.3) -> torch.Tensor:
    """The size penalty ``relu(|S - s| / max(s, S) - gamma)``, averaged over structures (and
    queries).

    `predicted`: ``(..., S)`` predicted sizes (sums of probabilities); `target`: ``(S,)``
    target sizes. Returns a scalar: 0 when every relative error is within `gamma`.
    """
    target = target.to(predicted)
    scale = torch.maximum(predicted, target).clamp_min(1.0)
    return torch.relu((target - predicted).abs() / scale - gamma).mean()


def size_constraint_step(
    adapter: FeatureAdapter,
    query_features: np.ndarray | torch.Tensor,
    target: torch.Tensor,
    cfg: TransductiveConfig,
    multiclass: bool = False,
    slab: int = 32,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Accumulate ``weight * L_TI`` gradients of one query volume into `adapter`'s ``.grad``.

    `query_features`: ``(C, X, Y, Z)`` cached features of the whole query volume. The predicted
    size needs the whole volume, which does not fit in memory with its autograd graph for a
    spatial adapter; since ``dL/dtheta = L'(s) * sum_slabs ds_slab/dtheta``, a first pass
    without gradients computes ``s`` and ``L'(s)``, a second one backpropagates each slab's
    partial size scaled by ``L'(s)``. Returns the loss value.
    """
    slabs = dict(slab=slab, device=device, autocast_dtype=autocast_dtype)
    with torch.no_grad():
        size = sum(
            foreground_probabilities(logits, multiclass).sum(dim=(0, 2, 3, 4)).double()
            for _, logits in iter_slab_logits(adapter, query_features, **slabs)
        )
    size = size.float().requires_grad_(True)
    loss = cfg.weight * size_constraint_loss(size, target.to(size.device), cfg.gamma)
    (grad_size,) = torch.autograd.grad(loss, size)
    if torch.count_nonzero(grad_size) == 0:
        return float(loss.detach())  # inside the band: nothing to backpropagate
    for _, logits in iter_slab_logits(adapter, query_features, **slabs):
        partial = foreground_probabilities(logits, multiclass).sum(dim=(0, 2, 3, 4))
        partial.backward(grad_size.to(partial.dtype))
    return float(loss.detach())
