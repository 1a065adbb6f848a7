"""A real Prometheus for tests, loaded with synthetic engine metric histories.

How it works: a :class:`History` holds metric families (counters, gauges, histograms with
buckets) as timestamped samples; :meth:`History.to_openmetrics` writes OpenMetrics text
(timestamps in seconds, ending ``# EOF``); ``promtool tsdb create-blocks-from openmetrics``
turns it into TSDB blocks; ``prometheus`` serves them with a config that scrapes nothing.
Nothing is scraped, so queries must be evaluated *inside* the history: pass the evaluation
time (``time=`` of an instant query, ``PrometheusSignals.read(target, now=...)``).

Facts this relies on (checked against Debian's prometheus/promtool 2.42):

- promtool accepts any timestamps and cuts blocks on 2 h boundaries; Prometheus serves them
  at startup. Time retention is measured from the newest block, not from the wall clock, so
  old blocks survive; histories still end shortly before the real current time
  (:func:`history_start`) so that ``now=None`` and humans reading the logs see sane times.
- each series' samples must be in time order (the block writer rejects out-of-order
  samples); families may not repeat in one file, so :class:`History` merges them.
- ``name{}`` and a trailing comma in matchers are valid PromQL (the presets rely on it).
- startup takes well under a second once the blocks exist; ``/-/ready`` says when.

Scenario builders :func:`sglang_history` and :func:`vllm_history` write what the engines
export for a prefill/decode-disaggregated RBG: per pod, with ``namespace``/``rbg``-style
labels (yours), the role label and ``pod``. Both roles count every request and its prompt
tokens (as both real engines do in PD mode); TTFT is observed on both (the prefill side
sees a shorter one), ITL on decode only. Latency histograms use the engines' real default
buckets, and the observations of each step are spread over buckets so that
``histogram_quantile(q, ...)`` over a window of constant target returns the target exactly
(see :func:`quantile_bucket_counts`).

Every rate/latency/gauge argument is a number or a function of ``t``, the seconds since the
history's start (evaluated at the middle of each step for counters and histograms, at the
sample time for gauges). ``rps=0`` gives counters that stop growing and latency histograms
without observations (``histogram_quantile`` -> NaN). ``omit={"ttft", ...}`` leaves out the
metric behind those signals.

Use::

    def test_x(prometheus_factory):
        start = history_start(minutes=30)
        h = sglang_history(start, 30, rps=4, ttft=0.8, itl=0.03,
                           labels={"namespace": "llm", "rbg": "demo"})
        prom = prometheus_factory(h)            # started, ready, stopped at module end
        PrometheusSignals(prom.url).read(target, now=h.end - 30)
        prom.stop()                             # "Prometheus went away mid-run"
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from topo_sched.scaling.config import SIGNALS

Fn = float | Callable[[float], float]
LabelSet = tuple[tuple[str, str], ...]

# --- OpenMetrics history -------------------------------------------------------------------


def _labels_key(labels: Mapping[str, str]) -> LabelSet:
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def _fmt_labels(labels: Iterable[tuple[str, str]]) -> str:
    parts = []
    for k, v in labels:
        v = v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{v}"')
    return "{" + ",".join(parts) + "}" if parts else ""


def _fmt_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _fmt_ts(t: float) -> str:
    return f"{t:.3f}"


def _fmt_le(b: float) -> str:
    return "+Inf" if math.isinf(b) else repr(float(b))


@dataclass
class _Family:
    name: str  # family name (counter: without _total)
    type: str  # counter | gauge | histogram
    help: str
    # scalar families: labels -> [(t, value)]
    points: dict[LabelSet, list[tuple[float, float]]] = field(default_factory=dict)
    # histograms: labels -> (bounds incl. +Inf, [(t, cumulative buckets, count, sum)])
    hist: dict[
        LabelSet, tuple[tuple[float, ...], list[tuple[float, list[float], float, float]]]
    ] = field(default_factory=dict)


class History:
    """Timestamped samples of many metric families; renders OpenMetrics for promtool."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self.start: float = math.inf
        self.end: float = -math.inf

    # -- adding ---------------------------------------------------------------------------

    def _family(self, name: str, type_: str, help_: str) -> _Family:
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = _Family(name, type_, help_)
        elif fam.type != type_:
            raise ValueError(f"{name}: already a {fam.type}, not a {type_}")
        return fam

    def _span(self, ts: Iterable[float]) -> None:
        ts = list(ts)
        if ts:
            self.start = min(self.start, ts[0])
            self.end = max(self.end, ts[-1])

    @staticmethod
    def _check_order(name: str, ts: list[float]) -> None:
        if any(b <= a for a, b in itertools.pairwise(ts)):
            raise ValueError(f"{name}: samples must be in increasing time order")

    def counter(
        self, name: str, labels: Mapping[str, str], points: list[tuple[float, float]]
    ) -> None:
        """``name`` is the sample name, e.g. ``sglang:prompt_tokens_total``."""
        if not name.endswith("_total"):
            raise ValueError(f"{name}: a counter sample name ends with _total")
        self._add_scalar(name[: -len("_total")], "counter", name, labels, points)

    def gauge(
        self, name: str, labels: Mapping[str, str], points: list[tuple[float, float]]
    ) -> None:
        self._add_scalar(name, "gauge", name, labels, points)

    def _add_scalar(self, family, type_, name, labels, points) -> None:
        self._check_order(name, [t for t, _ in points])
        fam = self._family(family, type_, f"synthetic {name}")
        key = _labels_key(labels)
        if key in fam.points:
            raise ValueError(f"{name}{_fmt_labels(key)}: series added twice")
        fam.points[key] = [(float(t), float(v)) for t, v in points]
        self._span(t for t, _ in points)

    def histogram(
        self,
        name: str,
        labels: Mapping[str, str],
        bounds: Iterable[float],
        points: list[tuple[float, list[float], float]],
    ) -> None:
        """``points``: (t, cumulative bucket counts for ``bounds`` + ``+Inf``, sum)."""
        b = tuple(float(x) for x in bounds)
        if not math.isinf(b[-1]):
            b = (*b, math.inf)
        self._check_order(name, [t for t, _, _ in points])
        fam = self._family(name, "histogram", f"synthetic {name}")
        key = _labels_key(labels)
        if key in fam.hist:
            raise ValueError(f"{name}{_fmt_labels(key)}: series added twice")
        rows = []
        for t, cum, total in points:
            if len(cum) != len(b):
                raise ValueError(f"{name}: {len(cum)} bucket counts for {len(b)} buckets")
            rows.append((float(t), [float(c) for c in cum], float(cum[-1]), float(total)))
        fam.hist[key] = (b, rows)
        self._span(t for t, _, _ in points)

    def merge(self, *others: History) -> History:
        """Add the families of ``others`` into this history (series must not collide)."""
        for other in others:
            for fam in other._families.values():
                for key, pts in fam.points.items():
                    name = fam.name + ("_total" if fam.type == "counter" else "")
                    self._add_scalar(fam.name, fam.type, name, dict(key), pts)
                for key, (bounds, rows) in fam.hist.items():
                    self.histogram(fam.name, dict(key), bounds, [(t, c, s) for t, c, _, s in rows])
        return self

    def __add__(self, other: History) -> History:
        return History().merge(self, other)

    def metric_names(self) -> list[str]:
        return sorted(self._families)

    # -- rendering ------------------------------------------------------------------------

    def to_openmetrics(self) -> str:
        out: list[str] = []
        for fam in sorted(self._families.values(), key=lambda f: f.name):
            out.append(f"# HELP {fam.name} {fam.help}")
            out.append(f"# TYPE {fam.name} {fam.type}")
            suffix = "_total" if fam.type == "counter" else ""
            for key, pts in sorted(fam.points.items()):
                lab = _fmt_labels(key)
                for t, v in pts:
                    out.append(f"{fam.name}{suffix}{lab} {_fmt_value(v)} {_fmt_ts(t)}")
            for key, (bounds, rows) in sorted(fam.hist.items()):
                lab_count = _fmt_labels(key)
                bucket_labels = [_fmt_labels((*key, ("le", _fmt_le(b)))) for b in bounds]
                for t, cum, count, total in rows:
                    ts = _fmt_ts(t)
                    for lab, c in zip(bucket_labels, cum, strict=True):
                        out.append(f"{fam.name}_bucket{lab} {_fmt_value(c)} {ts}")
                    out.append(f"{fam.name}_count{lab_count} {_fmt_value(count)} {ts}")
                    out.append(f"{fam.name}_sum{lab_count} {_fmt_value(total)} {ts}")
        out.append("# EOF")
        return "\n".join(out) + "\n"


