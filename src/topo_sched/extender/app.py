"""The kube-scheduler extender HTTP service (FastAPI): filter, prioritize, bind, explain.

Routes (``prefix`` defaults to ``/scheduler``, the ``urlPrefix`` of the scheduler's
``extenders:`` entry):

- ``POST {prefix}/filter``: ExtenderArgs -> ExtenderFilterResult. Both ``nodeCacheCapable``
  modes: ``NodeNames`` in -> surviving ``NodeNames`` out (``Nodes: null``); full ``Nodes`` in
  -> the surviving Node objects echoed back unchanged and in order (``NodeNames: null``).
  Rejections are per node (``FailedNodes`` when preemption may help,
  ``FailedAndUnresolvableNodes`` when not); ``Error`` is never used for a node problem.
- ``POST {prefix}/prioritize``: ExtenderArgs -> bare ``[{"Host", "Score"}]``, scores 0..10, one
  per distinct node, in the order given.
- ``POST {prefix}/bind``: ExtenderBindingArgs -> ``{"Error": ""}`` once the Binding exists.
- ``GET {prefix}/explain/{namespace}/{pod}[?node=N...]``: the core's per-node explanation.
- ``GET /healthz`` (200 while serving), ``GET /readyz`` (503 until the state first synced),
  ``GET /metrics`` (Prometheus text, one registry per app).

Failure policy
--------------
kube-scheduler treats any non-200 reply, or a filter reply with ``Error`` set, as an extender
error: with ``ignorable: false`` the pod waits in the unschedulable queue for up to five
minutes (see ``shared/fixtures/kube-scheduler-extender/README.md``). So a bug on our side must
not block pods:

- bad input (malformed or non-object JSON, wrong types, a missing ``Pod``, a pod the core
  cannot read, a body over ``max_body_bytes`` by ``Content-Length`` or by the bytes actually
  read): HTTP 400 with ``{"Error": "<what is wrong>"}``. Only a broken client sends these.
- an unexpected exception in the core (or in building the snapshot): logged with the pod's
  name and counted (``errors_total{kind="core_exception"}``); filter then passes every node
  and prioritize gives every node the same score (0), i.e. the extender steps aside and the
  scheduler's own plugins decide. The same neutral answer is given before the state's first
  sync (``outcome="not_ready"``); the readiness probe normally keeps traffic away until then.
- bind: any failure of the binder (API error, pod bound elsewhere, timeout) is an ``Error``
  text in a 200 reply, which makes the scheduler back off and retry the whole cycle; no
  placement is recorded for a failed bind. Binds of one pod are serialised, and the binder
  is idempotent (already bound to the same node = success), so the scheduler's retry of a
  bind that is still in flight is safe. Without a binder (snapshot mode) bind answers an
  ``Error`` saying that binding needs a live API.
- explain (a debugging aid, not called by the scheduler): 404 for an unknown pod; an
  exception in the core there is a 500 with a JSON ``Error``, so that a bug shows.

Blocking work (the core, snapshot rebuilds, the bind API call) runs in the threadpool; the
event loop only reads bodies and writes replies.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from topo_sched.extender.state import ClusterState, pod_key
from topo_sched.extender.wire import (
    MAX_EXTENDER_PRIORITY,
    ExtenderArgs,
    ExtenderBindingArgs,
    ExtenderFilterResult,
    NodeList,
    ValidationError,
    describe_validation_error,
)
from topo_sched.placement.pods import PodSpecError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "FALLBACK_SCORE", "Binder", "ExtenderMetrics", "create_app"]

#: A full-Nodes filter request is ~3.5 KB per node (captured); 64 MiB covers very large
#: clusters with ``nodeCacheCapable: false``. NodeNames mode requests are a few KB.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

#: The score every node gets when the extender steps aside (core error, not ready).
FALLBACK_SCORE = 0

#: ``binder(namespace, pod, uid, node)``: create the Binding; raise on failure. Idempotent.
Binder = Callable[[str, str, str, str], Any]

_VERBS = ("filter", "prioritize", "bind", "explain")
_CODE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,47}$")
_MAX_REASON_CODES = 32
_RECENT_PODS = 2048
#: Bodies larger than this are parsed, and replies echoing Node objects rendered, in a worker
#: thread, so that one 20 MB full-Nodes request does not stall every other request.
_OFFLOAD_BYTES = 256 * 1024


class _BadRequest(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> Any:
    # orjson is strict JSON and several times faster on a 1,000-name ExtenderArgs. When it
    # refuses a body, the stdlib parser (with NaN/Infinity refused) says what is wrong in
    # words a user can act on; bad bodies are rare, so the slow path costs nothing.
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body, parse_constant=_reject_constant)


def _render_json(content: Any) -> bytes:
    # Compact UTF-8 JSON, callable from a worker thread. orjson is ~8x faster than json on a
    # 1,000-node HostPriorityList; it also refuses NaN, as allow_nan=False does.
    return orjson.dumps(content)


async def _json_reply(content: Any, *, large: bool) -> Response:
    body = await run_in_threadpool(_render_json, content) if large else _render_json(content)
    return Response(body, media_type="application/json")


# -- metrics --------------------------------------------------------------------------------


class ExtenderMetrics:
    """The app's Prometheus metrics, in their own registry (several apps may coexist)."""

    def __init__(self, state: ClusterState, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram(
            "topo_sched_extender_request_duration_seconds",
            "Time to answer a scheduler extender request, by verb.",
            ["verb"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.requests = Counter(
            "topo_sched_extender_requests_total",
            "Extender requests by verb and outcome (ok, bad_request, fallback, not_ready, "
            "bind_error, no_binder, not_found, error).",
            ["verb", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "topo_sched_extender_errors_total",
            "Errors by kind (too_large, bad_json, bad_request, pod_spec, core_exception, "
            "bind_failed, no_binder, record_failed).",
            ["kind"],
            registry=r,
        )
        self.filtered = Counter(
            "topo_sched_extender_nodes_filtered_total",
            "Nodes removed by filter, by reason code (a bounded set) and whether preemption "
            "could help.",
            ["reason", "resolvable"],
            registry=r,
        )
        self.unknown_nodes = Counter(
            "topo_sched_extender_unknown_nodes_total",
            "Node names in requests that the extender's cluster state does not know.",
            registry=r,
        )
        self.state_age = Gauge(
            "topo_sched_extender_state_age_seconds",
            "Seconds since the cluster state last changed or was confirmed (watch event, "
            "bookmark, list, snapshot load); NaN before the first.",
            registry=r,
        )
        self.state_age.set_function(lambda: _nan_if_none(state.age_seconds()))
        self.ready = Gauge(
            "topo_sched_extender_ready",
            "1 once the cluster state has synced (or the snapshot file is loaded), else 0.",
            registry=r,
        )
        self.ready.set_function(lambda: 1.0 if state.ready else 0.0)
        objects = Gauge(
            "topo_sched_extender_state_objects",
            "Objects held in the cluster state, by kind.",
            ["kind"],
            registry=r,
        )
        objects.labels("node").set_function(lambda: state.counts()[0])
        objects.labels("pod").set_function(lambda: state.counts()[1])
        self._codes: set[str] = set()
        self._codes_lock = threading.Lock()
        for verb in _VERBS:  # export zeros so dashboards see every verb from the start
            self.latency.labels(verb)
            self.requests.labels(verb, "ok")

    def reason_label(self, code: str | None) -> str:
        """A bounded metric label for a core rejection code."""
        if not code or not _CODE_RE.match(code):
            return "other"
        with self._codes_lock:
            if code in self._codes:
                return code
            if len(self._codes) >= _MAX_REASON_CODES:
                return "other"
            self._codes.add(code)
            return code


def _nan_if_none(v: float | None) -> float:
    return math.nan if v is None else float(v)


# -- small helpers --------------------------------------------------------------------------


class _KeyedLocks:
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def acquire(self, key: str) -> threading.Lock:
        with self._lock:
            lock, users = self._locks.get(key, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[key] = (lock, users + 1)
        lock.acquire()
        return lock

    def release(self, key: str, lock: threading.Lock) -> None:
        lock.release()
        with self._lock:
            _, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class _RecentPods:
    """The last pods seen in filter/prioritize requests, for recording a bind of a pod the
    watch has not delivered yet. Bounded LRU keyed by ``namespace/name``."""

    def __init__(self, limit: int = _RECENT_PODS) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._pods: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def put(self, pod: dict[str, Any]) -> None:
        key = pod_key(pod)
        if key is None:
            return
        with self._lock:
            self._pods[key] = pod
            self._pods.move_to_end(key)
            while len(self._pods) > self._limit:
                self._pods.popitem(last=False)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._pods.get(key)


def _pod_label(pod: Any) -> str:
    if isinstance(pod, Mapping):
        key = pod_key(pod)
        if key:
            return key
    return "<unnamed pod>"


def _uid_of(pod: Mapping[str, Any]) -> str | None:
    meta = pod.get("metadata")
    uid = meta.get("uid") if isinstance(meta, Mapping) else None
    return uid if isinstance(uid, str) and uid else None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"Error": message}, status_code=status)


def _normalise_prefix(prefix: str) -> str:
    prefix = "/" + prefix.strip().strip("/")
    return "" if prefix == "/" else prefix


def _to_score(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(f):
        return None
    return max(0, min(MAX_EXTENDER_PRIORITY, round(f)))


# -- the app --------------------------------------------------------------------------------


class _Extender:
    """The request handlers' logic; one per app."""

    def __init__(
        self,
        state: ClusterState,
        engine: Any,
        *,
        max_body_bytes: int,
        binder: Binder | None,
        metrics: ExtenderMetrics,
    ) -> None:
        self.state = state
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.binder = binder
        self.metrics = metrics
        self.recent = _RecentPods()
        self.bind_locks = _KeyedLocks()

    # -- request bodies -------------------------------------------------------------------

    async def read_json(self, request: Request) -> Any:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise _BadRequest("bad_request", f"bad Content-Length {declared!r}") from None
            if n < 0:
                raise _BadRequest("bad_request", f"bad Content-Length {declared!r}")
            if n > limit:
                raise _BadRequest(
                    "too_large", f"request body of {n} bytes is over the limit of {limit} bytes"
                )
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise _BadRequest(
                        "too_large", f"request body is over the limit of {limit} bytes"
                    )
        except ClientDisconnect:
            raise _BadRequest("bad_request", "client went away while sending the body") from None
        if not body.strip():
            raise _BadRequest("bad_json", "empty request body; expected a JSON object")
        try:
            if len(body) > _OFFLOAD_BYTES:  # a full-Nodes request: do not stall the loop
                return await run_in_threadpool(_parse_json, bytes(body))
            return _parse_json(bytes(body))
        except RecursionError:
            raise _BadRequest("bad_json", "request body is nested too deeply") from None
        except UnicodeDecodeError:
            raise _BadRequest("bad_json", "request body is not UTF-8 JSON") from None
        except ValueError as e:
            raise _BadRequest("bad_json", f"request body is not valid JSON: {e}") from None

    async def read_model(self, request: Request, model: type[Any]) -> Any:
        data = await self.read_json(request)
        if not isinstance(data, dict):
            raise _BadRequest("bad_request", f"expected a JSON object, got {type(data).__name__}")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise _BadRequest("bad_request", describe_validation_error(e)) from None
        except RecursionError:
            raise _BadRequest("bad_request", "request body is nested too deeply") from None

    # -- node lists -----------------------------------------------------------------------

    @staticmethod
    def node_inputs(args: ExtenderArgs) -> tuple[list[str], list[dict[str, Any]] | None]:
        """(distinct node names in request order, the Node items when ``Nodes`` was sent)."""
        if args.Nodes is None:  # nodeCacheCapable: names only (dict keeps the first of each)
            return list(dict.fromkeys(args.NodeNames or [])), None
        names: list[str] = []
        seen: set[str] = set()
        items: list[dict[str, Any]] | None = None
        if args.Nodes is not None:
            items = list(args.Nodes.items or [])
            for i, node in enumerate(items):
                meta = node.get("metadata")
                name = meta.get("name") if isinstance(meta, dict) else None
                if not isinstance(name, str) or not name:
                    raise _BadRequest("bad_request", f"Nodes.items[{i}]: metadata.name is missing")
                if name not in seen:
                    seen.add(name)
                    names.append(name)
        for name in args.NodeNames or []:
            if name not in seen:
                seen.add(name)
                names.append(name)
        return names, items

    async def call(self, fn: Any, *args: Any) -> Any:
        """Run a verb's placement work: inline while the snapshot is current (about a
        millisecond at 1,000 nodes: a thread hop would cost as much), in the thread pool when
        a rebuild is due, so the event loop never waits on one."""
        if self.state.ready and self.state.is_current():
            return fn(*args)
        return await run_in_threadpool(fn, *args)

    # -- filter ---------------------------------------------------------------------------

    def run_filter(self, pod: dict[str, Any], names: list[str]) -> tuple[Any, str]:
        """(outcome or None for pass-all, request outcome label). Raises PodSpecError."""
        if not self.state.ready:
            return None, "not_ready"
        try:
            snap = self.state.snapshot()
            self._note_unknown("filter", pod, names, snap)
            return self.engine.filter(snap, pod, names), "ok"
        except PodSpecError:
            raise
        except Exception:
            log.exception(
                "filter: placement core failed for pod %s; passing all %d nodes",
                _pod_label(pod),
                len(names),
            )
            self.metrics.errors.labels("core_exception").inc()
            return None, "fallback"

    def _note_unknown(self, verb: str, pod: Any, names: Sequence[str], snap: Any) -> None:
        known = getattr(snap, "node_names", None)
        if known is None:
            return
        if known.issuperset(names):  # the usual case, checked at C speed
            return
        unknown = [n for n in names if n not in known]
        if unknown:
            self.metrics.unknown_nodes.inc(len(unknown))
            log.info(
                "%s: pod %s: %d node(s) not in the cluster state (neutral): %s",
                verb,
                _pod_label(pod),
                len(unknown),
                ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""),
            )

    def build_filter_result(
        self,
        args: ExtenderArgs,
        names: list[str],
        items: list[dict[str, Any]] | None,
        outcome: Any,
    ) -> tuple[ExtenderFilterResult, dict[str, str]]:
        """The reply, and node -> reason code for each rejected node."""
        if (
            outcome is not None
            and items is None
            and not outcome.failed
            and not outcome.unresolvable
            and len(outcome.passed) == len(names)
        ):
            # Fast path (most requests): the core passed every node it was given.
            result = ExtenderFilterResult(
                NodeNames=list(args.NodeNames if args.NodeNames is not None else names),
                FailedNodes={},
                FailedAndUnresolvableNodes={},
                Warnings=[str(w) for w in (outcome.warnings or [])],
            )
            return result, {}
        name_set = set(names)
        failed: dict[str, str] = {}
        unresolvable: dict[str, str] = {}
        codes: dict[str, str] = {}
        warnings: list[str] = []
        if outcome is not None:
            passed_by_core = set(outcome.passed)
            for src, dst in ((outcome.unresolvable, unresolvable), (outcome.failed, failed)):
                for node, reason in (src or {}).items():
                    if node not in name_set:
                        continue
                    if node in passed_by_core:
                        log.warning("core both passed and rejected node %s; passing it", node)
                        continue
                    if node in failed or node in unresolvable:
                        continue
                    dst[node] = str(reason)
            codes = {n: str(c) for n, c in (getattr(outcome, "codes", None) or {}).items()}
            silent = [n for n in names if n not in passed_by_core]
            silent = [n for n in silent if n not in failed and n not in unresolvable]
            if silent:
                log.warning(
                    "core gave no verdict for %d node(s) (%s); passing them",
                    len(silent),
                    ", ".join(silent[:10]),
                )
            warnings = [str(w) for w in (outcome.warnings or [])]
        rejected = failed.keys() | unresolvable.keys()
        result = ExtenderFilterResult(
            FailedNodes=failed,
            FailedAndUnresolvableNodes=unresolvable,
            Warnings=warnings,
        )
        if items is not None:
            kept = [n for n in items if n["metadata"]["name"] not in rejected]
            metadata = args.Nodes.metadata if args.Nodes is not None else None
            result.Nodes = NodeList.model_construct(metadata=metadata or {}, items=kept)
        if args.NodeNames is not None or items is None:
            result.NodeNames = [n for n in (args.NodeNames or []) if n not in rejected]
        return result, {n: codes.get(n, "") for n in rejected}

    # -- prioritize -----------------------------------------------------------------------

    def run_prioritize(self, pod: dict[str, Any], names: list[str]) -> tuple[list[dict], str]:
        if not self.state.ready:
            return self._equal(names), "not_ready"
        try:
            snap = self.state.snapshot()
            self._note_unknown("prioritize", pod, names, snap)
            raw = self.engine.prioritize(snap, pod, names)
        except PodSpecError:
            raise
        except Exception:
            log.exception(
                "prioritize: placement core failed for pod %s; equal scores for %d nodes",
                _pod_label(pod),
                len(names),
            )
            self.metrics.errors.labels("core_exception").inc()
            return self._equal(names), "fallback"
        if isinstance(raw, list) and raw and len(raw) == len(names):
            hosts, values = zip(*raw, strict=True)
            if (
                list(hosts) == names
                and set(map(type, values)) == {int}
                and min(values) >= 0
                and max(values) <= MAX_EXTENDER_PRIORITY
            ):
                # Fast path: the core answered every node, in order, with valid scores.
                return [{"Host": h, "Score": sc} for h, sc in raw], "ok"
        scores: dict[str, int] = {}
        for entry in raw or []:
            try:
                host, value = entry
            except (TypeError, ValueError):
                log.warning("core returned a malformed score entry %r; ignored", entry)
                continue
            score = _to_score(value)
            if score is None:
                log.warning("core returned score %r for node %s; using 0", value, host)
                score = 0
            elif score != value:
                log.warning("core returned score %r for node %s; using %d", value, host, score)
            scores.setdefault(str(host), score)
        missing = [n for n in names if n not in scores]
        if missing:
            log.warning(
                "core gave no score for %d node(s) (%s); using %d",
                len(missing),
                ", ".join(missing[:10]),
                FALLBACK_SCORE,
            )
        return [{"Host": n, "Score": scores.get(n, FALLBACK_SCORE)} for n in names], "ok"

    @staticmethod
    def _equal(names: list[str]) -> list[dict]:
        return [{"Host": n, "Score": FALLBACK_SCORE} for n in names]

    # -- bind -----------------------------------------------------------------------------

    def run_bind(self, args: ExtenderBindingArgs) -> tuple[str, str]:
        """(Error text, "" on success; outcome label)."""
        assert self.binder is not None
        ns, name, uid, node = args.PodNamespace, args.PodName, args.PodUID, args.Node
        key = f"{ns}/{name}"
        lock = self.bind_locks.acquire(key)
        try:
            started = time.perf_counter()
            try:
                self.binder(ns, name, uid, node)
            except Exception as e:
                self.metrics.errors.labels("bind_failed").inc()
                text = str(e) or type(e).__name__
                log.warning("bind: pod %s to node %s failed: %s", key, node, text)
                return f"binding pod {key} to node {node} failed: {text}", "bind_error"
            pod = self._pod_for_record(key, uid, ns, name)
            try:
                self.state.record_binding(pod, node)
            except Exception:
                # The pod is bound; only our bookkeeping failed. Say so, but report success.
                self.metrics.errors.labels("record_failed").inc()
                log.exception("bind: pod %s bound to %s but recording it failed", key, node)
            log.info(
                "bind: pod %s bound to node %s (%.1f ms)",
                key,
                node,
                (time.perf_counter() - started) * 1000,
            )
            return "", "ok"
        finally:
            self.bind_locks.release(key, lock)

    def _pod_for_record(self, key: str, uid: str, ns: str, name: str) -> dict[str, Any]:
        candidates = [p for p in (self.state.find_pod(ns, name), self.recent.get(key)) if p]
        for pod in candidates:  # the same incarnation first
            if not uid or _uid_of(pod) in (None, uid):
                return pod
        if candidates:
            # The apiserver binds by name (it ignores the uid), so the pod of that name is
            # what got bound; our copy is just older than the scheduler's.
            return candidates[0]
        log.info("bind: pod %s not in the cluster state yet; recording it without requests", key)
        meta: dict[str, Any] = {"name": name, "namespace": ns}
        if uid:
            meta["uid"] = uid
        return {"metadata": meta, "spec": {}}


def create_app(
    state: ClusterState,
    engine: Any,
    *,
    prefix: str = "/scheduler",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    binder: Binder | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The extender's ASGI app. ``engine`` is a ``PlacementEngine`` (or anything with its
    ``filter``/``prioritize``/``explain``); ``binder(namespace, pod, uid, node)`` creates the
    Binding (None in snapshot mode). See the module docstring for routes and failure policy."""
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    prefix = _normalise_prefix(prefix)
    metrics = ExtenderMetrics(state, registry)
    ext = _Extender(state, engine, max_body_bytes=max_body_bytes, binder=binder, metrics=metrics)
    app = FastAPI(
        title="topo-sched extender",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.extender = ext
    app.state.metrics = metrics
    app.state.cluster_state = state

    def finish(verb: str, outcome: str, started: float) -> None:
        metrics.requests.labels(verb, outcome).inc()
        metrics.latency.labels(verb).observe(time.perf_counter() - started)

    def bad_request(verb: str, e: _BadRequest, started: float) -> JSONResponse:
        metrics.errors.labels(e.kind).inc()
        finish(verb, "bad_request", started)
        log.info("%s: bad request: %s", verb, e.message)
        return _error(400, e.message)

    @app.post(f"{prefix}/filter")
    async def filter_verb(request: Request) -> Response:
        started = time.perf_counter()
        try:
            args = await ext.read_model(request, ExtenderArgs)
            names, items = ext.node_inputs(args)
        except _BadRequest as e:
            return bad_request("filter", e, started)
        pod = args.Pod
        ext.recent.put(pod)
        try:
            outcome, label = await ext.call(ext.run_filter, pod, names)
        except PodSpecError as e:
            return bad_request("filter", _BadRequest("pod_spec", str(e)), started)
        try:
            result, codes = ext.build_filter_result(args, names, items, outcome)
        except Exception:
            # A bug of ours in reading the core's answer: step aside, as for a core error.
            log.exception("filter: pod %s: bad core outcome; passing all nodes", _pod_label(pod))
            metrics.errors.labels("core_exception").inc()
            outcome, label = None, "fallback"
            result, codes = ext.build_filter_result(args, names, items, None)
        for node, code in codes.items():
            metrics.filtered.labels(
                metrics.reason_label(code),
                "false" if node in result.FailedAndUnresolvableNodes else "true",
            ).inc()
        elapsed = (time.perf_counter() - started) * 1000
        n_failed = len(result.FailedNodes)
        n_unres = len(result.FailedAndUnresolvableNodes)
        log.info(
            "filter: pod %s rbg=%s nodes=%d passed=%d failed=%d unresolvable=%d%s (%s, %.1f ms)",
            _pod_label(pod),
            getattr(outcome, "is_rbg", None),
            len(names),
            len(names) - n_failed - n_unres,
            n_failed,
            n_unres,
            _code_summary(codes),
            label,
            elapsed,
        )
        if log.isEnabledFor(logging.DEBUG):
            for node, reason in result.FailedNodes.items():
                log.debug("filter: pod %s node %s failed: %s", _pod_label(pod), node, reason)
            for node, reason in result.FailedAndUnresolvableNodes.items():
                log.debug(
                    "filter: pod %s node %s failed (unresolvable): %s",
                    _pod_label(pod),
                    node,
                    reason,
                )
        for w in result.Warnings:  # e.g. a bad per-RBG annotation; defaults were used
            log.info("filter: pod %s: %s", _pod_label(pod), w)
        reply = await _json_reply(result.to_wire(), large=bool(result.Nodes and items))
        finish("filter", label, started)
        return reply

    @app.post(f"{prefix}/prioritize")
    async def prioritize_verb(request: Request) -> Response:
        started = time.perf_counter()
        try:
            args = await ext.read_model(request, ExtenderArgs)
            names, _items = ext.node_inputs(args)
        except _BadRequest as e:
            return bad_request("prioritize", e, started)
        pod = args.Pod
        ext.recent.put(pod)
        try:
            scores, label = await ext.call(ext.run_prioritize, pod, names)
        except PodSpecError as e:
            return bad_request("prioritize", _BadRequest("pod_spec", str(e)), started)
        # One INFO line per pod comes from filter (with its rejections) and one from bind
        # (the node chosen); prioritize's line is DEBUG unless something was off. Two log
        # writes per request measurably lengthen the scheduler's cycle at 1,000 nodes.
        level = logging.DEBUG if label == "ok" else logging.INFO
        if log.isEnabledFor(level):
            best_text = ""
            if scores:
                best = max(scores, key=operator.itemgetter("Score"))
                best_text = f" best={best['Host']}:{best['Score']}"
            log.log(
                level,
                "prioritize: pod %s nodes=%d%s (%s, %.1f ms)",
                _pod_label(pod),
                len(names),
                best_text,
                label,
                (time.perf_counter() - started) * 1000,
            )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "prioritize: pod %s scores %s",
                _pod_label(pod),
                ", ".join(f"{s['Host']}={s['Score']}" for s in scores),
            )
        finish("prioritize", label, started)
        return await _json_reply(scores, large=False)

    @app.post(f"{prefix}/bind")
    async def bind_verb(request: Request) -> Response:
        started = time.perf_counter()
        try:
            args = await ext.read_model(request, ExtenderBindingArgs)
        except _BadRequest as e:
            return bad_request("bind", e, started)
        if ext.binder is None:
            metrics.errors.labels("no_binder").inc()
            finish("bind", "no_binder", started)
            msg = (
                f"cannot bind pod {args.PodNamespace}/{args.PodName}: this extender serves a "
                "snapshot file and has no Kubernetes API; binding needs a live API (run it "
                "without --snapshot, or drop bindVerb from the scheduler's extender config)"
            )
            log.warning("bind: %s", msg)
            return JSONResponse({"Error": msg})
        error, label = await run_in_threadpool(ext.run_bind, args)
        finish("bind", label, started)
        return JSONResponse({"Error": error})

    @app.get(f"{prefix}/explain/{{namespace}}/{{pod}}")
    async def explain_verb(namespace: str, pod: str, request: Request) -> Response:
        started = time.perf_counter()
        obj = state.find_pod(namespace, pod)
        if obj is None:
            finish("explain", "not_found", started)
            why = "" if state.ready else " (the cluster state has not synced yet)"
            return _error(404, f"pod {namespace}/{pod} is not in the cluster state{why}")
        nodes = request.query_params.getlist("node") or None

        def run() -> dict[str, Any]:
            return ext.engine.explain(state.snapshot(), obj, nodes).to_dict()

        try:
            body = await run_in_threadpool(run)
        except PodSpecError as e:
            finish("explain", "bad_request", started)
            return _error(422, f"pod {namespace}/{pod} cannot be placed: {e}")
        except Exception as e:
            log.exception("explain: placement core failed for pod %s/%s", namespace, pod)
            metrics.errors.labels("core_exception").inc()
            finish("explain", "error", started)
            return _error(500, f"explaining pod {namespace}/{pod} failed: {e}")
        finish("explain", "ok", started)
        return JSONResponse(body)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        ready = state.ready
        nodes, pods = state.counts()
        body = {
            "ready": ready,
            "synced": state.synced,
            "nodes": nodes,
            "pods": pods,
            "age_seconds": state.age_seconds(),
            "source": state.source,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        data = await run_in_threadpool(generate_latest, metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return _error(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(
            {"Error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    return app


def _code_summary(codes: Mapping[str, str]) -> str:
    if not codes:
        return ""
    counts: dict[str, int] = {}
    for code in codes.values():
        counts[code or "other"] = counts.get(code or "other", 0) + 1
    return " reasons=" + ",".join(f"{c}:{n}" for c, n in sorted(counts.items()))
