"""The Python API (`fseft.api`, docs/python_api.md): cheap `import fseft`, the docs' notebook
example as it is written, `Segmenter.predict` on every kind of input (same masks, the input's
geometry, nothing written, the CLI's file), clear errors, and `fseft.adapt` / `fseft.load_run`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import fseft
from fseft.cli import main
from fseft.data.io import write_image, write_mask
from fseft.data.volume import Volume
from fseft.data.structures import UnknownStructureError
from fseft.errors import ConfigError, InputFileError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "python_api.md"
SMALL = dict(patch_size=(16, 16, 16), roi_size=(16, 16, 16), patches_per_volume=2, progress=False, patience=0)
SHAPE = (20, 18, 16)
# an anisotropic, flipped (LPS-like) grid with an offset: the output must keep it as it is
AFFINE = np.array([[-3.0, 0, 0, 40.0], [0, -2.5, 0, 25.0], [0, 0, 3.5, -60.0], [0, 0, 0, 1]])


def _scan_and_labels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright box body with a 'liver' ball (HU 120) and a small 'gallbladder' ball (-20)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE).astype(np.float32)
    image = np.full(SHAPE, -1000.0, np.float32)
    image[2:-2, 2:-2, 1:-1] = 40.0 + rng.normal(0, 5, (SHAPE[0] - 4, SHAPE[1] - 4, SHAPE[2] - 2))
    labels = np.zeros(SHAPE, np.uint8)
    for value, radius, hu in ((1, 4.0 + seed % 2, 120.0), (2, 2.0, -20.0)):
        centre = np.array(SHAPE) / 2 + rng.integers(-2, 3, 3) + (0 if value == 1 else 5)
        ball = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2
        image[ball] = hu
        labels[ball] = value
    return image.astype(np.int16), labels


def _write_dataset(root: Path, n_cases: int = 3) -> Path:
    for i in range(n_cases):
        image, labels = _scan_and_labels(i)
        vol = Volume(image, AFFINE, f"case{i}")
        write_image(vol, root / "imagesTr" / f"case{i:02d}_0000.nii.gz")
        write_mask(labels, vol, root / "labelsTr" / f"case{i:02d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "gallbladder": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny U-Net model file (liver, spleen), a dataset of three cases on the `AFFINE` grid,
    and the path of one scan."""
    import torch

    from fseft.models.checkpoint import save_model_file
    from fseft.models.zoo import create_model

    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    model = create_model("unet3d", ["liver", "spleen"], base_channels=2).eval()
    preprocess = {"spacing": [3.0, 3.0, 3.0], "crop_foreground": False}
    path = save_model_file(model, root / "model" / "tiny.safetensors", preprocess=preprocess)
    data = _write_dataset(root / "data")
    return path, data, data / "imagesTr" / "case02_0000.nii.gz"


PREDICT = dict(roi_size=16, threshold=0.5, largest_component=False)


def _threshold(segmenter, scan) -> float:
    """A threshold that makes a liver mask of some voxels but not all (random tiny weights)."""
    from fseft.data.io import read_image
    from fseft.data.preprocessing import preprocess
    from fseft.prediction.segment import InferenceConfig, predict_probabilities

    image = preprocess(read_image(scan), None, segmenter.preprocess).image[None]
    probabilities = predict_probabilities(segmenter.network, image, InferenceConfig(roi_size=(16,) * 3, progress=False))
    return float(probabilities[0, 0].median())


