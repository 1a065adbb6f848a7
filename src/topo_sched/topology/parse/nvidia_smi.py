"""Parser for ``nvidia-smi topo -m`` (the GPU/NIC connection matrix).

Reads every shape the driver has printed that we have seen: TAB- or space-aligned cells,
ANSI underline codes around the header, indented headers, NIC columns named ``NIC#`` with a
``NIC Legend:`` giving the ``mlx5_#`` names or legacy raw ``mlx5_#`` columns, drivers with only
``CPU Affinity`` (no NUMA columns), ``N/A`` values (numa=off, no GPU NUMA node), NUMA affinity
lists (GB200), the ``NUMA Affinity<TAB><TAB>GPU NUMA ID`` double tab, and trailing blanks or
empty trailing TAB cells. A text holding several command outputs under ``## <command>``
headings (the hardware captures) is narrowed to the ``## ... topo -m`` block.

What the record says, and where it comes from:

- ``gpu_links``: every GPU pair, the token of the matrix (``NV#`` -> NVLINK with nvlinks=#,
  legacy ``SOC`` -> SYS). ``nic_links``: every GPU/NIC pair. NIC/NIC cells are checked, not kept.
- ``gpus[].numa_node``: the ``NUMA Affinity`` column. Where it is a list (GB200 prints
  ``0,3-9,11-17``: the CPU node plus memory-only nodes), the lowest node of the list, which is
  the first one as nvidia-smi prints lists ascending, and on Grace the node that holds the
  CPUs. ``N/A`` (numa=off) -> None. Drivers without the column -> None.
- ``gpus[].gpu_numa_id``: the ``GPU NUMA ID`` column (the NUMA node of the GPU's own memory on
  coherent platforms such as GB200); ``N/A`` or no column -> None.
- ``gpus[].cpu_affinity``: the ``CPU Affinity`` column as printed; ``N/A`` -> None.
- ``nics[].name``: the ``NIC Legend:`` name of the column (``mlx5_3``), or the column label where
  there is no legend entry (``NIC0`` in posts that cut the legend, ``mlx5_0`` in old drivers).
- ``nics[].numa_node``: nvidia-smi prints none for NICs. It is inferred only where the matrix
  pins it: the NUMA node shared by every GPU the NIC reaches without crossing the SMP
  interconnect (PIX/PXB/PHB/NODE), when those GPUs all have a known node and agree. A NIC
  that is SYS to every GPU keeps None.
- ``numa_nodes[].cpus``: the ``CPU Affinity`` of the node's GPUs, where they all name exactly
  that one node and all print the same CPU list; otherwise None.
- ``nvswitch``: True when some GPU's NV# counts over its peers add up to more than
  :data:`MAX_NVLINKS_PER_GPU` (no GPU has more links than that, so the links must be going
  through NVSwitch chips: HGX/DGX A100/H100, DGX-2, GB200 trays). nvidia-smi does not say so
  directly; a direct-mesh board (NV4 to each of 3 peers) stays False.

Anything that cannot be read without guessing raises :class:`TopologyParseError` naming the
line: no header, a truncated matrix, a row with the wrong number of cells, an unknown link
token, a matrix that is not symmetric, X off the diagonal, no GPU rows, values that are not
CPU/NUMA lists. A record is never built from a matrix that fails any of these checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from topo_sched.topology.model import (
    Gpu,
    GpuLink,
    LinkClass,
    Nic,
    NicLink,
    NodeTopology,
    build_node_topology,
)
from topo_sched.topology.parse._common import (
    LINK_TOKENS,
    numa_cpus_from_gpus,
    parse_cpulist,
    strip_ansi,
)
from topo_sched.topology.parse.errors import TopologyParseError

__all__ = ["MAX_NVLINKS_PER_GPU", "parse_nvidia_smi_topo"]

#: Most NVLinks one GPU has had so far (V100 6, A100 12, H100/B200 18).
MAX_NVLINKS_PER_GPU = 18

_GPU_LABEL_RE = re.compile(r"^GPU(\d+)$")
#: Column labels of devices: GPU#, NIC#, or a raw RDMA device name (mlx5_0, bnxt_re0, hfi1_0).
_DEVICE_LABEL_RE = re.compile(r"^(?:GPU\d+|NIC\d+|[a-z][a-z0-9_]*\d)$")
_NV_RE = re.compile(r"^NV(\d+)$")
_KNOWN_ATTR_RE = re.compile(r"CPU Affinity|NUMA Affinity|GPU NUMA ID")
_TOPO_M_HEADING_RE = re.compile(r"topo\s+(?:-m|--matrix)\b")
_LEGEND_NIC_RE = re.compile(r"^\s*(NIC\d+)\s*:\s*(\S+)\s*$")
_INT_RE = re.compile(r"^\d+$")

CPU_AFFINITY = "CPU Affinity"
NUMA_AFFINITY = "NUMA Affinity"
GPU_NUMA_ID = "GPU NUMA ID"

#: A parsed cell: (class, NVLink count or None); None for the diagonal.
_Cell = tuple[LinkClass, int | None] | None


@dataclass
class _Row:
    label: str
    lineno: int
    cells: list[_Cell]
    tokens: list[str]
    values: dict[str, str]


def parse_nvidia_smi_topo(text: str, *, node_name: str | None = None) -> NodeTopology:
    """Read ``nvidia-smi topo -m`` output into a NodeTopology (source ``nvidia-smi``)."""
    lines = [ln.rstrip("\r") for ln in strip_ansi(text).split("\n")]
    if not any(ln.strip() for ln in lines):
        raise TopologyParseError("empty input: no nvidia-smi topo -m matrix", 1)
    lo, hi = _select_block(lines)
    h = _find_header(lines, lo, hi)
    columns, attrs = _parse_header(lines[h], h + 1)
    rows = _parse_rows(lines, h, hi, columns, attrs)
    _check_symmetric(rows, columns)
    after = h + 1 + len(columns)
    _check_after_matrix(lines, after, hi)
    legend = _nic_legend(lines, after, hi)
    return _build(rows, columns, legend, node_name)


# -- locating the matrix -------------------------------------------------------------------------


def _select_block(lines: list[str]) -> tuple[int, int]:
    """The ``## ... topo -m`` block of a multi-command capture, else the whole text."""
    headings = [i for i, ln in enumerate(lines) if ln.startswith("## ")]
    for pos, i in enumerate(headings):
        if _TOPO_M_HEADING_RE.search(lines[i]):
            end = headings[pos + 1] if pos + 1 < len(headings) else len(lines)
            return i + 1, end
    return 0, len(lines)


