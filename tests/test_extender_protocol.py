"""The extender's HTTP protocol, replayed from a real kube-scheduler v1.26 capture.

Every request fixture in ``shared/fixtures/kube-scheduler-extender/`` goes through the app
(filter and prioritize in both ``nodeCacheCapable`` modes, bind, the full recorded
filter -> prioritize -> bind exchange), and the replies are checked for what the real
scheduler needs: Go field names, Node objects echoed back unchanged and in order, a bare
HostPriorityList of integers 0..10, ``{"Error": ""}`` for a bind. One test runs real uvicorn
on 127.0.0.1 and talks to it with ``http.client`` using exactly the captured headers.
Variants of fixtures are derived with ``copy.deepcopy``; the shared files are never edited.
"""

from __future__ import annotations

import copy
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.support.apiserver_replay import ApiserverReplay
from topo_sched import labels as L
from topo_sched.extender.app import FALLBACK_SCORE, create_app
from topo_sched.extender.state import (
    NODE,
    POD,
    ClusterState,
    SnapshotFileError,
    load_objects_file,
)
from topo_sched.extender.wire import ExtenderArgs, ExtenderFilterResult, HostPriority
from topo_sched.kube.errors import AlreadyBoundElsewhere
from topo_sched.kube.pods import create_binding
from topo_sched.placement.config import PlacementConfig
from topo_sched.placement.engine import FilterOutcome, PlacementEngine

GO_FILTER_KEYS = {"Nodes", "NodeNames", "FailedNodes", "FailedAndUnresolvableNodes", "Error"}
pytestmark = pytest.mark.anyio

CAPTURED_ORDER = [
    "gpu-node-1",
    "gpu-node-4",
    "gpu-node-2",
    "gpu-node-5",
    "gpu-node-3",
    "gpu-node-6",
]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ext_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "kube-scheduler-extender"


@pytest.fixture(scope="module")
def load(ext_dir: Path):
    cache: dict[str, Any] = {}

    def _load(name: str) -> Any:
        if name not in cache:
            cache[name] = json.loads((ext_dir / name).read_text())
        return copy.deepcopy(cache[name])

    return _load


@pytest.fixture(scope="module")
def raw(ext_dir: Path):
    return lambda name: (ext_dir / name).read_bytes()


@pytest.fixture
def nodes(load) -> list[dict[str, Any]]:
    return load("filter-request-nodecache-false.json")["Nodes"]["items"]


@pytest.fixture
def pod(load) -> dict[str, Any]:
    """demo-prefill-0 as sent in the nodeCacheCapable=true run (the run that also bound it)."""
    return load("filter-request-nodecache-true.json")["Pod"]


@pytest.fixture
def config() -> PlacementConfig:
    return PlacementConfig()


@pytest.fixture
def state(nodes, pod, config) -> ClusterState:
    return ClusterState.from_objects(nodes, [pod], config)


class FakeBinder:
    """Records calls; behaves like ``create_binding``: a retry to the same node succeeds."""

    def __init__(self, delay_s: float = 0.0, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, str, str, str]] = []
        self.bound: dict[str, str] = {}
        self.delay_s = delay_s
        self.fail = fail
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, namespace: str, pod: str, uid: str, node: str) -> None:
        with self._lock:
            self.calls.append((namespace, pod, uid, node))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail is not None:
                raise self.fail
            key = f"{namespace}/{pod}"
            with self._lock:
                current = self.bound.get(key)
                if current is not None and current != node:
                    raise AlreadyBoundElsewhere(
                        current,
                        409,
                        "Conflict",
                        f'pod {pod} is already assigned to node "{current}"',
                    )
                self.bound[key] = node
        finally:
            with self._lock:
                self.active -= 1


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://extender")


