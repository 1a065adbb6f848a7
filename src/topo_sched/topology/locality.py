"""Best achievable GPU locality on one node, precomputed per node topology.

The question the extender asks for every (pod, node): "given these free GPUs, how close together
can k of them be, and which k?". The answer tiers, best first (``Locality``):

1. NVLINK_ISLAND: all k inside one NVLink/XGMI island.
2. NUMA: all k attached to one NUMA node.
3. PCIE_SWITCH_NIC: all k under one PCIe switch tree that also holds a NIC (GPUDirect RDMA).
4. ANY: k free GPUs somewhere on the node.

A :class:`LocalityIndex` turns a NodeTopology into bitmask groups per tier once; each query is
then a few integer operations and is memoised on ``(free_mask, k)``. Inside the chosen group the
GPUs are refined by the finer tiers (e.g. a 2-GPU pod on an 8-GPU HGX island takes two GPUs of
one NUMA node), and among groups of a tier the tightest fit wins, so whole islands stay free.

Pure: no I/O, no clock. Instances are immutable after construction and safe to share between
threads (the memo cache is a dict whose updates are atomic under the GIL).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from topo_sched.topology.model import LinkClass, NodeTopology


class Locality(IntEnum):
    """How tightly a GPU set sits inside a node; larger is better."""

    NONE = 0  # not enough free GPUs
    ANY = 1
    PCIE_SWITCH_NIC = 2
    NUMA = 3
    NVLINK_ISLAND = 4

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


#: Tiers in the order they are tried, best first.
TIERS: tuple[Locality, ...] = (
    Locality.NVLINK_ISLAND,
    Locality.NUMA,
    Locality.PCIE_SWITCH_NIC,
)


@dataclass(frozen=True)
class Fit:
    """The best placement of k GPUs given a free set."""

    locality: Locality
    gpus: tuple[int, ...]
    #: Free GPUs left in the group the fit came from (0 = it used a group up exactly).
    group_leftover: int = 0

    @property
    def feasible(self) -> bool:
        return self.locality > Locality.NONE


def mask_of(indices: Iterable[int]) -> int:
    m = 0
    for i in indices:
        m |= 1 << i
    return m


def indices_of(mask: int) -> tuple[int, ...]:
    out = []
    i = 0
    while mask:
        if mask & 1:
            out.append(i)
        mask >>= 1
        i += 1
    return tuple(out)


def _popcount(m: int) -> int:
    return m.bit_count()


@dataclass
class LocalityIndex:
    """Bitmask groups of one node's GPUs per locality tier."""

    all_mask: int
    groups: dict[Locality, tuple[int, ...]]
    _memo: dict[tuple[int, int], Fit] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_topology(cls, topo: NodeTopology) -> LocalityIndex:
        islands = tuple(mask_of(i) for i in topo.nvlink_islands if len(i) > 1)
        numa = tuple(mask_of(n.gpus) for n in topo.numa_nodes if n.gpus)
        pcie: set[int] = set()
        for nic in topo.nics:
            near = [
                nl.gpu
                for nl in topo.nic_links
                if nl.nic == nic.name and nl.link.is_same_pcie_switch
            ]
            if near:
                pcie.add(mask_of(near))
        return cls(
            all_mask=mask_of(g.index for g in topo.gpus),
            groups={
                Locality.NVLINK_ISLAND: islands,
                Locality.NUMA: numa,
                Locality.PCIE_SWITCH_NIC: tuple(sorted(pcie)),
            },
        )

    @classmethod
    def uniform(cls, gpu_count: int) -> LocalityIndex:
        """A node we know only by its GPU count: no tier can be promised."""
        return cls(all_mask=(1 << gpu_count) - 1, groups={t: () for t in TIERS})

    def best_fit(self, free_mask: int, k: int) -> Fit:
        """The best locality k of the free GPUs can have, and which GPUs give it."""
        key = (free_mask & self.all_mask, k)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._best_fit(*key)
            if len(self._memo) > 65536:  # at most 2^gpus x k entries; bound it anyway
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def _best_fit(self, free: int, k: int) -> Fit:
        if k <= 0:
            return Fit(Locality.ANY, ())
        if _popcount(free) < k:
            return Fit(Locality.NONE, ())
        for pos, tier in enumerate(TIERS):
            group = self._tightest(tier, free, k)
            if group is not None:
                chosen = self._refine(group & free, k, TIERS[pos + 1 :])
                return Fit(tier, indices_of(chosen), _popcount(group & free) - k)
        chosen = self._refine(free, k, TIERS)
        return Fit(Locality.ANY, indices_of(chosen), _popcount(free) - k)

    def _tightest(self, tier: Locality, free: int, k: int) -> int | None:
        """The group of this tier with the fewest free GPUs that still holds k (best fit)."""
        best: int | None = None
        best_free = 1 << 30
        for g in self.groups[tier]:
            n = _popcount(g & free)
            if k <= n < best_free:
                best, best_free = g, n
        return best

    def _refine(self, pool: int, k: int, finer: tuple[Locality, ...]) -> int:
        """Pick k GPUs of ``pool``, staying inside a finer-tier group where one fits."""
        for pos, tier in enumerate(finer):
            group = self._tightest(tier, pool, k)
            if group is not None:
                return self._refine(group & pool, k, finer[pos + 1 :])
        chosen = 0
        for i in indices_of(pool)[:k]:
            chosen |= 1 << i
        return chosen

    def largest_free_island(self, free_mask: int) -> int:
        """Free GPUs in the best island (fragmentation metric); 1 where islands are singletons."""
        islands = self.groups[Locality.NVLINK_ISLAND]
        best = max((_popcount(g & free_mask) for g in islands), default=0)
        return best if best else min(1, _popcount(free_mask & self.all_mask))


def span_locality(topo: NodeTopology, gpus: Iterable[int]) -> Locality:
    """The tier a given GPU set sits in (for explaining an existing placement)."""
    idx = LocalityIndex.from_topology(topo)
    m = mask_of(gpus)
    for tier in TIERS:
        if any(m & g == m for g in idx.groups[tier]):
            return tier
    return Locality.ANY


def worst_link(topo: NodeTopology, gpus: Iterable[int]) -> LinkClass | None:
    """The slowest link class between any two GPUs of the set (what a TP all-reduce waits on)."""
    ids = sorted(set(gpus))
    worst: LinkClass | None = None
    order = list(LinkClass)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            link = topo.gpu_link(a, b)
            cls = link.link if link else LinkClass.SYS
            if worst is None or order.index(cls) > order.index(worst):
                worst = cls
    return worst
