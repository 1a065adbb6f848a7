"""``topo-sched simulate``: replay a request trace on a modelled cluster, compare policies.

Thin: read the scenario (or the built-in default), apply the flags, run the comparison with a
progress bar, write results.json / report.html, print the table. Input a user can get wrong
(scenario, trace, cluster dump, policy names) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer

HELP = """Replay a request trace on a modelled GPU cluster and compare placement and scaling
policies side by side, with the same placement engine, kube-scheduler model and scaling policy
the extender and the autoscaler run.

With no SCENARIO the built-in default runs (a 64-node two-zone cluster, two PD services, the
Azure 2023 conversation trace shipped in the package). Placement policies are compared under
coordinated scaling, scaling policies under topology-aware placement. Writes DIR/results.json
(stable keys, see docs/simulation.md), DIR/series.json and DIR/report.html with its PNG plots.
Same scenario and seed, same results.json."""


def _fail(msg: str) -> NoReturn:
    typer.echo("error: " + " ".join(str(msg).split()), err=True)
    raise typer.Exit(2)


def _names(values: list[str] | None, known: tuple[str, ...], flag: str) -> list[str] | None:
    if not values:
        return None
    out: list[str] = []
    for v in values:
        for name in filter(None, (x.strip() for x in v.split(","))):
            if name not in known:
                _fail(f"{flag} {name!r} is not one of {', '.join(known)}")
            if name not in out:
                out.append(name)
    return out or None


def simulate(
    scenario: Annotated[
        Path | None,
        typer.Argument(
            metavar="[SCENARIO.yaml]",
            help="Scenario file (see simulations/); the built-in default if omitted.",
            dir_okay=False,
        ),
    ] = None,
    trace: Annotated[
        str | None,
        typer.Option(
            "--trace",
            help="Request trace: azure-conv, azure-code (shipped) or a file (Azure CSV or "
            "Mooncake JSONL, detected); overrides the scenario's.",
        ),
    ] = None,
    cluster: Annotated[
        Path | None,
        typer.Option(
            "--cluster",
            help="A `kubectl get nodes,pods -A -o json` dump to simulate on instead of the "
            "scenario's cluster; its pods are the background load.",
            dir_okay=False,
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option("--out", help="Directory for results.json, series.json and report.html."),
    ] = Path("sim-out"),
    seed: Annotated[
        int | None, typer.Option("--seed", help="Overrides the scenario's seed.")
    ] = None,
    placement: Annotated[
        list[str] | None,
        typer.Option(
            "--placement",
            help="Placement policies to compare (repeatable or comma-separated): "
            "topology-aware, default, random, optimal.",
        ),
    ] = None,
    scaling: Annotated[
        list[str] | None,
        typer.Option(
            "--scaling",
            help="Scaling policies to compare (repeatable or comma-separated): coordinated, "
            "placement-aware, independent, static-peak, oracle.",
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Only the first 10 minutes of traffic (a fast look)."),
    ] = False,
) -> None:
    """Replay a request trace on a modelled cluster and compare policies."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from topo_sched.sim.profile import ProfileError
    from topo_sched.sim.report import table_rows, write_report
    from topo_sched.sim.runner import prepare, run_all
    from topo_sched.sim.scenario import (
        PLACEMENT_POLICIES,
        SCALING_POLICY_NAMES,
        ScenarioError,
        default_scenario,
        load_scenario,
    )
    from topo_sched.sim.traces import TraceError, load_trace

    err = Console(stderr=True)
    pl = _names(placement, PLACEMENT_POLICIES, "--placement")
    sl = _names(scaling, SCALING_POLICY_NAMES, "--scaling")
    try:
        sc = load_scenario(scenario) if scenario is not None else default_scenario()
        cluster_file = str(cluster) if cluster is not None else None
        if cluster_file is not None and not Path(cluster_file).is_file():
            _fail(f"--cluster {cluster_file}: no such file")
        sc = sc.with_overrides(
            trace=trace, cluster_file=cluster_file, seed=seed, placement=pl, scaling=sl
        )
    except ScenarioError as e:
        _fail(str(e))
    try:
        tr = load_trace(sc.traffic.trace)
    except TraceError as e:
        _fail(str(e))
    if tr.skipped_count:
        err.print(
            f"[yellow]warning:[/] {tr.source}: {tr.skipped_summary()}",
            highlight=False,
            soft_wrap=True,
        )
    started = time.perf_counter()
    try:
        prep = prepare(sc, quick=quick, trace=tr)
    except (ScenarioError, TraceError, ProfileError, ValueError, KeyError) as e:
        _fail(str(e).strip("'\""))

    total = prep.ticks_per_run * len(prep.runs)
    with Progress(
        TextColumn("[bold]{task.description:<34}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task("simulating", total=total)

        def on_progress(label: str, done: int, _total: int) -> None:
            progress.update(task, completed=done, description=label)

        results = run_all(prep, on_progress)
        progress.update(task, completed=total, description="done")
    elapsed = time.perf_counter() - started
    paths = write_report(results, out)

    import json

    data = json.loads(paths["results"].read_text())
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=140)
    info = data["scenario"]
    console.print(
        f"[bold]{info['name']}[/]: {info['cluster']['nodes']} nodes / "
        f"{info['cluster']['gpus']} GPUs, {info['traffic']['requests_simulated']} requests over "
        f"{info['traffic']['duration_s'] / 60:.0f} simulated minutes, seed {info['seed']}"
        + (" (quick)" if quick else ""),
        highlight=False,
    )
    for section, title in (
        ("placement", f"Placement (scaling: {data['comparison']['placement_runs_use_scaling']})"),
        ("scaling", f"Scaling (placement: {data['comparison']['scaling_runs_use_placement']})"),
    ):
        header, rows = table_rows(data, section)
        table = Table(title=title, title_justify="left", header_style="bold")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for r in rows:
            table.add_row(*r)
        console.print(table)
    for note in data["notes"]:
        console.print(f"note: {note}", highlight=False)
    console.print(
        f"wrote {paths['results']} and {paths['report']} in {elapsed:.1f} s", highlight=False
    )
