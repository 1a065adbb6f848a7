"""Where nodes sit relative to each other: an ordered list of node-label levels, coarse to fine.

As in Kueue's ``Topology`` (``levels[].nodeLabel``), a cluster is a tree whose levels are node
labels: zone > spine > block > rack > NVLink clique > host. Two nodes share a level when they
carry equal values for it and for every coarser level both carry. The finest level they share
is how close they are. Levels a node lacks are skipped, so one default list serves clusters
labelled by NVIDIA topograph, GKE, AWS or a plain rack label.

Pure: no I/O. A :class:`ClusterTopology` is built once per state snapshot and then only read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from topo_sched import labels as L


class LevelKind(StrEnum):
    """What a level is physically; decides its cost in :mod:`topo_sched.topology.costs`."""

    REGION = "region"
    ZONE = "zone"
    SPINE = "spine"
    BLOCK = "block"
    RACK = "rack"
    CLIQUE = "clique"  # multi-node NVLink domain
    HOST = "host"


@dataclass(frozen=True)
class Level:
    label: str
    kind: LevelKind


#: Default levels, coarse to fine. A cluster uses whichever of these its nodes carry.
DEFAULT_LEVELS: tuple[Level, ...] = (
    Level(L.LABEL_REGION, LevelKind.REGION),
    Level(L.LABEL_ZONE, LevelKind.ZONE),
    Level(L.LABEL_NVIDIA_SPINE, LevelKind.SPINE),
    Level(L.LABEL_AWS_LAYER_1, LevelKind.SPINE),
    Level(L.LABEL_GKE_BLOCK, LevelKind.BLOCK),
    Level(L.LABEL_NVIDIA_BLOCK, LevelKind.BLOCK),
    Level(L.LABEL_AWS_LAYER_2, LevelKind.BLOCK),
    Level(L.LABEL_GKE_SUBBLOCK, LevelKind.RACK),
    Level(L.LABEL_AWS_LAYER_3, LevelKind.RACK),
    Level(L.LABEL_K8S_RACK, LevelKind.RACK),
    Level(L.LABEL_RACK, LevelKind.RACK),
    Level(L.LABEL_GPU_CLIQUE, LevelKind.CLIQUE),
    Level(L.LABEL_HOSTNAME, LevelKind.HOST),
)

_KNOWN_KINDS: dict[str, LevelKind] = {lv.label: lv.kind for lv in DEFAULT_LEVELS}


def levels_from_labels(label_keys: Sequence[str]) -> tuple[Level, ...]:
    """Levels from a user's list of label keys (coarse to fine); unknown keys count as blocks."""
    out = [Level(k, _KNOWN_KINDS.get(k, LevelKind.BLOCK)) for k in label_keys]
    if not out or out[-1].kind is not LevelKind.HOST:
        out.append(Level(L.LABEL_HOSTNAME, LevelKind.HOST))
    return tuple(out)


#: Returned for two nodes that share no level at all.
NOTHING_SHARED = Level("", LevelKind.REGION)


class ClusterTopology:
    """Node name -> position in the level tree; answers "finest level two nodes share".

    Levels no node carries are dropped at construction (HOST always stays), so every query
    walks only the levels this cluster uses.
    """

    def __init__(
        self,
        node_labels: Mapping[str, Mapping[str, str]],
        levels: Sequence[Level] = DEFAULT_LEVELS,
    ):
        used = {k for lbls in node_labels.values() for k in lbls}
        self.levels = tuple(lv for lv in levels if lv.kind is LevelKind.HOST or lv.label in used)
        if not self.levels or self.levels[-1].kind is not LevelKind.HOST:
            self.levels = (*self.levels, Level(L.LABEL_HOSTNAME, LevelKind.HOST))
        self._index = {lv: i for i, lv in enumerate(self.levels)}
        self._paths: dict[str, tuple[str | None, ...]] = {}
        self._domains: dict[str, tuple[str | None, ...]] = {}
        for name, lbls in node_labels.items():
            self.add_node(name, lbls)

    def add_node(self, name: str, lbls: Mapping[str, str]) -> None:
        path = tuple(
            name if lv.kind is LevelKind.HOST else lbls.get(lv.label) for lv in self.levels
        )
        self._paths[name] = path
        domains: list[str | None] = []
        prefix = ""
        for v in path:
            if v is None:
                domains.append(None)
            else:
                prefix = f"{prefix}/{v}"
                domains.append(prefix)
        self._domains[name] = tuple(domains)

    def __contains__(self, name: str) -> bool:
        return name in self._paths

    def index_of(self, level: Level) -> int:
        return self._index[level]

    def shared_level(self, a: str, b: str) -> Level:
        """The finest level both nodes share (HOST for the same node)."""
        if a == b:
            return self.levels[-1]
        pa, pb = self._paths.get(a), self._paths.get(b)
        if pa is None or pb is None:
            return NOTHING_SHARED
        shared = NOTHING_SHARED
        for lv, va, vb in zip(self.levels, pa, pb, strict=True):
            if va is None or vb is None:
                continue
            if va != vb:
                break
            shared = lv
        return shared

    def distance(self, a: str, b: str) -> int:
        """Tree distance: 0 on one node, growing by one per level up to the shared one."""
        shared = self.shared_level(a, b)
        if shared is NOTHING_SHARED:
            return len(self.levels)
        return len(self.levels) - 1 - self._index[shared]

    def domains(self, node: str) -> tuple[str | None, ...] | None:
        """Per level, a key naming the node's subtree there (e.g. "/zone-a/rack-3"), or None."""
        return self._domains.get(node)

    def domain(self, node: str, level: Level) -> str | None:
        d = self._domains.get(node)
        if d is None or level not in self._index:
            return None
        return d[self._index[level]]

    def level_named(self, key: str) -> Level | None:
        """A level by label key or by kind name ("rack", "block", ...): the finest match."""
        for lv in reversed(self.levels):
            if key in (lv.label, lv.kind.value):
                return lv
        return None
