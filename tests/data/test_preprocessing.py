"""Model-space preprocessing and its inverse: geometry, HU window, body crop, round trips on real CT."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fseft.data.io import read_image, read_multilabel, write_mask
from fseft.data.preprocessing import PreprocessConfig, PreprocessedCase, preprocess, to_native
from fseft.data.volume import Volume
from fseft.errors import ConfigError, InputFileError

# LAS, anisotropic, off-origin: exercises orientation, spacing and translation together.
NATIVE_AFFINE = np.array([[-0.8, 0, 0, 30.0], [0, 1.2, 0, -20.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])


def _world(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """RAS mm of every voxel centre, (3, X, Y, Z)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:]).reshape(3, *shape)


def _ramp_hu(world: np.ndarray) -> np.ndarray:
    """A linear function of position, within the HU window everywhere in these small volumes."""
    return 2.0 * world[0] + 1.5 * world[1] + 1.0 * world[2] - 80.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# ----------------------------------------------------------------------------- config


def test_config_round_trips_through_json() -> None:
    cfg = PreprocessConfig(spacing=(1.0, 1.0, 2.0), hu_window=(-100, 200), orientation="las", crop_margin_mm=5)
    back = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.orientation == "LAS" and back.spacing == (1.0, 1.0, 2.0)
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()


@pytest.mark.parametrize(
    "bad",
    [
        {"spacing": (1.5, 0, 1.5)},
        {"spacing": (1.5, 1.5)},
        {"hu_window": (250, -175)},
        {"orientation": "RAX"},
        {"orientation": "RRS"},
        {"crop_margin_mm": -1},
        {"spacing": ("a", 1, 1)},
    ],
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        PreprocessConfig(**bad)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="unknown key.*spacings"):
        PreprocessConfig.from_dict({"spacings": [1, 1, 1]})


# ----------------------------------------------------------------------------- geometry


def test_model_space_values_sit_at_their_recorded_world_positions() -> None:
    shape = (20, 14, 6)
    native = Volume(_ramp_hu(_world(NATIVE_AFFINE, shape)).astype(np.float32), NATIVE_AFFINE, "ramp")
    cfg = PreprocessConfig(spacing=(1.5, 1.5, 1.5), hu_window=(-175.0, 250.0))

    case = preprocess(native, None, cfg)

    image, affine = case.image, case.image.affine.numpy()
    assert image.shape[0] == 1 and image.dtype == torch.float32
    assert "".join(nib.aff2axcodes(affine)) == "RAS"
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), (1.5, 1.5, 1.5), atol=1e-6)
    # Trilinear interpolation reproduces a linear function exactly at voxels inside the native
    # box: the recorded affine must say where each model voxel really sampled the scan.
    world = _world(affine, tuple(image.shape[1:]))
    native_idx = np.einsum("ij,j...->i...", np.linalg.inv(NATIVE_AFFINE)[:3, :3], world) + np.linalg.inv(
        NATIVE_AFFINE
    )[:3, 3].reshape(3, 1, 1, 1)
    inside = np.all((native_idx >= 0) & (native_idx <= np.reshape(shape, (3, 1, 1, 1)) - 1), axis=0)
    expected = (_ramp_hu(world) + 175.0) / 425.0
    assert inside.sum() > 0.5 * inside.size
    np.testing.assert_allclose(image[0].numpy()[inside], expected[inside], atol=1e-4)


def test_to_native_lands_model_values_on_native_world_positions() -> None:
    shape = (20, 14, 6)
    native = Volume(np.zeros(shape, np.float32), NATIVE_AFFINE, "ramp")
    case = preprocess(native, None, PreprocessConfig(crop_foreground=False))
    model_affine = case.image.affine.numpy()
    model_ramp = _ramp_hu(_world(model_affine, tuple(case.image.shape[1:])))[None].astype(np.float32)

    back = to_native(torch.from_numpy(model_ramp), case, mode="linear")

    assert back.shape == (1, *shape) and back.dtype == np.float32
    # native voxels inside the model box (it covers the scan up to half a model voxel)
    model_idx = np.einsum(
        "ij,j...->i...", np.linalg.inv(model_affine)[:3, :3], _world(NATIVE_AFFINE, shape)
    ) + np.linalg.inv(model_affine)[:3, 3].reshape(3, 1, 1, 1)
    inside = np.all((model_idx >= 0) & (model_idx <= np.reshape(case.image.shape[1:], (3, 1, 1, 1)) - 1), axis=0)
    assert inside.sum() > 0.5 * inside.size
    np.testing.assert_allclose(back[0][inside], _ramp_hu(_world(NATIVE_AFFINE, shape))[inside], atol=1e-3)