async def post(app, path: str, body: bytes | Any, headers: dict[str, str] | None = None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with client_for(app) as c:
        return await c.post(
            path, content=content, headers=headers or {"Content-Type": "application/json"}
        )


def free_gpus(state: ClusterState, node: str) -> int:
    return state.snapshot().nodes[node].free_count


def assert_filter_shape(body: dict[str, Any]) -> None:
    assert set(body) >= GO_FILTER_KEYS, body.keys()
    assert set(body) - GO_FILTER_KEYS <= {"Warnings"}
    assert isinstance(body["FailedNodes"], dict)
    assert isinstance(body["FailedAndUnresolvableNodes"], dict)
    assert body["Error"] == ""
    ExtenderFilterResult.model_validate(body)


def assert_priorities(body: Any, hosts: list[str]) -> None:
    assert isinstance(body, list), "HostPriorityList must be a bare JSON list"
    assert [e["Host"] for e in body] == hosts
    for e in body:
        assert set(e) == {"Host", "Score"}
        assert type(e["Score"]) is int and 0 <= e["Score"] <= 10
        HostPriority.model_validate(e)


def with_gpus(pod: dict[str, Any], n: int) -> dict[str, Any]:
    p = copy.deepcopy(pod)
    res = p["spec"]["containers"][0]["resources"]
    res["requests"][L.RESOURCE_NVIDIA_GPU] = str(n)
    res["limits"][L.RESOURCE_NVIDIA_GPU] = str(n)
    return p


def bound_pod(pod: dict[str, Any], name: str, node: str, gpus: int) -> dict[str, Any]:
    p = with_gpus(pod, gpus)
    p["metadata"]["name"] = name
    p["metadata"]["uid"] = f"uid-{name}"
    p["spec"]["nodeName"] = node
    return p


# -- filter ---------------------------------------------------------------------------------


async def test_fixture_requests_parse_with_go_keys(load, ext_dir: Path):
    for path in sorted(ext_dir.glob("*-request-*.json")):
        if path.name.startswith("bind"):
            continue
        args = ExtenderArgs.model_validate(load(path.name))
        assert args.Pod["metadata"]["name"].startswith("demo-")
        assert (args.Nodes is None) != (args.NodeNames is None), path.name


async def test_filter_nodecache_true_replays_captured_reply(state, config, load, raw):
    app = create_app(state, PlacementEngine(config))
    r = await post(app, "/scheduler/filter", raw("filter-request-nodecache-true.json"))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert_filter_shape(body)
    assert body["Nodes"] is None
    # Every node fits (8 free GPUs, no topology data): the reply is the captured one.
    assert body == load("filter-response-nodecache-true.json")


async def test_filter_nodecache_false_echoes_nodes_unchanged(state, config, load, raw):
    app = create_app(state, PlacementEngine(config))
    request = load("filter-request-nodecache-false.json")
    r = await post(app, "/scheduler/filter", raw("filter-request-nodecache-false.json"))
    assert r.status_code == 200
    body = r.json()
    assert_filter_shape(body)
    assert body["NodeNames"] is None
    assert body["Nodes"]["items"] == request["Nodes"]["items"]  # unchanged, same order
    assert body == load("filter-response-nodecache-false.json")


async def test_filter_drops_busy_node_and_echoes_the_rest_in_order(nodes, pod, config, load):
    """A node whose GPUs are all taken: listed in FailedNodes (preemption may help), and the
    reply has the shape of the captured filter-response-failednodes-one.json."""
    busy = bound_pod(pod, "demo-prefill-9", "gpu-node-3", 8)
    state = ClusterState.from_objects(nodes, [pod, busy], config)
    app = create_app(state, PlacementEngine(config))
    request = load("filter-request-nodecache-false.json")
    request["Pod"] = pod
    r = await post(app, "/scheduler/filter", request)
    body = r.json()
    assert r.status_code == 200
    assert_filter_shape(body)
    expected = [n for n in request["Nodes"]["items"] if n["metadata"]["name"] != "gpu-node-3"]
    assert body["Nodes"]["items"] == expected
    assert set(body["FailedNodes"]) == {"gpu-node-3"}
    assert "free" in body["FailedNodes"]["gpu-node-3"]
    captured = load("filter-response-failednodes-one.json")
    assert set(body) >= set(captured)
    assert set(captured["FailedNodes"]) == set(body["FailedNodes"])
    # NodeNames mode: the same verdict by name.
    r = await post(
        app, "/scheduler/filter", {**load("filter-request-nodecache-true.json"), "Pod": pod}
    )
    body = r.json()
    assert body["NodeNames"] == [n for n in CAPTURED_ORDER if n != "gpu-node-3"]
    assert body["Nodes"] is None and set(body["FailedNodes"]) == {"gpu-node-3"}


async def test_filter_rejects_every_node_per_node_not_with_error(state, config, pod, load):
    """A pod needing 16 GPUs fits nowhere: every node in FailedAndUnresolvableNodes, Error
    empty, as in the captured filter-response-failedandunresolvable-all.json."""
    app = create_app(state, PlacementEngine(config))
    for name in ("filter-request-nodecache-true.json", "filter-request-nodecache-false.json"):
        request = load(name)
        request["Pod"] = with_gpus(request["Pod"], 16)
        body = (await post(app, "/scheduler/filter", request)).json()
        assert_filter_shape(body)
        captured = load("filter-response-failedandunresolvable-all.json")
        assert set(body["FailedAndUnresolvableNodes"]) == set(
            captured["FailedAndUnresolvableNodes"]
        )
        assert body["FailedNodes"] == {}
        if request["Nodes"] is not None:
            assert body["Nodes"] == {"metadata": {}, "items": []}
            assert body["NodeNames"] is None
        else:
            assert body["NodeNames"] == [] and body["Nodes"] is None


async def test_non_rbg_pod_passes_everywhere_with_equal_scores(state, config, load):
    app = create_app(state, PlacementEngine(config))
    request = load("filter-request-nodecache-true.json")
    request["Pod"]["metadata"]["labels"] = {"app": "web"}
    request["Pod"] = with_gpus(request["Pod"], 64)  # would fit nowhere if it were ours
    body = (await post(app, "/scheduler/filter", request)).json()
    assert body["NodeNames"] == CAPTURED_ORDER
    assert body["FailedNodes"] == {} and body["FailedAndUnresolvableNodes"] == {}
    scores = (await post(app, "/scheduler/prioritize", request)).json()
    assert_priorities(scores, CAPTURED_ORDER)
    assert len({s["Score"] for s in scores}) == 1


async def test_unknown_nodes_pass_and_are_counted(state, config, load):
    app = create_app(state, PlacementEngine(config))
    request = load("filter-request-nodecache-true.json")
    request["NodeNames"] = [*request["NodeNames"], "gpu-node-new"]
    body = (await post(app, "/scheduler/filter", request)).json()
    assert body["NodeNames"][-1] == "gpu-node-new"
    metrics = app.state.metrics.registry.get_sample_value("topo_sched_extender_unknown_nodes_total")
    assert metrics == 1


# -- prioritize -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_file,response_file",
    [
        ("prioritize-request-nodecache-true.json", "prioritize-response-nodecache-true.json"),
        ("prioritize-request-nodecache-false.json", "prioritize-response-nodecache-false.json"),
        (
            "prioritize-request-nodecache-false-after-extender-dropped-one-node.json",
            "prioritize-response-nodecache-false-after-extender-dropped-one-node.json",
        ),
    ],
)
async def test_prioritize_replays(state, config, load, raw, request_file, response_file):
    app = create_app(state, PlacementEngine(config))
    r = await post(app, "/scheduler/prioritize", raw(request_file))
    assert r.status_code == 200
    captured = load(response_file)
    assert_priorities(r.json(), [e["Host"] for e in captured])


