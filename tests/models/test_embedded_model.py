"""The embedded phantom foundation model shipped in the package (`fseft models`: id `phantom`)."""

from pathlib import Path

import numpy as np
import pytest

import fseft
from fseft.data.phantom import generate_case
from fseft.data.phantom_anatomy import PHANTOM_LABELS
from fseft.data.preprocessing import PreprocessConfig
from fseft.evaluation.metrics import dice
from fseft.models.checkpoint import read_model_file_config
from fseft.models.zoo import load_model
from fseft.prediction.segment import InferenceConfig, segment_volume

WEIGHTS = Path(fseft.__file__).parent / "weights" / "phantom_swinunetr.safetensors"


def test_shipped_file_is_small_and_describes_its_training():
    assert WEIGHTS.stat().st_size <= 20 * 2**20
    config = read_model_file_config(WEIGHTS)
    assert config["arch"] == "swin_unetr"
    assert "gallbladder" not in config["class_names"]  # held out: the novel structure
    assert config["preprocess"]["spacing"] == [3.0, 3.0, 3.0]
    assert config["extra"]["inference"]["roi_size"] == [64, 64, 64]  # its training patch: the default window
    # v6: v5 continued on the v3 phantom sources and CT painted from two real patients' label maps
    pretrain = config["extra"]["pretrain"]
    assert [(d["name"], d["cases"]) for d in pretrain["datasets"]] == [
        ("A24", 24), ("B24", 24), ("C24", 24), ("painted_s0009", 96), ("painted_dicom", 48)]
    assert pretrain["init"] == "phantom_swinunetr.safetensors" and pretrain["epochs"] == 30
    # the post-processing chosen on the validation set: one choice per single-part structure
    choice = config["extra"]["postprocess"]["largest_component"]
    assert set(choice) == set(config["class_names"]) - {"vertebrae"}


# v6 (as v5) on held-out phantoms (6 cases each, docs/embedded_model.md): source Dice 0.75 (pancreas) to 0.95 (liver),
# target 0.15 (IVC) to 0.95. This test scores one case, on which the pancreas gets 0.56 (source)
# and the others 0.86-0.96; the floors leave room for that one case's variation.
SOURCE_FLOOR = {"pancreas": 0.45}
SOURCE_FLOOR_DEFAULT = 0.75


def _dice_per_structure(model, preprocess, domain: str) -> dict[str, float]:
    # stream 7: never drawn for the pre-training sources (or the validation set)
    case = generate_case(domain=domain, seed=7, case_index=0, stream=7)
    names = list(model.class_names)
    masks = segment_volume(model, case.image, preprocess, InferenceConfig(progress=False), names)
    assert masks.shape[1:] == case.labels.array.shape
    return {n: dice(masks[i].astype(bool), case.labels.array == PHANTOM_LABELS[n]) for i, n in enumerate(names)}


@pytest.mark.slow
def test_embedded_model_segments_every_structure_of_unseen_phantoms():
    model = load_model("phantom")
    assert isinstance(model.preprocess, (dict, PreprocessConfig))
    preprocess = model.preprocess if isinstance(model.preprocess, PreprocessConfig) else PreprocessConfig.from_dict(model.preprocess)
    assert set(model.class_names) == {"liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "aorta",
                                      "inferior_vena_cava", "vertebrae"}
    source = _dice_per_structure(model, preprocess, "source")
    low = {n: d for n, d in source.items() if d < SOURCE_FLOOR.get(n, SOURCE_FLOOR_DEFAULT)}
    assert not low, f"source-domain Dice below the floor: {low}"
    assert np.mean(list(source.values())) > 0.83
    # the target domain (another contrast phase): hurt, but no structure lost
    target = _dice_per_structure(model, preprocess, "target")
    assert min(target.values()) > 0.05, target
    assert np.mean(list(target.values())) > 0.7