@pytest.fixture()
def quiet_dirs(tmp_path, monkeypatch):
    """An empty working directory and an empty temporary folder, to check nothing is written."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return cwd, tmp


# ---------------------------------------------------------------------------- the package


def test_import_fseft_is_cheap_and_the_api_loads_on_first_use():
    code = ("import sys, fseft; cheap = 'torch' not in sys.modules; "
            "print(cheap, fseft.adapt, fseft.load_run, fseft.load_model, fseft.Segmenter, fseft.methods.LoraConfig)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("True <function adapt"), res.stdout
    assert "load_run" in res.stdout and "load_model" in res.stdout and "LoraMethodConfig" in res.stdout
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fseft.nope  # noqa: B018


def test_the_method_configs_are_exported_one_per_method():
    from fseft.api import method_options
    from fseft.methods import available_methods, get_method

    for name in available_methods():
        cls = get_method(name).config_cls
        exported = "LoraConfig" if cls.__name__ == "LoraMethodConfig" else cls.__name__
        assert getattr(fseft.methods, exported) is cls, name
    assert method_options(fseft.methods.LoraConfig(rank=8, decoder="fine-tuned")) == (
        "lora", {"rank": 8, "decoder": "fine-tuned"})
    assert method_options("spatial-adapter") == ("spatial-adapter", {})
    assert method_options(fseft.methods.LinearProbeConfig()) == ("lp", {})


# ---------------------------------------------------------------------------- the docs' example


def _example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, f"no python code block in {DOCS}"
    return blocks[0]


def test_the_docs_notebook_example_runs(quiet_dirs, monkeypatch, capsys):
    """docs/python_api.md's example, as written: the embedded model, phantom data, k = 1, one
    scan predicted in memory; its Dice is the run's query Dice (lp: the same computation)."""
    _, tmp = quiet_dirs
    monkeypatch.setenv("FSEFT_CACHE_DIR", str(tmp / "cache"))
    exec(compile(_example_code(), str(DOCS), "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    run_dice = float(re.search(r"mean query Dice of the run: ([0-9.]+)", out).group(1))
    predicted = float(re.search(r"liver Dice ([0-9.]+)", out).group(1))
    assert run_dice > 0.8 and predicted > 0.8, out
    assert predicted == pytest.approx(run_dice, abs=2e-3), out
    example = [p for p in tmp.iterdir() if p.name.startswith("fseft-example-")]
    assert len(example) == 1 and sorted(p.name for p in example[0].iterdir()) == ["cache", "target"]
    assert not [p for p in tmp.iterdir() if p.name.startswith("fseft-adapt-")]  # no run folder left


# ---------------------------------------------------------------------------- predict


def test_predict_takes_a_path_a_nibabel_image_an_array_pair_or_a_volume_and_writes_nothing(tiny, quiet_dirs):
    model_path, data, scan = tiny
    cwd, tmp = quiet_dirs
    before = sorted(p.name for p in data.rglob("*"))
    segmenter = fseft.load_model(model_path)
    assert segmenter.structures == ("liver", "spleen") and not segmenter.adapted
    options = {**PREDICT, "threshold": _threshold(segmenter, scan)}
    image = nib.load(scan)
    array = np.asarray(image.dataobj)
    results = {
        "path": segmenter.predict(scan, **options),
        "str": segmenter.predict(str(scan), **options),
        "nibabel": segmenter.predict(image, **options),
        "in-memory nibabel": segmenter.predict(nib.Nifti1Image(array, image.affine), **options),
        "array": segmenter.predict((array, image.affine), **options),
        "float array": segmenter.predict((array.astype(np.float64), image.affine.tolist()), **options),
        "volume": segmenter.predict(Volume(array, image.affine, "v"), **options),
    }
    reference = results["path"]
    assert reference.masks.shape == (2, *SHAPE) and reference.masks.dtype == np.uint8
    assert 0 < reference.masks[0].sum() < reference.masks[0].size  # some voxels, not all
    for kind, seg in results.items():
        assert seg.shape == image.shape, kind
        np.testing.assert_array_equal(seg.affine, image.affine, err_msg=kind)
        np.testing.assert_array_equal(seg.masks, reference.masks, err_msg=kind)
        assert seg.structures == ("liver", "spleen") and seg.label_map == {1: "liver", 2: "spleen"}
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []
    assert sorted(p.name for p in data.rglob("*")) == before


def test_predict_keeps_the_input_grid_whatever_its_voxel_order(tiny):
    """The same scan stored with its x axis reversed (the affine says so): the same world-space
    segmentation, so the masks are those of the original reversed along x."""
    model_path, _, scan = tiny
    segmenter = fseft.load_model(model_path)
    options = {**PREDICT, "threshold": _threshold(segmenter, scan)}
    image = nib.load(scan)
    array, affine = np.asarray(image.dataobj), image.affine
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, array.shape[0] - 1
    flipped = segmenter.predict((array[::-1], affine @ flip), **options)
    original = segmenter.predict((array, affine), **options)
    np.testing.assert_array_equal(flipped.affine, affine @ flip)
    np.testing.assert_array_equal(flipped.masks, original.masks[:, ::-1])


def test_predict_gives_the_file_fseft_predict_writes(tiny, tmp_path):
    model_path, _, scan = tiny
    segmenter = fseft.load_model(model_path)
    threshold = _threshold(segmenter, scan)
    seg = segmenter.predict(scan, structures="spleen,liver", **{**PREDICT, "threshold": threshold})
    assert seg.structures == ("spleen", "liver")
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "-i", str(scan), "-o", str(out), "--model", str(model_path), "--structures", "spleen,liver",
                 "--roi-size", "16", "16", "16", "--threshold", f"{threshold!r}", "--no-lcc", "--no-progress"]) == 0
    written = nib.load(out)
    np.testing.assert_array_equal(np.asarray(written.dataobj), seg.labels)
    np.testing.assert_array_equal(seg.mask("Liver"), seg.masks[1])
    image = seg.to_nifti()
    assert image.get_data_dtype() == written.get_data_dtype()
    np.testing.assert_array_equal(image.affine, written.affine)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(written.dataobj))
    assert json.loads((tmp_path / "seg.json").read_text()) == {str(k): v for k, v in seg.label_map.items()}
    with pytest.raises(UnknownStructureError, match="spleen, liver"):
        seg.mask("pancreas")


