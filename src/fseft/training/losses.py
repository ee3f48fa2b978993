"""Segmentation losses on sigmoid outputs (one independent channel per class).

`per_class_bce_dice` is the BCE + Dice term of one class in one sample; `partial_label_loss` is
eq. 1 of the FSEFT paper (Silva-Rodriguez et al., 2024): that term masked by the annotation
vector w_n of each volume, so a class the volume's dataset does not annotate sends no gradient,
and normalised by the number of classes the volume annotates. Few-shot adapters reuse
`per_class_bce_dice` with every class annotated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from fseft.errors import ConfigError, TrainingDivergedError
from fseft.models.checkpoint import non_finite_tensors

# Per-sample, per-class soft Dice (batch=False): a volume's Dice never mixes with another's.
# Smoothing in numerator and denominator keeps the Dice of an empty target finite (its
# optimum is an empty prediction, so negative patches teach "absent").
_DICE = DiceLoss(sigmoid=True, include_background=True, batch=False, reduction="none",
                 smooth_nr=1e-5, smooth_dr=1e-5)


def per_class_bce_dice(logits: torch.Tensor, target: torch.Tensor,
                       bce_weight: float = 1.0, dice_weight: float = 1.0) -> torch.Tensor:
    """BCE + soft Dice of each class in each sample.

    Args:
        logits: `(B, C, *spatial)` raw outputs (sigmoid is applied here).
        target: `(B, C, *spatial)` binary masks, any numeric dtype.
    Returns:
        `(B, C)` float32 losses: BCE averaged over voxels plus (1 - soft Dice).
    """
    if logits.shape != target.shape:
        raise ConfigError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    logits = logits.float()  # bf16 autocast outputs: compute the loss in float32
    target = target.float()
    spatial = tuple(range(2, logits.ndim))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=spatial)
    dice = _DICE(logits, target).reshape(logits.shape[:2])
    return bce_weight * bce + dice_weight * dice


def masked_class_losses(per_class: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """FSEFT eq. 1 from `(B, C)` per-class losses and the `(B, C)` bool annotation mask.

    Each sample's loss is the mean over the classes it annotates; the batch loss is the mean
    over samples. Unannotated entries are selected away (`torch.where`), so they get exactly
    zero gradient even if their loss is not finite.
    """
    annotated = annotated.to(device=per_class.device, dtype=torch.bool)
    if annotated.shape != per_class.shape:
        raise ConfigError(f"annotation mask {tuple(annotated.shape)} does not match losses {tuple(per_class.shape)}")
    n_annotated = annotated.sum(dim=1)
    if bool((n_annotated == 0).any()):
        raise ConfigError("a sample annotates no class: its dataset has no class of the catalogue")
    masked = torch.where(annotated, per_class, torch.zeros_like(per_class))
    return (masked.sum(dim=1) / n_annotated).mean()


def partial_label_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                       bce_weight: float = 1.0, dice_weight: float = 1.0) -> torch.Tensor:
    """Partial-label BCE + Dice (FSEFT eq. 1).

    Args:
        logits: `(B, C, *spatial)` raw outputs, one sigmoid channel per catalogue class.
        target: `(B, C, *spatial)` binary masks (channels of unannotated classes are ignored).
        annotated: `(B, C)` bool, w_n: True where sample n's dataset annotates class c.
    Returns:
        scalar: mean over samples of (sum over annotated classes of BCE + Dice) / (number annotated).
    """
    return masked_class_losses(per_class_bce_dice(logits, target, bce_weight, dice_weight), annotated)


def check_finite_loss(loss: torch.Tensor, step: int, lr: float, what: str = "training") -> None:
    """Raise `TrainingDivergedError` when `loss` (a scalar) is NaN or infinite: an optimiser
    step on it would make every weight non-finite, and the run would save a model or adapter
    that segments nothing. `step` counts optimiser steps from 1; `lr` is the current one."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise TrainingDivergedError(
            f"{what} diverged: the loss is {float(loss.detach().float().mean())} at step {step} "
            f"(learning rate {lr:.3g}); nothing was saved. Lower the learning rate (--lr) or check the data.")


def check_finite_parameters(module: torch.nn.Module, what: str = "training") -> None:
    """Raise `TrainingDivergedError` when a trained module holds non-finite weights (checked
    before anything is saved)."""

    bad = non_finite_tensors(module.state_dict())
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingDivergedError(f"{what} diverged: non-finite weights in {shown}; nothing was saved. "
                                    "Lower the learning rate (--lr) or check the data.")
