"""The simulation runner: drives time, scaling and placement around the serving model.

One *run* is one (placement policy, scaling policy) pair on one scenario. Every tick
(``tick_s`` simulated seconds) it:

1. at a scaling tick, asks the scaling policy under test for each service's replicas:

   - ``coordinated``: :func:`topo_sched.scaling.policy.decide` (the autoscaler's own policy)
     with the service's :class:`~topo_sched.scaling.config.Target` on
     :meth:`ServiceSim.signals` (the simulated Prometheus);
   - ``placement-aware``: the coordinated decision, then, for a scale-up, the live
     autoscaler's placement gate (:mod:`topo_sched.scaling.gate`, the rules
     :mod:`topo_sched.autoscaler.placement_gate` applies): the new whole ratio units are put
     to :func:`topo_sched.placement.whatif.what_if` on the run's current snapshot, with the
     extender's engine in a kube-scheduler model that breaks ties by node name (as the
     extender's gRPC ``WhatIf`` does), and only the units that fit are requested; the rest are
     pending capacity until the next decision. Scale-downs and holds as coordinated. The pods
     it orders are scheduled before the next service's decision, so two services of one tick
     never count the same free GPUs;
   - ``independent``: one HPA per role (:class:`HpaRole`), each on its own signal: prefill on
     prompt tokens/s against ``capacity.prefill_tokens_per_second`` per replica, decode on
     running + waiting sequences against ``capacity.decode_sequences`` per replica;
     ``desired = ceil(current * observed / target)`` with HPA's 10% tolerance, its default
     scale-up limit (double or +4 pods per 15 s) and scale-down window; no ratio;
   - ``static-peak``: the units the trace's busiest scaling interval needs, from t=0, never
     changed;
   - ``oracle``: the units the next ``startup_s + scale_interval_s`` seconds of the trace need
     (the pods it orders now serve from ``startup_s`` on), exactly, without stabilisation.

   The last two read demand from the trace (:class:`Demand`), converted to replicas with the
   same capacity figures the coordinated target uses.
2. creates or deletes pods to match (a StatefulSet-like ordinal per role; deleting takes
   unscheduled pods first, then the highest ordinal), and schedules every pending pod with the
   placement policy under test:

   - ``topology-aware``: :class:`~topo_sched.sim.scheduler.SchedulerModel` with the
     :class:`~topo_sched.placement.engine.PlacementEngine` (the extender) at the scenario's
     ``extender_weight``;
   - ``default``: the same SchedulerModel without the extender;
   - ``random``: :class:`~topo_sched.sim.scheduler.RandomScheduler`;
   - ``optimal``: :class:`OptimalPlacer`, an ILP over the pods pending at that moment (small
     clusters only; see its docstring for the objective and why it is a bound only per batch).

   A pod that does not fit stays pending and is retried every tick. A bound pod serves
   ``startup_s`` later; a deleted pod leaves the serving model at once (it drains: finishes
   what it holds) and its GPUs are free at once.
3. advances every service's :class:`~topo_sched.sim.serving.ServiceSim` to the tick's end with
   the requests that arrive in it.

Placement reaches the serving model through two numbers per pod and one per pod pair: the TP
group's worst link (:func:`topo_sched.topology.locality.worst_link` over the GPUs the snapshot
gave the pod), and the KV path (:meth:`Run.kv_path`): on one node the intra-node link between
the two GPU sets, otherwise ``between_nodes_cost(finest shared level)`` with one NIC per GPU,
from the ONE cost table (:mod:`topo_sched.topology.costs`).

Deterministic: every RNG is seeded from the scenario seed and the policy name; no wall clock.
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from topo_sched import labels as L
from topo_sched.placement.config import PlacementConfig
from topo_sched.placement.engine import PlacementEngine
from topo_sched.placement.snapshot import ClusterSnapshot
from topo_sched.placement.whatif import RoleRequest, WhatIfRequest, what_if
from topo_sched.scaling.config import Target
from topo_sched.scaling.gate import apply_gate, gate_outcome, scale_up_ask
from topo_sched.scaling.policy import ScalingState, decide
from topo_sched.scaling.signals import Decision, RoleReplicas, TargetSignals
from topo_sched.sim.cluster_builder import make_rbg_pod
from topo_sched.sim.models import ModelSpec, get_model
from topo_sched.sim.profile import EngineProfile, load_profile
from topo_sched.sim.scenario import Scenario, ServiceSpec, build_cluster
from topo_sched.sim.scheduler import RandomScheduler, SchedulerModel
from topo_sched.sim.serving import (
    DECODE,
    PREFILL,
    DecodeInstance,
    PrefillInstance,
    RequestRecord,
    ServiceSim,
)
from topo_sched.sim.traces import Request, Trace, load_trace
from topo_sched.topology.cluster import NOTHING_SHARED, LevelKind
from topo_sched.topology.costs import LinkCost, between_nodes_cost, intra_node_cost
from topo_sched.topology.locality import Locality, mask_of, worst_link
from topo_sched.topology.model import LinkClass, NodeTopology

NAMESPACE = "sim"
ROLES = (PREFILL, DECODE)
#: Share of a replica's throughput the derived capacity figures use (a queue kept 80% busy).
CAPACITY_HEADROOM = 0.8
#: HPA's default tolerance: no change while observed/target is within 10%.
HPA_TOLERANCE = 0.1
#: Ticks the serving model may run past the traffic to finish requests in flight.
MAX_DRAIN_TICKS = 120
#: Seconds -> milliseconds in the ILP objective.
MS = 1000.0
#: Levels reported for PD pairs, finest first.
PAIR_LEVELS = ("host", "clique", "rack", "block", "spine", "zone", "region")


def _stable_seed(*parts: object) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


# -- workload ----------------------------------------------------------------------------------


@dataclass
class Workload:
    """The requests each service gets, after window, compression, rate and split."""

    trace: Trace
    per_service: dict[str, list[Request]]
    horizon_s: float
    notes: list[str] = field(default_factory=list)


def shape_trace(trace: Trace, sc: Scenario, quick: bool = False) -> Trace:
    tr = trace
    if sc.traffic.window is not None:
        tr = tr.window(sc.traffic.window.start_s, sc.traffic.window.duration_s)
    if quick:
        # The first ten minutes of (compressed) traffic.
        tr = tr.window(0.0, 600.0 * sc.traffic.compress)
    if sc.traffic.compress != 1.0:
        tr = tr.compress(sc.traffic.compress)
    rate = sc.traffic.rate
    if rate != 1.0 and tr.requests:
        rng = random.Random(_stable_seed(sc.seed, "rate"))
        reqs = tr.requests
        out: list[Request] = []
        whole, frac = int(rate), rate - int(rate)
        for i, r in enumerate(reqs):
            copies = whole + (1 if rng.random() < frac else 0)
            nxt = reqs[i + 1].arrival_s if i + 1 < len(reqs) else r.arrival_s
            for c in range(copies):
                a = r.arrival_s if c == 0 else rng.uniform(r.arrival_s, nxt)
                out.append(replace(r, arrival_s=a))
        out.sort(key=lambda r: (r.arrival_s, r.id))
        tr = replace(tr, requests=[replace(r, id=i) for i, r in enumerate(out)])
    return tr


def split_workload(trace: Trace, sc: Scenario) -> Workload:
    rng = random.Random(_stable_seed(sc.seed, "split"))
    names = [s.name for s in sc.services]
    weights = [s.trace_share for s in sc.services]
    per: dict[str, list[Request]] = {n: [] for n in names}
    for r in trace.requests:
        name = names[0] if len(names) == 1 else rng.choices(names, weights)[0]
        per[name].append(r)
    last = trace.requests[-1].arrival_s if trace.requests else 0.0
    horizon = max(sc.tick_s, math.ceil((last + 1e-9) / sc.tick_s) * sc.tick_s)
    return Workload(trace, per, horizon)


# -- per-service constants -----------------------------------------------------------------------


@dataclass
class ServiceInfo:
    spec: ServiceSpec
    model: ModelSpec
    target: Target
    cap_prefill_tps: float
    cap_decode_seqs: float
    #: Decode step time at a batch of ``cap_decode_seqs`` (the ITL a replica at capacity gives).
    itl_at_capacity: float
    mean_prompt: float
    mean_output: float
    max_batch: int | None
    capacity_source: dict[str, str] = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, int]:
        return {PREFILL: self.spec.ratio.prefill, DECODE: self.spec.ratio.decode}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def service_info(
    spec: ServiceSpec, profile: EngineProfile, requests: Sequence[Request], sc: Scenario
) -> ServiceInfo:
    model = get_model(spec.model)
    for role, tp in ((PREFILL, spec.prefill_tp), (DECODE, spec.decode_tp)):
        if profile.kv_capacity_tokens(model, tp) <= 0:
            raise ValueError(
                f"services ({spec.name}): {role}_tp: {spec.model} does not fit on {tp} "
                f"GPU(s) of {profile.gpu}"
            )
    sample = list(requests) or [Request(0, 0.0, 1024, 128)]
    mean_prompt = _mean([r.prompt_tokens for r in sample])
    mean_output = _mean([r.output_tokens for r in sample])
    src: dict[str, str] = {}
    asc = spec.autoscaler
    tp_p, tp_d = spec.prefill_tp, spec.decode_tp
    nv = LinkClass.NVLINK
    cap_p = asc.capacity.prefill_tokens_per_second
    if cap_p is None:
        secs = sum(profile.prefill_seconds(model, r.prompt_tokens, tp_p, nv) for r in sample)
        tput = sum(r.prompt_tokens for r in sample) / secs
        cap_p = CAPACITY_HEADROOM * tput
        src["prefill_tokens_per_second"] = (
            f"profile: {CAPACITY_HEADROOM:g} x {tput:.0f} tok/s, one TP{tp_p} replica on NVLink "
            "over this service's prompts"
        )
    else:
        src["prefill_tokens_per_second"] = "scenario"
    ctx = mean_prompt + mean_output / 2
    max_batch = spec.max_batch
    cap_d = asc.capacity.decode_sequences
    if cap_d is None:
        kv_limit = profile.max_sequences(model, tp_d, mean_prompt + mean_output)
        limit = max(1, min(kv_limit, max_batch or kv_limit))
        itl_goal = CAPACITY_HEADROOM * asc.slo.itl_s
        lo, hi = 1, limit
        if profile.decode_step_seconds(model, 1, ctx, tp_d, nv) > itl_goal:
            b = 1
        else:
            while lo < hi:  # largest batch whose step meets the goal
                mid = (lo + hi + 1) // 2
                if profile.decode_step_seconds(model, mid, ctx, tp_d, nv) <= itl_goal:
                    lo = mid
                else:
                    hi = mid - 1
            b = lo
        cap_d = float(b)
        src["decode_sequences"] = (
            f"profile: largest TP{tp_d} batch on NVLink with a step <= {CAPACITY_HEADROOM:g} x "
            f"ITL SLO, at most {limit} (KV memory / max_batch)"
        )
    else:
        src["decode_sequences"] = "scenario"
    itl_cap = profile.decode_step_seconds(model, max(1, int(cap_d)), ctx, tp_d, nv)
    target = Target.model_validate(
        {
            "rbg": f"{NAMESPACE}/{spec.name}",
            "roles": {PREFILL: spec.ratio.prefill, DECODE: spec.ratio.decode},
            "mode": asc.mode,
            "band": asc.band.model_dump() if asc.band else None,
            "units": {"min": asc.units.min, "max": asc.units.max},
            "slo": {
                "percentile": asc.slo.percentile,
                "ttftSeconds": asc.slo.ttft_s,
                "itlSeconds": asc.slo.itl_s,
            },
            "capacity": {"prefillTokensPerSecond": cap_p, "decodeSequences": cap_d},
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [
                        {"type": "Percent", "value": 100, "periodSeconds": 15},
                        {"type": "Units", "value": 4, "periodSeconds": 15},
                    ],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": asc.scale_down_window_s,
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
                },
            },
        }
    )
    return ServiceInfo(
        spec, model, target, cap_p, cap_d, itl_cap, mean_prompt, mean_output, max_batch, src
    )


# -- demand (what static-peak and oracle know) -------------------------------------------------


@dataclass
class Demand:
    """Per scaling interval: replicas each role needs, from the trace and the capacities."""

    interval_s: float
    prefill: list[float]
    decode: list[float]
    units: list[int]

    @classmethod
    def of(cls, info: ServiceInfo, requests: Sequence[Request], interval: float, horizon: float):
        n = max(1, math.ceil(horizon / interval - 1e-9))
        prompt = [0.0] * n
        seqs = [0.0] * n
        for r in requests:
            i = min(n - 1, int(r.arrival_s // interval))
            prompt[i] += r.prompt_tokens
            # Little's law: sequences in decode = arrivals x time each spends decoding.
            seqs[i] += r.output_tokens * info.itl_at_capacity
        p = [x / interval / info.cap_prefill_tps for x in prompt]
        d = [x / interval / info.cap_decode_seqs for x in seqs]
        w = info.weights
        u = info.spec.autoscaler.units
        units = [
            min(u.max, max(u.min, math.ceil(max(a / w[PREFILL], b / w[DECODE]) - 1e-9)))
            for a, b in zip(p, d, strict=True)
        ]
        return cls(interval, p, d, units)

    def at(self, t: float) -> int:
        i = min(len(self.units) - 1, max(0, int(t // self.interval_s)))
        return i

    def units_over(self, t0: float, t1: float) -> int:
        i0, i1 = self.at(t0), self.at(max(t0, t1 - 1e-9))
        return max(self.units[i0 : i1 + 1])

    @property
    def peak_units(self) -> int:
        return max(self.units)


# -- pods ----------------------------------------------------------------------------------------


@dataclass
class PodRec:
    service: str
    role: str
    index: int
    tp: int
    obj: dict[str, Any]
    inst_id: str
    created_at: float
    seq: int
    node: str | None = None
    gpus: tuple[int, ...] = ()
    bound_at: float | None = None
    ready_at: float | None = None
    deleted_at: float | None = None
    link: LinkClass | None = None

    @property
    def key(self) -> str:
        return f"{NAMESPACE}/{self.obj['metadata']['name']}"

    @property
    def bound(self) -> bool:
        return self.node is not None


def unbind(snap: ClusterSnapshot, key: str) -> ClusterSnapshot:
    """The snapshot without this pod (its GPUs free); its node stays in the history."""
    pl = snap.placements.get(key)
    if pl is None:
        return snap
    nodes = dict(snap.nodes)
    st = nodes.get(pl.node)
    if st is not None:
        nodes[pl.node] = replace(st, free_mask=st.free_mask | mask_of(pl.gpus))
    placements = {k: v for k, v in snap.placements.items() if k != key}
    return ClusterSnapshot(nodes, placements, snap.cluster, snap.config, snap.history)


# -- placement policies --------------------------------------------------------------------------


class Placer:
    """Places a batch of pending pods; returns the next snapshot and a node (or None) each."""

    name = "placer"
    note: str | None = None

    def place(
        self, snap: ClusterSnapshot, pods: list[PodRec], run: Run
    ) -> tuple[ClusterSnapshot, list[str | None]]:
        raise NotImplementedError


class SequentialPlacer(Placer):
    """One kube-scheduler cycle per pod, in queue order (what the real scheduler does)."""

    def __init__(self, name: str, scheduler: SchedulerModel | RandomScheduler):
        self.name = name
        self.scheduler = scheduler

    def place(self, snap, pods, run):
        out: list[str | None] = []
        for p in pods:
            res = self.scheduler.schedule(snap, p.obj)
            if res.node is not None:
                snap = self.scheduler.bind(snap, p.obj, res.node)
            out.append(res.node)
        return snap, out


class OptimalPlacer(Placer):
    """An ILP (pulp + CBC) over the pods pending at one moment: a bound, small clusters only.

    Variables: ``x[p, n] = 1`` when pending pod p goes to node n. Constraints: each pod on at
    most one node; per node, the GPUs of its new pods fit its free GPUs. Objective (minimised):
    the expected extra seconds per request that placement causes, in the serving model's own
    terms, summed over the services with pods in the batch, each weighted by its share of the
    requests:

    - TP span: for a pod on node n, prefill time (prefill pods) or decode time per request
      (decode pods: step time x mean output tokens) with the node's best-fit GPUs' worst link,
      minus the same on NVLink; averaged over the role's pods;
    - KV path: for each prefill/decode pair of the service, the transfer time of the mean
      prompt's KV over the path between their nodes (the same :meth:`Run.kv_path` the serving
      model uses), averaged over all pairs. Pairs with a running pod are linear in x; pairs of
      two pending pods are linearised per cluster level with ``z[pair, domain]`` (both pods in
      the domain), exact by ``z <= x_a(dom)``, ``z <= x_b(dom)``, ``z >= x_a + x_b - 1``;
    - a pod left unplaced costs 1000 s (so everything that fits is placed).

    It is optimal per batch, given the pods already running, not over the whole run (later
    arrivals and deletions are unknown to it), and it models each node's intra-node locality
    with the GPUs free at the start of the batch. The chosen nodes are then bound like any
    other (best-fit GPUs) and measured like any other policy. Larger clusters than
    ``max_nodes`` are refused (see :meth:`too_big`).
    """

    UNPLACED_S = 100.0

    def __init__(self, name: str = "optimal", max_nodes: int = 20000):
        self.name = name
        self.max_nodes = max_nodes
        self.solves = 0
        self.not_optimal = 0

    def place(self, snap, pods, run):
        import pulp

        classes = self._classes(snap, len(pods))
        nodes = sorted(n for members in classes for n in members)
        if not nodes:
            return snap, [None] * len(pods)
        prob = pulp.LpProblem("placement", pulp.LpMinimize)
        x: dict[tuple[int, str], Any] = {}
        num = {n: k for k, n in enumerate(nodes)}
        for i, p in enumerate(pods):
            for n in nodes:
                if snap.nodes[n].free_count >= p.tp:
                    x[i, n] = _var(prob, f"x_{i}_{num[n]}", cat="Binary")
        placed = {i: pulp.lpSum(v for (j, _), v in x.items() if j == i) for i in range(len(pods))}
        for i in range(len(pods)):
            prob += placed[i] <= 1
        load = {n: pulp.lpSum(pods[i].tp * v for (i, m), v in x.items() if m == n) for n in nodes}
        for n in nodes:
            prob += load[n] <= snap.nodes[n].free_count
        # Interchangeable nodes (same place in the tree, same layout, same free GPUs): fill
        # them in name order, so the solver does not branch over their permutations.
        for members in classes:
            for a, b in itertools.pairwise(members):
                prob += load[a] >= load[b]
        terms: list[Any] = []
        for i in range(len(pods)):
            terms.append(-self.UNPLACED_S * placed[i])
        by_service: dict[str, list[int]] = {}
        for i, p in enumerate(pods):
            by_service.setdefault(p.service, []).append(i)
        levels = [lv for lv in snap.cluster.levels if lv.kind is not LevelKind.HOST]
        zc = 0
        for svc, idx in by_service.items():
            info = run.info[svc]
            share = run.share[svc]
            active = [q for q in run.active(svc) if q.bound]
            counts = {r: sum(1 for q in active if q.role == r) for r in ROLES}
            for i in idx:
                counts[pods[i].role] += 1
            kv_bytes = info.mean_prompt * info.model.kv_bytes_per_token
            # TP span penalties.
            for i in idx:
                p = pods[i]
                for n in nodes:
                    if (i, n) not in x:
                        continue
                    pen = run.tp_penalty(info, p.role, p.tp, self._link_on(snap, n, p.tp))
                    if pen:
                        terms.append(share * pen / counts[p.role] * x[i, n])
            pairs = counts[PREFILL] * counts[DECODE]
            if not pairs:
                continue
            w_pair = share / pairs
            new_p = [i for i in idx if pods[i].role == PREFILL]
            new_d = [i for i in idx if pods[i].role == DECODE]
            old_p = [q for q in active if q.role == PREFILL]
            old_d = [q for q in active if q.role == DECODE]
            # Pending with running: linear.
            for news, olds in ((new_p, old_d), (new_d, old_p)):
                for i in news:
                    for q in olds:
                        for n in nodes:
                            if (i, n) in x:
                                c = self._kv(run, snap, pods[i], n, q, q.node, kv_bytes)
                                terms.append(w_pair * c * x[i, n])
            # Pending with pending: telescoped over the levels, exact via z.
            for a in new_p:
                for b in new_d:
                    # The cost of sharing nothing is a constant: only the savings are terms.
                    prev = self._kv_level(run, pods[a], pods[b], NOTHING_SHARED.kind, kv_bytes)
                    for lv in levels:
                        c = self._kv_level(run, pods[a], pods[b], lv.kind, kv_bytes)
                        doms: dict[str, list[str]] = {}
                        for n in nodes:
                            d = snap.cluster.domain(n, lv)
                            if d is not None:
                                doms.setdefault(d, []).append(n)
                        if abs(c - prev) > 1e-12:
                            for d in sorted(doms):
                                zc += 1
                                z = self._z(prob, zc, x, a, b, doms[d], c > prev)
                                if z is not None:
                                    terms.append(w_pair * (c - prev) * z)
                        prev = c
            # Pending with pending on one node: one binary per (prefill count, decode count)
            # that fits the node, so the number of same-node pairs is exact (and the LP tight).
            if new_p and new_d:
                a0, b0 = pods[new_p[0]], pods[new_d[0]]
                finest = levels[-1].kind if levels else NOTHING_SHARED.kind
                c_fine = self._kv_level(run, a0, b0, finest, kv_bytes)
                for n in nodes:
                    f = snap.nodes[n].free_count
                    if a0.tp + b0.tp > f:
                        continue
                    delta = self._kv_host(run, snap, a0, b0, n, kv_bytes) - c_fine
                    if abs(delta) <= 1e-12:
                        continue
                    vs: dict[tuple[int, int], Any] = {}
                    for pc in range(min(len(new_p), f // a0.tp) + 1):
                        for dc in range(min(len(new_d), (f - pc * a0.tp) // b0.tp) + 1):
                            zc += 1
                            vs[pc, dc] = _var(prob, f"v_{zc}", cat="Binary")
                    prob += pulp.lpSum(vs.values()) == 1
                    xp = [x[a, n] for a in new_p if (a, n) in x]
                    xd = [x[b, n] for b in new_d if (b, n) in x]
                    prob += pulp.lpSum(pc * v for (pc, _), v in vs.items()) == pulp.lpSum(xp)
                    prob += pulp.lpSum(dc * v for (_, dc), v in vs.items()) == pulp.lpSum(xd)
                    same = pulp.lpSum(pc * dc * v for (pc, dc), v in vs.items() if pc * dc)
                    terms.append(w_pair * delta * same)
        # In milliseconds, without the constant: the solver's tolerances are absolute.
        prob += pulp.lpSum(MS * t for t in terms)
        # A node limit, not a time limit: the answer must not depend on the machine's speed.
        with warnings.catch_warnings():
            # PuLP 3.x warns that the bundled CBC will leave in 4.0; it is what we depend on.
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(
                msg=False, threads=1, maxNodes=self.max_nodes, gapAbs=1e-3, gapRel=0
            )
            prob.solve(solver)
        self.solves += 1
        # sol_status 1 = proven optimal; 2 = a feasible solution when the node limit was hit.
        if getattr(prob, "sol_status", prob.status) != 1:
            self.not_optimal += 1
        out: list[str | None] = []
        for i, p in enumerate(pods):
            node = next(
                (n for n in nodes if (i, n) in x and (x[i, n].value() or 0) > 0.5),
                None,
            )
            if node is not None and snap.nodes[node].free_count >= p.tp:
                snap = snap.with_binding(p.obj, node)
                out.append(node)
            else:
                out.append(None)
        return snap, out

    @staticmethod
    def _classes(snap: ClusterSnapshot, k: int) -> list[list[str]]:
        """Nodes with free GPUs, grouped into classes of interchangeable ones; at most ``k``
        (the batch size) per class, as no batch needs more nodes of one class than pods."""
        groups: dict[tuple, list[str]] = {}
        for n in sorted(snap.nodes):
            st = snap.nodes[n]
            if st.free_count == 0:
                continue
            doms = snap.cluster.domains(n)
            free_per_group = tuple(
                tuple(sorted((g & st.free_mask).bit_count() for g in groups))
                for groups in st.index.groups.values()
            )
            key = (doms[:-1] if doms else (), id(st.index), st.free_count, free_per_group)
            groups.setdefault(key, []).append(n)
        return [members[:k] for members in groups.values()]

    @staticmethod
    def _z(prob, k: int, x, a: int, b: int, members: list[str], costlier: bool):
        """z = 1 iff pods a and b both sit in ``members``. Where sharing them lowers the cost
        the minimisation pushes z up, so only the upper bounds are needed; where it raises
        it (``costlier``), only the lower bound."""
        import pulp

        xa = [x[a, n] for n in members if (a, n) in x]
        xb = [x[b, n] for n in members if (b, n) in x]
        if not xa or not xb:
            return None
        z = _var(prob, f"z_{k}", 0, 1)
        if costlier:
            prob += z >= pulp.lpSum(xa) + pulp.lpSum(xb) - 1
        else:
            prob += z <= pulp.lpSum(xa)
            prob += z <= pulp.lpSum(xb)
        return z

    @staticmethod
    def _link_on(snap: ClusterSnapshot, node: str, tp: int) -> LinkClass | None:
        st = snap.nodes[node]
        if tp <= 1 or st.topology is None:
            return None
        fit = st.index.best_fit(st.free_mask, tp)
        return worst_link(st.topology, fit.gpus) if fit.gpus else None

    @staticmethod
    def _gpus_on(snap: ClusterSnapshot, node: str, tp: int) -> tuple[int, ...]:
        st = snap.nodes[node]
        return st.index.best_fit(st.free_mask, tp).gpus

    def _kv(self, run, snap, p: PodRec, n: str, q: PodRec, m: str | None, nbytes: float) -> float:
        assert m is not None
        gp = self._gpus_on(snap, n, p.tp)
        a, b = (p, q) if p.role == PREFILL else (q, p)
        ga, na = (gp, n) if a is p else (q.gpus, m)
        gb, nb = (gp, n) if b is p else (q.gpus, m)
        bw, lat = run.path(na, ga, a.tp, nb, gb, b.tp)
        return nbytes / bw + lat

    @staticmethod
    def _kv_level(run, a: PodRec, b: PodRec, kind: LevelKind, nbytes: float) -> float:
        bw, lat = run.level_path(kind, a.tp, b.tp, None, None)
        return nbytes / bw + lat

    def _kv_host(self, run, snap, a: PodRec, b: PodRec, n: str, nbytes: float) -> float:
        st = snap.nodes[n]
        if st.topology is None:
            ga, gb = (), ()
        else:
            fa = st.index.best_fit(st.free_mask, a.tp).gpus
            rest = st.free_mask & ~mask_of(fa)
            gb = st.index.best_fit(rest, b.tp).gpus
            ga = fa
        bw, lat = run.path(n, ga, a.tp, n, gb, b.tp)
        return nbytes / bw + lat


def _var(prob: Any, name: str, lo: float | None = None, hi: float | None = None, cat="Continuous"):
    """A variable of ``prob`` (PuLP >= 3 attaches it to the model; older PuLP has no such call)."""
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, lo, hi, cat=cat)
    import pulp

    return pulp.LpVariable(name, lo, hi, cat=cat)


def make_placer(name: str, sc: Scenario) -> Placer:
    seed = _stable_seed(sc.seed, "placement", name)
    if name == "topology-aware":
        engine = PlacementEngine(PlacementConfig())
        return SequentialPlacer(name, SchedulerModel(engine, sc.extender_weight, seed=seed))
    if name == "default":
        return SequentialPlacer(name, SchedulerModel(None, sc.extender_weight, seed=seed))
    if name == "random":
        return SequentialPlacer(name, RandomScheduler(seed))
    if name == "optimal":
        return OptimalPlacer(name)
    raise ValueError(f"unknown placement policy {name!r}")


# -- scaling policies ----------------------------------------------------------------------------


@dataclass
class HpaRole:
    """One HorizontalPodAutoscaler on one role (the ``independent`` policy)."""

    lo: int
    hi: int
    window_s: float
    recs: list[tuple[float, int]] = field(default_factory=list)

    def desired(self, now: float, current: int, observed: float, per_pod_target: float) -> int:
        if current <= 0:
            raw = math.ceil(observed / per_pod_target - 1e-9)
        else:
            ratio = observed / (current * per_pod_target)
            raw = current if abs(ratio - 1) <= HPA_TOLERANCE else math.ceil(current * ratio - 1e-9)
        raw = min(self.hi, max(self.lo, raw))
        if not self.recs:  # as if it had been running: the current size was recommended
            self.recs.append((now - 1e-6, current))
        self.recs = [(t, r) for t, r in self.recs if now - t <= self.window_s]
        self.recs.append((now, raw))
        if raw < current:  # scale-down: the highest recommendation of the window
            return max(r for _, r in self.recs)
        # scale-up: HPA's default limit, double or +4 pods per 15 s, whichever is more.
        return min(raw, max(2 * current, current + 4))


# -- one run -------------------------------------------------------------------------------------


@dataclass
class RunResult:
    placement: str
    scaling: str
    metrics: dict[str, Any]
    series: dict[str, Any]
    ttft: list[float]
    itl: list[float]
    notes: list[str]


class Run:
    def __init__(
        self,
        sc: Scenario,
        placement: str,
        scaling: str,
        nodes: list[dict[str, Any]],
        background: list[dict[str, Any]],
        work: Workload,
        infos: dict[str, ServiceInfo],
        profile: EngineProfile,
        demand: dict[str, Demand],
    ):
        self.sc = sc
        self.placement = placement
        self.scaling = scaling
        self.work = work
        self.info = infos
        self.profile = profile
        self.demand = demand
        total = sum(s.trace_share for s in sc.services)
        self.share = {s.name: s.trace_share / total for s in sc.services}
        self.snap = ClusterSnapshot.from_objects(nodes, background)
        self.topo: dict[str, NodeTopology | None] = {
            n: st.topology for n, st in self.snap.nodes.items()
        }
        self.placer = make_placer(placement, sc)
        self.pods: list[PodRec] = []
        self.by_inst: dict[str, PodRec] = {}
        self._seq = 0
        self._path_cache: dict[tuple, tuple[float, float]] = {}
        self._level_cache: dict[tuple[str, str], str] = {}
        self.sims: dict[str, ServiceSim] = {}
        for s in sc.services:
            inf = infos[s.name]
            self.sims[s.name] = ServiceSim(
                s.name, inf.model, profile, self.kv_path, max_batch=inf.max_batch
            )
        self.spec_replicas: dict[str, dict[str, int]] = {}
        self.states: dict[str, ScalingState] = {s.name: ScalingState() for s in sc.services}
        self.hpa: dict[str, dict[str, HpaRole]] = {}
        for s in sc.services:
            u, w = s.autoscaler.units, infos[s.name].weights
            self.hpa[s.name] = {
                r: HpaRole(u.min * w[r], u.max * w[r], s.autoscaler.scale_down_window_s)
                for r in ROLES
            }
        self.dirty: set[str] = set()
        self.scaling_actions = 0
        self.ratio_violations = 0
        self.decision_codes: Counter[str] = Counter()
        self.half_placed_unit_ticks = 0
        self.half_placed_units_max = 0
        self.pending_pod_ticks = 0
        self.pending_unit_ticks = 0
        self.pending_units_max = 0
        #: Per service: units the placement gate left out at its last decision.
        self.gate_pending: dict[str, int] = {s.name: 0 for s in sc.services}
        self.gate_stats: Counter[str] = Counter()
        self.gate_reasons: Counter[str] = Counter()
        self.whatif_engine: PlacementEngine | None = None
        self.whatif_scheduler: SchedulerModel | None = None
        if scaling == "placement-aware":
            # As the extender's gRPC WhatIf: its own engine, ties broken by node name.
            self.whatif_engine = PlacementEngine(PlacementConfig())
            self.whatif_scheduler = SchedulerModel(
                self.whatif_engine, sc.extender_weight, tie_break="name"
            )
        self.pair_levels: Counter[str] = Counter()
        self.series: dict[str, Any] = {"t": [], "services": {}, "cluster": {}}
        for s in sc.services:
            self.series["services"][s.name] = {
                f"{k}_{r}": [] for k in ("spec", "ready", "demand") for r in ROLES
            } | {"gpus": [], "pending_units": []}
        for k in ("gpus_services", "gpus_busy", "mean_largest_free_island", "free_8gpu_islands"):
            self.series["cluster"][k] = []
        self.notes: list[str] = []
        if isinstance(self.placer, OptimalPlacer) and len(self.snap.nodes) > sc.optimal_max_nodes:
            raise TooBig(
                f"optimal: skipped, the cluster has {len(self.snap.nodes)} nodes > "
                f"optimal_max_nodes {sc.optimal_max_nodes} (the ILP is a bound for small "
                "clusters only)"
            )

    # -- link costs ----------------------------------------------------------------------------

    def shared_kind(self, a: str, b: str) -> str:
        if a == b:
            return "host"
        key = (a, b) if a < b else (b, a)
        k = self._level_cache.get(key)
        if k is None:
            lv = self.snap.cluster.shared_level(a, b)
            k = self._level_cache[key] = lv.kind.value
        return k

    def _nics(self, node: str) -> int | None:
        t = self.topo.get(node)
        return len(t.nics) if t is not None and t.nics else None

    def level_path(
        self, kind: LevelKind, tp_a: int, tp_b: int, node_a: str | None, node_b: str | None
    ) -> tuple[float, float]:
        """Between two nodes sharing ``kind``: one NIC per GPU (as many as both nodes have)."""
        cost = between_nodes_cost(kind)
        links = min(tp_a, tp_b)
        for n in (node_a, node_b):
            nics = self._nics(n) if n is not None else None
            if nics:
                links = min(links, nics)
        return cost.bandwidth_gbps * 1e9 * max(1, links), cost.latency_us * 1e-6

    def _intra(self, node: str, ga: Sequence[int], gb: Sequence[int], tp_a: int, tp_b: int):
        """Same node: the slowest link between the two GPU sets; NVLink scales per GPU pair."""
        topo = self.topo.get(node)
        cost: LinkCost
        if topo is None or not ga or not gb:
            cost = between_nodes_cost(LevelKind.HOST)
            return cost.bandwidth_gbps * 1e9, cost.latency_us * 1e-6
        order = list(LinkClass)
        worst: tuple[LinkClass, int | None] | None = None
        for a in ga:
            for b in gb:
                if a == b:
                    continue
                gl = topo.gpu_link(a, b)
                cls, nv = (gl.link, gl.nvlinks) if gl else (LinkClass.SYS, None)
                slower = worst is None or order.index(cls) > order.index(worst[0])
                fewer_nvlinks = (
                    worst is not None
                    and cls is worst[0] is LinkClass.NVLINK
                    and (nv or 1) < (worst[1] or 1)
                )
                if slower or fewer_nvlinks:
                    worst = (cls, nv)
        if worst is None:
            cost = between_nodes_cost(LevelKind.HOST)
            return cost.bandwidth_gbps * 1e9, cost.latency_us * 1e-6
        cost = intra_node_cost(worst[0], worst[1])
        links = min(tp_a, tp_b) if worst[0] in (LinkClass.NVLINK, LinkClass.XGMI) else 1
        return cost.bandwidth_gbps * 1e9 * links, cost.latency_us * 1e-6

    def path(
        self, na: str, ga: Sequence[int], tp_a: int, nb: str, gb: Sequence[int], tp_b: int
    ) -> tuple[float, float]:
        if na == nb:
            return self._intra(na, ga, gb, tp_a, tp_b)
        kind = LevelKind(self.shared_kind(na, nb))
        return self.level_path(kind, tp_a, tp_b, na, nb)

    def kv_path(self, p: PrefillInstance, d: DecodeInstance) -> tuple[float, float]:
        a, b = self.by_inst[p.id], self.by_inst[d.id]
        key = (p.id, d.id)
        hit = self._path_cache.get(key)
        if hit is None:
            assert a.node is not None and b.node is not None
            hit = self._path_cache[key] = self.path(a.node, a.gpus, a.tp, b.node, b.gpus, b.tp)
        return hit

    def tp_penalty(self, info: ServiceInfo, role: str, tp: int, link: LinkClass | None) -> float:
        """Extra seconds per request a TP group on ``link`` costs against NVLink."""
        if tp <= 1:
            return 0.0
        nv = LinkClass.NVLINK
        if role == PREFILL:
            m, x = info.model, info.mean_prompt
            pr = self.profile
            return pr.prefill_seconds(m, x, tp, link) - pr.prefill_seconds(m, x, tp, nv)
        b = max(1, int(info.cap_decode_seqs))
        ctx = info.mean_prompt + info.mean_output / 2
        step = self.profile.decode_step_seconds
        extra = step(info.model, b, ctx, tp, link) - step(info.model, b, ctx, tp, nv)
        return extra * info.mean_output

    # -- pods ------------------------------------------------------------------------------------

    def active(self, service: str, role: str | None = None) -> list[PodRec]:
        return [
            p
            for p in self.pods
            if p.service == service and p.deleted_at is None and (role is None or p.role == role)
        ]

    def _create(self, service: str, role: str, now: float) -> PodRec:
        info = self.info[service]
        used = {p.index for p in self.active(service, role)}
        idx = next(i for i in range(len(used) + 1) if i not in used)
        tp = info.spec.prefill_tp if role == PREFILL else info.spec.decode_tp
        self._seq += 1
        ann = {L.ANNOTATION_KV_BYTES_PER_TOKEN: str(info.model.kv_bytes_per_token)}
        obj = make_rbg_pod(
            NAMESPACE, service, role, idx, tp, annotations=ann, uid=f"sim-{self._seq}"
        )
        rec = PodRec(
            service, role, idx, tp, obj, f"{service}-{role}-{idx}#{self._seq}", now, self._seq
        )
        self.pods.append(rec)
        self.by_inst[rec.inst_id] = rec
        self.dirty.add(service)
        return rec

    def _delete(self, p: PodRec, now: float) -> None:
        p.deleted_at = now
        if p.bound:
            self.snap = unbind(self.snap, p.key)
        self.dirty.add(p.service)

    def set_replicas(self, service: str, desired: dict[str, int], now: float) -> None:
        cur = self.spec_replicas.get(service, {r: 0 for r in ROLES})
        for role in ROLES:
            want = desired[role]
            pods = self.active(service, role)
            if want > len(pods):
                for _ in range(want - len(pods)):
                    self._create(service, role, now)
            elif want < len(pods):
                # Unscheduled pods first, then the highest ordinal (as a StatefulSet).
                order = [p for p in pods if not p.bound] + sorted(
                    (p for p in pods if p.bound), key=lambda p: p.index, reverse=True
                )
                for p in order[: len(pods) - want]:
                    self._delete(p, now)
        self.spec_replicas[service] = dict(desired)
        if cur != desired and any(cur.values()):  # the initial sizing is not an action
            self.scaling_actions += 1

    def place_pending(self, now: float) -> None:
        pending = sorted(
            (p for p in self.pods if p.deleted_at is None and not p.bound), key=lambda p: p.seq
        )
        if not pending:
            return
        self.snap, nodes = self.placer.place(self.snap, pending, self)
        for p, node in zip(pending, nodes, strict=True):
            if node is None:
                continue
            pl = self.snap.placements[p.key]
            p.node, p.gpus = node, pl.gpus
            p.bound_at = now
            p.ready_at = 0.0 if now == 0.0 and p.created_at == 0.0 else now + self.sc.startup_s
            topo = self.topo.get(node)
            p.link = worst_link(topo, p.gpus) if topo is not None and p.tp > 1 else None
            self.dirty.add(p.service)

    def push_instances(self, now: float) -> None:
        for svc in sorted(self.dirty):
            pre: list[PrefillInstance] = []
            dec: list[DecodeInstance] = []
            for p in self.active(svc):
                if not p.bound:
                    continue
                assert p.node is not None and p.ready_at is not None
                if p.role == PREFILL:
                    pre.append(PrefillInstance(p.inst_id, p.tp, p.link, p.node, p.ready_at))
                else:
                    dec.append(DecodeInstance(p.inst_id, p.tp, p.link, p.node, p.ready_at))
            self.sims[svc].set_instances(pre, dec, now)
        self.dirty.clear()

    # -- scaling ---------------------------------------------------------------------------------

    def replicas(self, service: str, now: float) -> dict[str, RoleReplicas]:
        out = {}
        for r in ROLES:
            pods = self.active(service, r)
            ready = sum(1 for p in pods if p.ready_at is not None and p.ready_at <= now)
            out[r] = RoleReplicas(len(pods), ready)
        return out

    def desired(self, svc: ServiceSpec, now: float, sig: TargetSignals | None) -> dict[str, int]:
        info = self.info[svc.name]
        w = info.weights
        cur = self.spec_replicas[svc.name]
        if self.scaling in ("coordinated", "placement-aware"):
            assert sig is not None
            before = self.states[svc.name]
            dec, state = decide(info.target, sig, self.replicas(svc.name, now), before, now)
            if self.scaling == "placement-aware":
                # What the state would be had no change been made (the controller's way).
                unchanged = replace(state, changes=before.changes)
                dec, state = self.gate(svc.name, dec, state, unchanged, now)
            self.states[svc.name] = state
            self.decision_codes[dec.code] += 1
            return {r: dec.desired[r] for r in ROLES}
        if self.scaling == "independent":
            assert sig is not None
            hpa = self.hpa[svc.name]
            prompt = sig.prompt_tokens_rate.value if sig.prompt_tokens_rate else 0.0
            d_sig = sig.roles.get(DECODE)
            seqs = 0.0
            if d_sig is not None:
                for s in (d_sig.running, d_sig.queue):
                    if s is not None and not s.is_nan:
                        seqs += s.value
            return {
                PREFILL: hpa[PREFILL].desired(now, cur[PREFILL], prompt, info.cap_prefill_tps),
                DECODE: hpa[DECODE].desired(now, cur[DECODE], seqs, info.cap_decode_seqs),
            }
        dm = self.demand[svc.name]
        if self.scaling == "static-peak":
            units = dm.peak_units
        else:  # oracle
            units = dm.units_over(now, now + self.sc.startup_s + self.sc.scale_interval_s)
        return {r: units * w[r] for r in ROLES}

    def role_request(self, service: str, role: str, replicas: int) -> RoleRequest:
        """One role's share of a what-if unit: pods shaped as :meth:`_create` makes them."""
        info = self.info[service]
        tp = info.spec.prefill_tp if role == PREFILL else info.spec.decode_tp
        ann = {L.ANNOTATION_KV_BYTES_PER_TOKEN: str(info.model.kv_bytes_per_token)}
        tpl = make_rbg_pod(NAMESPACE, service, role, 0, tp, annotations=ann)
        meta = tpl["metadata"]
        return RoleRequest(
            name=role,
            pods_per_unit=replicas,
            gpus_per_pod=tp,
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
        )

    def gate(
        self,
        service: str,
        dec: Decision,
        state: ScalingState,
        unchanged: ScalingState,
        now: float,
    ) -> tuple[Decision, ScalingState]:
        """The placement gate on a coordinated decision (``placement-aware``): what-if on the
        current snapshot for the new units; only the units that fit are requested."""
        info = self.info[service]
        self.gate_pending[service] = 0
        ask = scale_up_ask(info.target, dec)
        if ask is None:  # hold, scale-down: nothing to ask
            return dec, state
        assert self.whatif_engine is not None and self.whatif_scheduler is not None
        roles = tuple(
            self.role_request(service, r, ask.replicas[r]) for r in ROLES if r in ask.replicas
        )
        req = WhatIfRequest(NAMESPACE, service, ask.units, roles, all_or_nothing=True)
        res = what_if(self.snap, self.whatif_engine, self.whatif_scheduler, req)
        out = gate_outcome(
            info.target,
            dec,
            ask,
            res.units_placeable,
            [r.message for r in res.reasons],
            res.cost,
        )
        self.gate_stats["checks"] += 1
        self.gate_stats["units_requested"] += out.requested_units
        self.gate_stats["units_placeable"] += out.placeable_units
        self.gate_stats["units_left_out"] += out.pending_units
        if out.pending_units:
            self.gate_stats["held" if out.placeable_units == 0 else "cut"] += 1
            for reason in res.reasons:
                for code, _n in reason.rejections or (("unschedulable", 0),):
                    self.gate_reasons[f"{reason.role}: {code}"] += 1
        self.gate_pending[service] = out.pending_units
        return apply_gate(info.target, dec, out, state, unchanged, now)

    def in_ratio(self, svc: ServiceSpec, reps: dict[str, int]) -> bool:
        w = self.info[svc.name].weights
        asc = svc.autoscaler
        p, d = reps[PREFILL], reps[DECODE]
        if asc.mode == "band":
            assert asc.band is not None
            return d > 0 and asc.band.min - 1e-9 <= p / d <= asc.band.max + 1e-9
        return p * w[DECODE] == d * w[PREFILL] and p % w[PREFILL] == 0

    # -- bookkeeping -----------------------------------------------------------------------------

    def sample(self, now: float) -> None:
        s = self.series
        s["t"].append(now)
        tick = self.sc.tick_s
        svc_gpus = 0
        for svc in self.sc.services:
            ser = s["services"][svc.name]
            dm = self.demand[svc.name]
            i = dm.at(now)
            g = 0
            for r in ROLES:
                pods = self.active(svc.name, r)
                ser[f"spec_{r}"].append(len(pods))
                ser[f"ready_{r}"].append(
                    sum(1 for p in pods if p.ready_at is not None and p.ready_at <= now)
                )
                g += sum(p.tp for p in pods if p.bound)
            ser["demand_prefill"].append(round(dm.prefill[i], 4))
            ser["demand_decode"].append(round(dm.decode[i], 4))
            ser["gpus"].append(g)
            svc_gpus += g
            # Half-placed ratio units and pending pods.
            w = self.info[svc.name].weights
            reps = {r: sorted(self.active(svc.name, r), key=lambda p: p.index) for r in ROLES}
            units = max(math.ceil(len(reps[r]) / w[r]) for r in ROLES)
            half = 0
            # Units the policy wanted that do not serve whole: a pod still waiting for a node
            # (half-placed ones included), and units the placement gate left out.
            pending = self.gate_pending[svc.name]
            for u in range(units):
                members = [p for r in ROLES for p in reps[r][u * w[r] : (u + 1) * w[r]]]
                placed = sum(1 for p in members if p.bound)
                if 0 < placed < len(members):
                    half += 1
                if placed < len(members):
                    pending += 1
            self.half_placed_unit_ticks += half
            self.half_placed_units_max = max(self.half_placed_units_max, half)
            self.pending_unit_ticks += pending
            self.pending_units_max = max(self.pending_units_max, pending)
            ser["pending_units"].append(pending)
            self.pending_pod_ticks += sum(1 for r in ROLES for p in reps[r] if not p.bound)
            # PD pairs by shared level (pods that serve now).
            ready = {
                r: [p for p in reps[r] if p.bound and p.ready_at is not None and p.ready_at <= now]
                for r in ROLES
            }
            for a in ready[PREFILL]:
                for b in ready[DECODE]:
                    assert a.node is not None and b.node is not None
                    self.pair_levels[self.shared_kind(a.node, b.node)] += 1
        c = s["cluster"]
        c["gpus_services"].append(svc_gpus)
        busy = sum(st.gpu_allocatable - st.free_count for st in self.snap.nodes.values())
        c["gpus_busy"].append(busy)
        # Nodes with NVLink islands only: on a PCIe box every "island" is one GPU.
        islands = [
            st.index.largest_free_island(st.free_mask)
            for st in self.snap.nodes.values()
            if st.index.groups.get(Locality.NVLINK_ISLAND)
        ]
        c["mean_largest_free_island"].append(round(_mean(islands), 4))
        c["free_8gpu_islands"].append(sum(1 for x in islands if x >= 8))
        del tick

    # -- the loop --------------------------------------------------------------------------------

    def run(self, on_tick: Callable[[], None] | None = None) -> RunResult:
        sc = self.sc
        tick = sc.tick_s
        every = round(sc.scale_interval_s / tick)
        horizon = self.work.horizon_s
        n_ticks = round(horizon / tick)
        arrivals = {s: list(r) for s, r in self.work.per_service.items()}
        cursor = {s: 0 for s in arrivals}
        # Initial pods: they run before the simulation starts (ready at 0).
        for svc in sc.services:
            if self.scaling == "static-peak":
                units = self.demand[svc.name].peak_units
            elif self.scaling == "oracle":
                units = self.demand[svc.name].units_over(0.0, sc.startup_s + sc.scale_interval_s)
            else:
                units = svc.initial_units
            w = self.info[svc.name].weights
            self.spec_replicas[svc.name] = {r: 0 for r in ROLES}
            self.set_replicas(svc.name, {r: units * w[r] for r in ROLES}, 0.0)
        self.place_pending(0.0)
        self.push_instances(0.0)
        window = max(sc.scale_interval_s, 60.0)
        k = 0
        extra = 0
        while True:
            t0 = k * tick
            in_traffic = k < n_ticks
            if not in_traffic:
                busy = any(sim.in_flight for sim in self.sims.values())
                if not busy or extra >= MAX_DRAIN_TICKS:
                    break
                extra += 1
            if in_traffic and k > 0 and k % every == 0 and self.scaling != "static-peak":
                for svc in sc.services:
                    sig = None
                    if self.scaling in ("coordinated", "placement-aware", "independent"):
                        pct = svc.autoscaler.slo.percentile
                        sig = self.sims[svc.name].signals(max(0.0, t0 - window), t0, pct)
                    want = self.desired(svc, t0, sig)
                    if not self.in_ratio(svc, want):
                        self.ratio_violations += 1
                    self.set_replicas(svc.name, want, t0)
                    if self.scaling == "placement-aware":
                        # Bound before the next service's what-if looks at the snapshot.
                        self.place_pending(t0)
            elif in_traffic and k == 0:
                for svc in sc.services:
                    if not self.in_ratio(svc, self.spec_replicas[svc.name]):
                        self.ratio_violations += 1
            self.place_pending(t0)
            self.push_instances(t0)
            if in_traffic:
                self.sample(t0)
            t1 = t0 + tick
            for svc in sc.services:
                reqs = arrivals[svc.name]
                i = cursor[svc.name]
                j = i
                while j < len(reqs) and reqs[j].arrival_s < t1:
                    j += 1
                cursor[svc.name] = j
                self.sims[svc.name].advance(t1, reqs[i:j])
            k += 1
            if on_tick is not None and in_traffic:
                on_tick()
        return self.result(horizon, extra)

    # -- metrics ---------------------------------------------------------------------------------

    def result(self, horizon: float, drain_ticks: int) -> RunResult:
        records: dict[str, list[RequestRecord]] = {s: self.sims[s].records() for s in self.sims}
        all_recs = [r for rs in records.values() for r in rs]
        admitted = sum(sim.admitted for sim in self.sims.values())
        ttft = [r.ttft_s for r in all_recs]
        itl = [r.itl_s for r in all_recs]
        met = 0
        per_service: dict[str, dict[str, Any]] = {}
        for svc in self.sc.services:
            slo = svc.autoscaler.slo
            rs = records[svc.name]
            ok = sum(1 for r in rs if r.ttft_s <= slo.ttft_s and r.itl_s <= slo.itl_s)
            met += ok
            n = self.sims[svc.name].admitted
            per_service[svc.name] = {
                "requests": n,
                "slo_attainment": _r(ok / n if n else 1.0),
                **latency_block([r.ttft_s for r in rs], [r.itl_s for r in rs]),
                "kv_transfer_mean_s": _r(_mean([r.kv_transfer_s for r in rs])),
                "prefill_mean_s": _r(_mean([r.prefill_s for r in rs])),
                "gpu_hours": _r(self.gpu_hours(horizon, svc.name)),
                "capacity": {
                    "prefill_tokens_per_second": _r(self.info[svc.name].cap_prefill_tps),
                    "decode_sequences": _r(self.info[svc.name].cap_decode_seqs),
                },
            }
        # TP groups and their links (every pod that was ever bound, once).
        tp_pods = [p for p in self.pods if p.bound_at is not None and p.tp > 1]
        links = Counter((p.link.value if p.link else "unknown") for p in tp_pods)
        in_island = sum(1 for p in tp_pods if p.link in (LinkClass.NVLINK, LinkClass.XGMI))
        pair_total = sum(self.pair_levels.values())
        by_level = {
            lv: _r(self.pair_levels.get(lv, 0) / pair_total) if pair_total else 0.0
            for lv in PAIR_LEVELS
            if self.pair_levels.get(lv, 0) or lv in ("host", "rack", "zone", "region")
        }
        same_rack = (
            self.pair_levels.get("host", 0) + self.pair_levels.get("clique", 0)
        ) + self.pair_levels.get("rack", 0)
        kv_levels: Counter[str] = Counter()
        for r in all_recs:
            a, b = self.by_inst[r.prefill_id], self.by_inst[r.decode_id]
            assert a.node is not None and b.node is not None
            kv_levels[self.shared_kind(a.node, b.node)] += 1
        comp = {
            "prefill_wait": _mean([r.prefill_wait_s for r in all_recs]),
            "prefill": _mean([r.prefill_s for r in all_recs]),
            "decode_wait": _mean([r.decode_wait_s for r in all_recs]),
            "kv_transfer": _mean([r.kv_transfer_s for r in all_recs]),
        }
        comp["first_decode_step"] = _mean([r.ttft_s for r in all_recs]) - sum(comp.values())
        by_link: dict[str, dict[str, list[float]]] = {"prefill": {}, "decode": {}}
        for r in all_recs:
            pa, de = self.by_inst[r.prefill_id], self.by_inst[r.decode_id]
            for role, pod, v in (("prefill", pa, r.prefill_s), ("decode", de, r.itl_s)):
                key = f"tp{pod.tp}-{pod.link.value if pod.link else 'none'}"
                by_link[role].setdefault(key, []).append(v)
        frag = self.series["cluster"]["mean_largest_free_island"]
        free8 = self.series["cluster"]["free_8gpu_islands"]
        kv = [r.kv_transfer_s for r in all_recs]
        metrics: dict[str, Any] = {
            "requests": admitted,
            "requests_finished": len(all_recs),
            "requests_unfinished": admitted - len(all_recs),
            "slo_attainment": _r(met / admitted if admitted else 1.0),
            **latency_block(ttft, itl),
            "e2e_p90_s": _r(percentile([r.e2e_s for r in all_recs], 0.9)),
            "prefill_wait_mean_s": _r(_mean([r.prefill_wait_s for r in all_recs])),
            "prefill_mean_s": _r(_mean([r.prefill_s for r in all_recs])),
            "decode_wait_mean_s": _r(_mean([r.decode_wait_s for r in all_recs])),
            "kv_transfer_mean_s": _r(_mean(kv)),
            "kv_transfer_p90_s": _r(percentile(kv, 0.9)),
            "ttft_components_mean_s": {k: _r(v) for k, v in comp.items()},
            "prefill_mean_s_by_tp_link": {
                k: {"requests": len(v), "mean_s": _r(_mean(v))}
                for k, v in sorted(by_link["prefill"].items())
            },
            "itl_mean_s_by_tp_link": {
                k: {"requests": len(v), "mean_s": _r(_mean(v))}
                for k, v in sorted(by_link["decode"].items())
            },
            "kv_transfers_by_level": {
                k: _r(v / len(all_recs)) for k, v in sorted(kv_levels.items())
            }
            if all_recs
            else {},
            "gpu_hours": _r(self.gpu_hours(horizon)),
            "scaling_actions": self.scaling_actions,
            "ratio_violations": self.ratio_violations,
            "half_placed_unit_ticks": self.half_placed_unit_ticks,
            "half_placed_units_max": self.half_placed_units_max,
            "pending_unit_ticks": self.pending_unit_ticks,
            "pending_units_max": self.pending_units_max,
            "pending_pod_ticks": self.pending_pod_ticks,
            "pods_created": len(self.pods),
            "tp_groups": len(tp_pods),
            "tp_single_island_fraction": _r(in_island / len(tp_pods)) if tp_pods else 1.0,
            "tp_worst_links": dict(sorted(links.items())),
            "pd_pairs_by_level": by_level,
            "pd_same_rack_fraction": _r(same_rack / pair_total) if pair_total else 0.0,
            "fragmentation": {
                "mean_largest_free_island": _r(_mean(frag)),
                "min_largest_free_island": _r(min(frag)) if frag else 0.0,
                "free_8gpu_islands_mean": _r(_mean(free8)),
                "free_8gpu_islands_min": min(free8) if free8 else 0,
            },
            "drain_ticks": drain_ticks,
            "services": per_service,
        }
        if self.scaling in ("coordinated", "placement-aware"):
            metrics["decision_codes"] = dict(sorted(self.decision_codes.items()))
        if self.scaling == "placement-aware":
            g = self.gate_stats
            metrics["placement_gate"] = {
                k: g[k] for k in ("checks", "units_requested", "units_placeable", "units_left_out")
            } | {
                "held": g["held"],
                "cut": g["cut"],
                "reasons": dict(sorted(self.gate_reasons.items())),
            }
        if isinstance(self.placer, OptimalPlacer):
            metrics["ilp_solves"] = self.placer.solves
            metrics["ilp_not_optimal"] = self.placer.not_optimal
        return RunResult(
            self.placement, self.scaling, metrics, self.series, ttft, itl, list(self.notes)
        )

    def gpu_hours(self, horizon: float, service: str | None = None) -> float:
        total = 0.0
        for p in self.pods:
            if p.bound_at is None or (service is not None and p.service != service):
                continue
            end = min(horizon, p.deleted_at if p.deleted_at is not None else horizon)
            if end > p.bound_at:
                total += (end - p.bound_at) * p.tp
        return total / 3600.0


