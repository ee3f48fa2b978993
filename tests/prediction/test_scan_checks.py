"""`fseft predict` says when it is out of its depth: a once-per-run warning for the embedded
phantom model (trained on synthetic data only) and a per-scan warning where the masks do not
look like the organs they name (the real head-and-neck CT s0002 is in tests/experiments/test_real_ct.py)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from fseft.data.volume import Volume
from fseft.prediction.scan_checks import (
    check_scan,
    implausible_masks,
    synthetic_model_warning,
    trained_on_synthetic_data,
)

SYNTHETIC = "trained on synthetic CT only"


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_masks_outside_their_organs_hu_range_are_named_with_the_file(caplog) -> None:
    image = np.zeros((20, 20, 20), np.float32)
    image[:10] = 700.0  # bone
    masks = np.zeros((4, 20, 20, 20), np.uint8)
    masks[0, :10] = 1  # "liver" on bone
    masks[1, 10:] = 1  # "spleen" on soft tissue: plausible
    masks[2, :10] = 1  # "aorta" on 700 HU: vessels are not checked (contrast)
    masks[3, :1, :1, :1] = 1  # "kidney_left" on bone, but one voxel: too small to judge
    names = ("liver", "spleen", "aorta", "kidney_left")
    found = implausible_masks(image, masks, names, voxel_ml=1.0 / 1000)
    assert [(n, round(m)) for n, m, _ in found] == [("liver", 700)]
    volume = Volume(image, np.eye(4), "scan_07.nii.gz")
    with caplog.at_level(logging.WARNING):
        message = check_scan(volume, masks, names)
    assert message is not None and message in _messages(caplog)
    assert message.startswith("scan_07.nii.gz: ") and "liver (mean 700 HU over 4.0 ml)" in message
    assert "spleen" not in message and "aorta" not in message
    caplog.clear()
    masks[0] = 0
    assert check_scan(volume, masks, names) is None and not _messages(caplog)


def test_the_embedded_model_is_recognised_by_id_file_copy_and_metadata(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fseft.models.zoo import MODEL_SPECS, find_weights

    bundled = find_weights(MODEL_SPECS["phantom"])
    # as load_model leaves them: the zoo id, and a model file given by path (no id)
    assert trained_on_synthetic_data(SimpleNamespace(model_config={"model_id": "phantom", "weights": str(bundled)}))
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(bundled, copy)
    assert trained_on_synthetic_data(SimpleNamespace(model_config={"extra": {}}), str(copy))
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"x" * bundled.stat().st_size)  # same size, other bytes
    assert not trained_on_synthetic_data(SimpleNamespace(model_config={"extra": {}}), str(other))
    assert not trained_on_synthetic_data(SimpleNamespace(model_config={"model_id": "btcv"}), "btcv")
    # a model file that says so in its metadata
    assert trained_on_synthetic_data(SimpleNamespace(model_config={"extra": {"training_data": "synthetic"}}), str(other))
    message = synthetic_model_warning()
    assert SYNTHETIC in message and "fseft models" in message
    assert all(m in message for m in MODEL_SPECS if m != "phantom")  # the public zoo ids
    assert "adapter's base model" in synthetic_model_warning(adapter=True)


@pytest.mark.slow
def test_predict_on_phantoms_warns_once_about_the_model_and_never_about_a_scan(tmp_path: Path, caplog) -> None:
    """The demo's data (target-domain phantoms, seed 1): the model warning once per run, no scan
    warning (the masks are where the organs are)."""
    from fseft.data.phantom import write_phantom_dataset
    from fseft.prediction.predict import predict_path
    from fseft.prediction.segment import InferenceConfig

    data = write_phantom_dataset(tmp_path / "target", 3, "target", 1, progress=False)
    with caplog.at_level(logging.WARNING):
        result = predict_path(data / "imagesTr", tmp_path / "out", "phantom", cfg=InferenceConfig(progress=False))
    assert len(result.outputs) == 3
    messages = _messages(caplog)
    assert sum(SYNTHETIC in m for m in messages) == 1
    assert not [m for m in messages if "do not look like the organs" in m]
