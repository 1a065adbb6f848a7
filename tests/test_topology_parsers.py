"""Topology parsers (nvidia-smi, rocm-smi, NVML view, sysfs view), collectors, render and CLI.

Expected values in the fixture tables below were written out by reading each fixture by eye
(GPU rows, NUMA Affinity column, NIC rows and the NIC Legend), not computed by the code under
test.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from typer.testing import CliRunner

from tests.conftest import FIXTURES
from topo_sched.agent.nvml_collect import collect_nvml_view
from topo_sched.agent.sysfs_collect import collect_sysfs_view
from topo_sched.commands.topology import app as topology_app
from topo_sched.topology.model import LinkClass, NodeTopology
from topo_sched.topology.parse import (
    TopologyParseError,
    detect_format,
    parse_any,
    parse_nvidia_smi_topo,
    parse_rocm_smi_showtopo,
    topology_from_nvml_view,
    topology_from_sysfs_view,
)
from topo_sched.topology.render import draw_node, render_figure

TOPO_DIR = FIXTURES / "topology" / "nvidia-smi-topo"
H100_VM = FIXTURES / "hardware" / "h100-x1-vm"

NV, XGMI = LinkClass.NVLINK, LinkClass.XGMI
PIX, PXB, PHB, NODE, SYS = (
    LinkClass.PIX,
    LinkClass.PXB,
    LinkClass.PHB,
    LinkClass.NODE,
    LinkClass.SYS,
)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Every fixture, expectations written out by hand
# ---------------------------------------------------------------------------------------------

#: file -> (GPU count, islands, NUMA node per GPU, {NIC name: PIX GPUs}, {NIC name: NUMA node})
FIXTURE_EXPECT: dict[str, tuple[int, list[list[int]], list, dict[str, list[int]], dict]] = {
    "hgx-h100-80gb-8gpu-8nic-rail-pix.txt": (
        8,
        [[0, 1, 2, 3, 4, 5, 6, 7]],
        [0, 0, 0, 0, 1, 1, 1, 1],
        {f"mlx5_{i}": [i] for i in range(8)},
        {f"mlx5_{i}": 0 if i < 4 else 1 for i in range(8)},
    ),
    "dgx-a100-sxm4-40gb-8gpu-epyc7742-nps4-10nic.txt": (
        8,
        [[0, 1, 2, 3, 4, 5, 6, 7]],
        [3, 3, 1, 1, 7, 7, 5, 5],
        {f"mlx5_{i}": [] for i in range(10)},  # GPU-NIC pairs are PXB, never PIX
        {
            "mlx5_0": 3,
            "mlx5_1": 3,
            "mlx5_2": 1,
            "mlx5_3": 1,
            "mlx5_4": 7,
            "mlx5_5": 7,
            "mlx5_6": 5,
            "mlx5_7": 5,
            "mlx5_8": None,  # storage NICs: SYS to every GPU
            "mlx5_9": None,
        },
    ),
    "gb200-4gpu-tray-grace-8nic.txt": (
        4,
        [[0, 1, 2, 3]],
        [0, 0, 1, 1],  # NUMA Affinity lists 0,3-9,11-17 / 1,19-25,27-33: first node
        {f"mlx5_{i}": [] for i in range(8)},
        {f"mlx5_{i}": None for i in range(8)},
    ),
    "pcie-4x-l40s-2socket-2nic.txt": (
        4,
        [[0], [1], [2], [3]],
        [0, 0, 1, 1],
        {"mlx5_0": [], "mlx5_1": []},
        {"mlx5_0": 1, "mlx5_1": 1},  # NODE to GPU2/GPU3 (NUMA 1)
    ),
    "pcie-8x-rtx4090-2socket-allsys-2nic.txt": (
        8,
        [[i] for i in range(8)],
        [0, 0, 0, 0, 1, 1, 1, 1],
        {"NIC0": [], "NIC1": []},  # no NIC Legend in the post: column labels
        {"NIC0": 1, "NIC1": 1},  # PHB to GPU6 (NUMA 1)
    ),
    "pcie-8gpu-plx-switches-pix-pxb-legacy-2018.txt": (
        8,
        [[i] for i in range(8)],
        [None] * 8,  # no NUMA column in that driver
        {"mlx5_0": []},  # PHB to GPU4-7, SYS to GPU0-3
        {"mlx5_0": None},
    ),
}


def nvidia_smi_fixtures() -> list[str]:
    return sorted(p.name for p in TOPO_DIR.glob("*.txt") if not p.name.startswith("amd-"))


def test_every_nvidia_smi_fixture_has_expectations() -> None:
    assert sorted(FIXTURE_EXPECT) == nvidia_smi_fixtures()


@pytest.mark.parametrize("name", sorted(FIXTURE_EXPECT))
def test_nvidia_smi_fixture(name: str) -> None:
    count, islands, numa, pix, nic_numa = FIXTURE_EXPECT[name]
    topo = parse_nvidia_smi_topo(read(TOPO_DIR / name))
    assert topo.source == "nvidia-smi"
    assert topo.gpu_count == count
    assert [g.index for g in topo.gpus] == list(range(count))
    assert topo.nvlink_islands == islands
    assert [g.numa_node for g in topo.gpus] == numa
    assert {n.name: n.pix_gpus for n in topo.nics} == pix
    assert {n.name: n.numa_node for n in topo.nics} == nic_numa
    assert [n.name for n in topo.nics] == list(pix)  # column order kept
    # a full matrix: every GPU pair and every GPU/NIC pair is recorded
    assert len(topo.gpu_links) == count * (count - 1) // 2
    assert len(topo.nic_links) == count * len(topo.nics)
    # the record survives its own JSON
    assert NodeTopology.from_json(topo.to_json()) == topo


def test_hgx_h100_links_and_affinity() -> None:
    topo = parse_nvidia_smi_topo(read(TOPO_DIR / "hgx-h100-80gb-8gpu-8nic-rail-pix.txt"))
    assert all(lk.link == NV and lk.nvlinks == 18 for lk in topo.gpu_links)
    assert topo.nvswitch is True
    assert [g.cpu_affinity for g in topo.gpus] == ["0-47,96-143"] * 4 + ["48-95,144-191"] * 4
    assert [g.gpu_numa_id for g in topo.gpus] == [None] * 8  # GPU NUMA ID N/A
    links = {(nl.gpu, nl.nic): nl.link for nl in topo.nic_links}
    assert links[(0, "mlx5_0")] == PIX
    assert links[(0, "mlx5_1")] == NODE
    assert links[(0, "mlx5_4")] == SYS
    assert links[(7, "mlx5_4")] == NODE
    numa = {n.id: (n.gpus, n.cpus) for n in topo.numa_nodes}
    assert numa == {0: ([0, 1, 2, 3], "0-47,96-143"), 1: ([4, 5, 6, 7], "48-95,144-191")}


def test_dgx_a100_numa_3_1_7_5_and_pxb_nics() -> None:
    topo = parse_nvidia_smi_topo(read(TOPO_DIR / "dgx-a100-sxm4-40gb-8gpu-epyc7742-nps4-10nic.txt"))
    assert all(lk.link == NV and lk.nvlinks == 12 for lk in topo.gpu_links)
    assert topo.nvswitch is True  # 7 peers x NV12 > 12 links per A100
    assert {n.id: n.gpus for n in topo.numa_nodes} == {1: [2, 3], 3: [0, 1], 5: [6, 7], 7: [4, 5]}
    assert topo.numa_nodes[1].cpus == "48-63,176-191"  # NUMA 3
    pxb = {(nl.gpu, nl.nic) for nl in topo.nic_links if nl.link == PXB}
    expected = {(g, f"mlx5_{n}") for g, n in [(0, 0), (0, 1), (1, 0), (1, 1)]}
    expected |= {(g, f"mlx5_{n}") for g, n in [(2, 2), (2, 3), (3, 2), (3, 3)]}
    expected |= {(g, f"mlx5_{n}") for g, n in [(4, 4), (4, 5), (5, 4), (5, 5)]}
    expected |= {(g, f"mlx5_{n}") for g, n in [(6, 6), (6, 7), (7, 6), (7, 7)]}
    assert pxb == expected
    assert all(nl.link == SYS for nl in topo.nic_links if nl.nic in ("mlx5_8", "mlx5_9"))


def test_gb200_gpu_numa_id_differs_from_numa_affinity() -> None:
    topo = parse_nvidia_smi_topo(read(TOPO_DIR / "gb200-4gpu-tray-grace-8nic.txt"))
    assert [g.numa_node for g in topo.gpus] == [0, 0, 1, 1]
    assert [g.gpu_numa_id for g in topo.gpus] == [2, 10, 18, 26]
    assert [g.cpu_affinity for g in topo.gpus] == ["0-71", "0-71", "72-143", "72-143"]
    assert all(lk.link == NV and lk.nvlinks == 18 for lk in topo.gpu_links)
    assert topo.nvswitch is True
    assert all(nl.link == SYS for nl in topo.nic_links)
    # the affinity is a list of nodes, so the CPU list is not pinned to node 0 alone
    assert {n.id: n.cpus for n in topo.numa_nodes} == {0: None, 1: None}


def test_l40s_node_and_sys() -> None:
    topo = parse_nvidia_smi_topo(read(TOPO_DIR / "pcie-4x-l40s-2socket-2nic.txt"))
    links = {(lk.a, lk.b): lk.link for lk in topo.gpu_links}
    assert links == {(0, 1): NODE, (0, 2): SYS, (0, 3): SYS, (1, 2): SYS, (1, 3): SYS, (2, 3): NODE}


def test_rtx4090_all_sys_phb_nics_without_legend() -> None:
    topo = parse_nvidia_smi_topo(read(TOPO_DIR / "pcie-8x-rtx4090-2socket-allsys-2nic.txt"))
    assert {lk.link for lk in topo.gpu_links} == {SYS}
    assert [g.cpu_affinity for g in topo.gpus] == ["0-55,112-167"] * 4 + ["56-111,168-223"] * 4
    assert [g.gpu_numa_id for g in topo.gpus] == [None] * 8
    phb = sorted((nl.gpu, nl.nic) for nl in topo.nic_links if nl.link == PHB)
    assert phb == [(6, "NIC0"), (6, "NIC1")]
    assert {nl.link for nl in topo.nic_links if nl.gpu != 6} == {SYS}
    assert topo.nvswitch is False


def test_legacy_2018_pix_pxb_mlx5_column_no_numa() -> None:
    topo = parse_nvidia_smi_topo(read(TOPO_DIR / "pcie-8gpu-plx-switches-pix-pxb-legacy-2018.txt"))
    links = {(lk.a, lk.b): lk.link for lk in topo.gpu_links}
    pix_pairs = sorted(p for p, c in links.items() if c == PIX)
    pxb_pairs = sorted(p for p, c in links.items() if c == PXB)
    assert pix_pairs == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert pxb_pairs == [(0, 2), (0, 3), (1, 2), (1, 3), (4, 6), (4, 7), (5, 6), (5, 7)]
    assert all(c == SYS for p, c in links.items() if p not in pix_pairs + pxb_pairs)
    assert [g.cpu_affinity for g in topo.gpus] == ["0-13"] * 4 + ["14-27"] * 4
    assert topo.numa_nodes == []
    nic = {nl.gpu: nl.link for nl in topo.nic_links}
    assert nic == {0: SYS, 1: SYS, 2: SYS, 3: SYS, 4: PHB, 5: PHB, 6: PHB, 7: PHB}


def test_h100_vm_capture_ansi_and_topo_m_block() -> None:
    text = read(H100_VM / "nvidia-smi-topo.txt")
    assert "\x1b[4m" in text and "## nvidia-smi topo -p2p r" in text
    topo = parse_nvidia_smi_topo(text)
    assert topo.gpu_count == 1
    assert topo.nvlink_islands == [[0]]
    g = topo.gpus[0]
    assert (g.numa_node, g.gpu_numa_id, g.cpu_affinity) == (0, None, "0-15")
    assert topo.nics == [] and topo.gpu_links == []
    assert [(n.id, n.gpus, n.cpus) for n in topo.numa_nodes] == [(0, [0], "0-15")]


def test_rocm_smi_mi308x_xgmi() -> None:
    topo = parse_rocm_smi_showtopo(read(TOPO_DIR / "amd-rocm-smi-showtopo-mi308x-8gpu-xgmi.txt"))
    assert topo.source == "rocm-smi"
    assert topo.gpu_count == 8
    assert topo.nvlink_islands == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert [g.numa_node for g in topo.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len(topo.gpu_links) == 28 and all(lk.link == XGMI for lk in topo.gpu_links)
    assert {n.id: n.gpus for n in topo.numa_nodes} == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}


ROCM_PCIE = """\
============================ ROCm System Management Interface ============================
================================ Weight between two GPUs =================================
       GPU0         GPU1         GPU2         GPU3
