"""Adaptation methods: one registry of every method `fseft adapt` trains, by name.

A method is a config dataclass (a `MethodConfig`: its options) plus how it is built, registered
by name (the way HF peft maps a ``PeftType`` to its config and model classes). Each spec says
its `kind`:

- ``"features"`` (black-box): a `FeatureAdapter` module class trained on the cached frozen
  features of the base model (`linear_probe`, `spatial_adapter`)::

      @register_method("lp", LinearProbeConfig)
      class LinearProbe(FeatureAdapter): ...

      adapter = build_adapter("spatial-adapter", feature_channels=48, num_outputs=2, kernel_size=1)

  An adapter maps the frozen features ``Z (B, C, X, Y, Z)`` of `SegmentationModel.features` to
  logits ``(B, num_outputs, X, Y, Z)``: ``forward(z) = head(trunk(z))`` with ``head`` a 1x1x1
  ``nn.Conv3d``, so that an adapter on top of a base model is again a `SegmentationModel`.
- ``"network"`` (fine-tuning / encoder PEFT): a `prepare(model, cfg, parts)` function that
  changes or extends the network itself, trained on image patches end to end
  (`peft_methods`, `lora`, `adaptformer`, `arena`)::

      @register_method("bitfit", BitFitConfig, "train the encoder's biases", kind="network")
      def _prepare_bitfit(model, cfg, parts): ...

      model = peft_methods.apply_method(base, "lora", ["liver"], decoder="fine-tuned", rank=4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fseft.errors import ConfigError


@dataclass
class MethodConfig:
    """Base of the per-method options (what `--kernel-size` and the like map onto).

    Class attributes, the method's default training protocol (`AdaptConfig` fields left at
    None take them; see `fseft.engine.adapt.AdaptConfig.resolved`):
    `default_lr` (AdamW learning rate), `default_epochs`, `default_batch_size` (support volumes
    per optimiser step), `default_patches_per_volume`, and `protocol_source` (where the numbers
    come from: the FSEFT authors' run commands, a paper, or fseft's own choice). Also
    `trainable` (False for methods evaluated as they are) and `needs_known_structures` (every
    structure must be in the base model's catalogue).
    """

    default_lr: ClassVar[float] = 1e-3
    default_epochs: ClassVar[int] = 100
    default_batch_size: ClassVar[int] = 1
    default_patches_per_volume: ClassVar[int] = 6
    protocol_source: ClassVar[str] = "fseft (not in the published run commands; the epochs and patches of the reference runs)"
    trainable: ClassVar[bool] = True
    needs_known_structures: ClassVar[bool] = False
    init_from_head: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def warms_up_head(self) -> bool:
        """Whether `fseft adapt` fits the head as a linear probe on the base's frozen features
        before training by default (LP-FT, `fseft.engine.adapt.probe_head`): for network
        methods whose head, at step 0, reads the pre-trained features unchanged."""
        return False


class FeatureAdapter(nn.Module):
    """A module on frozen features: ``forward(z (B, C, X, Y, Z)) -> logits (B, O, X, Y, Z)``.

    Subclasses set `trunk` (a module mapping ``C -> C`` channels; identity for a linear probe)
    and `halo`, the number of voxels of context each side the trunk reads (0 for pointwise
    modules), which `iter_slab_logits` uses to process a whole volume slab by slab exactly.
    """

    halo: int = 0

    def __init__(self, feature_channels: int, num_outputs: int) -> None:
        super().__init__()
        self.feature_channels = int(feature_channels)
        self.num_outputs = int(num_outputs)
        self.trunk: nn.Module = nn.Identity()
        self.head = nn.Conv3d(self.feature_channels, self.num_outputs, kernel_size=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(z))

    @torch.no_grad()
    def init_head(self, base_head: nn.Conv3d | None, rows: Sequence[int | None]) -> None:
        """Copy rows of a pre-trained 1x1x1 head into this head.

        `rows[i]` is the base head's output channel for this head's output ``i``, or None to
        keep the default (random) initialisation of that output. `rows` must have
        `num_outputs` entries.
        """
        if len(rows) != self.num_outputs:
            raise ValueError(f"init_head: {len(rows)} rows for {self.num_outputs} outputs")
        for i, row in enumerate(rows):
            if row is None:
                continue
            if base_head is None:
                raise ValueError("init_head: a row index was given without a base head")
            self.head.weight[i].copy_(base_head.weight[row].to(self.head.weight))
            if base_head.bias is not None:
                self.head.bias[i].copy_(base_head.bias[row].to(self.head.bias))
            else:
                self.head.bias[i].zero_()


HEAD_PRIOR_FLOOR = 1e-4


@torch.no_grad()
def init_head_prior(head: nn.Conv3d, rows: Sequence[int | None], foreground: Sequence[float],
                    multiclass: bool = False) -> list[int]:
    """Start every structure output without a pre-trained row (a structure new to the base
    model) at its foreground prior instead of p = 0.5 everywhere.

    A new output with a bias near 0 predicts half of every patch; the BCE gradient of the
    background then drives it to an empty mask that the Dice term of a small structure
    cannot pull back (the collapse seen on the phantom's gallbladder). Its bias is set to
    logit(f) (sigmoid) or log(f / f_background) (multiclass, background output 0), f the
    structure's foreground fraction in the support volumes (clipped to [`HEAD_PRIOR_FLOOR`,
    0.5]): the mean prediction then equals the prevalence the loss sees, and the BCE gradient
    on the bias starts at zero instead of pushing the whole output down. Measured on the
    phantom gallbladder (k = 5, 200 steps on cached features): Dice 0 without it, 0.20 (lp)
    and 0.42 (spatial adapter) with it, and 0 again with the prior floored at 0.01, well above
    the gallbladder's share of a 3 mm phantom.

    head: the adapted model's 1x1x1 head. rows: per output, the base row it was copied from or
    None (multiclass: output 0 is the background). foreground: one fraction per structure.
    Returns the outputs changed.
    """
    offset = int(multiclass)
    if len(rows) != head.out_channels or len(foreground) != head.out_channels - offset:
        raise ValueError(f"init_head_prior: {len(rows)} rows and {len(foreground)} fractions for "
                         f"{head.out_channels} outputs")
    fractions = np.clip(np.asarray(foreground, dtype=np.float64), HEAD_PRIOR_FLOOR, 0.5)
    background = max(1.0 - float(fractions.sum()), 0.5)
    changed = []
    for i in range(offset, head.out_channels):
        if rows[i] is not None or head.bias is None:
            continue
        f = float(fractions[i - offset])
        head.bias[i] = float(np.log(f / background) if multiclass else np.log(f / (1.0 - f)))
        changed.append(i)
    return changed


def foreground_fractions(labels: Sequence[Any]) -> list[float]:
    """Mean foreground fraction of each structure over support label volumes, each
    ``(S, X, Y, Z)`` (array or tensor, model space)."""
    per_volume = [np.asarray(lab, dtype=np.uint8).reshape(lab.shape[0], -1).mean(axis=1) for lab in labels]
    return [float(v) for v in np.mean(per_volume, axis=0)]


METHOD_KINDS = ("features", "network")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, options dataclass, kind and how it is built.

    kind: ``"features"`` (trained on cached frozen features; `module_cls` is its
        `FeatureAdapter` class) or ``"network"`` (trained on image patches through the network;
        `prepare` is its ``prepare(model, cfg, parts) -> model`` function, see
        `fseft.methods.peft_methods.apply_method`).
    uses_peft: a network method built with HF peft (saved in peft's own format).
    """

    name: str
    config_cls: type[MethodConfig]
    description: str
    kind: str = "features"
    module_cls: type[FeatureAdapter] | None = None
    prepare: Callable[..., nn.Module] | None = None
    uses_peft: bool = False

    def make_config(self, **options: Any) -> MethodConfig:
        """The method's config from keyword options; unknown options raise `ConfigError`."""
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(
                f"method {self.name!r} has no option(s) {', '.join(unknown)}; "
                f"its options are: {', '.join(sorted(names)) or 'none'}"
            )
        return self.config_cls(**options)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str, config_cls: type[MethodConfig], description: str = "", *, kind: str = "features",
    uses_peft: bool = False,
) -> Callable[[Any], Any]:
    """Decorator registering a method under `name`: a `FeatureAdapter` class (``kind="features"``)
    or a ``prepare(model, cfg, parts)`` function (``kind="network"``)."""
    if kind not in METHOD_KINDS:
        raise ValueError(f"method kind must be one of {', '.join(METHOD_KINDS)}, got {kind!r}")

    def decorate(built: Any) -> Any:
        old = _REGISTRY.get(name)
        if old is not None and built not in (old.module_cls, old.prepare):
            raise ValueError(f"method {name!r} is already registered")
        doc = description or (built.__doc__ or "").strip().splitlines()[0]
        features = kind == "features"
        _REGISTRY[name] = MethodSpec(
            name, config_cls, doc, kind,
            module_cls=built if features else None, prepare=None if features else built, uses_peft=uses_peft,
        )
        return built

    return decorate


