"""Placement quality: kube-scheduler with the topo-sched extender against the default scheduler.

Runs the scenario of ``tests/test_placement_quality.py``
(``topo_sched.sim.placement_quality.placement_quality_scenario``: 64 nodes, 8 racks x 8,
HGX H100 and 2-socket PCIe boxes from real ``nvidia-smi topo -m`` captures, 2P1D RBG groups
with TP 1-8, a
4 x 8-GPU leader/worker instance, background pods, a recreated pod) through the kube-scheduler
model with the extender (weight 20) and without it, and prints one table per tie-break seed
and, with ``--seeds N``, the mean over seeds 0..N-1.

    python benchmarks/placement_quality.py
    python benchmarks/placement_quality.py --seeds 20
"""

from __future__ import annotations

import argparse
import time

from topo_sched.placement.engine import PlacementEngine
from topo_sched.sim.placement_quality import (
    METRIC_HELP,
    METRICS,
    format_table,
    placement_metrics,
    placement_quality_scenario,
    run_scenario,
)
from topo_sched.sim.scheduler import RandomScheduler, SchedulerModel


def run_once(seed: int, weight: int, with_random: bool) -> dict[str, dict[str, float]]:
    scenario = placement_quality_scenario()
    policies = {
        "with": SchedulerModel(PlacementEngine(), weight, seed=seed),
        "without": SchedulerModel(None, weight, seed=seed),
    }
    if with_random:
        policies["random"] = RandomScheduler(seed)
    return {name: placement_metrics(run_scenario(scenario, p)) for name, p in policies.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="tie-break seed of the headline run")
    ap.add_argument("--seeds", type=int, default=0, help="also print the mean over N seeds")
    ap.add_argument("--weight", type=int, default=20, help="extender weight")
    ap.add_argument("--random", action="store_true", help="add a random-placement column")
    ap.add_argument("--help-metrics", action="store_true", help="explain each metric")
    args = ap.parse_args()

    t0 = time.perf_counter()
    table = run_once(args.seed, args.weight, args.random)
    print(f"placement quality, seed {args.seed}, extender weight {args.weight}")
    print(format_table(table))
    if args.seeds:
        sums: dict[str, dict[str, float]] = {}
        for seed in range(args.seeds):
            for name, m in run_once(seed, args.weight, args.random).items():
                acc = sums.setdefault(name, dict.fromkeys(METRICS, 0.0))
                for k, v in m.items():
                    acc[k] += v
        means = {n: {k: v / args.seeds for k, v in m.items()} for n, m in sums.items()}
        print()
        print(f"mean over tie-break seeds 0..{args.seeds - 1}")
        print(format_table(means))
    if args.help_metrics:
        print()
        for m, text in METRIC_HELP.items():
            print(f"{m}: {text}")
    print(f"\n({time.perf_counter() - t0:.2f} s)")


if __name__ == "__main__":
    main()
