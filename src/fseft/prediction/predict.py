"""`fseft predict`: every scan found at a path (image files, DICOM series folders, folders of
cases) or in a PACS study, segmented by a model or an `fseft adapt` run (the Python API's
`fseft.prediction.segmenter.Segmenter`) and written in its own geometry: NIfTI label maps or
masks, DICOM SEG, statistics; DICOM SEG and reports stored to a PACS on request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk
from tqdm.auto import tqdm

from fseft.data.dicom_seg import read_source_headers, write_dicom_seg
from fseft.data.dicom_series import dicom_series_files
from fseft.data.dicomweb import check_server, is_dicomweb_url, retrieved_series, store_results
from fseft.data.io import ITK_SUFFIXES, NIFTI_SUFFIXES, SUPPORTED, read_image, write_mask
from fseft.errors import ConfigError, InputFileError
from fseft.evaluation.statistics import structure_statistics
from fseft.prediction.scan_checks import trained_on_synthetic_data
from fseft.prediction.segment import InferenceConfig, merge_masks, model_preprocess, select_structures
from fseft.prediction.segmenter import Segmenter, load_model, load_run
from fseft.utils import write_json

if TYPE_CHECKING:
    from fseft.data.preprocessing import PreprocessConfig
    from fseft.models.base import SegmentationModel

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



@dataclass
class PredictResult:
    """What `predict_path` wrote: case id -> output files."""

    outputs: dict[str, list[Path]] = field(default_factory=dict)
    structures: tuple[str, ...] = ()
    statistics: dict[str, dict[str, dict[str, float | int | None]]] = field(default_factory=dict)
    statistics_file: Path | None = None
    stored: dict[Path, str] = field(default_factory=dict)  # with store: file -> stored SOP Instance UID


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
    store: str | None = None,
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
    series_id: the DICOM series to read in folders that hold several (or in a DICOMweb study).
    input_path may also be a DICOMweb study URL, ``<root>/studies/<UID>[/series/<UID>]``: its CT
        series is retrieved to a temporary folder, segmented as a series folder (case id = its
        SeriesInstanceUID) and removed afterwards (`fseft.data.dicomweb.retrieved_series`).
    store: a DICOMweb URL (service root): STOW-RS every DICOM SEG written (needs
        ``output_type="dicom-seg"``) and, with `statistics`, a TID 1500 report of its volumes
        (``<seg>_sr.dcm`` beside it, `fseft.data.dicom_sr`); `PredictResult.stored` holds the
        stored SOP Instance UIDs. The server is checked before any work; a failed store raises
        `StoreError` and leaves every local output in place.
    """

    if model is None and adapter is None:
        raise ConfigError("give a model (--model ID|PATH) or an adapter run folder (--adapter RUN)")
    if store is not None or is_dicomweb_url(str(input_path)):  # a PACS: checked before the model loads
        if store is not None:
            if output_type != "dicom-seg":
                raise ConfigError("--store sends DICOM SEG objects to a PACS: add --output-type dicom-seg")
            check_server(store)
        if is_dicomweb_url(str(input_path)):
            with retrieved_series(str(input_path), series_id) as (folder, _):
                return predict_path(folder, output, model, weights=weights, structures=structures, cfg=cfg,
                                    preprocess_cfg=preprocess_cfg, per_structure_files=per_structure_files,
                                    adapter=adapter, merge=merge, output_type=output_type, statistics=statistics,
                                    store=store)
    cfg = cfg or InferenceConfig()
    scans = find_scans(input_path)
    output = Path(output)
    check_predict_outputs(scans, output, output_type, per_structure_files, series_id)
    if merge and adapter is None:
        raise ConfigError("merge folds an adapter into its base model: give an adapter run folder (--adapter RUN)")
    # the Python API's model (fseft.load_run / fseft.load_model) segments each scan
    if adapter is not None:
        segmenter = load_run(adapter, base=model, weights=weights, device=cfg.device, merge=merge)
    elif isinstance(model, str):
        segmenter = load_model(model, weights, device=cfg.device)
    else:
        segmenter = Segmenter(model, model_preprocess(model), device=cfg.device,
                              synthetic=trained_on_synthetic_data(model, None))
    if preprocess_cfg is not None:
        segmenter.preprocess = preprocess_cfg
    _, names = select_structures(segmenter.structures, structures)  # fail before any work

    label_map = {i + 1: name for i, name in enumerate(names)}
    result = PredictResult(structures=names, statistics_file=statistics_path(output) if statistics else None)
    for case_id, scan in tqdm(scans, desc="predict", unit="case", disable=not cfg.progress or len(scans) < 2):
        volume = read_image(scan, series_id=series_id if scan.is_dir() else None)
        # warns once per run on a synthetic-only model, and per scan where the masks look implausible
        masks = segmenter.predict(volume, structures=names, inference=cfg).masks
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
    if store is not None:
        result.stored = store_results(store, result.outputs, result.statistics if statistics else None)
    return result
