"""What-if placement of whole ratio units, and a free-capacity summary of a snapshot.

The core of the gRPC ``PlacementService`` (``proto/topo_sched/v1/placement.proto``); the
gRPC layer only translates. Pure: no I/O, no clock, no grpc.

:func:`what_if` answers "would ``units`` more ratio units of this RBG fit, and where?". A
ratio unit is every role's share of one step of the ratio (e.g. 2 prefill pods + 1 decode
pod). Hypothetical pods are built from the request and placed one by one, unit by unit, in
role order, by a scheduler model: kube-scheduler's default plugins plus the extender at its
configured weight (:class:`topo_sched.sim.scheduler.SchedulerModel`), which asks the ONE
placement engine. Each placement is bound with ``ClusterSnapshot.with_binding`` on a private
chain of snapshots, so the next pod (and the next unit) sees it; the snapshot passed in is
never changed, and neither is anything the extender serves from.

A unit counts only when ALL its pods found a node; the pods of a unit that did not fit are
dropped (never a prefill without its decode), and placement stops there: the units are
identical, so a later one cannot fit where an earlier one did not. For that first unit that
did not fit, every role with a pod that found no node gets a reason: how many nodes rejected
it, by rejection code (``decode: 0/64 nodes: 40 gpus-in-use, 24 too-few-gpus``).

Placement cost (lower is better), over the placeable units:

- ``score_cost``: the sum over placed GPU pods of ``10 - score``, where ``score`` is the
  engine's absolute 0..10 score of the chosen node (``round(10 x weighted total)``, what
  ``PlacementEngine.explain`` gives for that one node; 5 when no term has an opinion).
  Pods without GPUs never reach the extender and cost nothing.
- ``kv_path_cost``: per unit with both PD sides, the mean over its (prefill pod, decode pod)
  pairs of ``10 x (1 - closeness)``, closeness being the scoring terms' ordinal table for
  the finest cluster level the two nodes share (same node 1.0, NVLink clique 0.9, rack 0.7,
  block 0.45, spine 0.3, zone 0.15, region 0.05, nothing shared 0); summed over units.
- ``cost = score_cost + kv_path_cost``.

Hypothetical pod names continue the group's ordinals: ``<rbg>-<role>-<n>`` for single-pod
instances, ``<rbg>-<role>-<n>-<j>`` in instance ``<rbg>-<role>-<n>`` (leader ``j = 0``) for
leader/worker ones, with ``n`` after the highest ordinal of the role's placed pods, skipping
names the snapshot already holds.

:func:`cluster_summary` counts free GPUs: totals, how many nodes can host a k-GPU pod in
one NVLink island (k = 1, 2, 4, 8), and free GPUs per domain of each cluster level.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from topo_sched import labels as L
from topo_sched.placement.engine import MAX_SCORE, NEUTRAL_SCORE, PlacementEngine
from topo_sched.placement.pods import RbgIdentity
from topo_sched.placement.snapshot import ClusterSnapshot
from topo_sched.placement.terms import CLOSENESS
from topo_sched.topology.cluster import NOTHING_SHARED, LevelKind
from topo_sched.topology.locality import Locality

__all__ = [
    "FIT_SIZES",
    "MAX_PODS",
    "MAX_UNITS",
    "DomainSummary",
    "IslandFit",
    "LevelSummary",
    "PodPlacement",
    "RoleReason",
    "RoleRequest",
    "Summary",
    "WhatIfRequest",
    "WhatIfRequestError",
    "WhatIfResult",
    "cluster_summary",
    "kv_path_cost",
    "validate_request",
    "what_if",
]

#: Largest ``units`` one request may ask for, and largest number of hypothetical pods.
MAX_UNITS = 1000
MAX_PODS = 10_000
#: Pod sizes (GPUs) the summary counts hosting nodes for.
FIT_SIZES: tuple[int, ...] = (1, 2, 4, 8)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_GROUP_KEYS = (L.RBG_GROUP_NAME, L.RBG_LEGACY_GROUP_NAME)
_ROLE_KEYS = (L.RBG_ROLE_NAME, L.RBG_LEGACY_ROLE_NAME)
_PER_POD_KEYS = (L.RBG_ROLE_INSTANCE_NAME, L.RBG_COMPONENT_NAME)


class WhatIfRequestError(ValueError):
    """The what-if request is malformed; the message names the field."""


# -- request and result ---------------------------------------------------------------------


@dataclass(frozen=True)
class RoleRequest:
    """One role's share of a ratio unit."""

    name: str
    #: Pods per unit: replicas per unit x pods per instance.
    pods_per_unit: int
    gpus_per_pod: int
    #: The role's pod-template labels and annotations (placement overrides live here).
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: Pods per leader/worker instance; None or 1 = single-pod instances.
    instance_size: int | None = None

    @property
    def pods_per_instance(self) -> int:
        return self.instance_size or 1


