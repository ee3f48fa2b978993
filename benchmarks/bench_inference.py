"""Benchmark: fseft's sliding-window inference against a plain MONAI call, and its bf16 path.

Same network, same volume, same windows, measured side by side in one run (interleaved
repeats in alternating order, best time of each kept, every time printed):

- plain   : ``monai.inferers.sliding_window_inference(image, roi, sw, model, overlap,
            mode="gaussian")`` then the sigmoid, what a MONAI user writes;
- plain, explicit attention : the same with the Swin window attention on MONAI's default
            explicit path (``use_flash_attention=False``, as the reference code runs it): shows
            what the fused attention that fseft's Swin-UNETR uses without gradients gains;
- fp32    : ``fseft.prediction.segment.predict_probabilities`` (expected ratio plain/fp32 >= 1.0:
            no overhead);
- bf16    : the same with ``bf16=True`` (goal: fp32/bf16 >= 1.5) and Dice >= 0.99 between
            the fp32 and bf16 masks thresholded at 0.5.

The volume is the real CT ``example_ct.nii.gz`` (shared examples) preprocessed to 1.5 mm and
cropped / padded to SIZE^3, or a synthetic one where it is absent. The network is a randomly
initialised Swin-UNETR (no weights are downloaded), so the masks have no anatomical meaning;
the foreground fraction is printed to show the Dice is not that of two empty masks.

    python benchmarks/bench_inference.py                    # Swin-UNETR feature_size 48
    python benchmarks/bench_inference.py --feature-size 24  # quicker
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

EXAMPLE_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg-examples" / "example_ct.nii.gz"


def load_volume(size: int) -> tuple[torch.Tensor, str]:
    """(1, 1, size, size, size) float32 in [0, 1]."""
    if EXAMPLE_CT.is_file():
        from fseft.data.io import read_image
        from fseft.data.preprocessing import preprocess

        image = preprocess(read_image(EXAMPLE_CT)).image.as_tensor()[0]
        out = torch.zeros(size, size, size)
        src = [slice(max(0, (n - size) // 2), max(0, (n - size) // 2) + min(n, size)) for n in image.shape]
        dst = [slice(max(0, (size - n) // 2), max(0, (size - n) // 2) + min(n, size)) for n in image.shape]
        out[tuple(dst)] = image[tuple(src)]
        return out[None, None], f"{EXAMPLE_CT.name} (1.5 mm, cropped/padded to {size}^3)"
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 1, size // 8, size // 8, size // 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear")
    return smooth, f"synthetic smooth noise {size}^3"


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=160, help="volume edge in voxels (default 160)")
    parser.add_argument("--feature-size", type=int, default=48, help="Swin-UNETR feature_size (default 48)")
    parser.add_argument("--roi", type=int, default=96, help="window edge (default 96)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--classes", type=int, default=29, help="output channels (default 29, the FSEFT model's)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the best time of each is kept")
    parser.add_argument("--skip-explicit", action="store_true",
                        help="do not time the explicit-attention MONAI run (the slowest; quicker repeats)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from monai.inferers import sliding_window_inference

    from fseft.data.structures import FSEFT_CLASSES
    from fseft.prediction.segment import InferenceConfig, predict_probabilities
    from fseft.models.zoo import create_model

    torch.manual_seed(0)
    classes = [*FSEFT_CLASSES, *(f"extra_{i}" for i in range(max(0, args.classes - len(FSEFT_CLASSES))))][: args.classes]
    device = torch.device(args.device)
    model = create_model("swin_unetr", classes, feature_size=args.feature_size).to(device).eval()
    image, what = load_volume(args.size)
    roi = (args.roi,) * 3
    cfg32 = InferenceConfig(roi_size=roi, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                            device=args.device, progress=False)
    cfg16 = InferenceConfig(**{**cfg32.__dict__, "bf16": True})

    def plain() -> torch.Tensor:
        with torch.inference_mode():
            logits = sliding_window_inference(image.to(device), roi, args.sw_batch_size, model,
                                              overlap=args.overlap, mode="gaussian")
            return logits.sigmoid().cpu()

    def plain_explicit() -> torch.Tensor:
        model.fused_attention = False
        try:
            return plain()
        finally:
            model.fused_attention = True

    runs = {
        "plain MONAI fp32, explicit attention": plain_explicit,
        "plain MONAI fp32": plain,
        "fseft fp32": lambda: predict_probabilities(model, image, cfg32),
        "fseft bf16": lambda: predict_probabilities(model, image, cfg16),
    }
    if args.skip_explicit:
        del runs["plain MONAI fp32, explicit attention"]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"volume: {what}; Swin-UNETR feature_size={args.feature_size}, {len(classes)} classes; "
          f"roi {args.roi}^3, overlap {args.overlap}, sw_batch_size {args.sw_batch_size}; "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    # warm-up: one window in each precision (kernel selection, allocator), not timed
    with torch.inference_mode():
        window = image[..., : args.roi, : args.roi, : args.roi].to(device)
        model(window)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            model(window)
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, torch.Tensor] = {}
    for repeat in range(args.repeats):
        # alternate the order, so that no run always follows the same one
        for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
            run = runs[name]
            sync()
            start = time.perf_counter()
            outputs[name] = run()
            sync()
            times[name].append(time.perf_counter() - start)
    best = {name: min(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"  {name:<36} {best[name]:8.2f} s  (best of {', '.join(f'{t:.2f}' for t in ts)})")
    masks = {name: out > 0.5 for name, out in outputs.items()}
    fg = float(masks["fseft fp32"].float().mean())
    print(f"plain / fseft fp32 time ratio : {best['plain MONAI fp32'] / best['fseft fp32']:.3f}  (>= 1.0: no overhead)")
    if args.repeats > 1:  # the two runs of one repeat are neighbours in time: their ratio drifts less
        paired = [p / f for p, f in zip(times["plain MONAI fp32"], times["fseft fp32"])]
        print(f"  per repeat: {', '.join(f'{r:.3f}' for r in paired)}; median {float(np.median(paired)):.3f}")
    print(f"fseft fp32 / bf16 speed-up    : {best['fseft fp32'] / best['fseft bf16']:.3f}  (goal >= 1.5)")
    explicit = best.get("plain MONAI fp32, explicit attention")
    if explicit is not None:
        print(f"explicit-attention fp32 / fseft fp32 : {explicit / best['fseft fp32']:.3f}")
        print(f"explicit-attention fp32 / fseft bf16 : {explicit / best['fseft bf16']:.3f}")
    print(f"max |p| fseft fp32 - plain    : {float((outputs['fseft fp32'] - outputs['plain MONAI fp32']).abs().max()):.2e}")
    print(f"Dice fp32 vs bf16 masks       : {dice(masks['fseft fp32'], masks['fseft bf16']):.4f}  (goal >= 0.99; "
          f"foreground fraction {fg:.3f})")


if __name__ == "__main__":
    main()
