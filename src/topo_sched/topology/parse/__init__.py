"""Parsers: text or already-read data in, a NodeTopology out. Pure, no I/O.

- :func:`parse_nvidia_smi_topo`: ``nvidia-smi topo -m``;
- :func:`parse_rocm_smi_showtopo`: ``rocm-smi --showtopo``;
- :func:`topology_from_nvml_view`: an NVML snapshot dict (agent.nvml_collect);
- :func:`topology_from_sysfs_view`: a sysfs snapshot dict (agent.sysfs_collect);
- :func:`parse_any` / :func:`detect_format`: any of the above, or a NodeTopology JSON.

Every parser raises :class:`TopologyParseError` (a ValueError) rather than return a record the
input does not support.
"""

from topo_sched.topology.parse.detect import FORMATS, Format, detect_format, parse_any
from topo_sched.topology.parse.errors import TopologyParseError
from topo_sched.topology.parse.nvidia_smi import parse_nvidia_smi_topo
from topo_sched.topology.parse.nvml import NvmlView, topology_from_nvml_view
from topo_sched.topology.parse.rocm_smi import parse_rocm_smi_showtopo
from topo_sched.topology.parse.sysfs import SysfsView, topology_from_sysfs_view

__all__ = [
    "FORMATS",
    "Format",
    "NvmlView",
    "SysfsView",
    "TopologyParseError",
    "detect_format",
    "parse_any",
    "parse_nvidia_smi_topo",
    "parse_rocm_smi_showtopo",
    "topology_from_nvml_view",
    "topology_from_sysfs_view",
]