@dataclass(frozen=True)
class WhatIfRequest:
    namespace: str
    rbg: str
    units: int
    roles: tuple[RoleRequest, ...]
    #: Fewer than ``units`` fit -> no placements are returned (the count still is).
    all_or_nothing: bool = False


@dataclass(frozen=True)
class PodPlacement:
    unit: int
    role: str
    pod: str
    node: str
    gpus: tuple[int, ...]
    #: Locality label (``nvlink-island``, ``numa``, ...); None when the node has no topology.
    locality: str | None
    #: The engine's absolute 0..10 score of the node for this pod.
    score: int
    #: Weighted mean of the terms, 0..1; None when no term had an opinion.
    total: float | None = None
    instance: str | None = None


@dataclass(frozen=True)
class RoleReason:
    role: str
    pod: str
    nodes_total: int
    #: (rejection code, number of nodes), most nodes first.
    rejections: tuple[tuple[str, int], ...]
    message: str


@dataclass
class WhatIfResult:
    units_requested: int
    units_placeable: int
    placements: list[PodPlacement] = field(default_factory=list)
    score_cost: float = 0.0
    kv_path_cost: float = 0.0
    first_unfit_unit: int | None = None
    reasons: list[RoleReason] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Age of the state the snapshot came from; set by the service, not by :func:`what_if`.
    snapshot_age_seconds: float | None = None

    @property
    def feasible(self) -> bool:
        return self.units_placeable == self.units_requested

    @property
    def cost(self) -> float:
        return self.score_cost + self.kv_path_cost


# -- validation -----------------------------------------------------------------------------


def validate_request(req: WhatIfRequest) -> None:
    """Raise :class:`WhatIfRequestError` naming the first bad field."""
    if not isinstance(req.namespace, str) or not _DNS_LABEL.match(req.namespace or ""):
        raise WhatIfRequestError(
            f"namespace {req.namespace!r} is not a Kubernetes namespace name (lowercase DNS label)"
        )
    if not isinstance(req.rbg, str) or not _DNS_SUBDOMAIN.match(req.rbg or ""):
        raise WhatIfRequestError(f"rbg {req.rbg!r} is not a Kubernetes object name")
    if isinstance(req.units, bool) or not isinstance(req.units, int):
        raise WhatIfRequestError("units must be a whole number")
    if not 0 <= req.units <= MAX_UNITS:
        raise WhatIfRequestError(f"units must be in 0..{MAX_UNITS}, got {req.units}")
    if not req.roles:
        raise WhatIfRequestError("roles: at least one role is needed")
    seen: set[str] = set()
    for i, role in enumerate(req.roles):
        where = f"roles[{i}]"
        if not role.name or not _DNS_SUBDOMAIN.match(role.name):
            raise WhatIfRequestError(f"{where}.name {role.name!r} is not a valid role name")
        where = f"roles[{i}] ({role.name})"
        if role.name in seen:
            raise WhatIfRequestError(f"{where}: role named twice")
        seen.add(role.name)
        if role.pods_per_unit < 1:
            raise WhatIfRequestError(
                f"{where}.pods_per_unit must be >= 1, got {role.pods_per_unit}"
            )
        if not 0 <= role.gpus_per_pod <= 1024:
            raise WhatIfRequestError(f"{where}.gpus_per_pod must be in 0..1024")
        size = role.instance_size
        if size is not None:
            if size < 1:
                raise WhatIfRequestError(f"{where}.instance_size must be >= 1, got {size}")
            if role.pods_per_unit % size:
                raise WhatIfRequestError(
                    f"{where}.pods_per_unit ({role.pods_per_unit}) is not a multiple of "
                    f"instance_size ({size})"
                )
        for kind, m in (("labels", role.labels), ("annotations", role.annotations)):
            for k, v in m.items():
                if not isinstance(k, str) or not isinstance(v, str) or not k:
                    raise WhatIfRequestError(
                        f"{where}.{kind} must map non-empty strings to strings"
                    )
        for key in _GROUP_KEYS:
            if key in role.labels and role.labels[key] != req.rbg:
                raise WhatIfRequestError(
                    f"{where}.labels[{key}]={role.labels[key]!r} contradicts rbg {req.rbg!r}"
                )
        for key in _ROLE_KEYS:
            if key in role.labels and role.labels[key] != role.name:
                raise WhatIfRequestError(
                    f"{where}.labels[{key}]={role.labels[key]!r} contradicts the role name"
                )
        for key in _PER_POD_KEYS:
            if key in role.labels:
                raise WhatIfRequestError(
                    f"{where}.labels[{key}] is set per pod by what-if; leave it out "
                    "(use instance_size for leader/worker instances)"
                )
    pods = req.units * sum(r.pods_per_unit for r in req.roles)
    if pods > MAX_PODS:
        raise WhatIfRequestError(f"{pods} hypothetical pods requested; at most {MAX_PODS}")


