"""A small model of kube-scheduler, for the simulator and for placement-quality tests.

Pure: no I/O, no clock. One scheduling cycle for one pod against a
:class:`~topo_sched.placement.snapshot.ClusterSnapshot`, shaped after kube-scheduler v1.26 as
captured in ``fixtures/kube-scheduler-extender/`` (README, "Scoring (observed at -v=10)").

What is modelled:

* Filter: a node passes when it has at least the pod's ``nvidia.com/gpu`` request free
  (``NodeState.free_count``). GPUs are the only resource modelled.
* Extender filter (when an engine is given): :meth:`PlacementEngine.filter` over the nodes that
  passed, as kube-scheduler sends only those. Its failed nodes are removed. As with
  ``managedResources: nvidia.com/gpu``, a pod that requests no GPU never reaches the extender.
* Score, summed like the real framework (each plugin 0..100 times its weight):

  - NodeResourcesFit, LeastAllocated, weight 1, on the GPU dimension:
    ``(allocatable - (used + request)) * 100 // allocatable`` (Go integer maths).
    The real plugin scores cpu and memory by default, not GPUs; for GPU pods whose CPU and
    memory requests scale with their GPUs the GPU dimension is the stand-in.
  - NodeResourcesBalancedAllocation, weight 1: with a single modelled resource the standard
    deviation of the requested fractions is 0, so the real formula ``(1 - std) * 100`` gives
    100 on every node. It is added as that constant, so totals read like the real ones, and it
    never changes the ranking.
  - Plugins that score every node alike here (TaintToleration, PodTopologySpread with no
    constraints, NodeAffinity, ImageLocality, ...) are left out: a constant shifts no choice.
  - The extender's prioritize score (0..10) times ``extender_weight`` times 10
    (MaxNodeScore 100 / MaxExtenderPriority 10).
* Select: the highest total; ties are broken at random by a seeded RNG, as kube-scheduler picks
  uniformly among the top nodes, or by node name (``tie_break="name"``).
* With one feasible node left, scoring is skipped (observed: prioritize is not called).
* Bind: :meth:`ClusterSnapshot.with_binding`, which returns the next snapshot.

What is not: CPU, memory and other resources, taints, affinity, topology spread constraints,
preemption, the scheduling queue and its backoff, ``percentageOfNodesToScore`` (every node is
evaluated, as the real scheduler does below 100 nodes), extender errors and timeouts
(``ignorable``), and the kubelet's own GPU choice (the snapshot assumes the best-fit GPUs).

Without an engine the model is "the default scheduler".
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from topo_sched.placement.engine import PlacementEngine
from topo_sched.placement.pods import PodInfo, pod_info
from topo_sched.placement.snapshot import ClusterSnapshot, NodeState

MAX_NODE_SCORE = 100
MAX_EXTENDER_PRIORITY = 10
#: NodeResourcesBalancedAllocation with one modelled resource (see the module docstring).
BALANCED_ALLOCATION_SCORE = MAX_NODE_SCORE

TieBreak = Literal["random", "name"]


@dataclass(frozen=True)
class ScheduleResult:
    """One scheduling cycle's outcome."""

    pod: str
    #: The chosen node, or None when no node is feasible.
    node: str | None
    #: Why: the choice in a few words, or kube-scheduler's "0/N nodes are available: ..." text.
    reason: str
    #: Final score per node that reached scoring (empty when scoring was skipped).
    scores: Mapping[str, int] = field(default_factory=dict)
    #: The extender's 0..10 score per node, when it was asked.
    extender_scores: Mapping[str, int] = field(default_factory=dict)
    #: Nodes that passed the default filter and the extender's.
    feasible: tuple[str, ...] = ()

    @property
    def scheduled(self) -> bool:
        return self.node is not None


def least_allocated_score(node: NodeState, request: int) -> int:
    """NodeResourcesFit LeastAllocated on the GPU dimension, 0..100."""
    alloc = node.gpu_allocatable
    if alloc <= 0:
        return 0
    used = alloc - node.free_count
    requested = used + request
    if requested > alloc:
        return 0
    return (alloc - requested) * MAX_NODE_SCORE // alloc


