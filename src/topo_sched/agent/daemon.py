"""The node agent's loop: discover, read kubelet's GPU assignments, publish annotations.

One thread. Each tick reads PodResources (cheap, local gRPC) and hands the result to the
publisher; the topology is re-discovered every ``topology_interval_s`` (it changes only when
hardware or drivers do). Errors of one tick are logged and the loop goes on; SIGTERM ends it
after the current tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from topo_sched.agent.discovery import Discovery, DiscoveryError
from topo_sched.agent.podresources import (
    PodResourcesError,
    map_devices_to_indices,
    read_gpu_assignments,
)
from topo_sched.agent.publisher import (
    AnnotationPublisher,
    allocation_annotation,
    topology_annotation,
)
from topo_sched.topology.model import NodeTopology

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentSettings:
    node_name: str
    socket_path: str
    interval_s: float = 10.0
    topology_interval_s: float = 300.0
    allocation_min_interval_s: float = 10.0


def gpu_allocation(topo: NodeTopology, socket_path: str) -> dict[int, str]:
    """GPU index -> "namespace/pod" from kubelet; raises PodResourcesError."""
    assignments = read_gpu_assignments(socket_path)
    uuid_to_index = {g.uuid: g.index for g in topo.gpus if g.uuid}
    mapping = map_devices_to_indices(assignments.by_device, uuid_to_index)
    if mapping.unknown:
        log.warning("kubelet names devices this node's topology lacks: %s", mapping.unknown)
    return dict(mapping.by_index)


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        discover: Callable[[], Discovery],
        patch: Callable[[dict[str, str | None]], Any],
        current_annotations: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self._discover = discover
        self._clock = clock
        self.publisher = AnnotationPublisher(
            patch,
            current=current_annotations,
            min_interval_s=settings.allocation_min_interval_s,
            clock=clock,
        )
        self._topology: NodeTopology | None = None
        self._discovered_at = float("-inf")
        self._stop = threading.Event()

    def _refresh_topology(self) -> None:
        now = self._clock()
        if (
            self._topology is not None
            and now - self._discovered_at < self.settings.topology_interval_s
        ):
            return
        try:
            found = self._discover()
        except DiscoveryError as e:
            log.error("%s", e)
            return
        if self._topology is None or found.topology != self._topology:
            log.info(
                "topology from %s: %d GPUs, islands %s%s",
                found.method,
                found.topology.gpu_count,
                found.topology.nvlink_islands,
                f" (skipped: {'; '.join(found.skipped)})" if found.skipped else "",
            )
        self._topology = found.topology
        self._discovered_at = now

    def tick(self) -> list[str]:
        self._refresh_topology()
        if self._topology is None:
            return []
        allocation: str | None = None
        try:
            allocation = allocation_annotation(
                gpu_allocation(self._topology, self.settings.socket_path)
            )
        except PodResourcesError as e:
            log.warning("%s; GPU allocation not updated this tick", e)
        return self.publisher.tick(topology_annotation(self._topology), allocation)

    def run(self) -> None:
        log.info("agent for node %s started", self.settings.node_name)
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not end the DaemonSet pod
                log.exception("agent tick failed; continuing")
            self._stop.wait(self.settings.interval_s)
        log.info("agent stopped")

    def stop(self) -> None:
        self._stop.set()
