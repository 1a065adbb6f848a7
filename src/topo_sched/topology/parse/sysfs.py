"""NodeTopology from a plain-dict snapshot of Linux sysfs (a :class:`SysfsView`).

The view is what :func:`topo_sched.agent.sysfs_collect.collect_sysfs_view` reads: PCI devices
(``/sys/bus/pci/devices/*``), RDMA and network devices (``/sys/class/infiniband``,
``/sys/class/net``) and NUMA nodes (``/sys/devices/system/node/node*``). It is the fallback
when neither NVML nor nvidia-smi can be used, e.g. an agent without the driver libraries.

- GPUs: PCI functions with vendor ``0x10de`` and a display class (``0x03xxxx``); NVSwitches
  (``0x0680``) and audio functions are not GPUs. Indices follow PCI address order, which is the
  order NVML and nvidia-smi number GPUs in (CUDA's default FASTEST_FIRST order may differ).
- ``numa_node``: the device's ``numa_node``; ``-1`` (firmware gave no proximity) -> None, except
  that when the device's ``local_cpulist`` lies inside exactly one NUMA node's cpulist that node
  is used, as nvidia-smi does (the H100 VM: numa_node -1, CPUs 0-15 = node0 -> 0).
- NICs: every ``/sys/class/infiniband`` device (the names nvidia-smi's NIC Legend prints), and
  ``/sys/class/net`` interfaces backed by a PCI function that no RDMA device already covers.
- Links: sysfs has no PCIe-switch level attribute, so a pair is classed from the devices'
  resolved ``path`` below ``/sys/devices`` where the view has one, the way nvidia-smi does:
  same root complex and a common bridge with at most one more bridge level on either side ->
  PIX; a deeper common bridge tree -> PXB; same root complex, no common bridge -> PHB. Without
  paths, or across root complexes, only NUMA can be used: same node -> NODE, different nodes
  -> SYS, and a pair with an unknown node on either side is left out. (So a view without paths
  never shows PIX/PXB/PHB and NIC ``pix_gpus`` stays empty: that is this source's limitation.)
- ``numa_nodes``: ``cpulist`` and ``distance`` of every node in the view. No NVLink is visible
  in sysfs: every GPU is its own island, ``nvswitch`` is False.
"""

from __future__ import annotations

import re
from typing import Any, Literal, NotRequired, TypedDict

from topo_sched.topology.model import (
    Gpu,
    GpuLink,
    LinkClass,
    Nic,
    NicLink,
    NodeTopology,
    build_node_topology,
)
from topo_sched.topology.parse._common import normalize_pci, parse_cpulist
from topo_sched.topology.parse.errors import TopologyParseError

__all__ = [
    "SysfsNic",
    "SysfsNumaNode",
    "SysfsPciDevice",
    "SysfsView",
    "classify_pci_paths",
    "topology_from_sysfs_view",
]

NVIDIA_VENDOR = "0x10de"

SysfsPciDevice = TypedDict(
    "SysfsPciDevice",
    {
        #: PCI address, ``0000:1b:00.0``.
        "address": str,
        #: ``vendor`` file, ``0x10de``.
        "vendor": str,
        #: ``class`` file, ``0x030200``.
        "class": str,
        "device": NotRequired[str | None],
        #: ``numa_node`` file; -1 = none.
        "numa_node": NotRequired[int | None],
        "local_cpulist": NotRequired[str | None],
        #: The resolved device path below /sys/devices, one entry per level:
        #: ["pci0000:00", "0000:00:01.0", "0000:01:00.0", "0000:02:00.0", "0000:03:00.0"].
        "path": NotRequired[list[str] | None],
    },
)


class SysfsNic(TypedDict):
    name: str
    subsystem: Literal["infiniband", "net"]
    address: NotRequired[str | None]
    numa_node: NotRequired[int | None]
    local_cpulist: NotRequired[str | None]
    path: NotRequired[list[str] | None]


class SysfsNumaNode(TypedDict):
    id: int
    cpulist: NotRequired[str | None]
    #: The node's ``distance`` row (SLIT), in node id order.
    distance: NotRequired[list[int] | None]