def _find_header(lines: list[str], lo: int, hi: int) -> int:
    first_candidate: int | None = None
    for i in range(lo, hi):
        toks = lines[i].split()
        if not toks or not _GPU_LABEL_RE.match(toks[0]) or "X" in toks:
            continue
        if first_candidate is None:
            first_candidate = i
        if i + 1 < hi and lines[i + 1].split()[:1] == [toks[0]]:
            return i
    if first_candidate is not None:
        i = first_candidate
        label = lines[i].split()[0]
        found = "end of input" if i + 1 >= hi else repr(_clip(lines[i + 1].strip()))
        raise TopologyParseError(
            f"expected the row for {label} after the header on line {i + 1}, "
            f"found {found} (truncated matrix?)",
            i + 2,
        )
    first = next((i for i in range(lo, hi) if lines[i].strip()), lo)
    raise TopologyParseError(
        "not an nvidia-smi topo -m matrix: no header row of GPU columns (GPU0 GPU1 ...) "
        "followed by a GPU0 row",
        first + 1,
    )


def _parse_header(line: str, lineno: int) -> tuple[list[str], list[str]]:
    columns: list[str] = []
    pos = 0
    for m in re.finditer(r"\S+", line):
        if not _DEVICE_LABEL_RE.match(m.group()):
            break
        columns.append(m.group())
        pos = m.end()
    dup = {c for c in columns if columns.count(c) > 1}
    if dup:
        raise TopologyParseError(f"header names column {sorted(dup)[0]} twice", lineno)
    attrs: list[str] = []
    for part in re.split(r"\t|\s{2,}", line[pos:].strip()):
        if not part:
            continue
        known = _KNOWN_ATTR_RE.findall(part)
        if known and " ".join(known) == part:
            attrs.extend(known)  # names joined by single spaces in a mangled copy
        else:
            attrs.append(part)
    dup = {a for a in attrs if attrs.count(a) > 1}
    if dup:
        raise TopologyParseError(f"header names column {sorted(dup)[0]!r} twice", lineno)
    if not any(_GPU_LABEL_RE.match(c) for c in columns):
        raise TopologyParseError("header has no GPU columns", lineno)
    return columns, attrs


