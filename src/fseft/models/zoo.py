"""Model zoo: architectures by name, the public checkpoints fseft can adapt, and `load_model`.

Weights are never downloaded: ``load_model(<id>)`` reads ``--weights PATH`` or
``$FSEFT_WEIGHTS_DIR/<id>.pth`` (``.pt``, ``.safetensors``, or the published file name) and,
when absent, says where the weights are published and where fseft looked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fseft.data.structures import (
    BTCV_CLASSES,
    CLIPDRIVEN_CLASSES,
    FSEFT_CLASSES,
    SUPREM_CLASSES,
)
from fseft.errors import ConfigError, InputFileError
from fseft.models.architectures import ARCH_ALIASES, ARCHITECTURES, check_window, create_model, variant_options
from fseft.models.base import SegmentationModel
from fseft.models.checkpoint import (
    KeyLayout,
    KeyRules,
    extract_state_dict,
    load_model_file,
    load_state_dict_layouts,
    read_checkpoint,
    read_model_file_config,
)
from fseft.utils import file_sha256

__all__ = ["ARCHITECTURES", "ARCH_ALIASES", "MODEL_SPECS", "ModelSpec", "check_window", "create_model", "load_model"]

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
WEIGHTS_DIR_ENV = "FSEFT_WEIGHTS_DIR"

# Intensity / resampling every public checkpoint below was trained with (their configs):
# 1.5 mm isotropic, HU window [-175, 250] scaled to [0, 1]. Keys of PreprocessConfig.to_dict().
PUBLIC_PREPROCESS: dict[str, Any] = {
    "spacing": [1.5, 1.5, 1.5],
    "hu_window": [-175.0, 250.0],
    "orientation": "RAS",
    "crop_foreground": True,
}

# Key rules shared by the Swin-UNETR checkpoints: timm-style MLP names of the self-supervised
# encoder, and the names the public code gives the 1x1x1 head.
_SWIN_RENAMES: tuple[tuple[str, str], ...] = (
    (r"\.mlp\.fc([12])\.", r".mlp.linear\1."),
    (r"^swin_vit\.", "swinViT."),  # the self-supervised pre-training code before research-contributions 659d711
    (r"^out\.conv\.conv\.", "head."),
    (r"^classifier\.", "head."),
)
# The CLIP-Driven / SuPreM text-driven dynamic head (controller generating per-class conv
# weights from organ embeddings) is not a 1x1x1 conv: dropped, the head is new.
_DYNAMIC_HEAD = r"^(module\.)?(precls_conv|GAP|controller|text_to_vision|organ_embedding)(\.|$)"
# Every public Swin-UNETR checkpoint was trained with MONAI 0.9-1.4's patch merging order.
_PUBLIC_SWIN = {"feature_size": 48, "patch_merging": "legacy"}


def _universal_layouts(repository: str) -> tuple[KeyLayout, ...]:
    """The layouts of the CLIP-Driven Universal Model code (and SuPreM, which builds on it):
    ``{"net": {"module.backbone.<key>", text-driven head}}`` saved by its ``train.py`` under DDP
    (``backbone.<key>`` without ``--dist``), and the pre-refactor model that its ``test.py`` /
    ``pred_pseudo.py`` load, whose backbone modules sit directly under ``module.``
    (``module.swinViT.*``, ``module.encoder1.*``, ...; SuPreM's ``*_backbone.pth``: no prefix)."""
    head = (_DYNAMIC_HEAD, r"^(module\.)?(backbone\.)?out\.")
    return (
        KeyLayout(f"{repository} train.py (module.backbone.*; backbone.* without --dist; a backbone's own "
                  "state dict: no prefix)",
                  KeyRules(strip_prefixes=("module.backbone.", "backbone."), renames=_SWIN_RENAMES, drop=head,
                           new_modules=(r"^head\.",))),
        KeyLayout(f"{repository} pre-refactor model (module.swinViT.*, module.encoder*, module.decoder*)",
                  KeyRules(strip_prefixes=("module.",), renames=_SWIN_RENAMES, drop=head, new_modules=(r"^head\.",))),
    )


@dataclass(frozen=True)
class ModelSpec:
    """One model of the zoo.

    Attributes:
        model_id: the id users type (``fseft predict --model btcv``).
        arch, arch_kwargs: the full-size architecture of the published weights, with the
            options they were trained with (Swin-UNETR ``patch_merging``, U-Net ``inference_norm``).
        class_names: output channel order of the model (canonical names); None when the
            weights file carries its own (fseft model files).
        layouts: the key layouts the authors' scripts save or load, and how each maps onto the
            fseft model (`KeyLayout`); the one that explains the file's keys is used.
        url: where the weights are published (fseft never downloads them).
        filename: the published file name (also looked for in the weights folder).
        description: one line for the table.
        head_pretrained: whether the published head is loaded (False: head is new).
        bundled: package-relative path of weights shipped inside fseft.
        preprocess: the preprocessing the weights were trained with.
        zero_shot: what segmenting without adaptation (``fseft predict --model <id>``) means for it.
    """

    model_id: str
    arch: str
    arch_kwargs: Mapping[str, Any]
    class_names: tuple[str, ...] | None
    layouts: tuple[KeyLayout, ...]
    url: str
    filename: str = ""
    description: str = ""
    head_pretrained: bool = True
    bundled: str | None = None
    preprocess: Mapping[str, Any] | None = field(default_factory=lambda: dict(PUBLIC_PREPROCESS))
    zero_shot: str = ""


_NEW_HEAD = "none: the published head is dropped; the new head must be trained (fseft adapt)"

MODEL_SPECS: dict[str, ModelSpec] = {
    spec.model_id: spec
    for spec in (
        ModelSpec(
            model_id="selfsup",
            arch="swin_unetr",
            arch_kwargs=_PUBLIC_SWIN,
            class_names=BTCV_CLASSES,
            layouts=(
                KeyLayout(
                    "MONAI model_swinvit.pt (published: module.patch_embed.*, module.layers1-4.*, mlp.fc1/fc2)",
                    KeyRules(
                        strip_prefixes=("module.",),
                        add_prefix="swinViT.",
                        renames=_SWIN_RENAMES,
                        # Only the Swin encoder is kept; rotation / contrastive / reconstruction
                        # (convTrans3d) heads of the self-supervised training are dropped.
                        drop=(r"^module\.(?!patch_embed\.|layers[1-4]\.)",),
                        new_modules=(r"^(encoder|decoder)\d+\.", r"^head\."),
                    ),
                ),
                KeyLayout(
                    "research-contributions SwinUNETR/Pretrain main.py (module.swinViT.* or, before 659d711, "
                    "module.swin_vit.*; mlp.linear1/2)",
                    KeyRules(
                        strip_prefixes=("module.",),
                        renames=_SWIN_RENAMES,
                        # rotation_pre/head, contrastive_pre/head and the reconstruction conv
                        drop=(r"^(?!(module\.)?(swinViT|swin_vit)\.)",),
                        new_modules=(r"^(encoder|decoder)\d+\.", r"^head\."),
                    ),
                ),
            ),
            url="https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt",
            filename="model_swinvit.pt",
            description="Swin-UNETR self-supervised encoder (Tang et al., CVPR 2022); decoder and head new",
            head_pretrained=False,
            zero_shot="none: only the encoder is pre-trained; decoder and head must be trained (fseft adapt)",
        ),
        ModelSpec(
            model_id="btcv",
            arch="swin_unetr",
            arch_kwargs=_PUBLIC_SWIN,
            class_names=BTCV_CLASSES,
            layouts=(
                KeyLayout(
                    "research-contributions SwinUNETR/BTCV ({epoch, best_acc, state_dict}; MONAI bundle: bare state dict)",
                    KeyRules(
                        strip_prefixes=("module.",),
                        renames=_SWIN_RENAMES,
                        head_rows=tuple(range(1, 1 + len(BTCV_CLASSES))),  # channel 0 is background
                        head_source_channels=1 + len(BTCV_CLASSES),
                        head_relative_to=0,  # a softmax head: each organ against background
                    ),
                ),
            ),
            url="https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
            "swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt",
            filename="swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt",
            description="Swin-UNETR fine-tuned on BTCV (MONAI research-contributions); background dropped",
            zero_shot="the published softmax head (background + 13 organs) as 13 sigmoids, each organ's logit minus "
            "the background's: an organ is predicted where it beats background (the published argmax, except where "
            "two organs both do: there the first listed wins)",
        ),
        ModelSpec(
            model_id="clipdriven",
            arch="swin_unetr",
            arch_kwargs=_PUBLIC_SWIN,
            class_names=CLIPDRIVEN_CLASSES,
            layouts=_universal_layouts("CLIP-Driven-Universal-Model"),
            url="https://huggingface.co/MrGiovanni/SuPreM/resolve/main/supervised_clip_driven_universal_swin_unetr_2100.pth"
            " (code: https://github.com/ljwztc/CLIP-Driven-Universal-Model)",
            filename="supervised_clip_driven_universal_swin_unetr_2100.pth",
            description="CLIP-Driven Universal Model Swin-UNETR; text-driven head dropped, head new",
            head_pretrained=False,
            zero_shot=_NEW_HEAD,
        ),
        ModelSpec(
            model_id="fseft",
            arch="swin_unetr",
            arch_kwargs=_PUBLIC_SWIN,
            class_names=FSEFT_CLASSES,
            layouts=(
                KeyLayout(
                    "fewshot-finetuning main_pretrain.py (bare state dict: swinViT.*, classifier.*; module.* with "
                    "--dist; also inside {net} / {state_dict}, or module.backbone.*)",
                    KeyRules(strip_prefixes=("module.backbone.", "module.", "backbone."), renames=_SWIN_RENAMES),
                ),
            ),
            url="https://drive.google.com/file/d/18yLNxmWGnVifQNeYYwyyu56Cg4tWV9aW/view"
            " (code: https://github.com/jusiro/fewshot-finetuning)",
            filename="fseft.pth",
            description="FSEFT foundation model, Swin-UNETR, 29 structures (Silva-Rodriguez et al., MedIA 2025)",
            zero_shot="the published sigmoid head: 29 structures, threshold 0.5 (as the FSEFT authors' code)",
        ),
        ModelSpec(
            model_id="suprem_swinunetr",
            arch="swin_unetr",
            arch_kwargs=_PUBLIC_SWIN,
            class_names=SUPREM_CLASSES,
            layouts=_universal_layouts("SuPreM"),
            url="https://huggingface.co/MrGiovanni/SuPreM/resolve/main/supervised_suprem_swinunetr_2100.pth"
            " (code: https://github.com/MrGiovanni/SuPreM)",
            filename="supervised_suprem_swinunetr_2100.pth",
            description="SuPreM Swin-UNETR (AbdomenAtlas 1.1); text-driven head dropped, head new",
            head_pretrained=False,
            zero_shot=_NEW_HEAD,
        ),
        ModelSpec(
            model_id="suprem_unet",
            arch="unet3d",
            # the public U-Net normalises with batch statistics at inference (ContBatchNorm3d)
            arch_kwargs={"base_channels": 32, "inference_norm": "batch"},
            class_names=SUPREM_CLASSES,
            layouts=(
                KeyLayout(
                    "SuPreM train.py (module.backbone.*; backbone.* without --dist; *_backbone.pth: no prefix)",
                    KeyRules(
                        strip_prefixes=("module.backbone.", "backbone."),
                        renames=((r"^out_tr\.final_conv\.", "head."),),
                        drop=(_DYNAMIC_HEAD, r"^(module\.)?(backbone\.)?out_tr\."),
                        new_modules=(r"^head\.",),
                    ),
                ),
            ),
            url="https://huggingface.co/MrGiovanni/SuPreM/resolve/main/supervised_suprem_unet_2100.pth"
            " (code: https://github.com/MrGiovanni/SuPreM)",
            filename="supervised_suprem_unet_2100.pth",
            description="SuPreM 3D U-Net (AbdomenAtlas 1.1); text-driven head dropped, head new",
            head_pretrained=False,
            zero_shot=_NEW_HEAD,
        ),
        ModelSpec(
            model_id="phantom",
            arch="swin_unetr",
            arch_kwargs={"feature_size": 12},
            class_names=None,  # the fseft model file carries its class names
            layouts=(),
            url="shipped inside fseft at src/fseft/weights/phantom_swinunetr.safetensors "
            "(made with `fseft pretrain` on the synthetic phantom and CT painted from real label maps)",
            filename="phantom_swinunetr.safetensors",
            description="small Swin-UNETR pre-trained on synthetic CT: phantoms and CT painted from two real "
            "patients' label maps (gallbladder held out)",
            bundled="weights/phantom_swinunetr.safetensors",
            preprocess=None,  # in the model file
            zero_shot="its sigmoid head (synthetic CT only; on real CT a demonstration, not a tool)",
        ),
    )
}


def get_spec(model_id: str) -> ModelSpec:
    """The `ModelSpec` of ``model_id``; `ConfigError` listing the ids if unknown."""
    try:
        return MODEL_SPECS[model_id]
    except KeyError:
        raise ConfigError(
            f"unknown model id {model_id!r}; choose one of {', '.join(MODEL_SPECS)} "
            "or give the path of an fseft model file (.safetensors)"
        ) from None


def weights_dir(override: str | os.PathLike | None = None) -> Path:
    """Folder searched for public weights: ``override``, else ``$FSEFT_WEIGHTS_DIR``, else
    ``~/.cache/fseft/weights``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fseft" / "weights"


def weight_candidates(spec: ModelSpec, directory: str | os.PathLike | None = None) -> list[Path]:
    """Every path `find_weights` tries for ``spec``, in order."""
    paths: list[Path] = []
    if spec.bundled:
        paths.append(Path(str(resources.files("fseft").joinpath(spec.bundled))))
    folder = weights_dir(directory)
    paths += [folder / f"{spec.model_id}{suffix}" for suffix in WEIGHT_SUFFIXES]
    if spec.filename:
        paths.append(folder / spec.filename)
    return list(dict.fromkeys(paths))


def find_weights(spec: ModelSpec, directory: str | os.PathLike | None = None) -> Path | None:
    """The first existing weights file for ``spec``, or None."""
    return next((p for p in weight_candidates(spec, directory) if p.is_file()), None)


def _looks_like_path(model: str) -> bool:
    return Path(model).suffix in WEIGHT_SUFFIXES or os.sep in model or Path(model).exists()


def load_model(
    model: str,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    **arch_overrides: Any,
) -> SegmentationModel:
    """A ready model (eval mode, on ``device``) from a zoo id or an fseft model file.

    Args:
        model: a zoo id (`MODEL_SPECS`) or the path of an fseft model file.
        weights: weights file for a zoo id; default: `find_weights` (``$FSEFT_WEIGHTS_DIR``).
        device: where the model goes; checkpoints are always read onto the CPU first.
        **arch_overrides: architecture options replacing the spec's (``use_checkpoint=True``;
            tests use ``feature_size=12`` with tiny checkpoints).
    Returns:
        The model, with ``model.preprocess`` (dict or None) and ``model.model_config``.
    Raises:
        InputFileError: weights absent (says where they are published and where fseft
            looked), unreadable, unsafe, or not matching the architecture / classes.
        ConfigError: unknown id.
    """
    if model not in MODEL_SPECS and _looks_like_path(model):
        if weights is not None:
            raise ConfigError(f"--weights is only for zoo ids; {model} is already a model file")
        return load_model_file(model, device=device, **arch_overrides)
    spec = get_spec(model)
    path = Path(weights) if weights is not None else find_weights(spec)
    if path is None:
        looked = "\n  ".join(str(p) for p in weight_candidates(spec))
        raise InputFileError(
            f"weights for model {spec.model_id!r} not found; fseft does not download them. "
            f"They are published at {spec.url}. Put the file at ${WEIGHTS_DIR_ENV}/{spec.model_id}.pth "
            f"or pass --weights PATH. Looked in:\n  {looked}"
        )
    if not path.is_file():
        raise InputFileError(f"{path}: weights file for model {spec.model_id!r} not found (published at {spec.url})")

    if path.suffix == ".safetensors":
        config = read_model_file_config(path)
        if config is not None:
            return _load_spec_model_file(spec, path, config, device, arch_overrides)
    if spec.class_names is None:
        raise InputFileError(f"{path}: model {spec.model_id!r} needs an fseft model file (.safetensors with metadata)")

    kwargs = {**spec.arch_kwargs, **arch_overrides}
    net = create_model(spec.arch, spec.class_names, **kwargs)
    obj, _ = read_checkpoint(path, map_location="cpu")
    state = extract_state_dict(obj, path)
    report = load_state_dict_layouts(net, state, path, spec.layouts)
    net.preprocess = dict(spec.preprocess) if spec.preprocess is not None else None
    net.model_config = {
        "model_id": spec.model_id,
        "weights": str(path),
        "arch": net.arch,
        "arch_kwargs": dict(net.arch_kwargs),
        "class_names": list(net.class_names),
        "preprocess": net.preprocess,
        "head_pretrained": spec.head_pretrained,
        "layout": report.layout,
    }
    return net.to(device).eval()


def _load_spec_model_file(
    spec: ModelSpec, path: Path, config: Mapping[str, Any], device: str | torch.device, overrides: Mapping[str, Any]
) -> SegmentationModel:
    """An fseft model file given for a zoo id: its architecture and classes must be the id's."""
    arch = ARCH_ALIASES.get(str(config["arch"]).lower(), str(config["arch"]).lower())
    if arch != spec.arch:
        raise InputFileError(f"{path}: holds a {arch} model, but model {spec.model_id!r} is a {spec.arch}")
    if spec.class_names is not None and tuple(config["class_names"]) != tuple(spec.class_names):
        raise InputFileError(
            f"{path}: unexpected classes for model {spec.model_id!r}: the file has "
            f"{', '.join(config['class_names'])}; expected {', '.join(spec.class_names)}"
        )
    net = load_model_file(path, device=device, **overrides)
    net.model_config = {**net.model_config, "model_id": spec.model_id, "weights": str(path)}
    return net


