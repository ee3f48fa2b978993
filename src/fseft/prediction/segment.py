"""Inference: scans in, binary masks in the scan's own geometry out.

The sliding windows are `fseft.inference.sliding_window`'s (`InferenceConfig`,
`predict_probabilities`, imported here as part of this module's API). `segment_volume` adds
preprocessing, the return to native geometry and post-processing; `predict_path` is
`fseft predict`: files, DICOM folders or folders of cases, with a model or an `fseft adapt` run
(`fseft.runs.load`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from fseft.data.dicom_seg import read_source_headers, write_dicom_seg
from fseft.data.dicom_series import dicom_series_files
from fseft.data.io import ITK_SUFFIXES, NIFTI_SUFFIXES, SUPPORTED, read_image, write_mask
from fseft.data.preprocessing import PreprocessConfig, preprocess, to_native
from fseft.data.structures import UnknownStructureError, canonical_name, did_you_mean
from fseft.errors import ConfigError, InputFileError
from fseft.evaluation.postprocess import binarize
from fseft.evaluation.statistics import structure_statistics
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
from fseft.models.zoo import load_model
from fseft.prediction.scan_checks import check_scan, synthetic_model_warning, trained_on_synthetic_data
from fseft.runs.load import load_adapted_model
from fseft.utils import write_json

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fseft.data.preprocessing import PreprocessConfig
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


# ------------------------------------------------------------------------- fseft predict

# nnU-Net names input channels `<case>_0000.nii.gz`; predictions are named `<case>.nii.gz`.
_NNUNET_CHANNEL_SUFFIX = "_0000"


def _image_suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (*NIFTI_SUFFIXES, *ITK_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return None


def _case_id(path: Path) -> str:
    suffix = _image_suffix(path)
    name = path.name[: -len(suffix)] if suffix else path.name
    return name.removesuffix(_NNUNET_CHANNEL_SUFFIX) or name


def _holds_dicom_series(folder: Path) -> bool:
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def find_scans(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """The scans `fseft predict` reads from `path`, as ``(case id, file or DICOM folder)``.

    `path` is an image file, a folder holding one DICOM series, or a folder of cases (image
    files and/or DICOM series sub-folders). Case ids are file names without extension and
    without nnU-Net's ``_0000`` channel suffix, or the DICOM folder's name.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file or folder")
    if path.is_file():
        if _image_suffix(path) is None:
            raise InputFileError(f"{path}: unsupported file type; expected {SUPPORTED}")
        return [(_case_id(path), path)]
    entries = _visible(path)
    files = [p for p in entries if p.is_file()]
    if not any(_image_suffix(p) for p in files) and files and _holds_dicom_series(path):
        return [(path.name, path)]
    scans = [p for p in files if _image_suffix(p)] + [p for p in entries if p.is_dir() and _holds_dicom_series(p)]
    if not scans:
        raise InputFileError(f"{path}: no readable scans in this folder; expected {SUPPORTED}, or sub-folders of DICOM series")
    cases: dict[str, Path] = {}
    for scan in scans:
        case_id = _case_id(scan) if scan.is_file() else scan.name
        if case_id in cases:
            raise InputFileError(f"{path}: two scans for case {case_id!r}: {cases[case_id].name} and {scan.name}")
        cases[case_id] = scan
    return sorted(cases.items())


