"""Inference: a scan in, binary masks in the scan's own geometry out.

The sliding windows are `fseft.inference.sliding_window`'s (`InferenceConfig`,
`predict_probabilities`, imported here as part of this module's API). `segment_volume` adds
preprocessing, the return to native geometry and post-processing. Above it:
`fseft.prediction.segmenter` (the Python API's `Segmenter`, a model that segments scans in
memory) and `fseft.prediction.predict` (`fseft predict`: files, DICOM folders, PACS studies).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fseft.data.preprocessing import PreprocessConfig, preprocess, to_native
from fseft.data.structures import UnknownStructureError, canonical_name, did_you_mean
from fseft.errors import ConfigError, InputFileError
from fseft.evaluation.postprocess import binarize
from fseft.inference.sliding_window import (  # noqa: F401  (this module's API too)
    BLEND_MODES,
    DEFAULT_ROI_SIZE,
    InferenceConfig,
    cpu_has_native_bf16,
    predict_probabilities,
    recommended_roi_size,
    recorded_whole_structures,
    sliding_window_map,
    warn_if_bf16_is_emulated,
)

if TYPE_CHECKING:
    from fseft.data.volume import Volume
    from fseft.models.base import SegmentationModel


def select_structures(class_names: Sequence[str], structures: Sequence[str] | str | None) -> tuple[list[int], tuple[str, ...]]:
    """Output channels of the requested structures (any spelling) among a model's classes.

    Returns ``(channel indices, canonical names)``; `None` selects all classes. An unknown
    structure raises `UnknownStructureError` listing the model's classes.
    """
    if structures is None:
        return list(range(len(class_names))), tuple(class_names)
    if isinstance(structures, str):
        structures = [s for s in structures.split(",") if s.strip()]
    index = {canonical_name(c): i for i, c in enumerate(class_names)}
    channels: list[int] = []
    names: list[str] = []
    for s in structures:
        name = canonical_name(s)
        if name not in index:
            raise UnknownStructureError(
                f"the model has no class {s!r}{did_you_mean(s)}; its classes are: {', '.join(class_names)}"
            )
        if name not in names:
            channels.append(index[name])
            names.append(name)
    if not names:
        raise ConfigError("no structures selected")
    return channels, tuple(names)


def segment_volume(
    model: SegmentationModel,
    volume: Volume,
    preprocess_cfg: PreprocessConfig | None = None,
    cfg: InferenceConfig | None = None,
    structures: Sequence[str] | str | None = None,
) -> np.ndarray:
    """Segment one scan: preprocess, sliding window, sigmoid, back to native geometry, masks.

    volume: the scan, `array` ``(X, Y, Z)`` HU. structures: canonical names (any spelling)
    among `model.class_names`, in the order wanted; None = all of them.
    Probabilities are resampled linearly onto the native grid (`to_native`), then thresholded
    at `cfg.threshold`, then (if `cfg.largest_component`) reduced to their largest component,
    except multi-part structures and those the model file says to keep whole
    (`recorded_whole_structures`).
    Returns ``(S, X, Y, Z)`` uint8 binary masks in `volume`'s geometry.
    """

    cfg = cfg or InferenceConfig()
    preprocess_cfg = preprocess_cfg or PreprocessConfig()
    channels, names = select_structures(model.class_names, structures)
    case = preprocess(volume, None, preprocess_cfg)
    probabilities = predict_probabilities(model, case.image[None], cfg, channels=channels)[0]
    keep_whole = recorded_whole_structures(model)
    masks = np.zeros((len(names), *volume.array.shape[-3:]), dtype=np.uint8)
    # one structure at a time: only one native-resolution float map is alive at once
    for s in range(len(names)):
        native = to_native(probabilities[s : s + 1], case, mode="linear")  # (1, X, Y, Z)
        masks[s] = binarize(native, cfg.threshold, cfg.largest_component, names[s : s + 1], keep_whole)[0]
    return masks


def merge_masks(masks: np.ndarray) -> np.ndarray:
    """Binary masks ``(S, X, Y, Z)`` -> label map ``(X, Y, Z)`` uint8/int16 with value s + 1 for
    structure s. Where masks overlap, the structure listed first keeps the voxel."""
    labels = np.zeros(masks.shape[1:], dtype=np.uint8 if masks.shape[0] < 256 else np.int16)
    for s in range(masks.shape[0] - 1, -1, -1):  # reverse: earlier structures are written last
        labels[masks[s] > 0] = s + 1
    return labels



def model_preprocess(model: Any, source: str | None = None) -> PreprocessConfig:
    """The preprocessing a model records (``model.preprocess``, set from the model file's
    metadata by `load_model`: a `PreprocessConfig` or its dict), else the default
    `PreprocessConfig()`. An invalid recorded config is an `InputFileError` naming `source`
    (the model file or id)."""

    stored = getattr(model, "preprocess", None)
    if isinstance(stored, PreprocessConfig):
        return stored
    if not stored:
        return PreprocessConfig()
    try:
        return PreprocessConfig.from_dict(stored)
    except ConfigError as exc:
        raise InputFileError(f"{source or 'the model'}: invalid preprocessing config in the model file: {exc}") from exc