class SysfsView(TypedDict):
    pci_devices: list[SysfsPciDevice]
    kind: NotRequired[Literal["SysfsView"]]
    node_name: NotRequired[str | None]
    nics: NotRequired[list[SysfsNic]]
    numa_nodes: NotRequired[list[SysfsNumaNode]]


_HEX_RE = re.compile(r"^0x[0-9a-fA-F]+$")


def topology_from_sysfs_view(
    view: SysfsView | dict[str, Any], *, node_name: str | None = None
) -> NodeTopology:
    """A NodeTopology (source ``sysfs``) from a sysfs view; TopologyParseError if malformed."""
    if not isinstance(view, dict):
        raise TopologyParseError("sysfs view: expected a JSON object")
    devices = view.get("pci_devices")
    if not isinstance(devices, list):
        raise TopologyParseError("sysfs view: 'pci_devices' must be a list")
    numa = _numa_nodes(view.get("numa_nodes"))
    node_cpus = {n: set(parse_cpulist(c)) for n, (c, _) in numa.items() if c}

    found: list[tuple[str, int | None, str | None, list[str] | None]] = []
    for k, d in enumerate(devices):
        where = f"pci_devices[{k}]"
        if not isinstance(d, dict):
            raise TopologyParseError(f"{where}: expected an object")
        vendor, klass = (
            _hex(d.get("vendor"), f"{where}.vendor"),
            _hex(d.get("class"), f"{where}.class"),
        )
        if vendor != NVIDIA_VENDOR or not klass.removeprefix("0x").zfill(6).startswith("03"):
            continue
        addr = _address(d.get("address"), f"{where}.address")
        cpus = _cpulist(d.get("local_cpulist"), f"{where}.local_cpulist")
        node = _numa(d.get("numa_node"), cpus, node_cpus, f"{where}.numa_node")
        found.append((addr, node, cpus, _path(d.get("path"), f"{where}.path")))
    if not found:
        raise TopologyParseError("sysfs view: no NVIDIA GPU (vendor 0x10de, class 0x03xxxx)")
    found.sort(key=lambda t: t[0])
    if len({t[0] for t in found}) != len(found):
        raise TopologyParseError("sysfs view: a GPU PCI address is listed twice")

    gpus = [
        Gpu(index=i, pci_bus_id=addr, numa_node=node, cpu_affinity=cpus)
        for i, (addr, node, cpus, _) in enumerate(found)
    ]
    gpu_links: list[GpuLink] = []
    for i in range(len(found)):
        for j in range(i + 1, len(found)):
            cls = _relation(found[i][3], found[j][3], found[i][1], found[j][1])
            if cls is not None:
                gpu_links.append(GpuLink(a=i, b=j, link=cls))

    nics: list[Nic] = []
    nic_links: list[NicLink] = []
    covered: set[str] = set()
    raw_nics = view.get("nics") or []
    if not isinstance(raw_nics, list):
        raise TopologyParseError("sysfs view: 'nics' must be a list")
    ordered = sorted(
        enumerate(raw_nics),
        key=lambda kn: (
            0 if isinstance(kn[1], dict) and kn[1].get("subsystem") == "infiniband" else 1,
            kn[0],
        ),
    )
    for k, n in ordered:
        where = f"nics[{k}]"
        if not isinstance(n, dict) or not isinstance(n.get("name"), str) or not n["name"]:
            raise TopologyParseError(f"{where}: expected an object with a 'name'")
        if n.get("subsystem") not in ("infiniband", "net"):
            raise TopologyParseError(f"{where}.subsystem: expected 'infiniband' or 'net'")
        addr = None if n.get("address") is None else _address(n["address"], f"{where}.address")
        if n["subsystem"] == "net" and (addr is None or addr in covered):
            continue
        if addr is not None:
            covered.add(addr)
        if any(x.name == n["name"] for x in nics):
            raise TopologyParseError(f"{where}: NIC {n['name']!r} is listed twice")
        cpus = _cpulist(n.get("local_cpulist"), f"{where}.local_cpulist")
        node = _numa(n.get("numa_node"), cpus, node_cpus, f"{where}.numa_node")
        path = _path(n.get("path"), f"{where}.path")
        nics.append(Nic(name=n["name"], numa_node=node))
        for i, (_, gnode, _, gpath) in enumerate(found):
            cls = _relation(gpath, path, gnode, node)
            if cls is not None:
                nic_links.append(NicLink(gpu=i, nic=n["name"], link=cls))

    return build_node_topology(
        source="sysfs",
        node_name=node_name if node_name is not None else view.get("node_name"),
        gpus=gpus,
        nics=nics,
        gpu_links=gpu_links,
        nic_links=nic_links,
        numa_cpus={n: c for n, (c, _) in numa.items() if c} or None,
        numa_distances={n: d for n, (_, d) in numa.items() if d} or None,
    )


