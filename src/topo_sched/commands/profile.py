"""``topo-sched profile``: measure an engine profile on this machine's GPU, or read Dynamo's.

Thin: parse flags, run :mod:`topo_sched.profiling.bench` (PyTorch, imported only here and only
when measuring) or :mod:`topo_sched.profiling.dynamo`, write the profile JSON, print the
headline numbers. Without PyTorch or a CUDA GPU it exits 2 with one line.
"""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

HELP = (
    "Measure how fast a model shape runs on this machine's GPU and write an engine profile "
    "(JSON) that the simulator and the autoscaler read.\n\n"
    "Builds a slice of transformer layers of the model (a preset or a YAML model file) with "
    "random bf16 weights, times prefill against prompt length, decode steps against batch and "
    "context (with a KV cache) and pinned host<->device copies with CUDA events, scales the "
    "slice to the full model, and fits prefill tokens/s, decode ITL = a + b*batch + "
    "c*batch*context and the sequences one GPU sustains at ITL targets. Needs PyTorch with a "
    "CUDA GPU: pip install 'topo-sched\\[profile]'.\n\n"
    "With --from-dynamo DIR it reads NVIDIA Dynamo profiler output instead "
    "(prefill_raw_data.json and decode_raw_data.json, or the selected_*_interpolation/"
    "raw_data.npz pair) into the same fits; no GPU needed."
)

NEEDS = "needs PyTorch with a CUDA GPU: pip install 'topo-sched[profile]'"


def _fail(msg: str) -> NoReturn:
    typer.echo("error: " + " ".join(str(msg).split()), err=True)
    raise typer.Exit(2)


def _ints(value: str | None, flag: str) -> list[int] | None:
    if value is None:
        return None
    out: list[int] = []
    for part in filter(None, (x.strip() for x in value.split(","))):
        mult = 1
        if part[-1] in "kK":
            part, mult = part[:-1], 1024
        try:
            n = int(part) * mult
        except ValueError:
            _fail(f"{flag}: {part!r} is not a whole number (comma-separated, 4k = 4096)")
        if n <= 0:
            _fail(f"{flag}: values must be positive")
        out.append(n)
    if not out:
        _fail(f"{flag}: give at least one value")
    return sorted(set(out))


def _gpu_short(name: str) -> str:
    for key in ("H200", "H100", "H800", "H20", "B200", "A100", "L40S"):
        if key in name.upper():
            return key.lower()
    return "gpu"


def _summary(data: dict[str, Any]) -> list[str]:
    from topo_sched.profiling.profile_io import MeasuredProfile

    mp = MeasuredProfile(data)
    lines = [f"profile {mp.name}: {mp.model.name} on {mp.gpu_name}"]
    with contextlib.suppress(ValueError):
        tps = mp.prefill_tokens_per_s(2048)
        lines.append(f"  prefill at 2k prompt: {tps:,.0f} tok/s per GPU")
    try:
        f = mp.decode_fit
        lines.append(
            f"  decode ITL at batch 32, 4k context: {f.itl(32, 4096) * 1e3:.2f} ms "
            f"(fit R^2 {f.r2:.4f}, median error {f.median_rel_err:.1%})"
        )
        raw = {(r["batch"], r["context"]): r["step_ms"] for r in mp.raw_decode()}
        if (32, 4096) in raw:
            lines.append(f"  measured at batch 32, 4k context: {raw[(32, 4096)]:.2f} ms")
    except ValueError:
        pass
    for row in data.get("derived", {}).get("max_sequences", []):
        if row["context"] == 4096 and row["itl_target_s"] == 0.05:
            lines.append(
                f"  sequences at ITL <= 50 ms, 4k context: {row['sequences']} "
                f"({row['bound']}-bound)"
            )
    return lines


