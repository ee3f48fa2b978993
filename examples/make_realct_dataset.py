"""Assemble the real CT under ../shared/data into one TotalSegmentator-layout dataset folder, for
`examples/experiment_realct.yaml`, `fseft evaluate` and the real-CT tests (docs/real_ct.md).

    python examples/make_realct_dataset.py [--shared ../shared/data] [--out runs/realct_data]

The three abdominal patients become three cases (``<case>/ct.nii.gz``,
``<case>/segmentations/<structure>.nii.gz``), which fseft's TotalSegmentator reader takes as
they are:

- ``s0009``: the TotalSegmentator subject, its scan and 117 masks linked (not copied);
- ``example_ct_sm``: the 30-slice TotalSegmentator example, its scan linked, its multilabel mask
  (``example_seg.nii.gz``, ``total_class_map.json``) written as one binary mask per class;
- ``example_ct_dicom``: the DICOM patient, its series written as NIfTI by fseft's own reader
  (the grid `fseft predict` reads from the folder), its multilabel mask split likewise.

Each case also gets ``vertebrae.nii.gz``, the union of its ``vertebrae_*`` masks: the embedded
phantom model has one label for the vertebral column. Nothing else is changed, and
``s0002`` (head and neck) is left out: it is scored apart, on its own folder.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

CASES = ("s0009", "example_ct_sm", "example_ct_dicom")


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))


def _split_multilabel(label_file: Path, class_map: dict[int, str], seg_dir: Path) -> None:
    from fseft.data.io import read_labels, write_mask

    labels = read_labels(label_file)
    for value, name in class_map.items():
        write_mask((labels.array == value).astype(np.uint8), labels, seg_dir / f"{name}.nii.gz")


def _write_vertebrae(seg_dir: Path) -> None:
    from fseft.data.io import read_labels, write_mask

    parts = sorted(p for p in seg_dir.glob("vertebrae_*.nii.gz"))
    first = read_labels(parts[0])
    union = np.zeros(first.array.shape, bool)
    for part in parts:
        union |= read_labels(part).array > 0
    write_mask(union.astype(np.uint8), first, seg_dir / "vertebrae.nii.gz")


def build(shared: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the dataset folder `out` from the shared data folder `shared` (holding
    ``totalseg-dataset/`` and ``totalseg-examples/``); returns `out`. Idempotent: a case
    already complete is left as it is."""
    from fseft.data.io import read_image, write_image

    shared, out = Path(shared), Path(out)
    subjects, examples = shared / "totalseg-dataset", shared / "totalseg-examples"
    class_map = {int(v): n for v, n in json.loads((examples / "total_class_map.json").read_text()).items()}
    for case in CASES:
        seg_dir = out / case / "segmentations"
        if (seg_dir / "vertebrae.nii.gz").is_file():
            continue  # written last: the case is complete
        seg_dir.mkdir(parents=True, exist_ok=True)
        if case == "s0009":
            _link(subjects / case / "ct.nii.gz", out / case / "ct.nii.gz")
            for mask in sorted((subjects / case / "segmentations").glob("*.nii.gz")):
                _link(mask, seg_dir / mask.name)
        elif case == "example_ct_sm":
            _link(examples / "example_ct_sm.nii.gz", out / case / "ct.nii.gz")
            _split_multilabel(examples / "example_seg.nii.gz", class_map, seg_dir)
        else:
            write_image(read_image(examples / "example_ct_dicom"), out / case / "ct.nii.gz")
            _split_multilabel(examples / "example_seg_dicom.nii.gz", class_map, seg_dir)
        _write_vertebrae(seg_dir)
    return out


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(here.parent.parent / "shared" / "data"),
                        help="the shared data folder (default: ../shared/data beside the checkout)")
    parser.add_argument("--out", default=str(here.parent / "runs" / "realct_data"),
                        help="the dataset folder to write (default: runs/realct_data)")
    args = parser.parse_args(argv)
    print(build(args.shared, args.out))


if __name__ == "__main__":
    main()
