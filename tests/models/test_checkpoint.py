"""Safe checkpoint reading and the fseft model file."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fseft.errors import InputFileError
from fseft.models import create_model, load_model, load_model_file, read_model_file_config, save_model_file
from fseft.models.checkpoint import extract_state_dict, read_checkpoint


class _CreatesMarker:
    """Unpickling this would create a file: the kind of payload a hostile checkpoint carries."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "btcv.pth"
    state = create_model("unet3d", ["a"], base_channels=4).state_dict()
    torch.save({"state_dict": state, "payload": _CreatesMarker(marker)}, evil)
    assert not marker.exists()

    with pytest.raises(InputFileError, match="refused") as info:
        read_checkpoint(evil)
    assert str(evil) in str(info.value)
    with pytest.raises(InputFileError, match="refused"):
        load_model("suprem_unet", weights=evil, base_channels=4)
    assert not marker.exists()


def test_numpy_scalars_in_a_checkpoint_are_data_not_code(tmp_path):
    path = tmp_path / "ckpt.pt"
    state = {"w": torch.ones(2)}
    torch.save({"state_dict": state, "epoch": 5000, "best_acc": np.float64(0.82)}, path)
    obj, meta = read_checkpoint(path)
    assert meta == {}
    assert float(obj["best_acc"]) == pytest.approx(0.82)
    assert torch.equal(extract_state_dict(obj, path)["w"], torch.ones(2))


def test_unreadable_and_empty_checkpoints_name_the_file(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputFileError, match="garbage.pth"):
        read_checkpoint(bad)
    with pytest.raises(InputFileError, match="not found"):
        read_checkpoint(tmp_path / "absent.pt")
    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "config": {"lr": 1e-4}}, odd)
    obj, _ = read_checkpoint(odd)
    with pytest.raises(InputFileError, match="no tensor dictionary"):
        extract_state_dict(obj, odd)


def test_model_file_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    net = create_model("unet3d", ["liver", "gallbladder"], base_channels=4)
    # non-trivial BatchNorm statistics, so that buffers must round-trip too
    net.train()
    with torch.no_grad():
        net(torch.rand(2, 1, 16, 16, 16))
    net.eval()
    path = tmp_path / "models" / "tiny.safetensors"
    preprocess = {"spacing": [1.5, 1.5, 1.5], "hu_window": [-175.0, 250.0]}
    save_model_file(net, path, preprocess=preprocess, extra={"run": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["tiny.safetensors"]  # no temporary left

    config = read_model_file_config(path)
    assert config["arch"] == "unet3d" and config["class_names"] == ["liver", "gallbladder"]
    assert config["arch_kwargs"]["base_channels"] == 4
    assert config["preprocess"] == preprocess and config["extra"] == {"run": "test"}
    assert config["fseft_version"]

    x = torch.rand(1, 1, 16, 16, 16)
    for loaded in (load_model_file(path), load_model(str(path))):
        assert not loaded.training
        assert loaded.class_names == net.class_names
        assert loaded.preprocess == preprocess
        with torch.no_grad():
            assert torch.equal(loaded(x), net(x))


def test_swin_model_file_round_trip_keeps_every_tensor(tmp_path):
    torch.manual_seed(2)
    net = create_model("swin_unetr", ["liver"], feature_size=12)

    class WithToDict:  # PreprocessConfig-like object
        def to_dict(self):
            return {"spacing": [2.0, 2.0, 2.0]}

    path = save_model_file(net, tmp_path / "swin.safetensors", preprocess=WithToDict())
    loaded = load_model_file(path, use_checkpoint=True)
    assert loaded.arch_kwargs["use_checkpoint"] is True and loaded.preprocess == {"spacing": [2.0, 2.0, 2.0]}
    original = net.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)


def test_float16_model_file_stores_swin_indices_narrow_and_restores_them_exactly(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(3)
    net = create_model("swin_unetr", ["liver", "spleen"], feature_size=12)
    path = save_model_file(net, tmp_path / "swin16.safetensors", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("relative_position_index"))
        assert f.get_tensor(key).dtype == torch.int16  # int64 in the model: 4x the bytes
    full = save_model_file(net, tmp_path / "swin32.safetensors")  # no dtype: stored as is
    assert path.stat().st_size < 0.6 * full.stat().st_size
    original, restored = net.state_dict(), load_model_file(path).state_dict()
    for k, v in original.items():
        assert restored[k].dtype == v.dtype, k
        if not v.is_floating_point():
            assert torch.equal(restored[k], v), k


def test_model_file_problems_are_input_file_errors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(InputFileError, match="without fseft metadata"):
        load_model_file(plain)
    # metadata claiming an architecture the tensors do not have
    net = create_model("unet3d", ["a"], base_channels=4)
    lying = tmp_path / "lying.safetensors"
    config = {"arch": "unet3d", "arch_kwargs": {"base_channels": 8}, "class_names": ["a"]}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(lying),
              metadata={"fseft": json.dumps(config)})
    with pytest.raises(InputFileError, match="lying.safetensors.*shape mismatch"):
        load_model_file(lying)
    config["arch"] = "transformer9000"
    unknown = tmp_path / "unknown.safetensors"
    save_file({"w": torch.zeros(1)}, str(unknown), metadata={"fseft": json.dumps(config)})
    with pytest.raises(InputFileError, match="unknown.safetensors.*unknown architecture"):
        load_model_file(unknown)


@pytest.mark.parametrize("extra,message", [
    ({"postprocess": {"largest_component": ["pancreas"]}}, "extra.postprocess.largest_component must map"),
    ({"postprocess": {"largest_component": {"pancreas": "no"}}}, "extra.postprocess.largest_component must map"),
    ({"postprocess": "lcc"}, "extra.postprocess is not a mapping"),
    ({"inference": {"roi_size": [64, 64]}}, r"extra.inference.roi_size must be three positive integers"),
    ({"inference": {"roi_size": [64, "64", 64]}}, r"extra.inference.roi_size must be three positive integers"),
    ([1, 2], "metadata's extra is not a mapping"),
])
def test_hand_edited_inference_records_are_input_file_errors(tmp_path, extra, message):
    """What `fseft predict` follows from a model file (its window, the structures kept whole) is
    checked where the file is read, naming the file, not met as a Python error at prediction."""
    net = create_model("unet3d", ["pancreas"], base_channels=2)
    path = tmp_path / "edited.safetensors"
    config = {"arch": "unet3d", "arch_kwargs": {"base_channels": 2}, "class_names": ["pancreas"], "extra": extra}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata={"fseft": json.dumps(config)})
    with pytest.raises(InputFileError, match=rf"edited.safetensors: .*{message}"):
        load_model_file(path)
    config["extra"] = {"inference": {"roi_size": [64, 64, 64]},
                       "postprocess": {"largest_component": {"pancreas": False}}}  # as fseft writes them
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata={"fseft": json.dumps(config)})
    assert load_model_file(path).model_config["extra"]["postprocess"]["largest_component"] == {"pancreas": False}
