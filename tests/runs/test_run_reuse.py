"""An adapter run folder is a reusable model: copied anywhere it predicts the same, its base model
is found again (recorded file, the zoo's current file, or --model), and `fseft models --adapters`
lists the runs of a folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tiny_cases import tiny_model, write_tiny_dataset

from fseft.cli import main
from fseft.adaptation.runner import AdaptConfig, adapt
from fseft.errors import InputFileError
from fseft.models.checkpoint import save_model_file

SMALL = dict(patch_size=(16, 16, 16), roi_size=(16, 16, 16), patches_per_volume=2, progress=False, patience=0)
PREDICT = ["--roi-size", "16", "16", "16", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny dataset, a base model file, and an `lp` and an `ft-last` run on it (k = 2)."""
    root = tmp_path_factory.mktemp("reuse")
    data = write_tiny_dataset(root / "data", n_cases=3)
    model = tiny_model()
    base = save_model_file(model, root / "models" / "base.safetensors", preprocess=model.preprocess)
    runs = root / "runs"
    for method, epochs in (("lp", 5), ("ft-last", 1)):
        cfg = AdaptConfig(method=method, epochs=epochs, lr=1e-2, cache_dir=str(root / "cache"), **SMALL)
        adapt(str(base), data, "liver,gallbladder", 2, 0, runs / method / "k2", cfg)
    return root, data, base, runs


def _scan(data: Path) -> Path:
    return data / "imagesTr" / "case02_0000.nii.gz"


def _predict(scan: Path, out: Path | str, run: Path | str, *extra: str) -> int:
    return main(["predict", "-i", str(scan), "-o", str(out), "--adapter", str(run), *PREDICT, *extra])


def _mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _own_run(setup, tmp_path: Path) -> tuple[Path, Path]:
    """An `lp` run of its own on a base file of its own (the one fixture base stays put)."""
    root, data, _, _ = setup
    model = tiny_model()
    base = save_model_file(model, tmp_path / "base" / "base.safetensors", preprocess=model.preprocess)
    cfg = AdaptConfig(method="lp", epochs=2, lr=1e-2, cache_dir=str(root / "cache"), **SMALL)  # cached features
    adapt(str(base), data, "liver,gallbladder", 2, 0, tmp_path / "run", cfg)
    return base, tmp_path / "run"


def _median_probability(run: Path, scan: Path) -> float:
    """The median liver probability of `run` on `scan`: a threshold that makes a mask of some voxels
    but not all (the tiny base model's features barely separate the structures)."""
    from fseft.data.io import read_image
    from fseft.data.preprocessing import preprocess
    from fseft.prediction.segment import InferenceConfig, predict_probabilities
    from fseft.runs.load import load_adapted_model

    adapted = load_adapted_model(run)
    image = preprocess(read_image(scan), None, adapted.preprocess).image[None]
    probabilities = predict_probabilities(adapted, image, InferenceConfig(roi_size=(16, 16, 16), progress=False))
    return float(probabilities[0, 0].median())


@pytest.mark.parametrize("method", ["lp", "ft-last"])
def test_a_run_folder_moved_elsewhere_predicts_the_same_from_any_folder(setup, tmp_path, monkeypatch, method):
    _, data, _, runs = setup
    original = tmp_path / "a" / "run"
    shutil.copytree(runs / method / "k2", original)
    threshold = ["--threshold", f"{_median_probability(original, _scan(data)):.6f}", "--no-lcc"]
    assert _predict(_scan(data), tmp_path / "first.nii.gz", original, *threshold) == 0
    moved = tmp_path / "b" / "moved"
    moved.parent.mkdir()
    shutil.move(original, moved)  # the folder it was written in is gone
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert _predict(_scan(data), "again.nii.gz", "../b/moved", *threshold) == 0
    first, again = _mask(tmp_path / "first.nii.gz"), _mask(tmp_path / "elsewhere" / "again.nii.gz")
    assert 0 < np.count_nonzero(first) < first.size and np.array_equal(first, again)


def test_a_moved_base_file_is_a_clear_error_and_model_points_at_it(setup, tmp_path, capsys):
    _, data, _, _ = setup
    base, run = _own_run(setup, tmp_path)
    assert _predict(_scan(data), tmp_path / "before.nii.gz", run) == 0
    moved = tmp_path / "elsewhere" / "base_v1.safetensors"
    moved.parent.mkdir()
    shutil.move(base, moved)
    capsys.readouterr()
    assert _predict(_scan(data), tmp_path / "out.nii.gz", run) == 2
    err = capsys.readouterr().err
    assert "fseft predict: error:" in err and "Traceback" not in err
    for text in (str(run), str(base), "--model ID|PATH", "fingerprint"):
        assert text in err, err
    assert not (tmp_path / "out.nii.gz").exists()
    assert _predict(_scan(data), tmp_path / "after.nii.gz", run, "--model", str(moved)) == 0
    assert np.array_equal(_mask(tmp_path / "before.nii.gz"), _mask(tmp_path / "after.nii.gz"))


