"""A catalogue of bad inputs, one per row, run through the CLI as a user would.

Every row must end in exit status 2 with an `fseft <command>: error:` message, no traceback,
the offending file, folder or option named, and nothing written where the output would go.
The classes (README, "Bad input"): missing / unreadable / corrupt files, images that are not
one finite 3D volume, labels that do not fit their scan, DICOM series that are incomplete or
ambiguous, unknown names (models, structures, methods, config keys), numbers out of range,
devices that are not there, outputs that cannot be made or would mix with an earlier run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dicom_series import write_ct_series, write_dicom_series
from fseft.cli import main


@dataclass
class Workspace:
    """Shared inputs (made once) and this row's own folder."""

    data: Path  # a sound 4-case target-domain phantom dataset
    scan: Path  # one of its scans
    tmp: Path  # this row's folder
    run: Path  # an `lp` run on a small base model file that was moved away since (`moved_base`)
    moved_base: Path

    def dataset_copy(self, name: str = "data") -> Path:
        out = self.tmp / name
        shutil.copytree(self.data, out)
        return out

    def nifti(self, name: str, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
        path = self.tmp / name
        nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
        return path


def _small_model(seed: int = 0) -> torch.nn.Module:
    from fseft.models.zoo import create_model

    torch.manual_seed(seed)
    model = create_model("unet3d", ["liver", "spleen"], base_channels=2)
    model.preprocess = {"spacing": [4.0, 4.0, 4.0]}
    return model


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    from fseft.data.phantom import write_phantom_dataset
    from fseft.adaptation import AdaptConfig, adapt
    from fseft.models.checkpoint import save_model_file

    root = tmp_path_factory.mktemp("bad_inputs")
    data = write_phantom_dataset(root / "data", 4, "target", seed=5, progress=False)
    model = _small_model()
    base = save_model_file(model, root / "base.safetensors", preprocess=model.preprocess)
    cfg = AdaptConfig(method="lp", epochs=1, patch_size=(32, 32, 32), roi_size=(32, 32, 32), n_query=1,
                      cache_dir=str(root / "cache"), progress=False)
    adapt(str(base), data, "liver", 1, 0, root / "run", cfg)
    (root / "moved").mkdir()
    moved = base.rename(root / "moved" / "base.safetensors")  # the run's recorded base is gone
    return data, sorted((data / "imagesTr").iterdir())[0], root / "run", moved


def _label_of(data: Path, case: str = "phantom_003") -> Path:
    return data / "labelsTr" / f"{case}.nii.gz"


def _image_of(data: Path, case: str = "phantom_003") -> Path:
    return data / "imagesTr" / f"{case}_0000.nii.gz"


def _adapt(data: Path, out: Path, *extra: str, **options: str) -> list[str]:
    """A sound `fseft adapt` command line, with `options` (``k="0"``) replacing its values."""
    argv = ["adapt", "--model", "phantom", "--data", str(data), "--structures", "liver", "--k", "2",
            "--method", "lp", "--epochs", "1", "--out", str(out), "--no-progress", *extra]
    for name, value in options.items():
        argv[argv.index(f"--{name}") + 1] = value
    return argv


def _predict(scan: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--model", "phantom", "-i", str(scan), "-o", str(out), "--no-progress", *extra]


# -- rows: each returns (argv, what the message must name, the output location to check)

Row = Callable[[Workspace], tuple[list[str], list[str], Path]]


def predict_missing_scan(ws):
    scan = ws.tmp / "nope.nii.gz"
    return _predict(scan, ws.tmp / "out"), [str(scan), "no such file"], ws.tmp / "out"


def predict_unsupported_file(ws):
    scan = ws.tmp / "scan.png"
    scan.write_bytes(b"\x89PNG")
    return _predict(scan, ws.tmp / "out"), [str(scan), "unsupported file type"], ws.tmp / "out"


def predict_truncated_nifti(ws):
    scan = ws.tmp / "cut.nii.gz"
    scan.write_bytes(ws.scan.read_bytes()[:4000])
    return _predict(scan, ws.tmp / "out"), [str(scan)], ws.tmp / "out"


def predict_2d_image(ws):
    scan = ws.nifti("flat.nii.gz", np.zeros((32, 32), np.int16))
    return _predict(scan, ws.tmp / "out"), [str(scan), "expected a 3D volume"], ws.tmp / "out"


def predict_4d_image(ws):
    scan = ws.nifti("series.nii.gz", np.zeros((16, 16, 16, 3), np.int16))
    return _predict(scan, ws.tmp / "out"), [str(scan), "4D image"], ws.tmp / "out"


def predict_nan_image(ws):
    array = np.full((16, 16, 16), -1000.0, np.float32)
    array[3, 4, 5] = np.nan
    scan = ws.nifti("nan.nii.gz", array)
    return _predict(scan, ws.tmp / "out"), [str(scan), "NaN"], ws.tmp / "out"


def _ct_block() -> np.ndarray:
    hu = np.full((8, 12, 10), -900.0)
    hu[2:6, 4:8, 3:7] = 50.0
    return hu


def predict_dicom_missing_slice(ws):
    folder = ws.tmp / "series"
    write_dicom_series(folder, _ct_block(), "1.2.826.0.1.3680043.9.1", skip=(3,))
    return _predict(folder, ws.tmp / "out"), [str(folder), "slice002.dcm and slice004.dcm", "missing"], ws.tmp / "out"


def predict_dicom_two_series(ws):
    folder = ws.tmp / "series"
    write_dicom_series(folder, _ct_block(), "1.2.826.0.1.3680043.9.2", prefix="a")
    write_dicom_series(folder, _ct_block(), "1.2.826.0.1.3680043.9.3", prefix="b")
    return _predict(folder, ws.tmp / "out"), [str(folder), "2 DICOM series", "--series-id"], ws.tmp / "out"


def predict_dicom_unknown_series_id(ws):
    folder = ws.tmp / "series"
    write_dicom_series(folder, _ct_block(), "1.2.826.0.1.3680043.9.4")
    argv = _predict(folder, ws.tmp / "out", "--series-id", "1.2.3")
    return argv, [str(folder), "no DICOM series '1.2.3'"], ws.tmp / "out"


def predict_dicom_seg_of_a_nifti_scan(ws):
    argv = _predict(ws.scan, ws.tmp / "out", "--output-type", "dicom-seg")
    return argv, [str(ws.scan), "not a DICOM series", "--output-type nifti"], ws.tmp / "out"


def predict_dicom_seg_of_a_series_without_uids(ws):
    import pydicom

    files = write_ct_series(ws.tmp / "series", _ct_block())
    header = pydicom.dcmread(files[2])
    header.SOPInstanceUID = ""  # as an anonymiser that drops UIDs leaves it
    header.save_as(files[2])
    argv = _predict(ws.tmp / "series", ws.tmp / "out", "--output-type", "dicom-seg")
    return argv, [str(files[2]), "SOPInstanceUID", "--output-type nifti"], ws.tmp / "out"


def predict_empty_folder(ws):
    folder = ws.tmp / "empty"
    folder.mkdir()
    return _predict(folder, ws.tmp / "out"), [str(folder), "no readable scans"], ws.tmp / "out"


def predict_unknown_model(ws):
    argv = ["predict", "--model", "phantomm", "-i", str(ws.scan), "-o", str(ws.tmp / "out")]
    return argv, ["phantomm"], ws.tmp / "out"


def predict_junk_model_file(ws):
    junk = ws.tmp / "model.safetensors"
    junk.write_bytes(b"not a model at all" * 10)
    argv = ["predict", "--model", str(junk), "-i", str(ws.scan), "-o", str(ws.tmp / "out")]
    return argv, [str(junk)], ws.tmp / "out"


def predict_window_the_model_cannot_take(ws):
    argv = _predict(ws.scan, ws.tmp / "out", "--roi-size", "50", "50", "50")
    return argv, ["--roi-size", "50"], ws.tmp / "out"


def predict_misspelt_structure(ws):
    return _predict(ws.scan, ws.tmp / "out", "--structures", "livr"), ["livr", "did you mean", "liver"], ws.tmp / "out"


def predict_cuda_without_cuda(ws):
    return _predict(ws.scan, ws.tmp / "out", "--device", "cuda"), ["cuda", "not available"], ws.tmp / "out"


def predict_adapter_that_is_not_a_run(ws):
    folder = ws.tmp / "not_a_run"
    folder.mkdir()
    argv = ["predict", "--adapter", str(folder), "-i", str(ws.scan), "-o", str(ws.tmp / "out")]
    return argv, [str(folder)], ws.tmp / "out"


def predict_adapter_whose_base_file_is_gone(ws):
    argv = ["predict", "--adapter", str(ws.run), "-i", str(ws.scan), "-o", str(ws.tmp / "out")]
    gone = ws.moved_base.parent.parent / "base.safetensors"
    return argv, [str(ws.run), str(gone), "not there", "--model ID|PATH"], ws.tmp / "out"


def predict_adapter_on_a_model_with_other_weights(ws):
    from fseft.models.checkpoint import save_model_file

    other = save_model_file(_small_model(seed=1), ws.tmp / "other.safetensors")
    argv = ["predict", "--adapter", str(ws.run), "--model", str(other), "-i", str(ws.scan), "-o", str(ws.tmp / "out")]
    return argv, [str(other), str(ws.run), "weights differ"], ws.tmp / "out"


def adapt_missing_dataset(ws):
    data = ws.tmp / "no_data"
    return _adapt(data, ws.tmp / "run"), [str(data)], ws.tmp / "run"


def adapt_folder_of_no_layout(ws):
    data = ws.tmp / "photos"
    data.mkdir()
    (data / "a.txt").write_text("x")
    return _adapt(data, ws.tmp / "run"), [str(data), "layout"], ws.tmp / "run"


def adapt_malformed_dataset_json(ws):
    data = ws.dataset_copy()
    (data / "dataset.json").write_text("{ labels: ")
    return _adapt(data, ws.tmp / "run"), [str(data / "dataset.json")], ws.tmp / "run"


def adapt_truncated_query_image(ws):
    data = ws.dataset_copy()
    image = _image_of(data)
    image.write_bytes(image.read_bytes()[:20000])
    # k = 2 of 4 cases with 2 queries: every case is read, phantom_003 is support or query
    return _adapt(data, ws.tmp / "run"), [str(image), "phantom_003"], ws.tmp / "run"


def adapt_label_of_another_shape(ws):
    data = ws.dataset_copy()
    label = _label_of(data)
    img = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), str(label))
    return _adapt(data, ws.tmp / "run"), [str(label), "shape"], ws.tmp / "run"


