"""``topo-sched topology``: read a node's topology from tool output and print or draw it."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path

import typer

from topo_sched.topology.model import NodeTopology
from topo_sched.topology.parse import TopologyParseError, parse_any

app = typer.Typer(
    name="topology",
    help=(
        "Read one node's GPU/NIC/NUMA topology from `nvidia-smi topo -m`, "
        "`rocm-smi --showtopo`, an NVML or sysfs view (JSON from the agent), or a NodeTopology "
        "JSON, and print it as a NodeTopology record or draw it."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class InputFormat(StrEnum):
    nvidia_smi = "nvidia-smi"
    rocm_smi = "rocm-smi"
    nvml_json = "nvml-json"
    sysfs_json = "sysfs-json"
    node_topology = "node-topology"


FILE_HELP = "Input file, or - to read standard input."
FORMAT_HELP = (
    "Input format: nvidia-smi (topo -m), rocm-smi (--showtopo), nvml-json, sysfs-json, "
    "node-topology. Detected from the content when left out."
)


def _fail(file: str, err: TopologyParseError | str) -> typer.Exit:
    if isinstance(err, TopologyParseError):
        where = f"{file} line {err.line}" if err.line is not None else file
        msg = f"error: {where}: {err.reason}"
    else:
        msg = f"error: {file}: {err}"
    typer.echo(" ".join(msg.split()), err=True)
    return typer.Exit(code=2)


def _load(file: str, fmt: InputFormat | None, node_name: str | None) -> NodeTopology:
    try:
        if file == "-":
            text = sys.stdin.read()
        else:
            text = Path(file).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise _fail(file, e.strerror or str(e)) from None
    try:
        return parse_any(text, fmt.value if fmt else None, node_name=node_name)
    except TopologyParseError as e:
        raise _fail(file, e) from None


PARSE_HELP = (
    "Parse FILE and print its NodeTopology record as JSON (indent 2) on stdout.\n\n"
    "Input that cannot be read faithfully (truncated, ragged or asymmetric matrix, unknown "
    "link token, not a topology at all) exits with code 2 and one line on stderr: "
    "'error: FILE line N: what is wrong'."
)
SHOW_HELP = (
    "Parse FILE and draw it to a PNG.\n\n"
    "NUMA nodes are boxes; NVLink/XGMI islands are bars (NVSwitch, all-to-all) or arcs (NV#) "
    "above the GPUs; GPUs under one PCIe switch share a tinted frame; GPU-NIC links are drawn "
    "PIX solid, PXB dashed, PHB dotted; NODE and SYS are implied by the boxes. Bad input exits "
    "with code 2 and one line on stderr, as for parse."
)


@app.command("parse", help=PARSE_HELP)
def parse(
    file: str = typer.Argument(..., help=FILE_HELP),
    fmt: InputFormat | None = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    node_name: str | None = typer.Option(
        None, "--node-name", "-n", help="Kubernetes node name to put in the record."
    ),
) -> None:
    topo = _load(file, fmt, node_name)
    typer.echo(topo.to_json(indent=2))


@app.command("show", help=SHOW_HELP)
def show(
    file: str = typer.Argument(..., help=FILE_HELP),
    png: Path = typer.Option(..., "--png", help="Where to write the drawing (PNG)."),
    fmt: InputFormat | None = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    node_name: str | None = typer.Option(
        None, "--node-name", "-n", help="Node name for the record and the drawing's title."
    ),
    dpi: int = typer.Option(120, "--dpi", min=50, max=600, help="Resolution of the PNG."),
) -> None:
    topo = _load(file, fmt, node_name)
    from topo_sched.topology.render import render_figure  # matplotlib only when drawing

    fig = render_figure(topo, dpi=dpi)
    try:
        fig.savefig(png, format="png")
    except OSError as e:
        raise _fail(str(png), e.strerror or str(e)) from None
    typer.echo(f"wrote {png}", err=True)
