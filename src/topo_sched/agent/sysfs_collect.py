"""Read the parts of sysfs that describe GPU/NIC/NUMA locality into a plain dict (a SysfsView).

``root`` is the filesystem root to read under (``/`` on a host; a DaemonSet that mounts the
host's /sys elsewhere passes that parent; tests pass a fake tree). Turned into a NodeTopology by
:func:`topo_sched.topology.parse.sysfs.topology_from_sysfs_view`.

Read:

- ``sys/bus/pci/devices/*``: NVIDIA (vendor 0x10de) functions only: vendor, device, class,
  numa_node, local_cpulist, and the resolved path below ``sys/devices`` (where the entry is a
  symlink, as it is on a real system) so that PCIe switches can be seen;
- ``sys/class/infiniband/*`` and ``sys/class/net/*``: name, the PCI function behind ``device``
  (virtual interfaces without one are skipped) and its numa_node, local_cpulist and path;
- ``sys/devices/system/node/node*``: cpulist and distance.

Unreadable files give None for that field; nothing here raises for a missing directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = ["collect_sysfs_view"]

_PCI_ADDR_RE = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_NODE_DIR_RE = re.compile(r"^node(\d+)$")
NVIDIA_VENDOR = "0x10de"


def collect_sysfs_view(root: Path = Path("/"), *, node_name: str | None = None) -> dict[str, Any]:
    """Walk ``root``/sys and return a SysfsView dict (see topology.parse.sysfs)."""
    sys_dir = Path(root) / "sys"
    devices_dir = sys_dir / "devices"
    pci: list[dict[str, Any]] = []
    for entry in _listdir(sys_dir / "bus" / "pci" / "devices"):
        dev = sys_dir / "bus" / "pci" / "devices" / entry
        vendor = _read(dev / "vendor")
        if vendor is None or vendor.lower() != NVIDIA_VENDOR:
            continue
        pci.append(
            {
                "address": entry,
                "vendor": vendor.lower(),
                "class": (_read(dev / "class") or "").lower() or None,
                "device": _read(dev / "device"),
                "numa_node": _read_int(dev / "numa_node"),
                "local_cpulist": _read(dev / "local_cpulist"),
                "path": _device_path(dev, devices_dir),
            }
        )

    nics: list[dict[str, Any]] = []
    for subsystem in ("infiniband", "net"):
        base = sys_dir / "class" / subsystem
        for name in _listdir(base):
            link = base / name / "device"
            if not link.exists():
                continue  # virtual interface (lo, bridges, veth, ...)
            fn = _pci_function(link)
            if fn is None:
                continue
            nics.append(
                {
                    "name": name,
                    "subsystem": subsystem,
                    "address": fn.name,
                    "numa_node": _read_int(fn / "numa_node"),
                    "local_cpulist": _read(fn / "local_cpulist"),
                    "path": _device_path(fn, devices_dir),
                }
            )

    nodes: list[dict[str, Any]] = []
    node_base = devices_dir / "system" / "node"
    for entry in _listdir(node_base):
        m = _NODE_DIR_RE.match(entry)
        if not m:
            continue
        dist = _read(node_base / entry / "distance")
        nodes.append(
            {
                "id": int(m.group(1)),
                "cpulist": _read(node_base / entry / "cpulist"),
                "distance": [int(x) for x in dist.split()] if dist else None,
            }
        )
    nodes.sort(key=lambda n: n["id"])

    view: dict[str, Any] = {
        "kind": "SysfsView",
        "pci_devices": sorted(pci, key=lambda d: d["address"]),
        "nics": nics,
        "numa_nodes": nodes,
    }
    if node_name is not None:
        view["node_name"] = node_name
    return view


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _pci_function(device_link: Path) -> Path | None:
    """The PCI function directory a class device hangs off (walking up past virtio0 etc.)."""
    try:
        real = device_link.resolve(strict=True)
    except OSError:
        return None
    for p in (real, *real.parents):
        if _PCI_ADDR_RE.match(p.name):
            return p
    return None


def _device_path(dev: Path, devices_dir: Path) -> list[str] | None:
    """Path components below sys/devices ("pci0000:00", bridges..., the device), or None."""
    try:
        real = dev.resolve(strict=True)
        rel = real.relative_to(devices_dir.resolve(strict=True))
    except (OSError, ValueError):
        return None
    parts = list(rel.parts)
    if not parts or not parts[0].startswith("pci"):
        return None
    return parts
