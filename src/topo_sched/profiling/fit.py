"""Fits over raw timings: pure, numpy only (no torch, no I/O).

Prefill
    tokens/s per GPU against prompt length: ``prompt / time`` of each measured prompt (batch 1).
    Between points, interpolated linearly in log2(length), as the simulator does.
Decode
    inter-token latency (one decode step) as ``a + b*batch + c*batch*context`` seconds: ``a`` the
    fixed cost (the weight read and per-step kernels), ``b`` the per-sequence cost (GEMM rows,
    the LM head, sampling-free), ``c`` the per-token KV read of attention; a MoE model adds
    ``e * (1 - (1 - active/experts)**batch)``, the expert weights a batch touches. Least squares on
    relative error (each row divided by its measured time, so a 5 ms step weighs as much as a
    100 ms one); a coefficient the fit makes negative is pinned to 0 and the rest refitted.
    R^2 is the ordinary coefficient of determination of the fitted times.
Max concurrent sequences
    at an ITL target and a context length: the largest batch whose fitted step meets the
    target, capped by the KV cache one GPU holds (``memory * fraction - weights`` over
    ``kv_bytes_per_token``), the same memory rule as the simulator.
Engine constants
    :func:`fit_engine_decode` fits the simulator's own decode formula
    (``overhead + max(memory / (bw * eff), compute / (peak * mfu))``) to measured steps, so a
    measured profile can be turned into an ``EngineProfile`` (see profile_io).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from topo_sched.sim.models import ModelSpec

#: vLLM's default share of GPU memory for weights + KV (gpu_memory_utilization).
DEFAULT_MEMORY_FRACTION = 0.9
#: ITL targets (seconds) and contexts (tokens) of the max-sequences table a profile carries.
ITL_TARGETS_S = (0.02, 0.03, 0.05, 0.1)
TABLE_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


# -- prefill ----------------------------------------------------------------------------------


def prefill_points(prompts: Sequence[float], seconds: Sequence[float]) -> list[tuple[float, float]]:
    """[prompt tokens, tokens/s] sorted by length (one GPU, batch 1)."""
    pts = sorted((float(n), float(n) / float(s)) for n, s in zip(prompts, seconds, strict=True))
    if not pts:
        raise ValueError("no prefill timings")
    if any(s <= 0 for s in seconds):
        raise ValueError("prefill times must be positive")
    return [(n, round(t, 1)) for n, t in pts]


def interp_log2(points: Sequence[tuple[float, float]], x: float) -> float:
    """Linear in log2(x) between points; clamped to the end values outside them."""
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    i = bisect.bisect_right(xs, x)
    if i >= len(points):
        return points[-1][1]
    (xa, ya), (xb, yb) = points[i - 1], points[i]
    f = (math.log2(x) - math.log2(xa)) / (math.log2(xb) - math.log2(xa))
    return ya + f * (yb - ya)


def prefill_throughput(points: Sequence[tuple[float, float]], prompt_tokens: float) -> float:
    """Prefill tokens/s for a prompt: below the first point its time stays the first point's."""
    x0, y0 = points[0]
    if prompt_tokens < x0:
        return y0 * max(prompt_tokens, 1e-9) / x0
    return interp_log2(points, prompt_tokens)


# -- decode -----------------------------------------------------------------------------------


def touched_fraction(batch: Any, active_fraction: float) -> Any:
    """Expected share of a MoE layer's experts a batch touches (uniform routing)."""
    return 1.0 - (1.0 - active_fraction) ** np.maximum(np.asarray(batch, dtype=float), 1.0)


