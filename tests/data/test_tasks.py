import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fseft.data.datasets import open_dataset
from fseft.data.tasks import FewShotTask, case_id_from_entry, eligible_cases, read_partition, write_partition
from fseft.errors import ConfigError, InputFileError

N_CASES = 8
NO_SPLEEN = {"case_02", "case_05"}  # annotated but empty


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 labelled cases (liver everywhere, spleen empty in two) + 1 unlabelled, 8^3 voxels."""
    root = tmp_path_factory.mktemp("tasks") / "Dataset002_Task"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}))

    def save(array, path: Path):
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))

    for i in range(N_CASES):
        case = f"case_{i:02d}"
        labels = np.zeros((8, 8, 8), np.uint8)
        labels[:4] = 1
        if case not in NO_SPLEEN:
            labels[5:, : i + 1] = 2
        save(np.zeros((8, 8, 8), np.int16), root / "imagesTr" / f"{case}_0000.nii.gz")
        save(labels, root / "labelsTr" / f"{case}.nii.gz")
    save(np.zeros((8, 8, 8), np.int16), root / "imagesTs" / "unlabelled_0000.nii.gz")
    return open_dataset(root)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FSEFT_CACHE_DIR", str(tmp_path / "cache"))


LABELLED = {f"case_{i:02d}" for i in range(N_CASES)}


def test_eligible_cases_skip_empty_and_unlabelled(dataset):
    assert set(eligible_cases(dataset, ["liver"])) == LABELLED
    assert set(eligible_cases(dataset, "liver,spleen")) == LABELLED - NO_SPLEEN


def test_sample_is_deterministic_disjoint_and_covers_eligible(dataset):
    task = FewShotTask.sample(dataset, ["spleen", "liver"], k=2, seed=3)
    assert task == FewShotTask.sample(dataset, "spleen,liver", k=2, seed=3)
    assert task.structures == ("spleen", "liver") and task.k == 2 and task.dataset == dataset.name
    assert len(task.support) == 2 and not set(task.support) & set(task.query)
    assert set(task.support) | set(task.query) == LABELLED - NO_SPLEEN  # all others are queries
    supports = {FewShotTask.sample(dataset, ["spleen"], k=2, seed=s).support for s in range(10)}
    assert len(supports) > 1  # the seed matters
    assert [c.case_id for c in task.support_cases(dataset)] == list(task.support)


def test_n_query_limits_queries(dataset):
    task = FewShotTask.sample(dataset, ["liver"], k=1, seed=0, n_query=3)
    assert len(task.query) == 3 and task.support[0] not in task.query
    with pytest.raises(ConfigError, match="n_query"):
        FewShotTask.sample(dataset, ["liver"], k=1, seed=0, n_query=0)


def test_k_too_large_and_no_query_left(dataset):
    with pytest.raises(ConfigError, match=r"k=7 .* only 6 of the 8 labelled cases"):
        FewShotTask.sample(dataset, ["liver", "spleen"], k=7, seed=0)
    with pytest.raises(ConfigError, match="leaves no query case"):
        FewShotTask.sample(dataset, ["liver", "spleen"], k=6, seed=0)
    with pytest.raises(ConfigError, match="does not annotate pancreas"):
        FewShotTask.sample(dataset, ["pancreas"], k=1, seed=0)


def test_partition_round_trip(tmp_path):
    paths = write_partition(tmp_path / "parts", "lKid", ["b", "a"], ["c"])
    assert [p.name for p in paths] == ["kidney_left_train.txt", "kidney_left_test.txt"]
    assert paths[0].read_text() == "b\na\n"
    assert read_partition(tmp_path / "parts", "kidney_left") == (["b", "a"], ["c"])
    assert read_partition(tmp_path / "parts", "left kidney") == (["b", "a"], ["c"])
    with pytest.raises(ConfigError, match="both in train and test"):
        write_partition(tmp_path / "parts", "liver", ["a"], ["a"])
    with pytest.raises(InputFileError, match="no partition files for 'spleen'"):
        read_partition(tmp_path / "parts", "spleen")
    paths[1].unlink()
    with pytest.raises(InputFileError, match="kidney_left_test.txt: partition file missing"):
        read_partition(tmp_path / "parts", "kidney_left")


def test_reference_style_partition_lines(tmp_path):
    (tmp_path / "liver_train.txt").write_text(
        "data/s0004/ct.nii.gz   data/s0004/segmentations/liver.nii.gz\n\n"
        "17_FLARE22/train/images/FLARE22_Tr_0001_0000.nii.gz   17_FLARE22/train/labels/FLARE22_Tr_0001.nii.gz\n")
    (tmp_path / "liver_test.txt").write_text("# comment\ns0029\n")
    assert read_partition(tmp_path, "liver") == (["s0004", "FLARE22_Tr_0001"], ["s0029"])
    (tmp_path / "_train.txt").write_text("x\n")
    (tmp_path / "_test.txt").write_text("y\n")
    assert read_partition(tmp_path, None) == (["x"], ["y"])
    assert case_id_from_entry("imagesTr/tiny_003_0000.nii.gz") == "tiny_003"
    assert case_id_from_entry("case_0000") == "case_0000"


def test_sample_from_partition(dataset, tmp_path):
    train = ["case_00", "case_01", "case_02", "case_03"]
    test = ["case_04", "case_05", "case_06", "case_07"]
    write_partition(tmp_path, "spleen", train, test)
    partition = read_partition(tmp_path, "spleen")
    task = FewShotTask.sample(dataset, ["spleen"], k=2, seed=1, partition=partition)
    assert set(task.support) <= set(train) - NO_SPLEEN
    assert set(task.query) == set(test) - NO_SPLEEN
    assert task == FewShotTask.sample(dataset, ["spleen"], k=2, seed=1, partition=partition)
    with pytest.raises(ConfigError, match=r"k=4 .* only 3 of the 4 partition train cases"):
        FewShotTask.sample(dataset, ["spleen"], k=4, seed=1, partition=partition)
    with pytest.raises(ConfigError, match="not in dataset.*s9999"):
        FewShotTask.sample(dataset, ["spleen"], k=1, seed=1, partition=(["s9999"], test))


def test_to_dict_from_dict_json_round_trip(dataset):
    task = FewShotTask.sample(dataset, ["liver"], k=3, seed=7, n_query=2)
    data = json.loads(json.dumps(task.to_dict()))
    assert FewShotTask.from_dict(data) == task
    with pytest.raises(ConfigError, match="missing seed"):
        FewShotTask.from_dict({k: v for k, v in data.items() if k != "seed"})
    with pytest.raises(ConfigError, match="both in support and query"):
        FewShotTask.from_dict({**data, "query": [task.support[0]]})
