"""``topo-sched extender`` (the kube-scheduler extender service) and ``topo-sched explain``.

Thin: parse flags, build the state, engine and app, run uvicorn; or explain one pod against a
snapshot file. Errors a user can cause end as one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml

log = logging.getLogger("topo_sched.extender")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: Longer than Go's idle-connection timeout (90 s): the scheduler reuses connections, and a
#: server that closes an idle one first makes the next POST fail (Go does not retry a POST).
KEEP_ALIVE_S = 120


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _setup_logging(level: str) -> None:
    name = level.strip().upper()
    if name not in _LOG_LEVELS:
        _fail(f"--log-level {level!r} is not one of {', '.join(_LOG_LEVELS)}")
    logging.basicConfig(
        level=name,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load_config(path: Path | None) -> Any:
    from topo_sched.placement.config import ConfigError, load_placement_config

    try:
        return load_placement_config(path)
    except ConfigError as e:
        _fail(str(e))


def _load_state(path: Path, config: Any) -> Any:
    from topo_sched.extender.state import ClusterState, SnapshotFileError

    try:
        return ClusterState.from_file(path, config)
    except SnapshotFileError as e:
        _fail(str(e))


def _bind_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        _fail(f"--host {host!r}: {e.strerror}")
    family, _type, proto, _name, addr = infos[0]
    # Pass the protocol: asyncio turns TCP_NODELAY on only for sockets that say they are TCP,
    # and without it every reply waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.set_inheritable(True)
    return sock


def _start_grpc(
    state: Any,
    engine: Any,
    host: str,
    port: int,
    cert: Path | None,
    key: Path | None,
    client_ca: Path | None,
) -> Any:
    """The placement gRPC service on its own port, over the same state as the HTTP verbs."""
    from topo_sched.rpc.placement_server import TlsConfig, TlsConfigError, serve

    tls = TlsConfig(cert, key, client_ca) if cert is not None and key is not None else None
    try:
        return serve(state, engine, host=host, port=port, tls=tls, max_workers=8)
    except TlsConfigError as e:
        _fail(str(e))
    except RuntimeError as e:
        _fail(f"--grpc-host/--grpc-port: {e}")


def _stop_grpc_on_shutdown(server: Any, grpc_server: Any, grace_s: float = 2.0) -> None:
    """Stop the gRPC service inside uvicorn's graceful shutdown.

    On SIGTERM uvicorn shuts down, then re-raises the signal, so code after ``server.run``
    never runs; this hook stops gRPC alongside HTTP (in-flight calls get ``grace_s``).
    """
    import asyncio

    original = server.shutdown

    async def shutdown(*args: Any, **kwargs: Any) -> None:
        done = grpc_server.stop(grace_s)
        try:
            await original(*args, **kwargs)
        finally:
            await asyncio.to_thread(done.wait, grace_s + 3)
            log.info("placement gRPC service stopped")

    server.shutdown = shutdown


def extender(
    snapshot: Annotated[
        Path | None,
        typer.Option(
            "--snapshot",
            help=(
                "Serve from this cluster snapshot file (`kubectl get nodes,pods -A -o json`, "
                "JSON or YAML) instead of watching the Kubernetes API. Bind is then refused."
            ),
            dir_okay=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Placement configuration YAML (weights, modes, levels); defaults if omitted.",
            dir_okay=False,
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on; 0.0.0.0 (all) is what a Deployment behind a Service needs."
        ),
    ] = "0.0.0.0",
    port: Annotated[
        int, typer.Option(help="TCP port to listen on (the port in the scheduler's urlPrefix).")
    ] = 8888,
    prefix: Annotated[
        str,
        typer.Option(
            help=(
                "URL path prefix of the verbs, the path part of the scheduler's `urlPrefix` "
                "(verbs are <prefix>/filter, /prioritize, /bind)."
            )
        ),
    ] = "/scheduler",
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            help=(
                "kubeconfig for the live API (default: in-cluster service account, then "
                "$KUBECONFIG or ~/.kube/config). Not used with --snapshot."
            ),
            dir_okay=False,
        ),
    ] = None,
    max_body_bytes: Annotated[
        int,
        typer.Option(
            help=(
                "Largest request body accepted, in bytes; larger ones get HTTP 400. Full-Node "
                "requests (nodeCacheCapable: false) are about 3.5 KB per node."
            ),
        ),
    ] = 64 * 1024 * 1024,
    log_level: Annotated[
        str,
        typer.Option(
            help="DEBUG (one line per rejected node), INFO (one line per request), WARNING, ERROR."
        ),
    ] = "INFO",
    grpc_port: Annotated[
        int,
        typer.Option(
            help=(
                "TCP port of the placement gRPC service (topo_sched.v1.PlacementService: "
                "WhatIf, Explain, ClusterSummary; with gRPC health and reflection). "
                "0 (default) = off."
            )
        ),
    ] = 0,
    grpc_host: Annotated[
        str,
        typer.Option(
            help="Address the gRPC service listens on, or unix:/PATH for a unix socket "
            "(which turns the service on without --grpc-port)."
        ),
    ] = "0.0.0.0",
    grpc_tls_cert: Annotated[
        Path | None,
        typer.Option(
            help="PEM certificate (chain) for gRPC TLS; with --grpc-tls-key.", dir_okay=False
        ),
    ] = None,
    grpc_tls_key: Annotated[
        Path | None,
        typer.Option(help="PEM private key for gRPC TLS; with --grpc-tls-cert.", dir_okay=False),
    ] = None,
    grpc_tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            help="PEM CA bundle: require and verify client certificates on gRPC (mTLS).",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Run the kube-scheduler extender: HTTP filter, prioritize and bind for RBG pods.

    Scheduler side: an `extenders:` entry with urlPrefix http://HOST:PORT/PREFIX.

    Verbs: filterVerb `filter`, prioritizeVerb `prioritize`, bindVerb `bind` (live API only).

    Also serves /healthz, /readyz (503 until synced), /metrics, GET PREFIX/explain/NS/POD.

    With --grpc-port P: the placement gRPC service on port P (plaintext unless
    --grpc-tls-cert/--grpc-tls-key are given), from the same cluster state.
    """
    _setup_logging(log_level)
    if max_body_bytes <= 0:
        _fail("--max-body-bytes must be a positive number of bytes")
    if not 0 <= port <= 65535:
        _fail(f"--port {port} is not a TCP port (0..65535)")
    if snapshot is not None and kubeconfig is not None:
        _fail("--snapshot and --kubeconfig exclude each other (a snapshot needs no API)")
    if not 0 <= grpc_port <= 65535:
        _fail(f"--grpc-port {grpc_port} is not a TCP port (0..65535; 0 = off)")
    if (grpc_tls_cert is None) != (grpc_tls_key is None):
        _fail("--grpc-tls-cert and --grpc-tls-key go together")
    if grpc_tls_client_ca is not None and grpc_tls_cert is None:
        _fail("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key")
    grpc_on = grpc_port != 0 or grpc_host.startswith("unix:")
    if not grpc_on and grpc_tls_cert is not None:
        _fail("--grpc-tls-* options need --grpc-port")

    import uvicorn

    from topo_sched.extender.app import create_app
    from topo_sched.placement.engine import PlacementEngine

    cfg = _load_config(config)
    engine = PlacementEngine(cfg)
    binder = None
    if snapshot is not None:
        state = _load_state(snapshot, cfg)
        try:
            state.snapshot()  # build it now: checks the data, and the first request is fast
        except Exception as e:
            _fail(f"{snapshot}: cannot build a cluster snapshot: {e}")
    else:
        from topo_sched.extender.state import ClusterState
        from topo_sched.kube.client import KubeConfigError, build_api_client
        from topo_sched.kube.pods import create_binding

        try:
            api = build_api_client(kubeconfig=kubeconfig)
        except KubeConfigError as e:
            _fail(" ".join(str(e).split()))

        def binder(namespace: str, pod: str, uid: str, node: str) -> Any:
            return create_binding(api, namespace, pod, node, uid=uid or None)

        state = ClusterState(cfg)
        state.start_live(api)

    app = create_app(state, engine, prefix=prefix, max_body_bytes=max_body_bytes, binder=binder)
    sock = _bind_socket(host, port)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level.strip().lower(),
            access_log=False,
            timeout_keep_alive=KEEP_ALIVE_S,
            server_header=False,
        )
    )
    log.info(
        "extender listening on http://%s:%d%s (%s)",
        host,
        sock.getsockname()[1],
        prefix,
        state.source,
    )
    grpc_server = None
    try:
        if grpc_on:
            grpc_server = _start_grpc(
                state,
                engine,
                grpc_host,
                grpc_port,
                grpc_tls_cert,
                grpc_tls_key,
                grpc_tls_client_ca,
            )
            _stop_grpc_on_shutdown(server, grpc_server)
        server.run(sockets=[sock])
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=2).wait(5)
        state.stop()
        sock.close()


