"""The measured-profile JSON: what ``topo-sched profile`` writes and the simulator can use.

One file per model and GPU::

    {
      "kind": "topo-sched/measured-profile", "version": 1,
      "name": "h100-qwen3-8b-like",
      "created": "2026-...Z",
      "source": "topo-sched profile" | "nvidia-dynamo profiler",
      "command": "topo-sched profile --model qwen3-8b-like ...",
      "model": {ModelSpec fields, kv_bytes_per_token, shape_params_b},
      "gpu": {name, memory_bytes, driver, ... from NVML},
      "software": {torch, cuda_runtime, cudnn, python},
      "method": {slice: {layers_measured, model_layers, scaled: true, ...}, ...},
      "raw": {prefill: [...], decode: [...], skipped: [...], copy: {...}, gemm: {...}},
      "derived": {prefill: {points}, decode: {a_s, b_s, c_s, r2, ...}, kv: {...},
                  max_sequences: [...]}
    }

The simulator reads :class:`~topo_sched.sim.profile.EngineProfile`, a model-independent
roofline with a source for every number; :func:`to_engine_profile` turns a measured profile into
one (the least invasive route: ``sim/profile.py`` is unchanged). Measured: the prefill curve
(for this model, which becomes the reference model), the decode constants (overhead, HBM
efficiency, decode MFU fitted to the measured steps with the simulator's own formula), the GPU's
memory and HBM bandwidth (NVML). Not measurable on one GPU and carried over from the base
profile (``default-h100``) with their sources: TP efficiencies, all-reduce base cost, NVLinks
per GPU, the engine's memory fraction and prefill batch budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from topo_sched.profiling.fit import (
    DEFAULT_MEMORY_FRACTION,
    DecodeFit,
    derive,
    fit_engine_decode,
    kv_capacity_tokens,
    prefill_throughput,
)
from topo_sched.profiling.shapes import model_from_dict, model_to_dict
from topo_sched.sim.models import ModelSpec

KIND = "topo-sched/measured-profile"
VERSION = 1
#: Bundled measured profiles: ``topo_sched/data/profiles/measured/<name>.json``.
MEASURED_DIR = ("data", "profiles", "measured")

#: Dense bf16 tensor-core FLOP/s by GPU name (datasheets), for the simulator's roofline.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H20": 148e12,
    "H800": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
    "L40S": 362e12,
}


class ProfileIOError(ValueError):
    """A measured profile that cannot be read or used."""


def utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def build_profile(
    *,
    name: str,
    model: ModelSpec,
    source: str,
    command: str,
    gpu: dict[str, Any],
    software: dict[str, Any],
    method: dict[str, Any],
    raw: dict[str, Any],
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    kv_tokens: int | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """A complete profile dict: the derived block is computed from ``raw``."""
    derived = derive(
        model,
        raw.get("prefill", []),
        raw.get("decode", []),
        memory_bytes=gpu.get("memory_bytes"),
        memory_fraction=memory_fraction,
        kv_tokens=kv_tokens,
    )
    return {
        "kind": KIND,
        "version": VERSION,
        "name": name,
        "created": created or utc_now(),
        "source": source,
        "command": command,
        "model": model_to_dict(model),
        "gpu": gpu,
        "software": software,
        "method": method,
        "raw": raw,
        "derived": derived,
    }


def profile_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=False) + "\n"


def write_profile(data: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(profile_json(data), encoding="utf-8")
    return p


@dataclass(frozen=True)
class MeasuredProfile:
    """A read profile: the dict plus typed views of what the simulator and autoscaler use."""

    data: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def model(self) -> ModelSpec:
        return model_from_dict(self.data["model"], source=f"profile {self.name}: model")

    @property
    def gpu_name(self) -> str:
        return str(self.data.get("gpu", {}).get("name") or "unknown GPU")

    @property
    def memory_bytes(self) -> float | None:
        v = self.data.get("gpu", {}).get("memory_bytes")
        return float(v) if v else None

    @property
    def prefill_points(self) -> list[tuple[float, float]]:
        pts = self.data.get("derived", {}).get("prefill", {}).get("points")
        if not pts:
            raise ProfileIOError(f"profile {self.name}: no prefill points")
        return [(float(x), float(y)) for x, y in pts]

    @property
    def decode_fit(self) -> DecodeFit:
        d = self.data.get("derived", {}).get("decode")
        if not d:
            raise ProfileIOError(f"profile {self.name}: no decode fit")
        return DecodeFit.from_dict(d)

    @property
    def kv_tokens(self) -> int | None:
        kv = self.data.get("derived", {}).get("kv")
        return int(kv["kv_tokens"]) if kv else None

    @property
    def slice_scaled(self) -> bool:
        return bool(self.data.get("method", {}).get("slice", {}).get("scaled", False))

    def prefill_tokens_per_s(self, prompt_tokens: float) -> float:
        """Prefill tokens/s on one GPU for one prompt (log2-linear between points)."""
        return prefill_throughput(self.prefill_points, prompt_tokens)

    def itl_s(self, batch: float, context: float) -> float:
        return self.decode_fit.itl(batch, context)

    def raw_decode(self) -> list[dict[str, Any]]:
        return list(self.data.get("raw", {}).get("decode", []))

    def raw_prefill(self) -> list[dict[str, Any]]:
        return list(self.data.get("raw", {}).get("prefill", []))


def parse_profile(data: Any, *, source: str = "profile") -> MeasuredProfile:
    if not isinstance(data, dict):
        raise ProfileIOError(f"{source}: expected a JSON object")
    if data.get("kind") != KIND:
        raise ProfileIOError(f"{source}: not a measured profile (kind {data.get('kind')!r})")
    if data.get("version") != VERSION:
        raise ProfileIOError(f"{source}: unsupported version {data.get('version')!r}")
    for key in ("name", "model", "gpu", "raw", "derived"):
        if key not in data:
            raise ProfileIOError(f"{source}: missing {key!r}")
    mp = MeasuredProfile(data)
    try:
        mp.model  # noqa: B018 - validates the model block
    except ValueError as e:
        raise ProfileIOError(f"{source}: {e}") from None
    return mp


def read_profile(name_or_path: str | Path) -> MeasuredProfile:
    """A measured profile by path, or a bundled one by name (``h100-qwen3-8b-like``)."""
    p = Path(name_or_path)
    if isinstance(name_or_path, str) and p.suffix != ".json" and not p.exists():
        res = resources.files("topo_sched").joinpath(*MEASURED_DIR, f"{name_or_path}.json")
        if not res.is_file():
            raise ProfileIOError(f"no bundled measured profile {name_or_path!r} and no such file")
        text, src = res.read_text(encoding="utf-8"), f"bundled profile {name_or_path}"
    else:
        try:
            text, src = p.read_text(encoding="utf-8"), str(p)
        except OSError as e:
            raise ProfileIOError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileIOError(f"{src}: not JSON: {e}") from None
    return parse_profile(data, source=src)


def bundled_measured_profiles() -> list[str]:
    d = resources.files("topo_sched").joinpath(*MEASURED_DIR)
    if not d.is_dir():
        return []
    return sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".json"))


# -- to the simulator's EngineProfile ---------------------------------------------------------


def _peak_flops(gpu_name: str) -> float | None:
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in gpu_name.upper():
            return PEAK_BF16_FLOPS[key]
    return None


def to_engine_profile(
    reference: MeasuredProfile,
    *,
    more: Sequence[MeasuredProfile] = (),
    decode_fit_on: Sequence[MeasuredProfile] | None = None,
    name: str | None = None,
    base: Any = None,
    description: str | None = None,
) -> Any:
    """The simulator's ``EngineProfile`` from measured profiles of one GPU kind.

    ``reference``'s prefill curve becomes the reference curve (other models scale it by active
    parameters); it and every profile in ``more`` also add their own measured curve under
    ``prefill_points_by_model``. The decode constants (overhead, HBM efficiency, decode MFU)
    are fitted with the simulator's own formula to the raw decode steps of ``decode_fit_on``
    (default: the reference and every profile in ``more``: the constants are shared by all
    models, so all measured models pin them). ``base`` (an
    ``EngineProfile``; ``default-h100`` by default) supplies the constants one GPU cannot
    measure.
    """
    from topo_sched.sim.profile import EngineProfile, load_profile

    base = base if base is not None else load_profile("default-h100")
    mp = reference
    model = mp.model
    gpu = mp.data.get("gpu", {})
    for other in more:
        if other.gpu_name != mp.gpu_name:
            raise ProfileIOError(
                f"{other.name} was measured on {other.gpu_name}, {mp.name} on {mp.gpu_name}"
            )

    def src_of(p: MeasuredProfile) -> str:
        return (
            f"measured: {p.name}.json ({p.data.get('source', '?')}, {p.data.get('created', '?')})"
        )

    src = src_of(mp)
    mem = float(gpu.get("memory_bytes") or base.memory_bytes)
    bw = float(gpu.get("hbm_bandwidth_bytes_per_s") or base.hbm_bandwidth_bytes_per_s)
    peak = _peak_flops(str(gpu.get("name", ""))) or base.peak_flops
    fit_on = (
        list(decode_fit_on)
        if decode_fit_on is not None
        else [mp, *(p for p in more if p.model.name != model.name)]
    )
    sets = []
    for p in fit_on:
        raw = p.raw_decode()
        sets.append(
            (
                p.model,
                [r["batch"] for r in raw],
                [r["context"] for r in raw],
                [r["step_ms"] / 1e3 for r in raw],
            )
        )
    if sum(len(s[1]) for s in sets) < 3:
        raise ProfileIOError(f"profile {mp.name}: too few decode timings for the engine fit")
    ef = fit_engine_decode(sets, hbm_bytes_per_s=bw, peak_flops=peak)
    slice_note = ""
    sl = mp.data.get("method", {}).get("slice")
    if sl:
        slice_note = (
            f" A slice of {sl.get('layers_measured')} of {sl.get('model_layers')} layers was "
            "timed and scaled to the full model."
        )
    gemm = mp.data.get("raw", {}).get("gemm", {}).get("flops_per_s")
    gemm_note = (
        f" Measured here: an 8192^3 bf16 GEMM ran at {gemm / 1e12:.0f} TFLOP/s." if gemm else ""
    )
    fitted_on = ", ".join(p.model.name for p in fit_on)
    fit_note = (
        f" Fitted with topo_sched.profiling.fit.fit_engine_decode over {ef.n} measured decode "
        f"steps (batch x context grids) of {fitted_on}: median relative error "
        f"{ef.median_rel_err:.1%}, max {ef.max_rel_err:.1%}."
    )
    carried = "carried over from the base profile " + base.name + " (one GPU cannot measure it): "
    sources = {
        "memory_bytes": f"{src}: GPU memory from {gpu.get('source', 'NVML')} ({mem:.4g} B).",
        "memory_fraction": carried + base.sources["memory_fraction"],
        "hbm_bandwidth_bytes_per_s": (
            f"{src}: NVML max memory clock {gpu.get('max_memory_clock_mhz')} MHz x 2 (DDR) x "
            f"{gpu.get('memory_bus_width_bits')}-bit bus / 8."
            if gpu.get("hbm_bandwidth_bytes_per_s")
            else carried + base.sources["hbm_bandwidth_bytes_per_s"]
        ),
        "hbm_efficiency": "measured: the decode steps' memory term (weights touched + KV read) "
        "over this bandwidth." + fit_note + slice_note,
        "peak_flops": (
            f"spec: dense bf16 tensor-core rate of a {gpu.get('name')} (datasheet)." + gemm_note
        ),
        "prefill_reference_active_params_b": f"{src}: active parameters of {model.name} "
        "(the measured reference model).",
        "prefill_points": f"{src}: prefill tokens/s on one GPU, batch 1, against prompt length "
        "(prompt / (layers x per-layer time + head time))." + slice_note,
        "prefill_max_batch_tokens": carried + base.sources["prefill_max_batch_tokens"],
        "decode_step_overhead_s": "measured: fixed GPU time per decode step beyond the roofline "
        "memory term." + fit_note + " GPU time only: the engine's scheduler, sampling and host "
        "overhead are not included." + slice_note,
        "decode_mfu": (
            f"measured: fitted on the compute-bound steps ({ef.compute_bound_points} of {ef.n})."
            + fit_note
            if ef.compute_bound_points
            else "measured: no step was compute-bound; the largest MFU that keeps every "
            "measured step memory-bound (a lower bound)." + fit_note
        ),
        "allreduce_base_s": carried + base.sources["allreduce_base_s"],
        "nvlinks_per_gpu": carried + base.sources["nvlinks_per_gpu"],
    }
    for link in base.tp_efficiency:
        key = f"tp_efficiency.{link.value}"
        sources[key] = carried + base.sources[key]
    by_model: dict[str, list[list[float]]] = {}
    for p in [mp, *more]:
        by_model[p.model.name] = [[x, y] for x, y in p.prefill_points]
        psl = p.data.get("method", {}).get("slice", {})
        sources[f"prefill_points_by_model.{p.model.name}"] = (
            f"{src_of(p)}: prefill tokens/s on one GPU, batch 1, of this model itself"
            + (
                f" (a slice of {psl.get('layers_measured')} of {psl.get('model_layers')} "
                "layers, scaled)."
                if psl
                else "."
            )
        )
    data = {
        "name": name or mp.name,
        "description": description
        or (
            f"Measured on {gpu.get('name')} (driver {gpu.get('driver')}, torch "
            f"{mp.data.get('software', {}).get('torch')}) with `topo-sched profile`: prefill "
            f"curves of {', '.join(by_model)} (reference {model.name}), decode constants "
            f"fitted to {fitted_on}; TP/all-reduce constants carried over from {base.name}."
            f"{slice_note}"
        ),
        "gpu": str(gpu.get("name") or base.gpu),
        "memory_bytes": mem,
        "memory_fraction": base.memory_fraction,
        "hbm_bandwidth_bytes_per_s": bw,
        "hbm_efficiency": min(1.0, ef.hbm_efficiency),
        "peak_flops": peak,
        "prefill_reference_model": model.name,
        "prefill_reference_active_params_b": round(model.active_params / 1e9, 4),
        "prefill_points": [[x, y] for x, y in mp.prefill_points],
        "prefill_points_by_model": by_model,
        "prefill_max_batch_tokens": base.prefill_max_batch_tokens,
        "tp_efficiency": {k.value: v for k, v in base.tp_efficiency.items()},
        "decode_step_overhead_s": round(ef.overhead_s, 6),
        "decode_mfu": min(1.0, ef.decode_mfu),
        "allreduce_base_s": base.allreduce_base_s,
        "nvlinks_per_gpu": base.nvlinks_per_gpu,
        "sources": sources,
    }
    return EngineProfile.model_validate(data)


def engine_vs_measured(engine: Any, mp: MeasuredProfile) -> dict[str, float]:
    """How well an EngineProfile reproduces a measured profile's raw points (relative errors)."""
    model = mp.model
    dec = [
        abs(
            engine.decode_step_seconds(model, r["batch"], r["context"], 1, None) * 1e3
            - r["step_ms"]
        )
        / r["step_ms"]
        for r in mp.raw_decode()
    ]
    pre = [
        abs(engine.prefill_seconds(model, r["prompt_tokens"], 1, None) * 1e3 - r["total_ms"])
        / r["total_ms"]
        for r in mp.raw_prefill()
    ]

    def med(xs: list[float]) -> float:
        s = sorted(xs)
        return s[len(s) // 2] if s else math.nan

    return {
        "decode_median_rel_err": med(dec),
        "decode_max_rel_err": max(dec) if dec else math.nan,
        "prefill_median_rel_err": med(pre),
        "prefill_max_rel_err": max(pre) if pre else math.nan,
    }


def kv_tokens_for(mp: MeasuredProfile, tp: int = 1, memory_fraction: float | None = None) -> int:
    """KV tokens an instance of ``tp`` GPUs of the profile's kind holds for its model."""
    if tp == 1 and memory_fraction is None and mp.kv_tokens is not None:
        return mp.kv_tokens
    mem = mp.memory_bytes
    if mem is None:
        kv1 = mp.kv_tokens or 0
        return kv1 * max(1, tp)
    frac = memory_fraction if memory_fraction is not None else DEFAULT_MEMORY_FRACTION
    return kv_capacity_tokens(mp.model, mem, frac, tp)


#: Models of the bundled measured engine profiles (the first is the prefill reference).
BUNDLED_MODELS = ("qwen3-8b-like", "qwen3-32b-like", "qwen3-30b-moe-like", "qwen3-235b-moe-like")


def bundled_engine_profile(gpu: str = "h100") -> Any:
    """The simulator profile ``<gpu>-measured`` rebuilt from the bundled measured profiles.

    ``topo_sched/data/profiles/<gpu>-measured.json`` is exactly this, written with
    :func:`topo_sched.sim.profile.profile_to_json` (a test checks they agree).
    """
    mps = [read_profile(f"{gpu}-{m}") for m in BUNDLED_MODELS]
    return to_engine_profile(mps[0], more=mps[1:], name=f"{gpu}-measured")
