"""The `fseft` command line. Each sub-command maps onto one Python API function and holds no
logic of its own; imports are lazy so that `fseft --help` answers at once.

Each sub-command is declared by its own `_add_<name>(subparsers)` function below. The method
options of `fseft adapt` and its `--method` help are made from the registered methods
(`fseft.methods.registry.cli_options`) when `adapt` is parsed or its help printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fseft import __version__
from fseft.errors import FseftError


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose `complete` callbacks add arguments the first time it parses or
    formats its help: `fseft adapt`'s method options come from the method registry, which
    imports torch, and `fseft --help` must not."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.complete: list[Callable[[argparse.ArgumentParser], None]] = []

    def _completed(self) -> None:
        while self.complete:
            self.complete.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def, override]
        self._completed()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._completed()
        return super().format_help()


def _csv(value: str) -> list[str]:
    """Parse a comma-separated list option (`--structures liver,spleen`)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_executor_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--workers`` and its Ray options (`fseft.adaptation.executor.ExecutorConfig`)."""
    group = p.add_argument_group("parallel runs on Ray (pip install \"fseft[distributed]\"; docs/cluster.md)")
    group.add_argument("--workers", type=int, metavar="N",
                       help=f"run {what} as Ray tasks, at most N at a time (default: one after another, no Ray)")
    group.add_argument("--ray-address", metavar="auto|ADDR",
                       help="join a running Ray cluster (ray start) instead of starting a local instance")
    group.add_argument("--cpus-per-run", type=int, metavar="C",
                       help="CPUs reserved per run and torch threads in it (default: this machine's cores / N; "
                       "1 on a cluster)")
    group.add_argument("--gpus-per-run", type=float, metavar="G",
                       help="GPUs per run; a fraction packs runs on one GPU (0.25: four per GPU) (default: 0)")
    group.add_argument("--max-retries", type=int, metavar="R",
                       help="restarts of a run whose worker process died (killed, out of memory) (default: 2)")


def _executor_config(args: argparse.Namespace) -> object:
    from fseft.adaptation.executor import ExecutorConfig  # Ray only once a RayExecutor is made

    return ExecutorConfig(workers=args.workers, address=args.ray_address, cpus_per_run=args.cpus_per_run,
                          gpus_per_run=args.gpus_per_run, max_retries=args.max_retries)


# ---------------------------------------------------------------------------- sub-commands
# Each `_add_<name>` function registers one sub-command; keep them in `SUBCOMMANDS` order.


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantom",
        help="write a synthetic abdomen CT dataset (nnU-Net layout)",
        description="Write synthetic abdomen CT cases (int16 HU) with multilabel masks as an "
        "nnU-Net v2 raw dataset (dataset.json, imagesTr/, labelsTr/). Deterministic for "
        "(domain, seed, case). With --partial-sources K, writes K sub-datasets under --out, "
        "each labelling a subset of the structures (none labels gallbladder).",
    )
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--cases", type=int, default=8, help="number of cases (per source with --partial-sources; default 8)")
    p.add_argument("--domain", choices=("source", "target"), default="source",
                   help="source: portal-venous phase; target: late arterial, noisier, other spacing/FOV")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    labels = p.add_mutually_exclusive_group()  # each partial source labels its own subset
    labels.add_argument("--structures", type=_csv, default=None,
                        help="comma-separated structures to label (default: all the phantom draws)")
    labels.add_argument("--partial-sources", type=int, default=None, metavar="K",
                        help="write K partial-label source datasets (partial_A, ...) instead of one dataset")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run_phantom)


def _run_phantom(args: argparse.Namespace) -> int:
    from fseft.data.phantom import write_partial_label_sources, write_phantom_dataset

    if args.partial_sources is None:
        root = write_phantom_dataset(args.out, args.cases, args.domain, args.seed, args.structures,
                                     overwrite=args.overwrite, progress=args.progress)
        print(root)
        return 0
    for root in write_partial_label_sources(args.out, args.partial_sources, args.cases, args.seed, args.domain,
                                            overwrite=args.overwrite, progress=args.progress):
        print(root)
    return 0


def _add_datasets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="inspect dataset folders (nnU-Net, TotalSegmentator, FLARE22)")
    actions = p.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)
    inspect = actions.add_parser(
        "inspect",
        help="layout, cases, structures and their voxel counts of a dataset folder",
        description="Print the layout found, the number of cases, the structures (canonical "
        "names, with the dataset's own names where they differ) and per-structure voxel counts "
        "(cases containing it; min / median / max voxels). Counts are cached per label file.",
    )
    inspect.add_argument("dir", help="dataset folder (nnU-Net v2 raw, TotalSegmentator, FLARE22, or a DICOM dataset: one "
                         "sub-folder per study with a CT series and its DICOM SEG objects), or a text file of DICOMweb "
                         "study URLs")
    inspect.add_argument("--layout", default="auto", choices=["auto", "nnunet", "totalseg", "flare22", "dicom"],
                         help="dataset layout (default: detected)")
    inspect.add_argument("--cases", action="store_true", help="also print the per-case voxel counts")
    inspect.add_argument("--check", action="store_true",
                         help="read every case as a run would (scan, labels, label values, geometry) and list "
                         "every one that cannot be used (exit 2)")
    inspect.add_argument("--json", metavar="OUT", help="also write the full summary as JSON to OUT")
    inspect.add_argument("--cache-dir", help="voxel-count cache (default: $FSEFT_CACHE_DIR or ~/.cache/fseft)")
    inspect.add_argument("--no-progress", action="store_true", help="no progress bar")
    inspect.set_defaults(func=_run_datasets_inspect)


def _run_datasets_inspect(args: argparse.Namespace) -> int:
    from fseft.data.inspection import inspect_dataset

    print(inspect_dataset(args.dir, args.layout, cases=args.cases, json_path=args.json,
                          cache_dir=args.cache_dir, progress=not args.no_progress, check=args.check))
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the model zoo and whether each weights file is present, or the adapter runs in a folder",
        description="List the model zoo: id, architecture, classes, parameters of the full-size "
        "architecture, and whether the weights file is present (fseft never downloads weights). "
        "With --adapters DIR, list instead the `fseft adapt` run folders under DIR (each a model for "
        "fseft predict --adapter): method, structures, k, base model, size and mean query Dice.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--weights-dir",
        metavar="DIR",
        default=None,
        help="folder holding <id>.pth/.pt/.safetensors (default: $FSEFT_WEIGHTS_DIR, else ~/.cache/fseft/weights)",
    )
    which.add_argument("--adapters", metavar="DIR", default=None,
                       help="list the run folders under DIR (recursively) instead of the zoo")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    if args.adapters is not None:
        from fseft.runs.load import format_run_table

        print(format_run_table(args.adapters))
        return 0
    from fseft.models.zoo import format_model_table

    print(format_model_table(args.weights_dir))
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment scans (NIfTI or DICOM) into masks in their own geometry",
        description="Segment a scan (NIfTI, NRRD, MHA or a DICOM series folder) or a folder of "
        "them. OUT receives <case>.nii.gz per scan (label value i = i-th structure, label map in "
        "<case>.json and a 3D Slicer colour table in <case>.ctbl beside it) or "
        "<case>/<structure>.nii.gz with --per-structure-files, each in the geometry (shape and "
        "affine) of its scan; with --output-type dicom-seg, <case>.dcm, a DICOM SEG referencing "
        "the DICOM series. --statistics adds OUT/statistics.json (volume in ml, mean / std HU per "
        "structure).",
    )
    p.add_argument("-i", "--input", required=True, metavar="IN",
                   help="scan file, DICOM series folder, folder of cases (scan files / DICOM sub-folders), or a "
                   "DICOMweb study URL http(s)://host/dicom-web/studies/<UID>[/series/<UID>] (credentials: "
                   "$FSEFT_DICOMWEB_TOKEN, or $FSEFT_DICOMWEB_USER and $FSEFT_DICOMWEB_PASSWORD)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output folder (or a .nii.gz / .dcm file name for a single scan)")
    which = p.add_argument_group("the model (--model, --adapter or both)")
    which.add_argument("--model", metavar="ID|PATH",
                       help="model zoo id or fseft model file (.safetensors); with --adapter: the base model the "
                       "adapter sits on, where the one the run recorded moved (checked against its weights "
                       "fingerprint)")
    which.add_argument("--adapter", metavar="RUN",
                       help="an `fseft adapt` run folder (any method, copied anywhere): its base model + adaptation "
                       "segment its structures")
    p.add_argument("--merge", action="store_true",
                   help="with --adapter: fold LoRA / ARENA updates into the base weights before inference")
    p.add_argument("--weights", metavar="PATH", help="weights file for a zoo model: --model's, or with --adapter alone "
                   "the run's recorded zoo model (default: the zoo's)")
    p.add_argument("--structures", type=_csv, metavar="A,B", help="structures to segment (default: all the model's classes)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the network")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (default: 0.25)")
    p.add_argument("--roi-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="sliding-window size in model-space voxels (default: the window the model was trained on, else 96 96 96)")
    p.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    p.add_argument("--threshold", type=float, default=0.5, help="sigmoid probability threshold (default: 0.5)")
    p.add_argument("--no-lcc", action="store_true", help="keep every connected component (default: the largest only, except for multi-part structures such as vertebrae, tumours and vessel trees)")
    p.add_argument("--per-structure-files", action="store_true", help="one binary mask file per structure")
    p.add_argument("--series-id", metavar="UID",
                   help="the DICOM series to read (SeriesInstanceUID) where a folder or a DICOMweb study holds several")
    p.add_argument("--output-type", choices=("nifti", "dicom-seg"), default="nifti",
                   help="nifti: a label map per case (default); dicom-seg: a DICOM SEG per DICOM series input, "
                   "referencing it (needs pip install \"fseft[dicom-seg]\")")
    p.add_argument("--statistics", action="store_true",
                   help="also write statistics.json beside the masks: per case and structure the volume (ml) and "
                   "the mean / std HU of the scan under the mask")
    p.add_argument("--store", metavar="URL",
                   help="DICOMweb service root (http(s)://host/dicom-web): send each DICOM SEG there by STOW-RS (needs "
                   "--output-type dicom-seg), with --statistics also a DICOM SR (TID 1500) of the volumes and mean HU "
                   "(<seg>_sr.dcm); prints the stored SOP Instance UIDs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from fseft.prediction.segment import InferenceConfig, predict_path

    cfg = InferenceConfig(
        roi_size=args.roi_size and tuple(args.roi_size), overlap=args.overlap, sw_batch_size=args.sw_batch_size,
        bf16=args.bf16, threshold=args.threshold, largest_component=not args.no_lcc,
        device=args.device, progress=not args.no_progress,
    )
    result = predict_path(args.input, args.output, args.model, weights=args.weights,
                          structures=args.structures, cfg=cfg, per_structure_files=args.per_structure_files,
                          adapter=args.adapter, merge=args.merge, series_id=args.series_id,
                          output_type=args.output_type, statistics=args.statistics, store=args.store)
    n_files = sum(len(v) for v in result.outputs.values())
    print(f"wrote {n_files} mask file(s) for {len(result.outputs)} case(s) to {args.output}")
    if result.statistics_file is not None:
        print(f"statistics written to {result.statistics_file}")
    for path, uid in result.stored.items():
        print(f"stored {path.name} to {args.store}: SOP Instance UID {uid}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice, NSD and HD95 of predicted masks against ground truth",
        description="Match predictions to ground truth by case id and write per-case and mean "
        "Dice, NSD and HD95 (mm, native geometry) as JSON and CSV (same name, .csv). HD95 is "
        "null where exactly one of prediction / truth is empty.",
    )
    p.add_argument("--pred", required=True, metavar="DIR",
                   help="predictions: <case>.nii.gz with <case>.json label maps, or <case>/<structure>.nii.gz")
    p.add_argument("--gt", required=True, metavar="DIR",
                   help="ground truth: a dataset folder (nnU-Net, TotalSegmentator, FLARE22) or a folder of label files")
    p.add_argument("--structures", type=_csv, metavar="A,B", help="structures to evaluate (default: those on both sides)")
    p.add_argument("--label-map", metavar="JSON", help="label map (value -> name) for label files without their own")
    p.add_argument("--cases", metavar="A,B|FILE", help="evaluate only these cases (comma list or a file, one id per line)")
    p.add_argument("--tolerance", type=float, default=2.0, metavar="MM", help="NSD tolerance in mm (default: 2)")
    p.add_argument("--out", required=True, metavar="metrics.json", help="JSON report (the CSV is written beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from fseft.evaluation.report import evaluate_folders

    report = evaluate_folders(args.pred, args.gt, structures=args.structures, label_map=args.label_map,
                              tolerance_mm=args.tolerance, cases=args.cases, out=args.out,
                              progress=not args.no_progress)
    mean = report.mean()
    for name in (*report.structures, "all"):
        row = mean[name]
        print(f"{name:<32} dice {row['dice']:.4f}  nsd {row['nsd']:.4f}  hd95 {row['hd95']:.2f} mm")
    print(f"{len(report.cases)} case(s); report written to {args.out}")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="supervised pre-training with partial labels (torch DDP)",
        description="Pre-train a segmentation model on an assembly of partially labelled datasets "
        "(FSEFT eq. 1). Distributed: torchrun --nproc_per_node N -m fseft pretrain ...",
    )
    p.add_argument("--config", required=True, metavar="ASSEMBLY.yaml",
                   help="assembly YAML: datasets, model, preprocess, train (see examples/pretrain_phantom.yaml)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder: checkpoint.pt, log.jsonl, cache/, model.safetensors")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in DIR")
    p.add_argument("--until-epoch", type=int, metavar="N",
                   help="stop after epoch N in this call (time-sliced jobs; continue with --resume)")
    overrides = p.add_argument_group("overrides of the assembly's train section")
    overrides.add_argument("--epochs", type=int)
    overrides.add_argument("--batch-size", type=int, help="volumes per step per process")
    overrides.add_argument("--patches-per-volume", type=int)
    overrides.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    overrides.add_argument("--lr", type=float)
    overrides.add_argument("--device", help="auto, cpu, cuda (torchrun: each process its LOCAL_RANK GPU)")
    overrides.add_argument("--seed", type=int)
    overrides.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    overrides.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    overrides.add_argument("--grad-checkpointing", action="store_true", default=None,
                           help="gradient checkpointing (less memory, slower)")
    overrides.add_argument("--balance-datasets", action="store_true", default=None,
                           help="draw volumes so that every dataset is equally likely")
    overrides.add_argument("--tensorboard", action="store_true", default=None,
                           help="also log to DIR/tensorboard (if TensorBoard is installed)")
    overrides.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                           help="no progress bars")
    p.set_defaults(func=_run_pretrain)


_PRETRAIN_OVERRIDES = ("epochs", "batch_size", "patches_per_volume", "patch_size", "lr", "device", "seed",
                       "num_workers", "bf16", "grad_checkpointing", "balance_datasets", "tensorboard", "progress")


def _run_pretrain(args: argparse.Namespace) -> int:
    from fseft.pretraining import load_assembly, pretrain

    assembly = load_assembly(args.config, overrides={k: getattr(args, k) for k in _PRETRAIN_OVERRIDES})
    pretrain(assembly, args.out, resume=args.resume, until_epoch=args.until_epoch)
    return 0


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="few-shot adaptation: black-box adapters on cached features, or (PEFT) fine-tuning of the network",
        description=_ADAPT_DESCRIPTION,
    )
    p.add_argument("--model", required=True, metavar="ID|PATH", help="model zoo id or fseft model file (.safetensors)")
    p.add_argument("--data", metavar="DIR", help="dataset folder (nnU-Net, TotalSegmentator, FLARE22, or DICOM: one "
                   "sub-folder per study, CT series + DICOM SEG), or a text file of DICOMweb study URLs; not with --dry-run")
    p.add_argument("--structures", required=True, type=_csv, metavar="A,B", help="structures to adapt to")
    p.add_argument("--k", type=int, help="number of labelled support cases (not with --dry-run)")
    p.add_argument("--seed", type=int, default=0, help="task sampling and training seed (default: 0)")
    p.add_argument("--method", default="lp", metavar="NAME", help="an adaptation method (default: lp)")
    p.add_argument("--candidates", type=_csv, metavar="A,B",
                   help="--method auto: the methods to choose among: method ids, METHOD+ti (size constraint), "
                   "METHOD+dec / METHOD+newdec (fine-tuned / new decoder) (default: {candidates})")
    p.add_argument("--auto-budget", type=int, metavar="STEPS",
                   help="--method auto: optimiser steps shared by all candidates' leave-one-out runs "
                   "(default: {auto_budget})")
    p.add_argument("--out", metavar="RUN", help="run folder (not with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the method's trainable parameters for MODEL and STRUCTURES; no data, no training")
    p.add_argument("--ti", action="store_true", help="transductive inference: organ-size constraint on the queries")
    p.add_argument("--ti-gamma", type=float, help="margin of relative size error that costs nothing (default: 0.3, "
                   "the FSEFT runs; they used 0.5 for kidney_left)")
    p.add_argument("--ti-weight", type=float, help="lambda of the size constraint (default: 0.1, the FSEFT runs)")
    p.add_argument("--no-head-prior", dest="head_prior", action="store_false",
                   help="start the outputs of structures new to the model at p = 0.5 instead of the support's "
                   "foreground fraction (for comparison)")
    p.add_argument("--head-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="network methods: start from a head fitted as a linear probe on the frozen model's "
                   "features of the support (LP-FT; default: on, except scratch and --decoder new)")
    p.add_argument("--objective", choices=("sigmoid", "multiclass"), default="sigmoid",
                   help="independent sigmoids per structure, or softmax over background + structures")
    p.add_argument("--loss", choices=("bce+dice", "dice"), default="bce+dice",
                   help="BCE / cross-entropy plus soft Dice, or soft Dice alone (the FSEFT runs' loss, which "
                   "collapsed a small new structure more often here) (default: bce+dice)")
    p.add_argument("--epochs", type=int, help="maximum epochs (default: the method's protocol: {epochs})")
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience in epochs, 0 = off (default: 20)")
    p.add_argument("--lr", type=float, help="learning rate (default: the method's protocol: {lr}; README 'Default "
                   "protocols')")
    p.add_argument("--batch-size", type=int, help="support volumes per optimiser step (default: {batch_size})")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    p.add_argument("--max-steps", type=int, help="cap on optimiser steps (the epochs shrink to fit; default: none)")
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="training patch size in model-space voxels (default: the window the model was trained on, else 96 96 96)")
    p.add_argument("--patches-per-volume", type=int, help="patches per support volume per iteration (default: "
                   "{patches_per_volume})")
    p.add_argument("--n-query", type=int, help="number of query cases (default: all other eligible cases)")
    p.add_argument("--roi-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="sliding window of the feature computation and of inference (default: the window the model was trained on, else 96 96 96)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default: 0.25)")
    p.add_argument("--save-predictions", action="store_true", help="write query predictions to RUN/predictions/")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in RUN (default: refuse)")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: $FSEFT_CACHE_DIR or ~/.cache/fseft)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="network methods: gradient checkpointing of the Swin blocks (less memory, slower)")
    p.add_argument("--augment", action="store_true",
                   help="network methods: random intensity scaling and shifts of the training patches")
    p.add_argument("--no-encoder-cache", dest="encoder_cache", action="store_false",
                   help="decoder and ft-last: train through the whole network instead of on cached encoder outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_executor_options(p, "--method auto's leave-one-out folds")
    p.set_defaults(func=_run_adapt, method_options=())
    if isinstance(p, _Parser):
        p.complete.append(_add_method_options)


_ADAPT_DESCRIPTION = (
    "Adapt a model to STRUCTURES with K labelled support cases of DATA (FewShotTask.sample with SEED; the "
    "other eligible cases are the queries) and evaluate on the queries in native geometry. Feature methods "
    "({features}) train a small adapter on the frozen model's cached features; network methods ({network}) "
    "train on image patches through the network. RUN receives adapter_model.safetensors, adapter_config.json "
    "(peft's format for {peft}), metrics.json (and predictions/ with --save-predictions). --dry-run "
    "prints the method's trainable parameters and stops."
)


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """`fseft adapt`'s method options, one per config field with help text of the registered
    methods (`fseft.methods.registry.cli_options`), and the method lists of its help."""
    # the methods (torch) only when the adapt parser is used: `fseft --help` stays light
    from fseft.adaptation.method_choice import DEFAULT_BUDGET, DEFAULT_CANDIDATES
    from fseft.methods.registry import available_methods, cli_options, get_method, methods_in_words, protocol_defaults

    network = available_methods("network")
    p.description = _ADAPT_DESCRIPTION.format(features=", ".join(available_methods("features")), network=", ".join(network),
                                              peft=", ".join(n for n in network if get_method(n).uses_peft))
    actions = {a.dest: a for a in p._actions}
    actions["method"].help = (f"{methods_in_words()}; or auto: chosen among --candidates by leave-one-out on the "
                              f"support (default: {actions['method'].default})")
    actions["candidates"].help = actions["candidates"].help.replace("{candidates}", ",".join(DEFAULT_CANDIDATES))
    actions["auto_budget"].help = actions["auto_budget"].help.replace("{auto_budget}", str(DEFAULT_BUDGET))
    for name in ("epochs", "lr", "batch_size", "patches_per_volume"):  # the protocols' numbers, per method
        actions[name].help = actions[name].help.replace(f"{{{name}}}", protocol_defaults(name))
    group = p.add_argument_group("method options (each only for the methods that have it)")
    names = []
    for option in cli_options():
        help_text = option.help.replace("%", "%%")
        if option.type is bool:
            group.add_argument(option.flag, dest=option.name, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(option.flag, dest=option.name, type=option.type, metavar=option.metavar, help=help_text)
        names.append(option.name)
    p.set_defaults(method_options=tuple(names))


def _run_adapt(args: argparse.Namespace) -> int:
    from fseft.adaptation import AdaptConfig, adapt, count_parameters
    from fseft.adaptation.method_choice import metrics_lines as auto_lines
    from fseft.errors import ConfigError
    from fseft.methods import get_method
    from fseft.methods.transductive import TransductiveConfig

    executor = _executor_config(args)  # its option errors before any work
    cfg = AdaptConfig(
        method=args.method,
        method_options={k: getattr(args, k) for k in args.method_options if getattr(args, k) is not None},
        objective=args.objective, loss=args.loss, epochs=args.epochs, patience=args.patience, lr=args.lr,
        weight_decay=args.weight_decay, max_steps=args.max_steps, batch_size=args.batch_size,
        patch_size=None if args.patch_size is None else tuple(args.patch_size),
        patches_per_volume=args.patches_per_volume, transductive=args.ti,
        ti=TransductiveConfig(**{k: v for k, v in (("gamma", args.ti_gamma), ("weight", args.ti_weight)) if v is not None}),
        n_query=args.n_query,
        roi_size=args.roi_size and tuple(args.roi_size), overlap=args.overlap, cache_dir=args.cache_dir,
        device=args.device, bf16=args.bf16, grad_checkpointing=args.grad_checkpointing, encoder_cache=args.encoder_cache,
        augment=args.augment,
        save_predictions=args.save_predictions, progress=not args.no_progress, head_prior=args.head_prior, head_warmup=args.head_warmup,
        candidates=args.candidates, auto_budget=args.auto_budget,
    )
    if args.dry_run:
        counts = count_parameters(args.model, args.structures, cfg)
        given = "".join(f", {k}={v}" for k, v in cfg.method_options.items())
        print(f"{counts['method']} ({counts['kind']}{given}) on {counts['arch']}, "
              f"structures {', '.join(counts['structures'])}:")
        for key, value in counts.items():
            if isinstance(value, int):
                print(f"  {key:<16} {value:>12,}")
        run = cfg.resolved()
        warmup = ", head warmed up as a linear probe (LP-FT)" if counts["kind"] == "network" and run.head_warmup else ""
        print(f"protocol: lr {run.lr:g}, {run.epochs} epochs, {run.batch_size} volume(s) x "
              f"{run.patches_per_volume} patches per step, loss {run.loss}{warmup}")
        return 0
    missing = [f"--{name}" for name in ("data", "k", "out") if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (only --dry-run goes without)")
    metrics = adapt(args.model, args.data, args.structures, args.k, args.seed, args.out, cfg,
                    overwrite=args.overwrite, executor=executor)
    for name, row in metrics["mean"].items():
        cells = "  ".join(f"{m} {'n/a' if v is None else f'{v:.4f}'}" for m, v in row.items())
        print(f"{name:<32} {cells}")
    lines = get_method(metrics["method"]).metrics_lines
    for line in [*(lines(metrics) if lines is not None else ()), *auto_lines(metrics)]:
        print(line)
    print(f"{len(metrics['queries'])} query case(s), {metrics['trainable_params']} trainable parameters, "
          f"{metrics['train_seconds']:.1f} s training; run written to {args.out}")
    return 0


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="run an experiment (methods x k x seeds x structures) and write the table, figures and report.html",
        description="Run every (method, k, seed, structure) of EXPERIMENT.yaml on its dataset and model "
        "with one shared feature cache, then write results.{csv,md,json} (the FSEFT paper's Table 1 "
        "layout: one block per k, mean ± std over seeds), dice_vs_k.png, overlays.png and report.html "
        "into DIR. Finished runs are skipped: run the same command again to continue an "
        "interrupted benchmark. Experiment files: examples/.",
    )
    p.add_argument("--config", required=True, metavar="EXPERIMENT.yaml", help="experiment file")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (runs/, tables, figures, report.html)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_executor_options(p, "the experiment's runs")
    p.set_defaults(func=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from fseft.experiments.grid import load_experiment, run_benchmark
    from fseft.evaluation.tables import to_text

    result = run_benchmark(load_experiment(args.config), args.out, progress=not args.no_progress,
                           executor=_executor_config(args))
    print(to_text(result.summary))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: adapt the embedded model to target-domain phantoms and write a report (minutes on a CPU)",
    )
    p.complete.append(_add_demo_options)
    p.set_defaults(func=_run_demo)


def _add_demo_options(p: argparse.ArgumentParser) -> None:
    """`fseft demo`'s description and options, with `DemoConfig`'s defaults (its module imports
    the experiment grid and torch: only when the demo parser is used)."""
    from fseft.experiments.demo import DemoConfig

    d = DemoConfig()
    p.description = (
        "Write target-domain phantoms, adapt the embedded phantom foundation model with "
        "generalization, lp, spatial-adapter, spatial-adapter + TI, the decoder on cached encoder outputs "
        f"and LoRA + fine-tuned decoder at k = 5 for a known ({d.known}) and a novel ({d.novel}) structure, print the "
        "Dice table and write OUT/report.html. No arguments needed; about 10 minutes on 2 CPU cores.")
    p.add_argument("--out", default=d.out, metavar="DIR", help=f"output folder (default: {d.out})")
    p.add_argument("--cases", type=int, default=d.cases, help=f"target-domain phantoms to write (default: {d.cases})")
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_demo(args: argparse.Namespace) -> int:
    from fseft.experiments.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, cases=args.cases, device=args.device), progress=not args.no_progress)
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_phantom,
    _add_datasets,
    _add_models,
    _add_predict,
    _add_evaluate,
    _add_pretrain,
    _add_adapt,
    _add_benchmark,
    _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fseft",
        description="Few-shot, parameter-efficient fine-tuning of volumetric CT segmentation models.",
    )
    parser.add_argument("--version", action="version", version=f"fseft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def check_output_location(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output path that cannot be created: its nearest existing
    ancestor is a file, or a folder this user cannot write to (`InputFileError`)."""
    from fseft.errors import InputFileError

    target = Path(path).expanduser().absolute()
    # the folder that must be writable: the target itself if it is one, else its nearest
    # existing ancestor (an existing file is replaced in its own folder)
    ancestor = target if target.is_dir() else target.parent if target.exists() else target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputFileError(f"{path}: cannot be created, {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputFileError(f"{path}: cannot be created, the folder {ancestor} is not writable")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        for name in ("out", "output"):  # every command's output, checked before its work
            if getattr(args, name, None):
                check_output_location(getattr(args, name))
        return int(args.func(args) or 0)
    except FseftError as exc:
        print(f"fseft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write that failed after the checks (full disk, permissions changed)
        where = exc.filename or "an output file"
        print(f"fseft {args.command}: error: cannot write {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fseft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
