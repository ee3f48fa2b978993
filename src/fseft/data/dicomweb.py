"""A DICOMweb client for a PACS (Orthanc, dcm4chee, the cloud health-imaging services): find a
study's CT series (QIDO-RS), retrieve its instances (WADO-RS) and store results (STOW-RS), with
`dicomweb-client` (``pip install "fseft[dicomweb]"``).

URLs are the ones a viewer shows: ``https://host/dicom-web/studies/<StudyInstanceUID>`` with an
optional ``/series/<SeriesInstanceUID>``; the part before ``/studies/`` is the service root,
which is also what ``--store`` takes.

Security: credentials come only from the environment, never from the command line or a URL
(both end up in shell histories and process lists): `TOKEN_ENV` (an OAuth bearer token) or
`USER_ENV` + `PASSWORD_ENV` (HTTP basic). They are sent as headers and never logged. TLS
certificates are always verified; `CA_BUNDLE_ENV` names a CA bundle for a hospital's own
certificate authority. Server errors become `InputFileError` (exit 2) naming the URL and what
to do: unreachable server, 401 / 403, a missing study or series, a series that is not CT.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fseft.data.dicom_sr import write_measurement_report
from fseft.errors import ConfigError, InputFileError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset  # optional extra (dicomweb / dicom-seg)

DICOMWEB_EXTRA = "dicomweb"
TOKEN_ENV = "FSEFT_DICOMWEB_TOKEN"
USER_ENV = "FSEFT_DICOMWEB_USER"
PASSWORD_ENV = "FSEFT_DICOMWEB_PASSWORD"
CA_BUNDLE_ENV = "FSEFT_DICOMWEB_CA_BUNDLE"

# Seconds to wait for a connection / for each response chunk: a PACS that hangs is an error,
# not a run that never ends.
TIMEOUT_S = (10.0, 120.0)
RETRY_ATTEMPTS = 3

# DICOM UIDs: digits and dots (PS3.5 9.1).
_UID = r"[0-9.]+"
_STUDY_PATH = re.compile(rf"^(?P<root>.*?)/studies/(?P<study>{_UID})(?:/series/(?P<series>{_UID}))?/?$")

# QIDO-RS attribute keywords of a study's series.
_SERIES_FIELDS = ("Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
                  "NumberOfSeriesRelatedInstances")


@dataclass(frozen=True)
class DicomwebRef:
    """A study (and optionally one of its series) on a DICOMweb service.

    root: the service root, e.g. ``http://pacs:8042/dicom-web`` (no trailing slash).
    """

    root: str
    study: str
    series: str | None = None

    @property
    def url(self) -> str:
        tail = f"/series/{self.series}" if self.series else ""
        return f"{self.root}/studies/{self.study}{tail}"


def is_dicomweb_url(value: object) -> bool:
    """Whether `value` is an http(s) URL (as opposed to a file or folder path)."""
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def _check_root(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{url}: not a DICOMweb URL; expected http(s)://host[:port]/path")
    if parts.username or parts.password:
        raise ConfigError(
            f"{parts.scheme}://{parts.hostname}: credentials in a URL end up in shell histories and logs; "
            f"set {TOKEN_ENV} (bearer token) or {USER_ENV} and {PASSWORD_ENV} in the environment instead"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{url}: a DICOMweb URL takes no query string or fragment")
    return url.rstrip("/")


def parse_study_url(url: str) -> DicomwebRef:
    """``<root>/studies/<StudyUID>[/series/<SeriesUID>]`` -> `DicomwebRef`; `ConfigError` for
    anything else (naming the expected form)."""
    url = _check_root(url)
    match = _STUDY_PATH.match(url)
    if match is None or not urlsplit(match["root"]).hostname:
        raise ConfigError(f"{url}: expected a DICOMweb study URL, <root>/studies/<StudyInstanceUID>"
                          "[/series/<SeriesInstanceUID>], e.g. http://pacs:8042/dicom-web/studies/1.2.3")
    return DicomwebRef(match["root"], match["study"], match["series"])


def service_root(url: str) -> str:
    """The service root of a DICOMweb URL: `url` itself, or the part before ``/studies/``."""
    url = _check_root(url)
    match = _STUDY_PATH.match(url)
    return match["root"] if match else url


# ------------------------------------------------------------------------- the client


def require_dicomweb_client() -> Any:
    """The `dicomweb_client` module, or a `ConfigError` naming the extra that installs it."""
    try:
        import dicomweb_client  # optional extra: dicomweb
    except ImportError as exc:
        raise ConfigError(f'reading from or storing to a PACS needs dicomweb-client: pip install "fseft[{DICOMWEB_EXTRA}]" '
                          "(or pip install dicomweb-client)") from exc
    return dicomweb_client


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header from the environment: bearer `TOKEN_ENV`, else basic
    `USER_ENV` / `PASSWORD_ENV`, else none. One of the pair without the other is a `ConfigError`."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if (user is None) != (password is None):
        missing = PASSWORD_ENV if password is None else USER_ENV
        raise ConfigError(f"{USER_ENV} and {PASSWORD_ENV} go together: {missing} is not set")
    if user is None:
        return {}
    basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {basic}"}


def make_client(root: str) -> Any:
    """A `dicomweb_client.DICOMwebClient` for the service `root`, with the environment's
    credentials (`auth_headers`), TLS verification on (against `CA_BUNDLE_ENV` if set) and
    `TIMEOUT_S`."""
    require_dicomweb_client()
    import requests  # comes with the dicomweb extra (dicomweb-client)
    from dicomweb_client.api import DICOMwebClient  # optional extra: dicomweb

    root = _check_root(root)
    session = requests.Session()
    session.headers.update(auth_headers())  # a header, so the credentials never appear in a URL
    bundle = os.environ.get(CA_BUNDLE_ENV)
    if bundle:
        if not Path(bundle).is_file():
            raise ConfigError(f"{CA_BUNDLE_ENV}={bundle}: no such file (a PEM bundle of trusted certificate authorities)")
        session.verify = bundle
    else:
        session.verify = True
    client = DICOMwebClient(root, session=session, timeout=TIMEOUT_S)
    # dicomweb-client retries every failed request (connection refused included) 5 times with
    # 2-16 s back-off (30 s); 3 attempts 1-2 s apart still ride out a busy PACS (503, 429)
    client.set_http_retry_params(retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=500)
    return client


def _server_error(exc: Exception, url: str, what: str) -> InputFileError:
    """The `InputFileError` (exit 2) of a failed request to `url` while doing `what`."""
    import requests  # comes with the dicomweb extra

    if isinstance(exc, requests.exceptions.SSLError):
        return InputFileError(f"{url}: TLS certificate verification failed while {what} ({exc.__class__.__name__}); "
                              f"if the PACS uses a hospital certificate authority, set {CA_BUNDLE_ENV} to its PEM bundle")
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        host = urlsplit(url)
        return InputFileError(f"{url}: cannot reach the DICOMweb server {host.hostname}:{host.port or ''} while {what} "
                              f"({exc.__class__.__name__}); check the host, port and network")
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        have = TOKEN_ENV if os.environ.get(TOKEN_ENV) else (USER_ENV if os.environ.get(USER_ENV) else None)
        hint = (f"the credentials in {have} were refused" if have else
                f"no credentials were sent: set {TOKEN_ENV} (bearer token) or {USER_ENV} and {PASSWORD_ENV}")
        word = "not authorised (401)" if status == 401 else "forbidden (403)"
        return InputFileError(f"{url}: {word} while {what}; {hint}")
    if status == 404:
        return InputFileError(f"{url}: not found (404) while {what}; check the UIDs and the service root")
    if status is not None:
        return InputFileError(f"{url}: the server answered HTTP {status} while {what}")
    return InputFileError(f"{url}: {what} failed ({exc.__class__.__name__}: {exc})")


@contextlib.contextmanager
def _requests(url: str, what: str) -> Iterator[None]:
    """Turn the `requests` errors of the block into `InputFileError`s naming `url`."""
    import requests  # comes with the dicomweb extra

    try:
        yield
    except requests.exceptions.RequestException as exc:
        raise _server_error(exc, url, what) from None  # no chained traceback: it repeats the URL only


def _attribute(item: dict[str, Any], keyword: str) -> Any:
    """The first value of a QIDO-RS JSON attribute (by keyword), or None."""
    from pydicom.datadict import tag_for_keyword  # optional extra: dicomweb (pydicom comes with it)

    value = item.get(f"{tag_for_keyword(keyword):08X}", {}).get("Value")
    return value[0] if value else None


@dataclass(frozen=True)
class SeriesInfo:
    """What QIDO-RS says about one series of a study."""

    uid: str
    modality: str
    number: int | None
    description: str
    instances: int | None

    def describe(self) -> str:
        extra = ", ".join(s for s in (self.description and repr(self.description),
                                      self.instances is not None and f"{self.instances} instances") if s)
        return f"{self.uid} ({self.modality}{', ' + extra if extra else ''})"


def study_series(client: Any, ref: DicomwebRef) -> list[SeriesInfo]:
    """Every series of the study `ref` (QIDO-RS); an `InputFileError` when the study is not
    there (an empty answer, or 404)."""
    url = f"{ref.root}/studies/{ref.study}"
    with _requests(url, "searching the study's series (QIDO-RS)"):
        found = client.search_for_series(ref.study, fields=list(_SERIES_FIELDS), get_remaining=True)
    if not found:
        raise InputFileError(f"{url}: no such study on the server (QIDO-RS found no series)")
    series = []
    for item in found:
        number = _attribute(item, "SeriesNumber")
        instances = _attribute(item, "NumberOfSeriesRelatedInstances")
        series.append(SeriesInfo(str(_attribute(item, "SeriesInstanceUID")), str(_attribute(item, "Modality") or "?"),
                                 None if number is None else int(number), str(_attribute(item, "SeriesDescription") or ""),
                                 None if instances is None else int(instances)))
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.uid))


def find_ct_series(client: Any, ref: DicomwebRef, series_id: str | None = None) -> SeriesInfo:
    """The CT series to segment in study `ref`: the URL's series, else `series_id`, else the
    study's only CT series. `InputFileError` naming the URL for a missing study or series, a
    series that is not CT, and a study with several CT series and no choice (listing them)."""
    series = study_series(client, ref)
    chosen = ref.series or series_id
    if ref.series and series_id and ref.series != series_id:
        raise ConfigError(f"{ref.url}: the URL names series {ref.series} and --series-id {series_id}; give one")
    if chosen:
        match = [s for s in series if s.uid == chosen]
        if not match:
            listed = "; ".join(s.describe() for s in series)
            raise InputFileError(f"{ref.root}/studies/{ref.study}: no series {chosen} in this study; its series: {listed}")
        if match[0].modality != "CT":
            raise InputFileError(f"{ref.root}/studies/{ref.study}/series/{chosen}: a {match[0].modality} series, not CT; "
                                 "fseft segments CT series")
        return match[0]
    ct = [s for s in series if s.modality == "CT"]
    if not ct:
        listed = "; ".join(s.describe() for s in series)
        raise InputFileError(f"{ref.url}: the study holds no CT series (its series: {listed})")
    if len(ct) > 1:
        listed = "; ".join(s.describe() for s in ct)
        raise InputFileError(f"{ref.url}: the study holds {len(ct)} CT series; choose one with --series-id "
                             f"(or a .../series/<UID> URL): {listed}")
    return ct[0]


def retrieve_series(client: Any, root: str, study: str, series: str, folder: str | os.PathLike) -> list[Path]:
    """WADO-RS: stream the instances of a series into `folder` (created), one file each
    (``<SOPInstanceUID>.dcm``, in the transfer syntax the server stores), as they arrive.
    Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    url = f"{root}/studies/{study}/series/{series}"
    files = []
    with _requests(url, "retrieving the series (WADO-RS)"):
        # transfer-syntax=*: as stored (a compressed CT is not decompressed on the server)
        for ds in client.iter_series(study, series, media_types=(("application/dicom", "*"),)):
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    if not files:
        raise InputFileError(f"{url}: the server returned no instances for this series")
    return files


