"""Deterministic stand-in weights for the zoo parity goldens (pure torch, no fseft, no public code).

`tools/make_zoo_goldens.py` fills each public reference model with ``seeded_state_dict(spec)``
and stores its outputs; a test regenerates the same tensors from the ``keys`` of the golden
file's metadata, wraps them as the public script saves them and loads them with fseft.

Every tensor is drawn from its own ``torch.Generator`` seeded with ``zlib.crc32(key)``, so a
value depends only on the key's name, shape and dtype (not on the other keys or their order).
Scales keep a randomly initialised network's activations O(1):

* ``*relative_position_index`` (int64, Swin): the standard 3D Swin index of a cubic window,
  recomputed by `relative_position_index` (the builders verify it equals the model's buffer);
* ``*num_batches_tracked`` (int64 scalar): `NUM_BATCHES_TRACKED`;
* ``*relative_position_bias_table``: ``0.02 * randn``;
* ``*running_mean``: ``0.1 * randn``; ``*running_var``: ``0.5 + rand`` (in [0.5, 1.5));
* other tensors of >= 2 dims (conv / linear weights, embeddings): ``randn / sqrt(prod(shape[1:]))``;
* 1-dim ``*.weight`` (layer / group / batch norm scales): ``1 + 0.1 * randn``;
* other 1-dim tensors (biases): ``0.05 * randn``; 0-dim floats: ``0.1 * randn``.
"""

from __future__ import annotations

import math
import zlib

import torch

__all__ = ["NUM_BATCHES_TRACKED", "checkpoint_object", "relative_position_index", "seeded_state_dict", "seeded_tensor"]

NUM_BATCHES_TRACKED = 1000

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "int64": torch.int64}


def relative_position_index(window: int = 7) -> torch.Tensor:
    """``(window**3, window**3)`` int64 index into a ``(2w-1)**3`` relative position bias table
    (Liu et al.'s Swin formula in 3D, as MONAI and the public copies of its SwinUNETR build it)."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(window),) * 3, indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    span = 2 * window - 1
    return rel[..., 0] * span * span + rel[..., 1] * span + rel[..., 2]


def seeded_tensor(key: str, shape: list[int] | tuple[int, ...], dtype: str = "float32") -> torch.Tensor:
    """The deterministic value of one state-dict entry (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if dtype not in _DTYPES:
        raise ValueError(f"{key}: unsupported dtype {dtype!r}")
    if key.endswith("relative_position_index"):
        window = round(math.pow(shape[0], 1 / 3))
        index = relative_position_index(window)
        if tuple(index.shape) != shape:
            raise ValueError(f"{key}: shape {shape} is not a cubic-window relative position index")
        return index.to(_DTYPES[dtype])
    if key.endswith("num_batches_tracked"):
        return torch.full(shape, NUM_BATCHES_TRACKED, dtype=_DTYPES[dtype])
    if not _DTYPES[dtype].is_floating_point:
        raise ValueError(f"{key}: no rule for integer tensors of this kind")
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    if key.endswith("relative_position_bias_table"):
        value = 0.02 * torch.randn(shape, generator=gen)
    elif key.endswith("running_mean"):
        value = 0.1 * torch.randn(shape, generator=gen)
    elif key.endswith("running_var"):
        value = 0.5 + torch.rand(shape, generator=gen)
    elif len(shape) >= 2:
        value = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    elif len(shape) == 1 and key.endswith("weight"):
        value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif len(shape) == 1:
        value = 0.05 * torch.randn(shape, generator=gen)
    else:
        value = 0.1 * torch.randn(shape, generator=gen)
    return value.to(_DTYPES[dtype])


def seeded_state_dict(spec: dict[str, tuple[list[int], str]]) -> dict[str, torch.Tensor]:
    """``{key: seeded_tensor(key, shape, dtype)}`` for ``spec = {key: (shape, dtype)}`` (the
    ``keys`` of a golden file's metadata), in the order of ``spec``."""
    return {key: seeded_tensor(key, shape, dtype) for key, (shape, dtype) in spec.items()}


def checkpoint_object(state: dict[str, torch.Tensor], container: dict | None) -> object:
    """What the public script passes to ``torch.save``: ``state`` itself (``container`` None), or
    ``{container["key"]: state, **container["extra"]}`` with the ``extra`` entries named in
    ``container["numpy_float64"]`` turned into ``numpy.float64`` (as BTCV's ``best_acc``)."""
    if container is None:
        return state
    extra = dict(container.get("extra", {}))
    if container.get("numpy_float64"):
        import numpy as np

        for name in container["numpy_float64"]:
            extra[name] = np.float64(extra[name])
    return {container["key"]: state, **extra}
