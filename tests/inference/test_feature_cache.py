"""FeatureCache: hits, misses, stale keys, atomic writes."""

from __future__ import annotations

import errno
import os
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fseft.data.datasets import open_dataset
from fseft.data.preprocessing import PreprocessConfig, preprocess
from fseft.inference.feature_cache import CacheError, FeatureCache, compute_features, model_fingerprint
from fseft.data.io import write_image, write_mask
from fseft.data.volume import Volume
from fseft.prediction.segment import InferenceConfig
from tiny_cases import tiny_model, write_tiny_dataset

PRE = PreprocessConfig(spacing=(3.0, 3.0, 3.0), crop_foreground=False)
INF = InferenceConfig(roi_size=(16, 16, 16), overlap=0.25, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return open_dataset(write_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_cases=2))


def _cache(tmp_path, model=None, pre=PRE, inf=INF):
    return FeatureCache(model if model is not None else tiny_model(), pre, tmp_path / "cache", inf)


def test_miss_then_hit_returns_the_model_features_and_labels(dataset, tmp_path):
    model = tiny_model()
    cache = _cache(tmp_path, model)
    case = dataset.cases[0]
    first = cache.load(case, ("liver",))
    assert (cache.misses, cache.hits) == (1, 0)
    again = cache.load(case, ("liver",))
    assert (cache.misses, cache.hits) == (1, 1)
    assert isinstance(again.features, np.memmap) and again.features.dtype == np.float16
    image, labels = case.load(["liver"])
    pre = preprocess(image, labels, PRE)
    expected = compute_features(model, pre.image[None], INF)[0].numpy()
    assert first.features.shape == (model.feature_channels, *pre.image.shape[1:])
    np.testing.assert_allclose(again.features, expected, rtol=1e-2, atol=1e-3)
    np.testing.assert_array_equal(again.labels, pre.label.numpy())
    # another structure of the same volume: features reused, only its label added
    both = cache.load(case, ("liver", "gallbladder"))
    assert cache.misses == 1 and both.labels.shape[0] == 2 and both.labels[1].sum() > 0


def test_cached_features_through_the_head_match_the_model_prediction(dataset, tmp_path):
    from fseft.prediction.segment import predict_probabilities

    model = tiny_model()
    cached = _cache(tmp_path, model).load(dataset.cases[1])
    assert cached.labels is None
    image, _ = dataset.cases[1].load(["liver"])
    pre = preprocess(image, None, PRE)
    probs = predict_probabilities(model, pre.image[None], INF)[0]
    with torch.no_grad():
        from_cache = torch.sigmoid(model.head(torch.from_numpy(np.asarray(cached.features, np.float32))[None]))[0]
    assert torch.allclose(from_cache, probs, atol=2e-3)


def test_other_model_preprocessing_or_window_gets_another_key(dataset, tmp_path):
    case = dataset.cases[0]
    ref = _cache(tmp_path)
    key = ref.entry_dir(case.image)
    assert _cache(tmp_path).entry_dir(case.image) == key  # same inputs, same key
    assert _cache(tmp_path, tiny_model(seed=1)).entry_dir(case.image) != key
    assert _cache(tmp_path, pre=PreprocessConfig(spacing=(2.0, 3.0, 3.0), crop_foreground=False)).entry_dir(case.image) != key
    assert _cache(tmp_path, inf=InferenceConfig(roi_size=(16, 16, 16), overlap=0.5)).entry_dir(case.image) != key


def test_changed_volume_file_is_a_miss(tmp_path):
    ds = open_dataset(write_tiny_dataset(tmp_path / "ds", n_cases=1))
    cache = _cache(tmp_path)
    cache.load(ds.cases[0])
    write_tiny_dataset(tmp_path / "ds", n_cases=1, seed=5)  # rewritten file: new size/mtime
    cache.load(open_dataset(tmp_path / "ds").cases[0])
    assert cache.misses == 2


