"""`fseft models`: the zoo table, and a CLI that answers --help without importing torch."""

from __future__ import annotations

import subprocess
import sys

import torch

from fseft.cli import main
from fseft.models import MODEL_SPECS, create_model, save_model_file


def test_models_table_lists_every_id_and_finds_weights(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "btcv.pt")
    save_model_file(create_model("swin_unetr", ["liver", "spleen"], feature_size=12), tmp_path / "phantom.safetensors")
    assert main(["models", "--weights-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    for model_id in MODEL_SPECS:
        assert model_id in lines
    assert "present: " + str(tmp_path / "btcv.pt") in lines["btcv"]
    assert "13" in lines["btcv"].split() and "62.19M" in lines["btcv"]
    assert "19.08M" in lines["suprem_unet"] and "unet3d" in lines["suprem_unet"]
    assert "absent" in lines["fseft"]
    assert "drive.google.com" in out  # where the absent fseft weights are published
    if "present" in lines["phantom"] and "phantom.safetensors" in lines["phantom"]:
        # the model file's own config: 2 classes, feature_size 12
        assert lines["phantom"].split()[2] == "2"


def test_cli_help_does_not_import_torch():
    code = (
        "import sys; from fseft.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules, 'monai' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_a_junk_weights_file_is_listed_unusable_and_refused_with_exit_2(tmp_path, capsys):
    import pytest

    from fseft.errors import InputFileError
    from fseft.models.zoo import load_model

    (tmp_path / "fseft.pth").write_text("junk\n")
    assert main(["models", "--weights-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"UNUSABLE: {tmp_path / 'fseft.pth'}: not a PyTorch checkpoint" in out
    with pytest.raises(InputFileError, match="fseft.pth: not a readable PyTorch checkpoint"):
        load_model("fseft", weights=str(tmp_path / "fseft.pth"))
