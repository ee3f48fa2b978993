"""The synthetic CT phantom: layout, determinism, anatomy, domain shift, difficulty, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from fseft.cli import main
from fseft.data import phantom as ph
from fseft.data.io import read_image, read_labels
from fseft.data.phantom_anatomy import PHANTOM_LABELS
from fseft.data.structures import PHANTOM_CLASSES, UnknownStructureError
from fseft.errors import ConfigError


@pytest.fixture(scope="module")
def source_ds(tmp_path_factory) -> Path:
    return ph.write_phantom_dataset(tmp_path_factory.mktemp("ph") / "src", 3, "source", seed=0, progress=False)


@pytest.fixture(scope="module")
def target_ds(tmp_path_factory) -> Path:
    return ph.write_phantom_dataset(tmp_path_factory.mktemp("ph") / "tgt", 3, "target", seed=0, progress=False)


def _cases(root: Path) -> list[tuple[str, Path, Path]]:
    meta = json.loads((root / "dataset.json").read_text())
    return [
        (cid, root / "imagesTr" / f"{cid}_0000.nii.gz", root / "labelsTr" / f"{cid}.nii.gz")
        for cid in meta["fseft"]["cases"]
    ]


def _best_interval_dice(image: np.ndarray, mask: np.ndarray, step: float = 5.0) -> float:
    """Dice of the best single HU interval [lo, hi] (5 HU grid over -1000..1000) for `mask`."""
    edges = np.arange(-1000.0, 1000.0 + step, step)
    all_cum = np.concatenate([[0], np.cumsum(np.histogram(image, edges)[0])])
    in_cum = np.concatenate([[0], np.cumsum(np.histogram(image[mask], edges)[0])])
    predicted = all_cum[None, :] - all_cum[:, None]  # voxels in [edges[i], edges[j])
    hits = in_cum[None, :] - in_cum[:, None]
    dice = np.where(predicted > 0, 2.0 * hits / np.maximum(predicted + mask.sum(), 1), 0.0)
    return float(dice.max())


def test_generate_case_is_deterministic_per_domain_seed_and_case():
    a = ph.generate_case(domain="source", seed=3, case_index=1)
    b = ph.generate_case(domain="source", seed=3, case_index=1)
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert np.array_equal(a.image.affine, b.image.affine)
    assert a.image.array.dtype == np.int16 and a.labels.array.dtype == np.uint8
    for other in (
        ph.generate_case(domain="source", seed=4, case_index=1),
        ph.generate_case(domain="source", seed=3, case_index=2),
        ph.generate_case(domain="source", seed=3, case_index=1, stream=1),
    ):
        assert other.image.array.shape != a.image.array.shape or not np.array_equal(other.image.array, a.image.array)


def test_dataset_layout_label_values_and_every_structure_present(source_ds):
    meta = json.loads((source_ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 3
    assert meta["labels"] == {"background": 0, **{s: i + 1 for i, s in enumerate(PHANTOM_CLASSES)}}
    assert meta["fseft"]["domain"] == "source" and meta["fseft"]["seed"] == 0
    assert meta["fseft"]["generator_version"] == ph.PHANTOM_VERSION
    cases = _cases(source_ds)
    assert len(cases) == 3 and len(list((source_ds / "imagesTr").iterdir())) == 3
    for _, image_path, label_path in cases:
        assert nib.load(image_path).get_data_dtype() == np.int16
        assert nib.load(label_path).get_data_dtype() == np.uint8
        image, labels = read_image(image_path), read_labels(label_path)
        assert np.allclose(image.affine, labels.affine) and image.array.shape == labels.array.shape
        assert set(np.unique(labels.array)) == set(meta["labels"].values()), label_path
        assert image.array.min() >= -1024 and image.array.max() > 300  # HU: air and bone
        for name, value in meta["labels"].items():
            if value:
                assert np.count_nonzero(labels.array == value) > 50, (label_path, name)


def test_physical_size_in_range_and_orientations_vary(source_ds, target_ds):
    codes = set()
    for root in (source_ds, target_ds):
        meta = json.loads((root / "dataset.json").read_text())
        for cid, image_path, _ in _cases(root):
            image = read_image(image_path)
            extent_mm = np.array(image.array.shape) * np.array(image.spacing)
            # ~96-128 voxels a side at the project's 1.5 mm
            assert np.all(extent_mm >= 140) and np.all(extent_mm <= 200), (image_path, extent_mm)
            assert image.axcodes == meta["fseft"]["cases"][cid]["orientation"]
            codes.add(image.axcodes)
    assert len(codes) >= 3, codes


def _world_centroid(labels, value: int) -> np.ndarray:
    idx = np.argwhere(labels.array == value).mean(axis=0)
    return (labels.affine @ np.append(idx, 1.0))[:3]  # RAS+ mm: +x right, +y anterior, +z up


@pytest.mark.parametrize("domain", ["source", "target"])
def test_anatomy_is_placed_plausibly_in_world_coordinates(source_ds, target_ds, domain):
    root = source_ds if domain == "source" else target_ds
    for _, _, label_path in _cases(root):
        labels = read_labels(label_path)
        c = {s: _world_centroid(labels, v) for s, v in PHANTOM_LABELS.items()}
        spine = c["vertebrae"]
        assert c["liver"][0] > spine[0] > c["spleen"][0], label_path  # liver right, spleen left
        assert c["kidney_right"][0] > spine[0] > c["kidney_left"][0]
        assert c["inferior_vena_cava"][0] > c["aorta"][0]  # IVC right of the aorta
        assert c["aorta"][1] > spine[1] and c["pancreas"][1] > spine[1]  # anterior of the spine
        assert c["kidney_right"][1] < c["pancreas"][1]  # kidneys posterior
        assert c["stomach"][0] < spine[0] and c["stomach"][1] > spine[1]  # left-anterior
        assert c["gallbladder"][2] < c["liver"][2] and c["gallbladder"][1] > spine[1]


def test_target_domain_shifts_hu_by_the_configured_phase_offsets():
    cfg = ph.PhantomConfig(hu_jitter=0.0, bias_hu=0.0)
    src = ph.generate_case(cfg, "source", seed=1, case_index=0)
    tgt = ph.generate_case(cfg, "target", seed=1, case_index=0)
    for name in ("aorta", "inferior_vena_cava", "spleen"):
        # Interior voxels only: the blur mixes the boundary with the neighbours (partial volume).
        means = [
            float(c.image.array[ndi.binary_erosion(c.labels.array == PHANTOM_LABELS[name], iterations=1)].mean())
            for c in (src, tgt)
        ]
        expected = cfg.target.hu[name] - cfg.source.hu[name]
        assert abs((means[1] - means[0]) - expected) < 10.0, (name, means, expected)
    assert cfg.target.hu["aorta"] - cfg.source.hu["aorta"] >= 100  # arterial vs portal-venous
    assert tgt.info["noise_hu"] > src.info["noise_hu"]


def test_intensity_thresholding_does_not_segment_liver_or_spleen():
    case = ph.generate_case(domain="source", seed=0, case_index=0)
    image, labels = case.image.array, case.labels.array
    liver = _best_interval_dice(image, labels == PHANTOM_LABELS["liver"])
    spleen = _best_interval_dice(image, labels == PHANTOM_LABELS["spleen"])
    assert liver < 0.6 and spleen < 0.45, (liver, spleen)
    # The search does find an interval when one exists (so the bound above can fail).
    assert _best_interval_dice(image, (image >= 100) & (image < 150)) == pytest.approx(1.0)


def test_structures_subset_relabels_consecutively_and_rejects_bad_names(tmp_path):
    root = ph.write_phantom_dataset(tmp_path / "ds", 1, "target", seed=2, structures="Spleen,ivc", progress=False)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "spleen": 1, "inferior_vena_cava": 2}
    (cid, _, label_path), = _cases(root)
    written = read_labels(label_path).array
    full = ph.generate_case(domain="target", seed=2, case_index=0).labels.array
    assert set(np.unique(written)) == {0, 1, 2}
    assert np.array_equal(written == 1, full == PHANTOM_LABELS["spleen"])
    assert np.array_equal(written == 2, full == PHANTOM_LABELS["inferior_vena_cava"])
    with pytest.raises(UnknownStructureError, match="notanorgan"):
        ph.write_phantom_dataset(tmp_path / "bad", 1, structures=["liver", "notanorgan"], progress=False)
    with pytest.raises(ConfigError, match="esophagus"):
        ph.write_phantom_dataset(tmp_path / "bad", 1, structures="esophagus", progress=False)
    with pytest.raises(ConfigError, match="cases"):
        ph.write_phantom_dataset(tmp_path / "bad", 0, progress=False)
    with pytest.raises(ConfigError, match="domain"):
        ph.write_phantom_dataset(tmp_path / "bad", 1, domain="arterial", progress=False)
    assert not (tmp_path / "bad").exists()


def test_output_folder_is_atomic_and_not_overwritten_by_default(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        ph.write_phantom_dataset(out, 1, progress=False)
    assert (out / "keep.txt").exists()

    # A failure mid-way leaves the old folder as it was and no temporary folder behind.
    calls = []

    def failing_write_mask(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return real_write_mask(*args, **kwargs)

    real_write_mask = ph.write_mask
    monkeypatch.setattr(ph, "write_mask", failing_write_mask)
    with pytest.raises(RuntimeError, match="disk full"):
        ph.write_phantom_dataset(out, 1, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"] and (out / "keep.txt").exists()
    monkeypatch.setattr(ph, "write_mask", real_write_mask)

    ph.write_phantom_dataset(out, 1, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_partial_label_sources_annotate_overlapping_subsets_without_gallbladder(tmp_path):
    roots = ph.write_partial_label_sources(tmp_path / "pre", n_sources=3, cases_per_source=1, seed=5, progress=False)
    assert [r.name for r in roots] == ["partial_A", "partial_B", "partial_C"]
    subsets, images = [], []
    for i, root in enumerate(roots):
        meta = json.loads((root / "dataset.json").read_text())
        labelled = [s for s in meta["labels"] if s != "background"]
        assert tuple(labelled) == ph.PARTIAL_LABEL_SUBSETS[i] and "gallbladder" not in labelled
        (cid, image_path, label_path), = _cases(root)
        assert cid.startswith(f"phantom{root.name[-1]}_")
        written = read_labels(label_path).array
        assert set(np.unique(written)) == set(range(len(labelled) + 1))
        if i == 1:  # against the full label map of the same case: other organs drawn, unlabelled
            full = ph.generate_case(domain="source", seed=5, case_index=0, stream=i + 1).labels.array
            assert np.count_nonzero(full == PHANTOM_LABELS["gallbladder"]) > 0
            for value, name in enumerate(labelled, start=1):
                assert np.array_equal(written == value, full == PHANTOM_LABELS[name]), name
            assert np.count_nonzero(full > 0) > np.count_nonzero(written > 0)
        subsets.append(set(labelled))
        images.append(read_image(image_path).array)
    for a in range(3):  # overlapping, but only partially
        for b in range(a + 1, 3):
            assert subsets[a] & subsets[b] and subsets[a] != subsets[b]
            assert images[a].shape != images[b].shape or not np.array_equal(images[a], images[b])
    assert set().union(*subsets) == set(PHANTOM_CLASSES) - {"gallbladder"}
    with pytest.raises(ConfigError, match="--partial-sources must be between 1 and 3"):
        ph.write_partial_label_sources(tmp_path / "x", n_sources=4, progress=False)


def test_cli_writes_dataset_partial_sources_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["phantom", "--out", str(out), "--cases", "1", "--domain", "target", "--seed", "7",
                 "--structures", "liver,kidney_left", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "kidney_left": 2}
    assert meta["fseft"]["domain"] == "target" and meta["fseft"]["seed"] == 7

    assert main(["phantom", "--out", str(out), "--cases", "1", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err

    assert main(["phantom", "--out", str(tmp_path / "bad"), "--cases", "1", "--structures", "liver,foo"]) == 2
    assert "foo" in capsys.readouterr().err and not (tmp_path / "bad").exists()

    assert main(["phantom", "--out", str(tmp_path / "pre"), "--cases", "1", "--partial-sources", "2",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "pre" / "partial_A"), str(tmp_path / "pre" / "partial_B")]
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["partial_A", "partial_B"]


def test_config_round_trips_through_dataset_json(source_ds):
    meta = json.loads((source_ds / "dataset.json").read_text())
    cfg = ph.PhantomConfig()
    assert meta["fseft"]["config"]["source"]["hu"] == cfg.source.hu
    assert meta["fseft"]["config"] == json.loads(json.dumps(dataclasses.asdict(cfg)))
