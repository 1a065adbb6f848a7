"""The agent's kubelet PodResources client against a real gRPC server on a unix socket,
the wire contract of proto/podresources/v1/api.proto, and freshness of the generated stubs."""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
from importlib import metadata
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from tests.support.fake_kubelet import Container, Device, FakeKubelet, Pod
from topo_sched.agent.podresources import (
    GpuAssignments,
    IndexMapping,
    PodResourcesError,
    map_devices_to_indices,
    read_gpu_assignments,
)
from topo_sched.rpc import generate
from topo_sched.rpc.podresources.v1 import api_pb2, api_pb2_grpc
from topo_sched.rpc.topo_sched.v1 import placement_pb2

GPU = "nvidia.com/gpu"
UUIDS = [
    "GPU-f16e4650-8e1a-4b5c-9d2f-0a1b2c3d4e01",
    "GPU-2b7c91d0-3f4e-4a6b-8c9d-1e2f3a4b5c02",
    "GPU-9a0b1c2d-3e4f-4051-a617-28394a5b6c03",
    "GPU-c3d4e5f6-0718-4293-a4b5-c6d7e8f90a04",
]
UUID_TO_INDEX = {u: i for i, u in enumerate(UUIDS)}


def node_pods() -> list[Pod]:
    return [
        # Prefill pod: one GPU in the engine container, none in the sidecar.
        Pod(
            "llm",
            "prefill-0",
            [
                Container("engine", {GPU: [UUIDS[0]]}, cpu_ids=[2, 3]),
                Container("metrics-sidecar"),
            ],
        ),
        # Decode pod: one container holding 2 GPUs and an RDMA NIC.
        Pod(
            "llm",
            "decode-0",
            [Container("engine", {GPU: [UUIDS[1], UUIDS[2]], "rdma/hca": ["mlx5_0"]})],
        ),
        # CPU-only pod: kubelet still lists it, with no devices.
        Pod("kube-system", "coredns-abc", [Container("coredns", cpu_ids=[0])]),
        # A pod holding only another device-plugin resource.
        Pod("net", "rdma-test", [Container("t", {"rdma/hca": ["mlx5_1"]})]),
    ]


