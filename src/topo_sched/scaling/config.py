"""Autoscaler configuration: pydantic models for the YAML file ``--config`` names.

Keys are camelCase as in Kubernetes objects (``ttftSeconds``, ``stabilizationWindowSeconds``).
A config error names the target and the field: ``targets[0] (llm/demo): slo.ttftSeconds: ...``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from topo_sched.yamlfile import read_yaml


class ScalingConfigError(ValueError):
    """The autoscaler configuration is unreadable or invalid."""


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Mode(StrEnum):
    STRICT = "strict"  # replicas are exactly units x weights
    BAND = "band"  # prefill-per-decode ratio kept inside [band.min, band.max]


class Band(_Cfg):
    min: float = Field(gt=0)
    max: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Band:
        if self.max < self.min:
            raise ValueError("band.max must be >= band.min")
        return self


class Units(_Cfg):
    min: int = Field(1, ge=0)
    max: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Units:
        if self.max < self.min:
            raise ValueError("units.max must be >= units.min")
        return self


class Slo(_Cfg):
    percentile: float = Field(0.9, gt=0, lt=1)
    ttft_seconds: float = Field(alias="ttftSeconds", gt=0)
    itl_seconds: float = Field(alias="itlSeconds", gt=0)


class Preset(StrEnum):
    SGLANG = "sglang"
    VLLM = "vllm"
    DYNAMO = "dynamo"
    CUSTOM = "custom"


#: Signals the autoscaler reads; a preset gives PromQL for each, ``queries`` overrides any.
SIGNALS = (
    "request_rate",
    "prompt_tokens_rate",
    "generation_tokens_rate",
    "ttft",
    "itl",
    "queue",
    "running",
    "kv_usage",
)


class MetricsCfg(_Cfg):
    preset: Preset = Preset.SGLANG
    #: Label matchers added to every query, e.g. 'namespace="llm",rbg="demo"'.
    selector: str = ""
    #: The series label whose value is the role name.
    role_label: str = Field("role", alias="roleLabel")
    #: Range for rates and quantiles.
    window: str = "2m"
    #: PromQL per signal; placeholders {selector}, {window}, {quantile}, {role_selector}.
    queries: dict[str, str] = Field(default_factory=dict)
    #: A series older than this is stale: the target holds.
    max_age_seconds: float = Field(120.0, alias="maxAgeSeconds", gt=0)

    @field_validator("queries")
    @classmethod
    def _known_signals(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(SIGNALS))
        if unknown:
            raise ValueError(f"unknown signal(s) {unknown}; known: {list(SIGNALS)}")
        return v

    @model_validator(mode="after")
    def _custom_needs_queries(self) -> MetricsCfg:
        if self.preset is Preset.CUSTOM:
            missing = [s for s in ("prompt_tokens_rate", "ttft", "itl") if s not in self.queries]
            if missing:
                raise ValueError(f"preset custom needs queries for {missing}")
        return self


class Capacity(_Cfg):
    """What one replica sustains at the SLO."""

    prefill_tokens_per_second: float | None = Field(None, alias="prefillTokensPerSecond", gt=0)
    decode_sequences: float | None = Field(None, alias="decodeSequences", gt=0)
    #: Engine profile (a `topo-sched profile` JSON path or a bundled name); where a figure above
    #: is not given it is derived from this, or from the bundled measured H100 profile.
    profile: str | None = None
    #: The served model's shape preset, when the profile was measured for another model.
    model: str | None = None
    #: GPUs per prefill / decode replica, for deriving figures from a one-GPU profile.
    prefill_tp: int = Field(1, alias="prefillTensorParallel", ge=1)
    decode_tp: int = Field(1, alias="decodeTensorParallel", ge=1)


class ScalePolicy(_Cfg):
    type: Literal["Units", "Percent"] = "Units"
    value: int = Field(gt=0)
    period_seconds: int = Field(60, alias="periodSeconds", gt=0)


class ScaleRules(_Cfg):
    stabilization_window_seconds: int = Field(0, alias="stabilizationWindowSeconds", ge=0)
    policies: list[ScalePolicy] = Field(default_factory=list)
    #: Of several policies, allow the one permitting the largest (Max) or smallest (Min)
    #: change; Disabled forbids this direction.
    select_policy: Literal["Max", "Min", "Disabled"] = Field("Max", alias="selectPolicy")


class Behavior(_Cfg):
    """HPA ``behavior`` semantics, in ratio units."""

    scale_up: ScaleRules = Field(
        default_factory=lambda: ScaleRules(
            stabilizationWindowSeconds=0,
            policies=[
                ScalePolicy(type="Percent", value=100, periodSeconds=15),
                ScalePolicy(type="Units", value=4, periodSeconds=15),
            ],
        ),
        alias="scaleUp",
    )
    scale_down: ScaleRules = Field(
        default_factory=lambda: ScaleRules(
            stabilizationWindowSeconds=300,
            policies=[ScalePolicy(type="Percent", value=100, periodSeconds=15)],
        ),
        alias="scaleDown",
    )


class Target(_Cfg):
    rbg: str
    #: Role name -> ratio weight (whole numbers in strict mode).
    roles: dict[str, float]
    mode: Mode = Mode.STRICT
    band: Band | None = None
    units: Units = Units()
    slo: Slo
    metrics: MetricsCfg = MetricsCfg()
    capacity: Capacity = Capacity()
    behavior: Behavior = Behavior()
    #: Which role is prefill and which decode; by default the role whose name contains it.
    prefill_role: str | None = Field(None, alias="prefillRole")
    decode_role: str | None = Field(None, alias="decodeRole")

    @field_validator("rbg")
    @classmethod
    def _ns_name(cls, v: str) -> str:
        ns, sep, name = v.partition("/")
        if not sep or not ns or not name or "/" in name:
            raise ValueError(f"must be namespace/name, got {v!r}")
        return v

    @model_validator(mode="after")
    def _roles(self) -> Target:
        if not self.roles:
            raise ValueError("roles: at least one role is needed")
        for role, w in self.roles.items():
            if w <= 0:
                raise ValueError(f"roles.{role}: weight must be > 0")
            if self.mode is Mode.STRICT and w != int(w):
                raise ValueError(f"roles.{role}: strict mode needs whole-number weights")
        if self.mode is Mode.BAND and self.band is None:
            raise ValueError("band: mode band needs band: {min: ..., max: ...}")
        for attr, word in (("prefill_role", "prefill"), ("decode_role", "decode")):
            explicit = getattr(self, attr)
            if explicit is not None and explicit not in self.roles:
                raise ValueError(f"{attr}: {explicit!r} is not one of the roles")
            if explicit is None:
                found = [r for r in self.roles if word in r.lower()]
                if len(found) == 1:
                    object.__setattr__(self, attr, found[0])
        if self.prefill_role is None or self.decode_role is None:
            raise ValueError(
                "roles: cannot tell prefill from decode; name them (prefillRole, decodeRole)"
            )
        return self

    @property
    def namespace(self) -> str:
        return self.rbg.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.rbg.split("/", 1)[1]


class LeaderElection(_Cfg):
    enabled: bool = True
    lease_name: str = Field("topo-sched-autoscaler", alias="leaseName")
    namespace: str = "topo-sched"
    lease_duration_seconds: int = Field(15, alias="leaseDurationSeconds", gt=0)
    renew_deadline_seconds: int = Field(10, alias="renewDeadlineSeconds", gt=0)


class AutoscalerConfig(_Cfg):
    prometheus: str = "http://127.0.0.1:9090"
    interval_seconds: float = Field(30.0, alias="intervalSeconds", gt=0)
    targets: list[Target]
    leader_election: LeaderElection = Field(default_factory=LeaderElection, alias="leaderElection")


def _where(loc: tuple[Any, ...], data: Any) -> str:
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] == "targets" and isinstance(loc[1], int):
        try:
            rbg = data["targets"][loc[1]].get("rbg", "?")
        except (KeyError, IndexError, TypeError, AttributeError):
            rbg = "?"
        head = f"targets[{loc[1]}] ({rbg})"
        rest = ".".join(parts[2:])
        return f"{head}: {rest}" if rest else head
    return ".".join(parts) or "(top level)"


def parse_autoscaler_config(data: Any, *, source: str = "config") -> AutoscalerConfig:
    if not isinstance(data, dict):
        raise ScalingConfigError(f"{source}: expected a mapping at the top level")
    try:
        return AutoscalerConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise ScalingConfigError(f"{source}: {_where(err['loc'], data)}: {msg}") from None


def load_autoscaler_config(path: str | Path) -> AutoscalerConfig:
    return parse_autoscaler_config(read_yaml(path, ScalingConfigError), source=str(path))
