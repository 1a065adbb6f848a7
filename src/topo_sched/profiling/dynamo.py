"""Read NVIDIA Dynamo's profiler output into a measured profile (no GPU needed).

Dynamo's pre-deployment profiler (``profile_sla``) leaves, for the parallel mapping it picks,
two interpolation data sets; the planner and the mocker read them as a directory holding
either the JSON pair or the NumPy pair:

``prefill_raw_data.json`` (or ``selected_prefill_interpolation/raw_data.npz``)
    ``prefill_isl``: input sequence lengths profiled; ``prefill_ttft``: time to first token of
    one request of that length alone on the engine, milliseconds; ``prefill_thpt_per_gpu``:
    prefill tokens/s per GPU at that length.
``decode_raw_data.json`` (or ``selected_decode_interpolation/raw_data.npz``)
    ``max_kv_tokens``: the decode engine's KV capacity in tokens (a number, or a one-element
    array); ``x_kv_usage``: share of that capacity in use (0..1) at each point;
    ``y_context_length``: the sequences' mean context length at each point; ``z_itl``:
    inter-token latency, milliseconds; ``z_thpt_per_gpu``: decode tokens/s per GPU.

Mapped here: prefill points are ``(isl, thpt_per_gpu)``; a decode point's batch is the active KV
tokens over the context, ``x_kv_usage * max_kv_tokens / y_context_length``, so ``batch *
context`` is the active KV; its step time is ``z_itl``. The same fits as a measured profile then
follow (:func:`topo_sched.profiling.fit.derive`), with ``max_kv_tokens`` as the KV capacity.
Dynamo's files do not name the model, the GPU or the TP size: pass the model (its shape is
needed to turn the profile into a simulator profile) and say what GPU it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from topo_sched.profiling.profile_io import ProfileIOError, build_profile
from topo_sched.sim.models import ModelSpec

PREFILL_JSON = "prefill_raw_data.json"
DECODE_JSON = "decode_raw_data.json"
PREFILL_NPZ = ("selected_prefill_interpolation", "raw_data.npz")
DECODE_NPZ = ("selected_decode_interpolation", "raw_data.npz")


class DynamoFormatError(ProfileIOError):
    pass


def _load(d: Path, json_name: str, npz: tuple[str, str]) -> tuple[dict[str, Any], str]:
    pj = d / json_name
    if pj.is_file():
        try:
            data = json.loads(pj.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DynamoFormatError(f"{pj}: cannot read: {e}") from None
        if not isinstance(data, dict):
            raise DynamoFormatError(f"{pj}: expected a JSON object")
        return data, str(pj)
    pn = d.joinpath(*npz)
    if pn.is_file():
        import numpy as np

        try:
            with np.load(pn) as z:
                return {k: z[k].tolist() for k in z.files}, str(pn)
        except (OSError, ValueError) as e:
            raise DynamoFormatError(f"{pn}: cannot read: {e}") from None
    raise DynamoFormatError(f"{d}: neither {json_name} nor {'/'.join(npz)}")


def _floats(data: dict[str, Any], key: str, src: str) -> list[float]:
    v = data.get(key)
    if not isinstance(v, list) or not v:
        raise DynamoFormatError(f"{src}: {key} must be a non-empty list")
    try:
        return [float(x) for x in v]
    except (TypeError, ValueError):
        raise DynamoFormatError(f"{src}: {key} must hold numbers") from None


def read_dynamo_raw(directory: str | Path) -> dict[str, Any]:
    """Raw points from a Dynamo profiler directory, in this project's raw-point shape."""
    d = Path(directory)
    if not d.is_dir():
        raise DynamoFormatError(f"{d}: not a directory")
    pre, psrc = _load(d, PREFILL_JSON, PREFILL_NPZ)
    dec, dsrc = _load(d, DECODE_JSON, DECODE_NPZ)
    isl = _floats(pre, "prefill_isl", psrc)
    ttft = _floats(pre, "prefill_ttft", psrc)
    thpt = _floats(pre, "prefill_thpt_per_gpu", psrc)
    if not len(isl) == len(ttft) == len(thpt):
        raise DynamoFormatError(
            f"{psrc}: prefill_isl, prefill_ttft, prefill_thpt_per_gpu differ in length"
        )
    prefill = [
        {"prompt_tokens": int(n), "total_ms": t, "tokens_per_s": g}
        for n, t, g in sorted(zip(isl, ttft, thpt, strict=True))
        if n > 0 and t > 0 and g > 0
    ]
    mkv = dec.get("max_kv_tokens")
    if isinstance(mkv, list):
        mkv = mkv[0] if mkv else None
    try:
        max_kv = int(float(mkv))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DynamoFormatError(f"{dsrc}: max_kv_tokens must be a number") from None
    if max_kv <= 0:
        raise DynamoFormatError(f"{dsrc}: max_kv_tokens must be positive")
    usage = _floats(dec, "x_kv_usage", dsrc)
    ctx = _floats(dec, "y_context_length", dsrc)
    itl = _floats(dec, "z_itl", dsrc)
    tput = dec.get("z_thpt_per_gpu")
    tput_l = _floats(dec, "z_thpt_per_gpu", dsrc) if tput is not None else [None] * len(itl)
    if not len(usage) == len(ctx) == len(itl) == len(tput_l):
        raise DynamoFormatError(f"{dsrc}: x_kv_usage, y_context_length, z_itl differ in length")
    decode = []
    for u, c, t, g in zip(usage, ctx, itl, tput_l, strict=True):
        if u <= 0 or c <= 0 or t <= 0:
            continue
        kv = u * max_kv
        decode.append(
            {
                "batch": round(kv / c, 3),
                "context": c,
                "kv_tokens": round(kv),
                "kv_usage": u,
                "step_ms": t,
                "tokens_per_s_per_gpu": g,
            }
        )
    if not prefill or len(decode) < 3:
        raise DynamoFormatError(
            f"{d}: too few usable points (prefill {len(prefill)}, decode {len(decode)})"
        )
    return {
        "prefill": prefill,
        "decode": decode,
        "max_kv_tokens": max_kv,
        "files": [psrc, dsrc],
    }


def dynamo_profile(
    directory: str | Path,
    model: ModelSpec,
    *,
    name: str | None = None,
    gpu_name: str | None = None,
    command: str = "",
) -> dict[str, Any]:
    """A measured profile (dict) from Dynamo profiler output for ``model``."""
    raw = read_dynamo_raw(directory)
    return build_profile(
        name=name or f"dynamo-{model.name}",
        model=model,
        source="nvidia-dynamo profiler",
        command=command,
        gpu={
            "name": gpu_name or "unknown (Dynamo profiles do not record it)",
            "memory_bytes": None,
        },
        software={},
        method={
            "source": "NVIDIA Dynamo pre-deployment profiler (profile_sla) interpolation data",
            "files": raw["files"],
            "prefill": "prefill_isl -> prompt tokens, prefill_thpt_per_gpu -> tokens/s per GPU, "
            "prefill_ttft (ms) -> total_ms",
            "decode": "batch = x_kv_usage * max_kv_tokens / y_context_length, context = "
            "y_context_length, step = z_itl (ms)",
            "kv": "max_kv_tokens of the decode engine (at its TP size) as the KV capacity",
            "note": "measured on real engines by Dynamo, at the engine's own TP size; per-GPU "
            "throughputs as Dynamo reports them",
        },
        raw={
            "prefill": raw["prefill"],
            "decode": raw["decode"],
            "max_kv_tokens": raw["max_kv_tokens"],
        },
        kv_tokens=raw["max_kv_tokens"],
    )
