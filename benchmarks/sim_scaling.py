"""How ``topo-sched simulate``'s run time grows with cluster size and with requests.

Two sweeps over the built-in default scenario (two PD services, the Azure 2023 conversation
trace at its real pace and 3x its rate, 40% background load):

- nodes: the ``nodes: N`` cluster preset (racks of 8, three HGX racks to one PCIe rack, two
  zones) at each ``--nodes`` size, with the whole trace;
- requests: the default 64-node cluster with the first ``--fractions`` of the trace.

Each case is timed end to end as the command does it: ``prepare`` (cluster, trace, per-service
constants) plus every run of the comparison (``run_all``). The placement policies compared are
topology-aware, default and random (the ILP bound ``optimal`` is skipped above 64 nodes anyway,
and on 64 nodes it is timed separately with ``--with-optimal``); the scaling policies are all
four. Time is wall-clock (``time.perf_counter``), one repetition per case: on a shared machine,
rerun before reading much into a 10% difference. The table gives each case's time and its
ratio to the smallest case of its sweep.

    python benchmarks/sim_scaling.py                       # 64, 256, 1000 nodes; 1/4, 1/2, 1
    python benchmarks/sim_scaling.py --nodes 64,1000 --fractions 0.5,1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from topo_sched.sim.runner import prepare, run_all
from topo_sched.sim.scenario import default_scenario, parse_scenario

PLACEMENTS = ["topology-aware", "default", "random"]
SCALINGS = ["coordinated", "independent", "static-peak", "oracle"]


def _scenario(nodes: int | None, fraction: float, with_optimal: bool):
    data = default_scenario().model_dump()
    if nodes is not None:
        data["cluster"] = {"preset": "nodes", "nodes": nodes, "background_load": 0.4}
    if fraction < 1.0:
        # The trace's hour, cut: same rate, fewer requests.
        data["traffic"]["window"] = {"start_s": 0.0, "duration_s": 3600.0 * fraction}
    placements = PLACEMENTS + (["optimal"] if with_optimal else [])
    data["policies"] = {"placement": placements, "scaling": SCALINGS}
    return parse_scenario(data, source="benchmark")


def _time(nodes: int | None, fraction: float, with_optimal: bool = False) -> dict:
    sc = _scenario(nodes, fraction, with_optimal)
    t0 = time.perf_counter()
    prep = prepare(sc)
    t1 = time.perf_counter()
    res = run_all(prep)
    t2 = time.perf_counter()
    requests = prep.trace_info["requests_simulated"]
    return {
        "nodes": len(prep.nodes),
        "fraction": fraction,
        "requests": requests,
        "runs": len(res.runs),
        "skipped": len(res.skipped),
        "prepare_s": round(t1 - t0, 3),
        "runs_s": round(t2 - t1, 3),
        "total_s": round(t2 - t0, 3),
        "per_run_s": round((t2 - t1) / max(1, len(res.runs)), 3),
    }


def _table(title: str, rows: list[dict], key: str) -> str:
    base = rows[0]["total_s"] or 1e-9
    base_x = rows[0][key] or 1
    head = f"{key:>9} {'requests':>9} {'runs':>5} {'prepare s':>10} {'runs s':>8} "
    head += f"{'total s':>8} {'per run s':>10} {'x size':>7} {'x time':>7}"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r[key]:>9g} {r['requests']:>9} {r['runs']:>5} {r['prepare_s']:>10.2f} "
            f"{r['runs_s']:>8.2f} {r['total_s']:>8.2f} {r['per_run_s']:>10.2f} "
            f"{r[key] / base_x:>7.2f} {r['total_s'] / base:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="64,256,1000", help="cluster sizes (comma-separated)")
    ap.add_argument("--fractions", default="0.25,0.5,1", help="trace fractions, default cluster")
    ap.add_argument("--with-optimal", action="store_true", help="also time the ILP on 64 nodes")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    nodes = [int(x) for x in args.nodes.split(",") if x]
    fractions = [float(x) for x in args.fractions.split(",") if x]
    print(
        f"python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs; placement {PLACEMENTS}, scaling {SCALINGS}",
        flush=True,
    )
    by_nodes = []
    for n in nodes:
        by_nodes.append(_time(n, 1.0))
        print(f"  nodes {n}: {by_nodes[-1]['total_s']:.1f} s", file=sys.stderr, flush=True)
    by_req = []
    for f in fractions:
        by_req.append(_time(None, f))
        print(f"  fraction {f}: {by_req[-1]['total_s']:.1f} s", file=sys.stderr, flush=True)
    print()
    print(_table("run time vs nodes (whole trace)", by_nodes, "nodes"))
    print()
    print(_table("run time vs requests (64 nodes, first part of the trace)", by_req, "fraction"))
    out = {"by_nodes": by_nodes, "by_requests": by_req}
    if args.with_optimal:
        opt = _time(None, 1.0, with_optimal=True)
        print()
        print(
            f"with the optimal ILP on 64 nodes: {opt['runs']} runs in {opt['total_s']:.1f} s "
            f"({opt['per_run_s']:.2f} s per run on average)"
        )
        out["with_optimal_64"] = opt
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    big = [r for r in by_nodes if r["nodes"] >= 1000]
    if big:
        r = big[-1]
        verdict = "MET" if r["total_s"] < 600 else "NOT MET"
        print(f"\ntarget: {r['nodes']} nodes, whole trace, < 600 s: {r['total_s']:.0f} s {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
