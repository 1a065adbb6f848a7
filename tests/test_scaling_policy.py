"""The coordinated scaling policy on synthetic signals (the Prometheus tests feed it real ones)."""

from __future__ import annotations

import math

import pytest

from topo_sched.scaling.config import ScalingConfigError, parse_autoscaler_config
from topo_sched.scaling.policy import ScalingState, decide
from topo_sched.scaling.signals import RoleReplicas, RoleSignals, Sample, TargetSignals

BASE = {
    "rbg": "llm/demo",
    "roles": {"prefill": 2, "decode": 1},
    "mode": "strict",
    "units": {"min": 1, "max": 8},
    "slo": {"percentile": 0.9, "ttftSeconds": 5, "itlSeconds": 0.04},
    "capacity": {"prefillTokensPerSecond": 20000, "decodeSequences": 64},
}


def target(**over):
    t = {**BASE, **over}
    return parse_autoscaler_config({"targets": [t]}).targets[0]


def sig(prompt=30000.0, ttft=2.0, itl=0.02, running=50.0, queue_p=0.0, rps=10.0, age=0.0):
    s = lambda v: None if v is None else Sample(v, age)  # noqa: E731
    return TargetSignals(
        request_rate=s(rps),
        prompt_tokens_rate=s(prompt),
        generation_tokens_rate=s(2000.0),
        ttft=s(ttft),
        itl=s(itl),
        roles={
            "prefill": RoleSignals(queue=s(queue_p)),
            "decode": RoleSignals(running=s(running), queue=s(0.0)),
        },
    )


def reps(p, d, ready_p=None, ready_d=None):
    return {
        "prefill": RoleReplicas(p, p if ready_p is None else ready_p),
        "decode": RoleReplicas(d, d if ready_d is None else ready_d),
    }


def test_ttft_over_slo_with_growing_queue_takes_2p1d_to_4p2d_in_one_change():
    t = target()
    dec, _ = decide(t, sig(ttft=10.5, queue_p=40), reps(2, 1), ScalingState(), now=1000)
    assert dec.action == "scale" and dec.desired == {"prefill": 4, "decode": 2}
    assert "TTFT" in dec.reason and dec.code == "slo"


def test_quiet_period_scales_down_only_after_the_window_and_keeps_the_ratio():
    t = target()
    state, now = ScalingState(), 0.0
    quiet = sig(prompt=0.0, ttft=float("nan"), itl=float("nan"), running=0.0, rps=0.0)
    for _ in range(10):  # 10 ticks of 30 s = 300 s: still inside the window
        dec, state = decide(t, quiet, reps(8, 4), state, now)
        assert dec.action == "hold" and dec.desired == {"prefill": 8, "decode": 4}
        now += 30
    # The window only holds quiet recommendations now: down to units.min, in ratio.
    dec, state = decide(t, quiet, reps(8, 4), state, now + 1)
    assert dec.action == "scale" and dec.desired == {"prefill": 2, "decode": 1}


def test_a_spike_inside_the_down_window_keeps_capacity():
    t = target()
    state = ScalingState()
    busy = sig(prompt=150000.0, running=200.0)
    _, state = decide(t, busy, reps(8, 4), state, 0)
    dec, state = decide(t, sig(prompt=0, running=0, ttft=1, itl=0.01), reps(8, 4), state, 200)
    assert dec.action == "hold" and dec.code == "window"


def test_band_mode_keeps_prefill_per_decode_inside_the_band():
    t = target(mode="band", band={"min": 1.5, "max": 3.0})
    # prefill needs 8 replicas, decode only 1: decode is raised to ceil(8/3) = 3.
    dec, _ = decide(t, sig(prompt=160000.0, running=30.0), reps(2, 1), ScalingState(), 0)
    assert dec.desired == {"prefill": 8, "decode": 3}
    p, d = dec.desired["prefill"], dec.desired["decode"]
    assert 1.5 <= p / d <= 3.0
    # decode-heavy: prefill raised to 1.5x decode.
    dec, _ = decide(t, sig(prompt=20000.0, running=256.0), reps(2, 1), ScalingState(), 0)
    assert dec.desired == {"prefill": 6, "decode": 4}


