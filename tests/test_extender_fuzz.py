"""Property tests: no input makes the extender answer 5xx or stop serving.

Hypothesis throws random JSON values, wrong types, mutated fixture pods, truncated bodies,
bodies over the size limit and random node names at every endpoint. Each reply must be a
2xx/4xx with a JSON body where one is promised, and ``/healthz`` must still answer after.
Example counts are bounded so the whole file runs well under 30 seconds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topo_sched import labels as L
from topo_sched.extender.app import create_app
from topo_sched.extender.state import ClusterState
from topo_sched.placement.config import PlacementConfig
from topo_sched.placement.engine import PlacementEngine

LIMIT = 64 * 1024

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=False,
)


class World(dict):
    """The module's app and fixture data; a short repr keeps Hypothesis reports readable."""

    def __repr__(self) -> str:
        return "<extender world>"


def _load(fixtures_dir: Path, name: str) -> Any:
    return json.loads((fixtures_dir / "kube-scheduler-extender" / name).read_text())


@pytest.fixture(scope="module")
def world(fixtures_dir: Path) -> World:
    full = _load(fixtures_dir, "filter-request-nodecache-false.json")
    cached = _load(fixtures_dir, "filter-request-nodecache-true.json")
    bind = _load(fixtures_dir, "bind-request.json")
    config = PlacementConfig()
    nodes = full["Nodes"]["items"]
    pod = cached["Pod"]
    state = ClusterState.from_objects(nodes, [pod], config)
    binder_calls: list[tuple[str, str, str, str]] = []

    def binder(namespace: str, name: str, uid: str, node: str) -> None:
        binder_calls.append((namespace, name, uid, node))
        if node.startswith("x"):
            raise RuntimeError(f"no such node {node!r}")

    app = create_app(state, PlacementEngine(config), binder=binder, max_body_bytes=LIMIT)
    client = TestClient(app, raise_server_exceptions=True)
    return World(
        client=client,
        pod=pod,
        nodes=nodes,
        full=full,
        cached=cached,
        bind=bind,
        names=[n["metadata"]["name"] for n in nodes],
        binder_calls=binder_calls,
        raw={
            name: (fixtures_dir / "kube-scheduler-extender" / name).read_bytes()
            for name in ("filter-request-nodecache-true.json", "bind-request.json")
        },
    )


def check(resp, *, json_body: bool = True) -> Any:
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if json_body:
        body = resp.json()
        if resp.status_code == 400:
            assert isinstance(body, dict) and isinstance(body.get("Error"), str) and body["Error"]
        return body
    return None


