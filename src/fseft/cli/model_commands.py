"""The `fseft` sub-commands that run models: predict, pretrain, adapt, benchmark, demo. Each maps
onto one function of the package; imports are lazy (`fseft --help` imports no torch), and the
options of `adapt` and `demo` that come from the methods and `DemoConfig` are added when those
parsers are used (`_Parser.complete`)."""

from __future__ import annotations

import argparse

from fseft.cli.parsing import _add_executor_options, _csv, _executor_config, _Parser


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
    from fseft.prediction.predict import predict_path
    from fseft.prediction.segment import InferenceConfig

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
    _add_executor_options(p, "--method auto's leave-one-out folds",
                          "the run (--method auto: of each leave-one-out fold; the final run at this process's count)")
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
    _add_executor_options(p, "the experiment's runs", "each run")
    p.set_defaults(func=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from fseft.evaluation.tables import to_text
    from fseft.experiments.grid import load_experiment, run_benchmark

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
