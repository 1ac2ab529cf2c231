"""A real Orthanc PACS for the tests, on loopback: its REST API to load instances, its DICOMweb
plugin (QIDO-RS / WADO-RS) and its DICOM port (C-FIND / C-GET / C-STORE).

Each fixture starts its own server with a temporary configuration and storage; a test that
needs Orthanc skips with the reason when it is not installed
(`scripts/install-test-services.sh` installs orthanc, orthanc-dicomweb and dcmtk).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from .serving import free_port

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
#: The called AE title of the test PACS; medsearch calls it as MEDSEARCH.
ORTHANC_AET = "ORTHANC"


def dicomweb_plugin() -> str | None:
    for folder in PLUGIN_DIRS:
        candidate = Path(folder) / "libOrthancDicomWeb.so"
        if candidate.is_file():
            return str(candidate)
    return None


class Orthanc:
    """A running server: ``base`` (REST), ``dicomweb`` (a medsearch source),
    ``dimse`` (a medsearch source), ``auth`` for REST calls when users are configured."""

    def __init__(self, base: str, dicom_port: int, auth: tuple[str, str] | None) -> None:
        self.base, self.dicom_port, self.auth = base, dicom_port, auth

    @property
    def dicomweb(self) -> str:
        return f"dicomweb+{self.base}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dimse://{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    def upload(self, data: bytes) -> httpx.Response:
        return httpx.post(f"{self.base}/instances", content=data, timeout=30, auth=self.auth)

    def instances(self) -> list[str]:
        return httpx.get(f"{self.base}/instances", timeout=30, auth=self.auth).json()

    def sop_uids(self) -> set[str]:
        """The SOP Instance UIDs Orthanc holds (its own record of what it stored)."""
        uids = set()
        for ident in self.instances():
            tags = httpx.get(f"{self.base}/instances/{ident}/simplified-tags", timeout=30,
                             auth=self.auth).json()
            uids.add(tags["SOPInstanceUID"])
        return uids


@contextmanager
def running_orthanc(folder: Path, *, dicom: bool = False, users: dict[str, str] | None = None,
                    modalities: dict[str, list] | None = None,
                    extra: dict | None = None) -> Iterator[Orthanc]:
    """Orthanc on free loopback ports with its DICOMweb plugin; ``dicom``: also its DICOM
    port; ``users``: HTTP basic authentication; ``modalities``: known DICOM peers."""
    exe, plugin = shutil.which("Orthanc"), dicomweb_plugin()
    if exe is None or plugin is None:
        pytest.skip("Orthanc or its DICOMweb plugin is not installed "
                    "(scripts/install-test-services.sh installs orthanc and orthanc-dicomweb)")
    folder.mkdir(parents=True, exist_ok=True)
    port, dicom_port = free_port(), free_port()
    config = {"Name": "medsearch-test", "StorageDirectory": str(folder / "db"),
              "IndexDirectory": str(folder / "db"), "HttpPort": port,
              "DicomServerEnabled": dicom, "DicomPort": dicom_port, "DicomAet": ORTHANC_AET,
              "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
              "RegisteredUsers": users or {}, "DicomModalities": modalities or {},
              "DicomCheckCalledAet": False, "DicomScuTimeout": 10, "DicomAssociationCloseDelay": 0,
              "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    config.update(extra or {})
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen([exe, str(folder / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT)
    auth = next(iter(users.items())) if users else None
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/system", timeout=1, auth=auth).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("Orthanc did not start: " + (folder / "orthanc.log").read_text()[-2000:])
            time.sleep(0.2)
        yield Orthanc(base, dicom_port, auth)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
