"""DICOM datasets (CT series + DICOM SEG annotations) as fseft cases: segments mapped to
structures by code or label, masks equal to the annotation on the CT grid, SEGs that do not
belong to their CT refused naming the object, and, against a real PACS (Orthanc), `fseft adapt`
on a list of study URLs scoring exactly as on the same cases in NIfTI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_series import write_volume_series
from fseft.cli import main
from fseft.data.datasets import open_dataset
from fseft.data.dicom_dataset import segment_structure
from fseft.errors import InputFileError

hd = pytest.importorskip("highdicom")

# phantom label value -> structure (fseft.data.structures.PHANTOM_CLASSES order)
STRUCTURES = {1: "liver", 2: "spleen", 4: "kidney_left"}


def _export_case(study: Path, case_index: int, seed: int = 7):
    """A phantom case exported as a PACS holds it: a CT series (``study/ct``) and a DICOM SEG of
    liver, spleen and left kidney (``study/seg.dcm``). Returns (CT volume, {structure: mask})
    with the masks on the CT grid as `read_image` reads it."""
    from fseft.data.dicom_seg import write_dicom_seg
    from fseft.data.io import read_image
    from fseft.data.volume import align_to_grid
    from fseft.data.phantom import generate_case

    case = generate_case(domain="target", seed=seed, case_index=case_index)
    # a geometry on a 1/64 mm grid: exact in DICOM's decimal strings and in NIfTI's float32
    # affine alike, so that the NIfTI copy of a case is the very same scan
    affine = np.round(np.asarray(case.image.affine) * 64) / 64
    write_volume_series(study / "ct", case.image.array, affine)
    ct = read_image(study / "ct")
    labels = align_to_grid(ct, type(case.labels)(case.labels.array, affine, case.labels.source)).array
    label_map = {i + 1: name for i, name in enumerate(STRUCTURES.values())}
    merged = np.zeros(labels.shape, np.uint8)
    for i, value in enumerate(STRUCTURES):
        merged[labels == value] = i + 1
    write_dicom_seg(merged, ct, label_map, study / "ct", study / "seg.dcm")
    return ct, {name: (merged == i + 1).astype(np.uint8) for i, name in enumerate(STRUCTURES.values())}


def _segment(label: str, type_: str, modifier: str | None = None, region: str | None = None):
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    def item(code):
        ds = Dataset()
        ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = code.value, code.scheme_designator, code.meaning
        return ds

    segment = Dataset()
    segment.SegmentNumber, segment.SegmentLabel = 3, label
    prop = item(getattr(codes.SCT, type_))
    if modifier:
        prop.SegmentedPropertyTypeModifierCodeSequence = [item(getattr(codes.SCT, modifier))]
    segment.SegmentedPropertyTypeCodeSequence = [prop]
    if region:
        segment.AnatomicRegionSequence = [item(getattr(codes.SCT, region))]
    return segment


def test_segments_map_to_structures_by_code_with_laterality_else_by_label():
    assert segment_structure(_segment("Segment_1", "Kidney", "Left"), "x") == "kidney_left"  # code beats label
    assert segment_structure(_segment("whatever", "Kidney", "Right"), "x") == "kidney_right"
    assert segment_structure(_segment("Spleen", "Spleen"), "x") == "spleen"
    # a code two structures share is settled by the label
    assert segment_structure(_segment("hepatic vessel tumor", "Neoplasm", region="Liver"), "x") == "hepatic_vessel_tumor"
    assert segment_structure(_segment("Liver Tumor", "Neoplasm", region="Liver"), "x") == "liver_tumor"
    with pytest.raises(InputFileError, match="fits liver_tumor, hepatic_vessel_tumor"):
        segment_structure(_segment("lesion 1", "Neoplasm", region="Liver"), "x")
    # a kidney without laterality, or a generic code: by the label, through the catalogue
    assert segment_structure(_segment("kidney_right", "Kidney"), "x") == "kidney_right"
    assert segment_structure(_segment("Gallbladder", "AnatomicalStructure"), "x") == "gallbladder"
    with pytest.raises(InputFileError, match=r"seg\.dcm: segment 3 label 'Lievr' .*did you mean 'liver'"):
        segment_structure(_segment("Lievr", "AnatomicalStructure"), "seg.dcm")


def test_a_folder_of_studies_gives_the_annotated_masks_on_the_ct_grid(tmp_path):
    expected = {f"patient{i}": _export_case(tmp_path / "data" / f"patient{i}", i) for i in range(2)}
    (tmp_path / "data" / "patient1" / "README.txt").write_text("not DICOM: ignored")
    # patient1 exported flat: the SEG among the CT's files
    (tmp_path / "data" / "patient1" / "seg.dcm").rename(tmp_path / "data" / "patient1" / "ct" / "seg.dcm")
    dataset = open_dataset(tmp_path / "data")
    assert dataset.layout == "dicom" and dataset.name == "data"
    assert [c.case_id for c in dataset.cases] == ["patient0", "patient1"]
    assert dataset.cases[0].image == tmp_path / "data" / "patient0" / "ct"  # a series alone: read in place
    assert dataset.cases[1].image != tmp_path / "data" / "patient1" / "ct"  # with the SEG: its CT files linked apart
    assert dataset.structures == tuple(STRUCTURES.values())
    for case in dataset.cases:
        ct, masks = expected[case.case_id]
        image, labels = case.load()
        np.testing.assert_array_equal(image.array, ct.array)
        np.testing.assert_allclose(image.affine, ct.affine)
        for i, name in enumerate(STRUCTURES.values()):
            assert masks[name].any()
            np.testing.assert_array_equal(labels.array[i], masks[name], err_msg=f"{case.case_id} {name}")
    assert main(["datasets", "inspect", str(tmp_path / "data"), "--check", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 0


def test_a_seg_of_another_series_or_off_the_slices_is_refused_naming_it(tmp_path):
    _export_case(tmp_path / "a" / "p0", 0)
    _export_case(tmp_path / "b" / "p1", 1)
    # a SEG made on another patient's series, filed with this one
    shutil.copy(tmp_path / "b" / "p1" / "seg.dcm", tmp_path / "a" / "p0" / "seg_p1.dcm")
    with pytest.raises(InputFileError, match=r"seg_p1\.dcm references series .* not a CT series of this study"):
        open_dataset(tmp_path / "a")
    (tmp_path / "a" / "p0" / "seg_p1.dcm").unlink()
    # a frame moved 5 mm off its slice, the reference to the slice removed
    seg = pydicom.dcmread(tmp_path / "a" / "p0" / "seg.dcm")
    frame = seg.PerFrameFunctionalGroupsSequence[3]
    del frame.DerivationImageSequence
    position = frame.PlanePositionSequence[0]
    position.ImagePositionPatient = [float(v) + 5.0 for v in position.ImagePositionPatient]
    seg.save_as(tmp_path / "a" / "p0" / "seg.dcm")
    with pytest.raises(InputFileError, match=r"seg\.dcm: frame 4 at position .* lies on no slice of the CT series"):
        open_dataset(tmp_path / "a")


# ------------------------------------------------------------------------- against a PACS


@pytest.mark.slow
def test_adapt_on_pacs_studies_scores_as_the_same_cases_in_nifti(tmp_path, capsys):
    """Three phantom cases, each a CT series + SEG stored in Orthanc; `fseft adapt --data
    <study list>` gives the same per-query Dice as on the same cases written as an nnU-Net
    NIfTI dataset; `fseft datasets inspect` on the list counts the same voxels."""
    from fseft.data.io import write_image, write_mask
    from orthanc_server import running_orthanc, upload

    nnunet = tmp_path / "nifti"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    names = list(STRUCTURES.values())
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"background": 0, **{n: i + 1 for i, n in enumerate(names)}},
                                                     "file_ending": ".nii.gz", "channel_names": {"0": "CT"}}))
    with running_orthanc(tmp_path / "orthanc") as server:
        urls = []
        for i in range(3):
            study = tmp_path / "export" / f"case{i}"
            ct, masks = _export_case(study, i)
            files = sorted((study / "ct").iterdir()) + [study / "seg.dcm"]
            upload(server, files)
            uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            urls.append(server.study_url(uid))
            # the same case in NIfTI, named as its study will be (the case id of a PACS study is its UID)
            write_image(ct, nnunet / "imagesTr" / f"{uid}_0000.nii.gz")
            merged = np.zeros(ct.spatial_shape, np.uint8)
            for j, name in enumerate(names):
                merged[masks[name] > 0] = j + 1
            write_mask(merged, ct, nnunet / "labelsTr" / f"{uid}.nii.gz")
        study_list = tmp_path / "studies.txt"
        study_list.write_text("# annotated in OHIF\n" + "\n".join(urls) + "\n")

        # the embedded model (trained on phantoms): a linear probe on its features segments these cases
        common = ["--model", "phantom", "--structures", "liver,kidney_left", "--k", "1", "--seed", "1",
                  "--method", "lp", "--epochs", "3", "--patch-size", "32", "32", "32", "--patches-per-volume", "2",
                  "--no-progress"]
        assert main(["adapt", "--data", str(study_list), "--out", str(tmp_path / "run_pacs"),
                     "--cache-dir", str(tmp_path / "cache_pacs"), *common]) == 0
        assert main(["datasets", "inspect", str(study_list), "--cases", "--json", str(tmp_path / "pacs.json"),
                     "--no-progress", "--cache-dir", str(tmp_path / "cache_pacs")]) == 0
    assert main(["adapt", "--data", str(nnunet), "--out", str(tmp_path / "run_nifti"),
                 "--cache-dir", str(tmp_path / "cache_nifti"), *common]) == 0
    assert main(["datasets", "inspect", str(nnunet), "--json", str(tmp_path / "nifti.json"), "--no-progress",
                 "--cache-dir", str(tmp_path / "cache_nifti")]) == 0
    pacs = json.loads((tmp_path / "run_pacs" / "metrics.json").read_text())
    nifti = json.loads((tmp_path / "run_nifti" / "metrics.json").read_text())
    assert sorted(pacs["queries"]) == sorted(nifti["queries"]) and len(pacs["queries"]) == 2
    assert max(v["liver"]["dice"] for v in nifti["queries"].values()) > 0.1  # not two empty predictions
    for case_id, scores in nifti["queries"].items():
        for name in ("liver", "kidney_left"):
            assert pacs["queries"][case_id][name]["dice"] == scores[name]["dice"]
    assert json.loads((tmp_path / "pacs.json").read_text())["voxel_counts"] == \
        json.loads((tmp_path / "nifti.json").read_text())["voxel_counts"]


def test_a_seg_filed_in_another_study_on_the_pacs_is_refused_before_training(tmp_path, capsys):
    """A SEG of patient 1's series stored under patient 0's study (a mislabelled export):
    `fseft datasets inspect` / `fseft adapt` on the study list stop with exit 2 naming it."""
    from orthanc_server import running_orthanc, upload

    _export_case(tmp_path / "p0", 0)
    _export_case(tmp_path / "p1", 1)
    study = str(pydicom.dcmread(sorted((tmp_path / "p0" / "ct").iterdir())[0], stop_before_pixels=True).StudyInstanceUID)
    wrong = pydicom.dcmread(tmp_path / "p1" / "seg.dcm")
    wrong.StudyInstanceUID = study
    wrong.save_as(tmp_path / "wrong.dcm")
    with running_orthanc(tmp_path / "orthanc") as server:
        upload(server, [*sorted((tmp_path / "p0" / "ct").iterdir()), tmp_path / "p0" / "seg.dcm"])
        (tmp_path / "ok.txt").write_text(server.study_url(study) + "\n")
        assert main(["datasets", "inspect", str(tmp_path / "ok.txt"), "--no-progress",
                     "--cache-dir", str(tmp_path / "cache")]) == 0
        assert "liver" in capsys.readouterr().out
        upload(server, [tmp_path / "wrong.dcm"])
        assert main(["datasets", "inspect", str(tmp_path / "ok.txt"), "--no-progress",
                     "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert f"SEG {wrong.SOPInstanceUID} references series {wrong.ReferencedSeriesSequence[0].SeriesInstanceUID}" in err
    assert server.study_url(study) in err