async def test_prioritize_prefers_the_decode_pods_rack(nodes, pod, config, load):
    """A prefill pod scores the rack of its group's decode pod highest (a core term; here
    only to show that real scores, not a constant, reach the wire)."""
    decode = bound_pod(pod, "demo-decode-0", "gpu-node-4", 1)
    decode["metadata"]["labels"][L.RBG_LEGACY_ROLE_NAME] = "decode"
    state = ClusterState.from_objects(nodes, [pod, decode], config)
    app = create_app(state, PlacementEngine(config))
    scores = (
        await post(app, "/scheduler/prioritize", load("prioritize-request-nodecache-true.json"))
    ).json()
    assert_priorities(scores, CAPTURED_ORDER)
    by_host = {s["Host"]: s["Score"] for s in scores}
    assert max(by_host, key=by_host.get) in {"gpu-node-4", "gpu-node-5"}  # rack-b1


# -- bind -----------------------------------------------------------------------------------


async def test_bind_replays_and_records_the_placement(state, config, load, raw):
    binder = FakeBinder()
    app = create_app(state, PlacementEngine(config), binder=binder)
    before = free_gpus(state, "gpu-node-3")
    r = await post(app, "/scheduler/bind", raw("bind-request.json"))
    assert r.status_code == 200
    assert r.json() == load("bind-response.json")
    args = load("bind-request.json")
    assert binder.calls == [(args["PodNamespace"], args["PodName"], args["PodUID"], args["Node"])]
    assert state.history()["demo/demo-prefill-0"] == "gpu-node-3"
    assert free_gpus(state, "gpu-node-3") == before - 2  # the pod's 2 GPUs, at once
    assert state.snapshot().placements["demo/demo-prefill-0"].node == "gpu-node-3"


async def test_bind_retry_is_idempotent(state, config, load):
    binder = FakeBinder()
    app = create_app(state, PlacementEngine(config), binder=binder)
    before = free_gpus(state, "gpu-node-3")
    for _ in range(3):
        r = await post(app, "/scheduler/bind", load("bind-request.json"))
        assert r.json() == {"Error": ""}
    assert len(binder.calls) == 3
    assert free_gpus(state, "gpu-node-3") == before - 2  # counted once


async def test_bind_failure_reports_error_and_records_nothing(state, config, load):
    binder = FakeBinder()
    binder.bound["demo/demo-prefill-0"] = "gpu-node-1"
    app = create_app(state, PlacementEngine(config), binder=binder)
    before = free_gpus(state, "gpu-node-3")
    r = await post(app, "/scheduler/bind", load("bind-request.json"))
    assert r.status_code == 200
    error = r.json()["Error"]
    assert "demo/demo-prefill-0" in error and 'already assigned to node "gpu-node-1"' in error
    assert state.history() == {}
    assert state.assumed() == {}
    assert free_gpus(state, "gpu-node-3") == before
    assert "demo/demo-prefill-0" not in state.snapshot().placements
    reg = app.state.metrics.registry
    assert reg.get_sample_value("topo_sched_extender_errors_total", {"kind": "bind_failed"}) == 1