def _load_builtin_methods() -> None:
    # Imported for their registration side effect; late so that they can import this module.
    from fseft.methods import linear_probe, spatial_adapter  # noqa: F401
    from fseft.methods import peft_methods  # noqa: F401  (ft, ft-last, scratch, bitfit, affine)
    from fseft.methods import lora, adaptformer, arena  # noqa: F401, I001


def available_methods(kind: str | None = None) -> tuple[str, ...]:
    """Names of the registered methods (of one `kind`, or all): the ``"features"`` methods,
    then the ``"network"`` ones, each in registration order."""
    _load_builtin_methods()
    kinds = METHOD_KINDS if kind is None else (kind,)
    return tuple(name for k in kinds for name, spec in _REGISTRY.items() if spec.kind == k)


def get_method(name: str, kind: str | None = None) -> MethodSpec:
    """The registered method called `name`; `ConfigError` listing the choices otherwise.

    With `kind`, a method of the other kind is a `ConfigError` too (e.g. `build_adapter` of a
    network method).
    """
    _load_builtin_methods()
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown adaptation method {name!r}; choose one of: {', '.join(available_methods())}")
    if kind is not None and spec.kind != kind:
        what = {"features": "trained on cached features", "network": "trained through the network"}
        raise ConfigError(
            f"method {name!r} is {what[spec.kind]}, not {what[kind]}; methods {what[kind]}: "
            f"{', '.join(available_methods(kind))}"
        )
    return spec


