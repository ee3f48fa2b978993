"""The phantom's anatomy: its tissues, the label values of its structures, and the painter
that draws them.

`draw_anatomy` paints a whole abdomen on a `Painter`'s canonical RAS grid, whose coordinates are
"adult millimetres" (+x patient right, +y anterior, +z superior) warped by a smooth random
displacement field: body outline with skin, subcutaneous fat, a muscle wall with ribs,
paraspinal and psoas muscles, a segmented spine, lung bases and heart above the diaphragm,
bowel loops and colon, and the labelled organs and vessels (`PHANTOM_LABELS`) where they sit in
a patient. Shapes are random ellipsoids and tubes with smooth random surface perturbations.
The case's size, intensities, noise and orientation are `fseft.data.phantom.generate_case`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from fseft.data.structures import PHANTOM_CLASSES

# Label value of each drawn structure in a full phantom label map (value = index + 1).
PHANTOM_LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(PHANTOM_CLASSES)}

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


def _rotation(rng: np.random.Generator, base_deg: Sequence[float], jitter_deg: float) -> np.ndarray:
    angles = np.asarray(base_deg, dtype=float) + rng.uniform(-jitter_deg, jitter_deg, 3)
    return Rotation.from_euler("xyz", angles, degrees=True).as_matrix().astype(np.float32)


class Painter:
    """Paints tissues and labels on a canonical RAS grid whose coordinates are adult mm.

    `deformation_mm`: std of the smooth displacement field; `shape_roughness`: std of the smooth
    surface perturbation (fraction of radius); `size_jitter`, `position_jitter_mm`: random scaling
    of semi-axes and moves of centres (`jitter_ellipsoid`). `fseft.data.phantom.PhantomConfig`
    holds their defaults.
    """

    def __init__(self, rng: np.random.Generator, axes: Sequence[np.ndarray], *, deformation_mm: float,
                 shape_roughness: float, size_jitter: float, position_jitter_mm: float):
        self.rng = rng
        self.shape_roughness, self.size_jitter, self.position_jitter_mm = shape_roughness, size_jitter, position_jitter_mm
        self.ax = [np.asarray(a, dtype=np.float32) for a in axes]
        self.shape = tuple(len(a) for a in self.ax)
        self.tissue = np.zeros(self.shape, dtype=np.uint8)  # all air
        self.label = np.zeros(self.shape, dtype=np.uint8)
        self.deform = self.smooth_fields(3, corr_mm=55.0) * deformation_mm
        self.rough = self.smooth_fields(2, corr_mm=30.0)
        self.margin = 3.0 * deformation_mm + 2.0

    def smooth_fields(self, n: int, corr_mm: float) -> np.ndarray:
        """`n` smooth random fields ``(n, X, Y, Z)`` float32, unit std, correlation ~`corr_mm`.

        White noise on a coarse grid (half the correlation length apart), Gaussian-smoothed,
        then trilinearly upsampled: cheap at any output size.
        """
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
        centre = np.asarray(centre, float) + self.rng.uniform(-self.position_jitter_mm, self.position_jitter_mm, 3)
        semi = np.asarray(semi, float) * self.rng.uniform(1 - self.size_jitter, 1 + self.size_jitter, 3)
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
        a, b = self.shape_roughness * math.cos(theta), self.shape_roughness * math.sin(theta)
        return f + (a * self.rough[0][sl] + b * self.rough[1][sl])

    def paint(self, sl, mask: np.ndarray, tissue: str, label: str | None = None) -> None:
        """Set `tissue` (and `label`, or no label) where `mask` holds within `sl`."""
        self.tissue[sl][mask] = _TISSUE_ID[tissue]
        self.label[sl][mask] = PHANTOM_LABELS[label] if label else 0


def draw_anatomy(p: Painter, rng: np.random.Generator, body_a: float, body_b: float) -> None:
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
