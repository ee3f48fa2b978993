"""Atomic writes: all or nothing, with ordinary permissions."""

import os
import stat

import pytest

from fseft.errors import ConfigError
from fseft.utils import atomic_dir, atomic_path, write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_path_writes_with_the_umask_permissions_not_tempfiles(tmp_path, umask_022):
    write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text().strip().startswith("{")
    assert _mode(tmp_path / "a.json") == 0o644  # tempfile.mkstemp alone would leave 0600
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("x")
    assert _mode(tmp_path / "out") == 0o755  # mkdtemp alone would leave 0700
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.nii.gz") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        with atomic_dir(tmp_path / "out"):
            pass
