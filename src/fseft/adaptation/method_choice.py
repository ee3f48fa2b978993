"""Automatic method choice (`fseft adapt --method auto`) from the support set alone.

The query cases are never looked at: with k >= 2 every candidate is trained on k - 1 support
volumes and scored (Dice, threshold + largest component, in the scan's native geometry, as any
query) on the volume left out, once per support volume (leave-one-out); the candidate with the
best mean Dice is then trained on all k. With k = 1 there is nothing to hold out, and a rule
decides: a structure the base model knows goes to the first black-box (``features``) candidate,
a new one to the first network candidate (the FSEFT paper's findings: black-box adapters recover
known structures, PEFT with a trained decoder learns new ones).

Candidates (`MethodEntry`): a registered method id, ``METHOD+ti`` (a feature method with the
transductive size constraint), ``METHOD+dec`` / ``METHOD+newdec`` (a network method with
``decoder="fine-tuned"`` / ``"new"``, as `fseft models --adapters` labels them);
an experiment file's ``auto`` row may also name its other rows. The cost is bounded by
``auto_budget``: optimiser steps for all the leave-one-out runs together, shared equally by the
candidates (a candidate capped lower by its own ``max_steps`` leaves its rest to the others);
black-box candidates reuse the feature cache, so each fold costs them only the adapter training.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from fseft.adaptation.config import AUTO, AUTO_OPTIONS, AdaptConfig
from fseft.adaptation.executor import ExecutorConfig, RunsFailedError, Task, make_executor
from fseft.data.datasets import check_cases, open_dataset
from fseft.data.tasks import FewShotTask
from fseft.errors import ConfigError
from fseft.methods import available_methods, get_method
from fseft.models.zoo import describe_model
from fseft.runs.load import METRICS_FILE, mean_query_dice
from fseft.utils import closest_hint, write_json

if TYPE_CHECKING:  # `fseft --help` imports no torch (the benchmark imports this module)
    from torch import nn

DEFAULT_CANDIDATES = ("spatial-adapter+ti", "spatial-adapter", "lp", "lora+dec")
DEFAULT_BUDGET = 2000
#: hidden work folder of the leave-one-out runs inside the run folder (removed when done)
FOLDS_DIR = ".auto-folds"
_DECODER_SUFFIXES = {"+dec": "fine-tuned", "+newdec": "new"}
_SUFFIXES = ("+ti", *_DECODER_SUFFIXES)


@dataclass
class MethodEntry:
    """A method with its options and `AdaptConfig` overrides, under a name: a row of a benchmark,
    a candidate of ``--method auto``."""

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_candidate(text: str | Mapping[str, Any]) -> MethodEntry:
    """A candidate from its name (``lp``, ``spatial-adapter+ti``, ``lora+dec``, ``lora+newdec``) or from a
    `MethodEntry` mapping (what an experiment file's named rows become). `ConfigError` for an
    unknown method (with the closest name) or a suffix the method cannot take."""

    if isinstance(text, Mapping):
        try:
            entry = MethodEntry(str(text["name"]), str(text["method"]), dict(text.get("options") or {}),
                                dict(text.get("overrides") or {}))
        except KeyError as exc:
            raise ConfigError(f"--candidates: a candidate mapping needs 'name' and 'method', got {dict(text)!r}") from exc
        get_method(entry.method).make_config(**entry.options)
        return entry
    name = str(text).strip()
    method, suffix = name, ""
    for end in _SUFFIXES:
        if name.endswith(end):
            method, suffix = name[: -len(end)], end
    if method == AUTO or method not in available_methods():
        choices = list(available_methods())
        raise ConfigError(f"--candidates: unknown method {method!r}{closest_hint(method, choices)}; "
                          f"candidates are method ids ({', '.join(choices)}), METHOD+ti (feature methods with the "
                          "size constraint), METHOD+dec or METHOD+newdec (network methods with a fine-tuned or new "
                          "decoder)")
    spec = get_method(method)
    if suffix == "+ti" and spec.kind != "features":
        raise ConfigError(f"--candidates: {name}: the size constraint (+ti) trains on cached features; "
                          f"{method} is trained through the network")
    options: dict[str, Any] = {}
    if suffix in _DECODER_SUFFIXES:
        if "decoder" not in {f.name for f in dataclasses.fields(spec.config_cls)}:
            raise ConfigError(f"--candidates: {name}: {method} has no --decoder option ({suffix} trains the decoder "
                              "of an encoder method such as lora)")
        options["decoder"] = _DECODER_SUFFIXES[suffix]
    overrides = {"transductive": True} if suffix == "+ti" else {}
    return MethodEntry(name, method, options, overrides)


def parse_candidates(candidates: Sequence[str | Mapping[str, Any]] | None) -> list[MethodEntry]:
    """The candidates of an `AdaptConfig` (None: `DEFAULT_CANDIDATES`), each parsed, names unique."""
    entries = [parse_candidate(c) for c in (DEFAULT_CANDIDATES if candidates is None else candidates)]
    if not entries:
        raise ConfigError("--candidates: give at least one method")
    names = [e.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--candidates: {', '.join(twice)} given twice")
    return entries


def candidate_config(cfg: AdaptConfig, entry: MethodEntry, **extra: Any) -> AdaptConfig:
    """The `AdaptConfig` of one candidate: `cfg`'s settings (``method="auto"``'s own fields
    dropped), the candidate's method, options and overrides, then `extra`."""
    options = {k: v for k, v in cfg.to_dict().items() if k not in AUTO_OPTIONS}
    return type(cfg)(**{**options, **entry.overrides, **extra, "method": entry.method,
                          "method_options": dict(entry.options)})


