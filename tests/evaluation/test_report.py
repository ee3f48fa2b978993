import csv
import json

import numpy as np
import pytest

from fseft.cli import main
from fseft.data.io import write_mask
from fseft.data.volume import Volume
from fseft.errors import ConfigError, InputFileError
from fseft.evaluation.report import evaluate_folders, read_label_map

SHAPE = (24, 20, 16)


def _affine(spacing=(2.0, 1.0, 1.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = (-10.0, 5.0, 0.0)
    return a


def _ref(affine=None):
    return Volume(np.zeros(SHAPE, np.float32), _affine() if affine is None else affine, "ref")


def _labels(liver_start=4, spleen=True):
    lab = np.zeros(SHAPE, np.uint8)
    lab[liver_start:liver_start + 8, 4:12, 4:12] = 1  # liver
    if spleen:
        lab[16:20, 14:18, 10:14] = 2  # spleen
    return lab


@pytest.fixture
def pair(tmp_path):
    """GT: nnU-Net-like labelsTr folder with dataset.json in the parent; predictions as
    `fseft predict` writes them, with another label order."""
    gt = tmp_path / "ds" / "labelsTr"
    gt.mkdir(parents=True)
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}))
    pred = tmp_path / "pred"
    for case in ("c1", "c2"):
        write_mask(_labels(), _ref(), gt / f"{case}.nii.gz")
    # c1: perfect; c2: liver shifted one voxel along X (2 mm), spleen missed
    swap = {1: 2, 2: 1}
    c1 = np.vectorize(lambda v: swap.get(v, 0))(_labels()).astype(np.uint8)
    write_mask(c1, _ref(), pred / "c1.nii.gz", {1: "spleen", 2: "liver"})
    c2 = (_labels(liver_start=5, spleen=False) == 1).astype(np.uint8) * 2
    write_mask(c2, _ref(), pred / "c2.nii.gz", {1: "spleen", 2: "liver"})
    return pred, gt


def test_evaluate_folders_per_case_and_mean(pair, tmp_path):
    pred, gt = pair
    out = tmp_path / "metrics.json"
    report = evaluate_folders(pred, gt, out=out, progress=False)
    assert report.structures == ("spleen", "liver")
    assert report.cases["c1"]["liver"] == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}
    c2 = report.cases["c2"]
    assert c2["liver"]["dice"] == pytest.approx(7 / 8)
    assert c2["liver"]["hd95"] == pytest.approx(2.0)
    assert c2["spleen"]["dice"] == 0.0 and np.isnan(c2["spleen"]["hd95"])
    data = json.loads(out.read_text())
    assert data["cases"]["c2"]["spleen"]["hd95"] is None
    assert data["mean"]["liver"]["dice"] == pytest.approx((1 + 7 / 8) / 2)
    assert data["mean"]["spleen"]["hd95"] == 0.0 and data["mean"]["spleen"]["hd95_n"] == 1
    assert data["nsd_tolerance_mm"] == 2.0 and data["n_cases"] == 2
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert {(r["case"], r["structure"]) for r in rows} >= {("c1", "liver"), ("c2", "spleen"), ("mean", "all")}
    assert next(r for r in rows if r["case"] == "c2" and r["structure"] == "spleen")["hd95"] == ""


def test_structures_option_and_unknown_structure(pair):
    pred, gt = pair
    report = evaluate_folders(pred, gt, structures="liver", progress=False)
    assert report.structures == ("liver",)
    with pytest.raises(ConfigError, match="pancreas"):
        evaluate_folders(pred, gt, structures=["pancreas"], progress=False)


def test_missing_case_is_an_error(pair):
    pred, gt = pair
    (pred / "c2.nii.gz").unlink()
    with pytest.raises(InputFileError, match="no prediction for case.*c2"):
        evaluate_folders(pred, gt, progress=False)
    assert evaluate_folders(pred, gt, cases="c1", progress=False).cases.keys() == {"c1"}


def test_geometry_mismatch_is_an_error(pair):
    pred, gt = pair
    write_mask(_labels(), _ref(_affine((1.0, 1.0, 1.0))), pred / "c1.nii.gz", {1: "liver", 2: "spleen"})
    with pytest.raises(InputFileError, match="geometry differs") as err:
        evaluate_folders(pred, gt, progress=False)
    assert "c1.nii.gz" in str(err.value)


def test_per_structure_predictions_and_label_map_file(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_mask(_labels(), _ref(), gt / "c1.nii.gz")
    (tmp_path / "map.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    write_mask((_labels() == 1).astype(np.uint8), _ref(), pred / "c1" / "liver.nii.gz")
    with pytest.raises(InputFileError, match="no label map"):
        evaluate_folders(pred, gt, progress=False)
    report = evaluate_folders(pred, gt, label_map=tmp_path / "map.json", progress=False)
    assert report.structures == ("liver",) and report.cases["c1"]["liver"]["dice"] == 1.0


def test_read_label_map_forms(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"lKid": 3, "background": 0}))
    assert read_label_map(p) == {3: "kidney_left"}
    p.write_text("[1, 2]")
    with pytest.raises(InputFileError, match="m.json"):
        read_label_map(p)


def test_evaluate_cli(pair, tmp_path, capsys):
    pred, gt = pair
    out = tmp_path / "cli" / "metrics.json"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--no-progress"]) == 0
    assert "liver" in capsys.readouterr().out
    assert json.loads(out.read_text())["n_cases"] == 2 and out.with_suffix(".csv").is_file()
    assert main(["evaluate", "--pred", str(tmp_path / "nope"), "--gt", str(gt), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err


def test_prediction_values_absent_from_its_label_map_are_warned_about(pair, caplog):
    import logging

    pred, gt = pair
    odd = _labels()
    odd[0:2, 0:2, 0:2] = 7  # a value the prediction's label map does not have
    write_mask(odd, _ref(), pred / "c1.nii.gz", {1: "liver", 2: "spleen"})
    with caplog.at_level(logging.WARNING):
        evaluate_folders(pred, gt, progress=False)
    assert "c1.nii.gz: label value(s) 7 are not in its label map" in caplog.text
    assert "c2.nii.gz" not in caplog.text
