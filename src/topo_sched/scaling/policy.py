"""The coordinated scaling policy: signals in, one decision for all roles of a target out.

Each tick, per target:

1. Hold if the signals cannot be trusted: metrics source unreachable, a needed series
   missing, stale or NaN while traffic flows. Holding never scales down.
2. Replicas each role needs: demand against per-replica capacity (prompt tokens/s for
   prefill; concurrent sequences for decode, from its running+waiting gauges or, failing
   that, Little's law on generated tokens/s x ITL), raised where observed latency is over
   its SLO (by the overshoot, at most 2x per tick).
3. Whole ratio units: strict mode rounds UP to units of the weights (2P:1D -> 2u, 1u);
   band mode rounds each role up, then raises the smaller side until prefill per decode
   lies inside the band. Clamped to units.min..units.max.
4. Stabilised as HPA's ``behavior`` does, in ratio units: scale-up takes the lowest
   recommendation of its window, scale-down the highest of its (default 300 s); then the
   per-period rate-limit policies (Units/Percent, Max/Min/Disabled). The first tick counts
   the current size as a recommendation, so a restart never scales down at once.
5. A role still rolling out (ready < spec) is not scaled down further.

Pure: the caller passes ``now`` and the previous :class:`ScalingState` and keeps the new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from topo_sched.scaling.config import Mode, ScaleRules, Target
from topo_sched.scaling.signals import Decision, RoleReplicas, Sample, TargetSignals

#: Largest latency-driven growth in one tick (the next tick can add more).
MAX_LATENCY_FACTOR = 2.0
#: Queued prompts should be drained within this many seconds (on top of the arrival rate).
BACKLOG_DRAIN_S = 60.0
#: Without capacity figures, latency below this fraction of its SLO lets a role shrink.
LOW_LATENCY_FRACTION = 0.5


@dataclass(frozen=True)
class ScalingState:
    """What the policy remembers about one target between ticks."""

    #: (time, recommended units) over the longest stabilisation window.
    recommendations: tuple[tuple[float, float], ...] = ()
    #: (time, units before, units after) of changes made, for the rate-limit periods.
    changes: tuple[tuple[float, float, float], ...] = ()

    def record_change(self, now: float, before: float, after: float) -> ScalingState:
        return replace(self, changes=(*self.changes, (now, before, after)))


@dataclass
class _Needs:
    prefill: float
    decode: float
    code: str
    notes: list[str] = field(default_factory=list)


class _Hold(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _fmt(x: float) -> str:
    """Readable in a reason: 8,000 tok/s, 0.75D, 9.1s."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _check(name: str, s: Sample | None, max_age: float, traffic: bool) -> Sample | None:
    if s is None:
        raise _Hold("missing", f"series for {name} is missing")
    if s.age_seconds > max_age:
        raise _Hold("stale", f"{name} is {s.age_seconds:.0f}s old (limit {max_age:.0f}s)")
    if s.is_nan:
        if traffic:
            raise _Hold("nan", f"{name} is NaN while requests flow")
        return None  # no requests in the window: no latency to judge
    return s