# -- hypothetical pods ----------------------------------------------------------------------


def _pod_object(
    namespace: str,
    name: str,
    gpus: int,
    pod_labels: Mapping[str, str],
    annotations: Mapping[str, str],
    instance_size: int | None,
) -> dict[str, Any]:
    """A pending Pod as the RBG controller would create it (only what placement reads)."""
    gpu = str(gpus)
    container: dict[str, Any] = {
        "name": "engine",
        "resources": {
            "limits": {L.RESOURCE_NVIDIA_GPU: gpu},
            "requests": {L.RESOURCE_NVIDIA_GPU: gpu},
        },
    }
    if instance_size is not None:
        container["env"] = [{"name": L.ENV_RBG_LWP_GROUP_SIZE, "value": str(instance_size)}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            # Fresh per call: the engine memoises pod contexts by (snapshot, key, uid), and two
            # what-ifs may ask about equally named pods with different annotations.
            "uid": str(uuid.uuid4()),
            "labels": dict(pod_labels),
            "annotations": dict(annotations),
        },
        "spec": {"containers": [container]},
        "status": {"phase": "Pending"},
    }


def _highest_ordinal(snap: ClusterSnapshot, namespace: str, rbg: str, role: str) -> int:
    prefix = f"{rbg}-{role}-"
    high = -1
    for pl in snap.group_placements(namespace, rbg):
        ident = pl.pod.rbg
        if ident is None or ident.role != role:
            continue
        for name in (ident.instance, pl.pod.name):
            if name and name.startswith(prefix):
                head = name[len(prefix) :].split("-", 1)[0]
                if head.isdigit():
                    high = max(high, int(head))
    return high


@dataclass(frozen=True)
class _HypoPod:
    role: RoleRequest
    obj: dict[str, Any]
    name: str
    instance: str | None


class _Namer:
    """Hands out the next free ordinal per role, continuing the group's own."""

    def __init__(self, snap: ClusterSnapshot, req: WhatIfRequest):
        self.snap = snap
        self.req = req
        self.next = {
            r.name: _highest_ordinal(snap, req.namespace, req.rbg, r.name) + 1 for r in req.roles
        }

    def instance(self, role: RoleRequest) -> list[_HypoPod]:
        req = self.req
        size = role.pods_per_instance
        multi = size > 1
        while True:
            n = self.next[role.name]
            self.next[role.name] = n + 1
            base = f"{req.rbg}-{role.name}-{n}"
            names = [f"{base}-{j}" for j in range(size)] if multi else [base]
            if not any(f"{req.namespace}/{x}" in self.snap.placements for x in names):
                break
        pods = []
        for j, name in enumerate(names):
            lbls = {**role.labels, L.RBG_GROUP_NAME: req.rbg, L.RBG_ROLE_NAME: role.name}
            if multi:
                lbls[L.RBG_ROLE_INSTANCE_NAME] = base
                lbls[L.RBG_COMPONENT_NAME] = "leader" if j == 0 else "worker"
            obj = _pod_object(
                req.namespace,
                name,
                role.gpus_per_pod,
                lbls,
                role.annotations,
                size if multi else None,
            )
            pods.append(_HypoPod(role, obj, name, base if multi else None))
        return pods


# -- what-if --------------------------------------------------------------------------------


