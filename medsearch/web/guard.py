"""The guard in front of every route (Host/Origin allowlist, token, body limit, last-resort
errors) and the checks that decide whether a server may be exposed at all.

Only the Host names in the allowlist are served (loopback names, the bound address,
``--allowed-host``; others get 421 before any route runs, so a page that rebinds its DNS name to
127.0.0.1 reads nothing) and requests whose Origin names another site get 403; a bearer token
(or HTTP Basic with the token as password, for browsers) guards every route but ``/health``
when set; bodies over the upload limit are answered 413 from Content-Length or as soon as the
streamed count passes it; errors are JSON without tracebacks; query text, request data and
exception messages are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import socket
import time
import traceback

from retrieval.errors import InputError

from .errors import error_response
from .metrics import Metrics, method_label

log = logging.getLogger("medsearch.web")

#: Host names a loopback server answers to when not told otherwise (DNS rebinding).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MIN_TOKEN_LENGTH = 16


class BodyTooLarge(Exception):
    """Raised from the guarded receive when the streamed body passes the limit."""


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header (or an Origin's authority) → (lower-case name, port); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":")
    if not name or (port and not port.isdigit()) or len(port) > 5:
        return None
    return name, (int(port) if port else None)


class HostPolicy:
    """Which ``Host`` names this server answers to (defence against DNS rebinding).

    A page on evil.example whose name an attacker re-points at 127.0.0.1 reaches a loopback
    server from the user's browser, but its requests still say ``Host: evil.example``: only
    the names listed here are served. An entry ``name`` admits any port, ``name:port`` that
    port only; ``*`` admits every host (the token is then the only guard).
    """

    def __init__(self, allowed: list[str] | None = None) -> None:
        entries = list(LOOPBACK_HOSTS) + list(allowed or [])  # loopback names are always ours
        self.any = "*" in entries
        self.names: set[str] = set()
        self.pairs: set[tuple[str, int]] = set()
        for entry in entries:
            if entry == "*":
                continue
            parsed = split_host(entry if ":" not in entry or entry.startswith("[")
                                or entry.count(":") == 1 else f"[{entry}]")
            if parsed is None:
                raise ValueError(f"not a host name or host:port: {entry!r}")
            name, port = parsed
            (self.names.add(name) if port is None else self.pairs.add((name, port)))

    def admits(self, host: str) -> bool:
        if self.any:
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        return self._known(*parsed, default_port=80)

    def admits_origin(self, origin: str) -> bool:
        """An Origin header (scheme://host[:port]) that names one of our hosts."""
        scheme, sep, authority = origin.strip().partition("://")
        if not sep or scheme.lower() not in ("http", "https") or "/" in authority:
            return False
        if self.any:
            return True
        parsed = split_host(authority)
        if parsed is None:
            return False
        return self._known(*parsed, default_port=443 if scheme.lower() == "https" else 80)

    def _known(self, name: str, port: int | None, default_port: int) -> bool:
        """An allowed name, with any port or with the port it was allowed with."""
        return name in self.names or (name, port or default_port) in self.pairs


class Guard:
    """Outermost app middleware; pure ASGI so it can refuse a body before it is read."""

    OPEN_PATHS = {"/health"}

    def __init__(self, app, *, token: str | None, max_body: int, metrics: Metrics,
                 hosts: HostPolicy | None = None) -> None:
        self.app, self.token, self.max_body, self.metrics = app, token, max_body, metrics
        self.hosts = hosts or HostPolicy()

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credential = value.partition(" ")
        credential = credential.strip()
        if scheme.lower() == "basic":  # browsers: any user name, the token as password
            try:
                credential = base64.b64decode(credential, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credential.encode(), self.token.encode())

    async def _send_error(self, send, status: int, message: str, kind: str,
                          headers: dict | None = None) -> None:
        response = error_response(status, message, kind, headers)
        await send({"type": "http.response.start", "status": status,
                    "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        state = {"status": 500, "started": False, "rejected": False}

        async def finish(route: str) -> None:
            self.metrics.requests.labels(route, method_label(scope["method"]),
                                         str(state["status"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

        # Before anything else (auth included): a request for a host we are not is answered
        # with nothing but the refusal.
        host = headers.get(b"host")
        if host is None or not self.hosts.admits(host.decode("latin-1")):
            state["status"] = 400 if host is None else 421
            self.metrics.rejected.labels("host").inc()
            await self._send_error(
                send, state["status"],
                "the request has no Host header" if host is None else
                "this server does not answer to that Host name (a web page on another site "
                "may be trying to reach it); a reverse proxy's name is added to the server's "
                "allowed hosts", "MisdirectedRequest")
            await finish("rejected")
            return
        origin = headers.get(b"origin")
        if origin is not None and not self.hosts.admits_origin(origin.decode("latin-1")):
            state["status"] = 403
            self.metrics.rejected.labels("origin").inc()
            await self._send_error(send, 403, "cross-site requests are refused (the Origin "
                                   "header names another site)", "Forbidden")
            await finish("rejected")
            return

        if self.token and scope["path"] not in self.OPEN_PATHS and not self._authorised(headers):
            # The page and its files ask a browser for the token with its own login prompt.
            page = scope["path"] == "/" or scope["path"].startswith("/static/")
            browser = page or b"text/html" in headers.get(b"accept", b"")
            challenge = 'Basic realm="medsearch"' if browser else 'Bearer realm="medsearch"'
            state["status"] = 401
            self.metrics.rejected.labels("unauthorised").inc()
            await self._send_error(send, 401, "missing or wrong token: send "
                                   "'Authorization: Bearer <token>'", "Unauthorized",
                                   {"WWW-Authenticate": challenge})
            await finish("unauthorised")
            return
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                state["status"] = 400
                await self._send_error(send, 400, "invalid Content-Length", "BadRequest")
                await finish("invalid")
                return
            if int(length) > self.max_body:
                state["status"] = 413
                self.metrics.rejected.labels("too_large").inc()
                await self._send_error(send, 413, self._too_large(), "PayloadTooLarge")
                await finish("too_large")
                return
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    state["rejected"] = True
                    raise BodyTooLarge()
            return message

        async def watched_send(message) -> None:
            if state["rejected"]:
                return  # the app's answer to a body we cut off is replaced by the 413
            if message["type"] == "http.response.start":
                state["started"] = True
                state["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            pass
        except Exception as exc:
            # The exception's text may quote request data (SQL parameters, a path glob, a
            # query): log where it happened and its type, never its message.
            log.error("unhandled error on %s %s: %s (message withheld: it may quote request "
                      "data)\n%s", method_label(scope["method"]), route_of(scope),
                      type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
            if not state["started"] and not state["rejected"]:
                state["status"] = 500
                await self._send_error(send, 500, "internal error; the server log has details",
                                       "InternalError")
        if state["rejected"]:
            state["status"] = 413
            self.metrics.rejected.labels("too_large").inc()
            await self._send_error(send, 413, self._too_large(), "PayloadTooLarge")
        await finish(route_of(scope))

    def _too_large(self) -> str:
        return f"request body over the upload limit of {self.max_body} bytes"


def route_of(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"



# -- exposure: whether and to whom a server may answer --------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(value: str | None) -> str | None:
    """The token as given (--token or MEDSEARCH_TOKEN) without surrounding white space; None
    when not given. A blank one is kept as "" so that check_exposure can refuse it."""
    return None if value is None else value.strip()


def check_exposure(host: str, token: str | None, allowed_hosts: list[str] | None = None) -> None:
    """Refuse to expose an archive without a token, or with a guessable one."""
    if token is not None and not token.strip():
        raise InputError("the token is blank (empty or only spaces); set a real one, e.g. "
                         "python -c 'import secrets; print(secrets.token_urlsafe(32))', or unset "
                         "MEDSEARCH_TOKEN / drop --token for a loopback-only server")
    token = read_token(token)
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise InputError(f"the token is too short ({len(token)} characters); use at least "
                         f"{MIN_TOKEN_LENGTH}, e.g. python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))'")
    if not is_loopback(host) and not token:
        raise InputError(
            f"refusing to listen on {host} without a token: anyone who can reach that address "
            "could search the archive. Set --token or MEDSEARCH_TOKEN (at least "
            f"{MIN_TOKEN_LENGTH} characters), or keep the default --host 127.0.0.1.")
    if "*" in (allowed_hosts or []) and not token:
        raise InputError("--allowed-host '*' answers every Host name, which lets any web page "
                         "reach the archive through a browser (DNS rebinding); it needs a token")


def default_allowed_hosts(host: str, port: int) -> list[str]:
    """The Host names a server bound to ``host:port`` answers to unless told more: the loopback
    names and the bound address (with the port); for a wildcard bind also this machine's names
    and addresses, as clients on the network know it."""
    names = ["localhost", "127.0.0.1", "::1"]
    bound = host.strip("[]")
    try:
        wildcard = ipaddress.ip_address(bound).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard and bound.lower() not in names:
        names.append(f"[{bound}]:{port}" if ":" in bound else f"{bound}:{port}")
    if wildcard:
        machine = {socket.gethostname(), socket.getfqdn()}
        try:
            machine |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
        names += sorted(name.lower() for name in machine if name)
    return names


class PathOnlyAccessLog(logging.Filter):
    """Access log lines keep the path and drop the query string (it may carry request data)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = args[:2] + (args[2].split("?", 1)[0],) + args[3:]
        return True