def still_healthy(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200


# -- strategies -----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
node_names = st.lists(
    st.sampled_from(["gpu-node-1", "gpu-node-3", "gpu-node-6"]) | st.text(max_size=30),
    max_size=12,
)

POD_PATHS = [
    ("metadata",),
    ("metadata", "name"),
    ("metadata", "namespace"),
    ("metadata", "uid"),
    ("metadata", "labels"),
    ("metadata", "labels", L.RBG_GROUP_NAME),
    ("metadata", "labels", L.RBG_ROLE_NAME),
    ("metadata", "labels", L.RBG_ROLE_INSTANCE_NAME),
    ("metadata", "labels", L.RBG_LEGACY_ROLE_NAME),
    ("metadata", "annotations"),
    ("metadata", "annotations", L.ANNOTATION_WEIGHTS),
    ("metadata", "annotations", L.ANNOTATION_INTRA_NODE),
    ("metadata", "annotations", L.ANNOTATION_PACK_LEVEL),
    ("metadata", "annotations", L.ANNOTATION_PACK_MODE),
    ("metadata", "annotations", L.ANNOTATION_SPREAD_LEVEL),
    ("metadata", "annotations", L.ANNOTATION_KV_BYTES_PER_TOKEN),
    ("spec",),
    ("spec", "nodeName"),
    ("spec", "containers"),
    ("spec", "initContainers"),
    ("spec", "containers", 0, "resources"),
    ("spec", "containers", 0, "resources", "requests", L.RESOURCE_NVIDIA_GPU),
    ("spec", "containers", 0, "resources", "limits", L.RESOURCE_NVIDIA_GPU),
    ("status",),
    ("status", "phase"),
]

ANNOTATION_TEXT = st.sampled_from(
    ["required", "preferred", "rack", "zone", "bogus", "best_fit=2,stability=x", "-3", "131072"]
)


def _set(obj: Any, path: tuple, value: Any) -> Any:
    """Set ``value`` at ``path`` inside a copy of ``obj``, creating containers on the way
    (an integer key addresses a list, a string key a mapping)."""
    root = copy.deepcopy(obj)
    parent: Any = None
    cur = root
    for i, key in enumerate(path):
        want_list = isinstance(key, int)
        if want_list and not isinstance(cur, list):
            cur = []
        elif not want_list and not isinstance(cur, dict):
            cur = {}
        if parent is None:
            root = cur
        else:
            parent_container, parent_key = parent
            parent_container[parent_key] = cur
        if want_list:
            while len(cur) <= key:
                cur.append({})
        if i == len(path) - 1:
            cur[key] = value
            break
        parent = (cur, key)
        cur = cur[key] if want_list else cur.get(key)
    return root


def _values_for(path: tuple) -> st.SearchStrategy[Any]:
    """Mostly well-typed values where the core reads strings or counts, so that mutated pods
    reach the placement core instead of stopping at a 400; sometimes anything."""
    if path[0] == "metadata" and len(path) == 3:  # one label or annotation
        typed = ANNOTATION_TEXT | st.text(max_size=12)
    elif path[-1] == L.RESOURCE_NVIDIA_GPU:
        typed = st.integers(min_value=-2, max_value=20) | st.integers(0, 20).map(str)
    elif path[-1] in ("name", "namespace", "uid", "nodeName", "phase"):
        typed = st.sampled_from(["demo-prefill-1", "gpu-node-3", "Succeeded", ""]) | st.text(
            max_size=10
        )
    else:
        typed = json_values
    return st.one_of(typed, typed, typed, json_values)


@st.composite
def mutated_pods(draw, base: dict[str, Any]) -> dict[str, Any]:
    pod = base
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        path = draw(st.sampled_from(POD_PATHS))
        pod = _set(pod, path, draw(_values_for(path)))
    return pod


# -- filter / prioritize --------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["filter", "prioritize"])
@FUZZ
@given(data=st.data())
def test_random_json_bodies_never_5xx(world, verb, data):
    client = world["client"]
    body = data.draw(
        json_values
        | st.dictionaries(st.sampled_from(["Pod", "Nodes", "NodeNames", "x"]), json_values)
    )
    check(client.post(f"/scheduler/{verb}", content=json.dumps(body)))
    still_healthy(client)


@pytest.mark.parametrize("verb", ["filter", "prioritize"])
@FUZZ
@given(data=st.data())
def test_mutated_pods_and_random_node_names(world, verb, data):
    client = world["client"]
    pod = data.draw(mutated_pods(world["pod"]))
    names = data.draw(node_names)
    mode = data.draw(st.sampled_from(["names", "nodes", "both", "neither"]))
    nodes = [n for n in world["nodes"] if n["metadata"]["name"] in set(names)]
    args: dict[str, Any] = {"Pod": pod, "Nodes": None, "NodeNames": None}
    if mode in ("names", "both"):
        args["NodeNames"] = names
    if mode in ("nodes", "both"):
        args["Nodes"] = {"metadata": {}, "items": nodes}
    resp = client.post(f"/scheduler/{verb}", content=json.dumps(args))
    body = check(resp)
    if resp.status_code != 200:
        return
    sent = nodes if args["Nodes"] is not None else []
    asked = list(
        dict.fromkeys([*(n["metadata"]["name"] for n in sent), *(args["NodeNames"] or [])])
    )
    if verb == "prioritize":
        assert [e["Host"] for e in body] == asked
        assert all(type(e["Score"]) is int and 0 <= e["Score"] <= 10 for e in body)
        return
    rejected = set(body["FailedNodes"]) | set(body["FailedAndUnresolvableNodes"])
    assert rejected <= set(asked)
    assert not set(body["FailedNodes"]) & set(body["FailedAndUnresolvableNodes"])
    if args["NodeNames"] is not None:
        assert body["NodeNames"] == [n for n in names if n not in rejected]
    if args["Nodes"] is not None:
        assert body["Nodes"]["items"] == [n for n in nodes if n["metadata"]["name"] not in rejected]
    assert body["Error"] == ""


@pytest.mark.parametrize("fixture", ["filter-request-nodecache-true.json", "bind-request.json"])
@FUZZ
@given(cut=st.floats(min_value=0.0, max_value=0.9999))
def test_truncated_bodies_are_400(world, fixture, cut):
    client = world["client"]
    raw = world["raw"][fixture].rstrip()
    body = raw[: min(len(raw) - 1, int(len(raw) * cut))]
    for verb in ("filter", "prioritize", "bind"):
        resp = client.post(f"/scheduler/{verb}", content=body)
        assert resp.status_code == 400, (verb, resp.text)
        check(resp)
    still_healthy(client)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    extra=st.integers(min_value=1, max_value=3 * LIMIT),
    chunked=st.booleans(),
    verb=st.sampled_from(["filter", "prioritize", "bind"]),
)
def test_bodies_over_the_limit_are_400(world, extra, chunked, verb):
    client = world["client"]
    body = b'{"Pod": {"metadata": {"name": "' + b"a" * (LIMIT + extra) + b'"}}}'
    if chunked:
        resp = client.post(
            f"/scheduler/{verb}",
            content=iter([body[i : i + 8192] for i in range(0, len(body), 8192)]),
        )
    else:
        resp = client.post(f"/scheduler/{verb}", content=body)
    assert resp.status_code == 400
    assert "limit" in check(resp)["Error"]
    still_healthy(client)