class TooBig(Exception):
    """The optimal placement ILP is not attempted on this cluster."""


def _r(x: float) -> float:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return 0.0
    return round(float(x), 6)


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank (inverted CDF) percentile; 0.0 for no data."""
    if not xs:
        return 0.0
    s = sorted(xs)
    i = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[i]


def latency_block(ttft: Sequence[float], itl: Sequence[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, xs in (("ttft", ttft), ("itl", itl)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = _r(percentile(xs, q / 100))
    return out


# -- all runs ------------------------------------------------------------------------------------


@dataclass
class Prepared:
    scenario: Scenario
    nodes: list[dict[str, Any]]
    background: list[dict[str, Any]]
    work: Workload
    infos: dict[str, ServiceInfo]
    profile: EngineProfile
    demand: dict[str, Demand]
    runs: list[tuple[str, str]]
    scaling_placement: str
    trace_info: dict[str, Any]
    quick: bool

    @property
    def ticks_per_run(self) -> int:
        return round(self.work.horizon_s / self.scenario.tick_s)


def prepare(sc: Scenario, *, quick: bool = False, trace: Trace | None = None) -> Prepared:
    """Everything the runs share: cluster, workload, per-service constants, the run list."""
    raw = trace if trace is not None else load_trace(sc.traffic.trace)
    shaped = shape_trace(raw, sc, quick)
    if not shaped.requests:
        raise ValueError(f"traffic: no requests left in {sc.traffic.trace} after the window")
    work = split_workload(shaped, sc)
    profile = load_profile(sc.profile)
    infos = {s.name: service_info(s, profile, work.per_service[s.name], sc) for s in sc.services}
    demand = {
        s.name: Demand.of(
            infos[s.name], work.per_service[s.name], sc.scale_interval_s, work.horizon_s
        )
        for s in sc.services
    }
    nodes, background = build_cluster(sc.cluster, sc.seed)
    placements = list(sc.policies.placement)
    scalings = list(sc.policies.scaling)
    base_p = "topology-aware" if "topology-aware" in placements else placements[0]
    base_s = "coordinated" if "coordinated" in scalings else scalings[0]
    runs: list[tuple[str, str]] = [(p, base_s) for p in placements]
    runs += [(base_p, s) for s in scalings if (base_p, s) not in runs]
    trace_info = {
        "name": raw.name,
        "source": raw.source,
        "format": raw.format,
        "requests_in_file": len(raw.requests),
        "skipped_lines": raw.skipped_count,
        "skipped": list(raw.skipped),
        "requests_simulated": len(shaped.requests),
        "duration_s": _r(work.horizon_s),
        "mean_prompt_tokens": _r(_mean([r.prompt_tokens for r in shaped.requests])),
        "mean_output_tokens": _r(_mean([r.output_tokens for r in shaped.requests])),
    }
    return Prepared(
        sc, nodes, background, work, infos, profile, demand, runs, base_p, trace_info, quick
    )


def run_one(prep: Prepared, placement: str, scaling: str, on_tick=None) -> RunResult:
    run = Run(
        prep.scenario,
        placement,
        scaling,
        prep.nodes,
        prep.background,
        prep.work,
        prep.infos,
        prep.profile,
        prep.demand,
    )
    return run.run(on_tick)


@dataclass
class SimResults:
    prep: Prepared
    runs: dict[tuple[str, str], RunResult]
    skipped: dict[tuple[str, str], str]

    @property
    def base_scaling(self) -> str:
        sc = self.prep.scenario.policies.scaling
        return "coordinated" if "coordinated" in sc else sc[0]


def run_all(
    prep: Prepared,
    progress: Callable[[str, int, int], None] | None = None,
) -> SimResults:
    """Every run of the comparison; ``progress(label, done_ticks, total_ticks)``."""
    total = prep.ticks_per_run * len(prep.runs)
    done = 0
    results: dict[tuple[str, str], RunResult] = {}
    skipped: dict[tuple[str, str], str] = {}
    for p, s in prep.runs:
        label = f"{p} + {s}"

        def tick(label: str = label) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(label, done, total)

        try:
            results[p, s] = run_one(prep, p, s, tick)
        except TooBig as e:
            skipped[p, s] = str(e)
            done += prep.ticks_per_run
            if progress is not None:
                progress(label, done, total)
    return SimResults(prep, results, skipped)
