"""The one registry of adaptation methods: a config dataclass plus how the method is built and
the hooks of its lifecycle, registered by name (as HF peft maps a ``PeftType`` to its config
and model classes, and timm a model name to its entry point).

A method is one module under `fseft.methods` that calls `register_method`; the modules of
that folder are imported the first time a method is looked up, so a new method needs no other
file: the engine calls its hooks (`MethodSpec.after_step`, `MethodSpec.merge`,
`MethodSpec.extra_metrics`) and `fseft adapt` turns the fields of its config that carry
``metadata={"help": ...}`` into command-line options (`cli_options`).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from fseft.errors import ConfigError
from fseft.utils import closest_hint

METHOD_KINDS = ("features", "network")
KIND_WORDS = {"features": "trained on cached features", "network": "trained through the network"}

#: the modules of the built-in methods, imported in this order (which is the order methods are
#: listed in); any other module of the package is found after them
BUILTIN_MODULES = ("linear_probe", "spatial_adapter", "peft_methods", "lora", "adaptformer", "arena")


@dataclass
class MethodConfig:
    """Base of the per-method options.

    Class attributes, the method's default training protocol (`AdaptConfig` fields left at
    None take them; see `fseft.adaptation.AdaptConfig.resolved`):
    `default_lr` (AdamW learning rate), `default_epochs`, `default_batch_size` (support volumes
    per optimiser step), `default_patches_per_volume`, and `protocol_source` (where the numbers
    come from: the FSEFT authors' run commands, a paper, or fseft's own choice). Also
    `trainable` (False for methods evaluated as they are) and `needs_known_structures` (every
    structure must be in the base model's catalogue).

    A field with ``metadata={"help": ...}`` (and optionally ``"metavar"``) is an option of
    `fseft adapt` (``--kernel-size`` for ``kernel_size``); its type must be int, float, str or
    bool (a flag).
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
        before training by default (LP-FT, `fseft.adaptation.network_runner.probe_head`): for network
        methods whose head, at step 0, reads the pre-trained features unchanged."""
        return False


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, options dataclass, kind, how it is built, and its hooks.

    kind: ``"features"`` (trained on cached frozen features; `module_cls` is its
        `fseft.methods.features.FeatureAdapter` class) or ``"network"`` (trained on image
        patches through the network; `prepare` is its ``prepare(model, cfg, parts) -> model``
        function, see `fseft.methods.peft_methods.apply_method`).
    uses_peft: a network method built with HF peft (saved in peft's own format).
    after_step: ``(model, optimizer) -> None``, called after every optimiser step (ARENA's
        proximal step on its rank gates).
    merge: ``(model) -> model`` folding the method into plain base weights for inference (LoRA,
        ARENA); without it the trained model is already plain, or cannot be folded.
    extra_metrics: ``(model) -> dict``, entries the method adds to ``metrics.json`` after
        training (ARENA's effective ranks); `metrics_lines` ``(metrics) -> list[str]`` says them
        in the `fseft adapt` summary.
    """

    name: str
    config_cls: type[MethodConfig]
    description: str
    kind: str = "features"
    module_cls: type | None = None
    prepare: Callable[..., Any] | None = None
    uses_peft: bool = False
    after_step: Callable[[Any, Any], None] | None = None
    merge: Callable[[Any], Any] | None = None
    extra_metrics: Callable[[Any], dict[str, Any]] | None = None
    metrics_lines: Callable[[dict[str, Any]], list[str]] | None = None

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
_HOOKS = ("after_step", "merge", "extra_metrics", "metrics_lines")


def register_method(
    name: str, config_cls: type[MethodConfig], description: str = "", *, kind: str = "features",
    uses_peft: bool = False, **hooks: Callable[..., Any] | None,
) -> Callable[[Any], Any]:
    """Decorator registering a method under `name`: a `FeatureAdapter` class (``kind="features"``)
    or a ``prepare(model, cfg, parts)`` function (``kind="network"``), with its optional hooks
    (`MethodSpec`: ``after_step``, ``merge``, ``extra_metrics``, ``metrics_lines``)."""
    if kind not in METHOD_KINDS:
        raise ValueError(f"method kind must be one of {', '.join(METHOD_KINDS)}, got {kind!r}")
    unknown = sorted(set(hooks) - set(_HOOKS))
    if unknown:
        raise ValueError(f"register_method: no hook(s) {', '.join(unknown)}; the hooks are {', '.join(_HOOKS)}")

    def decorate(built: Any) -> Any:
        old = _REGISTRY.get(name)
        if old is not None and built not in (old.module_cls, old.prepare):
            raise ValueError(f"method {name!r} is already registered")
        doc = description or (built.__doc__ or "").strip().splitlines()[0]
        features = kind == "features"
        _REGISTRY[name] = MethodSpec(
            name, config_cls, doc, kind,
            module_cls=built if features else None, prepare=None if features else built, uses_peft=uses_peft,
            **hooks,
        )
        return built

    return decorate


def unregister_method(name: str) -> None:
    """Remove a registered method (tests that register one of their own)."""
    _REGISTRY.pop(name, None)


def _load_methods() -> None:
    """Import the modules of `fseft.methods` (the built-in ones first) for their registrations;
    a module already imported is not imported again."""
    package = importlib.import_module("fseft.methods")
    found = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    for name in (*BUILTIN_MODULES, *sorted(set(found) - set(BUILTIN_MODULES))):
        importlib.import_module(f"fseft.methods.{name}")


def available_methods(kind: str | None = None) -> tuple[str, ...]:
    """Names of the registered methods (of one `kind`, or all): the ``"features"`` methods,
    then the ``"network"`` ones, each in registration order."""
    _load_methods()
    kinds = METHOD_KINDS if kind is None else (kind,)
    return tuple(name for k in kinds for name, spec in _REGISTRY.items() if spec.kind == k)


def get_method(name: str, kind: str | None = None) -> MethodSpec:
    """The registered method called `name`; `ConfigError` listing the choices otherwise.

    With `kind`, a method of the other kind is a `ConfigError` too (e.g. `build_adapter` of a
    network method).
    """
    _load_methods()
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown adaptation method {name!r}{closest_hint(name, available_methods())}; "
                          f"choose one of: {', '.join(available_methods())}")
    if kind is not None and spec.kind != kind:
        raise ConfigError(
            f"method {name!r} is {KIND_WORDS[spec.kind]}, not {KIND_WORDS[kind]}; methods {KIND_WORDS[kind]}: "
            f"{', '.join(available_methods(kind))}"
        )
    return spec