def describe_methods() -> str:
    """One line per method (name, kind, description), for help texts."""
    return "\n".join(f"{s.name:16s} {s.kind:9s} {s.description}" for s in (get_method(n) for n in available_methods()))


def build_adapter(
    method: str | MethodConfig, feature_channels: int, num_outputs: int, **options: Any
) -> FeatureAdapter:
    """Build a method's adapter module (randomly initialised; see `FeatureAdapter.init_head`).

    `method` is a registered name (then `options` are its config fields) or a config instance.
    """
    if isinstance(method, MethodConfig):
        spec = next((s for s in (get_method(n) for n in available_methods("features"))
                     if type(method) is s.config_cls), None)
        if spec is None:
            raise ConfigError(f"{type(method).__name__} is not the config of a method trained on cached features")
        cfg = method
    else:
        spec = get_method(method, kind="features")
        cfg = spec.make_config(**options)
    return spec.module_cls(feature_channels, num_outputs, cfg)


def count_trainable_parameters(module: nn.Module) -> int:
    """Number of scalar parameters with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def iter_slab_logits(
    adapter: FeatureAdapter,
    features: np.ndarray | torch.Tensor,
    slab: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Run `adapter` over a whole volume's features, slab by slab along the last axis.

    `features` is ``(C, X, Y, Z)`` (a NumPy memmap is read one slab at a time). Yields
    ``(z_slice, logits (1, O, X, Y, z_slice))``; each slab is read with `adapter.halo` extra
    slices on both sides and cropped back, so the concatenated logits equal one whole-volume
    forward. Gradients flow when called with grad enabled (the caller backpropagates each slab).
    `autocast_dtype` (e.g. ``torch.bfloat16``) runs the adapter under autocast, on slabs read in
    that dtype (no mixed-precision residual sums); otherwise slabs are read as `dtype`.
    """
    device = torch.device(device)
    depth = features.shape[-1]
    halo = int(adapter.halo)
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        a, b = max(0, z0 - halo), min(depth, z1 + halo)
        chunk = features[..., a:b]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.array(chunk))  # a writable copy of the slab only
        chunk = chunk.to(device=device, dtype=autocast_dtype or dtype).unsqueeze(0)
        amp = autocast_dtype is not None
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=amp):
            logits = adapter(chunk)
        yield slice(z0, z1), logits[..., z0 - a : z0 - a + (z1 - z0)]


__all__ = [
    "METHOD_KINDS",
    "FeatureAdapter",
    "MethodConfig",
    "MethodSpec",
    "available_methods",
    "build_adapter",
    "count_trainable_parameters",
    "describe_methods",
    "get_method",
    "iter_slab_logits",
    "register_method",
    "init_head_prior",
    "foreground_fractions",
]
