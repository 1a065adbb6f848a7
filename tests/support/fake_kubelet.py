"""A real gRPC server that answers kubelet's PodResources v1 API on a unix socket.

It is a ``grpc.server`` with a thread pool, bound to ``<short tmp dir>/kubelet.sock``, serving
the project's generated ``PodResourcesLister`` servicer, so clients go through the same wire,
HTTP/2 framing and status codes as against kubelet. Answers follow kubelet's habits:

- ``List`` returns every pod, including pods whose containers hold no devices (those containers
  carry only a name, and exclusive ``cpu_ids`` if any);
- ``GetAllocatableResources`` returns one ``ContainerDevices`` per device, each with its NUMA node;
- ``Get`` returns one pod or NOT_FOUND.

Knobs: ``allocatable="unimplemented"`` (kubelet < 1.21: UNIMPLEMENTED) or ``"disabled"`` (feature
gate off: UNKNOWN "Pod Resources API GetAllocatableResources disabled"), and ``delay_s`` to make
every call slow (deadline tests). Use it as a context manager::

    with FakeKubelet(pods=[Pod("ns", "p", [Container("c", {"nvidia.com/gpu": ["GPU-a"]})])]) as k:
        read_gpu_assignments(k.socket_path)
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc

from topo_sched.rpc.podresources.v1 import api_pb2, api_pb2_grpc

AllocatableMode = Literal["ok", "unimplemented", "disabled"]


@dataclass(frozen=True)
class Container:
    name: str
    # resource name -> device ids, e.g. {"nvidia.com/gpu": ["GPU-..."], "rdma/hca": ["mlx5_0"]}
    devices: Mapping[str, Sequence[str]] = field(default_factory=dict)
    cpu_ids: Sequence[int] = ()


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    containers: Sequence[Container] = ()


@dataclass(frozen=True)
class Device:
    """One allocatable device of a resource, on one NUMA node."""

    resource: str
    device_id: str
    numa_node: int = 0


class _Servicer(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, fake: FakeKubelet) -> None:
        self._fake = fake

    def _maybe_wait(self, context: grpc.ServicerContext) -> None:
        if self._fake.delay_s > 0:
            # Wakes early when the server stops, so shutdown never waits for a sleeper.
            self._fake._stopping.wait(self._fake.delay_s)

    @staticmethod
    def _pod_message(pod: Pod) -> api_pb2.PodResources:
        return api_pb2.PodResources(
            name=pod.name,
            namespace=pod.namespace,
            containers=[
                api_pb2.ContainerResources(
                    name=c.name,
                    devices=[
                        api_pb2.ContainerDevices(resource_name=res, device_ids=list(ids))
                        for res, ids in c.devices.items()
                    ],
                    cpu_ids=list(c.cpu_ids),
                )
                for c in pod.containers
            ],
        )

    def List(self, request, context):
        self._fake._count("List")
        self._maybe_wait(context)
        return api_pb2.ListPodResourcesResponse(
            pod_resources=[self._pod_message(p) for p in self._fake.pods]
        )

    def GetAllocatableResources(self, request, context):
        self._fake._count("GetAllocatableResources")
        self._maybe_wait(context)
        if self._fake.allocatable_mode == "unimplemented":
            # What grpc-go answers for a method the server does not register.
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "unknown method GetAllocatableResources for service v1.PodResourcesLister",
            )
        if self._fake.allocatable_mode == "disabled":
            context.abort(
                grpc.StatusCode.UNKNOWN, "Pod Resources API GetAllocatableResources disabled"
            )
        return api_pb2.AllocatableResourcesResponse(
            devices=[
                api_pb2.ContainerDevices(
                    resource_name=d.resource,
                    device_ids=[d.device_id],
                    topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=d.numa_node)]),
                )
                for d in self._fake.allocatable
            ],
            cpu_ids=list(self._fake.cpu_ids),
        )

    def Get(self, request, context):
        self._fake._count("Get")
        self._maybe_wait(context)
        for pod in self._fake.pods:
            if (pod.namespace, pod.name) == (request.pod_namespace, request.pod_name):
                return api_pb2.GetPodResourcesResponse(pod_resources=self._pod_message(pod))
        context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"pod {request.pod_name} not found in {request.pod_namespace}",
        )


class FakeKubelet:
    """Context manager: serve PodResources v1 on a fresh unix socket until exit."""

    def __init__(
        self,
        pods: Sequence[Pod] = (),
        allocatable: Sequence[Device] = (),
        *,
        cpu_ids: Sequence[int] = (),
        allocatable_mode: AllocatableMode = "ok",
        delay_s: float = 0.0,
        max_workers: int = 4,
    ) -> None:
        self.pods = list(pods)
        self.allocatable = list(allocatable)
        self.cpu_ids = list(cpu_ids)
        self.allocatable_mode: AllocatableMode = allocatable_mode
        self.delay_s = delay_s
        self.calls: dict[str, int] = {}
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self._dir: Path | None = None
        self.socket_path = ""

    def _count(self, method: str) -> None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1

    def __enter__(self) -> FakeKubelet:
        # A short path of our own: sun_path holds only ~107 bytes, pytest's tmp_path can be longer.
        self._dir = Path(tempfile.mkdtemp(prefix="fk-", dir="/tmp"))
        self.socket_path = str(self._dir / "kubelet.sock")
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(_Servicer(self), server)
        server.add_insecure_port("unix:" + self.socket_path)
        server.start()
        self._server = server
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
