"""The node agent end to end: discovery through a real `nvidia-smi`-shaped executable, GPU owners
from a real gRPC kubelet on a unix socket, annotations written through the real kubernetes
client to recorded kube-apiserver answers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fake_kubelet import Container, FakeKubelet, Pod
from topo_sched import labels as L
from topo_sched.agent.daemon import Agent, AgentSettings
from topo_sched.agent.discovery import DiscoveryError, discover
from topo_sched.agent.publisher import AnnotationPublisher
from topo_sched.kube.nodes import get_node, patch_node_annotations

pytest_plugins = ("tests.support.apiserver_replay",)

HGX = "topology/nvidia-smi-topo/hgx-h100-80gb-8gpu-8nic-rail-pix.txt"
UUIDS = [f"GPU-{i:08x}-aaaa-bbbb-cccc-{i:012x}" for i in range(8)]


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `nvidia-smi` on PATH that answers `topo -m` with a real capture and `--query-gpu`."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (tmp_path / "topo.txt").write_text((fixtures_dir / HGX).read_text())
    csv = "".join(
        f"{i}, {u}, NVIDIA H100 80GB HBM3, 00000000:{0x18 + i:02X}:00.0\n"
        for i, u in enumerate(UUIDS)
    )
    (tmp_path / "query.csv").write_text(csv)
    script = bindir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$1" in topo) cat "{tmp_path}/topo.txt";; '
        f'--query-gpu*) cat "{tmp_path}/query.csv";; *) echo "unexpected $*" >&2; exit 9;; esac\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return bindir


def _no_nvml():
    raise OSError("libnvidia-ml.so.1: cannot open shared object file")


def test_discovery_falls_back_to_nvidia_smi_and_says_why(fake_nvidia_smi):
    found = discover(node_name="gpu-node-1", load_nvml=_no_nvml)
    assert found.method == "nvidia-smi"
    assert (
        found.skipped
        and found.skipped[0].startswith("nvml:")
        and "libnvidia-ml" in found.skipped[0]
    )
    topo = found.topology
    assert topo.node_name == "gpu-node-1" and topo.nvlink_islands == [list(range(8))]
    assert [g.uuid for g in topo.gpus] == UUIDS
    assert topo.gpus[1].pci_bus_id == "0000:19:00.0"


def test_discovery_with_nothing_available_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    with pytest.raises(DiscoveryError) as e:
        discover(load_nvml=_no_nvml, sysfs_root=tmp_path)
    msg = str(e.value)
    assert "nvml:" in msg and "nvidia-smi is not on PATH" in msg and "sysfs" in msg


def _kubelet_pods():
    return [
        Pod("llm", "demo-prefill-0", [Container("engine", {L.RESOURCE_NVIDIA_GPU: UUIDS[0:2]})]),
        Pod("llm", "demo-decode-0", [Container("engine", {L.RESOURCE_NVIDIA_GPU: [UUIDS[5]]})]),
        Pod("kube-system", "cni", [Container("c", {})]),
    ]


def test_once_print_shows_record_and_allocation(fake_nvidia_smi):
    with FakeKubelet(pods=_kubelet_pods()) as kubelet:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "topo_sched.cli",
                "agent",
                "--once",
                "--print",
                "--node-name",
                "gpu-node-1",
                "--socket",
                kubelet.socket_path,
                "--method",
                "nvidia-smi",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["method"] == "nvidia-smi"
    assert data["topology"]["kind"] == "NodeTopology" and len(data["topology"]["gpus"]) == 8
    assert data["gpu_allocation"] == {
        "0": "llm/demo-prefill-0",
        "1": "llm/demo-prefill-0",
        "5": "llm/demo-decode-0",
    }


def test_once_print_without_kubelet_still_prints_the_record(fake_nvidia_smi, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "topo_sched.cli",
            "agent",
            "--once",
            "--print",
            "--socket",
            str(tmp_path / "absent.sock"),
            "--method",
            "nvidia-smi",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0
    data = json.loads(out.stdout)
    assert data["gpu_allocation"] is None and "absent.sock" in data["gpu_allocation_error"]
    assert "Traceback" not in out.stderr


def test_agent_with_no_gpus_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{tmp_path}"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "topo_sched.cli",
            "agent",
            "--once",
            "--print",
            "--method",
            "nvidia-smi",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "nvidia-smi" in errors[0] and "Traceback" not in out.stderr


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_publisher_writes_topology_on_change_and_rate_limits_allocation():
    writes: list[dict] = []
    clock = FakeClock()
    pub = AnnotationPublisher(
        lambda a: writes.append(dict(a)) or {}, min_interval_s=10, clock=clock
    )
    assert pub.tick("T1", '{"0":"a/p"}') == [L.ANNOTATION_GPU_ALLOCATION, L.ANNOTATION_TOPOLOGY]
    assert pub.tick("T1", '{"0":"a/p"}') == []  # nothing changed: no write at all
    clock.t += 3
    assert pub.tick("T1", '{"0":"a/q"}') == []  # changed, but within 10 s of the last write
    clock.t += 8
    assert pub.tick("T1", '{"0":"a/q"}') == [L.ANNOTATION_GPU_ALLOCATION]
    assert pub.tick("T2", '{"0":"a/q"}') == [L.ANNOTATION_TOPOLOGY]  # topology is never held
    assert len(writes) == 3


def test_publisher_keeps_a_failed_write_pending():
    calls = []

    def flaky(ann):
        calls.append(ann)
        if len(calls) == 1:
            raise RuntimeError("apiserver said 500")
        return {}

    pub = AnnotationPublisher(flaky, min_interval_s=0)
    assert pub.tick("T", "{}") == [] and pub.failures == 1
    assert pub.tick("T", "{}") == [L.ANNOTATION_GPU_ALLOCATION, L.ANNOTATION_TOPOLOGY]


def test_agent_tick_publishes_through_the_api(fake_nvidia_smi, apiserver_replay, kube_fixture):
    """Annotations go out as one JSON merge patch on the Node (recorded 0130 answers it)."""
    server = apiserver_replay(
        "0110-nodes-get-gpu-node-1.json", "0130-nodes-merge-patch-topology-annotations.json"
    )
    api = server.api_client()
    current = (get_node(api, "gpu-node-1").get("metadata") or {}).get("annotations") or {}
    with FakeKubelet(pods=_kubelet_pods()) as kubelet:
        agent = Agent(
            AgentSettings(node_name="gpu-node-1", socket_path=kubelet.socket_path),
            lambda: discover(node_name="gpu-node-1", load_nvml=_no_nvml),
            lambda ann: patch_node_annotations(api, "gpu-node-1", ann),
            current_annotations=current,
        )
        written = agent.tick()
    assert written == [L.ANNOTATION_GPU_ALLOCATION, L.ANNOTATION_TOPOLOGY]
    patch = server.requests[-1]
    assert (
        patch.method == "PATCH" and patch.headers["content-type"] == "application/merge-patch+json"
    )
    sent = patch.body["metadata"]["annotations"]
    record = json.loads(sent[L.ANNOTATION_TOPOLOGY])
    assert record["kind"] == "NodeTopology" and record["nvlink_islands"] == [list(range(8))]
    assert json.loads(sent[L.ANNOTATION_GPU_ALLOCATION]) == {
        "0": "llm/demo-prefill-0",
        "1": "llm/demo-prefill-0",
        "5": "llm/demo-decode-0",
    }


def test_agent_survives_an_api_conflict(fake_nvidia_smi, apiserver_replay):
    server = apiserver_replay("0140-nodes-merge-patch-stale-resourceversion-409.json")
    api = server.api_client()
    agent = Agent(
        AgentSettings(node_name="gpu-node-1", socket_path="/nonexistent/kubelet.sock"),
        lambda: discover(node_name="gpu-node-1", load_nvml=_no_nvml),
        lambda ann: patch_node_annotations(api, "gpu-node-1", ann),
    )
    assert agent.tick() == []  # 409: logged, kept pending, no crash
    assert agent.publisher.failures == 1
