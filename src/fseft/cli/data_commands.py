"""The `fseft` sub-commands that write, inspect and score files: phantom, paint, datasets, models,
evaluate. Each maps onto one function of the package; imports are lazy (`fseft --help` imports
no torch)."""

from __future__ import annotations

import argparse

from fseft.cli.parsing import _csv


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


def _add_paint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "paint",
        help="write synthetic CT painted from real label maps (nnU-Net layout)",
        description="Write synthetic CT cases painted from real patients' label maps (SynthSeg-style: "
        "deformed anatomy, clinical fields of view, per-tissue HU drawn around the patient's own, "
        "contrast-phase shifts, texture, blur, noise) as an nnU-Net v2 raw dataset, for pre-training. "
        "Each --labels folder is a TotalSegmentator-layout case (ct.nii.gz + segmentations/). A patient "
        "painted from is no longer a validation patient. Deterministic for (sources, seed, case).",
    )
    p.add_argument("--labels", nargs="+", required=True, metavar="CASE_DIR",
                   help="TotalSegmentator-layout case folders to take the anatomy from (used in turn)")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--cases", type=int, default=32, help="number of cases (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--structures", type=_csv, default=None,
                   help="comma-separated structures to label (default: the embedded model's nine; vertebrae = "
                   "the union of vertebrae_*)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run_paint)


def _run_paint(args: argparse.Namespace) -> int:
    from fseft.data.painting import paint_dataset

    print(paint_dataset(args.labels, args.out, args.cases, args.seed, args.structures, overwrite=args.overwrite,
                        progress=args.progress))
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
