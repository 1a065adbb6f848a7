"""Event-driven model of ONE prefill/decode-disaggregated LLM service.

A :class:`ServiceSim` takes requests (:class:`~topo_sched.sim.traces.Request`) and a set of
prefill and decode instances (engine pods, each a TP group placed somewhere), and works out when
each request gets its first and last token. The runner owns the cluster, placement and scaling;
it moves time forward with :meth:`ServiceSim.advance`, changes the instances with
:meth:`ServiceSim.set_instances` and reads :meth:`ServiceSim.signals` like the autoscaler reads
Prometheus. Costs come from an :class:`~topo_sched.sim.profile.EngineProfile` and the
instances' TP spans; the KV path between two pods comes from the runner (``kv_path``), which
reads the project's one link-cost table.

The model, step by step:

1. Prefill queue. Requests wait in one FIFO queue for the whole service (a router sending each
   request to the instance that frees first). A free instance takes the head of the queue plus
   the queued prompts behind it while their tokens fit ``profile.prefill_max_batch_tokens``
   (the chunked-prefill budget); a longer prompt goes alone. Batching is modelled simply: the
   batch runs at the profile's throughput for its total size (capped at the curve's peak; a
   long prompt keeps its own attention cost, ``EngineProfile.prefill_batch_seconds``) and all
   of it finishes together. Among idle
   instances the one idle longest takes work (ties by id). Only ready, non-draining instances
   take work.
2. Decode slot and KV transfer. When its prefill ends a request picks the ready, non-draining
   decode instance with the fewest sequences (running + arriving) that has room, ties by id;
   room means its KV reservation fits the instance's KV capacity
   (``profile.kv_capacity_tokens``) and the instance is below ``max_batch`` sequences. A
   request reserves ``prompt + output`` tokens (the trace knows the output length; no
   preemption is modelled); one larger than a whole instance is let onto an empty one. With no
   room anywhere it waits, FIFO, in the decode queue (its KV held by the prefill side). The KV
   then moves in ``prompt * kv_bytes_per_token / bandwidth + latency`` over ``kv_path`` (no
   contention between transfers).
3. Decode: continuous batching as exact processor sharing. Every step, each running sequence
   gains one token; the step takes ``DecodeCost.step(batch, context tokens)``, recomputed at
   each join and finish and constant in between (the context is counted exactly at each event:
   prompts plus tokens generated so far). An instance keeps a virtual clock V (tokens per
   sequence so far); a request joining at V0 gets its first token at V0 + 1 and its last at
   V0 + output, both thresholds in a heap, so each event costs O(log n) and no token is
   looped over. A new sequence's first step is a full step from its join.

TTFT is arrival to first token: prefill wait + prefill + decode wait + KV transfer + the first
decode step. ITL is the mean time between its tokens, ``(finish - first) / (output - 1)``; for a
one-token output, the duration of that one step.

Instances that are no longer listed drain: they take no new work, finish what they hold (a
prefill batch; running and arriving sequences), then disappear. New instances serve from their
``ready_at``. An id that is already known keeps its state (give a replaced pod a new id).

Deterministic: no randomness; ties are broken by instance id, then by request id.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from topo_sched.scaling.signals import RoleSignals, Sample, TargetSignals
from topo_sched.sim.models import ModelSpec
from topo_sched.sim.profile import DecodeCost, EngineProfile
from topo_sched.sim.traces import Request
from topo_sched.topology.model import LinkClass

PREFILL = "prefill"
DECODE = "decode"


@dataclass
class PrefillInstance:
    id: str
    tp: int
    #: Slowest link inside the TP group; None for one GPU (or unknown: costed as SYS).
    worst_link: LinkClass | None
    node: str
    ready_at: float = 0.0


@dataclass
class DecodeInstance:
    id: str
    tp: int
    worst_link: LinkClass | None
    node: str
    ready_at: float = 0.0


#: (bandwidth bytes/s, latency s) of the path between the two pods' GPUs.
KvPath = Callable[[PrefillInstance, DecodeInstance], tuple[float, float]]


@dataclass(frozen=True)
class RequestRecord:
    """One completed request. Times in seconds; ``*_s`` durations, ``arrival_s`` absolute."""

    id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    itl_s: float
    e2e_s: float
    prefill_wait_s: float
    prefill_s: float
    #: Waiting for room on a decode instance (after prefill, before the KV transfer).
    decode_wait_s: float
    kv_transfer_s: float
    prefill_id: str
    decode_id: str

    @property
    def arrival(self) -> float:
        return self.arrival_s

    @property
    def first_token_at(self) -> float:
        return self.arrival_s + self.ttft_s

    @property
    def finished_at(self) -> float:
        return self.arrival_s + self.e2e_s


# -- internal state ---------------------------------------------------------------------------

_FIRST, _FINISH = 0, 1
_EV_PREFILL_READY, _EV_DECODE_READY, _EV_PREFILL_DONE, _EV_KV_DONE, _EV_DECODE = range(5)


class _Req:
    __slots__ = (
        "arrival",
        "d",
        "first",
        "id",
        "join",
        "kv_s",
        "kv_start",
        "need",
        "out",
        "pf",
        "pf_end",
        "pf_start",
        "prompt",
        "vjoin",
    )

    def __init__(self, r: Request) -> None:
        self.id = r.id
        self.arrival = r.arrival_s
        self.prompt = max(1, r.prompt_tokens)
        self.out = max(1, r.output_tokens)
        self.need = self.prompt + self.out
        self.pf: _Prefill | None = None
        self.pf_start = self.pf_end = self.kv_start = self.kv_s = self.join = 0.0
        self.first: float | None = None
        self.d: _Decode | None = None
        self.vjoin = 0.0


class _Prefill:
    __slots__ = ("batch", "busy", "draining", "id", "in_idle", "ready", "removed", "spec")

    def __init__(self, spec: PrefillInstance) -> None:
        self.spec = spec
        self.id = spec.id
        self.ready = self.draining = self.removed = self.busy = self.in_idle = False
        self.batch: list[_Req] = []


class _SegLog:
    """A decode instance's (time, batch, step time) history, for windowed signals."""

    __slots__ = ("n", "step", "t")

    def __init__(self) -> None:
        self.t: list[float] = []
        self.n: list[int] = []
        self.step: list[float] = []

    def add(self, t: float, n: int, step: float) -> None:
        if self.t and self.t[-1] == t:
            self.n[-1], self.step[-1] = n, step
        else:
            self.t.append(t)
            self.n.append(n)
            self.step.append(step)


