"""Synthetic CT painted from real label maps: reading a source, painting, the dataset, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fseft.cli import main
from fseft.data.datasets import open_dataset
from fseft.data.io import read_image, read_labels, write_image, write_mask
from fseft.data.painting import DEFAULT_STRUCTURES, PaintConfig, load_label_source, paint_case, paint_dataset
from fseft.data.volume import Volume
from fseft.errors import ConfigError, InputFileError

SHAPE = (40, 36, 32)


def _write_source(root: Path) -> Path:
    """A TotalSegmentator-layout case at 2 mm: air, a fat body, a 60 HU 'liver' ball, a 300 HU
    'vertebrae_L1' box, an unlabelled 30 HU muscle slab; masks in LPS-flipped RAS (x flipped)."""
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    affine[0, 3] = 80.0
    grid = np.indices(SHAPE).astype(np.float32)
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[3:-3, 3:-3, :] = -100.0
    ct[5:10, 5:30, :] = 30.0
    liver = ((grid - np.array([25, 18, 16])[:, None, None, None]) ** 2).sum(0) <= 8**2
    vertebra = np.zeros(SHAPE, bool)
    vertebra[16:22, 6:12, 4:28] = True
    ct[liver], ct[vertebra] = 60.0, 300.0
    image = Volume(ct.astype(np.int16), affine, "ct")
    write_image(image, root / "ct.nii.gz")
    for name, mask in (("liver", liver), ("vertebrae_L1", vertebra), ("spleen", np.zeros(SHAPE, bool)),
                       ("vertebrae", vertebra)):
        write_mask(mask.astype(np.uint8), image, root / "segmentations" / f"{name}.nii.gz")
    return root


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    return _write_source(tmp_path_factory.mktemp("paint") / "patient")


def test_a_source_names_its_structures_and_tissue_classes_with_their_real_levels(source_dir):
    source = load_label_source(source_dir)
    # empty masks and the vertebrae union are skipped; unlabelled voxels get tissue classes by HU
    assert source.names == ("liver", "vertebrae_L1", "_air", "_fat", "_soft_tissue", "_dense")
    level = dict(zip(source.names, source.median[1:], strict=True))
    assert level["liver"] == 60 and level["vertebrae_L1"] == 300
    assert level["_air"] == -1000 and level["_fat"] == -100 and level["_soft_tissue"] == 30
    assert not (source.labels == 0).any()  # every voxel of the scan has an id


def test_painting_keeps_the_anatomy_labelled_and_draws_intensities_around_the_real_ones(source_dir):
    source = load_label_source(source_dir)
    cfg = PaintConfig(rotation_deg=0.0, scale=(1.0, 1.0), elastic_mm=0.0, fov_xy=(1.0, 1.0), fov_z=(1.0, 1.0),
                      spacing_xy=(2.0, 2.0), spacing_z=(2.0, 2.0), blur_voxels=(0.0, 0.0), noise_hu=(3.0, 3.0))
    image, labels, info = paint_case(source, np.random.default_rng(0), cfg)
    again, labels_again, _ = paint_case(source, np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(image.array, again.array)  # a case is a function of its random stream
    np.testing.assert_array_equal(labels, labels_again)
    other, _, _ = paint_case(source, np.random.default_rng(1), cfg)
    assert not np.array_equal(image.array, other.array)

    assert image.array.dtype == np.int16 and labels.shape == image.array.shape == SHAPE
    assert image.spacing == pytest.approx((2.0, 2.0, 2.0)) and info["source"] == "patient"
    liver = labels == DEFAULT_STRUCTURES.index("liver") + 1
    vertebrae = labels == DEFAULT_STRUCTURES.index("vertebrae") + 1
    assert set(np.unique(labels)) == {0, 1, 9}  # liver and vertebrae; the rest painted, unlabelled
    # no deformation and the full field of view: the same voxels, in RAS order (the source is x-flipped)
    ref = read_labels(source_dir / "segmentations" / "liver.nii.gz").array[::-1] > 0
    assert (liver == ref).mean() > 0.99
    assert abs(vertebrae.sum() - 6 * 6 * 24) <= 6 * 6 * 24 * 0.05
    # the liver's level: the real 60 HU, a jitter (sd 12) and the organ shift (-25..45), texture around it
    assert -40 < float(np.median(image.array[liver])) < 160
    assert float(np.median(image.array[vertebrae])) > 150  # bone stays bone
    assert float(np.median(image.array[~liver & ~vertebrae & (image.array > -500)])) < 60
    # the image sits where the anatomy was: the liver centre in mm is unchanged
    src = read_image(source_dir / "ct.nii.gz")
    centre = lambda m, a: (a[:3, :3] @ np.argwhere(m).mean(0) + a[:3, 3])  # noqa: E731
    np.testing.assert_allclose(centre(liver, image.affine), centre(ref[::-1], src.affine), atol=1.0)


def test_the_random_field_of_view_crops_and_the_grid_changes(source_dir):
    source = load_label_source(source_dir)
    shapes, spacings = set(), set()
    for i in range(6):
        image, labels, info = paint_case(source, np.random.default_rng(i))
        assert image.array.shape == labels.shape
        assert all(1.2 <= s <= 3.0 for s in image.spacing[:2]) and 1.5 <= image.spacing[2] <= 5.0
        assert all(0.4 <= f <= 1.0 for f in info["field_of_view"])
        shapes.add(image.array.shape)
        spacings.add(round(image.spacing[2], 2))
    assert len(shapes) == 6 and len(spacings) == 6


def test_a_painted_dataset_is_an_nnunet_dataset_fseft_reads(source_dir, tmp_path):
    out = paint_dataset([source_dir], tmp_path / "painted", 3, seed=4, structures="liver,vertebrae", progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "vertebrae": 2}
    assert meta["fseft"]["generator"] == "fseft.data.painting" and len(meta["fseft"]["cases"]) == 3
    dataset = open_dataset(out)
    assert len(dataset.cases) == 3 and dataset.structures == ("liver", "vertebrae")
    first = read_labels(out / "labelsTr" / "painted_000.nii.gz").array
    assert set(np.unique(first)) <= {0, 1, 2} and (first == 1).any()
    again = paint_dataset([source_dir], tmp_path / "again", 3, seed=4, structures="liver,vertebrae", progress=False)
    np.testing.assert_array_equal(read_image(out / "imagesTr" / "painted_002_0000.nii.gz").array,
                                  read_image(again / "imagesTr" / "painted_002_0000.nii.gz").array)
    with pytest.raises(ConfigError):  # a written dataset is not overwritten silently
        paint_dataset([source_dir], out, 1, progress=False)


def test_a_folder_that_is_not_a_labelled_case_is_named_and_nothing_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="empty.*ct.nii.gz and segmentations"):
        paint_dataset([tmp_path / "empty"], tmp_path / "out", 2, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="cases must be >= 1"):
        paint_dataset([tmp_path / "empty"], tmp_path / "out", 0, progress=False)


def test_fseft_paint_writes_the_dataset(source_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["paint", "--labels", str(source_dir), "--out", str(out), "--cases", "2", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len(list((out / "imagesTr").glob("*.nii.gz"))) == 2
    assert main(["paint", "--labels", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "nowhere" in capsys.readouterr().err
