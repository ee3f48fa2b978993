"""Zoo ids load random-weight checkpoints written in each public key layout (tiny sizes)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fseft.data.structures import BTCV_CLASSES, CLIPDRIVEN_CLASSES, FSEFT_CLASSES, SUPREM_CLASSES
from fseft.errors import ConfigError, InputFileError
from fseft.models import MODEL_SPECS, CheckpointWarning, create_model, load_model, save_model_file
from fseft.models.zoo import find_weights, format_model_table

SWIN = {"feature_size": 12}
UNET = {"base_channels": 4}


def _random_state(arch: str, classes, **kwargs) -> dict[str, torch.Tensor]:
    """A tiny model's state dict with every float tensor randomised (so loads are checkable)."""
    state = create_model(arch, classes, **kwargs).state_dict()
    gen = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone() for k, v in state.items()}


def _dynamic_head(n_classes: int, feat: int) -> dict[str, torch.Tensor]:
    """CLIP-Driven / SuPreM text-driven head tensors (module.* names, small shapes)."""
    return {
        "module.precls_conv.0.weight": torch.randn(feat), "module.precls_conv.2.weight": torch.randn(8, feat, 1, 1, 1),
        "module.GAP.3.weight": torch.randn(256, 16, 1, 1, 1), "module.controller.weight": torch.randn(153, 512, 1, 1, 1),
        "module.controller.bias": torch.randn(153), "module.organ_embedding": torch.randn(n_classes, 512),
        "module.text_to_vision.weight": torch.randn(256, 512), "module.text_to_vision.bias": torch.randn(256),
    }


def _body(state):
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def write_selfsup(path, state):
    """MONAI model_swinvit.pt: {"state_dict": {module.<swin key>, timm mlp.fc names, SSL heads}}."""
    sd = {"module." + k[len("swinViT."):].replace("mlp.linear", "mlp.fc"): v
          for k, v in state.items() if k.startswith("swinViT.")}
    sd["module.rotation_head.weight"] = torch.randn(4, 192)
    sd["module.contrastive_head.weight"] = torch.randn(512, 192)
    sd["module.conv.0.weight"] = torch.randn(192, 96, 2, 2, 2)  # convTrans3d reconstruction head
    torch.save({"epoch": 100, "state_dict": sd}, path)


def write_btcv(path, state, n_out=1 + len(BTCV_CLASSES)):
    """MONAI research-contributions BTCV: SwinUNETR keys, out.conv.conv with background first."""
    sd = _body(state)
    sd["out.conv.conv.weight"] = torch.randn(n_out, 12, 1, 1, 1)
    sd["out.conv.conv.bias"] = torch.randn(n_out)
    torch.save({"epoch": 5000, "best_acc": np.float64(0.81), "state_dict": sd}, path)
    return sd


def write_universal(path, state, n_classes, feat):
    """CLIP-Driven / SuPreM: {"net": {module.backbone.<key>, text-driven head}}."""
    sd = {"module.backbone." + k: v for k, v in _body(state).items()}
    sd.update(_dynamic_head(n_classes, feat))
    torch.save({"net": sd, "epoch": 2100}, path)


def write_universal_prerefactor(path, state, n_classes, feat):
    """CLIP-Driven pre-refactor model, as its test.py / pred_pseudo.py load it:
    {"net": {module.swinViT.*, module.encoder*, module.decoder*, text-driven head}}."""
    sd = {"module." + k: v for k, v in _body(state).items()}
    sd.update(_dynamic_head(n_classes, feat))
    torch.save({"net": sd, "epoch": 2100}, path)


def write_selfsup_current(path, state):
    """research-contributions SwinUNETR/Pretrain today (SSLHead under DDP): module.swinViT.* with
    mlp.linear1/2, and its rotation / contrastive / reconstruction heads."""
    sd = {"module." + k: v for k, v in state.items() if k.startswith("swinViT.")}
    sd["module.rotation_pre.weight"] = torch.randn(192, 192)
    sd["module.rotation_head.weight"] = torch.randn(4, 192)
    sd["module.contrastive_pre.weight"] = torch.randn(192, 192)
    sd["module.contrastive_head.weight"] = torch.randn(512, 192)
    sd["module.conv.0.weight"] = torch.randn(192, 96, 3, 3, 3)
    torch.save({"epoch": 100, "state_dict": sd}, path)