def _needs(
    t: Target, sig: TargetSignals, cur_p: int, cur_d: int, ready_p: int, ready_d: int
) -> _Needs:
    """Replicas each role needs. Latency corrections scale the READY replicas: the latency
    observed now was produced by them, and pods still starting will add capacity without
    being asked again (as HPA ignores unready pods on scale-up)."""
    max_age = t.metrics.max_age_seconds
    cap = t.capacity
    prompt = _check("prompt_tokens_rate", sig.prompt_tokens_rate, max_age, False)
    traffic = prompt is not None and prompt.value > 0
    if sig.request_rate is not None and not sig.request_rate.is_nan:
        traffic = traffic or sig.request_rate.value > 0
    ttft = _check(f"ttft p{t.slo.percentile * 100:g}", sig.ttft, max_age, traffic)
    itl = _check(f"itl p{t.slo.percentile * 100:g}", sig.itl, max_age, traffic)
    notes: list[str] = []
    code = "demand"

    # Prefill: demand, then latency.
    if cap.prefill_tokens_per_second:
        p_need = (prompt.value if prompt else 0.0) / cap.prefill_tokens_per_second
        notes.append(f"prompt {_fmt(prompt.value if prompt else 0)} tok/s -> {_fmt(p_need)}P")
        # Backlog: queued prompts drained within BACKLOG_DRAIN_S. An absolute replica count,
        # compared with the spec (starting pods included), so it never compounds tick on tick.
        pq = sig.roles.get(t.prefill_role or "")
        rps = sig.request_rate
        if pq and pq.queue and not pq.queue.is_nan and pq.queue.value > 0 and prompt and rps:
            per_req = prompt.value / rps.value if rps.value > 0 and not rps.is_nan else 0.0
            backlog = pq.queue.value * per_req / (cap.prefill_tokens_per_second * BACKLOG_DRAIN_S)
            if backlog > 0:
                p_need += backlog
                notes.append(f"prefill queue {_fmt(pq.queue.value)} -> +{_fmt(backlog)}P")
    else:
        p_need = float(cur_p)
        if ttft is not None and ttft.value < LOW_LATENCY_FRACTION * t.slo.ttft_seconds:
            p_need = cur_p * 0.75
    if ttft is not None and ttft.value > t.slo.ttft_seconds:
        factor = min(MAX_LATENCY_FACTOR, ttft.value / t.slo.ttft_seconds)
        if ready_p * factor > p_need:
            p_need, code = ready_p * factor, "slo"
        q = sig.roles.get(t.prefill_role or "", None)
        queue = f", prefill queue {_fmt(q.queue.value)}" if q and q.queue else ""
        notes.append(f"TTFT {_fmt(ttft.value)}s > SLO {_fmt(t.slo.ttft_seconds)}s{queue}")

    # Decode: concurrent sequences, then latency.
    if cap.decode_sequences:
        role = sig.roles.get(t.decode_role or "")
        if role is not None and role.running is not None:
            running = _check("decode running", role.running, max_age, traffic)
            waiting = role.queue
            seqs = (running.value if running else 0.0) + (
                waiting.value if waiting and not waiting.is_nan else 0.0
            )
        else:
            gen = _check("generation_tokens_rate", sig.generation_tokens_rate, max_age, False)
            per_seq = itl.value if itl is not None else t.slo.itl_seconds
            seqs = (gen.value if gen else 0.0) * per_seq  # Little's law
        d_need = seqs / cap.decode_sequences
        notes.append(f"{_fmt(seqs)} decode sequences -> {_fmt(d_need)}D")
    else:
        d_need = float(cur_d)
        if itl is not None and itl.value < LOW_LATENCY_FRACTION * t.slo.itl_seconds:
            d_need = cur_d * 0.75
    if itl is not None and itl.value > t.slo.itl_seconds:
        factor = min(MAX_LATENCY_FACTOR, itl.value / t.slo.itl_seconds)
        if ready_d * factor > d_need:
            d_need, code = ready_d * factor, "slo"
        notes.append(f"ITL {_fmt(itl.value * 1000)}ms > SLO {_fmt(t.slo.itl_seconds * 1000)}ms")
    return _Needs(p_need, d_need, code, notes)


def units_of(t: Target, replicas: dict[str, int]) -> float:
    """Ratio units a set of replicas amounts to (the larger role decides)."""
    return max(replicas.get(r, 0) / w for r, w in t.roles.items())


def replicas_for_units(t: Target, units: float) -> dict[str, int]:
    return {r: math.ceil(units * w - 1e-9) for r, w in t.roles.items()}


def _compose(t: Target, needs: _Needs) -> tuple[dict[str, int], str | None]:
    """Replicas per role in ratio (strict) or in band; and a note if min/max clipped them."""
    p_role, d_role = t.prefill_role or "", t.decode_role or ""
    need = {p_role: needs.prefill, d_role: needs.decode}
    if t.mode is Mode.STRICT:
        units = max(math.ceil(need.get(r, 0.0) / w - 1e-9) for r, w in t.roles.items())
        clipped = min(max(units, t.units.min), t.units.max)
        note = None
        if clipped != units:
            note = f"units.{'max' if clipped < units else 'min'}={clipped}"
        return replicas_for_units(t, clipped), note
    assert t.band is not None
    p = max(math.ceil(needs.prefill - 1e-9), 1)
    d = max(math.ceil(needs.decode - 1e-9), 1)
    if p > t.band.max * d:
        d = math.ceil(p / t.band.max - 1e-9)
    if p < t.band.min * d:
        p = math.ceil(t.band.min * d - 1e-9)
    wp, wd = t.roles[p_role], t.roles[d_role]
    lo_p, hi_p = math.ceil(t.units.min * wp), math.floor(t.units.max * wp)
    lo_d, hi_d = math.ceil(t.units.min * wd), math.floor(t.units.max * wd)
    cp, cd = min(max(p, lo_p), hi_p), min(max(d, lo_d), hi_d)
    note = None
    if (cp, cd) != (p, d):
        note = f"units {'max' if cp < p or cd < d else 'min'}"
    out = {p_role: cp, d_role: cd}
    for r in t.roles:  # any further roles follow the prefill units
        out.setdefault(r, math.ceil(cp / wp * t.roles[r]))
    return out, note


def _window(recs: tuple[tuple[float, float], ...], now: float, seconds: int) -> list[float]:
    return [u for (ts, u) in recs if now - ts <= seconds]


def _rate_limit(rules: ScaleRules, state: ScalingState, now: float, cur: float, up: bool) -> float:
    """The furthest units may move from ``cur`` in this direction, per HPA's policies."""
    if rules.select_policy == "Disabled":
        return cur
    if not rules.policies:
        return math.inf if up else 0.0
    limits = []
    for pol in rules.policies:
        moved = sum(
            (after - before)
            for ts, before, after in state.changes
            if now - ts < pol.period_seconds and ((after > before) == up)
        )
        start = cur - moved  # units at the start of the period
        if pol.type == "Units":
            limits.append(start + pol.value if up else start - pol.value)
        else:
            f = pol.value / 100.0
            limits.append(start * (1 + f) if up else start * (1 - f))
    pick = max if (rules.select_policy == "Max") == up else min
    return pick(limits)