def weights_file(model: str) -> Path | None:
    """The weights file of a model reference: a zoo id's (`find_weights`: the one `load_model`
    reads when no ``weights`` is given), or the path itself; None when a zoo id has none."""
    return find_weights(MODEL_SPECS[model]) if model in MODEL_SPECS else Path(model)


def model_reference(model: str) -> dict[str, Any]:
    """How a run finds its base model again: ``{"id": zoo id or None, "path": the weights file
    (resolved) or None, "file_sha256": its SHA-256, or None when it is not a file}``."""
    weights = weights_file(model)
    path = weights.expanduser().resolve() if weights is not None else None
    return {"id": model if model in MODEL_SPECS else None, "path": str(path) if path else None,
            "file_sha256": file_sha256(path) if path and path.is_file() else None}


def describe_model(model: str | os.PathLike | torch.nn.Module) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """``(arch, arch_kwargs, class_names)`` of a model without reading its weights: from a
    model object, an fseft model file's metadata, or the zoo (the metadata of the id's weights
    file when that is an fseft model file, else the zoo's spec)."""
    if isinstance(model, torch.nn.Module):
        return str(model.arch), dict(model.arch_kwargs), tuple(model.class_names)
    text = str(model)
    if text in MODEL_SPECS:
        spec = MODEL_SPECS[text]
        weights = find_weights(spec)
        config = read_model_file_config(weights) if weights is not None and weights.suffix == ".safetensors" else None
        if config is None:
            if spec.class_names is None:
                raise InputFileError(f"model {text!r}: its weights file (which gives its classes) is not there; see `fseft models`")
            return spec.arch, dict(spec.arch_kwargs), tuple(spec.class_names)
    else:
        if not Path(text).exists():
            get_spec(text)  # ConfigError: neither a zoo id nor a file
        config = read_model_file_config(text)
        if config is None:
            raise InputFileError(f"{text}: a safetensors file without fseft metadata (not written by save_model_file)")
    return str(config["arch"]), dict(config["arch_kwargs"]), tuple(config["class_names"])


