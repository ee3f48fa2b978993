import json
import warnings

import numpy as np
import pytest
import torch
from dicom_series import write_ct_series
from torch import nn

from fseft.data.io import read_image
from fseft.data.preprocessing import PreprocessConfig
from fseft.data.structures import UnknownStructureError
from fseft.data.volume import Volume
from fseft.errors import ConfigError, InputFileError
from fseft.evaluation.metrics import dice
from fseft.models.base import SegmentationModel
from fseft.prediction.predict import find_scans
from fseft.prediction.segment import (
    InferenceConfig,
    merge_masks,
    predict_probabilities,
    segment_volume,
    select_structures,
)


class TinyConvModel(SegmentationModel):
    """Two 3x3x3 convolutions: the output depends on a neighbourhood (window borders matter)."""

    def __init__(self, class_names=("liver", "spleen", "kidney_left")):
        super().__init__(class_names, feature_channels=4)
        self.conv = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1))

    def features(self, x):
        return self.conv(x)


class IntensityModel(SegmentationModel):
    """Voxel-wise: logit = 20 (x - 0.5) for every class, i.e. foreground where the windowed
    intensity exceeds 0.5 (about 38 HU with the default HU window)."""

    def __init__(self, class_names=("liver", "spleen")):
        super().__init__(class_names, feature_channels=1)
        with torch.no_grad():
            self.head.weight.fill_(20.0)
            self.head.bias.fill_(-10.0)

    def features(self, x):
        return x


def _cfg(**kw):
    return InferenceConfig(**{"roi_size": (32, 32, 32), "progress": False, **kw})


def test_sliding_window_equals_full_forward_when_roi_covers_the_volume():
    torch.manual_seed(0)
    model = TinyConvModel()
    image = torch.rand(1, 1, 32, 32, 32)
    probs = predict_probabilities(model, image, _cfg())
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(image))
    assert probs.shape == (1, 3, 32, 32, 32) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_overlapping_windows_blend_to_the_full_forward_of_a_voxelwise_model():
    # 40^3 with 32^3 windows: 8 overlapping windows, Gaussian blending; a voxel-wise model
    # gives the same value in every window, so the blend must equal the full forward.
    torch.manual_seed(0)
    model = IntensityModel()
    image = torch.rand(1, 1, 40, 40, 40)
    probs = predict_probabilities(model, image, _cfg(overlap=0.5))
    with torch.no_grad():
        expected = torch.sigmoid(model(image))
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-5)


def test_channel_selection_bf16_and_training_flag():
    torch.manual_seed(0)
    model = TinyConvModel().train()
    image = torch.rand(1, 1, 40, 36, 34)  # smaller than the roi along Y/Z: padded by MONAI
    full = predict_probabilities(model, image, _cfg())
    assert model.training  # restored
    assert full.shape == (1, 3, 40, 36, 34)
    picked = predict_probabilities(model, image, _cfg(), channels=[2, 0])
    torch.testing.assert_close(picked, full[:, [2, 0]])
    low = predict_probabilities(model, image, _cfg(bf16=True), channels=[2, 0])
    assert low.dtype == torch.float32
    assert (low - picked).abs().max() < 0.05


def test_predict_probabilities_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(1, 1, X, Y, Z\)"):
        predict_probabilities(IntensityModel(), torch.rand(1, 2, 8, 8, 8), _cfg())


def test_config_validation():
    with pytest.raises(ConfigError, match="overlap"):
        InferenceConfig(overlap=1.0)
    with pytest.raises(ConfigError, match="blend"):
        InferenceConfig(blend="median")
    assert InferenceConfig(roi_size=64).roi_size == (64, 64, 64)


def test_select_structures_by_any_spelling_and_unknown_lists_classes():
    classes = ("liver", "kidney_left", "spleen")
    assert select_structures(classes, None) == ([0, 1, 2], classes)
    assert select_structures(classes, "spleen,lKid") == ([2, 1], ("spleen", "kidney_left"))
    with pytest.raises(UnknownStructureError, match="liver, kidney_left, spleen"):
        select_structures(classes, ["pancreas"])


def _phantom_volume(affine):
    """Body at 0 HU in air, a 200 HU box (the 'organ') and a small 200 HU island."""
    hu = np.full((36, 30, 20), -1000.0, np.float32)
    hu[2:34, 2:28, 1:19] = 0.0
    hu[8:22, 8:20, 5:13] = 200.0
    hu[28:30, 23:25, 15:17] = 200.0  # island, far from the box
    return Volume(hu, affine, "phantom")


