"""The error vocabulary of the core: what went wrong, in the user's terms; the CLI maps it to
exit codes and the web app to HTTP statuses, each in one table."""

import errno
import os


class MedsearchError(Exception):
    """Base class: the message says what went wrong and what to do, in the user's terms
    (settings and inputs by name, never a command-line flag: the server shows it too).

    ``setting`` names the setting at fault, if one is (``device``, ``precision`` …), so that
    the command line can name its option and the server its field."""

    def __init__(self, message: str = "", *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class InputError(MedsearchError):
    """A file or argument cannot be used; the message names it."""


class NotFoundError(InputError):
    """What the request names (an id, a file, a stored source) does not exist."""


class ConflictError(InputError):
    """What the request would create exists already (e.g. a cohort's name)."""


class UndecodableImageError(InputError):
    """The file is there but holds no image that can be decoded."""


class StoreError(MedsearchError):
    """The store is missing, damaged, busy or cannot be written."""


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock (a caller may wait and try again)."""


class ModelMismatchError(StoreError):
    """The store's vectors come from another model than the one asked for."""


class ModelUnavailableError(MedsearchError):
    """The checkpoint cannot be loaded (missing, gated, offline, not a SigLIP)."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def storage_error(root, exc: BaseException) -> StoreError | None:
    """The user-facing error for a failed write to the store at ``root``, or None when
    ``exc`` is not a storage fault. SQLite says "database or disk is full" for ENOSPC but
    only "disk I/O error" when it cannot grow its shared-memory file, so a full file system
    is recognised by its free space as well."""
    text = str(getattr(exc, "orig", None) or exc)
    code = getattr(exc, "errno", None)
    if code is None and not any(s in text for s in ("disk is full", "disk I/O error",
                                                       "No space left", "Input/output error")):
        return None
    try:
        st = os.statvfs(root if os.path.isdir(root) else os.path.dirname(os.fspath(root)) or ".")
        full = st.f_bavail * st.f_frsize < 1 << 20
    except OSError:
        full = False
    if code in _NO_SPACE or "disk is full" in text or "No space left" in text or full:
        return StoreError(
            f"store {root}: disk full (no space left on device) while writing. Everything "
            "committed before stays in the store and searchable; free some space (or index "
            "into a store on a larger disk) and run the same command again: it resumes "
            "where this one stopped.")
    if code == errno.EIO or "I/O error" in text:
        return StoreError(
            f"store {root}: I/O error while writing ({text}). Check the disk (dmesg, SMART); "
            "committed work is kept and the same command resumes once the disk is healthy.")
    if isinstance(exc, OSError) and code is not None:  # permissions, a vanished folder …
        return StoreError(f"store {root}: cannot use {exc.filename or root}: {exc.strerror}; "
                          "check the folder's permissions and free space, then run the command "
                          "again (committed work is kept)")
    return None