def _nifti_output(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _dicom_seg_output(path: Path) -> bool:
    return path.name.lower().endswith(".dcm")


# What `fseft predict` writes per case: a NIfTI label map (or binary masks), or a DICOM SEG.
OUTPUT_TYPES = ("nifti", "dicom-seg")
STATISTICS_FILE = "statistics.json"


def statistics_path(output: str | os.PathLike) -> Path:
    """Where `predict_path` writes the statistics of `output`: ``OUT/statistics.json`` for an
    output folder, ``<name>_statistics.json`` beside a single output file (``seg.nii.gz`` ->
    ``seg_statistics.json``)."""
    output = Path(output)
    if _nifti_output(output) or _dicom_seg_output(output):
        stem = output.name[: -len(".nii.gz")] if output.name.lower().endswith(".nii.gz") else output.stem
        return output.with_name(f"{stem}_{STATISTICS_FILE}")
    return output / STATISTICS_FILE


def check_predict_outputs(
    scans: Sequence[tuple[str, Path]], output: Path, output_type: str, per_structure_files: bool,
    series_id: str | None = None,
) -> None:
    """Refuse, before any model is loaded, inputs and outputs `predict_path` cannot use:
    an unknown `output_type`; a single output file for several scans or per-structure files;
    a ``.dcm`` name without a DICOM SEG, or a NIfTI name with one; a DICOM folder whose series
    cannot be read (`dicom_series_files`: several series, missing slices, ...); and, for a
    DICOM SEG (`InputFileError` naming the file), an input that is not a DICOM series or a
    series without the UIDs and geometry a SEG references (`read_source_headers`); highdicom
    missing (`ConfigError` naming the extra to install)."""
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    if (_nifti_output(output) or _dicom_seg_output(output)) and (len(scans) > 1 or per_structure_files):
        raise ConfigError(
            f"{output}: a single output file needs a single scan and no per-structure files; "
            f"the input holds {len(scans)} scan(s): give an output folder"
        )
    if output_type == "nifti":
        if _dicom_seg_output(output):
            raise ConfigError(f"{output}: a .dcm output is a DICOM SEG: add --output-type dicom-seg, "
                              "or give an output folder or a .nii.gz file name")

        for _, scan in scans:  # DICOM headers (series, missing slices) checked before the model loads
            if scan.is_dir():
                dicom_series_files(scan, series_id)
        return
    if per_structure_files:
        raise ConfigError("a DICOM SEG holds every structure as one segment of one file: drop --per-structure-files")
    if _nifti_output(output):
        raise ConfigError(f"{output}: a NIfTI file name for --output-type dicom-seg; give a folder or a .dcm file name")
    for _, scan in scans:
        if scan.is_file():
            raise InputFileError(
                f"{scan}: not a DICOM series; a DICOM SEG (--output-type dicom-seg) references the DICOM series "
                "it segments: give the series folder, or use --output-type nifti for this file"
            )

    for _, scan in scans:  # every series, so that none fails after hours of inference
        read_source_headers(scan, series_id)


def merge_masks(masks: np.ndarray) -> np.ndarray:
    """Binary masks ``(S, X, Y, Z)`` -> label map ``(X, Y, Z)`` uint8/int16 with value s + 1 for
    structure s. Where masks overlap, the structure listed first keeps the voxel."""
    labels = np.zeros(masks.shape[1:], dtype=np.uint8 if masks.shape[0] < 256 else np.int16)
    for s in range(masks.shape[0] - 1, -1, -1):  # reverse: earlier structures are written last
        labels[masks[s] > 0] = s + 1
    return labels


@dataclass
class PredictResult:
    """What `predict_path` wrote: case id -> output files."""

    outputs: dict[str, list[Path]] = field(default_factory=dict)
    structures: tuple[str, ...] = ()
    statistics: dict[str, dict[str, dict[str, float | int | None]]] = field(default_factory=dict)
    statistics_file: Path | None = None


def predict_path(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    model: str | SegmentationModel | None,
    weights: str | os.PathLike | None = None,
    structures: Sequence[str] | str | None = None,
    cfg: InferenceConfig | None = None,
    preprocess_cfg: PreprocessConfig | None = None,
    per_structure_files: bool = False,
    adapter: str | os.PathLike | None = None,
    merge: bool = False,
    series_id: str | None = None,
    output_type: str = "nifti",
    statistics: bool = False,
) -> PredictResult:
    """`fseft predict`: segment every scan found at `input_path` (see `find_scans`).

    model: a zoo id or an fseft model file (loaded once for all cases, with `weights` if
        given), or a model object; with `adapter`, the base model the adapter sits on (where
        its recorded base moved; checked against the run's weights fingerprint), default: the
        recorded one. One of `model` and `adapter` is required. preprocess_cfg: default = the
        one stored in the model file's metadata (or the run's record), else `PreprocessConfig()`.
    weights: the weights file of a zoo id: `model`'s, or with `adapter` alone the recorded
        base's.
    output: a folder receiving ``<case>.nii.gz`` (label value s + 1 = structure s, label map in
        ``<case>.json`` and a 3D Slicer colour table ``<case>.ctbl`` beside it) or, with
        `per_structure_files`, ``<case>/<structure>.nii.gz`` binary masks; for a single scan it
        may also be a ``.nii.gz`` file name. Every output is in its scan's native geometry (same
        shape and affine).
    output_type: "nifti" (above) or "dicom-seg": ``<case>.dcm`` (or a ``.dcm`` file name for a
        single scan), a DICOM SEG referencing the DICOM series it segments, segment number
        s + 1 = structure s (`fseft.data.dicom_seg.write_dicom_seg`; needs highdicom). Every
        input must then be a DICOM series (checked, with the series' headers, before the model
        is loaded: `check_predict_outputs`).
    statistics: also write each structure's volume (ml) and mean / std HU in the native scan
        (`fseft.evaluation.statistics.structure_statistics`, of the mask as written: the label
        map, where the first structure wins overlaps, or each per-structure mask) to
        `statistics_path(output)`, keyed by case id then structure; rewritten after every case.
    adapter: an `fseft adapt` run folder (any method, copied anywhere): its base model +
        adaptation (`fseft.runs.load.load_adapted_model`) and its recorded preprocessing.
    merge: with `adapter`, fold LoRA / ARENA updates into the base weights first.
    series_id: the DICOM series to read in folders that hold several.
    """

    if model is None and adapter is None:
        raise ConfigError("give a model (--model ID|PATH) or an adapter run folder (--adapter RUN)")
    cfg = cfg or InferenceConfig()
    reference = model if isinstance(model, str) else None
    scans = find_scans(input_path)
    output = Path(output)
    check_predict_outputs(scans, output, output_type, per_structure_files, series_id)
    if merge and adapter is None:
        raise ConfigError("merge folds an adapter into its base model: give an adapter run folder (--adapter RUN)")
    if adapter is not None:
        model = load_adapted_model(adapter, cfg.device, merge=merge, base=model, weights=weights)
        preprocess_cfg = preprocess_cfg or model.preprocess
    elif isinstance(model, str):
        model = load_model(reference, weights, device=cfg.device)
        preprocess_cfg = preprocess_cfg or model_preprocess(model, reference)
    _, names = select_structures(model.class_names, structures)  # fail before any work

    if trained_on_synthetic_data(model, reference if adapter is None else None, adapter):
        logger.warning("%s", synthetic_model_warning(adapter is not None))  # once per run
    label_map = {i + 1: name for i, name in enumerate(names)}
    result = PredictResult(structures=names, statistics_file=statistics_path(output) if statistics else None)
    for case_id, scan in tqdm(scans, desc="predict", unit="case", disable=not cfg.progress or len(scans) < 2):
        volume = read_image(scan, series_id=series_id if scan.is_dir() else None)
        masks = segment_volume(model, volume, preprocess_cfg, cfg, names)
        check_scan(volume, masks, names)  # a warning naming the scan where the masks look implausible
        if per_structure_files:
            written = [write_mask(masks[s], volume, output / case_id / f"{name}.nii.gz") for s, name in enumerate(names)]
        else:
            masks = merge_masks(masks)  # the label map: what the file holds, and what is measured
            if output_type == "dicom-seg":
                target = output if _dicom_seg_output(output) else output / f"{case_id}.dcm"
                headers = read_source_headers(scan, series_id)  # the series read_image read
                written = [write_dicom_seg(masks, volume, label_map, headers, target)]
            else:
                target = output if _nifti_output(output) else output / f"{case_id}.nii.gz"
                written = [write_mask(masks, volume, target, label_map)]
        result.outputs[case_id] = written
        if statistics:
            result.statistics[case_id] = structure_statistics(volume, masks, names)
            write_json(result.statistics_file, result.statistics)
    return result


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