def default_filter(snap: ClusterSnapshot, info: PodInfo) -> tuple[list[str], dict[str, str]]:
    """Nodes with enough free GPUs (sorted by name), and the reason for each that has not."""
    passed: list[str] = []
    failed: dict[str, str] = {}
    for name in sorted(snap.nodes):
        if snap.nodes[name].free_count >= info.gpus:
            passed.append(name)
        else:
            failed[name] = "Insufficient nvidia.com/gpu"
    return passed, failed


def unschedulable_message(total: int, failed: Mapping[str, str]) -> str:
    """kube-scheduler's FitError text: ``0/6 nodes are available: 2 <reason>, 4 <reason>.``"""
    counts = Counter(failed.values())
    # Go sorts the formatted "<count> <reason>" strings, as here.
    parts = ", ".join(sorted(f"{n} {reason}" for reason, n in counts.items()))
    return f"0/{total} nodes are available: {parts}." if parts else f"0/{total} nodes available."


class Scheduler(Protocol):
    """What the simulator drives: one cycle, then bind."""

    def schedule(self, snap: ClusterSnapshot, pod: Mapping[str, Any]) -> ScheduleResult: ...

    def bind(self, snap: ClusterSnapshot, pod: Mapping[str, Any], node: str) -> ClusterSnapshot: ...


class SchedulerModel:
    """kube-scheduler with (or, ``engine=None``, without) the topo-sched extender."""

    def __init__(
        self,
        engine: PlacementEngine | None,
        extender_weight: int = 20,
        *,
        tie_break: TieBreak = "random",
        seed: int = 0,
    ):
        if extender_weight < 0:
            raise ValueError("extender_weight must be >= 0")
        self.engine = engine
        self.extender_weight = extender_weight
        self.tie_break = tie_break
        self.rng = random.Random(seed)

    def schedule(self, snap: ClusterSnapshot, pod: Mapping[str, Any]) -> ScheduleResult:
        info = pod_info(pod)
        passed, failed = default_filter(snap, info)
        ext_on = self.engine is not None and info.gpus > 0
        if ext_on and passed:
            assert self.engine is not None
            out = self.engine.filter(snap, pod, passed)
            for name, why in (*out.failed.items(), *out.unresolvable.items()):
                failed[name] = why
            kept = set(out.passed)
            passed = [n for n in passed if n in kept]
        if not passed:
            return ScheduleResult(info.key, None, unschedulable_message(len(snap.nodes), failed))
        if len(passed) == 1:
            return ScheduleResult(info.key, passed[0], "only feasible node", feasible=(passed[0],))
        ext: dict[str, int] = {}
        if ext_on:
            assert self.engine is not None
            ext = dict(self.engine.prioritize(snap, pod, passed))
        scores: dict[str, int] = {}
        for name in passed:
            total = least_allocated_score(snap.nodes[name], info.gpus) + BALANCED_ALLOCATION_SCORE
            total += (
                ext.get(name, 0) * self.extender_weight * (MAX_NODE_SCORE // MAX_EXTENDER_PRIORITY)
            )
            scores[name] = total
        best = max(scores.values())
        top = sorted(n for n, s in scores.items() if s == best)
        node = top[0] if self.tie_break == "name" else self.rng.choice(top)
        reason = f"highest score {best}" + (f" (1 of {len(top)} tied)" if len(top) > 1 else "")
        return ScheduleResult(info.key, node, reason, scores, ext, tuple(passed))

    @staticmethod
    def bind(snap: ClusterSnapshot, pod: Mapping[str, Any], node: str) -> ClusterSnapshot:
        return snap.with_binding(pod, node)


class RandomScheduler:
    """Baseline policy: a uniformly random node among those with enough free GPUs (seeded)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def schedule(self, snap: ClusterSnapshot, pod: Mapping[str, Any]) -> ScheduleResult:
        info = pod_info(pod)
        passed, failed = default_filter(snap, info)
        if not passed:
            return ScheduleResult(info.key, None, unschedulable_message(len(snap.nodes), failed))
        return ScheduleResult(info.key, self.rng.choice(passed), "random", feasible=tuple(passed))

    @staticmethod
    def bind(snap: ClusterSnapshot, pod: Mapping[str, Any], node: str) -> ClusterSnapshot:
        return snap.with_binding(pod, node)


def random_placement(
    snap: ClusterSnapshot, pod: Mapping[str, Any], rng: random.Random
) -> str | None:
    """A random node with enough free GPUs, or None."""
    passed, _ = default_filter(snap, pod_info(pod))
    return rng.choice(passed) if passed else None
