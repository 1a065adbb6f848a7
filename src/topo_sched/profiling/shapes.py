"""Model shapes ``topo-sched profile`` accepts: the simulator's presets, one small MoE, or YAML.

The small MoE is shaped like Qwen/Qwen3-30B-A3B (config.json: 48 layers, hidden 2048, 32
attention heads, 4 KV heads, head_dim 128, 128 experts with 8 routed per token,
moe_intermediate_size 768, vocab 151936, untied embeddings; card: 30.5B parameters, 3.3B
activated). It lives here rather than in :data:`topo_sched.sim.models.MODELS` because that
table's test pins its three presets; :func:`resolve_model` looks in both.

A YAML (or JSON) model file holds :class:`~topo_sched.sim.models.ModelSpec` fields::

    name: my-model
    layers: 32
    hidden: 4096
    heads: 32
    kv_heads: 8
    head_dim: 128
    intermediate: 14336
    vocab: 128256
    dtype_bytes: 2          # optional, bf16
    params_b: 8.0           # optional: computed from the shape when left out
    moe: {experts: 8, active_experts: 2, expert_intermediate: 14336}   # optional
    active_params_b: 13.0   # optional (MoE): computed from the shape when left out
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from topo_sched.sim.models import MODELS, ModelSpec, MoeSpec
from topo_sched.yamlfile import read_yaml


class ModelConfigError(ValueError):
    """A model preset name or model file that cannot be used."""


SMALL_MOE = ModelSpec(
    name="qwen3-30b-moe-like",
    layers=48,
    hidden=2048,
    heads=32,
    kv_heads=4,
    head_dim=128,
    intermediate=6144,
    vocab=151936,
    dtype_bytes=2,
    params_b=30.5,
    moe=MoeSpec(experts=128, active_experts=8, expert_intermediate=768),
    active_params_b=3.3,
)

#: Presets ``topo-sched profile --model`` knows: the simulator's plus the small MoE.
PRESETS: dict[str, ModelSpec] = {**MODELS, SMALL_MOE.name: SMALL_MOE}

_REQUIRED = ("name", "layers", "hidden", "heads", "kv_heads", "head_dim", "vocab")
_KNOWN = {*_REQUIRED, "intermediate", "dtype_bytes", "params_b", "moe", "active_params_b"}


def model_to_dict(m: ModelSpec) -> dict[str, Any]:
    d = asdict(m)
    d["kv_bytes_per_token"] = m.kv_bytes_per_token
    d["shape_params_b"] = round(m.shape_params() / 1e9, 3)
    return d


def active_shape_params(m: ModelSpec) -> float:
    """Parameters one token passes through, from the shape (routed experts pro rata)."""
    total = m.shape_params()
    if m.moe is None:
        return total
    return total - m.expert_params * (1 - m.moe.active_experts / m.moe.experts)


def model_from_dict(d: Any, *, source: str = "model") -> ModelSpec:
    if not isinstance(d, dict):
        raise ModelConfigError(f"{source}: expected a mapping of model fields")
    unknown = sorted(set(d) - _KNOWN - {"kv_bytes_per_token", "shape_params_b"})
    if unknown:
        raise ModelConfigError(f"{source}: unknown field(s) {unknown}; known: {sorted(_KNOWN)}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ModelConfigError(f"{source}: missing field(s) {missing}")
    try:
        moe = None
        if d.get("moe") is not None:
            m = d["moe"]
            if not isinstance(m, dict):
                raise ModelConfigError(f"{source}: moe must be a mapping")
            moe = MoeSpec(
                experts=int(m["experts"]),
                active_experts=int(m["active_experts"]),
                expert_intermediate=int(m["expert_intermediate"]),
            )
        kw: dict[str, Any] = {
            "name": str(d["name"]),
            "layers": int(d["layers"]),
            "hidden": int(d["hidden"]),
            "heads": int(d["heads"]),
            "kv_heads": int(d["kv_heads"]),
            "head_dim": int(d["head_dim"]),
            "intermediate": int(d.get("intermediate") or 0),
            "vocab": int(d["vocab"]),
            "dtype_bytes": int(d.get("dtype_bytes", 2)),
            "params_b": float(d.get("params_b") or 1.0),
            "moe": moe,
            "active_params_b": d.get("active_params_b"),
        }
        if moe is None and kw["intermediate"] <= 0:
            raise ModelConfigError(f"{source}: a dense model needs intermediate > 0")
        spec = ModelSpec(**kw)
        if d.get("params_b") is None:
            kw["params_b"] = round(spec.shape_params() / 1e9, 3)
        if moe is not None and d.get("active_params_b") is None:
            kw["active_params_b"] = round(active_shape_params(spec) / 1e9, 3)
        return ModelSpec(**kw)
    except ModelConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ModelConfigError(f"{source}: {e}") from None


def resolve_model(name_or_file: str) -> ModelSpec:
    """A preset by name, or a YAML/JSON model file by path."""
    if name_or_file in PRESETS:
        return PRESETS[name_or_file]
    p = Path(name_or_file)
    if p.suffix.lower() in (".yaml", ".yml", ".json") or p.exists():
        return model_from_dict(read_yaml(p, ModelConfigError), source=str(p))
    raise ModelConfigError(
        f"unknown model {name_or_file!r}: a preset ({', '.join(sorted(PRESETS))}) "
        "or a YAML model file"
    )
