"""What pre-training keeps on disk besides its log: the resumable ``checkpoint.pt`` (model,
optimizer, schedule, epoch, RNG states), the initial weights of a continued run
(`transfer_weights`) and the final fseft model file."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fseft.errors import ConfigError, InputFileError
from fseft.methods.head import head_rows, init_head
from fseft.models.architectures import variant_options
from fseft.models.checkpoint import save_model_file
from fseft.pretraining.assembly import AssemblyConfig, AssemblySource
from fseft.training.distributed import unwrap_model
from fseft.utils import atomic_path

# ---------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, epoch: int,
                     identity: dict[str, Any]) -> None:
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "identity": json.dumps(identity, sort_keys=True),
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        # Python's random state is a tuple of ints, within what weights_only allows. Loaded on
        # the CPU: the RNG states must stay there (load_state_dict moves weights and optimizer
        # state to the model's device).
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise InputFileError(f"{path}: not a readable fseft pre-training checkpoint ({exc})") from exc


def transfer_weights(donor: torch.nn.Module, model: torch.nn.Module) -> str:
    """Start ``model`` from ``donor``'s weights (`AssemblyConfig.init`: continued or warm-started
    pre-training); both are `fseft.models.SegmentationModel`.

    Every tensor but the head's must exist in both with the same shape (same architecture and
    size); head rows are copied by class name (`fseft.methods.head.head_rows` / `init_head`, as
    an adapted model's head starts) for the classes both share, when the donor's head was
    trained (``model_config["head_pretrained"]``, True for fseft files); the model's other
    classes keep their fresh initialisation. Returns a one-line summary of what was copied.

    Raises:
        ConfigError: another architecture or size (names both).
    """

    ours, theirs = model.state_dict(), donor.state_dict()
    body = [k for k in ours if not k.startswith("head.")]
    absent = [k for k in body if k not in theirs]
    mismatched = [k for k in body if k in theirs and theirs[k].shape != ours[k].shape]
    if donor.arch == model.arch:
        donor_options = variant_options(donor.arch, donor.arch_kwargs)
        options = variant_options(model.arch, model.arch_kwargs)
        if donor_options != options:
            # same tensors, another function (e.g. a public Swin-UNETR's legacy patch merging)
            raise ConfigError(
                f"the initial weights were trained with {donor_options}, the assembly builds {options}: "
                "set them in the assembly's model.arch_kwargs")
    if donor.arch != model.arch or absent or mismatched:
        raise ConfigError(
            f"the initial weights are a {donor.arch} {donor.arch_kwargs}, the assembly builds a {model.arch} "
            f"{model.arch_kwargs}: they must be the same architecture and size"
            + (f" ({len(absent)} tensors missing, e.g. {absent[0]})" if absent else "")
            + (f" ({len(mismatched)} of another shape, e.g. {mismatched[0]})" if mismatched else ""))
    with torch.no_grad():
        for key in body:
            ours[key].copy_(theirs[key].to(ours[key].dtype))
    head_trained = bool((getattr(donor, "model_config", None) or {}).get("head_pretrained", True))
    rows = head_rows(donor.class_names, model.class_names, multiclass=False) if head_trained \
        else [None] * len(model.class_names)
    init_head(model.head, donor.head, rows)
    shared = [c for c, row in zip(model.class_names, rows) if row is not None]
    fresh = [c for c, row in zip(model.class_names, rows) if row is None]
    return (f"{len(body)} tensors of the network; head rows for {len(shared)} classes"
            + (f" ({', '.join(shared)})" if shared else "")
            + (f"; new head rows for {', '.join(fresh)}" if fresh else ""))




def save_final_model(model: torch.nn.Module, path: Path, assembly: AssemblyConfig, sources: list[AssemblySource],
                      epochs: int, postprocess: dict[str, Any] | None = None) -> None:

    if getattr(model, "arch_kwargs", {}).get("use_checkpoint"):
        # checkpointing is a training-time memory trade; inference loads the plain model
        model.arch_kwargs = {**model.arch_kwargs, "use_checkpoint": False}
    model.eval()
    extra = {"inference": {"roi_size": list(assembly.train.patch_size)},  # the window it was trained on
             "pretrain": {"epochs": epochs,
                          "datasets": [{"name": s.entry.name, "structures": list(s.structures),
                                        "cases": len(s.dataset.cases)} for s in sources]}}
    if assembly.init is not None:  # where the weights started (a zoo id, or a model file's name)
        extra["pretrain"]["init"] = Path(assembly.init).name
    if postprocess is not None:
        extra["postprocess"] = postprocess
    save_model_file(model, path, assembly.preprocess, extra, dtype=getattr(torch, assembly.save_dtype))
