"""Time a slice of transformer layers of a model shape on one GPU (needs PyTorch).

Imported only by ``topo-sched profile`` when it measures: nothing else in the package imports
torch. What is built and timed (random bf16 weights: values do not change the timing):

Layer (Qwen3-style, one of ``slice_layers`` distinct copies, so weights are re-read from HBM)
    RMSNorm -> fused QKV projection -> per-head RMSNorm of q and k together -> rotary
    embedding (rotate-half in three kernels, cos/sin precomputed) -> attention -> output
    projection -> residual -> RMSNorm -> MLP -> residual. Element-wise work takes about 18
    kernels a layer (production engines fuse it into about 10-12), so the fixed per-step cost
    measured here is somewhat above an engine's; the GEMMs and attention are the library's.
    MLP: dense SwiGLU (fused gate/up GEMM, SiLU*up, down GEMM) or MoE (below).
Prefill attention (batch 1, a prompt of L tokens)
    ``scaled_dot_product_attention(causal, enable_gqa)`` restricted to the flash / cuDNN /
    memory-efficient kernels (never the O(L^2)-memory math kernel on a GPU); if the GQA flag
    is refused, K/V are expanded to all query heads first (the method notes say which ran).
Decode attention (batch B, every sequence ``context`` tokens long)
    a preallocated KV cache per layer, ``[B, kv_heads, context, head_dim]`` for K and for V;
    the step writes the new token's K/V at the last position, then runs SDPA with the query
    heads grouped per KV head (``q`` viewed as ``[B, kv_heads, heads/kv_heads, head_dim]``,
    no mask): one read of the cache per step, as GQA decode kernels do. Each point is also
    timed with attention as two batched GEMMs (``softmax(q K^T / sqrt(d)) V`` through
    ``torch.matmul``, fp32 softmax) and the faster variant is kept (both are in the raw
    rows): the fused kernel parallelises over batch x KV heads only, which leaves most SMs
    idle at small batches and long contexts, where split-KV kernels of engines (FlashInfer,
    flash-decoding) and the GEMMs do not. Where the caches of all slice layers do not fit,
    the layers share one cache (flagged ``kv_shared``; such caches are far larger than L2, so
    the re-read still comes from HBM); where one does not fit, the point is skipped.
MoE
    router GEMM -> top-k of the logits -> softmax over the k (timed, as the engine pays for
    them) -> tokens gathered in expert order -> one grouped GEMM for gate/up over all experts
    -> SiLU*up -> one grouped GEMM for down -> weighted scatter-add back to tokens. Grouped
    GEMMs are ``torch.nn.functional.grouped_mm`` (CUTLASS on Hopper; only experts with tokens
    are read).
    The expert assignment is drawn uniformly at random on the host (k distinct experts per
    token, as a router over random weights gives) so the dispatch plan is static and the step
    can be captured in a CUDA graph; the router's own top-k result is computed but not used to
    dispatch. Without a usable grouped GEMM, a loop of per-expert GEMMs over the experts that
    have tokens (the notes say which).
Timing
    each step is captured in a CUDA graph where capture works (else run eagerly) and its
    replays timed with CUDA events, after ``warmup`` replays; the median of ``iters`` is kept.
    Per-layer time = slice time / slice layers. The embedding gather + final norm + LM-head
    GEMM ("head") is timed separately: for prefill the gather of L tokens and the logits of
    the last token, for decode the gather and logits of B tokens. Full model =
    ``layers * per-layer + head``: always a measured slice, scaled (also when the model
    would fit), and the profile says so. Sampling and the engine's scheduler are not timed.
Copies
    host<->device over pinned host memory (``copy_bytes``, best of ``copy_repeats``), a
    device-to-device copy, and an 8192^3 bf16 GEMM as the GPU's achievable matrix rate.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from topo_sched.sim.models import ModelSpec

LogFn = Callable[[str], None]


class BenchError(RuntimeError):
    pass


@dataclass
class BenchConfig:
    prompt_lengths: list[int] = field(
        default_factory=lambda: [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    )
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768])
    slice_layers: int = 2
    warmup: int = 3
    iters: int = 10
    copy_bytes: int = 1 << 30
    copy_repeats: int = 5
    cuda_graphs: bool = True
    #: Bytes of GPU memory left free beyond what a point needs (activations, graph pools).
    reserve_bytes: int = 6 << 30
    seed: int = 0
    device: str = "cuda"


#: Decode attention variants timed at every point; the faster one is kept (see the docstring).
DECODE_ATTN = ("sdpa", "bmm")

QUICK = {
    "prompt_lengths": [128, 512, 2048, 8192],
    "batches": [1, 8, 32, 128],
    "contexts": [1024, 4096, 16384],
    "warmup": 2,
    "iters": 5,
    "copy_bytes": 256 << 20,
    "copy_repeats": 3,
}


def torch_status() -> str | None:
    """None when PyTorch with a CUDA GPU is usable here; else why not (one line)."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    try:
        ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception as e:  # a broken driver install
        return f"CUDA is not usable ({e})"
    return None if ok else "no CUDA GPU is visible to PyTorch"