GPU0   0            40           52           52
GPU1   40           0            52           52
GPU2   52           52           0            40
GPU3   52           52           40           0

================================= Hops between two GPUs ==================================
       GPU0         GPU1         GPU2         GPU3
GPU0   0            2            3            3
GPU1   2            0            3            3
GPU2   3            3            0            2
GPU3   3            3            2            0

=============================== Link Type between two GPUs ===============================
       GPU0         GPU1         GPU2         GPU3
GPU0   0            PCIE         PCIE         PCIE
GPU1   PCIE         0            PCIE         PCIE
GPU2   PCIE         PCIE         0            PCIE
GPU3   PCIE         PCIE         PCIE         0
{numa}================================== End of ROCm SMI Log ===================================
"""
ROCM_NUMA = """
======================================= Numa Nodes =======================================
GPU[0]          : (Topology) Numa Node: 0
GPU[0]          : (Topology) Numa Affinity: 0
GPU[1]          : (Topology) Numa Node: 0
GPU[1]          : (Topology) Numa Affinity: 0
GPU[2]          : (Topology) Numa Node: 1
GPU[2]          : (Topology) Numa Affinity: 1
GPU[3]          : (Topology) Numa Node: 1
GPU[3]          : (Topology) Numa Affinity: -1
"""


def test_rocm_smi_pcie_mapping() -> None:
    topo = parse_rocm_smi_showtopo(ROCM_PCIE.format(numa=ROCM_NUMA))
    assert [g.numa_node for g in topo.gpus] == [0, 0, 1, None]  # affinity -1 -> unknown
    links = {(lk.a, lk.b): lk.link for lk in topo.gpu_links}
    # NUMA known on both sides decides; GPU3 unknown -> hops (3 -> SYS, 2 -> NODE)
    assert links == {(0, 1): NODE, (0, 2): SYS, (0, 3): SYS, (1, 2): SYS, (1, 3): SYS, (2, 3): NODE}
    assert topo.nvlink_islands == [[0], [1], [2], [3]]
    no_numa = parse_rocm_smi_showtopo(ROCM_PCIE.format(numa=""))
    assert {(lk.a, lk.b): lk.link for lk in no_numa.gpu_links}[(0, 1)] == NODE


@pytest.mark.parametrize(
    ("mutate", "line", "words"),
    [
        (
            lambda t: t.replace(
                "GPU1   PCIE         0            PCIE         PCIE",
                "GPU1   PCIE         0            PCIE",
                1,
            ),
            19,
            "ragged",
        ),
        (
            lambda t: t.replace(
                "GPU3   PCIE         PCIE         PCIE         0",
                "GPU3   PCIE         XGMI         PCIE         0",
                1,
            ),
            21,
            "not symmetric",
        ),
        (
            lambda t: t.replace(
                "GPU2   PCIE         PCIE         0            PCIE",
                "GPU2   PCIE         PCIE         0            NVLINK",
                1,
            ).replace(
                "GPU3   PCIE         PCIE         PCIE         0",
                "GPU3   PCIE         PCIE         NVLINK       0",
                1,
            ),
            20,
            "unknown link type",
        ),
        (lambda t: t.split("=============================== Link Type")[0], 1, "no 'Link Type"),
    ],
)
def test_rocm_smi_errors(mutate, line: int, words: str) -> None:
    with pytest.raises(TopologyParseError) as exc:
        parse_rocm_smi_showtopo(mutate(ROCM_PCIE.format(numa="")))
    assert exc.value.line == line
    assert words in str(exc.value)
    assert str(exc.value).startswith(f"line {line}:")


# ---------------------------------------------------------------------------------------------
# Bad nvidia-smi input: an error naming the line, never a record
# ---------------------------------------------------------------------------------------------

HGX = "hgx-h100-80gb-8gpu-8nic-rail-pix.txt"
DGX = "dgx-a100-sxm4-40gb-8gpu-epyc7742-nps4-10nic.txt"
GB200 = "gb200-4gpu-tray-grace-8nic.txt"


def fixture_lines(name: str) -> list[str]:
    return read(TOPO_DIR / name).split("\n")


def expect_error(text: str, line: int, *words: str) -> TopologyParseError:
    with pytest.raises(TopologyParseError) as exc:
        parse_nvidia_smi_topo(text)
    err = exc.value
    assert isinstance(err, ValueError)
    assert err.line == line, str(err)
    assert str(err).startswith(f"line {line}: ")
    for w in words:
        assert w in str(err), str(err)
    return err


def test_error_truncated_after_a_row() -> None:
    lines = fixture_lines(HGX)[:5]  # header + GPU0..GPU3
    expect_error("\n".join(lines) + "\n", 6, "GPU4", "truncated")


def test_error_truncated_mid_row() -> None:
    lines = fixture_lines(HGX)
    text = "\n".join(lines[:3]) + "\n" + lines[3][:40]
    expect_error(text, 4, "GPU2", "link cells")


def test_error_truncated_after_header() -> None:
    expect_error(fixture_lines(DGX)[0] + "\n", 2, "GPU0", "truncated")


def test_error_ragged_row_tabs() -> None:
    lines = fixture_lines(DGX)
    cells = lines[4].split("\t")  # GPU3 row
    del cells[6]
    lines[4] = "\t".join(cells)
    expect_error("\n".join(lines), 5, "GPU3")


def test_error_ragged_row_extra_value() -> None:
    lines = fixture_lines(GB200)
    lines[2] = lines[2] + "    7"  # GPU1 row gets a fourth value
    expect_error("\n".join(lines), 3, "GPU1", "values")


def test_error_asymmetric_matrix() -> None:
    lines = fixture_lines(GB200)
    # GPU1 row, NIC2 column: SYS -> PIX, while the NIC2 row (line 8) still says SYS
    cells = lines[2].split()
    assert cells[0] == "GPU1" and cells[7] == "SYS"
    lines[2] = lines[2].replace(
        "SYS     SYS     SYS     SYS     SYS", "SYS     SYS     PIX     SYS     SYS", 1
    )
    err = expect_error("\n".join(lines), 8, "not symmetric", "line 3")
    assert "NIC2/GPU1" in str(err)


def test_error_unknown_link_token() -> None:
    lines = fixture_lines(HGX)
    lines[2] = lines[2].replace("NV18", "NV?", 1)
    expect_error("\n".join(lines), 3, "unknown link", "NV?")


def test_error_x_off_diagonal_and_diagonal_not_x() -> None:
    lines = fixture_lines(HGX)
    lines[1] = lines[1].replace(" X      NV18", "NV18    NV18", 1)
    expect_error("\n".join(lines), 2, "diagonal")


def test_error_rows_out_of_order() -> None:
    lines = fixture_lines(HGX)
    lines[2], lines[3] = lines[3], lines[2]
    expect_error("\n".join(lines), 3, "expected the row for GPU1", "GPU2")


def test_error_garbage_and_empty() -> None:
    expect_error("hello world\nthis is not nvidia-smi\n", 1, "not an nvidia-smi topo -m matrix")
    expect_error("", 1, "empty")
    expect_error("\n\n   \n", 1, "empty")
    expect_error("\n\nSome prose first\n", 3, "not an nvidia-smi")


def test_error_no_gpu_rows() -> None:
    text = "\tNIC0\tNIC1\nNIC0\t X \tPIX\nNIC1\tPIX\t X \n"
    expect_error(text, 1, "GPU")


def test_error_bad_affinity_value() -> None:
    lines = fixture_lines(HGX)
    lines[1] = lines[1].replace("0-47,96-143", "0-47;96-143", 1)
    expect_error("\n".join(lines), 2, "CPU Affinity")


def test_error_p2p_matrix_is_not_topo_m() -> None:
    text = read(H100_VM / "nvidia-smi-topo.txt")
    p2p = text[text.index("## nvidia-smi topo -p2p r") :].split("## nvidia-smi nvlink")[0]
    p2p = p2p.replace("## nvidia-smi topo -p2p r", "p2p")
    with pytest.raises(TopologyParseError) as exc:
        parse_nvidia_smi_topo(p2p)
    assert "p2p" in str(exc.value)


def test_numa_off_gives_none() -> None:
    text = read(TOPO_DIR / "pcie-4x-l40s-2socket-2nic.txt")
    text = text.replace("    0               N/A", "    N/A             N/A")
    text = text.replace("  1               N/A", "  N/A             N/A")
    assert text.count("N/A             N/A") == 4
    topo = parse_nvidia_smi_topo(text)
    assert [g.numa_node for g in topo.gpus] == [None] * 4
    assert topo.numa_nodes == []
    assert [n.numa_node for n in topo.nics] == [None, None]
    assert topo.gpus[0].cpu_affinity == "0-95,192-287"


def test_header_without_indent_and_crlf() -> None:
    # collect_env-style dumps strip the header's leading TAB; Windows copies add CR
    lines = fixture_lines(DGX)
    lines[0] = lines[0].lstrip("\t")
    topo = parse_nvidia_smi_topo("\r\n".join(["GPU Topology:", *lines]))
    assert [g.numa_node for g in topo.gpus] == [3, 3, 1, 1, 7, 7, 5, 5]
    assert len(topo.nics) == 10


def test_soc_legacy_token_and_nic_row_values() -> None:
    text = (
        "\tGPU0\tGPU1\tmlx4_0\tCPU Affinity\n"
        "GPU0\t X \tSOC\tPHB\t0-7\n"
        "GPU1\tSOC\t X \tSOC\t8-15\n"
        "mlx4_0\tPHB\tSOC\t X \t\n"
    )
    topo = parse_nvidia_smi_topo(text)
    assert topo.gpu_link(0, 1).link == SYS
    assert [n.name for n in topo.nics] == ["mlx4_0"]


# ---------------------------------------------------------------------------------------------
# Hypothesis: random matrices round-trip; random mutations parse right or raise
# ---------------------------------------------------------------------------------------------

GPU_GPU_TOKENS = [f"NV{n}" for n in (1, 2, 4, 6, 12, 18)] + ["PIX", "PXB", "PHB", "NODE", "SYS"]
PCIE_TOKENS = ["PIX", "PXB", "PHB", "NODE", "SYS"]
TOKEN_CLASS = {"PIX": PIX, "PXB": PXB, "PHB": PHB, "NODE": NODE, "SYS": SYS, "SOC": SYS}
CPU_VALUES = ["0-15", "16-31,48-63", "0-71", "N/A", "4"]
NUMA_VALUES = ["0", "1", "3", "N/A", "0,3-9,11-17", "1,19-25"]
GPU_NUMA_VALUES = ["N/A", "2", "10"]
STYLES = {
    "modern": ["CPU Affinity", "NUMA Affinity", "GPU NUMA ID"],
    "mid": ["CPU Affinity", "NUMA Affinity"],
    "legacy": ["CPU Affinity"],
}


@st.composite
def topo_specs(draw: st.DrawFn) -> dict[str, Any]:
    n_gpu = draw(st.integers(1, 6))
    n_nic = draw(st.integers(0, 3))
    n = n_gpu + n_nic
    cells = [["X"] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            pool = GPU_GPU_TOKENS if i < n_gpu and j < n_gpu else PCIE_TOKENS
            cells[i][j] = cells[j][i] = draw(st.sampled_from(pool))
    style = draw(st.sampled_from(sorted(STYLES)))
    attrs = STYLES[style]
    values = [
        [draw(st.sampled_from(v)) for v in (CPU_VALUES, NUMA_VALUES, GPU_NUMA_VALUES)][: len(attrs)]
        for _ in range(n_gpu)
    ]
    return {
        "n_gpu": n_gpu,
        "n_nic": n_nic,
        "cells": cells,
        "attrs": attrs,
        "values": values,
        "legend": draw(st.booleans()),
        "spaces": draw(st.booleans()),
        "double_tab": draw(st.booleans()),
        "ansi": draw(st.booleans()),
    }


def render_spec(spec: dict[str, Any]) -> str:
    """nvidia-smi style text for a spec, written independently of the parser."""
    n_gpu, n_nic = spec["n_gpu"], spec["n_nic"]
    nic_labels = [f"NIC{k}" if spec["legend"] else f"mlx5_{k}" for k in range(n_nic)]
    labels = [f"GPU{i}" for i in range(n_gpu)] + nic_labels
    attrs = spec["attrs"]
    header = "\t" + "\t".join(labels + attrs)
    if spec["ansi"]:
        header = "\t\x1b[4m" + "\t".join(labels + attrs) + "\x1b[0m"
    out = [header]
    for k, label in enumerate(labels):
        row = [label] + [" X " if c == "X" else c for c in spec["cells"][k]]
        if k < n_gpu:
            vals = list(spec["values"][k])
            if spec["double_tab"] and len(vals) == 3:
                vals.insert(2, "")  # nvidia-smi's NUMA Affinity<TAB><TAB>GPU NUMA ID
            row += vals
        else:
            row += [""] * len(attrs)  # empty trailing cells
        out.append("\t".join(row))
    text = "\n".join(out) + "\n\nLegend:\n\n  X    = Self\n"
    if spec["legend"] and n_nic:
        text += "\nNIC Legend:\n\n" + "".join(f"  NIC{k}: mlx5_{k + 4}\n" for k in range(n_nic))
    if spec["spaces"]:
        text = "\n".join(ln.expandtabs(8) for ln in text.split("\n"))
    return text


def nic_names(spec: dict[str, Any]) -> list[str]:
    return [f"mlx5_{k + 4}" if spec["legend"] else f"mlx5_{k}" for k in range(spec["n_nic"])]


def expected_links(spec: dict[str, Any]) -> tuple[dict, dict]:
    n_gpu = spec["n_gpu"]
    names = nic_names(spec)
    gpu: dict[tuple[int, int], tuple[LinkClass, int | None]] = {}
    for i in range(n_gpu):
        for j in range(i + 1, n_gpu):
            tok = spec["cells"][i][j]
            gpu[(i, j)] = (NV, int(tok[2:])) if tok.startswith("NV") else (TOKEN_CLASS[tok], None)
    nic = {
        (i, names[k]): TOKEN_CLASS[spec["cells"][i][n_gpu + k]]
        for i in range(n_gpu)
        for k in range(spec["n_nic"])
    }
    return gpu, nic


def expected_islands(spec: dict[str, Any]) -> list[list[int]]:
    n = spec["n_gpu"]
    comp = list(range(n))
    changed = True
    while changed:  # plain label propagation, no networkx
        changed = False
        for i in range(n):
            for j in range(n):
                if i != j and spec["cells"][i][j].startswith("NV") and comp[j] > comp[i]:
                    comp[j] = comp[i]
                    changed = True
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(comp):
        groups.setdefault(c, []).append(i)
    return sorted(groups.values())


def first_node(value: str) -> int | None:
    return None if value == "N/A" else int(re.split(r"[,-]", value)[0])


def check_record(topo: NodeTopology, spec: dict[str, Any]) -> None:
    gpu, nic = expected_links(spec)
    assert {(lk.a, lk.b): (lk.link, lk.nvlinks) for lk in topo.gpu_links} == gpu
    assert {(nl.gpu, nl.nic): nl.link for nl in topo.nic_links} == nic
    assert topo.nvlink_islands == expected_islands(spec)
    assert [n.name for n in topo.nics] == nic_names(spec)
    for n in topo.nics:
        pix = [g for g in range(spec["n_gpu"]) if nic[(g, n.name)] == PIX]
        assert n.pix_gpus == pix
    attrs = spec["attrs"]
    for g in topo.gpus:
        vals = dict(zip(attrs, spec["values"][g.index], strict=True))
        cpu = vals["CPU Affinity"]
        assert g.cpu_affinity == (None if cpu == "N/A" else cpu)
        if "NUMA Affinity" in vals:
            assert g.numa_node == first_node(vals["NUMA Affinity"])
        else:
            assert g.numa_node is None
        gnid = vals.get("GPU NUMA ID", "N/A")
        assert g.gpu_numa_id == (None if gnid == "N/A" else int(gnid))
    totals = [
        sum(
            int(spec["cells"][i][j][2:])
            for j in range(spec["n_gpu"])
            if spec["cells"][i][j].startswith("NV")
        )
        for i in range(spec["n_gpu"])
    ]
    assert topo.nvswitch == any(t > 18 for t in totals)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topo_specs())
def test_random_matrices_round_trip(spec: dict[str, Any]) -> None:
    topo = parse_nvidia_smi_topo(render_spec(spec))
    check_record(topo, spec)


def _rows_of(text: str) -> list[int]:
    lines = text.split("\n")
    return [i for i, ln in enumerate(lines[1:], start=1) if ln.split()[:1] and "X" in ln.split()]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=topo_specs(), data=st.data())
def test_structured_mutations_raise_or_agree(spec: dict[str, Any], data: st.DataObject) -> None:
    n = spec["n_gpu"] + spec["n_nic"]
    kind = data.draw(
        st.sampled_from(
            [
                "flip_cell",
                "junk_cell",
                "delete_cell",
                "extra_cell",
                "drop_row",
                "swap_rows",
                "edit_value",
            ]
        )
    )
    if kind in ("flip_cell", "junk_cell", "delete_cell", "extra_cell") or kind == "swap_rows":
        assume(n >= 2)
    spec2 = json.loads(json.dumps(spec))
    text = render_spec(spec)
    lines = text.split("\n")
    must_raise = True
    if kind in ("flip_cell", "junk_cell"):
        i = data.draw(st.integers(0, n - 1))
        j = data.draw(st.integers(0, n - 1).filter(lambda x: x != i))
        old = spec["cells"][i][j]
        if kind == "flip_cell":
            pool = GPU_GPU_TOKENS if i < spec["n_gpu"] and j < spec["n_gpu"] else PCIE_TOKENS
            new = data.draw(st.sampled_from([t for t in [*pool, "X"] if t != old]))
        else:
            new = data.draw(st.text(alphabet="ABNVXPSY0189-,/", min_size=1, max_size=5))
            assume(new != old and not (new == "SOC" and old == "SYS"))
        spec2["cells"][i][j] = new  # only one side of the pair: asymmetric, or X off-diagonal
        text2 = render_spec(spec2)
    elif kind == "delete_cell":
        row = data.draw(st.integers(0, n - 1))
        col = data.draw(st.integers(0, n - 1))
        cells = lines[1 + row].split("\t") if "\t" in lines[1 + row] else lines[1 + row].split()
        del cells[1 + col]
        lines[1 + row] = "\t".join(cells)
        text2 = "\n".join(lines)
    elif kind == "extra_cell":
        row = data.draw(st.integers(0, n - 1))
        col = data.draw(st.integers(0, n - 1))
        cells = lines[1 + row].split("\t") if "\t" in lines[1 + row] else lines[1 + row].split()
        cells.insert(1 + col, data.draw(st.sampled_from(PCIE_TOKENS)))
        lines[1 + row] = "\t".join(cells)
        text2 = "\n".join(lines)
    elif kind == "drop_row":
        row = data.draw(st.integers(0, n - 1))
        del lines[1 + row]
        text2 = "\n".join(lines)
    elif kind == "swap_rows":
        a = data.draw(st.integers(0, n - 1))
        b = data.draw(st.integers(0, n - 1).filter(lambda x: x != a))
        lines[1 + a], lines[1 + b] = lines[1 + b], lines[1 + a]
        text2 = "\n".join(lines)
    else:  # edit_value: a different valid value must show in the record
        g = data.draw(st.integers(0, spec["n_gpu"] - 1))
        k = data.draw(st.integers(0, len(spec["attrs"]) - 1))
        pool = (CPU_VALUES, NUMA_VALUES, GPU_NUMA_VALUES)[k]
        spec2["values"][g][k] = data.draw(st.sampled_from(pool))
        text2 = render_spec(spec2)
        must_raise = False
    if must_raise:
        with pytest.raises(TopologyParseError) as exc:
            parse_nvidia_smi_topo(text2)
        assert exc.value.line is not None and exc.value.line >= 1
    else:
        check_record(parse_nvidia_smi_topo(text2), spec2)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=topo_specs(), data=st.data())
def test_character_mutations_never_change_the_matrix_silently(
    spec: dict[str, Any], data: st.DataObject
) -> None:
    """Delete, insert or replace one character, or truncate: parse raises, or every GPU/NIC
    link it reports is still the one the (unchanged) matrix cell says."""
    text = render_spec(spec)
    end = text.index("\n\nLegend:")  # the matrix
    kind = data.draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
    pos = data.draw(st.integers(0, end - 1))
    ch = data.draw(st.sampled_from(list("XNVPIBSYODE0123456789 \t\n-,/")))
    if kind == "delete":
        text2 = text[:pos] + text[pos + 1 :]
    elif kind == "insert":
        text2 = text[:pos] + ch + text[pos:]
    elif kind == "replace":
        text2 = text[:pos] + ch + text[pos + 1 :]
    else:
        text2 = text[:pos]
    try:
        topo = parse_nvidia_smi_topo(text2)
    except TopologyParseError as e:
        assert e.line is not None and e.line >= 1
        return
    gpu, nic = expected_links(spec)
    assert {(lk.a, lk.b): (lk.link, lk.nvlinks) for lk in topo.gpu_links} == gpu
    assert topo.nvlink_islands == expected_islands(spec)
    names = nic_names(spec)
    got = {
        (nl.gpu, names[[n.name for n in topo.nics].index(nl.nic)]): nl.link for nl in topo.nic_links
    }
    assert got == nic


# ---------------------------------------------------------------------------------------------
# NVML: the view, and the collector against a fake pynvml
# ---------------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    text = "Unknown Error"

    def __str__(self) -> str:
        return self.text


class FakeNotSupported(FakeNVMLError):
    text = "Not Supported"


class FakeFabricInfo(ctypes.Structure):
    """Layout of pynvml's c_nvmlGpuFabricInfo_t."""

    _fields_ = (
        ("clusterUuid", ctypes.c_uint8 * 16),
        ("status", ctypes.c_uint),
        ("cliqueId", ctypes.c_uint32),
        ("state", ctypes.c_uint),
    )


