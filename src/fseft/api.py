"""The Python API: load a model or an adapter run, adapt a model in a few lines, and segment
scans in memory.

    import fseft

    model = fseft.load_model("phantom")                   # a zoo id or an fseft model file
    adapted = fseft.adapt(model, "data/target", "gallbladder", k=2,
                          method=fseft.methods.SpatialAdapterConfig(), max_steps=50)
    seg = adapted.predict("scan.nii.gz")                  # or a nibabel image, or (array, affine)
    seg.masks, seg.affine, seg.label_map, seg.to_nifti()  # in the scan's own geometry

The commands run the same code, so the numbers are theirs: `load_model`, `load_run` and the
`Segmenter` they return live in `fseft.prediction.segmenter`, and `fseft predict` segments every
scan with them (`fseft.prediction.predict.predict_path`); `adapt` here is
`fseft.adaptation.runner.adapt`, which `fseft adapt` runs, with the method's options as its
config dataclass and the adapted model returned in memory. Nothing here writes a file unless
given a path to write.

`import fseft` stays cheap: `fseft.load_model`, `fseft.adapt`, `fseft.load_run`,
`fseft.Segmenter` and `fseft.Segmentation` import this module (and torch) on first use.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fseft.methods
from fseft.adaptation import AdaptConfig
from fseft.adaptation import adapt as run_adapt
from fseft.adaptation.config import AUTO
from fseft.errors import ConfigError
from fseft.methods.registry import MethodConfig, available_methods, get_method
from fseft.prediction.segmenter import (  # noqa: F401  (the API's names, re-exported)
    ImageLike,
    Segmentation,
    Segmenter,
    load_model,
    load_run,
    to_volume,
)

# ---------------------------------------------------------------------------- adaptation


def method_options(method: str | MethodConfig) -> tuple[str, dict[str, Any]]:
    """``(registered method name, options)`` of `adapt`'s `method`: a name (its default
    options; ``"auto"`` too), or a method's config dataclass (`fseft.methods.LoraConfig(rank=8)`,
    one class per method): the options are the fields that differ from the class's defaults,
    as `fseft adapt` records the options given on its command line."""

    if isinstance(method, str):
        if method != AUTO:
            get_method(method)  # unknown: ConfigError listing the methods
        return method, {}
    if isinstance(method, type) and issubclass(method, MethodConfig):
        name = _config_name(method)
        raise TypeError(f"method={name}: give an instance, {name}() (its options as arguments)")
    if not isinstance(method, MethodConfig):
        raise TypeError(f"method must be a method name or a method's config (fseft.methods.LoraConfig(rank=8), ...), "
                        f"not a {type(method).__name__}")
    names = [n for n in available_methods() if get_method(n).config_cls is type(method)]
    if len(names) != 1:
        raise ConfigError(f"{_config_name(type(method))} is the config of {'no' if not names else 'several'} registered "
                          f"method(s){': ' + ', '.join(names) if names else ''}; give method=NAME instead")
    defaults = type(method)()
    options = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)
               if getattr(method, f.name) != getattr(defaults, f.name)}
    return names[0], options


def _config_name(cls: type) -> str:
    """A method config's name in `fseft.methods` (``LoraConfig`` for `LoraMethodConfig`)."""

    exported = [n for n in fseft.methods.__all__ if getattr(fseft.methods, n) is cls]
    return exported[0] if exported else cls.__name__