def write_fseft(path, state):
    """FSEFT pre-training (DDP): {"net": {module.<key>, module.classifier.*}}."""
    sd = {"module." + k.replace("head.", "classifier."): v for k, v in state.items()}
    torch.save({"net": sd}, path)


def _assert_loaded(model, state, skip=()):
    loaded = model.state_dict()
    for k, v in state.items():
        if k.startswith("head.") or any(re.match(p, k) for p in skip):
            continue
        assert torch.equal(loaded[k], v), k


def test_selfsup_loads_encoder_and_reports_dropped_and_new(tmp_path):
    state = _random_state("swin_unetr", BTCV_CLASSES, **SWIN)
    path = tmp_path / "model_swinvit.pt"
    write_selfsup(path, state)
    with pytest.warns(CheckpointWarning) as rec:
        model = load_model("selfsup", weights=path, **SWIN)
    message = str(rec[0].message)
    assert "rotation_head" in message and "contrastive_head" in message and "module.conv" in message
    assert "decoder1" in message and "head" in message and "newly initialised" in message
    _assert_loaded(model, state, skip=(r"^(encoder|decoder)",))
    assert not torch.equal(model.state_dict()["encoder1.layer.conv1.conv.weight"], state["encoder1.layer.conv1.conv.weight"])


def test_selfsup_loads_the_current_pretraining_code_layout(tmp_path):
    state = _random_state("swin_unetr", BTCV_CLASSES, **SWIN)
    path = tmp_path / "ssl.pt"
    write_selfsup_current(path, state)
    with pytest.warns(CheckpointWarning) as rec:
        model = load_model("selfsup", weights=path, **SWIN)
    message = str(rec[0].message)
    assert "rotation_pre" in message and "contrastive_head" in message and "module.conv" in message
    _assert_loaded(model, state, skip=(r"^(encoder|decoder)",))
    assert model.model_config["layout"].startswith("research-contributions SwinUNETR/Pretrain main.py")


def test_btcv_takes_each_organ_against_the_background_channel(tmp_path):
    state = _random_state("swin_unetr", BTCV_CLASSES, **SWIN)
    path = tmp_path / "btcv.pt"
    sd = write_btcv(path, state)
    with pytest.warns(CheckpointWarning, match=r"channels \[0\].*relative to channel 0"):
        model = load_model("btcv", weights=path, **SWIN)
    assert model.class_names == BTCV_CLASSES and not model.training
    weight, bias = sd["out.conv.conv.weight"], sd["out.conv.conv.bias"]
    assert torch.equal(model.head.weight, weight[1:] - weight[:1])
    assert torch.equal(model.head.bias, bias[1:] - bias[:1])
    # sigmoid(organ logit) = p_organ / (p_organ + p_background) of the published softmax
    features = torch.randn(1, 12, 2, 2, 2)
    published = torch.softmax(torch.nn.functional.conv3d(features, weight, bias), dim=1)
    ours = torch.sigmoid(model.head(features))
    assert torch.allclose(ours, published[:, 1:] / (published[:, 1:] + published[:, :1]), atol=1e-6)
    _assert_loaded(model, state)
    assert model.preprocess["hu_window"] == [-175.0, 250.0]


@pytest.mark.parametrize(("model_id", "classes"), [("clipdriven", CLIPDRIVEN_CLASSES), ("suprem_swinunetr", SUPREM_CLASSES)])
def test_universal_swin_models_drop_the_text_driven_head(tmp_path, model_id, classes):
    state = _random_state("swin_unetr", classes, **SWIN)
    path = tmp_path / f"{model_id}.pth"
    write_universal(path, state, len(classes), 12)
    with pytest.warns(CheckpointWarning, match="controller") as rec:
        model = load_model(model_id, weights=path, **SWIN)
    assert "organ_embedding" in str(rec[0].message) and "newly initialised" in str(rec[0].message)
    assert model.class_names == classes and model.head.out_channels == len(classes)
    _assert_loaded(model, state)