@pytest.mark.parametrize("lcc", [True, False])
def test_segment_volume_returns_native_geometry_masks(lcc):
    # LAS, anisotropic: segment_volume must come back to this grid, not the 1.5 mm RAS one
    affine = np.diag([-1.2, 1.0, 2.5, 1.0])
    affine[:3, 3] = (40.0, -20.0, 10.0)
    volume = _phantom_volume(affine)
    masks = segment_volume(IntensityModel(), volume, PreprocessConfig(), _cfg(largest_component=lcc), ["spleen"])
    assert masks.shape == (1, 36, 30, 20) and masks.dtype == np.uint8
    organ = np.zeros((36, 30, 20), bool)
    organ[8:22, 8:20, 5:13] = True
    island = np.zeros_like(organ)
    island[28:30, 23:25, 15:17] = True
    assert dice(masks[0] & ~island, organ) > 0.85
    if lcc:
        assert not masks[0][island].any()
    else:
        assert masks[0][island].any()


def test_merge_masks_first_structure_wins_overlaps():
    masks = np.zeros((2, 3, 3, 3), np.uint8)
    masks[0, 0] = 1
    masks[1, :2] = 1
    labels = merge_masks(masks)
    assert (labels[0] == 1).all() and (labels[1] == 2).all() and (labels[2] == 0).all()