def test_stale_entry_is_recomputed_never_reused(dataset, tmp_path):
    model = tiny_model()
    cache = _cache(tmp_path, model)
    case = dataset.cases[0]
    entry = cache.load(case).path
    good = np.array(cache.load(case).features)
    # an entry whose recorded inputs differ (copied from elsewhere, or a key collision)
    meta = json.loads((entry / "meta.json").read_text())
    meta["key"]["preprocess"]["spacing"] = [9.0, 9.0, 9.0]
    np.save(entry / "features.npy", np.zeros_like(good))
    (entry / "meta.json").write_text(json.dumps(meta))
    fresh = _cache(tmp_path, model)
    again = fresh.load(case)
    assert fresh.misses == 1
    np.testing.assert_array_equal(np.asarray(again.features), good)
    # a truncated features file is recomputed too
    (entry / "features.npy").write_bytes(b"\x93NUMPY")
    assert _cache(tmp_path, model).load(case).features.shape == good.shape


def test_full_disk_is_found_before_the_memory_mapped_write_and_leaves_nothing_behind(dataset, tmp_path, monkeypatch):
    # the features file is memory-mapped: on a full disk a write to it would kill the process
    # with SIGBUS, so its blocks are reserved first and ENOSPC surfaces there
    cache = _cache(tmp_path)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(CacheError, match="disk is full.*--cache-dir"):
        cache.load(dataset.cases[0], ("liver",))
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []
    monkeypatch.undo()
    assert cache.load(dataset.cases[0], ("liver",)).labels.sum() > 0


def test_full_disk_on_a_real_size_limited_filesystem_is_an_error_not_a_crash(dataset, tmp_path):
    import subprocess
    import sys

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        # in a child process: before the fix it died of SIGBUS (exit -7), taking pytest with it
        code = (
            "import sys; sys.path[:0] = [%r, %r]\n"
            "from test_feature_cache import _cache, write_tiny_dataset, open_dataset\n"
            "from pathlib import Path\n"
            "from fseft.inference.feature_cache import CacheError\n"
            "ds = open_dataset(write_tiny_dataset(Path(%r), n_cases=1))\n"
            "try:\n"
            "    _cache(Path(%r)).load(ds.cases[0], ('liver',))\n"
            "except CacheError as exc:\n"
            "    print('CacheError', exc); sys.exit(3)\n"
        ) % (str(Path(__file__).parent), str(Path(__file__).parents[1]), str(tmp_path / "ds"), str(mount))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode == 3, (result.returncode, result.stderr[-2000:])
        assert "disk is full" in result.stdout
        assert [p for p in mount.rglob("*") if p.is_file() and p.suffix == ".npy"] == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_temporary_folders_of_killed_runs_are_swept_by_the_next_write(dataset, tmp_path):
    from fseft.inference.feature_cache import remove_orphaned_staging

    cache = _cache(tmp_path)
    entry = cache.entry_dir(dataset.cases[0].image)
    entry.parent.mkdir(parents=True)
    dead = entry.parent / f".{entry.name}.999999999.abcd.tmp"  # no such process
    alive = entry.parent / f".{entry.name}.{os.getpid()}.efgh.tmp"  # a writer still at work
    # a writer on another cluster node (a cache on a shared filesystem): its pid means nothing
    # here, so it is kept until the age limit
    elsewhere = entry.parent / f".{entry.name}.999999999-othernode.ijkl.tmp"
    for folder in (dead, alive, elsewhere):
        folder.mkdir()
        (folder / "features.npy").write_bytes(b"partial")
    cache.load(dataset.cases[0], ("liver",))
    assert not dead.exists() and alive.exists() and elsewhere.exists()
    assert remove_orphaned_staging(entry) == []
    assert remove_orphaned_staging(entry, max_age_s=-1) == [elsewhere]  # an old one of another node goes
    assert alive.exists()


def test_interrupt_mid_write_leaves_nothing_behind(dataset, tmp_path, monkeypatch):
    cache = _cache(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.load(dataset.cases[0], ("liver",))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_model_fingerprint_follows_the_weights():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.head.bias.add_(1e-3)
    assert model_fingerprint(a) != model_fingerprint(b)