async def test_concurrent_double_bind_is_serialised_and_counted_once(state, config, load):
    """The scheduler re-sends a bind while the first is still in flight (captured: bind
    timeout then retry). Both succeed; the API is never called twice at once for one pod."""
    import asyncio

    binder = FakeBinder(delay_s=0.2)
    app = create_app(state, PlacementEngine(config), binder=binder)
    before = free_gpus(state, "gpu-node-3")
    body = json.dumps(load("bind-request.json")).encode()
    async with client_for(app) as c:
        results = await asyncio.gather(*(c.post("/scheduler/bind", content=body) for _ in range(2)))
    assert [r.json() for r in results] == [{"Error": ""}, {"Error": ""}]
    assert len(binder.calls) == 2 and binder.max_active == 1
    assert free_gpus(state, "gpu-node-3") == before - 2


async def test_bind_without_binder_says_it_needs_a_live_api(state, config, load):
    app = create_app(state, PlacementEngine(config))
    r = await post(app, "/scheduler/bind", load("bind-request.json"))
    assert r.status_code == 200
    assert "live" in r.json()["Error"] and "demo/demo-prefill-0" in r.json()["Error"]
    assert state.history() == {}


async def test_bind_through_create_binding_against_recorded_apiserver(
    fixtures_dir: Path, state, config, load
):
    """The live binder: 201 binds; a retry gets 409 'already assigned to the same node' and
    is a success; a bind to another node is an Error and leaves no record."""
    api_dir = fixtures_dir / "kube-apiserver"
    with ApiserverReplay(
        [
            "0270-binding-create-gpu-node-1-201.json",
            "0280-binding-same-node-again-409.json",
            "0290-binding-different-node-after-bound-409.json",
        ],
        base_dir=api_dir,
    ) as server:
        api = server.api_client()

        def binder(namespace: str, pod: str, uid: str, node: str) -> Any:
            return create_binding(api, namespace, pod, node, uid=uid or None)

        llm_pod = copy.deepcopy(load("filter-request-nodecache-true.json")["Pod"])
        llm_pod["metadata"]["namespace"] = "llm"
        state.apply_event(POD, "ADDED", llm_pod)
        app = create_app(state, PlacementEngine(config), binder=binder)
        bind = {**load("bind-request.json"), "PodNamespace": "llm", "Node": "gpu-node-1"}
        assert (await post(app, "/scheduler/bind", bind)).json() == {"Error": ""}
        assert (await post(app, "/scheduler/bind", bind)).json() == {"Error": ""}
        free_after = free_gpus(state, "gpu-node-1")
        other = {**bind, "Node": "gpu-node-2"}
        error = (await post(app, "/scheduler/bind", other)).json()["Error"]
        assert 'already assigned to node "gpu-node-1"' in error
        assert state.history()["llm/demo-prefill-0"] == "gpu-node-1"
        assert free_gpus(state, "gpu-node-1") == free_after
        server.assert_all_matched()
        server.assert_all_used()


# -- the recorded exchange, in process and over a real socket -------------------------------


async def test_recorded_exchange_sequence(state, config, load):
    exchanges = load("http-exchanges-nodecache-true.json")
    binder = FakeBinder()
    app = create_app(state, PlacementEngine(config), binder=binder)
    async with client_for(app) as c:
        for verb in ("filter", "prioritize", "bind"):
            req = exchanges[verb]["request"]
            body = json.dumps(req["body"], separators=(",", ":"), ensure_ascii=False).encode()
            assert len(body) == req["body_bytes"]
            r = await c.request(req["method"], req["path"], content=body, headers=req["headers"])
            recorded = exchanges[verb]["response"]
            assert r.status_code == recorded["status"] == 200
            if verb == "prioritize":
                assert_priorities(r.json(), [e["Host"] for e in recorded["body"]])
            else:
                assert r.json() == recorded["body"]
    assert binder.calls == [("demo", "demo-prefill-0", req["body"]["PodUID"], "gpu-node-3")]


