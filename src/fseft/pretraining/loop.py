"""Supervised pre-training on an assembly of partially labelled datasets (FSEFT paper, sec. 3.1).

Every volume carries its annotation vector w_n (1 for the catalogue classes its dataset
annotates); the model has one sigmoid output per catalogue class and learns from the masked
BCE + Dice of `fseft.training.losses.partial_label_loss`. Runs on one process or on torch DDP
(`torchrun --nproc_per_node N -m fseft pretrain ...`).

Run folder (``--out DIR``): ``assembly.json`` (the resolved configuration), ``cache/`` (each
volume preprocessed once), ``checkpoint.pt`` (resumable, after every epoch), ``log.jsonl``
(one line per epoch: loss per class and, with a ``validation:`` dataset, its Dice per class
every few epochs), ``log.csv`` (the same as a table) and, at the end, ``model.safetensors`` (an fseft model
file for `fseft.models.load_model` / ``fseft predict --model``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from fseft.errors import ConfigError
from fseft.inference.sliding_window import check_bf16_training
from fseft.models.architectures import architecture
from fseft.models.zoo import check_window, load_model
from fseft.pretraining.assembly import (
    AssemblyConfig,
    AssemblySource,
    build_model,
    resolve_sources,
    resolve_validation,
)
from fseft.pretraining.checkpoints import (
    load_checkpoint,
    save_checkpoint,
    save_final_model,
    set_rng_state,
    transfer_weights,
)
from fseft.pretraining.log import PretrainLog
from fseft.pretraining.validation import choose_postprocessing, validation_dice
from fseft.pretraining.volume_cache import CachedVolumes, check_label_values, prepare_cache
from fseft.training.distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    distributed_context,
    main_first,
    unwrap_model,
    wrap_model,
)
from fseft.training.fit import make_optimizer, train_epochs
from fseft.training.losses import (
    check_finite_loss,
    check_finite_parameters,
    masked_class_losses,
    per_class_bce_dice,
)
from fseft.training.sampling import (
    EpochPatchDataset,
    class_balanced_group_weights,
    patch_transforms,
    plain_tensor,
)
from fseft.utils import (
    seed_everything,
    write_json,
)

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.safetensors"


class EpochSums:
    """This rank's sums over an epoch's steps: loss, steps, per-class loss and how many
    volumes annotated each class (`masked_class_losses` averages over those)."""

    def __init__(self, num_classes: int) -> None:
        self.loss = torch.zeros((), dtype=torch.float64)
        self.steps = 0
        self.class_sum = torch.zeros(num_classes, dtype=torch.float64)
        self.class_count = torch.zeros(num_classes, dtype=torch.float64)

    def add(self, loss: torch.Tensor, per_class: torch.Tensor, annotated: torch.Tensor) -> None:
        detached = per_class.detach().double().cpu()
        mask = annotated.cpu()
        self.class_sum += torch.where(mask, detached, torch.zeros_like(detached)).sum(0)
        self.class_count += mask.double().sum(0)
        self.loss += loss.detach().double().cpu()
        self.steps += 1

    def reduced(self, ctx: DistributedContext, catalogue: Sequence[str]) -> tuple[float, dict[str, float | None]]:
        """The mean loss and per-class loss over every rank's steps."""
        packed = torch.cat([self.loss.reshape(1), torch.tensor([float(self.steps)], dtype=torch.float64),
                            self.class_sum, self.class_count])
        packed = all_reduce_sum(packed, ctx)
        n = len(catalogue)
        per_class = {c: (float(packed[2 + i] / packed[2 + n + i]) if packed[2 + n + i] > 0 else None)
                     for i, c in enumerate(catalogue)}
        return float(packed[0] / packed[1]), per_class


@dataclass
class PretrainResult:
    """What `pretrain` returns on every rank.

    model: the trained model (unwrapped from DDP, on the training device). model_path:
    ``out/model.safetensors`` on rank 0 once every epoch is done, else None. history: the
    per-epoch log records (``log.jsonl``) of the whole run, resumed epochs included.
    epochs_done: epochs completed so far.
    """

    model: torch.nn.Module
    model_path: Path | None
    history: list[dict[str, Any]]
    epochs_done: int
    rank: int = 0


def _check_window(assembly: AssemblyConfig, device: torch.device | None = None) -> None:
    """The patch fits the architecture (without `device`: before anything runs) or, on `device`,
    bf16 training does (once the device is known)."""
    train = assembly.train
    try:
        if device is None:
            check_window(assembly.arch, train.patch_size)
        elif train.bf16:
            check_bf16_training(architecture(assembly.arch), train.patch_size, device)
    except ConfigError as exc:
        raise ConfigError(f"{assembly.source}: train.patch_size {list(train.patch_size)}: {exc}") from exc