# -- the model slice ----------------------------------------------------------------------------


class _Net:
    """``slice_layers`` layers + the head of one model shape, with random weights."""

    def __init__(self, m: ModelSpec, n_layers: int, dev: Any, torch: Any, seed: int) -> None:
        self.m, self.t, self.dev = m, torch, dev
        self.dtype = torch.bfloat16
        self.F = torch.nn.functional
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        self.gen = g

        def w(*shape: int) -> Any:
            return torch.empty(*shape, device=dev, dtype=self.dtype).normal_(0.0, 0.02, generator=g)

        qd, kvd, h = m.q_dim, m.kv_heads * m.head_dim, m.hidden
        self.layers: list[dict[str, Any]] = []
        for _ in range(n_layers):
            lw: dict[str, Any] = {
                "qkv": w(qd + 2 * kvd, h),
                "o": w(h, qd),
                "ln1": torch.ones(h, device=dev, dtype=self.dtype),
                "ln2": torch.ones(h, device=dev, dtype=self.dtype),
                "qn": torch.ones(m.head_dim, device=dev, dtype=self.dtype),
                "kn": torch.ones(m.head_dim, device=dev, dtype=self.dtype),
            }
            if m.moe is None:
                lw["gu"] = w(2 * m.intermediate, h)
                lw["down"] = w(h, m.intermediate)
            else:
                e, ie = m.moe.experts, m.moe.expert_intermediate
                lw["router"] = w(e, h)
                # stored [E, out, in] like nn.Linear; the grouped GEMM takes [E, in, out] views
                lw["w13"] = w(e, 2 * ie, h)
                lw["w2"] = w(e, h, ie)
            self.layers.append(lw)
        self.embed = w(m.vocab, h)
        self.lm_head = w(m.vocab, h)
        self.final_norm = torch.ones(h, device=dev, dtype=self.dtype)
        self.eps = 1e-6
        self.gqa_mode = "native"
        self.grouped_mm_mode = "n/a (dense)"
        if m.moe is not None:
            self.grouped_mm_mode = self._probe_grouped_mm()
        self._sdpa_ctx = self._sdpa_backends()

    # -- pieces -------------------------------------------------------------------------------

    def _sdpa_backends(self) -> Callable[[], Any]:
        if self.dev.type != "cuda":
            return lambda: _nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        if hasattr(SDPBackend, "CUDNN_ATTENTION"):
            backends.append(SDPBackend.CUDNN_ATTENTION)
        return lambda: sdpa_kernel(backends)

    def _rms(self, x: Any, wt: Any) -> Any:
        return self.F.rms_norm(x, (x.shape[-1],), wt, self.eps)

    @staticmethod
    def _rope(x: Any, cos: Any, sin_signed: Any) -> Any:
        """Rotate-half RoPE in three kernels: ``x*cos + swap_halves(x)*[-sin, sin]``."""
        d = x.shape[-1] // 2
        swapped = x.unflatten(-1, (2, d)).flip(-2).flatten(-2)
        return torch_addcmul(x * cos, swapped, sin_signed)

    def rope_tables(self, positions: Any) -> tuple[Any, Any]:
        """cos and sign-folded sin, ``[T, 1, head_dim]`` (broadcast over heads)."""
        t, d = self.t, self.m.head_dim
        inv = 1.0 / (1e6 ** (t.arange(0, d, 2, device=self.dev, dtype=t.float32) / d))
        ang = positions.to(t.float32)[:, None] * inv[None, :]
        cos = t.cat([ang.cos(), ang.cos()], dim=-1)[:, None, :]
        sin = t.cat([-ang.sin(), ang.sin()], dim=-1)[:, None, :]
        return cos.to(self.dtype), sin.to(self.dtype)

    def _probe_grouped_mm(self) -> str:
        """'grouped_mm', 'grouped_mm (groups padded to 16 rows)' or 'loop'."""
        t, fn = self.t, self._grouped_fn()
        if fn is None:
            return "loop"
        k, n = 64, 48
        for pad in (1, 16):
            counts = [3, 0, 5, 2] if pad == 1 else [16, 0, 32, 16]
            try:
                a = t.randn(sum(counts), k, device=self.dev, dtype=self.dtype)
                b = t.randn(len(counts), n, k, device=self.dev, dtype=self.dtype)
                offs = t.tensor(counts, device=self.dev).cumsum(0).to(t.int32)
                out = fn(a, b.transpose(-2, -1), offs=offs)
                ref, s = [], 0
                for e, c in enumerate(counts):
                    ref.append(a[s : s + c].float() @ b[e].float().T)
                    s += c
                r = t.cat(ref)
                err = float((out.float() - r).norm() / r.norm())
                if err < 2e-2:
                    return "grouped_mm" if pad == 1 else "grouped_mm (groups padded to 16 rows)"
            except Exception:
                continue
        return "loop"

    def _grouped_fn(self) -> Any:
        t = self.t
        return getattr(t.nn.functional, "grouped_mm", None) or getattr(t, "_grouped_mm", None)

    def moe_plan(self, tokens: int, seed: int) -> dict[str, Any]:
        """Static dispatch: uniform random k distinct experts per token, drawn on the host."""
        t, m = self.t, self.m
        assert m.moe is not None
        e, k = m.moe.experts, m.moe.active_experts
        g = t.Generator()
        g.manual_seed(seed)
        ids = t.rand(tokens, e, generator=g).topk(k, dim=-1).indices.reshape(-1)  # [T*k]
        order = t.argsort(ids, stable=True)
        counts = t.bincount(ids, minlength=e).tolist()
        pad = 16 if "padded" in self.grouped_mm_mode else 1
        tok_idx: list[int] = []
        flat_idx: list[int] = []
        padded_counts: list[int] = []
        pos = 0
        order_l = order.tolist()
        for c in counts:
            pc = c if c == 0 else -(-c // pad) * pad
            rows = order_l[pos : pos + c]
            tok_idx += [r // k for r in rows] + [0] * (pc - c)
            flat_idx += rows + [tokens * k] * (pc - c)  # padding rows take weight 0
            padded_counts.append(pc)
            pos += c
        dev = self.dev
        plan = {
            "tok": t.tensor(tok_idx, device=dev, dtype=t.long),
            "flat": t.tensor(flat_idx, device=dev, dtype=t.long),
            "offs": t.tensor(padded_counts, device=dev).cumsum(0).to(t.int32),
            "counts": padded_counts,
            "padded": pad > 1,
        }
        return plan

    def _moe(self, lw: dict[str, Any], h: Any, plan: dict[str, Any]) -> Any:
        t, F, m = self.t, self.F, self.m
        assert m.moe is not None
        n_tok = h.shape[0]
        # top-k of the logits, softmax over those k: the renormalised top-k softmax
        topl, _topi = F.linear(h, lw["router"]).topk(m.moe.active_experts, dim=-1)
        topw = topl.float().softmax(-1).reshape(-1)
        if plan["padded"]:
            topw = t.cat([topw, topw.new_zeros(1)])
        wflat = topw.index_select(0, plan["flat"])
        xs = h.index_select(0, plan["tok"])
        if self.grouped_mm_mode.startswith("grouped_mm"):
            fn = self._grouped_fn()
            gu = fn(xs, lw["w13"].transpose(-2, -1), offs=plan["offs"])
            g, u = gu.chunk(2, dim=-1)
            d = fn(F.silu(g) * u, lw["w2"].transpose(-2, -1), offs=plan["offs"])
        else:
            outs, s = [], 0
            for e, c in enumerate(plan["counts"]):
                if c:
                    gu = F.linear(xs[s : s + c], lw["w13"][e])
                    g, u = gu.chunk(2, dim=-1)
                    outs.append(F.linear(F.silu(g) * u, lw["w2"][e]))
                s += c
            d = t.cat(outs)
        out = t.zeros(n_tok, m.hidden, device=self.dev, dtype=self.dtype)
        return out.index_add_(0, plan["tok"], d * wflat.to(self.dtype)[:, None])

    def _mlp(self, lw: dict[str, Any], h: Any, plan: dict[str, Any] | None) -> Any:
        if self.m.moe is not None:
            assert plan is not None
            return self._moe(lw, h, plan)
        g, u = self.F.linear(h, lw["gu"]).chunk(2, dim=-1)
        return self.F.linear(self.F.silu(g) * u, lw["down"])

    def _qkv(self, lw: dict[str, Any], x: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        """q ``[T, heads, D]``, k and v ``[T, kv_heads, D]`` (q/k: RMSNorm per head + RoPE).

        q and k are normed and rotated together (one pass over both, as engines' fused
        qk-norm/RoPE kernels do); the per-head norm weights are ones and left out.
        """
        m = self.m
        kvd = m.kv_heads * m.head_dim
        qkv = self.F.linear(self._rms(x, lw["ln1"]), lw["qkv"])
        qk = qkv[:, : m.q_dim + kvd].unflatten(-1, (m.heads + m.kv_heads, m.head_dim))
        qk = self._rope(self.F.rms_norm(qk, (m.head_dim,), None, self.eps), cos, sin)
        v = qkv[:, m.q_dim + kvd :].unflatten(-1, (m.kv_heads, m.head_dim))
        return qk[:, : m.heads], qk[:, m.heads :], v

    def _finish(self, lw: dict[str, Any], x: Any, o: Any, plan: dict[str, Any] | None) -> Any:
        x = x + self.F.linear(o, lw["o"])
        return x + self._mlp(lw, self._rms(x, lw["ln2"]), plan)

    # -- steps --------------------------------------------------------------------------------

    def prefill_step(self, x: Any, cos: Any, sin: Any, plan: dict[str, Any] | None) -> Any:
        F, m = self.F, self.m
        n = x.shape[0]
        for lw in self.layers:
            q, k, v = self._qkv(lw, x, cos, sin)
            q, k, v = (y.transpose(0, 1).unsqueeze(0) for y in (q, k, v))  # [1, H, L, D]
            with self._sdpa_ctx():
                if self.gqa_mode == "native":
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                else:
                    rep = m.heads // m.kv_heads
                    k2 = k.repeat_interleave(rep, dim=1)
                    v2 = v.repeat_interleave(rep, dim=1)
                    o = F.scaled_dot_product_attention(q, k2, v2, is_causal=True)
            x = self._finish(lw, x, o.squeeze(0).transpose(0, 1).reshape(n, m.q_dim), plan)
        return x

    def decode_step(
        self,
        x: Any,
        cos: Any,
        sin: Any,
        caches: list[tuple[Any, Any]],
        plan: dict[str, Any] | None,
        attn: str = "sdpa",
    ) -> Any:
        """One decode step; ``attn`` 'sdpa' (fused kernel) or 'bmm' (two batched GEMMs)."""
        F, m, t = self.F, self.m, self.t
        b = x.shape[0]
        grp = m.heads // m.kv_heads
        scale = m.head_dim**-0.5
        for lw, (kc, vc) in zip(self.layers, caches, strict=True):
            q, k, v = self._qkv(lw, x, cos, sin)
            pos = kc.shape[2] - 1
            kc[:, :, pos, :] = k
            vc[:, :, pos, :] = v
            q4 = q.reshape(b, m.kv_heads, grp, m.head_dim)
            if attn == "sdpa":
                with self._sdpa_ctx():
                    o = F.scaled_dot_product_attention(q4, kc, vc)
            else:
                s = t.matmul(q4 * scale, kc.transpose(-1, -2))  # [B, kv_heads, grp, context]
                o = t.matmul(t.softmax(s, dim=-1, dtype=t.float32).to(self.dtype), vc)
            x = self._finish(lw, x, o.reshape(b, m.q_dim), plan)
        return x

    def head_step(self, ids: Any, n_logits: int) -> Any:
        h = self.F.embedding(ids, self.embed)
        h = self._rms(h[-n_logits:], self.final_norm)
        return self.F.linear(h, self.lm_head)


def torch_addcmul(a: Any, b: Any, c: Any) -> Any:
    return a.addcmul_(b, c)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


# -- timing -------------------------------------------------------------------------------------


class _Timer:
    def __init__(self, torch: Any, dev: Any, cfg: BenchConfig) -> None:
        self.t, self.dev, self.cfg = torch, dev, cfg
        self.graphs_used = 0
        self.eager_used = 0

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.t.cuda.synchronize(self.dev)

    def _events(self, fn: Callable[[], Any], n: int) -> list[float]:
        t = self.t
        out: list[float] = []
        if self.dev.type == "cuda":
            evs = [
                (t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True))
                for _ in range(n)
            ]
            for s, e in evs:
                s.record()
                fn()
                e.record()
            self.sync()
            out = [s.elapsed_time(e) for s, e in evs]
        else:
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return out

    def measure(self, fn: Callable[[], Any]) -> dict[str, float]:
        """Median/min/max milliseconds of ``fn``; captured in a CUDA graph where possible."""
        t, cfg = self.t, self.cfg
        run = fn
        graph = None
        if self.dev.type == "cuda" and cfg.cuda_graphs:
            try:
                s = t.cuda.Stream()
                s.wait_stream(t.cuda.current_stream())
                with t.cuda.stream(s):
                    for _ in range(2):
                        fn()
                t.cuda.current_stream().wait_stream(s)
                graph = t.cuda.CUDAGraph()
                with t.cuda.graph(graph):
                    fn()
                run = graph.replay
            except Exception:
                graph = None
                run = fn
                self.sync()
        for _ in range(cfg.warmup):
            run()
        self.sync()
        ms = self._events(run, cfg.iters)
        if graph is not None:
            self.graphs_used += 1
            del graph
        else:
            self.eager_used += 1
        return {
            "median_ms": statistics.median(ms),
            "min_ms": min(ms),
            "max_ms": max(ms),
        }


# -- the benchmark --------------------------------------------------------------------------------


def _oom(torch: Any) -> tuple[type[BaseException], ...]:
    return (getattr(torch.cuda, "OutOfMemoryError", MemoryError), MemoryError)


def _free_bytes(torch: Any, dev: Any) -> int:
    if dev.type != "cuda":
        return 1 << 40
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free)


def _release(torch: Any, dev: Any) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def run_prefill(net: _Net, timer: _Timer, cfg: BenchConfig, log: LogFn) -> tuple[list, list]:
    t, m, dev = net.t, net.m, net.dev
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    n_sl = len(net.layers)
    for n in sorted(cfg.prompt_lengths):
        try:
            x = t.empty(n, m.hidden, device=dev, dtype=net.dtype).normal_(0, 1, generator=net.gen)
            cos, sin = net.rope_tables(t.arange(n, device=dev))
            plan = net.moe_plan(n, cfg.seed + n) if m.moe is not None else None
            ids = t.randint(0, m.vocab, (n,), device=dev, generator=net.gen)
            if net.gqa_mode == "native":
                try:
                    net.prefill_step(
                        x[:16], cos[:16], sin[:16], net.moe_plan(16, 0) if plan else None
                    )
                except (RuntimeError, TypeError):
                    net.gqa_mode = "expanded"
            sl = timer.measure(
                lambda x=x, cos=cos, sin=sin, plan=plan: net.prefill_step(x, cos, sin, plan)
            )
            hd = timer.measure(lambda ids=ids: net.head_step(ids, 1))
        except _oom(t) as e:
            skipped.append(
                {"kind": "prefill", "prompt_tokens": n, "reason": f"out of memory: {e}"[:200]}
            )
            log(f"  prefill {n:>6} tokens: skipped (out of memory)")
            _release(t, dev)
            continue
        layer = sl["median_ms"] / n_sl
        total = m.layers * layer + hd["median_ms"]
        rows.append(
            {
                "prompt_tokens": n,
                "slice_ms": round(sl["median_ms"], 4),
                "slice_min_ms": round(sl["min_ms"], 4),
                "slice_max_ms": round(sl["max_ms"], 4),
                "layer_ms": round(layer, 5),
                "head_ms": round(hd["median_ms"], 4),
                "total_ms": round(total, 4),
                "tokens_per_s": round(n / (total / 1e3), 1),
            }
        )
        log(f"  prefill {n:>6} tokens: {total:9.2f} ms  {n / total * 1e3:10.0f} tok/s")
        del x, cos, sin, plan, ids
        _release(t, dev)
    return rows, skipped


def run_decode(net: _Net, timer: _Timer, cfg: BenchConfig, log: LogFn) -> tuple[list, list]:
    t, m, dev = net.t, net.m, net.dev
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    n_sl = len(net.layers)
    heads: dict[int, float] = {}
    per_tok_layer = 2 * m.kv_heads * m.head_dim * 2  # K and V, bf16, one layer
    for b in sorted(cfg.batches):
        plan = net.moe_plan(b, cfg.seed + 7 * b) if m.moe is not None else None
        try:
            ids = t.randint(0, m.vocab, (b,), device=dev, generator=net.gen)
            heads[b] = timer.measure(lambda ids=ids, b=b: net.head_step(ids, b))["median_ms"]
        except Exception as e:
            raise BenchError(f"decode head at batch {b}: {e}") from e
        for ctx in sorted(cfg.contexts):
            need = b * ctx * per_tok_layer
            free = _free_bytes(t, dev) - cfg.reserve_bytes
            if need * n_sl <= free:
                shared = False
            elif need <= free:
                shared = True
            else:
                skipped.append(
                    {
                        "kind": "decode",
                        "batch": b,
                        "context": ctx,
                        "reason": f"KV cache of one layer ({need / 2**30:.1f} GiB) does not fit",
                    }
                )
                continue
            try:
                caches = []
                for i in range(n_sl):
                    if shared and i > 0:
                        caches.append(caches[0])
                        continue
                    kc = t.empty(b, m.kv_heads, ctx, m.head_dim, device=dev, dtype=net.dtype)
                    vc = t.empty_like(kc)
                    kc.normal_(0, 1, generator=net.gen)
                    vc.normal_(0, 1, generator=net.gen)
                    caches.append((kc, vc))
                x = t.empty(b, m.hidden, device=dev, dtype=net.dtype).normal_(
                    0, 1, generator=net.gen
                )
                cos, sin = net.rope_tables(t.full((b,), ctx - 1, device=dev))
                by_attn = {
                    a: timer.measure(
                        lambda x=x, cos=cos, sin=sin, caches=caches, plan=plan, a=a: (
                            net.decode_step(x, cos, sin, caches, plan, a)
                        )
                    )
                    for a in DECODE_ATTN
                }
                best = min(by_attn, key=lambda a: by_attn[a]["median_ms"])
                sl = by_attn[best]
            except _oom(t) as e:
                skipped.append(
                    {
                        "kind": "decode",
                        "batch": b,
                        "context": ctx,
                        "reason": f"out of memory: {e}"[:200],
                    }
                )
                log(f"  decode batch {b:>4} context {ctx:>6}: skipped (out of memory)")
                caches = []
                _release(t, dev)
                continue
            layer = sl["median_ms"] / n_sl
            step = m.layers * layer + heads[b]
            rows.append(
                {
                    "batch": b,
                    "context": ctx,
                    "slice_ms": round(sl["median_ms"], 4),
                    "slice_min_ms": round(sl["min_ms"], 4),
                    "slice_max_ms": round(sl["max_ms"], 4),
                    "layer_ms": round(layer, 5),
                    "head_ms": round(heads[b], 4),
                    "step_ms": round(step, 4),
                    "attention": best,
                    **{f"slice_ms_{a}": round(v["median_ms"], 4) for a, v in by_attn.items()},
                    "kv_shared": shared,
                }
            )
            log(
                f"  decode batch {b:>4} context {ctx:>6}: {step:8.3f} ms"
                + (" (shared KV)" if shared else "")
            )
            del caches, x, cos, sin
            _release(t, dev)
    return rows, skipped


def run_copies(torch: Any, dev: Any, cfg: BenchConfig, log: LogFn) -> dict[str, Any]:
    t = torch
    if dev.type != "cuda":
        return {}
    n = cfg.copy_bytes
    host = t.empty(n, dtype=t.uint8, pin_memory=True)
    host.fill_(1)
    d1 = t.empty(n, dtype=t.uint8, device=dev)
    d2 = t.empty(n, dtype=t.uint8, device=dev)
    d1.fill_(2)

    def best(fn: Callable[[], Any]) -> float:
        fn()
        t.cuda.synchronize(dev)
        times = []
        for _ in range(cfg.copy_repeats):
            s, e = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return min(times)

    h2d = best(lambda: d1.copy_(host, non_blocking=True))
    d2h = best(lambda: host.copy_(d1, non_blocking=True))
    d2d = best(lambda: d2.copy_(d1))
    out = {
        "bytes": n,
        "repeats": cfg.copy_repeats,
        "statistic": "best",
        "h2d_pinned_bytes_per_s": round(n / h2d),
        "d2h_pinned_bytes_per_s": round(n / d2h),
        "d2d_copy_bytes_per_s": round(n / d2d),
        "d2d_read_plus_write_bytes_per_s": round(2 * n / d2d),
    }
    log(
        f"  copies: H2D {n / h2d / 1e9:.1f} GB/s, D2H {n / d2h / 1e9:.1f} GB/s, "
        f"D2D {2 * n / d2d / 1e12:.2f} TB/s (read+write)"
    )
    _release(t, dev)
    return out


def run_gemm(torch: Any, dev: Any, cfg: BenchConfig, log: LogFn) -> dict[str, Any]:
    t = torch
    if dev.type != "cuda":
        return {}
    n = 8192
    a = t.randn(n, n, device=dev, dtype=t.bfloat16)
    b = t.randn(n, n, device=dev, dtype=t.bfloat16)
    timer = _Timer(t, dev, BenchConfig(warmup=3, iters=10, cuda_graphs=False))
    r = timer.measure(lambda: a @ b)
    flops = 2 * n**3 / (r["median_ms"] / 1e3)
    log(f"  bf16 GEMM {n}^3: {flops / 1e12:.0f} TFLOP/s")
    _release(t, dev)
    return {
        "m_n_k": [n, n, n],
        "dtype": "bfloat16",
        "median_ms": round(r["median_ms"], 4),
        "flops_per_s": round(flops),
    }


def environment(torch: Any, dev: Any) -> dict[str, Any]:
    """GPU (from NVML where it answers, else PyTorch) and software versions."""
    t = torch
    gpu: dict[str, Any] = {}
    sw: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": t.__version__,
        "cuda_runtime": t.version.cuda,
        "cudnn": t.backends.cudnn.version() if t.backends.cudnn.is_available() else None,
    }
    if dev.type == "cuda":
        p = t.cuda.get_device_properties(dev)
        gpu.update(
            {
                "name": p.name,
                "memory_bytes": int(p.total_memory),
                "compute_capability": f"{p.major}.{p.minor}",
                "multiprocessors": p.multi_processor_count,
                "l2_cache_bytes": getattr(p, "L2_cache_size", None),
                "source": "torch.cuda.get_device_properties",
            }
        )
        gpu.update(_nvml(t, dev))
    else:
        gpu.update(
            {"name": f"cpu ({platform.processor() or platform.machine()})", "memory_bytes": None}
        )
    return {"gpu": gpu, "software": sw}


