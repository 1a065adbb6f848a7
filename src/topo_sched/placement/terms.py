"""Placement terms: one small class per concern, all behind the :class:`Term` protocol.

Each term may reject a node (``check``, for required modes) and may score it (``score``, a
float in 0..1, or None for "no opinion", which leaves the term out of that node's weighted
mean). Terms read a per-pod :class:`PodContext` built once per request, and one NodeState;
per-node work is a handful of dict lookups and integer ops so that 5,000 candidate nodes
stay cheap.

Pure: no I/O.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from topo_sched.placement.config import Mode, PodPolicy
from topo_sched.placement.pods import PodInfo
from topo_sched.placement.snapshot import ClusterSnapshot, NodeState, Placement
from topo_sched.topology.cluster import ClusterTopology, Level, LevelKind
from topo_sched.topology.locality import Fit, Locality

#: How close two pods are by the finest level they share, 0..1. Ordinal, not a cost: the
#: cost table in topology.costs prices transfers; this only ranks nearer above farther.
CLOSENESS: dict[LevelKind, float] = {
    LevelKind.HOST: 1.0,
    LevelKind.CLIQUE: 0.9,
    LevelKind.RACK: 0.7,
    LevelKind.BLOCK: 0.45,
    LevelKind.SPINE: 0.3,
    LevelKind.ZONE: 0.15,
    LevelKind.REGION: 0.05,
}

#: Intra-node fit score per locality tier.
LOCALITY_SCORE: dict[Locality, float] = {
    Locality.NVLINK_ISLAND: 1.0,
    Locality.NUMA: 0.7,
    Locality.PCIE_SWITCH_NIC: 0.45,
    Locality.ANY: 0.15,
    Locality.NONE: 0.0,
}


@dataclass(frozen=True)
class Rejection:
    code: str  # short, bounded set: used as a metric label
    reason: str  # what a person reads in FailedNodes
    resolvable: bool  # could preemption on this node help?


class DomainCounts:
    """How many pods of a set sit in each domain, per level; answers mean closeness fast."""

    def __init__(self, cluster: ClusterTopology, nodes: list[str]):
        self.cluster = cluster
        self.total = 0
        self.per_level: list[Counter[str]] = [Counter() for _ in cluster.levels]
        for n in nodes:
            doms = cluster.domains(n)
            if doms is None:
                continue
            self.total += 1
            for i, d in enumerate(doms):
                if d is not None:
                    self.per_level[i][d] += 1

    def mean_closeness(self, node: str) -> float | None:
        if self.total == 0:
            return None
        doms = self.cluster.domains(node)
        if doms is None:
            return None
        acc, counted = 0.0, 0
        for i in range(len(doms) - 1, -1, -1):  # finest first
            d = doms[i]
            if d is None:
                continue
            c = self.per_level[i].get(d, 0)
            if c > counted:
                acc += (c - counted) * CLOSENESS[self.cluster.levels[i].kind]
                counted = c
        return acc / self.total

    def count_in(self, node: str, level_index: int) -> int:
        doms = self.cluster.domains(node)
        if doms is None or doms[level_index] is None:
            return 0
        return self.per_level[level_index].get(doms[level_index], 0)


@dataclass
class PodContext:
    """Everything about one pod that does not depend on the candidate node."""

    pod: PodInfo
    policy: PodPolicy
    snap: ClusterSnapshot
    #: Where the other PD side of the group sits; before any is placed, where the group's
    #: other pods sit, so a group's pods gather where their counterparts can join them.
    counterparts: DomainCounts | None = None
    #: The nodes ``counterparts`` counts, sorted: identifies it for caching across pods.
    counterpart_nodes: tuple[str, ...] = ()
    members: list[Placement] = field(default_factory=list)  # same multi-node instance
    members_domains: DomainCounts | None = None
    pack_level: Level | None = None
    #: First member of an instance: per pack-level domain, nodes with room for one member.
    room_by_domain: dict[str, int] | None = None
    room_needed: int | None = None
    spread_level: Level | None = None
    spread_counts: DomainCounts | None = None
    previous_node: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: Nodes that peers of this pod run on: only there does the host level matter.
    peer_hosts: frozenset[str] = frozenset()
    #: The engine's per-pod plan (active terms, weights, caches); set by the engine.
    plan: Any = None

    def fit(self, node: NodeState) -> Fit:
        # LocalityIndex memoises per (free mask, k); indices are shared by identical nodes.
        return node.index.best_fit(node.free_mask, self.pod.gpus)


#: What a term's answer depends on, so the engine can reuse it across nodes in one request:
#: NODE = the node's GPU state only (locality index, free GPUs, allocatable);
#: DOMAIN = where the node sits (its level domains; the host only where peers run on it);
#: NAME = the node itself.
NODE, DOMAIN, NAME = "node", "domain", "name"


class Term(Protocol):
    name: str
    scope: str

    def active(self, ctx: PodContext) -> bool:
        """Whether the term can have an opinion for this pod at all (else it is skipped)."""
        ...

    def can_reject(self, ctx: PodContext) -> bool: ...

    def check(self, ctx: PodContext, node: NodeState) -> Rejection | None: ...

    def score(self, ctx: PodContext, node: NodeState) -> float | None: ...


class IntraNodeFit:
    """k GPUs inside one NVLink island, else one NUMA node, else under one PCIe switch + NIC."""

    name = "intra_node_fit"
    scope = NODE

    def active(self, ctx: PodContext) -> bool:
        return ctx.pod.gpus > 1

    def can_reject(self, ctx: PodContext) -> bool:
        return ctx.policy.intra_node is Mode.REQUIRED and ctx.pod.gpus > 1

    def check(self, ctx: PodContext, node: NodeState) -> Rejection | None:
        k = ctx.pod.gpus
        if ctx.policy.intra_node is not Mode.REQUIRED or k <= 1 or not node.has_topology:
            return None
        if ctx.fit(node).locality >= Locality.NUMA:
            return None
        possible = node.index.best_fit(node.index.all_mask, k).locality >= Locality.NUMA
        return Rejection(
            "intra-node-required",
            f"{k} GPUs cannot share one NVLink island or NUMA node here"
            + (" with the GPUs now free" if possible else " (node topology never allows it)"),
            resolvable=possible,
        )

    def score(self, ctx: PodContext, node: NodeState) -> float | None:
        if ctx.pod.gpus <= 1 or not node.has_topology:
            return None
        return LOCALITY_SCORE[ctx.fit(node).locality]


class BestFit:
    """Pack: prefer the node (and group) the pod fills most, keeping whole islands free."""

    name = "best_fit"
    scope = NODE

    def active(self, ctx: PodContext) -> bool:
        return ctx.pod.gpus > 0

    def can_reject(self, ctx: PodContext) -> bool:
        return False

    def check(self, ctx: PodContext, node: NodeState) -> Rejection | None:
        return None

    def score(self, ctx: PodContext, node: NodeState) -> float | None:
        k = ctx.pod.gpus
        if k == 0 or node.gpu_allocatable == 0:
            return None
        fit = ctx.fit(node)
        if not fit.feasible:
            return 0.0
        node_left = (node.free_count - k) / node.gpu_allocatable
        group_left = fit.group_leftover / node.gpu_allocatable
        return max(0.0, 1.0 - 0.5 * node_left - 0.5 * group_left)


class PdProximity:
    """Prefill near its decode (and back): KV cache crosses this path for every request."""

    name = "pd_proximity"
    scope = DOMAIN

    def active(self, ctx: PodContext) -> bool:
        return ctx.counterparts is not None

    def can_reject(self, ctx: PodContext) -> bool:
        return False

    def check(self, ctx: PodContext, node: NodeState) -> Rejection | None:
        return None

    def score(self, ctx: PodContext, node: NodeState) -> float | None:
        if ctx.counterparts is None:
            return None
        return ctx.counterparts.mean_closeness(node.name)


class InstancePacking:
    """Members of one multi-node leader/worker instance inside one level (e.g. a rack)."""

    name = "instance_packing"
    scope = DOMAIN

    def active(self, ctx: PodContext) -> bool:
        return ctx.members_domains is not None or bool(ctx.room_by_domain and ctx.room_needed)

    def can_reject(self, ctx: PodContext) -> bool:
        return (
            ctx.policy.pack_mode is Mode.REQUIRED
            and bool(ctx.members)
            and ctx.pack_level is not None
        )

    def check(self, ctx: PodContext, node: NodeState) -> Rejection | None:
        if ctx.policy.pack_mode is not Mode.REQUIRED or not ctx.members or ctx.pack_level is None:
            return None
        cluster = ctx.snap.cluster
        want = {cluster.domain(m.node, ctx.pack_level) for m in ctx.members} - {None}
        if not want:
            return None  # members' nodes lack the label: nothing to enforce
        here = cluster.domain(node.name, ctx.pack_level)
        if here in want:
            return None
        label = ctx.pack_level.label
        return Rejection(
            "instance-packing-required",
            f"instance {ctx.pod.rbg.instance if ctx.pod.rbg else '?'} is in "
            f"{label}={sorted(want)[0].rsplit('/', 1)[-1]}; this node is "
            + (f"in {here.rsplit('/', 1)[-1]}" if here else f"not labelled {label}"),
            resolvable=False,
        )

    def score(self, ctx: PodContext, node: NodeState) -> float | None:
        if ctx.members_domains is not None:
            return ctx.members_domains.mean_closeness(node.name)
        if ctx.room_by_domain is None or ctx.pack_level is None or not ctx.room_needed:
            return None
        # The first member: prefer a domain with room for the rest of the instance.
        dom = ctx.snap.cluster.domain(node.name, ctx.pack_level)
        room = ctx.room_by_domain.get(dom, 0) if dom else 0
        return min(1.0, max(0, room - 1) / ctx.room_needed)


class Spread:
    """Opt-in: spread a role's instances across a level (failure domains)."""

    name = "spread"
    scope = DOMAIN

    def active(self, ctx: PodContext) -> bool:
        return ctx.spread_counts is not None and ctx.spread_level is not None

    def can_reject(self, ctx: PodContext) -> bool:
        return False

    def check(self, ctx: PodContext, node: NodeState) -> Rejection | None:
        return None

    def score(self, ctx: PodContext, node: NodeState) -> float | None:
        if ctx.spread_counts is None or ctx.spread_level is None:
            return None
        i = ctx.snap.cluster.index_of(ctx.spread_level)
        return 1.0 / (1.0 + ctx.spread_counts.count_in(node.name, i))


class Stability:
    """A pod recreated under the same name goes back to the node it had, while it fits."""

    name = "stability"
    scope = NAME

    def active(self, ctx: PodContext) -> bool:
        return ctx.previous_node is not None

    def can_reject(self, ctx: PodContext) -> bool:
        return False

    def check(self, ctx: PodContext, node: NodeState) -> Rejection | None:
        return None

    def score(self, ctx: PodContext, node: NodeState) -> float | None:
        if ctx.previous_node is None:
            return None
        return 1.0 if node.name == ctx.previous_node and ctx.fit(node).feasible else 0.0


ALL_TERMS: tuple[Term, ...] = (
    IntraNodeFit(),
    InstancePacking(),
    PdProximity(),
    Spread(),
    Stability(),
    BestFit(),
)
