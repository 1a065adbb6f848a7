"""Read a target's scaling signals from the Prometheus HTTP API.

:class:`PrometheusSignals` turns one :class:`~topo_sched.scaling.config.Target` into one
:class:`~topo_sched.scaling.signals.TargetSignals` per tick, with the PromQL from
:mod:`topo_sched.metrics.presets`:

- each signal is one instant query evaluated at ``now`` (``time=`` parameter);
- an empty answer is a missing signal (``None``); ``NaN`` (a quantile over zero traffic) is
  kept as a NaN :class:`Sample`: the policy decides what it means;
- ``age_seconds`` is ``time() - timestamp(newest raw sample)`` over the series the query reads
  (for histograms their ``_count`` series), asked in a second query; an age Prometheus cannot
  give while the value exists (samples older than its lookback) is ``inf``: stale, hold;
- ``queue``, ``running`` and ``kv_usage`` come back one series per role label value and
  become :class:`RoleSignals` keyed by role name;
- anything that stops the answer (connection refused, DNS, timeout, HTTP error, a bad
  override query, a body that is not Prometheus JSON) becomes
  ``TargetSignals(source_error=...)`` naming the URL and what happened. ``read`` never raises.

Concurrency: synchronous and not thread-safe. One instance owns one ``requests`` session
(inside ``PrometheusConnect``) and is meant to be called from the autoscaler's controller
thread only, one target after another. Requests are not retried (the next tick is the
retry) and each has ``timeout_s``; the first transport failure ends the read, so a dead
Prometheus costs at most one timeout per target per tick.
"""

from __future__ import annotations

import ast
import json
import math
import re
import time
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from topo_sched.metrics.presets import LATENCY_SIGNALS, SignalQuery, build_signal_queries
from topo_sched.scaling.config import Target
from topo_sched.scaling.signals import RoleSignals, Sample, TargetSignals


class _SourceError(Exception):
    """The metrics source could not answer; the message is for humans."""


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\"\)]+)")


def _transport_reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return "timed out"
    m = _ERRNO.search(text)
    if m:
        return m.group(1).strip()
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "host name not found"
    return text[:300]


def _http_reason(exc: PrometheusApiClientException) -> str:
    """``HTTP Status Code 400 (b'{"status":"error",...}')`` -> ``HTTP 400: bad_data: ...``."""
    text = str(exc)
    m = re.match(r"HTTP Status Code (\d+) \((.*)\)$", text, re.S)
    if not m:
        return text[:300]
    status, body_repr = m.group(1), m.group(2)
    try:
        body = ast.literal_eval(body_repr)
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        data = json.loads(body)
        detail = f"{data.get('errorType', 'error')}: {data.get('error', '')}".strip()
    except (ValueError, SyntaxError, TypeError, AttributeError):
        detail = str(body_repr)[:200]
    return f"HTTP {status}: {detail}"


def _points(result: Any) -> list[tuple[dict[str, str], float]]:
    """An instant query's ``data.result`` as (labels, value); a scalar is one unlabelled."""
    if (
        isinstance(result, list)
        and len(result) == 2
        and not isinstance(result[0], dict)
        and isinstance(result[1], str)
    ):
        return [({}, float(result[1]))]
    if not isinstance(result, list):
        raise ValueError(f"unexpected result {result!r:.100}")
    out = []
    for item in result:
        if "value" not in item:
            raise ValueError("the query returns a range vector; it must be an instant vector")
        out.append((dict(item.get("metric", {})), float(item["value"][1])))
    return out


def _combine(signal: str, values: list[float]) -> float:
    """Several series for a one-series signal: latencies take the worst, the rest add up."""
    if len(values) == 1:
        return values[0]
    if signal in LATENCY_SIGNALS:
        return max(values)
    return sum(values)


