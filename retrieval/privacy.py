"""The patient-key secret, kept outside the store; consent withdrawal; path redaction.

Patient keys are ``HMAC-SHA256(secret, PatientID)``. Whoever holds the secret can recompute
the key of any guessed ID (short MRNs fall to brute force), so the secret never lives in the
store's files: it is a 32-byte random key in an owner-only file (0600, its folder 0700) and
the manifest records only its fingerprint.

Where keys live is a :class:`KeyFiles` the caller passes (the settings compute it). Default:
one key per store, ``<key folder>/<fingerprint>.key`` (so two stores are not linkable by
patient). A shared key file (the ``phi_key_file`` setting) is used instead when given: stores indexed with it give a patient the same key, so cohorts
can be joined across them. A store whose manifest names a fingerprint refuses to hash with any
other key: new keys would silently stop matching the stored ones.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import InputError, StoreError
from .store import MANIFEST, Store, fsync_dir
from .userdirs import key_home

KEY_BYTES = 32
#: Where stores before the key file kept their secret (a row of the settings table).
LEGACY_SETTING = "phi_hmac_key"
WITHDRAWN = "withdrawn:"
REDACT_MODES = ("none", "name", "hash")
_KEY_TEXT = re.compile(r"^[0-9a-f]{64}$")
_PATIENT_KEY = re.compile(r"^[0-9a-f]{32}$")


class KeyFileError(StoreError):
    """The store's patient-key file is missing, unreadable or not the store's key."""


def fingerprint(key: bytes) -> str:
    """A short public name for a key (it identifies, never reveals, the key)."""
    return hashlib.sha256(b"medsearch phi key fingerprint\0" + key).hexdigest()[:16]


def patient_key(key: bytes, patient_id: str) -> str:
    """The hashed patient key, as the indexer computes it (indexer.dicom.patient_key)."""
    return hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class KeyFiles:
    """Where patient-key files are: ``folder`` holds one key per store; ``shared``, when set,
    is one key file for every store (their patient keys can then be joined)."""

    folder: Path
    shared: Path | None = None

    def per_store(self, fp: str) -> Path:
        return self.folder / f"{fp}.key"


def user_key_files() -> KeyFiles:
    """The per-user default (``$XDG_CONFIG_HOME/medsearch/keys``), for callers that have no
    settings object: the store's open-time migration and library use."""
    return KeyFiles(key_home())


