"""Simulation scenarios: a pydantic model of the YAML file ``topo-sched simulate`` reads.

A scenario names a cluster (a built-in preset, or a ``kubectl get nodes,pods -A -o json`` dump),
the services to run on it (RBG prefill/decode groups with their autoscaler targets), the traffic
(a request trace, its time compression, an optional window, a rate multiplier), and the policies
to compare. ``simulations/default.yaml`` is the built-in default; it is also shipped inside the
package (``topo_sched/data/simulations/default.yaml``) so that ``topo-sched simulate`` with no
argument runs anywhere.

Keys are snake_case. Every error names the field: ``default.yaml: services[0].prefill_tp: ...``.

Pure apart from :func:`load_scenario` (reads a file), :func:`default_scenario` (reads the
packaged YAML) and :func:`build_cluster` (reads a cluster dump or the bundled topologies).
"""

from __future__ import annotations

import json
import math
import random
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from topo_sched.sim.cluster_builder import (
    HGX_H100_8GPU,
    PCIE_8X_RTX4090_2SOCKET,
    bundled_topology,
    make_plain_pod,
    make_rack_cluster,
)

PLACEMENT_POLICIES = ("topology-aware", "default", "random", "optimal")
#: Scaling policies compared when a scenario names none.
SCALING_POLICIES = ("coordinated", "independent", "static-peak", "oracle")
#: Every scaling policy the simulator knows; ``placement-aware`` (coordinated, with each
#: scale-up put to the placement what-if first) is compared only where a scenario or
#: ``--scaling`` names it: on a roomy cluster it decides exactly as coordinated does.
SCALING_POLICY_NAMES = ("coordinated", "placement-aware", "independent", "static-peak", "oracle")
CLUSTER_PRESETS = ("two-zone-hgx-pcie", "all-hgx", "tight", "nodes")
#: Names a trace loader knows without a file (the Azure traces shipped in the package).
BUILTIN_TRACES = ("azure-conv", "azure-code")

PlacementName = Literal["topology-aware", "default", "random", "optimal"]
ScalingName = Literal["coordinated", "placement-aware", "independent", "static-peak", "oracle"]


class ScenarioError(ValueError):
    """The scenario file is unreadable or invalid; the message names the field."""


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- cluster ---------------------------------------------------------------------------------


class ClusterSpec(_Cfg):
    """Where the services run.

    Presets (nodes are built from real ``nvidia-smi topo -m`` captures, see
    ``topo_sched/data/topologies/README.md``):

    - ``two-zone-hgx-pcie``: 2 zones x 4 racks x 8 nodes; racks 0-5 HGX H100 8-GPU (one
      NVSwitch island of 8, 2 NUMA nodes, 8 NICs), racks 6-7 PCIe-only 8-GPU boxes (every GPU
      pair ``SYS``, 2 NUMA nodes, 2 NICs). 64 nodes, 512 GPUs.
    - ``all-hgx``: the same tree, every rack HGX (where intra-node placement cannot go wrong).
    - ``tight``: 1 zone, 2 racks x 4 nodes (one HGX rack, one PCIe rack): 64 GPUs.
    - ``nodes``: ``nodes`` nodes (for benchmarks), racks of 8, three HGX racks to one PCIe
      rack, two zones.

    ``file`` reads a ``kubectl get nodes,pods -A -o json`` dump instead: its pods are the
    background load. ``background_load`` is the fraction of GPUs other tenants' (non-RBG)
    pods hold at the start, placed by a seeded RNG; it is added to a dump's own pods.
    """

    preset: Literal["two-zone-hgx-pcie", "all-hgx", "tight", "nodes"] | None = None
    nodes: int | None = Field(None, ge=1, le=20000)
    file: str | None = None
    background_load: float = Field(0.0, ge=0.0, le=0.95)

    @model_validator(mode="after")
    def _one_source(self) -> ClusterSpec:
        if self.preset is None and self.file is None:
            object.__setattr__(self, "preset", "two-zone-hgx-pcie")
        if self.preset is not None and self.file is not None:
            raise ValueError("give preset or file, not both")
        if self.preset == "nodes" and self.nodes is None:
            raise ValueError("nodes: preset 'nodes' needs nodes: N")
        if self.nodes is not None and self.preset != "nodes":
            raise ValueError("nodes: only with preset 'nodes'")
        return self


