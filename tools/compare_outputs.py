"""Compare two output folders file by file (golden runs, demo or benchmark outputs): JSON / JSONL /
CSV ignoring timing keys and columns (``*seconds*``, ``*time*``), ``.pt`` checkpoints tensor by
tensor, everything else byte by byte; caches and ``log_*`` console logs are skipped.

    python tools/compare_outputs.py BEFORE AFTER
"""
import csv
import io
import json
import sys
from pathlib import Path
a, b = Path(sys.argv[1]), Path(sys.argv[2])
def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if not any(t in k for t in ("seconds", "time", "elapsed"))}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o
def _flatten(obj, prefix=""):
    """A checkpoint as sorted (path, value) pairs, tensors as lists."""
    if isinstance(obj, dict):
        return [x for k in sorted(obj, key=str) for x in _flatten(obj[k], f"{prefix}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in _flatten(v, f"{prefix}/{i}")]
    if hasattr(obj, "tolist"):
        return [(prefix, obj.tolist())]
    return [(prefix, obj)]


def norm(p):
    if p.suffix == ".json":
        return strip(json.loads(p.read_text()))
    if p.suffix == ".jsonl":
        return [strip(json.loads(l)) for l in p.read_text().splitlines() if l.strip()]
    if p.suffix == ".pt":  # zip bytes vary with pickling; the tensors and values must not
        import torch

        return _flatten(torch.load(p, map_location="cpu", weights_only=True))
    if p.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(p.read_text())))
        keep = [i for i, h in enumerate(rows[0]) if not any(t in h for t in ("seconds", "time"))]
        return [[r[i] for i in keep] for r in rows]
    return p.read_bytes()
files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "cache" not in p.parts and not p.name.startswith("log_"))
bad = 0
for f in files:
    if not (b / f).exists():
        print("missing", f); bad += 1; continue
    if norm(a / f) != norm(b / f):
        print("DIFF", f); bad += 1
print(f"{len(files)} files compared, {bad} differ")
