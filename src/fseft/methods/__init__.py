"""Adaptation methods: one registry of every method `fseft adapt` trains, by name.

A method is one module of this package: a config dataclass (a `MethodConfig`: its options,
help texts in ``field(metadata={"help": ...})``) plus how it is built and the hooks of its
lifecycle, registered with `register_method` (`fseft.methods.registry`). Each says its `kind`:

- ``"features"`` (black-box): a `FeatureAdapter` trained on the cached frozen features of the
  base model (`linear_probe`, `spatial_adapter`; `fseft.methods.features`).
- ``"network"`` (fine-tuning / encoder PEFT): a ``prepare(model, cfg, parts)`` function that
  changes or extends the network itself, trained on image patches end to end
  (`peft_methods`, `lora`, `adaptformer`, `arena`)::

      @register_method("bitfit", BitFitConfig, "train the encoder's biases", kind="network")
      def _prepare_bitfit(model, cfg, parts): ...

      model = peft_methods.apply_method(base, "lora", ["liver"], decoder="fine-tuned", rank=4)

The modules of this package are imported the first time a method is looked up
(`get_method`, `available_methods`), so adding a method adds one module and nothing else.

The built-in methods' config dataclasses are re-exported here, one per method (its options,
typed, with the method's protocol defaults), for the Python API
(``fseft.adapt(..., method=fseft.methods.LoraConfig(rank=8))``): `LinearProbeConfig` (``lp``),
`GeneralizationConfig` (``generalization``), `SpatialAdapterConfig` (``spatial-adapter``),
`FineTuneConfig` (``ft``), `FineTuneLastConfig` (``ft-last``), `ScratchConfig` (``scratch``),
`DecoderConfig` (``decoder``), `BitFitConfig` (``bitfit``), `AffineConfig` (``affine``),
`LoraConfig` (``lora``; the class `fseft.methods.lora.LoraMethodConfig`, not peft's
``LoraConfig``), `AdaptFormerConfig` (``adaptformer``), `ArenaConfig` (``arena``), and
`TransductiveConfig` (the ``ti`` option of `fseft.adapt`).
"""

from fseft.methods.features import (
    FeatureAdapter,
    adapter_on,
    build_adapter,
    count_trainable_parameters,
    iter_slab_logits,
    predict_cached,
)
from fseft.methods.head import foreground_fractions, head_rows, init_head, init_head_prior

# the built-in methods' configs, imported in `registry.BUILTIN_MODULES`' order (the order the
# methods are registered, hence listed, in)
from fseft.methods.linear_probe import GeneralizationConfig, LinearProbeConfig
from fseft.methods.spatial_adapter import SpatialAdapterConfig
from fseft.methods.peft_methods import (
    AffineConfig,
    BitFitConfig,
    DecoderConfig,
    FineTuneConfig,
    FineTuneLastConfig,
    ScratchConfig,
)
from fseft.methods.lora import LoraMethodConfig as LoraConfig
from fseft.methods.adaptformer import AdaptFormerConfig
from fseft.methods.arena import ArenaConfig
from fseft.methods.transductive import TransductiveConfig
from fseft.methods.registry import (
    METHOD_KINDS,
    MethodConfig,
    MethodSpec,
    available_methods,
    describe_methods,
    get_method,
    register_method,
)

__all__ = [
    "METHOD_KINDS",
    "AdaptFormerConfig",
    "AffineConfig",
    "ArenaConfig",
    "BitFitConfig",
    "DecoderConfig",
    "FineTuneConfig",
    "FineTuneLastConfig",
    "GeneralizationConfig",
    "LinearProbeConfig",
    "LoraConfig",
    "ScratchConfig",
    "SpatialAdapterConfig",
    "TransductiveConfig",
    "FeatureAdapter",
    "MethodConfig",
    "MethodSpec",
    "adapter_on",
    "available_methods",
    "build_adapter",
    "count_trainable_parameters",
    "describe_methods",
    "foreground_fractions",
    "get_method",
    "head_rows",
    "init_head",
    "init_head_prior",
    "iter_slab_logits",
    "predict_cached",
    "register_method",
]
