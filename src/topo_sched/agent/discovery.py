"""Discover this node's GPU topology: NVML first, ``nvidia-smi topo -m`` next, sysfs last.

Each method that cannot run says why (no NVML library, no ``nvidia-smi`` on PATH, a parse
error, no NVIDIA PCI devices) and the next one is tried; the result names the method used
and the reasons the better ones were skipped, and the agent logs both.

Synchronous; called from the agent's single loop thread.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from topo_sched.topology.model import NodeTopology
from topo_sched.topology.parse._common import normalize_pci

log = logging.getLogger(__name__)

METHODS = ("nvml", "nvidia-smi", "sysfs")
NVIDIA_SMI_TIMEOUT_S = 30.0


class DiscoveryError(RuntimeError):
    """No method could describe this node's GPUs."""


@dataclass(frozen=True)
class Discovery:
    topology: NodeTopology
    method: str
    #: Why each better method was skipped, in order tried.
    skipped: list[str] = field(default_factory=list)


def _load_pynvml() -> ModuleType:
    import pynvml  # nvidia-ml-py; importing works without a driver, nvmlInit does not

    return pynvml


def _via_nvml(load: Callable[[], ModuleType]) -> NodeTopology:
    from topo_sched.agent.nvml_collect import collect_nvml_view
    from topo_sched.topology.parse.nvml import topology_from_nvml_view

    return topology_from_nvml_view(collect_nvml_view(load()))


def run_command(argv: Sequence[str], timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> str:
    """Run a command and return stdout; raise RuntimeError with its stderr on failure."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{argv[0]}: {e}") from None
    if done.returncode != 0:
        first = (done.stderr or done.stdout).strip().splitlines()[:1]
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {' '.join(first)}")
    return done.stdout


def _pci_or_raw(text: str) -> str:
    try:
        return normalize_pci(text)
    except ValueError:
        return text


def _gpu_identities(run: Callable[[Sequence[str]], str], smi: str) -> dict[int, dict[str, str]]:
    """index -> uuid, name, pci bus id, from ``nvidia-smi --query-gpu`` (topo -m lacks them)."""
    out = run([smi, "--query-gpu=index,uuid,name,pci.bus_id", "--format=csv,noheader"])
    ids: dict[int, dict[str, str]] = {}
    for row in csv.reader(io.StringIO(out)):
        if len(row) >= 4 and row[0].strip().isdigit():
            ids[int(row[0])] = {
                "uuid": row[1].strip(),
                "name": row[2].strip(),
                "pci_bus_id": _pci_or_raw(row[3].strip()),
            }
    return ids


def _via_nvidia_smi(run: Callable[[Sequence[str]], str]) -> NodeTopology:
    from topo_sched.topology.parse.nvidia_smi import parse_nvidia_smi_topo

    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise RuntimeError("nvidia-smi is not on PATH")
    topo = parse_nvidia_smi_topo(run([smi, "topo", "-m"]))
    try:
        ids = _gpu_identities(run, smi)
    except RuntimeError as e:
        log.warning("nvidia-smi gave the matrix but not GPU UUIDs (%s); pods cannot be mapped", e)
        return topo
    gpus = [g.model_copy(update=ids.get(g.index, {})) for g in topo.gpus]
    return topo.model_copy(update={"gpus": gpus})


def _via_sysfs(root: Path) -> NodeTopology:
    from topo_sched.agent.sysfs_collect import collect_sysfs_view
    from topo_sched.topology.parse.sysfs import topology_from_sysfs_view

    return topology_from_sysfs_view(collect_sysfs_view(root))


def discover(
    *,
    node_name: str | None = None,
    methods: Sequence[str] = METHODS,
    load_nvml: Callable[[], ModuleType] = _load_pynvml,
    run: Callable[[Sequence[str]], str] = run_command,
    sysfs_root: Path = Path("/"),
) -> Discovery:
    """The first method that finds at least one GPU wins."""
    skipped: list[str] = []
    for method in methods:
        try:
            if method == "nvml":
                topo = _via_nvml(load_nvml)
            elif method == "nvidia-smi":
                topo = _via_nvidia_smi(run)
            elif method == "sysfs":
                topo = _via_sysfs(sysfs_root)
            else:
                raise ValueError(f"unknown discovery method {method!r} (known: {METHODS})")
        except ValueError as e:
            if str(e).startswith("unknown discovery method"):
                raise DiscoveryError(str(e)) from None
            skipped.append(f"{method}: {e}")
            continue
        except Exception as e:  # NVML raises its own error classes; each means "try the next"
            skipped.append(f"{method}: {type(e).__name__}: {e}")
            continue
        if not topo.gpus:
            skipped.append(f"{method}: found no GPUs")
            continue
        if node_name:
            topo = topo.model_copy(update={"node_name": node_name})
        return Discovery(topo, method, skipped)
    raise DiscoveryError("no GPU topology found; " + "; ".join(skipped))
