"""`fseft adapt` for methods of kind ``"features"`` (black-box: ``generalization``, ``lp``,
``spatial-adapter``): the base model is never changed; its features ``Z`` of every support and
query volume are computed once (`FeatureCache`) and a small adapter is trained on patches of
``Z`` from the `k` support volumes (`train_adapter`), optionally with the transductive size
constraint on the unlabelled query volumes (``--ti``), then scored on the queries' cached
features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fseft.adaptation.config import AdaptConfig
from fseft.adaptation.query_scoring import cached_probabilities, evaluate_queries, run_metrics
from fseft.data.datasets import Dataset
from fseft.data.tasks import FewShotTask
from fseft.errors import ConfigError
from fseft.inference.feature_cache import FeatureCache
from fseft.methods import adapter_on, count_trainable_parameters, foreground_fractions, get_method, init_head_prior
from fseft.methods.transductive import size_constraint_step, target_sizes
from fseft.prediction.segment import model_preprocess
from fseft.runs.format import write_run_files
from fseft.runs.load import METRICS_FILE, run_extra
from fseft.training.fit import NOT_TRAINED, ExtraLoss, TrainResult, fit
from fseft.training.sampling import feature_patch_batch, feature_volume, sample_patch_slices
from fseft.utils import write_json


def train_adapter(
    adapter: nn.Module,
    support: Sequence[tuple[np.ndarray, np.ndarray]],
    cfg: AdaptConfig,
    seed: int = 0,
    queries: Sequence[np.ndarray] = (),
) -> TrainResult:
    """Train `adapter` on patches of cached support features (`fit`).

    support: ``(features (C, X, Y, Z) float16, labels (S, X, Y, Z) uint8)`` per support volume.
    queries: cached query features ``(C, X, Y, Z)``, used (unlabelled) by the size constraint
    when `cfg.transductive` (an `AdaptConfig`). Each iteration draws `patches_per_volume`
    patches from each of `batch_size` support volumes; with the constraint active, it also
    accumulates the size penalty of one query volume (taken in turn). Returns the per-epoch
    mean losses.
    """

    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    multiclass = cfg.objective == "multiclass"
    adapter.to(device, memory_format=torch.channels_last_3d).train()
    if not any(p.requires_grad for p in adapter.parameters()) or cfg.epochs == 0:
        return NOT_TRAINED
    if cfg.transductive and not queries:
        raise ConfigError("transductive inference needs query volumes")
    volumes = [feature_volume(f, lab) for f, lab in support]
    amp_dtype = torch.bfloat16 if cfg.bf16 else None

    def batch(index: int, rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor]:
        vol = volumes[index]
        windows = sample_patch_slices(
            vol.labels.shape[1:], vol.fg, vol.bg, cfg.patch_size, cfg.patches_per_volume, cfg.pos_ratio, rng
        )
        if all(w == windows[0] for w in windows[1:]):
            windows = windows[:1]  # a volume within one patch: n copies give the mean loss of one
        feats, labels = feature_patch_batch(vol, windows, device, amp_dtype or torch.float32)
        return adapter(feats), labels

    target = target_sizes([v.labels for v in volumes]) if cfg.transductive else None

    def size_constraint(step: int) -> float:
        query = queries[step % len(queries)]
        return size_constraint_step(adapter, query, target, cfg.ti, multiclass, cfg.slab, device, amp_dtype)

    # without --ti the constraint never starts (its losses are recorded as zeros), and since early
    # stopping waits for it, a feature method without --ti runs all its epochs (as before issue 16)
    start = (lambda epochs: math.floor(cfg.ti.start_fraction * epochs)) if cfg.transductive else (lambda epochs: epochs)
    return fit(adapter, len(volumes), batch, cfg.fit_settings(), seed, extra_loss=ExtraLoss(start, size_constraint))


def run_features(base: nn.Module, base_ref: dict[str, Any], dataset: Dataset, task: FewShotTask, names: tuple[str, ...],
                 cfg: AdaptConfig, out: Path) -> dict[str, Any]:
    """`adapt` for a ``"features"`` method: the base stays frozen, the adapter trains on its
    cached features. Writes the run folder and returns its metrics."""

    spec = get_method(cfg.method)
    multiclass = cfg.objective == "multiclass"
    preprocess_cfg = model_preprocess(base, base_ref["path"] or base_ref["id"])
    cache = FeatureCache(base, preprocess_cfg, cfg.cache_dir, cfg.inference)
    trainable = spec.config_cls.trainable and cfg.epochs > 0
    support, queries = [], []
    if trainable:
        support = [
            (c.features, c.labels)
            for c in (cache.load(case, names) for case in task.support_cases(dataset))
        ]
        if cfg.transductive:
            queries = [cache.load(case).features for case in task.query_cases(dataset)]
    adapter, rows = adapter_on(base, cfg.method, cfg.method_options, names, multiclass)
    if support and cfg.head_prior:
        init_head_prior(adapter.head, rows, foreground_fractions([lab for _, lab in support]), multiclass)
    adapter = adapter.to(cfg.device)
    result = train_adapter(adapter, support, cfg, task.seed, queries) if trainable else NOT_TRAINED

    predictions = out / "predictions" if cfg.save_predictions else None
    per_case = evaluate_queries(cached_probabilities(adapter, cache, cfg), task.query_cases(dataset), names, cfg,
                                preprocess_cfg, predictions)
    n_trainable = count_trainable_parameters(adapter) if spec.config_cls.trainable else 0
    metrics = run_metrics(cfg, names, task, n_trainable, result.seconds, per_case)
    base_info = {**base_ref, "fingerprint": cache.model_key, "class_names": list(base.class_names),
                 "feature_channels": int(base.feature_channels)}
    record = {"method": cfg.method, "options": spec.make_config(**cfg.method_options).to_dict(),
              "structures": list(names), "multiclass": multiclass,
              "extra": run_extra(base_info, cfg, preprocess_cfg, task, result)}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in adapter.state_dict().items()}
    write_run_files(out, tensors, record)
    write_json(out / METRICS_FILE, metrics)
    return metrics
