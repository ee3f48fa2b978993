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
by a smooth random displacement field, with smooth random surface perturbations. Intensities
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
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from fseft.data.io import write_image, write_mask
from fseft.data.volume import Volume
from fseft.data.structures import PHANTOM_CLASSES, canonical_names
from fseft.errors import ConfigError, InputFileError
from fseft.utils import atomic_dir, write_json

# Bump when a change alters the arrays a (config, domain, seed, case) produces.
PHANTOM_VERSION = "1"

DOMAINS: tuple[str, ...] = ("source", "target")

# Label value of each drawn structure in a full phantom label map (value = index + 1).
PHANTOM_LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(PHANTOM_CLASSES)}

# Structures annotated by each partial-label source dataset (write_partial_label_sources).
# Overlapping only partially, and none annotates gallbladder: the novel structure held out of
# the embedded model's pre-training.
PARTIAL_LABEL_SUBSETS: tuple[tuple[str, ...], ...] = (
    ("liver", "spleen", "kidney_right", "kidney_left", "stomach"),
    ("pancreas", "aorta", "inferior_vena_cava", "liver", "vertebrae"),
    ("kidney_right", "kidney_left", "spleen", "aorta", "vertebrae", "stomach"),
)

# Tissues the painter knows, in lookup-table order. Labelled structures have their own tissues;
# the rest are anatomy that is drawn but never labelled.
TISSUES: tuple[str, ...] = (
    "air", "lung", "subcutaneous_fat", "visceral_fat", "skin", "muscle", "bone_cortical",
    "bone_cancellous", "rib", "disc", "csf", "heart", "liver", "hepatic_vessel", "gallbladder",
    "spleen", "kidney_cortex", "kidney_medulla", "renal_sinus", "pancreas", "stomach_wall",
    "gas", "gastric_fluid", "aorta", "inferior_vena_cava", "portal_vein", "bowel_wall",
    "bowel_fluid", "feces",
)
_TISSUE_ID = {name: i for i, name in enumerate(TISSUES)}

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


# ---------------------------------------------------------------------------------- drawing


