"""The HTTP service on loopback: routes, same results as the CLI, auth, limits, errors, load."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from medsearch.web.guard import check_exposure
from retrieval.errors import InputError

from .conftest import PYDICOM_TEST_FILES, write_images
from .serving import cli, free_port, index_store, make_app, running

TOKEN = "test-token-0123456789abcdef"
LIMIT = 256 * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def data(request, tmp_path_factory, tiny_model):
    """One indexed store per back end (its rows in SQLite, or in a fresh PostgreSQL database
    the store's manifest names, so every later open finds it)."""
    db = (None if request.param == "sqlite"
          else request.getfixturevalue("postgres_server").create_database())
    root = tmp_path_factory.mktemp("server")
    images = root / "images"
    write_images(images, 9, seed=1)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(PYDICOM_TEST_FILES / name, images / name)
    index_store(root / "store", images, tiny_model, db=db)
    return root


@pytest.fixture(scope="module")
def client(data):
    with running(make_app(data / "store")) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def guarded(data):
    """A second server on the same store with a token and a small upload limit."""
    app = make_app(data / "store", token=TOKEN, max_upload_bytes=LIMIT)
    with running(app) as url:
        yield url


def _store_args(data):
    return ("--store", str(data / "store"))


def _id_of(client, path: Path) -> int:
    hits = client.post("/similar", files={"file": ("q", path.read_bytes())}, data={"k": "1"}).json()
    return hits["results"][0]["id"]


# -- routes and result shape ---------------------------------------------------------------------
def test_health_stats_metrics_docs(client, data):
    health = client.get("/health").json()
    assert health["status"] == "ok" and set(health["serving"]) == {"store", "answer_key"}
    stats = client.get("/stats").json()
    info = cli("info", *_store_args(data))  # the same figures as `medsearch info`
    assert {k: info[k] for k in stats if k in info} == {k: v for k, v in stats.items() if k in info}
    assert {"model", "dim", "count", "index_type", "files", "images", "modalities"} <= set(stats)
    assert stats["count"] == 11 and stats["modalities"]["CT"] == 1
    openapi = client.get("/openapi.json").json()
    for path in ("/search", "/similar", "/export", "/images/{image_id}", "/images/{image_id}/preview",
                 "/stats", "/health", "/metrics"):
        assert path in openapi["paths"]
    assert "multipart/form-data" in openapi["paths"]["/similar"]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()   # works offline
    js = re.search(r'src="([^"]+swagger-ui-bundle\.js)"', docs.text).group(1)
    assert client.get(js).status_code == 200
    client.post("/search", json={"query": "a"})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'medsearch_requests_total{method="POST",route="/search",status="200"}' in metrics.text
    assert "medsearch_index_vectors 11.0" in metrics.text


def test_search_equals_cli(client, data):
    for query, extra in [("pleural effusion", []), ('"pleural effusion" - "chest tube"', []),
                         ("scan", ["--modality", "CT", "--modality", "MR"])]:
        body = {"query": query, "k": 5}
        if extra:
            body["filters"] = {"modality": ["CT", "MR"]}
        api = client.post("/search", json=body)
        assert api.status_code == 200
        assert api.json() == cli("search", query, "-k", "5", *extra, *_store_args(data))
    min_score = client.post("/search", json={"query": "a", "k": 11, "min_score": 0.1}).json()["results"]
    assert all(r["score"] >= 0.1 for r in min_score)


def test_terms_and_id_arithmetic(client, data):
    by_terms = client.post("/search", json={"terms": [
        {"text": "pleural effusion", "weight": 2}, {"id": 3, "weight": -1}], "k": 4}).json()
    by_text = client.post("/search", json={"query": '2:"pleural effusion" - #3', "k": 4}).json()
    assert by_terms == by_text
    assert by_text == cli("search", '2:"pleural effusion" - #3', "-k", "4", *_store_args(data))
    refused = client.post("/search", json={"query": '"a" + /etc/passwd.png'})
    assert refused.status_code == 400 and "names a file" in refused.json()["error"]


def test_similar_by_id_and_upload(client, data):
    assert client.post("/similar", json={"id": 2, "k": 4}).json() == \
        cli("similar", "--id", "2", "-k", "4", *_store_args(data))
    for path in sorted((data / "images").iterdir()):
        found = client.post("/similar", files={"file": ("x", path.read_bytes())}, data={"k": "3"})
        assert found.status_code == 200, found.text
        top = found.json()["results"][0]
        assert top["path"] == str(path.absolute()) and top["score"] > 0.9999, path.name
    ct = data / "images" / "CT_small.dcm"
    filtered = client.post("/similar", files={"file": ("x.png", ct.read_bytes())},
                           data={"k": "5", "filters": '{"modality": ["MR"]}'}).json()["results"]
    assert [r["metadata"]["modality"] for r in filtered] == ["MR"]
    shifted = client.post("/similar", files={"file": ("x", ct.read_bytes())},
                          data={"k": "1", "query": '- "chest tube"'}).json()["results"]
    assert shifted[0]["path"] == str(ct.absolute()) and shifted[0]["score"] < 0.9999


def test_images_and_previews(client, data):
    from indexer.view import read_image
    from retrieval.model.preprocess import model_input_to_uint8
    import torch

    path = data / "images" / "MR_small.dcm"
    image_id = _id_of(client, path)
    meta = client.get(f"/images/{image_id}").json()
    assert meta["path"] == str(path.absolute()) and meta["metadata"]["modality"] == "MR"
    png = client.get(f"/images/{image_id}/preview")
    assert png.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(png.content)))
    size = client.app if False else shown.shape[0]
    decoded = read_image(path, image_size=size)
    assert np.array_equal(shown, model_input_to_uint8(torch.from_numpy(decoded.tensor)))
    thumb = Image.open(io.BytesIO(client.get(f"/images/{image_id}/preview?size=64").content))
    assert thumb.size == (64, 64)
    assert client.get("/images/9999").status_code == 404
    assert client.get("/images/9999/preview").status_code == 404
    assert client.get("/images/abc").status_code == 422
    for probe in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd/preview",
                  "/static/..%2F..%2Froutes.py", "/static/../routes.py"):
        response = client.get(probe)
        assert response.status_code in (404, 422) and b"import" not in response.content, probe