@pytest.fixture
def live_server(state, config) -> Iterator[tuple[int, FakeBinder, ClusterState]]:
    binder = FakeBinder()
    app = create_app(state, PlacementEngine(config), binder=binder)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=120)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        assert thread.is_alive(), "uvicorn exited"
        time.sleep(0.01)
    try:
        yield port, binder, state
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def test_real_uvicorn_filter_prioritize_bind_with_captured_headers(live_server, load):
    port, binder, state = live_server
    exchanges = load("http-exchanges-nodecache-true.json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for verb in ("filter", "prioritize", "bind"):  # one keep-alive connection, as Go does
            req = exchanges[verb]["request"]
            body = json.dumps(req["body"], separators=(",", ":"), ensure_ascii=False).encode()
            conn.putrequest(req["method"], req["path"], skip_host=True, skip_accept_encoding=True)
            for name, value in req["headers"].items():  # exactly and only these
                conn.putheader(name, value)
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, data
            assert resp.getheader("Content-Type") == "application/json"
            assert resp.getheader("Connection") != "close"
            reply = json.loads(data)
            recorded = exchanges[verb]["response"]["body"]
            if verb == "prioritize":
                assert_priorities(reply, [e["Host"] for e in recorded])
            else:
                assert reply == recorded
    finally:
        conn.close()
    assert binder.calls == [
        ("demo", "demo-prefill-0", "af734fd6-8c5f-4148-827e-229b4bf78550", "gpu-node-3")
    ]
    assert state.history() == {"demo/demo-prefill-0": "gpu-node-3"}


# -- failure policy -------------------------------------------------------------------------


class ExplodingEngine:
    def filter(self, *a: Any) -> FilterOutcome:
        raise RuntimeError("bug in the core")

    def prioritize(self, *a: Any) -> list[tuple[str, int]]:
        raise RuntimeError("bug in the core")

    def explain(self, *a: Any) -> Any:
        raise RuntimeError("bug in the core")


async def test_core_exception_steps_aside(state, load, caplog):
    app = create_app(state, ExplodingEngine())
    for name in ("filter-request-nodecache-true.json", "filter-request-nodecache-false.json"):
        request = load(name)
        r = await post(app, "/scheduler/filter", request)
        assert r.status_code == 200
        body = r.json()
        assert_filter_shape(body)
        if request["Nodes"] is None:
            assert body["NodeNames"] == CAPTURED_ORDER
        else:
            assert body["Nodes"]["items"] == request["Nodes"]["items"]
        r = await post(app, "/scheduler/prioritize", request)
        assert r.status_code == 200
        assert r.json() == [{"Host": n, "Score": FALLBACK_SCORE} for n in CAPTURED_ORDER]
    assert "demo/demo-prefill-0" in caplog.text
    reg = app.state.metrics.registry
    assert reg.get_sample_value("topo_sched_extender_errors_total", {"kind": "core_exception"}) == 4
    assert (
        reg.get_sample_value(
            "topo_sched_extender_requests_total", {"verb": "filter", "outcome": "fallback"}
        )
        == 2
    )
    r = await client_for(app).get("/scheduler/explain/demo/demo-prefill-0")
    assert r.status_code == 500 and "bug in the core" in r.json()["Error"]


class SloppyEngine:
    """A core that breaks its contract: omits nodes, out-of-range and float scores."""

    def filter(self, snap, pod, names):
        return FilterOutcome(
            passed=[names[0]],
            failed={names[1]: "busy", "not-asked-about": "x"},
            unresolvable={names[1]: "also", names[2]: "never"},
            codes={names[1]: "Free Text With Spaces", names[2]: "too-few-gpus"},
        )

    def prioritize(self, snap, pod, names):
        return [(names[0], 42), (names[1], 3.6), (names[2], -1), (names[3], "x")]


async def test_contract_breaches_are_contained(state, load):
    app = create_app(state, SloppyEngine())
    body = (await post(app, "/scheduler/filter", load("filter-request-nodecache-true.json"))).json()
    # Silent nodes pass; a node never lands in two maps; unasked nodes are dropped.
    assert body["NodeNames"] == [n for n in CAPTURED_ORDER if n not in CAPTURED_ORDER[1:3]]
    assert body["FailedAndUnresolvableNodes"] == {"gpu-node-4": "also", "gpu-node-2": "never"}
    assert body["FailedNodes"] == {}
    reg = app.state.metrics.registry
    sample = reg.get_sample_value
    assert (
        sample(
            "topo_sched_extender_nodes_filtered_total", {"reason": "other", "resolvable": "false"}
        )
        == 1
    )
    assert (
        sample(
            "topo_sched_extender_nodes_filtered_total",
            {"reason": "too-few-gpus", "resolvable": "false"},
        )
        == 1
    )
    scores = (
        await post(app, "/scheduler/prioritize", load("prioritize-request-nodecache-true.json"))
    ).json()
    assert_priorities(scores, CAPTURED_ORDER)
    assert [s["Score"] for s in scores] == [10, 4, 0, 0, FALLBACK_SCORE, FALLBACK_SCORE]


async def test_not_ready_state_answers_neutrally(config, load):
    state = ClusterState(config)
    app = create_app(state, PlacementEngine(config))
    async with client_for(app) as c:
        assert (await c.get("/healthz")).status_code == 200
        ready = await c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        body = (
            await c.post("/scheduler/filter", json=load("filter-request-nodecache-true.json"))
        ).json()
        assert body["NodeNames"] == CAPTURED_ORDER
        scores = (
            await c.post(
                "/scheduler/prioritize", json=load("prioritize-request-nodecache-true.json")
            )
        ).json()
        assert {s["Score"] for s in scores} == {FALLBACK_SCORE}
        assert (await c.get("/scheduler/explain/demo/demo-prefill-0")).status_code == 404


# -- bad input (a few fixed cases; test_extender_fuzz.py does the random ones) ---------------


@pytest.mark.parametrize(
    "body,needle",
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "JSON object"),
        (b'"Pod"', "JSON object"),
        (b'{"Nodes": null, "NodeNames": []}', "Pod"),
        (b'{"Pod": [], "NodeNames": []}', "Pod"),
        (b'{"Pod": {"metadata": {"name": "p"}}, "NodeNames": "gpu-node-1"}', "NodeNames"),
        (b'{"Pod": {"metadata": {"name": "p"}}, "NodeNames": [1]}', "NodeNames"),
        (b'{"Pod": {"metadata": {"name": "p"}}, "Nodes": {"items": [{}]}}', "metadata.name"),
        (b'{"Pod": {"metadata": {}}, "NodeNames": ["a"]}', "metadata.name"),
        (b'{"Pod": {"metadata": {"name": "p"}}, "NodeNames": [NaN]}', "NaN"),
        (b"\xff\xfe{}", "JSON"),
    ],
)
async def test_bad_filter_and_prioritize_input_is_400(state, config, body, needle):
    app = create_app(state, PlacementEngine(config))
    for verb in ("filter", "prioritize"):
        r = await post(app, f"/scheduler/{verb}", body)
        assert r.status_code == 400, (verb, r.text)
        assert needle in r.json()["Error"], r.json()


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"PodName": "p", "PodNamespace": "ns", "PodUID": "u"}',
        b'{"PodName": 1, "PodNamespace": "ns", "PodUID": "u", "Node": "n"}',
        b'{"PodName": "", "PodNamespace": "ns", "PodUID": "u", "Node": "n"}',
        b"null",
    ],
)
async def test_bad_bind_input_is_400_and_never_binds(state, config, body):
    binder = FakeBinder()
    app = create_app(state, PlacementEngine(config), binder=binder)
    r = await post(app, "/scheduler/bind", body)
    assert r.status_code == 400 and r.json()["Error"]
    assert binder.calls == []


