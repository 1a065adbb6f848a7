"""``topo-sched autoscaler``: the coordinated prefill/decode autoscaler, or one tick of it.

Thin: parse flags, build the sources and sinks, hand them to
:class:`topo_sched.autoscaler.controller.Controller`. Errors a user can cause (a bad config,
an unreadable ``--rbg-file``, no Kubernetes configuration, a port in use) end as one line on
stderr and exit code 2. An unreachable Prometheus is not such an error: the decisions hold
and say why, and the exit code is 0.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

log = logging.getLogger("topo_sched.autoscaler")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMATS = ("text", "json")


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {' '.join(msg.split())}", err=True)
    raise typer.Exit(2)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out["msg"] = record.getMessage().split(" ", 1)[0]  # "decision"
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _setup_logging(level: str, fmt: str) -> None:
    name = level.strip().upper()
    if name not in _LOG_LEVELS:
        _fail(f"--log-level {level!r} is not one of {', '.join(_LOG_LEVELS)}")
    if fmt not in _LOG_FORMATS:
        _fail(f"--log-format {fmt!r} is not one of {', '.join(_LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(name)


def autoscaler(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            help=(
                "Autoscaler configuration YAML: prometheus, intervalSeconds, leaderElection and "
                "targets (rbg, roles with ratio weights, slo, metrics preset, capacity, units, "
                "behavior)."
            ),
            dir_okay=False,
        ),
    ],
    once: Annotated[
        bool,
        typer.Option(
            "--once",
            help=(
                'Run one tick and print {"targets": [{"name", "current", "desired", "action", '
                '"reason", "code"}]} as JSON on stdout, then exit.'
            ),
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help=(
                "Decide but write nothing to Kubernetes: no RBG change, no Event, no Lease "
                "(so no leader election: every dry-run replica ticks)."
            ),
        ),
    ] = False,
    rbg_file: Annotated[
        Path | None,
        typer.Option(
            "--rbg-file",
            help=(
                "Read the RBGs from this file instead of the Kubernetes API: one object, a "
                "multi-document YAML or a List (kubectl get rbg -o yaml|json). An RBG without "
                "status counts as fully rolled out. Implies --dry-run and no leader election."
            ),
            dir_okay=False,
        ),
    ] = None,
    at: Annotated[
        float | None,
        typer.Option(
            "--at",
            help=(
                "With --once: evaluate the signals at this time (Unix seconds) instead of now, "
                "to replay an incident from Prometheus' history."
            ),
        ),
    ] = None,
    prometheus: Annotated[
        str | None,
        typer.Option(
            "--prometheus",
            help="Prometheus base URL (e.g. http://prometheus:9090); overrides the config's.",
        ),
    ] = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            "--kubeconfig",
            help="kubeconfig file (default: in-cluster, then ~/.kube/config). Unused with "
            "--rbg-file.",
        ),
    ] = None,
    metrics_port: Annotated[
        int,
        typer.Option(
            "--metrics-port",
            help=(
                "Serve the autoscaler's own metrics at :PORT/metrics while looping (0: off; "
                "not served with --once)."
            ),
        ),
    ] = 9102,
    identity: Annotated[
        str | None,
        typer.Option(
            "--identity",
            help=(
                "This replica's name in the Lease (holderIdentity) and in Events "
                "(reportingInstance); default: the host name (a pod's name)."
            ),
        ),
    ] = None,
    placement: Annotated[
        str | None,
        typer.Option(
            "--placement",
            help=(
                "Address of the extender's gRPC placement service (host:port, e.g. "
                "127.0.0.1:9095 or topo-sched-extender.topo-sched:9095, or unix:/path). Before "
                "each scale-up, ask WhatIf whether the new ratio units can be placed and scale "
                "only by the units that fit (none: hold, code unplaceable; what was left out is "
                "a PendingCapacity Event and the pending_units metric). If the service cannot "
                "answer, the plain decision is applied (a warning and a metric). Without it the "
                "autoscaler is placement-blind."
            ),
        ),
    ] = None,
    placement_timeout: Annotated[
        float,
        typer.Option(
            "--placement-timeout",
            help="Seconds to wait for one placement call before falling back to the plain "
            "decision.",
        ),
    ] = 2.0,
    placement_tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--placement-tls-ca",
            help=(
                "PEM CA bundle: talk TLS to --placement and verify its certificate with this "
                "CA (without it: plaintext)."
            ),
            dir_okay=False,
        ),
    ] = None,
    deletion_cost: Annotated[
        bool,
        typer.Option(
            "--deletion-cost",
            help=(
                "Before a scale-down, set controller.kubernetes.io/pod-deletion-cost on the "
                "shrinking roles' running pods, worst placed (per the extender's Explain) "
                "lowest, so that a controller honouring the annotation (a ReplicaSet, i.e. a "
                "Deployment-style workload) removes the worst-placed pods first. "
                "StatefulSet-style ordinal scale-down ignores it (it always removes the highest "
                "ordinals). Needs --placement and RBAC list/patch on pods; a failure never "
                "blocks the scale-down. Off by default; nothing is annotated in dry run."
            ),
        ),
    ] = False,
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            help=(
                "text: 'time LEVEL logger: decision target=... action=... code=... "
                "current=... desired=... reason=...'; json: one JSON object per line with "
                "those fields as keys."
            ),
        ),
    ] = "text",
) -> None:
    """Scale each RBG's prefill and decode roles together, in ratio, against latency SLOs.

    Every intervalSeconds, per target: read the RBG's replicas, read the signals from
    Prometheus (demand, queues, TTFT/ITL percentiles), decide one change for all roles
    (whole ratio units, HPA-style stabilisation and rate limits, min/max), and write it as one
    change (a guarded JSON Patch on the RBG, or the roles' scaling adapters), with an Event on
    the RBG. Missing, stale or NaN metrics and an unreachable Prometheus hold the current
    size; they never scale down. Only the replica holding the Lease acts. With --placement,
    scale-ups are limited to the ratio units the extender says can be placed.
    """
    _setup_logging(log_level, log_format)

    from topo_sched.autoscaler.controller import (
        Controller,
        FileRbgSource,
        KubeRbgSource,
        RbgFileError,
        decisions_json,
    )
    from topo_sched.metrics.prometheus import PrometheusSignals
    from topo_sched.scaling.config import ScalingConfigError, load_autoscaler_config

    try:
        cfg = load_autoscaler_config(config)
    except ScalingConfigError as e:
        _fail(str(e))
    cfg = _with_capacity(cfg, config)
    if at is not None and not once:
        _fail("--at needs --once (it replays one tick at that time)")
    url = prometheus or cfg.prometheus
    name = identity or socket.gethostname()
    if deletion_cost and not placement:
        _fail("--deletion-cost needs --placement (pods are ranked by the extender's Explain)")
    if placement_timeout <= 0:
        _fail(f"--placement-timeout must be > 0, got {placement_timeout:g}")
    if placement_tls_ca is not None and not placement:
        _fail("--placement-tls-ca needs --placement")
    if placement_tls_ca is not None:
        try:
            ca = placement_tls_ca.read_bytes()
        except OSError as e:
            _fail(f"--placement-tls-ca {placement_tls_ca}: cannot read: {e.strerror or e}")
        if b"-----BEGIN" not in ca:
            _fail(f"--placement-tls-ca {placement_tls_ca}: not a PEM file")

    elector = None
    actuator = None
    events = None
    pods = None
    if rbg_file is not None:
        try:
            rbgs: Any = FileRbgSource(rbg_file)
        except RbgFileError as e:
            _fail(str(e))
        dry_run = True
    else:
        from topo_sched.kube.client import KubeConfigError, build_api_client

        try:
            api = build_api_client(kubeconfig=kubeconfig)
        except KubeConfigError as e:
            _fail(f"cannot configure the Kubernetes API client: {'; '.join(e.tried)}")
        except Exception as e:  # a malformed kubeconfig file
            _fail(f"cannot configure the Kubernetes API client: {e}")
        rbgs = KubeRbgSource(api)
        if not dry_run:
            from topo_sched.autoscaler.actuator import RbgActuator
            from topo_sched.autoscaler.events import EventRecorder

            actuator = RbgActuator(api)
            events = EventRecorder(api, instance=name)
            if deletion_cost:
                from topo_sched.autoscaler.placement_gate import KubePodLister

                pods = KubePodLister(api)
            le = cfg.leader_election
            if le.enabled:
                from topo_sched.autoscaler.leader import LeaseElector

                elector = LeaseElector(
                    api,
                    le.namespace,
                    le.lease_name,
                    name,
                    lease_duration_s=le.lease_duration_seconds,
                    renew_deadline_s=le.renew_deadline_seconds,
                )

    if deletion_cost and pods is None:
        log.info("--deletion-cost: nothing is annotated in dry run")
    client = None
    if placement:
        from topo_sched.rpc.placement_client import ClientTls, PlacementClient

        tls = ClientTls(ca_file=placement_tls_ca) if placement_tls_ca is not None else None
        client = PlacementClient(placement, timeout_s=placement_timeout, tls=tls)
        log.info(
            "placement service %s (%s, timeout %gs)%s",
            placement,
            "TLS" if tls is not None else "plaintext",
            placement_timeout,
            ", deletion cost on" if pods is not None else "",
        )

    signals = PrometheusSignals(url)
    controller = Controller(
        cfg,
        signals,
        rbgs,
        actuator,
        events,
        dry_run=dry_run,
        elector=elector,
        placement=client,
        pods=pods,
        deletion_cost=pods is not None,
    )

    if once:
        # With writes and leader election, the tick takes the Lease first (one round); when
        # another replica holds it, scale decisions come back as holds (code not-leader).
        try:
            decisions = controller.tick(now=at)
        finally:
            if elector is not None:
                if not elector.is_leader:
                    log.warning(
                        "lease %s/%s is held by %s: nothing was written",
                        cfg.leader_election.namespace,
                        cfg.leader_election.lease_name,
                        elector.holder,
                    )
                else:
                    elector.release()
            signals.close()
            if client is not None:
                client.close()
        typer.echo(json.dumps(decisions_json(decisions), indent=2))
        return

    if metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(metrics_port, registry=controller.registry)
        except OSError as e:
            _fail(f"cannot serve metrics on port {metrics_port}: {e.strerror or e}")
        log.info("metrics on :%d/metrics", metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.monotonic()
    try:
        controller.run(stop)
    except KeyboardInterrupt:
        stop.set()
    finally:
        signals.close()
        if client is not None:
            client.close()
        log.info("ran %.0fs", time.monotonic() - started)


def _with_capacity(cfg: Any, config: Path) -> Any:
    """Fill each target's missing capacity figures from its (or the measured default) profile."""
    from topo_sched.profiling.capacity import target_with_capacity

    targets = []
    for i, t in enumerate(cfg.targets):
        try:
            filled = target_with_capacity(t)
        except (ValueError, OSError) as e:
            _fail(f"{config}: targets[{i}] ({t.rbg}): capacity: {e}")
        if filled is not t:
            c = filled.capacity
            log.info(
                "target %s: capacity from profile %s: prefill %.0f tok/s per replica, "
                "decode %s sequences per replica",
                t.rbg,
                c.profile or "h100-qwen3-8b-like (bundled, measured)",
                c.prefill_tokens_per_second or 0,
                c.decode_sequences,
            )
        targets.append(filled)
    return cfg.model_copy(update={"targets": targets})
