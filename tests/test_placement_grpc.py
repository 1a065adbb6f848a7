"""The placement gRPC service: a real grpc server and client (TCP on 127.0.0.1, a unix socket,
TLS), what-if on full / fragmented / half-fitting / roomy clusters, Explain, ClusterSummary,
health, reflection, errors, and the extender command serving it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from topo_sched import labels as L
from topo_sched.extender.state import ClusterState
from topo_sched.placement.engine import PlacementEngine
from topo_sched.placement.whatif import (
    RoleRequest,
    WhatIfRequest,
    cluster_summary,
    what_if,
)
from topo_sched.rpc.placement_client import (
    ClientTls,
    PlacementClient,
    PlacementRequestError,
    PlacementUnavailable,
)
from topo_sched.rpc.placement_server import (
    SERVICE_NAME,
    TlsConfig,
    bound_address,
    result_from_proto,
    result_to_proto,
    serve,
)
from topo_sched.rpc.topo_sched.v1 import placement_pb2 as pb
from topo_sched.rpc.topo_sched.v1 import placement_pb2_grpc as pb_grpc
from topo_sched.sim.cluster_builder import (
    HGX_H100_8GPU,
    PCIE_8X_RTX4090_2SOCKET,
    as_list,
    bound,
    bundled_topology,
    gpu_allocation_annotation,
    make_plain_pod,
    make_rack_cluster,
    make_rbg_pod,
)
from topo_sched.sim.scheduler import SchedulerModel

HGX = bundled_topology(HGX_H100_8GPU)
PCIE = bundled_topology(PCIE_8X_RTX4090_2SOCKET)
NS = "llm"


def two_p_one_d(tp_prefill: int = 4, tp_decode: int = 8, **annotations: str) -> tuple:
    ann = {k.replace("_", "-"): v for k, v in annotations.items()}
    return (
        RoleRequest("prefill", 2, tp_prefill, annotations=ann),
        RoleRequest("decode", 1, tp_decode, annotations=ann),
    )


def hold(nodes: list[dict], name: str, gpus: Sequence[int], pod: str) -> dict:
    """A plain pod holding exactly ``gpus`` on node ``name`` (agent allocation annotation)."""
    node = next(n for n in nodes if n["metadata"]["name"] == name)
    ann = node["metadata"]["annotations"]
    owners = json.loads(ann.get(L.ANNOTATION_GPU_ALLOCATION, "{}"))
    owners.update({str(g): f"batch/{pod}" for g in gpus})
    ann.update(gpu_allocation_annotation({int(k): v for k, v in owners.items()}))
    return make_plain_pod("batch", pod, len(gpus), node=name)


@contextmanager
def running(state: Any, *, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> Iterator[str]:
    server = serve(state, PlacementEngine(), host=host, port=port, max_workers=4, **kw)
    try:
        yield bound_address(server)
    finally:
        server.stop(0).wait(5)


@contextmanager
def client_for(state: Any, **kw: Any) -> Iterator[PlacementClient]:
    with running(state, **kw) as addr, PlacementClient(addr, timeout_s=10) as client:
        yield client


def free_by_node(state: ClusterState) -> dict[str, int]:
    return {n: st.free_mask for n, st in state.snapshot().nodes.items()}


# -- clusters ---------------------------------------------------------------------------------


def full_cluster() -> ClusterState:
    nodes = make_rack_cluster(2, 2, [HGX], zones=1)
    pods = [
        make_plain_pod("batch", f"job-{i}", 8, node=n["metadata"]["name"])
        for i, n in enumerate(nodes)
    ]
    return ClusterState.from_objects(nodes, pods)


def fragmented_cluster() -> ClusterState:
    """Four PCIe 2-socket boxes, each with GPUs 0,1 (NUMA 0) and 4,5 (NUMA 1) taken: 4 free
    GPUs per node, but never 4 in one NUMA node (these boxes have no NVLink islands)."""
    nodes = make_rack_cluster(1, 4, [PCIE], zones=1)
    pods = []
    for n in nodes:
        name = n["metadata"]["name"]
        pods.append(hold(nodes, name, (0, 1), f"a-{name}"))
        pods.append(hold(nodes, name, (4, 5), f"b-{name}"))
    return ClusterState.from_objects(nodes, pods)


def half_cluster() -> ClusterState:
    """Two HGX nodes, 12 free GPUs: two TP4 prefills fit, then the TP8 decode cannot."""
    nodes = make_rack_cluster(1, 2, [HGX], zones=1)
    pods = [hold(nodes, "gpu-r00-n01", (0, 1, 2, 3), "half")]
    return ClusterState.from_objects(nodes, pods)


def roomy_cluster(*, with_existing: bool = False) -> ClusterState:
    nodes = make_rack_cluster(4, 4, [HGX], zones=2)
    pods = []
    if with_existing:
        pods.append(bound(make_rbg_pod(NS, "chat", "prefill", 0, 4), "gpu-r03-n00"))
        pods.append(make_rbg_pod(NS, "chat", "prefill", 1, 4))  # pending, for Explain by name
    return ClusterState.from_objects(nodes, pods)


# -- what-if ----------------------------------------------------------------------------------


def test_full_cluster_places_nothing_and_names_the_roles() -> None:
    state = full_cluster()
    with client_for(state) as c:
        res = c.what_if(WhatIfRequest(NS, "chat", 2, two_p_one_d()))
    assert res.units_placeable == 0 and not res.feasible
    assert res.placements == [] and res.cost == 0
    assert res.first_unfit_unit == 0
    assert [r.role for r in res.reasons] == ["prefill", "decode"]
    assert res.reasons[0].message == "prefill: 0/4 nodes: 4 gpus-in-use"
    assert res.reasons[1].message == "decode: 0/4 nodes: 4 gpus-in-use"
    assert res.reasons[1].rejections == (("gpus-in-use", 4),)
    assert res.reasons[0].nodes_total == 4


def test_fragmented_cluster_intra_node_required_does_not_fit() -> None:
    state = fragmented_cluster()
    roles = (RoleRequest("prefill", 1, 4, annotations={L.ANNOTATION_INTRA_NODE: "required"}),)
    with client_for(state) as c:
        summary = c.cluster_summary()
        required = c.what_if(WhatIfRequest(NS, "frag", 1, roles))
        preferred = c.what_if(WhatIfRequest(NS, "frag", 1, (RoleRequest("prefill", 1, 4),)))
    # Free GPUs exist: 16, four per node, but no node has 4 in one NUMA node (or island).
    assert summary.gpus_free == 16
    (k4,) = [f for f in summary.fits if f.gpus == 4]
    assert (k4.any, k4.numa_or_better, k4.nvlink_island) == (4, 0, 0)
    assert required.units_placeable == 0 and required.placements == []
    (reason,) = required.reasons
    assert reason.rejections == (("intra-node-required", 4),)
    assert reason.message == "prefill: 0/4 nodes: 4 intra-node-required"
    # Preferred: the unit fits, split across the sockets.
    assert preferred.feasible and preferred.placements[0].locality == "any"


def test_half_a_unit_is_no_unit() -> None:
    state = half_cluster()
    before = state.snapshot()
    with client_for(state) as c:
        res = c.what_if(WhatIfRequest(NS, "chat", 1, two_p_one_d()))
    assert res.units_placeable == 0 and not res.feasible
    assert res.placements == []  # the two prefills that fit are not offered without a decode
    assert [r.role for r in res.reasons] == ["decode"]
    assert res.reasons[0].message.startswith("decode: 0/2 nodes: 2 gpus-in-use")
    assert state.snapshot() is before


def test_roomy_cluster_all_units_placeable_and_pd_share_a_rack() -> None:
    state = roomy_cluster()
    req = WhatIfRequest(NS, "chat", 3, two_p_one_d())
    with client_for(state) as c:
        res = c.what_if(req)
    assert res.feasible and res.units_placeable == 3 and res.first_unfit_unit is None
    assert res.reasons == []
    assert len(res.placements) == 9
    for u in range(3):
        unit = [p for p in res.placements if p.unit == u]
        assert sorted(p.role for p in unit) == ["decode", "prefill", "prefill"]
        racks = {p.node.split("-n")[0] for p in unit}
        assert len(racks) == 1, f"unit {u} spans racks: {unit}"
        for p in unit:
            assert p.locality == "nvlink-island"
            assert 0 <= p.score <= 10
            assert len(p.gpus) == (4 if p.role == "prefill" else 8)
    # No GPU is given twice on a node.
    taken = [(p.node, g) for p in res.placements for g in p.gpus]
    assert len(taken) == len(set(taken))
    assert res.cost == pytest.approx(res.score_cost + res.kv_path_cost)
    # PD pairs share a rack (or a node): 10 x (1 - 0.7) at most per unit.
    assert 0 < res.kv_path_cost <= 3 * 3.0 + 1e-9
    assert res.snapshot_age_seconds is not None and res.snapshot_age_seconds >= 0


def test_over_grpc_equals_the_core_with_the_scheduler_model() -> None:
    state = roomy_cluster()
    req = WhatIfRequest(NS, "chat", 4, two_p_one_d(), all_or_nothing=False)
    engine = PlacementEngine()
    local = what_if(state.snapshot(), engine, SchedulerModel(engine, tie_break="name"), req)
    with client_for(state) as c:
        remote = c.what_if(req)
    remote.snapshot_age_seconds = None
    assert remote == local
    # Round trip of the translation itself.
    assert result_from_proto(result_to_proto(local)) == local


def test_names_continue_the_group_and_all_or_nothing() -> None:
    state = roomy_cluster(with_existing=True)
    with client_for(state) as c:
        res = c.what_if(WhatIfRequest(NS, "chat", 1, two_p_one_d()))
        # 16 nodes x 8 GPUs - 4 held = 124 free; a unit takes 16: 7 units fit, not 8.
        partial = c.what_if(WhatIfRequest(NS, "chat", 8, two_p_one_d()))
        whole = c.what_if(WhatIfRequest(NS, "chat", 8, two_p_one_d(), all_or_nothing=True))
    assert [p.pod for p in res.placements] == ["chat-prefill-1", "chat-prefill-2", "chat-decode-0"]
    assert partial.units_placeable == 7 and len(partial.placements) == 21
    assert partial.first_unfit_unit == 7 and partial.reasons
    assert whole.units_placeable == 7 and not whole.feasible
    assert whole.placements == [] and whole.cost == 0
    assert whole.reasons == partial.reasons


def test_leader_worker_instances_are_labelled() -> None:
    state = roomy_cluster()
    roles = (RoleRequest("prefill", 1, 8), RoleRequest("decode", 2, 8, instance_size=2))
    with client_for(state) as c:
        res = c.what_if(WhatIfRequest(NS, "big", 2, roles))
    assert res.feasible
    decode = [p for p in res.placements if p.role == "decode"]
    assert [(p.pod, p.instance) for p in decode] == [
        ("big-decode-0-0", "big-decode-0"),
        ("big-decode-0-1", "big-decode-0"),
        ("big-decode-1-0", "big-decode-1"),
        ("big-decode-1-1", "big-decode-1"),
    ]


def test_what_if_leaves_the_state_unchanged() -> None:
    state = roomy_cluster(with_existing=True)
    snap = state.snapshot()
    free, counts, history = free_by_node(state), state.counts(), state.history()
    with client_for(state) as c:
        for units in (1, 5, 50):
            c.what_if(WhatIfRequest(NS, "chat", units, two_p_one_d()))
    assert state.snapshot() is snap
    assert free_by_node(state) == free
    assert state.counts() == counts and state.history() == history
    assert set(snap.placements) == {"llm/chat-prefill-0"}


# -- explain and summary --------------------------------------------------------------------


def test_explain_by_pod_json_and_by_name() -> None:
    state = roomy_cluster(with_existing=True)
    pod = make_rbg_pod(NS, "chat", "decode", 0, 8)
    engine = PlacementEngine()
    with client_for(state) as c:
        by_json = c.explain(pod, nodes=["gpu-r03-n00", "gpu-r03-n01", "gpu-r00-n00"])
        by_name = c.explain(namespace=NS, name="chat-prefill-1")
        with pytest.raises(PlacementRequestError) as missing:
            c.explain(namespace=NS, name="nope")
    assert missing.value.code is grpc.StatusCode.NOT_FOUND
    assert "llm/nope" in str(missing.value)
    want = engine.explain(
        state.snapshot(), pod, ["gpu-r03-n00", "gpu-r03-n01", "gpu-r00-n00"]
    ).to_dict()
    assert by_json.to_dict() == want
    assert by_json.pod == "llm/chat-decode-0" and by_json.is_rbg and by_json.gpus == 8
    # gpu-r03-n00 has 4 free: too few for TP8; its rack-mate is best (near the prefill).
    verdicts = {v.node: v for v in by_json.nodes}
    assert not verdicts["gpu-r03-n00"].passed
    assert verdicts["gpu-r03-n00"].code == "gpus-in-use"
    assert by_json.nodes[0].node == "gpu-r03-n01" and by_json.nodes[0].score == 10
    assert "pd_proximity" in by_json.nodes[0].terms
    assert by_name.pod == "llm/chat-prefill-1" and len(by_name.nodes) == 16
    assert all(v.passed for v in by_name.nodes)
    assert (
        by_name.to_dict()
        == engine.explain(state.snapshot(), state.find_pod(NS, "chat-prefill-1")).to_dict()
    )


def test_cluster_summary_by_hand() -> None:
    nodes = make_rack_cluster(2, 2, [HGX, PCIE], zones=1)  # rack-00 HGX, rack-01 PCIe
    pods = [
        hold(nodes, "gpu-r00-n00", (0, 1, 2), "three"),  # HGX: 5 free in its island
        hold(nodes, "gpu-r01-n00", (0, 1, 4, 5), "four"),  # PCIe: 2 free per NUMA node
        make_plain_pod("batch", "eight", 8, node="gpu-r01-n01"),  # PCIe: full
    ]
    state = ClusterState.from_objects(nodes, pods)
    with client_for(state) as c:
        s = c.cluster_summary()
    assert (s.nodes, s.nodes_with_topology, s.gpus_allocatable, s.gpus_free, s.pods) == (
        4,
        4,
        32,
        5 + 8 + 4 + 0,
        3,
    )
    # HGX: islands of 5 and 8 free; PCIe (no NVLink): 1 when a GPU is free, else 0.
    assert s.largest_free_island_nodes == {0: 1, 1: 1, 5: 1, 8: 1}
    fits = {f.gpus: (f.nvlink_island, f.numa_or_better, f.any) for f in s.fits}
    assert fits == {1: (3, 3, 3), 2: (2, 3, 3), 4: (2, 2, 3), 8: (1, 1, 1)}
    levels = {lv.kind: lv for lv in s.levels}
    assert set(levels) == {"zone", "rack"}
    (zone,) = levels["zone"].domains
    assert (zone.value, zone.nodes, zone.gpus_allocatable, zone.gpus_free) == ("zone-a", 4, 32, 17)
    racks = {d.value: (d.nodes, d.gpus_free, d.largest_free_island) for d in levels["rack"].domains}
    assert racks == {"rack-00": (2, 13, 8), "rack-01": (2, 4, 1)}
    assert levels["rack"].domains[0].domain == "/zone-a/rack-00"
    assert s.age_seconds is not None and 0 <= s.age_seconds < 60
    # The core gives the same numbers.
    core = cluster_summary(state.snapshot())
    assert core.fits == s.fits and core.levels == s.levels


# -- health, reflection, transports -----------------------------------------------------------


def _health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_not_serving_until_ready_then_serving() -> None:
    state = ClusterState()  # nothing listed yet: not ready
    nodes = make_rack_cluster(1, 2, [HGX], zones=1)
    with running(state, ready_poll_s=0.02) as addr, grpc.insecure_channel(addr) as ch:
        for name in ("", SERVICE_NAME):
            assert _health(ch, name) == health_pb2.HealthCheckResponse.NOT_SERVING
        with PlacementClient(addr, timeout_s=5) as c, pytest.raises(PlacementUnavailable) as e:
            c.what_if(WhatIfRequest(NS, "chat", 1, two_p_one_d()))
        assert e.value.code is grpc.StatusCode.UNAVAILABLE and "not synced" in str(e.value)
        state.load(nodes, [])
        deadline = time.monotonic() + 5
        while _health(ch, SERVICE_NAME) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never turned SERVING"
            time.sleep(0.02)
        assert _health(ch, "") == health_pb2.HealthCheckResponse.SERVING
        with PlacementClient(addr, timeout_s=5) as c:
            assert c.what_if(WhatIfRequest(NS, "chat", 1, two_p_one_d())).feasible


def test_reflection_lists_the_service() -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with running(half_cluster()) as addr, grpc.insecure_channel(addr) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
        svc = DescriptorPool(db).FindServiceByName(SERVICE_NAME)
        assert [m.name for m in svc.methods] == ["WhatIf", "Explain", "ClusterSummary"]


def test_unix_socket() -> None:
    short = tempfile.mkdtemp(prefix="ts-grpc-", dir="/tmp")  # sun_path is ~107 bytes
    try:
        path = os.path.join(short, "placement.sock")
        with running(roomy_cluster(), host=f"unix:{path}") as addr:
            assert addr == f"unix:{path}" and os.path.exists(path)
            with PlacementClient(addr, timeout_s=10) as c:
                res = c.what_if(WhatIfRequest(NS, "chat", 2, two_p_one_d()))
                assert res.units_placeable == 2
                assert c.cluster_summary().nodes == 16
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_invalid_requests_are_invalid_argument() -> None:
    state = roomy_cluster()
    bad = [
        (WhatIfRequest(NS, "chat", 1, ()), "at least one role"),
        (WhatIfRequest(NS, "chat", 1, (RoleRequest("prefill", 0, 4),)), "pods_per_unit"),
        (WhatIfRequest(NS, "chat", -1, two_p_one_d()), "units must be in"),
        (WhatIfRequest("Bad NS", "chat", 1, two_p_one_d()), "namespace"),
        (
            WhatIfRequest(NS, "chat", 1, (RoleRequest("decode", 3, 8, instance_size=2),)),
            "not a multiple of instance_size",
        ),
        (
            WhatIfRequest(
                NS, "chat", 1, (RoleRequest("decode", 1, 8, labels={L.RBG_GROUP_NAME: "other"}),)
            ),
            "contradicts rbg",
        ),
    ]
    with running(state) as addr, PlacementClient(addr, timeout_s=10) as c:
        for req, words in bad:
            with pytest.raises(PlacementRequestError) as e:
                c.what_if(req)
            assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert words in str(e.value)
        with pytest.raises(PlacementRequestError, match="not valid JSON"):
            c._call("Explain", lambda s: s.Explain(pb.ExplainRequest(pod_json="{"), timeout=5))
        with pytest.raises(PlacementRequestError, match=r"metadata\.name"):
            c.explain({"metadata": {}})
        with grpc.insecure_channel(addr) as ch:
            stub = pb_grpc.PlacementServiceStub(ch)
            with pytest.raises(grpc.RpcError) as raw:
                stub.Explain(pb.ExplainRequest(), timeout=5)
            assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert c.what_if(WhatIfRequest(NS, "chat", 1, two_p_one_d())).feasible  # still up


class _FlakyState:
    """A state whose snapshot() fails once: the server answers INTERNAL and stays up."""

    def __init__(self, inner: ClusterState) -> None:
        self.inner = inner
        self.fail = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def snapshot(self) -> Any:
        if self.fail:
            self.fail = False
            raise RuntimeError("boom")
        return self.inner.snapshot()


def test_unexpected_error_is_internal_and_the_server_stays_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = _FlakyState(half_cluster())
    with running(state) as addr, PlacementClient(addr, timeout_s=10) as c:
        with pytest.raises(PlacementUnavailable) as e:
            c.cluster_summary()
        assert e.value.code is grpc.StatusCode.INTERNAL and "boom" in str(e.value)
        assert c.cluster_summary().nodes == 2
    assert any("ClusterSummary failed" in r.getMessage() for r in caplog.records)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port_is_unavailable_quickly() -> None:
    port = _free_port()
    started = time.monotonic()
    with (
        PlacementClient(f"127.0.0.1:{port}", timeout_s=3) as c,
        pytest.raises(PlacementUnavailable) as e,
    ):
        c.cluster_summary()
    assert time.monotonic() - started < 2.5
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert f"127.0.0.1:{port}" in str(e.value)


# -- TLS --------------------------------------------------------------------------------------


def _certs_with_cryptography(d: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def write(stem: str, key: Any, cert: x509.Certificate) -> None:
        (d / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (d / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "topo-sched test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_key, ca)
    for stem, sans in (
        ("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", [x509.DNSName("autoscaler")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, key, cert)


def _certs_with_openssl(d: Path, openssl: str) -> None:
    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=30)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    run(
        "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=topo-sched test CA",
        "-days", "1", "-out", "ca.crt",
    )  # fmt: skip
    for stem, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("client", "DNS:autoscaler")):
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{stem}.key")
        run("req", "-new", "-key", f"{stem}.key", "-subj", f"/CN={stem}", "-out", f"{stem}.csr")
        (d / f"{stem}.ext").write_text(f"subjectAltName={san}\n")
        run(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{stem}.ext", "-out", f"{stem}.crt",
        )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server cert (localhost, 127.0.0.1) and a client cert, made here."""
    d = tmp_path_factory.mktemp("certs")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        _certs_with_openssl(d, openssl)
    else:
        _certs_with_cryptography(d)
    return d


