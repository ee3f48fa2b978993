"""Reference outputs of the public zoo models, computed by their AUTHORS' code (not by fseft).

For every key layout in which the public training scripts save (or their inference /
fine-tuning scripts load) a zoo checkpoint, this tool builds the authors' model class from
a checkout of their repository (MONAI 1.4.0's own ``SwinUNETR`` / ``SwinTransformer`` for
the MONAI models), fills it with the deterministic weights of
``tests/models/golden/seeded_weights.py`` (which a test regenerates without any public
code), runs a seeded input through it (eval mode, fp32, no grad, deterministic) and writes
``tests/models/golden/<case>.safetensors``: the input, the reference outputs (small ones
whole, large ones at 512 stored voxel positions plus per-channel mean / std over the whole
volume) and, in the safetensors metadata under ``"golden"``, a JSON description (schema
below). It also writes ``btcv_numpy1_pickle.pth``: a tiny checkpoint pickled under NumPy 1.x
the way the BTCV trainer's ``save_checkpoint`` stores ``best_acc`` (``numpy.float64``, hence
``numpy.core.multiarray.scalar`` in the pickle).

Run once, from the repository root (about 5 minutes on 2 cores; the first run also creates the
virtual environment /tmp/fseft-golden-venv: torch==2.13.0 (the CPU wheel pip picks here),
monai==1.4.0, numpy<2, einops, safetensors, and re-runs itself inside it)::

    mkdir -p /tmp/src && cd /tmp/src
    git clone https://github.com/Project-MONAI/research-contributions.git
    git -C research-contributions checkout 21ed8e57c7256834d4fbaf19579ca25ad3d135ee
    git clone https://github.com/ljwztc/CLIP-Driven-Universal-Model.git
    git -C CLIP-Driven-Universal-Model checkout 43c12399cc98a40f447342a8dc2cecae5edae84c
    # the pre-refactor model (model/SwinUNETR_partial.py), parent of commit d105b28 "backbone"
    git -C CLIP-Driven-Universal-Model worktree add /tmp/src/CLIP-Driven-prerefactor \
        acf76b852718e46cc3c66bb08384a591d25505f0
    git clone https://github.com/MrGiovanni/SuPreM.git
    git -C SuPreM checkout 76e1a64a5943dff9338415fdb48efe3ef3557bb4
    git clone https://github.com/jusiro/fewshot-finetuning.git
    git -C fewshot-finetuning checkout 032f403f0f31d002b2efedde33b1af79c9c5250a
    cd /path/to/fseft
    python tools/make_zoo_goldens.py \
        --research-contributions /tmp/src/research-contributions \
        --clip-driven /tmp/src/CLIP-Driven-Universal-Model \
        --clip-driven-prerefactor /tmp/src/CLIP-Driven-prerefactor \
        --suprem /tmp/src/SuPreM \
        --fewshot-finetuning /tmp/src/fewshot-finetuning

Nothing from those repositories is copied into fseft: their modules are imported from the
checkouts at generation time, and only tensors computed by them are stored.

Metadata schema (JSON under the safetensors metadata key ``"golden"``):

* ``format``: ``"fseft-zoo-golden/1"``; ``case``: the file's stem.
* ``model_id``: the fseft zoo id; ``layout``: a short human name of the key layout.
* ``reference``: ``{repo, commit, file, class, build, forward, packages: {torch, monai, numpy}}``.
* ``arch_overrides``: keyword arguments for ``fseft.models.load_model`` (e.g.
  ``{"feature_size": 12}``; ``{}`` for a full-size model).
* ``keys``: ``{key: [shape, dtype]}``: every entry of the checkpoint's tensor dict, in the
  order and with the names the public script saves; ``seeded_state_dict(keys)`` rebuilds it.
* ``container``: how the public script wraps that dict: ``null`` (the dict itself is saved),
  or ``{"key": "state_dict" | "net", "extra": {...}, "numpy_float64": [names of extra
  entries that the public script stores as numpy.float64]}`` (see
  ``seeded_weights.checkpoint_object``).
* ``input``: ``{"tensor": "input_u8", "shape": [...], "to_float": "input_u8.float() / 255"}``.
* ``compare``: ``"logits"`` (fseft keeps the head: ``model(x)``), ``"features"`` (fseft
  replaces the head: ``model.features(x)``) or ``"hidden"`` (the Swin encoder's five hidden
  states: ``model.swinViT(x, model.normalize)``).
* ``outputs``: ``{name: {"shape": [...], "stored": "full" | "sampled", "note": ...}}``. A full
  output is the tensor ``<name>``; a sampled one is ``<name>.index`` (N, 3) int64 voxel
  positions, ``<name>.sample`` (B, C, N) the values there, and ``<name>.mean`` /
  ``<name>.std`` (B, C) over the whole volume (``std`` with ``unbiased=False``).
* ``head`` (btcv only): ``{"rows": [...], "relative_to": 0}``: fseft's logit ``c`` is the
  published ``rows[c]`` minus ``relative_to`` (stored as the derived output ``logits_relative``).
* ``tolerance``: ``{"atol", "rtol"}`` suggested for ``torch.testing.assert_close``.
* ``notes``: anything else that makes the public model differ from a plain fseft model.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "models" / "golden"
DEFAULT_VENV = Path("/tmp/fseft-golden-venv")
VENV_PACKAGES = ["torch==2.13.0", "monai==1.4.0", "numpy<2", "einops", "safetensors"]
COMMITS = {
    "research-contributions": "21ed8e57c7256834d4fbaf19579ca25ad3d135ee",
    "clip-driven": "43c12399cc98a40f447342a8dc2cecae5edae84c",
    "clip-driven-prerefactor": "acf76b852718e46cc3c66bb08384a591d25505f0",
    "suprem": "76e1a64a5943dff9338415fdb48efe3ef3557bb4",
    "fewshot-finetuning": "032f403f0f31d002b2efedde33b1af79c9c5250a",
}
REPO_URLS = {
    "research-contributions": "https://github.com/Project-MONAI/research-contributions",
    "clip-driven": "https://github.com/ljwztc/CLIP-Driven-Universal-Model",
    "clip-driven-prerefactor": "https://github.com/ljwztc/CLIP-Driven-Universal-Model",
    "suprem": "https://github.com/MrGiovanni/SuPreM",
    "fewshot-finetuning": "https://github.com/jusiro/fewshot-finetuning",
}
SAMPLES = 512  # voxel positions stored per large output
FULL_LIMIT = 512  # outputs with at most this many voxels are stored whole
SWIN_INPUT = (1, 1, 64, 64, 64)
UNET_INPUT = (2, 1, 32, 32, 32)  # two volumes: the public U-Net normalises with the batch's statistics


# ------------------------------------------------------------------------------ virtual environment


def ensure_venv(venv: Path) -> Path:
    """The venv's python, creating the venv and installing `VENV_PACKAGES` when needed."""
    python = venv / "bin" / "python"
    check = "import torch, monai, numpy, einops, safetensors; print(torch.__version__, monai.__version__, numpy.__version__)"
    if python.exists():
        out = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
        if out.returncode == 0 and " 1.4.0 1." in out.stdout and out.stdout.startswith("2.13.0"):
            return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *VENV_PACKAGES], check=True)
    subprocess.run([str(python), "-c", check], check=True)
    return python


