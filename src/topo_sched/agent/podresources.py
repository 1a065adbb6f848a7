"""Which GPUs belong to which pods: a thin client for kubelet's PodResources v1 gRPC API.

Kubelet serves ``v1.PodResourcesLister`` on a unix socket (by default
``/var/lib/kubelet/pod-resources/kubelet.sock``; the DaemonSet mounts that directory). The agent
asks two questions:

- ``List``: every pod on the node and the device-plugin devices each container holds. For
  ``nvidia.com/gpu`` from NVIDIA's device plugin the device ids are GPU UUIDs (``GPU-<uuid>``),
  ``GPU-<uuid>::<n>`` replicas when time-slicing is on, or ``MIG-<uuid>``; some plugins use plain
  indices (``"0"``).
- ``GetAllocatableResources``: every device kubelet could hand out. Kubelets before 1.21 answer
  UNIMPLEMENTED, and 1.21-1.27 with the ``KubeletPodResourcesGetAllocatable`` gate off answer
  UNKNOWN "... GetAllocatableResources disabled"; both give ``unimplemented_allocatable=True`` and
  an empty ``allocatable`` instead of an error.

Concurrency model: synchronous and blocking. Each :func:`read_gpu_assignments` call opens its own
channel, makes at most two unary calls under one overall deadline, and closes the channel before
returning. There is no module state, so calls from several threads are independent. A reused
channel is not worth it here: the agent asks every few seconds at most, connecting to a local
unix socket costs microseconds, and kubelet restarts re-create the socket; a long-lived channel
would sit in gRPC's reconnect backoff (up to minutes) after a restart, while a fresh channel sees
the new socket on the next call.

Failures that mean "cannot ask kubelet" (socket missing, not a socket, permission denied, deadline
exceeded, UNAVAILABLE, any other gRPC status from List) raise :class:`PodResourcesError`, whose
message names the socket path and what happened; the gRPC exception is not chained.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc

from topo_sched.rpc.podresources.v1 import api_pb2, api_pb2_grpc

__all__ = [
    "DEFAULT_SOCKET",
    "GpuAssignments",
    "IndexMapping",
    "PodResourcesError",
    "map_devices_to_indices",
    "read_gpu_assignments",
]

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
GPU_RESOURCE = "nvidia.com/gpu"


class PodResourcesError(RuntimeError):
    """Kubelet's PodResources API could not be read.

    ``reason`` is one of ``"missing"``, ``"not_a_socket"``, ``"permission_denied"``,
    ``"deadline_exceeded"``, ``"unavailable"`` or ``"rpc_error"``; ``code`` is the gRPC status
    where there was one.
    """

    def __init__(
        self,
        socket_path: str,
        reason: str,
        detail: str,
        *,
        code: grpc.StatusCode | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.reason = reason
        self.detail = detail
        self.code = code
        super().__init__(f"kubelet PodResources socket {socket_path}: {detail}")


@dataclass(frozen=True)
class GpuAssignments:
    """One snapshot of kubelet's view of one device-plugin resource on this node."""

    # device id as kubelet reports it -> "namespace/pod" holding it
    by_device: dict[str, str] = field(default_factory=dict)
    # every device id kubelet could allocate for the resource (empty when unimplemented)
    allocatable: list[str] = field(default_factory=list)
    # True when kubelet does not offer GetAllocatableResources (old or feature-gated off)
    unimplemented_allocatable: bool = False


class IndexMapping(NamedTuple):
    """Result of :func:`map_devices_to_indices`."""

    # GPU index -> "namespace/pod" (for a shared GPU: the first pod in sorted order)
    by_index: dict[int, str]
    # device id -> "namespace/pod" for ids that match no known GPU
    unknown: dict[str, str]
    # GPU index -> every pod on it, only where more than one pod shares the GPU (time-slicing)
    shared: dict[int, tuple[str, ...]]