def node_allocatable() -> list[Device]:
    return [Device(GPU, u, numa_node=i // 2) for i, u in enumerate(UUIDS)] + [
        Device("rdma/hca", "mlx5_0", 0),
        Device("rdma/hca", "mlx5_1", 1),
    ]


# --- read_gpu_assignments against the fake kubelet -------------------------------------------


def test_gpu_assignments_from_list_and_allocatable() -> None:
    with FakeKubelet(node_pods(), node_allocatable(), cpu_ids=range(8)) as kubelet:
        got = read_gpu_assignments(kubelet.socket_path)
        assert kubelet.calls == {"List": 1, "GetAllocatableResources": 1}

    assert got == GpuAssignments(
        by_device={UUIDS[0]: "llm/prefill-0", UUIDS[1]: "llm/decode-0", UUIDS[2]: "llm/decode-0"},
        allocatable=UUIDS,
        unimplemented_allocatable=False,
    )
    free = [d for d in got.allocatable if d not in got.by_device]
    assert free == [UUIDS[3]]


def test_other_resource_selected_by_name() -> None:
    with FakeKubelet(node_pods(), node_allocatable()) as kubelet:
        got = read_gpu_assignments(kubelet.socket_path, resource="rdma/hca")
    assert got.by_device == {"mlx5_0": "llm/decode-0", "mlx5_1": "net/rdma-test"}
    assert got.allocatable == ["mlx5_0", "mlx5_1"]


def test_empty_node() -> None:
    with FakeKubelet() as kubelet:
        got = read_gpu_assignments(kubelet.socket_path)
    assert got == GpuAssignments(by_device={}, allocatable=[], unimplemented_allocatable=False)


@pytest.mark.parametrize("mode", ["unimplemented", "disabled"])
def test_old_kubelet_without_get_allocatable_falls_back_to_list(mode: str) -> None:
    with FakeKubelet(node_pods(), node_allocatable(), allocatable_mode=mode) as kubelet:
        got = read_gpu_assignments(kubelet.socket_path)
        assert kubelet.calls == {"List": 1, "GetAllocatableResources": 1}
    assert got.unimplemented_allocatable is True
    assert got.allocatable == []
    assert set(got.by_device) == set(UUIDS[:3])


def test_relative_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeKubelet(node_pods(), node_allocatable()) as kubelet:
        monkeypatch.chdir(Path(kubelet.socket_path).parent)
        got = read_gpu_assignments("kubelet.sock")
    assert len(got.by_device) == 3


# --- errors ------------------------------------------------------------------------------------


def test_missing_socket_names_the_path(tmp_path: Path) -> None:
    path = str(tmp_path / "pod-resources" / "kubelet.sock")
    with pytest.raises(PodResourcesError) as info:
        read_gpu_assignments(path)
    err = info.value
    assert err.reason == "missing"
    assert err.socket_path == path
    assert path in str(err)
    assert "no such file" in str(err)
    assert err.__cause__ is None and err.__suppress_context__


def test_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "kubelet.sock"
    path.write_text("")
    with pytest.raises(PodResourcesError, match="not a unix socket") as info:
        read_gpu_assignments(str(path))
    assert info.value.reason == "not_a_socket"


def test_socket_nobody_listens_on_is_unavailable() -> None:
    with tempfile.TemporaryDirectory(prefix="fk-", dir="/tmp") as tmp:
        path = os.path.join(tmp, "kubelet.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            stale.bind(path)  # bound, never listening: connect() is refused, like a dead kubelet
            with pytest.raises(PodResourcesError) as info:
                read_gpu_assignments(path, timeout_s=2.0)
        finally:
            stale.close()
    err = info.value
    assert err.reason == "unavailable"
    assert err.code is grpc.StatusCode.UNAVAILABLE
    assert path in str(err) and "List" in str(err)
    assert err.__cause__ is None and err.__suppress_context__


def test_permission_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeKubelet(node_pods()) as kubelet:
        if os.geteuid() == 0:
            # root passes any mode check; simulate the unprivileged agent's view instead
            monkeypatch.setattr(os, "access", lambda *_a, **_k: False)
        else:
            os.chmod(kubelet.socket_path, 0)
        with pytest.raises(PodResourcesError, match="permission denied") as info:
            read_gpu_assignments(kubelet.socket_path)
    assert info.value.reason == "permission_denied"
    assert kubelet.socket_path in str(info.value)


def test_deadline_exceeded_is_typed_and_fast() -> None:
    with FakeKubelet(node_pods(), delay_s=5.0) as kubelet:
        start = time.monotonic()
        with pytest.raises(PodResourcesError) as info:
            read_gpu_assignments(kubelet.socket_path, timeout_s=0.2)
        elapsed = time.monotonic() - start
    err = info.value
    assert err.reason == "deadline_exceeded"
    assert err.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert kubelet.socket_path in str(err) and "0.2s" in str(err)
    assert elapsed < 2.0


def test_timeout_covers_both_calls() -> None:
    # Each call alone fits in the budget, both together do not.
    with FakeKubelet(node_pods(), node_allocatable(), delay_s=0.3) as kubelet:
        with pytest.raises(PodResourcesError) as info:
            read_gpu_assignments(kubelet.socket_path, timeout_s=0.5)
        assert kubelet.calls == {"List": 1, "GetAllocatableResources": 1}
    assert info.value.reason == "deadline_exceeded"
    assert "GetAllocatableResources" in str(info.value)


# --- the fake answers like kubelet over real gRPC ----------------------------------------------


def test_fake_kubelet_wire_shape() -> None:
    with (
        FakeKubelet(node_pods(), node_allocatable(), cpu_ids=[0, 1]) as kubelet,
        grpc.insecure_channel("unix://" + kubelet.socket_path) as channel,
    ):
        stub = api_pb2_grpc.PodResourcesListerStub(channel)
        listed = stub.List(api_pb2.ListPodResourcesRequest(), timeout=2)
        alloc = stub.GetAllocatableResources(api_pb2.AllocatableResourcesRequest(), timeout=2)
        one = stub.Get(
            api_pb2.GetPodResourcesRequest(pod_name="decode-0", pod_namespace="llm"), timeout=2
        )
        with pytest.raises(grpc.RpcError) as missing:
            stub.Get(api_pb2.GetPodResourcesRequest(pod_name="x", pod_namespace="y"), timeout=2)

    assert [p.name for p in listed.pod_resources] == [
        "prefill-0",
        "decode-0",
        "coredns-abc",
        "rdma-test",
    ]
    sidecar = listed.pod_resources[0].containers[1]
    assert sidecar.name == "metrics-sidecar" and not sidecar.devices
    assert list(listed.pod_resources[2].containers[0].cpu_ids) == [0]
    assert all(len(d.device_ids) == 1 for d in alloc.devices)
    assert [n.ID for d in alloc.devices[:4] for n in d.topology.nodes] == [0, 0, 1, 1]
    assert list(alloc.cpu_ids) == [0, 1]
    assert {d.resource_name for d in one.pod_resources.containers[0].devices} == {GPU, "rdma/hca"}
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND


# --- device ids -> GPU indices -----------------------------------------------------------------


def test_map_uuids_to_indices() -> None:
    by_device = {UUIDS[0]: "llm/prefill-0", UUIDS[1]: "llm/decode-0", UUIDS[2]: "llm/decode-0"}
    got = map_devices_to_indices(by_device, UUID_TO_INDEX)
    assert got == IndexMapping(
        by_index={0: "llm/prefill-0", 1: "llm/decode-0", 2: "llm/decode-0"}, unknown={}, shared={}
    )
    by_index, unknown, shared = got  # unpacks like a tuple
    assert by_index[0] == "llm/prefill-0" and unknown == {} and shared == {}


def test_map_plain_indices_and_case() -> None:
    by_device = {"0": "a/p", "3": "b/q", UUIDS[1].upper(): "c/r"}
    got = map_devices_to_indices(by_device, UUID_TO_INDEX)
    assert got.by_index == {0: "a/p", 1: "c/r", 3: "b/q"}
    assert got.unknown == {}
    # Without a UUID table (no NVML), plain indices are still taken at face value.
    assert map_devices_to_indices({"1": "a/p"}, {}).by_index == {1: "a/p"}


def test_map_unknown_ids_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    by_device = {
        UUIDS[0]: "llm/prefill-0",
        "GPU-00000000-0000-0000-0000-00000000dead": "llm/ghost",
        "MIG-11111111-2222-3333-4444-555555555555": "llm/mig-pod",
        "7": "llm/index-out-of-range",
    }
    with caplog.at_level(logging.WARNING, logger="topo_sched.agent.podresources"):
        got = map_devices_to_indices(by_device, UUID_TO_INDEX)
    assert got.by_index == {0: "llm/prefill-0"}
    assert got.unknown == {
        "GPU-00000000-0000-0000-0000-00000000dead": "llm/ghost",
        "MIG-11111111-2222-3333-4444-555555555555": "llm/mig-pod",
        "7": "llm/index-out-of-range",
    }
    assert "3 device id(s) match no GPU" in caplog.text
    assert "llm/ghost" in caplog.text


def test_map_time_sliced_replicas() -> None:
    by_device = {f"{UUIDS[2]}::0": "llm/b", f"{UUIDS[2]}::1": "llm/a", f"{UUIDS[3]}::0": "llm/c"}
    got = map_devices_to_indices(by_device, UUID_TO_INDEX)
    assert got.by_index == {2: "llm/a", 3: "llm/c"}
    assert got.shared == {2: ("llm/a", "llm/b")}
    assert got.unknown == {}


def test_end_to_end_indices() -> None:
    with FakeKubelet(node_pods(), node_allocatable()) as kubelet:
        got = read_gpu_assignments(kubelet.socket_path)
    mapping = map_devices_to_indices(got.by_device, UUID_TO_INDEX)
    assert mapping.by_index == {0: "llm/prefill-0", 1: "llm/decode-0", 2: "llm/decode-0"}
    free = sorted(UUID_TO_INDEX[d] for d in got.allocatable if d not in got.by_device)
    assert free == [3]


# --- wire contract and generated stubs ---------------------------------------------------------

_T = descriptor_pb2.FieldDescriptorProto
# Kubelet's PodResources v1 wire contract: message -> field -> (number, type, repeated).
WIRE_CONTRACT: dict[str, dict[str, tuple[int, int, bool]]] = {
    "ListPodResourcesRequest": {},
    "ListPodResourcesResponse": {"pod_resources": (1, _T.TYPE_MESSAGE, True)},
    "PodResources": {
        "name": (1, _T.TYPE_STRING, False),
        "namespace": (2, _T.TYPE_STRING, False),
        "containers": (3, _T.TYPE_MESSAGE, True),
    },
    "ContainerResources": {
        "name": (1, _T.TYPE_STRING, False),
        "devices": (2, _T.TYPE_MESSAGE, True),
        "cpu_ids": (3, _T.TYPE_INT64, True),
        "memory": (4, _T.TYPE_MESSAGE, True),
        "dynamic_resources": (5, _T.TYPE_MESSAGE, True),
    },
    "ContainerDevices": {
        "resource_name": (1, _T.TYPE_STRING, False),
        "device_ids": (2, _T.TYPE_STRING, True),
        "topology": (3, _T.TYPE_MESSAGE, False),
    },
    "ContainerMemory": {
        "memory_type": (1, _T.TYPE_STRING, False),
        "size": (2, _T.TYPE_UINT64, False),
        "topology": (3, _T.TYPE_MESSAGE, False),
    },
    "TopologyInfo": {"nodes": (1, _T.TYPE_MESSAGE, True)},
    "NUMANode": {"ID": (1, _T.TYPE_INT64, False)},
    "DynamicResource": {
        "claim_name": (2, _T.TYPE_STRING, False),
        "claim_namespace": (3, _T.TYPE_STRING, False),
        "claim_resources": (4, _T.TYPE_MESSAGE, True),
    },
    "ClaimResource": {
        "cdi_devices": (1, _T.TYPE_MESSAGE, True),
        "driver_name": (2, _T.TYPE_STRING, False),
        "pool_name": (3, _T.TYPE_STRING, False),
        "device_name": (4, _T.TYPE_STRING, False),
    },
    "CDIDevice": {"name": (1, _T.TYPE_STRING, False)},
    "AllocatableResourcesRequest": {},
    "AllocatableResourcesResponse": {
        "devices": (1, _T.TYPE_MESSAGE, True),
        "cpu_ids": (2, _T.TYPE_INT64, True),
        "memory": (3, _T.TYPE_MESSAGE, True),
    },
    "GetPodResourcesRequest": {
        "pod_name": (1, _T.TYPE_STRING, False),
        "pod_namespace": (2, _T.TYPE_STRING, False),
    },
    "GetPodResourcesResponse": {"pod_resources": (1, _T.TYPE_MESSAGE, False)},
}


def test_wire_contract_matches_kubelet() -> None:
    fdp = descriptor_pb2.FileDescriptorProto.FromString(api_pb2.DESCRIPTOR.serialized_pb)
    assert fdp.package == "v1"
    got = {
        m.name: {f.name: (f.number, f.type, f.label == _T.LABEL_REPEATED) for f in m.field}
        for m in fdp.message_type
    }
    assert got == WIRE_CONTRACT
    (service,) = fdp.service
    paths = {
        f"/{fdp.package}.{service.name}/{m.name}": (m.input_type, m.output_type)
        for m in service.method
    }
    assert paths == {
        "/v1.PodResourcesLister/List": (
            ".v1.ListPodResourcesRequest",
            ".v1.ListPodResourcesResponse",
        ),
        "/v1.PodResourcesLister/GetAllocatableResources": (
            ".v1.AllocatableResourcesRequest",
            ".v1.AllocatableResourcesResponse",
        ),
        "/v1.PodResourcesLister/Get": (".v1.GetPodResourcesRequest", ".v1.GetPodResourcesResponse"),
    }


def test_every_proto_is_generated() -> None:
    on_disk = sorted(
        str(p.relative_to(generate.PROTO_DIR)) for p in generate.PROTO_DIR.rglob("*.proto")
    )
    assert on_disk == sorted(generate.PROTOS), "add new .proto files to generate.PROTOS"


def _committed_generator_version() -> str:
    text = (generate.OUT_DIR / "podresources/v1/api_pb2_grpc.py").read_text()
    match = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", text, re.MULTILINE)
    assert match, "cannot find GRPC_GENERATED_VERSION in the committed stubs"
    return match.group(1)


def test_committed_stubs_are_fresh() -> None:
    """Byte-for-byte: regenerate into a temp dir and compare (stale stubs fail CI)."""
    committed, installed = _committed_generator_version(), metadata.version("grpcio-tools")
    if committed != installed:
        pytest.skip(
            f"stubs were generated with grpcio-tools {committed}, {installed} is installed; "
            "byte comparison skipped (test_committed_descriptors_match_protos still checks content)"
        )
    problems = generate.stale_stubs()
    assert not problems, "stale stubs; run `python -m topo_sched.rpc.generate`:\n" + "\n".join(
        problems
    )


def test_committed_descriptors_match_protos(tmp_path: Path) -> None:
    """Generator-version independent: the committed stubs embed what proto/ says today."""
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    args = ["protoc", f"-I{generate.PROTO_DIR}", f"--descriptor_set_out={out}", *generate.PROTOS]
    assert protoc.main(args) == 0
    fresh = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    committed = {m.DESCRIPTOR.name: m.DESCRIPTOR for m in (api_pb2, placement_pb2)}
    assert set(fresh) == set(committed)
    for name, descriptor in committed.items():
        ours = descriptor_pb2.FileDescriptorProto.FromString(descriptor.serialized_pb)
        theirs = fresh[name]
        todo = [*ours.message_type, *theirs.message_type]
        while todo:  # nested types too (map entries)
            msg = todo.pop()
            todo.extend(msg.nested_type)
            for fld in msg.field:
                fld.ClearField("json_name")  # protoc adds it to descriptor sets only
        assert ours == theirs, f"{name}: stubs are stale; run `python -m topo_sched.rpc.generate`"


def test_generator_rewrites_only_local_imports(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "podresources/v1/api_pb2.py",
        "podresources/v1/api_pb2.pyi",
        "podresources/v1/api_pb2_grpc.py",
        "topo_sched/v1/placement_pb2.py",
        "topo_sched/v1/placement_pb2.pyi",
        "topo_sched/v1/placement_pb2_grpc.py",
    ]
    assert (tmp_path / "podresources/__init__.py").exists()
    assert (tmp_path / "podresources/v1/__init__.py").exists()
    grpc_text = (tmp_path / "podresources/v1/api_pb2_grpc.py").read_text()
    assert "from topo_sched.rpc.podresources.v1 import api_pb2 as" in grpc_text
    assert "\nfrom podresources" not in grpc_text
    pb2_text = (tmp_path / "podresources/v1/api_pb2.py").read_text()
    assert "from google.protobuf import descriptor as _descriptor" in pb2_text
