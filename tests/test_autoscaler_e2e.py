"""The autoscaler end to end: real Prometheus -> Controller / CLI -> decisions -> Kubernetes.

One Prometheus (module scope) serves every scenario's engine metrics, told apart by the
``rbg`` label that each target's selector names; only the "Prometheus stopped mid-run" case
starts (and stops) a second one. Histories end ~10 minutes before the real current time and
every tick passes ``now`` inside them. Expected decisions are computed from each scenario's
numbers and the target's capacity/SLO, never copied from the program's output.

Kubernetes writes run the live actuator and event recorder over real HTTP against
``ApiserverReplay`` (recorded kube-apiserver v1.26 exchanges, see
test_autoscaler_actuation.py); leader election runs two real ``LeaseElector``s against a
tiny in-memory Lease API so that both candidates see the same Lease.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

from tests.support.prometheus_server import (
    History,
    PrometheusServer,
    history_start,
    prometheus_factory,  # noqa: F401  (fixture)
    sglang_history,
    vllm_history,
)
from topo_sched.autoscaler.actuator import ApplyResult, RbgActuator
from topo_sched.autoscaler.controller import (
    Controller,
    FileRbgSource,
    KubeRbgSource,
    RbgFileError,
    RbgMissing,
    load_rbg_objects,
)
from topo_sched.autoscaler.events import EventRecorder
from topo_sched.autoscaler.leader import LeaseElector
from topo_sched.metrics.prometheus import PrometheusSignals
from topo_sched.scaling.config import AutoscalerConfig, parse_autoscaler_config
from topo_sched.scaling.signals import TargetSignals

pytest_plugins = ("tests.support.apiserver_replay",)

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "tests" / "data" / "autoscaler-2p1d.yaml"
CONFIG_DATA = yaml.safe_load(CONFIG_FILE.read_text())
BASE = CONFIG_DATA["targets"][0]  # llm/demo, 2:1, SLO TTFT 5 s / ITL 50 ms, capacity
SLO_TTFT = float(BASE["slo"]["ttftSeconds"])
CAP_P = float(BASE["capacity"]["prefillTokensPerSecond"])
CAP_D = float(BASE["capacity"]["decodeSequences"])
DOWN_WINDOW = int(BASE["behavior"]["scaleDown"]["stabilizationWindowSeconds"])

MINUTES = 40
STEP = 15.0
START = history_start(MINUTES, ended_ago_s=600, step_s=STEP)
END = START + MINUTES * 60

# --- scenario (a)/(h): TTFT rises past its SLO while the prefill queue grows ---------------
RPS, PROMPT, GEN, ITL = 8.0, 1000.0, 200.0, 0.03
RISE_1, RISE_2 = 20 * 60, 30 * 60  # seconds into the history: TTFT 1 s -> 3 s -> 9.1 s
TTFT_PEAK, QUEUE_PEAK = 9.1, 40.0
T_A_REL = 38 * 60  # evaluate here: 8 min after the last rise, a 2m window of constant TTFT
T_A = START + T_A_REL


def ttft_rising(t: float) -> float:
    return 1.0 if t < RISE_1 else (3.0 if t < RISE_2 else TTFT_PEAK)


def queue_growing(t: float) -> float:
    return 0.0 if t < RISE_1 else QUEUE_PEAK * (t - RISE_1) / (T_A_REL - RISE_1)


# --- scenario (b)/(e): a long quiet period ------------------------------------------------
QUIET_RPS, QUIET_TTFT, QUIET_ITL = 1.0, 0.5, 0.02
T_B = START + 25 * 60


def _labels(rbg: str) -> dict[str, str]:
    return {"namespace": "llm", "rbg": rbg}


def _busy(history=sglang_history, **kw: Any) -> History:
    args = {
        "rps": RPS,
        "prompt_tokens_per_req": PROMPT,
        "generation_tokens_per_req": GEN,
        "ttft": 1.0,
        "itl": ITL,
        "replicas": {"prefill": 2, "decode": 1},
    }
    return history(START, MINUTES, STEP, **{**args, **kw})


def _quiet(rbg: str, start: float = START, minutes: float = MINUTES) -> History:
    return sglang_history(
        start,
        minutes,
        STEP,
        rps=QUIET_RPS,
        ttft=QUIET_TTFT,
        itl=QUIET_ITL,
        labels=_labels(rbg),
        replicas={"prefill": 8, "decode": 4},
    )


def _scenarios() -> History:
    rising = {"ttft": ttft_rising, "queue": {"prefill": queue_growing, "decode": 0.0}}
    return History().merge(
        _busy(labels=_labels("demo"), **rising),  # (a)
        _busy(vllm_history, labels=_labels("vdemo"), **rising),  # (h)
        _quiet("quiet"),  # (b), and units.min clipping
        _busy(labels=_labels("busy")),  # (c) band, (d) step / units.max; TTFT 1 s
        _busy(labels=_labels("decode-heavy"), rps=2.0, running={"prefill": 1.0, "decode": 320}),
        _busy(labels=_labels("no-ttft"), omit={"ttft"}),  # (f)
        # (g): traffic flows (counters grow) but the latency histograms get no observations
        _busy(labels=_labels("no-latency"), omit={"ttft", "itl"}),
        _busy(
            labels=_labels("no-latency"),
            rps=0.0,
            omit={"request_rate", "prompt_tokens_rate", "generation_tokens_rate"}
            | {"queue", "running", "kv_usage"},
        ),
    )


@pytest.fixture(scope="module")
def prom(prometheus_factory) -> PrometheusServer:  # noqa: F811
    return prometheus_factory(_scenarios())


# --- building configs, RBGs, controllers --------------------------------------------------


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def target(rbg: str, series: str | None = None, **over: Any) -> dict[str, Any]:
    """The example target for RBG ``llm/<rbg>``, reading the series labelled ``series``."""
    t = _merge(BASE, over)
    t["rbg"] = f"llm/{rbg}"
    t["metrics"]["selector"] = f'namespace="llm",rbg="{series or rbg}"'
    return t


def config(*targets: dict[str, Any]) -> AutoscalerConfig:
    data = {k: v for k, v in CONFIG_DATA.items() if k != "targets"}
    return parse_autoscaler_config({**data, "targets": list(targets)})


def rbg_object(name: str, prefill: int, decode: int, *, status: bool = True) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "workloads.x-k8s.io/v1alpha2",
        "kind": "RoleBasedGroup",
        "metadata": {"name": name, "namespace": "llm", "uid": f"uid-{name}"},
        "spec": {
            "roles": [
                {"name": "prefill", "replicas": prefill},
                {"name": "decode", "replicas": decode},
            ]
        },
    }
    if status:
        obj["status"] = {
            "roleStatuses": [
                {"name": r, "replicas": n, "readyReplicas": n, "updatedReplicas": n}
                for r, n in (("prefill", prefill), ("decode", decode))
            ]
        }
    return obj


def rbg_file(tmp_path: Path, *objects: dict[str, Any]) -> FileRbgSource:
    path = tmp_path / "rbgs.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))
    return FileRbgSource(path)


def shape(p: int, d: int) -> dict[str, int]:
    return {"prefill": p, "decode": d}


def strict(units: int) -> dict[str, int]:
    return shape(2 * units, units)


class FakeActuator:
    """Writes into a FileRbgSource's objects, so the next tick reads the new size."""

    def __init__(self, source: FileRbgSource) -> None:
        self.source = source
        self.calls: list[dict[str, int]] = []

    def apply(self, namespace: str, name: str, desired: dict[str, int]) -> ApplyResult:
        self.calls.append(dict(desired))
        obj = self.source.objects[(namespace, name)]
        changed = {}
        for role in obj["spec"]["roles"]:
            old = role["replicas"]
            role["replicas"] = desired[role["name"]]
            changed[role["name"]] = (old, desired[role["name"]])
        for st in obj["status"]["roleStatuses"]:
            st["replicas"] = st["readyReplicas"] = desired[st["name"]]
        return ApplyResult(True, 1, changed, f"RBG {namespace}/{name}: scaled (fake)")


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def sample(c: Controller, name: str, **labels: str) -> float | None:
    return c.registry.get_sample_value(name, labels)


