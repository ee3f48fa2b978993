"""The Python API: load a model or an adapter run, adapt a model in a few lines, and segment
scans in memory.

    import fseft

    model = fseft.load_model("phantom")                   # a zoo id or an fseft model file
    adapted = fseft.adapt(model, "data/target", "gallbladder", k=2,
                          method=fseft.methods.SpatialAdapterConfig(), max_steps=50)
    seg = adapted.predict("scan.nii.gz")                  # or a nibabel image, or (array, affine)
    seg.masks, seg.affine, seg.label_map, seg.to_nifti()  # in the scan's own geometry

Everything here is built on the functions `fseft` commands run, so the numbers are theirs:
`fseft.models.zoo.load_model` and `fseft.runs.load.load_adapted_model` load,
`fseft.adaptation.runner.adapt` adapts (and writes the run folder through the one run writer),
`fseft.prediction.segment.segment_volume` segments (preprocessing to model space, sliding window,
back to the scan's geometry, threshold and largest component), with the checks of `fseft
predict` (`fseft.prediction.scan_checks`). `fseft predict` and `fseft adapt` call those same
functions (`predict_path`, `adapt`). Nothing here writes a file unless given a path to write.

`import fseft` stays cheap: `fseft.load_model`, `fseft.adapt`, `fseft.load_run`,
`fseft.Segmenter` and `fseft.Segmentation` import this module (and torch) on first use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import nibabel as nib
import numpy as np

import fseft.methods
from fseft.adaptation import AdaptConfig
from fseft.adaptation import adapt as run_adapt
from fseft.adaptation.config import AUTO
from fseft.data.io import label_image, read_image, volume_from_array
from fseft.data.structures import UnknownStructureError, canonical_name
from fseft.data.volume import Volume
from fseft.errors import ConfigError, InputFileError
from fseft.methods.registry import MethodConfig, available_methods, get_method
from fseft.models.zoo import load_model as zoo_load_model
from fseft.prediction.scan_checks import check_scan, synthetic_model_warning, trained_on_synthetic_data
from fseft.prediction.segment import InferenceConfig, merge_masks, model_preprocess, segment_volume, select_structures
from fseft.runs.load import METRICS_FILE, load_adapted_model

if TYPE_CHECKING:
    import nibabel as nib
    from torch import nn

    from fseft.data.preprocessing import PreprocessConfig
    from fseft.data.volume import Volume
    from fseft.methods.registry import MethodConfig

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
        Returns a `Segmentation`: ``masks`` ``(S, X, Y, Z)`` uint8 on the input's grid,
        ``affine`` the input's, ``structures``, ``label_map``, ``labels``, ``to_nifti()``.
        Logs `fseft predict`'s warnings: once, when the model was trained on synthetic CT
        only; per scan, when a mask's mean HU is unlike its organ (`fseft.prediction.scan_checks`).
        """

        given = {"roi_size": roi_size, "overlap": overlap, "sw_batch_size": sw_batch_size, "bf16": bf16,
                 "threshold": threshold, "largest_component": largest_component}
        cfg = InferenceConfig(device=self.device, progress=progress, **{k: v for k, v in given.items() if v is not None})
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
    run: str | os.PathLike, base: str | os.PathLike | Segmenter | None = None,
    weights: str | os.PathLike | None = None, device: str = "cpu", merge: bool = False,
) -> Segmenter:
    """An `fseft adapt` run folder (copied anywhere) as a model, as `fseft predict --adapter RUN`
    loads it (`fseft.runs.load.load_adapted_model`): its recorded base model, or `base` (a zoo
    id, with `weights` for its file; a model file; a `Segmenter` of `load_model`) where the base
    moved, checked against the weights fingerprint the run recorded; the run's preprocessing.

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


# ---------------------------------------------------------------------------- adaptation


def method_options(method: str | MethodConfig) -> tuple[str, dict[str, Any]]:
    """``(registered method name, options)`` of `adapt`'s `method`: a name (its default
    options; ``"auto"`` too), or a method's config dataclass (`fseft.methods.LoraConfig(rank=8)`,
    one class per method): the options are the fields that differ from the class's defaults,
    as `fseft adapt` records the options given on its command line."""

    if isinstance(method, str):
        if method != AUTO:
            get_method(method)  # unknown: ConfigError listing the methods
        return method, {}
    if isinstance(method, type) and issubclass(method, MethodConfig):
        name = _config_name(method)
        raise TypeError(f"method={name}: give an instance, {name}() (its options as arguments)")
    if not isinstance(method, MethodConfig):
        raise TypeError(f"method must be a method name or a method's config (fseft.methods.LoraConfig(rank=8), ...), "
                        f"not a {type(method).__name__}")
    names = [n for n in available_methods() if get_method(n).config_cls is type(method)]
    if len(names) != 1:
        raise ConfigError(f"{_config_name(type(method))} is the config of {'no' if not names else 'several'} registered "
                          f"method(s){': ' + ', '.join(names) if names else ''}; give method=NAME instead")
    defaults = type(method)()
    options = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)
               if getattr(method, f.name) != getattr(defaults, f.name)}
    return names[0], options


def _config_name(cls: type) -> str:
    """A method config's name in `fseft.methods` (``LoraConfig`` for `LoraMethodConfig`)."""

    exported = [n for n in fseft.methods.__all__ if getattr(fseft.methods, n) is cls]
    return exported[0] if exported else cls.__name__