def _cells(line: str) -> list[str]:
    """Split a row: on TABs where there are any (keeping empty cells as ''), else on blanks."""
    if "\t" not in line:
        return line.split()
    out: list[str] = []
    for piece in line.split("\t"):
        parts = piece.split()
        out.extend(parts if parts else [""])
    while out and out[0] == "":
        out.pop(0)  # an indented row
    return out


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


# -- rows ----------------------------------------------------------------------------------------


def _parse_rows(
    lines: list[str], h: int, hi: int, columns: list[str], attrs: list[str]
) -> list[_Row]:
    n = len(columns)
    rows: list[_Row] = []
    for k, label in enumerate(columns):
        i = h + 1 + k
        lineno = i + 1
        if i >= hi or not lines[i].strip():
            if i >= len(lines):
                found = "end of input"
            elif i >= hi:
                found = f"the next section {_clip(lines[i].strip())!r}"
            else:
                found = "a blank line"
            raise TopologyParseError(
                f"expected the row for {label}, found {found} (truncated matrix: {k} of {n} rows)",
                lineno,
            )
        toks = _cells(lines[i])
        if toks[0] != label:
            raise TopologyParseError(
                f"expected the row for {label}, found {_clip(toks[0])!r} "
                "(rows must follow the header's column order)",
                lineno,
            )
        link_toks = toks[1 : 1 + n]
        if len(link_toks) < n:
            raise TopologyParseError(
                f"row {label} has {len(link_toks)} link cells, expected {n} "
                "(ragged or truncated row)",
                lineno,
            )
        if "" in link_toks:
            j = link_toks.index("")
            raise TopologyParseError(f"row {label} has an empty cell under {columns[j]}", lineno)
        cells = [
            _parse_cell(tok, label, columns[j], j == k, lineno) for j, tok in enumerate(link_toks)
        ]
        values = [v for v in toks[1 + n :] if v]
        is_gpu = bool(_GPU_LABEL_RE.match(label))
        if len(values) != len(attrs) and (is_gpu or values):
            what = ", ".join(attrs) if attrs else "none"
            raise TopologyParseError(
                f"row {label} has {len(values)} values after its {n} link cells, expected "
                f"{len(attrs) if is_gpu else f'0 or {len(attrs)}'} (columns: {what}); "
                "ragged row or a header that does not match",
                lineno,
            )
        rows.append(_Row(label, lineno, cells, link_toks, dict(zip(attrs, values, strict=False))))
    return rows


