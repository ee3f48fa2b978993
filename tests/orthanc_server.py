"""A real PACS for tests: Orthanc with its DICOMweb plugin (Debian packages ``orthanc`` and
``orthanc-dicomweb``, installed by .ci/run), started on a free loopback port with a temporary
storage folder and configuration, and stopped afterwards. Tests that need it are skipped (with
the reason) only where the Orthanc binary is absent."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Where the Debian package puts the plugin (and the library it links to).
PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")


@dataclass(frozen=True)
class Orthanc:
    port: int
    user: str | None = None
    password: str | None = None

    @property
    def root(self) -> str:
        """The DICOMweb service root."""
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def study_url(self, study: str) -> str:
        return f"{self.root}/studies/{study}"


def orthanc_binary() -> str:
    """The Orthanc executable; skips the calling test where it is absent, or fails it where
    ``FSEFT_REQUIRE_ORTHANC=1`` (CI, which installs Orthanc: a PACS test must not pass by skipping)."""
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")  # sbin: off a user's PATH
    plugin = next((p for p in PLUGIN_PATHS if Path(p).exists()), None)
    if binary is None or plugin is None:
        message = "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
        if os.environ.get("FSEFT_REQUIRE_ORTHANC") == "1":
            pytest.fail(f"{message}, and FSEFT_REQUIRE_ORTHANC=1")
        pytest.skip(message)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_orthanc(folder: Path, *, user: str | None = None, password: str | None = None) -> Iterator[Orthanc]:
    """Start Orthanc in `folder` (storage, configuration, log); with `user` / `password`, HTTP
    basic authentication is required. Yields once it answers; stops it afterwards."""
    import requests

    binary = orthanc_binary()
    plugin = next(p for p in PLUGIN_PATHS if Path(p).exists())
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = {
        "Name": "fseft-tests", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "storage"),
        "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": user is not None, "RegisteredUsers": {user: password} if user else {},
        "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpTimeout": 60, "StableAge": 1,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "wb") as log:
        process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    auth = (user, password) if user else None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/system", auth=auth, timeout=2).status_code == 200:
                    break
            except requests.exceptions.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield Orthanc(port, user, password)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def upload(server: Orthanc, files) -> None:
    """STOW-RS DICOM files to `server` (as a PACS export would arrive), with dicomweb-client."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    DICOMwebClient(server.root).store_instances([pydicom.dcmread(str(f)) for f in files])