# -- services --------------------------------------------------------------------------------


class SloSpec(_Cfg):
    ttft_s: float = Field(2.0, gt=0)
    itl_s: float = Field(0.05, gt=0)
    percentile: float = Field(0.9, gt=0, lt=1)


class UnitsSpec(_Cfg):
    min: int = Field(1, ge=1)
    max: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> UnitsSpec:
        if self.max < self.min:
            raise ValueError("units.max must be >= units.min")
        return self


class BandSpec(_Cfg):
    min: float = Field(gt=0)
    max: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> BandSpec:
        if self.max < self.min:
            raise ValueError("band.max must be >= band.min")
        return self


class CapacitySpec(_Cfg):
    """What one replica sustains at the SLO; a figure left out is derived from the profile."""

    prefill_tokens_per_second: float | None = Field(None, gt=0)
    decode_sequences: float | None = Field(None, gt=0)


class AutoscalerSpec(_Cfg):
    slo: SloSpec = SloSpec()
    units: UnitsSpec = UnitsSpec()
    mode: Literal["strict", "band"] = "strict"
    band: BandSpec | None = None
    capacity: CapacitySpec = CapacitySpec()
    #: HPA-style scale-down stabilisation window of the coordinated and independent policies.
    scale_down_window_s: int = Field(300, ge=0)

    @model_validator(mode="after")
    def _band(self) -> AutoscalerSpec:
        if self.mode == "band" and self.band is None:
            raise ValueError("band: mode band needs band: {min: ..., max: ...}")
        return self


_DNS = re.compile(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")


class RatioSpec(_Cfg):
    prefill: int = Field(2, ge=1, le=16)
    decode: int = Field(1, ge=1, le=16)


class ServiceSpec(_Cfg):
    """One RBG prefill/decode group."""

    name: str
    #: A model preset of :mod:`topo_sched.sim.models` (e.g. qwen3-32b-like).
    model: str
    prefill_tp: int = Field(ge=1, le=8)
    decode_tp: int = Field(ge=1, le=8)
    ratio: RatioSpec = RatioSpec()
    initial_units: int = Field(1, ge=1)
    autoscaler: AutoscalerSpec = AutoscalerSpec()
    #: Share of the trace's requests this service gets (normalised over all services).
    trace_share: float = Field(1.0, gt=0)
    #: Most sequences one decode engine runs at once (vLLM's default max_num_seqs is 256;
    #: null: only KV memory limits it).
    max_batch: int | None = Field(256, ge=1)

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not _DNS.match(v):
            raise ValueError(f"{v!r} must be a DNS label: a-z, 0-9 and '-', at most 32 chars")
        return v

    @field_validator("prefill_tp", "decode_tp")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v not in (1, 2, 4, 8):
            raise ValueError(
                f"{v} is not 1, 2, 4 or 8 (one pod per TP group on one 8-GPU node; "
                "multi-node instances are not modelled)"
            )
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        known = _model_presets()
        if known is not None and v not in known:
            raise ValueError(f"unknown model preset {v!r}; known: {', '.join(sorted(known))}")
        return v

    @model_validator(mode="after")
    def _initial(self) -> ServiceSpec:
        u = self.autoscaler.units
        if not u.min <= self.initial_units <= u.max:
            raise ValueError(
                f"initial_units: {self.initial_units} is outside autoscaler.units "
                f"[{u.min}, {u.max}]"
            )
        return self


def _model_presets() -> set[str] | None:
    try:
        from topo_sched.sim import models
    except ImportError:  # pragma: no cover - the serving model is not installed
        return None
    presets = getattr(models, "PRESETS", None) or getattr(models, "MODELS", None)
    return set(presets) if isinstance(presets, dict) else None


# -- traffic and the rest ----------------------------------------------------------------------


class WindowSpec(_Cfg):
    """Part of the trace (in trace seconds, before compression)."""

    start_s: float = Field(0.0, ge=0)
    duration_s: float = Field(gt=0)


class TrafficSpec(_Cfg):
    #: ``azure-conv``, ``azure-code`` (shipped), or a trace file (CSV or JSONL, detected).
    trace: str = "azure-conv"
    #: Time compression: arrivals come this many times faster (1 h at 4 = 15 min).
    compress: float = Field(1.0, gt=0, le=1000)
    window: WindowSpec | None = None
    #: Requests per second multiplier after compression (<1 thins, >1 adds seeded copies).
    rate: float = Field(1.0, gt=0, le=100)


class PoliciesSpec(_Cfg):
    placement: list[PlacementName] = Field(default_factory=lambda: list(PLACEMENT_POLICIES))
    scaling: list[ScalingName] = Field(default_factory=lambda: list(SCALING_POLICIES))

    @field_validator("placement", "scaling")
    @classmethod
    def _nonempty_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one policy")
        return list(dict.fromkeys(v))


class Scenario(_Cfg):
    name: str = "scenario"
    description: str = ""
    cluster: ClusterSpec = ClusterSpec()
    services: list[ServiceSpec] = Field(min_length=1)
    traffic: TrafficSpec = TrafficSpec()
    policies: PoliciesSpec = PoliciesSpec()
    #: Engine profile: a bundled name or a JSON file (see topo_sched.sim.profile).
    profile: str = "h100-measured"
    seed: int = 0
    #: Simulated seconds per step of the serving model.
    tick_s: float = Field(30.0, gt=0, le=3600)
    #: Seconds between autoscaler decisions (a whole number of ticks).
    scale_interval_s: float = Field(30.0, gt=0)
    #: Seconds from a pod's binding until it serves (image pull, weights load, warm-up).
    startup_s: float = Field(120.0, ge=0)
    #: kube-scheduler's weight for the extender (as in manifests/extender).
    extender_weight: int = Field(20, ge=0, le=1000)
    #: The ILP bound (policy optimal) runs only on clusters of at most this many nodes.
    optimal_max_nodes: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _checks(self) -> Scenario:
        names = [s.name for s in self.services]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"services: duplicate name(s) {dup}")
        k = self.scale_interval_s / self.tick_s
        if abs(k - round(k)) > 1e-9 or round(k) < 1:
            raise ValueError("scale_interval_s: must be a whole number (>= 1) of tick_s")
        return self

    def with_overrides(
        self,
        *,
        trace: str | None = None,
        cluster_file: str | None = None,
        seed: int | None = None,
        placement: list[str] | None = None,
        scaling: list[str] | None = None,
    ) -> Scenario:
        """A copy with command-line overrides applied (validated like the file)."""
        data = self.model_dump()
        if trace is not None:
            data["traffic"]["trace"] = trace
        if cluster_file is not None:
            data["cluster"] = {
                "file": cluster_file,
                "background_load": self.cluster.background_load,
            }
        if seed is not None:
            data["seed"] = seed
        if placement:
            data["policies"]["placement"] = placement
        if scaling:
            data["policies"]["scaling"] = scaling
        return parse_scenario(data, source="command line")


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