def make_fake_nvml(
    gpus: list[dict[str, Any]],
    *,
    driver: str = "580.159.04",
    missing: tuple[str, ...] = (),
    fabric: dict[str, Any] | None = None,
) -> SimpleNamespace:
    """A stand-in for the pynvml module, replaying per-GPU values.

    Each GPU dict: name, uuid, pci, numa_node (None -> NotSupported), cpu_affinity (ints),
    memory_affinity (ints or None -> NotSupported), mem_total, pcie (gen_max, width_max, gen_cur,
    width_cur), links (list of (remote_pci, remote_type) for active links, or None -> link 0 is
    NotSupported), ancestor {j: level}, p2p {j: status}.
    """
    calls: list[str] = []

    def need(v: Any) -> Any:
        if v is None:
            raise FakeNotSupported()
        return v

    def link_of(h: int, link: int) -> tuple[str, int]:
        links = gpus[h]["links"]
        if links is None or link >= len(links):
            raise FakeNotSupported()
        return links[link]

    def fabric_fn(h: int, ref: Any) -> int:
        # the real call needs a pointer: a Structure passed as is crashed NVML on the H100 VM
        info = ref._obj  # what ctypes.byref() wraps
        if fabric is None:
            raise FakeNotSupported()
        info.clusterUuid[:] = list(fabric["cluster"])
        info.cliqueId = fabric["clique"]
        info.state = 3
        info.status = 0
        return 0

    fns: dict[str, Any] = {
        "NVMLError": FakeNVMLError,
        "NVMLError_NotSupported": FakeNotSupported,
        "NVML_NVLINK_MAX_LINKS": 18,
        "NVML_P2P_CAPS_INDEX_NVLINK": 2,
        "NVML_P2P_STATUS_OK": 0,
        "NVML_AFFINITY_SCOPE_NODE": 0,
        "nvmlInit": lambda: calls.append("init"),
        "nvmlShutdown": lambda: calls.append("shutdown"),
        "nvmlSystemGetDriverVersion": lambda: driver,
        "nvmlDeviceGetCount": lambda: len(gpus),
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetName": lambda h: gpus[h]["name"],
        "nvmlDeviceGetUUID": lambda h: gpus[h]["uuid"],
        "nvmlDeviceGetPciInfo": lambda h: SimpleNamespace(busId=gpus[h]["pci"]),
        "nvmlDeviceGetNumaNodeId": lambda h: need(gpus[h]["numa_node"]),
        "nvmlDeviceGetCpuAffinity": lambda h, n: (gpus[h]["cpu_affinity"] + [0] * n)[:n],
        "nvmlDeviceGetMemoryAffinity": lambda h, n, scope: need(gpus[h].get("memory_affinity")),
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(total=gpus[h]["mem_total"]),
        "nvmlDeviceGetMaxPcieLinkGeneration": lambda h: gpus[h]["pcie"][0],
        "nvmlDeviceGetMaxPcieLinkWidth": lambda h: gpus[h]["pcie"][1],
        "nvmlDeviceGetCurrPcieLinkGeneration": lambda h: gpus[h]["pcie"][2],
        "nvmlDeviceGetCurrPcieLinkWidth": lambda h: gpus[h]["pcie"][3],
        "nvmlDeviceGetNvLinkState": lambda h, link: (link_of(h, link), 1)[1],
        "nvmlDeviceGetNvLinkRemotePciInfo": lambda h, link: SimpleNamespace(
            busId=link_of(h, link)[0]
        ),
        "nvmlDeviceGetNvLinkRemoteDeviceType": lambda h, link: link_of(h, link)[1],
        "nvmlDeviceGetTopologyCommonAncestor": lambda a, b: need(gpus[a]["ancestor"].get(b)),
        "nvmlDeviceGetP2PStatus": lambda a, b, idx: need(gpus[a].get("p2p", {}).get(b)),
        "nvmlDeviceGetGpuFabricInfoV": fabric_fn,
        "c_nvmlGpuFabricInfoV_t": FakeFabricInfo,
    }
    for name in missing:
        fns.pop(name)
    ns = SimpleNamespace(**fns)
    ns.calls = calls
    return ns


