"""One table of link costs: bandwidth and latency per link class and per cluster level.

Every figure has a source. "measured" figures come from captures in this project or in
../shared/fixtures; "spec" figures from vendor datasheets; "estimate" figures say how they
were derived. The placement scorer and the simulator read only this table.

Bandwidths are GB/s in ONE direction (the rate one copy can use); latencies are microseconds.
Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass

from topo_sched.topology.cluster import LevelKind
from topo_sched.topology.model import LinkClass


@dataclass(frozen=True)
class LinkCost:
    bandwidth_gbps: float  # GB/s, one direction
    latency_us: float
    source: str


#: NVLink per-link rate; an NV# link has # of them bonded.
NVLINK_PER_LINK = LinkCost(
    25.0,
    1.0,
    "spec: NVLink3/NVLink4 run 50 GB/s bidirectional (25 GB/s each way) per link; "
    "H100 SXM 18 links = 900 GB/s bidirectional (NVIDIA H100 datasheet), "
    "A100 SXM 12 links = 600 GB/s (NVIDIA A100 datasheet). "
    "Real copies reach ~370-450 GB/s one way.",
)

INTRA_NODE: dict[LinkClass, LinkCost] = {
    LinkClass.XGMI: LinkCost(
        64.0, 1.5, "spec: AMD Instinct MI300X Infinity Fabric 128 GB/s bidirectional per link"
    ),
    LinkClass.PIX: LinkCost(
        54.7,
        2.0,
        "measured: PCIe Gen5 x16 pinned host-to-device 54.7 GB/s on an H100 "
        "(../shared/fixtures/hardware/h100-x1-vm/numa-bandwidth.txt); P2P under one switch is "
        "bounded by the same x16 link",
    ),
    LinkClass.PXB: LinkCost(
        54.7, 3.0, "as PIX (same x16 bound); estimate +1 us for the extra bridges"
    ),
    LinkClass.PHB: LinkCost(
        41.0,
        4.0,
        "estimate: 75% of the measured 54.7 GB/s Gen5 x16 rate, P2P through the CPU root complex",
    ),
    LinkClass.NODE: LinkCost(41.0, 5.0, "estimate: as PHB, across host bridges of one NUMA node"),
    LinkClass.SYS: LinkCost(
        20.0,
        8.0,
        "estimate: P2P across the socket interconnect (UPI/xGMI) typically runs at well under "
        "half the PCIe rate; 20 GB/s assumed until measured",
    ),
}

#: Cost of moving data between two pods by the finest cluster level they share.
#: HOST means the same node (then INTRA_NODE applies per GPU pair; this row is the fallback).
BETWEEN_NODES: dict[LevelKind, LinkCost] = {
    LevelKind.HOST: LinkCost(41.0, 5.0, "same node: PCIe/host path, as INTRA_NODE NODE"),
    LevelKind.CLIQUE: LinkCost(
        900.0,
        2.0,
        "spec: NVLink5 multi-node domain (GB200 NVL72) 1.8 TB/s bidirectional per GPU",
    ),
    LevelKind.RACK: LinkCost(
        50.0,
        3.0,
        "spec: one ConnectX-7 NIC, 400 Gb/s = 50 GB/s; one leaf switch hop",
    ),
    LevelKind.BLOCK: LinkCost(
        50.0, 5.0, "spec: ConnectX-7 50 GB/s per NIC; estimate 3 switch hops (leaf-spine-leaf)"
    ),
    LevelKind.SPINE: LinkCost(
        37.5,
        7.0,
        "estimate: ConnectX-7 50 GB/s derated for a 4:3 oversubscribed spine, 5 switch hops",
    ),
    LevelKind.ZONE: LinkCost(
        25.0, 20.0, "estimate: half of one NIC's rate across the zone's core, 7+ hops"
    ),
    LevelKind.REGION: LinkCost(
        12.5, 500.0, "estimate: 100 Gb/s of inter-zone capacity per flow, ~0.5 ms RTT/2"
    ),
}


def intra_node_cost(link: LinkClass, nvlinks: int | None = None) -> LinkCost:
    if link is LinkClass.NVLINK:
        n = nvlinks or 1
        return LinkCost(
            NVLINK_PER_LINK.bandwidth_gbps * n, NVLINK_PER_LINK.latency_us, NVLINK_PER_LINK.source
        )
    return INTRA_NODE[link]


def between_nodes_cost(level: LevelKind) -> LinkCost:
    return BETWEEN_NODES[level]


def transfer_seconds(nbytes: float, cost: LinkCost, *, parallel_links: int = 1) -> float:
    """Time to move nbytes over ``parallel_links`` links of this cost (e.g. one NIC per GPU)."""
    bw = cost.bandwidth_gbps * max(1, parallel_links) * 1e9
    return cost.latency_us * 1e-6 + nbytes / bw
