"""Regenerate the gRPC stubs under ``topo_sched.rpc`` from the ``.proto`` files in ``proto/``.

Run from a source checkout::

    python -m topo_sched.rpc.generate            # rewrite the stubs in place
    python -m topo_sched.rpc.generate --check    # exit 1 if the committed stubs are stale

protoc runs with ``-I proto``, so a file ``proto/<dir>/<name>.proto`` becomes the modules
``topo_sched.rpc.<dir>.<name>_pb2`` (messages), ``..._pb2_grpc`` (service stubs) and a
``..._pb2.pyi`` type stub. protoc writes imports between generated modules relative to the
include root (``from podresources.v1 import api_pb2``); this script prefixes those lines with
``topo_sched.rpc.`` so the stubs import as a normal package, without sys.path tricks. Nothing
else in protoc's output is touched.

The output depends on the grpcio-tools version (it is recorded in the ``*_pb2_grpc.py`` files and
the ``*_pb2.py`` files check the protobuf runtime against it), so regenerate with the version the
project pins.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

# Every .proto under proto/ that gets Python stubs, relative to proto/. Add new files here.
PROTOS: tuple[str, ...] = ("podresources/v1/api.proto", "topo_sched/v1/placement.proto")

PACKAGE = "topo_sched.rpc"
REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = REPO_ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent

GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")

_IMPORT_RE = re.compile(r"^from ([A-Za-z_][\w.]*) import (\w+_pb2)\b", re.MULTILINE)


class GenerateError(RuntimeError):
    """protoc failed or the inputs are missing."""


def stub_paths(proto: str) -> list[str]:
    """Paths (relative to the output dir) of the files generated for one ``.proto``."""
    stem = proto.removesuffix(".proto")
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def _run_protoc(proto_dir: Path, out_dir: Path, protos: Sequence[str]) -> None:
    from grpc_tools import protoc  # test extra; imported here so the package never needs it

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise GenerateError(f"protoc exited with {rc} (args: {' '.join(args[1:])})")


def _rewrite_imports(text: str, local_modules: set[str]) -> str:
    """Make protoc's ``from a.b import c_pb2`` lines absolute for our own protos only."""

    def fix(match: re.Match[str]) -> str:
        pkg, mod = match.group(1), match.group(2)
        if f"{pkg}.{mod}" in local_modules:
            return f"from {PACKAGE}.{pkg} import {mod}"
        return match.group(0)

    return _IMPORT_RE.sub(fix, text)


def generate(
    out_dir: Path = OUT_DIR,
    *,
    proto_dir: Path = PROTO_DIR,
    protos: Iterable[str] = PROTOS,
) -> list[Path]:
    """Generate stubs for ``protos`` into ``out_dir``; return the stub files written.

    Missing ``__init__.py`` files are created (empty) in every package directory between
    ``out_dir`` and the stubs; existing ones are left alone.
    """
    protos = list(protos)
    missing = [p for p in protos if not (proto_dir / p).is_file()]
    if missing:
        raise GenerateError(f"not found under {proto_dir}: {', '.join(missing)}")
    if any(Path(p).parent == Path(".") for p in protos):
        raise GenerateError("put each .proto in a directory (e.g. <name>/v1/x.proto)")
    local_modules = {p.removesuffix(".proto").replace("/", ".") + "_pb2" for p in protos}

    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="topo-sched-protoc-") as tmp:
        raw = Path(tmp)
        _run_protoc(proto_dir, raw, protos)
        for proto in protos:
            for rel in stub_paths(proto):
                text = (raw / rel).read_text(encoding="utf-8")
                dest = out_dir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(_rewrite_imports(text, local_modules), encoding="utf-8")
                written.append(dest)
                pkg_dir = dest.parent
                while pkg_dir != out_dir and out_dir in pkg_dir.parents:
                    (pkg_dir / "__init__.py").touch(exist_ok=True)
                    pkg_dir = pkg_dir.parent
    return written


def stale_stubs(
    out_dir: Path = OUT_DIR,
    *,
    proto_dir: Path = PROTO_DIR,
    protos: Iterable[str] = PROTOS,
) -> list[str]:
    """Stub files under ``out_dir`` that differ from a fresh generation, are missing, or are
    left over from a ``.proto`` no longer listed. Empty when everything is current."""
    protos = list(protos)
    expected = {rel for p in protos for rel in stub_paths(p)}
    present = {
        str(path.relative_to(out_dir))
        for path in out_dir.rglob("*")
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
    }
    problems = [f"{rel} (no .proto in PROTOS produces it)" for rel in sorted(present - expected)]
    with tempfile.TemporaryDirectory(prefix="topo-sched-stubs-") as tmp:
        fresh = Path(tmp)
        generate(fresh, proto_dir=proto_dir, protos=protos)
        for rel in sorted(expected):
            if rel not in present:
                problems.append(f"{rel} (missing)")
            elif not filecmp.cmp(fresh / rel, out_dir / rel, shallow=False):
                problems.append(f"{rel} (differs from a fresh generation)")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m topo_sched.rpc.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR, help="include root (-I)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="stub output root")
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if the stubs are stale"
    )
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = stale_stubs(args.out, proto_dir=args.proto_dir)
            for problem in problems:
                print(f"stale: {problem}", file=sys.stderr)
            if problems:
                print("run: python -m topo_sched.rpc.generate", file=sys.stderr)
            return 1 if problems else 0
        for path in generate(args.out, proto_dir=args.proto_dir):
            print(path)
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