def fake_from_nvml_json(data: dict[str, Any]) -> SimpleNamespace:
    gpus = []
    for g in data["gpus"]:
        numa = g["numa_node"]
        gpus.append(
            {
                "name": g["name"],
                "uuid": g["uuid"],
                "pci": g["pci"],
                "numa_node": None if isinstance(numa, str) else numa,
                "cpu_affinity": [int(w, 16) for w in g["cpu_affinity"]],
                "mem_total": g["mem_total"],
                "pcie": (
                    g["pcie_gen_max"],
                    g["pcie_width_max"],
                    g["pcie_gen_cur"],
                    g["pcie_width_cur"],
                ),
                "links": None if g["nvlinks"] and "error" in g["nvlinks"][0] else [],
                "ancestor": {int(k): v for k, v in g["ancestor"].items()},
            }
        )
    # the VM capture has no memory affinity and no fabric call: replay their absence
    return make_fake_nvml(
        gpus,
        driver=data["driver"],
        missing=(
            "nvmlDeviceGetMemoryAffinity",
            "nvmlDeviceGetGpuFabricInfoV",
            "c_nvmlGpuFabricInfoV_t",
        ),
    )


def test_nvml_fixture_view() -> None:
    view = json.loads(read(H100_VM / "nvml.json"))
    topo = topology_from_nvml_view(view)
    assert topo.source == "nvml"
    assert topo.gpu_count == 1 and topo.nvlink_islands == [[0]]
    g = topo.gpus[0]
    assert g.name == "NVIDIA H100 80GB HBM3"
    assert g.uuid == "GPU-f16e4650-e8e7-9424-9b3f-6fa1abc104df"
    assert g.pci_bus_id == "0000:00:06.0"
    assert g.cpu_affinity == "0-15"
    assert g.gpu_numa_id is None  # nvmlDeviceGetNumaNodeId: Not Supported
    assert g.numa_node is None  # no memory affinity in this capture
    assert topo.nvswitch is False and topo.clique is None