@pytest.mark.parametrize(("model_id", "classes"), [("clipdriven", CLIPDRIVEN_CLASSES), ("suprem_swinunetr", SUPREM_CLASSES)])
def test_universal_swin_models_load_the_pre_refactor_layout(tmp_path, model_id, classes):
    state = _random_state("swin_unetr", classes, **SWIN)
    path = tmp_path / f"{model_id}.pth"
    write_universal_prerefactor(path, state, len(classes), 12)
    with pytest.warns(CheckpointWarning, match="controller"):
        model = load_model(model_id, weights=path, **SWIN)
    _assert_loaded(model, state)
    assert "pre-refactor" in model.model_config["layout"]


def test_an_unknown_layout_lists_the_unmatched_keys_and_the_layouts_tried(tmp_path):
    state = _random_state("swin_unetr", CLIPDRIVEN_CLASSES, **SWIN)
    path = tmp_path / "clip.pth"
    torch.save({"net": {"model.backbone." + k: v for k, v in _body(state).items()}}, path)
    with pytest.raises(InputFileError) as info:
        load_model("clipdriven", weights=path, **SWIN)
    message = str(info.value)
    assert "clip.pth: does not look like a checkpoint of this architecture" in message
    assert "unexpected keys: model.backbone.*" in message and "missing keys: swinViT.patch_embed" in message
    assert "no published layout fits; tried: CLIP-Driven-Universal-Model train.py" in message
    assert "CLIP-Driven-Universal-Model pre-refactor model" in message


def test_suprem_unet_loads_the_backbone(tmp_path):
    state = _random_state("unet3d", SUPREM_CLASSES, **UNET)
    path = tmp_path / "suprem_unet.pth"
    write_universal(path, state, len(SUPREM_CLASSES), 8)
    with pytest.warns(CheckpointWarning, match="precls_conv"):
        model = load_model("suprem_unet", weights=path, **UNET)
    _assert_loaded(model, state)  # BatchNorm running statistics included
    assert model.arch == "unet3d" and model.class_names == SUPREM_CLASSES


def test_fseft_loads_everything_including_the_head(tmp_path, recwarn):
    state = _random_state("swin_unetr", FSEFT_CLASSES, **SWIN)
    path = tmp_path / "fseft.pth"
    write_fseft(path, state)
    model = load_model("fseft", weights=path, **SWIN)
    assert not [w for w in recwarn if issubclass(w.category, CheckpointWarning)]
    assert torch.equal(model.head.weight, state["head.weight"])
    _assert_loaded(model, state)


def test_weights_are_found_in_the_weights_dir(tmp_path, monkeypatch):
    state = _random_state("swin_unetr", FSEFT_CLASSES, **SWIN)
    write_fseft(tmp_path / "fseft.pth", state)
    monkeypatch.setenv("FSEFT_WEIGHTS_DIR", str(tmp_path))
    assert find_weights(MODEL_SPECS["fseft"]) == tmp_path / "fseft.pth"
    model = load_model("fseft", **SWIN)
    assert model.model_config["weights"] == str(tmp_path / "fseft.pth")
    table = format_model_table()
    assert re.search(r"fseft\s+swin_unetr\s+29\s+62\.\d\dM\s+patch_merging=legacy\s+present: .*fseft\.pth", table)


