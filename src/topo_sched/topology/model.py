"""The NodeTopology record: what one GPU server looks like inside.

Pure data and pure functions, no I/O. Parsers (``topo_sched.topology.parse``) build a record
with :func:`build_node_topology`; the agent publishes it as JSON in a Node annotation; the
extender and the simulator read it back with :meth:`NodeTopology.from_json` and ask it
questions through :mod:`topo_sched.topology.locality`.

JSON keys are snake_case. Link classes are the ones ``nvidia-smi topo -m`` prints (NV#, PIX,
PXB, PHB, NODE, SYS) plus XGMI for AMD Instinct fabrics.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import StrEnum
from typing import Literal

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, model_validator

API_VERSION = "topo-sched.io/v1"
KIND = "NodeTopology"


class LinkClass(StrEnum):
    """How two devices inside one server reach each other, best first."""

    NVLINK = "NV"  # a bonded set of NVLinks, direct or through NVSwitch
    XGMI = "XGMI"  # AMD Infinity Fabric between Instinct GPUs
    PIX = "PIX"  # at most one PCIe bridge (same PCIe switch)
    PXB = "PXB"  # several PCIe bridges, not through the host bridge
    PHB = "PHB"  # through a PCIe host bridge (the CPU)
    NODE = "NODE"  # between host bridges inside one NUMA node
    SYS = "SYS"  # across the SMP interconnect between NUMA nodes (QPI/UPI/xGMI)

    @property
    def is_fabric(self) -> bool:
        """True for GPU-to-GPU fabrics (NVLink, XGMI): these define islands."""
        return self in (LinkClass.NVLINK, LinkClass.XGMI)

    @property
    def is_same_pcie_switch(self) -> bool:
        """True where traffic stays below the CPU's host bridge."""
        return self in (LinkClass.PIX, LinkClass.PXB)


