"""Decoder training on cached encoder outputs vs through the network: time per training step.

`fseft adapt --method decoder` (and ft-last) train only what lies after a split point of the
architecture, so the frozen encoder's outputs of a patch can be computed once
(`fseft.adaptation.encoder_cache`). This times, in one run with the two alternating, one training
step (forward, loss, backward) of the decoder and head on one patch:

- through the network: the frozen encoder recomputed (what `--no-encoder-cache` does);
- on the cache: the stored encoder outputs read back (float16 memmaps), decoder and head only;

and prints their ratio, the ratio of their matmul and convolution operations (what the time ratio
tends to where those dominate, as on GPUs), the one-off cost of encoding a patch, and the cache size per patch and
per support volume (a 1.5 mm phantom, the reference spacing, with `AdaptConfig`'s default pool).

    python benchmarks/bench_decoder_cache.py                          # 48-channel Swin-UNETR, 96^3
    python benchmarks/bench_decoder_cache.py --feature-size 12 --patch-size 64   # the phantom model's size
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-size", type=int, default=48, help="Swin-UNETR feature size (48: public checkpoints)")
    parser.add_argument("--patch-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path (after one warm-up step each)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast on both paths")
    parser.add_argument("--workdir", help="where the cache goes (default: a temporary folder)")
    args = parser.parse_args(argv)

    from fseft.adaptation.runner import AdaptConfig
    from fseft.training.fit import supervised_loss
    from fseft.adaptation.encoder_cache import EncoderCache, PatchPool, split_point_for
    from fseft.methods.peft_methods import apply_method, count_trainable, method_train_mode
    from fseft.models.zoo import create_model

    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fseft-bench-"))
    model = create_model("swin_unetr", ["liver"], feature_size=args.feature_size)
    model = method_train_mode(apply_method(model, "decoder", ["gallbladder"]))
    point = split_point_for(model)
    cache = EncoderCache(model, point, "bench" + "0" * 59, work / "cache")
    n = args.patch_size
    patches = [torch.rand(1, n, n, n) for _ in range(args.steps + 1)]
    labels = [(torch.rand(1, 1, n, n, n) > 0.9).to(torch.uint8) for _ in patches]
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"Swin-UNETR feature size {args.feature_size}, patch {n}^3, decoder method: {count_trainable(model):,} "
          f"trainable parameters, split point {point!r}, bf16 {args.bf16}")

    start = time.perf_counter()
    cached = [cache.get(p) for p in patches]
    encode_s = (time.perf_counter() - start) / len(patches)
    per_patch = cache.size_bytes() / len(patches)

    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def through(i: int) -> None:
        with torch.autocast(**autocast):
            logits = model(patches[i][None])
        supervised_loss(logits, labels[i], False).backward()

    def on_cache(i: int) -> None:
        tensors, lab = PatchPool.batch([{"cached": cached[i], "label": labels[i][0]}], torch.device("cpu"))
        with torch.autocast(**autocast):
            logits = model.head(model.decode(tensors, point))
        supervised_loss(logits, lab, False).backward()

    times: dict[str, list[float]] = {"network": [], "cache": []}
    for i in range(len(patches)):  # step 0 warms both up; the paths alternate
        for name, step in (("network", through), ("cache", on_cache)):
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            step(i)
            if i:
                times[name].append(time.perf_counter() - t0)
    # Floating-point operations of one step on each path (torch's FlopCounterMode: matmuls and
    # convolutions, forward and backward): the time ratio tends to theirs where those dominate
    # (GPUs); the memory-bound operations the counter does not see (the Swin's window shifts,
    # softmax, norms) add time to the network path, more on CPUs.
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for name, step in (("network", through), ("cache", on_cache)):
        counter = FlopCounterMode(display=False)
        with counter:
            step(0)
        flops[name] = counter.get_total_flops()
        for p in params:
            p.grad = None
    net, cac = float(np.mean(times["network"])), float(np.mean(times["cache"]))
    print(f"step through the network   {net:8.2f} s")
    print(f"step on cached outputs     {cac:8.2f} s")
    print(f"ratio                      {net / cac:8.2f} x")
    print(f"FLOPs per step             {flops['network'] / 1e9:8.1f} / {flops['cache'] / 1e9:.1f} GFLOP "
          f"(network / cache): ratio {flops['network'] / flops['cache']:.2f} x")
    print(f"encoding a patch (once)    {encode_s:8.2f} s")
    print(f"cache per patch            {per_patch / 2**20:8.1f} MiB (float16)")

    # A 1.5 mm abdominal phantom (about 105 x 105 x 98 voxels after cropping) is larger than a
    # 96^3 patch: its pool holds up to encoder_pool_epochs x patches_per_volume distinct windows.
    cfg = AdaptConfig(method="decoder").resolved()
    windows = cfg.encoder_pool_epochs * cfg.patches_per_volume
    fits = all(s <= n for s in (105, 105, 98))
    per_volume = per_patch * (1 if fits else windows)
    print(f"cache per 1.5 mm phantom   {per_volume / 2**30:8.2f} GiB ({1 if fits else windows} windows: "
          f"encoder_pool_epochs {cfg.encoder_pool_epochs} x patches_per_volume {cfg.patches_per_volume})")
    print(f"break-even                 {math.ceil(encode_s / max(net - cac, 1e-9))} steps per cached patch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