@FUZZ
@given(body=st.binary(max_size=300))
def test_random_bytes_never_5xx(world, body):
    client = world["client"]
    for verb in ("filter", "prioritize", "bind"):
        check(client.post(f"/scheduler/{verb}", content=body))
    still_healthy(client)


# -- bind -----------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_bind_random_fields(world, data):
    client = world["client"]
    base = world["bind"]
    keys = ["PodName", "PodNamespace", "PodUID", "Node"]
    args = dict(base)
    for key in data.draw(st.lists(st.sampled_from([*keys, "extra"]), max_size=4)):
        if data.draw(st.booleans()):
            args.pop(key, None)
        else:
            args[key] = data.draw(json_values | st.text(max_size=30))
    calls_before = len(world["binder_calls"])
    resp = client.post("/scheduler/bind", content=json.dumps(args))
    body = check(resp)
    valid = all(
        isinstance(args.get(k), str) and args.get(k) for k in ("PodName", "PodNamespace", "Node")
    ) and isinstance(args.get("PodUID", ""), str)
    if resp.status_code == 200:
        assert set(body) == {"Error"} and isinstance(body["Error"], str)
        assert valid
        assert len(world["binder_calls"]) == calls_before + 1
        if args["Node"].startswith("x"):
            assert "no such node" in body["Error"]
        else:
            assert body["Error"] == ""
    else:
        assert resp.status_code == 400
        assert len(world["binder_calls"]) == calls_before
    still_healthy(client)


# -- explain and other routes ---------------------------------------------------------------


@FUZZ
@given(
    namespace=st.text(min_size=1, max_size=20),
    name=st.text(min_size=1, max_size=20),
    nodes=node_names,
)
def test_explain_random_names(world, namespace, name, nodes):
    client = world["client"]
    path = f"/scheduler/explain/{quote(namespace, safe='')}/{quote(name, safe='')}"
    resp = client.get(path, params=[("node", n) for n in nodes])
    check(resp)
    ok = client.get("/scheduler/explain/demo/demo-prefill-0", params=[("node", n) for n in nodes])
    body = check(ok)
    assert ok.status_code == 200
    if nodes:
        assert sorted(v["node"] for v in body["nodes"]) == sorted(nodes)


@FUZZ
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST", "OPTIONS"]),
    path=st.sampled_from(
        [
            "/scheduler/filter",
            "/scheduler/prioritize",
            "/scheduler/bind",
            "/healthz",
            "/readyz",
            "/metrics",
            "/scheduler",
            "/",
        ]
    )
    | st.text(max_size=30).map(lambda t: "/" + quote(t)),
    body=st.binary(max_size=64),
)
def test_any_method_any_path_never_5xx(world, method, path, body):
    client = world["client"]
    resp = client.request(method, path, content=body if method not in ("GET", "OPTIONS") else None)
    assert resp.status_code < 500, (method, path, resp.status_code)
    still_healthy(client)