class _Decode:
    __slots__ = (
        "capacity",
        "cost",
        "draining",
        "heap",
        "id",
        "log",
        "n",
        "n_incoming",
        "ready",
        "removed",
        "reserved",
        "spec",
        "step",
        "sum_prompt",
        "sum_vjoin",
        "t",
        "v",
        "version",
    )

    def __init__(self, spec: DecodeInstance, cost: DecodeCost, capacity: int) -> None:
        self.spec = spec
        self.id = spec.id
        self.cost = cost
        self.capacity = capacity
        self.ready = self.draining = self.removed = False
        self.v = 0.0  # virtual clock: tokens each running sequence has gained
        self.t = 0.0  # time of v
        self.step = 0.0
        self.n = 0
        self.n_incoming = 0
        self.reserved = 0
        self.sum_prompt = 0
        self.sum_vjoin = 0.0
        self.heap: list[tuple[float, int, int, _Req]] = []
        self.version = 0
        self.log = _SegLog()

    def sync(self, t: float) -> None:
        if self.n and t > self.t:
            self.v += (t - self.t) / self.step
        self.t = t

    def restep(self, t: float) -> None:
        if self.n == 0:
            self.v = self.sum_vjoin = 0.0
            self.sum_prompt = 0
            self.step = 0.0
        else:
            ctx = self.sum_prompt + self.n * self.v - self.sum_vjoin
            self.step = self.cost.step(self.n, ctx)
        self.log.add(t, self.n, self.step)

    def has_room(self, need: int, max_batch: int | None) -> bool:
        seqs = self.n + self.n_incoming
        if max_batch is not None and seqs >= max_batch:
            return False
        return self.reserved + need <= self.capacity or seqs == 0