def test_collect_nvml_view_replays_fixture() -> None:
    data = json.loads(read(H100_VM / "nvml.json"))
    fake = fake_from_nvml_json(data)
    view = collect_nvml_view(fake, cpu_set_words=4)
    assert fake.calls == ["init", "shutdown"]
    assert view["kind"] == "NvmlView" and view["driver"] == "580.159.04"
    got, want = view["gpus"][0], data["gpus"][0]
    for key, value in want.items():
        if isinstance(value, str) and value.startswith("error"):
            assert got[key] is None, key  # NotSupported -> None
        else:
            assert got[key] == value, key
    assert got["memory_affinity"] is None and got["fabric"] is None
    assert topology_from_nvml_view(view) == topology_from_nvml_view(data)
    json.dumps(view)  # JSON-ready


#: What collect_nvml_view(pynvml) and collect_sysfs_view(Path("/")) returned on a real H100 VM
#: (the nvidia-h100-x1 device machine, driver 580.159.04, 2026-11-23); nvidia-smi topo -m there
#: printed the matrix of fixtures/hardware/h100-x1-vm/nvidia-smi-topo.txt.
REAL_NVML_VIEW = {
    "kind": "NvmlView",
    "driver": "580.159.04",
    "gpus": [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-f0d641b8-dcfe-e65f-71d2-9357ea37c6a8",
            "pci": "00000000:00:06.0",
            "numa_node": None,
            "cpu_affinity": ["0xffff", "0x0", "0x0", "0x0"],
            "memory_affinity": ["0x1"],
            "mem_total": 85520809984,
            "pcie_gen_max": 5,
            "pcie_width_max": 16,
            "pcie_gen_cur": 5,
            "pcie_width_cur": 16,
            "nvlinks": [{"link": 0, "error": "Not Supported"}],
            "fabric": {"cluster_uuid": None, "clique_id": 0, "state": 0, "status": 0},
            "ancestor": {},
        }
    ],
}
REAL_SYSFS_VIEW = {
    "kind": "SysfsView",
    "pci_devices": [
        {
            "address": "0000:00:06.0",
            "vendor": "0x10de",
            "class": "0x030200",
            "device": "0x2330",
            "numa_node": -1,
            "local_cpulist": "0-15",
            "path": ["pci0000:00", "0000:00:06.0"],
        }
    ],
    "nics": [
        {
            "name": "eth0",
            "subsystem": "net",
            "address": "0000:00:03.0",
            "numa_node": -1,
            "local_cpulist": "0-15",
            "path": ["pci0000:00", "0000:00:03.0"],
        }
    ],
    "numa_nodes": [{"id": 0, "cpulist": "0-15", "distance": [10]}],
}


