"""Per-replica capacity hints for the autoscaler, from a measured profile.

The autoscaler's ``capacity`` (``prefillTokensPerSecond``, ``decodeSequences``) says what one
replica sustains at the SLO; where the config leaves them out, :func:`fill_capacity` derives
them from ``capacity.profile`` or, when that is not set either, from the bundled measured H100
profile :data:`DEFAULT_CAPACITY_PROFILE`:

prefill tokens/s per replica
    the measured prefill tokens/s on one GPU at ``prompt_tokens`` (log2-interpolated), times
    ``headroom``; for TP > 1 times ``tp * tp_efficiency[NVLink]``.
decode sequences per replica
    the largest batch whose decode step at ``context_tokens`` meets ``headroom * ITL SLO``,
    capped by the KV cache the replica holds. TP 1 uses the measured fit
    ``a + b*batch + c*batch*context``; TP > 1 uses the simulator's model built from the same
    profile (:func:`~topo_sched.profiling.profile_io.to_engine_profile`), which adds the
    all-reduces over NVLink.

``headroom`` defaults to 0.8, the simulator's ``CAPACITY_HEADROOM`` for the same derivation.
A profile names one model; hints for another model need a profile measured for it (or an
``EngineProfile`` plus ``model``, which scales by active parameters as the simulator does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topo_sched.profiling.profile_io import (
    MeasuredProfile,
    ProfileIOError,
    kv_tokens_for,
    read_profile,
    to_engine_profile,
)
from topo_sched.profiling.shapes import resolve_model
from topo_sched.sim.models import ModelSpec

#: The measured profile the autoscaler and the simulator default to.
DEFAULT_CAPACITY_PROFILE = "h100-qwen3-8b-like"
DEFAULT_HEADROOM = 0.8
DEFAULT_PROMPT_TOKENS = 2048
DEFAULT_CONTEXT_TOKENS = 4096


@dataclass(frozen=True)
class CapacityHints:
    prefill_tokens_per_second: float
    decode_sequences: float
    sources: dict[str, str] = field(default_factory=dict)


def _largest_batch(step: Any, goal_s: float, limit: int) -> int:
    if limit < 1 or step(1) > goal_s:
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if step(mid) <= goal_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def capacity_hints(
    profile: str | Path | MeasuredProfile | None = None,
    *,
    itl_slo_s: float,
    tp: int = 1,
    prompt_tokens: float = DEFAULT_PROMPT_TOKENS,
    context_tokens: float = DEFAULT_CONTEXT_TOKENS,
    headroom: float = DEFAULT_HEADROOM,
    model: ModelSpec | str | None = None,
    max_batch: int = 1024,
) -> CapacityHints:
    """Prefill tokens/s and decode sequences one replica of ``tp`` GPUs sustains.

    ``profile``: a measured profile (path, bundled name or object); None: the default one.
    A simulator ``EngineProfile`` name or path also works when ``model`` is given.
    """
    from topo_sched.sim.profile import EngineProfile, ProfileError, load_profile
    from topo_sched.topology.model import LinkClass

    tp = max(1, int(tp))
    nv = LinkClass.NVLINK
    goal = headroom * itl_slo_s
    m = resolve_model(model) if isinstance(model, str) else model
    mp: MeasuredProfile | None = None
    engine: EngineProfile | None = None
    if isinstance(profile, MeasuredProfile):
        mp = profile
    else:
        ref = profile if profile is not None else DEFAULT_CAPACITY_PROFILE
        try:
            mp = read_profile(ref)
        except ProfileIOError as first:
            if m is None:
                raise
            try:
                engine = load_profile(ref)
            except ProfileError:
                raise first from None
    if mp is not None:
        if m is not None and m.name != mp.model.name:
            raise ProfileIOError(
                f"profile {mp.name} was measured for {mp.model.name}, not {m.name}; "
                "measure that model or give a simulator profile"
            )
        m = mp.model
    assert m is not None
    label = mp.name if mp is not None else engine.name  # type: ignore[union-attr]
    src: dict[str, str] = {}

    if mp is not None and tp == 1:
        per_gpu = mp.prefill_tokens_per_s(prompt_tokens)
        p_tps = headroom * per_gpu
        src["prefill_tokens_per_second"] = (
            f"profile {label}: {headroom:g} x {per_gpu:,.0f} tok/s measured at a "
            f"{prompt_tokens:g}-token prompt, TP1"
        )
        fit = mp.decode_fit
        limit = min(max_batch, int(kv_tokens_for(mp, 1) // max(1.0, context_tokens)))
        b = _largest_batch(lambda n: fit.itl(n, context_tokens), goal, limit)
        src["decode_sequences"] = (
            f"profile {label}: largest TP1 batch with a fitted step <= {headroom:g} x ITL SLO at "
            f"{context_tokens:g} tokens of context, at most {limit} (KV memory)"
        )
    else:
        if engine is None:
            assert mp is not None
            engine = to_engine_profile(mp)
        secs = engine.prefill_seconds(m, prompt_tokens, tp, nv)
        p_tps = headroom * prompt_tokens / secs
        src["prefill_tokens_per_second"] = (
            f"profile {label}: {headroom:g} x {prompt_tokens / secs:,.0f} tok/s, one TP{tp} "
            f"replica on NVLink at a {prompt_tokens:g}-token prompt"
        )
        kv = kv_tokens_for(mp, tp) if mp is not None else engine.kv_capacity_tokens(m, tp)
        limit = min(max_batch, int(kv // max(1.0, context_tokens)))
        cost = engine.decode_cost(m, tp, nv)
        b = _largest_batch(lambda n: cost.step(n, n * context_tokens), goal, limit)
        src["decode_sequences"] = (
            f"profile {label}: largest TP{tp} batch on NVLink with a step <= {headroom:g} x "
            f"ITL SLO at {context_tokens:g} tokens of context, at most {limit} (KV memory)"
        )
    return CapacityHints(
        prefill_tokens_per_second=round(p_tps, 1),
        decode_sequences=float(max(b, 1) if limit >= 1 else 0),
        sources=src,
    )


def fill_capacity(
    target: Any,
    *,
    tp: int = 1,
    prompt_tokens: float = DEFAULT_PROMPT_TOKENS,
    context_tokens: float = DEFAULT_CONTEXT_TOKENS,
    headroom: float = DEFAULT_HEADROOM,
) -> Any:
    """``target.capacity`` with the figures it leaves out derived from its (or the default) profile.

    ``target`` is a :class:`topo_sched.scaling.config.Target`; given figures are kept.
    Returns a new ``Capacity``.
    """
    cap = target.capacity
    if cap.prefill_tokens_per_second is not None and cap.decode_sequences is not None:
        return cap
    hints = capacity_hints(
        cap.profile,
        itl_slo_s=target.slo.itl_seconds,
        tp=tp,
        prompt_tokens=prompt_tokens,
        context_tokens=context_tokens,
        headroom=headroom,
    )
    update: dict[str, Any] = {}
    if cap.prefill_tokens_per_second is None:
        update["prefill_tokens_per_second"] = hints.prefill_tokens_per_second
    if cap.decode_sequences is None:
        update["decode_sequences"] = hints.decode_sequences or None
    if cap.profile is None:
        update["profile"] = DEFAULT_CAPACITY_PROFILE
    return cap.model_copy(update=update)


def target_with_capacity(target: Any) -> Any:
    """The autoscaler target with the capacity figures its config leaves out filled in.

    Prefill tokens/s at ``prefillTensorParallel`` GPUs, decode sequences at the ITL SLO at
    ``decodeTensorParallel``, from ``capacity.profile`` (or the bundled measured H100 profile),
    for ``capacity.model`` where the profile was measured for another shape. Raises
    ProfileIOError (a ValueError) when the profile cannot give them.
    """
    cap = target.capacity
    if cap.prefill_tokens_per_second is not None and cap.decode_sequences is not None:
        return target
    update: dict[str, Any] = {}
    for field_name, tp in (
        ("prefill_tokens_per_second", cap.prefill_tp),
        ("decode_sequences", cap.decode_tp),
    ):
        if getattr(cap, field_name) is None:
            hints = capacity_hints(
                cap.profile, itl_slo_s=target.slo.itl_seconds, tp=tp, model=cap.model
            )
            update[field_name] = getattr(hints, field_name) or None
    return target.model_copy(update={"capacity": cap.model_copy(update=update)})
