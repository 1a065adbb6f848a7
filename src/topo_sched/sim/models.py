"""Model shapes the serving simulator needs: how many bytes of weights and KV cache a model has.

Pure data. A :class:`ModelSpec` is the handful of numbers from a model's ``config.json`` that
decide its serving cost: weight bytes (what every decode step reads), KV bytes per token (what a
sequence holds in memory, what a prefill-to-decode transfer moves and what attention reads each
step) and active parameters (what a token costs in FLOPs).

The presets are shapes *like* public models, not the models themselves (no weights, no
tokenizer; only the shape matters here). Their numbers come from the public model cards and
``config.json`` files on Hugging Face (Qwen/Qwen3-8B, Qwen/Qwen3-32B, Qwen/Qwen3-235B-A22B,
released 2025-04-29; Qwen3 technical report, arXiv 2505.09388):

=====================  ======  ======  =====  ========  ========  ============  ===============
preset                 layers  hidden  heads  kv_heads  head_dim  intermediate  params (card)
=====================  ======  ======  =====  ========  ========  ============  ===============
qwen3-8b-like              36    4096     32         8       128         12288  8.2B
qwen3-32b-like             64    5120     64         8       128         25600  32.8B
qwen3-235b-moe-like        94    4096     64         4       128  1536/expert   235B, 22B active
=====================  ======  ======  =====  ========  ========  ============  ===============

All three: vocab 151936, untied input/output embeddings, bf16 weights (2 bytes), SwiGLU MLPs
(3 matrices). The MoE one has 128 experts per layer, 8 routed per token, no shared expert.
:meth:`ModelSpec.shape_params` recomputes the parameter count from the shape; it agrees with
the card's figure to within 1% for each preset (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoeSpec:
    """A mixture-of-experts MLP: ``experts`` per layer, ``active_experts`` routed per token."""

    experts: int
    active_experts: int
    #: Intermediate size of one expert's SwiGLU MLP (``moe_intermediate_size``).
    expert_intermediate: int

    def __post_init__(self) -> None:
        if not 0 < self.active_experts <= self.experts:
            raise ValueError(
                f"active_experts must be in 1..experts, got {self.active_experts}/{self.experts}"
            )


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    #: Dense MLP intermediate size (``intermediate_size``); unused by all-MoE layers.
    intermediate: int
    vocab: int
    dtype_bytes: int
    #: Total parameters in billions, as the model card states.
    params_b: float
    moe: MoeSpec | None = None
    #: Parameters a token passes through, in billions (MoE: the card's "activated"); None = all.
    active_params_b: float | None = None

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab", "dtype_bytes"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{self.name}: {f} must be positive")
        if self.params_b <= 0:
            raise ValueError(f"{self.name}: params_b must be positive")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads must be a multiple of kv_heads")

    # -- memory ------------------------------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token: ``2 * layers * kv_heads * head_dim * dtype``."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        """All weights, from the card's parameter count."""
        return self.params_b * 1e9 * self.dtype_bytes

    @property
    def active_params(self) -> float:
        """Parameters one token passes through (a count, not billions)."""
        return (self.active_params_b if self.active_params_b is not None else self.params_b) * 1e9

    @property
    def expert_params(self) -> float:
        """Parameters held in routed experts (0 for a dense model), from the shape."""
        if self.moe is None:
            return 0.0
        return float(
            self.layers * self.moe.experts * 3 * self.hidden * self.moe.expert_intermediate
        )

    def decode_weight_bytes(self, batch: int) -> float:
        """Weight bytes one decode step reads for ``batch`` sequences.

        Dense: all of them. MoE: the non-expert weights plus the experts at least one of the
        ``batch`` tokens is routed to; with uniform routing an expert is untouched with
        probability ``(1 - active/experts) ** batch``.
        """
        if self.moe is None:
            return self.weight_bytes
        experts = self.expert_params * self.dtype_bytes
        rest = max(0.0, self.weight_bytes - experts)
        touched = 1.0 - (1.0 - self.moe.active_experts / self.moe.experts) ** max(1, batch)
        return rest + experts * touched

    # -- compute -----------------------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def shape_params(self) -> float:
        """Parameter count implied by the shape (embeddings untied, SwiGLU, no biases)."""
        kv_dim = self.kv_heads * self.head_dim
        attn = self.hidden * self.q_dim * 2 + self.hidden * kv_dim * 2
        if self.moe is None:
            mlp = 3 * self.hidden * self.intermediate
        else:
            mlp = self.moe.experts * 3 * self.hidden * self.moe.expert_intermediate
            mlp += self.hidden * self.moe.experts  # router
        return float(self.layers * (attn + mlp) + 2 * self.vocab * self.hidden)


_QWEN3_VOCAB = 151936

#: Presets by name. Shapes like the public Qwen3 cards (see the module docstring for sources).
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        # Qwen/Qwen3-8B config.json: 36 layers, hidden 4096, 32 heads, 8 KV heads, head_dim 128,
        # intermediate 12288; card: 8.2B parameters.
        ModelSpec(
            name="qwen3-8b-like",
            layers=36,
            hidden=4096,
            heads=32,
            kv_heads=8,
            head_dim=128,
            intermediate=12288,
            vocab=_QWEN3_VOCAB,
            dtype_bytes=2,
            params_b=8.2,
        ),
        # Qwen/Qwen3-32B config.json: 64 layers, hidden 5120, 64 heads, 8 KV heads, head_dim 128,
        # intermediate 25600; card: 32.8B parameters.
        ModelSpec(
            name="qwen3-32b-like",
            layers=64,
            hidden=5120,
            heads=64,
            kv_heads=8,
            head_dim=128,
            intermediate=25600,
            vocab=_QWEN3_VOCAB,
            dtype_bytes=2,
            params_b=32.8,
        ),
        # Qwen/Qwen3-235B-A22B config.json: 94 layers, hidden 4096, 64 heads, 4 KV heads,
        # head_dim 128, 128 experts, 8 per token, moe_intermediate_size 1536; card: 235B total,
        # 22B activated.
        ModelSpec(
            name="qwen3-235b-moe-like",
            layers=94,
            hidden=4096,
            heads=64,
            kv_heads=4,
            head_dim=128,
            intermediate=12288,
            vocab=_QWEN3_VOCAB,
            dtype_bytes=2,
            params_b=235.0,
            moe=MoeSpec(experts=128, active_experts=8, expert_intermediate=1536),
            active_params_b=22.0,
        ),
    )
}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; presets: {', '.join(sorted(MODELS))}") from None
