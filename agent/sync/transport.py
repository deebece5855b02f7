"""HTTP to the Engagement API: deadlines, proxies, and one place where errors get their names.

The uploader (`agent.sync.drain`) talks to a `Transport`: a request goes in, a `Response`
comes out, or a `TransportError` says what went wrong. `HttpTransport` is the real one
(urllib3); tests of the uploader's policies hand it a fake with the same three methods. Every
urllib3 and socket exception is translated in `_translate`, so the rest of sync knows only:

- `Unreachable`: the request never reached the API (connection refused, network or host
  unreachable, DNS failure, connect timeout, TLS handshake, a proxy that is down or refuses):
  retried on the network probe schedule;
- `Interrupted`: the request was sent but no complete answer came (read timeout, reset, the
  whole-request deadline): the API may be in trouble, so the backoff applies;
- `Aborted`: `abort()` cut the request (the agent is stopping).

`sync.timeout` bounds a whole request, body included: urllib3's timeouts apply to each socket
operation, so a response trickling one byte a second would never time out. A `Deadlines`
thread shared by all projects shuts the socket down when a request outlives its budget.

Proxies (docs/sync.md, "Proxy"): `sync.proxy` if set, else the environment as curl reads it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import Timeout, parse_url

from agent import __version__, wire
from agent.tracker.model import Project

if TYPE_CHECKING:  # Protocols that urllib3 defines for type checkers only
    from urllib3._base_connection import BaseHTTPConnection

USER_AGENT = f"engagement-agent/{__version__}"
#: Answers larger than this are not read (the API's are a few KiB): a broken or hostile server
#: must not make the agent buffer without bound.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: Environment variables for proxies, in curl's order of precedence (lower case first).
PROXY_ENV = {
    "https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
    "http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
}
NO_PROXY_ENV = ("no_proxy", "NO_PROXY")


# -- outcomes ------------------------------------------------------------------------------


class TransportError(Exception):
    """A request that got no usable HTTP answer; `reason` is short, secret-free text for
    status and the journal (never the URL: it holds the project token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unreachable(TransportError):
    """The request never reached the API."""


class Interrupted(TransportError):
    """The request was sent (or may have been), but no complete answer came back."""


class Aborted(TransportError):
    """`abort()` ended the request."""


@dataclass(frozen=True)
class Request:
    """One request to the API; `timeout` bounds all of it (docs/sync.md)."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class Response:
    """An HTTP answer. `headers` has lower-case names; `date` is the `Date` header as epoch
    seconds (None if absent or malformed); `round_trip` is the monotonic seconds from sending
    to the end of the body; `sent_at` the wall time the request started."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    round_trip: float = 0.0
    sent_at: float = 0.0

    @property
    def date(self) -> float | None:
        return wire.parse_http_date(self.headers.get("date"))


class Transport(Protocol):
    """What the uploader needs from HTTP. `send` raises `TransportError` (and nothing else
    for network trouble); `abort` may be called from any thread and ends a request in flight
    with `Aborted`; `close` releases connections."""

    def send(self, request: Request) -> Response: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


# -- proxies -------------------------------------------------------------------------------


def proxy_for(url: str, configured: str, environ: Mapping[str, str]) -> str | None:
    """The proxy for `url`: `configured` (`sync.proxy`) if set, else the environment as curl
    reads it (`https_proxy`/`HTTPS_PROXY` for https URLs, `http_proxy`/`HTTP_PROXY` for http
    ones, then `ALL_PROXY`; `NO_PROXY` exempts hosts). None: connect directly.

    `sync.proxy` wins over the environment, `NO_PROXY` included: a proxy written in the
    config is meant for every project.
    """
    if configured:
        return configured
    parsed = parse_url(url)
    scheme = parsed.scheme or "https"
    proxy = next((environ[n] for n in PROXY_ENV.get(scheme, ()) if environ.get(n)), None)
    if not proxy:
        return None
    no_proxy = next((environ[n] for n in NO_PROXY_ENV if n in environ), "")
    if _exempt(parsed.host or "", parsed.port, no_proxy):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _exempt(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether `NO_PROXY` exempts `host`: `*`, the host itself, or a domain it is in (a
    leading dot optional), optionally with the port (`example.com:8080`), as curl reads it."""
    host = host.lower().strip("[]")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, sep, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if sep and entry_port != str(port):
            continue
        name = name.strip("[]").lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def _proxy_label(proxy: str) -> str:
    """How messages name a proxy: scheme, host and port, never its credentials."""
    parsed = parse_url(proxy)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.host}{port}"


# -- deadlines -----------------------------------------------------------------------------


@dataclass(eq=False)
class Deadline:
    """One armed deadline; `expired` tells the request why its socket died."""

    at: float
    on_expire: Callable[[], None]
    cancelled: bool = False
    expired: bool = False


class Deadlines:
    """Ends requests that outlive their budget: one thread for every project, asleep unless a
    request is in flight (no idle wake-ups). `arm` and `cancel` cost a lock and a heap push.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, at: float, on_expire: Callable[[], None]) -> Deadline:
        """Call `on_expire` (on the deadline thread) at monotonic time `at` unless cancelled."""
        deadline = Deadline(at, on_expire)
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="sync-deadlines", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (at, next(self._seq), deadline))
            if self._heap[0][2] is deadline:
                self._cond.notify()
        return deadline

    def cancel(self, deadline: Deadline) -> None:
        with self._cond:
            if deadline.cancelled or deadline.expired:
                return
            deadline.cancelled = True
            self._cancelled += 1
            if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(1.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                        self._cancelled -= 1
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        deadline = heapq.heappop(self._heap)[2]
                        deadline.expired = True
                        break
                    self._cond.wait(wait)
            with contextlib.suppress(Exception):  # a failing callback must not end the thread
                deadline.on_expire()


# -- the real transport --------------------------------------------------------------------


class _PoolMixin:
    """Remembers the pool's connections so `abort()` can end a request stuck in `recv`.

    urllib3 offers no way to cancel an in-flight request from another thread; shutting the
    socket down makes the blocked read fail at once.
    """

    live: weakref.WeakSet[BaseHTTPConnection]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.live = weakref.WeakSet()

    def _new_conn(self) -> Any:
        conn = super()._new_conn()  # type: ignore[misc]
        self.live.add(conn)
        return conn

    def abort(self) -> None:
        for conn in list(self.live):
            sock = getattr(conn, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _HTTPPool(_PoolMixin, urllib3.HTTPConnectionPool):
    pass


class _HTTPSPool(_PoolMixin, urllib3.HTTPSConnectionPool):
    pass


_POOL_CLASSES: dict[str, type[urllib3.HTTPConnectionPool]] = {
    "http": _HTTPPool,
    "https": _HTTPSPool,
}


class HttpTransport:
    """urllib3 with one keep-alive connection, a whole-request deadline and proxy support.

    One per project row: a hung endpoint never holds another project's connection. Thread
    use: `request` from the owning worker only; `abort` from anywhere.
    """

    def __init__(
        self,
        deadlines: Deadlines,
        *,
        proxy: str = "",
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._deadlines = deadlines
        self._proxy_setting = proxy
        self._environ: Mapping[str, str] = environ if environ is not None else {}
        self._lock = threading.Lock()
        self._manager: urllib3.PoolManager | None = None
        self._manager_proxy: str | None = None
        self._aborted = False

    def configure(self, proxy: str, environ: Mapping[str, str]) -> None:
        """New proxy settings (a reload); the next request uses them."""
        with self._lock:
            self._proxy_setting = proxy
            self._environ = environ

    def send(self, request: Request) -> Response:
        timeout = request.timeout
        manager, proxy = self._manager_for(request.url)
        started = time.monotonic()
        sent_at = time.time()
        deadline = self._deadlines.arm(started + timeout, self._expire)
        try:
            try:
                response = manager.urlopen(
                    request.method,
                    request.url,
                    body=request.body,
                    headers=dict(request.headers),
                    retries=False,
                    redirect=False,
                    timeout=Timeout(connect=timeout, read=timeout),
                    preload_content=False,
                )
                try:
                    data = response.read(MAX_RESPONSE_BYTES + 1)
                    if len(data) > MAX_RESPONSE_BYTES:
                        response.close()
                        raise Interrupted(f"the answer is larger than {MAX_RESPONSE_BYTES} bytes")
                finally:
                    response.release_conn()
            except (HTTPError, OSError) as exc:
                raise self._failure(exc, timeout, proxy, deadline) from None
        finally:
            self._deadlines.cancel(deadline)
        if deadline.expired:  # the body ended at the moment the deadline fired
            raise Interrupted(f"no complete answer within {timeout:g} s")
        answer = Response(
            response.status,
            data,
            {name.lower(): value for name, value in response.headers.items()},
            time.monotonic() - started,
            sent_at,
        )
        if proxy is not None:
            _check_proxy_answer(answer, proxy)
        return answer

    def _failure(
        self, exc: BaseException, timeout: float, proxy: str | None, deadline: Deadline
    ) -> TransportError:
        with self._lock:
            if self._aborted:
                return Aborted("the agent is stopping")
        if deadline.expired:
            return Interrupted(f"no complete answer within {timeout:g} s")
        return _translate(exc, timeout, proxy)

    def _manager_for(self, url: str) -> tuple[urllib3.PoolManager, str | None]:
        with self._lock:
            if self._aborted:
                raise Aborted("the agent is stopping")
            proxy = proxy_for(url, self._proxy_setting, self._environ)
            manager = self._manager
            if manager is not None and self._manager_proxy == proxy:
                return manager, proxy
            old, self._manager = manager, None
        if old is not None:
            old.clear()
        options: dict[str, Any] = {"num_pools": 2, "maxsize": 1, "block": False, "retries": False}
        fresh = (
            urllib3.ProxyManager(proxy, **options)
            if proxy is not None
            else urllib3.PoolManager(**options)
        )
        fresh.pool_classes_by_scheme = _POOL_CLASSES
        with self._lock:
            self._manager, self._manager_proxy = fresh, proxy
            if self._aborted:
                raise Aborted("the agent is stopping")
        return fresh, proxy

    def _expire(self) -> None:
        self._abort_connections()

    def _abort_connections(self) -> None:
        with self._lock:
            manager = self._manager
        if manager is None:
            return
        for key in list(manager.pools.keys()):
            pool = manager.pools.get(key)
            if isinstance(pool, _PoolMixin):
                pool.abort()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
        self._abort_connections()

    def close(self) -> None:
        with self._lock:
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.clear()


_TITLE = re.compile(rb"<title>\s*([^<]{1,120}?)\s*</title>", re.IGNORECASE)


def _check_proxy_answer(response: Response, proxy: str) -> None:
    """A proxy that refuses or cannot reach the API answers in its own name (tinyproxy: an
    HTML page with 403 "Access denied", 500 "Unable to connect"); the API always answers
    JSON. An error that is not JSON, through a proxy, is the proxy's: the API was not reached,
    which is not the API refusing the project's credentials."""
    if response.status < 400:
        return
    if "json" in response.headers.get("content-type", "").lower():
        return
    match = _TITLE.search(response.body[:4096])
    title = match.group(1).decode("utf-8", "replace") if match else ""
    reason = f"proxy {_proxy_label(proxy)} answered HTTP {response.status}"
    raise Unreachable(f"{reason} ({title})" if title else reason)


def _translate(exc: BaseException, timeout: float, proxy: str | None) -> TransportError:
    """Name what happened, without URLs (they hold the project token).

    Order matters: urllib3's `NewConnectionError` (refused, unreachable) is a subclass of
    `ConnectTimeoutError`, so it is checked first — a refused connection is not a timeout.
    """
    if isinstance(exc, ProxyError):
        assert proxy is not None
        inner = _translate(exc.original_error, timeout, None)
        return Unreachable(f"proxy {_proxy_label(proxy)}: {inner.reason}")
    if isinstance(exc, NameResolutionError):
        return Unreachable("cannot resolve the API's host name")
    if isinstance(exc, NewConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = getattr(cause, "strerror", None) or str(exc).rsplit(":", 1)[-1].strip()
        return Unreachable(f"cannot connect: {detail.lower() or 'connection failed'}")
    if isinstance(exc, ConnectTimeoutError):
        return Unreachable(f"connect timed out after {timeout:g} s")
    if isinstance(exc, SSLError):
        return Unreachable("TLS error: " + str(exc).split(":")[-1].strip()[:120])
    if isinstance(exc, (ReadTimeoutError, TimeoutError, socket.timeout)):
        return Interrupted(f"no answer within {timeout:g} s")
    if isinstance(exc, ProtocolError):
        if proxy is not None:
            # A proxy that cannot reach the API may answer 5xx and close at once, before it
            # read our body: the kernel then resets the connection and the answer is lost.
            # Either way the proxy hung up on us, which is the network's fault, not the API's.
            return Unreachable(f"proxy {_proxy_label(proxy)}: closed the connection unanswered")
        return Interrupted("the connection was lost before the answer")
    if isinstance(exc, OSError) and exc.strerror:
        return Interrupted(f"network error: {exc.strerror.lower()}")
    return Interrupted(f"network error: {type(exc).__name__}")


# -- the API's clock -----------------------------------------------------------------------


@dataclass(frozen=True)
class TimeSample:
    """The API's clock: `time` (epoch seconds) as read by `system/time`, the `round_trip` in
    monotonic seconds (half of it is the uncertainty), `local` the wall time at the midpoint,
    and `date` the `Date` header of the same answer."""

    time: float
    round_trip: float
    local: float
    date: float | None


class BadAnswer(TransportError):
    """The API answered, but not with what was asked for; `status` is its HTTP status."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.status = status


def fetch_time(
    transport: Transport,
    project: Project,
    timeout: float,
    observe: Callable[[Response], None] | None = None,
) -> TimeSample:
    """`GET .../system/time` for `project` (authorized like tracking; docs/tracking.md).

    `observe` sees the response whatever its status: even a refusal carries the API's `Date`.
    Raises `TransportError` (a `BadAnswer` when the API answered without a time).
    """
    url = project.base_url.rstrip("/") + wire.time_path(project.project_token)
    headers = wire.request_headers(project.authorization_token, USER_AGENT, body=False)
    response = transport.send(Request("GET", url, headers, timeout=timeout))
    if observe is not None:
        observe(response)
    value = wire.parse_time(response.body) if response.status == 200 else None
    if value is None:
        raise BadAnswer(
            f"system/time answered HTTP {response.status} without a time", response.status
        )
    return TimeSample(
        value, response.round_trip, response.sent_at + response.round_trip / 2, response.date
    )


__all__ = [
    "MAX_RESPONSE_BYTES",
    "USER_AGENT",
    "Aborted",
    "BadAnswer",
    "Deadlines",
    "HttpTransport",
    "Interrupted",
    "Request",
    "Response",
    "TimeSample",
    "Transport",
    "TransportError",
    "Unreachable",
    "fetch_time",
    "proxy_for",
]
