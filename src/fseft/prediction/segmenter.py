"""A model that segments scans in memory: `Segmenter` (what the Python API's `fseft.load_model`,
`fseft.load_run` and `fseft.adapt` return, and what `fseft predict` runs per scan) and its
`Segmentation` (masks in the scan's own geometry). Nothing here writes a file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import nibabel as nib
import numpy as np

from fseft.data.io import label_image, read_image, volume_from_array
from fseft.data.structures import UnknownStructureError, canonical_name
from fseft.data.volume import Volume
from fseft.errors import ConfigError, InputFileError
from fseft.models.zoo import load_model as zoo_load_model
from fseft.prediction.scan_checks import check_scan, synthetic_model_warning, trained_on_synthetic_data
from fseft.prediction.segment import InferenceConfig, merge_masks, model_preprocess, segment_volume, select_structures
from fseft.runs.load import METRICS_FILE, load_adapted_model

if TYPE_CHECKING:
    from torch import nn

    from fseft.data.preprocessing import PreprocessConfig

logger = logging.getLogger(__name__)

#: what `Segmenter.predict` reads: a NIfTI / NRRD / MHA file or DICOM series folder, a nibabel
#: image, an ``(array (X, Y, Z), affine (4, 4))`` pair, or a `fseft.data.volume.Volume`
ImageLike = Union[str, os.PathLike, "nib.spatialimages.SpatialImage", tuple[Any, Any], "Volume"]

_IMAGE_KINDS = ("a path (NIfTI, NRRD, MHA/MHD file or DICOM series folder)", "a nibabel image",
                "an (array, affine) pair", "an fseft.data.volume.Volume")


# ---------------------------------------------------------------------------- inputs


def to_volume(image: ImageLike, *, series_id: str | None = None) -> Volume:
    """A scan as the `fseft.data.volume.Volume` the models read: ``array`` ``(X, Y, Z)`` float32 HU,
    ``affine`` ``(4, 4)`` voxel index -> RAS+ mm.

    image: a path (read by `fseft.data.io.read_image`, as `fseft predict` reads it: NIfTI, NRRD,
        MHA/MHD, or a DICOM series folder, `series_id` choosing among several), a nibabel image
        (its data with scaling applied, and ``img.affine``), an ``(array, affine)`` pair
        (``(X, Y, Z)`` HU in nibabel's voxel order, and its ``(4, 4)`` affine), or a `Volume`.
    Arrays are checked as files are (`fseft.data.io.volume_from_array`): 3D, real numbers,
    finite, an invertible affine; `InputFileError` naming the problem. Anything else (a bare
    array without its affine, a tensor, ...) is a `TypeError` saying what is accepted.
    """

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return read_image(path, series_id=series_id if path.is_dir() else None)
    if series_id is not None:
        raise ConfigError("series_id picks a DICOM series in a folder: give the folder's path")
    if isinstance(image, Volume):
        return volume_from_array(image.array, image.affine, image.source)
    if isinstance(image, tuple) and len(image) == 2:
        array, affine = image
        if affine is None:
            raise TypeError("(array, affine): the affine is None; give the (4, 4) voxel-to-world matrix "
                            "(nibabel's img.affine)")
        return volume_from_array(array, affine, f"the array of shape {np.shape(array)}")

    if isinstance(image, nib.spatialimages.SpatialImage):
        source = image.get_filename() or f"the nibabel image of shape {image.shape}"
        if image.affine is None:
            raise InputFileError(f"{source}: the nibabel image has no affine (voxel -> world mm); "
                                 "create it with one, e.g. nib.Nifti1Image(array, affine)")
        return volume_from_array(np.asanyarray(image.dataobj), image.affine, source)
    if isinstance(image, np.ndarray):
        raise TypeError(f"a numpy array of shape {image.shape} alone has no geometry: give (array, affine), "
                        "affine the (4, 4) voxel index -> RAS+ mm matrix (nibabel's img.affine)")
    raise TypeError(f"cannot segment a {type(image).__name__}; give {', '.join(_IMAGE_KINDS[:-1])} "
                    f"or {_IMAGE_KINDS[-1]}")


# ---------------------------------------------------------------------------- outputs


@dataclass(frozen=True, eq=False)
class Segmentation:
    """What `Segmenter.predict` returns: binary masks in the input scan's own geometry.

    masks: ``(S, X, Y, Z)`` uint8 (0 / 1), one per structure of `structures`, on the input's
        voxel grid (same ``(X, Y, Z)`` shape, same voxel order).
    affine: ``(4, 4)`` float64, the input's voxel index -> RAS+ mm matrix.
    structures: canonical names, in the order of `masks`.
    source: the scan (file, folder, or a description of the array).
    """

    masks: np.ndarray
    affine: np.ndarray
    structures: tuple[str, ...]
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)``: the input's shape."""
        return tuple(int(v) for v in self.masks.shape[1:])  # type: ignore[return-value]

    @property
    def label_map(self) -> dict[int, str]:
        """Label value -> structure of `labels` and `to_nifti`: ``{1: structures[0], ...}``."""
        return {i + 1: name for i, name in enumerate(self.structures)}

    @property
    def labels(self) -> np.ndarray:
        """The label map ``(X, Y, Z)`` (uint8, int16 beyond 255 structures): value s + 1 where
        structure s is, the first structure winning overlaps, as `fseft predict` writes it."""

        return merge_masks(self.masks)

    def mask(self, structure: str) -> np.ndarray:
        """The binary mask ``(X, Y, Z)`` uint8 of one structure (any spelling)."""

        name = canonical_name(structure)
        if name not in self.structures:
            raise UnknownStructureError(f"no mask for {structure!r}; this segmentation has: {', '.join(self.structures)}")
        return self.masks[self.structures.index(name)]

    def to_nifti(self) -> nib.Nifti1Image:
        """`labels` as the NIfTI image `fseft predict` writes (`fseft.data.io.label_image`: the
        smallest integer type, `affine` as sform and qform); save it with ``img.to_filename``
        and `label_map` beside it if you want files."""

        return label_image(self.labels, self.affine)


# ---------------------------------------------------------------------------- models


class Segmenter:
    """A model that segments scans in memory: a zoo or file model (`load_model`), an adapter
    run (`load_run`), or the model `adapt` returns.

    Attributes:
        network: the torch module (a `fseft.models.base.SegmentationModel`, or the adapted
            model of `fseft.runs.load.load_adapted_model`), in eval mode on `device`; its
            ``forward`` gives per-structure logits ``(B, S, D, H, W)``.
        preprocess: the `PreprocessConfig` it was trained with (model space: orientation,
            spacing in mm, HU window, crop).
        device: where `network` runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        source: the zoo id, model file or run folder it was loaded from; None for a model
            adapted in memory.
        run_dir: the adapter run folder (`load_run`, or `adapt` with ``out``), else None.
        metrics: for an adapted model, the run's ``metrics.json`` (query Dice / NSD / HD95 per
            case and mean, trainable parameters, training seconds), else None.
    """

    def __init__(self, network: nn.Module, preprocess: PreprocessConfig, *, device: str = "cpu",
                 source: str | None = None, run_dir: Path | None = None, metrics: dict[str, Any] | None = None,
                 synthetic: bool = False, weights: str | None = None) -> None:
        self.network = network
        self.preprocess = preprocess
        self.device = str(device)
        self.source = source
        self.run_dir = run_dir
        self.metrics = metrics
        self._synthetic = synthetic  # trained on synthetic CT only: `fseft predict`'s warning
        self._weights = weights  # the weights file a zoo id was loaded with (`load_model(weights=)`)
        self._warned = False

    @property
    def structures(self) -> tuple[str, ...]:
        """The structures it segments (canonical names): its output channels."""
        return tuple(self.network.class_names)

    @property
    def adapted(self) -> bool:
        """Whether it is an adaptation (`load_run`, `adapt`) rather than a base model."""
        return self.run_dir is not None or self.metrics is not None

    def __repr__(self) -> str:
        what = self.source or "adapted in memory"
        names = ", ".join(self.structures[:6]) + (", ..." if len(self.structures) > 6 else "")
        return f"<fseft.Segmenter {what}: {len(self.structures)} structure(s) ({names}) on {self.device}>"

    def predict(
        self,
        image: ImageLike,
        *,
        structures: Sequence[str] | str | None = None,
        series_id: str | None = None,
        roi_size: int | Sequence[int] | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        bf16: bool | None = None,
        threshold: float | None = None,
        largest_component: bool | None = None,
        progress: bool = False,
        inference: InferenceConfig | None = None,
    ) -> Segmentation:
        """Segment one scan in memory, as `fseft predict` does, and return its masks in the
        scan's own geometry; no file is written.

        image: a path (NIfTI, NRRD, MHA/MHD, or a DICOM series folder, `series_id` picking one
            of several), a nibabel image, an ``(array (X, Y, Z) HU, affine (4, 4))`` pair, or a
            `fseft.data.volume.Volume` (see `to_volume`).
        structures: which of `self.structures` (any spelling, a list or ``"a,b"``), in the order
            wanted; None: all.
        roi_size, overlap, sw_batch_size, bf16, threshold, largest_component, progress: the
            `fseft.prediction.segment.InferenceConfig` fields (None: its defaults, as `fseft
            predict`'s: the window the model records, overlap 0.25, threshold 0.5, largest
            connected component per structure).
        inference: a whole `InferenceConfig` instead of those fields (`fseft predict` passes
            its own); its device is the one the model was loaded on.
        Returns a `Segmentation`: ``masks`` ``(S, X, Y, Z)`` uint8 on the input's grid,
        ``affine`` the input's, ``structures``, ``label_map``, ``labels``, ``to_nifti()``.
        Logs `fseft predict`'s warnings: once, when the model was trained on synthetic CT
        only; per scan, when a mask's mean HU is unlike its organ (`fseft.prediction.scan_checks`).
        """

        given = {"roi_size": roi_size, "overlap": overlap, "sw_batch_size": sw_batch_size, "bf16": bf16,
                 "threshold": threshold, "largest_component": largest_component}
        given = {k: v for k, v in given.items() if v is not None}
        if inference is not None and given:
            raise TypeError(f"give inference=InferenceConfig(...) or its fields ({', '.join(given)}), not both")
        cfg = inference or InferenceConfig(device=self.device, progress=progress, **given)
        _, names = select_structures(self.structures, structures)  # before reading the scan
        volume = to_volume(image, series_id=series_id)
        if self._synthetic and not self._warned:
            logger.warning("%s", synthetic_model_warning(self.adapted))
            self._warned = True
        masks = segment_volume(self.network, volume, self.preprocess, cfg, names)
        check_scan(volume, masks, names)
        return Segmentation(masks, np.array(volume.affine, dtype=np.float64), names, volume.source)


def load_model(model: str | os.PathLike, weights: str | os.PathLike | None = None, device: str = "cpu") -> Segmenter:
    """A base model ready to segment: a zoo id (``"phantom"``, the embedded model, or a public
    checkpoint's id: `fseft models`) or the path of an fseft model file.

    weights: the weights file of a zoo id (default: ``$FSEFT_WEIGHTS_DIR/<id>.pth`` or the
    embedded file). device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (checked: `ConfigError` when CUDA
    is absent). Loaded by `fseft.models.zoo.load_model`, with the preprocessing its file records
    (`fseft.prediction.segment.model_preprocess`), as `fseft predict --model` loads it.
    """

    InferenceConfig(device=device)  # the device, checked before loading
    reference = os.fspath(model)
    network = zoo_load_model(reference, weights, device=device)
    return Segmenter(network, model_preprocess(network, reference), device=device, source=reference,
                     synthetic=trained_on_synthetic_data(network, reference),
                     weights=None if weights is None else os.fspath(weights))


def load_run(
    run: str | os.PathLike, base: str | os.PathLike | Segmenter | nn.Module | None = None,
    weights: str | os.PathLike | None = None, device: str = "cpu", merge: bool = False,
) -> Segmenter:
    """An `fseft adapt` run folder (copied anywhere) as a model, as `fseft predict --adapter RUN`
    loads it (`fseft.runs.load.load_adapted_model`): its recorded base model, or `base` (a zoo
    id, with `weights` for its file; a model file; a `Segmenter` of `load_model`, or a model
    object) where the base moved, checked against the weights fingerprint the run recorded; the
    run's preprocessing.

    merge: fold LoRA / ARENA updates into the base weights (network runs). ``metrics`` holds
    the run's ``metrics.json`` where there is one.
    """

    InferenceConfig(device=device)
    run_dir = Path(run)
    if isinstance(base, Segmenter):
        if base.adapted:
            raise ConfigError(f"base: {base!r} is an adapted model; an adapter run's base is a plain model "
                              "(fseft.load_model(ID|PATH)), or leave base out to use the recorded one")
        base = base.network
    network = load_adapted_model(run_dir, device, merge=merge, base=base, weights=weights)
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = None
    return Segmenter(network, network.preprocess, device=device, source=str(run_dir), run_dir=run_dir,
                     metrics=metrics if isinstance(metrics, dict) else None,
                     synthetic=trained_on_synthetic_data(network, None, run_dir))
