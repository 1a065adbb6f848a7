"""Replay recorded kube-apiserver exchanges over real HTTP, for adapter tests.

``ApiserverReplay`` is a small ``http.server.ThreadingHTTPServer`` on 127.0.0.1 (port 0, so
the OS picks a free one) that answers requests from recorded exchanges, in the format of
``../shared/fixtures/kube-apiserver/`` (see its README): one dict per exchange with
``request {method, path, headers, body}`` and ``response {status, headers, body}``.

Matching. Each incoming request is answered by the FIRST exchange, in load order, that has
not been used yet and whose method and path match. Each exchange answers once. Paths match
when:

- the path part (before ``?``) is equal after percent-decoding;
- the query parameters are equal as a multiset after percent-decoding (so order and
  ``%2F`` vs ``/`` do not matter), with two documented tolerances:

  * parameters named in ``ignored_params`` are dropped on both sides before comparing. The
    default is ``{"timeoutSeconds"}``: it only bounds how long a real server keeps a watch
    open, and a replayed watch ends when its recorded events run out, so its value carries
    no meaning here. Pass ``ignored_params=frozenset()`` to compare it too.
  * boolean parameters (``watch``, ``allowWatchBookmarks``, ``sendInitialEvents``,
    ``force``) compare by truth value: the recorder sent ``watch=1``, the Python client
    sends ``watch=true``; both mean the same to the apiserver.

  Any other extra or missing parameter (``watch`` itself, ``resourceVersion``,
  ``labelSelector``, ``limit``, ``continue`` ...) makes the request unmatched.

The request body is NOT part of matching; every received request is recorded (method, raw
path, headers with lower-cased names, parsed JSON body or raw text, and the name of the
exchange that answered it) in ``requests`` so a test can assert on what was sent.

Responses. A watch exchange (request query ``watch`` true) streams its recorded events as
newline-delimited JSON with chunked transfer encoding, one chunk per event, then ends the
stream. An exchange dict may carry an optional ``"replay"`` key (never present in the
recorded files) with ``{"event_delay_s": float, "hold_open_s": float}``: a pause before
each event, and how long to keep the stream open after the last one (until the server stops
or the client goes away), to mimic an idle watch. Other responses are sent whole with their
recorded status, ``Content-Type`` and JSON body.

Unmatched requests get ``404`` with a ``Status`` body whose message names the request, and
are recorded with ``exchange=None``; ``unmatched`` lists them and ``assert_all_matched()``
fails on them. The ``apiserver_replay`` pytest fixture (a factory) does that check for every
server it started, at teardown, so a request a test did not expect cannot pass silently as
a 404 that an adapter turned into ``NotFound``.

Concurrency: the server answers each connection in its own daemon thread; the exchange list
and the request log are guarded by one lock. ``api_client()`` returns a
``kubernetes.client.ApiClient`` for ``http://127.0.0.1:PORT`` with no auth; ``stop()``
closes the clients it made and shuts the server down.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import kubernetes.client
import pytest

DEFAULT_IGNORED_PARAMS: frozenset[str] = frozenset({"timeoutSeconds"})
BOOL_PARAMS: frozenset[str] = frozenset(
    {"watch", "allowWatchBookmarks", "sendInitialEvents", "force"}
)
_TRUE = {"1", "true", "True", "TRUE"}
_FALSE = {"0", "false", "False", "FALSE"}

ExchangeSource = str | Path | Mapping[str, Any]


@dataclass
class Exchange:
    """One recorded request/response pair, ready to serve."""

    name: str
    method: str
    path: str
    request: dict[str, Any]
    response: dict[str, Any]
    event_delay_s: float = 0.0
    hold_open_s: float = 0.0
    used: bool = False

    @property
    def is_watch(self) -> bool:
        return _is_watch(self.path)


@dataclass
class ReceivedRequest:
    """A request the replay server received, as a test wants to see it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    exchange: str | None = None
    query: dict[str, list[str]] = field(default_factory=dict)


