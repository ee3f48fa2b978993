"""Decoder training on cached encoder outputs (`fseft.adaptation.encoder_cache`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_cases import tiny_model

from fseft.adaptation import AdaptConfig
from fseft.adaptation.network_runner import train_network
from fseft.adaptation.encoder_cache import EncoderCache, split_point_for
from fseft.methods.peft_methods import apply_method, method_train_mode
from fseft.models.zoo import create_model


@pytest.mark.parametrize("method, options, expected", [
    ("decoder", {}, "skips"),
    ("decoder", {"include_skip_blocks": True}, "hidden"),
    ("ft-last", {}, "last"),
    ("ft", {}, None),
    ("lora", {"decoder": "fine-tuned"}, None),
    ("bitfit", {"decoder": "fine-tuned"}, None),
])
def test_split_point_is_the_deepest_one_behind_which_everything_trainable_lies(method, options, expected):
    swin = create_model("swin_unetr", ["liver"], feature_size=12)
    assert split_point_for(apply_method(swin, method, ["liver", "gallbladder"], **options)) == expected


def test_split_point_of_the_unet():
    assert split_point_for(apply_method(tiny_model(), "decoder", ["liver"])) == "skips"
    assert split_point_for(apply_method(tiny_model(), "ft-last", ["liver"])) == "last"
    assert split_point_for(apply_method(tiny_model(), "scratch", ["liver"])) is None


@pytest.mark.parametrize("arch, kwargs, size", [("unet3d", {"base_channels": 2}, 16),
                                                 ("swin_unetr", {"feature_size": 12}, 64)])
def test_decode_of_encode_is_the_network_at_every_split_point(arch, kwargs, size):
    torch.manual_seed(0)
    model = create_model(arch, ["liver"], **kwargs).eval()
    x = torch.rand(1, 1, size, size, size)
    with torch.no_grad():
        reference = model.features(x)
        for point in model.split_points:
            assert torch.allclose(model.decode(model.encode(x, point), point), reference, atol=1e-5)


def _support(n=2, shape=(20, 18, 16), seed=0):
    rng = np.random.default_rng(seed)
    volumes = []
    for _ in range(n):
        image = torch.from_numpy(rng.random((1, *shape), dtype=np.float32))
        label = torch.zeros((1, *shape), dtype=torch.uint8)
        label[0, 5:12, 4:10, 3:9] = 1
        volumes.append({"image": image, "label": label})
    return volumes


def test_a_step_on_the_cache_has_the_network_step_gradients(tmp_path):
    from fseft.training.fit import supervised_loss

    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16)
    y = (torch.rand(2, 1, 16, 16, 16) > 0.7).to(torch.uint8)
    grads = []
    for use_cache in (False, True):
        model = method_train_mode(apply_method(tiny_model(), "decoder", ["liver"]))  # frozen BatchNorms in eval
        if use_cache:
            cache = EncoderCache(model, "skips", "e" * 64, tmp_path, dtype=np.float32)
            cached = [cache.get(x[i]) for i in range(2)]
            tensors = {n: torch.from_numpy(np.stack([c[n] for c in cached])).float() for n in cached[0]}
            logits = model.head(model.decode(tensors, "skips"))
        else:
            logits = model(x)
        supervised_loss(logits, y, multiclass=False).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("up_tr") for n in grads[0])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_training_on_the_cache_follows_training_through_the_network(tmp_path):
    """Volumes within one patch have one distinct patch: both paths take the same steps (exactly
    with float32 storage)."""
    cfg = AdaptConfig(method="decoder", epochs=3, lr=1e-2, patch_size=(24, 24, 16), patches_per_volume=2,
                      patience=0, progress=False)
    through = apply_method(tiny_model(), "decoder", ["liver"])
    cached = apply_method(tiny_model(), "decoder", ["liver"])
    cache = EncoderCache(cached, "skips", "f" * 64, tmp_path / "cache", dtype=np.float32)
    a = train_network(through, _support(), cfg, seed=3)
    b = train_network(cached, _support(), cfg, seed=3, encoder_cache=cache)
    assert cache.misses == 2 and cache.hits == 0  # one patch per volume, computed once
    assert a.losses == pytest.approx(b.losses, rel=1e-4)
    # (Parameters are not compared: convolution biases before a BatchNorm get noise-only gradients
    # that Adam scales up to the learning rate, and the cache's one pass over a patch drawn twice
    # updates the BatchNorm running variance with another Bessel factor than the two-patch batch.)
    assert a.losses[-1] < a.losses[0]


def test_cache_entries_are_reused_and_nothing_is_left_half_written(tmp_path):
    model = apply_method(tiny_model(), "ft-last", ["liver"])
    cache = EncoderCache(model, "last", "a" * 64, tmp_path)
    image = torch.rand(1, 16, 16, 16)
    first = cache.get(image)
    again = EncoderCache(model, "last", "a" * 64, tmp_path).get(image.clone())
    assert set(first) == {"up128", "skip64"} and first["skip64"].dtype == np.float16
    assert all(np.array_equal(first[k], again[k]) for k in first)
    entries = list(cache.dir.iterdir())
    assert len(entries) == 1 and not any(p.name.endswith(".tmp") for p in entries)
    assert json.loads((entries[0] / "meta.json").read_text())["point"] == "last"
    assert cache.size_bytes() > 0
    other = EncoderCache(model, "last", "b" * 64, tmp_path)  # other weights: other entries
    assert other.dir != cache.dir


def test_a_larger_volume_trains_on_a_pool_of_distinct_windows(tmp_path):
    cfg = AdaptConfig(method="decoder", epochs=2, lr=1e-2, patch_size=(8, 8, 8), patches_per_volume=3,
                      patience=0, progress=False, encoder_pool_epochs=2)
    model = apply_method(tiny_model(), "decoder", ["liver"])
    cache = EncoderCache(model, "skips", "c" * 64, tmp_path)
    result = train_network(model, _support(n=1), cfg, seed=0, encoder_cache=cache)
    assert result.epochs_run == 2 and 1 < cache.misses <= 2 * 3


def test_augmented_patches_give_the_pool_distinct_variants_of_a_small_volume(tmp_path):
    cfg = AdaptConfig(method="decoder", epochs=2, lr=1e-2, patch_size=(24, 24, 16), patches_per_volume=3,
                      patience=0, progress=False, augment=True)
    model = apply_method(tiny_model(), "decoder", ["liver"])
    cache = EncoderCache(model, "skips", "d" * 64, tmp_path)
    train_network(model, _support(n=1), cfg, seed=0, encoder_cache=cache)
    assert cache.misses > 1  # intensity shifts (p = 0.5) make most draws differ
