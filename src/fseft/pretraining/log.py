"""The pre-training log: ``log.jsonl`` (one record per epoch), ``log.csv`` (the same as a table),
optional TensorBoard scalars, and the line printed per epoch. Rank 0 writes it."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fseft.utils import write_text

LOG_NAME = "log.jsonl"
CSV_LOG_NAME = "log.csv"


def csv_log(history: Sequence[Mapping[str, Any]], catalogue: Sequence[str]) -> str:
    """``log.csv``: one row per epoch, training loss per class and validation Dice per class."""
    has_val = any("val_dice" in r for r in history)
    header = ["epoch", "loss", "lr", "seconds"] + [f"loss_{c}" for c in catalogue]
    if has_val:
        header += [f"val_dice_{c}" for c in catalogue] + ["val_dice_mean"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in history:
        row = [r["epoch"], f"{r['loss']:.5f}", f"{r['lr']:.3e}", r["seconds"]]
        row += ["" if r["loss_per_class"].get(c) is None else f"{r['loss_per_class'][c]:.5f}" for c in catalogue]
        if has_val:
            val = r.get("val_dice") or {}
            row += ["" if c not in val else f"{val[c]:.4f}" for c in catalogue]
            row += ["" if not val else f"{np.mean(list(val.values())):.4f}"]
        writer.writerow(row)
    return buffer.getvalue()


def _open_tensorboard(out: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: TensorBoard is not a dependency
    except ImportError:
        print("note: TensorBoard is not installed (pip install tensorboard); logging to log.jsonl only", flush=True)
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def read_log(path: Path, upto_epoch: int) -> list[str]:
    """The lines of ``log.jsonl`` up to `upto_epoch` (a resumed run continues after them)."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= upto_epoch:
                lines.append(line)
        except ValueError:
            continue  # a torn line cannot occur with atomic writes; skip anything odd
    return lines


class PretrainLog:
    """The epoch records of a run: `history` on every rank; files, TensorBoard and printing only
    where `write` (rank 0). A resumed run starts from the records up to `start_epoch`."""

    def __init__(self, out: Path, catalogue: Sequence[str], epochs: int, *, write: bool, resume_from: int | None = None,
                 tensorboard: bool = False) -> None:
        self.out, self.catalogue, self.epochs, self.write = out, list(catalogue), epochs, write
        self.lines = read_log(out / LOG_NAME, resume_from) if resume_from is not None else []
        self.history: list[dict[str, Any]] = [json.loads(line) for line in self.lines]
        self.writer = _open_tensorboard(out, tensorboard) if write else None

    def add(self, record: dict[str, Any]) -> None:
        """Append one epoch's record (``epoch``, ``loss``, ``loss_per_class``, ``lr``, ``seconds``,
        optional ``val_dice``)."""
        self.history.append(record)
        if not self.write:
            return
        self.lines.append(json.dumps(record))
        write_text(self.out / LOG_NAME, "\n".join(self.lines) + "\n")
        write_text(self.out / CSV_LOG_NAME, csv_log(self.history, self.catalogue))
        epoch, per_class = record["epoch"], record["loss_per_class"]
        classes = "  ".join(f"{c} {v:.3f}" for c, v in per_class.items() if v is not None)
        print(f"epoch {epoch}/{self.epochs}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
              f"{record['seconds']:.1f}s  |  {classes}", flush=True)
        if "val_dice" in record:
            dice = record["val_dice"]
            print(f"  validation Dice (mean {np.mean(list(dice.values())):.3f}): "
                  + "  ".join(f"{c} {v:.3f}" for c, v in dice.items()), flush=True)
        if self.writer is not None:
            self.writer.add_scalar("loss/total", record["loss"], epoch)
            for c, v in per_class.items():
                if v is not None:
                    self.writer.add_scalar(f"loss/{c}", v, epoch)
            self.writer.add_scalar("lr", record["lr"], epoch)
            for c, v in record.get("val_dice", {}).items():
                self.writer.add_scalar(f"val_dice/{c}", v, epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