def classify_pci_paths(a: list[str], b: list[str]) -> LinkClass | None:
    """PIX/PXB/PHB from two resolved sysfs device paths; None across root complexes.

    Each path is [root, bridge..., device]. Below the deepest bridge both share, PIX allows at
    most one more bridge on each side (the two downstream ports of one switch); anything deeper
    is PXB. No shared bridge under one root is PHB.
    """
    if not a or not b or a[0] != b[0]:
        return None
    ba, bb = a[1:-1], b[1:-1]
    common = 0
    while common < min(len(ba), len(bb)) and ba[common] == bb[common]:
        common += 1
    if common == 0:
        return LinkClass.PHB
    if max(len(ba) - common, len(bb) - common) <= 1:
        return LinkClass.PIX
    return LinkClass.PXB


def _relation(
    pa: list[str] | None, pb: list[str] | None, na: int | None, nb: int | None
) -> LinkClass | None:
    if pa and pb:
        cls = classify_pci_paths(pa, pb)
        if cls is not None:
            return cls
    if na is None or nb is None:
        return None
    return LinkClass.NODE if na == nb else LinkClass.SYS


# -- field readers ---------------------------------------------------------------------------


def _hex(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HEX_RE.match(value.strip()):
        raise TopologyParseError(f"{where}: expected a hex id like 0x10de, got {value!r}")
    return value.strip().lower()


def _address(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TopologyParseError(f"{where}: expected a PCI address, got {value!r}")
    try:
        return normalize_pci(value)
    except ValueError as e:
        raise TopologyParseError(f"{where}: {e}") from None


def _cpulist(value: Any, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise TopologyParseError(f"{where}: expected a cpulist string, got {value!r}")
    try:
        parse_cpulist(value)
    except ValueError as e:
        raise TopologyParseError(f"{where}: {e}") from None
    return value.strip()


def _numa(value: Any, cpus: str | None, node_cpus: dict[int, set[int]], where: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TopologyParseError(f"{where}: expected an integer, got {value!r}")
    if value is not None and value >= 0:
        return value
    if cpus is None:
        return None
    mine = set(parse_cpulist(cpus))
    holders = [n for n, c in node_cpus.items() if mine <= c]
    return holders[0] if len(holders) == 1 else None


def _path(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise TopologyParseError(f"{where}: expected a list of path components")
    return value or None


def _numa_nodes(value: Any) -> dict[int, tuple[str | None, list[int] | None]]:
    if value is None:
        return {}
    if not isinstance(value, list):
        raise TopologyParseError("numa_nodes: expected a list")
    out: dict[int, tuple[str | None, list[int] | None]] = {}
    for k, n in enumerate(value):
        where = f"numa_nodes[{k}]"
        if not isinstance(n, dict) or not isinstance(n.get("id"), int) or n["id"] < 0:
            raise TopologyParseError(f"{where}: expected an object with an 'id' >= 0")
        if n["id"] in out:
            raise TopologyParseError(f"{where}: node {n['id']} is listed twice")
        dist = n.get("distance")
        if dist is not None and (
            not isinstance(dist, list) or not all(isinstance(x, int) and x >= 0 for x in dist)
        ):
            raise TopologyParseError(f"{where}.distance: expected a list of integers")
        out[n["id"]] = (_cpulist(n.get("cpulist"), f"{where}.cpulist"), dist or None)
    return out
