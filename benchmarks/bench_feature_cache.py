"""Feature cache vs the reference protocol: time per training epoch of black-box adapters.

Same model, same data, same patches, one run (cached and reference epochs alternate): for `lp` and `spatial-adapter`, an epoch of
training on cached fp16 features (`FeatureCache`) is timed against the reference protocol,
where the frozen backbone (fp32) recomputes the features of every patch. The reference is timed
twice: with the Swin window attention on MONAI's default explicit path, as the reference code
runs it, and with the fused attention fseft's Swin-UNETR uses without gradients (which also
builds the cache). Prints the ratios, the cache build time, its size on disk and the peak
resident memory after each phase.

    python benchmarks/bench_feature_cache.py                     # 48-channel Swin-UNETR
    python benchmarks/bench_feature_cache.py --feature-size 12   # quicker
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-size", type=int, default=48, help="Swin-UNETR feature size (48: public checkpoints)")
    parser.add_argument("--cases", type=int, default=2, help="support volumes (phantom cases)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per method and protocol")
    parser.add_argument("--patch-size", type=int, default=96)
    parser.add_argument("--patches-per-volume", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the adapter on cached features")
    parser.add_argument("--workdir", help="where phantom data and cache go (default: a temporary folder)")
    args = parser.parse_args(argv)

    from fseft.data.datasets import open_dataset
    from fseft.data.io import read_image
    from fseft.data.phantom import write_phantom_dataset
    from fseft.data.preprocessing import PreprocessConfig, preprocess
    from fseft.training.sampling import feature_patch_batch, feature_volume, sample_patch_slices
    from fseft.training.fit import supervised_loss
    from fseft.inference.feature_cache import FeatureCache
    from fseft.prediction.segment import InferenceConfig
    from fseft.methods import adapter_on, count_trainable_parameters
    from fseft.models.zoo import create_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fseft-bench-"))
    root = work / "phantom"
    if not (root / "dataset.json").exists():
        write_phantom_dataset(root, args.cases, domain="target", structures="liver,gallbladder", progress=False)
    dataset = open_dataset(root)
    cases = dataset.cases[: args.cases]
    structures = ("liver",)
    model = create_model("swin_unetr", ["liver", "spleen"], feature_size=args.feature_size).to(device).eval()
    model.requires_grad_(False)
    pre_cfg = PreprocessConfig()
    patch = (args.patch_size,) * 3
    inference = InferenceConfig(roi_size=patch, progress=False, device=args.device)

    # -- cache build (timed), then the preprocessed images the reference protocol crops
    cache = FeatureCache(model, pre_cfg, work / "cache", inference)
    cache.clear()
    t0 = time.perf_counter()
    cached = [cache.load(c, structures) for c in cases]
    build_s = time.perf_counter() - t0
    rss_build = _peak_rss_mb()
    images = []
    for c in cases:
        image, labels = c.load(structures)
        images.append(preprocess(image, labels, pre_cfg).image.as_tensor())
    volumes = [feature_volume(c.features, c.labels) for c in cached]
    shapes = [tuple(c.spatial_shape) for c in cached]

    # the same patch windows for every protocol and method: (epoch, volume) -> windows
    rng = np.random.RandomState(0)
    windows = [
        [sample_patch_slices(v.labels.shape[1:], v.fg, v.bg, patch, args.patches_per_volume, 0.5, rng) for v in volumes]
        for _ in range(args.epochs + 1)  # +1: a warm-up epoch, not timed
    ]

    def reference_batch(i: int, wins, fused: bool):
        """fp32 frozen backbone on each image patch (padded to a multiple of 32)."""
        model.fused_attention = fused
        crops = []
        for w in wins:
            crop = images[i][(slice(None), *w)]
            pad = [(-s) % 32 for s in crop.shape[1:]]
            crop = torch.nn.functional.pad(crop, [0, pad[2], 0, pad[1], 0, pad[0]])
            with torch.no_grad():
                feats = model.features(crop[None].to(device))
            crops.append(feats[..., : crop.shape[1] - pad[0], : crop.shape[2] - pad[1], : crop.shape[3] - pad[2]])
        labels = np.stack([volumes[i].labels[(slice(None), *w)] for w in wins])
        # the adapter gets the layout it is fastest in, as on the cached path
        return torch.cat(crops).contiguous(memory_format=torch.channels_last_3d), torch.from_numpy(labels).to(device)

    def run_epoch(method: str, source: str, adapter, opt, epoch_windows) -> float:
        start = time.perf_counter()
        for i, wins in enumerate(epoch_windows):
            if source == "cache":
                feats, labels = feature_patch_batch(volumes[i], wins, device, torch.bfloat16 if args.bf16 else torch.float32)
            else:
                feats, labels = reference_batch(i, wins, fused=source == "ref-fused")
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and source == "cache"):
                logits = adapter(feats)
            supervised_loss(logits, labels, multiclass=False).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    sources = ("cache", "reference", "ref-fused")

    def compare(method: str) -> dict[str, float]:
        """Cached and reference epochs alternate, so that load from other processes on a
        shared machine hits both alike; medians of the timed epochs."""
        runs = {}
        for source in sources:
            torch.manual_seed(0)
            adapter, _ = adapter_on(model, method, {}, structures, multiclass=False)
            adapter = adapter.to(device, memory_format=torch.channels_last_3d).train()
            opt = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-3)
            runs[source] = (adapter, opt, [])
        for epoch, epoch_windows in enumerate(windows):
            for source, (adapter, opt, times) in runs.items():
                seconds = run_epoch(method, source, adapter, opt, epoch_windows)
                if epoch > 0:  # epoch 0 warms up
                    times.append(seconds)
        medians = {source: float(np.median(times)) for source, (_, _, times) in runs.items()}
        n_params = count_trainable_parameters(runs["cache"][0])
        for source, seconds in medians.items():
            precision = "bf16 autocast" if args.bf16 and source == "cache" else "fp32"
            if source != "cache":
                precision += ", fused attention" if source == "ref-fused" else ", explicit attention"
            print(f"  {method:<16} {source:<10} {seconds:8.3f} s/epoch  ({precision}, {n_params} trainable params)",
                  flush=True)
        print(f"  peak RSS so far {_peak_rss_mb():.0f} MB", flush=True)
        return {source: medians[source] / medians["cache"] for source in sources[1:]}

    print(f"fseft feature-cache benchmark: Swin-UNETR feature_size={args.feature_size}, device={device}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"  {len(cases)} phantom volumes, model-space shapes {shapes}; {args.patches_per_volume} patches of "
          f"{patch} per volume per epoch; {args.epochs} timed epoch(s) after one warm-up epoch")
    print(f"  cache build: {build_s:.1f} s ({build_s / len(cases):.1f} s/volume), "
          f"{cache.size_bytes() / 2**20:.1f} MiB on disk, peak RSS {rss_build:.0f} MB")
    results = {}
    for method in ("lp", "spatial-adapter"):
        results[method] = compare(method)
    goals = {"lp": 30.0, "spatial-adapter": 5.0}
    print("speed-up of an epoch on cached features over the reference protocol "
          "(explicit attention, as the reference code; fused attention):")
    for method, ratios in results.items():
        print(f"  {method:<16} {ratios['reference']:6.1f}x  {ratios['ref-fused']:6.1f}x   "
              f"(goal >= {goals[method]:.0f}x with the 48-channel model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