def _initial_model(assembly: AssemblyConfig, catalogue: Sequence[str], resume: bool,
                   ctx: DistributedContext) -> torch.nn.Module:
    """The model at epoch 0: built from the assembly, output biases at the head prior, started
    from ``model.init`` when given (a resumed run loads its own checkpoint instead)."""
    model = build_model(assembly, catalogue)
    if assembly.train.head_prior is not None:
        with torch.no_grad():
            prior = assembly.train.head_prior
            model.head.bias.fill_(math.log(prior / (1 - prior)))
    if assembly.init is not None and not resume:
        try:
            summary = transfer_weights(load_model(assembly.init), model)
        except ConfigError as exc:
            raise ConfigError(f"{assembly.source}: model.init: {exc}") from exc
        if ctx.is_main:
            print(f"initialised from {assembly.init}: {summary}", flush=True)
    return model


def _patch_loader(assembly: AssemblyConfig, volumes: CachedVolumes, sources: Sequence[AssemblySource],
                  catalogue: Sequence[str], ctx: DistributedContext) -> tuple[EpochPatchDataset, Any, DataLoader]:
    """The epoch's patches: `volumes_per_epoch` volumes drawn (balanced by dataset or class when
    asked), split across ranks by a `DistributedSampler`."""
    train = assembly.train
    transform = patch_transforms(train.patch_size, train.patches_per_volume, train.pos, train.neg, train.augment,
                                 sampling=train.sampling, flip_axes=train.flip_axes, rotate90=train.rotate90)
    groups, group_weights = None, None
    if train.balance_datasets or train.balance_classes:
        groups = [v.group for v in volumes.volumes]
    if train.balance_classes:
        annotates = np.array([[c in s.structures for c in catalogue] for s in sources])
        group_weights = class_balanced_group_weights(annotates, [len(s.dataset.cases) for s in sources])
        if ctx.is_main:
            share = annotates.T.astype(float) @ group_weights
            print("class-balanced dataset weights: "
                  + ", ".join(f"{s.entry.name} {w:.3f}" for s, w in zip(sources, group_weights))
                  + "; share of steps per class: "
                  + ", ".join(f"{c} {v:.2f}" for c, v in zip(catalogue, share)), flush=True)
    dataset = EpochPatchDataset(volumes, transform, seed=train.seed, groups=groups,
                                length=train.volumes_per_epoch, group_weights=group_weights)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=train.seed)
    loader = DataLoader(dataset, batch_size=train.batch_size, sampler=sampler, collate_fn=list_data_collate,
                        num_workers=train.num_workers, pin_memory=ctx.device.type == "cuda",
                        persistent_workers=False)
    return dataset, sampler, loader


def _resume(checkpoint_path: Path, identity: dict[str, Any], assembly: AssemblyConfig, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any, total_steps: int, device: torch.device) -> int:
    """Load the run's checkpoint into model, optimizer, schedule and RNGs; returns its epoch."""
    state = load_checkpoint(checkpoint_path, device)
    saved = json.loads(state["identity"])
    if saved != json.loads(json.dumps(identity, sort_keys=True)):
        raise ConfigError(f"{checkpoint_path} was trained with another model, catalogue or preprocessing "
                          f"({saved}); it cannot be resumed with {assembly.source}")
    unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scheduler.t_total = total_steps  # a resume with another --epochs stretches the schedule to the new length
    set_rng_state(state["rng"])
    return int(state["epoch"])