# ------------------------------------------------------------------------------ importing public code


def load_file(name: str, path: Path) -> types.ModuleType:
    """Import one public source file as module ``name`` (it may only import installed packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def on_path(root: Path, packages: tuple[str, ...]):
    """Make a checkout's top-level ``packages`` importable, and forget them afterwards (the
    repositories reuse names such as ``model`` / ``models`` / ``backbone``)."""
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in list(sys.modules):
            if name.split(".")[0] in packages:
                del sys.modules[name]


def git_head(path: Path) -> str | None:
    out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


# ------------------------------------------------------------------------------ generation (in the venv)


def generate(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
    from safetensors.torch import save_file

    seeded = load_file("golden_seeded_weights", GOLDEN / "seeded_weights.py")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import monai

    packages = {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__}
    checkouts = {
        "research-contributions": Path(args.research_contributions),
        "clip-driven": Path(args.clip_driven),
        "clip-driven-prerefactor": Path(args.clip_driven_prerefactor),
        "suprem": Path(args.suprem),
        "fewshot-finetuning": Path(args.fewshot_finetuning),
    }
    commits = {}
    for name, path in checkouts.items():
        head = git_head(path)
        if head is not None and head != COMMITS[name]:
            print(f"warning: {name} checkout is at {head}, the goldens were pinned to {COMMITS[name]}")
        commits[name] = head or COMMITS[name]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def dtype_name(t: torch.Tensor) -> str:
        return str(t.dtype).removeprefix("torch.")

    def seeded_input(shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(20240607 + sum(shape))
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)

    def fill(model: torch.nn.Module, to_saved) -> tuple[dict, dict]:
        """Seeded weights for ``model`` under its saved key names (``to_saved(model_key)``):
        returns (the saved dict, {model_key: saved_key}); loads them into ``model`` (strict)
        after checking the recomputed integer buffers equal the model's own."""
        own = model.state_dict()
        names = {k: to_saved(k) for k in own}
        spec = {names[k]: (list(v.shape), dtype_name(v)) for k, v in own.items()}
        saved = seeded.seeded_state_dict(spec)
        for k, v in own.items():
            if k.endswith("relative_position_index") and not torch.equal(saved[names[k]], v):
                raise AssertionError(f"seeded relative_position_index differs from the model's: {k}")
        model.load_state_dict({k: saved[names[k]] for k in own}, strict=True)
        return saved, names

    def sample_output(name: str, t: torch.Tensor, tensors: dict, outputs: dict, note: str = "") -> None:
        t = t.detach().to(torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise AssertionError(f"{name}: non-finite reference output")
        spatial = t.shape[2:]
        entry = {"shape": list(t.shape)}
        if note:
            entry["note"] = note
        if int(np.prod(spatial)) <= FULL_LIMIT:
            tensors[name] = t
            entry["stored"] = "full"
        else:
            gen = torch.Generator().manual_seed(7 + int(np.prod(spatial)))
            index = torch.stack([torch.randint(0, s, (SAMPLES,), generator=gen) for s in spatial], 1)
            tensors[f"{name}.index"] = index.to(torch.int64).contiguous()
            tensors[f"{name}.sample"] = t[:, :, index[:, 0], index[:, 1], index[:, 2]].contiguous()
            tensors[f"{name}.mean"] = t.mean(dim=(2, 3, 4)).contiguous()
            tensors[f"{name}.std"] = t.std(dim=(2, 3, 4), unbiased=False).contiguous()
            entry["stored"] = "sampled"
        outputs[name] = entry
        print(f"    {name}: shape {tuple(t.shape)}, mean {t.mean():+.3f}, std {t.std():.3f}, max|.| {t.abs().max():.3f}")

    def write_case(case: str, meta: dict, x_u8: torch.Tensor, outs: dict[str, torch.Tensor], notes: dict) -> None:
        tensors: dict[str, torch.Tensor] = {"input_u8": x_u8.contiguous()}
        outputs: dict = {}
        for name, value in outs.items():
            sample_output(name, value, tensors, outputs, notes.get(name, ""))
        meta = {"format": "fseft-zoo-golden/1", "case": case, **meta, "outputs": outputs,
                "input": {"tensor": "input_u8", "shape": list(x_u8.shape), "to_float": "input_u8.float() / 255"}}
        path = out_dir / f"{case}.safetensors"
        save_file(tensors, str(path), metadata={"golden": json.dumps(meta)})
        path.chmod(0o644)
        print(f"  wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({path.stat().st_size / 1024:.0f} KiB)")

    def spec_of(saved: dict) -> dict:
        return {k: [list(v.shape), dtype_name(v)] for k, v in saved.items()}

    def run(model: torch.nn.Module, fn, x_u8: torch.Tensor):
        model.eval()
        x = x_u8.to(torch.float32) / 255
        with torch.no_grad():
            return fn(model, x)

    def reference(repo: str, file: str, cls: str, build: str, forward: str) -> dict:
        return {"repo": REPO_URLS.get(repo, repo), "commit": commits.get(repo), "file": file, "class": cls,
                "build": build, "forward": forward, "packages": packages}

    swin_tol = {"atol": 1e-4, "rtol": 1e-4}
    x_swin = seeded_input(SWIN_INPUT)
    x_unet = seeded_input(UNET_INPUT)
    legacy_note = ("MONAI 0.9-1.4 / public-copy PatchMerging: 3D sub-grid (d,h,w) offsets concatenated as "
                   "000,100,010,001,101,010,001,111 (010 and 001 twice, 110 and 011 never)")

    # ---------------------------------------------------------------- selfsup: published model_swinvit.pt
    print("selfsup_model_swinvit")
    torch.manual_seed(0)
    net = MonaiSwinUNETR(img_size=(64, 64, 64), in_channels=1, out_channels=14, feature_size=12)
    own = net.swinViT.state_dict()
    names = {k: "module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.") for k in own}
    saved = seeded.seeded_state_dict({names[k]: (list(v.shape), dtype_name(v)) for k, v in own.items()})
    for k, v in own.items():
        if k.endswith("relative_position_index") and not torch.equal(saved[names[k]], v):
            raise AssertionError(k)
    net.load_from({"state_dict": saved})  # MONAI's own loader of model_swinvit.pt
    after = net.swinViT.state_dict()
    missing = [k for k in own if not torch.equal(after[k], saved[names[k]])]
    if missing:
        raise AssertionError(f"SwinUNETR.load_from did not load {missing[:5]}")
    hidden = run(net, lambda m, x: m.swinViT(x, m.normalize), x_swin)
    write_case("selfsup_model_swinvit", {
        "model_id": "selfsup",
        "layout": "MONAI model_swinvit.pt (module.patch_embed.*, module.layers1-4.*, mlp.fc1/fc2) as SwinUNETR.load_from reads it",
        "reference": reference("MONAI", "monai/networks/nets/swin_unetr.py", "monai.networks.nets.SwinUNETR (1.4.0)",
                               "SwinUNETR(img_size=(64, 64, 64), in_channels=1, out_channels=14, feature_size=12); "
                               "load_from({'state_dict': checkpoint})",
                               "model.swinViT(x, model.normalize)"),
        "arch_overrides": {"feature_size": 12},
        "keys": spec_of(saved),
        "container": {"key": "state_dict", "extra": {}, "numpy_float64": []},
        "compare": "hidden",
        "tolerance": swin_tol,
        "notes": ("keys are exactly those MONAI's SwinUNETR.load_from reads (the published file was written by "
                  "pre-research-contributions code; it may hold further self-supervision head keys, which fseft "
                  "drops). " + legacy_note),
    }, x_swin, {f"hidden{i}": h for i, h in enumerate(hidden)}, {})

    # ---------------------------------------------------------------- selfsup: current research-contributions Pretrain
    print("selfsup_pretrain_current")
    rc = checkouts["research-contributions"]
    ssl_mod = load_file("rc_ssl_head", rc / "SwinUNETR" / "Pretrain" / "models" / "ssl_head.py")
    ssl_args = argparse.Namespace(spatial_dims=3, in_channels=1, feature_size=12, dropout_path_rate=0.0, use_checkpoint=False)
    torch.manual_seed(0)
    ssl = ssl_mod.SSLHead(ssl_args, dim=12 * 16)
    saved, _ = fill(ssl, lambda k: "module." + k)
    hidden = run(ssl, lambda m, x: m.swinViT(x.contiguous()), x_swin)
    write_case("selfsup_pretrain_current", {
        "model_id": "selfsup",
        "layout": "research-contributions SwinUNETR/Pretrain main.py under DDP (module.swinViT.*, mlp.linear1/2, SSL heads)",
        "reference": reference("research-contributions", "SwinUNETR/Pretrain/models/ssl_head.py", "SSLHead",
                               "SSLHead(args(spatial_dims=3, in_channels=1, feature_size=12, dropout_path_rate=0.0, "
                               "use_checkpoint=False), dim=192) (upsample='vae'; the script: feature_size=48, dim=768); "
                               "wrapped in DistributedDataParallel (module.)",
                               "model.swinViT(x) (normalize=True by default), as SSLHead.forward"),
        "arch_overrides": {"feature_size": 12},
        "keys": spec_of(saved),
        "container": {"key": "state_dict", "extra": {"global_step": 100, "optimizer": {"state": {}, "param_groups": []}},
                      "numpy_float64": []},
        "compare": "hidden",
        "tolerance": swin_tol,
        "notes": ("main.py saves {'global_step', 'state_dict', 'optimizer'} (model_bestValRMSE.pt), "
                  "{'epoch', 'state_dict', 'optimizer'} (model_final_epoch.pt) and the bare state dict "
                  "(final_model.pth); before commit 659d711 the encoder attribute was swin_vit (module.swin_vit.*). "
                  "SwinTransformer from MONAI (downsample='merging'): " + legacy_note),
    }, x_swin, {f"hidden{i}": h for i, h in enumerate(hidden)}, {})

    # ---------------------------------------------------------------- btcv
    print("btcv_trainer")
    torch.manual_seed(0)
    net = MonaiSwinUNETR(img_size=(64, 64, 64), in_channels=1, out_channels=14, feature_size=12, drop_rate=0.0,
                         attn_drop_rate=0.0, dropout_path_rate=0.0, use_checkpoint=False)
    saved, _ = fill(net, lambda k: k)
    logits = run(net, lambda m, x: m(x), x_swin)
    write_case("btcv_trainer", {
        "model_id": "btcv",
        "layout": "research-contributions SwinUNETR/BTCV trainer.save_checkpoint ({epoch, best_acc, state_dict})",
        "reference": reference("MONAI", "monai/networks/nets/swin_unetr.py", "monai.networks.nets.SwinUNETR (1.4.0)",
                               "SwinUNETR(img_size=(64, 64, 64), in_channels=1, out_channels=14, feature_size=12, "
                               "drop_rate=0.0, attn_drop_rate=0.0, dropout_path_rate=0.0, use_checkpoint=False) "
                               "(BTCV main.py / test.py; published: feature_size=48)",
                               "model(x)"),
        "arch_overrides": {"feature_size": 12},
        "keys": spec_of(saved),
        "container": {"key": "state_dict", "extra": {"epoch": 5000, "best_acc": 0.8123}, "numpy_float64": ["best_acc"]},
        "compare": "logits",
        "head": {"rows": list(range(1, 14)), "relative_to": 0},
        "tolerance": swin_tol,
        "notes": ("softmax head out.conv.conv (14 channels, background first); test.py loads "
                  "torch.load(path)['state_dict'] strictly into SwinUNETR, main.py --checkpoint strips 'backbone.'. "
                  "MONAI's BTCV bundle ships the same keys as a bare dict. " + legacy_note),
    }, x_swin, {"logits": logits, "logits_relative": logits[:, 1:] - logits[:, :1]},
        {"logits_relative": "derived: logits[:, 1:] - logits[:, :1] (fseft's zoo head); compare with model(x)"})

    # ---------------------------------------------------------------- CLIP-Driven pre-refactor (test.py / pred_pseudo.py)
    print("clipdriven_prerefactor")
    pre = load_file("clip_swinunetr_partial", checkouts["clip-driven-prerefactor"] / "model" / "SwinUNETR_partial.py")
    torch.manual_seed(0)
    net = pre.SwinUNETR(img_size=(96, 96, 96), in_channels=1, out_channels=32, feature_size=48, drop_rate=0.0,
                        attn_drop_rate=0.0, dropout_path_rate=0.0, use_checkpoint=False, encoding="word_embedding")
    saved, _ = fill(net, lambda k: "module." + k)

    def with_decoder1(m, x, parent=None):
        captured = {}
        hook = (parent or m).decoder1.register_forward_hook(lambda mod, inp, out: captured.__setitem__("f", out))
        m(x)
        hook.remove()
        return captured["f"]

    feats = run(net, with_decoder1, x_swin)
    write_case("clipdriven_prerefactor", {
        "model_id": "clipdriven",
        "layout": "CLIP-Driven pre-refactor model ({net: module.swinViT.*, module.encoder*, module.decoder*, "
                  "module.precls_conv/GAP/controller/organ_embedding/text_to_vision}), as test.py / pred_pseudo.py load it",
        "reference": reference("clip-driven-prerefactor", "model/SwinUNETR_partial.py", "SwinUNETR",
                               "SwinUNETR(img_size=(96, 96, 96), in_channels=1, out_channels=32, feature_size=48, "
                               "drop_rate=0.0, attn_drop_rate=0.0, dropout_path_rate=0.0, use_checkpoint=False, "
                               "encoding='word_embedding') under DistributedDataParallel (module.)",
                               "model(x), decoder1 output captured by a forward hook (the input of precls_conv)"),
        "arch_overrides": {},
        "keys": spec_of(saved),
        "container": {"key": "net", "extra": {"epoch": 2100}, "numpy_float64": []},
        "compare": "features",
        "tolerance": swin_tol,
        "notes": ("train.py (this commit) saves {'net', 'optimizer', 'scheduler', 'epoch'}; the current test.py maps "
                  "keys containing swinViT/encoder/decoder to backbone.<key minus first part> and loads strictly, so "
                  "it only reads this layout. No 'out' block. organ_embedding is a buffer (32, 512). " + legacy_note),
    }, x_swin, {"features": feats}, {})

    # ---------------------------------------------------------------- CLIP-Driven current train.py
    print("clipdriven_train")
    with on_path(checkouts["clip-driven"], ("model",)):
        uni = importlib.import_module("model.Universal_model")
    torch.manual_seed(0)
    net = uni.Universal_model(img_size=(96, 96, 96), in_channels=1, out_channels=32, backbone="swinunetr",
                              encoding="word_embedding")
    saved, _ = fill(net, lambda k: "module." + k)
    feats = run(net, lambda m, x: m.backbone(x)[1], x_swin)
    write_case("clipdriven_train", {
        "model_id": "clipdriven",
        "layout": "CLIP-Driven train.py under DDP ({net: module.backbone.*, module.precls_conv/GAP/controller/"
                  "organ_embedding/text_to_vision})",
        "reference": reference("clip-driven", "model/Universal_model.py (backbone: model/SwinUNETR.py)", "Universal_model",
                               "Universal_model(img_size=(96, 96, 96), in_channels=1, out_channels=32, "
                               "backbone='swinunetr', encoding='word_embedding') under DistributedDataParallel",
                               "model.backbone(x)[1] (SwinUNETR.forward returns (dec4, decoder1 output))"),
        "arch_overrides": {},
        "keys": spec_of(saved),
        "container": {"key": "net", "extra": {"epoch": 2100}, "numpy_float64": []},
        "compare": "features",
        "tolerance": swin_tol,
        "notes": ("saved as {'net', 'optimizer', 'scheduler', 'epoch'}; the current test.py / pred_pseudo.py cannot "
                  "load this layout (they would map module.backbone.swinViT.* to backbone.backbone.*). No 'out' "
                  "block. " + legacy_note),
    }, x_swin, {"features": feats}, {})

    # ---------------------------------------------------------------- SuPreM (Swin-UNETR and U-Net)
    sup_root = checkouts["suprem"] / "supervised_pretraining"
    with on_path(sup_root, ("backbone",)):
        sup = importlib.import_module("backbone.Universal_model")
    for backbone, model_id, x_u8, tol, arch_overrides in (
        ("swinunetr", "suprem_swinunetr", x_swin, swin_tol, {}),
        ("unet", "suprem_unet", x_unet, {"atol": 1e-4, "rtol": 1e-4}, {}),
    ):
        torch.manual_seed(0)
        net = sup.Universal_model(img_size=(96, 96, 96), in_channels=1, out_channels=25, backbone=backbone,
                                  encoding="word_embedding")
        file = "backbone/swinunetr.py" if backbone == "swinunetr" else "backbone/unet.py"
        if backbone == "swinunetr":
            notes = "Swin-UNETR copy identical to CLIP-Driven's model/SwinUNETR.py; no 'out' block. " + legacy_note
        else:
            notes = ("UNet3D with ContBatchNorm3d: F.batch_norm(..., training=True) always, so the batch's statistics "
                     "normalise at inference too (and running stats are updated as a side effect); "
                     "out_tr is commented out (no head keys); ReLU is nn.ReLU(out_chan), i.e. inplace=True. "
                     "Input: two 32^3 volumes normalised together.")
        for variant, to_saved, layout, extra_note in (
            ("train", lambda k: "module." + k, f"SuPreM train.py under DDP ({{net: module.backbone.*, text-driven head}}) -> {backbone}.pth",
             "target_applications/*/train.py load it by stripping 'module.backbone.'; direct_inference/inference.py "
             "assigns the values by position into Universal_model."),
            ("backbone", None, f"SuPreM train.py backbone-only file ({{net: model.module.backbone.state_dict()}}, bare keys) -> {backbone}_backbone.pth",
             "written next to the full checkpoint every store_num epochs."),
        ):
            case = f"{model_id}_{variant}"
            print(case)
            if variant == "train":
                saved, _ = fill(net, to_saved)
            else:
                saved, _ = fill(net.backbone, lambda k: k)
            feats = run(net, lambda m, x: m.backbone(x)[1], x_u8)
            write_case(case, {
                "model_id": model_id,
                "layout": layout,
                "reference": reference("suprem", f"supervised_pretraining/backbone/Universal_model.py (backbone: "
                                       f"supervised_pretraining/{file})", "Universal_model",
                                       f"Universal_model(img_size=(96, 96, 96), in_channels=1, out_channels=25, "
                                       f"backbone='{backbone}', encoding='word_embedding')"
                                       + (" under DistributedDataParallel" if variant == "train" else ""),
                                       "model.backbone(x)[1] (the decoder output the text-driven head reads)"),
                "arch_overrides": arch_overrides,
                "keys": spec_of(saved),
                "container": {"key": "net", "extra": {"epoch": 2100}, "numpy_float64": []},
                "compare": "features",
                "tolerance": tol,
                "notes": notes + " " + extra_note,
            }, x_u8, {"features": feats}, {})

    # ---------------------------------------------------------------- FSEFT (fewshot-finetuning)
    fs = load_file("fseft_public_swinunetr", checkouts["fewshot-finetuning"] / "models" / "architectures" / "SwinUNETR.py")
    for variant, prefix, layout in (
        ("pretrain", "", "fewshot-finetuning main_pretrain.py (torch.save(model.state_dict()): bare keys, classifier.*)"),
        ("pretrain_ddp", "module.", "fewshot-finetuning main_pretrain.py --dist (bare dict, module.* keys, module.classifier.*)"),
    ):
        case = f"fseft_{variant}"
        print(case)
        torch.manual_seed(0)
        net = fs.SwinUNETR(img_size=(96, 96, 96), out_channels=29, feature_size=12, in_channels=1, drop_rate=0.0,
                           attn_drop_rate=0.0, dropout_path_rate=0.0, use_checkpoint=False)
        saved, _ = fill(net, lambda k, p=prefix: p + k)
        logits = run(net, lambda m, x: m(x), x_swin)
        write_case(case, {
            "model_id": "fseft",
            "layout": layout,
            "reference": reference("fewshot-finetuning", "models/architectures/SwinUNETR.py (= pretrain/models/"
                                   "model_pretrain.py of commits e3a4193..c3ef03f)", "SwinUNETR",
                                   "SwinUNETR(img_size=(96, 96, 96), out_channels=29, feature_size=12, in_channels=1, "
                                   "drop_rate=0.0, attn_drop_rate=0.0, dropout_path_rate=0.0, use_checkpoint=False) "
                                   "(fseft/utils.py load_model; published: feature_size=48)"
                                   + (" under DistributedDataParallel" if prefix else ""),
                                   "model(x) (out_features=False: classifier logits, 29 sigmoid channels)"),
            "arch_overrides": {"feature_size": 12},
            "keys": spec_of(saved),
            "container": None,
            "compare": "logits",
            "tolerance": swin_tol,
            "notes": ("utils/models.py load_weights accepts {'state_dict'}, {'net'} or a bare dict, strips 'module.', "
                      "'backbone.' (tested on the 11th key), renames swin_vit->swinViT and out.conv.conv->classifier, "
                      "and loads with strict=False. Swin code copied from CLIP-Driven: " + legacy_note),
        }, x_swin, {"logits": logits}, {})

    # ---------------------------------------------------------------- a real NumPy 1.x pickle of the BTCV container
    gen = torch.Generator().manual_seed(5)
    small = {"out.conv.conv.weight": torch.randn(14, 12, 1, 1, 1, generator=gen), "out.conv.conv.bias": torch.randn(14, generator=gen)}
    best_acc = np.mean(np.array([0.80, 0.82, 0.8269]))  # a numpy.float64, as trainer.run_training's val_avg_acc
    assert type(best_acc) is np.float64
    pickle_path = out_dir / "btcv_numpy1_pickle.pth"
    torch.save({"epoch": 5000, "best_acc": best_acc, "state_dict": small}, pickle_path)
    import zipfile

    with zipfile.ZipFile(pickle_path) as zf:
        data = next(zf.read(n) for n in zf.namelist() if n.endswith("data.pkl"))
    if b"numpy.core.multiarray" not in data or b"scalar" not in data:
        raise AssertionError("the pickle does not reference numpy.core.multiarray.scalar")
    print(f"  wrote {pickle_path} ({pickle_path.stat().st_size} bytes, numpy {np.__version__}, best_acc={best_acc!r})")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--research-contributions", required=True, help="checkout of Project-MONAI/research-contributions")
    parser.add_argument("--clip-driven", required=True, help="checkout of ljwztc/CLIP-Driven-Universal-Model (current)")
    parser.add_argument("--clip-driven-prerefactor", required=True, help="the same repository at acf76b8 (parent of d105b28)")
    parser.add_argument("--suprem", required=True, help="checkout of MrGiovanni/SuPreM")
    parser.add_argument("--fewshot-finetuning", required=True, help="checkout of jusiro/fewshot-finetuning")
    parser.add_argument("--out", default=str(GOLDEN), help="output folder (default: tests/models/golden)")
    parser.add_argument("--venv", default=str(DEFAULT_VENV), help="throw-away virtual environment")
    parser.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.in_venv:
        python = ensure_venv(Path(args.venv))
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *argv, "--in-venv"])
    generate(args)


if __name__ == "__main__":
    main()