class SchedulerLike(Protocol):
    """What :func:`what_if` needs of a scheduler model (``sim.scheduler.SchedulerModel``)."""

    def schedule(self, snap: ClusterSnapshot, pod: Mapping[str, Any]) -> Any: ...

    def bind(self, snap: ClusterSnapshot, pod: Mapping[str, Any], node: str) -> ClusterSnapshot: ...


def _closeness(snap: ClusterSnapshot, a: str, b: str) -> float:
    level = snap.cluster.shared_level(a, b)
    if level is NOTHING_SHARED:
        return 0.0
    return CLOSENESS.get(level.kind, 0.0)


def kv_path_cost(snap: ClusterSnapshot, unit: Sequence[PodPlacement]) -> float:
    """One unit's KV path cost: mean over (prefill, decode) pod pairs of 10 x (1 - closeness)."""
    sides: dict[str, list[str]] = {"prefill": [], "decode": []}
    for p in unit:
        side = RbgIdentity("", p.role).pd_side
        if side is not None:
            sides[side].append(p.node)
    pairs = [(a, b) for a in sides["prefill"] for b in sides["decode"]]
    if not pairs:
        return 0.0
    return sum(MAX_SCORE * (1.0 - _closeness(snap, a, b)) for a, b in pairs) / len(pairs)


def _reason(
    engine: PlacementEngine, snap: ClusterSnapshot, pod: _HypoPod, scheduler_reason: str
) -> RoleReason:
    names = sorted(snap.nodes)
    outcome = engine.filter(snap, pod.obj, names)
    counts = Counter(outcome.codes.values())
    ranked = tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    role = pod.role.name
    if ranked:
        detail = ", ".join(f"{n} {code}" for code, n in ranked)
        message = f"{role}: 0/{len(names)} nodes: {detail}"
    else:
        message = f"{role}: {scheduler_reason}"
    return RoleReason(role, pod.name, len(names), ranked, message)


def _add(warnings: list[str], new: Iterable[str]) -> None:
    for w in new:
        if w not in warnings:
            warnings.append(w)