def share_budget(caps: Sequence[float], budget: int) -> list[int]:
    """Steps per candidate (all its folds together): `budget` shared equally, a candidate capped
    below its share (``caps``; ``float("inf")`` for none) leaving the rest to the others.

    >>> share_budget([80, float("inf"), float("inf")], 1000)
    [80, 460, 460]
    """
    shares = [0] * len(caps)
    left, open_ = int(budget), sorted(range(len(caps)), key=lambda i: caps[i])
    while open_:
        i = open_.pop(0)
        fair = left // (len(open_) + 1)
        shares[i] = int(min(caps[i], fair))
        left -= shares[i]
    return shares


def _protocol_steps(cfg: AdaptConfig, k: int) -> float:
    """Optimiser steps a candidate's run would take at `k` support volumes (its epochs, batch
    size and `max_steps`: `fseft.training.fit.FitSettings.schedule`)."""
    iters, epochs = cfg.fit_settings().schedule(k)
    return float(iters * epochs)


def rule_at_k1(entries: Sequence[MethodEntry], known: bool, structures: Sequence[str]) -> tuple[MethodEntry, str]:
    """The k = 1 choice (module docstring): ``(entry, reason)``; `ConfigError` when the
    candidates have no method of the kind the rule asks for."""

    kind, words = ("features", "black-box") if known else ("network", "network (PEFT + decoder)")
    for entry in entries:
        if get_method(entry.method).kind == kind and get_method(entry.method).config_cls.trainable:
            what = "known to the base model" if known else "new to the base model"
            return entry, f"k = 1: {', '.join(structures)} {what} -> the first {words} candidate"
    need = "e.g. spatial-adapter" if known else "e.g. lora+dec"
    raise ConfigError(
        f"--method auto with k = 1 cannot hold a support volume out, and its rule for a structure "
        f"{'the model knows' if known else 'new to the model'} ({', '.join(structures)}) is a {words} "
        f"method; --candidates has none ({', '.join(e.name for e in entries)}): add one ({need}) or choose --method"
    )


