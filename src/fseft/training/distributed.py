"""torch DDP plumbing for `torchrun` launches: rank and world size from the environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), NCCL on GPUs,
gloo on CPU. A plain ``python`` launch is a world of one, with no process group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fseft.errors import ConfigError, FseftError, InputFileError


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job. `device` is the one it computes on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: the local rank's GPU if CUDA is available, else CPU; ``"cuda"``: the local
    rank's GPU; ``"cpu"``; or an explicit ``"cuda:N"``."""
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        resolved = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available (torch {torch.__version__})")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return resolved


@contextlib.contextmanager
def distributed_context(device: str = "auto", timeout_s: float | None = None) -> Iterator[DistributedContext]:
    """Join the `torchrun` job described by the environment (if any) for the block.

    Initialises the default process group (NCCL for CUDA devices, gloo for CPU) when
    ``WORLD_SIZE > 1`` and no group exists yet, and destroys it on exit if it made it.
    `timeout_s` bounds how long a rank waits for its peers in a collective (joining included)
    before it fails; None takes ``FSEFT_DDP_TIMEOUT_S`` from the environment, else 1800 s.
    """
    if timeout_s is None:
        timeout_s = float(_env_int("FSEFT_DDP_TIMEOUT_S", 1800))
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    resolved = resolve_device(device, local_rank)
    if world_size == 1:
        yield DistributedContext(device=resolved)
        return
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    created = not dist.is_initialized()
    if created:
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ConfigError(f"WORLD_SIZE={world_size} but {var} is not set; launch with torchrun")
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    else:
        backend = dist.get_backend()
    try:
        yield DistributedContext(rank, local_rank, world_size, resolved, backend)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if ctx.is_distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum of `tensor` over ranks (a new tensor; the input is left as is)."""
    out = tensor.detach().clone()
    if ctx.is_distributed:
        if ctx.backend == "nccl":
            out = out.to(ctx.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def broadcast_object(obj: Any, ctx: DistributedContext, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects; errors found on rank 0, etc.)."""
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def wrap_model(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """`model` on `ctx.device`, in `DistributedDataParallel` when the world has several ranks.

    DDP broadcasts rank 0's parameters at construction, so all ranks start identical."""
    model = model.to(ctx.device)
    if not ctx.is_distributed:
        return model

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or `model` itself)."""

    return model.module if isinstance(model, DistributedDataParallel) else model


def main_first(ctx: DistributedContext, fn: Any, *args: Any) -> Any:
    """Run `fn` on rank 0 and share its result, or its error, with every rank."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args)
        except FseftError as exc:
            error = (type(exc).__name__, str(exc))
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        kind = {"InputFileError": InputFileError}.get(error[0], ConfigError)
        raise kind(error[1])
    return result
