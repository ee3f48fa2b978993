"""Benchmark: retrieve and segment N studies from a PACS in sequence, as a hospital batch would.

Per study: QIDO-RS + WADO-RS retrieval of its CT series to a temporary folder
(`fseft.data.dicomweb.retrieved_series`), segmentation into a DICOM SEG with statistics
(`predict_path`, the model loaded once beforehand), and the STOW-RS store of the SEG and its
TID 1500 report; the seconds of each step are printed per study, then the mean.

The studies are copies of the real DICOM example (``../shared/data/totalseg-examples/
example_ct_dicom``, 512 x 512 x 20, JPEG 2000; each copy a new study) uploaded first, or
synthetic phantom series where it is absent. By default a local Orthanc (Debian packages
``orthanc`` and ``orthanc-dicomweb``) is started on a free port with a temporary storage folder;
``--url`` uses a running DICOMweb service instead (credentials from the environment).

    python benchmarks/bench_pacs.py --studies 5                 # embedded phantom model, CPU
    python benchmarks/bench_pacs.py --studies 5 --model btcv --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg-examples" / "example_ct_dicom"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@contextlib.contextmanager
def local_orthanc(folder: Path) -> Iterator[str]:
    """A throw-away Orthanc with DICOMweb on a free loopback port; yields its DICOMweb root."""
    import requests

    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if binary is None or not Path(PLUGIN).exists():
        raise SystemExit("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb); "
                         "or give --url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {"StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"), "HttpPort": port,
              "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(150):
            try:
                requests.get(f"http://127.0.0.1:{port}/system", timeout=1)
                break
            except requests.exceptions.ConnectionError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def make_studies(n: int, folder: Path) -> list[list[Path]]:
    """N series, each in a study of its own: copies of the real example with new UIDs, else phantoms."""
    import pydicom
    from pydicom.uid import generate_uid

    studies = []
    for i in range(n):
        dst = folder / f"study{i}"
        dst.mkdir(parents=True)
        if EXAMPLE.is_dir():
            study, series, frame = generate_uid(), generate_uid(), generate_uid()
            for path in sorted(EXAMPLE.iterdir()):
                ds = pydicom.dcmread(path)
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
                ds.PatientID = f"BENCH-{i}"
                ds.save_as(dst / path.name)
        else:
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from dicom_series import write_volume_series

            from fseft.data.phantom import generate_case

            case = generate_case(domain="target", seed=11, case_index=i)
            write_volume_series(dst, case.image.array, case.image.affine, patient_id=f"BENCH-{i}")
        studies.append(sorted(dst.iterdir()))
    return studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--model", default="phantom", help="zoo id or model file (default: the embedded phantom model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--url", help="a running DICOMweb service root (default: start a local Orthanc)")
    parser.add_argument("--no-store", action="store_true", help="do not store the SEG and report back")
    args = parser.parse_args()

    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from fseft.data.dicomweb import retrieved_series, store_results
    from fseft.models.zoo import load_model
    from fseft.prediction.predict import predict_path
    from fseft.prediction.segment import InferenceConfig

    scratch = Path(tempfile.mkdtemp(prefix="fseft-bench-pacs-"))
    try:
        with (contextlib.nullcontext(args.url) if args.url else local_orthanc(scratch)) as root:
            studies = make_studies(args.studies, scratch / "export")
            client = DICOMwebClient(root)
            uids = []
            for files in studies:
                datasets = [pydicom.dcmread(str(f)) for f in files]
                client.store_instances(datasets)
                uids.append(str(datasets[0].StudyInstanceUID))
            model = load_model(args.model, device=args.device)
            cfg = InferenceConfig(device=args.device, progress=False)
            print(f"{len(uids)} studies of {len(studies[0])} instances on {root}; model {args.model} on {args.device}")
            print(f"{'study':>6} {'retrieve s':>11} {'segment s':>10} {'store s':>8}")
            rows = []
            for i, study in enumerate(uids):
                out = scratch / "out" / str(i)
                t0 = time.perf_counter()
                with retrieved_series(f"{root}/studies/{study}") as (folder, _):
                    t1 = time.perf_counter()
                    result = predict_path(folder, out, model, cfg=cfg, output_type="dicom-seg", statistics=True)
                    t2 = time.perf_counter()
                if not args.no_store:
                    store_results(root, result.outputs, result.statistics)
                t3 = time.perf_counter()
                rows.append((t1 - t0, t2 - t1, t3 - t2))
                print(f"{i:>6} {rows[-1][0]:>11.2f} {rows[-1][1]:>10.2f} {rows[-1][2]:>8.2f}")
            mean = [sum(r[j] for r in rows) / len(rows) for j in range(3)]
            print(f"{'mean':>6} {mean[0]:>11.2f} {mean[1]:>10.2f} {mean[2]:>8.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
