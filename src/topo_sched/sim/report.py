"""What ``topo-sched simulate`` writes: ``results.json``, ``series.json``, ``report.html`` + PNGs.

``results.json`` has stable keys (documented in docs/simulation.md, section "results.json"):

- ``placement.<policy>``: one run per placement policy, all with the same scaling policy
  (``coordinated`` when it is compared), policies named ``topology-aware``, ``default``,
  ``random``, ``optimal``;
- ``scaling.<policy>``: one run per scaling policy, all with the same placement policy
  (``topology-aware`` when it is compared), policies named ``coordinated``,
  ``placement-aware``, ``independent``, ``static-peak``, ``oracle``.

Each run has the same metric keys (:data:`RUN_KEYS` are the ones every run has). A policy that
was not run (``optimal`` on a cluster larger than ``optimal_max_nodes``) has every key set to
``null`` and a ``skipped`` reason. Nothing in the file depends on the wall clock, so the same
scenario and seed give byte-identical files.

Plots are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from topo_sched.sim.runner import PAIR_LEVELS, RunResult, SimResults
from topo_sched.sim.scenario import PLACEMENT_POLICIES, SCALING_POLICY_NAMES

SCHEMA = "topo-sched.io/simulate-results/v1"

#: Keys every run carries (more are documented in docs/simulation.md).
RUN_KEYS = (
    "requests",
    "requests_finished",
    "requests_unfinished",
    "slo_attainment",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "itl_p50_s",
    "itl_p90_s",
    "itl_p99_s",
    "e2e_p90_s",
    "kv_transfer_mean_s",
    "kv_transfer_p90_s",
    "gpu_hours",
    "scaling_actions",
    "ratio_violations",
    "half_placed_unit_ticks",
    "half_placed_units_max",
    "pending_unit_ticks",
    "pending_units_max",
    "pending_pod_ticks",
    "tp_single_island_fraction",
    "pd_same_rack_fraction",
    "pd_pairs_by_level",
    "fragmentation",
    "ttft_components_mean_s",
)

COLORS = {
    "topology-aware": "#1b9e77",
    "default": "#d95f02",
    "random": "#7570b3",
    "optimal": "#3b3b3b",
    "coordinated": "#1b9e77",
    "placement-aware": "#e6ab02",
    "independent": "#e7298a",
    "static-peak": "#8c8c8c",
    "oracle": "#386cb0",
}
STYLES = {"optimal": (0, (4, 2)), "oracle": (0, (4, 2)), "static-peak": (0, (1, 1.5))}
LEVEL_COLORS = {
    "host": "#1b9e77",
    "clique": "#66c2a5",
    "rack": "#a6d854",
    "block": "#ffd92f",
    "spine": "#fdae61",
    "zone": "#f46d43",
    "region": "#a50026",
}
COMPONENTS = (
    ("prefill_wait", "prefill queue", "#bdbdbd"),
    ("prefill", "prefill", "#386cb0"),
    ("decode_wait", "decode slot wait", "#fdc086"),
    ("kv_transfer", "KV transfer", "#e7298a"),
    ("first_decode_step", "first decode step", "#7fc97f"),
)


# -- results.json --------------------------------------------------------------------------------


def _skipped(reason: str) -> dict[str, Any]:
    return {"skipped": reason, **{k: None for k in RUN_KEYS}}


def results_dict(res: SimResults) -> dict[str, Any]:
    prep = res.prep
    sc = prep.scenario
    base_s = res.base_scaling
    base_p = prep.scaling_placement
    placement: dict[str, Any] = {}
    for p in PLACEMENT_POLICIES:
        if p not in sc.policies.placement:
            continue
        if (p, base_s) in res.runs:
            placement[p] = res.runs[p, base_s].metrics
        else:
            placement[p] = _skipped(res.skipped.get((p, base_s), "not run"))
    scaling: dict[str, Any] = {}
    for s in SCALING_POLICY_NAMES:
        if s not in sc.policies.scaling:
            continue
        if (base_p, s) in res.runs:
            scaling[s] = res.runs[base_p, s].metrics
        else:
            scaling[s] = _skipped(res.skipped.get((base_p, s), "not run"))
    gpus = sum(_gpus(n) for n in prep.nodes)
    notes = sorted(set(res.skipped.values()))
    comparison: dict[str, Any] = {
        "placement_runs_use_scaling": base_s,
        "scaling_runs_use_placement": base_p,
    }
    ta, de = placement.get("topology-aware"), placement.get("default")
    if ta and de and ta.get("ttft_p90_s") is not None and de.get("ttft_p90_s"):
        comparison["ttft_p90_change_topology_aware_vs_default"] = round(
            ta["ttft_p90_s"] / de["ttft_p90_s"] - 1.0, 4
        )
        comparison["ttft_mean_components_delta_s"] = {
            k: round(ta["ttft_components_mean_s"][k] - de["ttft_components_mean_s"][k], 6)
            for k in ta["ttft_components_mean_s"]
        }
    co, sp = scaling.get("coordinated"), scaling.get("static-peak")
    if co and sp and co.get("gpu_hours") is not None and sp.get("gpu_hours"):
        comparison["gpu_hours_change_coordinated_vs_static_peak"] = round(
            co["gpu_hours"] / sp["gpu_hours"] - 1.0, 4
        )
    pa = scaling.get("placement-aware")
    if co and pa and co.get("gpu_hours") is not None and pa.get("gpu_hours") is not None:
        comparison["placement_aware_vs_coordinated"] = {
            k: {"coordinated": co[k], "placement-aware": pa[k]}
            for k in (
                "half_placed_unit_ticks",
                "pending_unit_ticks",
                "slo_attainment",
                "gpu_hours",
                "ttft_p90_s",
            )
        }
    return {
        "schema": SCHEMA,
        "scenario": {
            "name": sc.name,
            "description": sc.description,
            "seed": sc.seed,
            "quick": prep.quick,
            "cluster": {
                "preset": sc.cluster.preset,
                "file": Path(sc.cluster.file).name if sc.cluster.file else None,
                "nodes": len(prep.nodes),
                "gpus": gpus,
                "background_pods": len(prep.background),
                "background_gpus": sum(_pod_gpus(p) for p in prep.background),
            },
            "services": {
                name: {
                    "model": info.spec.model,
                    "prefill_tp": info.spec.prefill_tp,
                    "decode_tp": info.spec.decode_tp,
                    "ratio": {"prefill": info.spec.ratio.prefill, "decode": info.spec.ratio.decode},
                    "kv_bytes_per_token": info.model.kv_bytes_per_token,
                    "slo": info.spec.autoscaler.slo.model_dump(),
                    "mode": info.spec.autoscaler.mode,
                    "units": info.spec.autoscaler.units.model_dump(),
                    "capacity": {
                        "prefill_tokens_per_second": round(info.cap_prefill_tps, 3),
                        "decode_sequences": round(info.cap_decode_seqs, 3),
                        "sources": info.capacity_source,
                    },
                    "requests": len(prep.work.per_service[name]),
                }
                for name, info in prep.infos.items()
            },
            "traffic": {
                **prep.trace_info,
                "compress": sc.traffic.compress,
                "rate": sc.traffic.rate,
                "window": sc.traffic.window.model_dump() if sc.traffic.window else None,
            },
            "tick_s": sc.tick_s,
            "scale_interval_s": sc.scale_interval_s,
            "startup_s": sc.startup_s,
            "extender_weight": sc.extender_weight,
            "profile": prep.profile.name,
        },
        "comparison": comparison,
        "placement": placement,
        "scaling": scaling,
        "notes": notes,
    }


def _gpus(node: dict[str, Any]) -> int:
    st = node.get("status") or {}
    raw = (st.get("allocatable") or {}).get("nvidia.com/gpu", 0)
    try:
        return int(str(raw))
    except ValueError:
        return 0


def _pod_gpus(pod: dict[str, Any]) -> int:
    n = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        raw = ((c.get("resources") or {}).get("requests") or {}).get("nvidia.com/gpu")
        if raw is not None and str(raw).isdigit():
            n += int(str(raw))
    return n


def series_dict(res: SimResults) -> dict[str, Any]:
    return {
        "schema": SCHEMA + "/series",
        "runs": {f"{p}+{s}": r.series for (p, s), r in res.runs.items()},
    }


# -- plots ----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 110,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.25,
            "legend.frameon": False,
            "svg.hashsalt": "topo-sched",
        }
    )
    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, bbox_inches="tight", metadata={"Software": None})


def _dur(v: float) -> str:
    if v <= 0:
        return "0"
    if v >= 1:
        return f"{v:g} s"
    if v >= 1e-3:
        return f"{v * 1000:g} ms"
    return f"{v * 1e6:g} µs"


def _cdf_axes(
    ax, runs: list[tuple[str, RunResult]], attr: str, slos: list[float], unit: str, log: bool
):
    for label, r in runs:
        xs = sorted(getattr(r, attr))
        if not xs:
            continue
        n = len(xs)
        # Thin to ~2000 points: the curve looks the same and the PNG stays small.
        step = max(1, n // 2000)
        px = [*xs[::step], xs[-1]]
        py = [*(i / n for i in range(1, n + 1, step)), 1.0]
        ax.plot(
            px,
            py,
            color=COLORS.get(label),
            linestyle=STYLES.get(label, "solid"),
            lw=2,
            label=label,
        )
    for s in sorted(set(slos)):
        ax.axvline(s, color="#b2182b", lw=1, ls=":", alpha=0.8)
        ax.text(
            s,
            0.5,
            f"SLO {_dur(s)} ",
            color="#b2182b",
            fontsize=8,
            rotation=90,
            ha="right",
            va="center",
        )
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if log:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _dur(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 1.01)
    ax.set_ylabel("fraction of requests")
    ax.set_xlabel(unit)
    for q in (0.5, 0.9, 0.99):
        ax.axhline(q, color="#999999", lw=0.6, alpha=0.5)


def plot_cdfs(res: SimResults, out: Path, which: str) -> tuple[str, str] | None:
    plt = _plt()
    sc = res.prep.scenario
    if which == "placement":
        runs = [
            (p, res.runs[p, res.base_scaling])
            for p in sc.policies.placement
            if (p, res.base_scaling) in res.runs
        ]
        sub = f"placement policies, all with {res.base_scaling} scaling"
    else:
        runs = [
            (s, res.runs[res.prep.scaling_placement, s])
            for s in sc.policies.scaling
            if (res.prep.scaling_placement, s) in res.runs
        ]
        sub = f"scaling policies, all with {res.prep.scaling_placement} placement"
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _cdf_axes(
        axes[0],
        runs,
        "ttft",
        [s.autoscaler.slo.ttft_s for s in sc.services],
        "time to first token (log scale)",
        True,
    )
    axes[0].set_title("Time to first token")
    _cdf_axes(
        axes[1],
        runs,
        "itl",
        [s.autoscaler.slo.itl_s for s in sc.services],
        "inter-token latency",
        False,
    )
    axes[1].set_title("Inter-token latency")
    axes[1].legend(loc="lower right")
    fig.suptitle(f"Latency CDFs: {sub} (further left is better)", fontsize=11)
    fig.tight_layout()
    name = f"latency_cdf_{which}.png"
    _save(fig, out / name)
    plt.close(fig)
    return name, f"Latency distribution per {which} policy ({sub})."


def plot_replicas(res: SimResults, out: Path) -> list[tuple[str, str]]:
    plt = _plt()
    sc = res.prep.scenario
    base_p = res.prep.scaling_placement
    runs = [(s, res.runs[base_p, s]) for s in sc.policies.scaling if (base_p, s) in res.runs]
    if not runs:
        return []
    files = []
    for svc in sc.services:
        fig, axes = plt.subplots(2, 1, figsize=(11, 5.6), sharex=True)
        for ax, role in zip(axes, ("prefill", "decode"), strict=True):
            first = runs[0][1].series
            t = [x / 60 for x in first["t"]]
            dem = first["services"][svc.name][f"demand_{role}"]
            ax.fill_between(
                t,
                dem,
                step="post",
                color="#d9d9d9",
                alpha=0.9,
                label="demand (replicas the traffic needs)",
            )
            for label, r in runs:
                ser = r.series["services"][svc.name]
                ax.step(
                    [x / 60 for x in r.series["t"]],
                    ser[f"spec_{role}"],
                    where="post",
                    color=COLORS.get(label),
                    lw=2,
                    linestyle=STYLES.get(label, "solid"),
                    label=f"{label}",
                )
            ax.set_ylabel(f"{role} replicas")
            top = max(
                [
                    *dem,
                    *(v for _, r in runs for v in r.series["services"][svc.name][f"spec_{role}"]),
                ]
            )
            ax.set_ylim(0, top * 1.45 + 0.6)  # room for the legend above the lines
            ax.yaxis.get_major_locator().set_params(integer=True)
        axes[0].set_title(
            f"{svc.name}: replicas per role over time against demand "
            f"(ratio {svc.ratio.prefill}P:{svc.ratio.decode}D, {svc.model})"
        )
        axes[1].set_xlabel("simulated time (minutes)")
        axes[0].legend(loc="upper left", ncol=3, fontsize=9)
        fig.tight_layout()
        name = f"replicas_{svc.name}.png"
        _save(fig, out / name)
        plt.close(fig)
        files.append(
            (
                name,
                f"{svc.name}: replicas each scaling policy asked for (steps) against the replicas "
                "the trace needed at the derived capacities (grey).",
            )
        )
    return files


def plot_gpu_use(res: SimResults, out: Path) -> tuple[str, str] | None:
    plt = _plt()
    sc = res.prep.scenario
    base_p = res.prep.scaling_placement
    runs = [(s, res.runs[base_p, s]) for s in sc.policies.scaling if (base_p, s) in res.runs]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(11, 3.8))
    for label, r in runs:
        t = [x / 60 for x in r.series["t"]]
        ax.step(
            t,
            r.series["cluster"]["gpus_services"],
            where="post",
            lw=2,
            color=COLORS.get(label),
            linestyle=STYLES.get(label, "solid"),
            label=f"{label}: {r.metrics['gpu_hours']:.1f} GPU-h, "
            f"SLO met {100 * r.metrics['slo_attainment']:.1f}%",
        )
    ax.set_ylim(bottom=0)
    ax.set_xlabel("simulated time (minutes)")
    ax.set_ylabel("GPUs held by the services")
    ax.set_title("GPU use per scaling policy (pods count from binding, start-up included)")
    ax.legend(loc="lower left", fontsize=9)
    fig.tight_layout()
    name = "gpu_use.png"
    _save(fig, out / name)
    plt.close(fig)
    return name, "GPUs the services hold over time, per scaling policy."


def _placement_runs(res: SimResults) -> list[tuple[str, Any]]:
    """(placement policy, its run) under the base scaling policy, in scenario order."""
    return [
        (p, res.runs[p, res.base_scaling])
        for p in res.prep.scenario.policies.placement
        if (p, res.base_scaling) in res.runs
    ]


def plot_placement(res: SimResults, out: Path) -> tuple[str, str] | None:
    plt = _plt()
    runs = _placement_runs(res)
    if not runs:
        return None
    names = [p for p, _ in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    # (a) TP groups in one island.
    ax = axes[0]
    vals = [100 * r.metrics["tp_single_island_fraction"] for _, r in runs]
    bars = ax.bar(names, vals, color=[COLORS.get(n) for n in names])
    for b, v in zip(bars, vals, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}%", ha="center", fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_title("TP groups inside one NVLink island")
    ax.set_ylabel("% of TP>=2 pods")
    ax.tick_params(axis="x", rotation=15)
    # (b) PD pairs by shared level.
    ax = axes[1]
    bottom = [0.0] * len(runs)
    for lv in PAIR_LEVELS:
        v = [100 * (r.metrics["pd_pairs_by_level"].get(lv) or 0.0) for _, r in runs]
        if not any(v):
            continue
        ax.bar(
            names,
            v,
            bottom=bottom,
            color=LEVEL_COLORS[lv],
            label=f"same {lv}" if lv != "region" else "nothing (other zone)",
        )
        bottom = [a + b for a, b in zip(bottom, v, strict=True)]
    ax.set_ylim(0, 105)
    ax.set_title("Prefill-decode pairs by what they share")
    ax.set_ylabel("% of serving pair-ticks")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.tick_params(axis="x", rotation=15)
    # (c) Where TTFT goes.
    ax = axes[2]
    bottom = [0.0] * len(runs)
    for key, label, color in COMPONENTS:
        v = [1000 * max(0.0, r.metrics["ttft_components_mean_s"][key]) for _, r in runs]
        ax.bar(names, v, bottom=bottom, color=color, label=label)
        bottom = [a + b for a, b in zip(bottom, v, strict=True)]
    for i, total in enumerate(bottom):
        ax.text(i, total * 1.01, f"{total:.0f} ms", ha="center", fontsize=9)
    ax.set_title("Mean TTFT, by where the time goes")
    ax.set_ylabel("ms")
    ax.set_ylim(0, max(bottom) * 1.12 if max(bottom) > 0 else 1)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    name = "placement_quality.png"
    _save(fig, out / name)
    plt.close(fig)
    return name, (
        "Per placement policy: TP groups kept inside one NVLink island, prefill-decode pairs by "
        "the finest level they share, and the mean TTFT split into its parts."
    )


def plot_fragmentation(res: SimResults, out: Path) -> tuple[str, str] | None:
    plt = _plt()
    runs = _placement_runs(res)
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for label, r in runs:
        t = [x / 60 for x in r.series["t"]]
        kw = {"color": COLORS.get(label), "linestyle": STYLES.get(label, "solid"), "lw": 2}
        axes[0].step(
            t, r.series["cluster"]["mean_largest_free_island"], where="post", label=label, **kw
        )
        axes[1].step(t, r.series["cluster"]["free_8gpu_islands"], where="post", label=label, **kw)
    axes[0].set_title("Largest free NVLink island per NVLink node (mean)")
    axes[0].set_ylabel("free GPUs in one island")
    axes[0].set_ylim(0, 8.5)
    axes[1].set_title("Nodes with a whole free 8-GPU island")
    axes[1].set_ylabel("nodes")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("simulated time (minutes)")
    axes[1].legend(fontsize=9)
    fig.tight_layout()
    name = "fragmentation.png"
    _save(fig, out / name)
    plt.close(fig)
    return name, "Fragmentation over time per placement policy (higher keeps more room)."


# -- html ------------------------------------------------------------------------------------------


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "—"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "ms":
        return f"{1000 * v:.1f} ms" if v < 0.1 else f"{1000 * v:.0f} ms"
    if kind == "s":
        return f"{v:.3f} s"
    if kind == "int":
        return f"{int(v)}"
    return f"{v:.2f}"


PLACEMENT_COLUMNS = (
    ("ttft_p50_s", "TTFT p50", "s"),
    ("ttft_p90_s", "TTFT p90", "s"),
    ("ttft_p99_s", "TTFT p99", "s"),
    ("itl_p90_s", "ITL p90", "ms"),
    ("slo_attainment", "SLO met", "pct"),
    ("tp_single_island_fraction", "TP in 1 island", "pct"),
    ("pd_same_rack_fraction", "PD same rack", "pct"),
    ("kv_transfer_mean_s", "KV xfer mean", "ms"),
)
SCALING_COLUMNS = (
    ("slo_attainment", "SLO met", "pct"),
    ("ttft_p90_s", "TTFT p90", "s"),
    ("itl_p90_s", "ITL p90", "ms"),
    ("gpu_hours", "GPU-hours", "f"),
    ("scaling_actions", "actions", "int"),
    ("ratio_violations", "ratio violations", "int"),
    ("half_placed_unit_ticks", "half-placed unit-ticks", "int"),
    ("pending_unit_ticks", "pending unit-ticks", "int"),
)


def table_rows(results: dict[str, Any], section: str) -> tuple[list[str], list[list[str]]]:
    cols = PLACEMENT_COLUMNS if section == "placement" else SCALING_COLUMNS
    header = ["policy", *[c[1] for c in cols]]
    rows = []
    for pol, m in results[section].items():
        if m.get("skipped"):
            rows.append([pol, *(["skipped"] + ["—"] * (len(cols) - 1))])
            continue
        rows.append([pol, *[_fmt(m.get(k), kind) for k, _, kind in cols]])
    return header, rows


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def findings(results: dict[str, Any]) -> list[str]:
    """A few sentences a reader can take away, computed from the results."""
    out = []
    pl, scl, comp = results["placement"], results["scaling"], results["comparison"]
    ta, de = pl.get("topology-aware"), pl.get("default")
    if ta and de and ta.get("ttft_p90_s") is not None and de.get("ttft_p90_s") is not None:
        ch = comp.get("ttft_p90_change_topology_aware_vs_default", 0.0)
        out.append(
            f"TTFT p90 {ta['ttft_p90_s']:.3f} s with topology-aware placement vs "
            f"{de['ttft_p90_s']:.3f} s with the default scheduler ({100 * ch:+.1f}%)."
        )
        deltas = comp.get("ttft_mean_components_delta_s", {})
        if deltas:
            parts = sorted(
                ((k, v) for k, v in deltas.items() if abs(v) >= 5e-5), key=lambda kv: kv[1]
            )
            txt = ", ".join(f"{k.replace('_', ' ')} {1000 * v:+.1f} ms" for k, v in parts)
            out.append(f"Mean TTFT difference (topology-aware minus default), by part: {txt}.")
        out.append(
            f"TP groups inside one NVLink island: {100 * ta['tp_single_island_fraction']:.0f}% "
            f"vs {100 * de['tp_single_island_fraction']:.0f}%; prefill-decode pairs in one rack: "
            f"{100 * ta['pd_same_rack_fraction']:.0f}% vs {100 * de['pd_same_rack_fraction']:.0f}%"
            f"; mean KV transfer {1000 * ta['kv_transfer_mean_s']:.1f} ms vs "
            f"{1000 * de['kv_transfer_mean_s']:.1f} ms."
        )
    co, sp = scl.get("coordinated"), scl.get("static-peak")
    if co and sp and co.get("gpu_hours") is not None and sp.get("gpu_hours") is not None:
        out.append(
            f"Coordinated scaling used {co['gpu_hours']:.1f} GPU-hours and met the SLO for "
            f"{100 * co['slo_attainment']:.1f}% of requests; static peak provisioning used "
            f"{sp['gpu_hours']:.1f} GPU-hours for {100 * sp['slo_attainment']:.1f}%."
        )
    pa = scl.get("placement-aware")
    if co and pa and co.get("gpu_hours") is not None and pa.get("gpu_hours") is not None:
        gate = pa.get("placement_gate") or {}
        out.append(
            f"Placement-aware scaling (coordinated, asking the placement what-if before each "
            f"scale-up) had {pa['half_placed_unit_ticks']} half-placed unit-ticks and "
            f"{pa['pending_unit_ticks']} pending unit-ticks against coordinated's "
            f"{co['half_placed_unit_ticks']} and {co['pending_unit_ticks']}; it met the SLO for "
            f"{100 * pa['slo_attainment']:.1f}% of requests (coordinated "
            f"{100 * co['slo_attainment']:.1f}%) with {pa['gpu_hours']:.1f} GPU-hours "
            f"(coordinated {co['gpu_hours']:.1f}); its gate left out "
            f"{gate.get('units_left_out', 0)} of {gate.get('units_requested', 0)} units asked."
        )
    ind = scl.get("independent")
    if ind and ind.get("ratio_violations") is not None:
        out.append(
            f"Independent per-role HPAs left the roles out of ratio at "
            f"{ind['ratio_violations']} scaling decisions (coordinated: "
            f"{co['ratio_violations'] if co else '—'})."
        )
    return out


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;
margin:24px auto;padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.5em;margin-bottom:0}
h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:4px}table{border-collapse:collapse;margin:8px 0;font-size:.92em}
th,td{padding:4px 10px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f6f6f6}
figure{margin:18px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}ul.find li{margin:4px 0}.note{color:#7a4;font-size:.9em}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


def write_report(res: SimResults, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, series.json, the PNGs and report.html into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = results_dict(res)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    (out / "series.json").write_text(json.dumps(series_dict(res), separators=(",", ":")) + "\n")
    figs: list[tuple[str, str]] = []
    for f in (
        plot_cdfs(res, out, "placement"),
        plot_placement(res, out),
        plot_cdfs(res, out, "scaling"),
        *plot_replicas(res, out),
        plot_gpu_use(res, out),
        plot_fragmentation(res, out),
    ):
        if f is not None:
            figs.append(f)
    sc = results["scenario"]
    ph, prow = table_rows(results, "placement")
    sh, srow = table_rows(results, "scaling")
    svc = ", ".join(
        f"{n} ({s['model']}, TP{s['prefill_tp']} prefill / TP{s['decode_tp']} decode, "
        f"{s['ratio']['prefill']}P:{s['ratio']['decode']}D, {s['requests']} requests)"
        for n, s in sc["services"].items()
    )
    tr = sc["traffic"]
    comp = results["comparison"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>topo-sched simulate: {html.escape(sc['name'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>topo-sched simulate: {html.escape(sc['name'])}</h1>",
        f"<p class='sub'>{html.escape(sc['description'])}</p>",
        "<p>",
        f"Cluster: {sc['cluster']['nodes']} nodes, {sc['cluster']['gpus']} GPUs "
        f"({html.escape(str(sc['cluster']['preset'] or sc['cluster']['file']))}; "
        f"{sc['cluster']['background_gpus']} GPUs held by other tenants' pods). ",
        f"Services: {html.escape(svc)}. ",
        f"Traffic: {html.escape(tr['name'])}, {tr['requests_simulated']} requests over "
        f"{tr['duration_s'] / 60:.0f} simulated minutes (compress {tr['compress']:g}, "
        f"rate x{tr['rate']:g}). Seed {sc['seed']}."
        + (" <b>Quick run</b> (first 10 minutes of traffic)." if sc["quick"] else ""),
        "</p>",
        "<h2>What it shows</h2><ul class='find'>",
        *[f"<li>{html.escape(s)}</li>" for s in findings(results)],
        "</ul>",
        "<p class='note'>The numbers come from a model (docs/simulation.md explains it, its "
        "limits, and where a difference between placements comes from); nothing here is tuned "
        "toward any expected gain.</p>",
        f"<h2>Placement policies (all with {html.escape(comp['placement_runs_use_scaling'])} "
        "scaling)</h2>",
        _html_table(ph, prow),
        f"<h2>Scaling policies (all with {html.escape(comp['scaling_runs_use_placement'])} "
        "placement)</h2>",
        _html_table(sh, srow),
    ]
    for name, caption in figs:
        parts.append(
            f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    if results["notes"]:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{html.escape(n)}</li>" for n in results["notes"]]
        parts.append("</ul>")
    parts.append(
        "<p class='sub'>Full figures: <code>results.json</code> (keys documented in "
        "docs/simulation.md) and <code>series.json</code> (time series per run).</p>"
    )
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts) + "\n")
    paths = {
        "results": out / "results.json",
        "series": out / "series.json",
        "report": out / "report.html",
    }
    for name, _ in figs:
        paths[name] = out / name
    return paths


def headline(results: dict[str, Any]) -> dict[str, float | None]:
    """The few numbers a one-line summary needs."""
    pl = results["placement"]
    out: dict[str, float | None] = {}
    for p, m in pl.items():
        out[f"placement.{p}.ttft_p90_s"] = m.get("ttft_p90_s")
    for s, m in results["scaling"].items():
        out[f"scaling.{s}.gpu_hours"] = m.get("gpu_hours")
    return {
        k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
        for k, v in out.items()
    }