def test_tls_call(certs: Path) -> None:
    tls = TlsConfig(certs / "server.crt", certs / "server.key")
    with running(half_cluster(), tls=tls) as addr:
        with PlacementClient(addr, timeout_s=10, tls=ClientTls(ca_file=certs / "ca.crt")) as c:
            assert c.cluster_summary().nodes == 2
        with PlacementClient(addr, timeout_s=3) as plain, pytest.raises(PlacementUnavailable):
            plain.cluster_summary()


def test_mutual_tls(certs: Path) -> None:
    tls = TlsConfig(certs / "server.crt", certs / "server.key", client_ca_file=certs / "ca.crt")
    with running(half_cluster(), tls=tls) as addr:
        good = ClientTls(certs / "ca.crt", certs / "client.crt", certs / "client.key")
        with PlacementClient(addr, timeout_s=10, tls=good) as c:
            assert c.cluster_summary().nodes == 2
        no_cert = ClientTls(ca_file=certs / "ca.crt")
        with (
            PlacementClient(addr, timeout_s=3, tls=no_cert) as c,
            pytest.raises(PlacementUnavailable),
        ):
            c.cluster_summary()


def test_openssl_fallback_makes_usable_certs(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not available")
    _certs_with_openssl(tmp_path, openssl)
    tls = TlsConfig(tmp_path / "server.crt", tmp_path / "server.key")
    client_tls = ClientTls(ca_file=tmp_path / "ca.crt")
    with running(half_cluster(), tls=tls) as addr, PlacementClient(addr, tls=client_tls) as c:
        assert c.cluster_summary().nodes == 2


# -- the extender command ---------------------------------------------------------------------


def test_extender_command_serves_grpc_from_its_state(tmp_path: Path) -> None:
    nodes = make_rack_cluster(2, 2, [HGX], zones=1)
    snap_file = tmp_path / "cluster.json"
    snap_file.write_text(json.dumps(as_list(nodes)))
    http_port, grpc_port = _free_port(), _free_port()
    cmd = [
        sys.executable, "-m", "topo_sched.cli", "extender", "--snapshot", str(snap_file),
        "--host", "127.0.0.1", "--port", str(http_port), "--grpc-host", "127.0.0.1",
        "--grpc-port", str(grpc_port), "--log-level", "INFO",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        addr = f"127.0.0.1:{grpc_port}"
        deadline = time.monotonic() + 20
        with grpc.insecure_channel(addr) as ch:
            while True:
                try:
                    if _health(ch, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "extender's gRPC service never came up"
                time.sleep(0.1)
        # Both protocols up (uvicorn handles SIGTERM once it runs), one state behind them.
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "extender's HTTP side never came up"
                time.sleep(0.1)
        with PlacementClient(addr, timeout_s=10) as c:
            res = c.what_if(WhatIfRequest(NS, "chat", 2, two_p_one_d()))
        assert res.units_placeable == 2 and res.feasible
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    # uvicorn shuts down gracefully, then re-raises SIGTERM (exit -15); gRPC stopped first.
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "placement gRPC service stopped" in err


def test_extender_command_rejects_half_tls(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from topo_sched.cli import app

    nodes = make_rack_cluster(1, 1, [HGX], zones=1)
    snap_file = tmp_path / "cluster.json"
    snap_file.write_text(json.dumps(as_list(nodes)))
    out = CliRunner().invoke(
        app,
        [
            "extender", "--snapshot", str(snap_file), "--grpc-port", "9090",
            "--grpc-tls-cert", str(snap_file),
        ],
    )  # fmt: skip
    assert out.exit_code == 2
    assert "--grpc-tls-cert and --grpc-tls-key go together" in out.output


def test_taken_port_is_an_error_not_a_shared_port() -> None:
    state = half_cluster()
    with running(state) as addr:
        port = int(addr.rsplit(":", 1)[1])
        with pytest.raises(RuntimeError, match="cannot listen"):
            serve(state, PlacementEngine(), host="127.0.0.1", port=port)
