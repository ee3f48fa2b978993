"""Volume I/O: formats, geometry conventions (LPS -> RAS, DICOM row order), errors, writing."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fseft.data.io import (
    StructureNotInFileError,
    read_binary_masks,
    read_image,
    read_labels,
    read_multilabel,
    write_image,
    write_mask,
)
from fseft.data.structures import UnknownStructureError
from fseft.data.volume import Volume, check_same_geometry
from fseft.errors import InputFileError

OBLIQUE = np.array(  # a proper rotation (about z by 30 degrees, then x by 10): tests non-axis-aligned frames
    [[0.8660254, -0.5, 0.0], [0.49240388, 0.85286853, -0.17364818], [0.08682409, 0.15038373, 0.98480775]]
)


def _sitk_volume(shape_xyz=(5, 4, 3), direction=OBLIQUE) -> sitk.Image:
    rng = np.random.default_rng(0)
    zyx = rng.integers(-1000, 1000, size=shape_xyz[::-1]).astype(np.int16)
    img = sitk.GetImageFromArray(zyx)
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((-10.0, 20.0, 30.0))
    img.SetDirection(tuple(np.asarray(direction).ravel()))
    return img


def _nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _class_map(folder: Path) -> dict[int, str]:
    return {int(k): v for k, v in json.loads((folder / "total_class_map.json").read_text()).items()}


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_files_match_itks_own_nifti_conversion(tmp_path: Path, suffix: str) -> None:
    # ITK's NIfTI writer converts LPS -> RAS itself: reading that file with nibabel is an
    # independent reference for our conversion of the same image.
    img = _sitk_volume()
    sitk.WriteImage(img, str(tmp_path / f"ct{suffix}"))
    sitk.WriteImage(img, str(tmp_path / "ref.nii.gz"))
    ref = nib.load(str(tmp_path / "ref.nii.gz"))

    vol = read_image(tmp_path / f"ct{suffix}")

    assert vol.array.dtype == np.float32 and vol.array.shape == (5, 4, 3)
    np.testing.assert_array_equal(vol.array, np.asarray(ref.dataobj))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.9, 2.5), atol=1e-6)


def test_lps_identity_direction_reads_as_lps_axcodes(tmp_path: Path) -> None:
    sitk.WriteImage(_sitk_volume(direction=np.eye(3)), str(tmp_path / "ct.mha"))
    vol = read_image(tmp_path / "ct.mha")
    assert vol.axcodes == "LPS"
    # voxel (0, 0, 0) sits at the LPS origin (-10, 20, 30), i.e. RAS (10, -20, 30)
    np.testing.assert_allclose(vol.affine[:3, 3], (10.0, -20.0, 30.0))


def test_nifti_round_trip_keeps_values_and_affine(tmp_path: Path) -> None:
    affine = np.array([[-0.8, 0, 0, 12.0], [0, 0.8, 0, -5.0], [0, 0, 3.0, 40.0], [0, 0, 0, 1]])
    hu = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2) * 10 - 100
    out = write_image(Volume(hu, affine, "memory"), tmp_path / "ct.nii.gz")
    assert nib.load(str(out)).get_data_dtype() == np.int16
    back = read_image(out)
    np.testing.assert_array_equal(back.array, hu)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)

    fractional = write_image(Volume(hu + 0.25, affine, "memory"), tmp_path / "frac.nii")
    assert nib.load(str(fractional)).get_data_dtype() == np.float32
    np.testing.assert_array_equal(read_image(fractional).array, hu + 0.25)


def test_single_volume_4d_is_accepted(tmp_path: Path) -> None:
    vol = read_image(_nifti(tmp_path / "a.nii.gz", np.ones((3, 4, 5, 1), np.int16)))
    assert vol.array.shape == (3, 4, 5)


def test_dicom_series_comes_out_in_the_geometry_of_its_nifti_label(totalseg_examples: Path) -> None:
    ct = read_image(totalseg_examples / "example_ct_dicom")
    seg = nib.load(str(totalseg_examples / "example_seg_dicom.nii.gz"))
    assert ct.array.shape == seg.shape == (512, 512, 20)
    assert ct.axcodes == "LAS"
    np.testing.assert_allclose(ct.affine, seg.affine, atol=1e-3)
    # Voxel order, not only the affine: the labelled liver and vertebra must land on liver
    # (soft tissue, tens of HU) and bone (hundreds of HU), not on the mirrored rows.
    masks = read_multilabel(
        totalseg_examples / "example_seg_dicom.nii.gz", _class_map(totalseg_examples), ["liver", "vertebrae_T12"]
    )
    check_same_geometry(ct, masks)
    liver_hu = ct.array[masks.array[0] > 0].mean()
    bone_hu = ct.array[masks.array[1] > 0].mean()
    assert 30 < liver_hu < 150 and bone_hu > 180


def test_nifti_example_matches_its_label(totalseg_examples: Path) -> None:
    ct = read_image(totalseg_examples / "example_ct_sm.nii.gz")
    masks = read_multilabel(totalseg_examples / "example_seg.nii.gz", _class_map(totalseg_examples), ["liver"])
    assert ct.axcodes == "RAS" and ct.spacing == (3.0, 3.0, 3.0)
    check_same_geometry(ct, masks)
    assert 30 < ct.array[masks.array[0] > 0].mean() < 150


# ----------------------------------------------------------------------------- labels


def test_read_multilabel_order_aliases_and_union(tmp_path: Path) -> None:
    labels = np.zeros((4, 4, 2), np.uint8)
    labels[0] = 1
    labels[1] = 2
    labels[2] = 3
    path = _nifti(tmp_path / "seg.nii.gz", labels)
    label_map = {1: "liver", 2: "lKid", 3: "kidney_left", 4: "spleen"}

    masks = read_multilabel(path, label_map, ["kidney_left", "liver", "spleen"])

    assert masks.array.shape == (3, 4, 4, 2) and masks.array.dtype == np.uint8
    np.testing.assert_array_equal(masks.array[0], np.isin(labels, [2, 3]))  # two values, one structure
    np.testing.assert_array_equal(masks.array[1], labels == 1)
    assert masks.array[2].sum() == 0  # in the map, absent from this scan: an empty mask, no error


def test_read_multilabel_missing_structure_names_file_and_lists_map(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "seg.nii.gz", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(InputFileError) as info:
        read_multilabel(path, {1: "liver", 2: "spleen"}, ["liver", "gallbladder"])
    msg = str(info.value)
    assert "seg.nii.gz" in msg and "gallbladder" in msg and "liver, spleen" in msg
    assert isinstance(info.value, UnknownStructureError)


def test_read_labels_rejects_fractional_values(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "seg.nii.gz", np.full((2, 2, 2), 0.5, np.float32))
    with pytest.raises(InputFileError, match="non-integer"):
        read_labels(path)


def test_read_binary_masks(tmp_path: Path) -> None:
    liver = np.zeros((3, 3, 3), np.uint8)
    liver[1] = 1
    spleen = np.zeros((3, 3, 3), np.uint8)
    spleen[:, 2] = 1
    files = {"liver": _nifti(tmp_path / "liver.nii.gz", liver), "spleen": _nifti(tmp_path / "spleen.nii.gz", spleen)}

    masks = read_binary_masks(files, ["spleen", "liver"])
    np.testing.assert_array_equal(masks.array, np.stack([spleen, liver]))
    assert masks.source == str(tmp_path)

    with pytest.raises(StructureNotInFileError, match="aorta.*liver, spleen"):
        read_binary_masks(files, ["aorta"])

    files["aorta"] = _nifti(tmp_path / "aorta.nii.gz", liver, affine=np.diag([2.0, 1, 1, 1]))
    with pytest.raises(InputFileError, match="aorta.nii.gz.*geometry differs"):
        read_binary_masks(files, ["liver", "aorta"])


def test_check_same_geometry() -> None:
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    a = Volume(np.zeros((4, 5, 6), np.float32), affine, "ct.nii.gz")
    check_same_geometry(a, Volume(np.zeros((2, 4, 5, 6), np.uint8), affine + 1e-5, "seg.nii.gz"))
    with pytest.raises(InputFileError, match="seg.nii.gz: shape .* ct.nii.gz"):
        check_same_geometry(a, Volume(np.zeros((4, 5, 7), np.uint8), affine, "seg.nii.gz"))
    shifted = affine.copy()
    shifted[0, 3] = 0.01
    with pytest.raises(InputFileError, match="seg.nii.gz: geometry differs from ct.nii.gz"):
        check_same_geometry(a, Volume(np.zeros((4, 5, 6), np.uint8), shifted, "seg.nii.gz"))


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_errors_naming_the_path(tmp_path: Path) -> None:
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp_path / "nope.nii.gz", "no such file")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti header" * 10))
    cases["corrupt"] = (corrupt, "cannot read")
    truncated = tmp_path / "truncated.nii.gz"
    full = gzip.compress(nib.Nifti1Image(np.zeros((20, 20, 20), np.int16), np.eye(4)).to_bytes())
    truncated.write_bytes(full[: len(full) // 2])
    cases["truncated"] = (truncated, "cannot read")
    cases["2d"] = (_nifti(tmp_path / "slice.nii.gz", np.zeros((4, 4), np.int16)), "2D")
    cases["4d"] = (_nifti(tmp_path / "series.nii.gz", np.zeros((4, 4, 4, 3), np.int16)), "3 volumes")
    nan = np.zeros((3, 3, 3), np.float32)
    nan[1, 1, 1] = np.nan
    cases["nan"] = (_nifti(tmp_path / "nan.nii.gz", nan), "NaN")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    cases["suffix"] = (tmp_path / "scan.png", "unsupported file type")
    bad_mha = tmp_path / "bad.mha"
    bad_mha.write_text("ObjectType = Image\nNDims = 3\n")
    cases["bad_mha"] = (bad_mha, "cannot read")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    cases["empty"] = (empty, "empty folder")
    not_dicom = tmp_path / "not_dicom"
    not_dicom.mkdir()
    (not_dicom / "notes.txt").write_text("hello")
    cases["no_series"] = (not_dicom, "no DICOM series")

    for what, (path, problem) in cases.items():
        with pytest.raises(InputFileError) as info:
            read_image(path)
        assert str(path) in str(info.value), what
        assert problem in str(info.value), (what, str(info.value))


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize(
    "image,label", [("example_ct_dicom", "example_seg_dicom.nii.gz"), ("example_ct_sm.nii.gz", "example_seg.nii.gz")]
)
def test_write_mask_in_the_source_geometry(totalseg_examples: Path, tmp_path: Path, image: str, label: str) -> None:
    ct = read_image(totalseg_examples / image)
    seg = read_labels(totalseg_examples / label)
    out = write_mask(seg.array, ct, tmp_path / "pred" / "case.nii.gz", label_map={5: "liver", 1: "spleen"})

    back = nib.load(str(out))
    assert back.shape == ct.array.shape
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-4)
    np.testing.assert_allclose(back.get_qform(), ct.affine, atol=1e-4)
    assert int(back.header["sform_code"]) > 0 and int(back.header["qform_code"]) > 0
    np.testing.assert_array_equal(np.asarray(back.dataobj), seg.array)
    assert back.get_data_dtype() == np.uint8
    assert json.loads((tmp_path / "pred" / "case.json").read_text()) == {"1": "spleen", "5": "liver"}
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["case.ctbl", "case.json", "case.nii.gz"]  # no temp files


def test_label_map_gets_a_slicer_colour_table_beside_its_json(tmp_path: Path) -> None:
    from fseft.data.structures import structure_color

    ref = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), "ct.nii.gz")
    label_map = {2: "kidney_left", 1: "liver", 3: "a new structure"}
    write_mask(np.zeros((4, 4, 4), np.uint8), ref, tmp_path / "case.nii.gz", label_map=label_map)
    lines = (tmp_path / "case.ctbl").read_text().splitlines()
    assert lines[0].startswith("# Color table file") and lines[1] == "# 4 values"
    rows = [line.split() for line in lines[2:]]
    assert rows[0] == ["0", "background", "0", "0", "0", "0"]
    assert [(int(r[0]), r[1]) for r in rows[1:]] == [(1, "liver"), (2, "kidney_left"), (3, "a_new_structure")]
    for row in rows[1:]:
        assert len(row) == 6 and tuple(map(int, row[2:5])) == structure_color(label_map[int(row[0])]) and row[5] == "255"
    # colours are fixed per structure, whatever its label value in this map
    write_mask(np.zeros((4, 4, 4), np.uint8), ref, tmp_path / "other.nii.gz", label_map={1: "a new structure"})
    assert (tmp_path / "other.ctbl").read_text().splitlines()[3].split()[2:] == rows[3][2:]


def test_write_mask_rejects_wrong_shape_and_leaves_nothing(tmp_path: Path) -> None:
    ref = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), "ct.nii.gz")
    with pytest.raises(InputFileError, match="does not match the shape"):
        write_mask(np.zeros((4, 4, 3), np.uint8), ref, tmp_path / "m.nii.gz")
    with pytest.raises(InputFileError, match="NIfTI"):
        write_mask(np.zeros((4, 4, 4), np.uint8), ref, tmp_path / "m.png")
    assert list(tmp_path.iterdir()) == []


def test_geometry_message_says_how_far_voxels_move_or_that_only_the_voxel_order_differs() -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    shape = (100, 80, 40)
    a = Volume(np.zeros(shape, np.float32), affine, "ct.nii.gz")
    # the same grid with the first axis reversed (LPS vs RAS storage of one series): nothing moves
    flipped_order = affine.copy()
    flipped_order[0, 0], flipped_order[0, 3] = -1.0, 99.0
    with pytest.raises(InputFileError, match="same physical grid as ct.nii.gz in another voxel order"):
        check_same_geometry(a, Volume(np.zeros(shape, np.uint8), flipped_order, "seg.nii.gz"))
    # the same grid with axes 0 and 1 swapped (another shape, same voxels)
    swapped = np.array([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    with pytest.raises(InputFileError, match="another voxel order"):
        check_same_geometry(a, Volume(np.zeros((80, 100, 40), np.uint8), swapped, "seg.nii.gz"))
    # a real mirror image about x = 0: voxel 99 goes from +99 to -99 mm, reported as that distance
    mirrored = affine.copy()
    mirrored[0, 0] = -1.0
    with pytest.raises(InputFileError, match=r"up to 198 mm apart"):
        check_same_geometry(a, Volume(np.zeros(shape, np.uint8), mirrored, "seg.nii.gz"))
    shifted = affine.copy()
    shifted[2, 3] = 3.0
    with pytest.raises(InputFileError, match=r"up to 3 mm apart"):
        check_same_geometry(a, Volume(np.zeros(shape, np.uint8), shifted, "seg.nii.gz"))


def test_labels_in_another_voxel_order_are_reoriented_losslessly_and_others_refused(caplog) -> None:
    import logging

    from fseft.data.volume import align_to_grid

    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.5, 2.0, 1.0])
    affine[:3, 3] = (10.0, -20.0, 5.0)
    truth = (rng.random((2, 6, 5, 4)) > 0.5).astype(np.uint8)  # (S, X, Y, Z) on the image's grid
    image = Volume(np.zeros((6, 5, 4), np.float32), affine, "ct.nii.gz")
    # the same voxels stored with axes (Y, X, Z) and Y reversed: index (i, j, k) -> (j', i, k)
    stored = np.flip(np.transpose(truth, (0, 2, 1, 3)), axis=1)
    reordered = np.zeros((4, 4))
    reordered[:, 0] = -affine[:, 1]
    reordered[:, 1] = affine[:, 0]
    reordered[:, 2] = affine[:, 2]
    reordered[:, 3] = affine[:, 3] + affine[:, 1] * 4  # voxel j'=0 is the image's last row y=4
    reordered[3] = (0, 0, 0, 1)
    with caplog.at_level(logging.WARNING):
        aligned = align_to_grid(image, Volume(stored, reordered, "seg.nii.gz"))
    np.testing.assert_array_equal(aligned.array, truth)
    np.testing.assert_allclose(aligned.affine, affine, atol=1e-9)
    assert "seg.nii.gz" in caplog.text and "reoriented to it losslessly" in caplog.text
    # a label on the image's own grid comes back as it is, silently
    caplog.clear()
    same = Volume(truth, affine, "seg.nii.gz")
    assert align_to_grid(image, same) is same and caplog.text == ""
    # a real move is still an error naming the file
    mirrored = affine.copy()
    mirrored[0, 0] = -1.0
    with pytest.raises(InputFileError, match="seg.nii.gz: geometry differs"):
        align_to_grid(image, Volume(truth, mirrored, "seg.nii.gz"))


def test_scans_that_do_not_look_like_hounsfield_units_are_warned_about(tmp_path: Path, caplog) -> None:
    import logging

    rng = np.random.default_rng(0)
    ct = rng.normal(40, 30, (24, 24, 24)).astype(np.float32)
    ct[:, :4] = -1000.0  # air around the body
    with caplog.at_level(logging.WARNING):
        read_image(_nifti(tmp_path / "ok.nii.gz", ct))
        read_image(_nifti(tmp_path / "offset.nii.gz", ct + 1024))
        read_image(_nifti(tmp_path / "zeros.nii.gz", np.zeros((8, 8, 8), np.float32)))
    assert "ok.nii.gz" not in caplog.text
    assert "offset.nii.gz: no air" in caplog.text and "HU = stored - 1024" in caplog.text
    assert "zeros.nii.gz: every voxel is 0" in caplog.text


def test_a_full_disk_never_leaves_a_mask_without_its_label_map(tmp_path: Path, monkeypatch) -> None:
    import errno

    import fseft.data.io as io

    ref = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), "ct.nii.gz")

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "write_json", full)
    with pytest.raises(OSError, match="No space left") as info:
        write_mask(np.ones((4, 4, 4), np.uint8), ref, tmp_path / "case.nii.gz", label_map={1: "liver"})
    assert info.value.filename == str(tmp_path / "case.nii.gz")  # the file asked for, not a temp name
    assert list(tmp_path.iterdir()) == []


def test_dicom_series_with_a_missing_slice_is_refused_and_series_id_picks_one_of_several(tmp_path: Path) -> None:
    from dicom_series import write_dicom_series

    from fseft.data.dicom_series import dicom_series_files

    hu = np.full((6, 10, 8), -1000.0)
    hu[2:4, 3:7, 2:6] = 40.0
    folder = tmp_path / "two"
    write_dicom_series(folder, hu, "1.2.826.0.1.3680043.9.10", prefix="a")
    write_dicom_series(folder, hu + 100, "1.2.826.0.1.3680043.9.11", prefix="b")
    with pytest.raises(InputFileError, match="holds 2 DICOM series.*--series-id"):
        read_image(folder)
    chosen = read_image(folder, series_id="1.2.826.0.1.3680043.9.11")
    assert chosen.spatial_shape == (8, 10, 6) and chosen.array.max() == pytest.approx(140.0)
    assert chosen.spacing == pytest.approx((1.0, 1.0, 2.0))
    gap = tmp_path / "gap"
    write_dicom_series(gap, hu, "1.2.826.0.1.3680043.9.12", skip=(2,))
    with pytest.raises(InputFileError, match=r"gap of 4.00 mm .*2.00 mm.*slice001.dcm and slice003.dcm"):
        dicom_series_files(gap)