class PrometheusSignals:
    """Signals for autoscaler targets from one Prometheus server (see the module docstring)."""

    def __init__(self, url: str, *, timeout_s: float = 5.0, disable_ssl: bool = False) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._init_error: str | None = None
        self._client: PrometheusConnect | None = None
        try:
            self._client = PrometheusConnect(
                url=self.url,
                disable_ssl=disable_ssl,
                retry=Retry(total=0, read=False),  # no retries: the next tick is the retry
                timeout=timeout_s,
            )
        except Exception as e:  # a malformed URL must surface from read(), not here
            self._init_error = f"cannot use the URL: {e}"

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> PrometheusSignals:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- queries ---------------------------------------------------------------------------

    def _query(self, signal: str, promql: str, at: float) -> list[tuple[dict[str, str], float]]:
        where = f"Prometheus at {self.url}"
        if self._client is None:
            raise _SourceError(f"{where}: {self._init_error}")
        try:
            result = self._client.custom_query(promql, params={"time": f"{at:.3f}"})
        except PrometheusApiClientException as e:
            raise _SourceError(f"{where}: {signal} query failed: {_http_reason(e)}") from None
        except requests.JSONDecodeError as e:  # a 200 that is not JSON: not Prometheus
            raise _SourceError(
                f"{where}: {signal} query: answer is not a Prometheus API response ({e})"
            ) from None
        except (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ) as e:
            raise _SourceError(f"{where}: invalid URL ({e})") from None
        except requests.RequestException as e:
            reason = _transport_reason(e)
            if reason == "timed out":
                reason = f"no answer within {self.timeout_s:g}s (timed out)"
            raise _SourceError(f"{where} unreachable ({signal} query): {reason}") from None
        except (ValueError, KeyError, TypeError) as e:  # a 200 that is not Prometheus JSON
            raise _SourceError(
                f"{where}: {signal} query: answer is not a Prometheus API response ({e})"
            ) from None
        try:
            return _points(result)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise _SourceError(f"{where}: {signal} query: {e}") from None

    def _ages(
        self, spec: SignalQuery, at: float, role_label: str
    ) -> dict[str | None, float] | None:
        """Age per role (key None for one-series signals); None when no age query exists."""
        if spec.age_query is None:
            return None
        ages: dict[str | None, float] = {}
        for labels, value in self._query(f"{spec.signal} age", spec.age_query, at):
            key = labels.get(role_label, "") if spec.by_role else None
            if math.isnan(value):
                continue
            ages[key] = min(value, ages.get(key, math.inf))
        return ages

    def read(self, target: Target, now: float | None = None) -> TargetSignals:
        """All signals of one target, evaluated at ``now`` (default: the current time)."""
        at = time.time() if now is None else float(now)
        cfg = target.metrics
        try:
            specs = build_signal_queries(
                cfg,
                target.slo.percentile,
                prefill_role=target.prefill_role,
                decode_role=target.decode_role,
                roles=list(target.roles),
            )
            scalars: dict[str, Sample | None] = {}
            per_role: dict[str, dict[str, Sample]] = {}
            for signal, spec in specs.items():
                points = self._query(signal, spec.query, at)
                if not points:
                    if not spec.by_role:
                        scalars[signal] = None
                    continue
                ages = self._ages(spec, at, cfg.role_label)
                if spec.by_role:
                    grouped: dict[str, list[float]] = {}
                    for labels, value in points:
                        role = labels.get(cfg.role_label, "")
                        if role:
                            grouped.setdefault(role, []).append(value)
                    for role, values in grouped.items():
                        value = max(values) if signal == "kv_usage" else sum(values)
                        age = 0.0 if ages is None else ages.get(role, math.inf)
                        per_role.setdefault(role, {})[signal] = Sample(value, age)
                else:
                    value = _combine(signal, [v for _, v in points])
                    age = 0.0 if ages is None else ages.get(None, math.inf)
                    scalars[signal] = Sample(value, age)
        except _SourceError as e:
            return TargetSignals(source_error=str(e))
        except Exception as e:  # never raise to the controller
            return TargetSignals(
                source_error=f"Prometheus at {self.url}: unexpected {type(e).__name__}: {e}"
            )
        return TargetSignals(
            request_rate=scalars.get("request_rate"),
            prompt_tokens_rate=scalars.get("prompt_tokens_rate"),
            generation_tokens_rate=scalars.get("generation_tokens_rate"),
            ttft=scalars.get("ttft"),
            itl=scalars.get("itl"),
            roles={role: RoleSignals(**signals) for role, signals in sorted(per_role.items())},
        )
