"""Placement-aware scaling: the Controller asks a REAL gRPC placement server before scaling up,
and ranks pods by the server's Explain before scaling down.

Every test starts ``serve(...)`` (TCP on 127.0.0.1, or a unix socket) over a ClusterState built
from a cluster_builder cluster in which the RBG's current pods are bound. Signals come from an
in-memory source (the Prometheus path is covered by test_autoscaler_e2e.py) sized so that the
policy wants a given shape; the RBG is a dict with standalonePattern pod templates (TP4
prefill, TP8 decode), written by a fake actuator.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes.client
import pytest
import yaml
from typer.testing import CliRunner

from topo_sched import labels as L
from topo_sched.autoscaler.actuator import ApplyResult
from topo_sched.autoscaler.controller import Controller, RbgMissing
from topo_sched.autoscaler.placement_gate import (
    POD_DELETION_COST,
    KubePodLister,
    PodLister,
    gate_scale_up,
    role_units,
)
from topo_sched.cli import app
from topo_sched.extender.state import ClusterState
from topo_sched.placement.engine import PlacementEngine
from topo_sched.rpc.placement_client import PlacementClient
from topo_sched.rpc.placement_server import bound_address, serve
from topo_sched.scaling.config import AutoscalerConfig, parse_autoscaler_config
from topo_sched.scaling.signals import Decision, Sample, TargetSignals
from topo_sched.sim.cluster_builder import (
    HGX_H100_8GPU,
    bound,
    bundled_topology,
    gpu_allocation_annotation,
    make_plain_pod,
    make_rack_cluster,
    make_rbg_pod,
)

REPO = Path(__file__).resolve().parents[1]
HGX = bundled_topology(HGX_H100_8GPU)
NS, RBG = "llm", "chat"
KEY = f"{NS}/{RBG}"
CAP_P, CAP_D, ITL = 20_000.0, 64.0, 0.03
NOW = 1_767_225_600.0
KV = "131072"


# -- config, RBG, signals, sinks ------------------------------------------------------------


def config(**over: Any) -> AutoscalerConfig:
    target: dict[str, Any] = {
        "rbg": KEY,
        "roles": {"prefill": 2, "decode": 1},
        "units": {"min": 1, "max": 8},
        "slo": {"ttftSeconds": 5, "itlSeconds": 0.05},
        "capacity": {"prefillTokensPerSecond": CAP_P, "decodeSequences": CAP_D},
        "behavior": {
            "scaleUp": {
                "stabilizationWindowSeconds": 0,
                "policies": [{"type": "Units", "value": 4, "periodSeconds": 15}],
            },
            "scaleDown": {
                "stabilizationWindowSeconds": 0,
                "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
            },
        },
        **over,
    }
    return parse_autoscaler_config(
        {"leaderElection": {"enabled": False}, "targets": [target]}, source="test"
    )


def template(gpus: int, role: str) -> dict[str, Any]:
    return {
        "metadata": {
            "labels": {"app": "chat", "role": role},
            "annotations": {L.ANNOTATION_KV_BYTES_PER_TOKEN: KV},
        },
        "spec": {
            "schedulerName": "topo-scheduler",
            "containers": [
                {
                    "name": role,
                    "image": "lmsysorg/sglang:v0.5.9",
                    "resources": {
                        "requests": {"cpu": "8", L.RESOURCE_NVIDIA_GPU: str(gpus)},
                        "limits": {L.RESOURCE_NVIDIA_GPU: str(gpus)},
                    },
                }
            ],
        },
    }


def rbg_object(prefill: int, decode: int) -> dict[str, Any]:
    def role(name: str, n: int, gpus: int) -> dict[str, Any]:
        return {
            "name": name,
            "replicas": n,
            "standalonePattern": {"template": template(gpus, name)},
        }

    return {
        "apiVersion": "workloads.x-k8s.io/v1alpha2",
        "kind": "RoleBasedGroup",
        "metadata": {"name": RBG, "namespace": NS, "uid": "uid-chat"},
        "spec": {
            "roles": [
                role("router", 1, 0),
                role("prefill", prefill, 4),
                role("decode", decode, 8),
            ]
        },
        "status": {
            "roleStatuses": [
                {"name": r, "replicas": n, "readyReplicas": n, "updatedReplicas": n}
                for r, n in (("router", 1), ("prefill", prefill), ("decode", decode))
            ]
        },
    }


class Rbgs:
    """An in-memory RbgSource holding one RBG."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj

    def get(self, namespace: str, name: str) -> Mapping[str, Any]:
        if (namespace, name) != (NS, RBG):
            raise RbgMissing(f"RBG {namespace}/{name} not found")
        return self.obj


