import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fseft.cli import main
from fseft.data import inspection
from fseft.data.datasets import Case, detect_layout, open_dataset
from fseft.data.inspection import inspect_dataset, voxel_counts
from fseft.errors import ConfigError, InputFileError

SHAPE = (16, 16, 16)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def save(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def random_labels(rng: np.random.Generator, values: list[int]) -> np.ndarray:
    """A 16^3 label map with one box of each value (random size and place)."""
    labels = np.zeros(SHAPE, np.uint8)
    for v in values:
        lo = rng.integers(0, 10, size=3)
        hi = lo + rng.integers(1, 6, size=3)
        labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = v
    return labels


def make_nnunet(root: Path, n_train: int = 3, n_test: int = 1, labels=None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = labels or {"background": 0, "liver": 1, "lKid": 2}
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(
        {"name": "Dataset001_Tiny", "channel_names": {"0": "CT"}, "labels": labels,
         "numTraining": n_train, "file_ending": ".nii.gz"}))
    truth = {}
    for i in range(n_train):
        case = f"tiny_{i:03d}"
        save(rng.normal(0, 100, SHAPE).astype(np.int16), root / "imagesTr" / f"{case}_0000.nii.gz")
        truth[case] = random_labels(rng, [1, 2])
        save(truth[case], root / "labelsTr" / f"{case}.nii.gz")
    for i in range(n_test):
        save(np.zeros(SHAPE, np.int16), root / "imagesTs" / f"test_{i:03d}_0000.nii.gz")
    return truth


# ---------------------------------------------------------------------------- nnU-Net


def test_nnunet_layout_cases_structures_and_load(tmp_path):
    truth = make_nnunet(tmp_path / "d")
    dataset = open_dataset(tmp_path / "d")
    assert dataset.layout == "nnunet" and dataset.name == "Dataset001_Tiny"
    assert [c.case_id for c in dataset.cases] == ["test_000", "tiny_000", "tiny_001", "tiny_002"]
    assert dataset.case("test_000").label is None and not dataset.case("test_000").is_labelled
    assert len(dataset.labelled_cases) == 3
    assert dataset.structures == ("liver", "kidney_left")
    assert dataset.original_names == {"kidney_left": "lKid"}

    image, labels = dataset.case("tiny_001").load(["lKid", "liver"])
    assert image.array.shape == SHAPE and labels.array.shape == (2, *SHAPE)
    np.testing.assert_array_equal(labels.array[0], truth["tiny_001"] == 2)
    np.testing.assert_array_equal(labels.array[1], truth["tiny_001"] == 1)
    with pytest.raises(ConfigError, match="no labels"):
        dataset.case("test_000").load()
    with pytest.raises(ConfigError, match="does not annotate spleen"):
        dataset.case("tiny_000").load(["spleen"])
    with pytest.raises(ConfigError, match="nope"):
        dataset.case("nope")


def test_nnunet_region_labels_rejected(tmp_path):
    make_nnunet(tmp_path / "d", labels={"background": 0, "kidney": [1, 2], "tumor": 2})
    with pytest.raises(InputFileError, match=r"dataset\.json.*region-based"):
        open_dataset(tmp_path / "d")


def test_nnunet_image_without_label(tmp_path):
    make_nnunet(tmp_path / "d")
    (tmp_path / "d" / "labelsTr" / "tiny_001.nii.gz").unlink()
    with pytest.raises(InputFileError, match=r"tiny_001_0000\.nii\.gz: image without its label"):
        open_dataset(tmp_path / "d")


def test_nnunet_label_without_image(tmp_path):
    make_nnunet(tmp_path / "d")
    (tmp_path / "d" / "imagesTr" / "tiny_002_0000.nii.gz").unlink()
    with pytest.raises(InputFileError, match=r"tiny_002\.nii\.gz: label without its image"):
        open_dataset(tmp_path / "d")


def test_label_value_absent_from_label_map(tmp_path):
    make_nnunet(tmp_path / "d", n_test=0)
    bad = np.zeros(SHAPE, np.uint8)
    bad[:2] = 7
    save(bad, tmp_path / "d" / "labelsTr" / "tiny_001.nii.gz")
    dataset = open_dataset(tmp_path / "d")
    with pytest.raises(InputFileError, match=r"tiny_001\.nii\.gz: label value\(s\) \[7\]"):
        voxel_counts(dataset, cache_dir=tmp_path / "cache", progress=False)


# ---------------------------------------------------------------------------- FLARE22 / TotalSegmentator


def test_flare22_layout_uses_flare_label_values(tmp_path):
    root = tmp_path / "FLARE22"
    rng = np.random.default_rng(1)
    truth = {}
    for i in (1, 2):
        case = f"FLARE22_Tr_{i:04d}"
        save(np.zeros(SHAPE, np.int16), root / "imagesTr" / f"{case}_0000.nii.gz")
        truth[case] = random_labels(rng, [1, 13])
        save(truth[case], root / "labelsTr" / f"{case}.nii.gz")
    assert detect_layout(root) == "flare22"
    dataset = open_dataset(root, layout="flare22")
    assert [c.case_id for c in dataset.cases] == ["FLARE22_Tr_0001", "FLARE22_Tr_0002"]
    assert "kidney_left" in dataset.structures and "liver" in dataset.structures
    _, labels = dataset.case("FLARE22_Tr_0002").load("kidney_left")
    np.testing.assert_array_equal(labels.array[0], truth["FLARE22_Tr_0002"] == 13)
    counts = voxel_counts(dataset, ["liver", "kidney_left", "spleen"], cache_dir=tmp_path / "c", progress=False)
    assert counts["FLARE22_Tr_0001"] == {
        "liver": int((truth["FLARE22_Tr_0001"] == 1).sum()),
        "kidney_left": int((truth["FLARE22_Tr_0001"] == 13).sum()),
        "spleen": 0,  # annotated by FLARE22's label map, absent from this case
    }


def make_totalseg(root: Path, n: int = 2) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    truth = {}
    for i in range(n):
        case = root / f"s{i:04d}"
        save(np.zeros(SHAPE, np.int16), case / "ct.nii.gz")
        labels = random_labels(rng, [1, 2])
        truth[case.name] = {"liver": labels == 1, "kidney_left": labels == 2}
        save((labels == 1).astype(np.uint8), case / "segmentations" / "liver.nii.gz")
        save((labels == 2).astype(np.uint8), case / "segmentations" / "Kidney-L.nii.gz")
    (root / "meta.csv").write_text("image_id;split\ns0000;train\n")
    return truth


def test_totalseg_layout(tmp_path):
    truth = make_totalseg(tmp_path / "ts")
    dataset = open_dataset(tmp_path / "ts")
    assert dataset.layout == "totalseg"
    assert [c.case_id for c in dataset.cases] == ["s0000", "s0001"]
    assert set(dataset.structures) == {"liver", "kidney_left"}
    assert dataset.original_names == {"kidney_left": "Kidney-L"}
    _, labels = dataset.case("s0001").load(["kidney_left", "liver"])
    np.testing.assert_array_equal(labels.array[0], truth["s0001"]["kidney_left"])
    np.testing.assert_array_equal(labels.array[1], truth["s0001"]["liver"])


def test_totalseg_image_without_labels(tmp_path):
    make_totalseg(tmp_path / "ts")
    shutil.rmtree(tmp_path / "ts" / "s0001" / "segmentations")
    with pytest.raises(InputFileError, match=r"s0001/ct\.nii\.gz: image without its labels"):
        open_dataset(tmp_path / "ts")


def test_geometry_mismatch_is_reported(tmp_path):
    make_totalseg(tmp_path / "ts", n=1)
    save(np.zeros(SHAPE, np.uint8), tmp_path / "ts" / "s0000" / "segmentations" / "liver.nii.gz",
         affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    case = open_dataset(tmp_path / "ts").case("s0000")
    with pytest.raises(InputFileError, match="geometry differs"):
        case.load()


def test_totalseg_from_real_example(tmp_path, totalseg_examples):
    """The real CT crop with three of its structures split into TotalSegmentator files."""
    class_map = json.loads((totalseg_examples / "total_class_map.json").read_text())
    value_of = {name: int(v) for v, name in class_map.items()}
    seg_img = nib.load(str(totalseg_examples / "example_seg.nii.gz"))
    seg = np.asarray(seg_img.dataobj)
    case = tmp_path / "ts" / "s0001"
    case.mkdir(parents=True)
    shutil.copy(totalseg_examples / "example_ct_sm.nii.gz", case / "ct.nii.gz")
    names = ["liver", "spleen", "aorta"]
    for name in names:
        save((seg == value_of[name]).astype(np.uint8), case / "segmentations" / f"{name}.nii.gz", seg_img.affine)

    dataset = open_dataset(tmp_path / "ts")
    assert dataset.layout == "totalseg" and set(dataset.structures) == set(names)
    counts = voxel_counts(dataset, cache_dir=tmp_path / "cache", progress=False)
    assert counts == {"s0001": {n: int((seg == value_of[n]).sum()) for n in dataset.structures}}
    assert all(v > 0 for v in counts["s0001"].values())
    image, labels = dataset.case("s0001").load(names)
    assert image.array.shape == (122, 101, 30) and labels.array.shape == (3, 122, 101, 30)
    assert int(labels.array[0].sum()) == counts["s0001"]["liver"]


# ---------------------------------------------------------------------------- errors, cache


def test_missing_path_and_no_layout(tmp_path):
    with pytest.raises(InputFileError, match="no such dataset folder"):
        open_dataset(tmp_path / "absent")
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    with pytest.raises(InputFileError, match="matches no dataset layout") as err:
        open_dataset(tmp_path / "empty")
    for layout in ("nnunet", "totalseg", "flare22", "dataset.json", "ct.nii.gz", "FLARE22_Tr_0001"):
        assert layout in str(err.value)
    with pytest.raises(ConfigError, match="unknown dataset layout"):
        open_dataset(tmp_path / "empty", layout="msd")
    with pytest.raises(InputFileError, match="no dataset.json"):
        open_dataset(tmp_path / "empty", layout="nnunet")


def test_voxel_counts_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    truth = make_nnunet(tmp_path / "d", n_test=0)
    dataset = open_dataset(tmp_path / "d")
    first = voxel_counts(dataset, cache_dir=tmp_path / "cache", progress=False)
    assert first == {
        case: {"liver": int((t == 1).sum()), "kidney_left": int((t == 2).sum())} for case, t in truth.items()
    }
    assert list((tmp_path / "cache" / "voxel_counts").glob("*.json"))

    read = []
    original = inspection._value_counts
    monkeypatch.setattr(inspection, "_value_counts", lambda p: read.append(p.name) or original(p))
    assert voxel_counts(dataset, ["kidney_left"], cache_dir=tmp_path / "cache", progress=False) == {
        case: {"kidney_left": c["kidney_left"]} for case, c in first.items()
    }
    assert read == []  # all from the cache

    changed = np.zeros(SHAPE, np.uint8)
    changed[:3, :3, :3] = 2
    save(changed, tmp_path / "d" / "labelsTr" / "tiny_000.nii.gz")
    again = voxel_counts(dataset, cache_dir=tmp_path / "cache", progress=False)
    assert read == ["tiny_000.nii.gz"]
    assert again["tiny_000"] == {"liver": 0, "kidney_left": 27}
    assert again["tiny_001"] == first["tiny_001"]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FSEFT_CACHE_DIR", str(tmp_path / "envcache"))
    assert inspection.default_cache_dir() == tmp_path / "envcache"
    make_nnunet(tmp_path / "d", n_train=1, n_test=0)
    voxel_counts(open_dataset(tmp_path / "d"), progress=False)
    assert list((tmp_path / "envcache" / "voxel_counts").glob("*.json"))


def test_case_is_hashable_and_lists_its_files(tmp_path):
    case = Case("a", tmp_path / "a.nii.gz", label_files={"liver": tmp_path / "liver.nii.gz"})
    assert hash(case) == hash(Case("a", tmp_path / "a.nii.gz"))
    assert case.structures == ("liver",) and case.label_paths() == [tmp_path / "liver.nii.gz"]


# ---------------------------------------------------------------------------- inspect / CLI


def test_inspect_report_and_json(tmp_path):
    truth = make_nnunet(tmp_path / "d")
    report = inspect_dataset(tmp_path / "d", cases=True, json_path=tmp_path / "out" / "s.json",
                             cache_dir=tmp_path / "cache", progress=False)
    assert "layout   nnunet" in report
    assert "4 (3 labelled, 1 unlabelled)" in report
    kidney_line = next(line for line in report.splitlines() if line.strip().startswith("kidney_left"))
    sizes = sorted(int((t == 2).sum()) for t in truth.values())
    assert kidney_line.split() == ["kidney_left", "lKid", "3/3", str(sizes[0]), f"{float(sizes[1]):g}", str(sizes[2])]
    assert "tiny_002" in report  # per-case table
    summary = json.loads((tmp_path / "out" / "s.json").read_text())
    assert summary["layout"] == "nnunet" and summary["labelled_cases"] == 3
    assert summary["voxel_counts"]["tiny_002"]["liver"] == int((truth["tiny_002"] == 1).sum())


def test_cli_inspect(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FSEFT_CACHE_DIR", str(tmp_path / "cache"))
    make_totalseg(tmp_path / "ts")
    out = tmp_path / "summary.json"
    assert main(["datasets", "inspect", str(tmp_path / "ts"), "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "layout   totalseg" in printed and "Kidney-L" in printed and "s0001" not in printed
    assert json.loads(out.read_text())["cases"] == 2

    assert main(["datasets", "inspect", str(tmp_path / "ts"), "--cases", "--no-progress"]) == 0
    assert "s0001" in capsys.readouterr().out


def test_cli_inspect_bad_path(tmp_path, capsys):
    assert main(["datasets", "inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "no such dataset folder" in err