def adapt_auto(
    run: Callable[..., dict[str, Any]],
    model: str | os.PathLike | nn.Module,
    data: str | os.PathLike,
    names: Sequence[str],
    k: int,
    seed: int,
    out: Path,
    cfg: AdaptConfig,
    partition: tuple[Sequence[str], Sequence[str]] | None = None,
    executor: ExecutorConfig | None = None,
) -> dict[str, Any]:
    """`fseft.adaptation.runner.adapt` with ``cfg.method == "auto"``, once it has checked the
    structures (`names`) and claimed `out`: choose a candidate on the support set (module
    docstring), train it on all `k` into `out`, and return its metrics with an ``auto`` section
    (the choice, every candidate's leave-one-out Dice per fold, the steps it was given, the
    seconds spent choosing), also written to ``metrics.json``. `run` is `adapt` itself (passed
    in, so that this module does not import the one that dispatches to it). executor: an
    `fseft.adaptation.executor.ExecutorConfig`; with ``workers`` the folds (candidates x support
    volumes) are Ray tasks, else they run one after another here. A fold that raises stops the
    choice with its error (the other folds are cancelled).
    """

    entries = parse_candidates(cfg.candidates)
    budget = DEFAULT_BUDGET if cfg.auto_budget is None else int(cfg.auto_budget)
    class_names = describe_model(model)[2]
    known = all(s in class_names for s in names)
    usable = [e for e in entries if known or not get_method(e.method).config_cls.needs_known_structures]
    if not usable:
        raise ConfigError(f"--candidates: every candidate ({', '.join(e.name for e in entries)}) evaluates the "
                          f"model's own head, which has no output for {', '.join(names)}")
    configs = {e.name: candidate_config(cfg, e, progress=False, save_predictions=False) for e in usable}
    if k == 1:  # the rule needs no data: a missing candidate is said before anything is read
        chosen, reason = rule_at_k1(usable, known, names)
    dataset = open_dataset(data)
    task = FewShotTask.sample(dataset, names, k, seed, cfg.n_query, partition=partition, cache_dir=cfg.cache_dir)
    check_cases([dataset.case(c) for c in (*task.support, *task.query)], names, progress=cfg.progress)

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if k > 1:
        folds = list(task.support)
        caps = [_protocol_steps(configs[e.name], k - 1) * len(folds) for e in usable]
        shares = share_budget(caps, budget)
        scratch = (out / FOLDS_DIR).absolute()  # Ray workers have their own working folder
        steps = {e.name: max(1, share // len(folds)) for e, share in zip(usable, shares)}
        tasks = []
        for entry in usable:
            fold_cfg = dataclasses.replace(configs[entry.name], max_steps=steps[entry.name], n_query=None)
            for i, held in enumerate(folds):
                fold = ([c for c in folds if c != held], [held])
                tasks.append(Task(f"{entry.name}, {held} held out", run,
                                  (model, data, names, k - 1, seed, scratch / entry.name / f"fold{i}", fold_cfg),
                                  {"partition": fold}))
        outcomes = {}
        bar = tqdm(total=len(tasks), desc="auto: leave-one-out", unit="run", disable=not cfg.progress)
        try:
            with make_executor(executor) as pool:
                for outcome in pool.imap(tasks, on_start=lambda t: bar.set_postfix_str(t.key)):
                    if not outcome.ok:  # the fold's own exception where it came back, as without workers
                        raise outcome.exc or RunsFailedError(f"--method auto: fold {outcome.key}: {outcome.error}",
                                                             [outcome])
                    outcomes[outcome.key] = outcome
                    bar.update()
        finally:
            bar.close()
            shutil.rmtree(scratch, ignore_errors=True)
        for j, entry in enumerate(usable):
            done = [outcomes[t.key] for t in tasks[j * len(folds):(j + 1) * len(folds)]]
            dice = [mean_query_dice(o.value, names, missing=0.0) for o in done]  # no Dice: a failure
            rows.append({**entry.to_dict(), "steps_per_fold": steps[entry.name], "fold_dice": dice,
                         "cv_dice": float(sum(dice) / len(dice)), "seconds": round(sum(o.seconds for o in done), 3)})
        best = max(range(len(rows)), key=lambda i: (rows[i]["cv_dice"], -i))  # ties: the earlier candidate
        chosen = usable[best]
        reason = f"leave-one-out over the {len(folds)} support volumes: best mean Dice {rows[best]['cv_dice']:.4f}"
    choosing = time.perf_counter() - start

    final = configs[chosen.name]
    final = dataclasses.replace(final, progress=cfg.progress, save_predictions=cfg.save_predictions)
    metrics = run(model, data, names, k, seed, out, final, partition=partition)
    metrics["auto"] = {"chosen": chosen.name, "method": chosen.method, "reason": reason, "budget_steps": budget,
                       "choose_seconds": round(choosing, 3), "candidates": rows,
                       "skipped": [e.name for e in entries if e not in usable]}
    write_json(out / METRICS_FILE, metrics)
    return metrics


def metrics_lines(metrics: Mapping[str, Any]) -> list[str]:
    """What `fseft adapt --method auto` prints of its choice."""
    auto = metrics.get("auto")
    if not auto:
        return []
    lines = [f"auto chose {auto['chosen']} ({auto['reason']}; {auto['choose_seconds']:.0f} s choosing)"]
    for row in auto["candidates"]:
        folds = " ".join(f"{d:.3f}" for d in row["fold_dice"])
        lines.append(f"  {row['name']:<24} leave-one-out Dice {row['cv_dice']:.4f} ({folds}), "
                     f"{row['steps_per_fold']} steps per fold")
    return lines
