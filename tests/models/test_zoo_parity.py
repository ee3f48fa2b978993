"""Parity with the authors' model code: every zoo id, in every key layout its public scripts save or
load, computes what the public model computes.

The reference outputs in ``golden/`` were computed once by the public code itself (MONAI 1.4.0's
SwinUNETR / SwinTransformer, the CLIP-Driven, SuPreM and FSEFT repositories at pinned commits) in
a throw-away environment: ``tools/make_zoo_goldens.py`` (its header has the command). Each file
holds the input, the outputs, and in its metadata the checkpoint's keys as the public script saves
them; the weights are regenerated here by ``golden/seeded_weights.py`` (a value per key name), so
no public code and no weights are stored.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fseft.models import load_model
from fseft.models.checkpoint import read_checkpoint

# which tensors are dropped or new is tested in test_zoo.py; here only the function counts
pytestmark = pytest.mark.filterwarnings("ignore::fseft.models.checkpoint.CheckpointWarning")

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.safetensors"))
_spec = importlib.util.spec_from_file_location("seeded_weights", GOLDEN / "seeded_weights.py")
seeded_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeded_weights)


def read_golden(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(GOLDEN / f"{case}.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["golden"])


def fseft_outputs(model: torch.nn.Module, x: torch.Tensor, meta: dict) -> dict[str, torch.Tensor]:
    """What fseft computes for the output the golden file compares."""
    with torch.no_grad():
        if meta["compare"] == "hidden":  # the Swin encoder's five stages (selfsup: the decoder is new)
            return {f"hidden{i}": h for i, h in enumerate(model.swinViT(x, model.normalize))}
        if meta["compare"] == "features":  # the map the published head reads (fseft replaces that head)
            return {"features": model.features(x)}
        # the published head: BTCV's softmax as organ-minus-background logits (see the zoo)
        return {"logits_relative" if "head" in meta else "logits": model(x)}


def assert_matches_golden(model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> float:
    """Compare fseft's outputs with the stored ones (whole, or at the sampled voxels plus per-channel
    mean and standard deviation over the volume); returns the largest absolute difference."""
    x = tensors["input_u8"].float() / 255
    tol = meta["tolerance"]
    worst = 0.0
    for name, out in fseft_outputs(model, x, meta).items():
        if meta["outputs"][name]["stored"] == "full":
            pairs = [(out, tensors[name])]
        else:
            i = tensors[f"{name}.index"]
            pairs = [(out[:, :, i[:, 0], i[:, 1], i[:, 2]], tensors[f"{name}.sample"]),
                     (out.mean(dim=(2, 3, 4)), tensors[f"{name}.mean"]),
                     (out.std(dim=(2, 3, 4), unbiased=False), tensors[f"{name}.std"])]
        for ours, reference in pairs:
            assert ours.shape == reference.shape, name
            torch.testing.assert_close(ours, reference, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")
            worst = max(worst, float((ours - reference).abs().max()))
    return worst


def save_public_checkpoint(path: Path, meta: dict, rename: tuple[str, str] | None = None) -> Path:
    """The seeded weights, under the public key names (optionally rewritten), in the public container."""
    state = seeded_weights.seeded_state_dict(meta["keys"])
    if rename is not None:
        state = {re.sub(rename[0], rename[1], k): v for k, v in state.items()}
    torch.save(seeded_weights.checkpoint_object(state, meta["container"]), path)
    return path


def _full_size(case: str) -> bool:
    return read_golden(case)[1]["arch_overrides"].get("feature_size", 48) == 48 and "unet" not in case


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if _full_size(c) else c for c in CASES])
def test_every_published_layout_loads_and_computes_the_public_models_outputs(tmp_path, case):
    tensors, meta = read_golden(case)
    path = save_public_checkpoint(tmp_path / f"{case}.pth", meta)
    model = load_model(meta["model_id"], weights=path, **meta["arch_overrides"])
    assert model.model_config["layout"] is not None
    assert_matches_golden(model, tensors, meta)


# Layouts the public scripts also write, which differ from a golden case only in key prefixes: the
# CLIP-Driven / SuPreM train.py without --dist (no DDP: "backbone." instead of "module.backbone."),
# the pre-refactor model saved without DDP, SuPreM's U-Net without DDP, and the self-supervised
# pre-training code before research-contributions 659d711 (encoder attribute ``swin_vit``).
DERIVED_LAYOUTS = [
    ("clipdriven_train", (r"^module\.", "")),
    ("clipdriven_prerefactor", (r"^module\.", "")),
    ("suprem_unet_train", (r"^module\.", "")),
    ("selfsup_pretrain_current", (r"^module\.swinViT\.", "module.swin_vit.")),
]


@pytest.mark.parametrize(("case", "rename"), DERIVED_LAYOUTS)
def test_layouts_saved_without_ddp_or_by_older_code_load_the_same_model(tmp_path, case, rename):
    """The same tensors in the same places as the golden layout (whose outputs are checked above)."""
    _, meta = read_golden(case)
    golden = load_model(meta["model_id"], weights=save_public_checkpoint(tmp_path / "a.pth", meta), **meta["arch_overrides"])
    derived = load_model(meta["model_id"], weights=save_public_checkpoint(tmp_path / "b.pth", meta, rename),
                         **meta["arch_overrides"])
    assert derived.arch_kwargs == golden.arch_kwargs
    reference = golden.state_dict()
    new = [k for k in reference if k.startswith(("head.", "encoder", "decoder")) and meta["model_id"] == "selfsup"]
    for key, value in derived.state_dict().items():
        if key not in new and not key.startswith("head."):
            assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize(("case", "other_option"), [
    ("btcv_trainer", {"patch_merging": "current"}),  # MONAI 1.5's sub-grid order
    ("suprem_unet_train", {"inference_norm": "running"}),  # running statistics at inference
])
def test_the_other_variant_option_computes_another_function(tmp_path, case, other_option):
    """The same weights with the other option value miss the golden outputs: the check can fail."""
    tensors, meta = read_golden(case)
    path = save_public_checkpoint(tmp_path / f"{case}.pth", meta)
    model = load_model(meta["model_id"], weights=path, **other_option, **meta["arch_overrides"])
    with pytest.raises(AssertionError):
        assert_matches_golden(model, tensors, meta)


def test_a_btcv_checkpoint_pickled_under_numpy_1_is_read():
    """MONAI's BTCV trainer stores ``best_acc`` as a NumPy float64; under NumPy 1.x its pickle names
    ``numpy.core.multiarray.scalar`` (written under NumPy 1.26.4 by the golden tool)."""
    path = GOLDEN / "btcv_numpy1_pickle.pth"
    assert b"numpy.core.multiarray" in _pickle_bytes(path)
    obj, _ = read_checkpoint(path)
    assert isinstance(obj["best_acc"], float) and 0 < obj["best_acc"] < 1 and obj["epoch"] == 5000
    assert all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values())


def _pickle_bytes(path: Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return b"".join(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
