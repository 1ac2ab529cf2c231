"""A real Orthanc server with its DICOMweb plugin as a source: QIDO-RS listing, WADO-RS
retrieval in the workers, incremental re-runs by SOP Instance UID, query filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer.dicomweb import list_instances
from indexer.pacs import PacsQuery
from indexer.pipeline import Indexer
from retrieval.model import VisionEncoder
from retrieval.store import Store

from .conftest import PYDICOM_TEST_FILES
from .orthanc import running_orthanc
from .serving import run_cli

#: A mix: CT, MR, 12-bit JPEG and JPEG 2000 NM, colour, an SR (no image), a multi-frame US.
UPLOAD = ("CT_small.dcm", "MR_small.dcm", "JPGExtended.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
          "test-SR.dcm", "examples_ybr_color.dcm")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc on a free loopback port, loaded with UPLOAD through its REST API."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        for name in UPLOAD:
            reply = server.upload((PYDICOM_TEST_FILES / name).read_bytes())
            assert reply.status_code == 200, (name, reply.text)
        yield server.base


def _index(store_dir: Path, model: Path, source: str, query: PacsQuery | None = None,
           workers: int = 1):
    encoder = VisionEncoder.load(str(model), "cpu")
    from retrieval.store import manifest_for

    store = Store.open_or_create(store_dir, manifest_for(encoder, "Flat"))
    try:
        with Indexer(store, encoder, workers=workers, batch_size=4, progress=False,
                     pacs_query=query) as indexer:
            return indexer.run([source]), store.stats()
    finally:
        store.close()


def test_qido_lists_every_uploaded_instance(orthanc):
    sources = list_instances(f"dicomweb+{orthanc}/dicom-web")
    assert len(sources) == len(UPLOAD)
    assert all(s.kind == "dicomweb" and "/instances/" in s.path for s in sources)
    ct = list_instances(f"dicomweb+{orthanc}/dicom-web", PacsQuery(modality="CT"))
    assert len(ct) == 1


def test_index_over_dicomweb_then_incremental(orthanc, tiny_model, tmp_path):
    source = f"dicomweb+{orthanc}/dicom-web"
    report, stats = _index(tmp_path / "store", tiny_model, source)
    doc = report.to_json()
    assert doc["failed"] == 0, doc["failures"]
    assert doc["indexed"] == len(UPLOAD) - 1          # everything but the SR
    assert [s["reason"] for s in doc["skipped"]] == ["no pixel data: Comprehensive SR Storage (SR)"]
    assert stats["images"] == len(UPLOAD) - 1
    assert stats["modalities"] == {"CT": 1, "MR": 1, "NM": 2, "OT": 1, "US": 1}
    from medsearch.app import Medsearch  # a preview fetches the instance again (WADO-RS)

    app = Medsearch.open(tmp_path / "store")
    try:
        assert all(app.preview(int(i)).startswith(b"\x89PNG") for i in app.store.vector_ids())
    finally:
        app.store.close()

    again, stats2 = _index(tmp_path / "store", tiny_model, source, workers=0)
    assert again.indexed == 0 and again.images == 0 and again.removed == 0
    assert again.unchanged == len(UPLOAD) - 1
    assert stats2["images"] == stats["images"]


def test_filtered_query_indexes_part_and_removes_nothing(orthanc, tiny_model, tmp_path):
    source = f"dicomweb+{orthanc}/dicom-web"
    report, _ = _index(tmp_path / "store", tiny_model, source, workers=0)
    assert report.indexed == len(UPLOAD) - 1
    mr, stats = _index(tmp_path / "store", tiny_model, source, PacsQuery(modality="MR"),
                       workers=0)
    assert mr.total == 1 and mr.unchanged == 1 and mr.removed == 0
    assert stats["images"] == len(UPLOAD) - 1


def test_cli_index_dicomweb_json(orthanc, tiny_model, tmp_path, capsys):

    def cli(*args) -> tuple[int, dict]:
        code, out, _ = run_cli(capsys, *args)
        return code, json.loads(out)

    store = tmp_path / "cli-store"
    code, doc = cli("index", f"dicomweb+{orthanc}/dicom-web", "--store", str(store), "--model",
                    str(tiny_model), "--modality", "CT", "--workers", "0", "--json")
    assert code == 0 and doc["indexed"] == 1 and doc["failed"] == 0
    code, doc = cli("index", "dicomweb+http://127.0.0.1:9/dicom-web", "--store", str(store), "--json")
    assert code == 2 and "DICOMweb search" in doc["error"]
    code, doc = cli("index", str(tmp_path), "--since", "2024-01-01", "--store", str(store), "--json")
    assert code == 2 and "dicomweb" in doc["error"]
