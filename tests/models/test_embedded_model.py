"""The embedded phantom foundation model shipped in the package (`fseft models`: id `phantom`)."""

from pathlib import Path

import numpy as np
import pytest

import fseft
from fseft.data.phantom import PHANTOM_LABELS, generate_case
from fseft.data.preprocessing import PreprocessConfig
from fseft.engine.inference import InferenceConfig, segment_volume
from fseft.evaluation.metrics import dice
from fseft.models.checkpoint import read_model_file_config
from fseft.models.zoo import load_model

WEIGHTS = Path(fseft.__file__).parent / "weights" / "phantom_swinunetr.safetensors"


def test_shipped_file_is_small_and_describes_its_training():
    assert WEIGHTS.stat().st_size <= 20 * 2**20
    config = read_model_file_config(WEIGHTS)
    assert config["arch"] == "swin_unetr"
    assert "gallbladder" not in config["class_names"]  # held out: the novel structure
    assert config["preprocess"]["spacing"] == [3.0, 3.0, 3.0]
    assert config["extra"]["inference"]["roi_size"] == [64, 64, 64]  # its training patch: the default window
    assert {d["name"] for d in config["extra"]["pretrain"]["datasets"]} == {"partial_A", "partial_B", "partial_C"}


@pytest.mark.slow
def test_embedded_model_segments_the_liver_of_an_unseen_source_phantom():
    model = load_model("phantom")
    assert isinstance(model.preprocess, (dict, PreprocessConfig))
    preprocess = model.preprocess if isinstance(model.preprocess, PreprocessConfig) else PreprocessConfig.from_dict(model.preprocess)
    # stream 7: never drawn for the pre-training sources
    case = generate_case(domain="source", seed=7, case_index=0, stream=7)
    masks = segment_volume(model, case.image, preprocess, InferenceConfig(progress=False), ["liver"])
    truth = case.labels.array == PHANTOM_LABELS["liver"]
    assert masks.shape[1:] == truth.shape
    assert dice(masks[0].astype(bool), truth) > 0.7
