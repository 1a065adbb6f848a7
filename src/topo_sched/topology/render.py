"""Draw one node's topology with matplotlib: who is close to whom, at a glance.

Layout (:func:`draw_node`, pure: it only draws on the Axes it is given):

- one grey box per NUMA node (label: node id and its CPUs), GPUs in a row at the top of the box,
  NICs in a row below, each NIC under the GPUs it is closest to; GPUs with no known NUMA node
  go in dashed "NUMA ?" boxes, one per CPU affinity they print (old drivers: one per socket);
  a NIC with no known node goes with its PIX/PXB/PHB GPUs, or else in a dashed row at the
  bottom;
- NVLink/XGMI islands above the GPUs: an island where every GPU reaches every other (NVSwitch,
  or a full mesh) is one thick bar with a drop line per GPU, labelled with the link count;
  other islands are drawn link by link as arcs labelled NV#;
- GPUs sharing a PCIe switch (PIX) or a switch tree (PXB) get a tinted frame around them;
- GPU-NIC links: PIX solid, PXB dashed, PHB dotted and light. NODE and SYS are not drawn: the
  NUMA boxes already say it (same box = NODE, different boxes = SYS).

:func:`suggested_figsize` gives a figure size in inches at which the fixed-size text fits;
:func:`render_figure` makes that Figure and draws on it (the CLI's ``topology show``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch, PathPatch
from matplotlib.path import Path as MplPath

from topo_sched.topology.model import LinkClass, NodeTopology

__all__ = ["draw_node", "render_figure", "suggested_figsize"]

# geometry, in data units (1 unit ~ 0.8 inch at the suggested size)
SLOT = 1.35
BOX_W, BOX_H = 1.05, 0.62
NIC_W, NIC_H = 1.05, 0.42
GPU_Y = 0.0
NIC_Y = -1.75
PAD = 0.3
BOX_GAP = 0.45
BAR_Y0 = 0.95
BAR_STEP = 0.5
LOOSE_MIN_W = 5.2
INCH_PER_UNIT = 0.8
#: Margins render_figure leaves around the Axes, inches (the title sits in TOP_IN).
TOP_IN, BOTTOM_IN, SIDE_IN = 0.42, 0.05, 0.08

GPU_FILL, GPU_EDGE = "#e3f1cf", "#4a7a00"
NIC_FILL, NIC_EDGE = "#dbe8f7", "#2a5d9f"
NUMA_FILL, NUMA_EDGE = "#f5f5f5", "#9a9a9a"
NV_COLOR = "#4a7a00"
XGMI_COLOR = "#b03a2e"
PCIE_COLOR = "#2a5d9f"
PHB_COLOR = "#8c8c8c"
PIX_TINT, PXB_TINT = "#fbe3b8", "#fdf1dc"
PIX_EDGE, PXB_EDGE = "#d08a1a", "#e2b978"


#: A box: a NUMA node id, "cpus:<list>" for GPUs of unknown node (grouped by CPU affinity), or
#: None (nothing known).
BoxKey = int | str | None


@dataclass
class _Box:
    key: BoxKey
    gpus: list[int] = field(default_factory=list)
    nics: list[str] = field(default_factory=list)
    x0: float = 0.0
    width: float = 0.0


@dataclass
class _Layout:
    boxes: list[_Box]
    gpu_xy: dict[int, tuple[float, float]]
    nic_xy: dict[str, tuple[float, float]]
    loose: list[str]
    islands: list[tuple[list[int], bool]]  # (gpus, drawn as a bar)
    bar_level: dict[int, int]  # island position -> bar level
    box_bottom: float
    x_min: float
    x_max: float
    y_min: float
    y_max: float


def suggested_figsize(topo: NodeTopology) -> tuple[float, float]:
    """Figure size (inches) at which :func:`render_figure` fits the drawing and its title."""
    lay = _layout(topo)
    w = (lay.x_max - lay.x_min) * INCH_PER_UNIT
    h = (lay.y_max - lay.y_min) * INCH_PER_UNIT
    title_w = 0.3 + 0.075 * len(_title(topo))
    return max(3.0, w + 2 * SIDE_IN, title_w), max(1.5, h) + TOP_IN + BOTTOM_IN


def render_figure(topo: NodeTopology, *, title: str | None = None, dpi: int = 120) -> Figure:
    """A matplotlib Figure of the suggested size with the node drawn (save it with savefig)."""
    w, h = suggested_figsize(topo)
    fig = Figure(figsize=(w, h), dpi=dpi)
    rect = (SIDE_IN / w, BOTTOM_IN / h, 1 - 2 * SIDE_IN / w, 1 - (TOP_IN + BOTTOM_IN) / h)
    draw_node(topo, fig.add_axes(rect), title=title)
    return fig


def draw_node(topo: NodeTopology, ax: Axes, *, title: str | None = None) -> Axes:
    """Draw ``topo`` on ``ax``: sets limits, equal aspect, a title, and turns the axis off.

    Text has a fixed size in points, so the drawing keeps a fixed scale (INCH_PER_UNIT) when
    the Axes is larger than it needs (content top-left), and shrinks when it is smaller.
    """
    lay = _layout(topo)
    _draw_boxes(topo, ax, lay)
    _draw_pcie_groups(topo, ax, lay)
    _draw_nic_links(topo, ax, lay)
    _draw_fabric(topo, ax, lay)
    for g in topo.gpus:
        _device(
            ax, lay.gpu_xy[g.index], BOX_W, BOX_H, GPU_FILL, GPU_EDGE, f"GPU{g.index}", _gpu_sub(g)
        )
    for n in topo.nics:
        _device(ax, lay.nic_xy[n.name], NIC_W, NIC_H, NIC_FILL, NIC_EDGE, n.name, None)
    _legend(topo, ax, lay)

    ext_w, ext_h = lay.x_max - lay.x_min, lay.y_max - lay.y_min
    pos = ax.get_position()
    fig_w, fig_h = ax.figure.get_size_inches()
    want_w = pos.width * fig_w / INCH_PER_UNIT
    want_h = pos.height * fig_h / INCH_PER_UNIT
    ax.set_xlim(lay.x_min, lay.x_min + max(ext_w, want_w))
    ax.set_ylim(lay.y_max - max(ext_h, want_h), lay.y_max)
    ax.set_aspect("equal", adjustable="datalim", anchor="NW")
    ax.axis("off")
    ax.set_title(title if title is not None else _title(topo), fontsize=11, loc="left")
    return ax


# -- layout ------------------------------------------------------------------------------------


def _layout(topo: NodeTopology) -> _Layout:
    gpu_box = {g.index: _box_key(g) for g in topo.gpus}
    boxes: dict[BoxKey, _Box] = {}
    for g in topo.gpus:
        boxes.setdefault(gpu_box[g.index], _Box(gpu_box[g.index])).gpus.append(g.index)

    near: dict[str, dict[int, LinkClass]] = {n.name: {} for n in topo.nics}
    for nl in topo.nic_links:
        if nl.link in (LinkClass.PIX, LinkClass.PXB, LinkClass.PHB):
            near[nl.nic][nl.gpu] = nl.link
    loose: list[str] = []
    for n in topo.nics:
        key: BoxKey = n.numa_node
        if key is None:
            homes = {gpu_box[g] for g in near[n.name]}
            if near[n.name] and len(homes) == 1:
                key = next(iter(homes))
            else:
                loose.append(n.name)
                continue
        boxes.setdefault(key, _Box(key)).nics.append(n.name)
    ordered = sorted(boxes.values(), key=lambda b: _box_order(b.key))
    has_nic_row = any(b.nics for b in ordered)

    # GPUs: keep PCIe groups contiguous (PXB tree, then PIX switch, then index), a gap between
    pxb_group = _components(topo, {LinkClass.PIX, LinkClass.PXB})
    pix_group = _components(topo, {LinkClass.PIX})
    gpu_xy: dict[int, tuple[float, float]] = {}
    nic_xy: dict[str, tuple[float, float]] = {}
    x = 0.0
    for box in ordered:
        box.gpus.sort(key=lambda i: (pxb_group[i], pix_group[i], i))
        xs: list[float] = []
        for k, gi in enumerate(box.gpus):
            if k == 0:
                xs.append(0.0)
                continue
            prev = box.gpus[k - 1]
            gap = SLOT
            if pxb_group[gi] != pxb_group[prev]:
                gap += 0.3
            elif pix_group[gi] != pix_group[prev]:
                gap += 0.15
            xs.append(xs[-1] + gap)
        gpu_span = xs[-1] if xs else 0.0
        nic_span = (len(box.nics) - 1) * SLOT if box.nics else 0.0
        label_w = 0.068 * len(_box_label(topo, box.key)) + 0.3
        span = max(gpu_span, nic_span, label_w - BOX_W - 2 * PAD)
        box.x0 = x
        box.width = span + BOX_W + 2 * PAD
        inner0 = x + PAD + BOX_W / 2
        shift = (span - gpu_span) / 2
        for gi, gx in zip(box.gpus, xs, strict=True):
            gpu_xy[gi] = (inner0 + shift + gx, GPU_Y)
        lo, hi = inner0, inner0 + span
        targets = sorted((_nic_target(name, near, gpu_xy, hi), name) for name in box.nics)
        for (_, name), px in zip(targets, _spread([t for t, _ in targets], lo, hi), strict=True):
            nic_xy[name] = (px, NIC_Y)
        x += box.width + BOX_GAP
    x_max = x - BOX_GAP
    box_bottom = (NIC_Y - NIC_H / 2 if has_nic_row else GPU_Y - BOX_H / 2) - PAD

    loose_y = box_bottom - 0.55 - NIC_H / 2 - 0.3
    if loose:
        per_row = max(1, int((x_max - 2 * PAD - BOX_W) // SLOT) + 1)
        for k, name in enumerate(loose):
            row, col = divmod(k, per_row)
            nic_xy[name] = (PAD + BOX_W / 2 + col * SLOT, loose_y - row * (NIC_H + 0.35))
        x_max = max(x_max, 2 * PAD + BOX_W + (min(len(loose), per_row) - 1) * SLOT, LOOSE_MIN_W)

    islands: list[tuple[list[int], bool]] = []
    for isl in topo.nvlink_islands:
        if len(isl) < 2:
            continue
        complete = all(
            (lk := topo.gpu_link(a, b)) is not None and lk.link.is_fabric
            for i, a in enumerate(isl)
            for b in isl[i + 1 :]
        )
        islands.append((isl, complete and (topo.nvswitch or len(isl) >= 3)))
    bar_level: dict[int, int] = {}
    spans: list[tuple[float, float, int]] = []
    top = GPU_Y + BOX_H / 2 + PAD + 0.15
    for pos, (isl, is_bar) in enumerate(islands):
        gx = [gpu_xy[i][0] for i in isl]
        lo_x, hi_x = min(gx) - 0.5, max(gx) + 0.5
        if is_bar:
            level = 0
            while any(lv == level and not (hi_x < a or lo_x > b) for a, b, lv in spans):
                level += 1
            spans.append((lo_x, hi_x, level))
            bar_level[pos] = level
            top = max(top, BAR_Y0 + level * BAR_STEP + 0.4)
        else:
            span = max(
                abs(gpu_xy[lk.a][0] - gpu_xy[lk.b][0])
                for lk in topo.gpu_links
                if lk.link.is_fabric and lk.a in isl and lk.b in isl
            )
            top = max(top, GPU_Y + BOX_H / 2 + 0.35 + 0.22 * (span + BOX_W) + 0.25)
    bottom = box_bottom
    if loose:
        rows = -(-len(loose) // max(1, int((x_max - 2 * PAD - BOX_W) // SLOT) + 1))
        bottom = loose_y - (rows - 1) * (NIC_H + 0.35) - NIC_H / 2 - PAD
    bottom -= 0.6  # legend
    return _Layout(
        boxes=ordered,
        gpu_xy=gpu_xy,
        nic_xy=nic_xy,
        loose=loose,
        islands=islands,
        bar_level=bar_level,
        box_bottom=box_bottom,
        x_min=-0.15,
        x_max=x_max + 0.15,
        y_min=bottom,
        y_max=top + 0.1,
    )


def _box_label(topo: NodeTopology, key: BoxKey) -> str:
    if isinstance(key, int):
        cpus = next((n.cpus for n in topo.numa_nodes if n.id == key), None)
        return f"NUMA {key}" + (f"   CPUs {cpus}" if cpus else "")
    if isinstance(key, str):
        return f"NUMA ?   CPUs {key.removeprefix('cpus:')}"
    return "NUMA ?"


def _box_key(g) -> BoxKey:
    if g.numa_node is not None:
        return g.numa_node
    return f"cpus:{g.cpu_affinity}" if g.cpu_affinity else None


def _box_order(key: BoxKey) -> tuple[int, int, str]:
    if isinstance(key, int):
        return (0, key, "")
    if isinstance(key, str):
        first = key.removeprefix("cpus:").split(",")[0].split("-")[0]
        return (1, int(first) if first.isdigit() else 0, key)
    return (2, 0, "")


def _components(topo: NodeTopology, classes: set[LinkClass]) -> dict[int, int]:
    parent = {g.index: g.index for g in topo.gpus}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for lk in topo.gpu_links:
        if lk.link in classes:
            ra, rb = find(lk.a), find(lk.b)
            parent[max(ra, rb)] = min(ra, rb)
    return {i: find(i) for i in parent}


def _nic_target(
    name: str,
    near: dict[str, dict[int, LinkClass]],
    gpu_xy: dict[int, tuple[float, float]],
    hi: float,
) -> float:
    for cls in (LinkClass.PIX, LinkClass.PXB, LinkClass.PHB):
        xs = [gpu_xy[g][0] for g, c in near[name].items() if c == cls and g in gpu_xy]
        if xs:
            return sum(xs) / len(xs)
    return hi + 1.0  # no close GPU: to the right end


def _spread(targets: list[float], lo: float, hi: float) -> list[float]:
    """Positions as close to the sorted targets as possible, SLOT apart, inside [lo, hi]."""
    out: list[float] = []
    for t in targets:
        p = max(lo, min(hi, t))
        if out and p < out[-1] + SLOT:
            p = out[-1] + SLOT
        out.append(p)
    if out and out[-1] > hi:  # pushed past the right edge: shift back
        shift = out[-1] - hi
        out = [p - shift for p in out]
        for k in range(len(out) - 2, -1, -1):
            out[k] = min(out[k], out[k + 1] - SLOT)
    return out


# -- drawing -------------------------------------------------------------------------------------


def _draw_boxes(topo: NodeTopology, ax: Axes, lay: _Layout) -> None:
    y0 = lay.box_bottom
    y1 = GPU_Y + BOX_H / 2 + PAD + 0.05
    for box in lay.boxes:
        known = isinstance(box.key, int)
        _frame(ax, box.x0, y0, box.x0 + box.width, y1, NUMA_FILL, "-" if known else "--")
        label = _box_label(topo, box.key)
        ax.text(
            box.x0 + 0.1,
            y0 + 0.07,
            label,
            fontsize=7.5,
            color="#555555",
            ha="left",
            va="bottom",
            zorder=1,
        )
    if lay.loose:
        xs = [lay.nic_xy[n][0] for n in lay.loose]
        ys = [lay.nic_xy[n][1] for n in lay.loose]
        lx0 = min(xs) - NIC_W / 2 - PAD
        lx1 = max(max(xs) + NIC_W / 2 + PAD, lx0 + LOOSE_MIN_W)
        ly0, ly1 = min(ys) - NIC_H / 2 - PAD, max(ys) + NIC_H / 2 + 0.3
        _frame(ax, lx0, ly0, lx1, ly1, "white", "--")
        far = all(nl.link == LinkClass.SYS for nl in topo.nic_links if nl.nic in lay.loose)
        text = "NICs, NUMA node unknown" + (": SYS to every GPU" if far else "")
        ax.text(
            lx0 + 0.1,
            ly1 - 0.05,
            text,
            fontsize=7.5,
            color="#555555",
            ha="left",
            va="top",
            zorder=1,
        )


def _frame(ax: Axes, x0: float, y0: float, x1: float, y1: float, fill: str, style: str) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x0, y0),
            x1 - x0,
            y1 - y0,
            boxstyle="round,pad=0,rounding_size=0.12",
            facecolor=fill,
            edgecolor=NUMA_EDGE,
            linewidth=1.0,
            linestyle=style,
            zorder=0,
        )
    )


def _draw_pcie_groups(topo: NodeTopology, ax: Axes, lay: _Layout) -> None:
    """Tinted frames: PIX (one PCIe switch) inside PXB (a tree of switches)."""
    box_of = {g: b.key for b in lay.boxes for g in b.gpus}
    for classes, pad, below, fill, edge, label in (
        ({LinkClass.PIX, LinkClass.PXB}, 0.2, 0.34, PXB_TINT, PXB_EDGE, "PXB: PCIe switch tree"),
        ({LinkClass.PIX}, 0.08, 0.2, PIX_TINT, PIX_EDGE, "PIX: one switch"),
    ):
        groups: dict[tuple[BoxKey, int], list[int]] = {}
        for g, root in _components(topo, classes).items():
            groups.setdefault((box_of[g], root), []).append(g)
        for members in groups.values():
            if len(members) < 2:
                continue
            xs = [lay.gpu_xy[m][0] for m in members]
            x0, x1 = min(xs) - BOX_W / 2 - pad, max(xs) + BOX_W / 2 + pad
            y0, y1 = GPU_Y - BOX_H / 2 - below, GPU_Y + BOX_H / 2 + pad
            ax.add_patch(
                FancyBboxPatch(
                    (x0, y0),
                    x1 - x0,
                    y1 - y0,
                    boxstyle="round,pad=0,rounding_size=0.08",
                    facecolor=fill,
                    edgecolor=edge,
                    linewidth=0.8,
                    zorder=0.5,
                )
            )
            ax.text(
                x0 + 0.08,
                y0 + 0.02,
                label,
                fontsize=6,
                color="#8a5a00",
                ha="left",
                va="bottom",
                zorder=0.6,
            )


def _draw_nic_links(topo: NodeTopology, ax: Axes, lay: _Layout) -> None:
    style = {
        LinkClass.PIX: dict(color=PCIE_COLOR, linewidth=2.0, linestyle="-", alpha=0.95),
        LinkClass.PXB: dict(color=PCIE_COLOR, linewidth=1.5, linestyle=(0, (4, 2)), alpha=0.9),
        LinkClass.PHB: dict(color=PHB_COLOR, linewidth=1.0, linestyle=(0, (1, 2)), alpha=0.9),
    }
    for nl in topo.nic_links:
        if nl.link not in style:
            continue
        gx, gy = lay.gpu_xy[nl.gpu]
        nx_, ny = lay.nic_xy[nl.nic]
        ax.plot(
            [gx, nx_],
            [gy - BOX_H / 2, ny + NIC_H / 2],
            zorder=1,
            solid_capstyle="butt",
            **style[nl.link],
        )


def _draw_fabric(topo: NodeTopology, ax: Axes, lay: _Layout) -> None:
    for pos, (isl, is_bar) in enumerate(lay.islands):
        links = [topo.gpu_link(a, b) for i, a in enumerate(isl) for b in isl[i + 1 :]]
        links = [lk for lk in links if lk is not None and lk.link.is_fabric]
        xgmi = any(lk.link == LinkClass.XGMI for lk in links)
        color = XGMI_COLOR if xgmi else NV_COLOR
        if is_bar:
            y = BAR_Y0 + lay.bar_level[pos] * BAR_STEP
            xs = [lay.gpu_xy[i][0] for i in isl]
            ax.plot(
                [min(xs) - 0.35, max(xs) + 0.35],
                [y, y],
                color=color,
                linewidth=5,
                solid_capstyle="round",
                zorder=2,
            )
            for xg in xs:
                ax.plot([xg, xg], [GPU_Y + BOX_H / 2, y], color=color, linewidth=3, zorder=2)
            ax.text(
                min(xs) - 0.35,
                y + 0.1,
                _bar_label(topo, links, xgmi),
                fontsize=8,
                color=color,
                ha="left",
                va="bottom",
                fontweight="bold",
                zorder=3,
            )
        else:
            ends = _arc_ends(links, lay.gpu_xy)
            for lk in links:
                _arc(ax, ends[(lk.a, lk.b)], ends[(lk.b, lk.a)], color, lk)


def _bar_label(topo: NodeTopology, links: list, xgmi: bool) -> str:
    if xgmi:
        return "XGMI (Infinity Fabric), all-to-all"
    counts = sorted({lk.nvlinks for lk in links if lk.nvlinks})
    if not counts:
        nv = "NVLink"
    elif len(counts) == 1:
        nv = f"NV{counts[0]}"
    else:
        nv = f"NV{counts[0]}-NV{counts[-1]}"
    return f"NVSwitch, {nv} between every pair" if topo.nvswitch else f"NVLink all-to-all, {nv}"


def _arc_ends(links: list, gpu_xy: dict[int, tuple[float, float]]) -> dict[tuple[int, int], float]:
    """x where each arc leaves each GPU: a GPU's arcs spread over its top edge, ordered by
    where they go, so arcs to the left leave from the left and none share a point."""
    peers: dict[int, list[int]] = {}
    for lk in links:
        peers.setdefault(lk.a, []).append(lk.b)
        peers.setdefault(lk.b, []).append(lk.a)
    out: dict[tuple[int, int], float] = {}
    for g, others in peers.items():
        gx = gpu_xy[g][0]
        others.sort(
            key=lambda o: (
                gpu_xy[o][0] > gx,
                -abs(gpu_xy[o][0] - gx) if gpu_xy[o][0] < gx else abs(gpu_xy[o][0] - gx),
            )
        )
        n = len(others)
        usable = BOX_W * 0.8
        for k, o in enumerate(others):
            out[(g, o)] = gx - usable / 2 + usable * (k + 0.5) / n if n > 1 else gx
    return out


def _arc(ax: Axes, xa: float, xb: float, color: str, lk) -> None:
    xa, xb = sorted((xa, xb))
    y = GPU_Y + BOX_H / 2
    h = 0.35 + 0.22 * (xb - xa)
    verts = [(xa, y), ((xa + xb) / 2, y + 2 * h), (xb, y)]
    path = MplPath(verts, [MplPath.MOVETO, MplPath.CURVE3, MplPath.CURVE3])
    width = 1.2 + min(2.5, (lk.nvlinks or 1) / 3)
    ax.add_patch(PathPatch(path, facecolor="none", edgecolor=color, linewidth=width, zorder=2))
    label = f"NV{lk.nvlinks}" if lk.link == LinkClass.NVLINK and lk.nvlinks else lk.link.value
    ax.text(
        (xa + xb) / 2,
        y + h,
        label,
        fontsize=7,
        color=color,
        ha="center",
        va="center",
        zorder=3,
        bbox=dict(boxstyle="round,pad=0.12", facecolor="white", edgecolor="none", alpha=0.85),
    )


def _device(
    ax: Axes,
    xy: tuple[float, float],
    w: float,
    h: float,
    fill: str,
    edge: str,
    label: str,
    sub: str | None,
) -> None:
    x, y = xy
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0,rounding_size=0.07",
            facecolor=fill,
            edgecolor=edge,
            linewidth=1.3,
            zorder=4,
        )
    )
    if sub:
        ax.text(
            x, y + 0.08, label, fontsize=8.5, ha="center", va="center", fontweight="bold", zorder=5
        )
        ax.text(x, y - 0.15, sub, fontsize=6, ha="center", va="center", color="#444444", zorder=5)
    else:
        ax.text(
            x,
            y,
            label,
            fontsize=8 if len(label) < 9 else 6.5,
            ha="center",
            va="center",
            fontweight="bold",
            zorder=5,
        )


def _gpu_sub(g) -> str | None:
    if g.gpu_numa_id is not None:
        return f"mem node {g.gpu_numa_id}"
    if g.name:
        short = g.name.replace("NVIDIA ", "").replace("AMD Instinct ", "")
        return short if len(short) <= 16 else short[:15] + "…"
    return None


def _legend(topo: NodeTopology, ax: Axes, lay: _Layout) -> None:
    handles: list[Line2D] = []
    classes = {lk.link for lk in topo.gpu_links} | {nl.link for nl in topo.nic_links}
    if LinkClass.NVLINK in classes:
        handles.append(Line2D([], [], color=NV_COLOR, linewidth=4, label="NVLink"))
    if LinkClass.XGMI in classes:
        handles.append(Line2D([], [], color=XGMI_COLOR, linewidth=4, label="XGMI"))
    nic_classes = {nl.link for nl in topo.nic_links}
    if LinkClass.PIX in nic_classes:
        handles.append(Line2D([], [], color=PCIE_COLOR, linewidth=2, label="PIX (one PCIe switch)"))
    if LinkClass.PXB in nic_classes:
        handles.append(
            Line2D(
                [],
                [],
                color=PCIE_COLOR,
                linewidth=1.5,
                linestyle=(0, (4, 2)),
                label="PXB (PCIe switches)",
            )
        )
    if LinkClass.PHB in nic_classes:
        handles.append(
            Line2D(
                [],
                [],
                color=PHB_COLOR,
                linewidth=1,
                linestyle=(0, (1, 2)),
                label="PHB (host bridge)",
            )
        )
    note = "NODE/SYS not drawn: same box = same NUMA node"
    handles.append(Line2D([], [], color="none", label=note))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(lay.x_min, lay.y_min + 0.52),
        bbox_transform=ax.transData,
        ncol=min(len(handles), 4),
        fontsize=7,
        frameon=False,
        handlelength=2.2,
        borderaxespad=0.1,
        columnspacing=1.2,
    )


def _title(topo: NodeTopology) -> str:
    multi = [i for i in topo.nvlink_islands if len(i) > 1]
    parts = [f"{topo.gpu_count} GPU" + ("s" if topo.gpu_count != 1 else "")]
    if multi:
        parts.append(f"{len(multi)} fabric island" + ("s" if len(multi) != 1 else ""))
    if topo.numa_nodes:
        parts.append(
            f"{len(topo.numa_nodes)} NUMA node" + ("s" if len(topo.numa_nodes) != 1 else "")
        )
    if topo.nics:
        parts.append(f"{len(topo.nics)} NIC" + ("s" if len(topo.nics) != 1 else ""))
    head = topo.node_name or "node"
    extra = f", clique {topo.clique}" if topo.clique else ""
    return f"{head}: " + ", ".join(parts) + f"   (source: {topo.source}{extra})"
