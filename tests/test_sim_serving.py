"""The serving model of one PD service, its engine profile and its model shapes."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topo_sched.scaling.signals import TargetSignals
from topo_sched.sim.models import MODELS, get_model
from topo_sched.sim.profile import (
    EngineProfile,
    ProfileError,
    decode_step_seconds,
    default_profile,
    load_profile,
    max_sequences,
    prefill_seconds,
    roofline_prefill_points,
)
from topo_sched.sim.serving import (
    DecodeInstance,
    PrefillInstance,
    RequestRecord,
    ServiceSim,
)
from topo_sched.sim.traces import Request, load_trace
from topo_sched.topology.cluster import LevelKind
from topo_sched.topology.costs import between_nodes_cost, transfer_seconds
from topo_sched.topology.model import LinkClass

NV = LinkClass.NVLINK
M32 = get_model("qwen3-32b-like")
PROFILE = default_profile()
RACK = between_nodes_cost(LevelKind.RACK)
ZONE = between_nodes_cost(LevelKind.ZONE)


def path_of(cost):
    return lambda p, d: (cost.bandwidth_gbps * 1e9, cost.latency_us * 1e-6)


def P(i: int | str, tp: int = 2, link: LinkClass | None = NV, ready: float = 0.0):
    return PrefillInstance(f"p{i}", tp, link, "node-p", ready)


def D(i: int | str, tp: int = 2, link: LinkClass | None = NV, ready: float = 0.0):
    return DecodeInstance(f"d{i}", tp, link, "node-d", ready)


def make(n_p=1, n_d=1, *, kv=RACK, model=M32, profile=PROFILE, max_batch=None, **kw):
    sim = ServiceSim("svc", model, profile, path_of(kv), max_batch=max_batch)
    sim.set_instances([P(i, **kw) for i in range(n_p)], [D(i, **kw) for i in range(n_d)], 0.0)
    return sim


def by_id(sim: ServiceSim) -> dict[int, RequestRecord]:
    return {r.id: r for r in sim.records()}


def kv_seconds(prompt: int, cost=RACK, model=M32) -> float:
    return transfer_seconds(prompt * model.kv_bytes_per_token, cost)


def pf(prompt: int, tp: int = 2, link=NV, model=M32) -> float:
    return PROFILE.prefill_seconds(model, prompt, tp, link)


def step(batch: int, context: float, tp: int = 2, link=NV, model=M32) -> float:
    return PROFILE.decode_cost(model, tp, link).step(batch, context)


# -- one request, by hand ---------------------------------------------------------------------


def test_lone_request_ttft_is_prefill_plus_transfer_plus_one_step() -> None:
    sim = make()
    sim.advance(100.0, [Request(0, 1.0, 2000, 50)])
    (rec,) = sim.records()
    s1 = step(1, 2000)
    assert s1 == pytest.approx(decode_step_seconds(M32, 1, 2000, 2, NV))
    assert rec.prefill_wait_s == 0.0
    assert rec.prefill_s == pytest.approx(prefill_seconds(M32, 2000, 2, NV))
    assert rec.kv_transfer_s == pytest.approx(kv_seconds(2000))
    assert rec.decode_wait_s == 0.0
    assert rec.ttft_s == pytest.approx(pf(2000) + kv_seconds(2000) + s1, rel=1e-12)
    # Alone, the step time stays that of its first step (no event in between).
    assert rec.e2e_s == pytest.approx(pf(2000) + kv_seconds(2000) + 50 * s1, rel=1e-12)
    assert rec.itl_s == pytest.approx(s1, rel=1e-9)
    assert (rec.prefill_id, rec.decode_id) == ("p0", "d0")
    assert rec.first_token_at == pytest.approx(1.0 + rec.ttft_s)


def test_one_token_output() -> None:
    sim = make()
    sim.advance(10.0, [Request(0, 0.0, 100, 0)])
    (rec,) = sim.records()
    s1 = step(1, 100)
    assert rec.output_tokens == 1
    assert rec.ttft_s == pytest.approx(rec.e2e_s)
    assert rec.itl_s == pytest.approx(s1)


def test_two_requests_share_one_decode_instance_exactly() -> None:
    """Processor sharing, worked by hand."""
    p1, o1, a1 = 1000, 100, 0.0
    p2, o2, a2 = 3000, 200, 0.5
    sim = make(n_p=2, n_d=1)
    sim.advance(200.0, [Request(1, a1, p1, o1), Request(2, a2, p2, o2)])
    r1, r2 = by_id(sim)[1], by_id(sim)[2]

    j1 = a1 + pf(p1) + kv_seconds(p1)
    s1 = step(1, p1)
    j2 = a2 + pf(p2) + kv_seconds(p2)
    v = (j2 - j1) / s1  # tokens r1 has when r2 joins
    assert 1 < v < o1  # r1's first token came alone; it is still running at j2
    s2 = step(2, p1 + v + p2)  # both advance one token a step from here
    f1 = j2 + (o1 - v) * s2  # r1 ends first (o1 - v < o2)
    assert o1 - v < o2
    g2 = o1 - v  # tokens r2 has at f1
    s3 = step(1, p2 + g2)
    f2 = f1 + (o2 - g2) * s3

    assert r1.ttft_s == pytest.approx(j1 + s1 - a1, rel=1e-12)
    assert r1.e2e_s == pytest.approx(f1 - a1, rel=1e-9)
    assert r1.itl_s == pytest.approx((f1 - (j1 + s1)) / (o1 - 1), rel=1e-9)
    assert r2.ttft_s == pytest.approx(j2 + s2 - a2, rel=1e-12)
    assert r2.e2e_s == pytest.approx(f2 - a2, rel=1e-9)
    assert r2.prefill_id == "p1" and r1.prefill_id == "p0"
    assert s2 > s1  # sharing slows the step down


def test_deterministic() -> None:
    trace = load_trace("azure-code").window(0, 120).compress(4)

    def run():
        sim = make(n_p=2, n_d=2)
        sim.advance(40.0, trace.requests)
        sim.run_until_idle()
        return sim.records()

    assert run() == run()


# -- queueing ---------------------------------------------------------------------------------


def test_saturated_prefill_queue_makes_ttft_grow_linearly() -> None:
    prompt = PROFILE.prefill_max_batch_tokens  # one request per batch
    t_pf = pf(prompt)
    gap = t_pf / 2  # arrivals twice as fast as one instance serves
    reqs = [Request(i, i * gap, prompt, 2) for i in range(20)]
    sim = make(n_p=1, n_d=4)
    sim.advance(reqs[-1].arrival_s + 1e-6, reqs)
    sim.run_until_idle()
    recs = sim.records()
    assert len(recs) == 20
    for i, r in enumerate(recs):
        assert r.prefill_wait_s == pytest.approx(i * (t_pf - gap), abs=1e-9)
        assert r.prefill_s == pytest.approx(t_pf)
    rest = [r.ttft_s - r.prefill_wait_s for r in recs]  # prefill + transfer + first step
    assert max(rest) - min(rest) < 1e-9
    slopes = [b.ttft_s - a.ttft_s for a, b in itertools.pairwise(recs)]
    assert all(s == pytest.approx(t_pf - gap, abs=1e-9) for s in slopes)


def test_short_prompts_are_batched_up_to_the_budget() -> None:
    budget = PROFILE.prefill_max_batch_tokens
    size = budget // 4
    reqs = [Request(i, 0.0, size, 5) for i in range(9)]
    sim = make(n_p=1, n_d=1)
    sim.advance(1e-6, reqs)
    sim.run_until_idle()
    recs = sim.records()
    t1 = pf(size)  # the first arrives alone to an idle instance
    tb = PROFILE.prefill_batch_seconds(M32, [size] * 4, 2, NV)  # then 4 fill the budget
    assert recs[0].prefill_s == pytest.approx(t1)
    assert [r.prefill_s for r in recs[1:5]] == pytest.approx([tb] * 4)
    assert [r.prefill_wait_s for r in recs[1:5]] == pytest.approx([t1] * 4)
    assert [r.prefill_wait_s for r in recs[5:9]] == pytest.approx([t1 + tb] * 4)


def test_prefill_batch_cost() -> None:
    peak = PROFILE.peak_prefill_tokens
    assert PROFILE.prefill_batch_seconds(M32, [3000], 2, NV) == pf(3000)
    # Short prompts together run at the throughput of their total: faster than one by one.
    assert PROFILE.prefill_batch_seconds(M32, [128] * 8, 2, NV) < 0.6 * 8 * pf(128)
    assert PROFILE.prefill_batch_seconds(M32, [128] * 8, 2, NV) == pytest.approx(
        8 * 128 / (1024 / pf(1024))
    )
    # Prompts at or past the peak gain nothing, nor lose anything, from company.
    long = int(peak * 2)
    assert PROFILE.prefill_batch_seconds(M32, [long, 64], 2, NV) == pytest.approx(
        pf(long) + 64 / (peak / pf(peak))
    )


def test_route_to_the_instance_that_frees_first() -> None:
    sim = make(n_p=3, n_d=2)
    sim.advance(0.05, [Request(0, 0.0, 8000, 2), Request(1, 0.01, 8000, 2)])
    sim.advance(0.2, [Request(2, 0.15, 100, 2)])
    sim.run_until_idle()
    recs = by_id(sim)
    # Two busy, one idle since t=0: the third goes to the idle one, p2.
    assert [recs[i].prefill_id for i in range(3)] == ["p0", "p1", "p2"]
    assert recs[2].prefill_wait_s == 0.0


def test_decode_queue_when_no_room() -> None:
    sim = make(n_p=4, n_d=1, max_batch=2)
    reqs = [Request(i, 0.0, 500, 300) for i in range(4)]
    sim.advance(1e-6, reqs)
    sim.run_until_idle()
    recs = sim.records()
    assert len(recs) == 4
    waits = sorted(r.decode_wait_s for r in recs)
    assert waits[0] == waits[1] == 0.0 and waits[2] > 0 and waits[3] > 0


def test_fewest_sequences_decode_instance_is_chosen() -> None:
    sim = make(n_p=4, n_d=2)
    sim.advance(1e-6, [Request(i, 0.0, 500, 300) for i in range(4)])
    sim.run_until_idle()
    ds = [r.decode_id for r in sim.records()]
    assert sorted(ds) == ["d0", "d0", "d1", "d1"]


# -- topology -------------------------------------------------------------------------------


def test_pcie_tp_span_gives_slower_prefill_than_nvlink() -> None:
    req = [Request(0, 0.0, 4000, 10)]
    out = {}
    for link in (NV, LinkClass.PIX, LinkClass.SYS):
        sim = make(link=link)
        sim.advance(30.0, req)
        out[link] = sim.records()[0]
    assert out[NV].prefill_s < out[LinkClass.PIX].prefill_s < out[LinkClass.SYS].prefill_s
    eff = PROFILE.tp_efficiency
    assert out[LinkClass.PIX].prefill_s / out[NV].prefill_s == pytest.approx(
        eff[NV] / eff[LinkClass.PIX]
    )
    assert out[NV].itl_s < out[LinkClass.PIX].itl_s  # decode all-reduces are slower too
    # One GPU: no TP at all, slower than two NVLinked ones.
    assert pf(4000, tp=1, link=None) > out[NV].prefill_s


def test_farther_kv_path_adds_exactly_bytes_over_bandwidth() -> None:
    prompt = 6000
    recs = {}
    for name, cost in (("rack", RACK), ("zone", ZONE)):
        sim = make(kv=cost)
        sim.advance(30.0, [Request(0, 0.0, prompt, 20)])
        recs[name] = sim.records()[0]
    nbytes = prompt * M32.kv_bytes_per_token
    for name, cost in (("rack", RACK), ("zone", ZONE)):
        assert recs[name].kv_transfer_s == pytest.approx(
            nbytes / (cost.bandwidth_gbps * 1e9) + cost.latency_us * 1e-6, rel=1e-12
        )
    extra = nbytes / (ZONE.bandwidth_gbps * 1e9) - nbytes / (RACK.bandwidth_gbps * 1e9)
    extra += (ZONE.latency_us - RACK.latency_us) * 1e-6
    assert recs["zone"].ttft_s - recs["rack"].ttft_s == pytest.approx(extra, rel=1e-9)
    assert recs["zone"].e2e_s - recs["rack"].e2e_s == pytest.approx(extra, rel=1e-9)


def test_kv_path_is_asked_per_pair_with_the_instances() -> None:
    seen = []

    def kv(p: PrefillInstance, d: DecodeInstance):
        seen.append((p.id, d.id, p.node, d.node))
        return (50e9, 1e-5)

    sim = ServiceSim("svc", M32, PROFILE, kv)
    sim.set_instances([P(0)], [D(0)], 0.0)
    sim.advance(10.0, [Request(i, i * 0.5, 100, 3) for i in range(5)])
    assert seen == [("p0", "d0", "node-p", "node-d")]  # asked once, then cached
    bad = ServiceSim("svc", M32, PROFILE, lambda p, d: (0.0, 0.0))
    bad.set_instances([P(0)], [D(0)], 0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        bad.advance(10.0, [Request(0, 0.0, 100, 3)])


# -- instance changes -------------------------------------------------------------------------


def test_draining_instances_finish_their_work_and_disappear() -> None:
    sim = make(n_p=1, n_d=1)
    reqs = [Request(0, 0.0, 1000, 400)] + [Request(i, i * 0.01, 8000, 50) for i in range(1, 6)]
    sim.advance(0.3, reqs)
    # r0 is decoding on d0; p0 is prefilling r1; r2..r5 wait.
    assert sim.backlog() == {"prefill": 4, "decode": 0}
    sim.set_instances([P("new")], [D("new")], 0.3)
    assert sim.instances() == {"prefill": ["p0", "pnew"], "decode": ["d0", "dnew"]}
    sim.advance(0.31)
    assert sim.backlog()["prefill"] == 3  # pnew took r2 at once; p0 takes nothing new
    sim.run_until_idle()
    recs = by_id(sim)
    assert len(recs) == 6
    assert [recs[i].prefill_id for i in range(6)] == ["p0", "p0"] + ["pnew"] * 4
    assert [recs[i].decode_id for i in range(6)] == ["d0"] + ["dnew"] * 5
    assert recs[0].e2e_s > 3.0  # d0 ran r0 to its end after the change
    assert sim.instances() == {"prefill": ["pnew"], "decode": ["dnew"]}


def test_empty_draining_instances_go_at_once() -> None:
    sim = make(n_p=2, n_d=2)
    sim.set_instances([P(0)], [D(1)], 1.0)
    assert sim.instances() == {"prefill": ["p0"], "decode": ["d1"]}


def test_draining_decode_keeps_running_sequences() -> None:
    sim = make(n_p=2, n_d=1)
    sim.advance(5.0, [Request(0, 0.0, 1000, 2000)])
    assert sim.in_flight == 1
    sim.set_instances([P(0), P(1)], [D("b")], 5.0)
    sim.advance(6.0, [Request(1, 5.5, 1000, 10)])
    assert sim.instances()["decode"] == ["d0", "db"]
    sim.run_until_idle()
    recs = by_id(sim)
    assert recs[0].decode_id == "d0" and recs[1].decode_id == "db"
    assert sim.instances()["decode"] == ["db"]


def test_not_yet_ready_instances_take_no_work() -> None:
    sim = ServiceSim("svc", M32, PROFILE, path_of(RACK))
    sim.set_instances([P(0, ready=10.0)], [D(0, ready=12.0)], 0.0)
    sim.advance(5.0, [Request(0, 1.0, 500, 5)])
    assert sim.backlog() == {"prefill": 1, "decode": 0} and not sim.records()
    sim.advance(11.0)
    assert sim.backlog() == {"prefill": 0, "decode": 1}  # prefilled, no decode ready
    sim.run_until_idle()
    (rec,) = sim.records()
    assert rec.prefill_wait_s == pytest.approx(9.0)
    assert rec.decode_wait_s == pytest.approx(12.0 - (10.0 + pf(500)))

    # A ready instance takes everything while a second one is still starting.
    sim = ServiceSim("svc", M32, PROFILE, path_of(RACK))
    sim.set_instances([P(0), P(1, ready=3.0)], [D(0)], 0.0)
    reqs = [Request(i, i * 0.05, 8000, 2) for i in range(40)]
    sim.advance(3.0, [r for r in reqs if r.arrival_s < 3.0])
    on_p1 = [r for r in sim.records() if r.prefill_id == "p1"]
    assert on_p1 == []
    sim.run_until_idle()
    assert all(r.prefill_wait_s == 0 or r.prefill_id for r in sim.records())
    started_p1 = [r for r in sim.records() if r.prefill_id == "p1"]
    assert started_p1 and all(r.arrival_s + r.prefill_wait_s >= 3.0 for r in started_p1)


def test_instance_that_cannot_hold_the_model_is_refused() -> None:
    sim = ServiceSim("svc", get_model("qwen3-235b-moe-like"), PROFILE, path_of(RACK))
    with pytest.raises(ValueError, match=r"prefill p0: .* does not fit on tp=2"):
        sim.set_instances([P(0, tp=2)], [D(0, tp=8)], 0.0)
    assert sim.instances() == {"prefill": [], "decode": []}  # nothing half-applied


def test_time_only_moves_forward() -> None:
    sim = make()
    sim.advance(5.0)
    with pytest.raises(ValueError):
        sim.advance(4.0)
    with pytest.raises(ValueError):
        sim.advance(10.0, [Request(0, 3.0, 10, 10)])  # before now
    with pytest.raises(ValueError):
        sim.advance(10.0, [Request(0, 11.0, 10, 10)])  # not before until
    with pytest.raises(ValueError):
        sim.set_instances([P(0), P(0)], [], 6.0)


# -- signals ------------------------------------------------------------------------------------


def test_signals_match_the_arrivals_and_the_work_done() -> None:
    trace = load_trace("azure-conv").window(0, 600)
    sim = make(n_p=2, n_d=2)
    sim.advance(300.0, [r for r in trace.requests if r.arrival_s < 300])
    sig = sim.signals(240.0, 300.0, 0.9)
    assert isinstance(sig, TargetSignals)
    inside = [r for r in trace.requests if 240 <= r.arrival_s < 300]
    assert sig.request_rate.value == pytest.approx(len(inside) / 60)
    assert sig.prompt_tokens_rate.value == pytest.approx(sum(r.prompt_tokens for r in inside) / 60)
    assert set(sig.roles) == {"prefill", "decode"}
    assert sig.roles["prefill"].queue.value == sim.backlog()["prefill"]
    assert sig.roles["decode"].running.value == sim.in_flight - sim.backlog()["prefill"] - (
        sig.roles["prefill"].running.value + sig.roles["decode"].queue.value
    )
    assert 0 < sig.roles["decode"].kv_usage.value < 1
    assert sig.source_error is None
    assert sim.signals(240.0, 300.0, 90).ttft.value == sig.ttft.value  # percent or fraction

    # Over the whole run, generated tokens add up to the outputs (the fluid model is exact).
    sim.run_until_idle()
    end = sim.now
    total = sim.signals(0.0, end, 0.5).generation_tokens_rate.value * end
    assert total == pytest.approx(sum(r.output_tokens for r in sim.records()), rel=1e-6)

    # TTFT p90: over the requests whose first token came in the window (nearest rank).
    firsts = sorted(r.ttft_s for r in sim.records() if 240 <= r.first_token_at < 300)
    assert sig.ttft.value == pytest.approx(firsts[math.ceil(0.9 * len(firsts)) - 1])
    assert 0 < sig.itl.value < 1


def test_signals_of_one_request_by_hand() -> None:
    sim = make()
    sim.advance(30.0, [Request(0, 1.0, 2000, 50)])
    (rec,) = sim.records()
    sig = sim.signals(0.0, 30.0, 0.99)
    assert sig.request_rate.value == pytest.approx(1 / 30)
    assert sig.prompt_tokens_rate.value == pytest.approx(2000 / 30)
    assert sig.generation_tokens_rate.value == pytest.approx(50 / 30)
    assert sig.ttft.value == pytest.approx(rec.ttft_s)
    assert sig.itl.value == pytest.approx(step(1, 2000))
    # A window that ends mid-decode counts the tokens made so far.
    mid = 1.0 + rec.ttft_s + 10 * rec.itl_s
    sim2 = make()
    sim2.advance(mid, [Request(0, 1.0, 2000, 50)])
    assert sim2.signals(0.0, mid, 0.9).generation_tokens_rate.value * mid == pytest.approx(11)
    assert sim2.signals(0.0, mid, 0.9).roles["decode"].running.value == 1


def test_signals_on_an_idle_window_are_nan_latencies() -> None:
    sim = make()
    sim.advance(60.0)
    sig = sim.signals(0.0, 60.0, 0.9)
    assert sig.request_rate.value == 0.0 and sig.generation_tokens_rate.value == 0.0
    assert sig.ttft.is_nan and sig.itl.is_nan
    assert sig.roles["decode"].running.value == 0.0
    with pytest.raises(ValueError):
        sim.signals(10.0, 10.0, 0.9)


# -- conservation (property) --------------------------------------------------------------------

_links = st.sampled_from([NV, LinkClass.PIX, LinkClass.SYS, None])


@st.composite
def _scenario(draw):
    n = draw(st.integers(1, 40))
    gaps = draw(st.lists(st.floats(0.0, 0.5), min_size=n, max_size=n))
    t, reqs = 0.0, []
    for i, g in enumerate(gaps):
        t += g
        reqs.append(Request(i, t, draw(st.integers(0, 40000)), draw(st.integers(0, 600))))
    changes = draw(
        st.lists(
            st.tuples(
                st.floats(0.0, t + 1.0),
                st.lists(
                    st.tuples(
                        st.integers(0, 5), st.sampled_from([1, 2, 4]), _links, st.floats(0.0, 3.0)
                    ),
                    min_size=0,
                    max_size=3,
                ),
                st.lists(
                    st.tuples(
                        st.integers(0, 5), st.sampled_from([1, 2, 4]), _links, st.floats(0.0, 3.0)
                    ),
                    min_size=0,
                    max_size=3,
                ),
            ),
            max_size=4,
        )
    )
    max_batch = draw(st.one_of(st.none(), st.integers(1, 8)))
    return reqs, sorted(changes, key=lambda c: c[0]), max_batch


def _insts(kind, specs, now):
    seen, out = set(), []
    for i, tp, link, delay in specs:
        if i in seen:
            continue
        seen.add(i)
        out.append(
            kind(f"{kind.__name__[0]}{i}-{tp}", tp, link if tp > 1 else None, "n", now + delay)
        )
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenario())
def test_every_admitted_request_completes(scn) -> None:
    reqs, changes, max_batch = scn
    sim = ServiceSim("svc", get_model("qwen3-8b-like"), PROFILE, path_of(RACK), max_batch=max_batch)
    sim.set_instances([P(0, tp=1, link=None)], [D(0, tp=1, link=None)], 0.0)
    pending = list(reqs)
    for at, ps, ds in changes:
        now = max(at, sim.now)
        batch = [r for r in pending if r.arrival_s < now]
        pending = pending[len(batch) :]
        sim.advance(now, batch)
        sim.set_instances(_insts(PrefillInstance, ps, now), _insts(DecodeInstance, ds, now), now)
    end = (reqs[-1].arrival_s if reqs else 0.0) + 1.0
    end = max(end, sim.now + 1e-3)
    sim.advance(end, pending)
    # Arrivals stop; the service ends with at least one instance of each role.
    sim.set_instances([P("last", tp=2)], [D("last", tp=2)], end)
    sim.run_until_idle()

    recs = sim.records()
    assert sim.admitted == len(reqs) and sim.in_flight == 0
    assert [r.id for r in recs] == [r.id for r in reqs]
    assert sim.backlog() == {"prefill": 0, "decode": 0}
    for rec in recs:
        assert rec.prefill_wait_s >= 0 and rec.decode_wait_s >= -1e-12
        assert rec.ttft_s >= rec.prefill_s > 0
        assert rec.ttft_s >= rec.prefill_wait_s + rec.prefill_s + rec.kv_transfer_s - 1e-9
        assert rec.e2e_s >= rec.ttft_s - 1e-12
        assert rec.itl_s > 0
    assert sim.instances() == {"prefill": ["plast"], "decode": ["dlast"]}


def _reference_decode(joins, cost):
    """The same fluid model as ServiceSim's decode, written plainly: no heap, no virtual clock.

    ``joins``: (time, id, prompt, output). Tokens per sequence advance at 1/step; the step is
    recomputed when a sequence joins or leaves. Returns {id: (first token time, finish time)}.
    """
    pending = sorted(joins)
    active: dict[int, list] = {}  # id -> [gained, prompt, output, first time]
    out: dict[int, tuple[float, float]] = {}
    t, s = pending[0][0], 0.0
    while pending or active:
        tj = pending[0][0] if pending else math.inf
        dt = math.inf
        for g, _, o, first in active.values():
            target = 1.0 if first is None and o > 1 else float(o)
            dt = min(dt, (target - g) * s)
        t_next = min(tj, t + dt)
        for a in active.values():
            a[0] += (t_next - t) / s if s else 0.0
        t = t_next
        changed = False
        for i in sorted(active):
            g, _, o, first = active[i]
            if first is None and g >= 1 - 1e-9:
                active[i][3] = first = t
            if g >= o - 1e-9 * max(1.0, o):
                out[i] = (first if first is not None else t, t)
                del active[i]
                changed = True
        while pending and pending[0][0] <= t:
            _, i, p, o = pending.pop(0)
            active[i] = [0.0, p, o, None]
            changed = True
        if changed:
            n = len(active)
            s = cost.step(n, sum(a[0] + a[1] for a in active.values())) if n else 0.0
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 3.0), st.integers(1, 6000), st.integers(1, 300)),
        min_size=1,
        max_size=25,
    )
)
def test_decode_matches_a_plain_reference(items) -> None:
    items = sorted(items)
    reqs = [Request(i, a, p, o) for i, (a, p, o) in enumerate(items)]
    sim = make(n_p=30, n_d=1)  # prefill never queues; one decode instance shares everything
    sim.advance(reqs[-1].arrival_s + 1e-6, reqs)
    sim.run_until_idle()
    recs = sim.records()
    joins = [
        (
            r.arrival_s + r.prefill_wait_s + r.prefill_s + r.decode_wait_s + r.kv_transfer_s,
            r.id,
            r.prompt_tokens,
            r.output_tokens,
        )
        for r in recs
    ]
    ref = _reference_decode(joins, PROFILE.decode_cost(M32, 2, NV))
    for r in recs:
        first, finish = ref[r.id]
        assert r.first_token_at == pytest.approx(first, rel=1e-9, abs=1e-9)
        assert r.finished_at == pytest.approx(finish, rel=1e-9, abs=1e-9)


# -- performance smoke ----------------------------------------------------------------------


def test_full_conv_trace_through_8p_4d_finishes() -> None:
    trace = load_trace("azure-conv")
    sim = make(n_p=8, n_d=4)
    t, reqs, i = 0.0, trace.requests, 0
    while i < len(reqs):  # 15 s autoscaler ticks, as the runner drives it
        t += 15.0
        j = i
        while j < len(reqs) and reqs[j].arrival_s < t:
            j += 1
        sim.advance(t, reqs[i:j])
        sim.signals(max(0.0, t - 60.0), t, 0.9)
        i = j
    sim.run_until_idle()
    assert len(sim.records()) == len(trace) == 19366


# -- profile ----------------------------------------------------------------------------------


def test_default_profile_numbers_all_have_sources() -> None:
    p = default_profile()
    assert p.name == "default-h100"
    assert p.memory_bytes == 80e9 and p.hbm_bandwidth_bytes_per_s == 3.35e12
    assert p.peak_flops == 989e12
    for key in (
        "memory_bytes",
        "memory_fraction",
        "hbm_bandwidth_bytes_per_s",
        "hbm_efficiency",
        "peak_flops",
        "prefill_points",
        "prefill_max_batch_tokens",
        "decode_step_overhead_s",
        "decode_mfu",
        "allreduce_base_s",
        "nvlinks_per_gpu",
        "tp_efficiency.NV",
        "tp_efficiency.SYS",
    ):
        assert p.sources[key].strip()
    data = json.loads(p.model_dump_json())
    del data["sources"]["tp_efficiency.PIX"]
    with pytest.raises(ValueError, match=r"no source for tp_efficiency\.PIX"):
        EngineProfile.model_validate(data)


def test_default_prefill_points_are_their_stated_derivation() -> None:
    p = default_profile()
    lengths = [int(x) for x, _ in p.prefill_points]
    derived = roofline_prefill_points(
        get_model(p.prefill_reference_model),
        lengths,
        peak_flops=989e12,
        mfu=0.45,
        hbm_bytes_per_s=3.35e12 * 0.87,
        overhead_s=0.003,
    )
    assert [list(x) for x in derived] == [list(x) for x in p.prefill_points]
    assert "roofline_prefill_points" in p.sources["prefill_points"]


def test_tp_efficiency_orders_link_classes() -> None:
    e = default_profile().tp_efficiency
    assert e[NV] == 0.9 and e[LinkClass.PIX] == e[LinkClass.PXB] == 0.75
    assert e[LinkClass.PHB] == e[LinkClass.NODE] == 0.7 and e[LinkClass.SYS] == 0.55


def test_prefill_and_decode_shapes() -> None:
    # Prefill: longer prompts take longer; bigger models take longer; TP speeds up.
    assert pf(1000) < pf(2000) < pf(8000)
    assert pf(2000, model=get_model("qwen3-8b-like")) < pf(2000)
    assert pf(2000, tp=4) < pf(2000, tp=2)
    # Decode: batch and context cost time; the weight read is the floor.
    assert step(1, 1000) < step(8, 8000) < step(64, 64000)
    assert step(1, 1000) < step(1, 100000)
    bw = PROFILE.hbm_bandwidth_bytes_per_s * PROFILE.hbm_efficiency
    assert step(1, 0, tp=1, link=None) == pytest.approx(
        PROFILE.decode_step_overhead_s + M32.weight_bytes / bw
    )
    # MoE: a bigger batch touches more experts.
    moe = get_model("qwen3-235b-moe-like")
    assert moe.decode_weight_bytes(1) < moe.decode_weight_bytes(32) < moe.weight_bytes


def test_kv_memory_and_max_sequences() -> None:
    assert M32.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2 == 262144
    free = 80e9 * 0.9 - M32.weight_bytes / 2
    assert PROFILE.kv_capacity_tokens(M32, 2) == int(free // (262144 / 2))
    assert max_sequences(M32, 2, 2000) == int(free // (262144 / 2)) // 2000
    assert max_sequences(M32, 4, 2000) > max_sequences(M32, 2, 2000)
    moe = get_model("qwen3-235b-moe-like")
    assert max_sequences(moe, 4, 1000) == 0  # 470 GB of weights do not fit on 4 x 80 GB
    assert max_sequences(moe, 8, 1000) > 0


def test_load_profile_by_path(tmp_path: Path) -> None:
    p = tmp_path / "measured.json"
    data = json.loads(default_profile().model_dump_json())
    data["name"] = "measured"
    data["decode_step_overhead_s"] = 0.002
    p.write_text(json.dumps(data))
    prof = load_profile(p)
    assert prof.name == "measured" and prof.decode_step_overhead_s == 0.002
    assert load_profile(str(p)) == prof
    assert load_profile("default-h100") == default_profile()
    with pytest.raises(ProfileError):
        load_profile(tmp_path / "missing.json")
    with pytest.raises(ProfileError):
        load_profile("no-such-profile")


# -- model presets ----------------------------------------------------------------------------


def test_presets_are_consistent_with_their_cards() -> None:
    assert set(MODELS) == {"qwen3-8b-like", "qwen3-32b-like", "qwen3-235b-moe-like"}
    for m in MODELS.values():
        assert m.shape_params() == pytest.approx(m.params_b * 1e9, rel=0.01), m.name
        assert m.dtype_bytes == 2
    m = get_model("qwen3-32b-like")
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.head_dim) == (64, 5120, 64, 8, 128)
    moe = get_model("qwen3-235b-moe-like")
    assert (moe.layers, moe.kv_heads, moe.head_dim) == (94, 4, 128)
    assert moe.moe is not None and (moe.moe.experts, moe.moe.active_experts) == (128, 8)
    # The routed share of the experts plus the rest gives the card's 22B active.
    active = moe.shape_params() - moe.expert_params * (1 - 8 / 128)
    assert active == pytest.approx(22e9, rel=0.02)
    with pytest.raises(KeyError, match="presets"):
        get_model("gpt-5")
