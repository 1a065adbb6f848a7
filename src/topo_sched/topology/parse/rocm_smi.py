"""Parser for ``rocm-smi --showtopo`` (AMD Instinct GPUs).

The output has blocks under ``=== title ===`` rules. Read here:

- ``Weight between two GPUs`` and ``Hops between two GPUs``: integer matrices (checked square,
  symmetric, 0 on the diagonal);
- ``Link Type between two GPUs``: ``XGMI`` or ``PCIE`` per pair (diagonal ``0``);
- ``Numa Nodes``: ``GPU[i] : (Topology) Numa Node: n`` and ``... Numa Affinity: n`` lines.

Other blocks (e.g. ``Access between two GPUs`` in newer releases) are skipped. The record:

- ``XGMI`` -> LinkClass.XGMI (Infinity Fabric; defines the islands).
- ``PCIE``: KFD's topology, which rocm-smi reports, has no PCIe switches or host bridges, only
  GPU and CPU nodes, so the class is picked from what it does say, most specific first:

  ======================================  =======
  both GPUs on one known NUMA node        NODE
  GPUs on two different known NUMA nodes  SYS
  NUMA unknown, hops 1 (direct P2P link)  PXB
  NUMA unknown, hops 2 (GPU-CPU-GPU)      NODE
  NUMA unknown, hops 3 or more            SYS
  NUMA unknown and no hops block          (pair left out)
  ======================================  =======

  except that hops 1 (a direct PCIe P2P link, no CPU in between) gives PXB even on one NUMA
  node. PIX and PHB are never claimed: nothing in the output can tell them apart from PXB/NODE.
- ``gpus[].numa_node``: the ``Numa Affinity`` line (the PCI device's node; -1 -> None), or the
  ``Numa Node`` line where there is no affinity line. ``source`` is ``rocm-smi``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from topo_sched.topology.model import Gpu, GpuLink, LinkClass, NodeTopology, build_node_topology
from topo_sched.topology.parse._common import strip_ansi
from topo_sched.topology.parse.errors import TopologyParseError

__all__ = ["parse_rocm_smi_showtopo"]

_TITLE_RE = re.compile(r"^\s*=+\s*(.*?)\s*=+\s*$")
_GPU_LABEL_RE = re.compile(r"^GPU(\d+)$")
_NUMA_LINE_RE = re.compile(
    r"^GPU\[(\d+)\]\s*:\s*\(Topology\)\s*Numa (Node|Affinity)\s*:\s*(\S+)\s*$"
)
_INT_RE = re.compile(r"^-?\d+$")

WEIGHT = "Weight between two GPUs"
HOPS = "Hops between two GPUs"
LINK_TYPE = "Link Type between two GPUs"
NUMA = "Numa Nodes"
_MATRIX_BLOCKS = (WEIGHT, HOPS, LINK_TYPE)
_DIAGONAL = {"0", "X", "N/A", "-"}


@dataclass
class _Matrix:
    labels: list[str]
    cells: list[list[str]]
    header_line: int
    row_lines: list[int]


def parse_rocm_smi_showtopo(text: str, *, node_name: str | None = None) -> NodeTopology:
    """Read ``rocm-smi --showtopo`` output into a NodeTopology (source ``rocm-smi``)."""
    lines = [ln.rstrip("\r") for ln in strip_ansi(text).split("\n")]
    if not any(ln.strip() for ln in lines):
        raise TopologyParseError("empty input: no rocm-smi --showtopo output", 1)
    blocks = _split_blocks(lines)
    if LINK_TYPE not in blocks:
        first = next((i for i, ln in enumerate(lines) if ln.strip()), 0)
        raise TopologyParseError(
            f"not rocm-smi --showtopo output: no '{LINK_TYPE}' block", first + 1
        )
    matrices: dict[str, _Matrix] = {}
    for title in _MATRIX_BLOCKS:
        if title in blocks:
            start, end = blocks[title]
            matrices[title] = _parse_matrix(lines, start, end, title)
    ref = matrices[LINK_TYPE]
    for title, mat in matrices.items():
        if mat.labels != ref.labels:
            raise TopologyParseError(
                f"'{title}' block has GPUs {mat.labels}, '{LINK_TYPE}' has {ref.labels}",
                mat.header_line,
            )
    indices = [int(_GPU_LABEL_RE.match(lb).group(1)) for lb in ref.labels]  # type: ignore[union-attr]

    for title in (WEIGHT, HOPS):
        if title in matrices:
            _check_ints(matrices[title], title)
    for k, row in enumerate(ref.cells):
        for j, tok in enumerate(row):
            if j != k and tok not in ("XGMI", "PCIE"):
                raise TopologyParseError(
                    f"unknown link type {tok!r} between {ref.labels[k]} and {ref.labels[j]} "
                    "(expected XGMI or PCIE)",
                    ref.row_lines[k],
                )

    numa = _parse_numa(lines, blocks.get(NUMA), set(indices))
    gpus = [Gpu(index=i, numa_node=numa.get(i)) for i in indices]
    hops = matrices.get(HOPS)
    links: list[GpuLink] = []
    for k in range(len(indices)):
        for j in range(k + 1, len(indices)):
            a, b = indices[k], indices[j]
            if ref.cells[k][j] == "XGMI":
                links.append(GpuLink(a=a, b=b, link=LinkClass.XGMI))
                continue
            cls = _pcie_class(
                numa.get(a), numa.get(b), int(hops.cells[k][j]) if hops is not None else None
            )
            if cls is not None:
                links.append(GpuLink(a=a, b=b, link=cls))
    return build_node_topology(source="rocm-smi", node_name=node_name, gpus=gpus, gpu_links=links)


def _pcie_class(na: int | None, nb: int | None, hops: int | None) -> LinkClass | None:
    if hops == 1:
        return LinkClass.PXB
    if na is not None and nb is not None:
        return LinkClass.NODE if na == nb else LinkClass.SYS
    if hops is None:
        return None
    return LinkClass.NODE if hops <= 2 else LinkClass.SYS


def _split_blocks(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Block title -> (first line index after the title rule, index of the next rule)."""
    titles = [
        (i, m.group(1)) for i, ln in enumerate(lines) if (m := _TITLE_RE.match(ln)) and m.group(1)
    ]
    out: dict[str, tuple[int, int]] = {}
    for pos, (i, title) in enumerate(titles):
        end = titles[pos + 1][0] if pos + 1 < len(titles) else len(lines)
        if title in out:
            raise TopologyParseError(f"block '{title}' appears twice", i + 1)
        out[title] = (i + 1, end)
    return out


