"""`lora`: low-rank adaptation (Hu et al., 2022) of the encoder through HF ``peft``.

``W x + (alpha / r) B A x`` beside each targeted layer, ``A (r, in)`` random, ``B (out, r)``
zero (so training starts from the pre-trained model). Default targets:

- Swin-UNETR: the attention's fused ``qkv`` projection (``nn.Linear(C, 3C)``) of every Swin
  block; rank 4 gives ``4 * (C + 3C)`` weights per block, 23,040 for the 48-channel encoder.
  (The FSEFT reference code gives q, k and v rank 4 each through one rank-12 factorisation
  of the fused ``qkv``: ``rank=12`` here, 69,120 weights; its paper's table says 68.1K.)
- 3D U-Net: the encoder's 3x3x3 convolutions ``down_tr*.ops.*.conv1`` (peft supports
  ``nn.Conv3d``: ``A`` is a 3x3x3 convolution ``in -> r``, ``B`` a 1x1x1 convolution
  ``r -> out``).

The decoder (when ``fine-tuned`` or ``new``) and the head are peft ``modules_to_save``: peft
trains a copy of them and stores it in ``adapter_model.safetensors`` beside the LoRA factors,
so the run folder is a plain peft adapter (``PeftModel.from_pretrained(base, run_dir)`` loads
it once the base has the run's head, see `fseft.runs.format.load_adapted`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from fseft.errors import ConfigError
from fseft.methods.peft_methods import EncoderMethodConfig, ModelParts, low_rank_targets
from fseft.methods.registry import register_method


@dataclass
class LoraMethodConfig(EncoderMethodConfig):
    """Options of `lora`.

    rank: ``r``; alpha: scaling numerator (``alpha / r`` multiplies ``B A``); dropout: on the
    LoRA branch input; target_modules: peft's ``target_modules`` (module-name suffixes, or one
    regular expression matched against full names); None takes the architecture's attention
    projections, or its encoder convolutions (``SegmentationModel.peft_targets``).
    """

    default_lr: ClassVar[float] = 1e-3
    rank: int = field(default=4, metadata={"help": "rank r of the low-rank update"})
    alpha: float = field(default=8.0, metadata={"help": "scaling numerator (alpha / r scales the update)"})
    dropout: float = 0.0
    target_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.rank) < 1:
            raise ConfigError(f"lora: rank must be >= 1, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"lora: dropout must be in [0, 1), got {self.dropout}")


def lora_config(model: nn.Module, cfg: LoraMethodConfig, parts: ModelParts):
    """The ``peft.LoraConfig`` of `cfg` for `model`'s architecture."""
    from peft import LoraConfig  # heavy (seconds: peft imports transformers); only LoRA runs need it

    targets = cfg.target_modules if cfg.target_modules is not None else low_rank_targets(model, "lora")
    decoder = parts.decoder_modules(cfg.include_skip_blocks) if cfg.decoder != "frozen" else ()
    to_save = [parts.head, *decoder]
    return LoraConfig(
        r=int(cfg.rank), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
        target_modules=targets, modules_to_save=to_save, bias="none",
    )


def merge_lora(model: nn.Module) -> nn.Module:
    """peft's ``merge_and_unload``: ``W + (alpha / r) B A`` in the base layers, the trained
    head / decoder copies in place of the originals; returns the `SegmentationModel`."""
    return model.merge_and_unload()


@register_method("lora", LoraMethodConfig, "LoRA on the encoder (HF peft)", kind="network", uses_peft=True,
                 merge=merge_lora)
def _prepare_lora(model: nn.Module, cfg: LoraMethodConfig, parts: ModelParts) -> nn.Module:
    from peft import get_peft_model  # heavy, as in lora_config

    try:
        return get_peft_model(model, lora_config(model, cfg, parts))
    except ValueError as exc:  # peft: no module matched the targets, or an unsupported layer type
        raise ConfigError(f"lora: cannot target {cfg.target_modules or 'the default modules'}: {exc}") from exc
