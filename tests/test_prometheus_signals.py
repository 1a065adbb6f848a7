"""PrometheusSignals and the metric presets against a real Prometheus.

One Prometheus (module scope) serves every scenario; scenarios are told apart by their
``rbg`` label, which is also what the targets' selectors isolate. The histories end ~10
minutes before the real current time and every read passes ``now`` inside them.
"""

from __future__ import annotations

import math
import socket
import time

import pytest

from tests.support.prometheus_server import (
    SGLANG,
    VLLM,
    History,
    PrometheusServer,
    history_start,
    prometheus_factory,  # noqa: F401  (fixture)
    quantile_bucket_counts,
    sglang_history,
    vllm_history,
)
from topo_sched.metrics.presets import (
    PRESET_TEMPLATES,
    build_queries,
    build_signal_queries,
    series_selectors,
)
from topo_sched.metrics.prometheus import PrometheusSignals
from topo_sched.scaling.config import SIGNALS, MetricsCfg, Preset, Target

MINUTES = 30
STEP = 15.0
START = history_start(MINUTES, ended_ago_s=600, step_s=STEP)
END = START + MINUTES * 60
RAMP_AT = 15 * 60  # seconds into the history
LABELS = {"namespace": "llm"}


def _ramp(before: float, after: float):
    return lambda t: before if t < RAMP_AT else after


def _scenarios() -> History:
    h = History()
    h.merge(
        # the main SGLang RBG: demand doubles half way, 2 prefill pods and 1 decode pod
        sglang_history(
            START,
            MINUTES,
            STEP,
            rps=_ramp(4.0, 8.0),
            prompt_tokens_per_req=1000,
            generation_tokens_per_req=200,
            ttft=_ramp(0.85, 1.7),
            itl=0.033,
            queue={"prefill": _ramp(2.0, 6.0), "decode": 1.0},
            running={"prefill": 3.0, "decode": 40.0},
            kv_usage={"prefill": 0.2, "decode": 0.7},
            labels={**LABELS, "rbg": "chat"},
            replicas={"prefill": 2, "decode": 1},
        ),
        # a neighbour in the same namespace with very different numbers
        sglang_history(
            START,
            MINUTES,
            STEP,
            rps=20.0,
            ttft_p90=6.0,  # the brief's spelling, same as ttft= at quantile 0.9
            itl_p90=0.2,
            queue=50.0,
            labels={**LABELS, "rbg": "other"},
        ),
        vllm_history(
            START,
            MINUTES,
            STEP,
            rps=2.0,
            prompt_tokens_per_req=3000,
            generation_tokens_per_req=300,
            ttft=1.7,
            itl=0.045,
            queue={"prefill": 5.0, "decode": 0.0},
            running={"prefill": 2.0, "decode": 25.0},
            kv_usage={"prefill": 0.3, "decode": 0.8},
            labels={**LABELS, "rbg": "vchat"},
        ),
        # older releases' names (ITL, and vLLM's KV usage)
        sglang_history(
            START,
            MINUTES,
            STEP,
            rps=3.0,
            ttft=0.5,
            itl=0.025,
            legacy=True,
            labels={**LABELS, "rbg": "old-sglang"},
        ),
        vllm_history(
            START,
            MINUTES,
            STEP,
            rps=3.0,
            ttft=0.5,
            itl=0.06,
            kv_usage=0.65,
            legacy=True,
            labels={**LABELS, "rbg": "old-vllm"},
        ),
        # traffic stops half way: rates fall to 0, quantiles become NaN
        sglang_history(
            START,
            MINUTES,
            STEP,
            rps=_ramp(4.0, 0.0),
            ttft=0.85,
            itl=0.03,
            labels={**LABELS, "rbg": "idle"},
        ),
        # the TTFT histogram and queue gauge are not exported
        sglang_history(
            START,
            MINUTES,
            STEP,
            rps=4.0,
            ttft=0.85,
            itl=0.03,
            omit={"ttft", "queue"},
            labels={**LABELS, "rbg": "partial"},
        ),
    )
    return h


@pytest.fixture(scope="module")
def prom(prometheus_factory) -> PrometheusServer:  # noqa: F811
    return prometheus_factory(_scenarios())


def _target(rbg: str, preset: str = "sglang", **metrics) -> Target:
    return Target.model_validate(
        {
            "rbg": f"llm/{rbg}",
            "roles": {"prefill": 2, "decode": 1},
            "slo": {"ttftSeconds": 1.0, "itlSeconds": 0.05, "percentile": 0.9},
            "metrics": {"preset": preset, "selector": f'namespace="llm",rbg="{rbg}"', **metrics},
        }
    )


