import math

import numpy as np
import pytest

from fseft.evaluation.metrics import dice, evaluate_masks, hd95, nsd


def _cube(shape=(30, 30, 30), start=(10, 10, 10), size=10):
    m = np.zeros(shape, dtype=bool)
    x, y, z = start
    m[x:x + size, y:y + size, z:z + size] = True
    return m


def test_dice_of_cubes_shifted_by_one_voxel_is_analytic():
    n = 10
    a, b = _cube(size=n), _cube(start=(11, 10, 10), size=n)
    # overlap (n-1) n^2 over 2 n^3
    assert dice(a, b) == pytest.approx((n - 1) / n)
    assert dice(a, a) == 1.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (3.0, 0.5, 1.0)])
def test_hd95_of_shifted_cubes_equals_the_shift_in_mm(spacing):
    a, b = _cube(), _cube(start=(11, 10, 10))
    assert hd95(a, b, spacing) == pytest.approx(spacing[0])
    # the shift is along X: spacing along Y/Z must not matter, and along Y it does
    c = _cube(start=(10, 11, 10))
    assert hd95(a, c, spacing) == pytest.approx(spacing[1])


def test_nsd_counts_boundary_voxels_within_tolerance():
    a, b = _cube(), _cube(start=(11, 10, 10))
    spacing = (2.0, 1.0, 1.0)
    # the whole boundary is within a tolerance of the shift
    assert nsd(a, b, spacing, tolerance_mm=2.0) == pytest.approx(1.0)
    # 10^3 - 8^3 = 488 boundary voxels per cube; 100 (face left behind) + 36 (inner part of the
    # opposite face) lie 2 mm from the other boundary, 28 lie 1 mm away, the rest on it.
    assert nsd(a, b, spacing, tolerance_mm=1.5) == pytest.approx((488 - 136) / 488, abs=1e-6)
    assert nsd(a, b, spacing, tolerance_mm=0.5) == pytest.approx((488 - 136 - 28) / 488, abs=1e-6)
    assert nsd(a, a, spacing, tolerance_mm=0.0) == pytest.approx(1.0)


def test_empty_mask_conventions():
    empty, cube = np.zeros((8, 8, 8), bool), _cube((8, 8, 8), (2, 2, 2), 3)
    sp = (1.0, 1.0, 1.0)
    assert (dice(empty, empty), nsd(empty, empty, sp), hd95(empty, empty, sp)) == (1.0, 1.0, 0.0)
    assert dice(empty, cube) == 0.0 and dice(cube, empty) == 0.0
    assert nsd(empty, cube, sp) == 0.0 and nsd(cube, empty, sp) == 0.0
    assert math.isnan(hd95(empty, cube, sp)) and math.isnan(hd95(cube, empty, sp))


def test_evaluate_masks_per_structure():
    a, b = _cube(), _cube(start=(11, 10, 10))
    pred = np.stack([a, b, np.zeros_like(a)]).astype(np.uint8)
    gt = np.stack([a, a, np.zeros_like(a)]).astype(np.uint8)
    out = evaluate_masks(pred, gt, (2.0, 1.0, 1.0), ["liver", "spleen", "gallbladder"])
    assert list(out) == ["liver", "spleen", "gallbladder"]
    assert out["liver"] == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}
    assert out["spleen"]["dice"] == pytest.approx(0.9)
    assert out["spleen"]["hd95"] == pytest.approx(2.0)
    assert out["gallbladder"] == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}


def test_evaluate_masks_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        evaluate_masks(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 5)), (1, 1, 1), ["liver"])
    with pytest.raises(ValueError, match="2 structures"):
        evaluate_masks(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 4)), (1, 1, 1), ["liver", "spleen"])