def _rotation(rng: np.random.Generator, base_deg: Sequence[float], jitter_deg: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    angles = np.asarray(base_deg, dtype=float) + rng.uniform(-jitter_deg, jitter_deg, 3)
    return Rotation.from_euler("xyz", angles, degrees=True).as_matrix().astype(np.float32)


class _Painter:
    """Paints tissues and labels on a canonical RAS grid whose coordinates are adult mm."""

    def __init__(self, rng: np.random.Generator, cfg: PhantomConfig, axes: Sequence[np.ndarray]):
        self.rng, self.cfg = rng, cfg
        self.ax = [np.asarray(a, dtype=np.float32) for a in axes]
        self.shape = tuple(len(a) for a in self.ax)
        self.tissue = np.zeros(self.shape, dtype=np.uint8)  # all air
        self.label = np.zeros(self.shape, dtype=np.uint8)
        self.deform = self.smooth_fields(3, corr_mm=55.0) * cfg.deformation_mm
        self.rough = self.smooth_fields(2, corr_mm=30.0)
        self.margin = 3.0 * cfg.deformation_mm + 2.0

    def smooth_fields(self, n: int, corr_mm: float) -> np.ndarray:
        """`n` smooth random fields ``(n, X, Y, Z)`` float32, unit std, correlation ~`corr_mm`.

        White noise on a coarse grid (half the correlation length apart), Gaussian-smoothed,
        then trilinearly upsampled: cheap at any output size.
        """
        import torch

        step = corr_mm / 2.0
        coarse = [max(3, int(np.ceil((a[-1] - a[0]) / step)) + 3) for a in self.ax]
        noise = self.rng.standard_normal((n, *coarse)).astype(np.float32)
        noise = ndi.gaussian_filter(noise, sigma=(0, 1.0, 1.0, 1.0))
        noise /= noise.std(axis=(1, 2, 3), keepdims=True) + 1e-6
        up = torch.nn.functional.interpolate(
            torch.from_numpy(noise)[None], size=self.shape, mode="trilinear", align_corners=True
        )
        return up[0].numpy()

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Voxel slices of the canonical grid covering the adult-mm box [lo, hi] (+ margin)."""
        out = []
        for a, l, h in zip(self.ax, lo, hi):
            i0 = int(np.searchsorted(a, l - self.margin))
            i1 = int(np.searchsorted(a, h + self.margin, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def warped(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Warped coordinates (adult mm) of the voxels in `sl`: shapes live in this space."""
        return (
            self.ax[0][sl[0], None, None] + self.deform[0][sl],
            self.ax[1][None, sl[1], None] + self.deform[1][sl],
            self.ax[2][None, None, sl[2]] + self.deform[2][sl],
        )

    def jitter_ellipsoid(
        self, centre: Sequence[float], semi: Sequence[float], rot_deg: Sequence[float] = (0, 0, 0)
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = self.cfg
        centre = np.asarray(centre, float) + self.rng.uniform(-c.position_jitter_mm, c.position_jitter_mm, 3)
        semi = np.asarray(semi, float) * self.rng.uniform(1 - c.size_jitter, 1 + c.size_jitter, 3)
        return centre, semi, _rotation(self.rng, rot_deg, 10.0)

    def ellipsoid(self, centre, semi, rot) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Implicit function ``|R^T (w - c) / semi| - 1`` (+ perturbation) on its bounding box;
        negative inside."""
        r = float(np.max(semi)) * 1.2
        sl = self.box(np.asarray(centre) - r, np.asarray(centre) + r)
        if sl is None:
            return None
        wx, wy, wz = self.warped(sl)
        # Python floats keep the float32 arrays float32 (NumPy 2 promotes on float64 scalars).
        c, s, rt = [float(v) for v in centre], [float(v) for v in semi], np.asarray(rot).tolist()
        d = (wx - c[0], wy - c[1], wz - c[2])
        acc = None
        for k in range(3):  # body-frame coordinate k = (R^T d)_k
            pk = (rt[0][k] * d[0] + rt[1][k] * d[1] + rt[2][k] * d[2]) / s[k]
            acc = pk * pk if acc is None else acc + pk * pk
        return sl, self._perturb(sl, np.sqrt(acc) - 1.0)

    def tube(self, points: np.ndarray, radii: np.ndarray) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Implicit function ``min_i |w - p_i| / r_i - 1`` of a tube through `points` (n, 3)
        with radii (n,), on its bounding box; each point only touches its own small box."""
        n_fine = max(2, int(np.ceil(np.sum(np.linalg.norm(np.diff(points, axis=0), axis=1)) / (0.4 * radii.min()))))
        t = np.linspace(0, 1, len(points))
        tf = np.linspace(0, 1, n_fine)
        pts = np.stack([np.interp(tf, t, points[:, k]) for k in range(3)], axis=1)
        rad = np.interp(tf, t, radii)
        sl = self.box(pts.min(0) - rad.max() * 1.5, pts.max(0) + rad.max() * 1.5)
        if sl is None:
            return None
        wx, wy, wz = self.warped(sl)
        f = np.full(wx.shape, np.inf, dtype=np.float32)
        origin = [s.start for s in sl]
        for p, r in zip(pts.tolist(), rad.tolist()):
            sub = self.box([v - 1.5 * r for v in p], [v + 1.5 * r for v in p])
            if sub is None:
                continue
            loc = tuple(slice(max(s.start - o, 0), max(s.stop - o, 0)) for s, o in zip(sub, origin))
            dist = np.sqrt((wx[loc] - p[0]) ** 2 + (wy[loc] - p[1]) ** 2 + (wz[loc] - p[2]) ** 2) / r
            np.minimum(f[loc], dist - 1.0, out=f[loc])
        return sl, self._perturb(sl, f)

    def union(self, *shapes) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """Union (pointwise min) of implicit shapes, on the box covering all of them."""
        shapes = [s for s in shapes if s is not None]
        sl = tuple(slice(min(s[0][k].start for s in shapes), max(s[0][k].stop for s in shapes)) for k in range(3))
        f = np.full(tuple(s.stop - s.start for s in sl), np.inf, dtype=np.float32)
        for sub, g in shapes:
            loc = tuple(slice(a.start - o.start, a.stop - o.start) for a, o in zip(sub, sl))
            np.minimum(f[loc], g, out=f[loc])
        return sl, f

    def _perturb(self, sl, f: np.ndarray) -> np.ndarray:
        theta = self.rng.uniform(0, 2 * math.pi)
        a, b = self.cfg.shape_roughness * math.cos(theta), self.cfg.shape_roughness * math.sin(theta)
        return f + (a * self.rough[0][sl] + b * self.rough[1][sl])

    def paint(self, sl, mask: np.ndarray, tissue: str, label: str | None = None) -> None:
        """Set `tissue` (and `label`, or no label) where `mask` holds within `sl`."""
        self.tissue[sl][mask] = _TISSUE_ID[tissue]
        self.label[sl][mask] = PHANTOM_LABELS[label] if label else 0


def _draw_anatomy(p: _Painter, rng: np.random.Generator, body_a: float, body_b: float) -> None:
    """Paint the whole abdomen in `p` (adult mm, body centred at x = y = 0)."""
    full = (slice(None),) * 3
    wx, wy, wz = p.warped(full)

    # Body wall: superellipse outline (flatter back), skin, subcutaneous fat, muscle ring.
    # Outlines are 2D (cheap powers) plus a smooth 3D perturbation, so the wall varies along z.
    x2, y2 = p.ax[0][:, None, None], p.ax[1][None, :, None]
    wobble = 0.015 * p.rough[0]

    def outline(a: float, b_ant: float, b_post: float) -> np.ndarray:
        b = np.where(y2 >= 0, b_ant, b_post)
        expo = np.where(y2 >= 0, 2.0, 2.6)
        return (np.abs(x2 / a) ** expo + np.abs(y2 / b) ** expo) ** (1.0 / expo) - 1.0 + wobble

    fat_lat, fat_ant, fat_post = rng.uniform(14, 34), rng.uniform(12, 30), rng.uniform(10, 22)
    wall = rng.uniform(9, 14)
    body = outline(body_a, body_b, body_b)
    p.paint(full, body < 0, "skin")
    p.paint(full, body < -2.5 / body_b, "subcutaneous_fat")
    a1, b1a, b1p = body_a - fat_lat, body_b - fat_ant, body_b - fat_post
    inside_wall = outline(a1, b1a, b1p) < 0
    p.paint(full, inside_wall, "muscle")
    a2, b2a, b2p = a1 - wall, b1a - wall, b1p - wall
    cavity = outline(a2, b2a, b2p) < 0

    # Ribs: oblique bony arcs in the wall, lower at the back than at the front (costal margin).
    ring = inside_wall & ~cavity
    period = rng.uniform(26, 32)
    ribs = ring & (np.cos(2 * np.pi * (wz + 0.45 * wy) / period + rng.uniform(0, 2 * np.pi)) > 0.72)
    ribs &= wz > 60.0 + 0.9 * (wy + body_b)
    p.paint(full, ribs, "rib")
    p.paint(full, cavity, "visceral_fat")

    # Diaphragm: lung bases above two domes (right higher), heart between them anteriorly.
    z_dia = rng.uniform(150, 170)
    dome = z_dia + 32 * np.exp(-((wx - 65) ** 2 + wy**2) / (2 * 55**2)) + 22 * np.exp(
        -((wx + 65) ** 2 + wy**2) / (2 * 55**2)
    )
    thorax = cavity & (wz > dome)
    p.paint(full, cavity & (wz > dome - 4), "muscle")  # diaphragm muscle
    p.paint(full, thorax, "lung")
    heart = (((wx + 10) / 70) ** 2 + ((wy - 35) / 55) ** 2 + ((wz - z_dia - 95) / 75) ** 2) < 1
    p.paint(full, heart & thorax, "heart")

    # Spine landmarks (the organs are placed relative to them), paraspinal and psoas muscles
    # (painted before the organs and kept out of their space: kidneys lie against them).
    y_body = -body_b + fat_post + rng.uniform(62, 70)  # vertebral body centre
    vb_a, vb_b = rng.uniform(19, 24), rng.uniform(15, 18)
    y_canal = y_body - vb_b - 9
    y_para = -body_b + fat_post + 24
    muscles = np.zeros(p.shape, dtype=bool)
    for side in (1, -1):
        muscles |= ((wx - side * 38) / 30) ** 2 + ((wy - y_para) / 24) ** 2 + 0.1 * p.rough[1] < 1
        r_psoas = np.clip(5 + 0.14 * (40 - wz), 0, 24)  # grows towards the pelvis
        muscles |= (wx - side * (vb_a + 0.9 * r_psoas)) ** 2 + (wy - y_body + 4) ** 2 < r_psoas**2
    p.paint(full, muscles, "muscle")
    abdomen = cavity & (wz < dome - 4) & ~muscles

    def paint_shape(shape, tissue: str, label: str | None = None, within: np.ndarray | None = None,
                    inside: float = 0.0) -> tuple | None:
        """Paint ``f < inside`` of an implicit shape, optionally only where `within` holds."""
        if shape is None:
            return None
        sl, f = shape
        mask = f < inside
        if within is not None:
            mask &= within[sl]
        p.paint(sl, mask, tissue, label)
        return sl, f, mask

    # Small bowel loops (lower abdomen) and colon frame: unlabelled soft tissue, fluid and gas.
    loops = p.smooth_fields(2, corr_mm=32.0)
    lower = abdomen & (wz < rng.uniform(20, 50) + 0.4 * wy)
    p.paint(full, lower & (np.abs(loops[0]) < 0.45), "bowel_wall")
    p.paint(full, lower & (np.abs(loops[0]) < 0.22), "bowel_fluid")
    p.paint(full, lower & (np.abs(loops[0]) < 0.22) & (loops[1] > 1.0), "gas")
    colon_pts = np.array([
        [102, 0, -160], [102, 5, -60], [100, 15, 20], [85, 48, 45], [0, 72, 25],
        [-85, 45, 55], [-102, 0, 45], [-104, -5, -60], [-95, 0, -160],
    ], dtype=float) * [a2 / 135.0, b2a / 95.0, 1.0] + rng.uniform(-6, 6, (9, 3))
    colon_r = rng.uniform(16, 22)
    shape = p.tube(colon_pts, np.full(len(colon_pts), colon_r))
    if (res := paint_shape(shape, "bowel_wall", within=abdomen)) is not None:
        sl, f, mask = res
        content = mask & (f < -0.18)
        p.paint(sl, content, "feces")
        p.paint(sl, content & (loops[1][sl] > 0.3), "gas")

    # Liver: right lobe + left lobe across the midline, below the diaphragm; branching vessels.
    right = p.ellipsoid(*p.jitter_ellipsoid((68, 5, 112), (82, 80, 84), (0, 0, 10)))
    left = p.ellipsoid(*p.jitter_ellipsoid((5, 48, 128), (62, 32, 45), (0, 10, 0)))
    liver_sl, liver_f = p.union(right, left)
    liver = (liver_f < 0) & abdomen[liver_sl]
    p.paint(liver_sl, liver, "liver", "liver")
    vessels = p.smooth_fields(1, corr_mm=18.0)[0]
    p.paint(liver_sl, liver & (np.abs(vessels[liver_sl]) < 0.09) & (liver_f < -0.1), "hepatic_vessel", "liver")

    # Spleen: left posterolateral, long axis along the ribs.
    paint_shape(p.ellipsoid(*p.jitter_ellipsoid((-98, -42, 112), (28, 55, 46), (0, 0, 35))),
                "spleen", "spleen", within=abdomen)

    # Kidneys: beside the spine, upper poles medial and posterior, hilum anteromedial;
    # cortex, medulla and an unlabelled renal sinus. The right one sits lower (under the liver).
    for side, label in ((1, "kidney_right"), (-1, "kidney_left")):
        centre, semi, rot = p.jitter_ellipsoid(
            (side * 70, y_body - 2, 8 if side == 1 else 24), (27, 24, 52), (-12, side * -12, side * -30)
        )
        if (res := paint_shape(p.ellipsoid(centre, semi, rot), "kidney_cortex", label, within=abdomen)) is None:
            continue
        sl, f, mask = res
        p.paint(sl, mask & (f < -0.3), "kidney_medulla", label)
        hilum = p.ellipsoid(centre + rot @ np.array([-side * 0.55 * semi[0], 0.2 * semi[1], 0]), semi * [0.45, 0.35, 0.45], rot)
        paint_shape(hilum, "renal_sinus", within=p.label == PHANTOM_LABELS[label])

    # Pancreas: head by the duodenum, neck in front of the vessels, tail at the splenic hilum.
    panc_pts = np.array([[32, 22, 36], [8, 32, 48], [-30, 22, 58], [-62, 4, 70], [-82, -14, 80]], float)
    panc_pts += rng.uniform(-6, 6, panc_pts.shape)
    panc_r = np.array([19, 14, 14, 13, 11], float) * rng.uniform(0.9, 1.15)
    paint_shape(p.tube(panc_pts, panc_r), "pancreas", "pancreas", within=abdomen)
    # Splenic vein behind the pancreas, joining the portal vein up to the liver hilum.
    sv_pts = np.concatenate([panc_pts[:0:-1] + [0, -11, 0], [[28, 8, 70], [45, 5, 95]]])
    paint_shape(p.tube(sv_pts, np.full(len(sv_pts), 5.5)), "portal_vein", within=abdomen)

    # Stomach: fundus/body left-anterior plus the antrum curving right; gas over fluid.
    body_shape = p.ellipsoid(*p.jitter_ellipsoid((-55, 30, 105), (42, 36, 58), (0, -20, 0)))
    antrum = p.ellipsoid(*p.jitter_ellipsoid((-8, 50, 62), (40, 20, 20), (0, 0, 20)))
    y_level = rng.uniform(10, 45)  # gas-fluid level, supine: gas rises anteriorly
    gas_frac = rng.uniform(0.0, 1.0)
    for shape in (body_shape, antrum):
        if (res := paint_shape(shape, "stomach_wall", "stomach", within=abdomen)) is None:
            continue
        sl, f, mask = res
        lumen = mask & (f < -0.16)
        _, wy_sl, _ = p.warped(sl)
        p.paint(sl, lumen, "gastric_fluid", "stomach")
        p.paint(sl, lumen & (wy_sl > y_level) & (gas_frac > 0.2), "gas", "stomach")

    # Gallbladder: pear under the liver's inferior surface, anterior, fundus tilted down-forward.
    paint_shape(p.ellipsoid(*p.jitter_ellipsoid((46, 40, 48), (17, 17, 34), (35, 0, 0))),
                "gallbladder", "gallbladder", within=abdomen)

    # Paraspinal and psoas muscles, then the spine: bodies (cortical shell, cancellous core),
    # discs, canal, arch and processes; segmented along the warped z so discs tilt with it.
    v_period, v_phase = rng.uniform(30, 36), rng.uniform(0, 40)
    disc_h = rng.uniform(7, 10)
    vz = np.mod(wz - v_phase, v_period)
    disc = vz < disc_h
    mid = (vz > disc_h + 4) & (vz < v_period - 4)  # pedicles / arch in the middle of a vertebra
    vb = np.sqrt((wx / vb_a) ** 2 + ((wy - y_body) / vb_b) ** 2) - 1.0
    canal = np.sqrt((wx / 9.0) ** 2 + ((wy - y_canal) / 8.0) ** 2) - 1.0
    arch = (canal < 0.9) & (canal > 0) & mid
    spinous = (np.abs(wx) < 4.5) & (wy < y_canal) & (wy > -body_b + fat_post + 6) & mid
    transverse = (np.abs(wx) < vb_a + 22) & (np.abs(wy - y_canal - 2) < 5) & (np.abs(vz - v_period / 2 - disc_h / 2) < 5)
    bone = arch | spinous | transverse | (vb < 0)
    p.paint(full, bone, "bone_cortical", "vertebrae")
    p.paint(full, (vb < -0.14) & ~disc, "bone_cancellous", "vertebrae")
    p.paint(full, (vb < 0) & disc, "disc")
    p.paint(full, canal < 0, "csf")

    # Aorta left-anterior of the spine, IVC right of it (through the liver, up to the heart).
    for tissue, x0, dy, semi_x, semi_y in (("aorta", -16, vb_b + 12, 11, 11), ("inferior_vena_cava", 24, vb_b + 14, 13, 9)):
        zs = np.linspace(-400, 400, 9)
        pts = np.stack([np.full(9, x0 + rng.uniform(-3, 3)), np.full(9, y_body + dy), zs], 1)
        pts[:, :2] += rng.uniform(-4, 4, (9, 2)).cumsum(0) * 0.5  # gentle meander
        radius = rng.uniform(0.85, 1.15) * np.sqrt(semi_x * semi_y)
        paint_shape(p.tube(pts, np.full(9, radius)), tissue, tissue, within=cavity)


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
    import nibabel.orientations as nio

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
    painter = _Painter(rng, cfg, axes)
    _draw_anatomy(painter, rng, body_a, body_b)

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
    from tqdm.auto import tqdm

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