def _quantile(pairs: list[tuple[float, float]], q: float) -> float:
    """Weighted quantile (inverted CDF) of (value, weight) pairs; NaN if there are none."""
    if not pairs:
        return math.nan
    pairs.sort()
    total = sum(w for _, w in pairs)
    if total <= 0:
        return math.nan
    target = q * total
    acc = 0.0
    for v, w in pairs:
        acc += w
        if acc >= target - 1e-12 * total:
            return v
    return pairs[-1][0]


class ServiceSim:
    """One PD service: a prefill role and a decode role, each a set of instances."""

    def __init__(
        self,
        name: str,
        model: ModelSpec,
        profile: EngineProfile,
        kv_path: KvPath,
        *,
        max_batch: int | None = None,
    ) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.name = name
        self.model = model
        self.profile = profile
        self.kv_path = kv_path
        #: Most sequences one decode instance runs at once (None: KV memory decides).
        self.max_batch = max_batch
        self.now = 0.0
        self._events: list[tuple] = []
        self._seq = 0
        self._pf: dict[str, _Prefill] = {}
        self._dc: dict[str, _Decode] = {}
        self._idle: list[tuple[float, str, _Prefill]] = []
        self._pq: deque[_Req] = deque()
        self._dq: deque[_Req] = deque()
        self._records: list[RequestRecord] = []
        self._admitted = 0
        self._last_arrival = -math.inf
        self._arr_t: list[float] = []
        self._arr_prompt: list[int] = [0]  # cumulative
        self._ttft_t: list[float] = []
        self._ttft_v: list[float] = []
        self._logs: list[_SegLog] = []
        self._kv_cache: dict[tuple[str, str], tuple[float, float]] = {}
        self._kv_bytes = model.kv_bytes_per_token
        self._budget = profile.prefill_max_batch_tokens

    # -- public API ------------------------------------------------------------------------

    def set_instances(
        self, prefill: list[PrefillInstance], decode: list[DecodeInstance], now: float
    ) -> None:
        """Make these the service's instances from ``now`` on; the others drain."""
        if now < self.now - 1e-9:
            raise ValueError(f"set_instances at {now} is before the simulation time {self.now}")
        for kind, insts in ((PREFILL, prefill), (DECODE, decode)):
            ids = [i.id for i in insts]
            if len(set(ids)) != len(ids):
                raise ValueError(f"duplicate {kind} instance ids: {sorted(ids)}")
            known = self._pf if kind == PREFILL else self._dc
            for spec in insts:
                if (
                    spec.id not in known
                    and self.profile.kv_capacity_tokens(self.model, spec.tp) <= 0
                ):
                    raise ValueError(
                        f"{kind} {spec.id}: {self.model.name} does not fit on tp={spec.tp} "
                        f"({self.profile.name})"
                    )
        self._run_events(now)
        self.now = max(self.now, now)
        t = self.now

        want_p = {p.id for p in prefill}
        for inst in list(self._pf.values()):
            if inst.id not in want_p and not inst.draining:
                inst.draining = True
                if not inst.busy:
                    self._remove_prefill(inst)
        for spec in prefill:
            inst = self._pf.get(spec.id)
            if inst is not None:
                if inst.draining:
                    inst.draining = False
                    if inst.ready and not inst.busy:
                        self._make_idle(inst, t)
                continue
            inst = _Prefill(spec)
            self._pf[spec.id] = inst
            if spec.ready_at <= t:
                inst.ready = True
                self._make_idle(inst, t)
            else:
                self._push(spec.ready_at, _EV_PREFILL_READY, inst)

        want_d = {d.id for d in decode}
        for dinst in list(self._dc.values()):
            if dinst.id not in want_d and not dinst.draining:
                dinst.draining = True
                self._maybe_remove_decode(dinst, t)
        for dspec in decode:
            dinst = self._dc.get(dspec.id)
            if dinst is not None:
                dinst.draining = False
                continue
            cap = self.profile.kv_capacity_tokens(self.model, dspec.tp)
            cost = self.profile.decode_cost(self.model, dspec.tp, dspec.worst_link)
            dinst = _Decode(dspec, cost, cap)
            dinst.t = t
            self._dc[dspec.id] = dinst
            self._logs.append(dinst.log)
            if dspec.ready_at <= t:
                dinst.ready = True
            else:
                self._push(dspec.ready_at, _EV_DECODE_READY, dinst)
        self._dispatch_prefill(t)
        self._drain_decode_queue(t)

    def advance(self, until: float, arrivals: Iterable[Request] = ()) -> None:
        """Run to ``until``, admitting ``arrivals`` (in arrival order, ``arrival_s < until``)."""
        if until < self.now - 1e-9:
            raise ValueError(f"advance to {until} is before the simulation time {self.now}")
        for r in arrivals:
            a = r.arrival_s
            if a < self._last_arrival or a < self.now - 1e-9:
                raise ValueError(
                    f"request {r.id} arrives at {a}, before an earlier arrival or the "
                    f"simulation time {self.now}: arrivals must come in order"
                )
            if a >= until:
                raise ValueError(f"request {r.id} arrives at {a}, not before until={until}")
            self._run_events(a)
            self.now = max(self.now, a)
            self._last_arrival = a
            self._arrive(r)
        self._run_events(until)
        self.now = max(self.now, until)

    def run_until_idle(self, limit: float = math.inf) -> float:
        """Run with no new arrivals until nothing more happens (or ``limit``); the time reached."""
        self._run_events(limit)
        if self._events:
            self.now = max(self.now, limit)
        return self.now

    def records(self) -> list[RequestRecord]:
        """Completed requests, by id."""
        return sorted(self._records, key=lambda r: r.id)

    def backlog(self) -> dict[str, int]:
        """Requests waiting now: for a prefill instance, and (prefill done) for a decode slot."""
        return {PREFILL: len(self._pq), DECODE: len(self._dq)}

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def in_flight(self) -> int:
        """Admitted requests not completed yet."""
        return self._admitted - len(self._records)

    def instances(self) -> dict[str, list[str]]:
        """Ids of the instances that still exist (draining ones included), per role."""
        return {PREFILL: sorted(self._pf), DECODE: sorted(self._dc)}

    def signals(self, since: float, until: float, percentile: float) -> TargetSignals:
        """What Prometheus would answer for ``[since, until)``: rates, latency percentiles, gauges.

        Rates: arrivals (requests, prompt tokens) and tokens generated in the window, per second.
        TTFT: quantile over requests whose first token came in the window. ITL: quantile over
        the tokens generated in the window (each token observes its step time). Gauges (queue,
        running, KV usage per role) are the state now: call right after ``advance(until)``.
        ``percentile`` is a fraction (0.9) or a percentage (90).
        """
        if until <= since:
            raise ValueError(f"empty window [{since}, {until})")
        q = percentile / 100.0 if percentile > 1 else percentile
        if not 0 < q <= 1:
            raise ValueError(f"percentile must be in (0, 1] or (0, 100], got {percentile}")
        dur = until - since

        i0 = bisect.bisect_left(self._arr_t, since)
        i1 = bisect.bisect_left(self._arr_t, until)
        n_req = i1 - i0
        prompt = self._arr_prompt[i1] - self._arr_prompt[i0]

        end = min(until, self.now)
        tokens = 0.0
        itl_obs: list[tuple[float, float]] = []
        for log in self._logs:
            ts = log.t
            if not ts or ts[0] >= end:
                continue
            k = max(0, bisect.bisect_right(ts, since) - 1)
            last = len(ts) - 1
            while k <= last and ts[k] < end:
                n = log.n[k]
                if n:
                    seg_end = ts[k + 1] if k < last else self.now
                    overlap = min(seg_end, end) - max(ts[k], since)
                    if overlap > 0:
                        produced = n * overlap / log.step[k]
                        tokens += produced
                        itl_obs.append((log.step[k], produced))
                k += 1

        j0 = bisect.bisect_left(self._ttft_t, since)
        j1 = bisect.bisect_left(self._ttft_t, until)
        ttft = _quantile([(v, 1.0) for v in self._ttft_v[j0:j1]], q)
        itl = _quantile(itl_obs, q)

        live_d = [d for d in self._dc.values() if d.ready]
        kv = sum(d.reserved / d.capacity for d in live_d) / len(live_d) if live_d else math.nan
        roles = {
            PREFILL: RoleSignals(
                queue=Sample(float(len(self._pq))),
                running=Sample(float(sum(len(p.batch) for p in self._pf.values()))),
            ),
            DECODE: RoleSignals(
                queue=Sample(float(len(self._dq) + sum(d.n_incoming for d in self._dc.values()))),
                running=Sample(float(sum(d.n for d in self._dc.values()))),
                kv_usage=Sample(kv),
            ),
        }
        return TargetSignals(
            request_rate=Sample(n_req / dur),
            prompt_tokens_rate=Sample(prompt / dur),
            generation_tokens_rate=Sample(tokens / dur),
            ttft=Sample(ttft),
            itl=Sample(itl),
            roles=roles,
        )

    # -- events ----------------------------------------------------------------------------

    def _push(self, t: float, kind: int, obj: object, aux: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, obj, aux))

    def _run_events(self, t_end: float) -> None:
        events = self._events
        pop = heapq.heappop
        while events and events[0][0] <= t_end:
            t, _, kind, obj, aux = pop(events)
            self.now = t
            if kind == _EV_DECODE:
                if aux == obj.version and not obj.removed:
                    self._decode_event(obj, t)
            elif kind == _EV_KV_DONE:
                self._join(obj, t)
            elif kind == _EV_PREFILL_DONE:
                self._prefill_done(obj, t)
            elif kind == _EV_PREFILL_READY:
                if not obj.removed:
                    obj.ready = True
                    if not obj.draining:
                        self._make_idle(obj, t)
                        self._dispatch_prefill(t)
                    else:
                        self._remove_prefill(obj)
            elif kind == _EV_DECODE_READY and not obj.removed:
                obj.ready = True
                obj.t = t
                if obj.draining:
                    self._maybe_remove_decode(obj, t)
                else:
                    self._drain_decode_queue(t)

    # -- prefill ---------------------------------------------------------------------------

    def _arrive(self, r: Request) -> None:
        req = _Req(r)
        self._admitted += 1
        self._arr_t.append(req.arrival)
        self._arr_prompt.append(self._arr_prompt[-1] + req.prompt)
        self._pq.append(req)
        if self._idle:
            self._dispatch_prefill(self.now)

    def _make_idle(self, inst: _Prefill, t: float) -> None:
        if not inst.in_idle:
            inst.in_idle = True
            heapq.heappush(self._idle, (t, inst.id, inst))

    def _dispatch_prefill(self, t: float) -> None:
        while self._pq and self._idle:
            _, _, inst = heapq.heappop(self._idle)
            inst.in_idle = False
            if inst.removed or inst.draining or inst.busy or not inst.ready:
                continue
            self._start_prefill(inst, t)

    def _start_prefill(self, inst: _Prefill, t: float) -> None:
        pq = self._pq
        first = pq.popleft()
        batch = [first]
        total = first.prompt
        budget = self._budget
        while pq and total + pq[0].prompt <= budget:
            r = pq.popleft()
            batch.append(r)
            total += r.prompt
        spec = inst.spec
        dur = self.profile.prefill_batch_seconds(
            self.model, [r.prompt for r in batch], spec.tp, spec.worst_link
        )
        for r in batch:
            r.pf = inst
            r.pf_start = t
        inst.busy = True
        inst.batch = batch
        self._push(t + dur, _EV_PREFILL_DONE, inst)

    def _prefill_done(self, inst: _Prefill, t: float) -> None:
        batch, inst.batch, inst.busy = inst.batch, [], False
        for r in batch:
            r.pf_end = t
            if self._dq or not self._assign_decode(r, t):
                self._dq.append(r)
        if inst.draining:
            self._remove_prefill(inst)
        elif self._pq:
            self._start_prefill(inst, t)
        else:
            self._make_idle(inst, t)

    def _remove_prefill(self, inst: _Prefill) -> None:
        inst.removed = True
        self._pf.pop(inst.id, None)

    # -- decode ----------------------------------------------------------------------------

    def _assign_decode(self, r: _Req, t: float) -> bool:
        best: _Decode | None = None
        best_key: tuple[int, str] | None = None
        mb = self.max_batch
        for d in self._dc.values():
            if not d.ready or d.draining or not d.has_room(r.need, mb):
                continue
            key = (d.n + d.n_incoming, d.id)
            if best_key is None or key < best_key:
                best, best_key = d, key
        if best is None:
            return False
        best.reserved += r.need
        best.n_incoming += 1
        r.d = best
        pf = r.pf
        assert pf is not None
        ck = (pf.id, best.id)
        path = self._kv_cache.get(ck)
        if path is None:
            bw, lat = self.kv_path(pf.spec, best.spec)
            if not bw > 0 or not lat >= 0:
                raise ValueError(f"kv_path({pf.id}, {best.id}) gave bandwidth {bw}, latency {lat}")
            path = self._kv_cache[ck] = (float(bw), float(lat))
        r.kv_start = t
        r.kv_s = r.prompt * self._kv_bytes / path[0] + path[1]
        self._push(t + r.kv_s, _EV_KV_DONE, r)
        return True

    def _drain_decode_queue(self, t: float) -> None:
        dq = self._dq
        while dq and self._assign_decode(dq[0], t):
            dq.popleft()

    def _schedule_decode(self, d: _Decode) -> None:
        d.version += 1
        if d.n:
            gap = d.heap[0][0] - d.v
            self._push(d.t + (gap * d.step if gap > 0 else 0.0), _EV_DECODE, d, d.version)

    def _join(self, r: _Req, t: float) -> None:
        d = r.d
        assert d is not None
        d.sync(t)
        d.n_incoming -= 1
        r.join = t
        r.vjoin = v = d.v
        d.n += 1
        d.sum_prompt += r.prompt
        d.sum_vjoin += v
        if r.out > 1:
            heapq.heappush(d.heap, (v + 1.0, r.id, _FIRST, r))
        heapq.heappush(d.heap, (v + r.out, r.id, _FINISH, r))
        d.restep(t)
        self._schedule_decode(d)

    def _decode_event(self, d: _Decode, t: float) -> None:
        d.sync(t)
        heap = d.heap
        if d.v < heap[0][0]:
            d.v = heap[0][0]
        limit = d.v + 1e-9 * max(1.0, d.v)
        finished = False
        while heap and heap[0][0] <= limit:
            _, _, what, r = heapq.heappop(heap)
            if r.first is None:
                r.first = t
                self._ttft_t.append(t)
                self._ttft_v.append(t - r.arrival)
            if what == _FINISH:
                finished = True
                d.n -= 1
                d.sum_prompt -= r.prompt
                d.sum_vjoin -= r.vjoin
                d.reserved -= r.need
                self._complete(r, d, t)
        if finished:
            d.restep(t)
        self._schedule_decode(d)
        if finished:
            if d.draining:
                self._maybe_remove_decode(d, t)
            self._drain_decode_queue(t)

    def _maybe_remove_decode(self, d: _Decode, t: float) -> None:
        if d.n == 0 and d.n_incoming == 0:
            d.removed = True
            d.version += 1
            d.log.add(t, 0, 0.0)
            self._dc.pop(d.id, None)

    def _complete(self, r: _Req, d: _Decode, t: float) -> None:
        first = r.first if r.first is not None else t
        itl = (t - first) / (r.out - 1) if r.out > 1 else first - r.join
        pf = r.pf
        assert pf is not None
        self._records.append(
            RequestRecord(
                id=r.id,
                arrival_s=r.arrival,
                prompt_tokens=r.prompt,
                output_tokens=r.out,
                ttft_s=first - r.arrival,
                itl_s=itl,
                e2e_s=t - r.arrival,
                prefill_wait_s=r.pf_start - r.arrival,
                prefill_s=r.pf_end - r.pf_start,
                decode_wait_s=r.kv_start - r.pf_end,
                kv_transfer_s=r.kv_s,
                prefill_id=pf.id,
                decode_id=d.id,
            )
        )
