"""Fine-tuning and parameter-efficient fine-tuning (PEFT) of the whole network (issue 6).

Unlike the black-box adapters of `fseft.methods` (small modules on cached frozen features),
these methods change or extend the network itself and train on images end to end. Each is a
config dataclass (a `MethodConfig`) plus a `prepare` function registered by name::

    model = apply_method(base, "lora", structures=["liver", "gallbladder"], decoder="fine-tuned", rank=4)
    params = [p for p in model.parameters() if p.requires_grad]      # what the optimiser gets
    ... after each optimizer.step(): post_step(model, optimizer)     # the method's after-step hook
    save_adapter(model, run_dir); load_adapted(fresh_base, run_dir)   # fseft.runs.format

They are registered in the one method registry of `fseft.methods` with ``kind="network"``
(``register_method(name, config_cls, description, kind="network")`` on the `prepare` function);
their configs subclass `MethodConfig` (``default_lr``, ``to_dict``). `fseft adapt` trains them on
image patches (`fseft.adaptation.runner`), the ``"features"`` methods on cached features.

The parts of each architecture (what "encoder", "decoder", "last block" mean) are declared by
the architecture class itself (`fseft.models.base.ModelParts`, ``SegmentationModel.parts``):

- Swin-UNETR: encoder = ``swinViT`` (the Swin transformer, 8.06M parameters at feature_size
  48); decoder = ``decoder1..5`` (19.6M, the FSEFT paper's "decoder" count, and what its code
  unfreezes: parameters named ``decoder*``); last decoder block = ``decoder1``. The UNETR
  convolutional blocks on the skip connections and the bottleneck, ``encoder1..4`` and
  ``encoder10`` (34.5M, named "encoder" by MONAI), are `ModelParts.skip_blocks`: frozen with the
  encoder, unless ``include_skip_blocks=True`` makes ``--decoder`` apply to them too (54.1M;
  needed with the self-supervised checkpoint, which has no weights for them).
- 3D U-Net: encoder = ``down_tr64..down_tr512``; decoder = ``up_tr256..up_tr64``;
  last decoder block = ``up_tr64``; no skip blocks.
- head: the 1x1x1 ``head``, always trainable; rebuilt for the requested structures, each row
  copied from the pre-trained head when the structure is in ``model.class_names``.

``--decoder`` of every encoder method: ``frozen`` (decoder weights fixed), ``fine-tuned``
(trainable from the pre-trained weights) or ``new`` (re-initialised, trainable).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fseft.errors import ConfigError
from fseft.methods.head import head_rows, init_head
from fseft.methods.registry import MethodConfig, get_method, register_method, spec_of_config
from fseft.models.architectures import ARCHITECTURES, create_model
from fseft.models.base import ModelParts

DECODER_MODES = ("frozen", "fine-tuned", "new")
DECODER_HELP = {"help": "the decoder is frozen, fine-tuned, or re-initialised and trained",
                "metavar": "frozen|fine-tuned|new"}
SKIP_BLOCKS_HELP = {"help": "--decoder also applies to Swin-UNETR's encoder1..4 / encoder10 skip blocks"}
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

# ---------------------------------------------------------------------------- model parts


def unwrap(model: nn.Module) -> nn.Module:
    """The `SegmentationModel` inside a peft `PeftModel` (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_parts(model: nn.Module) -> ModelParts:
    """The encoder / decoder split `model`'s architecture declares (``SegmentationModel.parts``)."""
    parts = getattr(unwrap(model), "parts", None)
    if parts is None:
        known = ", ".join(name for name, cls in ARCHITECTURES.items() if cls.parts is not None)
        raise ConfigError(f"encoder fine-tuning methods know the architectures {known}, not "
                          f"{getattr(unwrap(model), 'arch', '')!r} (it declares no encoder / decoder parts)")
    return parts


def peft_targets(model: nn.Module, kind: str) -> list[str] | str | None:
    """The layers of one `kind` (``"attention"``, ``"mlp"``, ``"conv"``) that `model`'s
    architecture offers the encoder PEFT methods (``SegmentationModel.peft_targets``), or None."""
    return dict(getattr(unwrap(model), "peft_targets", {}) or {}).get(kind)


def matches_targets(name: str, targets: list[str] | str) -> bool:
    """Whether module `name` is one of `targets` in peft's ``target_modules`` form: one regular
    expression matched against the full name, or a list of names / name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def low_rank_targets(model: nn.Module, method: str) -> list[str] | str:
    """The default layers of the low-rank methods: the attention projections, or the encoder
    convolutions of an architecture without attention."""
    targets = peft_targets(model, "attention") or peft_targets(model, "conv")
    if not targets:
        raise ConfigError(f"{method}: the {getattr(unwrap(model), 'arch', '')!r} architecture declares no attention or "
                          "convolution layers to adapt; give target_modules")
    return targets


def part_parameters(model: nn.Module, names: Sequence[str]) -> Iterator[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of the top-level modules `names`."""
    base = unwrap(model)
    for name in names:
        for sub, p in getattr(base, name).named_parameters():
            yield f"{name}.{sub}", p


@torch.no_grad()
def reinitialize(module: nn.Module) -> None:
    """Draw fresh weights for every sub-module that defines ``reset_parameters`` (PyTorch's
    default initialisation), plus MONAI's Swin relative position bias tables."""
    for sub in module.modules():
        if hasattr(sub, "reset_parameters") and callable(sub.reset_parameters):
            sub.reset_parameters()
        table = getattr(sub, "relative_position_bias_table", None)
        if isinstance(table, nn.Parameter):
            nn.init.trunc_normal_(table, std=0.02)  # MONAI's own initialisation of the table


# ---------------------------------------------------------------------------- configs


@dataclass
class FullModelConfig(MethodConfig):
    """Options of the baselines that train whole blocks (`ft`, `ft-last`, `scratch`): none but
    `init_from_head` (copy the pre-trained head rows of known structures)."""

    default_lr: ClassVar[float] = 1e-4
    default_batch_size: ClassVar[int] = 2
    default_patches_per_volume: ClassVar[int] = 3
    protocol_source: ClassVar[str] = ("FSEFT run commands: lr 1e-4, batch 2 volumes, 3 patches (150 epochs in "
                                      "their k = 30 runs; 100 here, as every other method)")

    def warms_up_head(self) -> bool:
        return True


@dataclass
class EncoderMethodConfig(MethodConfig):
    """Base options of the encoder PEFT methods.

    decoder: ``"frozen"`` | ``"fine-tuned"`` | ``"new"`` (see the module docstring).
    include_skip_blocks: the decoder option also applies to Swin-UNETR's ``encoder1..4`` and
        ``encoder10`` (no effect on the U-Net).
    """

    default_lr: ClassVar[float] = 1e-3
    decoder: str = field(default="frozen", metadata=DECODER_HELP)
    include_skip_blocks: bool = field(default=False, metadata=SKIP_BLOCKS_HELP)

    def warms_up_head(self) -> bool:
        return self.decoder != "new"  # a re-initialised decoder's features are not the probe's

    def __post_init__(self) -> None:
        if self.decoder not in DECODER_MODES:
            raise ConfigError(f"decoder must be one of {', '.join(DECODER_MODES)}, got {self.decoder!r}")


# ---------------------------------------------------------------------------- head


@torch.no_grad()
def replace_head(model: nn.Module, structures: Sequence[str], multiclass: bool = False,
                 init_from_head: bool = True) -> list[int | None]:
    """Give `model` a new 1x1x1 head with one output per structure (plus a zero-initialised
    background output 0 when `multiclass`).

    A structure in ``model.class_names`` starts from its pre-trained head row (when
    `init_from_head`); a new one keeps PyTorch's random initialisation (`init_head`). Updates
    ``model.class_names``. Returns, per output, the base row of its structure (or None).
    """
    base = unwrap(model)
    old: nn.Conv3d = base.head
    structures = tuple(structures)
    if not structures:
        raise ConfigError("at least one structure is needed for the new head")
    if len(set(structures)) != len(structures):
        raise ConfigError(f"duplicate structures: {', '.join(structures)}")
    rows = head_rows(base.class_names, structures, multiclass)
    head = nn.Conv3d(old.in_channels, len(rows), kernel_size=1).to(device=old.weight.device, dtype=old.weight.dtype)
    init_head(head, old, rows if init_from_head else [None] * len(rows), multiclass)
    base.head = head
    base.class_names = structures
    return rows


# ---------------------------------------------------------------------------- apply


def apply_method(
    model: nn.Module,
    method: str | MethodConfig,
    structures: Sequence[str] | None = None,
    *,
    multiclass: bool = False,
    **options: Any,
) -> nn.Module:
    """Prepare `model` (a `SegmentationModel`, changed in place) for fine-tuning with `method`.

    Args:
        model: the pre-trained base model.
        method: a registered name (then `options` are its config fields, e.g.
            ``decoder="fine-tuned", rank=4``) or a config instance.
        structures: outputs of the adapted model (None keeps ``model.class_names``); the head
            is always rebuilt and trainable (see `replace_head`).
        multiclass: add a background output 0 (softmax objective).
    Returns:
        the model to train: `model` itself, or for peft methods a ``peft.PeftModel`` around it
        (``.features``, ``.head``, ``.class_names`` still reach the `SegmentationModel`). Its
        parameters with ``requires_grad`` are exactly what the method trains. The method's
        record (name, options, structures) is kept as ``fseft_method`` for `save_adapter`.
    """
    if isinstance(method, MethodConfig):
        spec = spec_of_config(method, "network")
        if options:
            raise ConfigError("pass options either in the config instance or as keywords, not both")
        cfg = method
    else:
        spec = get_method(method, kind="network")
        cfg = spec.make_config(**options)
    if getattr(model, "fseft_method", None) is not None or unwrap(model) is not model:
        raise ConfigError("apply_method: this model was already prepared for a method; start from a fresh base")
    parts = model_parts(model)
    base_classes = list(model.class_names)
    structures = tuple(structures) if structures is not None else tuple(model.class_names)

    model.requires_grad_(False)
    rows = replace_head(model, structures, multiclass, init_from_head=bool(cfg.init_from_head))
    decoder = getattr(cfg, "decoder", None)
    decoder_modules = parts.decoder_modules(bool(getattr(cfg, "include_skip_blocks", False)))
    if decoder == "new" and not _is_meta(model):
        for name in decoder_modules:
            reinitialize(getattr(model, name))
    if decoder in ("fine-tuned", "new"):
        for _, p in part_parameters(model, decoder_modules):
            p.requires_grad_(True)
    model.head.requires_grad_(True)
    prepared = spec.prepare(model, cfg, parts)
    prepared.fseft_method = {
        "method": spec.name,
        "options": cfg.to_dict(),
        "structures": list(structures),
        "multiclass": bool(multiclass),
        "head_rows": rows,
        "base_class_names": base_classes,
        "arch": unwrap(prepared).arch,
        "arch_kwargs": dict(unwrap(prepared).arch_kwargs),
    }
    return prepared


def _is_meta(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "meta"


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter the method trains."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(model: nn.Module, exclude_head: bool = False) -> int:
    """Number of trainable scalars (optionally without the head, for comparison with tables
    that count the encoder adaptation alone)."""
    total = 0
    for name, p in model.named_parameters():
        if p.requires_grad and not (exclude_head and _is_head_param(name)):
            total += p.numel()
    return total


def _is_head_param(name: str) -> bool:
    parts = name.split(".")
    return "head" in parts and parts.index("head") <= 3  # head.*, base_model.model.head.*


def method_train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except that normalisation layers with frozen affine parameters stay in
    eval mode: their running statistics (BatchNorm in the U-Net) are part of the frozen base
    and must not drift, or base + saved adapter would no longer reproduce the trained model."""
    model.train()
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            params = list(module.parameters(recurse=False))
            if not any(p.requires_grad for p in params):
                module.eval()
    return model


def post_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Call after every ``optimizer.step()``: the method's ``after_step`` hook (ARENA's proximal
    step on its rank gates), if it has one."""
    hook = get_method(model.fseft_method["method"], kind="network").after_step
    if hook is not None:
        hook(model, optimizer)


# ---------------------------------------------------------------------------- counting


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory, no initialisation).
    `accelerate` (a dependency of peft) does it by patching `register_parameter`; MONAI's
    SwinUNETR cannot be built under ``torch.device("meta")`` (it calls ``.item()``)."""
    from accelerate import init_empty_weights  # ~0.7 s to import; only parameter counting (--dry-run) needs it

    with init_empty_weights(include_buffers=False):
        yield


def count_method_parameters(
    arch: str,
    method: str,
    structures: Sequence[str] = ("structure",),
    class_names: Sequence[str] | None = None,
    *,
    multiclass: bool = False,
    arch_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, int]:
    """Trainable parameters of `method` on `arch`, without weights or training (for
    ``fseft adapt --dry-run``): the model is built with empty (meta) parameters.

    Returns `parameter_breakdown`: ``{"trainable": total, "head": head scalars,
    "encoder_method": trainable scalars of the encoder and added modules, "decoder": trainable
    scalars of the decoder (and skip blocks), "total_model": all scalars of the adapted
    network}``.
    """
    class_names = tuple(class_names) if class_names is not None else tuple(structures)
    with empty_weights():
        base = create_model(arch, class_names, **(arch_kwargs or {}))
        model = apply_method(base, method, structures, multiclass=multiclass, **options)
    return parameter_breakdown(model)


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Trainable scalars split into head, decoder and encoder-side (method) parameters."""
    parts = model_parts(model)
    dec = parts.decoder + parts.skip_blocks
    head = decoder = other = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        local = name.removeprefix("base_model.model.")
        top = local.split(".")[0]
        if top == parts.head:
            head += p.numel()
        elif top in dec:
            decoder += p.numel()
        else:
            other += p.numel()
    total_model = sum(p.numel() for n, p in model.named_parameters()
                      if "modules_to_save" not in n)  # peft keeps a trainable copy of those
    return {"trainable": head + decoder + other, "head": head, "encoder_method": other,
            "decoder": decoder, "total_model": total_model}


# ---------------------------------------------------------------------------- baselines


@dataclass
class FineTuneConfig(FullModelConfig):
    """`ft`: every weight of the pre-trained network is trained."""


@dataclass
class FineTuneLastConfig(FullModelConfig):
    """`ft-last`: the last decoder block and the head are trained."""

    default_lr: ClassVar[float] = 1e-2
    default_batch_size: ClassVar[int] = 1
    default_patches_per_volume: ClassVar[int] = 6
    protocol_source: ClassVar[str] = "FSEFT run commands: lr 1e-2, 100 epochs"


@dataclass
class ScratchConfig(FullModelConfig):
    """`scratch`: random initialisation, every weight trained (the no-pre-training baseline)."""

    init_from_head: bool = False

    def warms_up_head(self) -> bool:
        return False  # no pre-trained features to probe


@register_method("ft", FineTuneConfig, "fine-tune all weights", kind="network")
def _prepare_ft(model: nn.Module, cfg: FineTuneConfig, parts: ModelParts) -> nn.Module:
    return model.requires_grad_(True)


@register_method("ft-last", FineTuneLastConfig, "fine-tune the last decoder block and the head", kind="network")
def _prepare_ft_last(model: nn.Module, cfg: FineTuneLastConfig, parts: ModelParts) -> nn.Module:
    for _, p in part_parameters(model, parts.last_block):
        p.requires_grad_(True)
    return model


@register_method("scratch", ScratchConfig, "train all weights from a random initialisation", kind="network")
def _prepare_scratch(model: nn.Module, cfg: ScratchConfig, parts: ModelParts) -> nn.Module:
    if not _is_meta(model):
        reinitialize(model)
    return model.requires_grad_(True)


@dataclass
class DecoderConfig(MethodConfig):
    """`decoder`: the encoder frozen, the decoder and the head trained (the FSEFT paper's
    decoder-only baseline; with the self-supervised checkpoint, ``include_skip_blocks``).

    decoder: ``"fine-tuned"`` (from the pre-trained weights) or ``"new"`` (re-initialised).
    include_skip_blocks: Swin-UNETR's ``encoder1..4`` / ``encoder10`` train with the decoder.
    Every trainable weight lies after the encoder, so `fseft adapt` trains it on cached encoder
    outputs (`fseft.adaptation.encoder_cache`).
    """

    default_lr: ClassVar[float] = 1e-3
    protocol_source: ClassVar[str] = ("fseft: the decoder's lr in the encoder PEFT runs (1e-3), the epochs and "
                                      "patches of the reference runs")
    decoder: str = field(default="fine-tuned", metadata=DECODER_HELP)
    include_skip_blocks: bool = field(default=False, metadata=SKIP_BLOCKS_HELP)

    def warms_up_head(self) -> bool:
        return self.decoder != "new"

    def __post_init__(self) -> None:
        if self.decoder not in ("fine-tuned", "new"):
            raise ConfigError(f"decoder: --decoder must be fine-tuned or new for the decoder method, got {self.decoder!r} "
                              "(a frozen decoder with a trained head is ft-last's head, or lp on cached features)")


@register_method("decoder", DecoderConfig, "train the decoder (and head) on a frozen encoder", kind="network")
def _prepare_decoder(model: nn.Module, cfg: DecoderConfig, parts: ModelParts) -> nn.Module:
    return model  # apply_method already made the decoder (and skip blocks) trainable


# ---------------------------------------------------------------------------- selective


@dataclass
class BitFitConfig(EncoderMethodConfig):
    """`bitfit`: the encoder's bias terms (Zaken et al., 2022).

    Biases of the linear and convolution layers and, in Swin, the attention's relative
    position bias tables. Normalisation biases are left to `affine` (the two methods select
    disjoint sets, as in the FSEFT paper's table: 210.7K for the 48-channel Swin encoder).
    """


@dataclass
class AffineConfig(EncoderMethodConfig):
    """`affine`: the encoder's normalisation affine parameters (LayerNorm weight and bias in
    Swin; BatchNorm / InstanceNorm weight and bias in the U-Net)."""


def _encoder_modules(model: nn.Module, parts: ModelParts) -> Iterator[tuple[str, nn.Module]]:
    for top in parts.encoder:
        for name, module in getattr(unwrap(model), top).named_modules():
            yield f"{top}.{name}" if name else top, module


@register_method("bitfit", BitFitConfig, "train the encoder's biases", kind="network")
def _prepare_bitfit(model: nn.Module, cfg: BitFitConfig, parts: ModelParts) -> nn.Module:
    for _, module in _encoder_modules(model, parts):
        if isinstance(module, NORM_TYPES):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if pname == "bias" or pname.endswith("_bias_table"):
                p.requires_grad_(True)
    return model


@register_method("affine", AffineConfig, "train the encoder's normalisation affine parameters", kind="network")
def _prepare_affine(model: nn.Module, cfg: AffineConfig, parts: ModelParts) -> nn.Module:
    found = False
    for _, module in _encoder_modules(model, parts):
        if isinstance(module, NORM_TYPES):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
                found = True
    if not found:
        raise ConfigError("affine: the encoder has no normalisation layer with affine parameters")
    return model


__all__ = [
    "DECODER_MODES",
    "AffineConfig",
    "BitFitConfig",
    "DecoderConfig",
    "EncoderMethodConfig",
    "FineTuneConfig",
    "FineTuneLastConfig",
    "FullModelConfig",
    "ModelParts",
    "ScratchConfig",
    "apply_method",
    "count_method_parameters",
    "count_trainable",
    "empty_weights",
    "low_rank_targets",
    "matches_targets",
    "method_train_mode",
    "model_parts",
    "peft_targets",
    "parameter_breakdown",
    "post_step",
    "replace_head",
    "reinitialize",
    "trainable_parameters",
    "unwrap",
]