def adapt_label_moved_in_space(ws):
    data = ws.dataset_copy()
    label = _label_of(data)
    img = nib.load(str(label))
    affine = img.affine.copy()
    affine[2, 3] += 30.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(label))
    return _adapt(data, ws.tmp / "run"), [str(label), "30 mm apart"], ws.tmp / "run"


def adapt_label_with_nan(ws):
    data = ws.dataset_copy()
    label = _label_of(data)
    img = nib.load(str(label))
    array = np.asarray(img.dataobj).astype(np.float32)
    array[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(array, img.affine), str(label))
    return _adapt(data, ws.tmp / "run"), [str(label), "non-integer"], ws.tmp / "run"


def adapt_label_values_the_map_lacks(ws):
    data = ws.dataset_copy()
    label = _label_of(data)
    img = nib.load(str(label))
    array = np.asarray(img.dataobj).copy()
    array[0, 0, 0] = 77
    nib.save(nib.Nifti1Image(array, img.affine), str(label))
    return _adapt(data, ws.tmp / "run"), [str(label), "77", "not in the label map"], ws.tmp / "run"


def adapt_k_zero(ws):
    return _adapt(ws.data, ws.tmp / "run", k="0"), ["k"], ws.tmp / "run"


def adapt_k_larger_than_the_dataset(ws):
    return _adapt(ws.data, ws.tmp / "run", k="9"), ["k=9"], ws.tmp / "run"