# --- histogram shaping ---------------------------------------------------------------------


def quantile_bucket_counts(
    bounds: Iterable[float], n: float, target: float, q: float = 0.9
) -> list[float]:
    """Per-bucket (not cumulative) counts of ``n`` observations whose q-quantile, as
    ``histogram_quantile`` interpolates it, is ``target``. Last entry is the ``+Inf`` bucket.

    With the target in bucket (a, b] at fraction x, put (q - x*w)*n at or below a, w*n in
    (a, b] and the rest above b, w = min(q, 1-q); then the rank q*n lands x of the way into
    (a, b]. Limits: a target above the largest finite bound reads as that bound; one inside
    the first bucket reads at least q*first_bound (nothing can sit below 0).
    """
    finite = [float(b) for b in bounds if not math.isinf(float(b))]
    counts = [0.0] * (len(finite) + 1)
    if n <= 0:
        return counts
    i = next((k for k, b in enumerate(finite) if b >= target), None)
    if i is None:
        counts[-1] = n
        return counts
    a = finite[i - 1] if i > 0 else 0.0
    b = finite[i]
    x = min(1.0, max(0.0, (target - a) / (b - a)))
    if i == 0:  # no bucket below: all mass in [0, b] and above
        x = max(x, q)
        inside = q * n / x
        counts[0] = inside
        counts[1] += n - inside
        return counts
    w = min(q, 1.0 - q)
    below = (q - x * w) * n
    inside = w * n
    counts[i - 1] = below
    counts[i] = inside
    counts[i + 1] += n - below - inside
    return counts


