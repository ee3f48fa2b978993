"""The sliding-window core of inference: how a model runs over a whole preprocessed volume.

`predict_probabilities` runs a model over a preprocessed volume with
`monai.inferers.sliding_window_inference` (Gaussian blending of overlapping windows, as nnU-Net
and MONAI bundles do), through `sliding_window_map`, the one sliding-window loop of fseft
(logits, and the frozen features of `fseft.inference.feature_cache`). `InferenceConfig` says how.
A leaf of the engine: `fseft.prediction.segment` (a scan in, masks out), the feature cache and
the run loader (`fseft.runs.load`) build on it.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from fseft.errors import ConfigError

BLEND_MODES = ("gaussian", "constant")


DEFAULT_ROI_SIZE: tuple[int, int, int] = (96, 96, 96)  # the FSEFT protocol's window


@dataclass
class InferenceConfig:
    """How a model is run over a volume and its output turned into masks.

    roi_size: sliding-window size in model-space voxels (divisible by 32 for Swin-UNETR / U-Net);
        None = the window the model file recommends (the patch size it was trained on, see
        `recommended_roi_size`), else `DEFAULT_ROI_SIZE`.
    overlap: fraction of overlap between neighbouring windows, in [0, 1).
    sw_batch_size: windows per forward pass.
    blend: "gaussian" (centre-weighted, fewer seams) or "constant" (plain average).
    bf16: run the network under bfloat16 autocast (blending stays float32).
    threshold: a voxel is foreground where its sigmoid probability is above it.
    largest_component: keep only each structure's largest connected component (multi-part
        structures such as the vertebral column excepted, see `fseft.evaluation.postprocess`;
        `segment_volume` also leaves whole those the model file says to, see
        `recorded_whole_structures`).
    device: "cpu", "cuda" or "cuda:N".
    progress: tqdm progress bars.
    check_device: whether a CUDA device must be there now (construction argument; False for a
        config that only describes a run, such as `AdaptConfig.inference`, checked when it runs).
    """

    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.25
    sw_batch_size: int = 1
    blend: str = "gaussian"
    bf16: bool = False
    threshold: float = 0.5
    largest_component: bool = True
    device: str = "cpu"
    progress: bool = True
    check_device: InitVar[bool] = True

    def __post_init__(self, check_device: bool = True) -> None:
        if self.roi_size is not None:
            roi = tuple(int(v) for v in (self.roi_size if isinstance(self.roi_size, Sequence) else [self.roi_size] * 3))
            if len(roi) != 3 or min(roi) < 1:
                raise ConfigError(f"roi_size must be three positive integers, got {self.roi_size!r}")
            self.roi_size = roi
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}")
        if int(self.sw_batch_size) < 1:
            raise ConfigError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")
        if self.blend not in BLEND_MODES:
            raise ConfigError(f"blend must be one of {', '.join(BLEND_MODES)}, got {self.blend!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ConfigError(f"device: {exc}") from exc
        if check_device and device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")

    def for_model(self, model: nn.Module) -> InferenceConfig:
        """This config with `roi_size` resolved for `model` (None -> its recommended window)."""
        if self.roi_size is not None:
            return self
        return dataclasses.replace(self, roi_size=recommended_roi_size(model) or DEFAULT_ROI_SIZE)


def recommended_roi_size(model: nn.Module) -> tuple[int, int, int] | None:
    """The sliding window an fseft model file recommends (``extra.inference.roi_size``, written
    by `fseft pretrain` as its training patch size), looking through adapter wrappers (``.base``,
    ``.network``); None when the model records none."""
    roi = _recorded(model, "inference", "roi_size")
    return tuple(int(v) for v in roi) if roi else None  # type: ignore[return-value]

def recorded_whole_structures(model: nn.Module) -> frozenset[str]:
    """Structures an fseft model file says to keep whole, every connected component
    (``extra.postprocess.largest_component`` False: chosen on the validation set by `fseft
    pretrain`, `fseft.evaluation.postprocess.choose_largest_component`), looking through
    adapter wrappers; empty when the file records no choice."""
    choice = _recorded(model, "postprocess", "largest_component") or {}
    return frozenset(name for name, keep_largest in choice.items() if not keep_largest)


def _recorded(model: nn.Module, section: str, key: str) -> Any:
    """``extra[section][key]`` of the fseft model file behind `model` (itself, or the ``.base`` /
    ``.network`` an adapter wraps): the first that records it, else None."""
    for candidate in (model, getattr(model, "base", None), getattr(model, "network", None)):
        config = getattr(candidate, "model_config", None) or {}
        value = ((config.get("extra") or {}).get(section) or {}).get(key)
        if value:
            return value
    return None


@functools.cache
def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU has bfloat16 dot-product instructions (AVX-512 BF16 or AMX), read from
    ``/proc/cpuinfo``; None where that file is absent (not Linux): unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def warn_if_bf16_is_emulated(device: torch.device) -> None:
    """bf16 autocast on a CPU without bf16 instructions is emulated and slower than fp32: say so,
    once per process (the warning is attributed to this function, not to its several callers, so
    Python's default filter shows it once however many steps ask for bf16)."""
    if device.type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn(
            "bf16 was requested but this CPU has no bfloat16 instructions (avx512_bf16 / amx_bf16): "
            "it will be emulated and likely slower than fp32; drop --bf16 on this machine",
            RuntimeWarning,
            stacklevel=1,
        )


@functools.cache
def cpu_bf16_conv3d_gradient_is_wrong() -> bool:
    """Whether this PyTorch build's CPU bfloat16 3D convolution gets the weight gradient wrong
    for an input 2 voxels deep (see `check_bf16_training`): one 32-channel 2x2x2 convolution
    under autocast against the fp32 gradient of the same bf16-rounded tensors (milliseconds).
    Measured: wrong (relative error about 1) with torch 2.13 on this project's AMD EPYC CPUs
    from 24 channels up; right with torch 2.11 on the H200 machine's CPU and on CUDA."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad():
        x, grad_out = torch.randn(2, 1, 32, 2, 2, 2, generator=gen).unbind(0)
        weight = torch.randn(32, 32, 3, 3, 3, generator=gen, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.conv3d(x, weight, padding=1)
        out.backward(grad_out.to(out.dtype))
    # the weight gradient depends on the input and the output gradient only (both bf16 inside)
    reference = torch.nn.grad.conv3d_weight(x.bfloat16().float(), weight.shape, grad_out.bfloat16().float(), padding=1)
    error = (weight.grad.float() - reference).abs().max()
    return not bool(error <= 0.05 * reference.abs().max())


def check_bf16_training(model_cls: type, patch_size: Sequence[int], device: torch.device | str) -> None:
    """`ConfigError` for bf16 training on a CPU when a level of the network is 2 voxels deep
    and this PyTorch build's CPU bf16 convolution is wrong there.

    PyTorch's CPU bfloat16 3D convolution (oneDNN; found with torch 2.13) computes a wrong
    weight gradient when its input is 2 voxels deep (the first spatial axis; 3x3x3 kernels, 24
    channels or more): two of the kernel's three depth slices are off by about their own size in
    every call, and in about a third of the calls hold 1e20-1e37 or NaN, which would silently
    wreck the weights. A 64-deep patch meets it at Swin-UNETR's 1/32 level, a 32-deep one at
    1/16; a 96-deep patch is safe (levels 96 ... 3). fp32 and inference (no gradient) are
    unaffected; `cpu_bf16_conv3d_gradient_is_wrong` tests this build once per process.
    model_cls: the architecture class (its `downsampling`); patch_size: ``(D, H, W)``; device:
    resolved (``cpu``, ``cuda:N``; `fseft pretrain` resolves ``auto`` first, adapt never has it).
    """
    if torch.device(device).type != "cpu":
        return
    factor = int(getattr(model_cls, "downsampling", 1))
    depth = int(patch_size[0])
    levels = [depth // 2**k for k in range(factor.bit_length())]
    if 2 in levels and cpu_bf16_conv3d_gradient_is_wrong():
        raise ConfigError(
            f"bf16 training on a CPU with a patch {depth} voxels deep: the network sees it 2 voxels "
            f"deep at one level (depths {', '.join(map(str, levels))}), where this PyTorch's CPU bfloat16 "
            f"3D convolution gives wrong weight gradients (torch {torch.__version__}); drop --bf16 "
            "(inference may keep it), or choose a patch depth whose levels skip 2 (e.g. 96), or train on a GPU"
        )


@torch.inference_mode()
def sliding_window_map(
    model: nn.Module,
    image: torch.Tensor,
    cfg: InferenceConfig | None = None,
    window_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Blend a per-window map of `model` over a whole preprocessed volume (MONAI
    `sliding_window_inference`): the one sliding-window loop of fseft (logits, features).

    image: ``(1, 1, X, Y, Z)`` float, model space (e.g. `PreprocessedCase.image[None]`).
    window_fn: ``(B, 1, x, y, z) -> (B, C, x, y, z)``, default ``model`` itself (logits); run
        under bf16 autocast when `cfg.bf16`. `model` is moved to `cfg.device` and run in eval
        mode (its training flag is restored afterwards).
    Returns ``(1, C, X, Y, Z)`` float32 on the CPU, windows blended in float32.
    """

    cfg = (cfg or InferenceConfig()).for_model(model)
    if image.ndim != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"sliding-window inference expects a (1, 1, X, Y, Z) image, got shape {tuple(image.shape)}")
    device = torch.device(cfg.device)
    # a MetaTensor would drag its metadata through every window; the plain tensor suffices
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    window_fn = window_fn or model
    if cfg.bf16:
        warn_if_bf16_is_emulated(device)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            try:
                out = window_fn(window)
            except ValueError as exc:  # the architecture's own shape check, on the first window
                raise ConfigError(f"--roi-size {' '.join(map(str, cfg.roi_size))} does not fit this model: {exc}") from exc
        return out.float()  # blend in float32 whatever the autocast dtype

    was_training = model.training
    model.to(device).eval()
    try:
        out = sliding_window_inference(
            image.float(),
            roi_size=cfg.roi_size,
            sw_batch_size=cfg.sw_batch_size,
            predictor=predictor,
            overlap=cfg.overlap,
            mode=cfg.blend,
            sw_device=device,
            device=torch.device("cpu"),  # stitch on the host: a whole-volume C-channel map may not fit the GPU
            progress=cfg.progress,
        )
    finally:
        model.train(was_training)
    return torch.as_tensor(out).float()


def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    cfg: InferenceConfig | None = None,
    channels: Sequence[int] | None = None,
) -> torch.Tensor:
    """Sigmoid probabilities of a model over a whole preprocessed volume, by sliding windows.

    model: any module mapping ``(B, 1, x, y, z)`` to logits ``(B, C, x, y, z)``.
    image: ``(1, 1, X, Y, Z)`` float, model space (e.g. `PreprocessedCase.image[None]`).
    channels: output channels to keep (all when None); keeping only the needed ones saves the
        memory of the full ``C``-channel volume.
    Returns ``(1, C', X, Y, Z)`` float32 on the CPU, C' = len(channels) or C. Logits are
    blended across windows (`sliding_window_map`), then passed through the sigmoid.
    """
    cfg = cfg or InferenceConfig()
    index = None if channels is None else torch.as_tensor(list(channels), dtype=torch.long, device=cfg.device)

    def logits_of(window: torch.Tensor) -> torch.Tensor:
        logits = model(window)
        return logits if index is None else logits.index_select(1, index)

    return sliding_window_map(model, image, cfg, logits_of).sigmoid()
