"""Per-structure volume (ml) and HU statistics in native geometry."""

from __future__ import annotations

import numpy as np
import pytest

from fseft.data.volume import Volume
from fseft.errors import InputFileError
from fseft.evaluation.statistics import structure_statistics


def _scan():
    # 2 x 1.5 x 3 mm voxels (9 mm^3), oblique-free but flipped axes: the volume uses |det|
    affine = np.diag([-2.0, 1.5, -3.0, 1.0])
    rng = np.random.default_rng(0)
    return Volume(rng.normal(40.0, 30.0, (10, 8, 6)).astype(np.float32), affine, "scan.nii.gz")


def test_label_map_volume_and_hu():
    scan = _scan()
    labels = np.zeros((10, 8, 6), np.uint8)
    labels[1:4, 2:5, 1:3] = 1  # 18 voxels
    labels[6, 6, 5] = 2  # 1 voxel
    stats = structure_statistics(scan, labels, ["liver", "spleen", "pancreas"])
    assert list(stats) == ["liver", "spleen", "pancreas"]
    liver = scan.array[1:4, 2:5, 1:3].astype(np.float64)
    assert stats["liver"]["voxels"] == 18
    assert stats["liver"]["volume_ml"] == pytest.approx(18 * 9.0 / 1000)
    assert stats["liver"]["hu_mean"] == pytest.approx(liver.mean(), abs=0.005)
    assert stats["liver"]["hu_std"] == pytest.approx(liver.std(), abs=0.005)
    assert stats["spleen"] == {"voxels": 1, "volume_ml": pytest.approx(0.009),
                               "hu_mean": pytest.approx(float(scan.array[6, 6, 5]), abs=0.005), "hu_std": 0.0}
    assert stats["pancreas"] == {"voxels": 0, "volume_ml": 0.0, "hu_mean": None, "hu_std": None}


def test_binary_masks_may_overlap():
    scan = _scan()
    masks = np.zeros((2, 10, 8, 6), np.uint8)
    masks[0, :5] = 1
    masks[1, 3:] = 1  # overlaps masks[0] on x = 3, 4
    stats = structure_statistics(scan, masks, ["a", "b"])
    assert stats["a"]["voxels"] == 5 * 48 and stats["b"]["voxels"] == 7 * 48
    assert stats["b"]["hu_mean"] == pytest.approx(scan.array[3:].astype(np.float64).mean(), abs=0.005)


def test_masks_of_another_shape_are_refused():
    with pytest.raises(InputFileError, match="scan.nii.gz"):
        structure_statistics(_scan(), np.zeros((10, 8, 5), np.uint8), ["liver"])
    with pytest.raises(InputFileError, match="2 structure"):
        structure_statistics(_scan(), np.zeros((3, 10, 8, 6), np.uint8), ["liver", "spleen"])