def adapt(
    model: str | os.PathLike | Segmenter,
    data: str | os.PathLike,
    structures: Sequence[str] | str,
    k: int,
    method: str | MethodConfig = "lp",
    *,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    **options: Any,
) -> Segmenter:
    """Few-shot adaptation of `model` to `structures` from `k` labelled cases of `data`, as
    `fseft adapt` runs it (`fseft.adaptation.runner.adapt`: the same task draw, training and scoring).

    model: a zoo id, an fseft model file, or a `Segmenter` of `load_model` (its zoo id or file is
        what the run records; one loaded with other `weights` is adapted as an in-memory model).
    data: a dataset folder (nnU-Net, TotalSegmentator or FLARE22 layout; `fseft phantom` writes
        one). The task: `k` support cases drawn with `seed`, the other cases holding the
        structures are the queries the returned model is scored on (``.metrics``).
    method: a method name (``"lp"``, ``"spatial-adapter"``, ``"lora"``, ..., ``"auto"``:
        `fseft.methods.available_methods()`) with its default options, or the method's config
        dataclass with options, e.g. ``fseft.methods.LoraConfig(rank=8, decoder="fine-tuned")``.
    out: where to write the run folder (`fseft adapt --out`: the same files); None writes no run
        folder (the run is made in a temporary folder, loaded, and removed, so that the model
        returned is exactly the one a run folder would hold). overwrite: replace a run in `out`.
    **options: `fseft.adaptation.AdaptConfig`'s fields, typed there: ``epochs``, ``max_steps``,
        ``lr``, ``batch_size``, ``patch_size``, ``patches_per_volume``, ``transductive``, ``ti``
        (a `fseft.methods.TransductiveConfig`), ``objective``, ``loss``, ``n_query``, ``cache_dir``,
        ``device``, ``bf16``, ``roi_size``, ``progress``, ... (None or absent: the method's protocol).
    Returns a `Segmenter` of the adapted model (``structures`` = the adapted ones, ``metrics``
    = the run's ``metrics.json``, ``run_dir`` = `out` or None).
    """

    name, given = method_options(method)
    cfg = _adapt_config(name, given, options)
    if out is None and cfg.save_predictions:
        raise ConfigError("save_predictions writes the query masks into the run folder: give out=FOLDER")
    base, base_for_loading = _base_of(model)
    if out is not None:
        run_adapt(base, data, structures, k, seed, out, cfg, overwrite=overwrite)
        return load_run(out, base=base_for_loading, device=cfg.device)
    tmp = Path(tempfile.mkdtemp(prefix="fseft-adapt-"))
    try:
        run_adapt(base, data, structures, k, seed, tmp / "run", cfg, overwrite=True)
        adapted = load_run(tmp / "run", base=base_for_loading, device=cfg.device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    adapted.source = adapted.run_dir = None
    return adapted


def _adapt_config(name: str, given: Mapping[str, Any], options: dict[str, Any]) -> Any:
    """`AdaptConfig(method=name, method_options=given, **options)`, with an error that points a
    method option given as a keyword (``rank=8``) at the method's config."""

    if "method_options" in options or "method" in options:
        raise TypeError("give the method and its options as method=NAME or method=fseft.methods.<Name>Config(...)")
    known = set(AdaptConfig.option_names())
    unknown = sorted(set(options) - known)
    if unknown:
        fields = {f.name for f in dataclasses.fields(get_method(name).config_cls)} if name != AUTO else set()
        misplaced = [o for o in unknown if o in fields]
        if misplaced:
            cls = _config_name(get_method(name).config_cls)
            args = ", ".join(f"{o}={options[o]!r}" for o in misplaced)
            raise TypeError(f"{', '.join(misplaced)}: option(s) of method {name!r}, not of adapt; "
                            f"give method=fseft.methods.{cls}({args})")
        raise TypeError(f"adapt() got unexpected option(s) {', '.join(unknown)}; its options are AdaptConfig's: "
                        f"{', '.join(sorted(known))}")
    return AdaptConfig(method=name, method_options=dict(given), **options)


def _base_of(model: Any) -> tuple[Any, Any]:
    """(what `fseft.adaptation.runner.adapt` is given, the `base` `load_run` loads the run onto)."""
    if isinstance(model, Segmenter):
        if model.adapted:
            raise ConfigError(f"{model!r} is already adapted; adapt a base model (fseft.load_model(ID|PATH))")
        # the id or file, so that the run records where its base is (as `fseft adapt --model`
        # does); a model loaded with other weights is given as the module (recorded in memory)
        reference = model.source if model.source is not None and model._weights is None else model.network
        return reference, model
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), None
    raise TypeError(f"model must be a zoo id, an fseft model file or a fseft.Segmenter (fseft.load_model), "
                    f"not a {type(model).__name__}")