async def test_body_limit_by_header_and_by_bytes(state, config, raw):
    body = raw("filter-request-nodecache-true.json")
    app = create_app(state, PlacementEngine(config), max_body_bytes=len(body) - 1)
    r = await post(app, "/scheduler/filter", body)
    assert r.status_code == 400 and "limit" in r.json()["Error"]

    async def chunks():  # no Content-Length: chunked, counted as read
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    async with client_for(app) as c:
        r = await c.post("/scheduler/filter", content=chunks())
        assert r.status_code == 400 and "limit" in r.json()["Error"]
        r = await c.post("/scheduler/filter", content=b"{}", headers={"Content-Length": "banana"})
        assert r.status_code == 400
    reg = app.state.metrics.registry
    assert reg.get_sample_value("topo_sched_extender_errors_total", {"kind": "too_large"}) == 2
    ok = create_app(state, PlacementEngine(config), max_body_bytes=len(body))
    assert (await post(ok, "/scheduler/filter", body)).status_code == 200


# -- explain, health, metrics ---------------------------------------------------------------


async def test_explain_endpoint(state, config):
    app = create_app(state, PlacementEngine(config))
    async with client_for(app) as c:
        r = await c.get("/scheduler/explain/demo/demo-prefill-0")
        assert r.status_code == 200
        body = r.json()
        assert body["pod"] == "demo/demo-prefill-0" and body["rbg"] is True
        assert {n["node"] for n in body["nodes"]} == set(CAPTURED_ORDER)
        r = await c.get("/scheduler/explain/demo/demo-prefill-0", params={"node": "gpu-node-2"})
        assert [n["node"] for n in r.json()["nodes"]] == ["gpu-node-2"]
        r = await c.get("/scheduler/explain/demo/nope")
        assert r.status_code == 404 and "demo/nope" in r.json()["Error"]


async def test_metrics_endpoint_and_prefix(state, config, raw):
    app = create_app(state, PlacementEngine(config), prefix="topo/")
    async with client_for(app) as c:
        r = await c.post("/topo/filter", content=raw("filter-request-nodecache-true.json"))
        assert r.status_code == 200
        assert (await c.post("/scheduler/filter", content=b"{}")).status_code == 404
        text = (await c.get("/metrics")).text
    for name in (
        "topo_sched_extender_request_duration_seconds_bucket",
        'topo_sched_extender_requests_total{outcome="ok",verb="filter"} 1.0',
        "topo_sched_extender_state_age_seconds",
        "topo_sched_extender_unknown_nodes_total",
        "topo_sched_extender_errors_total",
        "topo_sched_extender_nodes_filtered_total",
    ):
        assert name in text, name
    ready = await client_for(app).get("/readyz")
    assert ready.status_code == 200 and ready.json()["nodes"] == 6


