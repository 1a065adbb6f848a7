"""Decide which Node annotations to write, and when.

``topo-sched.io/topology`` is written only when the record changes; ``topo-sched.io/gpu-
allocation`` on change, at most once per ``min_interval_s`` (a burst of pod churn becomes one
write carrying the latest state). A failed write is kept pending and retried on the next tick;
it never stops the agent.

Single-threaded: the agent's loop calls :meth:`AnnotationPublisher.tick`. The clock and the
patch function are injected, so the policy is tested without sleeping or a cluster.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping

from topo_sched import labels as L
from topo_sched.topology.model import NodeTopology

log = logging.getLogger(__name__)

PatchFn = Callable[[dict[str, str | None]], Mapping[str, str]]


def topology_annotation(topo: NodeTopology) -> str:
    """Canonical compact JSON, so equal records give equal strings."""
    return json.dumps(topo.to_dict(), sort_keys=True, separators=(",", ":"))


def allocation_annotation(by_index: Mapping[int, str]) -> str:
    return json.dumps({str(i): by_index[i] for i in sorted(by_index)}, separators=(",", ":"))


class AnnotationPublisher:
    def __init__(
        self,
        patch: PatchFn,
        *,
        current: Mapping[str, str] | None = None,
        min_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._patch = patch
        self._clock = clock
        self.min_interval_s = min_interval_s
        cur = current or {}
        self._written_topology = cur.get(L.ANNOTATION_TOPOLOGY)
        self._written_allocation = cur.get(L.ANNOTATION_GPU_ALLOCATION)
        self._last_allocation_write = float("-inf")
        self.writes = 0
        self.failures = 0

    def tick(self, topology: str | None, allocation: str | None) -> list[str]:
        """Write what changed and is due; return the keys written (empty if none)."""
        want: dict[str, str | None] = {}
        if topology is not None and topology != self._written_topology:
            want[L.ANNOTATION_TOPOLOGY] = topology
        now = self._clock()
        alloc_due = now - self._last_allocation_write >= self.min_interval_s
        if allocation is not None and allocation != self._written_allocation:
            if alloc_due:
                want[L.ANNOTATION_GPU_ALLOCATION] = allocation
            else:
                log.debug("allocation changed; rate-limited until the next tick")
        if not want:
            return []
        try:
            self._patch(want)
        except Exception as e:  # an API error must not kill the agent; retry next tick
            self.failures += 1
            log.warning("could not write %s: %s (will retry)", ", ".join(sorted(want)), e)
            return []
        self.writes += 1
        if L.ANNOTATION_TOPOLOGY in want:
            self._written_topology = topology
        if L.ANNOTATION_GPU_ALLOCATION in want:
            self._written_allocation = allocation
            self._last_allocation_write = now
        log.info("wrote %s", ", ".join(sorted(want)))
        return sorted(want)
