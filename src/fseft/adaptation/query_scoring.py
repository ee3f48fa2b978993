"""Scoring an adaptation on its query cases, the same way for every method: per-structure
probabilities in model space (`cached_probabilities` for feature adapters, `network_probabilities`
for adapted networks), back to each scan's native geometry, masks, and Dice / NSD / HD95
(`evaluate_queries`); then the run's ``metrics.json`` (`run_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fseft.adaptation.config import AdaptConfig
from fseft.data.datasets import Case
from fseft.data.io import write_mask
from fseft.data.preprocessing import PreprocessConfig, PreprocessedCase, preprocess, to_native
from fseft.data.tasks import FewShotTask
from fseft.evaluation.metrics import evaluate_masks
from fseft.evaluation.postprocess import binarize, keep_largest_components
from fseft.inference.feature_cache import CacheError, FeatureCache
from fseft.methods.features import predict_cached
from fseft.prediction.segment import merge_masks, predict_probabilities


def _masks(probs_native: np.ndarray, cfg: AdaptConfig, multiclass: bool, structures: Sequence[str]) -> np.ndarray:
    """Binary masks ``(S, X, Y, Z)`` uint8 from native-space probabilities of `structures`."""

    if not multiclass:
        return binarize(probs_native, cfg.threshold, cfg.largest_component, structures)
    # argmax over (background, structures): background probability is 1 - sum(structures)
    background = 1.0 - probs_native.sum(axis=0, keepdims=True)
    winner = np.concatenate([background, probs_native]).argmax(axis=0)
    masks = np.stack([winner == s + 1 for s in range(probs_native.shape[0])])
    if cfg.largest_component:
        masks = keep_largest_components(masks, structures)
    return masks.astype(np.uint8)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def mean_metrics(per_case: dict[str, dict[str, dict[str, float]]], structures: Sequence[str]) -> dict:
    """Mean Dice, NSD and HD95 per structure over the cases (None where no case has a value)."""
    mean: dict[str, dict[str, float | None]] = {}
    for s in structures:
        mean[s] = {}
        for metric in ("dice", "nsd", "hd95"):
            vals = [v[s][metric] for v in per_case.values() if v[s][metric] is not None]
            mean[s][metric] = _finite_or_none(float(np.mean(vals))) if vals else None
    return mean


def run_metrics(cfg: AdaptConfig, names: Sequence[str], task: FewShotTask, trainable: int, seconds: float,
                per_case: dict[str, Any]) -> dict[str, Any]:
    """`metrics.json` (the same keys for every method; a method's `extra_metrics` come after)."""
    return {
        "method": cfg.method,
        "structures": list(names),
        "k": int(task.k),
        "seed": int(task.seed),
        "trainable_params": int(trainable),
        "train_seconds": round(seconds, 3),
        "queries": per_case,
        "mean": mean_metrics(per_case, names),
    }


def cached_probabilities(adapter: nn.Module, cache: FeatureCache, cfg: AdaptConfig) -> Callable[[Case, PreprocessedCase], torch.Tensor]:
    """`evaluate_queries`' probability function of a feature adapter: the adapter over the
    query's cached features, the whole volume slab by slab."""

    def probabilities(case: Case, pre: PreprocessedCase) -> torch.Tensor:
        cached = cache.load(case)
        if tuple(pre.image.shape[1:]) != cached.spatial_shape:
            raise CacheError(
                f"cached features {cached.path} have shape {cached.spatial_shape} but {case.image} "
                f"preprocesses to {tuple(pre.image.shape[1:])}; delete that folder and run again"
            )
        return predict_cached(adapter, cached.features, cfg.objective == "multiclass", cfg.slab, cfg.device, cfg.bf16)

    return probabilities


def network_probabilities(model: nn.Module, cfg: AdaptConfig) -> Callable[[Case, PreprocessedCase], torch.Tensor]:
    """`evaluate_queries`' probability function of an adapted network (`AdaptedNetwork`): the
    project's sliding-window inference (`predict_probabilities`), as `fseft predict` runs it."""

    inference = cfg.inference
    return lambda case, pre: predict_probabilities(model, pre.image[None], inference)[0]


def evaluate_queries(
    probabilities: Callable[[Case, PreprocessedCase], torch.Tensor],
    query_cases: Sequence[Case],
    structures: Sequence[str],
    cfg: AdaptConfig,
    preprocess_cfg: PreprocessConfig,
    predictions_dir: Path | None = None,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Segment each query and score it in native geometry.

    probabilities: ``(case, PreprocessedCase) -> (S, X', Y', Z')`` per-structure probabilities
    in model space (`cached_probabilities` or `network_probabilities`). cfg: the run's
    `AdaptConfig` (objective, threshold, largest_component, progress).
    Probabilities are resampled to the scan's grid (linear), then thresholded (or argmax for
    multiclass) and reduced to each structure's largest component; Dice / NSD / HD95 by
    `fseft.evaluation.metrics.evaluate_masks` (NaN written as null).
    """

    multiclass = cfg.objective == "multiclass"
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for case in tqdm(query_cases, desc="evaluate queries", unit="case", disable=not cfg.progress):
        image, gt = case.load(structures)
        pre = preprocess(image, None, preprocess_cfg)
        probs = probabilities(case, pre)
        masks = _masks(to_native(probs, pre, mode="linear"), cfg, multiclass, structures)
        scores = evaluate_masks(masks, gt.array, gt.spacing, structures)
        results[case.case_id] = {
            s: {m: _finite_or_none(v) for m, v in vals.items()} for s, vals in scores.items()
        }
        if predictions_dir is not None:  # the label map `fseft predict` writes (first structure keeps overlaps)
            write_mask(merge_masks(masks), image, predictions_dir / f"{case.case_id}.nii.gz",
                       label_map={s + 1: name for s, name in enumerate(structures)})
    return results
