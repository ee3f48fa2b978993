"""Run folders written by earlier fseft versions still load and predict the same.

tests/fixtures/runs_v1 holds runs written before issue 16 unified the run format (see its
make_runs_v1.py): feature runs (``fseft-adapter-v1``: the record in adapter_config.json) and
network runs (``fseft-peft-v1``: the record in the safetensors metadata; peft's own config for
lora), each with the probabilities and the mask that version predicted for scan.nii.gz.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fseft.data.io import read_image
from fseft.data.preprocessing import preprocess
from fseft.prediction.predict import predict_path
from fseft.prediction.segment import InferenceConfig, predict_probabilities

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "runs_v1"
V1_RUNS = sorted(p.name for p in FIXTURES.iterdir() if (p / "adapter_model.safetensors").is_file())
INF = InferenceConfig(roi_size=(16, 16, 16), progress=False)


def relocate_v1(root: Path) -> None:
    """Point every run's recorded base model at `root`/base.safetensors (the runs recorded the
    absolute path they were written with), in the places the v1 formats keep it: the feature
    runs' adapter_config.json, the network runs' safetensors metadata (and the non-peft ones'
    adapter_config.json, a copy of it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base = str(root / "base.safetensors")
    for run in (root / name for name in V1_RUNS):
        config_path, weights_path = run / "adapter_config.json", run / "adapter_model.safetensors"
        config = json.loads(config_path.read_text())
        if config.get("format") == "fseft-adapter-v1":
            config["base_model"]["path"] = base
        elif config.get("format") == "fseft-peft-v1":
            config["extra"]["base_model"]["path"] = base
        config_path.write_text(json.dumps(config, indent=2))
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        if "fseft" in metadata:
            record = json.loads(metadata["fseft"])
            record["extra"]["base_model"]["path"] = base
            metadata["fseft"] = json.dumps(record)
            save_file(load_file(str(weights_path)), str(weights_path), metadata=metadata)


@pytest.fixture(scope="module")
def v1_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs_v1") / "runs_v1"
    shutil.copytree(FIXTURES, root)
    relocate_v1(root)
    return root


def test_the_fixture_holds_both_v1_formats():
    formats = {json.loads((FIXTURES / name / "adapter_config.json").read_text()).get("format") for name in V1_RUNS}
    assert formats == {"fseft-adapter-v1", "fseft-peft-v1", None}  # None: peft's LoraConfig JSON (lora)
    assert len(V1_RUNS) == 5


@pytest.mark.parametrize("name", V1_RUNS)
def test_a_v1_run_loads_and_predicts_what_it_predicted_then(v1_runs, name, tmp_path):
    from fseft.runs.load import load_adapted_model

    run = v1_runs / name
    adapted = load_adapted_model(run)
    assert adapted.class_names == ("liver", "gallbladder")
    pre = preprocess(read_image(v1_runs / "scan.nii.gz"), None, adapted.preprocess)
    probs = predict_probabilities(adapted, pre.image[None], INF)[0].double()
    expected = json.loads((run / "expected.json").read_text())["probability_sums"]
    for i, structure in enumerate(adapted.class_names):
        assert float(probs[i].sum()) == pytest.approx(expected[structure], rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(probs.numpy(), np.load(run / "expected_probabilities.npy").astype(np.float64),
                               atol=1e-3)
    predict_path(v1_runs / "scan.nii.gz", tmp_path / "mask.nii.gz", None, cfg=INF, adapter=run)
    assert np.array_equal(nib.load(tmp_path / "mask.nii.gz").get_fdata(), nib.load(run / "expected.nii.gz").get_fdata())