# -- the state ------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_snapshot_file_formats(tmp_path: Path, nodes, pod):
    import yaml

    items = [dict(n, kind="Node", apiVersion="v1") for n in nodes]
    items.append(dict(pod, kind="Pod", apiVersion="v1"))
    kubectl = {"apiVersion": "v1", "kind": "List", "items": items, "metadata": {}}
    for name, text in [
        ("list.json", json.dumps(kubectl)),
        ("list.yaml", yaml.safe_dump(kubectl)),
        ("plain.json", json.dumps(items)),
        ("kindless.json", json.dumps({"items": [*nodes, pod]})),
        (
            "nested.json",
            json.dumps({"kind": "List", "items": [{"kind": "NodeList", "items": nodes}, pod]}),
        ),
    ]:
        got_nodes, got_pods = load_objects_file(_write(tmp_path, name, text))
        assert [n["metadata"]["name"] for n in got_nodes] == [
            n["metadata"]["name"] for n in nodes
        ], name
        assert [p["metadata"]["name"] for p in got_pods] == ["demo-prefill-0"], name
    state = ClusterState.from_file(tmp_path / "list.json", PlacementConfig())
    assert state.ready and state.counts() == (6, 1)


@pytest.mark.parametrize(
    "name,text,needle",
    [
        ("empty.json", "", "empty"),
        ("broken.json", '{"items": [', "neither JSON"),
        ("scalar.json", "42", "expected a List"),
        ("noitems.json", '{"kind": "Status"}', "expected a List"),
        ("nonobject.json", '{"items": [1]}', "items[0]"),
        ("unnamed.json", '{"items": [{"kind": "Node", "metadata": {}}]}', "metadata.name"),
        ("podsonly.json", '{"items": [{"kind": "Pod", "metadata": {"name": "p"}}]}', "no Node"),
    ],
)
def test_broken_snapshot_files(tmp_path: Path, name: str, text: str, needle: str):
    with pytest.raises(SnapshotFileError, match=re.escape(needle)) as exc:
        load_objects_file(_write(tmp_path, name, text))
    assert "\n" not in str(exc.value)
    with pytest.raises(SnapshotFileError, match="no such file"):
        load_objects_file(tmp_path / "missing.json")


def test_state_survives_a_stale_watch_event_after_bind(state, pod):
    """The bind is recorded before the watch shows it; a late event carrying the pod still
    unbound must not erase it; the bound event clears the assumption."""
    before = free_gpus(state, "gpu-node-3")
    state.record_binding(pod, "gpu-node-3")
    assert free_gpus(state, "gpu-node-3") == before - 2
    stale = copy.deepcopy(pod)
    stale["status"]["conditions"] = [{"type": "PodScheduled", "status": "False"}]
    state.apply_event(POD, "MODIFIED", stale)
    assert state.assumed() == {"demo/demo-prefill-0": "gpu-node-3"}
    assert free_gpus(state, "gpu-node-3") == before - 2
    bound = copy.deepcopy(pod)
    bound["spec"]["nodeName"] = "gpu-node-3"
    state.apply_event(POD, "MODIFIED", bound)
    assert state.assumed() == {}
    assert free_gpus(state, "gpu-node-3") == before - 2
    state.apply_event(POD, "DELETED", bound)
    assert free_gpus(state, "gpu-node-3") == before
    assert state.history()["demo/demo-prefill-0"] == "gpu-node-3"


def test_binding_recorded_during_a_rebuild_is_kept(nodes, pod, config):
    """A rebuild that copied the objects before a bind re-applies the bind when it ends."""
    from topo_sched.placement.snapshot import ClusterSnapshot

    started, release = threading.Event(), threading.Event()

    def slow_builder(n, p, c, h):
        started.set()
        release.wait(5)
        return ClusterSnapshot.from_objects(n, p, c, h)

    state = ClusterState.from_objects(nodes, [pod], config, builder=slow_builder)
    release.set()
    first = state.snapshot()
    assert first.nodes["gpu-node-3"].free_count == 8
    release.clear()
    started.clear()
    state.apply_event(NODE, "MODIFIED", nodes[0])  # dirty
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(state.snapshot()))
    t.start()
    assert started.wait(5)
    assert state.snapshot() is first  # a concurrent reader does not wait for the rebuild
    state.record_binding(pod, "gpu-node-3")
    release.set()
    t.join(5)
    assert result[0].nodes["gpu-node-3"].free_count == 6
    assert state.snapshot() is result[0]  # nothing else changed: no second rebuild


