"""`fseft demo`: the main job on the embedded phantom foundation model, in minutes on 2 CPU cores.

Writes target-domain phantoms (late-arterial contrast, noisier, thicker slices: a domain shift
from the model's portal-venous pre-training data), then runs a benchmark
(`fseft.engine.benchmark`) of generalization, lp, spatial-adapter, spatial-adapter + TI,
LoRA + fine-tuned decoder and full fine-tuning at k = 1 and 5, for one structure the model
knows (liver) and one it has never seen (gallbladder, held out of its pre-training), and writes
the table, figures and ``report.html``.

The budget that keeps it within 10 minutes on 2 cores is explicit in `demo_experiment`: a fixed
number of optimiser steps per method whatever k (`AdaptConfig.max_steps`), one seed, three
fixed query cases. The paper's protocol (200 epochs, early stopping, three seeds) is
``fseft benchmark`` with `examples/` experiment files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fseft.engine.benchmark import BenchmarkResult, ExperimentConfig, MethodEntry


@dataclass
class DemoConfig:
    """The demo's knobs (CLI: ``fseft demo --out DIR --cases N ...``).

    cases / holdout: target-domain phantoms written, of which `holdout` are the fixed queries
    (the support volumes are drawn from the others, so max(ks) <= cases - holdout).
    known / novel: a structure the embedded model was pre-trained on, and one it was not.
    feature_steps / feature_patches: optimiser steps of the adapters on cached features, and
        patches of one support volume per step (cheap: a step takes milliseconds).
    network_steps / network_patches: the same for the methods trained through the network (a
        64^3 patch through the Swin-UNETR takes about 2 s forward and backward on 2 cores).
    """

    out: str = "fseft_demo"
    model: str = "phantom"
    cases: int = 10
    holdout: int = 3
    data_seed: int = 1
    known: str = "liver"
    novel: str = "gallbladder"
    ks: tuple[int, ...] = (1, 5)
    seeds: tuple[int, ...] = (0,)
    feature_steps: int = 200
    feature_patches: int = 2
    network_steps: int = 16
    network_patches: int = 1
    device: str = "cpu"


def demo_methods(cfg: DemoConfig) -> list[MethodEntry]:
    """The demo's rows: black-box adapters on cached features, then PEFT and full fine-tuning."""
    features = {"max_steps": cfg.feature_steps, "patches_per_volume": cfg.feature_patches}
    network = {"max_steps": cfg.network_steps, "patches_per_volume": cfg.network_patches}
    return [
        MethodEntry("generalization", "generalization"),
        MethodEntry("lp", "lp", overrides=features),
        MethodEntry("spatial-adapter", "spatial-adapter", overrides=features),
        MethodEntry("spatial-adapter+ti", "spatial-adapter", overrides={**features, "transductive": True}),
        MethodEntry("lora+dec", "lora", options={"decoder": "fine-tuned"}, overrides=network),
        MethodEntry("ft", "ft", overrides=network),
    ]


def demo_experiment(cfg: DemoConfig, data: str | Path) -> ExperimentConfig:
    """The benchmark the demo runs on the phantoms at `data`."""
    return ExperimentConfig(
        model=cfg.model, data=str(Path(data).resolve()), structures=(cfg.known, cfg.novel), ks=tuple(cfg.ks),
        seeds=tuple(cfg.seeds), methods=demo_methods(cfg), holdout=cfg.holdout, overlays=True, name="demo",
        title="fseft demo: few-shot adaptation of the embedded phantom model to target-domain phantoms",
        adapt={"epochs": 200, "patience": 0, "device": cfg.device},
        source="fseft demo",
    )


def _write_data(cfg: DemoConfig, data: Path, progress: bool) -> None:
    """Target-domain phantoms at `data`, reused when an earlier demo wrote the same ones."""
    from fseft.data.phantom import write_phantom_dataset
    from fseft.utils import write_json

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
    from fseft.engine.benchmark import run_benchmark
    from fseft.errors import ConfigError
    from fseft.evaluation.tables import to_text

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
    return result
