"""PromQL for every autoscaler signal, per engine preset. Pure: strings in, strings out.

A preset is a set of query *templates* written with the same placeholders a user may use in
``metrics.queries`` overrides; :func:`build_queries` fills them:

``{selector}``
    the target's label matchers (``metrics.selector``) without braces; may be empty, so write
    ``name{{selector}}`` (``name{}`` is valid PromQL) or ``name{job="x",{selector}}`` (a
    trailing comma is valid PromQL too).
``{prefill_selector}`` / ``{decode_selector}``
    ``{selector}`` plus ``<roleLabel>="<prefill role>"`` (resp. decode role) when the role is
    known, else just ``{selector}``.
``{role_selector}``
    ``{selector}`` plus ``<roleLabel>=~"<role>|<role>..."`` (the target's roles), or
    ``<roleLabel>!=""`` when the roles are not known.
``{role_label}``
    the label whose value is the role name (``metrics.roleLabel``), for ``by (...)``.
``{window}``, ``{quantile}``
    the range for rates and quantiles (``metrics.window``) and the SLO percentile (0.9).

Shapes (what the adapter expects back): rate signals and latencies are one series (rates in
per-second units, latencies in seconds); ``queue``, ``running`` and ``kv_usage`` are one series
per role, grouped ``by (<roleLabel>)``; ``kv_usage`` is a 0..1 fraction averaged over the
role's pods (a sum of fractions means nothing).

Prefill/decode disaggregation. In PD serving every request passes through a prefill pod *and*
a decode pod, and both engines count it: SGLang's ``TokenizerManager`` and vLLM's stat logger
increment their request and prompt-token counters on each side. Summing over the whole RBG
would double the demand. So the engine presets (sglang, vllm) read requests and prompt tokens
from the prefill role only, and generation tokens, TTFT and ITL from the decode role only
(the decode side's TTFT spans prefill, KV transfer and the first decode step: what the user
sees). Without role names (``prefill_role=None``) they read every series the selector matches.
Dynamo's frontend counts each request once and carries no role, so its request, token and
latency queries ignore roles; its per-role gauges come from the workers.

Metric names are the engines' exporter names, with the older names kept as ``or`` fallbacks
so one preset covers several releases (the quantile of each name is taken on its own before
the ``or``, never a mix of two names' buckets):

sglang (``python/sglang/srt/metrics/collector.py``)
    ``sglang:num_requests_total``, ``sglang:prompt_tokens_total``,
    ``sglang:generation_tokens_total`` (counters); ``sglang:time_to_first_token_seconds``,
    ``sglang:inter_token_latency_seconds`` (histograms; older releases named the latter
    ``sglang:time_per_output_token_seconds``); ``sglang:num_queue_reqs``,
    ``sglang:num_running_reqs``, ``sglang:token_usage`` (gauges).
vllm (``vllm/v1/metrics/loggers.py``)
    ``vllm:request_success_total``, ``vllm:prompt_tokens_total``,
    ``vllm:generation_tokens_total``; ``vllm:time_to_first_token_seconds``,
    ``vllm:inter_token_latency_seconds`` (older releases: ``vllm:time_per_output_token_seconds``
    with the same buckets, emitted side by side while deprecated, vllm PR #24015);
    ``vllm:num_requests_waiting``,
    ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc`` (before 0.9:
    ``vllm:gpu_cache_usage_perc``).
dynamo (``docs/observability/metrics.md``, ``lib/runtime/src/metrics/prometheus_names.rs``)
    frontend: ``dynamo_frontend_requests_total``, ``dynamo_frontend_input_sequence_tokens``
    (histogram, its ``_sum`` is prompt tokens), ``dynamo_frontend_output_tokens_total`` (newer)
    or ``dynamo_frontend_output_sequence_tokens`` (histogram ``_sum``),
    ``dynamo_frontend_time_to_first_token_seconds``,
    ``dynamo_frontend_inter_token_latency_seconds``; workers (per role):
    ``dynamo_component_inflight_requests{dynamo_endpoint="generate"}``,
    ``dynamo_component_kvstats_gpu_cache_usage_percent`` (0..1) and, for the queue, the
    engine gauges the workers pass through (``sglang:num_queue_reqs`` /
    ``vllm:num_requests_waiting``). The frontend's ``dynamo_frontend_queued_requests`` has no
    role, so it cannot say which role is short.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from topo_sched.scaling.config import SIGNALS, MetricsCfg, Preset

#: Signals answered per role (one series per role label value).
ROLE_SIGNALS = ("queue", "running", "kv_usage")
#: Signals that are per-second rates (several series add up).
RATE_SIGNALS = ("request_rate", "prompt_tokens_rate", "generation_tokens_rate")
#: Signals that are latencies in seconds (of several series the worst counts).
LATENCY_SIGNALS = ("ttft", "itl")

#: Prometheus' default ``--query.lookback-delta``: an instant selector sees samples this old.
LOOKBACK_SECONDS = 300.0


# --- template helpers (used only to write the preset tables below) -----------------------


def _rate(name: str, sel: str = "selector") -> str:
    return f"sum(rate({name}{{{{{sel}}}}}[{{window}}]))"


def _sum_rate(name: str, sel: str = "selector") -> str:
    return _rate(f"{name}_sum", sel)


def _quantile(hist: str, sel: str = "selector") -> str:
    return (
        f"histogram_quantile({{quantile}}, sum by (le) "
        f"(rate({hist}_bucket{{{{{sel}}}}}[{{window}}])))"
    )


def _by_role(agg: str, name: str, extra: str = "") -> str:
    return f"{agg} by ({{role_label}}) ({name}{{{extra}{{role_selector}}}})"


def _first(*alternatives: str) -> str:
    """``a or b``: the first alternative that has data (same labels, so left wins)."""
    if len(alternatives) == 1:
        return alternatives[0]
    return " or ".join(f"({a})" for a in alternatives)


PRESET_TEMPLATES: dict[Preset, dict[str, str]] = {
    Preset.SGLANG: {
        "request_rate": _rate("sglang:num_requests_total", "prefill_selector"),
        "prompt_tokens_rate": _rate("sglang:prompt_tokens_total", "prefill_selector"),
        "generation_tokens_rate": _rate("sglang:generation_tokens_total", "decode_selector"),
        "ttft": _quantile("sglang:time_to_first_token_seconds", "decode_selector"),
        "itl": _first(
            _quantile("sglang:inter_token_latency_seconds", "decode_selector"),
            _quantile("sglang:time_per_output_token_seconds", "decode_selector"),
        ),
        "queue": _by_role("sum", "sglang:num_queue_reqs"),
        "running": _by_role("sum", "sglang:num_running_reqs"),
        "kv_usage": _by_role("avg", "sglang:token_usage"),
    },
    Preset.VLLM: {
        "request_rate": _rate("vllm:request_success_total", "prefill_selector"),
        "prompt_tokens_rate": _rate("vllm:prompt_tokens_total", "prefill_selector"),
        "generation_tokens_rate": _rate("vllm:generation_tokens_total", "decode_selector"),
        "ttft": _quantile("vllm:time_to_first_token_seconds", "decode_selector"),
        "itl": _first(
            _quantile("vllm:inter_token_latency_seconds", "decode_selector"),
            _quantile("vllm:time_per_output_token_seconds", "decode_selector"),
        ),
        "queue": _by_role("sum", "vllm:num_requests_waiting"),
        "running": _by_role("sum", "vllm:num_requests_running"),
        "kv_usage": _first(
            _by_role("avg", "vllm:kv_cache_usage_perc"),
            _by_role("avg", "vllm:gpu_cache_usage_perc"),
        ),
    },
    Preset.DYNAMO: {
        "request_rate": _rate("dynamo_frontend_requests_total"),
        "prompt_tokens_rate": _sum_rate("dynamo_frontend_input_sequence_tokens"),
        "generation_tokens_rate": _first(
            _rate("dynamo_frontend_output_tokens_total"),
            _sum_rate("dynamo_frontend_output_sequence_tokens"),
        ),
        "ttft": _quantile("dynamo_frontend_time_to_first_token_seconds"),
        "itl": _quantile("dynamo_frontend_inter_token_latency_seconds"),
        "queue": _first(
            _by_role("sum", "sglang:num_queue_reqs"),
            _by_role("sum", "vllm:num_requests_waiting"),
        ),
        "running": _by_role(
            "sum", "dynamo_component_inflight_requests", extra='dynamo_endpoint="generate",'
        ),
        "kv_usage": _first(
            _by_role("avg", "dynamo_component_kvstats_gpu_cache_usage_percent"),
            _by_role("avg", "sglang:token_usage"),
            _by_role("avg", "vllm:kv_cache_usage_perc"),
        ),
    },
    Preset.CUSTOM: {},
}


# --- filling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignalQuery:
    """One signal's filled PromQL, and the PromQL that says how old its newest sample is."""

    signal: str
    query: str
    #: ``time() - <newest sample timestamp>`` over the series the query reads (grouped by the
    #: role label for role signals); None when no series selector could be found in a custom
    #: query, in which case the adapter reports age 0 (the query owns its freshness).
    age_query: str | None
    by_role: bool
    overridden: bool = False


