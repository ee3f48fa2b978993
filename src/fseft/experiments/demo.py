"""`fseft demo`: the main job on the embedded phantom foundation model, in minutes on 2 CPU cores.

Writes target-domain phantoms (late-arterial contrast, noisier, thicker slices: a domain shift
from the model's portal-venous pre-training data), then runs a benchmark
(`fseft.experiments.grid`) of generalization, lp, spatial-adapter, spatial-adapter + TI, the
decoder trained on cached encoder outputs and LoRA + fine-tuned decoder at k = 5, for
one structure the model knows but the shift hurts (the inferior vena cava: Dice 0.77 on source
phantoms, 0.23 on target ones) and one it has never seen (gallbladder, held out of its
pre-training), and writes the table, figures and ``report.html``.

The black-box adapters train with their reference protocols (`MethodConfig.default_*`); a
phantom fits in one training patch, so each of their steps costs one patch. The network methods
get a fixed step budget whatever k (`AdaptConfig.max_steps`): the decoder's steps on cached
encoder outputs cost about a third of a LoRA step through the whole network. One seed, three
fixed query cases. The paper's full protocol with three seeds is ``fseft benchmark`` with
`examples/` experiment files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fseft.data.phantom import write_phantom_dataset
from fseft.errors import ConfigError
from fseft.evaluation.tables import RunRecord, to_text
from fseft.experiments.grid import BenchmarkResult, ExperimentConfig, MethodEntry, run_benchmark
from fseft.utils import write_json


@dataclass
class DemoConfig:
    """The demo's knobs (CLI: ``fseft demo --out DIR --cases N ...``).

    cases / holdout: target-domain phantoms written, of which `holdout` are the fixed queries
    (the support volumes are drawn from the others, so max(ks) <= cases - holdout).
    known / novel: a structure the embedded model was pre-trained on, and one it was not.
    feature_steps: optional cap on the black-box adapters' steps (None: their protocols; a step
        on cached features takes milliseconds to a few tens of them).
    decoder_steps / lora_steps: optimiser steps of the decoder (on cached encoder outputs, about
        0.5 s a step on 2 cores) and of LoRA + fine-tuned decoder (through the Swin-UNETR, about
        2.2 s a step).
    """

    out: str = "fseft_demo"
    model: str = "phantom"
    cases: int = 10
    holdout: int = 3
    data_seed: int = 1
    known: str = "inferior_vena_cava"
    novel: str = "gallbladder"
    ks: tuple[int, ...] = (5,)
    seeds: tuple[int, ...] = (0,)
    feature_steps: int | None = None
    decoder_steps: int = 80
    lora_steps: int = 16
    device: str = "cpu"


def demo_methods(cfg: DemoConfig) -> list[MethodEntry]:
    """The demo's rows: black-box adapters on cached features, then the decoder and PEFT."""
    features = {} if cfg.feature_steps is None else {"max_steps": cfg.feature_steps}
    return [
        MethodEntry("generalization", "generalization"),
        MethodEntry("lp", "lp", overrides=features),
        MethodEntry("spatial-adapter", "spatial-adapter", overrides=features),
        MethodEntry("spatial-adapter+ti", "spatial-adapter", overrides={**features, "transductive": True}),
        MethodEntry("decoder", "decoder", overrides={"max_steps": cfg.decoder_steps}),
        MethodEntry("lora+dec", "lora", options={"decoder": "fine-tuned"}, overrides={"max_steps": cfg.lora_steps}),
    ]


def demo_experiment(cfg: DemoConfig, data: str | Path) -> ExperimentConfig:
    """The benchmark the demo runs on the phantoms at `data`."""
    return ExperimentConfig(
        model=cfg.model, data=str(Path(data).resolve()), structures=(cfg.known, cfg.novel), ks=tuple(cfg.ks),
        seeds=tuple(cfg.seeds), methods=demo_methods(cfg), holdout=cfg.holdout, overlays=True, name="demo",
        title="fseft demo: few-shot adaptation of the embedded phantom model to target-domain phantoms",
        adapt={"patience": 0, "device": cfg.device},
        source="fseft demo",
    )