@contextlib.contextmanager
def retrieved_series(url: str, series_id: str | None = None) -> Iterator[tuple[Path, SeriesInfo]]:
    """Retrieve the CT series of the study URL `url` (`find_ct_series`) into a temporary folder
    named after its SeriesInstanceUID; yields ``(folder, series)`` and removes the folder (and
    every instance in it) afterwards, also on errors."""
    ref = parse_study_url(url)
    client = make_client(ref.root)
    series = find_ct_series(client, ref, series_id)
    scratch = Path(tempfile.mkdtemp(prefix="fseft-dicomweb-"))
    try:
        folder = scratch / series.uid
        retrieve_series(client, ref.root, ref.study, series.uid, folder)
        yield folder, series
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_server(url: str) -> None:
    """Fail early (before hours of inference) when the DICOMweb service at `url` cannot be
    reached or refuses the credentials: one QIDO-RS study search with limit 1."""
    root = service_root(url)
    client = make_client(root)
    with _requests(root, "checking the server (QIDO-RS)"):
        client.search_for_studies(limit=1)


# ------------------------------------------------------------------------- storing


class StoreError(InputFileError):
    """A STOW-RS request the server refused, in part or whole."""


def store_instances(url: str, datasets: Sequence[Dataset]) -> list[str]:
    """STOW-RS `datasets` to the service of `url` (a root or a study URL), one request per study.
    Returns the SOP Instance UIDs the server reports as stored; `StoreError` naming the URL for
    an unreachable or refusing server, or for any instance the server lists as failed."""
    root = service_root(url)
    client = make_client(root)
    stored: list[str] = []
    by_study: dict[str, list[Dataset]] = {}
    for ds in datasets:
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    for study, group in by_study.items():
        try:
            with _requests(root, "storing (STOW-RS)"):
                response = client.store_instances(group, study_instance_uid=study)
        except InputFileError as exc:
            raise StoreError(str(exc)) from None
        failed = [str(item.ReferencedSOPInstanceUID) for item in response.get("FailedSOPSequence", [])]
        if failed:
            raise StoreError(f"{root}: the server refused to store {len(failed)} instance(s): {', '.join(failed)}")
        stored += [str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])]
    missing = sorted({str(ds.SOPInstanceUID) for ds in datasets} - set(stored))
    if missing:
        raise StoreError(f"{root}: the server did not confirm storing {', '.join(missing)}")
    return stored