def _cumulate(counts: list[float]) -> list[float]:
    out, acc = [], 0.0
    for c in counts:
        acc += c
        out.append(acc)
    return out


# --- engine-shaped scenarios ---------------------------------------------------------------


@dataclass(frozen=True)
class EngineMetrics:
    """One engine's exporter names (sample names) and default buckets."""

    requests: str
    prompt_tokens: str
    generation_tokens: str
    ttft: str
    itl: str
    queue: str
    running: str
    kv_usage: str
    ttft_buckets: tuple[float, ...]
    itl_buckets: tuple[float, ...]
    labels: Mapping[str, str] = field(default_factory=dict)  # engine's own labels
    request_labels: Mapping[str, str] = field(default_factory=dict)  # extra on requests


# The engines' default latency buckets.
# fmt: off
_SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
_SGLANG_ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040,
    0.060, 0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0,
)
_VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
_VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)
# fmt: on

# sglang/srt/metrics/collector.py (TokenizerMetricsCollector, SchedulerMetricsCollector)
SGLANG = EngineMetrics(
    requests="sglang:num_requests_total",
    prompt_tokens="sglang:prompt_tokens_total",
    generation_tokens="sglang:generation_tokens_total",
    ttft="sglang:time_to_first_token_seconds",
    itl="sglang:inter_token_latency_seconds",
    queue="sglang:num_queue_reqs",
    running="sglang:num_running_reqs",
    kv_usage="sglang:token_usage",
    ttft_buckets=_SGLANG_TTFT_BUCKETS,
    itl_buckets=_SGLANG_ITL_BUCKETS,
    labels={"model_name": "demo-model"},
)
#: Older SGLang releases: ITL histogram under its former name.
SGLANG_LEGACY = replace(SGLANG, itl="sglang:time_per_output_token_seconds")

