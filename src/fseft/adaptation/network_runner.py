"""`fseft adapt` for methods of kind ``"network"`` (``ft``, ``ft-last``, ``scratch``,
``decoder``, ``bitfit``, ``affine``, ``lora``, ``adaptformer``, ``arena``, ...):
`fseft.methods.peft_methods.apply_method` prepares a copy of the base, trained end to end on
patches of the preprocessed support images (`train_network`; on cached encoder outputs when
every trainable weight lies after a split point), then scored by sliding-window inference, as
`fseft predict --adapter` runs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fseft.adaptation.config import AdaptConfig
from fseft.adaptation.encoder_cache import EncoderCache, PatchPool, split_point_for
from fseft.adaptation.feature_runner import train_adapter
from fseft.adaptation.query_scoring import evaluate_queries, network_probabilities, run_metrics
from fseft.data.datasets import Dataset
from fseft.data.preprocessing import PreprocessConfig, preprocess
from fseft.data.tasks import FewShotTask
from fseft.errors import ConfigError
from fseft.inference.feature_cache import FeatureCache, model_fingerprint
from fseft.methods import adapter_on, foreground_fractions, get_method, init_head_prior
from fseft.methods.peft_methods import apply_method, count_trainable, method_train_mode, post_step, unwrap
from fseft.prediction.segment import model_preprocess
from fseft.runs.format import save_adapter
from fseft.runs.load import METRICS_FILE, AdaptedNetwork, run_extra
from fseft.training.fit import NOT_TRAINED, TrainResult, fit
from fseft.training.sampling import EpochPatchDataset, patch_transforms, plain_tensor
from fseft.utils import write_json


def train_network(
    model: nn.Module, support: Sequence[dict[str, Any]], cfg: AdaptConfig, seed: int = 0,
    encoder_cache: EncoderCache | None = None,
) -> TrainResult:
    """Train a network method (`fseft.methods.peft_methods.apply_method`) end to end on image
    patches of the support volumes (`fit`).

    support: ``{"image": (1, X, Y, Z) in [0, 1], "label": (S, X, Y, Z) uint8}`` per support
    volume, preprocessed (model space). Each iteration draws `patches_per_volume` patches from
    each of `batch_size` volumes with `fseft.training.sampling` (centred on foreground with
    probability `pos_ratio`, as the feature methods draw theirs; intensity augmentation only
    with `cfg.augment`, since cached features cannot be augmented). The method's after-step
    hook (`post_step`) runs after each optimiser step; frozen normalisation layers stay in eval
    mode (`method_train_mode`). bf16 autocast with `cfg.bf16`.

    encoder_cache: an `fseft.adaptation.encoder_cache.EncoderCache` at the model's split point
    (`split_point_for`): the frozen prefix runs once per distinct patch of a pool
    (`PatchPool`, the first `cfg.encoder_pool_epochs` epochs' draws) and each step runs only
    ``decode`` and the head on patches drawn from that pool.
    """

    cfg = cfg.resolved()
    settings = cfg.fit_settings()
    device = torch.device(cfg.device)
    model.to(device)
    if not any(p.requires_grad for p in model.parameters()) or cfg.epochs == 0 or not support:
        return NOT_TRAINED
    transform = patch_transforms(cfg.patch_size, cfg.patches_per_volume, pos=cfg.pos_ratio,
                                 neg=1.0 - cfg.pos_ratio, augment=cfg.augment, flip_axes=(), rotate90=False)
    patches = EpochPatchDataset(support, transform, seed)
    arch = getattr(model, "arch", type(model).__name__)
    if encoder_cache is not None:
        epochs = settings.schedule(len(support))[1]
        pool = PatchPool(patches, encoder_cache, min(cfg.encoder_pool_epochs, epochs), cfg.progress)
        base = unwrap(model)
        draws = np.random.RandomState(seed + 1)  # apart from fit's: the volume order stays the network path's

        def batch(position: int, rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor]:
            cached, labels = pool.batch(pool.draw(position, cfg.patches_per_volume, draws), device)
            return base.head(base.decode(cached, encoder_cache.point)), labels
    else:
        def batch(position: int, rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor]:
            items = patches[position]
            if all(torch.equal(plain_tensor(d["image"]), plain_tensor(items[0]["image"])) for d in items[1:]):
                items = items[:1]  # a volume within one patch: n copies give the mean loss of one
            images = torch.stack([plain_tensor(d["image"]) for d in items]).float().to(device)
            try:
                return model(images), torch.stack([plain_tensor(d["label"]) for d in items]).to(device)
            except ValueError as exc:  # the architecture's shape check
                raise ConfigError(f"patch_size {cfg.patch_size} does not fit the {arch} model: {exc}") from exc

    def on_epoch(epoch: int) -> None:
        patches.set_epoch(epoch)
        method_train_mode(model)

    return fit(model, len(support), batch, settings, seed, on_epoch=on_epoch,
               after_step=lambda optimizer: post_step(model, optimizer))


def probe_head(base: nn.Module, preprocess_cfg: PreprocessConfig, dataset: Dataset, task: FewShotTask,
               names: tuple[str, ...], cfg: AdaptConfig) -> nn.Module:
    """A linear probe (the ``lp`` method with its protocol) fitted on the frozen base's cached
    features of the support: the head a network method starts from with `cfg.head_warmup`.

    LP-FT (Kumar et al., ICLR 2022): fine-tuning behind a random or mismatched head first
    spends its large early gradients distorting the pre-trained features; a head that already
    fits them leaves fine-tuning to refine. Costs one `lp` run (features cached as `lp`'s).
    """

    cache = FeatureCache(base, preprocess_cfg, cfg.cache_dir, cfg.inference)
    support = [(c.features, c.labels) for c in (cache.load(case, names) for case in task.support_cases(dataset))]
    lp_cfg = dataclasses.replace(cfg, method="lp", method_options={}, epochs=None, lr=None, batch_size=None,
                                 patches_per_volume=None, max_steps=None, transductive=False).resolved()
    multiclass = lp_cfg.objective == "multiclass"
    probe, rows = adapter_on(base, "lp", {}, names, multiclass)
    if lp_cfg.head_prior:
        init_head_prior(probe.head, rows, foreground_fractions([lab for _, lab in support]), multiclass)
    train_adapter(probe.to(cfg.device), support, lp_cfg, task.seed)
    return probe.cpu()


def run_network(base: nn.Module, base_ref: dict[str, Any], dataset: Dataset, task: FewShotTask,
                names: tuple[str, ...], cfg: AdaptConfig, out: Path) -> dict[str, Any]:
    """`adapt` for a ``"network"`` method: `apply_method` on the base, training on patches of
    the preprocessed support volumes, evaluation by sliding-window inference. The run folder's
    files are `save_adapter`'s (peft's format for peft methods), the run's information in the
    record's ``extra``; the method's `extra_metrics` hook adds to ``metrics.json``."""

    multiclass = cfg.objective == "multiclass"
    preprocess_cfg = model_preprocess(base, base_ref["path"] or base_ref["id"])
    base_info = {**base_ref, "fingerprint": model_fingerprint(base), "class_names": list(base.class_names),
                 "feature_channels": int(base.feature_channels)}
    probe = probe_head(base, preprocess_cfg, dataset, task, names, cfg) if cfg.head_warmup and cfg.epochs > 0 else None
    model = apply_method(base, cfg.method, names, multiclass=multiclass, **cfg.method_options)
    support = []
    if cfg.epochs > 0:
        for case in task.support_cases(dataset):
            image, labels = case.load(names)
            pre = preprocess(image, labels, preprocess_cfg)
            support.append({"image": pre.image, "label": pre.label})
    if probe is not None:
        with torch.no_grad():  # every copy of the head (peft keeps the original beside the trained one)
            for conv in (m for m in unwrap(model).head.modules() if isinstance(m, nn.Conv3d)):
                conv.weight.copy_(probe.head.weight)
                conv.bias.copy_(probe.head.bias)
    elif support and cfg.head_prior:
        init_head_prior(unwrap(model).head, model.fseft_method["head_rows"],
                        foreground_fractions([plain_tensor(v["label"]).numpy() for v in support]), multiclass)
    encoder_cache = None
    point = split_point_for(model) if cfg.encoder_cache and support else None
    if point is not None:
        encoder_cache = EncoderCache(model, point, base_info["fingerprint"], cfg.cache_dir, cfg.device)
    result = train_network(model, support, cfg, task.seed, encoder_cache)

    adapted = AdaptedNetwork(model, names, multiclass, preprocess_cfg).eval()
    predictions = out / "predictions" if cfg.save_predictions else None
    per_case = evaluate_queries(network_probabilities(adapted, cfg), task.query_cases(dataset), names, cfg,
                                preprocess_cfg, predictions)
    metrics = run_metrics(cfg, names, task, count_trainable(model), result.seconds, per_case)
    hook = get_method(cfg.method).extra_metrics
    if hook is not None:
        metrics.update(hook(model))
    if encoder_cache is not None:
        metrics["encoder_cache"] = {"point": encoder_cache.point, "patches_computed": encoder_cache.misses,
                                    "patches_reused": encoder_cache.hits}
    save_adapter(model, out, extra=run_extra(base_info, cfg, preprocess_cfg, task, result))
    write_json(out / METRICS_FILE, metrics)
    return metrics