def test_missing_weights_say_where_they_are_published_and_where_fseft_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("FSEFT_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(InputFileError) as info:
        load_model("suprem_unet")
    message = str(info.value)
    assert "huggingface.co/MrGiovanni/SuPreM" in message
    assert str(tmp_path / "suprem_unet.pth") in message and "does not download" in message


def test_a_checkpoint_of_the_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "suprem_unet.pth"
    write_universal(path, _random_state("unet3d", SUPREM_CLASSES, **UNET), len(SUPREM_CLASSES), 8)
    with pytest.raises(InputFileError, match=r"suprem_unet\.pth: does not look like a checkpoint of this architecture \(swin_unetr"):
        load_model("suprem_swinunetr", weights=path, **SWIN)


def test_a_checkpoint_of_another_size_is_a_shape_mismatch(tmp_path):
    path = tmp_path / "btcv.pt"
    write_btcv(path, _random_state("swin_unetr", BTCV_CLASSES, **SWIN))
    with pytest.raises(InputFileError, match=r"btcv\.pt: shape mismatch .*feature_size': 24"):
        load_model("btcv", weights=path, feature_size=24)


def test_a_checkpoint_with_unexpected_classes_is_refused(tmp_path):
    path = tmp_path / "btcv.pt"
    write_btcv(path, _random_state("swin_unetr", BTCV_CLASSES, **SWIN), n_out=9)
    with pytest.raises(InputFileError, match=r"btcv\.pt: the checkpoint head has 9 output channels, expected 14"):
        load_model("btcv", weights=path, **SWIN)
    other = tmp_path / "fseft.pth"
    write_fseft(other, _random_state("swin_unetr", ["liver", "spleen"], **SWIN))
    with pytest.raises(InputFileError, match=r"fseft\.pth: the checkpoint head has other classes"):
        load_model("fseft", weights=other, **SWIN)


def test_unexpected_and_missing_keys_are_errors_not_silence(tmp_path):
    state = _random_state("swin_unetr", FSEFT_CLASSES, **SWIN)
    extra = dict(state, **{"decoder1.adapter.weight": torch.zeros(3)})
    path = tmp_path / "extra.pth"
    write_fseft(path, extra)
    with pytest.raises(InputFileError, match=r"extra\.pth: unexpected keys: decoder1\.adapter"):
        load_model("fseft", weights=path, **SWIN)
    partial = {k: v for k, v in state.items() if not k.startswith("decoder2.")}
    path = tmp_path / "partial.pth"
    write_fseft(path, partial)
    with pytest.raises(InputFileError, match=r"partial\.pth: missing keys: decoder2\.transp_conv"):
        load_model("fseft", weights=path, **SWIN)


def test_an_fseft_model_file_given_for_a_zoo_id_must_match_it(tmp_path):
    good = create_model("swin_unetr", FSEFT_CLASSES, **SWIN)
    path = save_model_file(good, tmp_path / "fseft.safetensors")
    model = load_model("fseft", weights=path)
    assert model.class_names == FSEFT_CLASSES and model.model_config["model_id"] == "fseft"
    wrong = save_model_file(create_model("swin_unetr", ["liver"], **SWIN), tmp_path / "wrong.safetensors")
    with pytest.raises(InputFileError, match="wrong.safetensors: unexpected classes"):
        load_model("fseft", weights=wrong)
    unet = save_model_file(create_model("unet3d", FSEFT_CLASSES, **UNET), tmp_path / "unet.safetensors")
    with pytest.raises(InputFileError, match="holds a unet3d model"):
        load_model("fseft", weights=unet)


def test_phantom_is_the_bundled_model_file_or_reported_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("FSEFT_WEIGHTS_DIR", str(tmp_path))
    spec = MODEL_SPECS["phantom"]
    if find_weights(spec) is None:
        with pytest.raises(InputFileError, match="phantom_swinunetr.safetensors"):
            load_model("phantom")
    else:
        model = load_model("phantom")
        assert model.arch == "swin_unetr" and "gallbladder" not in model.class_names


def test_unknown_ids_and_misused_options():
    with pytest.raises(ConfigError, match="unknown model id 'sam'"):
        load_model("sam")
    with pytest.raises(ConfigError, match="--weights is only for zoo ids"):
        load_model("some/model.safetensors", weights="other.pth")