# vllm/v1/metrics/loggers.py (PrometheusStatLogger)
VLLM = EngineMetrics(
    requests="vllm:request_success_total",
    prompt_tokens="vllm:prompt_tokens_total",
    generation_tokens="vllm:generation_tokens_total",
    ttft="vllm:time_to_first_token_seconds",
    itl="vllm:inter_token_latency_seconds",
    queue="vllm:num_requests_waiting",
    running="vllm:num_requests_running",
    kv_usage="vllm:kv_cache_usage_perc",
    ttft_buckets=_VLLM_TTFT_BUCKETS,
    itl_buckets=_VLLM_ITL_BUCKETS,
    labels={"model_name": "demo-model", "engine": "0"},
    request_labels={"finished_reason": "stop"},
)
#: Older vLLM releases: ITL as time_per_output_token, KV usage as gpu_cache_usage_perc.
VLLM_LEGACY = replace(
    VLLM, itl="vllm:time_per_output_token_seconds", kv_usage="vllm:gpu_cache_usage_perc"
)


def _fn(v: Fn) -> Callable[[float], float]:
    if callable(v):
        return v
    c = float(v)
    return lambda _t: c


def _per_role(v: Fn | Mapping[str, Fn] | None, roles: Iterable[str], default: Fn) -> dict:
    if v is None:
        return {r: _fn(default) for r in roles}
    if isinstance(v, Mapping):
        return {r: _fn(v.get(r, default)) for r in roles}
    return {r: _fn(v) for r in roles}


def history_start(minutes: float, *, ended_ago_s: float = 600.0, step_s: float = 15.0) -> float:
    """A start time such that a ``minutes`` history ends ~``ended_ago_s`` before now."""
    end = time.time() - ended_ago_s
    start = end - minutes * 60.0
    return math.floor(start / step_s) * step_s


def engine_history(
    engine: EngineMetrics,
    start: float,
    minutes: float,
    step_s: float = 15.0,
    *,
    rps: Fn,
    ttft: Fn,
    itl: Fn,
    prompt_tokens_per_req: Fn = 1000.0,
    generation_tokens_per_req: Fn = 200.0,
    queue: Fn | Mapping[str, Fn] | None = None,
    running: Fn | Mapping[str, Fn] | None = None,
    kv_usage: Fn | Mapping[str, Fn] | None = None,
    labels: Mapping[str, str] | None = None,
    role_label: str = "role",
    prefill_role: str = "prefill",
    decode_role: str = "decode",
    replicas: Mapping[str, int] | None = None,
    quantile: float = 0.9,
    prefill_ttft_ratio: float = 0.5,
    omit: Iterable[str] = (),
) -> History:
    """One PD-disaggregated RBG's engine metrics (see the module docstring).

    ``ttft``/``itl`` are the wanted ``quantile`` (default p90) values in seconds as the
    decode role observes them; the prefill role observes ``ttft * prefill_ttft_ratio``.
    ``queue``/``running`` are role totals (split evenly over the role's pods), ``kv_usage``
    a 0..1 fraction per pod; each may be one value/function for all roles or a mapping per
    role. ``running`` defaults to Little's law (decode: rps*gen_tokens*itl, prefill:
    rps*prefill ttft), ``queue`` to 0, ``kv_usage`` to 0.5.
    """
    omitted = set(omit)
    unknown = omitted - set(SIGNALS)
    if unknown:
        raise ValueError(f"omit: unknown signals {sorted(unknown)}")
    base = dict(labels or {})
    rps_f, ttft_f, itl_f = _fn(rps), _fn(ttft), _fn(itl)
    ptok_f, gtok_f = _fn(prompt_tokens_per_req), _fn(generation_tokens_per_req)
    roles = [prefill_role, decode_role]
    n_pods = {r: int((replicas or {}).get(r, 1)) for r in roles}
    if running is None:
        running = {
            decode_role: lambda t: rps_f(t) * gtok_f(t) * itl_f(t),
            prefill_role: lambda t: rps_f(t) * ttft_f(t) * prefill_ttft_ratio,
        }
    queue_f = _per_role(queue, roles, 0.0)
    running_f = _per_role(running, roles, 0.0)
    kv_f = _per_role(kv_usage, roles, 0.5)

    steps = round(minutes * 60.0 / step_s)
    times = [start + k * step_s for k in range(steps + 1)]
    hist = History()
    rel = [t - start for t in times]

    for role in roles:
        pods = n_pods[role]
        is_decode = role == decode_role
        # per-step increments for the whole role
        req = [0.0] + [rps_f(r - step_s / 2) * step_s for r in rel[1:]]
        ptok = [0.0] + [rps_f(r - step_s / 2) * step_s * ptok_f(r - step_s / 2) for r in rel[1:]]
        if is_decode:
            gtok = [0.0] + [
                rps_f(r - step_s / 2) * step_s * gtok_f(r - step_s / 2) for r in rel[1:]
            ]
        else:  # the prefill engine samples the first token only
            gtok = list(req)
        scale = 1.0 if is_decode else prefill_ttft_ratio
        ttft_target = [ttft_f(r - step_s / 2) * scale for r in rel]
        itl_target = [itl_f(r - step_s / 2) for r in rel]

        for p in range(pods):
            pod_labels = {**base, role_label: role, "pod": f"{role}-{p}", **engine.labels}

            def cumulative(incs: list[float], pods: int = pods) -> list[tuple[float, float]]:
                acc, out = 0.0, []
                for t, inc in zip(times, incs, strict=True):
                    acc += inc / pods
                    out.append((t, acc))
                return out

            if "request_rate" not in omitted:
                hist.counter(
                    engine.requests, {**pod_labels, **engine.request_labels}, cumulative(req)
                )
            if "prompt_tokens_rate" not in omitted:
                hist.counter(engine.prompt_tokens, pod_labels, cumulative(ptok))
            if "generation_tokens_rate" not in omitted:
                hist.counter(engine.generation_tokens, pod_labels, cumulative(gtok))
            if "ttft" not in omitted:
                hist.histogram(
                    engine.ttft,
                    pod_labels,
                    engine.ttft_buckets,
                    _histogram_points(times, engine.ttft_buckets, req, ttft_target, quantile, pods),
                )
            if is_decode and "itl" not in omitted:
                hist.histogram(
                    engine.itl,
                    pod_labels,
                    engine.itl_buckets,
                    _histogram_points(times, engine.itl_buckets, gtok, itl_target, quantile, pods),
                )
            for signal, name, fns, split in (
                ("queue", engine.queue, queue_f, True),
                ("running", engine.running, running_f, True),
                ("kv_usage", engine.kv_usage, kv_f, False),
            ):
                if signal in omitted:
                    continue
                f = fns[role]
                pts = [(t, f(r) / (pods if split else 1)) for t, r in zip(times, rel, strict=True)]
                hist.gauge(name, pod_labels, pts)
    return hist


