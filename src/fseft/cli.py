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
    p.set_defaults(func=_not_yet("datasets"))


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