def adapt(
    model: str | os.PathLike | Segmenter,
    data: str | os.PathLike,
    structures: Sequence[str] | str,
    k: int,
    method: str | MethodConfig = "lp",
    *,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    **options: Any,
) -> Segmenter:
    """Few-shot adaptation of `model` to `structures` from `k` labelled cases of `data`, as
    `fseft adapt` runs it (`fseft.adaptation.runner.adapt`: the same task draw, training and scoring).

    model: a zoo id, an fseft model file, or a `Segmenter` of `load_model` (its zoo id or file is
        what the run records; one loaded with other `weights` is adapted as an in-memory model).
    data: a dataset folder (nnU-Net, TotalSegmentator or FLARE22 layout; `fseft phantom` writes
        one). The task: `k` support cases drawn with `seed`, the other cases holding the
        structures are the queries the returned model is scored on (``.metrics``).
    method: a method name (``"lp"``, ``"spatial-adapter"``, ``"lora"``, ..., ``"auto"``:
        `fseft.methods.available_methods()`) with its default options, or the method's config
        dataclass with options, e.g. ``fseft.methods.LoraConfig(rank=8, decoder="fine-tuned")``.
    out: where to write the run folder (`fseft adapt --out`: the same files); None writes no run
        folder (the run is made in a temporary folder, loaded, and removed, so that the model
        returned is exactly the one a run folder would hold). overwrite: replace a run in `out`.
    **options: `fseft.adaptation.AdaptConfig`'s fields, typed there: ``epochs``, ``max_steps``,
        ``lr``, ``batch_size``, ``patch_size``, ``patches_per_volume``, ``transductive``, ``ti``
        (a `fseft.methods.TransductiveConfig`), ``objective``, ``loss``, ``n_query``, ``cache_dir``,
        ``device``, ``bf16``, ``roi_size``, ``progress``, ... (None or absent: the method's protocol).
    Returns a `Segmenter` of the adapted model (``structures`` = the adapted ones, ``metrics``
    = the run's ``metrics.json``, ``run_dir`` = `out` or None).
    """

    name, given = method_options(method)
    cfg = _adapt_config(name, given, options)
    if out is None and cfg.save_predictions:
        raise ConfigError("save_predictions writes the query masks into the run folder: give out=FOLDER")
    base, base_for_loading = _base_of(model)
    if out is not None:
        run_adapt(base, data, structures, k, seed, out, cfg, overwrite=overwrite)
        return load_run(out, base=base_for_loading, device=cfg.device)
    tmp = Path(tempfile.mkdtemp(prefix="fseft-adapt-"))
    try:
        run_adapt(base, data, structures, k, seed, tmp / "run", cfg, overwrite=True)
        adapted = load_run(tmp / "run", base=base_for_loading, device=cfg.device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    adapted.source = adapted.run_dir = None
    return adapted


def _adapt_config(name: str, given: Mapping[str, Any], options: dict[str, Any]) -> Any:
    """`AdaptConfig(method=name, method_options=given, **options)`, with an error that points a
    method option given as a keyword (``rank=8``) at the method's config."""

    if "method_options" in options or "method" in options:
        raise TypeError("give the method and its options as method=NAME or method=fseft.methods.<Name>Config(...)")
    known = set(AdaptConfig.option_names())
    unknown = sorted(set(options) - known)
    if unknown:
        fields = {f.name for f in dataclasses.fields(get_method(name).config_cls)} if name != AUTO else set()
        misplaced = [o for o in unknown if o in fields]
        if misplaced:
            cls = _config_name(get_method(name).config_cls)
            args = ", ".join(f"{o}={options[o]!r}" for o in misplaced)
            raise TypeError(f"{', '.join(misplaced)}: option(s) of method {name!r}, not of adapt; "
                            f"give method=fseft.methods.{cls}({args})")
        raise TypeError(f"adapt() got unexpected option(s) {', '.join(unknown)}; its options are AdaptConfig's: "
                        f"{', '.join(sorted(known))}")
    return AdaptConfig(method=name, method_options=dict(given), **options)


def _base_of(model: Any) -> tuple[Any, Any]:
    """(what `fseft.adaptation.runner.adapt` is given, the `base` `load_run` loads the run onto)."""
    if isinstance(model, Segmenter):
        if model.adapted:
            raise ConfigError(f"{model!r} is already adapted; adapt a base model (fseft.load_model(ID|PATH))")
        # the id or file, so that the run records where its base is (as `fseft adapt --model`
        # does); a model loaded with other weights is given as the module (recorded in memory)
        reference = model.source if model.source is not None and model._weights is None else model.network
        return reference, model
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), None
    raise TypeError(f"model must be a zoo id, an fseft model file or a fseft.Segmenter (fseft.load_model), "
                    f"not a {type(model).__name__}")