def _histogram_points(
    times: list[float],
    bounds: tuple[float, ...],
    counts: list[float],
    targets: list[float],
    q: float,
    pods: int,
) -> list[tuple[float, list[float], float]]:
    acc = [0.0] * (len(bounds) + 1)
    total = 0.0
    out = []
    for t, n, target in zip(times, counts, targets, strict=True):
        per_bucket = quantile_bucket_counts(bounds, n / pods, target, q)
        acc = [a + c for a, c in zip(acc, per_bucket, strict=True)]
        total += target * n / pods
        out.append((t, _cumulate(acc), total))
    return out


def _aliases(kw: dict) -> dict:
    """``ttft_p90=``/``itl_p90=`` are accepted for ``ttft=``/``itl=`` at quantile 0.9."""
    for alias, name in (("ttft_p90", "ttft"), ("itl_p90", "itl")):
        if alias in kw:
            if name in kw:
                raise TypeError(f"give {name} or {alias}, not both")
            kw[name] = kw.pop(alias)
            kw.setdefault("quantile", 0.9)
    return kw


def sglang_history(start: float, minutes: float, step_s: float = 15.0, **kw) -> History:
    """SGLang-named PD history (``legacy=True``: the older ITL histogram name)."""
    legacy = kw.pop("legacy", False)
    engine = SGLANG_LEGACY if legacy else SGLANG
    return engine_history(engine, start, minutes, step_s, **_aliases(kw))


def vllm_history(start: float, minutes: float, step_s: float = 15.0, **kw) -> History:
    """vLLM-named PD history (``legacy=True``: time_per_output_token, gpu_cache_usage)."""
    legacy = kw.pop("legacy", False)
    engine = VLLM_LEGACY if legacy else VLLM
    return engine_history(engine, start, minutes, step_s, **_aliases(kw))