def _nvml(torch: Any, dev: Any) -> dict[str, Any]:
    try:
        import pynvml as nv
    except ImportError:
        return {"nvml": "pynvml (nvidia-ml-py) not installed"}
    try:
        nv.nvmlInit()
    except Exception as e:
        return {"nvml": f"NVML unavailable: {e}"}
    try:
        h = None
        uuid = getattr(torch.cuda.get_device_properties(dev), "uuid", None)
        if uuid is not None:
            try:
                h = nv.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                h = None
        if h is None:
            h = nv.nvmlDeviceGetHandleByIndex(dev.index or 0)

        def s(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        out: dict[str, Any] = {
            "name": s(nv.nvmlDeviceGetName(h)),
            "memory_bytes": int(nv.nvmlDeviceGetMemoryInfo(h).total),
            "driver": s(nv.nvmlSystemGetDriverVersion()),
            "source": "NVML",
        }
        for key, fn in (
            ("cuda_driver_version", lambda: nv.nvmlSystemGetCudaDriverVersion()),
            ("max_sm_clock_mhz", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
            ("max_memory_clock_mhz", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)),
            ("memory_bus_width_bits", lambda: nv.nvmlDeviceGetMemoryBusWidth(h)),
            ("power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000),
            ("pci_bus_id", lambda: s(nv.nvmlDeviceGetPciInfo(h).busId)),
        ):
            try:
                out[key] = fn()
            except Exception:
                out[key] = None
        if out.get("max_memory_clock_mhz") and out.get("memory_bus_width_bits"):
            # double data rate: two transfers per clock
            out["hbm_bandwidth_bytes_per_s"] = (
                out["max_memory_clock_mhz"] * 1e6 * 2 * out["memory_bus_width_bits"] / 8
            )
        return out
    except Exception as e:
        return {"nvml": f"NVML query failed: {e}"}
    finally:
        with contextlib.suppress(Exception):
            nv.nvmlShutdown()


def run(model: ModelSpec, cfg: BenchConfig, log: LogFn = print) -> dict[str, Any]:
    """Measure ``model``: returns ``{"environment", "raw", "method"}`` for the profile."""
    import torch as t

    dev = t.device(cfg.device)
    if dev.type == "cuda" and dev.index is None:
        dev = t.device("cuda", t.cuda.current_device())
    if cfg.slice_layers < 1:
        raise BenchError("the slice needs at least one layer")
    n_sl = min(cfg.slice_layers, model.layers)
    t.manual_seed(cfg.seed)
    started = time.time()
    env = environment(t, dev)
    log(f"{model.name} on {env['gpu'].get('name')}: slice of {n_sl} of {model.layers} layers")
    with t.inference_mode():
        copies = run_copies(t, dev, cfg, log)
        gemm = run_gemm(t, dev, cfg, log)
        net = _Net(model, n_sl, dev, t, cfg.seed)
        timer = _Timer(t, dev, cfg)
        prefill, sk1 = run_prefill(net, timer, cfg, log)
        decode, sk2 = run_decode(net, timer, cfg, log)
    method = {
        "slice": {
            "layers_measured": n_sl,
            "model_layers": model.layers,
            "scaled": True,
            "rule": "full model = model_layers * (slice time / layers_measured) + head "
            "(embedding gather + final norm + LM-head GEMM, timed separately)",
            "why": "a slice is always measured and scaled, also when the model would fit: "
            "faster, and the same method for every model size",
        },
        "weights": "random bf16 (values do not change the timing), Qwen3-style layers",
        "attention_prefill": "torch SDPA, causal, "
        + (
            "enable_gqa=True"
            if net.gqa_mode == "native"
            else "K/V expanded to all query heads (enable_gqa refused)"
        )
        + ("; flash / memory-efficient / cuDNN kernels only" if dev.type == "cuda" else ""),
        "attention_decode": "preallocated KV cache [batch, kv_heads, context, head_dim] per "
        "layer; new K/V written at the last position; query heads grouped per KV head (q as "
        "[batch, kv_heads, heads/kv_heads, head_dim]), no mask; timed both as SDPA and as two "
        "batched GEMMs with an fp32 softmax, the faster kept per point (raw: attention, "
        "slice_ms_sdpa, slice_ms_bmm)",
        "mlp": "dense SwiGLU (fused gate/up GEMM)"
        if model.moe is None
        else f"MoE: router GEMM + softmax + top-{model.moe.active_experts} timed; tokens "
        f"dispatched by a static uniform-random plan over {model.moe.experts} experts; "
        f"expert GEMMs: {net.grouped_mm_mode}",
        "timing": f"CUDA events, {cfg.warmup} warm-up then median of {cfg.iters}; steps "
        "captured in CUDA graphs and replayed"
        if dev.type == "cuda" and cfg.cuda_graphs
        else f"{cfg.warmup} warm-up then median of {cfg.iters} (host clock, eager)",
        "graphs_captured": timer.graphs_used,
        "eager_steps": timer.eager_used,
        "not_timed": "sampling, detokenisation, the engine's scheduler and host overhead, "
        "tensor-parallel communication (one GPU)",
        "prefill_batch": 1,
        "decode_context": "every sequence of a batch holds `context` tokens",
        "seconds": round(time.time() - started, 1),
    }
    return {
        "environment": env,
        "raw": {
            "prefill": prefill,
            "decode": decode,
            "skipped": sk1 + sk2,
            "copy": copies,
            "gemm": gemm,
        },
        "method": method,
    }