def test_find_scans(tmp_path):
    (tmp_path / "a_0000.nii.gz").write_bytes(b"")
    (tmp_path / "b.nrrd").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [c for c, _ in find_scans(tmp_path)] == ["a", "b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(InputFileError, match="no readable scans") as err:
        find_scans(empty)
    assert str(empty) in str(err.value)


def test_find_scans_dicom_folder(totalseg_examples):
    dicom = totalseg_examples / "example_ct_dicom"
    assert find_scans(dicom) == [("example_ct_dicom", dicom)]
    # a folder of cases: NIfTI files and no DICOM sub-folder
    cases = dict(find_scans(totalseg_examples))
    assert "example_ct_sm" in cases and "example_ct_dicom" in cases


# ------------------------------------------------------------------- fseft predict end to end


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A random tiny Swin-UNETR saved as an fseft model file, with a non-default preprocessing
    (4 mm voxels: few windows, fast tests)."""
    from fseft.models.checkpoint import save_model_file
    from fseft.models.zoo import create_model

    torch.manual_seed(0)
    model = create_model("swin_unetr", ["liver", "spleen"], feature_size=12)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model_file(model, path, preprocess=PreprocessConfig(spacing=(4.0, 4.0, 4.0)))
    return path


def _write_scan(path, shape=(30, 26, 14), spacing=(2.0, 2.5, 4.0), seed=0):
    import nibabel as nib

    rng = np.random.default_rng(seed)
    hu = rng.normal(0.0, 200.0, shape).astype(np.int16)
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])  # LAS
    affine[:3, 3] = (30.0, -40.0, 12.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return affine


@pytest.mark.slow
def test_predict_cli_nifti_keeps_native_geometry(model_file, tmp_path):
    import nibabel as nib

    from fseft.cli import main

    affine = _write_scan(tmp_path / "in" / "case1_0000.nii.gz")
    _write_scan(tmp_path / "in" / "case2.nii.gz", shape=(20, 22, 12), seed=1)
    out = tmp_path / "out"
    argv = ["predict", "-i", str(tmp_path / "in"), "-o", str(out), "--model", str(model_file),
            "--roi-size", "64", "32", "32", "--structures", "spleen,liver", "--no-progress"]
    assert main(argv) == 0
    img = nib.load(str(out / "case1.nii.gz"))
    assert img.shape == (30, 26, 14)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2}
    assert json.loads((out / "case1.json").read_text()) == {"1": "spleen", "2": "liver"}
    assert nib.load(str(out / "case2.nii.gz")).shape == (20, 22, 12)

    single = ["predict", "-i", str(tmp_path / "in" / "case2.nii.gz"), "-o", str(out / "single"), *argv[5:]]
    assert main([*single, "--per-structure-files", "--no-lcc"]) == 0
    masks = sorted(p.name for p in (out / "single" / "case2").iterdir())
    assert masks == ["liver.nii.gz", "spleen.nii.gz"]


@pytest.mark.slow
def test_predict_matches_segment_volume_with_the_stored_preprocessing(model_file, tmp_path):
    from fseft.data.io import read_image, read_multilabel
    from fseft.models.zoo import load_model
    from fseft.prediction.predict import predict_path

    _write_scan(tmp_path / "scan.nii.gz")
    cfg = _cfg(roi_size=(64, 32, 32), largest_component=False)
    result = predict_path(tmp_path / "scan.nii.gz", tmp_path / "seg.nii.gz", str(model_file), cfg=cfg)
    assert result.structures == ("liver", "spleen")
    written = read_multilabel(tmp_path / "seg.nii.gz", {1: "liver", 2: "spleen"}, ["liver", "spleen"])
    expected = segment_volume(load_model(str(model_file)), read_image(tmp_path / "scan.nii.gz"),
                              PreprocessConfig(spacing=(4.0, 4.0, 4.0)), cfg)
    overlap = (expected[0] > 0) & (expected[1] > 0)  # multilabel: the first structure wins
    expected[1][overlap] = 0
    np.testing.assert_array_equal(written.array, expected)


def test_predict_errors(model_file, tmp_path, capsys):
    from fseft.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["predict", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--model", str(model_file)]) == 2
    assert "no readable scans" in capsys.readouterr().err
    _write_scan(tmp_path / "scan.nii.gz")
    assert main(["predict", "-i", str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "o"),
                 "--model", str(model_file), "--structures", "pancreas"]) == 2
    err = capsys.readouterr().err
    assert "pancreas" in err and "liver, spleen" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_predict_dicom_series_gives_the_dicom_geometry(model_file, totalseg_examples, tmp_path):
    import nibabel as nib

    from fseft.cli import main

    out = tmp_path / "out"
    assert main(["predict", "-i", str(totalseg_examples / "example_ct_dicom"), "-o", str(out),
                 "--model", str(model_file), "--roi-size", "64", "64", "32", "--overlap", "0.1", "--no-progress"]) == 0
    seg = nib.load(str(out / "example_ct_dicom.nii.gz"))
    reference = nib.load(str(totalseg_examples / "example_seg_dicom.nii.gz"))
    assert seg.shape == reference.shape == (512, 512, 20)
    assert nib.aff2axcodes(seg.affine) == ("L", "A", "S")
    np.testing.assert_allclose(seg.affine, reference.affine, atol=1e-3)


def test_window_defaults_to_the_one_the_model_file_records():
    from fseft.prediction.segment import DEFAULT_ROI_SIZE, InferenceConfig, recommended_roi_size

    class Recorded(torch.nn.Module):
        model_config = {"extra": {"inference": {"roi_size": [64, 32, 32]}}}

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = Recorded()

    assert recommended_roi_size(Wrapper()) == (64, 32, 32)
    assert InferenceConfig().for_model(Wrapper()).roi_size == (64, 32, 32)
    assert InferenceConfig().for_model(torch.nn.Identity()).roi_size == DEFAULT_ROI_SIZE
    assert InferenceConfig(roi_size=(32, 32, 32)).for_model(Wrapper()).roi_size == (32, 32, 32)


def test_segment_volume_keeps_whole_the_structures_the_model_file_says_to():
    from fseft.prediction.segment import recorded_whole_structures

    affine = np.diag([-1.2, 1.0, 2.5, 1.0])
    volume = _phantom_volume(affine)  # the spleen-bright organ plus a far island
    model = IntensityModel()
    island = np.zeros((36, 30, 20), bool)
    island[28:30, 23:25, 15:17] = True
    assert not segment_volume(model, volume, PreprocessConfig(), _cfg(), ["spleen"])[0][island].any()
    model.model_config = {"extra": {"postprocess": {"largest_component": {"liver": True, "spleen": False}}}}
    assert recorded_whole_structures(model) == {"spleen"}
    masks = segment_volume(model, volume, PreprocessConfig(), _cfg(), ["liver", "spleen"])
    assert masks[1][island].any() and not masks[0][island].any()
    assert recorded_whole_structures(torch.nn.Identity()) == frozenset()


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch):
    from fseft.inference import sliding_window

    assert sliding_window.cpu_has_native_bf16() in (True, False, None)  # reads /proc/cpuinfo where there is one
    monkeypatch.setattr(sliding_window, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="no bfloat16 instructions"):
        sliding_window.warn_if_bf16_is_emulated(torch.device("cpu"))
    monkeypatch.setattr(sliding_window, "cpu_has_native_bf16", lambda: None)  # unknown: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sliding_window.warn_if_bf16_is_emulated(torch.device("cpu"))


def test_bf16_training_on_a_cpu_is_refused_where_a_level_is_two_voxels_deep(monkeypatch):
    """Where this PyTorch's CPU bf16 conv3d weight gradient is wrong for inputs 2 voxels deep
    (`check_bf16_training`), 64- and 32-deep Swin-UNETR patches reach such a level, 96 and 128 do
    not; the 8x U-Net reaches it at 16; other devices are not checked; where the build is right,
    nothing is refused."""
    from fseft.inference import sliding_window
    from fseft.inference.sliding_window import check_bf16_training
    from fseft.models.swin_unetr import SwinUNETRSegmenter
    from fseft.models.unet import UNet3DSegmenter

    assert sliding_window.cpu_bf16_conv3d_gradient_is_wrong() in (True, False)  # this machine's build
    monkeypatch.setattr(sliding_window, "cpu_bf16_conv3d_gradient_is_wrong", lambda: True)
    for depth in (64, 32):
        with pytest.raises(ConfigError, match=rf"patch {depth} voxels deep.*drop --bf16"):
            check_bf16_training(SwinUNETRSegmenter, (depth, 96, 96), "cpu")
    for depth in (96, 128):
        check_bf16_training(SwinUNETRSegmenter, (depth, 64, 64), "cpu")
    check_bf16_training(UNet3DSegmenter, (64, 64, 64), "cpu")  # levels 64 ... 8
    with pytest.raises(ConfigError, match="patch 16 voxels deep"):
        check_bf16_training(UNet3DSegmenter, (16, 64, 64), "cpu")
    check_bf16_training(SwinUNETRSegmenter, (64, 64, 64), "cuda:0")  # the bug is the CPU kernel's
    monkeypatch.setattr(sliding_window, "cpu_bf16_conv3d_gradient_is_wrong", lambda: False)
    check_bf16_training(SwinUNETRSegmenter, (64, 96, 96), "cpu")


# ------------------------------------------------------------- outputs for hospital systems


def _series_hu():
    """(slices, rows, columns) HU: air, a 0 HU body, a 200 HU box off-centre in every axis."""
    hu = np.full((8, 20, 24), -1000, np.int16)
    hu[:, 2:18, 2:22] = 0
    hu[2:6, 4:11, 5:15] = 200
    return hu


def _two_organ_model():
    """Voxel-wise: liver where the windowed intensity > 0.5 (about 38 HU: the box), spleen where
    > 0.25 (about -69 HU: the body, box included; the label map gives the box to the liver)."""
    model = IntensityModel(("liver", "spleen"))
    with torch.no_grad():
        model.head.bias[1] = -5.0
    return model


def test_predict_dicom_seg_frames_match_the_nifti_mask_and_reference_the_series(tmp_path):
    import highdicom as hd
    import nibabel as nib
    import pydicom
    import SimpleITK as sitk

    from fseft.prediction.predict import predict_path

    files = write_ct_series(tmp_path / "series", _series_hu(), file_order=[5, 2, 7, 0, 3, 6, 1, 4])
    model = _two_organ_model()
    nifti = predict_path(tmp_path / "series", tmp_path / "nifti", model, cfg=_cfg(), statistics=True)
    seg_run = predict_path(tmp_path / "series", tmp_path / "seg.dcm", model, cfg=_cfg(), output_type="dicom-seg",
                           statistics=True)
    assert seg_run.outputs == {"series": [tmp_path / "seg.dcm"]}
    label_map = json.loads((tmp_path / "nifti" / "series.json").read_text())
    assert label_map == {"1": "liver", "2": "spleen"}

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence} == {1: "liver", 2: "spleen"}
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    referenced = [str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(uids)
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    label_image = sitk.ReadImage(str(tmp_path / "nifti" / "series.nii.gz"))
    for path, frame in zip(files, frames):
        on_slice = sitk.Resample(label_image, sitk.ReadImage(str(path)), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        np.testing.assert_array_equal(frame, sitk.GetArrayFromImage(on_slice)[0], err_msg=path.name)
    assert set(np.unique(frames).tolist()) == {0, 1, 2}

    # statistics: from the NIfTI mask and the scan it was computed on, independently of fseft
    stats = json.loads((tmp_path / "nifti" / "statistics.json").read_text())
    assert stats == nifti.statistics and list(stats) == ["series"]
    assert json.loads((tmp_path / "seg_statistics.json").read_text()) == stats  # one file, same masks
    image = nib.load(str(tmp_path / "nifti" / "series.nii.gz"))
    labels = np.asarray(image.dataobj)
    hu = read_image(tmp_path / "series").array
    voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
    for value, name in ((1, "liver"), (2, "spleen")):
        inside = hu[labels == value].astype(np.float64)
        assert stats["series"][name]["voxels"] == inside.size > 0
        assert stats["series"][name]["volume_ml"] == pytest.approx(inside.size * voxel_ml, abs=1e-4)
        assert stats["series"][name]["hu_mean"] == pytest.approx(inside.mean(), abs=0.01)
        assert stats["series"][name]["hu_std"] == pytest.approx(inside.std(), abs=0.01)
    assert stats["series"]["liver"]["hu_mean"] == pytest.approx(200, abs=40)


def test_predict_statistics_of_an_empty_structure_are_zero_and_null(tmp_path):
    import nibabel as nib

    from fseft.prediction.predict import predict_path

    affine = _write_scan(tmp_path / "scan.nii.gz")
    hu = np.full((30, 26, 14), -1000, np.int16)
    hu[5:25, 5:20, 3:11] = 200  # liver and spleen alike: the label map gives every voxel to the liver
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "scan.nii.gz"))
    result = predict_path(tmp_path / "scan.nii.gz", tmp_path / "out", IntensityModel(), cfg=_cfg(), statistics=True)
    stats = json.loads(result.statistics_file.read_text())["scan"]
    assert result.statistics_file == tmp_path / "out" / "statistics.json"
    assert stats["spleen"] == {"voxels": 0, "volume_ml": 0.0, "hu_mean": None, "hu_std": None}
    assert stats["liver"]["volume_ml"] > 0 and stats["liver"]["hu_mean"] == pytest.approx(200, abs=1)
    assert (tmp_path / "out" / "scan.ctbl").is_file()


def test_dicom_seg_for_a_nifti_input_fails_before_any_model_is_loaded(model_file, tmp_path, capsys, monkeypatch):
    from fseft.cli import main
    from fseft.models import zoo

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(zoo, "load_model", no_loading)
    _write_scan(tmp_path / "in" / "a.nii.gz")
    write_ct_series(tmp_path / "in" / "b_series", _series_hu())
    for source in (tmp_path / "in" / "a.nii.gz", tmp_path / "in"):  # the file alone, or among DICOM series
        assert main(["predict", "-i", str(source), "-o", str(tmp_path / "out"), "--model", str(model_file),
                     "--output-type", "dicom-seg"]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "in" / "a.nii.gz") in err and "DICOM series" in err and "--output-type nifti" in err
    assert not (tmp_path / "out").exists()
    argv = ["predict", "-i", str(tmp_path / "in" / "b_series"), "--model", str(model_file), "--output-type", "dicom-seg"]
    assert main([*argv, "-o", str(tmp_path / "seg.nii.gz")]) == 2
    assert "a NIfTI file name for --output-type dicom-seg" in capsys.readouterr().err
    assert main([*argv, "-o", str(tmp_path / "out"), "--per-structure-files"]) == 2
    assert "drop --per-structure-files" in capsys.readouterr().err
    assert main([*argv[:-2], "-o", str(tmp_path / "seg.dcm")]) == 2  # a .dcm name without --output-type dicom-seg
    assert "a .dcm output is a DICOM SEG" in capsys.readouterr().err


def test_dicom_seg_without_highdicom_names_the_extra(model_file, tmp_path, capsys, monkeypatch):
    import sys

    from fseft.cli import main

    write_ct_series(tmp_path / "series", _series_hu())
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    assert main(["predict", "-i", str(tmp_path / "series"), "-o", str(tmp_path / "out"), "--model", str(model_file),
                 "--output-type", "dicom-seg"]) == 2
    assert 'pip install "fseft[dicom-seg]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_cli_dicom_seg_and_statistics(model_file, tmp_path):
    import highdicom as hd

    from fseft.cli import main

    write_ct_series(tmp_path / "cases" / "patient7", _series_hu())
    out = tmp_path / "out"
    assert main(["predict", "-i", str(tmp_path / "cases"), "-o", str(out), "--model", str(model_file),
                 "--roi-size", "64", "32", "32", "--output-type", "dicom-seg", "--statistics", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["patient7.dcm", "statistics.json"]
    seg = hd.seg.segread(out / "patient7.dcm")
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver", "spleen"]
    stats = json.loads((out / "statistics.json").read_text())
    assert list(stats) == ["patient7"] and list(stats["patient7"]) == ["liver", "spleen"]
    assert set(stats["patient7"]["liver"]) == {"voxels", "volume_ml", "hu_mean", "hu_std"}