def store_files(url: str, files: Sequence[str | os.PathLike]) -> list[str]:
    """`store_instances` of DICOM files (a written SEG, a report): their stored SOP Instance UIDs."""
    import pydicom  # optional extra: dicomweb

    return store_instances(url, [pydicom.dcmread(str(f)) for f in files])


def report_path(seg: str | os.PathLike) -> Path:
    """Where the measurement report of the SEG file `seg` is written: ``<seg>_sr.dcm`` beside it."""
    seg = Path(seg)
    return seg.with_name(f"{seg.stem}_sr.dcm")


def store_results(url: str, outputs: dict[str, list[Path]],
                  statistics: dict[str, dict[str, dict[str, Any]]] | None = None) -> dict[Path, str]:
    """Store what `fseft predict --output-type dicom-seg` wrote (case id -> [SEG file]) by
    STOW-RS to `url`, each with its TID 1500 report when `statistics` (case id -> structure ->
    values) are given (`fseft.data.dicom_sr.write_measurement_report`, written beside the SEG
    first). Returns file -> stored SOP Instance UID.

    A refused or failed store raises `StoreError` saying what was stored before it and that the
    local files remain (nothing local is removed)."""
    import pydicom  # optional extra: dicomweb

    stored: dict[Path, str] = {}
    for case_id, files in outputs.items():
        batch = [Path(f) for f in files]
        if statistics is not None:
            batch.append(write_measurement_report(batch[0], statistics[case_id], report_path(batch[0])))
        datasets = [pydicom.dcmread(str(f)) for f in batch]
        try:
            store_instances(url, datasets)  # confirms every instance, else raises
        except StoreError as exc:
            done = f"stored before it: {', '.join(str(p) for p in stored)}; " if stored else "nothing was stored; "
            kept = sorted({str(p) for files_ in outputs.values() for p in files_} | {str(p) for p in batch})
            raise StoreError(f"{exc}. {done}the local outputs remain in place: {', '.join(kept)}") from None
        for path, ds in zip(batch, datasets):
            stored[path] = str(ds.SOPInstanceUID)
    return stored