def decide(
    t: Target,
    signals: TargetSignals,
    replicas: dict[str, RoleReplicas],
    state: ScalingState,
    now: float,
) -> tuple[Decision, ScalingState]:
    """One tick for one target. Returns the decision and the state to pass next time."""
    current = {r: (replicas[r].desired if r in replicas else 0) for r in t.roles}

    def hold(code: str, reason: str, st: ScalingState = state) -> tuple[Decision, ScalingState]:
        return Decision(t.rbg, current, dict(current), "hold", reason, code), st

    missing_roles = [r for r in t.roles if r not in replicas]
    if missing_roles:
        return hold("missing-role", f"RBG has no role(s) {missing_roles}")
    if signals.source_error:
        return hold("unreachable", f"metrics unavailable ({signals.source_error}); holding")
    p_role, d_role = t.prefill_role or "", t.decode_role or ""
    cur_p, cur_d = current[p_role], current[d_role]
    # No ready replica reported reads as "status unknown" (an RBG whose status is not written
    # yet): latency then scales the spec count, as before the status existed.
    ready_p = min(replicas[p_role].ready, cur_p) or cur_p
    ready_d = min(replicas[d_role].ready, cur_d) or cur_d
    try:
        needs = _needs(t, signals, cur_p, cur_d, ready_p, ready_d)
    except _Hold as h:
        return hold(h.code, f"{h.reason}; holding")

    rec, clip = _compose(t, needs)
    cur_units = units_of(t, current)
    rec_units = units_of(t, rec)
    longest = max(
        t.behavior.scale_up.stabilization_window_seconds,
        t.behavior.scale_down.stabilization_window_seconds,
    )
    recs = tuple((ts, u) for ts, u in state.recommendations if now - ts <= longest)
    if not state.recommendations:
        # First tick (e.g. after a restart): count the current size as a recommendation just
        # before now, so a scale-down waits one full window; a 0 s up-window skips it.
        recs = ((now - 1e-6, cur_units),)
    recs = (*recs, (now, rec_units))
    new_state = replace(state, recommendations=recs)

    up_w = _window(recs, now, t.behavior.scale_up.stabilization_window_seconds) or [rec_units]
    down_w = _window(recs, now, t.behavior.scale_down.stabilization_window_seconds) or [rec_units]
    target_units, code = cur_units, needs.code
    notes = list(needs.notes)
    if min(up_w) > cur_units:
        target_units = min(up_w)
        limit = _rate_limit(t.behavior.scale_up, state, now, cur_units, up=True)
        if target_units > limit:
            target_units, code = max(cur_units, limit), "rate-limit"
            notes.append(f"scale-up limited to {_fmt(target_units)} units this period")
    elif max(down_w) < cur_units:
        target_units = max(down_w)
        limit = _rate_limit(t.behavior.scale_down, state, now, cur_units, up=False)
        if target_units < limit:
            target_units, code = min(cur_units, limit), "rate-limit"
            notes.append(f"scale-down limited to {_fmt(target_units)} units this period")
    elif rec_units < cur_units:
        code = "window"
        notes.append(
            f"scale-down to {_fmt(rec_units)} units waits for its "
            f"{t.behavior.scale_down.stabilization_window_seconds}s window"
        )

    if target_units == rec_units:
        desired = rec
    elif t.mode is Mode.STRICT:
        desired = replicas_for_units(t, math.ceil(target_units - 1e-9))
    else:
        scale = target_units / rec_units if rec_units else 1.0
        desired = {r: max(1, math.ceil(n * scale - 1e-9)) for r, n in rec.items()}
    if clip:
        notes.append(f"clipped by {clip}")
        code = "max" if "max" in clip else ("min" if code == "demand" else code)

    # A role still rolling out is not shrunk further.
    for r, n in desired.items():
        rr = replicas[r]
        if n < current[r] and rr.ready < rr.desired:
            return hold(
                "rolling-out",
                f"role {r} is rolling out ({rr.ready}/{rr.desired} ready); not scaling down",
                new_state,
            )

    summary = "; ".join(notes)
    if desired == current:
        reason = f"steady at {_fmt(cur_units)} units" + (f" ({summary})" if summary else "")
        return Decision(
            t.rbg,
            current,
            desired,
            "hold",
            reason,
            code if code != "demand" else "steady",
            cur_units,
            cur_units,
        ), new_state
    in_ratio = desired == replicas_for_units(t, units_of(t, desired)) or t.mode is Mode.BAND
    shape = ",".join(f"{n}{r[0].upper()}" for r, n in desired.items())
    reason = f"{'scale up' if units_of(t, desired) > cur_units else 'scale down'} to {shape}"
    if not in_ratio:
        reason += " (ratio restored)"
    if summary:
        reason += f": {summary}"
    new_state = new_state.record_change(now, cur_units, units_of(t, desired))
    return Decision(
        t.rbg, current, desired, "scale", reason, code, cur_units, units_of(t, desired)
    ), new_state
