"""Real-CT validation of the embedded model (issue 25; the tables are in docs/real_ct.md).

The figures measured there are held as floors (and the head-and-neck false-positive volume as a
ceiling) with a margin, on the real patients under ../shared/data (skipped where it is absent):
zero-shot and 1-shot figures on the abdomen no model version was trained on (example_ct_sm),
and what `fseft predict` says and segments on the head-and-neck CT s0002. Structures the model
scores (about) 0 on today get no floor; a model that lifts them should add one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
HEAD_NECK = SHARED / "totalseg-dataset" / "s0002" / "ct.nii.gz"
ABDOMINAL_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "aorta",
                    "inferior_vena_cava")

pytestmark = pytest.mark.slow


def _builder():
    spec = importlib.util.spec_from_file_location("make_realct_dataset", REPO / "examples" / "make_realct_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def realct(tmp_path_factory) -> Path:
    """The three abdominal patients as one TotalSegmentator-layout dataset (links + split masks)."""
    if not (SHARED / "totalseg-dataset" / "s0009" / "ct.nii.gz").exists() or not HEAD_NECK.exists():
        pytest.skip(f"real CT not found under {SHARED}")
    return _builder().build(SHARED, tmp_path_factory.mktemp("realct") / "data")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("realct_cache")


def test_the_assembled_dataset_reads_as_three_patients(realct: Path) -> None:
    from fseft.data.datasets import open_dataset
    from fseft.data.tasks import eligible_cases

    dataset = open_dataset(realct)
    assert dataset.layout == "totalseg"
    assert [c.case_id for c in dataset.cases] == ["example_ct_dicom", "example_ct_sm", "s0009"]
    assert eligible_cases(dataset, "liver") == ["example_ct_dicom", "example_ct_sm", "s0009"]
    assert eligible_cases(dataset, "gallbladder") == ["example_ct_sm", "s0009"]
    image, labels = dataset.case("example_ct_dicom").load(["liver", "vertebrae"])
    assert image.array.shape == (512, 512, 20) and labels.array.shape == (2, 512, 512, 20)
    assert int(labels.array[0].sum()) == 366708  # the DICOM patient's liver, as in its mask file


def _queries(metrics: dict, structure: str) -> dict[str, float]:
    return {q: m[structure]["dice"] for q, m in metrics["queries"].items()}


# The embedded model v6 was trained on CT painted from s0009's and example_ct_dicom's label maps:
# only example_ct_sm (and s0002) are held out, so the floors below score queries on it.
HELD_OUT = "example_ct_sm"


def test_zero_shot_floors_on_the_held_out_abdomen(realct: Path, tmp_path: Path, cache: Path) -> None:
    """docs/real_ct.md, model v6 zero-shot on example_ct_sm: liver 0.504, stomach 0.290, aorta
    0.752, IVC 0.489, vertebrae 0.548 (v5: 0.513, 0, 0, 0, 0.401). Scored as `generalization`
    runs (the model's own head on the query, what `fseft predict` + `fseft evaluate` give),
    whose feature cache the 1-shot runs below reuse."""
    from fseft.adaptation import AdaptConfig, adapt

    cfg = AdaptConfig(method="generalization", cache_dir=str(cache), progress=False)
    floors = {"liver": 0.45, "stomach": 0.22, "aorta": 0.65, "inferior_vena_cava": 0.40, "vertebrae": 0.48}
    for structure, floor in floors.items():
        metrics = adapt("phantom", realct, structure, 1, 0, tmp_path / structure, cfg,
                        partition=(["s0009"], [HELD_OUT]))
        assert _queries(metrics, structure)[HELD_OUT] >= floor, (structure, metrics["queries"])


def test_one_shot_liver_onto_the_held_out_abdomen(realct: Path, tmp_path: Path, cache: Path) -> None:
    """docs/real_ct.md, model v6 few-shot table: lp supported on either training patient and
    scored on the held-out one: 0.691 from example_ct_dicom, 0.696 from s0009 (generalization
    0.504)."""
    from fseft.adaptation import AdaptConfig, adapt

    cfg = AdaptConfig(method="lp", cache_dir=str(cache), progress=False)
    for support in ("example_ct_dicom", "s0009"):
        metrics = adapt("phantom", realct, "liver", 1, 0, tmp_path / f"lp_{support}", cfg,
                        partition=([support], [HELD_OUT]))
        assert _queries(metrics, "liver")[HELD_OUT] >= 0.60, (support, metrics["queries"])


def test_two_shot_liver_from_both_training_patients_onto_the_held_out_abdomen(realct: Path, tmp_path: Path,
                                                                               cache: Path) -> None:
    """docs/real_ct.md, model v6 at k = 2 (examples/experiment_realct_k2.yaml): lp supported on
    both training patients and scored on the held-out one: 0.760 (k = 1: 0.691 / 0.696)."""
    from fseft.adaptation import AdaptConfig, adapt

    cfg = AdaptConfig(method="lp", cache_dir=str(cache), progress=False)
    metrics = adapt("phantom", realct, "liver", 2, 0, tmp_path / "lp_k2", cfg,
                    partition=(["example_ct_dicom", "s0009"], [HELD_OUT]))
    assert _queries(metrics, "liver")[HELD_OUT] >= 0.70, metrics["queries"]


def test_head_and_neck_ct_false_positives_and_warnings(realct: Path, tmp_path: Path, caplog) -> None:
    """s0002 holds no abdominal organ: the embedded model's abdominal masks there are false
    positives, 24.1 ml in all with v6 (v5: 53.4; docs/real_ct.md), held under 35 ml; `fseft
    predict` warns once that the model is synthetic-only and, naming the file, that the masks
    are implausible."""
    from fseft.prediction.predict import predict_path
    from fseft.prediction.segment import InferenceConfig

    with caplog.at_level(logging.WARNING):
        result = predict_path(HEAD_NECK, tmp_path / "s0002.nii.gz", "phantom", cfg=InferenceConfig(progress=False),
                              statistics=True)
    stats = json.loads(result.statistics_file.read_text())["ct"]
    fp_ml = sum(stats[s]["volume_ml"] for s in ABDOMINAL_ORGANS)
    assert fp_ml <= 35.0, stats
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("trained on synthetic CT only" in m for m in messages) == 1
    scan = [m for m in messages if "do not look like the organs" in m]
    assert len(scan) == 1 and scan[0].startswith(str(HEAD_NECK)) and "spleen (mean" in scan[0]