def adapt_overflowing_lr(ws):
    return _adapt(ws.data, ws.tmp / "run", "--lr", "1e40"), ["lr", "1e+40"], ws.tmp / "run"


def adapt_unknown_structure(ws):
    return _adapt(ws.data, ws.tmp / "run", structures="gallbladdr"), ["gallbladdr", "gallbladder"], ws.tmp / "run"


def adapt_unknown_method(ws):
    return _adapt(ws.data, ws.tmp / "run", method="lora2"), ["lora2"], ws.tmp / "run"


def adapt_cuda_without_cuda(ws):
    return _adapt(ws.data, ws.tmp / "run", "--device", "cuda"), ["cuda", "not available"], ws.tmp / "run"


def adapt_into_an_earlier_run(ws):
    run = ws.tmp / "run"
    (run / "predictions").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    return _adapt(ws.data, run), [str(run), "--overwrite"], run


def adapt_auto_unknown_candidate(ws):
    return (_adapt(ws.data, ws.tmp / "run", "--candidates", "lp,lorra", method="auto"),
            ["--candidates", "lorra", "did you mean 'lora'"], ws.tmp / "run")


def adapt_auto_at_k1_without_a_candidate_for_its_rule(ws):
    argv = _adapt(ws.data, ws.tmp / "run", "--candidates", "lp,spatial-adapter", method="auto", k="1",
                  structures="gallbladder")
    return argv, ["k = 1", "gallbladder", "lora+dec"], ws.tmp / "run"


