"""``topo-sched simulate``: the default scenario end to end (``--quick``), determinism, the
documented result keys, policy comparisons computed from the runs, input errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from topo_sched.cli import app
from topo_sched.sim.cluster_builder import as_list, bound, make_rbg_pod, node_name
from topo_sched.sim.report import RUN_KEYS
from topo_sched.sim.runner import OptimalPlacer, prepare, run_all
from topo_sched.sim.scenario import (
    PLACEMENT_POLICIES,
    SCALING_POLICIES,
    ScenarioError,
    build_cluster,
    default_scenario,
    default_scenario_text,
    load_scenario,
    parse_scenario,
)

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

#: The keys the issue names; every policy must have them.
PLACEMENT_KEYS = ("ttft_p90_s", "pd_same_rack_fraction", "tp_single_island_fraction")
SCALING_KEYS = ("slo_attainment", "gpu_hours", "ratio_violations")


def _simulate(*args: str):
    return runner.invoke(app, ["simulate", *args])


@pytest.fixture(scope="module")
def quick_default(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sim-default")
    res = _simulate("--quick", "--out", str(out))
    assert res.exit_code == 0, res.output
    (out / "stdout.txt").write_text(res.output)
    return out, json.loads((out / "results.json").read_text())


def test_default_scenario_runs_and_prints_the_table(quick_default):
    out, data = quick_default
    text = (out / "stdout.txt").read_text()
    assert "Placement (scaling: coordinated)" in text
    assert "Scaling (placement: topology-aware)" in text
    for pol in (*PLACEMENT_POLICIES, *SCALING_POLICIES):
        assert pol in text
    assert data["schema"] == "topo-sched.io/simulate-results/v1"
    assert data["scenario"]["quick"] is True
    assert data["scenario"]["cluster"]["nodes"] == 64
    assert data["scenario"]["traffic"]["requests_simulated"] > 1000


def test_results_have_the_documented_keys_for_every_policy(quick_default):
    _, data = quick_default
    assert list(data["placement"]) == list(PLACEMENT_POLICIES)
    assert list(data["scaling"]) == list(SCALING_POLICIES)
    for section, keys in (("placement", PLACEMENT_KEYS), ("scaling", SCALING_KEYS)):
        for pol, m in data[section].items():
            for k in (*keys, *RUN_KEYS):
                assert k in m, f"{section}.{pol}.{k} missing"
            assert m[keys[0]] is not None, f"{section}.{pol} was not run"
    assert data["comparison"]["placement_runs_use_scaling"] == "coordinated"
    assert data["comparison"]["scaling_runs_use_placement"] == "topology-aware"


def test_report_html_references_pngs_that_exist(quick_default):
    out, _ = quick_default
    html = (out / "report.html").read_text()
    pngs = re.findall(r"src='([^']+\.png)'", html)
    assert len(pngs) >= 5
    for name in pngs:
        p = out / name
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "latency_cdf_placement.png" in pngs and "gpu_use.png" in pngs


def test_same_seed_gives_identical_results(quick_default, tmp_path):
    out, _ = quick_default
    res = _simulate("--quick", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "results.json").read_bytes() == (out / "results.json").read_bytes()
    assert (tmp_path / "series.json").read_bytes() == (out / "series.json").read_bytes()


def test_another_seed_changes_the_run(tmp_path):
    res = _simulate(
        "--quick",
        "--seed",
        "7",
        "--placement",
        "default",
        "--scaling",
        "coordinated",
        "--out",
        str(tmp_path),
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["scenario"]["seed"] == 7
    assert list(data["placement"]) == ["default"]
    assert list(data["scaling"]) == ["coordinated"]


def test_topology_aware_keeps_tp_and_pd_at_least_as_tight_as_default(quick_default):
    _, data = quick_default
    ta, de = data["placement"]["topology-aware"], data["placement"]["default"]
    assert ta["tp_single_island_fraction"] >= de["tp_single_island_fraction"]
    assert ta["pd_same_rack_fraction"] >= de["pd_same_rack_fraction"]
    # And the same on the KV path it implies.
    assert ta["kv_transfer_mean_s"] <= de["kv_transfer_mean_s"]


def test_coordinated_strict_never_breaks_the_ratio(quick_default):
    _, data = quick_default
    co = data["scaling"]["coordinated"]
    assert co["ratio_violations"] == 0
    # placement runs use coordinated scaling too
    assert all(m["ratio_violations"] == 0 for m in data["placement"].values())


def test_static_peak_uses_at_least_the_gpu_hours_of_coordinated(quick_default):
    _, data = quick_default
    sp, co = data["scaling"]["static-peak"], data["scaling"]["coordinated"]
    assert sp["gpu_hours"] >= co["gpu_hours"]
    assert sp["scaling_actions"] == 0


def test_independent_hpas_break_the_ratio_where_coordinated_does_not():
    """Over a longer window where demand outgrows the first units, per-role HPAs leave the
    roles out of ratio; the coordinated policy never does."""
    data = default_scenario().model_dump()
    data["traffic"]["window"] = {"start_s": 1200, "duration_s": 900}
    data["traffic"]["rate"] = 5  # enough that both policies must scale in this window
    data["policies"] = {"placement": ["topology-aware"], "scaling": ["coordinated", "independent"]}
    res = run_all(prepare(parse_scenario(data)))
    co = res.runs["topology-aware", "coordinated"].metrics
    ind = res.runs["topology-aware", "independent"].metrics
    assert co["ratio_violations"] == 0
    assert ind["ratio_violations"] > 0


def test_mooncake_trace_runs(shared_dir, tmp_path):
    trace = shared_dir / "traces" / "mooncake-fast25" / "conversation_trace.jsonl"
    res = _simulate(
        str(REPO / "simulations" / "mooncake-long-context.yaml"),
        "--trace",
        str(trace),
        "--quick",
        "--placement",
        "topology-aware,default",
        "--scaling",
        "coordinated",
        "--out",
        str(tmp_path),
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    tr = data["scenario"]["traffic"]
    assert tr["format"] == "mooncake-jsonl"
    assert tr["mean_prompt_tokens"] > 5000
    assert data["placement"]["topology-aware"]["requests_finished"] > 0


def test_bad_trace_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "trace.csv"
    bad.write_text("when,what\n1,2\n")
    res = runner.invoke(app, ["simulate", "--trace", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "trace.csv" in lines[0] and "unknown trace format" in lines[0]


def test_missing_trace_file_exits_2(tmp_path):
    res = _simulate("--trace", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert "no such file" in res.output and len(res.output.strip().splitlines()) == 1


def test_invalid_scenario_field_is_named(tmp_path):
    data = yaml.safe_load(default_scenario_text())
    data["services"][0]["prefill_tp"] = 3
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data))
    res = _simulate(str(f), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    out = res.output.strip()
    assert len(out.splitlines()) == 1
    assert "services[0].prefill_tp" in out


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("traffic", "compress"), 0, "traffic.compress"),
        (("policies", "placement"), ["best"], "policies.placement[0]"),
        (("services", 1, "autoscaler", "slo", "ttft_s"), -1, "services[1].autoscaler.slo.ttft_s"),
        (("services", 0, "model"), "gpt-5", "services[0].model"),
        (("cluster", "preset"), "huge", "cluster.preset"),
        (("tick_s",), "soon", "tick_s"),
    ],
)
def test_scenario_errors_name_the_field(path, value, field):
    data = yaml.safe_load(default_scenario_text())
    cur = data
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    with pytest.raises(ScenarioError) as e:
        parse_scenario(data, source="x.yaml")
    assert f"x.yaml: {field}" in str(e.value)


def test_unknown_key_and_bad_policy_flag(tmp_path):
    data = yaml.safe_load(default_scenario_text())
    data["trafic"] = {}
    with pytest.raises(ScenarioError, match="trafic"):
        parse_scenario(data)
    res = _simulate("--placement", "clever", "--out", str(tmp_path))
    assert res.exit_code == 2 and "--placement 'clever'" in res.output


def test_shipped_scenarios_load_and_default_matches_package():
    assert (REPO / "simulations" / "default.yaml").read_text() == default_scenario_text()
    for f in sorted((REPO / "simulations").glob("*.yaml")):
        sc = load_scenario(f)
        assert sc.services, f


def test_cluster_dump_replaces_the_preset(tmp_path):
    sc = default_scenario()
    nodes, _ = build_cluster(
        parse_scenario({**_small(), "cluster": {"preset": "tight"}}).cluster, 0
    )
    pods = [bound(make_rbg_pod("other", "x", "decode", 0, 4), node_name(0, 1))]
    dump = tmp_path / "cluster.json"
    dump.write_text(json.dumps(as_list([*nodes, *pods])))
    res = _simulate(
        "--cluster",
        str(dump),
        "--quick",
        "--placement",
        "topology-aware",
        "--scaling",
        "static-peak",
        "--out",
        str(tmp_path / "o"),
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["scenario"]["cluster"]["nodes"] == 8
    assert data["scenario"]["cluster"]["background_gpus"] >= 4
    assert sc.cluster.preset == "two-zone-hgx-pcie"
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "List", "items": []}')
    res = _simulate("--cluster", str(bad), "--out", str(tmp_path / "o2"))
    assert res.exit_code == 2 and "no Node" in res.output


def _small() -> dict:
    data = yaml.safe_load(default_scenario_text())
    data["services"] = data["services"][:1]
    data["traffic"]["window"] = {"start_s": 0, "duration_s": 300}
    return data


def test_optimal_is_skipped_with_a_note_on_a_big_cluster():
    data = _small()
    data["cluster"] = {"preset": "nodes", "nodes": 80}
    data["policies"] = {"placement": ["topology-aware", "optimal"], "scaling": ["coordinated"]}
    sc = parse_scenario(data)
    res = run_all(prepare(sc))
    assert ("optimal", "coordinated") in res.skipped
    from topo_sched.sim.report import results_dict

    out = results_dict(res)
    opt = out["placement"]["optimal"]
    assert "optimal_max_nodes" in opt["skipped"]
    assert all(opt[k] is None for k in PLACEMENT_KEYS)
    assert any("optimal" in n for n in out["notes"])


def test_optimal_places_a_pd_pair_together_on_a_small_cluster():
    data = _small()
    data["cluster"] = {"preset": "tight"}
    data["policies"] = {"placement": ["optimal"], "scaling": ["static-peak"]}
    prep = prepare(parse_scenario(data))
    res = run_all(prep)
    m = res.runs["optimal", "static-peak"].metrics
    assert m["tp_single_island_fraction"] == 1.0  # room on the HGX rack: TP2 stays on NVLink
    assert m["pd_same_rack_fraction"] == 1.0
    assert m["ilp_solves"] >= 1 and m["ilp_not_optimal"] == 0
    assert OptimalPlacer.UNPLACED_S > 1.0


# -- placement-aware scaling on the tight cluster ---------------------------------------------


def _tight_window_file(tmp: Path) -> Path:
    """The whole tight scenario (about 10 s): chat asks for its third unit about 25 minutes
    in, when the cluster has room for its prefills but not its decode. A shorter window
    starts the autoscaler without that history and does not reach the same moment."""
    data = yaml.safe_load((REPO / "simulations" / "tight-cluster.yaml").read_text())
    f = tmp / "tight.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return f


@pytest.fixture(scope="module")
def tight_window(tmp_path_factory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("sim-tight")
    scenario = _tight_window_file(tmp)
    out = tmp / "out"
    res = _simulate(
        str(scenario),
        "--placement",
        "topology-aware",
        "--scaling",
        "coordinated,placement-aware",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    (out / "stdout.txt").write_text(res.output)
    return scenario, out, json.loads((out / "results.json").read_text())


def test_tight_cluster_is_the_default_services_and_traffic_on_fewer_gpus():
    tight = load_scenario(REPO / "simulations" / "tight-cluster.yaml")
    default = default_scenario()
    assert tight.services == default.services
    # Same trace and pace; a higher rate, so that GPUs run out at the peak.
    assert tight.traffic.model_copy(update={"rate": default.traffic.rate}) == default.traffic
    assert tight.traffic.rate >= default.traffic.rate
    assert "placement-aware" in tight.policies.scaling
    nodes, background = build_cluster(tight.cluster, tight.seed)
    gpus = 8 * len(nodes) - sum(
        int(c["resources"]["requests"]["nvidia.com/gpu"])
        for p in background
        for c in p["spec"]["containers"]
    )
    # The initial units fit; chat's third unit on top of them (what coordinated asks for at
    # the peak) does not.
    per_unit = {
        s.name: s.ratio.prefill * s.prefill_tp + s.ratio.decode * s.decode_tp
        for s in tight.services
    }
    initial = sum(per_unit[s.name] * s.initial_units for s in tight.services)
    assert initial <= gpus < initial + 2 * per_unit["chat"]


def test_coordinated_half_places_units_on_the_tight_cluster(tight_window):
    _, _, data = tight_window
    co = data["scaling"]["coordinated"]
    assert co["half_placed_unit_ticks"] > 0 and co["half_placed_units_max"] >= 1
    assert co["pending_unit_ticks"] >= co["half_placed_unit_ticks"]
    assert co["pending_pod_ticks"] > 0


def test_placement_aware_never_half_places_a_unit_on_the_tight_cluster(tight_window):
    _, _, data = tight_window
    pa = data["scaling"]["placement-aware"]
    assert pa["half_placed_unit_ticks"] == 0 and pa["half_placed_units_max"] == 0
    assert pa["pending_pod_ticks"] == 0  # every pod it asked for found a node
    assert pa["ratio_violations"] == 0
    gate = pa["placement_gate"]
    assert gate["checks"] >= 1 and gate["units_left_out"] >= 1 and gate["held"] >= 1
    assert gate["units_requested"] == gate["units_placeable"] + gate["units_left_out"]
    assert any(k.startswith("decode: ") for k in gate["reasons"])
    # What the gate left out is pending capacity, counted per tick until the next decision.
    assert pa["pending_unit_ticks"] > 0
    assert pa["decision_codes"].get("unplaceable", 0) == gate["held"]


def test_placement_aware_results_have_the_scaling_keys(tight_window):
    _, out, data = tight_window
    assert list(data["scaling"]) == ["coordinated", "placement-aware"]
    for pol in ("coordinated", "placement-aware"):
        m = data["scaling"][pol]
        for k in (*SCALING_KEYS, *RUN_KEYS, "half_placed_unit_ticks", "pending_unit_ticks"):
            assert k in m and m[k] is not None, f"scaling.{pol}.{k} missing"
    assert "placement_gate" not in data["scaling"]["coordinated"]
    cmp = data["comparison"]["placement_aware_vs_coordinated"]
    assert cmp["half_placed_unit_ticks"] == {
        "coordinated": data["scaling"]["coordinated"]["half_placed_unit_ticks"],
        "placement-aware": 0,
    }
    text = (out / "stdout.txt").read_text()
    assert "placement-aware" in text and "pending unit-ticks" in text
    series = json.loads((out / "series.json").read_text())
    assert "topology-aware+placement-aware" in series["runs"]
    assert "pending_units" in series["runs"]["topology-aware+placement-aware"]["services"]["chat"]


def test_placement_aware_is_deterministic(tight_window, tmp_path):
    scenario, out, _ = tight_window
    res = _simulate(
        str(scenario),
        "--placement",
        "topology-aware",
        "--scaling",
        "coordinated,placement-aware",
        "--out",
        str(tmp_path),
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "results.json").read_bytes() == (out / "results.json").read_bytes()
    assert (tmp_path / "series.json").read_bytes() == (out / "series.json").read_bytes()


def test_placement_aware_decides_as_coordinated_where_everything_fits():
    """On the roomy default cluster every what-if fits: the same run as coordinated."""
    data = default_scenario().model_dump()
    data["traffic"]["window"] = {"start_s": 1200, "duration_s": 900}
    data["traffic"]["rate"] = 5  # so that it scales up inside the window
    data["policies"] = {"placement": ["topology-aware"], "scaling": ["coordinated"]}
    data["policies"]["scaling"].append("placement-aware")
    res = run_all(prepare(parse_scenario(data)))
    co = res.runs["topology-aware", "coordinated"]
    pa = res.runs["topology-aware", "placement-aware"]
    gate = pa.metrics.pop("placement_gate")
    assert gate["checks"] >= 1 and gate["units_left_out"] == 0
    assert pa.metrics == co.metrics
    assert pa.series == co.series


def test_unknown_scaling_flag_names_placement_aware(tmp_path):
    res = _simulate("--scaling", "clever", "--out", str(tmp_path))
    assert res.exit_code == 2 and "placement-aware" in res.output
