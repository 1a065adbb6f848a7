"""The agent's output on a real H100 agrees with what nvidia-smi printed on the same machine."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from topo_sched.topology.model import NodeTopology
from topo_sched.topology.parse.nvidia_smi import parse_nvidia_smi_topo

CAPTURE = Path(__file__).parent / "fixtures" / "h100-x1"


def agent_record(method: str) -> tuple[dict, NodeTopology]:
    data = json.loads((CAPTURE / f"agent-{method}.json").read_text())
    return data, NodeTopology.model_validate(data["topology"])


@pytest.mark.parametrize("method", ["default", "nvidia-smi", "sysfs"])
def test_agent_record_matches_nvidia_smi_topo(method):
    data, topo = agent_record(method)
    smi = parse_nvidia_smi_topo((CAPTURE / "nvidia-smi-topo-m.txt").read_text())
    assert data["method"] == ("nvml" if method == "default" else method)
    assert [g.index for g in topo.gpus] == [g.index for g in smi.gpus] == [0]
    assert [g.numa_node for g in topo.gpus] == [g.numa_node for g in smi.gpus]
    assert [g.cpu_affinity for g in topo.gpus] == [g.cpu_affinity for g in smi.gpus] == ["0-15"]
    assert topo.nvlink_islands == smi.nvlink_islands == [[0]]


def test_agent_identities_match_nvidia_smi_query():
    rows = list(csv.reader((CAPTURE / "query-gpu.csv").read_text().splitlines()))
    uuid, name, bus = rows[0][1].strip(), rows[0][2].strip(), rows[0][3].strip()
    for method in ("default", "nvidia-smi"):
        _, topo = agent_record(method)
        gpu = topo.gpus[0]
        assert gpu.uuid == uuid and gpu.name == name
        assert gpu.pci_bus_id == bus.lower().replace("00000000:", "0000:")
    assert uuid in (CAPTURE / "nvidia-smi-L.txt").read_text()


def test_no_kubelet_on_the_capture_machine_is_reported_not_fatal():
    data, _ = agent_record("default")
    assert data["gpu_allocation"] is None
    assert "kubelet.sock" in data["gpu_allocation_error"]