def test_body_crop_keeps_the_body_and_its_inverse_pads_with_zeros() -> None:
    shape = (40, 36, 10)
    hu = np.full(shape, -1024.0, np.float32)
    hu[8:30, 6:25, :] = 40.0  # body
    hu[12:16, 10:14, :] = -850.0  # lung: inside the body, below the threshold
    hu[1, 1, 1] = -600.0  # noise in the air, below the threshold
    native = Volume(hu, np.diag([1.0, 1.0, 2.0, 1.0]), "body")
    cfg = PreprocessConfig(spacing=(1.0, 1.0, 2.0), crop_margin_mm=3.0)

    case = preprocess(native, None, cfg)

    # body box 22 x 19 voxels, plus 3 voxels (3 mm) each side; z is all body
    assert tuple(case.image.shape[1:]) == (28, 25, 10)
    ones = torch.ones((1, *case.image.shape[1:]), dtype=torch.uint8)
    kept = to_native(ones, case, mode="nearest")
    assert kept.dtype == np.uint8 and kept.shape == (1, *shape)
    body = hu > -500
    assert kept[0][body].all()  # nothing of the body cropped away
    assert kept[0].sum() == 28 * 25 * 10  # and outside the crop the inverse gives 0
    # HU window: body (40 HU) -> 215/425, lung and air clipped to 0
    np.testing.assert_allclose(case.image.max().item(), 215.0 / 425.0, atol=1e-6)
    assert case.image.min().item() == 0.0


def test_errors() -> None:
    image = Volume(np.zeros((6, 6, 4), np.float32), np.eye(4), "ct.nii.gz")
    labels = Volume(np.zeros((1, 6, 6, 4), np.uint8), np.diag([2.0, 1, 1, 1]), "seg.nii.gz")
    with pytest.raises(InputFileError, match="seg.nii.gz.*ct.nii.gz"):
        preprocess(image, labels)
    air = Volume(np.full((6, 6, 4), -1000.0, np.float32), np.eye(4), "air.nii.gz")
    with pytest.raises(InputFileError, match="air.nii.gz: no voxel above -500 HU"):
        preprocess(air, None)
    case = preprocess(image, None, PreprocessConfig(crop_foreground=False))
    with pytest.raises(ConfigError, match="not \\(C,"):
        to_native(torch.zeros(2, 3, 3, 3), case)
    with pytest.raises(ConfigError, match="mode"):
        to_native(torch.zeros(1, *case.image.shape[1:]), case, mode="cubic")


# ----------------------------------------------------------------------------- real CT round trips

STRUCTURES = ["liver", "spleen", "aorta", "vertebrae_T12", "stomach", "pancreas", "inferior_vena_cava"]
# Large enough that a binary 1.5 mm mask holds them to Dice 0.98 at 0.98 mm in-plane resolution.
LARGE = ["liver", "spleen", "aorta", "stomach"]


def _load(folder: Path, image: str, label: str) -> tuple[Volume, Volume, PreprocessedCase]:
    class_map = {int(k): v for k, v in json.loads((folder / "total_class_map.json").read_text()).items()}
    ct = read_image(folder / image)
    masks = read_multilabel(folder / label, class_map, STRUCTURES)
    return ct, masks, preprocess(ct, masks)


@pytest.fixture(scope="module")
def dicom_case(totalseg_examples: Path):
    return _load(totalseg_examples, "example_ct_dicom", "example_seg_dicom.nii.gz")


@pytest.fixture(scope="module")
def nifti_case(totalseg_examples: Path):
    return _load(totalseg_examples, "example_ct_sm.nii.gz", "example_seg.nii.gz")


def _check_model_space(ct: Volume, case: PreprocessedCase) -> None:
    assert case.native is ct
    assert case.image.dtype == torch.float32 and 0.0 <= case.image.min() and case.image.max() <= 1.0
    assert case.label.dtype == torch.uint8 and case.label.shape == (len(STRUCTURES), *case.image.shape[1:])
    assert "".join(nib.aff2axcodes(case.image.affine.numpy())) == "RAS"
    np.testing.assert_allclose(case.image.affine.numpy(), case.label.affine.numpy())


