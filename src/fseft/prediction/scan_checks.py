"""`fseft predict` says when it is out of its depth (issue 25; docs/real_ct.md).

Two warnings, both logged (``logging``), never changing what is written:

- once per run, when the model was trained on synthetic CT only (the embedded ``phantom``
  model, a copy of its file, an adapter on it, or a model file whose ``extra.training_data`` is
  ``"synthetic"``): it is not a model for real CT, which needs a public checkpoint (`synthetic_model_warning`);
- per scan, when the predicted masks do not look like the organs they name: the mean Hounsfield
  units under a parenchymal organ's mask are outside what that organ shows on CT, whatever the
  contrast phase (`implausible_masks`). That is what a model does on a scan unlike its training
  data: on the real head-and-neck CT s0002 the phantom model calls skull and vertebrae "liver"
  (mean 323 HU) and "kidney_left" (755 HU).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fseft.data.volume import Volume
from fseft.models.zoo import MODEL_SPECS
from fseft.runs.format import read_run_record
from fseft.utils import file_sha256

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"  # the value of a model file's extra.training_data for synthetic-only training
PHANTOM_ID = "phantom"

# Mean HU under a mask of these organs, on any CT phase (unenhanced to excretory), with margin:
# a fatty liver is above -60, a spleen or liver in the arterial phase below 200, a kidney with
# contrast in its collecting system below 350. Vessels (contrast up to 600 HU), the stomach and
# bowel (air, fluid) and bone are not checked.
ORGAN_HU_RANGES: dict[str, tuple[float, float]] = {
    "liver": (-100.0, 250.0),
    "spleen": (-100.0, 250.0),
    "pancreas": (-100.0, 250.0),
    "gallbladder": (-100.0, 250.0),
    "kidney_left": (-100.0, 400.0),
    "kidney_right": (-100.0, 400.0),
}
MIN_CHECKED_ML = 1.0  # masks smaller than this are too few voxels to judge


def _bundled_phantom() -> Path | None:
    bundled = MODEL_SPECS[PHANTOM_ID].bundled
    path = Path(str(resources.files("fseft").joinpath(bundled))) if bundled else None
    return path if path is not None and path.is_file() else None


def _is_bundled_phantom_file(path: str | Path | None, sha256: str | None = None) -> bool:
    """Whether a weights file (or a recorded SHA-256) is the embedded phantom model's file."""

    bundled = _bundled_phantom()
    if bundled is None:
        return False
    if sha256 is not None:
        return sha256 == file_sha256(bundled)
    if path is None:
        return False
    path = Path(path)
    try:
        if path.resolve() == bundled.resolve():
            return True
        if not path.is_file() or path.stat().st_size != bundled.stat().st_size:
            return False
    except OSError:
        return False
    return file_sha256(path) == file_sha256(bundled)


def trained_on_synthetic_data(model: Any, reference: str | None = None, adapter: str | Path | None = None) -> bool:
    """Whether `model` (as `fseft predict` loaded it from `reference`, a zoo id or model file),
    or the base of the `adapter` run, was trained on synthetic CT only: the zoo's
    ``phantom`` (by id, or its file under another name), or a model file whose
    ``extra.training_data`` says ``"synthetic"``."""
    if adapter is not None:
        base = ((read_run_record(adapter).get("extra") or {}).get("base_model")) or {}
        return base.get("id") == PHANTOM_ID or _is_bundled_phantom_file(None, base.get("file_sha256"))
    config: Mapping[str, Any] = getattr(model, "model_config", None) or {}
    if config.get("model_id") == PHANTOM_ID:
        return True
    if (config.get("extra") or {}).get("training_data") == SYNTHETIC:
        return True
    if reference == PHANTOM_ID:
        return True
    return _is_bundled_phantom_file(config.get("weights") or reference)


def _and(names: Sequence[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else list(names))


def synthetic_model_warning(adapter: bool = False) -> str:
    """The once-per-run warning for a model (or an `adapter`'s base) trained on synthetic CT
    only."""

    public = [m for m in MODEL_SPECS if m != PHANTOM_ID]
    ready = [m for m in public if MODEL_SPECS[m].head_pretrained]
    to_adapt = [m for m in public if not MODEL_SPECS[m].head_pretrained]
    origin = "the embedded 'phantom' model: phantoms, and CT painted from two real patients' label maps"
    what = (f"this adapter's base model was trained on synthetic CT only ({origin}): on real CT its own head "
            "misses organs and adapters on it recover only part of them" if adapter else
            f"this model was trained on synthetic CT only ({origin}): on a real abdomen it finds the aorta, "
            "vena cava and vertebrae and part of the liver and stomach, and misses the spleen, kidneys and pancreas")
    return (f"{what}; see docs/real_ct.md. Real CT needs a public checkpoint: {_and(ready)} segment as they are; "
            f"{_and(to_adapt)} after `fseft adapt`. `fseft models` lists them and where their weights go")


def implausible_masks(image: np.ndarray, masks: np.ndarray, names: Sequence[str],
                      voxel_ml: float) -> list[tuple[str, float, float]]:
    """The masks whose mean HU lies outside their organ's range (`ORGAN_HU_RANGES`), as
    ``(structure, mean HU, volume ml)``. image ``(X, Y, Z)`` HU and masks ``(S, X, Y, Z)`` on the
    same native grid; masks under `MIN_CHECKED_ML` and structures without a range are skipped."""
    out = []
    for s, name in enumerate(names):
        hu_range = ORGAN_HU_RANGES.get(name)
        if hu_range is None:
            continue
        inside = masks[s] > 0
        n = int(np.count_nonzero(inside))
        if n * voxel_ml < MIN_CHECKED_ML:
            continue
        mean = float(image[inside].mean(dtype=np.float64))
        if not hu_range[0] <= mean <= hu_range[1]:
            out.append((name, mean, n * voxel_ml))
    return out


def implausible_masks_warning(source: str, found: Sequence[tuple[str, float, float]]) -> str:
    """The per-scan warning naming the file and the masks `implausible_masks` found."""
    listed = ", ".join(f"{name} (mean {mean:.0f} HU over {ml:.1f} ml)" for name, mean, ml in found)
    ranges = "; ".join(f"{name} {lo:.0f} to {hi:.0f} HU" for name, (lo, hi) in ORGAN_HU_RANGES.items()
                       if name in {f[0] for f in found})
    return (f"{source}: these masks do not look like the organs they name: {listed} (on CT: {ranges}). "
            "The scan is likely unlike the model's training data (another body region, another kind "
            "of image) and these masks false positives")


def check_scan(volume: Volume, masks: np.ndarray, names: Sequence[str]) -> str | None:
    """`fseft predict`'s per-scan check: the warning for `volume` (a `fseft.data.volume.Volume`,
    native geometry) and its predicted masks ``(S, X, Y, Z)``, or None (also logged)."""
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    found = implausible_masks(volume.array, masks, names, voxel_ml)
    if not found:
        return None
    message = implausible_masks_warning(volume.source, found)
    logger.warning("%s", message)
    return message