def parse_scenario(
    data: Any, *, source: str = "scenario", base_dir: Path | None = None
) -> Scenario:
    """Validate a mapping; relative file paths in it are taken from ``base_dir``."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping at the top level")
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function")))
        msg = err["msg"].removeprefix("Value error, ")
        raise ScenarioError(f"{source}: {_where(loc)}: {msg}") from None
    if base_dir is not None:
        sc = _resolve_paths(sc, base_dir)
    return sc


def _resolve_paths(sc: Scenario, base: Path) -> Scenario:
    data = sc.model_dump()
    trace = data["traffic"]["trace"]
    if trace not in BUILTIN_TRACES and not Path(trace).is_absolute():
        cand = base / trace
        if cand.exists():
            data["traffic"]["trace"] = str(cand)
    prof = data["profile"]
    if prof.endswith(".json") and not Path(prof).is_absolute() and (base / prof).exists():
        data["profile"] = str(base / prof)
    f = data["cluster"].get("file")
    if f and not Path(f).is_absolute() and (base / f).exists():
        data["cluster"]["file"] = str(base / f)
    return Scenario.model_validate(data)


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ScenarioError(f"{p}: not valid YAML: {first}") from None
    return parse_scenario(data, source=p.name, base_dir=p.resolve().parent)


DEFAULT_SCENARIO_TEXT_NAME = "default.yaml"


def default_scenario_text() -> str:
    return (
        resources.files("topo_sched")
        .joinpath("data", "simulations", DEFAULT_SCENARIO_TEXT_NAME)
        .read_text(encoding="utf-8")
    )


def default_scenario() -> Scenario:
    """The built-in default (``simulations/default.yaml``, shipped in the package)."""
    return parse_scenario(yaml.safe_load(default_scenario_text()), source="default.yaml")


# -- clusters ----------------------------------------------------------------------------------


def _preset_nodes(spec: ClusterSpec) -> list[dict[str, Any]]:
    hgx = bundled_topology(HGX_H100_8GPU)
    pcie = bundled_topology(PCIE_8X_RTX4090_2SOCKET)
    if spec.preset == "two-zone-hgx-pcie":
        return make_rack_cluster(8, 8, [hgx] * 6 + [pcie] * 2, zones=2)
    if spec.preset == "all-hgx":
        return make_rack_cluster(8, 8, [hgx], zones=2)
    if spec.preset == "tight":
        return make_rack_cluster(2, 4, [hgx, pcie], zones=1)
    assert spec.preset == "nodes" and spec.nodes is not None
    n = spec.nodes
    racks = max(1, math.ceil(n / 8))
    nodes = make_rack_cluster(racks, 8, [hgx, hgx, hgx, pcie], zones=min(2, racks))
    return nodes[:n]


def read_cluster_dump(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Nodes and pods of a ``kubectl get nodes,pods -A -o json`` dump (a v1 List)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise ScenarioError(f"{p}: not JSON: {e}") from None
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ScenarioError(f"{p}: not a `kubectl get nodes,pods -A -o json` List (no items)")
    nodes = [i for i in items if isinstance(i, dict) and i.get("kind") == "Node"]
    pods = [i for i in items if isinstance(i, dict) and i.get("kind") == "Pod"]
    if not nodes:
        raise ScenarioError(f"{p}: the List holds no Node objects")
    for i, n in enumerate(nodes):
        if not (n.get("metadata") or {}).get("name"):
            raise ScenarioError(f"{p}: items: Node #{i} has no metadata.name")
    return nodes, pods


def _gpus_of(node: dict[str, Any]) -> int:
    st = node.get("status") or {}
    raw = (st.get("allocatable") or {}).get("nvidia.com/gpu") or (st.get("capacity") or {}).get(
        "nvidia.com/gpu", 0
    )
    try:
        return max(0, int(str(raw)))
    except ValueError:
        return 0


def background_pods(
    nodes: list[dict[str, Any]], fraction: float, seed: int, taken: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Bound non-RBG pods holding about ``fraction`` of all GPUs (sizes 1, 2, 4, 8; seeded).

    Each pod goes to a random node with room for it; GPU indices are left to the snapshot
    (best fit, as the kubelet's topology-aware allocation tends to pick).
    """
    rng = random.Random(f"background/{seed}")
    free = {n["metadata"]["name"]: _gpus_of(n) for n in nodes}
    for name, used in (taken or {}).items():
        if name in free:
            free[name] = max(0, free[name] - used)
    total = sum(_gpus_of(n) for n in nodes)
    goal = round(fraction * total)
    pods: list[dict[str, Any]] = []
    names = sorted(free)
    held = 0
    tries = 0
    while held < goal and tries < 50 * len(names) + 100:
        tries += 1
        size = rng.choice((1, 2, 4, 8))
        size = min(size, goal - held)
        cands = [n for n in names if free[n] >= size]
        if not cands:
            continue
        node = rng.choice(cands)
        pods.append(make_plain_pod("batch", f"job-{len(pods):05d}", size, node=node))
        free[node] -= size
        held += size
    return pods


def build_cluster(
    spec: ClusterSpec, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Nodes and the pods already running on them (the background load)."""
    if spec.file is not None:
        nodes, pods = read_cluster_dump(spec.file)
    else:
        nodes, pods = _preset_nodes(spec), []
    if spec.background_load > 0:
        taken: dict[str, int] = {}
        for p in pods:
            node = (p.get("spec") or {}).get("nodeName")
            if node:
                for c in (p.get("spec") or {}).get("containers") or []:
                    req = ((c.get("resources") or {}).get("requests") or {}).get("nvidia.com/gpu")
                    if req is not None and str(req).isdigit():
                        taken[node] = taken.get(node, 0) + int(str(req))
        pods = [*pods, *background_pods(nodes, spec.background_load, seed, taken)]
    return nodes, pods