def _bucket_width(buckets: tuple[float, ...], value: float) -> float:
    for lo, hi in zip((0.0, *buckets), buckets, strict=False):
        if lo < value <= hi:
            return hi - lo
    raise AssertionError(f"{value} outside the buckets")


def _close(sample, expected: float, rel: float = 0.05) -> None:
    assert sample is not None, "signal missing"
    assert sample.value == pytest.approx(expected, rel=rel), (sample, expected)


# --- harness sanity (pure) -----------------------------------------------------------------


def test_quantile_bucket_counts_reproduce_the_target() -> None:
    bounds = SGLANG.ttft_buckets
    for target in (0.15, 0.5, 0.85, 1.0, 3.3, 77.0):
        for q in (0.5, 0.9, 0.99):
            counts = quantile_bucket_counts(bounds, 100.0, target, q)
            assert sum(counts) == pytest.approx(100.0)
            assert min(counts) >= 0
            # histogram_quantile's interpolation, done by hand
            rank, acc, lo = q * 100.0, 0.0, 0.0
            for hi, c in zip((*bounds, math.inf), counts, strict=True):
                if acc + c >= rank and c > 0:
                    got = lo + (hi - lo) * (rank - acc) / c
                    break
                acc, lo = acc + c, hi
            assert got == pytest.approx(target), (target, q)


def test_history_renders_openmetrics_for_promtool() -> None:
    h = sglang_history(START, 1, STEP, rps=1.0, ttft=0.5, itl=0.02, labels={"rbg": "x"})
    text = h.to_openmetrics()
    assert text.endswith("# EOF\n")
    assert "# TYPE sglang:num_requests counter" in text
    assert 'role="decode",le="+Inf"} ' in text
    assert h.start == START and h.end == START + 60


# --- presets (pure) ------------------------------------------------------------------------


def test_every_preset_covers_every_signal() -> None:
    for preset in (Preset.SGLANG, Preset.VLLM, Preset.DYNAMO):
        assert set(PRESET_TEMPLATES[preset]) == set(SIGNALS), preset


def test_empty_selector_and_overrides_fill_cleanly() -> None:
    cfg = MetricsCfg(
        preset="vllm",
        selector="",
        queries={"ttft": "histogram_quantile({quantile}, sum by (le) (x_bucket{{selector}}))"},
    )
    q = build_queries(cfg, 0.95)
    assert q["ttft"] == "histogram_quantile(0.95, sum by (le) (x_bucket{}))"
    assert q["request_rate"] == "sum(rate(vllm:request_success_total{}[2m]))"
    assert q["queue"] == 'sum by (role) (vllm:num_requests_waiting{role!=""})'
    assert "{selector}" not in "".join(q.values())
    braced = build_queries(MetricsCfg(selector='{a="1",}'), 0.9, prefill_role="p")
    assert braced["request_rate"] == 'sum(rate(sglang:num_requests_total{a="1",role="p"}[2m]))'


def test_age_selectors_use_histogram_count_series() -> None:
    query = 'histogram_quantile(0.9, sum by (le) (rate(h_bucket{a="1",le="2"}[1m])))'
    assert series_selectors(query) == ['h_count{a="1"}']
    queries = {"prompt_tokens_rate": "vector(5)", "ttft": "vector(1)", "itl": "vector(0.1)"}
    custom = build_signal_queries(MetricsCfg(preset="custom", queries=queries), 0.9)
    assert custom["ttft"].age_query is None and set(custom) == {"prompt_tokens_rate", "ttft", "itl"}


# --- against Prometheus --------------------------------------------------------------------


def test_every_preset_query_is_valid_promql(prom: PrometheusServer) -> None:
    for preset in ("sglang", "vllm", "dynamo"):
        for selector in ("", 'namespace="llm",rbg="chat"'):
            for window in ("2m", "10m"):
                cfg = MetricsCfg(preset=preset, selector=selector, window=window)
                specs = build_signal_queries(
                    cfg, 0.9, prefill_role="prefill", decode_role="decode", roles=["a", "b"]
                )
                for spec in specs.values():
                    for q in (spec.query, spec.age_query):
                        body = prom.query(q, END)
                        assert body["status"] == "success", (preset, q, body)