_PLACEHOLDER = re.compile(
    r"\{(selector|prefill_selector|decode_selector|role_selector|role_label|window|quantile)\}"
)
# A vector selector: optional metric name, then {matchers}. Matchers hold no braces; string
# values with braces in them are not supported (nor used by any preset).
_SELECTOR = re.compile(r"(?<![A-Za-z0-9_:])([A-Za-z_:][A-Za-z0-9_:]*)?\{([^{}]*)\}")
_LE_MATCHER = re.compile(r"\ble\s*(=~|!=|!~|=)\s*\"(?:[^\"\\]|\\.)*\"\s*,?")
_DURATION = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def normalise_selector(selector: str) -> str:
    """``'{a="1", b="2",}'`` -> ``'a="1", b="2"'``: no braces, no stray commas."""
    s = selector.strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    return s.strip().strip(",").strip()


def _join(*parts: str) -> str:
    return ",".join(p for p in parts if p)


def _promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _re2_escape(value: str) -> str:
    return re.sub(r"([.+*?()|\[\]{}^$\\])", r"\\\1", value)


def parse_duration(text: str) -> float | None:
    """Seconds in a Prometheus duration (``90s``, ``2m``, ``1h30m``); None if it is not one."""
    text = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += int(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    return total if pos == len(text) and pos > 0 else None


def fill(
    template: str,
    cfg: MetricsCfg,
    quantile: float,
    *,
    prefill_role: str | None = None,
    decode_role: str | None = None,
    roles: Iterable[str] | None = None,
) -> str:
    """Replace the placeholders in one template (see the module docstring)."""
    base = normalise_selector(cfg.selector)
    label = cfg.role_label
    role_list = sorted(set(roles)) if roles is not None else []
    if role_list:
        alternatives = "|".join(_re2_escape(r) for r in role_list)
        role_matcher = f"{label}=~{_promql_string(alternatives)}"
    else:
        role_matcher = f'{label}!=""'
    values = {
        "selector": base,
        "prefill_selector": _join(base, f"{label}={_promql_string(prefill_role)}")
        if prefill_role
        else base,
        "decode_selector": _join(base, f"{label}={_promql_string(decode_role)}")
        if decode_role
        else base,
        "role_selector": _join(base, role_matcher),
        "role_label": label,
        "window": cfg.window,
        "quantile": repr(float(quantile)),
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def templates_for(cfg: MetricsCfg) -> dict[str, str]:
    """The preset's templates with the config's overrides on top (overrides win)."""
    out = dict(PRESET_TEMPLATES[cfg.preset])
    out.update(cfg.queries)
    return {s: out[s] for s in SIGNALS if s in out}


def build_queries(
    metrics_cfg: MetricsCfg,
    quantile: float,
    *,
    prefill_role: str | None = None,
    decode_role: str | None = None,
    roles: Iterable[str] | None = None,
) -> dict[str, str]:
    """Signal -> ready-to-run PromQL. A custom preset yields only the signals it was given."""
    role_names = list(roles) if roles is not None else None
    return {
        signal: fill(
            template,
            metrics_cfg,
            quantile,
            prefill_role=prefill_role,
            decode_role=decode_role,
            roles=role_names,
        )
        for signal, template in templates_for(metrics_cfg).items()
    }


def series_selectors(promql: str) -> list[str]:
    """The vector selectors a query reads, for staleness; histogram buckets become ``_count``.

    ``rate(x_bucket{a="1",le="0.5"}[2m])`` -> ``['x_count{a="1"}']``: one series per histogram
    instead of one per bucket, with the same timestamps.
    """
    out: list[str] = []
    for m in _SELECTOR.finditer(promql):
        name, matchers = m.group(1) or "", m.group(2)
        if name.endswith("_bucket"):
            name = name[: -len("_bucket")] + "_count"
            matchers = _LE_MATCHER.sub("", matchers)
        matchers = normalise_selector(matchers)
        if not name and not matchers:
            continue
        sel = f"{name}{{{matchers}}}"
        if sel not in out:
            out.append(sel)
    return out


def age_query(
    selectors: list[str], *, role_label: str | None, window: str | None = None
) -> str | None:
    """``time() - max(timestamp(...))`` over the selectors; per role when role_label is given.

    An instant selector sees only samples within Prometheus' lookback (5 minutes by default).
    When the window is longer than that, a rate can still answer from older samples, so a
    subquery over the window is added as a fallback (its resolution is its step, ~1/60 of
    the window, which is fine for ages that are past the lookback anyway).
    """
    if not selectors:
        return None
    by = f" by ({role_label}) " if role_label else ""
    newest = " or ".join(f"timestamp({s})" for s in selectors)
    expr = f"time() - max{by}({newest})"
    seconds = parse_duration(window) if window else None
    if seconds is not None and seconds > LOOKBACK_SECONDS:
        step = max(15, math.ceil(seconds / 60))
        older = " or ".join(f"max_over_time(timestamp({s})[{window}:{step}s])" for s in selectors)
        expr = f"({expr}) or (time() - max{by}({older}))"
    return expr


def build_signal_queries(
    metrics_cfg: MetricsCfg,
    quantile: float,
    *,
    prefill_role: str | None = None,
    decode_role: str | None = None,
    roles: Iterable[str] | None = None,
) -> dict[str, SignalQuery]:
    """Like :func:`build_queries`, with the staleness query and the shape of each signal."""
    queries = build_queries(
        metrics_cfg,
        quantile,
        prefill_role=prefill_role,
        decode_role=decode_role,
        roles=roles,
    )
    out: dict[str, SignalQuery] = {}
    for signal, query in queries.items():
        by_role = signal in ROLE_SIGNALS
        out[signal] = SignalQuery(
            signal=signal,
            query=query,
            age_query=age_query(
                series_selectors(query),
                role_label=metrics_cfg.role_label if by_role else None,
                window=metrics_cfg.window,
            ),
            by_role=by_role,
            overridden=signal in metrics_cfg.queries,
        )
    return out


def describe(queries: Mapping[str, str]) -> str:
    """Human-readable listing (for ``--explain`` style output and error messages)."""
    return "\n".join(f"{s}: {q}" for s, q in queries.items())
