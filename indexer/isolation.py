"""Decoding untrusted bytes (server uploads) in a separate process with hard limits.

The geometry limits (:mod:`indexer.limits`) refuse what a header declares; this is the second
wall for what they cannot foresee (a decoder bug, a codestream that lies about its size): the
decode runs in a fresh process forked from a fork server that has the decoders imported
(0.1–0.2 s an upload once the fork server runs: see :func:`prestart`), under ``RLIMIT_AS``
(its address space may grow by ``memory_bytes`` at most) and a wall-clock limit. A crafted
file then costs one child process, never the server: a MemoryError comes back as the file's
error, a crash or an overrun as a clear reason.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import resource
import signal
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .decode import Decoded, DecodeOptions
    from .sources import SourceFile

#: How far one upload's decode may grow the child's address space above what it starts with
#: (the imported decoders and torch). A 5k × 6k 16-bit mammogram needs ~0.4 GB; a frame at
#: MAX_FRAME_PIXELS 1.3 GB (grey) to 3.6 GB (RGB, estimated generously).
UPLOAD_MEMORY_BYTES = 3 << 30
#: Wall-clock seconds one upload may take to decode.
UPLOAD_TIMEOUT_S = 60.0

_context = None


def _fork_context():
    """A fork server with the decoders preloaded, so each child starts in milliseconds."""
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["indexer.decode", "indexer.isolation"])  # if not yet running
        _context = ctx
    return _context


def _vm_bytes() -> int:
    """This process's current address-space size (VmSize), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def limit_memory(extra_bytes: int) -> None:
    """Cap this process's address space at its current size plus ``extra_bytes``."""
    base = _vm_bytes()
    if base:
        limit = base + extra_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _child(conn: Connection, source: "SourceFile", options: "DecodeOptions",
           content: bytes | None, memory_bytes: int) -> None:
    from .decode import decode_source

    try:
        import torch

        torch.set_num_threads(1)  # one upload, one core: fewer thread stacks and arenas
        limit_memory(memory_bytes)
        decoded = decode_source(source, options, content)
        decoded.metadata = {}  # an upload's header stays in the child
        conn.send(decoded)
    finally:
        conn.close()


def decode_isolated(source: "SourceFile", options: "DecodeOptions", *,
                    content: bytes | None = None, memory_bytes: int = UPLOAD_MEMORY_BYTES,
                    timeout_s: float = UPLOAD_TIMEOUT_S) -> "Decoded":
    """``decode_source`` (of the file, or of ``content``: its bytes, sent to the child) in a
    child process under memory and time limits; never raises for bad input: a crash, an
    overrun or running out of memory becomes ``error``."""
    from .decode import Decoded

    # not daemonic: the decode may itself run GDCM in a child (call_limited); killed after
    try:
        return _in_child(_fork_context(), _child, (source, options, content, memory_bytes),
                         timeout_s)
    except LimitedCallFailed as exc:
        if not exc.crashed:
            return Decoded(source, error=f"decoding took longer than {timeout_s:.0f} s: refused")
        return Decoded(source, error="the decoder crashed on this file (its process died"
                                     f", exit code {exc.exitcode})")


class LimitedCallFailed(Exception):
    """A call run in a limited child crashed (``crashed``, with its ``exitcode``), overran or
    raised; the message says which."""

    def __init__(self, message: str, *, crashed: bool = False,
                 exitcode: int | None = None) -> None:
        super().__init__(message)
        self.crashed, self.exitcode = crashed, exitcode


def _in_child(ctx, target: Callable, args: tuple, timeout_s: float) -> Any:
    """``target(conn, *args)`` in a child process; what it sends back on ``conn`` within
    ``timeout_s``. The child is killed afterwards whatever happened."""
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=target, args=(send, *args))
    process.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise LimitedCallFailed(f"took longer than {timeout_s:.0f} s")
        try:
            return receive.recv()
        except (EOFError, OSError):  # the child died before it could answer
            process.join(5)
            raise LimitedCallFailed(f"crashed (its process died, exit code {process.exitcode})",
                                    crashed=True, exitcode=process.exitcode) from None
    finally:
        receive.close()
        if process.is_alive():
            process.kill()
        process.join()


#: The signals a crashing C library dies by.
FATAL_SIGNALS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL)


def die_plainly() -> None:
    """Let this forked child die by a C library's abort or fault instead of running crash
    handlers inherited from the parent: faulthandler's traceback dump, or a fuzzer's handler,
    which would record the parent's input as a crash although the parent lives on."""
    faulthandler.disable()
    for number in FATAL_SIGNALS:
        try:
            signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):  # not settable here: the inherited handler stays
            pass


def _answer(conn: Connection, func: Callable, args: tuple) -> None:
    try:
        conn.send((True, func(*args)))
    except MemoryError:
        conn.send((False, "out of memory (over its memory limit)"))
    except BaseException as exc:  # anything at all becomes the caller's error
        conn.send((False, str(exc) or type(exc).__name__))


def _call_child(conn: Connection, func: Callable, args: tuple, memory_bytes: int) -> None:
    try:
        die_plainly()
        limit_memory(memory_bytes)
        # A fresh thread: a forked child's main stack is a copy of the caller's, so a C++
        # exception escaping the library could be caught by a C++ frame there (an embedding
        # host's, a fuzzer's) and the child would carry on as its parent. With no such frame
        # on the thread's stack it ends in std::terminate: an abort, reported as a crash.
        thread = threading.Thread(target=_answer, args=(conn, func, args), name="limited-call")
        thread.start()
        thread.join()
    finally:
        conn.close()


def call_limited(func: Callable, args: tuple, *, memory_bytes: int, timeout_s: float) -> Any:
    """``func(*args)`` in a forked child under RLIMIT_AS (+``memory_bytes``) and a time limit,
    for a C library that re-parses untrusted data and allocates what it claims (GDCM).
    Raises :class:`LimitedCallFailed` when the child raises, crashes or overruns."""
    ok, value = _in_child(multiprocessing.get_context("fork"), _call_child,
                          (func, args, memory_bytes), timeout_s)
    if not ok:
        raise LimitedCallFailed(value)
    return value


def _nothing() -> None:
    return None


def prestart() -> None:
    """Start the fork server now (it imports the decoders: seconds) so the first upload does
    not wait for it; a server calls this at start-up. Safe to call more than once."""
    process = _fork_context().Process(target=_nothing, daemon=True)
    process.start()
    process.join()
