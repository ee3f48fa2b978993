"""The training loop of `fseft adapt` (`fit`) and the pieces it shares with pre-training.

`fit` runs every method: feature adapters on patches of cached features, network methods on
image patches. What differs is passed in as hooks: how a support volume becomes logits and
labels (`batch`), what happens at the start of an epoch (`on_epoch`), after each optimiser
step (`after_step`: a method's hook, ARENA's proximal step), and a loss term active in the
last epochs (`ExtraLoss`: the transductive size constraint). AdamW with one warm-up epoch
then cosine decay (`make_optimizer`), the loss (`supervised_loss`), early stopping and the
divergence checks are the same for every method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.optimizers import WarmupCosineSchedule
from torch import nn
from tqdm.auto import tqdm

from fseft.errors import ConfigError
from fseft.training.losses import check_finite_loss, check_finite_parameters, per_class_bce_dice

T = TypeVar("T")

LOSSES = ("dice", "bce+dice")


@dataclass
class TrainResult:
    epochs_run: int
    losses: list[float]
    ti_losses: list[float]
    seconds: float
    stopped_early: bool

    def to_dict(self) -> dict[str, Any]:
        """The run record's ``training`` entry."""
        return {"epochs_run": self.epochs_run, "stopped_early": self.stopped_early,
                "losses": [round(v, 6) for v in self.losses], "ti_losses": [round(v, 6) for v in self.ti_losses]}


NOT_TRAINED = TrainResult(0, [], [], 0.0, False)


@dataclass
class FitSettings:
    """What `fit` reads of a run's settings (`fseft.adaptation.AdaptConfig.resolved`)."""

    epochs: int
    max_steps: int | None
    lr: float
    weight_decay: float
    warmup_epochs: int
    batch_size: int
    patience: int
    min_delta: float
    loss: str
    multiclass: bool
    bf16: bool
    device: str
    progress: bool
    desc: str

    def schedule(self, n_volumes: int) -> tuple[int, int]:
        """``(optimiser steps per epoch, epochs)`` for `n_volumes` support volumes: one step per
        `batch_size` volumes, the epochs capped by `max_steps` (`epoch_budget`)."""
        iters = math.ceil(n_volumes / self.batch_size)
        return iters, epoch_budget(self.epochs, self.max_steps, iters)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, multiclass: bool, loss: str = "bce+dice") -> torch.Tensor:
    """Soft Dice per structure and patch (``loss="dice"``, the FSEFT adaptation runs' loss), plus
    BCE (``"bce+dice"``): sigmoid outputs; multiclass: softmax over background and structures
    (a voxel of overlapping masks takes the last structure), plus cross-entropy for ``bce+dice``.

    logits: ``(N, S or S+1, *patch)``; labels: ``(N, S, *patch)`` binary.
    """
    if loss not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    ce_weight = 0.0 if loss == "dice" else 1.0
    if not multiclass:
        return per_class_bce_dice(logits, labels, bce_weight=ce_weight).mean()
    index = torch.zeros_like(labels[:, :1], dtype=torch.long)
    for s in range(labels.shape[1]):
        index[labels[:, s : s + 1] > 0] = s + 1
    return DiceCELoss(softmax=True, to_onehot_y=True, lambda_ce=ce_weight)(logits.float(), index)


def epoch_budget(epochs: int, max_steps: int | None, iters: int) -> int:
    """Epochs to run with `iters` optimiser steps per epoch: `epochs`, capped by `max_steps`."""
    if max_steps is None:
        return int(epochs)
    return min(int(epochs), math.ceil(int(max_steps) / max(1, iters)))


def make_optimizer(params: Any, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                   warmup_multiplier: float = 0.0) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with a linear warm-up over `warmup_steps` then cosine decay to `total_steps` (MONAI
    `WarmupCosineSchedule`): the schedule of pre-training and of every adaptation method."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=warmup_steps, t_total=total_steps,
                                     warmup_multiplier=warmup_multiplier)
    return optimizer, scheduler


