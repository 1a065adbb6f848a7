"""Placement scenarios shared by the tests and the benchmarks, a runner, and quality metrics.

A :class:`Scenario` is a cluster (Node JSON with real topology records), the pods already
running on it, and a sequence of steps: create a pod, or delete a bound pod and create it again
under the same name. :func:`run_scenario` drives any :class:`~topo_sched.sim.scheduler.Scheduler`
through it, keeping every snapshot, so :func:`placement_metrics` can judge each decision
against the cluster as it was when the decision was made.

Pure: no I/O apart from reading the bundled topology records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from topo_sched.placement.pods import PodInfo, pod_info
from topo_sched.placement.snapshot import ClusterSnapshot
from topo_sched.sim.cluster_builder import (
    HGX_H100_8GPU,
    PCIE_8X_RTX4090_2SOCKET,
    bound,
    bundled_topology,
    gpu_allocation_annotation,
    make_plain_pod,
    make_rack_cluster,
    make_rbg_pod,
    node_name,
)
from topo_sched.sim.scheduler import Scheduler, ScheduleResult, default_filter
from topo_sched.topology.cluster import LevelKind
from topo_sched.topology.locality import Locality, indices_of, span_locality


@dataclass(frozen=True)
class Create:
    pod: dict[str, Any]


@dataclass(frozen=True)
class Recreate:
    """Delete the bound pod with this key, then create ``pod`` (same name, new uid)."""

    pod: dict[str, Any]


Step = Create | Recreate


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: list[dict[str, Any]]
    #: Pods already bound when the scenario starts (``spec.nodeName`` set).
    running: list[dict[str, Any]]
    steps: list[Step]


@dataclass(frozen=True)
class Decision:
    """One scheduling cycle: the snapshot it saw, what was chosen, which GPUs it got."""

    pod: PodInfo
    before: ClusterSnapshot
    result: ScheduleResult
    gpus: tuple[int, ...]
    recreated_from: str | None = None  # the node the pod had before it was deleted


@dataclass
class Run:
    scenario: Scenario
    decisions: list[Decision] = field(default_factory=list)
    final: ClusterSnapshot | None = None


def _with_allocation(
    nodes: Sequence[Mapping[str, Any]], snap: ClusterSnapshot, drop: str
) -> list[dict[str, Any]]:
    """Nodes whose gpu-allocation annotation lists every placement but ``drop`` (as the agent
    would publish it once the pods run), so a rebuilt snapshot keeps every GPU where it was."""
    owners: dict[str, dict[int, str]] = {}
    for key, pl in snap.placements.items():
        if key != drop:
            for g in pl.gpus:
                owners.setdefault(pl.node, {})[g] = key
    out = []
    for n in nodes:
        name = n["metadata"]["name"]
        meta = {**n["metadata"]}
        meta["annotations"] = {
            **meta.get("annotations", {}),
            **gpu_allocation_annotation(owners.get(name, {})),
        }
        out.append({**n, "metadata": meta})
    return out


def run_scenario(scenario: Scenario, scheduler: Scheduler) -> Run:
    """Schedule every step in order; an unschedulable pod stays pending (it is not retried)."""
    run = Run(scenario)
    snap = ClusterSnapshot.from_objects(scenario.nodes, scenario.running)
    objects: dict[str, dict[str, Any]] = {pod_info(p).key: p for p in scenario.running}
    for step in scenario.steps:
        info = pod_info(step.pod)
        previous: str | None = None
        if isinstance(step, Recreate):
            old = snap.placements.get(info.key)
            if old is None:
                raise ValueError(f"cannot recreate {info.key}: it is not bound")
            previous = old.node
            nodes = _with_allocation(scenario.nodes, snap, info.key)
            objects.pop(info.key, None)
            snap = ClusterSnapshot.from_objects(
                nodes, list(objects.values()), snap.config, history={info.key: previous}
            )
        result = scheduler.schedule(snap, step.pod)
        gpus: tuple[int, ...] = ()
        before = snap
        if result.node is not None:
            snap = scheduler.bind(snap, step.pod, result.node)
            gpus = snap.placements[info.key].gpus
            objects[info.key] = bound(step.pod, result.node)
        run.decisions.append(Decision(info, before, result, gpus, previous))
    run.final = snap
    return run


# -- metrics -----------------------------------------------------------------------------------

#: Metric name -> True when higher is better.
METRICS: dict[str, bool] = {
    "tp_tight_when_possible": True,
    "tp_tight_all": True,
    "pd_same_rack": True,
    "pd_pairs_same_rack_when_possible": True,
    "pd_pod_joined_rack_when_possible": True,
    "pd_mean_tree_distance": False,
    "instance_one_rack": True,
    "instance_member_joined_when_possible": True,
    "recreated_same_node": True,
    "whole_free_nodes_at_end": True,
    "pending_pods": False,
}

METRIC_HELP: dict[str, str] = {
    "tp_tight_when_possible": "TP>=2 RBG pods inside one NVLink island or NUMA node, of those "
    "scheduled while some feasible node had such a GPU set free",
    "tp_tight_all": "TP>=2 RBG pods inside one NVLink island or NUMA node, of all",
    "pd_same_rack": "prefill-decode pairs of one group in one rack (final placements)",
    "pd_pairs_same_rack_when_possible": "the same, of pairs whose later pod could have joined "
    "the earlier one's rack at the best GPU locality it could get anywhere",
    "pd_pod_joined_rack_when_possible": "prefill/decode pods that went into a rack holding one "
    "of their counterparts, of those that could have at the best GPU locality on offer",
    "pd_mean_tree_distance": "mean cluster-tree distance of prefill-decode pairs (0 = one node)",
    "instance_one_rack": "multi-node leader/worker instances entirely in one rack",
    "instance_member_joined_when_possible": "instance members placed in a rack holding an "
    "earlier member, of those that could have been",
    "recreated_same_node": "recreated pods back on the node they had",
    "whole_free_nodes_at_end": "nodes with every GPU free after the run",
    "pending_pods": "pods left unschedulable",
}

#: The locality a tensor-parallel pod should get: one NVLink island or one NUMA node.
TIGHT = Locality.NUMA


def _best_locality(snap: ClusterSnapshot, info: PodInfo, nodes: Sequence[str]) -> Locality:
    best = Locality.NONE
    for n in nodes:
        st = snap.nodes[n]
        best = max(best, st.index.best_fit(st.free_mask, info.gpus).locality)
    return best


def _ratio(num: int, den: int) -> float:
    return num / den if den else 1.0


@dataclass(frozen=True)
class Check:
    """One placement judged against what the cluster offered at the time."""

    pod: str
    node: str
    possible: bool  # the good outcome was on offer
    ok: bool  # and was taken (only meaningful when possible)
    detail: str


def _rack(snap: ClusterSnapshot, node: str | None) -> str | None:
    lv = snap.cluster.level_named(LevelKind.RACK.value)
    if lv is None or node is None:
        return None
    return snap.cluster.domain(node, lv)


def _could_join(d: Decision, racks: set[str | None]) -> bool:
    """Could the pod have gone into one of these racks at the best locality on offer?"""
    racks = racks - {None}
    if not racks:
        return False
    feasible, _ = default_filter(d.before, d.pod)
    best = _best_locality(d.before, d.pod, feasible)
    in_racks = [n for n in feasible if _rack(d.before, n) in racks]
    return bool(in_racks) and _best_locality(d.before, d.pod, in_racks) >= best


def tp_checks(run: Run) -> list[Check]:
    """TP>=2 RBG pods: tight (one island / NUMA node) whenever a tight set was free."""
    out = []
    for d in run.decisions:
        if d.pod.rbg is None or d.pod.gpus < 2 or d.result.node is None:
            continue
        st = d.before.nodes[d.result.node]
        if not set(d.gpus) <= set(indices_of(st.free_mask)):
            raise AssertionError(f"{d.pod.key} got GPUs {d.gpus} that were not free")
        loc = span_locality(st.topology, d.gpus) if st.topology is not None else Locality.ANY
        feasible, _ = default_filter(d.before, d.pod)
        best = _best_locality(d.before, d.pod, feasible)
        out.append(
            Check(
                d.pod.key,
                d.result.node,
                best >= TIGHT,
                loc >= TIGHT,
                f"GPUs {list(d.gpus)} are {loc.label}; best on offer {best.label}",
            )
        )
    return out


def pd_checks(run: Run) -> list[Check]:
    """Prefill/decode pods with counterparts already placed: in a counterpart's rack whenever
    one could take them at the best locality on offer (what a per-pod scorer can achieve)."""
    out = []
    for d in run.decisions:
        r = d.pod.rbg
        if r is None or r.pd_side is None or d.result.node is None:
            continue
        others = [
            p
            for p in d.before.group_placements(d.pod.namespace, r.group)
            if p.pod.rbg and p.pod.rbg.pd_side not in (None, r.pd_side)
        ]
        if not others:
            continue
        racks = {_rack(d.before, p.node) for p in others}
        here = _rack(d.before, d.result.node)
        out.append(
            Check(
                d.pod.key,
                d.result.node,
                _could_join(d, racks),
                here in racks,
                f"in {here}; counterparts in {sorted(x or '-' for x in racks)}",
            )
        )
    return out


def instance_checks(run: Run) -> list[Check]:
    """Members of a multi-node instance after the first: in an earlier member's rack whenever
    one could take them."""
    out = []
    for d in run.decisions:
        r = d.pod.rbg
        if r is None or not r.instance or d.result.node is None:
            continue
        members = [
            p
            for p in d.before.group_placements(d.pod.namespace, r.group)
            if p.pod.rbg and p.pod.rbg.role == r.role and p.pod.rbg.instance == r.instance
        ]
        if not members:
            continue
        racks = {_rack(d.before, p.node) for p in members}
        here = _rack(d.before, d.result.node)
        out.append(
            Check(
                d.pod.key,
                d.result.node,
                _could_join(d, racks),
                here in racks,
                f"in {here}; members in {sorted(x or '-' for x in racks)}",
            )
        )
    return out


def failures(checks: Sequence[Check]) -> list[Check]:
    """Checks where the good outcome was on offer and not taken."""
    return [c for c in checks if c.possible and not c.ok]


def _when_possible(checks: Sequence[Check]) -> float:
    possible = [c for c in checks if c.possible]
    return _ratio(sum(c.ok for c in possible), len(possible))


def placement_metrics(run: Run) -> dict[str, float]:
    """Quality figures for a run; see :data:`METRIC_HELP`. Ratios over an empty set read 1.0."""
    assert run.final is not None
    final = run.final
    order = {d.pod.key: i for i, d in enumerate(run.decisions)}
    latest: dict[str, Decision] = {}
    for d in run.decisions:
        latest[d.pod.key] = d
    tp = tp_checks(run)

    # Prefill-decode pairs per group, on final placements.
    groups: dict[tuple[str, str], list[Decision]] = {}
    for d in latest.values():
        if d.pod.rbg is not None and d.pod.rbg.pd_side and d.result.node is not None:
            groups.setdefault((d.pod.namespace, d.pod.rbg.group), []).append(d)
    pairs = same = possible = same_possible = dist_sum = 0
    for members in groups.values():
        prefills = [d for d in members if d.pod.rbg and d.pod.rbg.pd_side == "prefill"]
        decodes = [d for d in members if d.pod.rbg and d.pod.rbg.pd_side == "decode"]
        for p in prefills:
            for q in decodes:
                a, b = p.result.node, q.result.node
                assert a is not None and b is not None
                pairs += 1
                dist_sum += final.cluster.distance(a, b)
                ra = _rack(final, a)
                together = ra is not None and ra == _rack(final, b)
                same += together
                earlier, later = sorted((p, q), key=lambda d: order[d.pod.key])
                if _could_join(later, {_rack(later.before, earlier.result.node)}):
                    possible += 1
                    same_possible += together

    # Multi-node instances.
    instances: dict[tuple[str, str, str, str], set[str | None]] = {}
    for d in latest.values():
        r = d.pod.rbg
        if r is not None and r.instance and d.result.node is not None:
            key = (d.pod.namespace, r.group, r.role, r.instance)
            instances.setdefault(key, set()).add(_rack(final, d.result.node))
    one_rack = sum(1 for doms in instances.values() if len(doms) == 1 and None not in doms)

    recreated = [d for d in run.decisions if d.recreated_from is not None]
    back = sum(1 for d in recreated if d.result.node == d.recreated_from)

    return {
        "tp_tight_when_possible": _when_possible(tp),
        "tp_tight_all": _ratio(sum(c.ok for c in tp), len(tp)),
        "pd_same_rack": _ratio(same, pairs),
        "pd_pairs_same_rack_when_possible": _ratio(same_possible, possible),
        "pd_pod_joined_rack_when_possible": _when_possible(pd_checks(run)),
        "pd_mean_tree_distance": dist_sum / pairs if pairs else 0.0,
        "instance_one_rack": _ratio(one_rack, len(instances)),
        "instance_member_joined_when_possible": _when_possible(instance_checks(run)),
        "recreated_same_node": _ratio(back, len(recreated)),
        "whole_free_nodes_at_end": float(
            sum(1 for st in final.nodes.values() if st.free_count == st.gpu_allocatable)
        ),
        "pending_pods": float(sum(1 for d in latest.values() if d.result.node is None)),
    }


def format_table(columns: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per run."""
    names = list(columns)
    rows = [["metric", *names, "better"]]
    counts = ("whole_free_nodes_at_end", "pending_pods")
    for m, higher in METRICS.items():
        cells = []
        for n in names:
            v = columns[n][m]
            whole = m in counts and float(v).is_integer()
            cells.append(f"{v:.0f}" if whole else f"{v:.1f}" if m in counts else f"{v:.2f}")
        rows.append([m, *cells, "higher" if higher else "lower"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the placement-quality scenario -------------------------------------------------------------

#: Background (non-RBG) GPUs in use per HGX rack: one entry per node, the GPU indices taken.
_HGX_LOAD: dict[int, list[tuple[int, ...]]] = {
    0: [tuple(range(8))] * 6 + [(0, 1, 2, 3)] * 2,
    1: [tuple(range(8))] * 2 + [()] * 6,
    2: [(0, 1, 2, 3, 4, 5)] * 4 + [(0, 1, 4, 5)] * 4,
    3: [(0, 1, 2, 3)] * 4 + [tuple(range(8))] * 4,
    4: [()] * 4 + [tuple(range(8))] * 4,
    5: [tuple(range(8))] * 6 + [(0, 1, 2, 4, 5)] * 2,
}
#: Same for the PCIe racks (NUMA 0 = GPUs 0-3, NUMA 1 = GPUs 4-7): holes across both sockets.
_PCIE_LOAD: dict[int, list[tuple[int, ...]]] = {
    6: [(0, 4)] * 4 + [(0, 1, 2, 3)] * 4,
    7: [(0, 1, 4, 5)] * 4 + [()] * 4,
}


def _two_p_one_d(ns: str, group: str, tp: int, order: str) -> list[Step]:
    """A 2P1D group; ``order`` is the creation order, e.g. "ppd" or "pdp"."""
    pods = {
        "p0": make_rbg_pod(ns, group, "prefill", 0, tp),
        "p1": make_rbg_pod(ns, group, "prefill", 1, tp),
        "d0": make_rbg_pod(ns, group, "decode", 0, tp),
    }
    seq = {"ppd": ["p0", "p1", "d0"], "pdp": ["p0", "d0", "p1"], "dpp": ["d0", "p0", "p1"]}
    return [Create(pods[k]) for k in seq[order]]


def placement_quality_scenario() -> Scenario:
    """64 nodes (8 racks x 8; racks 0-5 HGX H100, racks 6-7 PCIe 2-socket boxes, two zones),
    a busy background of non-RBG pods, then: 2P1D groups with TP 1, 2, 4 and 8, a multi-node
    leader/worker decode instance (4 pods x 8 GPUs) with its prefill, a few non-RBG pods in
    between, and one decode pod deleted and recreated."""
    hgx = bundled_topology(HGX_H100_8GPU)
    pcie = bundled_topology(PCIE_8X_RTX4090_2SOCKET)
    nodes = make_rack_cluster(racks=8, nodes_per_rack=8, kinds=[hgx] * 6 + [pcie] * 2, zones=2)
    load = {**_HGX_LOAD, **_PCIE_LOAD}
    by_name = {n["metadata"]["name"]: n for n in nodes}
    running: list[dict[str, Any]] = []
    for r, per_node in sorted(load.items()):
        for j, held in enumerate(per_node):
            if not held:
                continue
            name = node_name(r, j)
            job = make_plain_pod("batch", f"job-{name}", len(held), node=name)
            running.append(job)
            by_name[name]["metadata"]["annotations"].update(
                gpu_allocation_annotation({g: f"batch/job-{name}" for g in held})
            )
    ns = "llm"
    steps: list[Step] = [Create(make_plain_pod("dev", "notebook-0", 1))]
    steps += _two_p_one_d(ns, "chat-tp8", 8, "ppd")
    lw = "big-decode-0"
    steps += [
        Create(
            make_rbg_pod(
                ns, "big", "decode", i, 8, lw, "leader" if i == 0 else "worker", instance_size=4
            )
        )
        for i in range(4)
    ]
    steps.append(Create(make_rbg_pod(ns, "big", "prefill", 0, 8)))
    steps += _two_p_one_d(ns, "code-tp1", 1, "pdp")
    steps += _two_p_one_d(ns, "chat-tp2", 2, "ppd")
    steps.append(Create(make_plain_pod("dev", "notebook-1", 2)))
    steps += _two_p_one_d(ns, "chat-tp4", 4, "pdp")
    steps += _two_p_one_d(ns, "embed-tp2", 2, "dpp")
    steps += _two_p_one_d(ns, "code-tp4", 4, "ppd")
    steps.append(Create(make_plain_pod("dev", "notebook-2", 4)))
    steps += _two_p_one_d(ns, "rag-tp4", 4, "pdp")
    steps += _two_p_one_d(ns, "rag-tp2", 2, "pdp")
    # By now the HGX racks are nearly full: these land on the PCIe boxes.
    steps += _two_p_one_d(ns, "sum-tp4", 4, "pdp")
    steps += _two_p_one_d(ns, "qa-tp2", 2, "dpp")
    recreated = make_rbg_pod(ns, "chat-tp2", "decode", 0, 2, uid="recreated-chat-tp2-decode-0")
    steps.append(Recreate(recreated))
    return Scenario("placement-quality-64", nodes, running, steps)


def demo_cluster() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The embedded default for ``topo-sched explain``: (nodes, bound pods, pending pod).

    Two racks of eight nodes (rack 0 HGX H100, rack 1 PCIe boxes, both from real captures);
    group ``chat``'s decode (TP4) already runs in rack 0 next to a half-full node, and its
    first prefill (TP4) is the pod to place.
    """
    kinds = [bundled_topology(HGX_H100_8GPU), bundled_topology(PCIE_8X_RTX4090_2SOCKET)]
    nodes = make_rack_cluster(2, 8, kinds, zones=1)
    pods = [
        bound(make_rbg_pod("llm", "chat", "decode", 0, 4), node_name(0, 2)),
        make_plain_pod("batch", "train-0", 4, node=node_name(0, 3)),
        make_plain_pod("batch", "train-1", 8, node=node_name(1, 0)),
    ]
    return nodes, pods, make_rbg_pod("llm", "chat", "prefill", 0, 4)