def test_live_state_from_recorded_list_and_watch(fixtures_dir: Path, config):
    """Nodes and Pods list+watch (recorded apiserver) feed the state through ListWatch."""
    from kubernetes.client import CoreV1Api

    from topo_sched.kube.watch import ListWatch

    api_dir = fixtures_dir / "kube-apiserver"
    with ApiserverReplay(
        [
            "0440-nodes-list-before-watch.json",
            "0490-watch-nodes-added-modified-deleted-bookmark.json",
            "0510-pods-list-llm-before-watch.json",
            "0570-watch-pods-llm-added-modified-deleted-bookmark.json",
        ],
        base_dir=api_dir,
    ) as server:
        core = CoreV1Api(server.api_client())
        state = ClusterState(config)
        made: dict[str, ListWatch] = {}

        def factory(list_func, *, on_event, page_size, name, field_selector=None):
            if name.endswith("pods"):  # the recording watched one namespace
                lw = ListWatch(core.list_namespaced_pod, "llm", on_event=on_event, name=name)
            else:
                lw = ListWatch(core.list_node, on_event=on_event, name=name)
            lw.start = lambda: None  # driven below with run_once
            made[name] = lw
            return lw

        state.start_live(server.api_client(), list_watch_factory=factory)
        assert not state.ready
        for lw in made.values():
            lw.run_once(timeout_seconds=5)
        assert state.ready
        assert sorted(state.node_names()) == ["gpu-node-1", "gpu-node-2"]  # node 3 came and went
        assert state.history().get("llm/demo-decode-0") == "gpu-node-1"  # bound, then deleted
        assert state.find_pod("llm", "demo-decode-0") is None
        snap = state.snapshot()
        assert snap.node_names == frozenset({"gpu-node-1", "gpu-node-2"})
        assert state.age_seconds() is not None and state.age_seconds() < 60
        state.stop()


# -- the commands ---------------------------------------------------------------------------


def _cli():
    import typer

    from topo_sched.commands import extender as cmd

    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("extender")(cmd.extender)
    app.command("explain")(cmd.explain)
    return app


def _snapshot_file(tmp_path: Path, nodes, pods=()) -> Path:
    items = [dict(n, kind="Node", apiVersion="v1") for n in nodes]
    items += [dict(p, kind="Pod", apiVersion="v1") for p in pods]
    return _write(tmp_path, "snap.json", json.dumps({"kind": "List", "items": items}))


def test_explain_command_json_and_table(tmp_path: Path, nodes, pod):
    import yaml
    from typer.testing import CliRunner

    busy = bound_pod(pod, "demo-prefill-9", "gpu-node-3", 8)
    snap = _snapshot_file(tmp_path, nodes, [busy])
    pod_file = _write(tmp_path, "pod.yaml", yaml.safe_dump(pod))
    runner = CliRunner()
    r = runner.invoke(_cli(), ["explain", "--snapshot", str(snap), str(pod_file), "--json"])
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout)
    verdicts = {n["node"]: n for n in body["nodes"]}
    assert verdicts["gpu-node-3"]["passed"] is False and verdicts["gpu-node-3"]["code"]
    assert verdicts["gpu-node-1"]["passed"] is True
    r = runner.invoke(
        _cli(), ["explain", "--snapshot", str(snap), str(pod_file), "--node", "gpu-node-3"]
    )
    assert r.exit_code == 0, r.output
    assert "gpu-node-3" in r.stdout and "fail" in r.stdout and "gpu-node-1" not in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["explain", "--snapshot", "{missing}", "{pod}"], "no such file"),
        (["explain", "--snapshot", "{snap}", "{missing}"], "no such file"),
        (["explain", "--snapshot", "{snap}", "{snap}"], "expected a Pod"),
        (["explain", "--snapshot", "{snap}", "{pod}", "--config", "{badcfg}"], "weights"),
        (["explain", "--snapshot", "{snap}", "{unnamed}"], "metadata.name"),
        (["extender", "--snapshot", "{snap}", "--log-level", "loud"], "--log-level"),
        (["extender", "--snapshot", "{snap}", "--max-body-bytes", "0"], "--max-body-bytes"),
        (["extender", "--snapshot", "{pod}"], "expected a List"),
        (["extender", "--snapshot", "{snap}", "--kubeconfig", "{snap}"], "exclude"),
    ],
)
def test_command_errors_are_one_line_exit_2(tmp_path: Path, nodes, pod, args, needle):
    import yaml
    from typer.testing import CliRunner

    paths = {
        "snap": _snapshot_file(tmp_path, nodes),
        "pod": _write(tmp_path, "pod.yaml", yaml.safe_dump(pod)),
        "unnamed": _write(tmp_path, "unnamed.yaml", "kind: Pod\nmetadata: {}\n"),
        "badcfg": _write(tmp_path, "cfg.yaml", "weights: {bogus: 1}\n"),
        "missing": tmp_path / "missing.json",
    }
    argv = [a.format(**paths) for a in args]
    r = CliRunner().invoke(_cli(), argv)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr
    assert "Traceback" not in r.output
    assert r.stderr.strip().count("\n") == 0


def test_extender_command_help_explains_every_flag():
    from typer.testing import CliRunner

    r = CliRunner().invoke(_cli(), ["extender", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for flag in (
        "--snapshot",
        "--config",
        "--host",
        "--port",
        "--prefix",
        "--kubeconfig",
        "--max-body-bytes",
        "--log-level",
    ):
        assert flag in r.stdout, flag