# --- the server ----------------------------------------------------------------------------

_CONFIG = """\
# topo-sched tests: serve backfilled blocks, scrape nothing
global:
  scrape_interval: 15s
  evaluation_interval: 15s
"""


def prometheus_binaries() -> tuple[str, str] | None:
    """(prometheus, promtool) from $PROMETHEUS/$PROMTOOL or PATH; None if either is absent."""
    prom = shutil.which(os.environ.get("PROMETHEUS") or "prometheus")
    tool = shutil.which(os.environ.get("PROMTOOL") or "promtool")
    if not prom or not tool:
        return None
    return prom, tool


def require_prometheus() -> tuple[str, str]:
    found = prometheus_binaries()
    if found is None and os.environ.get("CI"):
        # CI installs Debian's prometheus (.ci/run): a missing binary there is a broken
        # install, not a reason to skip the autoscaler's real-Prometheus tests.
        pytest.fail("prometheus/promtool not found in CI; .ci/run should have installed them")
    if found is None:
        pytest.skip(
            "prometheus and promtool binaries not found (PATH, $PROMETHEUS, $PROMTOOL); "
            "install them, e.g. `apt-get install prometheus`"
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LIVE: set[subprocess.Popen] = set()


@atexit.register
def _kill_leftovers() -> None:  # a crashed test session must not leave servers behind
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()


class PrometheusStartError(RuntimeError):
    pass


class PrometheusServer:
    """One ``prometheus`` process serving a :class:`History` (or raw OpenMetrics text)."""

    def __init__(
        self,
        history: History | str,
        workdir: Path,
        *,
        binaries: tuple[str, str] | None = None,
        startup_timeout_s: float = 30.0,
    ) -> None:
        self.history = history if isinstance(history, History) else None
        self._text = history if isinstance(history, str) else history.to_openmetrics()
        self.workdir = Path(workdir)
        self.binaries = binaries or require_prometheus()
        self.startup_timeout_s = startup_timeout_s
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "prometheus.log"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self, tail: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-tail:])

    def start(self) -> PrometheusServer:
        t0 = time.monotonic()
        prom, tool = self.binaries
        self.workdir.mkdir(parents=True, exist_ok=True)
        om = self.workdir / "history.om"
        om.write_text(self._text)
        (self.workdir / "prometheus.yml").write_text(_CONFIG)
        if self._text.strip() != "# EOF":
            res = subprocess.run(
                [tool, "tsdb", "create-blocks-from", "openmetrics", str(om), str(self.data_dir)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if res.returncode != 0:
                raise PrometheusStartError(
                    f"promtool create-blocks-from failed ({res.returncode}) for {om}:\n"
                    f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
                )
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between bind and listen
            self.port = _free_port()
            if self._launch(prom):
                self.startup_seconds = time.monotonic() - t0
                return self
            last_error = self.logs()
            if "address already in use" not in last_error:
                break
        raise PrometheusStartError(
            f"prometheus did not become ready within {self.startup_timeout_s:g}s "
            f"(log {self.log_path}):\n{last_error}"
        )

    def _launch(self, prom: str) -> bool:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [
                    prom,
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.data_dir}",
                    "--storage.tsdb.retention.time=3650d",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )
        finally:
            log.close()
        _LIVE.add(self.proc)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                _LIVE.discard(self.proc)
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        return False

    def stop(self) -> None:
        """Terminate (then kill) the server; its URL then refuses connections."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _LIVE.discard(proc)

    def query(self, promql: str, at: float | None = None) -> dict:
        """Raw instant query (for debugging and harness checks): the decoded JSON body."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def __enter__(self) -> PrometheusServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def prometheus_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., PrometheusServer]]:
    """``prometheus_factory(history, **kw) -> PrometheusServer`` (started and ready).

    Module-scoped so a module can share one server; every server it started is stopped at
    the end of the module. Skips when the binaries are absent.
    """
    binaries = require_prometheus()
    servers: list[PrometheusServer] = []

    def start(history: History | str, **kw) -> PrometheusServer:
        server = PrometheusServer(
            history, tmp_path_factory.mktemp("prometheus"), binaries=binaries, **kw
        )
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
