"""Measured engine profiles (topo_sched.profiling): loading, fitting, Dynamo input, the CLI.

No GPU here: the tests read the profiles measured on an H100 and an H200 that ship in
``topo_sched/data/profiles/measured/`` (see its README). The Dynamo files in these tests are
SYNTHETIC: written by the tests in the documented format of Dynamo's profiler output
(prefill_raw_data.json / decode_raw_data.json), from known coefficients.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from topo_sched.cli import app
from topo_sched.profiling import bench
from topo_sched.profiling.capacity import (
    DEFAULT_CAPACITY_PROFILE,
    capacity_hints,
    fill_capacity,
)
from topo_sched.profiling.dynamo import DynamoFormatError, dynamo_profile, read_dynamo_raw
from topo_sched.profiling.fit import (
    DecodeFit,
    derive,
    fit_decode,
    kv_capacity_tokens,
    prefill_throughput,
)
from topo_sched.profiling.profile_io import (
    BUNDLED_MODELS,
    ProfileIOError,
    bundled_engine_profile,
    bundled_measured_profiles,
    engine_vs_measured,
    parse_profile,
    read_profile,
    to_engine_profile,
    write_profile,
)
from topo_sched.profiling.shapes import (
    SMALL_MOE,
    ModelConfigError,
    active_shape_params,
    resolve_model,
)
from topo_sched.scaling.config import Target
from topo_sched.sim.models import get_model
from topo_sched.sim.profile import EngineProfile, load_profile, profile_to_json

GPUS = ("h100", "h200")
MEASURED = [f"{g}-{m}" for g in GPUS for m in BUNDLED_MODELS]
runner = CliRunner()

#: Stated tolerance of the decode fit against the measured steps it was fitted to.
FIT_MEDIAN_REL = 0.05
FIT_MAX_REL = 0.20
FIT_R2 = 0.995
#: Timing noise allowed where physics says "never faster" (two runs of one point differ ~1%).
NOISE = 0.02


# -- the committed measured profiles ----------------------------------------------------------


def test_all_measured_profiles_are_bundled_and_load() -> None:
    assert set(MEASURED) <= set(bundled_measured_profiles())
    for name in MEASURED:
        mp = read_profile(name)
        assert mp.name == name
        gpu = name.split("-")[0].upper()
        assert gpu in mp.gpu_name
        assert mp.data["source"] == "topo-sched profile"
        assert mp.data["gpu"]["driver"] and mp.data["gpu"]["source"] == "NVML"
        assert mp.data["software"]["torch"].startswith("2.")
        # A slice was measured and scaled, and the profile says so.
        sl = mp.data["method"]["slice"]
        assert sl["scaled"] is True and mp.slice_scaled
        assert sl["layers_measured"] < sl["model_layers"] == mp.model.layers
        assert mp.data["method"]["eager_steps"] == 0  # every step ran as a CUDA graph
        assert not mp.data["raw"]["skipped"]
        assert mp.model == resolve_model(mp.model.name)


def test_prefill_points_are_prompt_over_scaled_time() -> None:
    for name in MEASURED:
        mp = read_profile(name)
        layers, sliced = mp.model.layers, mp.data["method"]["slice"]["layers_measured"]
        pts = dict(mp.prefill_points)
        for r in mp.raw_prefill():
            total = layers * r["slice_ms"] / sliced + r["head_ms"]
            assert r["total_ms"] == pytest.approx(total, rel=1e-3)
            assert pts[r["prompt_tokens"]] == pytest.approx(
                r["prompt_tokens"] / (r["total_ms"] / 1e3), rel=1e-3
            )


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-15)
    return a == b


def test_derived_block_is_reproducible_from_raw() -> None:
    for name in MEASURED:
        mp = read_profile(name)
        again = derive(mp.model, mp.raw_prefill(), mp.raw_decode(), memory_bytes=mp.memory_bytes)
        # equal up to float rounding (the device's numpy fitted them)
        assert _close(json.loads(json.dumps(again)), mp.data["derived"]), name


def test_decode_fit_reproduces_raw_points_within_tolerance() -> None:
    for name in MEASURED:
        mp = read_profile(name)
        fit = mp.decode_fit
        assert fit.r2 >= FIT_R2, name
        assert min(fit.a_s, fit.b_s, fit.c_s, fit.e_s) >= 0
        rel = [
            abs(fit.itl(r["batch"], r["context"]) * 1e3 - r["step_ms"]) / r["step_ms"]
            for r in mp.raw_decode()
        ]
        assert float(np.median(rel)) <= FIT_MEDIAN_REL, name
        assert max(rel) <= FIT_MAX_REL, name
        assert fit.median_rel_err == pytest.approx(float(np.median(rel)), rel=1e-6)
        # the MoE term exactly when the model is a MoE
        assert (fit.moe_active_fraction is not None) == (mp.model.moe is not None)


def test_measured_timings_are_monotonic_where_physics_says_so() -> None:
    for name in MEASURED:
        mp = read_profile(name)
        pre = mp.raw_prefill()
        assert [r["prompt_tokens"] for r in pre] == sorted(r["prompt_tokens"] for r in pre)
        for a, b in itertools.pairwise(pre):
            assert b["total_ms"] > a["total_ms"], name  # a longer prompt takes longer
        t = {(r["batch"], r["context"]): r["step_ms"] for r in mp.raw_decode()}
        batches = sorted({b for b, _ in t})
        contexts = sorted({c for _, c in t})
        for b in batches:
            for c1, c2 in itertools.pairwise(contexts):
                assert t[(b, c2)] >= t[(b, c1)] * (1 - NOISE), (name, b, c1, c2)
        for c in contexts:
            for b1, b2 in itertools.pairwise(batches):
                assert t[(b2, c)] >= t[(b1, c)] * (1 - NOISE), (name, c, b1, b2)
        # the fit is monotonic everywhere
        fit = mp.decode_fit
        assert fit.itl(64, 4096) > fit.itl(32, 4096) > fit.itl(32, 1024)


def test_bigger_model_is_slower_and_h200_decodes_faster() -> None:
    for g in GPUS:
        small, big = read_profile(f"{g}-qwen3-8b-like"), read_profile(f"{g}-qwen3-32b-like")
        assert big.prefill_tokens_per_s(2048) < small.prefill_tokens_per_s(2048)
        assert big.itl_s(32, 4096) > small.itl_s(32, 4096)
    for m in BUNDLED_MODELS:
        h100, h200 = read_profile(f"h100-{m}"), read_profile(f"h200-{m}")
        # decode reads memory: the H200's faster HBM wins at a large KV read
        assert h200.itl_s(64, 16384) < h100.itl_s(64, 16384), m
        assert (
            h200.data["gpu"]["hbm_bandwidth_bytes_per_s"]
            > (h100.data["gpu"]["hbm_bandwidth_bytes_per_s"])
        )


def test_max_sequences_table() -> None:
    for name in MEASURED:
        mp = read_profile(name)
        kv = kv_capacity_tokens(mp.model, mp.memory_bytes or 0)
        assert mp.kv_tokens == kv
        rows = mp.data["derived"]["max_sequences"]
        by = {(r["itl_target_s"], r["context"]): r for r in rows}
        targets = sorted({r["itl_target_s"] for r in rows})
        contexts = sorted({r["context"] for r in rows})
        for r in rows:
            assert r["sequences"] == min(r["by_itl"], r["by_kv"])
            assert r["by_kv"] == kv // r["context"]
            if r["by_itl"] > 0:  # the fitted step at that batch meets the target
                assert mp.itl_s(r["by_itl"], r["context"]) <= r["itl_target_s"] + 1e-12
            assert mp.itl_s(r["by_itl"] + 1, r["context"]) > r["itl_target_s"]
        for t in targets:
            seq = [by[(t, c)]["sequences"] for c in contexts]
            assert seq == sorted(seq, reverse=True)  # longer contexts, fewer sequences
        for c in contexts:
            seq = [by[(t, c)]["sequences"] for t in targets]
            assert seq == sorted(seq)  # a looser target, more sequences
    # 470 GB of weights hold no KV on one GPU
    assert read_profile("h100-qwen3-235b-moe-like").kv_tokens == 0


# -- the simulator's profile ------------------------------------------------------------------


def test_sim_load_profile_accepts_the_measured_default() -> None:
    for g in GPUS:
        p = load_profile(f"{g}-measured")
        assert isinstance(p, EngineProfile) and p.name == f"{g}-measured"
        assert g.upper() in p.gpu
        # the bundled file is exactly what the bundled measured profiles give
        assert p == bundled_engine_profile(g)
        path = Path(__file__).parents[1] / f"src/topo_sched/data/profiles/{g}-measured.json"
        assert path.read_text(encoding="utf-8") == profile_to_json(p)
        assert set(p.prefill_points_by_model) == set(BUNDLED_MODELS)
        assert "measured" in p.sources["prefill_points"]
        assert "carried over" in p.sources["tp_efficiency.NV"]


def test_measured_engine_profile_reproduces_measurements() -> None:
    p = load_profile("h100-measured")
    for m in BUNDLED_MODELS:
        mp = read_profile(f"h100-{m}")
        err = engine_vs_measured(p, mp)
        assert err["prefill_max_rel_err"] < 1e-3  # its own measured curve
        # the simulator's roofline is coarser than the per-model fit: stated tolerance
        assert err["decode_median_rel_err"] < 0.20, m
    # a model without a curve of its own scales the reference by active parameters
    ref = p.prefill_points
    assert p.reference_throughput(2048) == pytest.approx(dict(ref)[2048.0])


def test_default_scenario_runs_on_the_measured_profile() -> None:
    from topo_sched.sim.runner import prepare
    from topo_sched.sim.scenario import default_scenario, parse_scenario

    data = default_scenario().model_dump()
    data["profile"] = "h100-measured"
    prep = prepare(parse_scenario(data, source="test"), quick=True)
    assert prep.profile.name == "h100-measured"


def test_to_engine_profile_rejects_mixed_gpus() -> None:
    with pytest.raises(ProfileIOError, match="measured on"):
        to_engine_profile(
            read_profile("h100-qwen3-8b-like"), more=[read_profile("h200-qwen3-32b-like")]
        )


# -- capacity hints -----------------------------------------------------------------------------


def test_capacity_hints_from_the_default_profile() -> None:
    h = capacity_hints(itl_slo_s=0.05)
    mp = read_profile(DEFAULT_CAPACITY_PROFILE)
    assert h.prefill_tokens_per_second == pytest.approx(
        0.8 * mp.prefill_tokens_per_s(2048), rel=1e-3
    )
    assert h.decode_sequences >= 1
    assert mp.itl_s(h.decode_sequences, 4096) <= 0.8 * 0.05
    tight = capacity_hints(itl_slo_s=0.012)
    assert tight.decode_sequences < h.decode_sequences
    tp2 = capacity_hints(itl_slo_s=0.05, tp=2)
    assert tp2.prefill_tokens_per_second > h.prefill_tokens_per_second
    assert "profile h100-qwen3-8b-like" in h.sources["decode_sequences"]
    # another model needs its own profile, or a simulator profile plus the model
    with pytest.raises(ProfileIOError, match="measured for"):
        capacity_hints(itl_slo_s=0.05, model="qwen3-32b-like")
    sim = capacity_hints("h100-measured", itl_slo_s=0.05, tp=2, model="qwen3-32b-like")
    assert sim.prefill_tokens_per_second > 0 and sim.decode_sequences >= 1


def _target(capacity: dict) -> Target:
    return Target.model_validate(
        {
            "rbg": "llm/demo",
            "roles": {"prefill": 2, "decode": 1},
            "slo": {"ttftSeconds": 2, "itlSeconds": 0.05},
            "capacity": capacity,
        }
    )


def test_fill_capacity_keeps_given_figures() -> None:
    cap = fill_capacity(_target({}))
    assert cap.prefill_tokens_per_second and cap.decode_sequences
    assert cap.profile == DEFAULT_CAPACITY_PROFILE
    given = fill_capacity(_target({"prefillTokensPerSecond": 1234}))
    assert given.prefill_tokens_per_second == 1234
    assert given.decode_sequences == cap.decode_sequences
    other = fill_capacity(_target({"profile": "h100-qwen3-32b-like"}))
    assert other.prefill_tokens_per_second < cap.prefill_tokens_per_second


# -- fitting on synthetic data ------------------------------------------------------------------


def test_fit_decode_recovers_known_coefficients() -> None:
    b = np.array([1, 2, 4, 8, 16, 32, 64] * 3, dtype=float)
    c = np.repeat([1024.0, 4096.0, 16384.0], 7)
    y = 0.006 + 2e-5 * b + 4e-8 * b * c
    fit = fit_decode(b, c, y)
    assert (fit.a_s, fit.b_s, fit.c_s) == pytest.approx((0.006, 2e-5, 4e-8), rel=1e-6)
    assert fit.r2 == pytest.approx(1.0) and fit.max_rel_err < 1e-9
    moe = 0.005 + 1e-5 * b + 3e-8 * b * c + 0.02 * (1 - (1 - 8 / 128) ** b)
    f2 = fit_decode(b, c, moe, moe_active_fraction=8 / 128)
    assert f2.e_s == pytest.approx(0.02, rel=1e-6)
    assert DecodeFit.from_dict(f2.to_dict()) == f2
    # a coefficient that would go negative is pinned to 0
    flat = fit_decode(b, c, 0.01 - 1e-9 * b)
    assert flat.b_s == 0.0 and flat.a_s > 0
    assert fit.max_batch(0.006 + 2e-5 + 4e-8 * 4096 - 1e-12, 4096) == 0
    assert fit.max_batch(0.05, 4096) == int((0.05 - 0.006) / (2e-5 + 4e-8 * 4096))


def test_prefill_throughput_interpolates_in_log2() -> None:
    pts = [(128.0, 1000.0), (512.0, 3000.0)]
    assert prefill_throughput(pts, 256) == pytest.approx(2000.0)
    assert prefill_throughput(pts, 64) == pytest.approx(500.0)  # same time as 128
    assert prefill_throughput(pts, 4096) == 3000.0


# -- Dynamo profiler output (SYNTHETIC sample files) ---------------------------------------------

A, B, C = 0.008, 3e-5, 5e-8  # the synthetic engine's ITL = A + B*batch + C*batch*context


def _write_dynamo_json(d: Path) -> None:
    """Synthetic files in Dynamo's documented format (not real Dynamo output)."""
    isl = [128, 1024, 4096, 16384]
    ttft = [12.0, 40.0, 130.0, 600.0]  # ms
    (d / "prefill_raw_data.json").write_text(
        json.dumps(
            {
                "prefill_isl": isl,
                "prefill_ttft": ttft,
                "prefill_thpt_per_gpu": [n / (t / 1e3) / 2 for n, t in zip(isl, ttft, strict=True)],
            }
        )
    )
    max_kv = 200000
    usage, ctx, itl, tput = [], [], [], []
    for u in (0.1, 0.4, 0.8):
        for c in (1000.0, 4000.0, 8000.0):
            batch = u * max_kv / c
            usage.append(u)
            ctx.append(c)
            itl.append((A + B * batch + C * batch * c) * 1e3)
            tput.append(batch / (itl[-1] / 1e3) / 2)
    (d / "decode_raw_data.json").write_text(
        json.dumps(
            {
                "x_kv_usage": usage,
                "y_context_length": ctx,
                "z_itl": itl,
                "z_thpt_per_gpu": tput,
                "max_kv_tokens": max_kv,
            }
        )
    )