@pytest.mark.slow
def test_dicom_round_trip_recovers_the_masks(dicom_case, tmp_path: Path) -> None:
    ct, masks, case = dicom_case
    _check_model_space(ct, case)
    assert ct.axcodes == "LAS"
    # 500 mm field of view at 1.5 mm
    assert abs(case.image.shape[1] - 334) <= 1 and case.image.shape[3] == 26

    back = to_native(case.label, case, mode="nearest")

    assert back.shape == masks.array.shape and back.dtype == np.uint8
    dice = {s: _dice(back[i], masks.array[i]) for i, s in enumerate(STRUCTURES)}
    print("DICOM round trip, binary 1.5 mm labels:", {s: round(d, 4) for s, d in dice.items()})
    assert all(dice[s] >= 0.98 for s in LARGE), dice
    # thin structures lose detail in a binary 1.5 mm grid, but stay close
    assert all(d >= 0.94 for d in dice.values()), dice

    # The written mask lands in the DICOM's own (LAS) grid.
    out = write_mask(back[0], ct, tmp_path / "liver.nii.gz")
    reloaded = nib.load(str(out))
    assert reloaded.shape == ct.array.shape
    np.testing.assert_allclose(reloaded.affine, ct.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(reloaded.dataobj), back[0])


@pytest.mark.slow
def test_dicom_soft_round_trip_recovers_every_structure(dicom_case) -> None:
    # The inference path: the model predicts soft probabilities in model space. Model-space
    # partial-volume fractions of the true masks (what a perfect model would output) brought
    # back with linear interpolation and thresholded recover even the thin structures.
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    ct, masks, case = dicom_case
    native = MetaTensor(torch.from_numpy(masks.array).float(), affine=torch.as_tensor(ct.affine))
    soft = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
        native, dst_affine=case.image.affine, spatial_size=case.image.shape[1:]
    )

    back = to_native(soft, case, mode="linear")

    assert back.shape == masks.array.shape and back.dtype == np.float32
    dice = {s: _dice(back[i] > 0.5, masks.array[i]) for i, s in enumerate(STRUCTURES)}
    print("DICOM round trip, soft labels:", {s: round(d, 4) for s, d in dice.items()})
    assert all(d >= 0.98 for d in dice.values()), dice


def test_nifti_round_trip_recovers_the_masks(nifti_case, tmp_path: Path) -> None:
    ct, masks, case = nifti_case
    _check_model_space(ct, case)
    assert ct.axcodes == "RAS"

    for mode in ("nearest", "linear"):
        back = to_native(case.label, case, mode=mode)
        assert back.shape == masks.array.shape
        dice = {s: _dice(back[i] > 0.5, masks.array[i]) for i, s in enumerate(STRUCTURES)}
        print(f"NIfTI round trip ({mode}):", {s: round(d, 4) for s, d in dice.items()})
        assert all(d >= 0.98 for d in dice.values()), dice

    out = write_mask(back[0] > 0.5, ct, tmp_path / "liver.nii.gz", label_map={1: "liver"})
    reloaded = nib.load(str(out))
    assert reloaded.shape == ct.array.shape
    np.testing.assert_allclose(reloaded.affine, ct.affine, atol=1e-4)


def test_soft_labels_keep_small_structures_that_nearest_neighbour_aliases() -> None:
    # 6 mm balls on a 1.7 mm grid taken to 3 mm and back (linear, >= 0.5): nearest neighbour
    # keeps whichever source voxel is closest to each model voxel, fractions keep the volume.
    affine = np.diag([1.7, 1.7, 1.7, 1.0])
    shape = (28, 28, 28)
    world = _world(affine, shape)
    image = Volume(np.full(shape, 40.0, np.float32), affine, "balls")
    cfg = PreprocessConfig(spacing=(3.0, 3.0, 3.0), crop_foreground=False)
    dice_hard, dice_soft = [], []
    for centre in ([20.0, 22.1, 23.3], [21.4, 24.6, 19.9], [23.8, 20.7, 22.5], [19.2, 23.5, 25.1]):
        ball = (np.linalg.norm(world - np.reshape(centre, (3, 1, 1, 1)), axis=0) < 6.0).astype(np.uint8)
        labels = Volume(ball[None], affine, "ball mask")
        hard = preprocess(image, labels, cfg)
        soft = preprocess(image, labels, cfg, soft_labels=True)
        assert hard.label.dtype == torch.uint8 and soft.label.dtype == torch.float32
        assert float(soft.label.min()) >= 0.0 and float(soft.label.max()) <= 1.0
        assert float(soft.label.sum()) * 27.0 == pytest.approx(ball.sum() * 1.7**3, rel=0.05)
        dice_hard.append(_dice(to_native(hard.label.float(), hard, mode="linear")[0] >= 0.5, ball))
        dice_soft.append(_dice(to_native(soft.label, soft, mode="linear")[0] >= 0.5, ball))
    assert np.mean(dice_soft) > 0.88 and np.mean(dice_soft) > np.mean(dice_hard) + 0.03