def test_real_h100_vm_views_agree_with_nvidia_smi() -> None:
    smi = parse_nvidia_smi_topo(read(H100_VM / "nvidia-smi-topo.txt"))
    nvml = parse_any(json.dumps(REAL_NVML_VIEW))
    sysfs = parse_any(json.dumps(REAL_SYSFS_VIEW))
    assert (nvml.source, sysfs.source) == ("nvml", "sysfs")
    for topo in (nvml, sysfs):
        assert [(g.index, g.numa_node, g.cpu_affinity) for g in topo.gpus] == [
            (s.index, s.numa_node, s.cpu_affinity) for s in smi.gpus
        ]
        assert topo.nvlink_islands == smi.nvlink_islands == [[0]]
        assert topo.gpus[0].pci_bus_id == "0000:00:06.0"
    assert nvml.gpus[0].gpu_numa_id is None and nvml.clique is None  # fabric state 0
    # sysfs also lists the VM's virtio NIC (nvidia-smi lists RDMA devices only)
    assert [(n.name, n.numa_node) for n in sysfs.nics] == [("eth0", 0)]
    assert sysfs.nic_links[0].link == PHB


SWITCH_PCI = [f"00000000:{0xC0 + k:02X}:00.0" for k in range(4)]
HGX_PCI = [
    "00000000:18:00.0",
    "00000000:2A:00.0",
    "00000000:3A:00.0",
    "00000000:5D:00.0",
    "00000000:9A:00.0",
    "00000000:AB:00.0",
    "00000000:BA:00.0",
    "00000000:DB:00.0",
]
CLUSTER = bytes(range(1, 17))