# --- expectations from the scenario numbers -------------------------------------------------


def demand_units() -> int:
    """Units the busy scenarios' demand needs at the example capacity (no latency)."""
    prefill = RPS * PROMPT / CAP_P  # 0.4 replicas
    decode = RPS * GEN * ITL / CAP_D  # Little's law: 48 sequences -> 0.75 replicas
    return max(math.ceil(prefill / 2), math.ceil(decode / 1))


def latency_units(cur_p: int, ttft: float) -> int:
    """Units once prefill grows by the TTFT overshoot (at most 2x per tick)."""
    need_p = max(RPS * PROMPT / CAP_P, cur_p * min(2.0, ttft / SLO_TTFT))
    return max(math.ceil(need_p / 2), demand_units())


# --- (a) and (h): latency, not demand, takes 2P1D to 4P2D in one change ---------------------


@pytest.mark.parametrize(("series", "preset"), [("demo", "sglang"), ("vdemo", "vllm")])
def test_ttft_over_slo_with_growing_queue_scales_2p1d_to_4p2d_at_once(
    prom, tmp_path, caplog, series, preset
):
    assert demand_units() == 1  # demand alone keeps 2P1D ...
    want = strict(latency_units(2, TTFT_PEAK))
    assert want == shape(4, 2)  # ... the TTFT overshoot (9.1 s / 5 s) doubles it
    c = Controller(
        config(target("demo", series, metrics={"preset": preset})),
        PrometheusSignals(prom.url),
        rbg_file(tmp_path, rbg_object("demo", 2, 1)),
        dry_run=True,
    )

    early = c.tick(now=START + RISE_1 - 60)[0]  # TTFT 1 s: steady
    rising = c.tick(now=START + RISE_2 - 60)[0]  # TTFT 3 s, queue growing: still under SLO
    with caplog.at_level(logging.INFO, logger="topo_sched.autoscaler.controller"):
        (d,) = c.tick(now=T_A)

    assert (early.action, early.code) == ("hold", "steady")
    assert (rising.action, rising.code) == ("hold", "steady")
    assert d.action == "scale" and d.code == "slo"
    assert d.current == shape(2, 1) and d.desired == want
    assert d.reason.startswith("scale up to 4P,2D: ")
    assert f"TTFT {TTFT_PEAK:g}s > SLO {SLO_TTFT:g}s, prefill queue {QUEUE_PEAK:g}" in d.reason
    # metrics and the structured log line
    assert (
        sample(c, "topo_sched_autoscaler_desired_replicas", target="llm/demo", role="prefill") == 4
    )
    assert sample(c, "topo_sched_autoscaler_replicas", target="llm/demo", role="decode") == 1
    labels = {"target": "llm/demo", "action": "scale", "code": "slo"}
    assert sample(c, "topo_sched_autoscaler_decisions_total", **labels) == 1
    assert sample(c, "topo_sched_autoscaler_tick_duration_seconds_count") == 3
    (rec,) = [r for r in caplog.records if "action=scale" in r.getMessage()]
    assert "target=llm/demo action=scale code=slo current=prefill:2,decode:1" in rec.getMessage()
    assert 'desired=prefill:4,decode:2 reason="scale up to 4P,2D: ' in rec.getMessage()
    assert rec.fields["desired"] == want and rec.fields["dry_run"] is True


