"""Small shared helpers: atomic writes, seeding, strict config files. One way to write a file in fseft."""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fseft.errors import ConfigError, InputFileError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_permissions(path: str | os.PathLike) -> None:
    """Give a file or folder made by `tempfile` (0600 / 0700) the permissions an ordinary
    ``open``/``mkdir`` would have (0666 / 0777 less the umask), so that outputs can be read by
    the colleagues and viewers that can read the folder they are in."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file, and a failure (full disk, exception, Ctrl-C) leaves
    no partial output behind. `suffix` keeps the extension libraries sniff (``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        apply_default_permissions(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp_path), tmp_path):
            # name the file the user asked for, not our temporary one (gzip writers name none)
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; move it onto `out` only if the block
    succeeds, so no half-written folder is ever visible at `out`. A non-empty `out` is
    refused (`ConfigError`) unless `overwrite`, then replaced whole."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputFileError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: folder exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno is not None:  # name the folder asked for, not ours
            raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from exc
        raise
    apply_default_permissions(tmp)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def reserve_disk_space(path: str | os.PathLike, offset: int, length: int) -> None:
    """Allocate the disk blocks of bytes ``[offset, offset + length)`` of the file at `path` now.

    A memory-mapped file is sparse until written: on a full disk the write that touches an
    unbacked page kills the process with SIGBUS, past any handler. Reserving the blocks first
    turns that into an `OSError` (ENOSPC) here, which callers report and clean up after.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, offset, length)
            return
        except AttributeError:  # no posix_fallocate (macOS): write the zeros ourselves
            pass
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        chunk = b"\0" * (1 << 20)
        os.lseek(fd, offset, os.SEEK_SET)
        remaining = length
        while remaining > 0:
            remaining -= os.write(fd, chunk[: min(remaining, len(chunk))])
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (model files identify a base model by it)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where fseft caches derived data (voxel counts, frozen features): ``$FSEFT_CACHE_DIR``,
    else ``~/.cache/fseft``."""
    env = os.environ.get("FSEFT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fseft"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch  # heavy (~1 s); torch-free code imports this module (fseft.data.io, datasets inspect)

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def unknown_key_error(key: str, valid: Sequence[str], where: str, source: str) -> Exception:
    """`ConfigError` for a key no config section has, naming the closest valid one (typos)."""
    return ConfigError(f"{source}: unknown key {key!r} in {where}{closest_hint(key, valid)}; "
                       f"valid keys: {', '.join(valid)}")


def closest_hint(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'lora'?)`` when `name` is a near-miss of one of `choices`, else ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(mapping: Any, valid: Sequence[str], where: str, source: str) -> dict[str, Any]:
    """`mapping` as a dict (None: empty) after checking it is a mapping with only `valid` keys."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping of keys to values, got {type(mapping).__name__}")
    for key in mapping:
        if key not in valid:
            raise unknown_key_error(key, valid, where, source)
    return dict(mapping)


def read_yaml_mapping(path: str | os.PathLike, what: str, top_keys: Sequence[str]) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (`what`: "assembly file", "experiment file");
    unreadable files, invalid YAML and non-mappings raise errors naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: an {what} is a mapping with keys {', '.join(top_keys)}")
    return dict(data)