def test_max_step_rate_limit():
    t = target(
        behavior={"scaleUp": {"policies": [{"type": "Units", "value": 1, "periodSeconds": 60}]}}
    )
    state = ScalingState()
    dec, state = decide(t, sig(prompt=160000.0, running=300.0), reps(2, 1), state, 0)
    assert dec.desired == {"prefill": 4, "decode": 2} and dec.code == "rate-limit"
    # Within the same minute no further step.
    dec, state = decide(t, sig(prompt=160000.0, running=300.0), reps(4, 2), state, 30)
    assert dec.action == "hold"
    dec, state = decide(t, sig(prompt=160000.0, running=300.0), reps(4, 2), state, 61)
    assert dec.desired == {"prefill": 6, "decode": 3}


def test_min_and_max_units():
    t = target(units={"min": 2, "max": 3})
    dec, _ = decide(t, sig(prompt=400000.0, running=900.0), reps(4, 2), ScalingState(), 0)
    assert dec.desired == {"prefill": 6, "decode": 3} and dec.code == "max"
    dec, _ = decide(t, sig(prompt=0.0, running=0.0, rps=0.0), reps(2, 1), ScalingState(), 0)
    assert dec.desired == {"prefill": 4, "decode": 2}  # below min: raised to min


@pytest.mark.parametrize(
    "signals, code",
    [
        (TargetSignals(source_error="http://127.0.0.1:9 refused"), "unreachable"),
        (sig(prompt=None), "missing"),
        (sig(ttft=float("nan")), "nan"),
        (sig(age=900.0), "stale"),
    ],
)
def test_untrustworthy_signals_hold_and_never_scale_down(signals, code):
    dec, _ = decide(target(), signals, reps(8, 4), ScalingState(), 0)
    assert dec.action == "hold" and dec.code == code
    assert dec.desired == {"prefill": 8, "decode": 4}


def test_nan_latency_without_traffic_is_not_a_hold():
    quiet = sig(prompt=0.0, ttft=float("nan"), itl=float("nan"), running=0.0, rps=0.0)
    dec, _ = decide(target(), quiet, reps(2, 1), ScalingState(), 0)
    assert dec.code != "nan"


def test_rolling_out_role_is_not_scaled_down_further():
    quiet = sig(prompt=0.0, ttft=1.0, itl=0.01, running=0.0)
    t = target(behavior={"scaleDown": {"stabilizationWindowSeconds": 0}})
    dec, _ = decide(t, quiet, reps(8, 4, ready_p=5), ScalingState(), 0)
    assert dec.action == "hold" and dec.code == "rolling-out"


def test_broken_ratio_is_restored_in_one_change():
    dec, _ = decide(target(), sig(prompt=90000.0, running=60.0), reps(5, 1), ScalingState(), 0)
    p, d = dec.desired["prefill"], dec.desired["decode"]
    assert p == 2 * d and p >= 5 and math.isclose(p / d, 2)
    assert dec.action == "scale"


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"rbg": "demo"}, "targets[0] (demo): rbg"),
        ({"roles": {"prefill": 1.5, "decode": 1}}, "whole-number"),
        ({"roles": {"a": 1, "b": 1}}, "prefill from decode"),
        ({"slo": {"ttftSeconds": 5}}, "slo.itlSeconds"),
        ({"units": {"min": 3, "max": 2}}, "units"),
        ({"mode": "band"}, "band"),
    ],
)
def test_config_errors_name_the_target_and_field(patch, needle):
    with pytest.raises(ScalingConfigError) as e:
        parse_autoscaler_config({"targets": [{**BASE, **patch}]})
    assert needle in str(e.value)


def test_latency_does_not_scale_again_while_new_pods_are_starting():
    """TTFT 2x over SLO with 4P2D asked but only 2P1D ready: the 2 starting prefills already
    double the capacity that produced that latency, so nothing more is asked (no runaway)."""
    t = target()
    slow = sig(prompt=30000.0, ttft=10.0, queue_p=40, running=50.0)
    dec, _ = decide(t, slow, reps(4, 2, ready_p=2, ready_d=1), ScalingState(), 0)
    assert dec.action == "hold" and dec.desired == {"prefill": 4, "decode": 2}
    # Once they are ready and latency is still 2x over, it scales again.
    dec, _ = decide(t, slow, reps(4, 2), ScalingState(), 60)
    assert dec.action == "scale" and dec.desired == {"prefill": 8, "decode": 4}