def _parse_matrix(lines: list[str], start: int, end: int, title: str) -> _Matrix:
    body = [i for i in range(start, end) if lines[i].strip()]
    if not body:
        raise TopologyParseError(f"'{title}' block is empty (truncated?)", start + 1)
    h = body[0]
    labels = lines[h].split()
    if not all(_GPU_LABEL_RE.match(t) for t in labels):
        raise TopologyParseError(f"'{title}' block: expected a header of GPU columns", h + 1)
    if len(set(labels)) != len(labels):
        raise TopologyParseError(f"'{title}' block: a GPU column appears twice", h + 1)
    n = len(labels)
    rows = body[1:]
    cells: list[list[str]] = []
    for k, label in enumerate(labels):
        if k >= len(rows):
            line = rows[-1] + 2 if rows else h + 2
            raise TopologyParseError(
                f"'{title}' block: expected the row for {label}, found "
                f"{'end of input' if end >= len(lines) else 'the end of the block'} "
                f"(truncated matrix: {k} of {n} rows)",
                line,
            )
        i = rows[k]
        toks = lines[i].split()
        if toks[0] != label:
            raise TopologyParseError(
                f"'{title}' block: expected the row for {label}, found {toks[0]!r}", i + 1
            )
        if len(toks) != n + 1:
            raise TopologyParseError(
                f"'{title}' block: row {label} has {len(toks) - 1} cells, expected {n} "
                "(ragged or truncated row)",
                i + 1,
            )
        cells.append(toks[1:])
    if len(rows) > n:
        raise TopologyParseError(f"'{title}' block: unexpected line after the matrix", rows[n] + 1)
    row_lines = [i + 1 for i in rows[:n]]
    for k in range(n):
        if cells[k][k] not in _DIAGONAL:
            raise TopologyParseError(
                f"'{title}' block: diagonal cell {labels[k]}/{labels[k]} is {cells[k][k]!r}",
                row_lines[k],
            )
        for j in range(k):
            if cells[k][j] != cells[j][k]:
                raise TopologyParseError(
                    f"'{title}' block: matrix not symmetric: {labels[k]}/{labels[j]} is "
                    f"{cells[k][j]!r} but {labels[j]}/{labels[k]} on line {row_lines[j]} is "
                    f"{cells[j][k]!r}",
                    row_lines[k],
                )
    return _Matrix(labels, cells, h + 1, row_lines)


def _check_ints(mat: _Matrix, title: str) -> None:
    for k, row in enumerate(mat.cells):
        for j, tok in enumerate(row):
            if j == k:
                continue
            if not tok.isdigit() or int(tok) < 1:
                raise TopologyParseError(
                    f"'{title}' block: cell {mat.labels[k]}/{mat.labels[j]} is {tok!r}, "
                    "expected a positive integer",
                    mat.row_lines[k],
                )


def _parse_numa(
    lines: list[str], span: tuple[int, int] | None, known: set[int]
) -> dict[int, int | None]:
    if span is None:
        return {}
    node: dict[int, int | None] = {}
    affinity: dict[int, int | None] = {}
    for i in range(*span):
        ln = lines[i].strip()
        if not ln.startswith("GPU["):
            continue
        m = _NUMA_LINE_RE.match(ln)
        if not m:
            raise TopologyParseError(f"'{NUMA}' block: cannot read {ln!r}", i + 1)
        gpu, kind, value = int(m.group(1)), m.group(2), m.group(3)
        if gpu not in known:
            raise TopologyParseError(f"'{NUMA}' block names GPU[{gpu}], not in the matrices", i + 1)
        if value == "N/A":
            parsed = None
        elif _INT_RE.match(value):
            parsed = int(value) if int(value) >= 0 else None
        else:
            raise TopologyParseError(f"'{NUMA}' block: {value!r} is not a node number", i + 1)
        (affinity if kind == "Affinity" else node)[gpu] = parsed
    return {g: affinity[g] if g in affinity else node.get(g) for g in known}
