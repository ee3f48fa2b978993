import json
import faulthandler
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fseft.training.distributed import distributed_context, resolve_device
from fseft.errors import ConfigError
from fseft.models.base import SegmentationModel

sys.path.insert(0, str(Path(__file__).parent))
from tiny_cases import tiny_assembly  # noqa: E402  (the tiny partial-label datasets)


class TinySegmenter(SegmentationModel):
    """Two convolutions, GroupNorm: per-sample normalisation, so that the loss of a batch split
    over ranks equals that of the whole batch (BatchNorm statistics would depend on the split)."""

    arch = "tiny_test"

    def __init__(self, class_names, channels: int = 4) -> None:
        super().__init__(class_names, feature_channels=channels)
        self.body = nn.Sequential(nn.Conv3d(1, channels, 3, padding=1), nn.GroupNorm(1, channels), nn.ReLU(),
                                  nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU())
        self.arch_kwargs = {"channels": channels}

    def features(self, x):
        return self.body(x)


def _register_tiny():
    from fseft.models import zoo

    zoo.ARCHITECTURES["tiny_test"] = TinySegmenter


def _assembly(root: Path, validation: bool = False, **train):
    from fseft.pretraining import assembly_from_dict

    data = tiny_assembly(root, **train)
    data["model"] = {"arch": "tiny_test"}
    if validation:
        data["validation"] = {"path": "A", "every": 1}
    return assembly_from_dict(data, base_dir=root)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_bounded(worker, args: tuple, nprocs: int, limit_s: float) -> None:
    """`mp.spawn` that fails the test after `limit_s` instead of hanging CI when a rank never
    returns (e.g. its peer lost the race for the port between `_free_port` and binding)."""
    import time

    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            # each rank that is still running prints where it is (faulthandler, registered by
            # the worker) before it is killed: the one hang seen in CI left no trace
            alive = [p for p in context.processes if p.is_alive()]
            for process in alive:
                os.kill(process.pid, signal.SIGUSR1)
            time.sleep(2)
            for process in alive:
                process.kill()
            pytest.fail(f"the {nprocs} DDP ranks did not finish within {limit_s:.0f} s "
                        f"(exit codes {[p.exitcode for p in context.processes]})")


# the v3 recipe's sampling: class-balanced datasets and patches, prior-initialised head, and a
# validation set that rank 0 scores while the other ranks wait
RECIPE = {"sampling": "classes", "balance_classes": True, "head_prior": 0.05}


def _ddp_worker(rank: int, world_size: int, port: int, root: str, options: dict) -> None:
    # a rank whose peer is gone fails after 120 s instead of waiting the default 30 minutes
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FSEFT_DDP_TIMEOUT_S="120")
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `_spawn_bounded` asks a stuck rank where it is
    _register_tiny()
    from fseft.pretraining import pretrain

    result = pretrain(_assembly(Path(root), epochs=1, batch_size=1, device="cpu", **options), Path(root) / "ddp")
    torch.save({"weights": result.model.state_dict(), "history": result.history},
               Path(root) / f"rank{rank}.pt")


def test_single_process_context_has_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with distributed_context("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
        assert ctx.backend is None and not torch.distributed.is_initialized()
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        with distributed_context("cpu"):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {**RECIPE, "validation": True}], ids=["defaults", "v3-recipe"])
def test_two_gloo_ranks_match_a_single_process_with_the_same_global_batch(tmp_path, monkeypatch, options):
    from fseft.pretraining import pretrain
    from fseft.models import zoo
    from fseft.utils import seed_everything

    # two volumes (one per dataset): each rank takes one volume per step, the single process two
    _assembly(tmp_path)  # writes the datasets once, before the ranks start
    _spawn_bounded(_ddp_worker, (2, _free_port(), str(tmp_path), options), nprocs=2, limit_s=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    monkeypatch.setitem(zoo.ARCHITECTURES, "tiny_test", TinySegmenter)
    single = pretrain(_assembly(tmp_path, epochs=1, batch_size=2, device="cpu", **options), tmp_path / "single")

    # DDP all-reduces the gradients: both ranks apply the same update
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
    # ... which is the update of the whole batch on one process
    reference = single.model.state_dict()
    for key, value in ranks[0]["weights"].items():
        assert torch.allclose(value, reference[key], atol=1e-6, rtol=1e-5), key
    seed_everything(0)  # the initial weights, as pretrain draws them
    initial = TinySegmenter(single.model.class_names).state_dict()
    assert all(not torch.allclose(initial[k], reference[k]) for k in initial if k.endswith("weight"))
    assert ranks[0]["history"][0]["steps"] == 1 and single.history[0]["steps"] == 1
    assert ranks[0]["history"][0]["world_size"] == 2
    assert ranks[0]["history"][0]["loss"] == pytest.approx(single.history[0]["loss"], rel=1e-5)
    # only rank 0 wrote the log, the checkpoint and the model file
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and (tmp_path / "ddp" / "model.safetensors").exists()
    if options.get("validation"):  # rank 0 scored the same model as the single process
        assert log[0]["val_dice"] == pytest.approx(single.history[0]["val_dice"], abs=1e-6)
        assert set(log[0]["val_dice"]) == {"liver", "spleen"}