def load_exchange(source: ExchangeSource, base_dir: Path | None = None) -> Exchange:
    """Build an Exchange from a fixture file name/path or from an exchange dict (deep-copied)."""
    if isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
        name = str(data.get("name", f"{data['request']['method']} {data['request']['path']}"))
    else:
        path = Path(source)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        data = json.loads(path.read_text())
        name = path.name
    extra = data.get("replay") or {}
    return Exchange(
        name=name,
        method=data["request"]["method"].upper(),
        path=data["request"]["path"],
        request=data["request"],
        response=data["response"],
        event_delay_s=float(extra.get("event_delay_s", 0.0)),
        hold_open_s=float(extra.get("hold_open_s", 0.0)),
    )


def read_exchange(name: str, base_dir: Path) -> dict[str, Any]:
    """Load a fixture file as a plain dict, for a test that derives a variant from it."""
    return json.loads((base_dir / name).read_text())


def _normalise_value(key: str, value: str) -> str:
    if key in BOOL_PARAMS:
        if value in _TRUE:
            return "true"
        if value in _FALSE:
            return "false"
    return value


def normalise_path(
    path: str, ignored_params: frozenset[str]
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The comparable form of a path with query: decoded path, sorted decoded parameters."""
    parts = urlsplit(path)
    params = [
        (key, _normalise_value(key, value))
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
        if key not in ignored_params
    ]
    return unquote(parts.path), tuple(sorted(params))


def _is_watch(path: str) -> bool:
    query = dict(parse_qsl(urlsplit(path).query, keep_blank_values=True))
    return query.get("watch") in _TRUE


def _query_lists(path: str) -> dict[str, list[str]]:
    query: dict[str, list[str]] = {}
    for key, value in parse_qsl(urlsplit(path).query, keep_blank_values=True):
        query.setdefault(key, []).append(value)
    return query


def _parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _not_found_status(method: str, path: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"apiserver replay: no unused recorded exchange matches {method} {path}",
        "reason": "NotFound",
        "code": 404,
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ReplayHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `requests`
        return

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        received = ReceivedRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=_parse_body(raw),
            query=_query_lists(self.path),
        )
        exchange = self.server.replay.claim(received)
        if exchange is None:
            self._send_json(404, _not_found_status(self.command, self.path))
        elif exchange.is_watch and isinstance(exchange.response.get("body"), list):
            self._stream_watch(exchange)
        else:
            self._send_json(int(exchange.response["status"]), exchange.response.get("body"))

    def _send_json(self, status: int, body: Any) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _stream_watch(self, exchange: Exchange) -> None:
        self.send_response(int(exchange.response["status"]))
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        stopping = self.server.replay.stopping
        try:
            for event in exchange.response["body"]:
                if exchange.event_delay_s and stopping.wait(exchange.event_delay_s):
                    break
                self._write_chunk(json.dumps(event).encode() + b"\n")
            if exchange.hold_open_s:
                stopping.wait(exchange.hold_open_s)
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class _ReplayHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, replay: ApiserverReplay) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replay = replay


class ApiserverReplay:
    """A local HTTP server answering from recorded kube-apiserver exchanges (see module doc)."""

    def __init__(
        self,
        exchanges: Iterable[ExchangeSource] = (),
        *,
        base_dir: Path | None = None,
        ignored_params: frozenset[str] = DEFAULT_IGNORED_PARAMS,
    ) -> None:
        self.base_dir = base_dir
        self.ignored_params = ignored_params
        self.exchanges: list[Exchange] = []
        self.requests: list[ReceivedRequest] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._server: _ReplayHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._clients: list[kubernetes.client.ApiClient] = []
        self.allow_unmatched = False
        self.add(*exchanges)

    # -- set-up -------------------------------------------------------------------------
    def add(self, *exchanges: ExchangeSource) -> ApiserverReplay:
        """Append exchanges (file names relative to base_dir, paths, or exchange dicts)."""
        loaded = [load_exchange(source, self.base_dir) for source in exchanges]
        with self._lock:
            self.exchanges.extend(loaded)
        return self

    def start(self) -> ApiserverReplay:
        self._server = _ReplayHTTPServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="apiserver-replay",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for api_client in self._clients:
            api_client.close()
        self._clients.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ApiserverReplay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- client side --------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("apiserver replay is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def api_client(self) -> kubernetes.client.ApiClient:
        """A kubernetes ApiClient pointed at this server, with no authentication."""
        configuration = kubernetes.client.Configuration(host=self.url)
        api_client = kubernetes.client.ApiClient(configuration)
        self._clients.append(api_client)
        return api_client

    # -- matching -----------------------------------------------------------------------
    def claim(self, received: ReceivedRequest) -> Exchange | None:
        """Record a received request and mark the exchange that answers it as used."""
        wanted = normalise_path(received.path, self.ignored_params)
        with self._lock:
            self.requests.append(received)
            for exchange in self.exchanges:
                if exchange.used or exchange.method != received.method:
                    continue
                if normalise_path(exchange.path, self.ignored_params) == wanted:
                    exchange.used = True
                    received.exchange = exchange.name
                    return exchange
        return None

    # -- assertions ---------------------------------------------------------------------
    @property
    def unmatched(self) -> list[ReceivedRequest]:
        with self._lock:
            return [r for r in self.requests if r.exchange is None]

    @property
    def unused(self) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if not e.used]

    def served(self) -> list[str]:
        """Names of the exchanges that answered requests, in order."""
        with self._lock:
            return [r.exchange for r in self.requests if r.exchange is not None]

    def requests_for(self, exchange_name: str) -> list[ReceivedRequest]:
        with self._lock:
            return [r for r in self.requests if r.exchange == exchange_name]

    def assert_all_matched(self) -> None:
        missing = self.unmatched
        if missing:
            lines = "\n".join(f"  {r.method} {r.path}" for r in missing)
            raise AssertionError(f"requests with no recorded exchange:\n{lines}")

    def assert_all_used(self) -> None:
        left = self.unused
        if left:
            lines = "\n".join(f"  {e.name}: {e.method} {e.path}" for e in left)
            raise AssertionError(f"recorded exchanges never requested:\n{lines}")

    def wait_for_requests(self, count: int, timeout_s: float = 5.0) -> bool:
        """Wait until at least `count` requests arrived (for tests of background threads)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return True
            time.sleep(0.01)
        return False


ReplayFactory = Callable[..., ApiserverReplay]


@pytest.fixture
def apiserver_replay(fixtures_dir: Path) -> Iterator[ReplayFactory]:
    """Factory: ``apiserver_replay("0130-....json", exchange_dict, ...)`` -> started server.

    File names resolve against ``fixtures_dir / "kube-apiserver"``. Keyword arguments go to
    ``ApiserverReplay``. At teardown every server is stopped and the test fails if any of
    them received a request it had no exchange for (set ``server.allow_unmatched = True``
    on a server to opt out).
    """
    servers: list[ApiserverReplay] = []

    def start(*exchanges: ExchangeSource, **kwargs: Any) -> ApiserverReplay:
        kwargs.setdefault("base_dir", fixtures_dir / "kube-apiserver")
        server = ApiserverReplay(exchanges, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    for server in servers:
        if not server.allow_unmatched:
            server.assert_all_matched()


@pytest.fixture
def kube_fixture(fixtures_dir: Path) -> Callable[[str], dict[str, Any]]:
    """Load a kube-apiserver fixture file as a dict (to read expectations or derive variants)."""

    def load(name: str) -> dict[str, Any]:
        return read_exchange(name, fixtures_dir / "kube-apiserver")

    return load
