"""Extender latency: the topo-sched HTTP extender against a no-op extender, over real HTTP.

For each cluster size N (candidate nodes) the script builds a synthetic cluster
(``make_rack_cluster``: 8 nodes per rack, HGX H100 and 2-socket PCIe boxes with their topology
annotations), binds RBG and plain pods to about 30% of the nodes (the pending pod's own
group has a decode and a prefill placed, so PD proximity and best fit have work), and starts
two real uvicorn servers on 127.0.0.1, each in its own subprocess:

- ``topo-sched``: ``create_app(ClusterState.from_objects(...), PlacementEngine())``, with the
  uvicorn settings of ``topo-sched extender`` (access log off, keep-alive 120 s, log level
  INFO by default: one log line per request, as in production);
- ``no-op``: a FastAPI app that json-decodes the same ExtenderArgs body, reads ``Pod`` and
  ``NodeNames``, and answers filter with every node passed and prioritize with score 0 each
  (same response shapes). It is the floor: HTTP, JSON and FastAPI, no placement.

A client in this process then sends, over ONE keep-alive HTTP/1.1 connection per server
(``http.client``, with the headers kube-scheduler's Go client sends), ``--warmup`` and then
``--requests`` sequential cycles of ``POST /scheduler/filter`` + ``POST /scheduler/prioritize``
with ``nodeCacheCapable: true`` bodies (``Pod`` + ``NodeNames`` of all N nodes, ``Nodes`` null).
Each cycle is a fresh pending prefill pod (2 GPUs; new name and uid), as each scheduling cycle
is, so the engine's per-pod memo is shared by filter and prioritize of one cycle only. The two
servers are measured alternately (ABBA order), so machine noise hits both alike.
Times are client-side (``time.perf_counter_ns``), request written to reply read.

    python benchmarks/extender_latency.py
    python benchmarks/extender_latency.py --sizes 100,1000 --requests 100 --warmup 10
    python benchmarks/extender_latency.py --json latency.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Module level: FastAPI resolves the handlers' (string) annotations in the module globals.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

#: The acceptance line: filter + prioritize p99 within this factor of the no-op's, at this size.
TARGET_RATIO = 1.5
TARGET_SIZE = 1000

NODES_PER_RACK = 8
NAMESPACE = "llm"
GROUP = "bench"
PREFIX = "/scheduler"
#: What kube-scheduler v1.26's Go client sends (shared/fixtures/kube-scheduler-extender/).
HEADERS = {
    "User-Agent": "Go-http-client/1.1",
    "Content-Type": "application/json",
    "Accept-Encoding": "gzip",
}
VERBS = ("filter", "prioritize", "pair")
SERVERS = ("topo-sched", "no-op")
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
#: A no-op pair slower than this on loopback means TCP stalls, not work (delayed ACK is 40 ms).
STALL_MS = 20.0


# -- the cluster ----------------------------------------------------------------------------


def _dress(pod: dict[str, Any], index: int) -> dict[str, Any]:
    """The pod as kube-scheduler's informer copy looks (fixture ``filter-request-*``): no
    kind/apiVersion, service-account volume, default tolerations, priority, conditions."""
    pod = {k: v for k, v in pod.items() if k not in ("kind", "apiVersion")}
    meta = dict(pod["metadata"])
    meta["resourceVersion"] = str(1000 + index)
    meta["creationTimestamp"] = "2026-11-23T15:45:11Z"
    spec = dict(pod["spec"])
    spec.update(
        volumes=[
            {
                "name": "kube-api-access-m5fnd",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            }
        ],
        terminationGracePeriodSeconds=30,
        dnsPolicy="ClusterFirst",
        serviceAccountName="default",
        securityContext={},
        tolerations=[
            {
                "key": f"node.kubernetes.io/{t}",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }
            for t in ("not-ready", "unreachable")
        ],
        priority=0,
        enableServiceLinks=True,
        preemptionPolicy="PreemptLowerPriority",
    )
    return {
        **pod,
        "metadata": meta,
        "spec": spec,
        "status": {"phase": "Pending", "qosClass": "Guaranteed"},
    }


def build_cluster(
    size: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(nodes, bound pods, candidate node names in kube-scheduler's zone round-robin order).

    Deterministic: the server subprocess and the client build the same cluster.
    """
    from topo_sched.sim.cluster_builder import (
        HGX_H100_8GPU,
        PCIE_8X_RTX4090_2SOCKET,
        bound,
        bundled_topology,
        make_plain_pod,
        make_rack_cluster,
        make_rbg_pod,
    )

    hgx = bundled_topology(HGX_H100_8GPU)
    pcie = bundled_topology(PCIE_8X_RTX4090_2SOCKET)
    racks = -(-size // NODES_PER_RACK)
    zones = max(1, min(4, racks // 8))
    nodes = make_rack_cluster(racks, NODES_PER_RACK, [hgx, hgx, hgx, pcie], zones)
    names = [n["metadata"]["name"] for n in nodes]

    def quiet(i: int) -> str:  # a node without background pods (i % 10 == 0)
        return names[i - i % 10]

    pods: list[dict[str, Any]] = []
    # The pending pods' own group: a decode and a prefill already running.
    pods.append(bound(make_rbg_pod(NAMESPACE, GROUP, "decode", 0, 4), quiet(3 * len(names) // 4)))
    pods.append(bound(make_rbg_pod(NAMESPACE, GROUP, "prefill", 0, 2), quiet(len(names) // 3)))
    # Background on 30% of nodes (3 in every 10, deterministically):
    # other RBG groups' prefill/decode pods and plain pods, each leaving >= 2 GPUs free so
    # every node passes kube-scheduler's own NodeResourcesFit (it only sends such nodes).
    for i, name in enumerate(names):
        if i % 10 not in (1, 4, 7):
            continue
        gpus = (1, 2, 4, 6)[i // 10 % 4]
        kind = i // 3 % 3
        if kind == 0:
            pod = make_plain_pod("batch", f"train-{i}", gpus, node=name)
        else:
            role = "prefill" if kind == 1 else "decode"
            pod = bound(make_rbg_pod("serving", f"g{i // 30}", role, i, gpus), name)
        pods.append(pod)

    # kube-scheduler sends the nodes in its zone round-robin node-tree order.
    by_zone: dict[str, list[str]] = {}
    for n in nodes:
        by_zone.setdefault(n["metadata"]["labels"]["topology.kubernetes.io/zone"], []).append(
            n["metadata"]["name"]
        )
    order: list[str] = []
    columns = list(by_zone.values())
    for j in range(max(len(c) for c in columns)):
        order.extend(c[j] for c in columns if j < len(c))
    return nodes, pods, order[:size]


def pending_body(index: int, node_names: Sequence[str]) -> bytes:
    """ExtenderArgs (nodeCacheCapable: true) for a fresh pending prefill pod, as Go encodes it."""
    from topo_sched.sim.cluster_builder import make_rbg_pod

    pod = make_rbg_pod(
        NAMESPACE, GROUP, "prefill", 1000 + index, 2, uid=f"00000000-0000-4000-8000-{index:012d}"
    )
    args = {"Pod": _dress(pod, index), "Nodes": None, "NodeNames": list(node_names)}
    return json.dumps(args, separators=(",", ":")).encode()


# -- the servers (subprocess side) ------------------------------------------------------------


def noop_app() -> Any:
    """The baseline: parse the body, pass every node, score every node 0."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def _read(body: bytes) -> tuple[Any, list[str]]:
        args = json.loads(body)
        return args.get("Pod"), list(args.get("NodeNames") or [])

    @app.post(f"{PREFIX}/filter")
    async def filter_verb(request: Request) -> JSONResponse:
        _pod, names = _read(await request.body())
        return JSONResponse(
            {
                "Nodes": None,
                "NodeNames": names,
                "FailedNodes": {},
                "FailedAndUnresolvableNodes": {},
                "Error": "",
            }
        )

    @app.post(f"{PREFIX}/prioritize")
    async def prioritize_verb(request: Request) -> JSONResponse:
        _pod, names = _read(await request.body())
        return JSONResponse([{"Host": n, "Score": 0} for n in names])

    return app


def topo_app(size: int) -> Any:
    from topo_sched.extender.app import create_app
    from topo_sched.extender.state import ClusterState
    from topo_sched.placement.engine import PlacementEngine

    nodes, pods, _names = build_cluster(size)
    state = ClusterState.from_objects(nodes, pods)
    state.snapshot()  # as `topo-sched extender --snapshot` does: the first request is fast
    return create_app(state, PlacementEngine())


def serve(kind: str, size: int, log_level: str, listen: str) -> None:
    """Subprocess entry: build the app, bind 127.0.0.1:0, print ``PORT n``, serve until
    SIGTERM (uvicorn's graceful shutdown)."""
    import logging

    import uvicorn

    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = topo_app(size) if kind == "topo" else noop_app()
    if listen == "cli":
        from topo_sched.commands.extender import _bind_socket

        sock = _bind_socket("127.0.0.1", 0)
    else:
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
        # (asyncio.base_events._set_nodelay); accepted sockets inherit the listener's proto.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level.lower(),
            access_log=False,
            timeout_keep_alive=120,  # topo_sched.commands.extender.KEEP_ALIVE_S
            server_header=False,
        )
    )
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


# -- the servers (client side) ----------------------------------------------------------------


class Server:
    """One uvicorn subprocess; a context manager that always stops it."""

    def __init__(self, kind: str, size: int, args: argparse.Namespace, log_dir: Path) -> None:
        self.kind, self.size = kind, size
        self.log_path = log_dir / f"{kind}-{size}.log"
        self._log = self.log_path.open("wb")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", kind]
        cmd += ["--serve-size", str(size), "--server-log-level", args.server_log_level]
        cmd += ["--listen", args.listen]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log)
        self.port = 0

    def __enter__(self) -> Server:
        try:
            self.port = self._wait_port()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_port(self) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break  # the child exited
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith("PORT "):
                        return int(line.split()[1])
            elif self.proc.poll() is not None:
                break
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.kind} server (N={self.size}) did not start:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


class Client:
    """One keep-alive HTTP/1.1 connection, as kube-scheduler's Go client keeps one."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        self.conn.connect()
        self.sock = self.conn.sock
        self.reconnects = 0

    def post(self, verb: str, body: bytes) -> bytes:
        self.conn.request("POST", f"{PREFIX}/{verb}", body=body, headers=HEADERS)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{verb}: HTTP {resp.status}: {data[:300]!r}")
        if self.conn.sock is not self.sock:
            self.reconnects += 1
            self.sock = self.conn.sock
        return data

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path, headers={"User-Agent": HEADERS["User-Agent"]})
        resp = self.conn.getresponse()
        return resp.read()

    def close(self) -> None:
        self.conn.close()


def cycle(client: Client, body: bytes) -> tuple[int, int, bytes, bytes]:
    """One filter + prioritize; (filter ns, prioritize ns, replies)."""
    t0 = time.perf_counter_ns()
    f = client.post("filter", body)
    t1 = time.perf_counter_ns()
    p = client.post("prioritize", body)
    t2 = time.perf_counter_ns()
    return t1 - t0, t2 - t1, f, p


def check_replies(kind: str, names: Sequence[str], f: bytes, p: bytes) -> dict[str, Any]:
    """Shape checks on one cycle's replies; a summary of what the server answered."""
    fr = json.loads(f)
    pr = json.loads(p)
    for key in ("Nodes", "NodeNames", "FailedNodes", "FailedAndUnresolvableNodes", "Error"):
        if key not in fr:
            raise RuntimeError(f"{kind}: filter reply lacks {key}: {f[:200]!r}")
    if fr["Error"] or fr["Nodes"] is not None:
        raise RuntimeError(f"{kind}: unexpected filter reply {f[:200]!r}")
    if not isinstance(pr, list) or [e["Host"] for e in pr] != list(names):
        raise RuntimeError(f"{kind}: prioritize reply does not list the nodes in order")
    scores = [e["Score"] for e in pr]
    return {
        "passed": len(fr["NodeNames"]),
        "failed": len(fr["FailedNodes"]) + len(fr["FailedAndUnresolvableNodes"]),
        "distinct_scores": len(set(scores)),
        "max_score_nodes": scores.count(max(scores)) if scores else 0,
    }


def outcome_counts(client: Client) -> dict[str, float]:
    """``topo_sched_extender_requests_total`` by verb/outcome from the app's /metrics."""
    out: dict[str, float] = {}
    for line in client.get("/metrics").decode().splitlines():
        if line.startswith("topo_sched_extender_requests_total{"):
            labels, value = line[len("topo_sched_extender_requests_total") :].rsplit(" ", 1)
            if float(value):
                out[labels] = float(value)
    return out


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), in ms."""
    if not sorted_ns:
        return float("nan")
    pos = (len(sorted_ns) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ns) - 1)
    return (sorted_ns[lo] + (sorted_ns[hi] - sorted_ns[lo]) * (pos - lo)) / 1e6


def stats(samples: Sequence[int]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_ms": percentile(s, 0.50),
        "p90_ms": percentile(s, 0.90),
        "p99_ms": percentile(s, 0.99),
        "max_ms": s[-1] / 1e6,
        "mean_ms": sum(s) / len(s) / 1e6,
    }


def measure_size(
    size: int, noop_port: int, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    t0 = time.perf_counter()
    _nodes, _pods, names = build_cluster(size)
    total = args.warmup + args.requests
    bodies = [pending_body(i, names) for i in range(total)]
    print(
        f"N={size}: request body {len(bodies[0]):,} bytes; starting the topo-sched server ...",
        file=sys.stderr,
        flush=True,
    )
    with Server("topo", size, args, log_dir) as topo:
        clients = {"topo-sched": Client(topo.port), "no-op": Client(noop_port)}
        times: dict[str, dict[str, list[int]]] = {s: {v: [] for v in VERBS} for s in SERVERS}
        summary: dict[str, Any] = {}
        try:
            started = time.perf_counter()
            for i in range(total):
                # ABBA: which server goes first alternates every cycle.
                order = SERVERS if i % 2 == 0 else SERVERS[::-1]
                for server in order:
                    f_ns, p_ns, f, p = cycle(clients[server], bodies[i])
                    if i == 0 or i == total - 1:
                        summary[server] = check_replies(server, names, f, p)
                    if i >= args.warmup:
                        t = times[server]
                        t["filter"].append(f_ns)
                        t["prioritize"].append(p_ns)
                        t["pair"].append(f_ns + p_ns)
            loop_s = time.perf_counter() - started
            outcomes = outcome_counts(clients["topo-sched"])
            reconnects = {s: c.reconnects for s, c in clients.items()}
        finally:
            for c in clients.values():
                c.close()
    bad = {k: v for k, v in outcomes.items() if 'outcome="ok"' not in k}
    if bad:
        raise RuntimeError(
            f"N={size}: topo-sched answered with outcomes other than ok: {bad}; see {topo.log_path}"
        )
    rows = []
    for verb in VERBS:
        a, b = stats(times["topo-sched"][verb]), stats(times["no-op"][verb])
        rows.append(
            {
                "size": size,
                "verb": verb,
                "topo_sched": a,
                "noop": b,
                "ratio_p50": a["p50_ms"] / b["p50_ms"],
                "ratio_p99": a["p99_ms"] / b["p99_ms"],
            }
        )
    return {
        "size": size,
        "request_body_bytes": len(bodies[0]),
        "requests": args.requests,
        "warmup": args.warmup,
        "replies": summary,
        "topo_outcomes": outcomes,
        "reconnects": reconnects,
        "loop_seconds": round(loop_s, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "rows": rows,
    }


# -- report ---------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'nodes':>6} {'verb':<10} "
        f"{'topo p50':>9} {'no-op p50':>9} {'x p50':>6}   "
        f"{'topo p99':>9} {'no-op p99':>9} {'x p99':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        a, b = r["topo_sched"], r["noop"]
        lines.append(
            f"{r['size']:>6} {r['verb']:<10} "
            f"{a['p50_ms']:>9.3f} {b['p50_ms']:>9.3f} {r['ratio_p50']:>5.2f}x   "
            f"{a['p99_ms']:>9.3f} {b['p99_ms']:>9.3f} {r['ratio_p99']:>5.2f}x"
        )
    return "\n".join(lines)


def target_verdict(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    line = f"target: pair p99 <= {TARGET_RATIO}x no-op at {TARGET_SIZE:,} nodes"
    row = next((r for r in rows if r["size"] == TARGET_SIZE and r["verb"] == "pair"), None)
    if row is None:
        return {"line": line, "measured": False, "met": None, "text": "not measured"}
    met = row["ratio_p99"] <= TARGET_RATIO
    text = (
        f"{'MET' if met else 'NOT MET'}: pair p99 {row['topo_sched']['p99_ms']:.3f} ms vs "
        f"no-op {row['noop']['p99_ms']:.3f} ms = {row['ratio_p99']:.2f}x"
    )
    if row["noop"]["p50_ms"] > STALL_MS:
        text += (
            f"\nWARNING: the no-op's pair p50 is {row['noop']['p50_ms']:.1f} ms: replies stall "
            "on Nagle + delayed ACK (TCP_NODELAY off on the server's sockets), which hides the "
            "placement cost; the ratio says little (see --listen)"
        )
    return {
        "line": line,
        "measured": True,
        "met": met,
        "ratio_p99": row["ratio_p99"],
        "tcp_stall": row["noop"]["p50_ms"] > STALL_MS,
        "text": text,
    }


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: comma-separated integers") from None
    if not sizes or any(s < 1 or s > 50_000 for s in sizes):
        raise argparse.ArgumentTypeError("--sizes: each size must be 1..50000")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Ratios are topo-sched / no-op: 1.00x means the placement work costs nothing "
            "on top of HTTP + JSON; the target is "
            f"pair p99 <= {TARGET_RATIO}x at {TARGET_SIZE:,} nodes."
        ),
    )
    ap.add_argument(
        "--sizes",
        type=parse_sizes,
        default=[100, 1000, 5000],
        help="candidate node counts, comma-separated (default 100,1000,5000)",
    )
    ap.add_argument("--requests", type=int, default=300, help="measured cycles per size")
    ap.add_argument("--warmup", type=int, default=30, help="unmeasured cycles first, per size")
    ap.add_argument("--json", metavar="OUT", type=Path, help="write the figures as JSON")
    ap.add_argument(
        "--server-log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="both servers' log level (default INFO, the `topo-sched extender` default; "
        "logs go to a temporary file)",
    )
    ap.add_argument(
        "--listen",
        choices=["tcp", "cli"],
        default="tcp",
        help="how the servers' listening socket is made: tcp (default) = with "
        "proto=IPPROTO_TCP, so asyncio turns on TCP_NODELAY per connection; cli = with "
        "`topo-sched extender`'s own _bind_socket, to check what the shipped command gets",
    )
    # Internal: the server subprocess.
    ap.add_argument("--serve", choices=["topo", "noop"], help=argparse.SUPPRESS)
    ap.add_argument("--serve-size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.serve:
        serve(args.serve, args.serve_size, args.server_log_level, args.listen)
        return 0
    if args.requests < 1 or args.warmup < 0:
        ap.error("--requests must be >= 1 and --warmup >= 0")

    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="extender-latency-") as tmp:
        log_dir = Path(tmp)
        with Server("noop", 0, args, log_dir) as noop:
            for size in args.sizes:
                results.append(measure_size(size, noop.port, args, log_dir))
    rows = [r for res in results for r in res["rows"]]
    verdict = target_verdict(rows)

    print(
        f"extender latency over HTTP/1.1 keep-alive, 127.0.0.1, "
        f"{args.requests} cycles per size after {args.warmup} warm-up, "
        f"server log level {args.server_log_level}, --listen {args.listen}; "
        "times in ms, client-side"
    )
    print(format_table(rows))
    print()
    for res in results:
        topo, noop_r = res["replies"]["topo-sched"], res["replies"]["no-op"]
        print(
            f"N={res['size']}: body {res['request_body_bytes']:,} B; topo-sched filter passed "
            f"{topo['passed']}, rejected {topo['failed']}; prioritize {topo['distinct_scores']} "
            f"distinct scores ({topo['max_score_nodes']} at the max); no-op passed "
            f"{noop_r['passed']}; reconnects {res['reconnects']}; {res['loop_seconds']} s"
        )
    print()
    print(verdict["line"])
    print(verdict["text"])
    print(f"\n({time.perf_counter() - t0:.1f} s)")

    if args.json:
        meta = {
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "requests": args.requests,
            "warmup": args.warmup,
            "server_log_level": args.server_log_level,
            "listen": args.listen,
            "headers": HEADERS,
        }
        out = {"meta": meta, "target": verdict, "sizes": results}
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
