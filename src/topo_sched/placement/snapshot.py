"""An immutable view of the cluster for one scheduling cycle.

Built from raw Kubernetes JSON (Nodes and Pods, as a watch or ``kubectl get -o json`` gives
them). Per node: allocatable GPUs, the agent's NodeTopology and its LocalityIndex, and which
GPUs are free. Per RBG group: where its pods already are. The extender, the simulator and the
what-if service read snapshots; nothing mutates one. ``with_binding`` returns a new snapshot
that shares every unchanged node.

Which GPUs are free: the agent's ``topo-sched.io/gpu-allocation`` annotation names the GPUs
each pod holds. A pod bound since the agent last wrote (or on a node without an agent) is
assumed to hold the GPUs :meth:`LocalityIndex.best_fit` would give it, which is what this
extender recommends and what the kubelet's topology-aware device allocation tends to pick.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from topo_sched import labels as L
from topo_sched.placement.config import PlacementConfig
from topo_sched.placement.pods import PodInfo, PodSpecError, pod_info
from topo_sched.topology.cluster import ClusterTopology
from topo_sched.topology.locality import LocalityIndex, indices_of, mask_of
from topo_sched.topology.model import NodeTopology

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeState:
    name: str
    labels: Mapping[str, str]
    gpu_allocatable: int
    topology: NodeTopology | None
    index: LocalityIndex
    free_mask: int
    #: Why the node's topology annotation was not used, if it was present but unusable.
    data_problem: str | None = None

    @property
    def free_count(self) -> int:
        return self.free_mask.bit_count()

    @property
    def has_topology(self) -> bool:
        return self.topology is not None


@dataclass(frozen=True)
class Placement:
    pod: PodInfo
    node: str
    gpus: tuple[int, ...]


#: One LocalityIndex per distinct machine layout (the record without its node name): a rack
#: of identical servers shares one index, its memo, and one cache entry in the engine.
_INDEX_BY_LAYOUT: dict[str, LocalityIndex] = {}


@lru_cache(maxsize=65536)
def _parse_topology(text: str) -> tuple[NodeTopology | None, LocalityIndex | None, str | None]:
    """Annotation text -> record and index; cached because every rebuild sees the same text."""
    try:
        topo = NodeTopology.from_json(text)
    except (ValidationError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, None, f"{L.ANNOTATION_TOPOLOGY} is not a valid NodeTopology: {msg}"
    layout = topo.model_dump_json(exclude={"node_name"})
    index = _INDEX_BY_LAYOUT.get(layout)
    if index is None:
        if len(_INDEX_BY_LAYOUT) > 4096:  # bounded: a cluster has few distinct layouts
            _INDEX_BY_LAYOUT.clear()
        index = _INDEX_BY_LAYOUT[layout] = LocalityIndex.from_topology(topo)
    return topo, index, None


@lru_cache(maxsize=256)
def _uniform_index(gpus: int) -> LocalityIndex:
    return LocalityIndex.uniform(gpus)


def _allocatable_gpus(node: Mapping[str, Any]) -> int:
    status = node.get("status") or {}
    raw = (status.get("allocatable") or {}).get(L.RESOURCE_NVIDIA_GPU)
    if raw is None:
        raw = (status.get("capacity") or {}).get(L.RESOURCE_NVIDIA_GPU, 0)
    try:
        return max(0, int(str(raw)))
    except ValueError:
        return 0


def _allocation(annotations: Mapping[str, str]) -> dict[int, str]:
    raw = annotations.get(L.ANNOTATION_GPU_ALLOCATION)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
        return {int(k): str(v) for k, v in data.items()}
    except (ValueError, AttributeError, TypeError):
        return {}


def _node_state(
    node: Mapping[str, Any], pods_here: list[PodInfo]
) -> tuple[NodeState, dict[str, tuple[int, ...]]]:
    """The node's state, and the GPU indices each of its pods holds (as far as known)."""
    meta = node.get("metadata") or {}
    name = meta["name"]
    annotations = meta.get("annotations") or {}
    alloc_gpus = _allocatable_gpus(node)
    topo, index, problem = None, None, None
    text = annotations.get(L.ANNOTATION_TOPOLOGY)
    if text:
        topo, index, problem = _parse_topology(text)
    if index is None or topo is None:
        index = _uniform_index(alloc_gpus)
    free = index.all_mask
    # GPUs the agent saw taken, by pods that still exist here.
    present = {p.key for p in pods_here}
    held: dict[str, tuple[int, ...]] = {}
    for i, owner in sorted(_allocation(annotations).items()):
        if owner in present and index.all_mask >> i & 1:
            held[owner] = (*held.get(owner, ()), i)
            free &= ~(1 << i)
    for p in sorted(pods_here, key=lambda p: p.key):
        if p.key in held or p.gpus == 0:
            continue
        fit = index.best_fit(free, p.gpus)
        held[p.key] = fit.gpus
        free &= ~mask_of(fit.gpus)
    # Never report more free GPUs than the kubelet would allocate.
    requested = sum(p.gpus for p in pods_here)
    excess = free.bit_count() - max(0, alloc_gpus - requested)
    if excess > 0:
        for i in reversed(indices_of(free)):
            if excess == 0:
                break
            free &= ~(1 << i)
            excess -= 1
    state = NodeState(
        name=name,
        labels=dict(meta.get("labels") or {}),
        gpu_allocatable=alloc_gpus,
        topology=topo,
        index=index,
        free_mask=free,
        data_problem=problem,
    )
    return state, held


