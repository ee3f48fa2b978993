"""The `fseft` command line. Each sub-command maps onto one Python API function and holds no
logic of its own; imports are lazy so that `fseft --help` answers at once.

Each sub-command is declared by its own `_add_<name>(subparsers)` function (`data_commands`:
phantom, datasets, models, evaluate; `model_commands`: predict, pretrain, adapt, benchmark, demo). The method
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
from fseft.cli.data_commands import _add_datasets, _add_evaluate, _add_models, _add_paint, _add_phantom
from fseft.cli.model_commands import _add_adapt, _add_benchmark, _add_demo, _add_predict, _add_pretrain
from fseft.cli.parsing import _Parser
from fseft.errors import FseftError, InputFileError

SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_phantom,
    _add_paint,
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
