"""Where a running server listens for a store, so the command line can ask it instead of
loading the model and the index itself (`medsearch serve` publishes, `search` & co. find).

One owner-only JSON file per served store in the user's runtime folder
(:func:`retrieval.userdirs.runtime_home`), named by the store's identity: the folder and its
creation time for a SQLite store, the database and its creation time for a PostgreSQL store
(every folder of that database is the same store). It holds the URL, the pid, the token (when
one is set) and the answer key: the model fingerprint and the settings that shape an answer.
A command uses a server only when the key matches its own; a file whose process is gone or
whose port refuses is stale and is removed. Nothing here imports the store, FAISS or torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

from retrieval.userdirs import runtime_home

from .settings import Settings

MANIFEST = "manifest.json"  # retrieval.store.layout.MANIFEST, read here without the store
#: Seconds to wait for a server's /stats before working locally.
PROBE_TIMEOUT = 2.0
#: A server publishes just before it binds: a refusal this soon after is not yet staleness.
STARTUP_GRACE = 30.0


def store_identity(root: Path, manifest: dict) -> str:
    """The store's identity: its database's store for PostgreSQL, else its folder."""
    created = repr(float(manifest.get("created_at") or 0.0))
    if manifest.get("database"):
        where = f"postgresql|{manifest['database']}"
    else:
        where = f"sqlite|{Path(root).resolve()}"
    return hashlib.sha256(f"{where}|{created}".encode()).hexdigest()[:32]


def answer_key(settings: Settings, model_fingerprint: str) -> str:
    """What must agree for a server's answer to equal this process's own: the model and the
    settings that change vectors, scores or shown paths."""
    shaping = {"model_fingerprint": model_fingerprint, "device": settings.device,
               "precision": settings.precision, "cuda_bf16": settings.cuda_bf16,
               "text_runtime": settings.text_runtime,
               "redact_paths": settings.redact_paths, "key_file": str(settings.key_file),
               "key_folder": str(settings.key_folder)}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:32]


def server_file(identity: str) -> Path:
    return runtime_home() / f"server-{identity}.json"


def _private_folder() -> Path:
    folder = runtime_home()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user")
    if stat.S_IMODE(info.st_mode) != 0o700:
        folder.chmod(0o700)
    return folder


def publish(identity: str, url: str, token: str | None, key: str) -> Path | None:
    """Write (atomically, owner-only) where this process serves the store; None if it could
    not (the server runs anyway: commands then work locally)."""
    doc = {"url": url, "pid": os.getpid(), "token": token, "answer_key": key, "store": identity}
    try:
        path = server_file(identity)
        tmp = _private_folder() / f".{path.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        return path
    except OSError:
        return None


def withdraw(identity: str) -> None:
    """Remove this process's file at a clean shutdown (not one another server wrote since)."""
    path = server_file(identity)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


class Server:
    """A live server for this store and these settings: JSON requests with its token."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url, self.token = url.rstrip("/"), token

    def request(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        """The JSON answer; any failure (refused, HTTP error, not JSON) raises OSError or
        ValueError, and the caller works locally instead."""
        data = None if body is None else json.dumps(body).encode()
        return self._send(path, data, "application/json", timeout)

    def upload(self, path: str, content: bytes, fields: list[tuple[str, str]],
               timeout: float | None = None) -> dict:
        """The JSON answer to a multipart POST of ``content`` as its ``file`` part, with text
        ``fields`` (a name may repeat); failures as :meth:`request`."""
        boundary = f"medsearch-{os.urandom(12).hex()}"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                 .encode() + value.encode() + b"\r\n" for name, value in fields]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                     'filename="upload"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + content + b"\r\n")
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self._send(path, data, f"multipart/form-data; boundary={boundary}", timeout)

    def _send(self, path: str, data: bytes | None, kind: str, timeout: float | None) -> dict:
        req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None
                                     else "POST", headers={"Content-Type": kind})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=timeout) as answer:  # noqa: S310 - loopback
            return json.loads(answer.read())


def find_server(root: Path, settings: Settings) -> Server | None:
    """The running server for the store at ``root`` that answers as this process would, or
    None (no server, another model or settings, or a stale file, which is removed)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if settings.db and manifest.get("database") is None:
        return None  # a folder not yet adopted: the local path decides what --db means
    identity = store_identity(root, manifest)
    key = answer_key(settings, str(manifest.get("model_fingerprint")))
    path = server_file(identity)
    try:
        info = path.stat()
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            return None
        doc = json.loads(path.read_text())
        pid, url = int(doc["pid"]), str(doc["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if doc.get("answer_key") != key:
        return None
    if not _alive(pid):
        _remove_stale(path, pid)
        return None
    server = Server(url, doc.get("token"))
    try:
        serving = server.request("/health", timeout=PROBE_TIMEOUT).get("serving") or {}
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError):  # refused or no answer: stale, unless the server is starting
        if time.time() - info.st_mtime > STARTUP_GRACE:
            _remove_stale(path, pid)
        return None
    return server if serving == {"store": identity, "answer_key": key} else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(path: Path, pid: int) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def serving(store, settings: Settings) -> dict:
    """What a server answers for (its /stats "serving"): the store's identity and answer key."""
    m = store.manifest
    return {"store": store_identity(store.root, {"created_at": m.created_at,
                                                 "database": m.database}),
            "answer_key": answer_key(settings, m.model_fingerprint)}
