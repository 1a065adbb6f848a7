"""NodeTopology from a plain-dict snapshot of what NVML reports (an :class:`NvmlView`).

The view is what :func:`topo_sched.agent.nvml_collect.collect_nvml_view` writes, and what
``fixtures/hardware/h100-x1-vm/nvml.json`` holds: JSON-ready data, so it can be saved, diffed,
replayed in tests and parsed here without a GPU. A value that NVML refused is None, or a string
starting with ``error:`` (``"error: Not Supported"``, as the fixture has it); both mean unknown.

How the record is derived:

- ``gpus[].numa_node``: the lowest node of ``memory_affinity`` (NVML's nearest-memory node mask
  at NODE scope, the source of nvidia-smi's ``NUMA Affinity`` column). None without it.
- ``gpus[].gpu_numa_id``: the view's ``numa_node`` = ``nvmlDeviceGetNumaNodeId``, which NVML
  documents as applying "only to platforms where the GPUs are NUMA nodes" (GB200: the HBM node;
  x86 HGX and the H100 VM: Not Supported). It is nvidia-smi's ``GPU NUMA ID``, not the CPU node.
- ``gpus[].cpu_affinity``: ``cpu_affinity`` words (64 CPUs per word) as a kernel cpulist.
- GPU pairs, best evidence first:

  1. active NVLinks whose remote PCI address is the other GPU (remote type GPU, or no type and
     the address matches): NV with the link count, the smaller of the two sides' counts;
  2. both GPUs have active links to NVSwitch (remote type NVSWITCH): NV with the smaller of
     their switch-link counts, ``nvswitch=True``. On HGX every NVLink ends at an NVSwitch, so
     this is what puts all eight GPUs in one island;
  3. ``p2p_nvlink`` says NVLink P2P works between them (nvmlDeviceGetP2PStatus, NVLINK index):
     NV with an unknown count (older pynvml without the remote device type on NVSwitch boxes);
  4. ``ancestor`` (nvmlDeviceGetTopologyCommonAncestor): INTERNAL/SINGLE -> PIX, MULTIPLE -> PXB,
     HOSTBRIDGE -> PHB, NODE -> NODE, SYSTEM -> SYS; where the two sides disagree, the worse.
  5. nothing known: the pair is left out of ``gpu_links``.
- ``clique``: ``"<cluster_uuid>.<clique_id>"`` (the form of the ``nvidia.com/gpu.clique`` label)
  where every GPU's fabric probe completed successfully with the same non-zero cluster UUID
  and clique id; otherwise None.
- ``nics``: NVML knows no NICs; a view may carry them (from sysfs) with an ``ancestor`` level per
  GPU index, read with the same level mapping.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from topo_sched.topology.model import (
    LINK_RANK,
    Gpu,
    GpuLink,
    LinkClass,
    Nic,
    NicLink,
    NodeTopology,
    build_node_topology,
)
from topo_sched.topology.parse._common import (
    cpus_from_mask_words,
    format_cpulist,
    normalize_pci,
    numa_cpus_from_gpus,
)
from topo_sched.topology.parse.errors import TopologyParseError

__all__ = [
    "NVML_LEVELS",
    "NvmlFabricView",
    "NvmlGpuView",
    "NvmlLinkView",
    "NvmlNicView",
    "NvmlView",
    "topology_from_nvml_view",
]


class NvmlLinkView(TypedDict):
    """One NVLink of a GPU (``link`` is its number)."""

    link: int
    #: nvmlDeviceGetNvLinkState: 1/True active, 0/False inactive.
    state: NotRequired[bool | int | None]
    #: nvmlDeviceGetNvLinkRemotePciInfo(...).busId of the device at the other end.
    remote_pci: NotRequired[str | None]
    #: nvmlDeviceGetNvLinkRemoteDeviceType as a name: GPU, NVSWITCH, IBMNPU, UNKNOWN; None when
    #: this pynvml/driver has no such call.
    remote_type: NotRequired[str | None]
    #: The NVML error text where the link could not be read ("Not Supported": no NVLink).
    error: NotRequired[str]


class NvmlFabricView(TypedDict, total=False):
    """nvmlDeviceGetGpuFabricInfo(V): multi-node NVLink (NVL72-style) membership."""

    cluster_uuid: str | None
    clique_id: int | None
    #: NVML_GPU_FABRIC_STATE_*: 0 not supported, 1 not started, 2 in progress, 3 completed.
    state: int | None
    #: nvmlReturn_t of the fabric probe; 0 = success.
    status: int | None


class NvmlGpuView(TypedDict):
    index: int
    name: NotRequired[str | None]
    uuid: NotRequired[str | None]
    #: PCI bus id as NVML prints it ("00000000:1B:00.0").
    pci: NotRequired[str | None]
    #: nvmlDeviceGetNumaNodeId: the GPU memory's own NUMA node (coherent platforms only).
    numa_node: NotRequired[int | str | None]
    #: nvmlDeviceGetCpuAffinity words, hex strings or ints, 64 CPUs per word.
    cpu_affinity: NotRequired[list[str | int] | str | None]
    #: nvmlDeviceGetMemoryAffinity(scope NODE) words: bit n = NUMA node n.
    memory_affinity: NotRequired[list[str | int] | str | None]
    mem_total: NotRequired[int | str | None]
    pcie_gen_max: NotRequired[int | str | None]
    pcie_width_max: NotRequired[int | str | None]
    pcie_gen_cur: NotRequired[int | str | None]
    pcie_width_cur: NotRequired[int | str | None]
    nvlinks: NotRequired[list[NvmlLinkView]]
    #: Other GPU index (as a string, JSON keys are) -> nvmlGpuTopologyLevel_t value (0, 10, ..
    #: 50) or its name (SINGLE, MULTIPLE, HOSTBRIDGE, NODE, SYSTEM, INTERNAL).
    ancestor: NotRequired[dict[str, int | str]]
    #: Other GPU index -> NVLink P2P status is OK.
    p2p_nvlink: NotRequired[dict[str, bool | None]]
    fabric: NotRequired[NvmlFabricView | str | None]


class NvmlNicView(TypedDict):
    name: str
    pci: NotRequired[str | None]
    numa_node: NotRequired[int | str | None]
    #: GPU index (string) -> topology level between the NIC and that GPU.
    ancestor: NotRequired[dict[str, int | str]]


class NvmlView(TypedDict):
    gpus: list[NvmlGpuView]
    kind: NotRequired[Literal["NvmlView"]]
    driver: NotRequired[str | None]
    node_name: NotRequired[str | None]
    nics: NotRequired[list[NvmlNicView]]


#: nvmlGpuTopologyLevel_t -> link class (nvidia-smi uses the same correspondence).
NVML_LEVELS: dict[int, LinkClass] = {
    0: LinkClass.PIX,  # INTERNAL: two GPUs on one board
    10: LinkClass.PIX,  # SINGLE
    20: LinkClass.PXB,  # MULTIPLE
    30: LinkClass.PHB,  # HOSTBRIDGE
    40: LinkClass.NODE,  # NODE (formerly CPU)
    50: LinkClass.SYS,  # SYSTEM
}
_LEVEL_NAMES: dict[str, LinkClass] = {
    "INTERNAL": LinkClass.PIX,
    "SINGLE": LinkClass.PIX,
    "MULTIPLE": LinkClass.PXB,
    "HOSTBRIDGE": LinkClass.PHB,
    "NODE": LinkClass.NODE,
    "CPU": LinkClass.NODE,
    "SYSTEM": LinkClass.SYS,
    **{c.value: c for c in (LinkClass.PIX, LinkClass.PXB, LinkClass.PHB, LinkClass.SYS)},
}
_REMOTE_TYPES = {0: "GPU", 1: "IBMNPU", 2: "NVSWITCH", 255: "UNKNOWN"}
_REMOTE_NAMES = {"GPU": "GPU", "IBMNPU": "IBMNPU", "NVSWITCH": "NVSWITCH", "SWITCH": "NVSWITCH"}
_FABRIC_COMPLETED = 3


def topology_from_nvml_view(
    view: NvmlView | dict[str, Any], *, node_name: str | None = None
) -> NodeTopology:
    """Build a NodeTopology (source ``nvml``) from an NVML view; TopologyParseError if malformed."""
    if not isinstance(view, dict):
        raise TopologyParseError("NVML view: expected a JSON object")
    raw_gpus = view.get("gpus")
    if not isinstance(raw_gpus, list) or not raw_gpus:
        raise TopologyParseError("NVML view: 'gpus' must be a non-empty list")

    gpus: list[Gpu] = []
    numa_lists: dict[int, list[int] | None] = {}
    pci_of: dict[int, str | None] = {}
    for k, g in enumerate(raw_gpus):
        where = f"gpus[{k}]"
        if not isinstance(g, dict):
            raise TopologyParseError(f"{where}: expected an object")
        idx = g.get("index")
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise TopologyParseError(f"{where}.index: expected a GPU index >= 0, got {idx!r}")
        if idx in pci_of:
            raise TopologyParseError(f"{where}.index: GPU {idx} is listed twice")
        pci_of[idx] = _pci(g.get("pci"), f"{where}.pci")
        mem_nodes = _mask(g.get("memory_affinity"), f"{where}.memory_affinity")
        cpus = _mask(g.get("cpu_affinity"), f"{where}.cpu_affinity")
        numa_lists[idx] = mem_nodes or None
        gpus.append(
            Gpu(
                index=idx,
                name=_str(g.get("name"), f"{where}.name"),
                uuid=_str(g.get("uuid"), f"{where}.uuid"),
                pci_bus_id=pci_of[idx],
                numa_node=min(mem_nodes) if mem_nodes else None,
                gpu_numa_id=_node(g.get("numa_node"), f"{where}.numa_node"),
                cpu_affinity=format_cpulist(cpus) if cpus else None,
            )
        )
    seen_pci = [p for p in pci_of.values() if p is not None]
    if len(set(seen_pci)) != len(seen_pci):
        raise TopologyParseError("NVML view: two GPUs share a PCI address")
    gpu_at = {p: i for i, p in pci_of.items() if p is not None}
    by_index = {g["index"]: g for g in raw_gpus}

    direct: dict[int, dict[int, int]] = {i: {} for i in by_index}
    switch: dict[int, int] = dict.fromkeys(by_index, 0)
    has_links: dict[int, bool] = dict.fromkeys(by_index, False)
    for k, g in enumerate(raw_gpus):
        i = g["index"]
        links = g.get("nvlinks") or []
        if not isinstance(links, list):
            raise TopologyParseError(f"gpus[{k}].nvlinks: expected a list")
        for n, lk in enumerate(links):
            where = f"gpus[{k}].nvlinks[{n}]"
            if not isinstance(lk, dict):
                raise TopologyParseError(f"{where}: expected an object")
            if "error" in lk or not _active(lk.get("state"), f"{where}.state"):
                continue
            has_links[i] = True
            rtype = _remote_type(lk.get("remote_type"), f"{where}.remote_type")
            rpci = _pci(lk.get("remote_pci"), f"{where}.remote_pci")
            if rtype == "NVSWITCH":
                switch[i] += 1
            elif rtype in ("GPU", None) and rpci in gpu_at and gpu_at[rpci] != i:
                j = gpu_at[rpci]
                direct[i][j] = direct[i].get(j, 0) + 1

    ancestors = {i: _levels(g.get("ancestor"), f"GPU {i} ancestor") for i, g in by_index.items()}
    p2p = {i: g.get("p2p_nvlink") or {} for i, g in by_index.items()}
    order = sorted(by_index)
    gpu_links: list[GpuLink] = []
    for pos, a in enumerate(order):
        for b in order[pos + 1 :]:
            ab, ba = direct[a].get(b, 0), direct[b].get(a, 0)
            count = min(ab, ba) if has_links[a] and has_links[b] else max(ab, ba)
            if switch[a] and switch[b]:
                count += min(switch[a], switch[b])
            if count:
                gpu_links.append(GpuLink(a=a, b=b, link=LinkClass.NVLINK, nvlinks=count))
                continue
            if p2p[a].get(str(b)) is True or p2p[b].get(str(a)) is True:
                gpu_links.append(GpuLink(a=a, b=b, link=LinkClass.NVLINK))
                continue
            levels = [x for x in (ancestors[a].get(b), ancestors[b].get(a)) if x is not None]
            if levels:
                worst = max(levels, key=LINK_RANK.__getitem__)
                gpu_links.append(GpuLink(a=a, b=b, link=worst))

    nics, nic_links = _nics(view.get("nics"), set(by_index))
    numa_cpus = numa_cpus_from_gpus(
        {g.index: g.numa_node for g in gpus}, numa_lists, {g.index: g.cpu_affinity for g in gpus}
    )
    name = node_name if node_name is not None else _str(view.get("node_name"), "node_name")
    return build_node_topology(
        source="nvml",
        node_name=name,
        gpus=gpus,
        nics=nics,
        gpu_links=gpu_links,
        nic_links=nic_links,
        numa_cpus=numa_cpus or None,
        nvswitch=any(switch.values()),
        clique=_clique(raw_gpus),
    )


# -- field readers -------------------------------------------------------------------------------


def _unknown(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.startswith("error"))


def _str(value: Any, where: str) -> str | None:
    if _unknown(value):
        return None
    if not isinstance(value, str):
        raise TopologyParseError(f"{where}: expected a string, got {value!r}")
    return value


def _pci(value: Any, where: str) -> str | None:
    s = _str(value, where)
    if s is None:
        return None
    try:
        return normalize_pci(s)
    except ValueError as e:
        raise TopologyParseError(f"{where}: {e}") from None


def _node(value: Any, where: str) -> int | None:
    if _unknown(value):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyParseError(f"{where}: expected a NUMA node number, got {value!r}")
    return value if value >= 0 else None


def _mask(value: Any, where: str) -> list[int]:
    if _unknown(value):
        return []
    if not isinstance(value, list):
        raise TopologyParseError(f"{where}: expected a list of 64-bit mask words")
    try:
        return cpus_from_mask_words(value)
    except (ValueError, TypeError) as e:
        raise TopologyParseError(f"{where}: {e}") from None


def _active(value: Any, where: str) -> bool:
    if _unknown(value):
        return False
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise TopologyParseError(f"{where}: expected 0/1 or a boolean, got {value!r}")


def _remote_type(value: Any, where: str) -> str | None:
    if _unknown(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value in _REMOTE_TYPES:
        return _REMOTE_TYPES[value]
    if isinstance(value, str):
        up = value.upper().removeprefix("NVML_NVLINK_DEVICE_TYPE_")
        if up in _REMOTE_NAMES:
            return _REMOTE_NAMES[up]
        if up == "UNKNOWN":
            return "UNKNOWN"
    raise TopologyParseError(f"{where}: unknown NVLink remote device type {value!r}")


def _level(value: Any, where: str) -> LinkClass | None:
    if _unknown(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value in NVML_LEVELS:
        return NVML_LEVELS[value]
    if isinstance(value, str):
        up = value.upper().removeprefix("NVML_TOPOLOGY_")
        if up in _LEVEL_NAMES:
            return _LEVEL_NAMES[up]
    raise TopologyParseError(f"{where}: unknown topology level {value!r}")


def _levels(value: Any, where: str) -> dict[int, LinkClass]:
    if _unknown(value):
        return {}
    if not isinstance(value, dict):
        raise TopologyParseError(f"{where}: expected an object of GPU index -> level")
    out: dict[int, LinkClass] = {}
    for key, lvl in value.items():
        try:
            other = int(key)
        except ValueError:
            raise TopologyParseError(f"{where}: key {key!r} is not a GPU index") from None
        cls = _level(lvl, f"{where}[{key}]")
        if cls is not None:
            out[other] = cls
    return out


def _nics(value: Any, known: set[int]) -> tuple[list[Nic], list[NicLink]]:
    if _unknown(value):
        return [], []
    if not isinstance(value, list):
        raise TopologyParseError("nics: expected a list")
    nics: list[Nic] = []
    links: list[NicLink] = []
    for k, n in enumerate(value):
        where = f"nics[{k}]"
        if not isinstance(n, dict) or not isinstance(n.get("name"), str) or not n["name"]:
            raise TopologyParseError(f"{where}: expected an object with a 'name'")
        if any(x.name == n["name"] for x in nics):
            raise TopologyParseError(f"{where}: NIC {n['name']!r} is listed twice")
        nics.append(Nic(name=n["name"], numa_node=_node(n.get("numa_node"), f"{where}.numa_node")))
        for gpu, cls in sorted(_levels(n.get("ancestor"), f"{where}.ancestor").items()):
            if gpu not in known:
                raise TopologyParseError(f"{where}.ancestor: GPU {gpu} is not in the view")
            links.append(NicLink(gpu=gpu, nic=n["name"], link=cls))
    return nics, links


def _clique(raw_gpus: list[dict[str, Any]]) -> str | None:
    ids: set[str] = set()
    for g in raw_gpus:
        f = g.get("fabric")
        if not isinstance(f, dict):
            return None
        uuid, clique = f.get("cluster_uuid"), f.get("clique_id")
        if f.get("state") != _FABRIC_COMPLETED or f.get("status") not in (0, None):
            return None
        if not isinstance(uuid, str) or not uuid.strip("0-") or not isinstance(clique, int):
            return None
        ids.add(f"{uuid}.{clique}")
    return ids.pop() if len(ids) == 1 else None