def _check_socket(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PodResourcesError(
            path, "missing", "no such file (is kubelet running and the directory mounted?)"
        ) from None
    except PermissionError:
        raise PodResourcesError(
            path, "permission_denied", "permission denied while looking up the socket"
        ) from None
    except OSError as exc:
        raise PodResourcesError(path, "missing", f"cannot stat: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise PodResourcesError(path, "not_a_socket", "exists but is not a unix socket")
    if not os.access(path, os.R_OK | os.W_OK):
        raise PodResourcesError(
            path, "permission_denied", "permission denied (connecting needs write access)"
        )


def _rpc_failure(path: str, method: str, err: grpc.RpcError, timeout_s: float) -> PodResourcesError:
    code = err.code() if isinstance(err, grpc.Call) else None
    details = (err.details() if isinstance(err, grpc.Call) else None) or ""
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return PodResourcesError(
            path, "deadline_exceeded", f"{method} got no answer within {timeout_s:g}s", code=code
        )
    if code is grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details.lower():
        return PodResourcesError(
            path, "permission_denied", f"{method}: permission denied ({details})", code=code
        )
    if code is grpc.StatusCode.UNAVAILABLE:
        return PodResourcesError(
            path, "unavailable", f"{method}: kubelet unavailable ({details})", code=code
        )
    name = code.name if code is not None else type(err).__name__
    return PodResourcesError(path, "rpc_error", f"{method} failed: {name} {details}", code=code)


def _allocatable_unsupported(err: grpc.RpcError) -> bool:
    if not isinstance(err, grpc.Call):
        return False
    if err.code() is grpc.StatusCode.UNIMPLEMENTED:
        return True
    # kubelet 1.21-1.27 with KubeletPodResourcesGetAllocatable=false: a plain Go error -> UNKNOWN
    return err.code() is grpc.StatusCode.UNKNOWN and "disabled" in (err.details() or "")


def read_gpu_assignments(
    socket_path: str = DEFAULT_SOCKET,
    *,
    resource: str = GPU_RESOURCE,
    timeout_s: float = 5.0,
) -> GpuAssignments:
    """Ask kubelet which ``resource`` devices are held by which pods, and which exist.

    ``timeout_s`` bounds the whole call (both RPCs together). Raises :class:`PodResourcesError`.
    """
    _check_socket(socket_path)
    deadline = time.monotonic() + timeout_s

    def remaining() -> float:
        return max(deadline - time.monotonic(), 0.001)

    with grpc.insecure_channel("unix://" + os.path.abspath(socket_path)) as channel:
        stub = api_pb2_grpc.PodResourcesListerStub(channel)
        try:
            listed = stub.List(api_pb2.ListPodResourcesRequest(), timeout=remaining())
        except grpc.RpcError as err:
            raise _rpc_failure(socket_path, "List", err, timeout_s) from None

        by_device: dict[str, str] = {}
        for pod in listed.pod_resources:
            owner = f"{pod.namespace}/{pod.name}"
            for container in pod.containers:
                for devices in container.devices:
                    if devices.resource_name != resource:
                        continue
                    for device_id in devices.device_ids:
                        previous = by_device.setdefault(device_id, owner)
                        if previous != owner:
                            log.warning(
                                "device %s reported for both %s and %s; keeping %s",
                                device_id,
                                previous,
                                owner,
                                previous,
                            )

        allocatable: list[str] = []
        unimplemented = False
        try:
            alloc = stub.GetAllocatableResources(
                api_pb2.AllocatableResourcesRequest(), timeout=remaining()
            )
        except grpc.RpcError as err:
            if not _allocatable_unsupported(err):
                raise _rpc_failure(socket_path, "GetAllocatableResources", err, timeout_s) from None
            unimplemented = True
            log.info("kubelet at %s has no GetAllocatableResources; using List only", socket_path)
        else:
            seen: set[str] = set()
            for devices in alloc.devices:
                if devices.resource_name != resource:
                    continue
                for device_id in devices.device_ids:
                    if device_id not in seen:
                        seen.add(device_id)
                        allocatable.append(device_id)

    return GpuAssignments(
        by_device=by_device, allocatable=allocatable, unimplemented_allocatable=unimplemented
    )


def _gpu_key(device_id: str) -> str:
    """Normalise a device id for lookup: drop a time-slicing ``::<n>`` suffix, lower-case."""
    base, _, _replica = device_id.partition("::")
    return base.strip().lower()


def map_devices_to_indices(
    by_device: Mapping[str, str], uuid_to_index: Mapping[str, int]
) -> IndexMapping:
    """Turn ``device id -> "ns/pod"`` into ``GPU index -> "ns/pod"``.

    A device id is matched, case-insensitively and without any ``::<replica>`` suffix, against
    the UUIDs in ``uuid_to_index`` (NVML's ``GPU-...`` / ``MIG-...`` strings); an id made of
    digits is taken as the index itself (it must be one of ``uuid_to_index``'s values when that
    mapping is non-empty). Ids that match nothing go to ``unknown`` and are logged, never raised.
    """
    lookup = {uuid.strip().lower(): index for uuid, index in uuid_to_index.items()}
    known_indices = set(uuid_to_index.values())

    pods_by_index: dict[int, set[str]] = {}
    unknown: dict[str, str] = {}
    for device_id, owner in by_device.items():
        key = _gpu_key(device_id)
        index = lookup.get(key)
        if index is None and key.isdigit():
            candidate = int(key)
            if not known_indices or candidate in known_indices:
                index = candidate
        if index is None:
            unknown[device_id] = owner
            continue
        pods_by_index.setdefault(index, set()).add(owner)

    if unknown:
        log.warning(
            "%d device id(s) match no GPU on this node: %s",
            len(unknown),
            ", ".join(f"{d} ({o})" for d, o in sorted(unknown.items())),
        )
    by_index = {index: min(pods) for index, pods in sorted(pods_by_index.items())}
    shared = {
        index: tuple(sorted(pods)) for index, pods in sorted(pods_by_index.items()) if len(pods) > 1
    }
    return IndexMapping(by_index=by_index, unknown=unknown, shared=shared)