class EarlyStopping:
    """Stop when the monitored epoch loss has not improved by a relative `min_delta` for
    `patience` epochs (0: never)."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best, self.stale = math.inf, 0

    def stop(self, value: float) -> bool:
        if value < self.best - self.min_delta * abs(self.best) or not math.isfinite(self.best):
            self.best, self.stale = value, 0
            return False
        self.stale += 1
        return bool(self.patience) and self.stale >= self.patience


@dataclass
class ExtraLoss:
    """A loss term of the last epochs (the transductive size constraint): it runs from epoch
    ``start(epochs)`` on, and ``accumulate(step)`` adds its gradients before the optimiser step
    and returns its value. Early stopping waits for it: the constrained phase always runs."""

    start: Callable[[int], int]
    accumulate: Callable[[int], float]


def train_epochs(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epochs: Iterable[int],
    epoch_steps: Callable[[int], Iterable[T]],
    step: Callable[[T, int], float],
    *,
    after_step: Callable[[torch.optim.Optimizer], None] | None = None,
    end_epoch: Callable[[int], bool] | None = None,
    first_step: int = 0,
) -> int:
    """The training loop of the project: pre-training (`fseft.pretraining.loop`) and every
    adaptation method (`fit`) run on it.

    For each epoch of `epochs` (an iterable: a range, or a progress bar over one), the epoch's
    steps come from ``epoch_steps(epoch)`` (a list of volume groups, a DataLoader, a progress bar
    over either); each optimiser step clears the gradients, calls ``step(item, global step)``
    (forward, loss checks and ``backward``: a step may accumulate gradients over several
    volumes; it returns the step's loss), steps the optimiser, then `after_step` (a method's
    hook, e.g. ARENA's proximal step) and the schedule. ``end_epoch(epoch)`` logs and decides:
    True stops training. A progress bar over the steps shows the last step's loss. Returns the
    global step count (`first_step` plus the steps run).
    """
    global_step = first_step
    for epoch in epochs:
        items = epoch_steps(epoch)
        for item in items:
            optimizer.zero_grad(set_to_none=True)
            loss = step(item, global_step)
            optimizer.step()
            if after_step is not None:
                after_step(optimizer)
            scheduler.step()
            global_step += 1
            if hasattr(items, "set_postfix"):  # a progress bar over the steps
                items.set_postfix(loss=f"{loss:.4f}")
        if end_epoch is not None and end_epoch(epoch):
            break
    return global_step


def fit(
    module: nn.Module,
    n_volumes: int,
    batch: Callable[[int, np.random.RandomState], tuple[torch.Tensor, torch.Tensor]],
    settings: FitSettings,
    seed: int = 0,
    *,
    on_epoch: Callable[[int], None] | None = None,
    after_step: Callable[[torch.optim.Optimizer], None] | None = None,
    extra_loss: ExtraLoss | None = None,
) -> TrainResult:
    """Train the parameters of `module` that require gradients on `n_volumes` support volumes
    (`train_epochs` with adaptation's steps, early stopping and extra loss).

    Each epoch visits the volumes in a random order (`seed`), `settings.batch_size` per
    optimiser step; ``batch(volume index, rng)`` gives the logits and labels of that volume's
    patches (under bf16 autocast with `settings.bf16`; `rng` is the loop's own generator, for
    hooks that draw patches from it). The loss is `supervised_loss` averaged over the step's
    volumes. Returns the per-epoch mean losses (and extra-loss values when `extra_loss` is
    given); `NOT_TRAINED` when nothing is trainable or there are no epochs.
    """
    device = torch.device(settings.device)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params or settings.epochs == 0 or not n_volumes:
        return NOT_TRAINED
    iters, epochs = settings.schedule(n_volumes)
    optimizer, scheduler = make_optimizer(
        params, settings.lr, settings.weight_decay, settings.warmup_epochs * iters, max(1, epochs * iters),
        warmup_multiplier=0.1,  # the very first step already learns
    )
    extra_start = extra_loss.start(epochs) if extra_loss is not None else None
    rng = np.random.RandomState(seed)
    losses: list[float] = []
    extra_losses: list[float] = []
    stopping = EarlyStopping(settings.patience, settings.min_delta)
    # running sums of the epoch, in the order the volumes are visited
    epoch = {"loss": 0.0, "extra": 0.0, "extra_on": False, "stopped": False}

    def epoch_steps(index: int) -> list[np.ndarray]:
        if on_epoch is not None:
            on_epoch(index)
        order = rng.permutation(n_volumes)
        epoch.update(loss=0.0, extra=0.0, extra_on=extra_start is not None and index >= extra_start)
        return [order[it * settings.batch_size : (it + 1) * settings.batch_size] for it in range(iters)]

    def step(volumes: np.ndarray, global_step: int) -> float:
        total = 0.0
        for index in volumes:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                logits, labels = batch(int(index), rng)
            loss = supervised_loss(logits, labels, settings.multiclass, settings.loss) / len(volumes)
            check_finite_loss(loss, global_step + 1, optimizer.param_groups[0]["lr"], settings.desc)
            loss.backward()
            value = float(loss.detach())
            epoch["loss"] += value
            total += value
        if epoch["extra_on"]:
            epoch["extra"] += extra_loss.accumulate(global_step)
        return total

    def end_epoch(index: int) -> bool:
        losses.append(epoch["loss"] / iters)
        if extra_loss is None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        else:
            extra_losses.append(epoch["extra"] / iters)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", **({"ti": f"{extra_losses[-1]:.4f}"} if epoch["extra_on"] else {}))
            if index + 1 < extra_start:
                return False  # the constrained phase must run: no early stop before it
        epoch["stopped"] = stopping.stop(losses[-1] + (extra_losses[-1] if extra_losses else 0.0))
        return epoch["stopped"]

    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=settings.desc, unit="epoch", disable=not settings.progress)
    train_epochs(module, optimizer, scheduler, bar, epoch_steps, step, after_step=after_step, end_epoch=end_epoch)
    bar.close()
    module.eval()
    check_finite_parameters(module, settings.desc)
    return TrainResult(len(losses), losses, extra_losses, time.perf_counter() - start, bool(epoch["stopped"]))


__all__ = ["LOSSES", "NOT_TRAINED", "EarlyStopping", "ExtraLoss", "FitSettings", "TrainResult", "epoch_budget", "fit",
           "make_optimizer", "supervised_loss", "train_epochs"]