def test_bad_requests_get_json_errors(client, data):
    png = sorted((data / "images").glob("*.png"))[0].read_bytes()
    cases = [
        (client.post("/search", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (client.post("/search", json={"query": ""}), 422),
        (client.post("/search", json={}), 422),
        (client.post("/search", json={"query": "a", "k": False}), 422),
        (client.post("/search", json={"query": "a", "min_score": False}), 422),
        (client.post("/search", json={"query": "a", "k": 0}), 422),
        (client.post("/search", json={"query": "a", "filters": {"colour": "red"}}), 422),
        (client.post("/search", json={"query": "a", "filters": {"date_from": "yesterday"}}), 422),
        (client.post("/search", json={"query": '"a" - "a"'}), 400),
        (client.post("/similar", json={"id": 9999}), 404),
        (client.post("/similar", json={"k": 3}), 422),
        (client.post("/similar", files={"file": ("scan.png", b"just some text, not an image")}), 415),
        (client.post("/similar", files={"file": ("scan.png", png[: len(png) // 3])}), 422),
        (client.post("/similar", files={"file": ("scan.png", b"")}), 400),
        (client.post("/similar", files={"other": ("scan.png", png)}), 400),
        (client.post("/similar", files={"file": ("scan.png", png)}, data={"k": "many"}), 422),
        (client.get("/nowhere"), 404),
        (client.delete("/search"), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        body = response.json()
        assert set(body) == {"error", "type"} and body["error"]
        assert "Traceback" not in response.text and 'File "' not in response.text
    # The name does not matter, the bytes do: a JPEG named .dcm is searched as a JPEG.
    jpeg = sorted((data / "images").glob("*.jpg"))[0]
    named_wrong = client.post("/similar", files={"file": ("scan.dcm", jpeg.read_bytes())})
    assert named_wrong.json()["results"][0]["path"] == str(jpeg.absolute())


def test_internal_errors_say_nothing(data):
    app = make_app(data / "store")

    def boom(*_args, **_kwargs):
        raise RuntimeError("secret detail /data/patient-name")

    app.state.medsearch.searcher.page = boom
    with running(app) as url:
        response = httpx.post(f"{url}/search", json={"query": "a"}, timeout=60)
    assert response.status_code == 500
    assert response.json() == {"error": "internal error; the server log has details",
                               "type": "InternalError"}


# -- security ----------------------------------------------------------------------------------
def test_token_guards_every_route_but_health(guarded):
    assert httpx.get(f"{guarded}/health").status_code == 200
    for method, path in [("GET", "/"), ("GET", "/stats"), ("GET", "/metrics"), ("GET", "/docs"),
                         ("GET", "/openapi.json"), ("GET", "/images/1"), ("GET", "/images/1/preview"),
                         ("GET", "/static/app.js"), ("POST", "/search"), ("POST", "/similar"),
                         ("POST", "/export")]:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Authorization": TOKEN}, {"Authorization": f"Token {TOKEN}"}):
            response = httpx.request(method, f"{guarded}{path}", headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["type"] == "Unauthorized"
    challenge = httpx.get(f"{guarded}/stats").headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    browser = httpx.get(f"{guarded}/", headers={"Accept": "text/html"}).headers["www-authenticate"]
    assert browser.startswith("Basic")  # lets a browser prompt for the token
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{guarded}/stats", headers=bearer).status_code == 200
    assert httpx.post(f"{guarded}/search", json={"query": "a"}, headers=bearer).status_code == 200
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    assert httpx.get(f"{guarded}/", headers={"Authorization": f"Basic {basic}"}).status_code == 200


def _raw(url: str, head: bytes, body_chunks=()) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            sock.sendall(chunk)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            part = sock.recv(65536)
            if not part:
                break
            data += part
        return data


def test_upload_limit_is_answered_before_the_body(guarded, data):
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    # Declared too large: 413 at once, without a byte of body sent.
    started = time.monotonic()
    reply = _raw(guarded, b"POST /similar HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth +
                 b"Content-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 5000000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413") and b"upload limit" in reply
    assert time.monotonic() - started < 5
    # Streamed without a length: cut off as soon as the count passes the limit.
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    chunk = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in [part] + [chunk] * (LIMIT // len(chunk) + 1)]
    reply = _raw(guarded, b"POST /similar HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth +
                 b"Content-Type: multipart/form-data; boundary=b\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert reply.startswith(b"HTTP/1.1 413") and b"PayloadTooLarge" in reply
    # Under the limit an upload works on the same server.
    png = sorted((data / "images").glob("*.png"))[0].read_bytes()
    assert len(png) < LIMIT
    ok = httpx.post(f"{guarded}/similar", files={"file": ("a", png)},
                    headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert ok.status_code == 200
    too_big = httpx.post(f"{guarded}/similar", files={"file": ("a", png + b"\0" * LIMIT)},
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert too_big.status_code == 413


def test_exposure_rules():
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    check_exposure("localhost", None)
    for host in ("0.0.0.0", "192.0.2.10", "::", "example.org"):
        with pytest.raises(InputError, match="refusing to listen on .* without a token"):
            check_exposure(host, None)
        check_exposure(host, TOKEN)
    with pytest.raises(InputError, match="too short"):
        check_exposure("0.0.0.0", "short")


def _medsearch() -> str:
    return str(Path(sys.executable).parent / "medsearch")


def test_serve_command_end_to_end(data, monkeypatch):
    """The real `medsearch serve`: refuses an open bind, serves, logs no query text or PHI."""
    monkeypatch.delenv("MEDSEARCH_TOKEN", raising=False)
    env = {**os.environ, "MEDSEARCH_TOKEN": ""}
    env.pop("MEDSEARCH_TOKEN")
    with pytest.raises(InputError, match="refusing to listen on 0.0.0.0 without a token"):
        cli("serve", "--store", str(data / "store"), "--host", "0.0.0.0")

    port = free_port()
    server = subprocess.Popen([_medsearch(), "serve", "--store", str(data / "store"), "--port",
                               str(port), "--log-level", "info"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        secret_query = "zebra-stripes-4711 effusion"
        assert httpx.post(f"{url}/search", json={"query": secret_query}).status_code == 200
        ct = (data / "images" / "CT_small.dcm").read_bytes()
        assert httpx.post(f"{url}/similar", files={"file": ("CompressedSamples.dcm", ct)},
                          timeout=60).status_code == 200
        assert httpx.post(f"{url}/search", json={"query": "x", "k": -1}).status_code == 422
        assert httpx.get(f"{url}/").text.startswith("<!doctype html>")
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert "POST /search HTTP/1.1\" 200" in out + err  # INFO access log is on …
    for secret in ("zebra-stripes", "CompressedSamples", "1CT1"):
        assert secret not in out + err  # … and says nothing about queries or patients


# -- concurrency and a store that grows while serving -----------------------------------------
def test_concurrent_requests_give_serial_answers(client, data):
    images = sorted((data / "images").iterdir())
    jobs = [("search", {"query": f"finding {i % 5}", "k": 5}) for i in range(12)] + \
           [("similar", {"id": 1 + i % 11, "k": 5}) for i in range(8)] + \
           [("upload", images[i % len(images)]) for i in range(6)]

    def call(job):
        kind, arg = job
        if kind == "upload":
            r = client.post("/similar", files={"file": ("f", arg.read_bytes())}, data={"k": "5"})
        else:
            r = client.post(f"/{kind}", json=arg)
        assert r.status_code == 200, r.text
        return r.json()

    serial = [call(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(call, jobs * 2))
    assert parallel == serial * 2


def test_search_keeps_answering_while_an_index_run_writes(data, tiny_model, tmp_path):
    root = tmp_path / "live"
    write_images(root / "first", 4, seed=11)
    write_images(root / "second", 6, seed=12)
    index_store(root / "store", root / "first", tiny_model)
    with running(make_app(root / "store")) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/stats").json()["count"] == 4
        stop, errors, answered = threading.Event(), [], []

        def hammer():
            while not stop.is_set():
                r = c.post("/search", json={"query": "growing store", "k": 20})
                (answered if r.status_code == 200 else errors).append(r.status_code)

        thread = threading.Thread(target=hammer)
        thread.start()
        # The index run writes through its own Store (own SQLite connections), as another
        # process would; batches of 2 commit three times while the searches go on.
        report = cli("index", str(root / "second"), "--store", str(root / "store"),
                     "--model", str(tiny_model), "--workers", "0", "--batch-size", "2",
                     "--no-progress")
        time.sleep(0.5)
        stop.set()
        thread.join()
        assert report["indexed"] == 6
        assert not errors and len(answered) > 0
        assert c.get("/stats").json()["count"] == 10
        found = c.post("/search", json={"query": "growing store", "k": 20}).json()["results"]
        assert len(found) == 10
        assert {Path(r["path"]).parent.name for r in found} == {"first", "second"}


def test_classify_by_id_and_upload(client, data):
    pytest.importorskip("retrieval.zeroshot")
    from retrieval.zeroshot import ReviewThresholds, ZeroShotClassifier, read_logit_scalars
    from retrieval.model import TextEncoder, resolve_checkpoint
    from retrieval.store import Store

    labels = ["pleural effusion", "normal", "pneumothorax"]
    mr_path = data / "images" / "MR_small.dcm"
    mr_id = _id_of(client, mr_path)
    by_id = client.post("/classify", json={"id": mr_id, "labels": labels})
    assert by_id.status_code == 200, by_id.text
    doc = by_id.json()
    assert sorted(r["label"] for r in doc["results"]) == sorted(labels)
    assert sum(r["softmax"] for r in doc["results"]) == pytest.approx(1.0, abs=1e-5)
    # The same numbers as the zero-shot module gives for the stored vector.
    st = Store.open(data / "store", readonly=True)
    checkpoint = resolve_checkpoint(st.manifest.model)
    expected = ZeroShotClassifier(TextEncoder(checkpoint, "cpu"), read_logit_scalars(checkpoint),
                                  ReviewThresholds()).classify(st.vectors([mr_id]), labels,
                                                               ["a medical image showing {}"])[0]
    assert doc == expected.to_json()
    upload = client.post("/classify", files={"file": ("x", mr_path.read_bytes())},
                         data={"labels": ",".join(labels)})
    assert upload.status_code == 200
    assert [r["label"] for r in upload.json()["results"]] == [r["label"] for r in doc["results"]]
    preset = client.post("/classify", json={"id": 1, "preset": "cxr"}).json()
    assert len(preset["results"]) == 13
    assert client.post("/classify", json={"id": 1, "labels": ["only one"]}).status_code == 422
    assert client.post("/classify", json={"id": 1, "labels": ["a", "a"]}).status_code == 400
    assert client.post("/classify", json={"id": 9999, "labels": labels}).status_code == 404


# -- issue 13: DNS rebinding, hostile bodies, labels, logs, tokens ------------------------------
def _raw_request(url: str, host: bytes | None, path: bytes = b"/stats",
                 extra: bytes = b"") -> bytes:
    """One HTTP/1.0 request with exactly the Host header given (None: no Host at all)."""
    address, port = url.removeprefix("http://").split(":")
    head = b"GET " + path + b" HTTP/1.0\r\n" + (b"Host: " + host + b"\r\n" if host else b"")
    with socket.create_connection((address, int(port)), timeout=30) as sock:
        sock.sendall(head + extra + b"\r\n")
        data = b""
        while part := sock.recv(65536):
            data += part
    return data


def test_host_allowlist_stops_dns_rebinding(client):
    """A page on evil.example that rebinds its name to 127.0.0.1 sends Host: evil.example."""
    url = str(client.base_url).rstrip("/")
    port = url.rsplit(":", 1)[1].encode()
    for host in (b"evil.example", b"evil.example:" + port, b"127.0.0.1.evil.example:" + port,
                 b"localhost.evil.example", b"attacker.localhost:" + port, b"127.0.0.2x"):
        reply = _raw_request(url, host)
        assert reply.split(b"\r\n")[0] in (b"HTTP/1.1 421 Misdirected Request",
                                           b"HTTP/1.1 400 Bad Request"), host
        assert b'"type":"MisdirectedRequest"' in reply and b"count" not in reply, host
    missing = _raw_request(url, None)
    assert missing.startswith(b"HTTP/1.1 400") and b"Host" in missing
    for host in (b"127.0.0.1:" + port, b"localhost:" + port, b"LOCALHOST:" + port,
                 b"[::1]:" + port, b"127.0.0.1"):
        reply = _raw_request(url, host)
        assert reply.startswith(b"HTTP/1.1 200"), (host, reply[:200])
    # Cross-site requests from a browser carry an Origin that is not ours: refused.
    evil = _raw_request(url, b"127.0.0.1:" + port, extra=b"Origin: http://evil.example\r\n")
    assert evil.startswith(b"HTTP/1.1 403")
    same = _raw_request(url, b"127.0.0.1:" + port,
                        extra=b"Origin: http://127.0.0.1:" + port + b"\r\n")
    assert same.startswith(b"HTTP/1.1 200")
    assert client.post("/search", json={"query": "a"},
                       headers={"Origin": "null"}).status_code == 403


def test_allowed_host_admits_a_reverse_proxy_name(data):
    app = make_app(data / "store", allowed_hosts=["medsearch.hospital.example"])
    with running(app) as url:
        assert _raw_request(url, b"medsearch.hospital.example").startswith(b"HTTP/1.1 200")
        assert _raw_request(url, b"127.0.0.1").startswith(b"HTTP/1.1 200")
        assert _raw_request(url, b"evil.example").startswith(b"HTTP/1.1 421")


def test_metrics_labels_are_bounded(client):
    for method in ("FOOBAR", "X-RANDOM-1", "PROPFIND"):
        client.request(method, "/search")
    client.get("/images/123456/preview")
    client.get("/no/such/path/secret-segment")
    text = client.get("/metrics").text
    # (digits could turn up inside a timing's decimals: the planted path parts are words)
    for secret in ("FOOBAR", "X-RANDOM", "PROPFIND", "images/123456", "secret-segment"):
        assert secret not in text
    assert 'method="other"' in text and 'route="/images/{image_id}/preview"' in text


def test_classify_counts_labels_after_splitting_on_commas(client, data):
    png = sorted((data / "images").glob("*.png"))[0].read_bytes()
    many = ",".join(f"label {i}" for i in range(2000))
    for response in (client.post("/classify", json={"id": 1, "labels": [many]}),
                     client.post("/classify", json={"id": 1, "labels": [many, "x"]}),
                     client.post("/classify", files={"file": ("x", png)}, data={"labels": many})):
        assert response.status_code == 422, response.text
        assert "at most 200 labels" in response.json()["error"]
    comma = client.post("/classify", json={"id": 1, "labels": ["a,b", "c"]})
    assert comma.status_code == 422 and "comma" in comma.json()["error"]
    # labels × templates is the cost: bounded too, before any text is encoded
    costly = client.post("/classify", json={"id": 1, "labels": [f"l{i}" for i in range(200)],
                                            "templates": ["a {}", "b {}", "c {}"]})
    assert costly.status_code == 400 and "too many prompts" in costly.json()["error"]


def test_hostile_ids_bodies_and_globs_are_422_not_500(client, data):
    huge = 2 ** 63
    for response in (client.get(f"/images/{huge}"), client.get(f"/images/{10 ** 40}/preview"),
                     client.post("/similar", json={"id": huge}),
                     client.post("/classify", json={"id": huge, "preset": "cxr"}),
                     client.post("/export", json={"id": huge}),
                     client.post("/search", json={"terms": [{"id": huge}]}),
                     client.post("/search", json={"query": "a", "filters": {"path_glob": "*a" * 30000}}),
                     client.post("/search", json={"query": "a", "filters": {"path_glob": "*" * 200}})):
        assert response.status_code == 422, (response.request.url, response.text[:300])
        assert response.json()["type"] == "ValidationError"
    assert client.get(f"/images/{2 ** 63 - 1}").status_code == 404
    for path in ("/images/3%0A", "/images/%203", "/images/-1", "/images/1/preview?size=64%0A"):
        assert client.get(path).status_code == 422, path  # int() would take them
    assert client.post("/search", json={"query": f"#{10 ** 30}"}).status_code == 404
    deep = b'{"query": "a", "k": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    for route in ("/search", "/similar", "/export", "/classify"):
        response = client.post(route, content=deep, headers={"content-type": "application/json"})
        assert response.status_code == 422, (route, response.text[:300])
        assert "nested" in response.json()["error"]
    # What the long schemathesis run found: a repeated form field (last one won), and a query
    # blank to Python but not to the schema's regular expression.
    png = sorted((data / "images").glob("*.png"))[0].read_bytes()
    twice = client.post("/similar", files=[("file", ("a.png", png)), ("weight", (None, "1")),
                                           ("weight", (None, "-1"))])
    assert twice.status_code == 422 and "more than once" in twice.json()["error"]
    assert client.post("/search", json={"query": "\x1e \ufeff"}).status_code == 422
    assert client.post("/search", json={"terms": [{"text": "\u3000"}]}).status_code == 422
    fine_deep = {"query": "a", "filters": {"modality": [["CT"]]}}
    assert client.post("/search", json=fine_deep).status_code == 422
    big = b'{"query": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    assert client.post("/search", content=big,
                       headers={"content-type": "application/json"}).status_code == 413


def test_errors_never_log_request_data(data, caplog):
    """SQL parameters (a path glob may name a patient) and exception texts stay out of logs."""
    app = make_app(data / "store")
    real = app.state.medsearch.store.rows

    secret = "zebra-" + str(4700 + 11)  # built, so that no source line in a traceback shows it

    def failing_rows(ids):
        raise RuntimeError(f"cannot read rows {ids} {secret}")

    with running(app) as url:
        import logging
        with caplog.at_level(logging.DEBUG):
            glob = "*Doe^Jane-4711*"
            assert httpx.post(f"{url}/search", json={"query": "a", "filters": {"path_glob": glob}},
                              timeout=60).status_code == 200
            app.state.medsearch.store.rows = failing_rows
            assert httpx.get(f"{url}/images/1", timeout=60).status_code == 500
            app.state.medsearch.store.rows = real
            # A real SQLAlchemy error carries its parameters in its message.
            from sqlalchemy.exc import OperationalError
            err = OperationalError("SELECT ? AS x", ("Doe^Jane-4711",), Exception("boom"))
            assert "Doe^Jane" in str(err)

            def sql_error(*_a, **_k):
                raise err

            app.state.medsearch.searcher.page = sql_error
            assert httpx.post(f"{url}/search", json={"query": "a"}, timeout=60).status_code == 500
    logged = "\n".join(r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") +
                       (r.exc_text or "") for r in caplog.records)
    assert "unhandled error" in logged
    assert "4711" not in logged and "Doe" not in logged and "zebra" not in logged


def test_store_engine_hides_sql_parameters(data):
    from retrieval.store import Store

    st = Store.open(data / "store", readonly=True)
    assert st.engine.hide_parameters


@pytest.mark.parametrize("token", ["                    ", " \t  \n   \u00a0      ", ""])
def test_blank_tokens_are_refused(token):
    with pytest.raises(InputError, match="blank|empty"):
        check_exposure("127.0.0.1", token)
    with pytest.raises(InputError, match="blank|empty"):
        check_exposure("0.0.0.0", token)


def test_token_surrounding_whitespace_is_stripped(data, monkeypatch):
    from medsearch.web.guard import read_token

    assert read_token("  " + TOKEN + "\n") == TOKEN
    assert read_token(None) is None
    app = make_app(data / "store", token=" " + TOKEN + " ")
    with running(app) as url:
        ok = httpx.get(f"{url}/stats", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert httpx.get(f"{url}/stats", headers={"Authorization": "Bearer"}).status_code == 401
    with pytest.raises(ValueError, match="blank"):
        make_app(data / "store", token="    ")


def test_access_log_leaves_out_query_strings(data, monkeypatch):
    monkeypatch.delenv("MEDSEARCH_TOKEN", raising=False)
    env = {k: v for k, v in os.environ.items() if k != "MEDSEARCH_TOKEN"}
    port = free_port()
    server = subprocess.Popen([_medsearch(), "serve", "--store", str(data / "store"), "--port",
                               str(port), "--log-level", "info", "--allowed-host",
                               "medsearch.proxy.example"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(server, url)
        assert httpx.get(f"{url}/stats", headers={"Host": "medsearch.proxy.example"}).status_code == 200
        assert httpx.get(f"{url}/images/1/preview?size=64&name=Doe-Jane-4711").status_code == 200
        assert httpx.get(f"{url}/stats", headers={"Host": "evil.example"}).status_code == 421
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert "GET /images/1/preview HTTP/1.1\" 200" in out + err
    assert "4711" not in out + err and "size=64" not in out + err


def _wait_up(server, url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.3)


def test_default_allowed_hosts_and_wildcard_rule():
    from medsearch.web.guard import HostPolicy, default_allowed_hosts

    loopback = HostPolicy(default_allowed_hosts("127.0.0.1", 8000))
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"):
        assert loopback.admits(host), host
    for host in ("evil.example:8000", "127.0.0.1.nip.io:8000", "", ":8000", "[::1", "a:b:c"):
        assert not loopback.admits(host), host
    bound = HostPolicy(default_allowed_hosts("192.0.2.10", 8443) + ["proxy.example"])
    assert bound.admits("192.0.2.10:8443") and not bound.admits("192.0.2.10:9999")
    assert bound.admits("PROXY.example:443") and bound.admits_origin("https://proxy.example")
    assert not bound.admits_origin("https://evil.example") and not bound.admits_origin("null")
    assert HostPolicy(["*"]).admits("anything.example")
    with pytest.raises(InputError, match="needs a token"):
        check_exposure("127.0.0.1", None, ["*"])
    check_exposure("0.0.0.0", TOKEN, ["*"])