def hgx_fake_gpus(*, remote_type: bool = True) -> list[dict[str, Any]]:
    gpus = []
    for i in range(8):
        socket = i // 4
        gpus.append(
            {
                "name": "NVIDIA H100 80GB HBM3",
                "uuid": f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd",
                "pci": HGX_PCI[i],
                "numa_node": None,
                "cpu_affinity": [0xFFFFFFFFFFFF, 0]
                if socket == 0
                else [0xFFFF000000000000, 0xFFFFFFFF],
                "memory_affinity": [1 << socket],
                "mem_total": 85520809984,
                "pcie": (5, 16, 5, 16),
                # 18 links, all to NVSwitches (type 2), spread over the 4 switch chips
                "links": [(SWITCH_PCI[k % 4], 2) for k in range(18)],
                "ancestor": {j: 40 if j // 4 == socket else 50 for j in range(8) if j != i},
                "p2p": {j: 0 for j in range(8) if j != i},
            }
        )
    return gpus


def test_collect_nvml_view_hgx_nvswitch() -> None:
    fake = make_fake_nvml(hgx_fake_gpus(), fabric={"cluster": CLUSTER, "clique": 7})
    view = collect_nvml_view(fake, cpu_set_words=2)
    g0 = view["gpus"][0]
    assert len(g0["nvlinks"]) == 18 and g0["nvlinks"][0]["remote_type"] == "NVSWITCH"
    assert g0["ancestor"]["4"] == 50 and g0["ancestor"]["1"] == 40
    topo = topology_from_nvml_view(json.loads(json.dumps(view)))
    assert topo.nvlink_islands == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert topo.nvswitch is True
    assert all(lk.link == NV and lk.nvlinks == 18 for lk in topo.gpu_links)
    assert len(topo.gpu_links) == 28
    assert [g.numa_node for g in topo.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert topo.gpus[0].cpu_affinity == "0-47"
    assert topo.gpus[4].cpu_affinity == "48-95"
    assert topo.gpus[3].pci_bus_id == "0000:5d:00.0"
    assert topo.clique == "01020304-0506-0708-090a-0b0c0d0e0f10.7"
    assert {n.id: n.gpus for n in topo.numa_nodes} == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}


def test_collect_nvml_view_old_pynvml_without_remote_type() -> None:
    fake = make_fake_nvml(
        hgx_fake_gpus(),
        missing=(
            "nvmlDeviceGetNvLinkRemoteDeviceType",
            "nvmlDeviceGetGpuFabricInfoV",
            "c_nvmlGpuFabricInfoV_t",
            "nvmlDeviceGetMemoryAffinity",
        ),
    )
    view = collect_nvml_view(fake, cpu_set_words=2)
    assert view["gpus"][0]["nvlinks"][0]["remote_type"] is None
    topo = topology_from_nvml_view(view)
    # links end at switch addresses, not GPUs; NVLink P2P status still puts all 8 in one island
    assert topo.nvlink_islands == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert all(lk.link == NV and lk.nvlinks is None for lk in topo.gpu_links)
    assert topo.nvswitch is False  # cannot be told without the remote device type
    assert [g.numa_node for g in topo.gpus] == [None] * 8
    assert topo.clique is None


def test_nvml_direct_nvlink_pairs_and_ancestors() -> None:
    pci = ["00000000:01:00.0", "00000000:02:00.0", "00000000:81:00.0", "00000000:82:00.0"]
    peer = {0: 1, 1: 0, 2: 3, 3: 2}
    gpus = [
        {
            "name": "NVIDIA A100-PCIE-40GB",
            "uuid": f"GPU-{i}",
            "pci": pci[i],
            "numa_node": None,
            "cpu_affinity": [0xFF if i < 2 else 0xFF00],
            "memory_affinity": [1 if i < 2 else 2],
            "mem_total": 1,
            "pcie": (4, 16, 4, 16),
            "links": [(pci[peer[i]], 0)] * 4,  # an NVLink bridge: 4 links to the peer GPU
            "ancestor": {j: (20 if j == peer[i] else 50) for j in range(4) if j != i},
        }
        for i in range(4)
    ]
    topo = topology_from_nvml_view(collect_nvml_view(make_fake_nvml(gpus), cpu_set_words=1))
    assert topo.nvlink_islands == [[0, 1], [2, 3]]
    links = {(lk.a, lk.b): (lk.link, lk.nvlinks) for lk in topo.gpu_links}
    assert links[(0, 1)] == (NV, 4) and links[(2, 3)] == (NV, 4)
    assert links[(0, 2)] == (SYS, None)
    assert topo.nvswitch is False
    assert [g.numa_node for g in topo.gpus] == [0, 0, 1, 1]


def test_nvml_view_nics_and_levels_by_name() -> None:
    view = {
        "gpus": [
            {"index": 0, "pci": "0000:18:00.0", "ancestor": {"1": "SYSTEM"}},
            {"index": 1, "pci": "0000:9a:00.0", "ancestor": {"0": "NVML_TOPOLOGY_SYSTEM"}},
        ],
        "nics": [
            {"name": "mlx5_0", "numa_node": 0, "ancestor": {"0": 10, "1": 50}},
            {"name": "mlx5_1", "numa_node": -1, "ancestor": {"0": "HOSTBRIDGE", "1": "MULTIPLE"}},
        ],
    }
    topo = topology_from_nvml_view(view)
    assert topo.gpu_link(0, 1).link == SYS
    assert {n.name: (n.numa_node, n.pix_gpus) for n in topo.nics} == {
        "mlx5_0": (0, [0]),
        "mlx5_1": (None, []),
    }
    assert {(nl.gpu, nl.nic): nl.link for nl in topo.nic_links}[(1, "mlx5_1")] == PXB


@pytest.mark.parametrize(
    ("view", "words"),
    [
        ({}, "gpus"),
        ({"gpus": []}, "gpus"),
        ({"gpus": [{"index": "0"}]}, "gpus[0].index"),
        ({"gpus": [{"index": 0}, {"index": 0}]}, "twice"),
        ({"gpus": [{"index": 0, "pci": "not-a-bus"}]}, "gpus[0].pci"),
        ({"gpus": [{"index": 0, "cpu_affinity": "0xff"}]}, "cpu_affinity"),
        (
            {"gpus": [{"index": 0, "nvlinks": [{"link": 0, "state": 1, "remote_type": "WAT"}]}]},
            "remote",
        ),
        ({"gpus": [{"index": 0, "ancestor": {"1": 99}}]}, "level"),
    ],
)
def test_nvml_view_errors(view: dict[str, Any], words: str) -> None:
    with pytest.raises(TopologyParseError) as exc:
        topology_from_nvml_view(view)
    assert words in str(exc.value)


# ---------------------------------------------------------------------------------------------
# sysfs: the view, and the collector against a fake tree
# ---------------------------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def add_pci(root: Path, rel: str, *, vendor: str, klass: str, numa: int, cpus: str) -> Path:
    """A device under sys/devices/<rel>, and its sys/bus/pci/devices symlink."""
    dev = root / "sys" / "devices" / rel
    write(dev / "vendor", vendor)
    write(dev / "class", klass)
    write(dev / "device", "0x2330")
    write(dev / "numa_node", str(numa))
    write(dev / "local_cpulist", cpus)
    link = root / "sys" / "bus" / "pci" / "devices" / dev.name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(dev, link.parent))
    return dev


def add_class_dev(root: Path, subsystem: str, name: str, target: Path | None) -> None:
    d = root / "sys" / "class" / subsystem / name
    d.mkdir(parents=True, exist_ok=True)
    if target is not None:
        (d / "device").symlink_to(os.path.relpath(target, d))


def add_node(root: Path, nid: int, cpus: str, distance: str) -> None:
    base = root / "sys" / "devices" / "system" / "node" / f"node{nid}"
    write(base / "cpulist", cpus)
    write(base / "distance", distance)


def test_sysfs_h100_vm_tree(tmp_path: Path) -> None:
    # values of fixtures/hardware/h100-x1-vm/host-topology.txt
    add_pci(
        tmp_path, "pci0000:00/0000:00:06.0", vendor="0x10de", klass="0x030200", numa=-1, cpus="0-15"
    )
    add_node(tmp_path, 0, "0-15", "10")
    (tmp_path / "sys" / "class" / "infiniband").mkdir(parents=True)
    add_class_dev(tmp_path, "net", "lo", None)
    view = collect_sysfs_view(tmp_path)
    assert view["pci_devices"] == [
        {
            "address": "0000:00:06.0",
            "vendor": "0x10de",
            "class": "0x030200",
            "device": "0x2330",
            "numa_node": -1,
            "local_cpulist": "0-15",
            "path": ["pci0000:00", "0000:00:06.0"],
        }
    ]
    assert view["nics"] == []
    assert view["numa_nodes"] == [{"id": 0, "cpulist": "0-15", "distance": [10]}]
    topo = topology_from_sysfs_view(json.loads(json.dumps(view)))
    assert topo.source == "sysfs"
    assert topo.gpu_count == 1 and topo.nvlink_islands == [[0]]
    g = topo.gpus[0]
    # numa_node -1, but CPUs 0-15 are exactly node0: the same answer nvidia-smi gives
    assert (g.pci_bus_id, g.numa_node, g.cpu_affinity) == ("0000:00:06.0", 0, "0-15")
    assert [(n.id, n.gpus, n.cpus, n.distances) for n in topo.numa_nodes] == [
        (0, [0], "0-15", [10])
    ]
    smi = parse_nvidia_smi_topo(read(H100_VM / "nvidia-smi-topo.txt"))
    assert smi.gpus[0].numa_node == g.numa_node and smi.gpus[0].cpu_affinity == g.cpu_affinity


def build_two_socket_tree(root: Path) -> None:
    nv = {"vendor": "0x10de", "klass": "0x030200"}
    add_pci(
        root,
        "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0",
        numa=0,
        cpus="0-7",
        **nv,
    )
    add_pci(
        root,
        "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.1",
        vendor="0x10de",
        klass="0x040300",
        numa=0,
        cpus="0-7",
    )  # HDMI audio
    mlx = add_pci(
        root,
        "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0",
        vendor="0x15b3",
        klass="0x020700",
        numa=0,
        cpus="0-7",
    )
    add_pci(root, "pci0000:00/0000:00:02.0/0000:05:00.0", numa=0, cpus="0-7", **nv)
    add_pci(root, "pci0000:80/0000:80:01.0/0000:81:00.0", numa=1, cpus="8-15", **nv)
    add_pci(
        root,
        "pci0000:80/0000:80:03.0/0000:85:00.0",
        vendor="0x10de",
        klass="0x068000",
        numa=1,
        cpus="8-15",
    )  # NVSwitch
    eth = add_pci(
        root,
        "pci0000:80/0000:80:02.0/0000:82:00.0",
        vendor="0x8086",
        klass="0x020000",
        numa=1,
        cpus="8-15",
    )
    add_class_dev(root, "infiniband", "mlx5_0", mlx)
    add_class_dev(root, "net", "ib0", mlx)  # IPoIB on the same function: covered by mlx5_0
    add_class_dev(root, "net", "eth0", eth)
    add_class_dev(root, "net", "lo", None)
    add_node(root, 0, "0-7", "10 21")
    add_node(root, 1, "8-15", "21 10")


