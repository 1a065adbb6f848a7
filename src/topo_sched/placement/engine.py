"""The placement engine: filter, prioritize and explain for one pod against a snapshot.

This is the ONE scoring implementation: the extender's HTTP verbs, the gRPC what-if service
and the simulator all call it. Typed results tell "this node cannot take the pod" (a
Rejection, per node, resolvable by preemption or not) from "the request is broken"
(PodSpecError, raised).

Non-RBG pods get the neutral answer: every node passes, every node scores the same, so
nothing here can block or steer a pod that is not ours. A node name the snapshot does not
know (a node that just joined) passes with a neutral score.

Pure and stateless apart from a small memo of per-pod contexts (keyed by snapshot identity
and pod key), so that prioritize reuses what filter computed in the same cycle. Safe to call
from several threads: the memo is a bounded dict replaced atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from topo_sched.placement.config import PlacementConfig, resolve_pod_policy
from topo_sched.placement.pods import PodInfo, pod_info
from topo_sched.placement.snapshot import ClusterSnapshot, NodeState
from topo_sched.placement.terms import (
    ALL_TERMS,
    DOMAIN,
    NAME,
    NODE,
    DomainCounts,
    PodContext,
    Rejection,
    Term,
)

log = logging.getLogger(__name__)

MAX_SCORE = 10  # kube-scheduler's MaxExtenderPriority
NEUTRAL_SCORE = 5
NON_RBG_SCORE = 0


@dataclass
class FilterOutcome:
    passed: list[str]
    failed: dict[str, str] = field(default_factory=dict)  # preemption may help
    unresolvable: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    is_rbg: bool = False
    #: node -> rejection code, for metrics (bounded label values)
    codes: dict[str, str] = field(default_factory=dict)
    unknown_nodes: list[str] = field(default_factory=list)


@dataclass
class NodeVerdict:
    node: str
    passed: bool
    code: str | None = None
    reason: str | None = None
    terms: dict[str, dict[str, float | None]] = field(default_factory=dict)
    total: float | None = None
    score: int | None = None
    gpus: tuple[int, ...] = ()
    locality: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node": self.node, "passed": self.passed}
        if not self.passed:
            d.update(code=self.code, reason=self.reason)
        else:
            d.update(
                score=self.score,
                total=None if self.total is None else round(self.total, 4),
                terms=self.terms,
                gpus=list(self.gpus),
                locality=self.locality,
            )
        if self.reason and self.passed:
            d["note"] = self.reason
        return d


@dataclass
class Explanation:
    pod: str
    is_rbg: bool
    gpus: int
    warnings: list[str]
    nodes: list[NodeVerdict]

    def to_dict(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "rbg": self.is_rbg,
            "gpus": self.gpus,
            "warnings": self.warnings,
            "nodes": [v.to_dict() for v in self.nodes],
        }


def normalise(totals: Sequence[float | None]) -> list[int]:
    """Weighted totals (0..1) -> 0..10, stretched over the candidates (best = 10).

    Stretching keeps the ranking while using the whole range kube-scheduler multiplies by the
    extender weight; integer rounding of raw totals would merge nodes 0.05 apart. No opinion
    (None) and a field where every node ties map to the neutral score.
    """
    known = [t for t in totals if t is not None]
    if not known:
        return [NEUTRAL_SCORE] * len(totals)
    lo, hi = min(known), max(known)
    if hi - lo < 1e-9:
        return [NEUTRAL_SCORE if t is None else round(hi * MAX_SCORE) for t in totals]
    return [NEUTRAL_SCORE if t is None else round(MAX_SCORE * (t - lo) / (hi - lo)) for t in totals]


@dataclass
class _Plan:
    """Per pod: which terms can speak, at what weight, and caches of their partial sums.

    Terms that depend only on a node's GPU state are cached by (locality index, free mask,
    allocatable); terms that depend on where a node sits, by its domains. A 1,000-node request
    then evaluates each term once per node class or rack, not once per node.
    """

    node_terms: tuple[tuple[Term, float], ...]
    domain_terms: tuple[tuple[Term, float], ...]
    name_terms: tuple[tuple[Term, float], ...]
    checks: tuple[Term, ...]
    local: dict[tuple[int, int, int], tuple[float, float]] = field(default_factory=dict)
    domain: dict[Any, tuple[float, float]] = field(default_factory=dict)

    @property
    def checks_local(self) -> bool:
        return all(t.scope == NODE for t in self.checks)


def _partial(terms: tuple[tuple[Term, float], ...], ctx: PodContext, node: NodeState):
    num = den = 0.0
    for term, w in terms:
        sc = term.score(ctx, node)
        if sc is not None:
            num += w * sc
            den += w
    return num, den


class PlacementEngine:
    def __init__(self, config: PlacementConfig | None = None, terms: Sequence[Term] = ALL_TERMS):
        """``config`` decides policy (modes, weights); the snapshot decides cluster levels."""
        self.config = config or PlacementConfig()
        self.terms = tuple(terms)
        self._memo: dict[tuple[int, str, str | None], PodContext] = {}
        self._domain_memo: dict[tuple[Any, ...], dict[Any, tuple[float, float]]] = {}

    # -- context -------------------------------------------------------------------------------

    def context(self, snap: ClusterSnapshot, pod: Mapping[str, Any] | PodInfo) -> PodContext:
        info = pod if isinstance(pod, PodInfo) else pod_info(pod)
        key = (id(snap), info.key, info.uid)
        ctx = self._memo.get(key)
        if ctx is not None and ctx.snap is snap:
            return ctx
        ctx = self._build_context(snap, info)
        if len(self._memo) > 256:
            self._memo = {}
        self._memo[key] = ctx
        return ctx

    def _build_context(self, snap: ClusterSnapshot, info: PodInfo) -> PodContext:
        policy, warnings = resolve_pod_policy(self.config, info.annotations)
        ctx = PodContext(pod=info, policy=policy, snap=snap)
        ctx.warnings = warnings
        rbg = info.rbg
        if rbg is None:
            return ctx
        cluster = snap.cluster
        group = [
            p for p in snap.group_placements(info.namespace, rbg.group) if p.pod.key != info.key
        ]
        side = rbg.pd_side
        if side is not None:
            other = [p.node for p in group if p.pod.rbg and p.pod.rbg.pd_side not in (None, side)]
            if not other:  # no counterpart yet: gather with the group's own pods
                other = [
                    p.node
                    for p in group
                    if p.pod.rbg
                    and p.pod.rbg.pd_side is not None
                    and p.pod.gpus
                    and (rbg.instance is None or p.pod.rbg.instance != rbg.instance)
                ]
            ctx.counterparts = DomainCounts(cluster, other) if other else None
            ctx.counterpart_nodes = tuple(sorted(other))
        if rbg.instance:
            ctx.members = [
                p
                for p in group
                if p.pod.rbg and p.pod.rbg.role == rbg.role and p.pod.rbg.instance == rbg.instance
            ]
            if ctx.members:
                ctx.members_domains = DomainCounts(cluster, [m.node for m in ctx.members])
        ctx.pack_level = cluster.level_named(policy.pack_level)
        if rbg.instance and not ctx.members and ctx.pack_level is not None and info.gpus:
            size = info.instance_size or 2
            room: dict[str, int] = {}
            for st in snap.nodes.values():
                dom = cluster.domain(st.name, ctx.pack_level)
                if dom is not None and st.free_count >= info.gpus:
                    room[dom] = room.get(dom, 0) + 1
            ctx.room_by_domain, ctx.room_needed = room, max(1, size - 1)
        if policy.pack_level and ctx.pack_level is None and ctx.members:
            ctx.warnings.append(
                f"pack level {policy.pack_level!r} is not a level of this cluster; not enforced"
            )
        if policy.spread_level:
            ctx.spread_level = cluster.level_named(policy.spread_level)
            peers = [
                p.node
                for p in group
                if p.pod.rbg
                and p.pod.rbg.role == rbg.role
                and (rbg.instance is None or p.pod.rbg.instance != rbg.instance)
            ]
            if ctx.spread_level is not None:
                ctx.spread_counts = DomainCounts(cluster, peers)
        if info.key not in snap.placements:
            ctx.previous_node = snap.history.get(info.key)
        hosts = {p.node for p in group}
        ctx.peer_hosts = frozenset(hosts)
        return ctx

    def _weight(self, ctx: PodContext, term: Term) -> float:
        w = float(getattr(ctx.policy.weights, term.name, 0.0))
        if term.name == "pd_proximity" and ctx.policy.kv_bytes_per_token:
            ratio = ctx.policy.kv_bytes_per_token / ctx.policy.reference_kv_bytes_per_token
            w *= min(4.0, max(0.25, ratio))
        return w

    def _plan(self, ctx: PodContext) -> _Plan:
        if ctx.plan is None:
            active = [(t, self._weight(ctx, t)) for t in self.terms]
            active = [(t, w) for t, w in active if w > 0 and t.active(ctx)]
            plan = _Plan(
                node_terms=tuple((t, w) for t, w in active if t.scope == NODE),
                domain_terms=tuple((t, w) for t, w in active if t.scope == DOMAIN),
                name_terms=tuple((t, w) for t, w in active if t.scope == NAME),
                checks=tuple(t for t in self.terms if t.can_reject(ctx)),
            )
            plan.domain = self._shared_domain_cache(ctx, plan)
            ctx.plan = plan
        return ctx.plan

    def _shared_domain_cache(self, ctx: PodContext, plan: _Plan) -> dict[Any, tuple[float, float]]:
        """The per-domain partial sums, shared by consecutive pods that would compute the same.

        When prefill-decode proximity is the only domain term, a domain's partial depends on
        nothing but the cluster's level tree, where the counterparts run and the weight: the
        pods of one role placed one after another (a scale-up) share it. The key holds the
        ClusterTopology object itself, so a rebuilt cluster never reuses an old entry.
        """
        if [t.name for t, _ in plan.domain_terms] != ["pd_proximity"]:
            return {}
        key = (ctx.snap.cluster, ctx.counterpart_nodes, plan.domain_terms[0][1])
        cache = self._domain_memo.get(key)
        if cache is None:
            if len(self._domain_memo) >= 64:
                self._domain_memo = {}
            cache = self._domain_memo[key] = {}
        return cache

    # -- verbs ---------------------------------------------------------------------------------

    def _reject(self, ctx: PodContext, node: NodeState) -> Rejection | None:
        k = ctx.pod.gpus
        if k > node.gpu_allocatable:
            return Rejection(
                "too-few-gpus",
                f"needs {k} GPUs, node has {node.gpu_allocatable} allocatable",
                resolvable=False,
            )
        if k > node.free_count:
            return Rejection(
                "gpus-in-use", f"needs {k} GPUs, {node.free_count} free", resolvable=True
            )
        for term in self._plan(ctx).checks:
            r = term.check(ctx, node)
            if r is not None:
                return r
        return None

    def filter(
        self, snap: ClusterSnapshot, pod: Mapping[str, Any], node_names: Sequence[str]
    ) -> FilterOutcome:
        ctx = self.context(snap, pod)
        out = FilterOutcome(passed=[], warnings=list(ctx.warnings), is_rbg=ctx.pod.rbg is not None)
        if not out.is_rbg:
            out.passed = list(node_names)
            return out
        plan = self._plan(ctx)
        nodes = snap.nodes
        if not snap.node_names.issuperset(node_names):
            out.unknown_nodes = [n for n in node_names if n not in nodes]
        if plan.checks_local:
            # Decide once per GPU-state class; most requests reject no class at all.
            rejected: dict[str, Rejection] = {}
            for members in snap.class_members.values():
                r = self._reject(ctx, nodes[members[0]])
                if r is not None:
                    for n in members:
                        rejected[n] = r
            if not rejected:
                out.passed = list(node_names)
                return out
            verdict = rejected.get
        else:

            def verdict(name: str) -> Rejection | None:
                node = nodes.get(name)
                return None if node is None else self._reject(ctx, node)

        for name in node_names:
            r = verdict(name)
            if r is None:
                out.passed.append(name)
            else:
                (out.failed if r.resolvable else out.unresolvable)[name] = r.reason
                out.codes[name] = r.code
        return out

    def _total(self, ctx: PodContext, node: NodeState) -> float | None:
        """Weighted mean of the active terms' scores for one node (None: no opinion)."""
        plan = self._plan(ctx)
        num = den = 0.0
        if plan.node_terms:
            lk = (id(node.index), node.free_mask, node.gpu_allocatable)
            part = plan.local.get(lk)
            if part is None:
                part = plan.local[lk] = _partial(plan.node_terms, ctx, node)
            num, den = part
        if plan.domain_terms:
            doms = ctx.snap.cluster.domains(node.name)
            dk = (doms[:-1] if doms else None, node.name if node.name in ctx.peer_hosts else None)
            part = plan.domain.get(dk)
            if part is None:
                part = plan.domain[dk] = _partial(plan.domain_terms, ctx, node)
            num, den = num + part[0], den + part[1]
        if plan.name_terms:
            n2, d2 = _partial(plan.name_terms, ctx, node)
            num, den = num + n2, den + d2
        return num / den if den else None

    def _detail(self, ctx: PodContext, node: NodeState) -> dict[str, dict[str, float | None]]:
        """Every active term's score and weight on one node, for explain."""
        plan = self._plan(ctx)
        out: dict[str, dict[str, float | None]] = {}
        for term, w in (*plan.node_terms, *plan.domain_terms, *plan.name_terms):
            sc = term.score(ctx, node)
            out[term.name] = {"score": None if sc is None else round(sc, 4), "weight": w}
        return out

    def prioritize(
        self, snap: ClusterSnapshot, pod: Mapping[str, Any], node_names: Sequence[str]
    ) -> list[tuple[str, int]]:
        ctx = self.context(snap, pod)
        if ctx.pod.rbg is None:
            return [(n, NON_RBG_SCORE) for n in node_names]
        plan = self._plan(ctx)
        nodes = snap.nodes
        if plan.name_terms:  # e.g. stability: the node's name matters, no sharing
            totals = [None if n not in nodes else self._total(ctx, nodes[n]) for n in node_names]
            return list(zip(node_names, normalise(totals), strict=True))
        # One total per distinct (GPU-state class, place in the tree) among the candidates,
        # then one fast pass to spread them over the nodes; a peer's own host apart.
        index = snap.key_index(node_names)
        local, domain, node_terms, domain_terms = (
            plan.local,
            plan.domain,
            plan.node_terms,
            plan.domain_terms,
        )
        dist: list[float | None] = []
        peer_hosts = ctx.peer_hosts
        for (lk, dk), names in zip(index.distinct, index.members, strict=True):
            # The same partial sums _total adds, read straight from the per-pod caches. The
            # shared value must come from a node no peer runs on (a peer's host scores apart).
            rep = names[0]
            if rep in peer_hosts:
                rep = next((n for n in names if n not in peer_hosts), None)
                if rep is None:  # only peers' hosts have this key: they are scored below
                    dist.append(None)
                    continue
            num = den = 0.0
            if node_terms:
                part = local.get(lk)
                if part is None:
                    part = local[lk] = _partial(node_terms, ctx, nodes[rep])
                num, den = part
            if domain_terms:
                part = domain.get((dk, None))
                if part is None:
                    part = domain[(dk, None)] = _partial(domain_terms, ctx, nodes[rep])
                num, den = num + part[0], den + part[1]
            dist.append(num / den if den else None)
        peers = [
            (index.position[h], self._total(ctx, nodes[h]))
            for h in ctx.peer_hosts
            if h in index.position and h in nodes
        ]
        # A key only peers' hosts have is used by no node: keep it out of the range.
        used = list(index.counts)
        for pos, _ in peers:
            used[index.idx[pos]] -= 1
        ranged = [t if n > 0 else None for t, n in zip(dist, used, strict=True)]
        scores = normalise([*ranged, *(t for _, t in peers)])
        by_key, by_peer = scores[: len(dist)], scores[len(dist) :]
        out = [by_key[i] if i >= 0 else NEUTRAL_SCORE for i in index.idx]
        for (pos, _), sc in zip(peers, by_peer, strict=True):
            out[pos] = sc
        return list(zip(node_names, out, strict=True))

    def explain(
        self,
        snap: ClusterSnapshot,
        pod: Mapping[str, Any],
        node_names: Sequence[str] | None = None,
    ) -> Explanation:
        ctx = self.context(snap, pod)
        names = list(node_names) if node_names is not None else sorted(snap.nodes)
        verdicts = []
        for name in names:
            node = snap.nodes.get(name)
            if node is None:
                verdicts.append(
                    NodeVerdict(name, True, reason="unknown node: neutral", score=NEUTRAL_SCORE)
                )
                continue
            if ctx.pod.rbg is None:
                verdicts.append(NodeVerdict(name, True, reason="not an RBG pod", score=0))
                continue
            r = self._reject(ctx, node)
            if r is not None:
                verdicts.append(NodeVerdict(name, False, code=r.code, reason=r.reason))
                continue
            total, detail = self._total(ctx, node), self._detail(ctx, node)
            fit = ctx.fit(node)
            verdicts.append(
                NodeVerdict(
                    name,
                    True,
                    terms=detail,
                    total=total,
                    gpus=fit.gpus,
                    locality=fit.locality.label if node.has_topology else None,
                    reason=node.data_problem,
                )
            )
        scored = [v for v in verdicts if v.passed and v.terms]
        for v, sc in zip(scored, normalise([v.total for v in scored]), strict=True):
            v.score = sc
        verdicts.sort(key=lambda v: (not v.passed, -(v.score or 0), -(v.total or 0), v.node))
        return Explanation(
            pod=ctx.pod.key,
            is_rbg=ctx.pod.rbg is not None,
            gpus=ctx.pod.gpus,
            warnings=list(ctx.warnings),
            nodes=verdicts,
        )