def profile(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model shape: a preset (qwen3-8b-like, qwen3-32b-like, qwen3-30b-moe-like, "
            "qwen3-235b-moe-like) or a YAML model file.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Profile JSON to write (default: <gpu>-<model>.json).", dir_okay=False
        ),
    ] = None,
    prompt_lengths: Annotated[
        str | None,
        typer.Option(
            "--prompt-lengths", help="Prefill prompt lengths, comma-separated (128..32k)."
        ),
    ] = None,
    batches: Annotated[
        str | None, typer.Option("--batches", help="Decode batch sizes, comma-separated (1..256).")
    ] = None,
    contexts: Annotated[
        str | None,
        typer.Option("--contexts", help="Decode context lengths, comma-separated (1k..32k)."),
    ] = None,
    layers: Annotated[
        int,
        typer.Option("--layers", help="Layers in the measured slice (scaled to the model).", min=1),
    ] = 2,
    quick: Annotated[
        bool, typer.Option("--quick", help="A small grid and fewer repetitions (a fast look).")
    ] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="Profile name (default: <gpu>-<model>).")
    ] = None,
    from_dynamo: Annotated[
        Path | None,
        typer.Option(
            "--from-dynamo",
            help="Read NVIDIA Dynamo profiler output from this directory instead of measuring.",
            file_okay=False,
        ),
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option("--gpu", help="With --from-dynamo: the GPU the Dynamo profile ran on."),
    ] = None,
) -> None:
    """Measure an engine profile on this GPU (or read Dynamo's) for the simulator and autoscaler."""
    from topo_sched.profiling.profile_io import ProfileIOError, write_profile
    from topo_sched.profiling.shapes import ModelConfigError, resolve_model

    args: list[str] = []
    for flag, val in (
        ("--model", model),
        ("--from-dynamo", from_dynamo),
        ("--gpu", gpu),
        ("--prompt-lengths", prompt_lengths),
        ("--batches", batches),
        ("--contexts", contexts),
        ("--layers", layers if from_dynamo is None else None),
        ("--name", name),
        ("--out", out),
    ):
        if val is not None:
            args += [flag, str(val)]
    if quick:
        args.append("--quick")
    command = shlex.join(["topo-sched", "profile", *args])
    if from_dynamo is not None:
        from topo_sched.profiling.dynamo import dynamo_profile

        if model is None:
            _fail("--from-dynamo needs --model (the shape the Dynamo profile was taken for)")
        if out is None:
            _fail("--from-dynamo needs --out FILE.json")
        try:
            spec = resolve_model(model)
            data = dynamo_profile(from_dynamo, spec, name=name, gpu_name=gpu, command=command)
        except (ModelConfigError, ProfileIOError) as e:
            _fail(str(e))
        write_profile(data, out)
        for line in _summary(data):
            typer.echo(line)
        typer.echo(f"wrote {out}")
        return

    if model is None:
        _fail("give --model PRESET|FILE.yaml (or --from-dynamo DIR)")
    try:
        spec = resolve_model(model)
    except ModelConfigError as e:
        _fail(str(e))
    from topo_sched.profiling import bench

    why = bench.torch_status()
    if why is not None:
        _fail(f"{NEEDS} ({why})")
    cfg = bench.BenchConfig(slice_layers=layers)
    if quick:
        for k, v in bench.QUICK.items():
            setattr(cfg, k, v)
    for attr, val, flag in (
        ("prompt_lengths", prompt_lengths, "--prompt-lengths"),
        ("batches", batches, "--batches"),
        ("contexts", contexts, "--contexts"),
    ):
        parsed = _ints(val, flag)
        if parsed is not None:
            setattr(cfg, attr, parsed)
    try:
        res = bench.run(spec, cfg, log=lambda s: typer.echo(s, err=True))
    except bench.BenchError as e:
        _fail(str(e))
    from topo_sched.profiling.profile_io import build_profile

    gpu_name = str(res["environment"]["gpu"].get("name") or "gpu")
    pname = name or f"{_gpu_short(gpu_name)}-{spec.name}"
    data = build_profile(
        name=pname,
        model=spec,
        source="topo-sched profile",
        command=command,
        gpu=res["environment"]["gpu"],
        software=res["environment"]["software"],
        method=res["method"],
        raw=res["raw"],
    )
    target = out or Path(f"{pname}.json")
    write_profile(data, target)
    for line in _summary(data):
        typer.echo(line)
    typer.echo(f"wrote {target}")


profile.__doc__ = HELP
