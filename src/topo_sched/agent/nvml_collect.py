"""Read what NVML reports about this machine's GPUs into a plain dict (an NvmlView).

The only I/O here is NVML itself, through whatever module is passed in (``pynvml`` in
production, a fake in tests), so the result can be saved as JSON, replayed, and turned into a
NodeTopology by :func:`topo_sched.topology.parse.nvml.topology_from_nvml_view`.

Every call beyond init / device count / handles is optional: a missing function (older
nvidia-ml-py) or an NVMLError (NotSupported in a VM, NoPermission, FunctionNotFound on an old
driver) leaves the field None and the collection goes on. NVLinks are probed link 0 upwards and
the probe stops at the first link that errors (recorded as ``{"link": n, "error": "..."}``, as
the H100 VM fixture has it), so a GPU without NVLink costs one call.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import uuid
from typing import Any

__all__ = ["collect_nvml_view"]

_REMOTE_TYPES = {0: "GPU", 1: "IBMNPU", 2: "NVSWITCH", 255: "UNKNOWN"}
_DEFAULT_MAX_LINKS = 18


class _Missing(Exception):
    """The pynvml module has no such function."""


def collect_nvml_view(
    pynvml_module: Any,
    *,
    cpu_set_words: int | None = None,
    node_set_words: int = 1,
    max_links: int | None = None,
    node_name: str | None = None,
) -> dict[str, Any]:
    """Call NVML through ``pynvml_module`` and return an NvmlView dict.

    ``cpu_set_words``: 64-bit words of CPU mask to ask for (default: enough for this host's
    CPUs, at least 4). ``node_set_words``: words of NUMA node mask (64 nodes each).
    ``max_links``: NVLinks to probe per GPU (default NVML_NVLINK_MAX_LINKS, else 18).
    """
    nv = pynvml_module
    words = cpu_set_words or max(4, -(-(os.cpu_count() or 1) // 64))
    links_to_probe = max_links or int(getattr(nv, "NVML_NVLINK_MAX_LINKS", _DEFAULT_MAX_LINKS))
    nv.nvmlInit()
    try:
        driver = _text(_opt(nv, "nvmlSystemGetDriverVersion"))
        count = int(nv.nvmlDeviceGetCount())
        handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus = [
            _gpu(nv, i, h, words, node_set_words, links_to_probe) for i, h in enumerate(handles)
        ]
        level_nvlink = getattr(nv, "NVML_P2P_CAPS_INDEX_NVLINK", 2)
        status_ok = getattr(nv, "NVML_P2P_STATUS_OK", 0)
        for i, hi in enumerate(handles):
            ancestor: dict[str, int] = {}
            p2p: dict[str, bool] = {}
            for j, hj in enumerate(handles):
                if i == j:
                    continue
                level = _opt(nv, "nvmlDeviceGetTopologyCommonAncestor", hi, hj)
                if level is not None:
                    ancestor[str(j)] = int(level)
                status = _opt(nv, "nvmlDeviceGetP2PStatus", hi, hj, level_nvlink)
                if status is not None:
                    p2p[str(j)] = int(status) == status_ok
            gpus[i]["ancestor"] = ancestor
            if p2p:
                gpus[i]["p2p_nvlink"] = p2p
    finally:
        # shutting down must not hide the real result or error
        with contextlib.suppress(Exception):
            nv.nvmlShutdown()
    view: dict[str, Any] = {"kind": "NvmlView", "driver": driver, "gpus": gpus}
    if node_name is not None:
        view["node_name"] = node_name
    return view


def _gpu(
    nv: Any, index: int, h: Any, words: int, node_words: int, max_links: int
) -> dict[str, Any]:
    pci_info = _opt(nv, "nvmlDeviceGetPciInfo", h)
    mem = _opt(nv, "nvmlDeviceGetMemoryInfo", h)
    scope_node = getattr(nv, "NVML_AFFINITY_SCOPE_NODE", 0)
    return {
        "index": index,
        "name": _text(_opt(nv, "nvmlDeviceGetName", h)),
        "uuid": _text(_opt(nv, "nvmlDeviceGetUUID", h)),
        "pci": _bus_id(pci_info),
        "numa_node": _int(_opt(nv, "nvmlDeviceGetNumaNodeId", h)),
        "cpu_affinity": _words(_opt(nv, "nvmlDeviceGetCpuAffinity", h, words)),
        "memory_affinity": _words(
            _opt(nv, "nvmlDeviceGetMemoryAffinity", h, node_words, scope_node)
        ),
        "mem_total": _int(getattr(mem, "total", None)),
        "pcie_gen_max": _int(_opt(nv, "nvmlDeviceGetMaxPcieLinkGeneration", h)),
        "pcie_width_max": _int(_opt(nv, "nvmlDeviceGetMaxPcieLinkWidth", h)),
        "pcie_gen_cur": _int(_opt(nv, "nvmlDeviceGetCurrPcieLinkGeneration", h)),
        "pcie_width_cur": _int(_opt(nv, "nvmlDeviceGetCurrPcieLinkWidth", h)),
        "nvlinks": _nvlinks(nv, h, max_links),
        "fabric": _fabric(nv, h),
    }


def _nvlinks(nv: Any, h: Any, max_links: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    state_fn = getattr(nv, "nvmlDeviceGetNvLinkState", None)
    if state_fn is None:
        return out
    for link in range(max_links):
        try:
            state = state_fn(h, link)
        except nv.NVMLError as e:
            out.append({"link": link, "error": _err(e)})
            break
        entry: dict[str, Any] = {"link": link, "state": int(state)}
        if int(state):
            entry["remote_pci"] = _bus_id(_opt(nv, "nvmlDeviceGetNvLinkRemotePciInfo", h, link))
            rtype = _opt(nv, "nvmlDeviceGetNvLinkRemoteDeviceType", h, link)
            entry["remote_type"] = (
                None if rtype is None else _REMOTE_TYPES.get(int(rtype), "UNKNOWN")
            )
        out.append(entry)
    return out


def _fabric(nv: Any, h: Any) -> dict[str, Any] | None:
    """nvmlDeviceGetGpuFabricInfoV, falling back to the older nvmlDeviceGetGpuFabricInfo."""
    for fn_name, struct_name in (
        ("nvmlDeviceGetGpuFabricInfoV", "c_nvmlGpuFabricInfoV_t"),
        ("nvmlDeviceGetGpuFabricInfo", "c_nvmlGpuFabricInfo_t"),
    ):
        fn, struct = getattr(nv, fn_name, None), getattr(nv, struct_name, None)
        if fn is None or struct is None:
            continue
        info = struct()
        # pynvml hands this argument to the C library as is: it must be a pointer (byref), a
        # Structure passed by value is read as a wild pointer (seen to crash the process)
        arg = ctypes.byref(info) if isinstance(info, ctypes.Structure) else info
        try:
            fn(h, arg)
        except nv.NVMLError:
            return None
        raw = bytes(bytearray(info.clusterUuid))[:16]  # some pynvml versions declare 80 bytes
        cluster = str(uuid.UUID(bytes=raw)) if len(raw) == 16 and any(raw) else None
        return {
            "cluster_uuid": cluster,
            "clique_id": int(info.cliqueId),
            "state": int(info.state),
            "status": int(info.status),
        }
    return None


# -- helpers ----------------------------------------------------------------------------------


def _opt(nv: Any, fn_name: str, *args: Any) -> Any:
    fn = getattr(nv, fn_name, None)
    if fn is None:
        return None
    try:
        return fn(*args)
    except nv.NVMLError:
        return None


def _err(e: Exception) -> str:
    try:
        return str(e) or type(e).__name__
    except Exception:  # pynvml's __str__ calls into the library
        return type(e).__name__


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _bus_id(pci_info: Any) -> str | None:
    if pci_info is None:
        return None
    return _text(getattr(pci_info, "busId", None))


def _words(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [hex(int(w)) for w in value]
