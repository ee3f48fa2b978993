"""Linear probe (`lp`) and the pre-trained head as it is (`generalization`).

Both are a 1x1x1 convolution on the frozen features ``Z (B, C, X, Y, Z)``: ``C`` weights and one
bias per output (49 parameters per structure for the 48-channel Swin-UNETR). The probe starts
from the pre-trained head's row when the structure is in the base model's catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fseft.methods.features import FeatureAdapter
from fseft.methods.registry import MethodConfig, register_method


@dataclass
class LinearProbeConfig(MethodConfig):
    """Options of `lp`: `init_from_head` copies the pre-trained head's rows of known structures."""

    default_lr: ClassVar[float] = 1e-1
    default_epochs: ClassVar[int] = 50
    protocol_source: ClassVar[str] = "FSEFT run commands (experiments_sample.txt): lr 1e-1, 50 epochs"


@dataclass
class GeneralizationConfig(MethodConfig):
    """`generalization`: the base model's own head, no training (known structures only)."""

    trainable: ClassVar[bool] = False
    needs_known_structures: ClassVar[bool] = True


@register_method("lp", LinearProbeConfig)
class LinearProbe(FeatureAdapter):
    """Linear probe: a 1x1x1 convolution ``C -> O`` on the frozen features."""

    halo = 0

    def __init__(self, feature_channels: int, num_outputs: int, cfg: MethodConfig | None = None) -> None:
        super().__init__(feature_channels, num_outputs)
        self.cfg = cfg or LinearProbeConfig()


@register_method("generalization", GeneralizationConfig)
class PretrainedHead(LinearProbe):
    """The pre-trained head restricted to the requested structures, evaluated without training."""

    def __init__(self, feature_channels: int, num_outputs: int, cfg: MethodConfig | None = None) -> None:
        super().__init__(feature_channels, num_outputs, cfg or GeneralizationConfig())
        self.requires_grad_(False)