def spec_of_config(cfg: MethodConfig, kind: str) -> MethodSpec:
    """The registered method of `kind` whose config class `cfg` is; `ConfigError` otherwise."""
    spec = next((s for s in (get_method(n) for n in available_methods(kind)) if type(cfg) is s.config_cls), None)
    if spec is None:
        what = {"features": "a method trained on cached features", "network": "a fine-tuning method"}[kind]
        raise ConfigError(f"{type(cfg).__name__} is not the config of {what}")
    return spec


def describe_methods() -> str:
    """One line per method (name, kind, description), for help texts."""
    return "\n".join(f"{s.name:16s} {s.kind:9s} {s.description}" for s in (get_method(n) for n in available_methods()))


def methods_in_words() -> str:
    """The methods by kind, for help texts: ``"lp, ... (trained on cached features); ft, ...
    (trained through the network)"``."""
    return "; ".join(f"{', '.join(available_methods(k))} ({KIND_WORDS[k]})" for k in METHOD_KINDS if available_methods(k))


def protocol_defaults(name: str) -> str:
    """A protocol default (``"lr"``, ``"epochs"``, ``"batch_size"``, ``"patches_per_volume"``:
    `MethodConfig.default_<name>`) over the methods, for help texts: ``"1e-1 lp, 1e-2
    spatial-adapter and ft-last, ..., 1e-3 the others"`` (the commonest value last)."""
    values: dict[Any, list[str]] = {}
    for method in available_methods():
        values.setdefault(getattr(get_method(method).config_cls, f"default_{name}"), []).append(method)
    commonest = max(values, key=lambda v: len(values[v]))
    text = [f"{_number(v)} {' and '.join(ms) if len(ms) < 3 else ', '.join(ms)}" for v, ms in values.items() if v != commonest]
    return ", ".join([*text, f"{_number(commonest)} the others"])


def _number(value: Any) -> str:
    return f"{value:.0e}".replace("e-0", "e-") if isinstance(value, float) and value < 0.1 + 1e-12 else f"{value:g}"


# ---------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class CliOption:
    """One `fseft adapt` option made from the config fields of that name: ``--<name>`` with
    its type, help (the first method's, then which methods have it and their defaults)."""

    name: str
    type: type
    help: str
    metavar: str | None
    methods: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _field_type(config_cls: type, name: str) -> type:
    hint = typing.get_type_hints(config_cls)[name]
    if hint not in (int, float, str, bool):
        raise TypeError(f"{config_cls.__name__}.{name}: a command-line option must be int, float, str or bool, not {hint}")
    return hint


def cli_options() -> list[CliOption]:
    """The options of every registered method's config fields that have ``metadata["help"]``,
    one per field name (shared by the methods that have a field of that name), in the order the
    methods and their fields are registered. Help: ``"<methods>: <help> (default: ...)"``."""
    fields: dict[str, list[tuple[str, dataclasses.Field, type]]] = {}
    for method in available_methods():
        cls = get_method(method).config_cls
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                fields.setdefault(f.name, []).append((method, f, _field_type(cls, f.name)))
    options = []
    for name, entries in fields.items():
        types = {t for _, _, t in entries}
        if len(types) > 1:
            raise TypeError(f"option {name!r} has different types in different methods: {sorted(t.__name__ for t in types)}")
        methods = tuple(m for m, _, _ in entries)
        defaults: dict[str, list[str]] = {}
        for method, f, _ in entries:
            default = f.default if f.default is not dataclasses.MISSING else None
            defaults.setdefault(_default_text(default), []).append(method)
        if len(defaults) == 1:
            default_text = next(iter(defaults))
        else:
            default_text = ", ".join(f"{value} ({', '.join(ms)})" for value, ms in defaults.items())
        first = entries[0][1]
        help_text = f"{', '.join(methods)}: {first.metadata['help']} (default: {default_text})"
        options.append(CliOption(name, types.pop(), help_text, first.metadata.get("metavar"), methods))
    return options


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