# ------------------------------------------------------------------------------ listing


@lru_cache(maxsize=None)
def _parameter_count(arch: str, frozen_kwargs: tuple[tuple[str, Any], ...]) -> tuple[int, int]:
    """(parameters without the head, feature channels) of an architecture, built once on CPU
    (MONAI's Swin-UNETR cannot be built on the meta device: it calls ``.item()``)."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in frozen_kwargs}
    with torch.no_grad():
        net = create_model(arch, ["_"], **kwargs)
    total = sum(p.numel() for p in net.parameters())
    head = sum(p.numel() for p in net.head.parameters())
    return total - head, net.feature_channels


def parameter_count(arch: str, num_classes: int, arch_kwargs: Mapping[str, Any]) -> int:
    """Trainable parameters of ``arch`` with a ``num_classes`` head (1x1x1 conv with bias)."""
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in arch_kwargs.items()))
    body, channels = _parameter_count(arch, frozen)
    return body + num_classes * (channels + 1)


@dataclass(frozen=True)
class ZooEntry:
    """One row of `fseft models`."""

    model_id: str
    arch: str
    num_classes: int | None
    parameters: int | None
    weights: Path | None
    spec: ModelSpec
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)


def list_models(directory: str | os.PathLike | None = None) -> list[ZooEntry]:
    """Every zoo model with its full-size parameter count and weights file (None if absent)."""
    rows = []
    for spec in MODEL_SPECS.values():
        path = find_weights(spec, directory)
        arch, kwargs, classes = spec.arch, dict(spec.arch_kwargs), spec.class_names
        if spec.class_names is None and path is not None and path.suffix == ".safetensors":
            try:
                config = read_model_file_config(path)
            except InputFileError:
                config = None
            if config is not None:
                arch, kwargs, classes = config["arch"], dict(config["arch_kwargs"]), tuple(config["class_names"])
        n_classes = len(classes) if classes is not None else None
        params = parameter_count(arch, n_classes or 1, kwargs) if n_classes else None
        rows.append(ZooEntry(spec.model_id, arch, n_classes, params, path, spec, kwargs))
    return rows


def weights_file_problem(path: Path) -> str | None:
    """Why a weights file cannot be a checkpoint, from its first bytes (without reading it
    whole), or None: ``.safetensors`` starts with an 8-byte header length then ``{``; a PyTorch
    file is a zip archive (``PK``) or a legacy pickle (``0x80``)."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if path.suffix == ".safetensors":
        return None if len(head) == 9 and head[8:9] == b"{" else "not a safetensors file"
    return None if head[:2] == b"PK" or head[:1] == b"\x80" else "not a PyTorch checkpoint"


def format_model_table(directory: str | os.PathLike | None = None) -> str:
    """The table `fseft models` prints."""
    rows = list_models(directory)
    header = ("id", "architecture", "classes", "parameters", "options", "weights")
    lines = [header]
    for r in rows:
        params = f"{r.parameters / 1e6:.2f}M" if r.parameters is not None else "-"
        problem = weights_file_problem(r.weights) if r.weights else None
        weights = "absent" if not r.weights else f"UNUSABLE: {r.weights}: {problem}" if problem else f"present: {r.weights}"
        options = ",".join(f"{k}={v}" for k, v in variant_options(r.arch, r.arch_kwargs).items())
        lines.append((r.model_id, r.arch, str(r.num_classes or "-"), params, options, weights))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = ["  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines]
    text.insert(1, "-" * len(text[0]))
    folder = weights_dir(directory)
    text.append("")
    text.append(f"weights folder: {folder} (set ${WEIGHTS_DIR_ENV} or --weights-dir); files: <id>.pth/.pt/.safetensors")
    absent = [r for r in rows if r.weights is None]
    if absent:
        text.append("absent weights are published at:")
        text += [f"  {r.model_id}: {r.spec.url}" for r in absent]
    text.append("")
    text.append("options: patch_merging=legacy is MONAI 0.9-1.4's Swin patch merging, which every public Swin-UNETR "
                "was trained with (current: MONAI >= 1.5); inference_norm=batch normalises with batch statistics at "
                "inference, as the public SuPreM U-Net")
    text.append("key layouts read (the one that fits the file is used), and what zero-shot means:")
    for r in rows:
        for layout in r.spec.layouts:
            text.append(f"  {r.model_id}: {layout.name}")
        text.append(f"  {r.model_id}: zero-shot: {r.spec.zero_shot}")
    return "\n".join(text)