class Journal(list):
    """What the sinks did, in order: ("apply", desired), ("event", reason), ("patch", pod)."""


class FakeActuator:
    def __init__(self, rbgs: Rbgs, journal: Journal) -> None:
        self.rbgs, self.journal = rbgs, journal
        self.calls: list[dict[str, int]] = []

    def apply(self, namespace: str, name: str, desired: Mapping[str, int]) -> ApplyResult:
        self.calls.append(dict(desired))
        self.journal.append(("apply", dict(desired)))
        changed = {}
        for role in self.rbgs.obj["spec"]["roles"]:
            if role["name"] in desired:
                changed[role["name"]] = (role["replicas"], desired[role["name"]])
                role["replicas"] = desired[role["name"]]
        for st in self.rbgs.obj["status"]["roleStatuses"]:
            if st["name"] in desired:
                st["replicas"] = st["readyReplicas"] = desired[st["name"]]
        return ApplyResult(True, 1, changed, "scaled (fake)")


class Events:
    """A recording EventSink."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.recorded: list[tuple[str, str, str]] = []
        self.journal = journal

    def record(self, rbg: Mapping[str, Any], reason: str, message: str, type: str = "Normal"):
        self.recorded.append((reason, message, type))
        if self.journal is not None:
            self.journal.append(("event", reason))

    def reasons(self, reason: str) -> list[tuple[str, str, str]]:
        return [e for e in self.recorded if e[0] == reason]


class Demand:
    """Signals under which the policy wants ``prefill`` and ``decode`` replicas (no latency
    pressure: TTFT 1 s and ITL 30 ms are inside the SLO)."""

    def __init__(self, prefill: float, decode: float) -> None:
        self.prefill, self.decode = prefill, decode

    def read(self, target: Any, now: float | None = None) -> TargetSignals:
        return TargetSignals(
            request_rate=Sample(10.0),
            prompt_tokens_rate=Sample(self.prefill * CAP_P),
            generation_tokens_rate=Sample(self.decode * CAP_D / ITL),  # Little's law
            ttft=Sample(1.0),
            itl=Sample(ITL),
        )


def units(u: int) -> Demand:
    """Demand for ``u`` strict 2:1 units (90% of them, so rounding up gives exactly u)."""
    return Demand(0.9 * 2 * u, 0.9 * u)


def shape(p: int, d: int) -> dict[str, int]:
    return {"prefill": p, "decode": d}


def sample(c: Controller, name: str, **labels: str) -> float | None:
    return c.registry.get_sample_value(name, labels)


# -- clusters and the real server -----------------------------------------------------------


def current_pods(prefill_nodes: list[str], decode_nodes: list[str]) -> list[dict[str, Any]]:
    pods = [
        bound(
            make_rbg_pod(
                NS, RBG, "prefill", i, 4, annotations={L.ANNOTATION_KV_BYTES_PER_TOKEN: KV}
            ),
            n,
        )
        for i, n in enumerate(prefill_nodes)
    ]
    pods += [
        bound(
            make_rbg_pod(
                NS, RBG, "decode", i, 8, annotations={L.ANNOTATION_KV_BYTES_PER_TOKEN: KV}
            ),
            n,
        )
        for i, n in enumerate(decode_nodes)
    ]
    return pods  # fmt: skip


def half_hold(nodes: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """A batch pod holding GPUs 0-3 of ``name`` (the agent's allocation annotation says so)."""
    node = next(n for n in nodes if n["metadata"]["name"] == name)
    node["metadata"]["annotations"].update(
        gpu_allocation_annotation({g: f"batch/half-{name}" for g in range(4)})
    )
    return make_plain_pod("batch", f"half-{name}", 4, node=name)


TWO_P_ONE_D = current_pods(["gpu-r00-n00", "gpu-r00-n00"], ["gpu-r00-n01"])


def roomy() -> ClusterState:
    """16 HGX nodes in 4 racks, 2 zones; 2P1D running in rack 0: room for many units."""
    return ClusterState.from_objects(make_rack_cluster(4, 4, [HGX], zones=2), TWO_P_ONE_D)


def tight() -> ClusterState:
    """6 HGX nodes; 2P1D on n00/n01; n02, n03 empty; n04, n05 half taken (4 GPUs free each).
    One more unit fits (prefills on n04+n05, decode on n02); of a second one the prefills fit
    (on n03) but its 8-GPU decode finds no node."""
    nodes = make_rack_cluster(1, 6, [HGX], zones=1)
    held = [half_hold(nodes, "gpu-r00-n04"), half_hold(nodes, "gpu-r00-n05")]
    return ClusterState.from_objects(nodes, TWO_P_ONE_D + held)


def no_room_for_decode() -> ClusterState:
    """4 HGX nodes; 2P1D on n00/n01; n02 and n03 half taken: the next unit's two 4-GPU
    prefills would fit, its 8-GPU decode would not."""
    nodes = make_rack_cluster(1, 4, [HGX], zones=1)
    held = [half_hold(nodes, "gpu-r00-n02"), half_hold(nodes, "gpu-r00-n03")]
    return ClusterState.from_objects(nodes, TWO_P_ONE_D + held)


@contextmanager
def placement(state: ClusterState, *, host: str = "127.0.0.1") -> Iterator[PlacementClient]:
    server = serve(state, PlacementEngine(), host=host, port=0, max_workers=4)
    try:
        with PlacementClient(bound_address(server), timeout_s=10) as client:
            yield client
    finally:
        server.stop(0).wait(5)


def controller(
    client: Any, demand: Demand, rbg: dict[str, Any] | None = None, **kw: Any
) -> tuple[Controller, FakeActuator, Events, Journal]:
    journal = Journal()
    rbgs = Rbgs(rbg or rbg_object(2, 1))
    actuator = FakeActuator(rbgs, journal)
    events = Events(journal)
    cfg = kw.pop("cfg", None) or config()
    c = Controller(cfg, demand, rbgs, actuator, events, placement=client, clock=lambda: NOW, **kw)
    return c, actuator, events, journal


# -- the request the gate builds ------------------------------------------------------------


def test_role_units_come_from_the_rbg_pod_templates() -> None:
    shapes = role_units(rbg_object(2, 1), config().targets[0])
    assert list(shapes) == ["prefill", "decode"]  # prefill placed first; router not a target role
    p, d = shapes["prefill"], shapes["decode"]
    assert (p.gpus_per_pod, p.pods_per_instance, d.gpus_per_pod) == (4, 1, 8)
    assert p.labels == {
        "app": "chat",
        "role": "prefill",
        L.RBG_GROUP_NAME: RBG,
        L.RBG_ROLE_NAME: "prefill",
    }
    assert d.annotations == {L.ANNOTATION_KV_BYTES_PER_TOKEN: KV}
    req = p.request(2)
    assert (req.pods_per_unit, req.instance_size) == (2, None)


def _example(path: Path) -> dict[str, Any]:
    (obj,) = [
        o for o in yaml.safe_load_all(path.read_text()) if o and o["kind"] == "RoleBasedGroup"
    ]
    return obj


def test_role_units_of_the_example_and_fixture_rbgs() -> None:
    cfg = config().targets[0]
    # standalonePattern, TP2 pods, intra-node: required on the template
    sa = role_units(_example(REPO / "manifests/examples/sglang-pd-2p1d.yaml"), cfg)
    assert sa["prefill"].gpus_per_pod == 2 and sa["prefill"].pods_per_instance == 1
    assert sa["decode"].annotations[L.ANNOTATION_INTRA_NODE] == "required"
    assert sa["prefill"].labels[L.RBG_GROUP_NAME] == "sglang-pd-inference"
    # leaderWorkerPattern: size 4 / 2, one GPU per pod; leader patch labels applied
    lw = role_units(_example(REPO / "manifests/examples/sglang-pd-leader-worker.yaml"), cfg)
    assert (lw["prefill"].pods_per_instance, lw["prefill"].gpus_per_pod) == (4, 1)
    assert (lw["decode"].pods_per_instance, lw["decode"].gpus_per_pod) == (2, 1)
    assert lw["prefill"].labels["role"] == "leader"
    assert lw["prefill"].annotations[L.ANNOTATION_PACK_MODE] == "required"
    req = lw["prefill"].request(2)  # weight 2: two instances of four pods
    assert (req.pods_per_unit, req.instance_size) == (8, 4)
    # templateRef into spec.roleTemplates, with a patch that adds the GPU request
    fx = Path("/work/shared/fixtures/rbg/vllm-pd-disagg-with-mooncake-te.yaml")
    if fx.exists():
        ref = role_units(_example(fx), cfg)
        assert ref["prefill"].gpus_per_pod == 1 and ref["decode"].gpus_per_pod == 1
        assert ref["prefill"].labels["app"] == "vllm-inference"


# -- scale-up -------------------------------------------------------------------------------


def test_roomy_cluster_scale_up_goes_through_unchanged() -> None:
    with placement(roomy()) as client:
        c, actuator, events, _ = controller(client, units(2))
        (d,) = c.tick(now=NOW)
    assert (d.action, d.code) == ("scale", "demand")
    assert d.current == shape(2, 1) and d.desired == shape(4, 2)
    assert d.reason.startswith("scale up to 4P,2D: ") and "placed" not in d.reason
    assert actuator.calls == [shape(4, 2)]
    assert sample(c, "topo_sched_autoscaler_pending_units", target=KEY) == 0
    assert events.reasons("PendingCapacity") == [] and len(events.reasons("Scaled")) == 1
    assert [ch[1:] for ch in c.state(KEY).changes] == [(1.0, 2.0)]
    gate = c.last_gates[KEY]
    assert (gate.requested_units, gate.placeable_units, gate.degraded) == (1, 1, False)


def test_tight_cluster_scales_by_the_one_unit_that_fits(caplog) -> None:
    with placement(tight()) as client:
        c, actuator, events, journal = controller(client, units(3))  # wants 6P3D: 2 more units
        with caplog.at_level(logging.INFO, logger="topo_sched.autoscaler.controller"):
            (d,) = c.tick(now=NOW)
    assert (d.action, d.code) == ("scale", "demand")
    assert d.current == shape(2, 1) and d.desired == shape(4, 2)  # current + 1 unit
    assert d.units_desired == 2
    assert d.reason.startswith("scale up to 4P,2D: ")
    assert "; placed 1 of 2 units: decode: 0/6 nodes: 6 gpus-in-use (wanted 6P,3D)" in d.reason
    assert actuator.calls == [shape(4, 2)]
    assert sample(c, "topo_sched_autoscaler_pending_units", target=KEY) == 1
    ((_, message, type_),) = events.reasons("PendingCapacity")
    assert type_ == "Warning"
    assert message == (
        "1 of 2 ratio unit(s) cannot be placed now (scaling to 4P,2D): "
        "placed 1 of 2 units: decode: 0/6 nodes: 6 gpus-in-use"
    )
    assert journal == [
        ("apply", shape(4, 2)),
        ("event", "Scaled"),
        ("event", "PendingCapacity"),
    ]
    # the state records the change made (1 -> 2 units), and the policy's recommendation (3)
    state = c.state(KEY)
    assert state.changes == ((NOW, 1.0, 2.0),)
    assert state.recommendations[-1] == (NOW, 3.0)
    (line,) = [r for r in caplog.records if r.getMessage().startswith("decision ")]
    assert "desired=prefill:4,decode:2" in line.getMessage()


def test_decode_that_cannot_be_placed_holds_everything_never_a_prefill_alone() -> None:
    with placement(no_room_for_decode()) as client:
        c, actuator, events, _ = controller(client, units(2))  # wants 4P2D
        (d,) = c.tick(now=NOW)
        (again,) = c.tick(now=NOW + 30)  # same answer: the Event is not repeated
        (later,) = c.tick(now=NOW + 330)  # five minutes on: recorded again
    assert (d.action, d.code) == ("hold", "unplaceable")
    assert d.current == d.desired == shape(2, 1)
    assert d.reason.startswith("scale up to 4P,2D: ")
    assert d.reason.endswith("; placed 0 of 1 unit: decode: 0/4 nodes: 4 gpus-in-use; holding")
    assert actuator.calls == []  # no change at all: not even the prefills that would fit
    assert c.state(KEY).changes == ()
    assert (again.code, later.code) == ("unplaceable", "unplaceable")
    pending = events.reasons("PendingCapacity")
    assert len(pending) == 2
    assert pending[0][1] == (
        "1 of 1 ratio unit(s) cannot be placed now (holding at 2P,1D): "
        "placed 0 of 1 unit: decode: 0/4 nodes: 4 gpus-in-use"
    )
    assert sample(c, "topo_sched_autoscaler_pending_units", target=KEY) == 1
    labels = {"target": KEY, "action": "hold", "code": "unplaceable"}
    assert sample(c, "topo_sched_autoscaler_decisions_total", **labels) == 3
    assert events.reasons("Scaled") == []


def test_dry_run_shows_the_gated_decision_and_records_nothing() -> None:
    with placement(tight()) as client:
        c = Controller(config(), units(3), Rbgs(rbg_object(2, 1)), placement=client)
        (d,) = c.tick(now=NOW)
    assert c.dry_run and d.action == "scale" and d.desired == shape(4, 2)
    assert c.state(KEY).changes == ()
    assert sample(c, "topo_sched_autoscaler_pending_units", target=KEY) == 1


def test_extender_down_degrades_to_the_plain_decision(caplog) -> None:
    server = serve(roomy(), PlacementEngine(), host="127.0.0.1", port=0)
    addr = bound_address(server)
    server.stop(0).wait(5)  # a closed port
    with PlacementClient(addr, timeout_s=2) as client:
        c, actuator, events, _ = controller(client, units(3))
        with caplog.at_level(logging.WARNING, logger="topo_sched.autoscaler.controller"):
            (d,) = c.tick(now=NOW)
    assert (d.action, d.code) == ("scale", "demand")
    assert d.desired == shape(6, 3)  # the plain policy's decision, applied
    assert d.reason.endswith("; placement not checked (placement service unavailable)")
    assert actuator.calls == [shape(6, 3)]
    assert sample(c, "topo_sched_autoscaler_placement_unavailable_total", target=KEY) == 1
    assert sample(c, "topo_sched_autoscaler_pending_units", target=KEY) is None  # not known
    assert c.last_gates[KEY].degraded
    (line,) = [r for r in caplog.records if r.getMessage().startswith("placement unavailable")]
    assert f"target={KEY}" in line.getMessage() and addr in line.getMessage()
    assert line.levelno == logging.WARNING
    assert events.reasons("PendingCapacity") == []
    assert [ch[1:] for ch in c.state(KEY).changes] == [(1.0, 3.0)]


def test_scale_down_and_hold_pass_through_without_asking() -> None:
    class Refuses:
        def what_if(self, request: Any) -> Any:
            raise AssertionError("asked WhatIf for a decision that adds nothing")

    rbg, target = rbg_object(4, 2), config().targets[0]
    down = Decision(KEY, shape(4, 2), shape(2, 1), "scale", "scale down to 2P,1D", "demand")
    hold = Decision(KEY, shape(4, 2), shape(4, 2), "hold", "steady", "steady")
    for d in (down, hold):
        g = gate_scale_up(d, rbg, target, Refuses())  # type: ignore[arg-type]
        assert g.desired == d.desired and g.requested_units == 0 and not g.degraded
    c = Controller(config(), units(1), Rbgs(rbg), placement=Refuses())  # type: ignore[arg-type]
    (d,) = c.tick(now=NOW)
    assert d.desired == shape(2, 1)
    assert sample(c, "topo_sched_autoscaler_pending_units", target=KEY) == 0


def test_leader_worker_units_are_asked_as_whole_instances() -> None:
    rbg = _example(REPO / "manifests/examples/sglang-pd-leader-worker.yaml")
    rbg["metadata"]["namespace"] = NS
    target = config(rbg=f"{NS}/pd-disagg-lws", roles={"prefill": 1, "decode": 2}).targets[0]
    up = Decision(target.rbg, shape(2, 4), shape(4, 8), "scale", "scale up to 4P,8D", "demand")
    nodes = make_rack_cluster(4, 4, [HGX], zones=2)
    with placement(ClusterState.from_objects(nodes, [])) as client:
        g = gate_scale_up(up, rbg, target, client)
    # 2 units of (1 prefill instance of 4 pods + 2 decode instances of 2 pods), 1 GPU each
    assert (g.requested_units, g.placeable_units, g.pending_units) == (2, 2, 0)
    assert g.desired == shape(4, 8) and not g.degraded


def test_unreadable_templates_degrade_to_the_plain_decision() -> None:
    rbg = rbg_object(2, 1)
    decode = rbg["spec"]["roles"][2]
    decode["standalonePattern"] = {"templateRef": {"name": "missing"}}
    with placement(roomy()) as client:
        c, actuator, _, _ = controller(client, units(2), rbg)
        (d,) = c.tick(now=NOW)
    assert d.action == "scale" and actuator.calls == [shape(4, 2)]
    assert d.reason.endswith("; placement not checked (RBG pod templates unreadable)")
    assert "templateRef 'missing'" in c.last_gates[KEY].message
    assert sample(c, "topo_sched_autoscaler_placement_unavailable_total", target=KEY) == 1


# -- band mode ------------------------------------------------------------------------------

BAND = {"mode": "band", "band": {"min": 1.5, "max": 3.0}}


def test_band_mode_one_what_if_for_the_deltas_fits_on_a_roomy_cluster_unix_socket() -> None:
    short = tempfile.mkdtemp(prefix="ts-as-", dir="/tmp")  # sun_path is ~107 bytes
    try:
        sock = f"unix:{os.path.join(short, 'placement.sock')}"
        with placement(roomy(), host=sock) as client:
            assert client.target == sock
            c, actuator, events, _ = controller(client, Demand(4.5, 1.8), cfg=config(**BAND))
            (d,) = c.tick(now=NOW)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert d.action == "scale" and d.desired == shape(5, 2)  # +3P +1D, in band (2.5)
    assert actuator.calls == [shape(5, 2)]
    gate = c.last_gates[KEY]
    assert (gate.requested_units, gate.placeable_units, gate.pending_units) == (1, 1, 0)
    assert events.reasons("PendingCapacity") == []


def test_band_mode_holds_when_the_change_does_not_fit_whole() -> None:
    with placement(no_room_for_decode()) as client:
        c, actuator, events, _ = controller(client, Demand(4.5, 1.8), cfg=config(**BAND))
        (d,) = c.tick(now=NOW)
    assert (d.action, d.code) == ("hold", "unplaceable")
    assert d.desired == d.current == shape(2, 1)
    assert "placed 0 of 1 unit: prefill: 0/4 nodes: 4 gpus-in-use" in d.reason
    assert actuator.calls == [] and c.state(KEY).changes == ()
    assert len(events.reasons("PendingCapacity")) == 1


# -- scale-down ordering: pod-deletion cost -------------------------------------------------

PREFILL_NODES = ["gpu-r00-n00", "gpu-r00-n00", "gpu-r00-n02", "gpu-r02-n00"]
DECODE_NODES = ["gpu-r00-n01", "gpu-r03-n00"]  # decode-1: another zone than every prefill


class FakePods:
    """A PodLister over fixed pod objects; records the patches."""

    def __init__(self, pods: list[dict[str, Any]], journal: Journal, fail_patch: bool = False):
        self.pods, self.journal, self.fail_patch = pods, journal, fail_patch
        self.patches: dict[str, dict[str, str]] = {}
        self.selectors: list[dict[str, str]] = []

    def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[Mapping[str, Any]]:
        self.selectors.append(dict(labels))
        return [
            copy.deepcopy(p)
            for p in self.pods
            if p["metadata"]["namespace"] == namespace
            and all(p["metadata"]["labels"].get(k) == v for k, v in labels.items())
        ]

    def patch_pod_annotations(self, namespace: str, name: str, annotations: Mapping[str, str]):
        if self.fail_patch:
            raise RuntimeError("Forbidden: pods is forbidden")
        self.journal.append(("patch", name))
        self.patches[name] = dict(annotations)


def spread_out() -> list[dict[str, Any]]:
    return current_pods(PREFILL_NODES, DECODE_NODES)


def test_deletion_cost_worst_placed_pod_gets_the_lowest_cost(caplog) -> None:
    pods = spread_out()
    nodes = make_rack_cluster(4, 4, [HGX], zones=2)
    with placement(ClusterState.from_objects(nodes, pods)) as client:
        c, actuator, _, journal = controller(client, units(1), rbg_object(4, 2))
        lister = FakePods(pods, journal)
        assert isinstance(lister, PodLister)
        c.pods, c.deletion_cost = lister, True
        with caplog.at_level(logging.INFO, logger="topo_sched.autoscaler.controller"):
            (d,) = c.tick(now=NOW)
    assert d.action == "scale" and d.desired == shape(2, 1)
    assert lister.selectors == [
        {L.RBG_GROUP_NAME: RBG, L.RBG_ROLE_NAME: "prefill"},
        {L.RBG_GROUP_NAME: RBG, L.RBG_ROLE_NAME: "decode"},
    ]
    cost = {pod: int(a[POD_DELETION_COST]) for pod, a in lister.patches.items()}
    assert set(cost) == {f"chat-prefill-{i}" for i in range(4)} | {"chat-decode-0", "chat-decode-1"}
    assert all(0 <= v <= 1000 for v in cost.values())
    # decode-1 sits in zone b, away from every prefill: lowest cost, removed first
    assert cost["chat-decode-1"] < cost["chat-decode-0"]
    # prefill-3 (zone b, no decode in its rack) is the worst-placed prefill
    assert cost["chat-prefill-3"] < min(cost[f"chat-prefill-{i}"] for i in range(3))
    # the annotations are written before the scale-down
    assert [j[0] for j in journal].index("apply") > max(
        i for i, j in enumerate(journal) if j[0] == "patch"
    )
    assert actuator.calls == [shape(2, 1)]
    assert sample(c, "topo_sched_autoscaler_deletion_cost_patches_total", target=KEY) == 6
    (line,) = [r for r in caplog.records if "role=decode worst first" in r.getMessage()]
    worst_first = line.getMessage().split("worst first: ")[1].split(", ")
    assert [entry.split("=")[0] for entry in worst_first] == [
        "chat-decode-1@gpu-r03-n00",
        "chat-decode-0@gpu-r00-n01",
    ]


def test_deletion_cost_failures_never_block_the_scale_down(caplog) -> None:
    pods = spread_out()
    nodes = make_rack_cluster(4, 4, [HGX], zones=2)
    with placement(ClusterState.from_objects(nodes, pods)) as client:
        c, actuator, _, journal = controller(client, units(1), rbg_object(4, 2), deletion_cost=True)
        c.pods = FakePods(pods, journal, fail_patch=True)
        with caplog.at_level(logging.WARNING, logger="topo_sched.autoscaler.controller"):
            (d,) = c.tick(now=NOW)
    assert d.action == "scale" and actuator.calls == [shape(2, 1)]
    assert sample(c, "topo_sched_autoscaler_deletion_cost_failures_total", target=KEY) == 6
    assert any("cannot annotate" in r.getMessage() for r in caplog.records)

    # the extender down: nothing is ranked, the scale-down still goes ahead
    server = serve(roomy(), PlacementEngine(), host="127.0.0.1", port=0)
    addr = bound_address(server)
    server.stop(0).wait(5)
    with PlacementClient(addr, timeout_s=2) as down:
        c, actuator, _, journal = controller(down, units(1), rbg_object(4, 2), deletion_cost=True)
        lister = FakePods(pods, journal)
        c.pods = lister
        (d,) = c.tick(now=NOW)
    assert d.action == "scale" and actuator.calls == [shape(2, 1)]
    assert lister.patches == {}
    assert sample(c, "topo_sched_autoscaler_deletion_cost_failures_total", target=KEY) == 2


def test_deletion_cost_is_off_by_default() -> None:
    pods = spread_out()
    nodes = make_rack_cluster(4, 4, [HGX], zones=2)
    with placement(ClusterState.from_objects(nodes, pods)) as client:
        c, actuator, _, journal = controller(client, units(1), rbg_object(4, 2))
        lister = FakePods(pods, journal)
        c.pods = lister
        c.tick(now=NOW)
    assert actuator.calls == [shape(2, 1)]
    assert lister.selectors == [] and lister.patches == {}


# -- the live pod lister, over HTTP ---------------------------------------------------------


class _PodApi(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, pods: list[dict[str, Any]]) -> None:
        super().__init__(("127.0.0.1", 0), _PodHandler)
        self.pods = pods
        self.seen: list[tuple[str, str, str, Any]] = []  # method, path+query, content type, body
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()


class _PodHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _PodApi

    def log_message(self, *args: Any) -> None:
        return

    def _reply(self, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self.server.seen.append(("GET", self.path, "", None))
        query = parse_qs(urlsplit(self.path).query)
        want = dict(kv.split("=", 1) for kv in query["labelSelector"][0].split(","))
        items = [
            p for p in self.server.pods
            if all(p["metadata"]["labels"].get(k) == v for k, v in want.items())
        ]  # fmt: skip
        self._reply({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(("PATCH", self.path, self.headers["Content-Type"], body))
        self._reply(self.server.pods[0])


def test_kube_pod_lister_lists_by_labels_and_merge_patches_annotations() -> None:
    api = _PodApi(spread_out())
    try:
        host, port = api.server_address[:2]
        client = kubernetes.client.ApiClient(
            kubernetes.client.Configuration(host=f"http://{host}:{port}")
        )
        lister = KubePodLister(client)
        got = lister.list_pods(NS, {L.RBG_GROUP_NAME: RBG, L.RBG_ROLE_NAME: "decode"})
        lister.patch_pod_annotations(NS, "chat-decode-1", {POD_DELETION_COST: "175"})
    finally:
        api.shutdown()
        api.server_close()
    assert [p["metadata"]["name"] for p in got] == ["chat-decode-0", "chat-decode-1"]
    (get, patch) = api.seen
    assert urlsplit(get[1]).path == f"/api/v1/namespaces/{NS}/pods"
    assert parse_qs(urlsplit(get[1]).query)["labelSelector"] == [
        f"{L.RBG_GROUP_NAME}={RBG},{L.RBG_ROLE_NAME}=decode"
    ]
    assert patch[:3] == (
        "PATCH",
        f"/api/v1/namespaces/{NS}/pods/chat-decode-1",
        "application/merge-patch+json",
    )
    assert patch[3] == {"metadata": {"annotations": {POD_DELETION_COST: "175"}}}


# -- CLI ------------------------------------------------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The command installs a root handler on the runner's stderr; put the old ones back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_cli_flags(tmp_path, root_logging) -> None:
    cfg = tmp_path / "autoscaler.yaml"
    cfg.write_text(yaml.safe_dump(config().model_dump(by_alias=True, mode="json")))
    rbgs = tmp_path / "rbg.json"
    rbgs.write_text(json.dumps(rbg_object(2, 1)))
    base = ["autoscaler", "--config", str(cfg), "--rbg-file", str(rbgs), "--once"]
    runner = CliRunner()

    r = runner.invoke(app, [*base, "--deletion-cost"])
    assert r.exit_code == 2 and "--deletion-cost needs --placement" in r.output
    r = runner.invoke(app, [*base, "--placement", "127.0.0.1:1", "--placement-timeout", "0"])
    assert r.exit_code == 2 and "--placement-timeout must be > 0" in r.output
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    r = runner.invoke(app, [*base, "--placement", "127.0.0.1:1", "--placement-tls-ca", str(bad)])
    assert r.exit_code == 2 and "not a PEM file" in r.output

    # wired: an unreachable Prometheus holds (no scale-up, so WhatIf is not asked)
    with placement(roomy()) as client:
        r = runner.invoke(
            app,
            [*base, "--placement", client.target, "--prometheus", "http://127.0.0.1:1"],
        )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{") :])
    assert out["targets"][0]["code"] == "unreachable"
