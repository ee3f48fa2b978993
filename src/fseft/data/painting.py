"""Synthetic CT painted from real label maps: SynthSeg's generative model (Billot et al., Medical
Image Analysis 2023) carried over to CT, for pre-training a model that transfers to real scans.

The phantoms (`fseft.data.phantom`) draw their anatomy from ellipsoids and tubes; a model
trained on them alone learnt their shapes and HU, not a patient's (docs/real_ct.md: Dice 0 on
most organs of real abdomens). Here the anatomy comes from a real patient's label map instead
(a TotalSegmentator-layout case: ``ct.nii.gz`` + ``segmentations/<structure>.nii.gz``), and
each synthetic case is that anatomy

1. deformed: a random rotation, anisotropic scaling and a smooth random displacement field;
2. seen through a clinical field of view: a random sub-box of the body (crops that cut the body
   outline or start mid-abdomen) on a random scanner grid (in-plane and slice spacing);
3. painted: every structure, and every unlabelled voxel by its tissue class (air, fat, soft
   tissue, dense), gets a HU level drawn around the real patient's own level for it, with
   shared shifts for the contrast phase (vessels together, parenchymal organs together), a
   texture that blends the real image's texture with synthetic correlated noise, then blur
   (partial volume) and acquisition noise.

Shape and context carry the signal; intensities vary beyond one scanner and phase. A case is a
deterministic function of (sources, config, seed, case index). The labels written are the
`structures` asked for (default: the embedded model's classes; ``vertebrae`` is the union of the
``vertebrae_*`` masks); every other structure is painted but unlabelled.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from fseft.data.io import read_image, read_labels, write_image, write_mask
from fseft.data.structures import canonical_names
from fseft.data.volume import Volume
from fseft.errors import ConfigError, InputFileError
from fseft.utils import atomic_dir, write_json

# Bump when a change alters the arrays a (sources, config, seed, case) produces.
PAINTING_VERSION = "1"

#: the embedded model's classes: what a painted dataset labels by default
DEFAULT_STRUCTURES = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "aorta",
                      "inferior_vena_cava", "vertebrae")

#: unlabelled voxels are painted by the tissue class of their real HU: (name, upper bound in HU)
TISSUE_CLASSES = (("_air", -500.0), ("_fat", -30.0), ("_soft_tissue", 200.0), ("_dense", float("inf")))

# Structures whose HU follows the contrast agent in the blood (arterial vs venous vs native phase:
# the aorta ranges from ~40 HU native to 300+ arterial), and parenchymal organs that enhance with
# them by tens of HU. Matched as substrings of the structure names.
_VESSEL_WORDS = ("aorta", "artery", "arteries", "vena", "vein", "trunk", "atrial_appendage", "heart")
_ORGAN_WORDS = ("liver", "spleen", "kidney", "pancreas", "adrenal", "thyroid")


@dataclass(frozen=True)
class PaintConfig:
    """The random ranges of the generative model (each drawn uniformly per case unless said).

    spacing_xy / spacing_z: the synthetic scanner's voxel size in mm (in-plane / slices).
    fov_xy / fov_z: the field of view as a fraction of the label map's extent along the axis
    (below 1: crops that cut the body outline or the organs at the top or bottom).
    rotation_deg: largest rotation about each axis; scale: per-axis scaling of the anatomy.
    elastic_mm: largest displacement of the smooth random field (on a 5^3 control grid).
    hu_jitter: standard deviation (HU) of each structure's own level around the real one.
    organ_shift / vessel_shift: shared shifts (HU) of the parenchymal organs and of the blood
    (the contrast phase); fat_shift: shared shift of fat. texture: the synthetic texture's
    standard deviation as a multiple of the structure's real one; real_texture: the weight of
    the real image's own texture (1 - weight goes to the synthetic one). blur_voxels: Gaussian
    blur (output voxels); noise_hu: acquisition noise standard deviation.
    """

    spacing_xy: tuple[float, float] = (1.2, 3.0)
    spacing_z: tuple[float, float] = (1.5, 5.0)
    fov_xy: tuple[float, float] = (0.7, 1.0)
    fov_z: tuple[float, float] = (0.4, 1.0)
    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.85, 1.15)
    elastic_mm: float = 10.0
    hu_jitter: float = 12.0
    organ_shift: tuple[float, float] = (-25.0, 45.0)
    vessel_shift: tuple[float, float] = (-120.0, 150.0)
    fat_shift: tuple[float, float] = (-30.0, 30.0)
    texture: tuple[float, float] = (0.5, 1.5)
    real_texture: tuple[float, float] = (0.0, 1.0)
    blur_voxels: tuple[float, float] = (0.0, 1.0)
    noise_hu: tuple[float, float] = (3.0, 20.0)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class LabelSource:
    """One real patient's anatomy, ready to paint from.

    labels: ``(X, Y, Z)`` int16, 0 only outside the scan; ids index `names` (1-based: ``names[i - 1]``
    is id i), the last four the `TISSUE_CLASSES` of unlabelled voxels. image: the real CT
    (HU as float32, converted once here for every case painted from it), same grid. median / spread: per id (index 0 unused), the real HU level and a
    robust standard deviation (IQR / 1.349) of the voxels with that id.
    """

    name: str
    image: Volume
    labels: np.ndarray
    names: tuple[str, ...]
    median: np.ndarray
    spread: np.ndarray


def load_label_source(case_dir: str | os.PathLike) -> LabelSource:
    """Read a TotalSegmentator-layout case (``ct.nii.gz``, ``segmentations/*.nii.gz``) as a
    `LabelSource`. Masks are taken in sorted name order, so an overlap goes to the later name;
    ``vertebrae.nii.gz`` (a union some folders add) is skipped in favour of the ``vertebrae_*``
    parts."""
    case_dir = Path(case_dir)
    ct_path, seg_dir = case_dir / "ct.nii.gz", case_dir / "segmentations"
    if not ct_path.is_file() or not seg_dir.is_dir():
        raise InputFileError(f"{case_dir}: not a TotalSegmentator-layout case (needs ct.nii.gz and segmentations/)")
    scan = read_image(ct_path)
    hu = scan.array.astype(np.float32)
    image = Volume(hu, scan.affine, scan.source)
    labels = np.zeros(hu.shape, np.int16)
    names: list[str] = []
    for path in sorted(seg_dir.glob("*.nii.gz")):
        name = path.name[: -len(".nii.gz")]
        if name == "vertebrae":
            continue
        mask = read_labels(path)
        if mask.array.shape != hu.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
            raise InputFileError(f"{path}: mask grid {mask.array.shape} does not match the scan {ct_path} {hu.shape}")
        inside = mask.array > 0
        if not inside.any():
            continue
        names.append(name)
        labels[inside] = len(names)
    if not names:
        raise InputFileError(f"{seg_dir}: no non-empty mask to paint from")
    unlabelled = labels == 0
    lower = -np.inf
    for tissue, upper in TISSUE_CLASSES:
        names.append(tissue)
        labels[unlabelled & (hu >= lower) & (hu < upper)] = len(names)
        lower = upper
    median = np.zeros(len(names) + 1, np.float32)
    spread = np.zeros(len(names) + 1, np.float32)
    order = np.argsort(labels, axis=None, kind="stable")
    sorted_ids = labels.ravel()[order]
    bounds = np.searchsorted(sorted_ids, np.arange(len(names) + 2))
    flat = hu.ravel()[order]
    for i in range(1, len(names) + 1):
        values = flat[bounds[i]:bounds[i + 1]]
        if values.size:
            q1, q2, q3 = np.percentile(values, (25, 50, 75))
            median[i], spread[i] = q2, (q3 - q1) / 1.349
    return LabelSource(case_dir.name, image, labels, tuple(names), median, spread)


def _target_of(name: str, structures: Sequence[str]) -> str | None:
    if name in structures:
        return name
    if name.startswith("vertebrae_") and "vertebrae" in structures:
        return "vertebrae"
    return None


def _shift_group(name: str) -> str:
    if name == "_fat":
        return "fat"
    if any(word in name for word in _VESSEL_WORDS):
        return "vessel"
    if any(word in name for word in _ORGAN_WORDS) and "cyst" not in name:
        return "organ"
    return "other"


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    out = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(rng.uniform(-max_deg, max_deg, 3))):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = out @ r
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """``(3, *shape)`` smooth displacement (mm), cubic upsampling of a random 5^3 control grid."""
    coarse = rng.uniform(-amplitude, amplitude, (3, 5, 5, 5))
    return np.stack([ndi.zoom(c, [s / 5 for s in shape], order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
                     for c in coarse])


def paint_case(source: LabelSource, rng: np.random.Generator, config: PaintConfig | None = None,
               structures: Sequence[str] = DEFAULT_STRUCTURES) -> tuple[Volume, np.ndarray, dict[str, Any]]:
    """One synthetic case from `source`.

    Returns the image (int16 HU, RAS grid of the drawn spacing), its label array ``(X, Y, Z)``
    uint8 (value i + 1 for ``structures[i]``, 0 elsewhere) and what was drawn (spacing, field
    of view, shifts), for ``dataset.json``.
    """
    cfg = config or PaintConfig()
    src = source.image
    src_shape = np.array(source.labels.shape)
    src_affine = np.asarray(src.affine, float)
    extent = src_shape * np.array(src.spacing)  # mm along the source's voxel axes
    centre_mm = src_affine[:3, :3] @ ((src_shape - 1) / 2) + src_affine[:3, 3]
    # the field of view: a sub-box of the anatomy's extent, shifted at random within it
    spacing = np.array([rng.uniform(*cfg.spacing_xy)] * 2 + [rng.uniform(*cfg.spacing_z)])
    fraction = np.array([rng.uniform(*cfg.fov_xy), rng.uniform(*cfg.fov_xy), rng.uniform(*cfg.fov_z)])
    # extents in RAS order: the source's voxel axes may be permuted or flipped
    ras_axis = np.abs(src_affine[:3, :3]).argmax(axis=0)
    extent_ras = np.empty(3)
    extent_ras[ras_axis] = extent
    fov = extent_ras * fraction
    offset = (extent_ras - fov) / 2 * rng.uniform(-1, 1, 3)
    shape = tuple(int(v) for v in np.maximum(np.round(fov / spacing), 8))
    # output voxel -> RAS mm around the box centre -> deformed -> source voxel
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)],
                                indexing="ij"))
    linear = _rotation(rng, cfg.rotation_deg) * rng.uniform(*cfg.scale, 3)
    points = np.einsum("ij,j...->i...", linear, grid) + _smooth_field(rng, shape, cfg.elastic_mm)
    points += (centre_mm + offset)[:, None, None, None]
    inverse = np.linalg.inv(src_affine)
    coords = np.einsum("ij,j...->i...", inverse[:3, :3], points) + inverse[:3, 3][:, None, None, None]
    labels = ndi.map_coordinates(source.labels, coords, order=0, mode="constant", cval=0)
    real = ndi.map_coordinates(src.array, coords, order=1, mode="constant", cval=-1024.0)

    # painting: one level per id, shared phase shifts, texture blended from the real and a synthetic one
    n = len(source.names) + 1
    groups = ["outside"] + [_shift_group(name) for name in source.names]
    shifts = {"organ": rng.uniform(*cfg.organ_shift), "vessel": rng.uniform(*cfg.vessel_shift),
              "fat": rng.uniform(*cfg.fat_shift), "other": 0.0, "outside": 0.0}
    level = source.median + rng.normal(0.0, cfg.hu_jitter, n) + np.array([shifts[g] for g in groups])
    vessel = np.array([g == "vessel" for g in groups])
    level[vessel] = np.maximum(level[vessel], 20.0)  # blood is never below water
    median = source.median.copy()
    level[0] = median[0] = -1024.0  # outside the scan: air, no texture
    texture = source.spread * rng.uniform(*cfg.texture, n)
    texture[0] = 0.0
    alpha = rng.uniform(*cfg.real_texture)
    noise = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.7)
    noise /= max(float(noise.std()), 1e-6)
    painted = level[labels] + alpha * (real - median[labels]) + (1 - alpha) * texture[labels] * noise
    blur = rng.uniform(*cfg.blur_voxels)
    if blur > 0.05:
        painted = ndi.gaussian_filter(painted, blur)
    noise_hu = rng.uniform(*cfg.noise_hu)
    painted = painted + rng.normal(0.0, noise_hu, shape)
    hu = np.clip(np.round(painted), -1024, 3071).astype(np.int16)

    remap = np.zeros(n, np.uint8)
    for i, name in enumerate(source.names, start=1):
        target = _target_of(name, structures)
        if target is not None:
            remap[i] = structures.index(target) + 1
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre_mm + offset - spacing * (np.array(shape) - 1) / 2
    info = {"source": source.name, "spacing_mm": [round(float(s), 3) for s in spacing], "shape": list(shape),
            "field_of_view": [round(float(f), 3) for f in fraction],
            "shifts_hu": {k: round(float(v), 1) for k, v in shifts.items() if k in ("organ", "vessel", "fat")},
            "real_texture": round(float(alpha), 3), "blur_voxels": round(float(blur), 3),
            "noise_hu": round(float(noise_hu), 1)}
    return Volume(hu, affine, f"painted from {source.name}"), remap[labels], info


def paint_dataset(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    cases: int,
    seed: int = 0,
    structures: Sequence[str] | str | None = None,
    *,
    config: PaintConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `cases` painted cases, taken in turn from the label maps of `sources` (folders of
    TotalSegmentator-layout cases), as an nnU-Net v2 raw dataset at `out` (the phantom's
    layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``); return `out`. Built in a temporary
    folder and renamed into place; a non-empty `out` is refused unless `overwrite`."""
    if int(cases) < 1:
        raise ConfigError(f"number of painted cases must be >= 1 (got {cases})")
    if not sources:
        raise ConfigError("painting needs at least one label-map source "
                          "(a case folder with ct.nii.gz + segmentations/)")
    labelled = canonical_names(structures or DEFAULT_STRUCTURES)
    cfg = config or PaintConfig()
    loaded = [load_label_source(s) for s in sources]
    out = Path(out)
    case_info: dict[str, Any] = {}
    with atomic_dir(out, overwrite) as tmp:
        for i in tqdm(range(int(cases)), desc=f"paint {out.name}", unit="case", disable=not progress):
            source = loaded[i % len(loaded)]
            rng = np.random.default_rng([int(seed), i])
            image, labels, info = paint_case(source, rng, cfg, labelled)
            case_id = f"painted_{i:03d}"
            write_image(image, tmp / "imagesTr" / f"{case_id}_0000.nii.gz")
            write_mask(labels, image, tmp / "labelsTr" / f"{case_id}.nii.gz")
            case_info[case_id] = info
        write_json(tmp / "dataset.json", {
            "name": f"fseft painted ({', '.join(s.name for s in loaded)})",
            "description": "Synthetic CT painted from real label maps (SynthSeg-style), written by fseft.data.painting",
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, **{s: v for v, s in enumerate(labelled, start=1)}},
            "numTraining": int(cases),
            "file_ending": ".nii.gz",
            "fseft": {"generator": "fseft.data.painting", "generator_version": PAINTING_VERSION,
                      "sources": [str(Path(s).resolve()) for s in sources], "seed": int(seed),
                      "structures_labelled": list(labelled), "cases": case_info, "config": cfg.to_dict()},
        })
    return out