# -- explain --------------------------------------------------------------------------------


def _load_pod(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(f"{path}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}")
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        _fail(f"{path}: not valid YAML or JSON: {getattr(e, 'problem', None) or e}{where}")
    if len(docs) != 1:
        _fail(f"{path}: expected exactly one Pod, found {len(docs)} documents")
    pod = docs[0]
    if not isinstance(pod, dict):
        _fail(f"{path}: expected a Pod object, got {type(pod).__name__}")
    kind = pod.get("kind")
    if kind not in (None, "Pod"):
        _fail(f"{path}: is a {kind}, expected a Pod")
    return pod


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))
    return str(v)


def _render(explanation: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 200)  # piped: do not squeeze the columns
    nodes = explanation.get("nodes") or []
    kind = "RBG pod" if explanation.get("rbg") else "not an RBG pod (neutral answer)"
    console.print(f"pod {explanation.get('pod')}: {kind}, {explanation.get('gpus')} GPU(s)")
    for w in explanation.get("warnings") or []:
        console.print(f"[yellow]warning:[/yellow] {w}")
    terms: list[str] = []
    weights: dict[str, Any] = {}
    for n in nodes:
        for t, term in (n.get("terms") or {}).items():
            if t not in terms:
                terms.append(t)
                weights[t] = (term or {}).get("weight")
    # A term with no opinion on any node (e.g. stability for a pod never placed) is noise here.
    terms = [
        t
        for t in terms
        if any(((n.get("terms") or {}).get(t) or {}).get("score") is not None for n in nodes)
    ]
    table = Table(show_lines=False)
    table.add_column("node", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("score", justify="right")
    table.add_column("total", justify="right")
    for t in terms:
        w = weights.get(t)
        table.add_column(t if w is None else f"{t} (w {_fmt(w)})", justify="right")
    table.add_column("gpus")
    table.add_column("reason / note")
    for n in nodes:
        name = str(n.get("node", "?"))
        if not n.get("passed"):
            verdict = f"[red]fail[/red] {n.get('code') or ''}".rstrip()
            blanks = [""] * (len(terms) + 3)
            table.add_row(name, verdict, *blanks, str(n.get("reason") or ""))
            continue
        node_terms = n.get("terms") or {}
        cells = [_fmt((node_terms.get(t) or {}).get("score")) for t in terms]
        gpus = ",".join(str(g) for g in n.get("gpus") or [])
        if n.get("locality"):
            gpus = f"{gpus} ({n['locality']})" if gpus else str(n["locality"])
        table.add_row(
            name,
            "[green]pass[/green]",
            _fmt(n.get("score")),
            _fmt(n.get("total")),
            *cells,
            gpus,
            str(n.get("note") or ""),
        )
    console.print(table)


def explain(
    pod_file: Annotated[
        Path | None,
        typer.Argument(
            metavar="[POD.yaml]",
            help="The pod to place: a Pod manifest (YAML or JSON), as the scheduler would see it. "
            "With neither POD.yaml nor --snapshot: the built-in demo.",
            dir_okay=False,
        ),
    ] = None,
    snapshot: Annotated[
        Path | None,
        typer.Option(
            "--snapshot",
            help="Cluster snapshot file (`kubectl get nodes,pods -A -o json`, JSON or YAML).",
            dir_okay=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Placement configuration YAML; the defaults if omitted.",
            dir_okay=False,
        ),
    ] = None,
    node: Annotated[
        list[str] | None,
        typer.Option(
            "--node",
            help="Explain only this node (repeatable); default: every node in the snapshot.",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the explanation as JSON instead of a table."),
    ] = False,
) -> None:
    """Explain where the extender would place a pod, node by node.

    Per node: the filter reason, or each scoring term's score and weight, the total, and the
    0..10 score the scheduler would get. Run with no arguments for a built-in demo: a 16-node
    cluster (an HGX H100 rack and a PCIe rack, from real captures) and a TP4 prefill pod whose
    decode already runs.
    """
    from topo_sched.placement.engine import PlacementEngine
    from topo_sched.placement.pods import PodSpecError

    cfg = _load_config(config)
    if pod_file is None and snapshot is None:
        from topo_sched.extender.state import ClusterState
        from topo_sched.sim.placement_quality import demo_cluster

        nodes, pods, pod = demo_cluster()
        state = ClusterState.from_objects(nodes, pods, cfg)
        pod_file = Path("demo pod llm/chat-prefill-0")
        if not as_json:
            typer.echo(
                "Built-in demo: 16 nodes (rack-0 HGX H100, rack-1 PCIe), decode of group "
                "'chat' on rack-0; placing its TP4 prefill. Use POD.yaml --snapshot FILE for yours."
            )
    elif pod_file is None or snapshot is None:
        _fail("give both POD.yaml and --snapshot FILE, or neither for the built-in demo")
    else:
        state = _load_state(snapshot, cfg)
        pod = _load_pod(pod_file)
    engine = PlacementEngine(cfg)
    try:
        result = engine.explain(state.snapshot(), pod, node or None).to_dict()
    except PodSpecError as e:
        _fail(f"{pod_file}: {e}")
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=False))
    else:
        _render(result)
