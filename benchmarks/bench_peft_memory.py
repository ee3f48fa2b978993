"""Benchmark: peak training memory and step time of ``lora --decoder fine-tuned`` against ``ft``.

Same network (a randomly initialised Swin-UNETR: nothing is downloaded), same random patch,
same AdamW step (forward, BCE + Dice loss, backward, optimiser step), measured side by side in
one run:

- ft        : every weight trained (AdamW keeps two moments of each);
- lora-ft   : LoRA rank 4 on the Swin ``qkv`` + fine-tuned decoder (decoder1..5) + head;
- lora      : LoRA with the decoder frozen (for reference).

Memory. CPU: every configuration runs in a fresh process (the peak RSS, ``ru_maxrss``, of a
process never goes down); printed are the peak RSS and its increase over the RSS once the
model is built ("training overhead": activations, gradients, optimiser state). GPU (where
CUDA is available): ``torch.cuda.max_memory_allocated`` in the same process. Step time: the
median of the timed steps after one warm-up step; configurations alternate between repeats.

    python benchmarks/bench_peft_memory.py                                 # 96^3, feature_size 48
    python benchmarks/bench_peft_memory.py --feature-size 12 --patch 64    # quicker
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from typing import Any

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "ft": ("ft", {}),
    "lora-ft": ("lora", {"decoder": "fine-tuned", "rank": 4}),
    "lora": ("lora", {"decoder": "frozen", "rank": 4}),
}


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_config(name: str, args: dict[str, Any]) -> dict[str, float]:
    """Build the model, prepare `name`, run the steps; returns memory (MiB) and step times (s)."""
    import torch

    from fseft.training.losses import per_class_bce_dice
    from fseft.methods.peft_methods import apply_method, count_trainable, method_train_mode, post_step
    from fseft.models.zoo import create_model

    torch.set_num_threads(args["threads"]) if args["threads"] else None
    device = torch.device(args["device"])
    rss_start = _rss_mib()
    torch.manual_seed(0)
    base = create_model("swin_unetr", ["liver"], feature_size=args["feature_size"],
                        use_checkpoint=args["checkpoint"])
    method, options = CONFIGS[name]
    model = apply_method(base, method, ["liver"], **options).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    p = args["patch"]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, p, p, p, generator=gen).to(device)
    y = (torch.rand(1, 1, p, p, p, generator=gen) > 0.8).float().to(device)
    method_train_mode(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    rss_model = _rss_mib()
    times = []
    for step in range(args["steps"] + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["bf16"]):
            logits = model(x)
        loss = per_class_bce_dice(logits.float(), y).mean()
        loss.backward()
        optimizer.step()
        post_step(model, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step allocates the optimiser state and warms up kernels
            times.append(time.perf_counter() - t0)
    out = {
        "trainable": float(count_trainable(model)),
        "rss_start": rss_start,
        "rss_model": rss_model,
        "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": statistics.median(times),
    }
    if device.type == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_overhead"] = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20
    return out


def _child(name: str, args: dict[str, Any], queue: mp.Queue) -> None:
    queue.put(run_config(name, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feature-size", type=int, default=48, help="Swin-UNETR feature_size (default 48)")
    parser.add_argument("--patch", type=int, default=96, help="patch edge in voxels, a multiple of 32 (default 96)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats of every configuration (default 1)")
    parser.add_argument("--configs", default="ft,lora-ft,lora", help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--checkpoint", action="store_true", help="gradient checkpointing in the Swin blocks")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ns = parser.parse_args()
    if ns.patch % 32:
        parser.error("--patch must be a multiple of 32")
    names = [n.strip() for n in ns.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    args = {k: getattr(ns, k) for k in ("feature_size", "patch", "steps", "checkpoint", "bf16", "threads", "device")}

    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    ctx = mp.get_context("spawn")
    for _ in range(ns.repeats):
        for name in names:
            if args["device"] == "cpu":  # a fresh process: its peak RSS is this configuration's
                queue = ctx.Queue()
                proc = ctx.Process(target=_child, args=(name, args, queue))
                proc.start()
                res = queue.get()
                proc.join()
            else:
                res = run_config(name, args)
            results[name].append(res)

    print(f"Swin-UNETR feature_size={ns.feature_size}, patch {ns.patch}^3, batch 1, AdamW, device={args['device']}, "
          f"checkpointing={'on' if ns.checkpoint else 'off'}, bf16={'on' if ns.bf16 else 'off'}, "
          f"{ns.steps} timed steps x {ns.repeats} repeat(s)")
    cols = ["trainable", "peak RSS MiB", "train overhead MiB", "step s"]
    if args["device"] != "cpu":
        cols += ["GPU peak MiB", "GPU overhead MiB"]
    print(f"{'config':10s}" + "".join(f"{c:>20s}" for c in cols))
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        runs = results[name]
        s = {
            "trainable": runs[0]["trainable"],
            "rss_peak": max(r["rss_peak"] for r in runs),
            "overhead": max(r["rss_peak"] - r["rss_model"] for r in runs),
            "step_s": statistics.median(r["step_s"] for r in runs),
        }
        if "gpu_peak" in runs[0]:
            s["gpu_peak"] = max(r["gpu_peak"] for r in runs)
            s["gpu_overhead"] = max(r["gpu_overhead"] for r in runs)
        summary[name] = s
        row = [f"{int(s['trainable']):,}", f"{s['rss_peak']:.0f}", f"{s['overhead']:.0f}", f"{s['step_s']:.3f}"]
        if "gpu_peak" in s:
            row += [f"{s['gpu_peak']:.0f}", f"{s['gpu_overhead']:.0f}"]
        print(f"{name:10s}" + "".join(f"{v:>20s}" for v in row))
    if "ft" in summary:
        for name in names:
            if name == "ft":
                continue
            ft, other = summary["ft"], summary[name]
            ratios = (f"ft/{name}: training overhead x{ft['overhead'] / max(other['overhead'], 1e-9):.2f}, "
                      f"peak RSS x{ft['rss_peak'] / other['rss_peak']:.2f}, step time x{ft['step_s'] / other['step_s']:.2f}")
            if "gpu_peak" in other:
                ratios += f", GPU peak x{ft['gpu_peak'] / other['gpu_peak']:.2f}"
            print(ratios)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
