"""fseft as a DICOMweb client, against a real PACS (Orthanc + its DICOMweb plugin, started per
module by `orthanc_server.running_orthanc`): predict from a study URL and store the SEG and its
TID 1500 report back, errors a hospital meets (wrong port, 401, missing study, a series that is
not CT), and the parts that need no server (URL parsing, credentials)."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_series import write_volume_series
from fseft.cli import main
from fseft.data.dicomweb import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    auth_headers,
    parse_study_url,
    service_root,
)
from fseft.errors import ConfigError
from orthanc_server import running_orthanc, upload

highdicom = pytest.importorskip("highdicom")
pytest.importorskip("dicomweb_client")


@pytest.fixture(autouse=True)
def _no_credentials(monkeypatch):
    for name in (TOKEN_ENV, USER_ENV, PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def _client(server):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(server.root)


# ------------------------------------------------------------------------- no server


def test_study_urls_parse_into_root_study_and_series():
    ref = parse_study_url("https://pacs.example.org:8443/orthanc/dicom-web/studies/1.2.3/series/4.5.6/")
    assert (ref.root, ref.study, ref.series) == ("https://pacs.example.org:8443/orthanc/dicom-web", "1.2.3", "4.5.6")
    assert parse_study_url("http://h/dicom-web/studies/1.2").series is None
    assert service_root("http://h/dicom-web/studies/1.2") == service_root("http://h/dicom-web/") == "http://h/dicom-web"
    with pytest.raises(ConfigError, match="expected a DICOMweb study URL"):
        parse_study_url("http://h/dicom-web/series/1.2")
    with pytest.raises(ConfigError, match="FSEFT_DICOMWEB_TOKEN") as info:
        parse_study_url("https://alice:s3cret@h/dicom-web/studies/1.2")
    assert "s3cret" not in str(info.value)  # the message never repeats a password


def test_credentials_come_from_the_environment(monkeypatch):
    assert auth_headers() == {}
    monkeypatch.setenv(USER_ENV, "alice")
    with pytest.raises(ConfigError, match=PASSWORD_ENV):
        auth_headers()
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    assert auth_headers() == {"Authorization": "Basic YWxpY2U6czNjcmV0"}  # base64 of alice:s3cret
    monkeypatch.setenv(TOKEN_ENV, "tok")
    assert auth_headers() == {"Authorization": "Bearer tok"}  # the token wins


# ------------------------------------------------------------------------- series for the round trips


def _phantom_series(folder: Path, study_uid: str | None = None, case_index: int = 0) -> list[Path]:
    from fseft.data.phantom import generate_case

    case = generate_case(domain="target", seed=5, case_index=case_index)
    return write_volume_series(folder, case.image.array, case.image.affine, study_uid=study_uid)


def _real_series(src: Path, dst: Path) -> list[Path]:
    """The real example series with the UIDs a PACS export has (the shared copy is anonymised
    down to empty UIDs)."""
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for path in sorted(src.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName = "FSEFT-REAL-1", "Example^CT"
        ds.save_as(dst / path.name)
        files.append(dst / path.name)
    return files


def _frames(seg, uids):
    return seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["phantom", "real"])
def test_predict_from_a_study_url_and_store_seg_and_report(which, orthanc, totalseg_examples_or_none, tmp_path,
                                                           capsys, monkeypatch):
    """Upload a series, `fseft predict -i <study URL> --output-type dicom-seg --statistics --store`,
    read the SEG and SR back over WADO-RS: the SEG equals the file-based SEG of the same series
    frame by frame, the report's volumes and mean HU equal statistics.json, and the retrieved
    instances are gone."""
    if which == "real" and totalseg_examples_or_none is None:
        pytest.skip("real CT examples not found beside the checkout")
    series = tmp_path / "series"
    files = (_phantom_series(series) if which == "phantom"
             else _real_series(totalseg_examples_or_none / "example_ct_dicom", series))
    upload(orthanc, files)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    study, series_uid = str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID)
    uids = [str(h.SOPInstanceUID) for h in headers]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the retrieved series goes

    common = ["--model", "phantom", "--output-type", "dicom-seg", "--statistics", "--no-progress"]
    if which == "real":  # few, large windows: the series (167 x 167 x 13 voxels at the model's 3 mm) in 4
        common += ["--roi-size", "96", "96", "32", "--overlap", "0"]
    assert main(["predict", "-i", orthanc.study_url(study), "-o", str(tmp_path / "pacs"), *common,
                 "--store", orthanc.root]) == 0
    out = capsys.readouterr().out
    assert [p for p in scratch.iterdir() if p.name.startswith("fseft-")] == []  # the retrieved instances: removed
    assert main(["predict", "-i", str(series), "-o", str(tmp_path / "local"), *common]) == 0

    seg_file = tmp_path / "pacs" / f"{series_uid}.dcm"  # case id: the retrieved series' UID
    seg_uid = str(pydicom.dcmread(seg_file, stop_before_pixels=True).SOPInstanceUID)
    sr_uid = str(pydicom.dcmread(tmp_path / "pacs" / f"{series_uid}_sr.dcm", stop_before_pixels=True).SOPInstanceUID)
    assert f"SOP Instance UID {seg_uid}" in out and f"SOP Instance UID {sr_uid}" in out

    client = _client(orthanc)
    by_modality = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0] for s in client.search_for_series(study)}
    assert set(by_modality) == {"CT", "SEG", "SR"} and by_modality["CT"] == series_uid
    stored_seg = client.retrieve_instance(study, by_modality["SEG"], seg_uid)
    stored = highdicom.seg.Segmentation.from_dataset(stored_seg)
    local = highdicom.seg.segread(tmp_path / "local" / "series.dcm")
    assert str(stored.ReferencedSeriesSequence[0].SeriesInstanceUID) == series_uid
    assert [s.SegmentLabel for s in stored.SegmentSequence] == [s.SegmentLabel for s in local.SegmentSequence]
    pacs_frames, local_frames = _frames(stored, uids), _frames(local, uids)
    assert pacs_frames.shape == (len(uids), headers[0].Rows, headers[0].Columns)
    for uid, a, b in zip(uids, pacs_frames, local_frames):
        np.testing.assert_array_equal(a, b, err_msg=uid)
    assert pacs_frames.any()  # not two empty SEGs (on the real scan: the embedded model's false positives)

    from fseft.data.dicom_sr import read_measurement_report

    stats = json.loads((tmp_path / "pacs" / "statistics.json").read_text())[series_uid]
    assert stats == json.loads((tmp_path / "local" / "statistics.json").read_text())["series"]
    report = read_measurement_report(client.retrieve_instance(study, by_modality["SR"], sr_uid))
    assert list(report) == list(stats)
    for name, values in stats.items():
        assert report[name]["seg_uid"] == seg_uid
        assert report[name]["segment_number"] == list(stats).index(name) + 1
        assert report[name]["volume_ml"] == pytest.approx(values["volume_ml"], rel=1e-9, abs=1e-9)
        if values["hu_mean"] is None:
            assert "hu_mean" not in report[name]
        else:
            assert report[name]["hu_mean"] == pytest.approx(values["hu_mean"], rel=1e-9)


@pytest.fixture
def totalseg_examples_or_none():
    from conftest import SHARED_DATA

    return SHARED_DATA if (SHARED_DATA / "example_ct_dicom").is_dir() else None


# ------------------------------------------------------------------------- errors


def _predict(url, tmp_path, *extra):
    return main(["predict", "-i", url, "-o", str(tmp_path / "out"), "--model", "phantom", "--no-progress", *extra])


def test_unreachable_server_is_an_exit_2_naming_the_url(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/dicom-web/studies/1.2.3"
    assert _predict(url, tmp_path) == 2
    err = capsys.readouterr().err
    assert url in err and "cannot reach the DICOMweb server" in err
    assert not (tmp_path / "out").exists()


def test_missing_study_and_a_series_that_is_not_ct(orthanc, tmp_path, capsys):
    assert _predict(orthanc.study_url("1.2.826.0.1.3680043.8.498.1"), tmp_path) == 2
    assert "no such study on the server" in capsys.readouterr().err
    files = _phantom_series(tmp_path / "series", case_index=1)
    upload(orthanc, files)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    study = str(header.StudyInstanceUID)
    assert main(["predict", "-i", str(tmp_path / "series"), "-o", str(tmp_path / "seg"), "--model", "phantom",
                 "--output-type", "dicom-seg", "--store", orthanc.root, "--no-progress"]) == 0
    seg_series = [s["0020000E"]["Value"][0] for s in _client(orthanc).search_for_series(study)
                  if s["00080060"]["Value"][0] == "SEG"]
    assert len(seg_series) == 1
    assert _predict(f"{orthanc.study_url(study)}/series/{seg_series[0]}", tmp_path) == 2
    assert "a SEG series, not CT" in capsys.readouterr().err
    assert _predict(f"{orthanc.study_url(study)}/series/1.2.3.4", tmp_path) == 2
    err = capsys.readouterr().err
    assert "no series 1.2.3.4 in this study" in err and str(header.SeriesInstanceUID) in err
    # --store without a DICOM SEG to store, refused before any work
    assert main(["predict", "-i", str(tmp_path / "series"), "-o", str(tmp_path / "x"), "--model", "phantom",
                 "--store", orthanc.root]) == 2
    assert "add --output-type dicom-seg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_a_server_with_authentication_answers_401_without_credentials(tmp_path, capsys, monkeypatch, caplog):
    from fseft.data.dicomweb import check_server

    with running_orthanc(tmp_path / "orthanc", user="alice", password="s3cret") as server:
        assert _predict(server.study_url("1.2.3"), tmp_path) == 2
        err = capsys.readouterr().err
        assert "not authorised (401)" in err and USER_ENV in err
        monkeypatch.setenv(USER_ENV, "alice")
        monkeypatch.setenv(PASSWORD_ENV, "wrong")
        assert _predict(server.study_url("1.2.3"), tmp_path) == 2
        err = capsys.readouterr().err
        assert "refused" in err and "wrong" not in err
        monkeypatch.setenv(PASSWORD_ENV, "s3cret")
        check_server(server.root)  # accepted
        # a bearer token (which Orthanc does not take) is sent but never logged, even at debug level
        monkeypatch.setenv(TOKEN_ENV, "tok-9f2c-secret")
        with caplog.at_level(logging.DEBUG):
            assert _predict(server.study_url("1.2.3"), tmp_path) == 2
        err = capsys.readouterr().err
        assert "not authorised (401)" in err and "the credentials in FSEFT_DICOMWEB_TOKEN were refused" in err
        assert "GET" in caplog.text and "tok-9f2c-secret" not in caplog.text + err
        monkeypatch.delenv(TOKEN_ENV)
        assert _predict(server.study_url("1.2.3"), tmp_path) == 2
        assert "no such study" in capsys.readouterr().err  # past the authentication


def test_a_failed_store_keeps_the_local_outputs_and_says_so(orthanc, tmp_path, capsys, monkeypatch):
    from fseft.data import dicomweb

    files = _phantom_series(tmp_path / "series", case_index=2)
    upload(orthanc, files)

    def refused(url, datasets):
        raise dicomweb.StoreError(f"{url}: the server answered HTTP 409 while storing (STOW-RS)")

    monkeypatch.setattr(dicomweb, "store_instances", refused)
    assert main(["predict", "-i", str(tmp_path / "series"), "-o", str(tmp_path / "out"), "--model", "phantom",
                 "--output-type", "dicom-seg", "--statistics", "--store", orthanc.root, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "nothing was stored" in err and "the local outputs remain in place" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["series.dcm", "series_sr.dcm", "statistics.json"]
    assert str(tmp_path / "out" / "series.dcm") in err
