"""What the scaling policy reads and what it answers: plain frozen data, no I/O.

The Prometheus adapter (``topo_sched.metrics.prometheus``) fills a :class:`TargetSignals`
per target per tick; the simulator fills the same from its model. The policy returns a
:class:`Decision`; the actuator applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One signal's value and how old its newest data point is."""

    value: float
    age_seconds: float = 0.0

    @property
    def is_nan(self) -> bool:
        return math.isnan(self.value) or math.isinf(self.value)


@dataclass(frozen=True)
class RoleSignals:
    queue: Sample | None = None  # requests waiting
    running: Sample | None = None  # sequences being served (decode batch)
    kv_usage: Sample | None = None  # 0..1


@dataclass(frozen=True)
class TargetSignals:
    """One target's signals at one tick. None = the series was missing."""

    request_rate: Sample | None = None  # requests/s
    prompt_tokens_rate: Sample | None = None  # tokens/s
    generation_tokens_rate: Sample | None = None  # tokens/s
    ttft: Sample | None = None  # seconds, at the SLO percentile
    itl: Sample | None = None  # seconds, at the SLO percentile
    roles: dict[str, RoleSignals] = field(default_factory=dict)
    #: Set when the metrics source could not be asked at all (e.g. Prometheus unreachable).
    source_error: str | None = None


@dataclass(frozen=True)
class RoleReplicas:
    desired: int  # spec replicas now
    ready: int  # ready replicas (status)


@dataclass(frozen=True)
class Decision:
    name: str  # namespace/rbg
    current: dict[str, int]
    desired: dict[str, int]
    action: str  # "scale" | "hold"
    reason: str
    #: Machine-readable reason code (bounded set) for metrics: demand, slo, ratio, window,
    #: rate-limit, min, max, steady, stale, missing, nan, unreachable, rolling-out, ...
    code: str = "steady"
    units_current: float | None = None
    units_desired: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "current": dict(self.current),
            "desired": dict(self.desired),
            "action": self.action,
            "reason": self.reason,
            "code": self.code,
        }
