"""The `fseft` command line. Each sub-command maps onto one Python API function and holds no
logic of its own; imports are lazy so that `fseft --help` answers at once.

Each sub-command is declared by its own `_add_<name>(subparsers)` function below.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fseft import __version__
from fseft.errors import FseftError


def _csv(value: str) -> list[str]:
    """Parse a comma-separated list option (`--structures liver,spleen`)."""
    return [v.strip() for v in value.split(",") if v.strip()]


# ---------------------------------------------------------------------------- sub-commands
# Each `_add_<name>` function registers one sub-command; keep them in `SUBCOMMANDS` order.


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write a synthetic abdomen CT dataset (nnU-Net layout)")
    p.set_defaults(func=_not_yet("phantom"))


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
    inspect.add_argument("dir", help="dataset folder (nnU-Net v2 raw, TotalSegmentator or FLARE22)")
    inspect.add_argument("--layout", default="auto", choices=["auto", "nnunet", "totalseg", "flare22"],
                         help="dataset layout (default: detected)")
    inspect.add_argument("--cases", action="store_true", help="also print the per-case voxel counts")
    inspect.add_argument("--json", metavar="OUT", help="also write the full summary as JSON to OUT")
    inspect.add_argument("--cache-dir", help="voxel-count cache (default: $FSEFT_CACHE_DIR or ~/.cache/fseft)")
    inspect.add_argument("--no-progress", action="store_true", help="no progress bar")
    inspect.set_defaults(func=_run_datasets_inspect)


def _run_datasets_inspect(args: argparse.Namespace) -> int:
    from fseft.data.datasets import inspect_dataset

    print(inspect_dataset(args.dir, args.layout, cases=args.cases, json_path=args.json,
                          cache_dir=args.cache_dir, progress=not args.no_progress))
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo and whether each weights file is present")
    p.set_defaults(func=_not_yet("models"))


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment scans (NIfTI or DICOM) into masks in their own geometry")
    p.set_defaults(func=_not_yet("predict"))


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice, NSD and HD95 of predicted masks against ground truth")
    p.set_defaults(func=_not_yet("evaluate"))


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="supervised pre-training with partial labels (torch DDP)")
    p.set_defaults(func=_not_yet("pretrain"))


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_phantom,
    _add_datasets,
    _add_models,
    _add_predict,
    _add_evaluate,
    _add_pretrain,
)


def _not_yet(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise FseftError(f"`fseft {name}` is not implemented yet")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fseft",
        description="Few-shot, parameter-efficient fine-tuning of volumetric CT segmentation models.",
    )
    parser.add_argument("--version", action="version", version=f"fseft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except FseftError as exc:
        print(f"fseft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fseft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