# --- (b) a quiet period scales down only after the window, in ratio -------------------------


def test_quiet_period_scales_down_only_after_the_window_in_ratio(prom, tmp_path):
    c = Controller(
        config(target("quiet")),
        PrometheusSignals(prom.url),
        rbg_file(tmp_path, rbg_object("quiet", 8, 4)),
        dry_run=True,
    )
    # what the quiet traffic needs: 1k prompt tok/s and 1*200*0.02 = 4 sequences
    units = max(1, math.ceil(QUIET_RPS * PROMPT / CAP_P / 2))
    units = max(units, math.ceil(QUIET_RPS * GEN * QUIET_ITL / CAP_D))
    assert units == 1

    inside = [c.tick(now=T_B + k * 30)[0] for k in range(DOWN_WINDOW // 30)]
    (after,) = c.tick(now=T_B + DOWN_WINDOW + 1)

    for d in inside:
        assert (d.action, d.code) == ("hold", "window"), d
        assert d.desired == shape(8, 4)
        assert f"waits for its {DOWN_WINDOW}s window" in d.reason
    assert after.action == "scale" and after.desired == strict(units)
    assert after.reason.startswith("scale down to 2P,1D")
    assert after.desired["prefill"] == 2 * after.desired["decode"]  # the ratio is kept
    # dry run: nothing was changed, so the rate limits have no change to count
    assert c.state("llm/quiet").changes == ()


# --- (c) band mode --------------------------------------------------------------------------


def test_band_mode_keeps_prefill_per_decode_inside_the_band(prom, tmp_path):
    lo, hi, cap_p = 1.5, 3.0, 1000.0
    band = {"mode": "band", "band": {"min": lo, "max": hi}}
    cap = {"capacity": {"prefillTokensPerSecond": cap_p}}
    c = Controller(
        config(
            target("band", "busy", **band, **cap),
            target("band-decode", "decode-heavy", **band, **cap),
        ),
        PrometheusSignals(prom.url),
        rbg_file(tmp_path, rbg_object("band", 4, 2), rbg_object("band-decode", 4, 2)),
        dry_run=True,
    )

    prefill_heavy, decode_heavy = c.tick(now=T_A)

    def in_band(prompt_rate: float, sequences: float) -> dict[str, int]:
        p = math.ceil(prompt_rate / cap_p)
        d = math.ceil(sequences / CAP_D)
        if p > hi * d:
            d = math.ceil(p / hi)
        if p < lo * d:
            p = math.ceil(lo * d)
        return shape(p, d)

    want_1 = in_band(RPS * PROMPT, RPS * GEN * ITL)  # 8 prefill, 1 decode -> 3 decode
    want_2 = in_band(2.0 * PROMPT, 320.0)  # 2 prefill, 5 decode -> 8 prefill
    assert (want_1, want_2) == (shape(8, 3), shape(8, 5))
    for d, want in ((prefill_heavy, want_1), (decode_heavy, want_2)):
        assert d.action == "scale" and d.desired == want, d
        assert lo <= d.desired["prefill"] / d.desired["decode"] <= hi
    assert want_1 != strict(4)  # strict 2:1 would have made it 8P4D


# --- (d) max step and min/max clipping -----------------------------------------------------


def test_scale_up_is_limited_to_one_unit_per_period(prom, tmp_path):
    cap_p, period = 1500.0, 60
    step = {
        "capacity": {"prefillTokensPerSecond": cap_p},
        "behavior": {
            "scaleUp": {"policies": [{"type": "Units", "value": 1, "periodSeconds": period}]}
        },
    }
    source = rbg_file(tmp_path, rbg_object("step", 2, 1))
    actuator = FakeActuator(source)
    c = Controller(config(target("step", "busy", **step)), PrometheusSignals(prom.url), source,
                   actuator)  # fmt: skip
    need = math.ceil(RPS * PROMPT / cap_p / 2)  # 5.3 prefill replicas -> 3 units
    assert need == 3

    first = c.tick(now=T_A - 90)[0]
    within = c.tick(now=T_A - 60)[0]
    later = c.tick(now=T_A - 90 + period + 1)[0]
    settled = c.tick(now=T_A)[0]

    assert (first.action, first.code, first.desired) == ("scale", "rate-limit", strict(2))
    assert "scale-up limited to 2 units this period" in first.reason
    assert (within.action, within.code, within.current) == ("hold", "rate-limit", strict(2))
    assert (later.action, later.desired) == ("scale", strict(need))
    assert (settled.action, settled.current) == ("hold", strict(need))
    assert actuator.calls == [strict(2), strict(need)]
    assert [ch[1:] for ch in c.state("llm/step").changes] == [(1, 2), (2, 3)]


def test_units_min_and_max_clip_the_decision(prom, tmp_path):
    c = Controller(
        config(
            target("clip-max", "busy", capacity={"prefillTokensPerSecond": 1500.0},
                   units={"min": 1, "max": 2}),
            target("clip-min", "quiet", units={"min": 2, "max": 8},
                   behavior={"scaleDown": {"stabilizationWindowSeconds": 0}}),
        ),
        PrometheusSignals(prom.url),
        rbg_file(tmp_path, rbg_object("clip-max", 2, 1), rbg_object("clip-min", 8, 4)),
        dry_run=True,
    )  # fmt: skip

    clip_max, clip_min = c.tick(now=T_A)

    # demand wants 3 units (see the step test); units.max is 2
    assert (clip_max.action, clip_max.code, clip_max.desired) == ("scale", "max", strict(2))
    assert "clipped by units.max=2" in clip_max.reason
    # quiet traffic wants 1 unit; units.min is 2 (and no down-window here)
    assert (clip_min.action, clip_min.code, clip_min.desired) == ("scale", "min", strict(2))
    assert "clipped by units.min=2" in clip_min.reason


# --- (e) Prometheus stopped mid-run --------------------------------------------------------


def test_prometheus_stopped_mid_run_holds_and_never_scales_down(prometheus_factory, tmp_path):  # noqa: F811
    server = prometheus_factory(_quiet("quiet", END - 15 * 60, 15))
    c = Controller(
        config(target("quiet")),
        PrometheusSignals(server.url, timeout_s=2),
        rbg_file(tmp_path, rbg_object("quiet", 8, 4)),
        dry_run=True,
    )
    t1 = END - 6 * 60

    before = c.tick(now=t1)[0]
    server.stop()
    after = [c.tick(now=t1 + DOWN_WINDOW + 1)[0], c.tick(now=t1 + 2 * DOWN_WINDOW)[0]]

    assert (before.action, before.code) == ("hold", "window")  # it wanted to go down
    for d in after:  # ... and past the window it would have; unreachable holds instead
        assert (d.action, d.code) == ("hold", "unreachable"), d
        assert d.desired == d.current == shape(8, 4)
        assert server.url in d.reason and "refused" in d.reason.lower()


# --- (f) missing series, (g) NaN, and a missing RBG ---------------------------------------


def test_missing_series_nan_and_missing_rbg_hold(prom, tmp_path):
    mean_ttft = (
        "sum(rate(sglang:time_to_first_token_seconds_sum{{decode_selector}}[{window}])) / "
        "sum(rate(sglang:time_to_first_token_seconds_count{{decode_selector}}[{window}]))"
    )
    c = Controller(
        config(
            target("no-ttft"),
            target("no-latency"),
            target("mean-ttft", "no-latency", metrics={"queries": {"ttft": mean_ttft}}),
            target("ghost", "busy"),
        ),
        PrometheusSignals(prom.url),
        rbg_file(tmp_path, *(rbg_object(n, 2, 1) for n in ("no-ttft", "no-latency", "mean-ttft"))),
        dry_run=True,
    )

    missing, nan, nan_override, ghost = c.tick(now=T_A)

    assert (missing.action, missing.code) == ("hold", "missing")
    assert "series for ttft p90 is missing" in missing.reason
    for d in (nan, nan_override):
        assert (d.action, d.code) == ("hold", "nan"), d
        assert "ttft p90 is NaN while requests flow" in d.reason
    assert (ghost.action, ghost.code) == ("hold", "rbg-missing")
    assert "llm/ghost" in ghost.reason
    assert all(d.desired == d.current for d in (missing, nan, nan_override, ghost))


def test_rbg_file_forms(tmp_path):
    one, two = rbg_object("a", 2, 1), rbg_object("b", 4, 2, status=False)
    single = tmp_path / "one.yaml"
    single.write_text(yaml.safe_dump(one))
    multi = tmp_path / "multi.yaml"
    multi.write_text(yaml.safe_dump_all([one, {"kind": "ConfigMap", "metadata": {}}, two]))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"kind": "RoleBasedGroupList", "items": [one, two]}))

    assert [o["metadata"]["name"] for o in load_rbg_objects(single)] == ["a"]
    assert [o["metadata"]["name"] for o in load_rbg_objects(multi)] == ["a", "b"]
    source = FileRbgSource(listed)
    # no status: a manifest, taken as rolled out; a status is kept as it is
    ready = {
        s["name"]: s["readyReplicas"] for s in source.get("llm", "b")["status"]["roleStatuses"]
    }
    assert ready == {"prefill": 4, "decode": 2}
    with pytest.raises(RbgMissing, match="llm/c"):
        source.get("llm", "c")
    empty = tmp_path / "empty.yaml"
    empty.write_text("kind: ConfigMap\n")
    with pytest.raises(RbgFileError, match="no RoleBasedGroup"):
        FileRbgSource(empty)