def test_sysfs_two_socket_tree_with_switches(tmp_path: Path) -> None:
    build_two_socket_tree(tmp_path)
    view = collect_sysfs_view(tmp_path)
    assert [d["address"] for d in view["pci_devices"]] == [
        "0000:03:00.0",
        "0000:03:00.1",
        "0000:05:00.0",
        "0000:81:00.0",
        "0000:85:00.0",
    ]
    assert sorted(n["name"] for n in view["nics"]) == ["eth0", "ib0", "mlx5_0"]
    topo = topology_from_sysfs_view(view)
    assert [g.pci_bus_id for g in topo.gpus] == ["0000:03:00.0", "0000:05:00.0", "0000:81:00.0"]
    assert [g.numa_node for g in topo.gpus] == [0, 0, 1]
    links = {(lk.a, lk.b): lk.link for lk in topo.gpu_links}
    assert links == {(0, 1): PHB, (0, 2): SYS, (1, 2): SYS}
    assert [(n.name, n.numa_node, n.pix_gpus) for n in topo.nics] == [
        ("mlx5_0", 0, [0]),
        ("eth0", 1, []),
    ]
    nic = {(nl.gpu, nl.nic): nl.link for nl in topo.nic_links}
    assert nic == {
        (0, "mlx5_0"): PIX,
        (1, "mlx5_0"): PHB,
        (2, "mlx5_0"): SYS,
        (0, "eth0"): SYS,
        (1, "eth0"): SYS,
        (2, "eth0"): PHB,
    }
    assert [(n.id, n.gpus, n.cpus, n.distances) for n in topo.numa_nodes] == [
        (0, [0, 1], "0-7", [10, 21]),
        (1, [2], "8-15", [21, 10]),
    ]
    assert topo.nvlink_islands == [[0], [1], [2]]


def test_sysfs_without_paths_only_node_or_sys(tmp_path: Path) -> None:
    build_two_socket_tree(tmp_path)
    view = collect_sysfs_view(tmp_path)
    for d in view["pci_devices"] + view["nics"]:
        d["path"] = None
    topo = topology_from_sysfs_view(view)
    assert {(lk.a, lk.b): lk.link for lk in topo.gpu_links} == {
        (0, 1): NODE,
        (0, 2): SYS,
        (1, 2): SYS,
    }
    assert {nl.link for nl in topo.nic_links} <= {NODE, SYS}
    assert all(n.pix_gpus == [] for n in topo.nics)


def test_sysfs_view_errors() -> None:
    with pytest.raises(TopologyParseError, match="no NVIDIA GPU"):
        topology_from_sysfs_view({"pci_devices": []})
    with pytest.raises(TopologyParseError, match=r"pci_devices\[0\].address"):
        topology_from_sysfs_view(
            {"pci_devices": [{"address": "x", "vendor": "0x10de", "class": "0x030000"}]}
        )
    with pytest.raises(TopologyParseError, match="vendor"):
        topology_from_sysfs_view(
            {"pci_devices": [{"address": "0000:01:00.0", "vendor": 4318, "class": "0x03"}]}
        )


def test_collect_sysfs_view_missing_root(tmp_path: Path) -> None:
    view = collect_sysfs_view(tmp_path / "nothing")
    assert view == {"kind": "SysfsView", "pci_devices": [], "nics": [], "numa_nodes": []}


# ---------------------------------------------------------------------------------------------
# detect / parse_any
# ---------------------------------------------------------------------------------------------


def test_detect_format_and_parse_any() -> None:
    assert detect_format(read(TOPO_DIR / HGX)) == "nvidia-smi"
    assert detect_format(read(H100_VM / "nvidia-smi-topo.txt")) == "nvidia-smi"
    assert (
        detect_format(read(TOPO_DIR / "amd-rocm-smi-showtopo-mi308x-8gpu-xgmi.txt")) == "rocm-smi"
    )
    assert detect_format(read(H100_VM / "nvml.json")) == "nvml-json"
    assert detect_format(json.dumps({"kind": "SysfsView", "pci_devices": []})) == "sysfs-json"
    topo = parse_any(read(TOPO_DIR / DGX), node_name="dgx-1")
    assert topo.node_name == "dgx-1"
    again = topo.to_json(indent=2)
    assert detect_format(again) == "node-topology"
    assert parse_any(again) == topo
    assert parse_any(again, "node-topology", node_name="other").node_name == "other"
    assert parse_any(read(H100_VM / "nvml.json")).source == "nvml"


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("", 1, "empty"),
        ("lorem ipsum\n", 1, "not a topology format"),
        ('{"gpus": [1, 2]}', 1, "JSON is not"),
        ('{\n  "kind": "NodeTopology",\n  oops\n}', 3, "invalid JSON"),
    ],
)
def test_parse_any_errors(text: str, line: int, words: str) -> None:
    with pytest.raises(TopologyParseError) as exc:
        parse_any(text)
    assert exc.value.line == line and words in str(exc.value)


def test_parse_any_invalid_node_topology() -> None:
    bad = {"kind": "NodeTopology", "source": "x", "gpus": [{"index": 0}], "nvlink_islands": []}
    with pytest.raises(TopologyParseError, match="not a valid NodeTopology"):
        parse_any(json.dumps(bad))


# ---------------------------------------------------------------------------------------------
# render
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        HGX,
        DGX,
        "pcie-8x-rtx4090-2socket-allsys-2nic.txt",
        "pcie-8gpu-plx-switches-pix-pxb-legacy-2018.txt",
    ],
)
def test_draw_node_on_a_given_axes(name: str) -> None:
    topo = parse_any(read(TOPO_DIR / name))
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    assert draw_node(topo, ax) is ax
    texts = {t.get_text() for t in ax.texts}
    assert {f"GPU{i}" for i in range(topo.gpu_count)} <= texts
    assert {n.name for n in topo.nics} <= texts
    assert not ax.axison


def test_render_figure_one_gpu(tmp_path: Path) -> None:
    fig = render_figure(parse_any(read(H100_VM / "nvidia-smi-topo.txt")))
    out = tmp_path / "one.png"
    fig.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_parse_prints_json() -> None:
    res = runner.invoke(topology_app, ["parse", str(TOPO_DIR / HGX), "--node-name", "gpu-a"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["kind"] == "NodeTopology" and data["node_name"] == "gpu-a"
    assert [(g["index"], g["numa_node"]) for g in data["gpus"]] == [(i, i // 4) for i in range(8)]
    assert data["nvlink_islands"] == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert [(n["name"], n["pix_gpus"]) for n in data["nics"]] == [
        (f"mlx5_{i}", [i]) for i in range(8)
    ]
    assert res.stdout.startswith('{\n  "apiVersion"')  # indent 2


def test_cli_parse_stdin_and_format() -> None:
    text = read(TOPO_DIR / "amd-rocm-smi-showtopo-mi308x-8gpu-xgmi.txt")
    res = runner.invoke(topology_app, ["parse", "-", "--format", "rocm-smi"], input=text)
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["source"] == "rocm-smi"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("garbage\n", "line 1: not a topology format"),
        ("\n".join(fixture_lines(HGX)[:5]) + "\n", "line 6: expected the row for GPU4"),
    ],
)
def test_cli_parse_bad_input(tmp_path: Path, content: str, fragment: str) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    res = runner.invoke(topology_app, ["parse", str(bad)])
    assert res.exit_code == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {bad} line ")
    assert fragment in lines[0]
    assert "Traceback" not in res.stderr


def test_cli_parse_missing_file_and_wrong_format(tmp_path: Path) -> None:
    res = runner.invoke(topology_app, ["parse", str(tmp_path / "nope.txt")])
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert res.stderr.startswith("error: ")
    res = runner.invoke(topology_app, ["parse", str(TOPO_DIR / HGX), "--format", "rocm-smi"])
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert "Link Type" in res.stderr


def test_cli_show_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "dgx.png"
    res = runner.invoke(topology_app, ["show", str(TOPO_DIR / DGX), "--png", str(out)])
    assert res.exit_code == 0, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = runner.invoke(topology_app, ["show", "-", "--png", str(tmp_path / "x.png")], input="nope")
    assert bad.exit_code == 2 and not (tmp_path / "x.png").exists()


def test_cli_help_mentions_commands() -> None:
    res = runner.invoke(topology_app, ["--help"])
    assert res.exit_code == 0 and "parse" in res.stdout and "show" in res.stdout
    for cmd in ("parse", "show"):
        res = runner.invoke(topology_app, [cmd, "--help"])
        assert res.exit_code == 0 and "stdin" in res.stdout.replace("standard input", "stdin")