def evaluate_missing_predictions(ws):
    pred = ws.tmp / "pred"
    argv = ["evaluate", "--pred", str(pred), "--gt", str(ws.data), "--out", str(ws.tmp / "m.json")]
    return argv, [str(pred)], ws.tmp / "m.json"


def evaluate_negative_tolerance(ws):
    argv = ["evaluate", "--pred", str(ws.data / "labelsTr"), "--gt", str(ws.data), "--tolerance", "-1",
            "--out", str(ws.tmp / "m.json")]
    return argv, ["tolerance", "-1"], ws.tmp / "m.json"


def evaluate_prediction_in_another_geometry(ws):
    pred = ws.tmp / "pred"
    pred.mkdir()
    label = _label_of(ws.data)
    img = nib.load(str(label))
    affine = img.affine.copy()
    affine[0, 3] += 12.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(pred / "phantom_003.nii.gz"))
    labels = json.loads((ws.data / "dataset.json").read_text())["labels"]
    (pred / "phantom_003.json").write_text(json.dumps({str(v): n for n, v in labels.items() if v}))
    argv = ["evaluate", "--pred", str(pred), "--gt", str(ws.data), "--structures", "liver",
            "--cases", "phantom_003", "--out", str(ws.tmp / "m.json"), "--no-progress"]
    return argv, [str(pred / "phantom_003.nii.gz"), "12 mm apart"], ws.tmp / "m.json"


def evaluate_corrupt_label_map(ws):
    pred = ws.tmp / "pred"
    pred.mkdir()
    shutil.copy(_label_of(ws.data), pred / "phantom_003.nii.gz")
    (pred / "phantom_003.json").write_text("{not json")
    argv = ["evaluate", "--pred", str(pred), "--gt", str(ws.data), "--out", str(ws.tmp / "m.json")]
    return argv, [str(pred / "phantom_003.json")], ws.tmp / "m.json"


def benchmark_missing_config(ws):
    config = ws.tmp / "exp.yaml"
    return ["benchmark", "--config", str(config), "--out", str(ws.tmp / "bench")], [str(config)], ws.tmp / "bench"


def benchmark_misspelt_key(ws):
    config = ws.tmp / "exp.yaml"
    config.write_text(f"model: phantom\ndata: {ws.data}\nstructures: [liver]\nk: [1]\nseeds: [0]\nmethodz: [lp]\n")
    argv = ["benchmark", "--config", str(config), "--out", str(ws.tmp / "bench")]
    return argv, [str(config), "methodz", "methods"], ws.tmp / "bench"


def pretrain_patch_the_architecture_cannot_take(ws):
    config = ws.tmp / "assembly.yaml"
    config.write_text(f"datasets:\n  - path: {ws.data}\nmodel: {{arch: swin_unetr, arch_kwargs: {{feature_size: 12}}}}\n"
                      "train: {epochs: 1, patch_size: [32, 32, 32]}\n")
    argv = ["pretrain", "--config", str(config), "--out", str(ws.tmp / "pre"), "--no-progress"]
    return argv, ["32"], ws.tmp / "pre"