def _write_data(cfg: DemoConfig, data: Path, progress: bool) -> None:
    """Target-domain phantoms at `data`, reused when an earlier demo wrote the same ones."""

    spec = {"cases": cfg.cases, "domain": "target", "seed": cfg.data_seed}
    record = data.parent / "data.json"
    try:
        if json.loads(record.read_text()) == spec and (data / "dataset.json").is_file():
            return
    except (OSError, ValueError):
        pass
    write_phantom_dataset(data, cfg.cases, "target", cfg.data_seed, overwrite=True, progress=progress,
                          name="phantom_target")
    write_json(record, spec)


def run_demo(cfg: DemoConfig | None = None, *, progress: bool = True,
             log: Callable[[str], None] = print) -> BenchmarkResult:
    """Write the phantoms, run the demo benchmark into ``cfg.out`` and print its table."""

    cfg = cfg or DemoConfig()
    if max(cfg.ks) > cfg.cases - cfg.holdout:
        raise ConfigError(f"demo: k = {max(cfg.ks)} needs at least {max(cfg.ks) + cfg.holdout} cases "
                          f"({cfg.holdout} are held out as queries), got --cases {cfg.cases}")
    out = Path(cfg.out)
    data = out / "data" / "phantom_target"
    log(f"fseft demo: {cfg.cases} target-domain phantoms -> {data}")
    _write_data(cfg, data, progress)
    exp = demo_experiment(cfg, data)
    log(f"adapting model {cfg.model!r} to {cfg.known} (known) and {cfg.novel} (novel), k = "
        f"{', '.join(map(str, cfg.ks))}: {', '.join(m.name for m in exp.methods)}")
    result = run_benchmark(exp, out, progress=progress, log=log)
    log("")
    log("Mean Dice on the held-out target-domain queries:")
    log(to_text(result.summary))
    log(recommendation(result.records, cfg))
    return result


RECOMMENDATION_TOLERANCE = 0.02


def recommendation(records: Sequence[RunRecord], cfg: DemoConfig) -> str:
    """One line from the demo's runs at the largest k: for the known and the novel structure,
    the cheapest method among those within `RECOMMENDATION_TOLERANCE` Dice of the best, with its
    Dice (and, for the known structure, its gain over the model's head).

    Cheapest is the order of `demo_methods`, which lists the rows from the cheapest to train to
    the costliest (their idle training times, README), not the run's wall times: those move with
    whatever else the machine runs, and the line must not."""
    k = max(cfg.ks)
    order = [m.name for m in demo_methods(cfg)]

    def best(structure: str) -> tuple[str, float] | None:
        rows: dict[str, list[float]] = {}
        for r in records:
            if r.k == k and r.structure == structure and r.dice is not None:
                rows.setdefault(r.method, []).append(r.dice)
        if not rows:
            return None
        means = {m: float(np.mean(v)) for m, v in rows.items()}
        top = max(means.values())
        method = min((m for m, d in means.items() if d >= top - RECOMMENDATION_TOLERANCE),
                     key=lambda m: order.index(m) if m in order else len(order))
        return method, means[method]

    known, novel = best(cfg.known), best(cfg.novel)
    if known is None or novel is None:
        return "Recommendation: not enough finished runs to recommend a method."
    base = [r.dice for r in records if r.k == k and r.structure == cfg.known and r.method == "generalization"
            and r.dice is not None]
    gain = f", {known[1] - float(np.mean(base)):+.2f} Dice over the model's own head" if base else ""
    return (f"Recommendation at k = {k}, from this table (the cheapest method within {RECOMMENDATION_TOLERANCE} "
            f"Dice of the best): for a structure the model knows ({cfg.known}) use {known[0]} "
            f"({known[1]:.2f}{gain}); for a new one ({cfg.novel}) use {novel[0]} ({novel[1]:.2f}).")
