"""Tell which kind of topology text this is, and parse it with the right parser.

Formats:

- ``nvidia-smi``: ``nvidia-smi topo -m`` output (also inside a ``## ...`` multi-command capture);
- ``rocm-smi``: ``rocm-smi --showtopo`` output;
- ``nvml-json``: an NvmlView (``collect_nvml_view`` output or fixtures/hardware/*/nvml.json);
- ``sysfs-json``: a SysfsView (``collect_sysfs_view`` output);
- ``node-topology``: a NodeTopology record (``kind: NodeTopology``), re-validated.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, get_args

from pydantic import ValidationError

from topo_sched.topology.model import NodeTopology
from topo_sched.topology.parse._common import strip_ansi
from topo_sched.topology.parse.errors import TopologyParseError
from topo_sched.topology.parse.nvidia_smi import parse_nvidia_smi_topo
from topo_sched.topology.parse.nvml import topology_from_nvml_view
from topo_sched.topology.parse.rocm_smi import parse_rocm_smi_showtopo
from topo_sched.topology.parse.sysfs import topology_from_sysfs_view

__all__ = ["FORMATS", "Format", "detect_format", "parse_any"]

Format = Literal["nvidia-smi", "rocm-smi", "nvml-json", "sysfs-json", "node-topology"]
FORMATS: tuple[str, ...] = get_args(Format)

_ROCM_RE = re.compile(r"ROCm System Management Interface|=+\s*Link Type between two GPUs\s*=+")
_NVSMI_RE = re.compile(r"^[ \t]*GPU\d+[ \t]", re.MULTILINE)


def detect_format(text: str) -> Format:
    """The format of ``text``; TopologyParseError (with a line) if it is none of them."""
    body = text.lstrip("\ufeff")
    if not body.strip():
        raise TopologyParseError("empty input", 1)
    if body.lstrip().startswith(("{", "[")):
        return _json_format(_load_json(body))
    plain = strip_ansi(body)
    if _ROCM_RE.search(plain):
        return "rocm-smi"
    if _NVSMI_RE.search(plain):
        return "nvidia-smi"
    first = next(i for i, ln in enumerate(plain.split("\n")) if ln.strip())
    raise TopologyParseError(
        "not a topology format this tool reads (nvidia-smi topo -m, rocm-smi --showtopo, "
        "an NVML/sysfs view or a NodeTopology JSON)",
        first + 1,
    )


def parse_any(
    text: str, fmt: Format | str | None = None, *, node_name: str | None = None
) -> NodeTopology:
    """Parse ``text`` as ``fmt`` (detected when None). ``node_name`` overrides the record's."""
    if fmt is None:
        fmt = detect_format(text)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    text = text.lstrip("\ufeff")
    if fmt == "nvidia-smi":
        return parse_nvidia_smi_topo(text, node_name=node_name)
    if fmt == "rocm-smi":
        return parse_rocm_smi_showtopo(text, node_name=node_name)
    data = _load_json(text)
    if fmt == "nvml-json":
        return topology_from_nvml_view(data, node_name=node_name)
    if fmt == "sysfs-json":
        return topology_from_sysfs_view(data, node_name=node_name)
    try:
        topo = NodeTopology.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        raise TopologyParseError(f"not a valid NodeTopology: {loc}: {err['msg']}") from None
    if node_name is not None:
        topo = topo.model_copy(update={"node_name": node_name})
    return topo


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TopologyParseError(f"invalid JSON: {e.msg} (column {e.colno})", e.lineno) from None


def _json_format(data: Any) -> Format:
    if not isinstance(data, dict):
        raise TopologyParseError("JSON input must be an object", 1)
    kind = data.get("kind")
    if kind == "NodeTopology" or "nvlink_islands" in data:
        return "node-topology"
    if kind == "NvmlView":
        return "nvml-json"
    if kind == "SysfsView" or "pci_devices" in data:
        return "sysfs-json"
    gpus = data.get("gpus")
    if isinstance(gpus, list) and gpus and all(isinstance(g, dict) for g in gpus):
        nvml_keys = {"uuid", "nvlinks", "ancestor", "cpu_affinity", "pci", "memory_affinity"}
        if any(nvml_keys & g.keys() for g in gpus):
            return "nvml-json"
    raise TopologyParseError(
        "JSON is not a NodeTopology, an NVML view (gpus[] with uuid/pci/nvlinks) or a sysfs "
        "view (pci_devices[])",
        1,
    )
