"""DICOM SEG writing: frames aligned with each source slice by position, references, codes."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_series import write_ct_series
from fseft.data.dicom_seg import (
    FALLBACK_CODES,
    SEGMENT_CODES,
    read_source_headers,
    segment_codes,
    write_dicom_seg,
)
from fseft.data.io import read_image
from fseft.data.structures import structure_color
from fseft.errors import InputFileError

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _hu_slices(n_slices=6, rows=20, columns=24):
    """Air, a 0 HU body and a 200 HU box whose extent changes from slice to slice and is
    asymmetric along rows and columns, so that a slice out of order, a flipped row or column
    axis would all move pixels."""
    hu = np.full((n_slices, rows, columns), -1000, np.int16)
    hu[:, 2:rows - 2, 2:columns - 2] = 0
    for k in range(1, n_slices - 1):
        hu[k, 4:4 + 2 * k, 5:9 + k] = 200
    return hu


def _expected_labels(hu: np.ndarray) -> np.ndarray:
    """The rule the tests label with: 1 where HU > 100, 2 in the body (-50..50 HU), else 0."""
    return np.where(hu > 100, 1, np.where((hu > -50) & (hu < 50), 2, 0))


def _frames_by_uid(seg, uids):
    """SEG pixels per referenced source instance: ``{uid: (rows, columns)}`` segment numbers."""
    pixels = seg.get_pixels_by_source_instance(list(uids), combine_segments=True,
                                              assert_missing_frames_are_empty=True)
    return dict(zip(uids, pixels))


@pytest.mark.parametrize("orientation", [AXIAL, CORONAL], ids=["axial", "coronal"])
def test_seg_frames_match_each_source_slice_whatever_the_file_order(orientation, tmp_path):
    hu = _hu_slices()
    files = write_ct_series(tmp_path / "series", hu, orientation=orientation, file_order=[3, 0, 5, 1, 4, 2])
    volume = read_image(tmp_path / "series")  # fseft's voxel order: sorted, rows flipped
    labels = _expected_labels(volume.array).astype(np.uint8)
    out = write_dicom_seg(labels, volume, {1: "kidney_left", 2: "body wall"}, tmp_path / "series",
                          tmp_path / "out" / "seg.dcm")
    assert out == tmp_path / "out" / "seg.dcm"
    assert [p.name for p in out.parent.iterdir()] == ["seg.dcm"]  # no temporary file left

    seg = hd.seg.segread(out)
    sources = [pydicom.dcmread(f) for f in files]
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    frames = _frames_by_uid(seg, uids)
    for ds in sources:  # each frame against the labelling rule applied to its own source file's pixels
        own_hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(frames[str(ds.SOPInstanceUID)], _expected_labels(own_hu),
                                      err_msg=f"frame of {Path(ds.filename).name}")

    referenced = {str(item.ReferencedSOPInstanceUID) for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY" and seg.PatientID == "FSEFT-1"


def test_segments_carry_name_snomed_codes_algorithm_and_colour(tmp_path):
    write_ct_series(tmp_path / "series", _hu_slices())
    volume = read_image(tmp_path / "series")
    labels = _expected_labels(volume.array).astype(np.uint8)
    labels[labels == 2] = 3  # a third, empty structure
    names = {1: "liver", 2: "pancreas", 3: "kidney_right", 4: "a new structure"}
    labels[labels == 1] = 1
    write_dicom_seg(labels, volume, names, tmp_path / "series", tmp_path / "seg.dcm")
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert {n: str(s.SegmentLabel) for n, s in segments.items()} == names  # every structure, empty ones too

    def code(item):
        return str(item.CodingSchemeDesignator), str(item.CodeValue)

    liver, pancreas, kidney, novel = (segments[n] for n in (1, 2, 3, 4))
    assert code(liver.SegmentedPropertyTypeCodeSequence[0]) == ("SCT", "10200004")
    assert code(liver.SegmentedPropertyCategoryCodeSequence[0]) == ("SCT", "91723000")  # Anatomical Structure
    assert code(pancreas.SegmentedPropertyTypeCodeSequence[0]) == ("SCT", "15776009")
    kidney_type = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert code(kidney_type) == ("SCT", "64033007")
    assert code(kidney_type.SegmentedPropertyTypeModifierCodeSequence[0]) == ("SCT", "24028007")  # Right
    assert code(novel.SegmentedPropertyTypeCodeSequence[0]) == ("SCT", "91723000")  # the documented fallback
    assert liver.SegmentAlgorithmType == "AUTOMATIC" and liver.SegmentAlgorithmName == "fseft"
    assert liver.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "fseft"
    rgb = hd.color.CIELabColor.from_dicom_value(tuple(liver.RecommendedDisplayCIELabValue)).to_rgb()
    assert np.abs(np.asarray(rgb, int) - structure_color("liver")).max() <= 2
    # frames only where a segment has pixels: none for the empty pancreas
    frame_segments = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                      for f in seg.PerFrameFunctionalGroupsSequence}
    assert frame_segments == {1, 3}


def test_every_catalogue_code_resolves_in_pydicom():
    known = {"liver": "10200004", "spleen": "78961009", "kidney_left": "64033007", "pancreas": "15776009",
             "gallbladder": "28231008", "aorta": "15825003", "inferior_vena_cava": "64131007", "stomach": "69695003"}
    for name, value in known.items():
        assert segment_codes(name).resolve()["type"].value == value, name
    assert segment_codes("lKid").resolve()["modifier"].meaning == "Left"
    for name, codes in SEGMENT_CODES.items():  # a misspelt pydicom keyword would raise here
        resolved = codes.resolve()
        assert resolved["category"].scheme_designator == "SCT" and resolved["type"].scheme_designator == "SCT", name
    assert segment_codes("prostate_or_uterus") == FALLBACK_CODES


def test_series_without_uids_is_refused_naming_the_file(tmp_path):
    files = write_ct_series(tmp_path / "series", _hu_slices(n_slices=3))
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = ""
    ds.save_as(files[1])
    with pytest.raises(InputFileError, match="SOPInstanceUID") as err:
        read_source_headers(tmp_path / "series")
    assert str(files[1]) in str(err.value)


def test_a_label_map_of_another_grid_is_refused(tmp_path):
    write_ct_series(tmp_path / "series", _hu_slices())
    volume = read_image(tmp_path / "series")
    shifted = type(volume)(volume.array, volume.affine.copy(), volume.source)
    shifted.affine[:3, 3] += 0.5 * volume.affine[:3, 0]  # half a voxel along X
    labels = np.ones(volume.array.shape, np.uint8)
    with pytest.raises(InputFileError, match="off the voxel centres"):
        write_dicom_seg(labels, shifted, {1: "liver"}, tmp_path / "series", tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def _with_uids(src: Path, dst: Path) -> None:
    """Copy of an anonymised series (empty UIDs) with study / series / frame / instance UIDs."""
    dst.mkdir()
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    for path in sorted(src.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.save_as(dst / path.name)


def test_real_series_seg_matches_its_nifti_label_on_every_slice(totalseg_examples, tmp_path):
    """The real DICOM example (anonymised: no UIDs, refused as it is) with UIDs added: a SEG of
    its reference label map, frame by frame against SimpleITK's nearest-neighbour resampling of
    that NIfTI onto each source file's own grid."""
    import json

    import SimpleITK as sitk

    from fseft.data.io import read_labels

    with pytest.raises(InputFileError, match="no SOPClassUID"):
        read_source_headers(totalseg_examples / "example_ct_dicom")
    series = tmp_path / "series"
    _with_uids(totalseg_examples / "example_ct_dicom", series)
    class_map = {int(k): v for k, v in json.loads((totalseg_examples / "total_class_map.json").read_text()).items()}
    wanted = ["liver", "spleen", "aorta", "vertebrae_T12"]
    value_of = {name: value for value, name in class_map.items()}
    reference = read_labels(totalseg_examples / "example_seg_dicom.nii.gz")
    labels = np.zeros(reference.array.shape, np.uint8)
    for i, name in enumerate(wanted):
        labels[reference.array == value_of[name]] = i + 1
    ct = read_image(series)
    write_dicom_seg(labels, ct, {i + 1: n for i, n in enumerate(wanted)}, series, tmp_path / "seg.dcm")

    nifti = sitk.ReadImage(str(totalseg_examples / "example_seg_dicom.nii.gz"))
    remap = np.zeros(int(max(class_map)) + 1, np.uint8)
    for i, name in enumerate(wanted):
        remap[value_of[name]] = i + 1
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    files = sorted(series.iterdir())
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    frames = _frames_by_uid(seg, uids)
    for path, uid in zip(files, uids):
        grid = sitk.ReadImage(str(path))  # one slice, with its own origin / direction / spacing
        resampled = sitk.Resample(nifti, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        expected = remap[sitk.GetArrayFromImage(resampled)[0]]  # (rows, columns)
        assert expected.any()
        np.testing.assert_array_equal(frames[uid], expected, err_msg=path.name)


def test_source_headers_of_the_chosen_series_in_a_folder_of_two(tmp_path):
    first = write_ct_series(tmp_path / "both", _hu_slices(n_slices=3))
    write_ct_series(tmp_path / "other", _hu_slices(n_slices=4))
    for path in (tmp_path / "other").iterdir():
        shutil.move(str(path), str(tmp_path / "both" / f"second_{path.name}"))
    with pytest.raises(InputFileError, match="holds 2 DICOM series"):
        read_source_headers(tmp_path / "both")
    series_uid = str(pydicom.dcmread(first[0], stop_before_pixels=True).SeriesInstanceUID)
    headers = read_source_headers(tmp_path / "both", series_uid)
    assert [Path(h.filename).name for h in headers] == [p.name for p in first]  # slice order, this series only