# --- the CLI --------------------------------------------------------------------------------


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "topo_sched.cli", "autoscaler", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def test_cli_once_replays_the_incident(prom, tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(rbg_object("demo", 2, 1, status=False)))
    run = cli(
        "--config", str(CONFIG_FILE), "--once", "--rbg-file", str(path),
        "--prometheus", prom.url, "--at", f"{T_A:.0f}", "--log-format", "json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr

    out = json.loads(run.stdout)
    (d,) = out["targets"]
    assert d["name"] == "llm/demo" and d["action"] == "scale" and d["code"] == "slo"
    assert d["current"] == shape(2, 1) and d["desired"] == strict(latency_units(2, TTFT_PEAK))
    assert f"TTFT {TTFT_PEAK:g}s > SLO {SLO_TTFT:g}s" in d["reason"]
    logs = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    (line,) = [entry for entry in logs if entry.get("msg") == "decision"]
    assert line["target"] == "llm/demo" and line["desired"] == d["desired"]
    assert line["reason"] == d["reason"] and line["code"] == "slo"


def test_cli_unreachable_prometheus_holds_and_exits_0(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(rbg_object("demo", 8, 4)))
    run = cli("--config", str(CONFIG_FILE), "--once", "--rbg-file", str(path),
              "--prometheus", f"http://127.0.0.1:{port}")  # fmt: skip
    assert run.returncode == 0, run.stderr
    (d,) = json.loads(run.stdout)["targets"]
    assert (d["action"], d["code"], d["desired"]) == ("hold", "unreachable", shape(8, 4))
    assert f"127.0.0.1:{port}" in d["reason"]
    assert "decision target=llm/demo action=hold code=unreachable" in run.stderr


def test_cli_config_error_exits_2_naming_target_and_field(tmp_path):
    bad = copy.deepcopy(CONFIG_DATA)
    bad["targets"][0]["slo"]["ttftSeconds"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    run = cli("--config", str(path), "--once")
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert "targets[0] (llm/demo): slo.ttftSeconds" in line
    assert run.stdout == ""


def test_cli_loop_serves_metrics_and_stops_on_sigterm(prom, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(rbg_object("demo", 2, 1)))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "topo_sched.cli", "autoscaler", "--config", str(CONFIG_FILE),
         "--rbg-file", str(path), "--prometheus", prom.url, "--metrics-port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        body, deadline = "", time.monotonic() + 30
        while "topo_sched_autoscaler_decisions_total{" not in body:
            assert time.monotonic() < deadline, "no decision metric within 30 s"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                continue
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "topo_sched_autoscaler_leader 1.0" in body
    assert 'topo_sched_autoscaler_replicas{role="prefill",target="llm/demo"} 2.0' in body
    assert "autoscaler loop stopped" in err


# --- Kubernetes writes (recorded kube-apiserver exchanges) ---------------------------------

RBG_PATH = "/apis/workloads.x-k8s.io/v1alpha2/namespaces/llm/rolebasedgroups/demo"
ADAPTERS = "/apis/workloads.x-k8s.io/v1alpha2/namespaces/llm/rolebasedgroupscalingadapters"
EVENTS_PATH = "/api/v1/namespaces/llm/events"
F_GET = "0650-rbg-get.json"
F_PATCH_OK = "0690-rbg-json-patch-test-and-replace-replicas.json"
F_MISSING = "0670-rbg-get-missing-404.json"
F_EVENT = "0950-events-core-v1-create-about-rbg.json"
F_WH_GET = "1300-rbg-get-after-webhook-denial-unchanged.json"
F_WH_DENIED = "1290-rbg-json-patch-both-roles-replicas-webhook-denied-403.json"
F_WH_DECODE_OK = "1310-rbg-json-patch-decode-replicas-webhook-allowed-200.json"


def again(fx: dict[str, Any], name: str, **response: Any) -> dict[str, Any]:
    """A recorded exchange served once more (the replay answers each exchange once)."""
    out = copy.deepcopy(fx)
    out["name"] = name
    out["response"].update(response)
    return out


def scale_fx(kube_fixture, replicas: int, rv: str, method: str = "GET") -> dict[str, Any]:
    """GET (0840) or merge PATCH (0870) of demo-prefill/scale in the webhook cluster."""
    base = "0840-rbgsa-get-scale-before-status.json" if method == "GET" else (
        "0870-rbgsa-merge-patch-scale.json")  # fmt: skip
    fx = kube_fixture(base)
    body = fx["response"]["body"]
    body["metadata"]["resourceVersion"] = rv
    body["spec"]["replicas"] = replicas
    return again(fx, f"{method} demo-prefill/scale {replicas} rv {rv}")


def scale_conflict(kube_fixture) -> dict[str, Any]:
    """0880's 409 (stale resourceVersion on /scale), answering a PATCH."""
    fx = kube_fixture("0880-rbgsa-put-scale-stale-resourceversion-409.json")
    fx["request"]["method"] = "PATCH"
    return again(fx, "409 on PATCH demo-prefill/scale")


def without_adapter(kube_fixture) -> dict[str, Any]:
    """1300 as a reader that has not seen prefill's scalingAdapter yet."""
    fx = kube_fixture(F_WH_GET)
    for role in fx["response"]["body"]["spec"]["roles"]:
        role.pop("scalingAdapter", None)
    return fx


def kube_controller(server, prom_url: str) -> Controller:
    api = server.api_client()
    return Controller(
        config(target("demo")),
        PrometheusSignals(prom_url),
        KubeRbgSource(api),
        RbgActuator(api, max_attempts=2, sleep=Sleeps()),
        EventRecorder(api, instance="topo-sched-autoscaler-0", clock=lambda: T_A),
        clock=lambda: T_A,
    )


def sent(server, method: str, path: str) -> list[Any]:
    return [r for r in server.requests if r.method == method and r.path.split("?")[0] == path]


def test_scale_writes_one_json_patch_and_records_an_event(prom, apiserver_replay, kube_fixture):
    recorded_patch = kube_fixture(F_PATCH_OK)
    rbg = kube_fixture(F_GET)
    server = apiserver_replay(F_GET, again(rbg, "0650 for the actuator"), F_PATCH_OK, F_EVENT)
    c = kube_controller(server, prom.url)

    (d,) = c.tick()

    assert d.action == "scale" and d.desired == strict(latency_units(2, TTFT_PEAK))
    (patch,) = sent(server, "PATCH", RBG_PATH)
    assert patch.body == recorded_patch["request"]["body"]  # test name+replicas, then replace
    (event,) = sent(server, "POST", EVENTS_PATH)
    assert event.body["reason"] == "Scaled" and event.body["type"] == "Normal"
    assert event.body["message"] == d.reason
    assert event.body["involvedObject"]["uid"] == rbg["response"]["body"]["metadata"]["uid"]
    assert [ch[1:] for ch in c.state("llm/demo").changes] == [(1, 2)]


def test_scale_adapter_conflict_409_is_retried(prom, apiserver_replay, kube_fixture):
    server = apiserver_replay(
        F_WH_GET,
        again(kube_fixture(F_WH_GET), "1300 for the actuator"),
        scale_fx(kube_fixture, 2, "204"),
        F_WH_DECODE_OK,
        scale_conflict(kube_fixture),
        scale_fx(kube_fixture, 2, "207"),
        scale_fx(kube_fixture, 4, "208", method="PATCH"),
        F_EVENT,
    )
    c = kube_controller(server, prom.url)

    (d,) = c.tick()

    assert d.action == "scale" and d.desired == shape(4, 2)
    first, second = sent(server, "PATCH", f"{ADAPTERS}/demo-prefill/scale")
    assert first.body == {"metadata": {"resourceVersion": "204"}, "spec": {"replicas": 4}}
    assert second.body == {"metadata": {"resourceVersion": "207"}, "spec": {"replicas": 4}}
    (event,) = sent(server, "POST", EVENTS_PATH)
    assert (event.body["reason"], event.body["type"]) == ("Scaled", "Normal")
    assert len(c.state("llm/demo").changes) == 1


def test_webhook_denial_holds_with_a_warning_and_keeps_the_state(
    prom, apiserver_replay, kube_fixture
):
    stale = without_adapter(kube_fixture)
    server = apiserver_replay(
        again(stale, "controller read"),
        again(stale, "plan 1"),
        again(kube_fixture(F_WH_DENIED), "denied 1"),
        again(stale, "plan 2"),
        again(kube_fixture(F_WH_DENIED), "denied 2"),
        F_EVENT,
    )
    c = kube_controller(server, prom.url)

    (d,) = c.tick()

    assert (d.action, d.code) == ("hold", "write-failed")
    assert d.current == d.desired == shape(2, 1)
    assert d.reason.startswith("scale up to 4P,2D: ")
    assert "vrolebasedgroup.kb.io" in d.reason and "denied" in d.reason
    assert len(sent(server, "PATCH", RBG_PATH)) == 2  # max_attempts
    (event,) = sent(server, "POST", EVENTS_PATH)
    assert (event.body["reason"], event.body["type"]) == ("ScaleFailed", "Warning")
    assert event.body["message"] == d.reason
    state = c.state("llm/demo")
    assert state.changes == ()  # the change did not happen
    assert state.recommendations[-1] == (T_A, 2.0)  # ... the recommendation is kept
    labels = {"target": "llm/demo", "action": "hold", "code": "write-failed"}
    assert sample(c, "topo_sched_autoscaler_decisions_total", **labels) == 1


def test_missing_rbg_holds(prom, apiserver_replay, kube_fixture):
    fx = kube_fixture(F_MISSING)  # 0670 asked for "missing"; the same 404 for "demo"
    fx["request"]["path"] = RBG_PATH
    body = fx["response"]["body"]
    body["message"] = body["message"].replace('"missing"', '"demo"')
    body["details"]["name"] = "demo"
    server = apiserver_replay(fx)
    (d,) = kube_controller(server, prom.url).tick()
    assert (d.action, d.code) == ("hold", "rbg-missing")
    assert d.reason.startswith('RBG llm/demo not found: rolebasedgroups.workloads.x-k8s.io "demo"')
    assert [r.method for r in server.requests] == ["GET"]


class LosesTheLease:
    """An elector that wins the round at the start of the tick, then loses the Lease."""

    def __init__(self) -> None:
        self.checks = 0

    @property
    def is_leader(self) -> bool:
        self.checks += 1
        return self.checks == 1  # the round's own check; the one before the write fails

    def try_acquire_or_renew(self) -> bool:
        return True

    def release(self) -> bool:
        return False


def test_a_controller_that_lost_the_lease_does_not_write(prom, tmp_path):
    source = rbg_file(tmp_path, rbg_object("demo", 2, 1))
    actuator = FakeActuator(source)
    c = Controller(config(target("demo")), PrometheusSignals(prom.url), source, actuator,
                   elector=LosesTheLease())  # fmt: skip

    (d,) = c.tick(now=T_A)

    assert (d.action, d.code, d.desired) == ("hold", "not-leader", shape(2, 1))
    assert d.reason.startswith("scale up to 4P,2D: ") and "no longer the leader" in d.reason
    assert actuator.calls == [] and c.state("llm/demo").changes == ()


# --- leader election ------------------------------------------------------------------------


class LeaseApi(ThreadingHTTPServer):
    """An in-memory coordination.k8s.io/v1 Lease API: GET, POST, PUT with resourceVersions."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _LeaseHandler)
        self.leases: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []  # (method, holderIdentity)
        self.rv = 100
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def client(self) -> kubernetes.client.ApiClient:
        host, port = self.server_address[:2]
        return kubernetes.client.ApiClient(
            kubernetes.client.Configuration(host=f"http://{host}:{port}")
        )

    def holder(self, name: str = "autoscaler") -> str | None:
        lease = self.leases.get(f"/apis/coordination.k8s.io/v1/namespaces/llm/leases/{name}")
        return None if lease is None else lease["spec"].get("holderIdentity")

    def answer(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        def status(code: int, reason: str) -> tuple[int, dict[str, Any]]:
            message = f"{reason} {path}"
            return code, {"kind": "Status", "status": "Failure", "message": message,
                          "reason": reason, "code": code}  # fmt: skip

        with self.lock:
            if method == "POST":
                path = f"{path}/{body['metadata']['name']}"
                if path in self.leases:
                    return status(409, "AlreadyExists")
            elif path not in self.leases:
                return status(404, "NotFound")
            if method == "GET":
                return 200, copy.deepcopy(self.leases[path])
            if method == "PUT":
                have = self.leases[path]["metadata"]["resourceVersion"]
                if body["metadata"].get("resourceVersion") != have:
                    return status(409, "Conflict")
            self.rv += 1
            body["metadata"]["resourceVersion"] = str(self.rv)
            self.leases[path] = copy.deepcopy(body)
            self.writes.append((method, body["spec"]["holderIdentity"]))
            return (201 if method == "POST" else 200), body


class _LeaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # headers and body in one segment (no delayed-ACK stall)
    server: LeaseApi

    def log_message(self, *args: Any) -> None:
        return

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        code, answer = self.server.answer(self.command, self.path.split("?")[0], body)
        payload = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _handle


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingSignals:
    """A signals source that only counts reads (holds: no metrics)."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, target: Any, now: float | None = None) -> TargetSignals:
        self.reads += 1
        return TargetSignals(source_error="no metrics in this test")


@pytest.fixture
def lease_api():
    server = LeaseApi()
    yield server
    server.shutdown()
    server.server_close()


def candidate(lease_api: LeaseApi, identity: str, clock, tmp_path: Path, **kw: Any):
    api = lease_api.client()
    elector = LeaseElector(api, "llm", "autoscaler", identity, clock=clock)
    signals = CountingSignals()
    c = Controller(
        config(target("demo")),
        signals,
        rbg_file(tmp_path, rbg_object("demo", 2, 1)),
        FakeActuator(rbg_file(tmp_path, rbg_object("demo", 2, 1))),
        clock=clock,
        elector=elector,
        **kw,
    )
    return c, signals


def test_only_the_leader_ticks_and_renewal_does_not_wait_for_ticks(lease_api, tmp_path):
    t0 = 1_767_225_600.0
    clock = Clock(t0)
    a, a_reads = candidate(lease_api, "a", clock, tmp_path)
    b, b_reads = candidate(lease_api, "b", clock, tmp_path)
    interval = a.config.interval_seconds
    lease_s = a.config.leader_election.lease_duration_seconds
    assert interval > lease_s  # 30 s ticks, 15 s Lease: renewal must not wait for ticks

    # a starts first and takes the Lease; both then wake every 2 s for 60 s
    assert a.step() <= a.renew_period_s
    assert b.step() == b.renew_period_s
    while clock.now < t0 + 60:
        clock.now += 2
        a.step()
        b.step()

    assert lease_api.holder() == "a"
    assert a_reads.reads == 3 and b_reads.reads == 0  # ticks at 0, 30 and 60 s
    renewals = [w for w in lease_api.writes if w == ("PUT", "a")]
    assert len(renewals) == 30  # every 2 s, not every tick
    assert sample(a, "topo_sched_autoscaler_leader") == 1
    assert sample(b, "topo_sched_autoscaler_leader") == 0

    # a stops renewing (crashed): b takes over once the Lease is unchanged for 15 s
    last_renewal = clock.now
    while b_reads.reads == 0:
        clock.now += 2
        b.step()
        assert clock.now < last_renewal + 30
    assert clock.now - last_renewal >= lease_s
    assert lease_api.holder() == "b"
    # a comes back: the Lease is b's now, so a does not tick
    clock.now += 2
    a.step()
    assert a_reads.reads == 3 and not a.is_leader


def test_run_loop_renews_ticks_and_releases_on_stop(lease_api, tmp_path):
    c, reads = candidate(lease_api, "solo", time.time, tmp_path, renew_period_s=0.05)
    c.config = c.config.model_copy(update={"interval_seconds": 0.3})
    stop = threading.Event()
    thread = threading.Thread(target=c.run, args=(stop,))
    thread.start()
    time.sleep(0.8)
    stop.set()
    thread.join(timeout=5)

    assert not thread.is_alive()
    assert 2 <= reads.reads <= 4  # at 0, 0.3, 0.6 s
    assert len([w for w in lease_api.writes if w == ("PUT", "solo")]) >= 5
    assert lease_api.holder() == ""  # released on stop
    assert sample(c, "topo_sched_autoscaler_leader") == 0