def test_sglang_signals(prom: PrometheusServer) -> None:
    sig = PrometheusSignals(prom.url)
    t = _target("chat")

    early = sig.read(t, now=START + RAMP_AT - 120)
    assert early.source_error is None
    _close(early.request_rate, 4.0)  # counted on prefill only, not prefill + decode
    _close(early.prompt_tokens_rate, 4.0 * 1000)
    _close(early.generation_tokens_rate, 4.0 * 200)
    assert abs(early.ttft.value - 0.85) <= _bucket_width(SGLANG.ttft_buckets, 0.85)
    assert abs(early.itl.value - 0.033) <= _bucket_width(SGLANG.itl_buckets, 0.033)
    assert early.roles["prefill"].queue.value == pytest.approx(2.0)  # 2 pods, summed
    assert early.roles["decode"].queue.value == pytest.approx(1.0)

    late = sig.read(t, now=END - 60)
    _close(late.request_rate, 8.0)
    _close(late.prompt_tokens_rate, 8000.0)
    assert abs(late.ttft.value - 1.7) <= _bucket_width(SGLANG.ttft_buckets, 1.7)
    assert set(late.roles) == {"prefill", "decode"}
    assert late.roles["prefill"].queue.value == pytest.approx(6.0)
    assert late.roles["prefill"].running.value == pytest.approx(3.0)
    assert late.roles["decode"].running.value == pytest.approx(40.0)
    assert late.roles["prefill"].kv_usage.value == pytest.approx(0.2)  # averaged, not summed
    assert late.roles["decode"].kv_usage.value == pytest.approx(0.7)
    for s in (late.request_rate, late.ttft, late.itl, late.roles["decode"].running):
        assert 0.0 <= s.age_seconds < STEP


def test_vllm_signals(prom: PrometheusServer) -> None:
    s = PrometheusSignals(prom.url).read(_target("vchat", "vllm"), now=END - 60)
    assert s.source_error is None
    _close(s.request_rate, 2.0)
    _close(s.prompt_tokens_rate, 6000.0)
    _close(s.generation_tokens_rate, 600.0)
    assert abs(s.ttft.value - 1.7) <= _bucket_width(VLLM.ttft_buckets, 1.7)
    assert abs(s.itl.value - 0.045) <= _bucket_width(VLLM.itl_buckets, 0.045)
    assert s.roles["prefill"].queue.value == pytest.approx(5.0)
    assert s.roles["decode"].running.value == pytest.approx(25.0)
    assert s.roles["decode"].kv_usage.value == pytest.approx(0.8)


@pytest.mark.parametrize(("rbg", "preset", "itl"), [("old-sglang", "sglang", 0.025),
                                                    ("old-vllm", "vllm", 0.06)])  # fmt: skip
def test_older_metric_names(prom: PrometheusServer, rbg: str, preset: str, itl: float) -> None:
    s = PrometheusSignals(prom.url).read(_target(rbg, preset), now=END - 60)
    assert s.itl is not None and s.itl.value == pytest.approx(itl, abs=0.01)
    assert s.roles["decode"].kv_usage is not None


def test_custom_query_override_wins(prom: PrometheusServer) -> None:
    # the prefill side's TTFT (half the decode side's) instead of the preset's decode side
    prefill_ttft = (
        "histogram_quantile({quantile}, sum by (le) "
        "(rate(sglang:time_to_first_token_seconds_bucket{{prefill_selector}}[{window}])))"
    )
    t = _target("chat", queries={"ttft": prefill_ttft, "request_rate": "vector(42)"})
    s = PrometheusSignals(prom.url).read(t, now=END - 60)
    assert abs(s.ttft.value - 0.85) <= _bucket_width(SGLANG.ttft_buckets, 0.85)
    assert s.ttft.age_seconds < STEP
    assert s.request_rate.value == 42.0 and s.request_rate.age_seconds == 0.0  # no series
    _close(s.prompt_tokens_rate, 8000.0)  # the rest stays on the preset


def test_selector_isolates_one_rbg(prom: PrometheusServer) -> None:
    sig = PrometheusSignals(prom.url)
    other = sig.read(_target("other"), now=END - 60)
    chat = sig.read(_target("chat"), now=END - 60)
    _close(other.request_rate, 20.0)
    assert abs(other.ttft.value - 6.0) <= _bucket_width(SGLANG.ttft_buckets, 6.0)
    _close(chat.request_rate, 8.0)
    assert other.roles["prefill"].queue.value == pytest.approx(50.0)
    assert chat.roles["prefill"].queue.value == pytest.approx(6.0)
    # and without a selector every RBG's series add up
    everything = sig.read(_target("chat", selector=""), now=END - 60)
    assert everything.request_rate.value > 30.0