def what_if(
    snap: ClusterSnapshot,
    engine: PlacementEngine,
    scheduler_model: SchedulerLike | None,
    request: WhatIfRequest,
) -> WhatIfResult:
    """Place ``request.units`` hypothetical ratio units on a private copy of ``snap``.

    ``scheduler_model`` picks the node per pod (None: kube-scheduler with this engine as its
    extender at weight 20, ties broken by node name so equal requests get equal answers).
    Raises :class:`WhatIfRequestError` for a malformed request. Never changes ``snap``.
    """
    validate_request(request)
    if scheduler_model is None:
        from topo_sched.sim.scheduler import SchedulerModel

        scheduler_model = SchedulerModel(engine, tie_break="name")
    result = WhatIfResult(units_requested=request.units, units_placeable=0)
    namer = _Namer(snap, request)
    current = snap
    for u in range(request.units):
        work = current
        unit: list[PodPlacement] = []
        failed: dict[str, RoleReason] = {}
        for role in request.roles:
            for _ in range(role.pods_per_unit // role.pods_per_instance):
                for hp in namer.instance(role):
                    decision = scheduler_model.schedule(work, hp.obj)
                    if decision.node is None:
                        if role.name not in failed:
                            failed[role.name] = _reason(engine, work, hp, decision.reason)
                        continue
                    unit.append(_placement(engine, work, hp, decision.node, u, result.warnings))
                    work = scheduler_model.bind(work, hp.obj, decision.node)
                    # GPUs as bound (best fit on the node's free set, as the snapshot assumes).
                    held = work.placements[f"{request.namespace}/{hp.name}"].gpus
                    if held != unit[-1].gpus:
                        unit[-1] = replace(unit[-1], gpus=held)
        if failed:
            result.first_unfit_unit = u
            result.reasons = [failed[r.name] for r in request.roles if r.name in failed]
            break
        current = work
        result.units_placeable += 1
        result.placements.extend(unit)
        result.score_cost += sum(
            MAX_SCORE - p.score for p, r in _with_roles(unit, request) if r.gpus_per_pod > 0
        )
        result.kv_path_cost += kv_path_cost(current, unit)
    if request.all_or_nothing and not result.feasible:
        result.placements = []
        result.score_cost = result.kv_path_cost = 0.0
    return result


def _with_roles(
    unit: Sequence[PodPlacement], request: WhatIfRequest
) -> list[tuple[PodPlacement, RoleRequest]]:
    by_name = {r.name: r for r in request.roles}
    return [(p, by_name[p.role]) for p in unit]


def _placement(
    engine: PlacementEngine,
    snap: ClusterSnapshot,
    hp: _HypoPod,
    node: str,
    unit: int,
    warnings: list[str],
) -> PodPlacement:
    """The chosen node's absolute score and GPUs, from the engine's explanation of it alone."""
    if hp.role.gpus_per_pod == 0:
        # Never sent to the extender (managedResources: nvidia.com/gpu): no opinion.
        return PodPlacement(
            unit, hp.role.name, hp.name, node, (), None, NEUTRAL_SCORE, None, hp.instance
        )
    expl = engine.explain(snap, hp.obj, [node])
    _add(warnings, expl.warnings)
    v = expl.nodes[0]
    score = v.score if v.score is not None else NEUTRAL_SCORE
    return PodPlacement(
        unit, hp.role.name, hp.name, node, tuple(v.gpus), v.locality, score, v.total, hp.instance
    )


# -- cluster summary ------------------------------------------------------------------------


@dataclass(frozen=True)
class IslandFit:
    """How many nodes could host one ``gpus``-GPU pod now."""

    gpus: int
    #: k free GPUs in one NVLink island (a node without islands: k = 1 only).
    nvlink_island: int
    #: k free GPUs in one NVLink island or NUMA node; nodes without topology not counted.
    numa_or_better: int
    #: k free GPUs anywhere on the node.
    any: int


@dataclass(frozen=True)
class DomainSummary:
    domain: str
    value: str
    nodes: int
    gpus_allocatable: int
    gpus_free: int
    largest_free_island: int


@dataclass(frozen=True)
class LevelSummary:
    label: str
    kind: str
    domains: tuple[DomainSummary, ...]


@dataclass(frozen=True)
class Summary:
    nodes: int
    nodes_with_topology: int
    gpus_allocatable: int
    gpus_free: int
    #: Largest free NVLink island (GPUs) -> nodes.
    largest_free_island_nodes: dict[int, int]
    fits: tuple[IslandFit, ...]
    levels: tuple[LevelSummary, ...]
    pods: int
    age_seconds: float | None = None


def cluster_summary(
    snap: ClusterSnapshot, *, age_seconds: float | None = None, sizes: Sequence[int] = FIT_SIZES
) -> Summary:
    """Free GPUs of ``snap``: totals, island histogram, hosting nodes per size, per domain."""
    island: dict[str, int] = {}
    hist: Counter[int] = Counter()
    for name, st in snap.nodes.items():
        island[name] = st.index.largest_free_island(st.free_mask)
        hist[island[name]] += 1
    fits = []
    for k in sizes:
        nv = numa = anywhere = 0
        for name, st in snap.nodes.items():
            if st.free_count < k:
                continue
            anywhere += 1
            nv += island[name] >= k
            if st.has_topology and st.index.best_fit(st.free_mask, k).locality >= Locality.NUMA:
                numa += 1
        fits.append(IslandFit(k, nv, numa, anywhere))
    levels = []
    cluster = snap.cluster
    for level in cluster.levels:
        if level.kind is LevelKind.HOST:
            continue
        acc: dict[str, list[int]] = {}
        for name, st in snap.nodes.items():
            dom = cluster.domain(name, level)
            if dom is None:
                continue
            a = acc.setdefault(dom, [0, 0, 0, 0])
            a[0] += 1
            a[1] += st.gpu_allocatable
            a[2] += st.free_count
            a[3] = max(a[3], island[name])
        domains = tuple(
            DomainSummary(dom, dom.rsplit("/", 1)[-1], *vals) for dom, vals in sorted(acc.items())
        )
        if domains:
            levels.append(LevelSummary(level.label, level.kind.value, domains))
    return Summary(
        nodes=len(snap.nodes),
        nodes_with_topology=sum(1 for st in snap.nodes.values() if st.has_topology),
        gpus_allocatable=sum(st.gpu_allocatable for st in snap.nodes.values()),
        gpus_free=sum(st.free_count for st in snap.nodes.values()),
        largest_free_island_nodes=dict(sorted(hist.items())),
        fits=tuple(fits),
        levels=tuple(levels),
        pods=len(snap.placements),
        age_seconds=age_seconds,
    )