def _parse_cell(tok: str, row: str, col: str, diagonal: bool, lineno: int) -> _Cell:
    if diagonal:
        if tok != "X":
            raise TopologyParseError(f"cell {row}/{col} is {tok!r}, the diagonal must be X", lineno)
        return None
    if tok == "X":
        raise TopologyParseError(f"cell {row}/{col} is X off the diagonal", lineno)
    m = _NV_RE.match(tok)
    if m:
        count = int(m.group(1))
        if count < 1:
            raise TopologyParseError(
                f"cell {row}/{col} is {tok}: an NVLink count must be >= 1", lineno
            )
        return (LinkClass.NVLINK, count)
    if tok in LINK_TOKENS:
        return (LINK_TOKENS[tok], None)
    raise TopologyParseError(
        f"unknown link {_clip(tok)!r} between {row} and {col} "
        "(expected X, NV#, PIX, PXB, PHB, NODE, SYS)",
        lineno,
    )


def _check_symmetric(rows: list[_Row], columns: list[str]) -> None:
    for k, row in enumerate(rows):
        for j in range(k):
            if row.cells[j] != rows[j].cells[k]:
                raise TopologyParseError(
                    f"matrix not symmetric: {row.label}/{columns[j]} is {row.tokens[j]!r} but "
                    f"{columns[j]}/{row.label} on line {rows[j].lineno} is {rows[j].tokens[k]!r}",
                    row.lineno,
                )
    for row in rows:
        for j, cell in enumerate(row.cells):
            if cell is None or cell[0] != LinkClass.NVLINK:
                continue
            if not (_GPU_LABEL_RE.match(row.label) and _GPU_LABEL_RE.match(columns[j])):
                raise TopologyParseError(
                    f"cell {row.label}/{columns[j]} is {row.tokens[j]}: NVLink only joins GPUs",
                    row.lineno,
                )


def _check_after_matrix(lines: list[str], after: int, hi: int) -> None:
    if after < hi:
        toks = lines[after].split()
        if toks and _DEVICE_LABEL_RE.match(toks[0]) and "X" in toks[1:]:
            raise TopologyParseError(
                f"extra row {toks[0]!r} after the last column's row (header and rows disagree)",
                after + 1,
            )


def _nic_legend(lines: list[str], after: int, hi: int) -> dict[str, str]:
    """``NIC Legend:`` entries between the matrix and the next matrix or block end."""
    legend: dict[str, str] = {}
    owner: dict[str, int] = {}
    in_legend = False
    for i in range(after, hi):
        ln = lines[i]
        toks = ln.split()
        if toks and _GPU_LABEL_RE.match(toks[0]):
            break  # another matrix (e.g. topo -p2p) starts
        if "= Status Ok" in ln:
            raise TopologyParseError(
                "this is nvidia-smi topo -p2p output (its legend reads 'OK = Status Ok'), "
                "not topo -m",
                i + 1,
            )
        if ln.strip() == "NIC Legend:":
            in_legend = True
            continue
        if not in_legend:
            continue
        m = _LEGEND_NIC_RE.match(ln)
        if m:
            label, name = m.groups()
            if label in legend:
                raise TopologyParseError(f"NIC Legend names {label} twice", i + 1)
            if name in owner:
                raise TopologyParseError(
                    f"NIC Legend gives the name {name!r} to two NICs (also line {owner[name]})",
                    i + 1,
                )
            legend[label] = name
            owner[name] = i + 1
        elif ln.strip() and legend:
            break
    return legend


# -- building the record ---------------------------------------------------------------------


def _parse_values(row: _Row) -> tuple[str | None, list[int] | None, int | None]:
    """(cpu affinity, NUMA affinity list, GPU NUMA id) of one row, validated."""
    cpu = row.values.get(CPU_AFFINITY)
    numa = row.values.get(NUMA_AFFINITY)
    gnid = row.values.get(GPU_NUMA_ID)
    cpu_out: str | None = None
    numa_out: list[int] | None = None
    gnid_out: int | None = None
    if cpu is not None and cpu != "N/A":
        try:
            parse_cpulist(cpu)
        except ValueError as e:
            raise TopologyParseError(f"{row.label} {CPU_AFFINITY}: {e}", row.lineno) from None
        cpu_out = cpu
    if numa is not None and numa != "N/A":
        try:
            numa_out = parse_cpulist(numa)
        except ValueError as e:
            raise TopologyParseError(f"{row.label} {NUMA_AFFINITY}: {e}", row.lineno) from None
    if gnid is not None and gnid != "N/A":
        if not _INT_RE.match(gnid):
            raise TopologyParseError(
                f"{row.label} {GPU_NUMA_ID}: {gnid!r} is not a node number", row.lineno
            )
        gnid_out = int(gnid)
    return cpu_out, numa_out, gnid_out


