"""Tiny datasets and models the tests share (fast: no phantom generator, 20-voxel volumes):
`write_tiny_dataset` / `tiny_model` (adaptation, caches, runs), `write_partial_label_dataset` /
`tiny_assembly` (pre-training), `IntensityFeatures` (a model a linear probe can read)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fseft.data.io import write_image, write_mask
from fseft.data.volume import Volume
from fseft.models.base import SegmentationModel
from fseft.models.checkpoint import save_model_file
from fseft.models.zoo import create_model
from fseft.utils import write_json

STRUCTURES = ("liver", "gallbladder")


def write_tiny_dataset(root: Path, n_cases: int = 4, shape=(20, 18, 16), spacing=3.0, seed: int = 0) -> Path:
    """Cases with a bright box body, a 'liver' ball and a small 'gallbladder' ball (values 1, 2)."""
    rng = np.random.default_rng(seed)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    grid = np.indices(shape).astype(np.float32)
    for i in range(n_cases):
        image = np.full(shape, -1000.0, np.float32)
        image[2:-2, 2:-2, 1:-1] = 40.0 + rng.normal(0, 5, (shape[0] - 4, shape[1] - 4, shape[2] - 2))
        labels = np.zeros(shape, np.uint8)
        for value, radius, hu in ((1, 4.0 + i % 2, 120.0), (2, 2.0, -20.0)):
            centre = np.array(shape) / 2 + rng.integers(-2, 3, 3) + (0 if value == 1 else 5)
            ball = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2
            image[ball] = hu
            labels[ball] = value
        vol = Volume(image.astype(np.int16), affine, f"case{i}")
        write_image(vol, root / "imagesTr" / f"case{i:02d}_0000.nii.gz")
        write_mask(labels, vol, root / "labelsTr" / f"case{i:02d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "gallbladder": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz",
    }))
    return root


def tiny_model(classes=("liver", "spleen"), seed: int = 0):
    """A 4-feature-channel U-Net (inputs divisible by 8)."""
    torch.manual_seed(seed)
    model = create_model("unet3d", list(classes), base_channels=2)
    model.preprocess = {"spacing": [3.0, 3.0, 3.0], "crop_foreground": False}
    return model.eval()



# Organs of the tiny synthetic scans: name -> (HU, box in voxels). Every scan shows all of them.
ORGANS = {
    "liver": (60.0, (slice(4, 12), slice(4, 14), slice(5, 15))),
    "spleen": (45.0, (slice(13, 18), slice(5, 10), slice(6, 12))),
    "kidney_left": (150.0, (slice(12, 17), slice(12, 17), slice(4, 9))),
}


def write_partial_label_dataset(root: Path, structures: list[str], cases: int = 1, seed: int = 0, shape=(20, 20, 20)) -> Path:
    """An nnU-Net dataset of `cases` 20^3 scans (4 mm) labelling only `structures` (values 1..k)."""
    rng = np.random.default_rng(seed)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    for i in range(cases):
        image = np.full(shape, -1000.0)
        image[2:18, 2:19, 2:18] = 0.0  # body
        labels = np.zeros(shape, np.uint8)
        for name, (hu, box) in ORGANS.items():
            shift = tuple(slice(b.start + int(rng.integers(-1, 2)), b.stop + int(rng.integers(-1, 2))) for b in box)
            image[shift] = hu
            if name in structures:
                labels[shift] = structures.index(name) + 1
        image += rng.normal(0, 10, shape)
        volume = Volume(np.round(image).astype(np.float32), affine, f"tiny_{i}")
        write_image(volume, root / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")
        write_mask(labels, volume, root / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    write_json(root / "dataset.json", {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{s: v for v, s in enumerate(structures, start=1)}},
        "numTraining": cases, "file_ending": ".nii.gz",
    })
    return root


def tiny_assembly(root: Path, cases: int = 1, **train) -> dict:
    """Two partial-label datasets (A: liver + spleen, B: spleen + kidney_left), a tiny U-Net."""
    if not (root / "A").exists():
        write_partial_label_dataset(root / "A", ["liver", "spleen"], cases, seed=1)
        write_partial_label_dataset(root / "B", ["kidney_left", "spleen"], cases, seed=2)
    return {
        "datasets": [{"path": "A", "structures": ["liver", "spleen"]}, {"path": "B"}],
        "model": {"arch": "unet3d", "arch_kwargs": {"base_channels": 2}},
        "preprocess": {"spacing": [4, 4, 4]},
        "train": {"epochs": 2, "batch_size": 1, "patches_per_volume": 2, "patch_size": [16, 16, 16],
                  "warmup_epochs": 0, "lr": 1e-3, "progress": False, **train},
    }



class IntensityFeatures(SegmentationModel):
    """A 'foundation model' whose features are radial basis functions of the voxel intensity,
    centred on the tiny datasets' air, gallbladder, body and liver intensities: a linear probe
    on them can segment every structure."""

    arch = "intensity_test"

    def __init__(self, class_names=("liver", "spleen")):
        torch.manual_seed(0)
        super().__init__(class_names, feature_channels=4)
        self.preprocess = {"spacing": [3.0, 3.0, 3.0], "crop_foreground": False}
        # window (-175, 250) HU -> [0, 1]: air 0, gallbladder -20 HU, body 40 HU, liver 120 HU
        self.register_buffer("centres", torch.tensor([0.0, 155 / 425, 215 / 425, 295 / 425]).view(1, 4, 1, 1, 1))

    def features(self, x):
        return torch.exp(-(((x - self.centres) / 0.05) ** 2))


def write_tiny_experiment_inputs(root: Path) -> tuple[Path, Path, Path]:
    """``(root, dataset, model file)``: 5 tiny cases and a saved tiny U-Net, the inputs of the
    small benchmark experiments (`fseft benchmark`, sequential or on Ray workers)."""
    data = write_tiny_dataset(root / "data", n_cases=5)
    model = save_model_file(tiny_model(("liver", "spleen")), root / "tiny.safetensors",
                            preprocess={"spacing": [3.0, 3.0, 3.0], "crop_foreground": False})
    return root, data, model