@dataclass(frozen=True)
class DecodeFit:
    """``itl = a + b*batch + c*batch*context [+ e*touched(batch)]`` (seconds), fitted to ``n``
    measured steps. The last term only for a MoE model: ``touched(batch) = 1 - (1 -
    active/experts) ** batch`` is the expected share of experts whose weights the step reads
    (``moe_active_fraction`` = active/experts), which a line in batch cannot follow."""

    a_s: float
    b_s: float
    c_s: float
    r2: float
    n: int
    max_rel_err: float
    median_rel_err: float
    e_s: float = 0.0
    moe_active_fraction: float | None = None

    def itl(self, batch: float, context: float) -> float:
        t = self.a_s + self.b_s * batch + self.c_s * batch * context
        if self.moe_active_fraction is not None:
            t += self.e_s * float(touched_fraction(batch, self.moe_active_fraction))
        return t

    def max_batch(self, itl_target_s: float, context: float, cap: int = 1 << 20) -> int:
        """Largest batch whose fitted step is at most ``itl_target_s`` (0 if even 1 misses).

        Every term grows with the batch, so a doubling then bisection search finds it.
        """
        if self.itl(1, context) > itl_target_s:
            return 0
        hi = 1
        while hi < cap and self.itl(min(cap, hi * 2), context) <= itl_target_s:
            hi = min(cap, hi * 2)
        if hi >= cap:
            return cap
        lo, hi = hi, min(cap, hi * 2)  # itl(lo) meets, itl(hi) misses
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.itl(mid, context) <= itl_target_s:
                lo = mid
            else:
                hi = mid
        return lo

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = "itl_s = a_s + b_s * batch + c_s * batch * context" + (
            " + e_s * (1 - (1 - moe_active_fraction) ** batch)"
            if self.moe_active_fraction is not None
            else ""
        )
        d["method"] = (
            "least squares on relative error (rows weighted by 1/measured), negative "
            "coefficients pinned to 0; r2 over the fitted times"
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecodeFit:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _weighted_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    w = 1.0 / y
    active = list(range(x.shape[1]))
    beta = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all() or len(active) == 1:
            beta[:] = 0.0
            beta[active] = np.maximum(sol, 0.0)
            return beta
        # pin the most negative (never the intercept first) and refit
        order = [i for i in np.argsort(sol) if sol[i] < 0]
        drop = next((active[i] for i in order if active[i] != 0), active[order[0]])
        active.remove(drop)
    return beta


def fit_decode(
    batches: Sequence[float],
    contexts: Sequence[float],
    seconds: Sequence[float],
    *,
    moe_active_fraction: float | None = None,
) -> DecodeFit:
    """Fit the decode model; pass ``moe_active_fraction`` (active/experts) for a MoE model."""
    b = np.asarray(batches, dtype=float)
    ctx = np.asarray(contexts, dtype=float)
    y = np.asarray(seconds, dtype=float)
    if len(y) < 3:
        raise ValueError(f"need at least 3 decode timings to fit, got {len(y)}")
    if (y <= 0).any() or (b <= 0).any() or (ctx < 0).any():
        raise ValueError("decode timings, batches must be positive and contexts >= 0")
    cols = [np.ones_like(b), b, b * ctx]
    if moe_active_fraction is not None:
        cols.append(touched_fraction(b, moe_active_fraction))
    beta = _weighted_lstsq(np.column_stack(cols), y)
    fit = DecodeFit(
        a_s=float(beta[0]),
        b_s=float(beta[1]),
        c_s=float(beta[2]),
        r2=0.0,
        n=len(y),
        max_rel_err=0.0,
        median_rel_err=0.0,
        e_s=float(beta[3]) if moe_active_fraction is not None else 0.0,
        moe_active_fraction=moe_active_fraction,
    )
    pred = np.array([fit.itl(bb, cc) for bb, cc in zip(b, ctx, strict=True)])
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    rel = np.abs(pred - y) / y
    return replace(
        fit,
        r2=1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        max_rel_err=float(rel.max()),
        median_rel_err=float(np.median(rel)),
    )


# -- memory -----------------------------------------------------------------------------------


def kv_capacity_tokens(
    model: ModelSpec,
    memory_bytes: float,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    tp: int = 1,
) -> int:
    """KV tokens an instance of ``tp`` GPUs holds (the simulator's rule; 0: weights do not fit)."""
    tp = max(1, tp)
    free = memory_bytes * memory_fraction - model.weight_bytes / tp
    if free <= 0:
        return 0
    return int(free // (model.kv_bytes_per_token / min(tp, model.kv_heads)))


def max_sequences(
    fit: DecodeFit, itl_target_s: float, context: float, kv_tokens: int
) -> dict[str, Any]:
    by_itl = fit.max_batch(itl_target_s, context)
    by_kv = int(kv_tokens // max(1.0, context))
    return {
        "itl_target_s": itl_target_s,
        "context": int(context),
        "by_itl": min(by_itl, 1 << 20),
        "by_kv": by_kv,
        "sequences": min(by_itl, by_kv),
        "bound": "itl" if by_itl <= by_kv else "kv",
    }


def max_sequences_table(
    fit: DecodeFit,
    kv_tokens: int,
    itl_targets: Sequence[float] = ITL_TARGETS_S,
    contexts: Sequence[float] = TABLE_CONTEXTS,
) -> list[dict[str, Any]]:
    return [max_sequences(fit, t, c, kv_tokens) for t in itl_targets for c in contexts]


# -- the simulator's decode formula -----------------------------------------------------------


@dataclass(frozen=True)
class EngineDecodeFit:
    """Constants of ``overhead + max(memory/(bw*eff), compute/(peak*mfu))`` fitted to steps."""

    overhead_s: float
    hbm_efficiency: float
    decode_mfu: float
    max_rel_err: float
    median_rel_err: float
    compute_bound_points: int
    n: int


def fit_engine_decode(
    sets: Sequence[tuple[ModelSpec, Sequence[float], Sequence[float], Sequence[float]]],
    *,
    hbm_bytes_per_s: float,
    peak_flops: float,
) -> EngineDecodeFit:
    """Grid search over (eff, mfu); the overhead for each pair is the weighted mean residual.

    ``sets``: (model, batches, contexts, seconds) of one or more measured models (the
    simulator's constants are model-independent, so several models pin them better). Memory
    per step: ``model.decode_weight_bytes(batch) + kv_bytes_per_token * batch * context``
    (TP1); compute: ``2 * active_params * batch``. Minimises squared relative error. Where no
    point is compute-bound under the best fit, ``decode_mfu`` is the largest value that keeps
    every point memory-bound (a lower bound on the GPU's real decode MFU).
    """
    mem_l: list[float] = []
    comp_l: list[float] = []
    y_l: list[float] = []
    for model, batches, contexts, seconds in sets:
        for bb, cc, ss in zip(batches, contexts, seconds, strict=True):
            mem_l.append(model.decode_weight_bytes(int(bb)) + model.kv_bytes_per_token * bb * cc)
            comp_l.append(2.0 * model.active_params * bb)
            y_l.append(ss)
    mem, comp, y = np.array(mem_l), np.array(comp_l), np.array(y_l, dtype=float)
    if len(y) < 3:
        raise ValueError("need at least 3 decode timings to fit")
    effs = np.arange(0.40, 1.0001, 0.0025)
    mfus = np.arange(0.05, 1.0001, 0.01)
    t_mem = mem[None, :] / (hbm_bytes_per_s * effs[:, None])  # (E, N)
    t_comp = comp[None, :] / (peak_flops * mfus[:, None])  # (M, N)
    core = np.maximum(t_mem[:, None, :], t_comp[None, :, :])  # (E, M, N)
    w = 1.0 / y
    # overhead minimising sum(((o + core - y) / y)^2): o = sum((y - core) w^2) / sum(w^2)
    o = ((y - core) * w**2).sum(-1) / (w**2).sum()
    o = np.maximum(o, 0.0)
    err = (((o[..., None] + core - y) * w) ** 2).sum(-1)
    best = float(err.min())
    # among (near-)ties prefer the largest mfu (the least compute-bound claim)
    ei, mi = np.argwhere(err <= best * (1 + 1e-9) + 1e-18)[-1]
    eff, mfu, ov = float(effs[ei]), float(mfus[mi]), float(o[ei, mi])
    pred = ov + core[ei, mi]
    rel = np.abs(pred - y) / y
    bound = int((t_comp[mi] > t_mem[ei]).sum())
    return EngineDecodeFit(
        overhead_s=ov,
        hbm_efficiency=round(eff, 4),
        decode_mfu=round(mfu, 2),
        max_rel_err=float(rel.max()),
        median_rel_err=float(np.median(rel)),
        compute_bound_points=bound,
        n=len(y),
    )


# -- all derived numbers of one profile -------------------------------------------------------


def derive(
    model: ModelSpec,
    prefill: Sequence[dict[str, Any]],
    decode: Sequence[dict[str, Any]],
    *,
    memory_bytes: float | None,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    kv_tokens: int | None = None,
) -> dict[str, Any]:
    """The ``derived`` block of a profile from its raw points.

    ``prefill`` rows have ``prompt_tokens`` and ``total_ms`` (or ``tokens_per_s``); ``decode``
    rows ``batch``, ``context`` and ``step_ms``. ``kv_tokens`` overrides the memory rule (a
    Dynamo profile states its engine's KV capacity).
    """
    out: dict[str, Any] = {}
    if prefill:
        if all("tokens_per_s" in r for r in prefill):
            pts = sorted((float(r["prompt_tokens"]), float(r["tokens_per_s"])) for r in prefill)
        else:
            pts = prefill_points(
                [r["prompt_tokens"] for r in prefill], [r["total_ms"] / 1e3 for r in prefill]
            )
        out["prefill"] = {
            "points": [list(p) for p in pts],
            "unit": "prompt tokens, prefill tokens/s on one GPU (batch 1)",
            "peak_tokens_per_s": max(p[1] for p in pts),
        }
    if decode:
        fit = fit_decode(
            [r["batch"] for r in decode],
            [r["context"] for r in decode],
            [r["step_ms"] / 1e3 for r in decode],
            moe_active_fraction=(
                model.moe.active_experts / model.moe.experts if model.moe is not None else None
            ),
        )
        out["decode"] = fit.to_dict()
        if kv_tokens is None and memory_bytes:
            kv_tokens = kv_capacity_tokens(model, memory_bytes, memory_fraction)
        if kv_tokens is not None:
            out["kv"] = {
                "kv_tokens": int(kv_tokens),
                "kv_bytes_per_token": model.kv_bytes_per_token,
                "memory_fraction": memory_fraction if memory_bytes else None,
                "rule": (
                    "memory_bytes * memory_fraction - weight_bytes, over kv_bytes_per_token "
                    "(one GPU; the simulator's rule)"
                    if memory_bytes
                    else "stated by the source profile"
                ),
            }
            out["max_sequences"] = max_sequences_table(fit, int(kv_tokens))
    return out