#: Rank of each class, lower is closer; used to pick "the better" of two answers.
LINK_RANK: dict[LinkClass, int] = {c: i for i, c in enumerate(LinkClass)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Gpu(_Strict):
    index: int = Field(ge=0)
    name: str | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    #: NUMA node of the CPUs closest to the GPU (nvidia-smi "NUMA Affinity"); None = unknown.
    numa_node: int | None = None
    #: NUMA node that holds the GPU's own memory (GB200 "GPU NUMA ID"); None when not exposed.
    gpu_numa_id: int | None = None
    #: CPU list in kernel cpulist syntax ("0-47,96-143"); None = unknown.
    cpu_affinity: str | None = None


class Nic(_Strict):
    #: Device name as the NIC Legend gives it (mlx5_3), or the column label if there is none.
    name: str
    numa_node: int | None = None
    #: GPUs that reach this NIC through at most one PCIe bridge (GPUDirect RDMA friendly).
    pix_gpus: list[int] = Field(default_factory=list)


class GpuLink(_Strict):
    a: int
    b: int
    link: LinkClass
    #: Number of bonded NVLinks for NV#; None for other classes.
    nvlinks: int | None = None


class NicLink(_Strict):
    gpu: int
    nic: str
    link: LinkClass


class NumaNode(_Strict):
    id: int
    gpus: list[int]
    cpus: str | None = None
    #: SLIT distances to every NUMA node in id order, where the source gives them.
    distances: list[int] | None = None


class NodeTopology(_Strict):
    """One server's GPUs, NICs and the links between them."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    api_version: Literal["topo-sched.io/v1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["NodeTopology"] = KIND
    #: Which discovery produced it: nvml, nvidia-smi, sysfs, rocm-smi.
    source: str
    node_name: str | None = None
    gpus: list[Gpu]
    nics: list[Nic] = Field(default_factory=list)
    gpu_links: list[GpuLink] = Field(default_factory=list)
    nic_links: list[NicLink] = Field(default_factory=list)
    #: Connected components over fabric (NVLink/XGMI) edges; a GPU without one is alone.
    nvlink_islands: list[list[int]]
    numa_nodes: list[NumaNode] = Field(default_factory=list)
    #: True when NVLinks go through NVSwitch chips (any GPU can reach any other at full rate).
    nvswitch: bool = False
    #: Multi-node NVLink domain id (NVML fabric clique), where the GPUs belong to one.
    clique: str | None = None

    @model_validator(mode="after")
    def _check_consistent(self) -> NodeTopology:
        indices = [g.index for g in self.gpus]
        if len(set(indices)) != len(indices):
            raise ValueError(f"duplicate GPU indices: {indices}")
        known = set(indices)
        nic_names = {n.name for n in self.nics}
        for link in self.gpu_links:
            if link.a not in known or link.b not in known:
                raise ValueError(f"GPU link {link.a}-{link.b} names a GPU that is not listed")
        for nl in self.nic_links:
            if nl.gpu not in known or nl.nic not in nic_names:
                raise ValueError(f"NIC link GPU{nl.gpu}-{nl.nic} names an unknown device")
        covered = sorted(i for island in self.nvlink_islands for i in island)
        if covered != sorted(indices):
            raise ValueError("nvlink_islands must cover every GPU exactly once")
        return self

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=False)

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> NodeTopology:
        return cls.model_validate_json(text)

    # -- queries ---------------------------------------------------------------------------------

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def gpu_link(self, a: int, b: int) -> GpuLink | None:
        for link in self.gpu_links:
            if {link.a, link.b} == {a, b}:
                return link
        return None

    def graph(self) -> nx.Graph:
        """A networkx view: nodes ``gpu:N``, ``nic:NAME``, ``numa:N``; edges typed by ``link``."""
        g = nx.Graph()
        for gpu in self.gpus:
            g.add_node(f"gpu:{gpu.index}", kind="gpu", index=gpu.index, numa_node=gpu.numa_node)
        for nic in self.nics:
            g.add_node(f"nic:{nic.name}", kind="nic", name=nic.name, numa_node=nic.numa_node)
        for numa in self.numa_nodes:
            g.add_node(f"numa:{numa.id}", kind="numa", id=numa.id)
            for gi in numa.gpus:
                g.add_edge(f"numa:{numa.id}", f"gpu:{gi}", link="affinity")
        for link in self.gpu_links:
            g.add_edge(f"gpu:{link.a}", f"gpu:{link.b}", link=link.link.value, nvlinks=link.nvlinks)
        for nl in self.nic_links:
            g.add_edge(f"gpu:{nl.gpu}", f"nic:{nl.nic}", link=nl.link.value)
        return g


def fabric_islands(gpu_indices: Iterable[int], links: Iterable[GpuLink]) -> list[list[int]]:
    """Connected components over NVLink/XGMI edges, each sorted, ordered by their first GPU."""
    g = nx.Graph()
    g.add_nodes_from(gpu_indices)
    g.add_edges_from((lk.a, lk.b) for lk in links if lk.link.is_fabric)
    return sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: c[0])


def build_node_topology(
    *,
    source: str,
    gpus: list[Gpu],
    nics: list[Nic] | None = None,
    gpu_links: list[GpuLink] | None = None,
    nic_links: list[NicLink] | None = None,
    numa_cpus: dict[int, str] | None = None,
    numa_distances: dict[int, list[int]] | None = None,
    nvswitch: bool = False,
    clique: str | None = None,
    node_name: str | None = None,
) -> NodeTopology:
    """Derive islands, NUMA membership and PIX pairs from the raw parts a parser found."""
    nics = nics or []
    gpu_links = gpu_links or []
    nic_links = nic_links or []
    gpus = sorted(gpus, key=lambda g: g.index)
    pix: dict[str, list[int]] = {n.name: [] for n in nics}
    for nl in nic_links:
        if nl.link == LinkClass.PIX:
            pix[nl.nic].append(nl.gpu)
    nics = [n.model_copy(update={"pix_gpus": sorted(pix[n.name])}) for n in nics]
    numa_ids = sorted({g.numa_node for g in gpus if g.numa_node is not None} | set(numa_cpus or {}))
    numa_nodes = [
        NumaNode(
            id=nid,
            gpus=[g.index for g in gpus if g.numa_node == nid],
            cpus=(numa_cpus or {}).get(nid),
            distances=(numa_distances or {}).get(nid),
        )
        for nid in numa_ids
    ]
    return NodeTopology(
        source=source,
        node_name=node_name,
        gpus=gpus,
        nics=nics,
        gpu_links=sorted(gpu_links, key=lambda lk: (lk.a, lk.b)),
        nic_links=sorted(nic_links, key=lambda lk: (lk.gpu, lk.nic)),
        nvlink_islands=fabric_islands([g.index for g in gpus], gpu_links),
        numa_nodes=numa_nodes,
        nvswitch=nvswitch,
        clique=clique,
    )
