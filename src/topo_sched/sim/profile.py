"""Engine profiles: how long prefill and decode take on one GPU type, with a source per number.

An :class:`EngineProfile` is read from JSON (``topo_sched/data/profiles/<name>.json`` or any
file path). Every number in it carries a ``sources`` entry (the loader refuses a profile where
one is missing), keyed by field name, or ``field.KEY`` for the entries of a table.

The model (the same for any profile; the numbers are what a profile changes):

Prefill
    ``prefill_points`` is per-GPU prefill throughput (tokens/s) against prompt length at TP1 for
    a reference model of ``prefill_reference_active_params_b`` active parameters. Another model
    scales it by active parameters (compute bound: ~2 FLOPs per active parameter per token),
    unless ``prefill_points_by_model`` holds a measured curve of its own (used unscaled).
    Throughput is interpolated linearly in log2(length); below the first point the time stays
    that of the first point (weight-read bound), above the last the last throughput holds.
    TP ``t`` divides the time by ``t * tp_efficiency[worst link class of the TP group]``.
    A batch of prompts runs at the throughput of its total size up to the curve's peak, each
    prompt longer than that at its own length's (:meth:`EngineProfile.prefill_batch_seconds`).
Decode step
    ``overhead + max(memory, compute) + all-reduce``, where memory is the weights the step
    reads (all of them for a dense model, the touched experts for a MoE one, see
    :meth:`ModelSpec.decode_weight_bytes`) plus the KV cache of the batch, per GPU, at
    ``hbm_bandwidth * hbm_efficiency``; compute is ``2 * active_params`` FLOPs per sequence at
    ``peak_flops * decode_mfu`` (binds only at large batches); all-reduce is, per layer, two
    ring all-reduces of ``batch * hidden`` activations over the TP group's worst link, with the
    link's bandwidth and latency from the project's one cost table
    (:mod:`topo_sched.topology.costs`) plus ``allreduce_base_s`` each.
KV memory
    ``memory_bytes * memory_fraction - weight_bytes / tp`` per GPU holds KV; a GPU holds
    ``kv_bytes_per_token / min(tp, kv_heads)`` per token (KV heads are split by TP, then
    replicated).

A TP group whose worst link is unknown (``None`` with ``tp > 1``, e.g. one spanning nodes) is
costed as ``SYS``, the slowest intra-node class.

The default profile's numbers are datasheet figures, this project's own H100 captures and
stated estimates; measured engine profiles are meant to replace them (give a file path).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from topo_sched.sim.models import ModelSpec
from topo_sched.topology.costs import intra_node_cost
from topo_sched.topology.model import LinkClass

DEFAULT_PROFILE = "default-h100"

#: Fields that are text, not numbers (they need no source).
_TEXT_FIELDS = {"name", "description", "gpu", "prefill_reference_model", "sources"}


class ProfileError(ValueError):
    pass


class EngineProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    gpu: str
    #: HBM per GPU, bytes.
    memory_bytes: float = Field(gt=0)
    #: Share of HBM the engine takes for weights + KV (the rest: activations, CUDA graphs).
    memory_fraction: float = Field(gt=0, le=1)
    hbm_bandwidth_bytes_per_s: float = Field(gt=0)
    #: Achievable share of the HBM bandwidth.
    hbm_efficiency: float = Field(gt=0, le=1)
    #: Dense bf16 tensor-core FLOP/s per GPU.
    peak_flops: float = Field(gt=0)
    #: Informational: which model the prefill points were taken or derived for.
    prefill_reference_model: str = ""
    prefill_reference_active_params_b: float = Field(gt=0)
    #: [prompt tokens, prefill tokens/s on one GPU], increasing in tokens.
    prefill_points: list[tuple[float, float]] = Field(min_length=1)
    #: Measured prefill curves of named models, like ``prefill_points`` ([prompt tokens,
    #: tokens/s on one GPU] at TP1); a model named here runs at its own curve, unscaled,
    #: instead of the reference curve scaled by active parameters (topo_sched.profiling).
    prefill_points_by_model: dict[str, list[tuple[float, float]]] = Field(default_factory=dict)
    #: Prompt tokens one prefill batch may hold (queued prompts are batched up to this).
    prefill_max_batch_tokens: int = Field(ge=0)
    #: Share of ideal TP speed-up, by the worst link class inside the TP group (TP >= 2).
    tp_efficiency: dict[LinkClass, float]
    decode_step_overhead_s: float = Field(ge=0)
    decode_mfu: float = Field(gt=0, le=1)
    allreduce_base_s: float = Field(ge=0)
    #: NVLinks per GPU (an NV-class TP group all-reduces over this many links).
    nvlinks_per_gpu: int = Field(ge=1)
    sources: dict[str, str]

    @field_validator("prefill_points")
    @classmethod
    def _points_increase(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        xs = [p[0] for p in v]
        if any(b <= a for a, b in itertools.pairwise(xs)) or xs[0] <= 0:
            raise ValueError("prefill_points must have positive, strictly increasing lengths")
        if any(p[1] <= 0 for p in v):
            raise ValueError("prefill_points throughputs must be positive")
        return v

    @field_validator("prefill_points_by_model")
    @classmethod
    def _model_points_increase(
        cls, v: dict[str, list[tuple[float, float]]]
    ) -> dict[str, list[tuple[float, float]]]:
        for name, pts in v.items():
            xs = [p[0] for p in pts]
            if not pts or any(b <= a for a, b in itertools.pairwise(xs)) or xs[0] <= 0:
                raise ValueError(f"prefill_points_by_model.{name}: lengths must increase")
            if any(p[1] <= 0 for p in pts):
                raise ValueError(f"prefill_points_by_model.{name}: throughputs must be positive")
        return v

    @field_validator("tp_efficiency")
    @classmethod
    def _all_links(cls, v: dict[LinkClass, float]) -> dict[LinkClass, float]:
        missing = [c.value for c in LinkClass if c not in v]
        if missing:
            raise ValueError(f"tp_efficiency lacks link classes {missing}")
        if any(not 0 < x <= 1 for x in v.values()):
            raise ValueError("tp_efficiency values must be in (0, 1]")
        return v

    @model_validator(mode="after")
    def _every_number_has_a_source(self) -> EngineProfile:
        need: list[str] = []
        for f in type(self).model_fields:
            if f in _TEXT_FIELDS:
                continue
            if f == "tp_efficiency":
                need += [f"tp_efficiency.{c.value}" for c in self.tp_efficiency]
            elif f == "prefill_points_by_model":
                need += [f"{f}.{name}" for name in self.prefill_points_by_model]
            else:
                need.append(f)
        missing = [k for k in need if not self.sources.get(k, "").strip()]
        if missing:
            raise ValueError(f"profile {self.name!r}: no source for {', '.join(missing)}")
        return self

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_json(cls, text: str | bytes) -> EngineProfile:
        return cls.model_validate_json(text)

    # -- memory ------------------------------------------------------------------------------

    def kv_bytes_per_token_per_gpu(self, model: ModelSpec, tp: int) -> float:
        return model.kv_bytes_per_token / min(max(1, tp), model.kv_heads)

    def kv_capacity_tokens(self, model: ModelSpec, tp: int) -> int:
        """Tokens of KV cache one instance of ``tp`` GPUs holds (0: the weights do not fit)."""
        tp = max(1, tp)
        free = self.memory_bytes * self.memory_fraction - model.weight_bytes / tp
        if free <= 0:
            return 0
        return int(free // self.kv_bytes_per_token_per_gpu(model, tp))

    # -- prefill -----------------------------------------------------------------------------

    def _curve(self, model: ModelSpec) -> tuple[list[tuple[float, float]], float]:
        """The prefill curve ``model`` runs at, and the factor its throughput is scaled by."""
        own = self.prefill_points_by_model.get(model.name)
        if own is not None:
            return own, 1.0
        return (
            self.prefill_points,
            self.prefill_reference_active_params_b * 1e9 / model.active_params,
        )

    def reference_throughput(
        self, tokens: float, points: list[tuple[float, float]] | None = None
    ) -> float:
        """Prefill tokens/s of the reference model (or ``points``) on one GPU, ``tokens`` long."""
        pts = points or self.prefill_points
        x0, y0 = pts[0]
        if tokens <= x0:
            return y0 * max(tokens, 1e-9) / x0  # same time as the first point
        xs = [p[0] for p in pts]
        i = bisect.bisect_right(xs, tokens)
        if i >= len(pts):
            return pts[-1][1]
        (xa, ya), (xb, yb) = pts[i - 1], pts[i]
        f = (math.log2(tokens) - math.log2(xa)) / (math.log2(xb) - math.log2(xa))
        return ya + f * (yb - ya)

    def tp_factor(self, tp: int, worst_link: LinkClass | None) -> float:
        """Effective speed-up of a TP group over one GPU."""
        if tp <= 1:
            return 1.0
        link = worst_link if worst_link is not None else LinkClass.SYS
        return tp * self.tp_efficiency[link]

    def prefill_seconds(
        self, model: ModelSpec, prompt_tokens: float, tp: int, worst_link: LinkClass | None
    ) -> float:
        pts, scale = self._curve(model)
        tput = self.reference_throughput(prompt_tokens, pts) * scale
        return prompt_tokens / (tput * self.tp_factor(tp, worst_link))

    @property
    def peak_prefill_tokens(self) -> float:
        """The prompt length of the highest reference throughput."""
        return max(self.prefill_points, key=lambda pt: pt[1])[0]

    def prefill_batch_seconds(
        self,
        model: ModelSpec,
        prompts: list[int],
        tp: int,
        worst_link: LinkClass | None,
    ) -> float:
        """One prefill batch of several prompts.

        The batch runs at the throughput of its total size, up to the curve's peak (more
        tokens fill the GPU better); a prompt longer than that keeps its own length's
        throughput (its attention cost). One prompt: exactly :meth:`prefill_seconds`.
        """
        if len(prompts) == 1:
            return self.prefill_seconds(model, prompts[0], tp, worst_link)
        pts, scale = self._curve(model)
        fill = min(float(sum(prompts)), max(pts, key=lambda pt: pt[1])[0])
        speed = scale * self.tp_factor(tp, worst_link)
        return sum(n / (self.reference_throughput(max(n, fill), pts) * speed) for n in prompts)

    # -- decode ------------------------------------------------------------------------------

    def decode_cost(self, model: ModelSpec, tp: int, worst_link: LinkClass | None) -> DecodeCost:
        return DecodeCost(self, model, tp, worst_link)

    def decode_step_seconds(
        self,
        model: ModelSpec,
        batch: int,
        mean_context: float,
        tp: int,
        worst_link: LinkClass | None,
    ) -> float:
        return self.decode_cost(model, tp, worst_link).step(batch, batch * mean_context)

    def max_sequences(self, model: ModelSpec, tp: int, context: float) -> int:
        """Sequences of ``context`` tokens whose KV fits on one instance."""
        return int(self.kv_capacity_tokens(model, tp) // max(1.0, context))


class DecodeCost:
    """Decode step time of one model on one TP group, with the per-group constants folded."""

    __slots__ = (
        "_ar_fixed",
        "_ar_per_seq",
        "_bw",
        "_compute_per_seq",
        "_dense_weights",
        "_kv",
        "_model",
        "_overhead",
        "_tp",
    )

    def __init__(
        self, p: EngineProfile, model: ModelSpec, tp: int, worst_link: LinkClass | None
    ) -> None:
        tp = max(1, tp)
        self._model = model
        self._tp = tp
        self._bw = p.hbm_bandwidth_bytes_per_s * p.hbm_efficiency
        self._overhead = p.decode_step_overhead_s
        self._kv = p.kv_bytes_per_token_per_gpu(model, tp) / self._bw
        self._dense_weights = model.weight_bytes / tp / self._bw if model.moe is None else None
        self._compute_per_seq = 2.0 * model.active_params / (tp * p.peak_flops * p.decode_mfu)
        if tp > 1:
            link = worst_link if worst_link is not None else LinkClass.SYS
            cost = intra_node_cost(link, p.nvlinks_per_gpu if link is LinkClass.NVLINK else None)
            n_ar = 2 * model.layers  # after attention and after the MLP, every layer
            steps = 2 * (tp - 1)  # ring all-reduce: reduce-scatter + all-gather
            self._ar_fixed = n_ar * (p.allreduce_base_s + steps * cost.latency_us * 1e-6)
            per_seq_bytes = model.hidden * model.dtype_bytes * steps / tp
            self._ar_per_seq = n_ar * per_seq_bytes / (cost.bandwidth_gbps * 1e9)
        else:
            self._ar_fixed = 0.0
            self._ar_per_seq = 0.0

    def weights_seconds(self, batch: int) -> float:
        if self._dense_weights is not None:
            return self._dense_weights
        return self._model.decode_weight_bytes(batch) / self._tp / self._bw

    def step(self, batch: int, context_tokens: float) -> float:
        """One decode step for ``batch`` sequences holding ``context_tokens`` tokens in all."""
        if batch <= 0:
            return 0.0
        memory = self.weights_seconds(batch) + context_tokens * self._kv
        compute = batch * self._compute_per_seq
        return (
            self._overhead
            + (memory if memory > compute else compute)
            + self._ar_fixed
            + batch * self._ar_per_seq
        )


# -- functions over the default profile (or one given) ------------------------------------


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> EngineProfile:
    """A bundled profile by name (``default-h100``) or a JSON file by path."""
    p = Path(name_or_path)
    if isinstance(name_or_path, str) and p.suffix != ".json" and not p.exists():
        return _bundled(name_or_path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ProfileError(f"{p}: cannot read engine profile ({e.strerror or e})") from e
    try:
        return EngineProfile.from_json(text)
    except ValueError as e:
        raise ProfileError(f"{p}: not a valid engine profile: {e}") from e


@lru_cache(maxsize=8)
def _bundled(name: str) -> EngineProfile:
    res = resources.files("topo_sched").joinpath("data", "profiles", f"{name}.json")
    if not res.is_file():
        raise ProfileError(f"no bundled engine profile {name!r} and no such file")
    return EngineProfile.from_json(res.read_text(encoding="utf-8"))


def default_profile() -> EngineProfile:
    return _bundled(DEFAULT_PROFILE)


def prefill_seconds(
    model: ModelSpec,
    prompt_tokens: float,
    tp: int,
    worst_link: LinkClass | None,
    profile: EngineProfile | None = None,
) -> float:
    return (profile or default_profile()).prefill_seconds(model, prompt_tokens, tp, worst_link)


def decode_step_seconds(
    model: ModelSpec,
    batch: int,
    mean_context: float,
    tp: int,
    worst_link: LinkClass | None,
    profile: EngineProfile | None = None,
) -> float:
    return (profile or default_profile()).decode_step_seconds(
        model, batch, mean_context, tp, worst_link
    )


def max_sequences(
    model: ModelSpec, tp: int, context: float, profile: EngineProfile | None = None
) -> int:
    return (profile or default_profile()).max_sequences(model, tp, context)


# -- how the default profile's prefill points were derived ---------------------------------


def roofline_prefill_points(
    model: ModelSpec,
    lengths: list[int],
    *,
    peak_flops: float,
    mfu: float,
    hbm_bytes_per_s: float,
    overhead_s: float,
) -> list[tuple[float, float]]:
    """Prefill tokens/s on one GPU by a roofline: ``L / (overhead + max(weights, FLOPs))``.

    FLOPs of a prompt of L tokens: ``2 * N * L`` for the non-embedding weights N (the LM head
    runs for the last token only) plus causal attention, ``2 * layers * q_dim * L**2``
    (QK^T and PV, each ``q_dim * L**2 / 2`` multiply-adds per layer); at ``peak * mfu``.
    Weights: one read of all weights at ``hbm_bytes_per_s`` (binds for short prompts).
    """
    non_embedding = model.shape_params() - 2 * model.vocab * model.hidden
    if model.moe is not None:
        non_embedding -= model.expert_params * (1 - model.moe.active_experts / model.moe.experts)
    out = []
    for n in lengths:
        flops = 2 * non_embedding * n + 2 * model.layers * model.q_dim * n * n
        t = overhead_s + max(model.weight_bytes / hbm_bytes_per_s, flops / (peak_flops * mfu))
        out.append((float(n), round(n / t, 1)))
    return out


def profile_to_json(profile: EngineProfile) -> str:
    return json.dumps(profile.model_dump(mode="json"), indent=2) + "\n"