def read_key(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        content = path.read_text().strip().lower()
    except OSError as exc:
        raise KeyFileError(f"cannot read the patient-key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise KeyFileError(f"the patient-key file {path} can be read by others "
                           f"(mode {mode & 0o777:o}); run `chmod 600 {path}`")
    if not _KEY_TEXT.match(content):
        raise KeyFileError(f"{path} is not a medsearch patient-key file (64 hex digits)")
    return bytes.fromhex(content)


def write_key(path: Path, key: bytes) -> None:
    """Create the key file owner-only (never replacing one: a key is never overwritten)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (key.hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if another process made the file first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    fsync_dir(path.parent)


def _note(message: str) -> None:
    print(f"medsearch: {message}", file=sys.stderr, flush=True)


def _record(store: Store, fp: str) -> None:
    store.manifest.phi_key_fingerprint = fp
    store.manifest.write(store.root / MANIFEST)


def checkpoint(store: Store) -> None:
    """Copy the WAL into the database and truncate it (old page images hold deleted rows)."""
    store.checkpoint()


def migrate_legacy(store: Store, keys: KeyFiles | None = None) -> None:
    """At a writing open: a secret still in the settings table moves to a key file."""
    if not store.readonly and store.setting(LEGACY_SETTING) is not None:
        store_key(store, keys=keys)


def _migrate_legacy(store: Store, key: bytes, keys: KeyFiles) -> None:
    """Move a secret kept in the settings table into a key file; delete the row."""
    fp = fingerprint(key)
    configured = keys.shared
    target = keys.per_store(fp)
    if configured is not None and (not configured.exists() or
                                   fingerprint(read_key(configured)) == fp):
        target = configured
    if not target.exists():
        write_key(target, key)
    if fingerprint(read_key(target)) != fp:
        raise KeyFileError(f"{target} holds another key than the one store {store.root} keeps "
                           "in its database; move that file away and run again")
    _record(store, fp)  # key file first, then manifest, then the row: a kill loses nothing
    store.delete_setting_securely(LEGACY_SETTING)
    _note(f"the patient-key secret of store {store.root} moved out of the store into {target} "
          "(owner-only). Keep that file (back it up apart from the store): without it new "
          "files cannot get the same patient keys.")


def store_key(store: Store, *, create: bool = False, required: bool = True,
              keys: KeyFiles | None = None) -> bytes | None:
    """The store's patient-key secret.

    A legacy secret in the settings table is used, and moved to a key file when the store is
    writable. A store with a recorded fingerprint needs the matching file (else
    :class:`KeyFileError` when ``required``, None otherwise). A writable store without a key
    gets one when ``create``. ``keys``: where key files are (default :func:`user_key_files`).
    """
    keys = keys or user_key_files()
    configured = keys.shared
    legacy = store.setting(LEGACY_SETTING)
    if legacy is not None:
        key = bytes.fromhex(legacy)
        if not store.readonly:
            _migrate_legacy(store, key, keys)
        return key
    fp = getattr(store.manifest, "phi_key_fingerprint", None)
    if fp:
        candidates = [p for p in (configured, keys.per_store(fp)) if p is not None]
        present = [p for p in candidates if p.exists()]
        try:
            if not present:
                raise KeyFileError(
                    f"the patient-key file of store {store.root} is missing: looked for "
                    f"{' and '.join(map(str, candidates))} (key file fingerprint {fp}). Restore "
                    "that key file from your backup (or point the phi_key_file setting at it), "
                    "or re-index into a new store with a new key; a new key would give every "
                    "patient a new key. The PHI policies drop and keep index without it.")
            for path in present:
                key = read_key(path)
                if fingerprint(key) == fp:
                    return key
            raise KeyFileError(
                f"the patient-key file {present[0]} does not match store {store.root} "
                f"(its key file fingerprint is {fp}, the file's is "
                f"{fingerprint(read_key(present[0]))}). Restore the store's own key file, or "
                "re-index into a new store with a new key; hashing with another key would give "
                "every patient a new key.")
        except KeyFileError:
            if required:
                raise
            return None
    if not create or store.readonly:
        return None
    if configured is not None and configured.exists():
        key = read_key(configured)
        path = configured
    else:
        key = secrets.token_bytes(KEY_BYTES)
        path = configured or keys.per_store(fingerprint(key))
        write_key(path, key)
        key = read_key(path)  # another process may have created the shared file first
        _note(f"patient keys of store {store.root} are hashed with the key in {path} "
              "(owner-only, outside the store); back it up apart from the store")
    _record(store, fingerprint(key))
    return key


def text_cache_secret(store: Store, keys: KeyFiles | None, cache_folder: Path) -> bytes:
    """The key of the text-embedding cache (retrieval.store.text_cache): derived from the
    store's patient-key secret when it has one (never that secret itself), else a per-user
    key in the cache folder; empty (no cache) when neither can be had."""
    try:
        key = store_key(store, required=False, keys=keys)
    except (KeyFileError, StoreError, OSError):
        key = None
    if key is None:
        path = cache_folder / "text-embeddings" / "cache.key"
        try:
            if not path.exists():
                write_key(path, secrets.token_bytes(KEY_BYTES))
            key = read_key(path)
        except (KeyFileError, OSError):
            return b""
    return hmac.new(key, b"medsearch text-embedding cache", hashlib.sha256).digest()


# -- consent withdrawal ----------------------------------------------------------------------------
def _marker(key: bytes, kind: str, value: str) -> str:
    """A withdrawal marker: keyed, so the store never holds the patient key or UID itself."""
    digest = hmac.new(key, f"withdrawn {kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return f"{WITHDRAWN}{kind}:{digest[:32]}"


def withdrawn_markers(store: Store) -> set[str]:
    return store.setting_keys(WITHDRAWN)


def withdrawn(markers: set[str], key: bytes | None, patient: str | None,
              study_uid: str | None) -> bool:
    """Whether a file of this (hashed) patient key or study was withdrawn from the store."""
    if not markers or key is None:
        return False
    return bool((patient and _marker(key, "patient", patient) in markers) or
                (study_uid and _marker(key, "study", study_uid) in markers))


def resolve_patient(store: Store, key: bytes, given: str) -> str:
    """A patient key as results show it, or (a convenience) a raw PatientID hashed here."""
    given = given.strip()
    return given if _PATIENT_KEY.match(given) else patient_key(key, given)


def forget(store: Store, *, patient: str | None = None, study: str | None = None,
           keys: KeyFiles | None = None) -> dict:
    """Remove every row, vector, label and series vector of a patient or a study, for good.

    Goes through the store's writer (the FAISS index follows), rebuilds an index that can only
    hide removals, zeroes the freed database pages, and records a keyed withdrawal marker so
    a later `medsearch index` skips the patient's or study's files.
    """
    if (patient is None) == (study is None) or not (patient or study or "").strip():
        raise InputError("give exactly one of a patient key or a study UID")
    key = store_key(store, create=True, keys=keys)
    doc: dict = {"store": str(store.root)}
    if patient is not None:
        hashed = resolve_patient(store, key, patient)
        patient_keys = [hashed]
        if patient.strip() != hashed:  # a store under the keep policy holds the raw ID
            patient_keys.append(patient.strip())
        marker, doc["patient_key"] = _marker(key, "patient", hashed), hashed
        files, labels = store.sources_of(patient_keys=patient_keys)  # whole files go
    else:
        uid = study.strip()
        marker, doc["study_uid"] = _marker(key, "study", uid), uid
        files, labels = store.sources_of(study_uid=uid)
    with store.writer() as writer:  # marker and removal in one transaction
        writer.zero_freed_pages()
        writer.set_setting(marker, str(int(time.time())))
        removed = writer.remove_files([p for p, _ in files])
        writer.forget_in_cohorts(writer.removed)
    if store.count != store.index.ntotal:  # a graph index only hid them: rebuild without them
        store.rebuild(store.manifest.index_type)
    store.save()
    checkpoint(store)
    doc.update(files=len(files), images=removed, vectors=removed, labels=labels,
               series=sum(kind == "series" for _, kind in files), withdrawn=True)
    return doc


# -- path redaction ----------------------------------------------------------------------------------
class PathRedactor:
    """Results' paths without folder names (which often carry patient names or MRNs).

    ``name``: the folder becomes a stable keyed token, the file name stays
    (``f-1a2b3c4d5e6f/ct1.dcm``: files of one folder share the token); ``hash``: the whole
    path becomes one token plus its extension (``p-9f8e7d6c5b4a3f2e1d0c.dcm``). Tokens are
    keyed with the store's patient-key secret, so they cannot be reversed by guessing names.
    """

    def __init__(self, store: Store, mode: str, keys: KeyFiles | None = None) -> None:
        if mode not in REDACT_MODES:
            raise InputError(f"redact_paths must be one of {', '.join(REDACT_MODES)}, not {mode!r}")
        self.store, self.mode, self.keys = store, mode, keys
        self._key: bytes | None = None

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def _token(self, kind: str, value: str, length: int) -> str:
        if self._key is None:
            key = store_key(self.store, keys=self.keys)
            if key is None:
                raise KeyFileError(f"path redaction needs the patient-key file of store "
                                   f"{self.store.root}, and it has none yet; index with a "
                                   "writable store first")
            self._key = key
        return hmac.new(self._key, f"redact {kind}\0{value}".encode(),
                        hashlib.sha256).hexdigest()[:length]

    def __call__(self, path: str) -> str:
        if self.mode == "none":
            return path
        if self.mode == "hash":
            suffix = PurePosixPath(path).suffix
            suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", suffix) else ""
            return f"p-{self._token('path', path, 20)}{suffix}"
        folder, sep, name = path.rpartition("/")
        if not sep:
            return path  # e.g. series:<uid>: no folder
        return f"f-{self._token('folder', folder, 12)}/{name}"

    def row(self, row: dict) -> dict:
        """A stored row (``Store.rows``) with its path redacted."""
        return {**row, "path": self(row["path"])} if self.active else row
