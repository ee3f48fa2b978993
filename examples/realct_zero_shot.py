"""Zero-shot figures of a model on the real CT beside the checkout (docs/real_ct.md): Dice / NSD
per structure and patient on the three abdominal patients, and the false-positive volume of the
abdominal organs on the head-and-neck CT s0002.

    python examples/make_realct_dataset.py                       # runs/realct_data
    python examples/realct_zero_shot.py --model phantom --out runs/realct_zs
    python examples/realct_zero_shot.py --model runs/pretrain_v6/model.safetensors --out runs/realct_zs_v6 \
        --trained-on s0009,example_ct_dicom

`--trained-on` names the patients whose anatomy the model was trained on (`fseft paint
--labels`): their columns are marked, so that no figure passes for held-out when it is not.
Writes ``metrics.json`` (fseft evaluate's report), ``s0002_statistics.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fseft.data.io import read_labels
from fseft.evaluation.report import evaluate_folders
from fseft.prediction.predict import predict_path
from fseft.prediction.segment import InferenceConfig

STRUCTURES = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "aorta", "inferior_vena_cava",
              "vertebrae")
ABDOMINAL_ORGANS = STRUCTURES[:-1]
PATIENTS = ("s0009", "example_ct_sm", "example_ct_dicom")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="phantom", help="zoo id or fseft model file (default: phantom)")
    parser.add_argument("--data", default="runs/realct_data", help="examples/make_realct_dataset.py's folder")
    parser.add_argument("--head-neck", default="../shared/data/totalseg-dataset/s0002/ct.nii.gz")
    parser.add_argument("--out", required=True)
    parser.add_argument("--trained-on", default="", help="comma-separated patients the model was trained on")
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    trained = {p for p in args.trained_on.split(",") if p}
    cfg = InferenceConfig(progress=False)
    for patient in PATIENTS:
        predict_path(data / patient / "ct.nii.gz", out / "pred" / f"{patient}.nii.gz", args.model, cfg=cfg)
    report = evaluate_folders(out / "pred", data, STRUCTURES, out=out / "metrics.json", progress=False)
    fp = predict_path(args.head_neck, out / "s0002" / "s0002.nii.gz", args.model, cfg=cfg, statistics=True)
    stats = json.loads(fp.statistics_file.read_text())["ct"]
    (out / "s0002_statistics.json").write_text(json.dumps(stats, indent=1))

    def head(p: str) -> str:
        return f"{p} (trained on)" if p in trained else f"**{p}** (held out)"

    lines = [f"model: `{args.model}`; Dice / NSD at 2 mm; patients whose anatomy the model was trained on are marked",
             "", "| structure | " + " | ".join(head(p) for p in PATIENTS) + " |",
             "|---|" + "---:|" * len(PATIENTS)]
    for s in STRUCTURES:
        cells = []
        for p in PATIENTS:
            m = report.cases[p][s]
            if not (read_labels(data / p / "segmentations" / f"{s}.nii.gz").array > 0).any():
                cells.append("not in the scan")  # Dice 1 when nothing is predicted: not a success
            else:
                cells.append(f"{m['dice']:.3f} / {m['nsd']:.3f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    fp_ml = sum(stats[s]["volume_ml"] for s in ABDOMINAL_ORGANS if s in stats)
    lines += ["", f"s0002 (head and neck, held out): abdominal organs predicted {fp_ml:.1f} ml in all ("
              + ", ".join(f"{s} {stats[s]['volume_ml']:.1f}" for s in ABDOMINAL_ORGANS if s in stats) + ")"]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