def test_a_base_with_other_weights_is_refused_naming_the_model_and_the_run(setup, tmp_path, capsys):
    from fseft.runs.load import load_adapted_model

    _, data, _, runs = setup
    other = save_model_file(tiny_model(seed=1), tmp_path / "other.safetensors", preprocess=tiny_model().preprocess)
    run = runs / "ft-last" / "k2"
    assert _predict(_scan(data), tmp_path / "out.nii.gz", run, "--model", str(other)) == 2
    err = capsys.readouterr().err
    assert "weights differ" in err and str(other) in err and str(run) in err, err
    with pytest.raises(InputFileError, match="weights differ"):
        load_adapted_model(runs / "lp" / "k2", base=tiny_model(seed=1))
    assert load_adapted_model(runs / "lp" / "k2", base=tiny_model()).class_names == ("liver", "gallbladder")


def test_a_zoo_base_whose_recorded_file_is_gone_is_the_zoos_current_file(setup, tmp_path, monkeypatch, capsys):
    """A run on a zoo id records the id and the file the zoo had; on another machine (or after the
    package moved) the zoo's file for that id is used, checked against the recorded fingerprint."""
    from fseft.runs.format import read_run_record
    from fseft.models import zoo

    root, data, _, _ = setup
    spec = zoo.ModelSpec(model_id="tiny", arch="unet3d", arch_kwargs={"base_channels": 2}, class_names=None,
                         layouts=(), url="(tests)", preprocess=None)
    monkeypatch.setitem(zoo.MODEL_SPECS, "tiny", spec)
    model = tiny_model()
    first, second = tmp_path / "machine1", tmp_path / "machine2"
    save_model_file(model, first / "tiny.safetensors", preprocess=model.preprocess)
    monkeypatch.setenv("FSEFT_WEIGHTS_DIR", str(first))
    cfg = AdaptConfig(method="lp", epochs=2, lr=1e-2, cache_dir=str(root / "cache"), **SMALL)
    adapt("tiny", data, "liver,gallbladder", 2, 0, tmp_path / "run", cfg)
    assert read_run_record(tmp_path / "run")["extra"]["base_model"]["id"] == "tiny"
    assert _predict(_scan(data), tmp_path / "before.nii.gz", tmp_path / "run") == 0

    second.mkdir()
    shutil.move(first / "tiny.safetensors", second / "tiny.safetensors")
    monkeypatch.setenv("FSEFT_WEIGHTS_DIR", str(second))
    assert _predict(_scan(data), tmp_path / "after.nii.gz", tmp_path / "run") == 0
    assert np.array_equal(_mask(tmp_path / "before.nii.gz"), _mask(tmp_path / "after.nii.gz"))

    save_model_file(tiny_model(seed=1), second / "tiny.safetensors", preprocess=model.preprocess)  # other weights
    capsys.readouterr()
    assert _predict(_scan(data), tmp_path / "changed.nii.gz", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "weights differ" in err and "'tiny'" in err and str(second / "tiny.safetensors") in err, err
    (second / "tiny.safetensors").unlink()
    assert _predict(_scan(data), tmp_path / "gone.nii.gz", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert str(first / "tiny.safetensors") in err and str(second / "tiny.safetensors") in err and "--model" in err, err


def test_models_adapters_lists_the_runs_of_a_folder(setup, tmp_path, capsys):
    from fseft.runs.load import list_runs

    _, _, _, runs = setup
    listed = tmp_path / "listed"
    shutil.copytree(runs, listed, ignore=shutil.ignore_patterns("predictions"))
    (listed / "broken").mkdir()
    (listed / "broken" / "adapter_model.safetensors").write_bytes(b"junk")
    (listed / ".lp.partial").mkdir()  # a run still being written
    shutil.copy(listed / "lp" / "k2" / "adapter_model.safetensors", listed / ".lp.partial")
    summaries = list_runs(listed)
    assert [s.folder.as_posix() for s in summaries] == ["broken", "ft-last/k2", "lp/k2"]
    broken, ft_last, lp = summaries
    assert broken.problem and "not a readable safetensors file" in broken.problem
    assert (lp.method, lp.k, lp.structures, lp.base) == ("lp", 2, ("liver", "gallbladder"), "base.safetensors")
    assert ft_last.method == "ft-last" and ft_last.size > lp.size > 0 and 0 <= lp.dice <= 1

    assert main(["models", "--adapters", str(listed)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["lp/k2"][1:5] == ["lp", "liver,gallbladder", "2", "base.safetensors"]
    assert rows["lp/k2"][-1] == f"{lp.dice:.3f}" and rows["ft-last/k2"][1] == "ft-last"
    assert rows["broken"][1] == "UNREADABLE:" and "2 run(s)" in out and "1 unreadable" in out
    (listed / "lp" / "k2" / "metrics.json").unlink()
    assert main(["models", "--adapters", str(listed / "lp")]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[-1] == "—"  # no metrics.json: no Dice


def test_run_listing_names_the_method_as_candidates_do():
    from fseft.runs.load import _method_label

    assert _method_label({"method": "lora", "options": {"decoder": "fine-tuned"}, "extra": {}}) == "lora+dec"
    assert _method_label({"method": "lora", "options": {"decoder": "frozen"}, "extra": {}}) == "lora"
    from fseft.adaptation.method_choice import parse_candidate

    label = _method_label({"method": "lora", "options": {"decoder": "new"}, "extra": {}})
    assert parse_candidate(label).options == {"decoder": "new"}  # a listed label is a valid candidate
    assert _method_label({"method": "spatial-adapter", "options": {}, "extra": {"transductive": {"gamma": 0.3}}}) \
        == "spatial-adapter+ti"
    assert _method_label({"method": "lp", "options": {}, "extra": {"transductive": None}}) == "lp"