def test_missing_series_are_none(prom: PrometheusServer) -> None:
    s = PrometheusSignals(prom.url).read(_target("partial"), now=END - 60)
    assert s.source_error is None
    assert s.ttft is None
    assert s.itl is not None
    assert s.roles["prefill"].queue is None and s.roles["prefill"].running is not None
    nothing = PrometheusSignals(prom.url).read(_target("no-such-rbg"), now=END - 60)
    assert nothing.source_error is None and nothing.request_rate is None and nothing.roles == {}


def test_zero_traffic_gives_nan_latency(prom: PrometheusServer) -> None:
    s = PrometheusSignals(prom.url).read(_target("idle"), now=END - 60)
    assert s.request_rate.value == 0.0
    assert s.ttft is not None and s.ttft.is_nan
    assert s.itl is not None and s.itl.is_nan
    assert s.ttft.age_seconds < STEP  # the counters are fresh: zero traffic is not staleness


def test_stale_series_report_their_age(prom: PrometheusServer) -> None:
    sig = PrometheusSignals(prom.url)
    # history ended 200 s before "now": a 5m window still has a rate, ages say 200 s
    s = sig.read(_target("chat", window="5m"), now=END + 200)
    assert s.request_rate is not None and s.request_rate.age_seconds == pytest.approx(200, abs=1)
    assert s.ttft.age_seconds == pytest.approx(200, abs=1)
    assert s.roles["decode"].running.age_seconds == pytest.approx(200, abs=1)
    # 400 s: past Prometheus' 5 min lookback; a 10m window still answers, and so does the age
    s = sig.read(_target("chat", window="10m"), now=END + 400)
    assert s.request_rate is not None
    assert s.request_rate.age_seconds == pytest.approx(400, abs=STEP)
    assert s.roles == {}  # gauges are past the lookback: missing
    # with the default 2m window the rates are simply gone
    s = sig.read(_target("chat"), now=END + 200)
    assert s.request_rate is None and s.roles["decode"].running.age_seconds > 120


def test_prometheus_stopped_mid_run(prometheus_factory) -> None:  # noqa: F811
    h = sglang_history(END - 600, 10, STEP, rps=1.0, ttft=0.5, itl=0.02,
                       labels={**LABELS, "rbg": "chat"})  # fmt: skip
    server = prometheus_factory(h)
    sig = PrometheusSignals(server.url)
    assert sig.read(_target("chat"), now=END - 60).source_error is None
    server.stop()
    s = sig.read(_target("chat"), now=END - 60)
    assert s.source_error is not None and server.url in s.source_error
    assert "refused" in s.source_error.lower()
    assert s.request_rate is None and s.roles == {}


def test_unreachable_and_bad_urls() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    for url, words in (
        (f"http://127.0.0.1:{port}", ["refused"]),
        ("not a url", ["invalid url"]),
        ("ftp://127.0.0.1:9090", ["invalid url"]),
        ("http://prometheus.invalid:9090", ["not known", "resolution"]),
    ):
        s = PrometheusSignals(url, timeout_s=2).read(_target("chat"))
        assert s.source_error is not None and url in s.source_error, s.source_error
        assert any(w in s.source_error.lower() for w in words), s.source_error


def test_hanging_prometheus_times_out() -> None:
    with socket.socket() as sock:  # accepts connections (kernel backlog), never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        t0 = time.monotonic()
        s = PrometheusSignals(url, timeout_s=0.3).read(_target("chat"))
        took = time.monotonic() - t0
    assert s.source_error is not None and url in s.source_error
    assert "timed out" in s.source_error
    assert took < 2.0  # the first failure ends the read: one timeout, not sixteen


def test_http_errors_become_source_errors(prom: PrometheusServer) -> None:
    bad = PrometheusSignals(prom.url).read(_target("chat", queries={"ttft": "sum(("}), END - 60)
    assert bad.source_error is not None and prom.url in bad.source_error
    assert "ttft" in bad.source_error and "400" in bad.source_error
    assert "parse error" in bad.source_error
    wrong_path = PrometheusSignals(prom.url + "/nope").read(_target("chat"), now=END - 60)
    assert wrong_path.source_error is not None and "HTTP 404" in wrong_path.source_error