@pytest.mark.parametrize(("image", "error", "message"), [
    (np.zeros(SHAPE), TypeError, r"alone has no geometry: give \(array, affine\)"),
    ((np.zeros(SHAPE), None), TypeError, "the affine is None"),
    ((np.zeros((20, 18)), np.eye(4)), InputFileError, "2D array of shape"),
    ((np.zeros((4, 4, 4, 2)), np.eye(4)), InputFileError, "4D image with 2 volumes"),
    ((np.full(SHAPE, np.nan), np.eye(4)), InputFileError, "NaN or infinite"),
    ((np.zeros(SHAPE), np.zeros((4, 4))), InputFileError, "invalid voxel-to-world affine"),
    ((np.zeros(SHAPE), np.eye(3)), InputFileError, "invalid voxel-to-world affine"),
    ((np.zeros(SHAPE, dtype=complex), np.eye(4)), InputFileError, "not a real number type"),
    ((np.array([["a"]]), np.eye(4)), InputFileError, "2D array"),
    ("no/such/scan.nii.gz", InputFileError, "no such file"),
    ([1, 2, 3], TypeError, "cannot segment a list; give a path"),
])
def test_predict_refuses_bad_input_naming_the_problem(tiny, image, error, message):
    segmenter = fseft.load_model(tiny[0])
    with pytest.raises(error, match=message):
        segmenter.predict(image)


def test_predict_refuses_an_unknown_structure_and_bad_options(tiny):
    model_path, _, scan = tiny
    segmenter = fseft.load_model(model_path)
    with pytest.raises(UnknownStructureError, match="its classes are: liver, spleen"):
        segmenter.predict(scan, structures="pancreas")
    with pytest.raises(ConfigError, match="threshold must be in"):
        segmenter.predict(scan, threshold=1.5)
    with pytest.raises(ConfigError, match="series_id picks a DICOM series"):
        segmenter.predict((np.zeros(SHAPE), np.eye(4)), series_id="1.2.3")


# ---------------------------------------------------------------------------- adapt, load_run


def test_adapt_in_memory_and_into_a_run_folder_give_the_same_model(tiny, tmp_path, monkeypatch):
    model_path, data, scan = tiny
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cache = str(tmp_path / "cache")
    base = fseft.load_model(model_path)
    in_memory = fseft.adapt(base, data, "liver,gallbladder", 2, method=fseft.methods.LinearProbeConfig(), seed=0,
                            epochs=5, lr=1e-2, cache_dir=cache, **SMALL)
    assert in_memory.run_dir is None and in_memory.source is None and in_memory.adapted
    assert in_memory.structures == ("liver", "gallbladder")
    assert set(in_memory.metrics) >= {"queries", "mean", "trainable_params"} and in_memory.metrics["k"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("fseft-adapt-")]  # its folder removed

    out = tmp_path / "runs" / "lp"
    kept = fseft.adapt(str(model_path), data, "liver,gallbladder", 2, method="lp", seed=0, out=out,
                       epochs=5, lr=1e-2, cache_dir=cache, **SMALL)
    assert kept.run_dir == out and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["queries"] == in_memory.metrics["queries"]
    record = json.loads((out / "adapter_config.json").read_text())
    assert record["extra"]["base_model"]["path"] == str(Path(model_path).resolve())
    with pytest.raises(ConfigError, match="already holds a run"):
        fseft.adapt(str(model_path), data, "liver", 2, out=out, epochs=1, cache_dir=cache, **SMALL)

    loaded = fseft.load_run(out)
    assert loaded.metrics == json.loads((out / "metrics.json").read_text())
    options = {**PREDICT, "threshold": _threshold(loaded, scan)}
    a, b, c = (m.predict(scan, **options) for m in (in_memory, kept, loaded))
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.masks, c.masks)
    cli = tmp_path / "cli.nii.gz"
    assert main(["predict", "-i", str(scan), "-o", str(cli), "--adapter", str(out), "--roi-size", "16", "16", "16",
                 "--threshold", f"{options['threshold']!r}", "--no-lcc", "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(cli).dataobj), c.labels)
    with pytest.raises(ConfigError, match="already adapted"):
        fseft.adapt(loaded, data, "liver", 2)
    with pytest.raises(ConfigError, match="is an adapted model"):
        fseft.load_run(out, base=loaded)


def test_adapt_refuses_misplaced_and_unknown_options_before_any_work(tiny, tmp_path):
    model_path, data, _ = tiny
    with pytest.raises(TypeError, match=r"rank: option\(s\) of method 'lora'.*fseft.methods.LoraConfig\(rank=8\)"):
        fseft.adapt(str(model_path), data, "liver", 1, method="lora", rank=8)
    with pytest.raises(TypeError, match="unexpected option.*epoch[^s]"):
        fseft.adapt(str(model_path), data, "liver", 1, epoch=3)
    with pytest.raises(TypeError, match=r"method=LoraConfig: give an instance, LoraConfig\(\)"):
        fseft.adapt(str(model_path), data, "liver", 1, method=fseft.methods.LoraConfig)
    with pytest.raises(ConfigError, match="unknown adaptation method 'lorra'"):
        fseft.adapt(str(model_path), data, "liver", 1, method="lorra")
    with pytest.raises(ConfigError, match="save_predictions writes"):
        fseft.adapt(str(model_path), data, "liver", 1, save_predictions=True)
    with pytest.raises(TypeError, match="model must be a zoo id"):
        fseft.adapt(object(), data, "liver", 1)
    assert not os.listdir(tmp_path)
