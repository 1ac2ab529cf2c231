"""Errors a user can act on; the CLI prints their message instead of a traceback."""


class MedsearchError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ModelUnavailableError(MedsearchError):
    """The checkpoint cannot be loaded (missing, gated, offline, not a SigLIP)."""


class StoreError(MedsearchError):
    """The store is missing, damaged or belongs to another model."""


class InputError(MedsearchError):
    """A file or argument cannot be used; the message names it."""


_NO_SPACE = (28, 122)  # ENOSPC, EDQUOT
_IO_ERROR = 5          # EIO


def storage_error(root, exc: BaseException) -> StoreError | None:
    """The user-facing error for a failed write to the store at ``root``, or None when
    ``exc`` is not a storage fault. SQLite says "database or disk is full" for ENOSPC but
    only "disk I/O error" when it cannot grow its shared-memory file, so a full file system
    is recognised by its free space as well."""
    import os

    text = str(getattr(exc, "orig", None) or exc)
    errno = getattr(exc, "errno", None)
    if errno is None and not any(s in text for s in ("disk is full", "disk I/O error",
                                                       "No space left", "Input/output error")):
        return None
    try:
        st = os.statvfs(root if os.path.isdir(root) else os.path.dirname(os.fspath(root)) or ".")
        full = st.f_bavail * st.f_frsize < 1 << 20
    except OSError:
        full = False
    if errno in _NO_SPACE or "disk is full" in text or "No space left" in text or full:
        return StoreError(
            f"store {root}: disk full (no space left on device) while writing. Everything "
            "committed before stays in the store and searchable; free some space (or index "
            "into a --store on a larger disk) and run the same command again: it resumes "
            "where this one stopped.")
    if errno == _IO_ERROR or "I/O error" in text:
        return StoreError(
            f"store {root}: I/O error while writing ({text}). Check the disk (dmesg, SMART); "
            "committed work is kept and the same command resumes once the disk is healthy.")
    return None