@dataclass(frozen=True)
class KeyIndex:
    """A node list resolved to distinct cache keys (see :meth:`ClusterSnapshot.key_index`)."""

    names: list[str]
    distinct: list[Any]  # distinct (class key, domain key) among the names
    members: list[list[str]]  # per distinct key: the names that have it
    idx: list[int]  # per name: its distinct key's position, -1 for an unknown node
    position: dict[str, int]  # name -> position in names (last one wins for duplicates)
    counts: list[int]  # per distinct key: how many names have it


class ClusterSnapshot:
    """Nodes, their free GPUs, and where RBG pods sit; immutable once built."""

    def __init__(
        self,
        nodes: dict[str, NodeState],
        placements: dict[str, Placement],
        cluster: ClusterTopology,
        config: PlacementConfig,
        history: Mapping[str, str],
    ):
        self.nodes = nodes
        self.placements = placements
        self.cluster = cluster
        self.config = config
        self.history = dict(history)
        self.node_names = frozenset(nodes)
        self._last_index: KeyIndex | None = None
        # Per node, once per snapshot: the keys the engine caches term results under
        # (GPU-state class, and place in the level tree without the host).
        self.node_keys: dict[str, tuple[tuple[int, int, int], Any]] = {}
        #: GPU-state class -> its nodes: filter decides once per class.
        self.class_members: dict[tuple[int, int, int], list[str]] = {}
        for name, st in nodes.items():
            doms = cluster.domains(name)
            lk = (id(st.index), st.free_mask, st.gpu_allocatable)
            self.node_keys[name] = (lk, doms[:-1] if doms else None)
            self.class_members.setdefault(lk, []).append(name)
        groups: dict[tuple[str, str], list[Placement]] = {}
        for pl in placements.values():
            if pl.pod.rbg is not None:
                groups.setdefault((pl.pod.namespace, pl.pod.rbg.group), []).append(pl)
        self._groups = groups

    @classmethod
    def from_objects(
        cls,
        nodes: Iterable[Mapping[str, Any]],
        pods: Iterable[Mapping[str, Any]],
        config: PlacementConfig | None = None,
        history: Mapping[str, str] | None = None,
    ) -> ClusterSnapshot:
        config = config or PlacementConfig()
        node_objs = {
            n["metadata"]["name"]: n for n in nodes if (n.get("metadata") or {}).get("name")
        }
        pods_by_node: dict[str, list[PodInfo]] = {}
        for raw in pods:
            try:
                p = pod_info(raw)
            except PodSpecError as e:
                log.debug("skipping unusable pod object: %s", e)
                continue
            if p.node_name and p.active:
                pods_by_node.setdefault(p.node_name, []).append(p)
        states: dict[str, NodeState] = {}
        held: dict[str, tuple[int, ...]] = {}
        for name, obj in node_objs.items():
            states[name], held_here = _node_state(obj, pods_by_node.get(name, []))
            held.update(held_here)
        placements = {
            p.key: Placement(p, name, held.get(p.key, ()))
            for name, here in pods_by_node.items()
            for p in here
        }
        cluster = ClusterTopology({n: s.labels for n, s in states.items()}, config.cluster_levels())
        return cls(states, placements, cluster, config, history or {})

    def key_index(self, names: Sequence[str]) -> KeyIndex:
        """The distinct ``node_keys`` among ``names`` and each name's position in them.

        kube-scheduler sends the same feasible-node list, in the same order, pod after pod;
        the last list's index is remembered, so a repeat costs one list comparison.
        """
        last = self._last_index
        if last is not None and last.names == names:
            return last
        get = self.node_keys.get
        slot: dict[Any, int] = {}
        distinct: list[Any] = []
        members: list[list[str]] = []
        idx: list[int] = []
        for n in names:
            k = get(n)
            if k is None:
                idx.append(-1)
                continue
            i = slot.get(k)
            if i is None:
                i = slot[k] = len(distinct)
                distinct.append(k)
                members.append([])
            members[i].append(n)
            idx.append(i)
        counts = [0] * len(distinct)
        for i in idx:
            if i >= 0:
                counts[i] += 1
        position = {n: i for i, n in enumerate(names)}
        index = KeyIndex(list(names), distinct, members, idx, position, counts)
        self._last_index = index
        return index

    @property
    def built_at_objects(self) -> tuple[int, int]:
        return len(self.nodes), len(self.placements)

    def group_placements(self, namespace: str, group: str) -> list[Placement]:
        return self._groups.get((namespace, group), [])

    def with_binding(self, pod: Mapping[str, Any] | PodInfo, node_name: str) -> ClusterSnapshot:
        """A new snapshot with the pod placed on the node (GPUs chosen by best fit).

        Idempotent: binding a pod where it already is returns this snapshot; binding it
        elsewhere releases the GPUs it held first.
        """
        info = pod if isinstance(pod, PodInfo) else pod_info(pod)
        info = replace(info, node_name=node_name)
        old = self.placements.get(info.key)
        if old is not None and old.node == node_name:
            return self
        nodes = dict(self.nodes)
        if old is not None and old.node in nodes:
            prev = nodes[old.node]
            nodes[old.node] = replace(prev, free_mask=prev.free_mask | mask_of(old.gpus))
        gpus: tuple[int, ...] = ()
        st = nodes.get(node_name)
        if st is not None and info.gpus:
            fit = st.index.best_fit(st.free_mask, info.gpus)
            gpus = fit.gpus
            nodes[node_name] = replace(st, free_mask=st.free_mask & ~mask_of(gpus))
        placements = dict(self.placements)
        placements[info.key] = Placement(info, node_name, gpus)
        history = dict(self.history)
        history[info.key] = node_name
        return ClusterSnapshot(nodes, placements, self.cluster, self.config, history)