def _build(
    rows: list[_Row], columns: list[str], legend: dict[str, str], node_name: str | None
) -> NodeTopology:
    gpu_pos = [k for k, c in enumerate(columns) if _GPU_LABEL_RE.match(c)]
    nic_pos = [k for k, c in enumerate(columns) if not _GPU_LABEL_RE.match(c)]
    index_of = {k: int(_GPU_LABEL_RE.match(columns[k]).group(1)) for k in gpu_pos}  # type: ignore[union-attr]
    if len(set(index_of.values())) != len(index_of):
        raise TopologyParseError("two GPU columns share an index", rows[0].lineno - 1)

    gpus: list[Gpu] = []
    numa_lists: dict[int, list[int] | None] = {}
    for k in gpu_pos:
        cpu, numa, gnid = _parse_values(rows[k])
        idx = index_of[k]
        numa_lists[idx] = numa
        gpus.append(
            Gpu(
                index=idx,
                numa_node=min(numa) if numa else None,
                gpu_numa_id=gnid,
                cpu_affinity=cpu,
            )
        )
    gpu_by_index = {g.index: g for g in gpus}

    gpu_links: list[GpuLink] = []
    for a_pos, a in enumerate(gpu_pos):
        for b in gpu_pos[a_pos + 1 :]:
            cell = rows[a].cells[b]
            assert cell is not None
            gpu_links.append(GpuLink(a=index_of[a], b=index_of[b], link=cell[0], nvlinks=cell[1]))

    names = {columns[k]: legend.get(columns[k], columns[k]) for k in nic_pos}
    if len(set(names.values())) != len(names):
        raise TopologyParseError("two NIC columns end up with the same name", rows[0].lineno - 1)
    nics: list[Nic] = []
    nic_links: list[NicLink] = []
    for k in nic_pos:
        name = names[columns[k]]
        near: set[int | None] = set()
        for g in gpu_pos:
            cell = rows[k].cells[g]
            assert cell is not None
            nic_links.append(NicLink(gpu=index_of[g], nic=name, link=cell[0]))
            if cell[0] in (LinkClass.PIX, LinkClass.PXB, LinkClass.PHB, LinkClass.NODE):
                near.add(gpu_by_index[index_of[g]].numa_node)
        _, own_numa, _ = _parse_values(rows[k]) if rows[k].values else (None, None, None)
        if own_numa:
            numa_node = min(own_numa)
        elif len(near) == 1 and None not in near:
            numa_node = next(iter(near))
        else:
            numa_node = None
        nics.append(Nic(name=name, numa_node=numa_node))

    numa_cpus = numa_cpus_from_gpus(
        {g.index: g.numa_node for g in gpus}, numa_lists, {g.index: g.cpu_affinity for g in gpus}
    )

    per_gpu: dict[int, int] = {}
    for lk in gpu_links:
        if lk.link == LinkClass.NVLINK and lk.nvlinks:
            per_gpu[lk.a] = per_gpu.get(lk.a, 0) + lk.nvlinks
            per_gpu[lk.b] = per_gpu.get(lk.b, 0) + lk.nvlinks
    nvswitch = any(total > MAX_NVLINKS_PER_GPU for total in per_gpu.values())

    return build_node_topology(
        source="nvidia-smi",
        node_name=node_name,
        gpus=gpus,
        nics=nics,
        gpu_links=gpu_links,
        nic_links=nic_links,
        numa_cpus=numa_cpus or None,
        nvswitch=nvswitch,
    )
