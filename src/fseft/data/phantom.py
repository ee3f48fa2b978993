"""Synthetic abdomen CT phantom: fseft's own test, demo and pre-training data.

Each case is an abdomen-like CT volume in Hounsfield units with a multilabel mask of
`PHANTOM_CLASSES`: body outline with skin, subcutaneous fat, a muscle wall with ribs,
paraspinal and psoas muscles, a segmented spine, lung bases above the diaphragm, bowel loops
and colon, and the labelled organs and vessels placed where they sit in a patient (liver
right-upper, spleen left-posterior, kidneys beside the spine, aorta left-anterior of it, IVC
right of the aorta, pancreas across the middle, gallbladder under the liver, stomach
left-anterior with gas over fluid).

Anatomy is laid out in "adult millimetres" (+x patient right, +y anterior, +z superior, the
RAS+ frame) and shrunk by a per-case scale so that a case is ~150-190 mm a side (~96-128 voxels
at the project's 1.5 mm). Shapes are random ellipsoids and tubes evaluated on coordinates warped
by a smooth random displacement field, with smooth random surface perturbations; they are drawn
by `fseft.data.phantom_anatomy`, which also holds the label values (`PHANTOM_LABELS`). Intensities
are per-tissue HU plus correlated texture, blurred (partial volume) and with correlated
acquisition noise. Every case gets its own spacing and its own voxel-axis orientation
(flips and permutations in the affine), so readers' orientation handling is exercised.

Two domains differ the way two hospitals do: contrast phase (source: portal-venous, target:
late arterial; vessels, kidneys, spleen, pancreas and liver shift by tens to ~160 HU), noise
level, spacing and field of view. A case is a deterministic function of
(config, domain, seed, case index, stream).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel.orientations as nio
import numpy as np
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from fseft.data.io import write_image, write_mask
from fseft.data.phantom_anatomy import PHANTOM_LABELS, TISSUES, Painter, draw_anatomy
from fseft.data.structures import PHANTOM_CLASSES, canonical_names
from fseft.data.volume import Volume
from fseft.errors import ConfigError
from fseft.utils import atomic_dir, write_json

# Bump when a change alters the arrays a (config, domain, seed, case) produces.
PHANTOM_VERSION = "1"

DOMAINS: tuple[str, ...] = ("source", "target")

# Structures annotated by each partial-label source dataset (write_partial_label_sources).
# Overlapping only partially, and none annotates gallbladder: the novel structure held out of
# the embedded model's pre-training.
PARTIAL_LABEL_SUBSETS: tuple[tuple[str, ...], ...] = (
    ("liver", "spleen", "kidney_right", "kidney_left", "stomach"),
    ("pancreas", "aorta", "inferior_vena_cava", "liver", "vertebrae"),
    ("kidney_right", "kidney_left", "spleen", "aorta", "vertebrae", "stomach"),
)

# Phase-independent mean HU.
_COMMON_HU: dict[str, float] = {
    "air": -1000.0, "lung": -860.0, "subcutaneous_fat": -105.0, "visceral_fat": -92.0,
    "skin": 30.0, "bone_cortical": 700.0, "bone_cancellous": 400.0, "rib": 480.0,
    "disc": 90.0, "csf": 15.0, "gallbladder": 12.0, "renal_sinus": -60.0, "gas": -960.0,
    "gastric_fluid": 18.0, "bowel_fluid": 22.0, "feces": -20.0,
}


def _phase_hu(**phase: float) -> dict[str, float]:
    return {**_COMMON_HU, **phase}


def _portal_venous_hu() -> dict[str, float]:
    # Portal-venous phase (~70 s): liver, spleen, pancreas, kidney and muscle within 10-40 HU
    # of their neighbours in this chain, so intensity alone cannot separate them.
    return _phase_hu(
        muscle=58.0, pancreas=95.0, liver=105.0, spleen=115.0, kidney_medulla=135.0,
        kidney_cortex=150.0, hepatic_vessel=165.0, stomach_wall=90.0, bowel_wall=92.0,
        aorta=165.0, inferior_vena_cava=145.0, portal_vein=170.0, heart=140.0,
    )


def _late_arterial_hu() -> dict[str, float]:
    # Late arterial phase (~35 s): bright aorta and renal cortex (corticomedullary
    # differentiation), unopacified IVC and hepatic veins, liver not yet enhanced.
    return _phase_hu(
        muscle=52.0, pancreas=120.0, liver=72.0, spleen=140.0, kidney_medulla=95.0,
        kidney_cortex=210.0, hepatic_vessel=48.0, stomach_wall=100.0, bowel_wall=100.0,
        aorta=330.0, inferior_vena_cava=78.0, portal_vein=115.0, heart=260.0,
    )


# Standard deviation (HU) of each tissue's correlated texture.
_TEXTURE_HU: dict[str, float] = {
    "air": 0.0, "lung": 30.0, "subcutaneous_fat": 10.0, "visceral_fat": 14.0, "skin": 8.0,
    "muscle": 12.0, "bone_cortical": 60.0, "bone_cancellous": 70.0, "rib": 60.0, "disc": 10.0,
    "csf": 4.0, "heart": 10.0, "liver": 14.0, "hepatic_vessel": 8.0, "gallbladder": 4.0,
    "spleen": 14.0, "kidney_cortex": 10.0, "kidney_medulla": 10.0, "renal_sinus": 35.0,
    "pancreas": 16.0, "stomach_wall": 10.0, "gas": 20.0, "gastric_fluid": 8.0, "aorta": 6.0,
    "inferior_vena_cava": 8.0, "portal_vein": 8.0, "bowel_wall": 14.0, "bowel_fluid": 8.0,
    "feces": 120.0,
}


@dataclass
class DomainProfile:
    """Acquisition and contrast of one domain (a "hospital")."""

    phase: str
    hu: dict[str, float]  # mean HU per tissue (`TISSUES`)
    noise_hu: tuple[float, float]  # acquisition noise std, drawn per case
    fov_mm: tuple[float, float]  # square in-plane field of view
    z_extent_mm: tuple[float, float]  # cranio-caudal coverage (clipped to this range)
    inplane_spacing_mm: tuple[float, float]
    slice_spacing_mm: tuple[float, float]
    body_fill: tuple[float, float]  # body width / FOV width; above 1 truncates the flanks
    texture_scale: float = 1.0  # multiplies every tissue's texture std

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _source_profile() -> DomainProfile:
    return DomainProfile(
        phase="portal_venous", hu=_portal_venous_hu(), noise_hu=(18.0, 24.0),
        fov_mm=(160.0, 190.0), z_extent_mm=(155.0, 190.0), inplane_spacing_mm=(1.3, 1.7),
        slice_spacing_mm=(1.5, 2.5), body_fill=(0.86, 0.95),
    )


def _target_profile() -> DomainProfile:
    return DomainProfile(
        phase="late_arterial", hu=_late_arterial_hu(), noise_hu=(22.0, 30.0),
        fov_mm=(148.0, 175.0), z_extent_mm=(145.0, 170.0), inplane_spacing_mm=(1.05, 1.4),
        slice_spacing_mm=(2.5, 3.2), body_fill=(0.92, 1.04), texture_scale=1.25,
    )


@dataclass
class PhantomConfig:
    """Knobs of the phantom generator. The defaults are what tests and the demo use."""

    source: DomainProfile = field(default_factory=_source_profile)
    target: DomainProfile = field(default_factory=_target_profile)
    texture_hu: dict[str, float] = field(default_factory=lambda: dict(_TEXTURE_HU))
    hu_jitter: float = 8.0  # per-case, per-tissue uniform HU offset (contrast timing, patient)
    bias_hu: float = 10.0  # std of a smooth intensity bias over the volume (cupping, perfusion)
    deformation_mm: float = 9.0  # std of the smooth displacement field (adult mm)
    shape_roughness: float = 0.08  # std of the smooth surface perturbation (fraction of radius)
    size_jitter: float = 0.12  # organ semi-axes scaled by U(1 - j, 1 + j)
    position_jitter_mm: float = 7.0  # organ centres moved by U(-j, j) per axis (adult mm)
    orientations: tuple[str, ...] = ("RAS", "LAS", "LPS", "RPS", "LPI", "PLS", "SAR")
    case_prefix: str = "phantom"

    def profile(self, domain: str) -> DomainProfile:
        if domain not in DOMAINS:
            raise ConfigError(f"unknown phantom domain {domain!r}; expected one of {', '.join(DOMAINS)}")
        return self.source if domain == "source" else self.target

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PhantomCase:
    """One generated case. `image.array` ``(X, Y, Z)`` int16 HU; `labels.array` ``(X, Y, Z)``
    uint8 with `PHANTOM_LABELS` values (every drawn structure); both in the case's own
    orientation (`orientation`, e.g. ``"LPS"``) and spacing."""

    image: Volume
    labels: Volume
    orientation: str
    info: dict[str, Any]


def _case_rng(seed: int, domain: str, case_index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), DOMAINS.index(domain), int(case_index), int(stream)])


def generate_case(
    config: PhantomConfig | None = None,
    domain: str = "source",
    seed: int = 0,
    case_index: int = 0,
    stream: int = 0,
) -> PhantomCase:
    """Generate one case in memory; deterministic for (config, domain, seed, case_index, stream).

    Returns a `PhantomCase`: image ``(X, Y, Z)`` int16 HU and labels ``(X, Y, Z)`` uint8
    (`PHANTOM_LABELS`, all drawn structures), in a random orientation from
    ``config.orientations`` and the domain's random spacing.
    """
    cfg = config or PhantomConfig()
    prof = cfg.profile(domain)
    if seed < 0 or case_index < 0 or stream < 0:
        raise ConfigError(f"phantom seed, case index and stream must be >= 0 (got {seed}, {case_index}, {stream})")
    rng = _case_rng(seed, domain, case_index, stream)

    # Geometry: square in-plane FOV, per-axis spacing, body scale (phantom mm per adult mm).
    fov = rng.uniform(*prof.fov_mm)
    sp = np.array([rng.uniform(*prof.inplane_spacing_mm)] * 2 + [rng.uniform(*prof.slice_spacing_mm)])
    body_a = rng.uniform(150, 180)
    body_b = body_a * rng.uniform(0.66, 0.78)
    scale = fov * rng.uniform(*prof.body_fill) / (2 * body_a)
    z_extent = float(np.clip(rng.uniform(280, 360) * scale, *prof.z_extent_mm))
    shape = (int(round(fov / sp[0])), int(round(fov / sp[1])), int(round(z_extent / sp[2])))
    centre_shift = rng.uniform(-0.03, 0.03, 2) * fov  # body not exactly centred in the FOV
    z_top = rng.uniform(205, 235)
    axes = [
        ((np.arange(shape[0]) - (shape[0] - 1) / 2) * sp[0] - centre_shift[0]) / scale,
        # Body sits low in the FOV (on the table): posterior skin ~5% of the FOV from the edge.
        ((np.arange(shape[1]) - (shape[1] - 1) / 2) * sp[1] + fov / 2 - 0.05 * fov - body_b * scale - centre_shift[1]) / scale,
        z_top - (shape[2] - 1 - np.arange(shape[2])) * sp[2] / scale,
    ]
    painter = Painter(rng, axes, deformation_mm=cfg.deformation_mm, shape_roughness=cfg.shape_roughness,
                      size_jitter=cfg.size_jitter, position_jitter_mm=cfg.position_jitter_mm)
    draw_anatomy(painter, rng, body_a, body_b)

    # Intensities: tissue HU (+ per-case contrast-timing jitter) + texture, blur, noise.
    hu_table = np.array([prof.hu[t] for t in TISSUES], dtype=np.float32)
    soft = np.array([t not in ("air", "gas", "lung") for t in TISSUES])
    hu_table[soft] += rng.uniform(-cfg.hu_jitter, cfg.hu_jitter, int(soft.sum())).astype(np.float32)
    tex_table = np.array([cfg.texture_hu[t] for t in TISSUES], dtype=np.float32) * prof.texture_scale
    # Texture correlated over ~1.5 mm (organ parenchyma grain), independent of the spacing.
    texture = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=1.5 / sp)
    texture /= texture.std() + 1e-6
    image = hu_table[painter.tissue] + tex_table[painter.tissue] * texture
    del texture
    soft_voxels = soft[painter.tissue]
    image[soft_voxels] += cfg.bias_hu * painter.smooth_fields(1, corr_mm=90.0)[0][soft_voxels]
    image = ndi.gaussian_filter(image, sigma=(0.5, 0.5, 0.45))  # scanner PSF / slice profile
    noise_std = rng.uniform(*prof.noise_hu)
    noise = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0.7, 0.7, 0.0))
    image += noise * (noise_std / (noise.std() + 1e-6))
    del noise
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    # World placement: canonical RAS affine, then the case's own voxel-axis orientation.
    origin = np.array([a[0] for a in axes]) * scale + rng.uniform(-60, 60, 3)
    ras_affine = np.diag([*sp, 1.0])
    ras_affine[:3, 3] = origin
    orientation = str(rng.choice(list(cfg.orientations)))
    transform = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(orientation)))
    affine = ras_affine @ nio.inv_ornt_aff(transform, shape)
    image = np.ascontiguousarray(nio.apply_orientation(image, transform))
    labels = np.ascontiguousarray(nio.apply_orientation(painter.label, transform))
    info = {
        "orientation": orientation,
        "spacing_mm": [round(float(s), 4) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "shape": [int(s) for s in image.shape],
        "noise_hu": round(float(noise_std), 2),
        "scale": round(float(scale), 4),
    }
    name = f"phantom(domain={domain}, seed={seed}, case={case_index}, stream={stream})"
    return PhantomCase(
        image=Volume(array=image, affine=affine, source=name),
        labels=Volume(array=labels, affine=affine.copy(), source=name),
        orientation=orientation,
        info=info,
    )


# ---------------------------------------------------------------------------------- writing


def _resolve_structures(structures: Sequence[str] | str | None) -> tuple[str, ...]:
    if structures is None:
        return PHANTOM_CLASSES
    names = canonical_names(structures, strict=True)  # unknown -> UnknownStructureError
    if not names:
        raise ConfigError("no structures given; the phantom draws: " + ", ".join(PHANTOM_CLASSES))
    not_drawn = [n for n in names if n not in PHANTOM_LABELS]
    if not_drawn:
        raise ConfigError(
            f"the phantom does not draw {', '.join(not_drawn)}; it draws: " + ", ".join(PHANTOM_CLASSES)
        )
    return names


def write_phantom_dataset(
    out: str | os.PathLike,
    cases: int,
    domain: str = "source",
    seed: int = 0,
    structures: Sequence[str] | str | None = None,
    *,
    config: PhantomConfig | None = None,
    stream: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    name: str | None = None,
) -> Path:
    """Write `cases` phantom cases as an nnU-Net v2 raw dataset at `out`; return `out`.

    Layout: ``dataset.json``, ``imagesTr/<case>_0000.nii.gz`` (int16 HU),
    ``labelsTr/<case>.nii.gz`` (uint8). `structures` (any spelling, list or ``"a,b"``) limits
    which drawn structures are labelled (values 1..n in the given order; the others are still
    drawn, unlabelled); default all of `PHANTOM_CLASSES`. `stream` selects an independent
    random stream (datasets on different streams never share a case). The dataset is built in
    a temporary folder and renamed into place; a non-empty `out` is refused unless `overwrite`.
    """
    cfg = config or PhantomConfig()
    prof = cfg.profile(domain)
    labelled = _resolve_structures(structures)
    if int(cases) < 1:
        raise ConfigError(f"number of phantom cases must be >= 1 (got {cases})")
    if seed < 0:
        raise ConfigError(f"phantom seed must be >= 0 (got {seed})")
    out = Path(out)
    # Full phantom label value -> dataset label value (0 for drawn but unlabelled structures).
    remap = np.zeros(len(PHANTOM_CLASSES) + 1, dtype=np.uint8)
    for value, s in enumerate(labelled, start=1):
        remap[PHANTOM_LABELS[s]] = value
    case_info: dict[str, Any] = {}
    with atomic_dir(out, overwrite) as tmp:
        for i in tqdm(range(int(cases)), desc=f"phantom {out.name} ({domain})", unit="case", disable=not progress):
            case = generate_case(cfg, domain, seed, i, stream)
            case_id = f"{cfg.case_prefix}_{i:03d}"
            write_image(case.image, tmp / "imagesTr" / f"{case_id}_0000.nii.gz")
            write_mask(remap[case.labels.array], case.image, tmp / "labelsTr" / f"{case_id}.nii.gz")
            case_info[case_id] = case.info
        write_json(tmp / "dataset.json", {
            "name": name or f"fseft phantom ({domain})",
            "description": f"Synthetic abdomen CT phantom, {domain} domain ({prof.phase} phase), "
            "written by fseft.data.phantom",
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, **{s: v for v, s in enumerate(labelled, start=1)}},
            "numTraining": int(cases),
            "file_ending": ".nii.gz",
            "fseft": {
                "generator": "fseft.data.phantom",
                "generator_version": PHANTOM_VERSION,
                "domain": domain,
                "phase": prof.phase,
                "seed": int(seed),
                "stream": int(stream),
                "structures_drawn": list(PHANTOM_CLASSES),
                "structures_labelled": list(labelled),
                "cases": case_info,
                "config": cfg.to_dict(),
            },
        })
    return out


def write_partial_label_sources(
    out: str | os.PathLike,
    n_sources: int = 3,
    cases_per_source: int = 8,
    seed: int = 0,
    domain: str = "source",
    subsets: Sequence[Sequence[str]] | None = None,
    *,
    config: PhantomConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write `n_sources` phantom datasets under `out` (``partial_A``, ``partial_B``, ...), each
    annotating only its subset of structures (default `PARTIAL_LABEL_SUBSETS`; none annotates
    gallbladder). Every image still shows all organs. Each source has its own random stream
    and case prefix (``phantomA_000``...), so no case repeats across sources or the plain
    `write_phantom_dataset` output. Returns the dataset roots; `out` appears only when all are
    written.
    """
    subsets = [tuple(s) for s in (subsets if subsets is not None else PARTIAL_LABEL_SUBSETS)]
    if not 1 <= int(n_sources) <= len(subsets):
        raise ConfigError(
            f"--partial-sources must be between 1 and {len(subsets)} (the number of label subsets "
            f"fseft defines; more need the Python API's subsets argument), got {n_sources}"
        )
    cfg = config or PhantomConfig()
    out = Path(out)
    names = [f"partial_{chr(ord('A') + i)}" for i in range(int(n_sources))]
    with atomic_dir(out, overwrite) as tmp:
        for i, sub in enumerate(names):
            letter = sub[-1]
            write_phantom_dataset(
                tmp / sub, cases_per_source, domain, seed, list(subsets[i]),
                config=dataclasses.replace(cfg, case_prefix=f"{cfg.case_prefix}{letter}"),
                stream=i + 1, progress=progress, name=f"fseft phantom partial-label source {letter}",
            )
    return [out / sub for sub in names]