def pretrain_missing_dataset(ws):
    config = ws.tmp / "assembly.yaml"
    config.write_text(f"datasets:\n  - path: {ws.tmp / 'gone'}\n")
    argv = ["pretrain", "--config", str(config), "--out", str(ws.tmp / "pre"), "--no-progress"]
    return argv, [str(ws.tmp / "gone")], ws.tmp / "pre"


def phantom_zero_cases(ws):
    return ["phantom", "--cases", "0", "--out", str(ws.tmp / "ph")], ["cases"], ws.tmp / "ph"


def phantom_into_a_full_folder(ws):
    out = ws.tmp / "ph"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    return ["phantom", "--cases", "1", "--out", str(out), "--no-progress"], [str(out), "--overwrite"], out


def inspect_check_finds_a_truncated_scan(ws):
    data = ws.dataset_copy()
    image = _image_of(data, "phantom_001")
    image.write_bytes(image.read_bytes()[:20000])
    return ["datasets", "inspect", str(data), "--check", "--no-progress"], [str(image)], ws.tmp / "nothing"


def inspect_missing_folder(ws):
    folder = ws.tmp / "gone"
    return ["datasets", "inspect", str(folder)], [str(folder)], ws.tmp / "nothing"


def models_adapters_of_a_missing_folder(ws):
    folder = ws.tmp / "gone"
    return ["models", "--adapters", str(folder)], [str(folder), "no such folder"], ws.tmp / "nothing"


ROWS: list[Row] = [
    predict_missing_scan, predict_unsupported_file, predict_truncated_nifti, predict_2d_image, predict_4d_image,
    predict_nan_image, predict_dicom_missing_slice, predict_dicom_two_series, predict_dicom_unknown_series_id,
    predict_dicom_seg_of_a_nifti_scan, predict_dicom_seg_of_a_series_without_uids,
    predict_empty_folder, predict_unknown_model, predict_junk_model_file, predict_window_the_model_cannot_take,
    predict_misspelt_structure, predict_cuda_without_cuda, predict_adapter_that_is_not_a_run,
    predict_adapter_whose_base_file_is_gone, predict_adapter_on_a_model_with_other_weights,
    adapt_missing_dataset, adapt_folder_of_no_layout, adapt_malformed_dataset_json, adapt_truncated_query_image,
    adapt_label_of_another_shape, adapt_label_moved_in_space, adapt_label_with_nan, adapt_label_values_the_map_lacks,
    adapt_k_zero, adapt_k_larger_than_the_dataset, adapt_overflowing_lr, adapt_unknown_structure,
    adapt_unknown_method, adapt_cuda_without_cuda, adapt_into_an_earlier_run, adapt_auto_unknown_candidate,
    adapt_auto_at_k1_without_a_candidate_for_its_rule,
    evaluate_missing_predictions, evaluate_negative_tolerance, evaluate_prediction_in_another_geometry,
    evaluate_corrupt_label_map, benchmark_missing_config, benchmark_misspelt_key,
    pretrain_patch_the_architecture_cannot_take, pretrain_missing_dataset, phantom_zero_cases,
    phantom_into_a_full_folder, inspect_check_finds_a_truncated_scan, inspect_missing_folder,
    models_adapters_of_a_missing_folder,
]


def _snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def test_the_catalogue_covers_thirty_bad_inputs_across_the_commands():
    commands = {row.__name__.split("_")[0] for row in ROWS}
    assert len(ROWS) >= 30 and commands >= {"predict", "adapt", "evaluate", "benchmark", "pretrain", "phantom", "inspect"}


@pytest.mark.parametrize("row", ROWS, ids=[row.__name__ for row in ROWS])
def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(row, shared, tmp_path, capsys, monkeypatch):
    if "cuda" in row.__name__ and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("FSEFT_CACHE_DIR", str(tmp_path / "cache"))
    data, scan, run, moved_base = shared
    ws = Workspace(data=data, scan=scan, tmp=tmp_path / "ws", run=run, moved_base=moved_base)
    ws.tmp.mkdir()
    argv, named, out = row(ws)
    before = _snapshot(out)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"fseft {argv[0]}: error:" in err and "Traceback" not in err, err
    for text in named:
        assert text in err, f"{text!r} not in: {err}"
    assert _snapshot(out) == before, f"{out} changed"
    # no temporary or partial output beside it either
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