def test_dynamo_json_reader(tmp_path: Path) -> None:
    _write_dynamo_json(tmp_path)
    raw = read_dynamo_raw(tmp_path)
    assert raw["max_kv_tokens"] == 200000
    first = raw["decode"][0]
    assert first["batch"] == pytest.approx(0.1 * 200000 / 1000)
    assert first["kv_tokens"] == 20000 and first["step_ms"] == pytest.approx(
        (A + B * 20 + C * 20000) * 1e3
    )
    data = dynamo_profile(tmp_path, get_model("qwen3-8b-like"), gpu_name="NVIDIA H100")
    mp = parse_profile(json.loads(json.dumps(data)))
    fit = mp.decode_fit
    assert (fit.a_s, fit.b_s, fit.c_s) == pytest.approx((A, B, C), rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    # throughput per GPU as Dynamo states it (the synthetic engine had 2 GPUs)
    assert mp.prefill_tokens_per_s(1024) == pytest.approx(1024 / 0.040 / 2)
    assert mp.kv_tokens == 200000  # Dynamo's stated KV capacity, not the memory rule
    assert mp.data["source"] == "nvidia-dynamo profiler"


def test_dynamo_npz_reader(tmp_path: Path) -> None:
    _write_dynamo_json(tmp_path)
    pre = json.loads((tmp_path / "prefill_raw_data.json").read_text())
    dec = json.loads((tmp_path / "decode_raw_data.json").read_text())
    npz = tmp_path / "npz"
    (npz / "selected_prefill_interpolation").mkdir(parents=True)
    (npz / "selected_decode_interpolation").mkdir(parents=True)
    np.savez(
        npz / "selected_prefill_interpolation" / "raw_data.npz",
        **{k: np.array(v) for k, v in pre.items()},
    )
    dec["max_kv_tokens"] = [dec["max_kv_tokens"]]  # saved as a one-element array
    np.savez(
        npz / "selected_decode_interpolation" / "raw_data.npz",
        **{k: np.array(v) for k, v in dec.items()},
    )
    assert read_dynamo_raw(npz)["decode"] == read_dynamo_raw(tmp_path)["decode"]


def test_dynamo_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(DynamoFormatError, match="neither"):
        read_dynamo_raw(tmp_path)
    _write_dynamo_json(tmp_path)
    dec = json.loads((tmp_path / "decode_raw_data.json").read_text())
    dec["z_itl"] = dec["z_itl"][:-1]
    (tmp_path / "decode_raw_data.json").write_text(json.dumps(dec))
    with pytest.raises(DynamoFormatError, match="differ in length"):
        read_dynamo_raw(tmp_path)


# -- the command line ---------------------------------------------------------------------------


def test_cli_without_torch_or_gpu_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "torch_status", lambda: "PyTorch is not installed")
    res = runner.invoke(app, ["profile", "--model", "qwen3-8b-like"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "needs PyTorch with a CUDA GPU: pip install 'topo-sched[profile]'" in lines[0]


def test_cli_here_exits_2_unless_a_cuda_gpu_is_usable() -> None:
    if bench.torch_status() is None:
        pytest.skip("this machine has PyTorch with a CUDA GPU")
    res = runner.invoke(app, ["profile", "--model", "qwen3-8b-like", "--quick"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1


def test_cli_user_errors_exit_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["profile", "--model", "no-such-model"])
    assert res.exit_code == 2 and "unknown model" in res.stderr
    res = runner.invoke(app, ["profile"])
    assert res.exit_code == 2 and "--model" in res.stderr
    res = runner.invoke(
        app,
        [
            "profile",
            "--from-dynamo",
            str(tmp_path),
            "--model",
            "qwen3-8b-like",
            "--out",
            str(tmp_path / "o.json"),
        ],
    )
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1


def test_cli_from_dynamo_needs_no_gpu(tmp_path: Path) -> None:
    _write_dynamo_json(tmp_path)
    out = tmp_path / "dyn.json"
    res = runner.invoke(
        app,
        [
            "profile",
            "--from-dynamo",
            str(tmp_path),
            "--model",
            "qwen3-8b-like",
            "--out",
            str(out),
            "--gpu",
            "H100",
        ],
    )
    assert res.exit_code == 0, res.output
    mp = read_profile(out)
    assert mp.decode_fit.a_s == pytest.approx(A, rel=1e-6)
    assert "decode ITL at batch 32, 4k context" in res.stdout
    write_profile(mp.data, tmp_path / "again.json")
    assert read_profile(tmp_path / "again.json").data == mp.data


def test_base_install_imports_no_torch() -> None:
    code = (
        "import sys; import topo_sched.cli, topo_sched.profiling.fit, "
        "topo_sched.profiling.profile_io, topo_sched.profiling.dynamo, "
        "topo_sched.profiling.capacity, topo_sched.profiling.bench; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- model shapes -------------------------------------------------------------------------------


def test_small_moe_preset_matches_its_card() -> None:
    assert SMALL_MOE.shape_params() == pytest.approx(30.5e9, rel=0.01)
    assert active_shape_params(SMALL_MOE) == pytest.approx(3.3e9, rel=0.02)
    assert resolve_model("qwen3-30b-moe-like") is SMALL_MOE
    assert resolve_model("qwen3-8b-like") is get_model("qwen3-8b-like")


def test_model_file(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(
        "name: mixtral-like\nlayers: 32\nhidden: 4096\nheads: 32\nkv_heads: 8\nhead_dim: 128\n"
        "vocab: 32000\nmoe: {experts: 8, active_experts: 2, expert_intermediate: 14336}\n"
    )
    m = resolve_model(str(f))
    assert m.name == "mixtral-like" and m.moe is not None
    assert m.params_b == pytest.approx(m.shape_params() / 1e9, rel=1e-3)
    assert m.active_params_b == pytest.approx(active_shape_params(m) / 1e9, rel=1e-3)
    f.write_text("name: x\nlayers: 2\n")
    with pytest.raises(ModelConfigError, match="missing"):
        resolve_model(str(f))
    with pytest.raises(ModelConfigError, match="unknown model"):
        resolve_model("nope")


# -- the benchmark itself on a CPU (only where PyTorch is installed; never in CI) -----------------


def test_bench_runs_a_tiny_model_on_cpu() -> None:
    pytest.importorskip("torch")
    from topo_sched.sim.models import ModelSpec, MoeSpec

    for moe in (None, MoeSpec(8, 2, 32)):
        m = ModelSpec(
            name="tiny",
            layers=4,
            hidden=64,
            heads=4,
            kv_heads=2,
            head_dim=16,
            intermediate=128,
            vocab=500,
            dtype_bytes=2,
            params_b=0.001,
            moe=moe,
            active_params_b=0.0005 if moe else None,
        )
        cfg = bench.BenchConfig(
            prompt_lengths=[16, 64],
            batches=[1, 4],
            contexts=[32, 64],
            warmup=1,
            iters=2,
            device="cpu",
        )
        res = bench.run(m, cfg, log=lambda s: None)
        assert len(res["raw"]["prefill"]) == 2 and len(res["raw"]["decode"]) == 4
        assert res["method"]["slice"]["scaled"] is True


def test_autoscaler_capacity_comes_from_the_measured_profile_when_not_given():
    from topo_sched.profiling.capacity import target_with_capacity
    from topo_sched.scaling.config import parse_autoscaler_config

    def target(capacity):
        return parse_autoscaler_config(
            {
                "targets": [
                    {
                        "rbg": "llm/demo",
                        "roles": {"prefill": 2, "decode": 1},
                        "slo": {"ttftSeconds": 5, "itlSeconds": 0.04},
                        "capacity": capacity,
                    }
                ]
            }
        ).targets[0]

    tp1 = target_with_capacity(target({})).capacity
    tp2 = target_with_capacity(target({"prefillTensorParallel": 2})).capacity
    assert tp1.prefill_tokens_per_second > 1000 and tp1.decode_sequences > 1
    assert tp2.prefill_tokens_per_second > tp1.prefill_tokens_per_second
    given = target({"prefillTokensPerSecond": 1234, "decodeSequences": 7})
    assert target_with_capacity(given) is given  # figures in the config are never replaced
    with pytest.raises(ValueError, match="unknown model"):
        target_with_capacity(target({"model": "no-such-model"}))
