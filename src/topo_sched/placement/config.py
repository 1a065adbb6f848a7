"""Placement configuration: cluster-wide defaults (YAML, pydantic) and per-RBG overrides.

Defaults come from ``--config FILE``; an RBG overrides them with ``topo-sched.io/...``
annotations on its pod templates (keys in :mod:`topo_sched.labels`). A bad file is a hard
error naming the field; a bad annotation is a warning for that pod, and the default is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from topo_sched import labels as L
from topo_sched.topology.cluster import DEFAULT_LEVELS, Level, levels_from_labels
from topo_sched.yamlfile import read_yaml


class ConfigError(ValueError):
    """The placement configuration file is unreadable or invalid."""


class Mode(StrEnum):
    PREFERRED = "preferred"
    REQUIRED = "required"


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Weights(_Cfg):
    """Relative weight of each scoring term; 0 turns a term off."""

    intra_node_fit: float = Field(3.0, ge=0)
    pd_proximity: float = Field(2.0, ge=0)
    instance_packing: float = Field(2.0, ge=0)
    best_fit: float = Field(1.0, ge=0)
    stability: float = Field(1.0, ge=0)
    spread: float = Field(0.0, ge=0)


class PackingConfig(_Cfg):
    mode: Mode = Mode.PREFERRED
    #: Level a multi-node leader/worker instance should share: a label key or a kind name.
    level: str = "rack"


class SpreadConfig(_Cfg):
    enabled: bool = False
    level: str = "rack"


class PlacementConfig(_Cfg):
    weights: Weights = Weights()
    intra_node: Mode = Mode.PREFERRED
    instance_packing: PackingConfig = PackingConfig()
    spread: SpreadConfig = SpreadConfig()
    #: Node-label keys, coarse to fine; empty = the built-in defaults (see DESIGN.md).
    levels: list[str] = Field(default_factory=list)
    #: KV-cache bytes per token of the served model, when known cluster-wide.
    kv_bytes_per_token: int | None = Field(None, gt=0)
    #: The KV size at which the proximity weight is taken as configured (128 KiB: an 8B model).
    reference_kv_bytes_per_token: int = Field(131072, gt=0)

    def cluster_levels(self) -> tuple[Level, ...]:
        return levels_from_labels(self.levels) if self.levels else DEFAULT_LEVELS


def _field_path(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err.get("loc", ())) or "(top level)"


def parse_placement_config(data: Any, *, source: str = "config") -> PlacementConfig:
    if data is None:
        return PlacementConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return PlacementConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"{source}: {_field_path(first)}: {first['msg']}") from None


def load_placement_config(path: str | Path | None) -> PlacementConfig:
    """Read the YAML file; None gives the defaults."""
    if path is None:
        return PlacementConfig()
    return parse_placement_config(read_yaml(path, ConfigError), source=str(path))


@dataclass(frozen=True)
class PodPolicy:
    """The configuration in force for one pod after its annotations are applied."""

    weights: Weights
    intra_node: Mode
    pack_mode: Mode
    pack_level: str
    spread_level: str | None
    kv_bytes_per_token: int | None
    reference_kv_bytes_per_token: int


def _mode(value: str, key: str, default: Mode, warnings: list[str]) -> Mode:
    try:
        return Mode(value.strip().lower())
    except ValueError:
        warnings.append(
            f"annotation {key}={value!r} is not one of required|preferred; "
            f"using the default {default.value!r}"
        )
        return default


def _weights(value: str, default: Weights, warnings: list[str]) -> Weights:
    updates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, sep, num = part.partition("=")
        name = name.strip()
        try:
            if not sep or name not in Weights.model_fields:
                raise ValueError
            w = float(num)
            if w < 0 or w != w:
                raise ValueError
        except ValueError:
            warnings.append(
                f"annotation {L.ANNOTATION_WEIGHTS}: {part!r} is not <term>=<number >= 0> "
                f"(terms: {', '.join(Weights.model_fields)}); ignored"
            )
            continue
        updates[name] = w
    return default.model_copy(update=updates)


def resolve_pod_policy(
    config: PlacementConfig, annotations: dict[str, str] | Any
) -> tuple[PodPolicy, list[str]]:
    """Apply a pod's topo-sched annotations over the defaults; warnings say what was ignored."""
    warnings: list[str] = []
    a = annotations or {}
    intra = config.intra_node
    if L.ANNOTATION_INTRA_NODE in a:
        intra = _mode(a[L.ANNOTATION_INTRA_NODE], L.ANNOTATION_INTRA_NODE, intra, warnings)
    pack_mode = config.instance_packing.mode
    if L.ANNOTATION_PACK_MODE in a:
        pack_mode = _mode(a[L.ANNOTATION_PACK_MODE], L.ANNOTATION_PACK_MODE, pack_mode, warnings)
    pack_level = a.get(L.ANNOTATION_PACK_LEVEL, config.instance_packing.level).strip()
    spread_level = a.get(L.ANNOTATION_SPREAD_LEVEL) or (
        config.spread.level if config.spread.enabled else None
    )
    kv = config.kv_bytes_per_token
    if L.ANNOTATION_KV_BYTES_PER_TOKEN in a:
        raw = a[L.ANNOTATION_KV_BYTES_PER_TOKEN]
        if raw.strip().isdigit() and int(raw) > 0:
            kv = int(raw)
        else:
            warnings.append(
                f"annotation {L.ANNOTATION_KV_BYTES_PER_TOKEN}={raw!r} is not a positive "
                f"integer; using {kv if kv else 'no KV size'}"
            )
    weights = config.weights
    if L.ANNOTATION_WEIGHTS in a:
        weights = _weights(a[L.ANNOTATION_WEIGHTS], weights, warnings)
    if spread_level and weights.spread == 0:
        weights = weights.model_copy(update={"spread": 1.0})
    return (
        PodPolicy(
            weights=weights,
            intra_node=intra,
            pack_mode=pack_mode,
            pack_level=pack_level,
            spread_level=spread_level,
            kv_bytes_per_token=kv,
            reference_kv_bytes_per_token=config.reference_kv_bytes_per_token,
        ),
        warnings,
    )