def pretrain(assembly: AssemblyConfig, out: str | os.PathLike, *, resume: bool = False,
             until_epoch: int | None = None) -> PretrainResult:
    """Pre-train a model on the assembly (one process, or a torchrun DDP job: every rank calls
    this). Writes ``out/model.safetensors`` (rank 0) once all epochs are done.

    resume: continue from ``out/checkpoint.pt`` (model, optimizer, schedule, epoch, RNG).
    until_epoch: stop after this epoch in this call (the schedule still spans all `epochs`),
    for jobs cut into time slices; continue later with ``resume=True``.
    Raises `ConfigError` / `InputFileError` for a bad assembly or dataset before training starts.
    """
    out = Path(out)
    train = assembly.train
    checkpoint_path = out / CHECKPOINT_NAME
    if resume and not checkpoint_path.exists():
        raise ConfigError(f"--resume: no checkpoint to resume from at {checkpoint_path}")
    if not resume and checkpoint_path.exists():
        raise ConfigError(f"{out} already holds a pre-training run ({checkpoint_path}); "
                          "pass --resume to continue it, or choose another --out")
    _check_window(assembly)
    with distributed_context(train.device) as ctx:
        _check_window(assembly, ctx.device)
        seed_everything(train.seed)  # identical initial weights on every rank
        catalogue, sources = resolve_sources(assembly)
        val_source = resolve_validation(assembly, catalogue)
        # built, and started from `init`, before anything is written: a bad init leaves no run folder
        model = _initial_model(assembly, catalogue, resume, ctx)
        identity = {"arch": assembly.arch, "arch_kwargs": assembly.arch_kwargs, "classes": list(catalogue),
                    "preprocess": assembly.preprocess.to_dict()}
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            resolved = assembly.to_dict()
            resolved["model"]["classes"] = list(catalogue)
            write_json(out / "assembly.json", {**resolved, "source": assembly.source})
        cache_dir = out / "cache"
        main_first(ctx, check_label_values, sources, cache_dir, train.progress)
        volumes = prepare_cache(sources, catalogue, assembly.preprocess, cache_dir, ctx, train.progress,
                                train.soft_labels)
        val_volumes = None if val_source is None else prepare_cache(
            [val_source], catalogue, assembly.preprocess, cache_dir, ctx, train.progress, train.soft_labels)

        if ctx.is_distributed and ctx.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm over the global batch
        model = wrap_model(model, ctx)
        dataset, sampler, loader = _patch_loader(assembly, volumes, sources, catalogue, ctx)
        steps_per_epoch = len(loader)
        optimizer, scheduler = make_optimizer(model.parameters(), train.lr, train.weight_decay,
                                              round(train.warmup_epochs * steps_per_epoch), train.epochs * steps_per_epoch)
        start_epoch = 0
        if resume:
            start_epoch = _resume(checkpoint_path, identity, assembly, model, optimizer, scheduler,
                                  train.epochs * steps_per_epoch, ctx.device)
        log = PretrainLog(out, catalogue, train.epochs, write=ctx.is_main, resume_from=start_epoch if resume else None,
                          tensorboard=train.tensorboard)
        if ctx.is_main:
            print(f"pre-training {assembly.arch} on {len(volumes)} volumes from {len(sources)} datasets, "
                  f"{len(catalogue)} classes, {ctx.world_size} process(es) on {ctx.device}; "
                  f"{steps_per_epoch} steps/epoch, epochs {start_epoch + 1}..{train.epochs}", flush=True)

        epoch_state: dict[str, Any] = {}

        def epoch_steps(epoch: int) -> Any:
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            model.train()
            epoch_state.update(sums=EpochSums(len(catalogue)), started=time.perf_counter())
            return tqdm(loader, desc=f"epoch {epoch + 1}/{train.epochs}", unit="step", leave=False,
                        disable=not (train.progress and ctx.is_main))

        def step(batch: dict[str, Any], global_step: int) -> float:
            image = plain_tensor(batch["image"]).to(ctx.device, non_blocking=True)
            label = plain_tensor(batch["label"]).to(ctx.device, non_blocking=True)
            annotated = plain_tensor(batch["annotated"]).to(ctx.device)
            with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=train.bf16):
                logits = model(image)
            per_class = per_class_bce_dice(logits, label)  # (B, C) float32
            loss = masked_class_losses(per_class, annotated)
            check_finite_loss(loss, scheduler.last_epoch + 1, optimizer.param_groups[0]["lr"], "pre-training")
            loss.backward()
            epoch_state["sums"].add(loss, per_class, annotated)
            return loss.item()

        def end_epoch(epoch: int) -> bool:
            seconds = time.perf_counter() - epoch_state["started"]
            loss, per_class = epoch_state["sums"].reduced(ctx, catalogue)
            record = {"epoch": epoch + 1, "loss": loss, "loss_per_class": per_class,
                      "lr": optimizer.param_groups[0]["lr"], "steps": steps_per_epoch,
                      "seconds": round(seconds, 2), "world_size": ctx.world_size}
            validate = val_volumes is not None and ((epoch + 1) % assembly.validation.every == 0
                                                    or epoch + 1 == train.epochs)
            if validate and ctx.is_main:
                record["val_dice"] = validation_dice(unwrap_model(model), val_volumes, catalogue, train.patch_size,
                                                     ctx.device, train.bf16)
            check_finite_parameters(unwrap_model(model), "pre-training")  # before the checkpoint is replaced
            if ctx.is_main:
                save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch + 1, identity)
            log.add(record)
            barrier(ctx)
            return False

        last_epoch = train.epochs if until_epoch is None else min(train.epochs, until_epoch)
        train_epochs(model, optimizer, scheduler, range(start_epoch, last_epoch), epoch_steps, step,
                     end_epoch=end_epoch, first_step=start_epoch * steps_per_epoch)
        log.close()

        trained = unwrap_model(model)
        if last_epoch < train.epochs:
            return PretrainResult(trained, None, log.history, last_epoch, ctx.rank)
        model_path = out / MODEL_NAME
        if ctx.is_main:
            postprocess = None
            if val_volumes is not None:
                postprocess = choose_postprocessing(trained, val_volumes, catalogue, train.patch_size, ctx.device,
                                                    train.bf16)
            save_final_model(trained, model_path, assembly, sources, train.epochs, postprocess)
            print(f"wrote {model_path}", flush=True)
        barrier(ctx)
        return PretrainResult(trained, model_path if ctx.is_main else None, log.history, train.epochs, ctx.rank)
