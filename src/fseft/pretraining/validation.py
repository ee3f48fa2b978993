"""Scoring the held-out validation volumes during pre-training (Dice per class) and choosing
the largest-component post-processing the final model file records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fseft.data.structures import is_multi_part
from fseft.evaluation.metrics import dice
from fseft.evaluation.postprocess import (
    choose_largest_component,
    keep_largest_components,
)
from fseft.inference.sliding_window import InferenceConfig, predict_probabilities
from fseft.pretraining.volume_cache import CachedVolumes


def validation_dice(model: torch.nn.Module, volumes: CachedVolumes, catalogue: Sequence[str],
                    roi_size: Sequence[int], device: torch.device, bf16: bool = False) -> dict[str, float]:
    """Mean Dice over `volumes` of each class they annotate: sigmoid > 0.5 of whole-volume
    sliding-window logits in model space (no largest-component step, no resampling)."""
    return _validation_scores(model, volumes, catalogue, roi_size, device, bf16)[0]


def _validation_scores(model: torch.nn.Module, volumes: CachedVolumes, catalogue: Sequence[str],
                       roi_size: Sequence[int], device: torch.device, bf16: bool = False,
                       largest_component: bool = False) -> tuple[dict[str, float], dict[str, float] | None]:
    """`validation_dice`, and with `largest_component` also the Dice after each mask is reduced
    to its largest connected component (multi-part structures excepted), from the same single
    inference pass; None without it."""

    cfg = InferenceConfig(roi_size=tuple(roi_size), device=str(device), bf16=bf16, progress=False)
    plain: dict[str, list[float]] = {}
    reduced: dict[str, list[float]] = {}
    for item in volumes:
        annotated = item["annotated"].nonzero().flatten().tolist()
        probs = predict_probabilities(model, item["image"][None], cfg, channels=annotated)[0]
        masks = (probs > 0.5).numpy()
        largest = keep_largest_components(masks, [catalogue[c] for c in annotated]) if largest_component else None
        for j, c in enumerate(annotated):
            target = item["label"][c].numpy() > 0.5
            plain.setdefault(catalogue[c], []).append(dice(masks[j], target))
            if largest is not None:
                reduced.setdefault(catalogue[c], []).append(dice(largest[j], target))

    def mean(scores: dict[str, list[float]]) -> dict[str, float]:
        return {c: float(np.mean(scores[c])) for c in catalogue if c in scores}

    return mean(plain), (mean(reduced) if largest_component else None)




def choose_postprocessing(model: torch.nn.Module, volumes: CachedVolumes, catalogue: Sequence[str],
                          roi_size: Sequence[int], device: torch.device, bf16: bool = False) -> dict[str, Any]:
    """Whether each class the validation set annotates keeps only its largest component
    (`fseft.evaluation.postprocess.choose_largest_component` on the validation Dice with and
    without that step; multi-part classes are never reduced, so not chosen), as the model
    file's ``extra.postprocess``: ``{"largest_component": {class: bool}, "validation_dice":
    {class: [with, without]}}``. `fseft predict` follows it (`recorded_whole_structures`)."""

    without, with_step = _validation_scores(model, volumes, catalogue, roi_size, device, bf16, largest_component=True)
    single = [c for c in with_step if not is_multi_part(c)]
    choice = choose_largest_component({c: with_step[c] for c in single}, without)
    whole = [c for c, keep_largest in choice.items() if not keep_largest]
    print("post-processing chosen on the validation set: largest component for every class"
          + (f" except {', '.join(whole)} (kept whole: " + ", ".join(
              f"{c} {without[c]:.3f} against {with_step[c]:.3f}" for c in whole) + ")" if whole else ""), flush=True)
    return {"largest_component": choice,
            "validation_dice": {c: [with_step[c], without[c]] for c in single}}


