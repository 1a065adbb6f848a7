"""The gRPC ``topo_sched.v1.PlacementService``: what-if, explain and cluster summary.

Served by the extender process next to its HTTP verbs, from the same
:class:`~topo_sched.extender.state.ClusterState` (one state, two protocols). This module only
translates: proto in -> core dataclasses (:mod:`topo_sched.placement.whatif`,
:class:`~topo_sched.placement.engine.PlacementEngine`) -> proto out. The translation
functions are public; :mod:`topo_sched.rpc.placement_client` uses the reverse ones.

Concurrency: gRPC runs each call on a thread of the server's pool (``max_workers``). A call
takes ``state.snapshot()`` once and works only on that immutable snapshot; what-if places its
hypothetical pods with ``with_binding`` on a private chain of snapshots, so nothing a call
does is visible to the extender or to another call, and no lock is held while it computes.
What-if uses its own :class:`PlacementEngine` (same config and terms as the extender's) so
that its many hypothetical pods do not evict the extender's per-pod context memo.

Health: the standard ``grpc.health.v1.Health`` service answers for ``""`` and for
``topo_sched.v1.PlacementService``: NOT_SERVING until the state has synced (``state.ready``),
SERVING after; a small thread polls readiness until the server stops, and Watch streams see
every change. Reflection (``grpc.reflection.v1alpha``) lists the placement, health and
reflection services, so ``grpcurl`` needs no .proto file.

Errors: a malformed request is INVALID_ARGUMENT with a message naming the field; a pod named
by reference that the state does not hold is NOT_FOUND; a call before the state synced is
UNAVAILABLE; anything unexpected is logged with its traceback and answered INTERNAL, and the
server stays up.

TLS: :class:`TlsConfig` names PEM files; with ``client_ca_file`` the server requires and
verifies client certificates (mTLS). Without it the port is plaintext.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from topo_sched.placement.engine import Explanation, NodeVerdict, PlacementEngine
from topo_sched.placement.pods import PodSpecError
from topo_sched.placement.whatif import (
    DomainSummary,
    IslandFit,
    LevelSummary,
    PodPlacement,
    RoleReason,
    RoleRequest,
    Summary,
    WhatIfRequest,
    WhatIfRequestError,
    WhatIfResult,
    cluster_summary,
    what_if,
)
from topo_sched.rpc.topo_sched.v1 import placement_pb2 as pb
from topo_sched.rpc.topo_sched.v1 import placement_pb2_grpc as pb_grpc

__all__ = [
    "SERVICE_NAME",
    "PlacementServicer",
    "TlsConfig",
    "TlsConfigError",
    "bound_address",
    "explanation_from_proto",
    "explanation_to_proto",
    "request_from_proto",
    "request_to_proto",
    "result_from_proto",
    "result_to_proto",
    "serve",
    "summary_from_proto",
    "summary_to_proto",
]

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["PlacementService"].full_name
#: kube-scheduler's weight for the extender, as in manifests/extender/scheduler-configmap.yaml.
DEFAULT_EXTENDER_WEIGHT = 20

_T = TypeVar("_T")


# -- TLS ------------------------------------------------------------------------------------


class TlsConfigError(ValueError):
    """A TLS file is missing or unreadable."""


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS from PEM files; ``client_ca_file`` turns on mTLS (client certs required)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @staticmethod
    def _read(path: Path, what: str) -> bytes:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise TlsConfigError(f"{what} {path}: cannot read: {e.strerror or e}") from None
        if b"-----BEGIN" not in data:
            raise TlsConfigError(f"{what} {path}: not a PEM file")
        return data

    def server_credentials(self) -> grpc.ServerCredentials:
        cert = self._read(self.cert_file, "TLS certificate")
        key = self._read(self.key_file, "TLS key")
        ca = self._read(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


# -- translation: WhatIf --------------------------------------------------------------------


def request_from_proto(msg: pb.WhatIfRequest) -> WhatIfRequest:
    roles = tuple(
        RoleRequest(
            name=r.name,
            pods_per_unit=r.pods_per_unit,
            gpus_per_pod=r.gpus_per_pod,
            labels=dict(r.labels),
            annotations=dict(r.annotations),
            instance_size=r.instance_size if r.HasField("instance_size") else None,
        )
        for r in msg.roles
    )
    return WhatIfRequest(
        namespace=msg.namespace,
        rbg=msg.rbg,
        units=msg.units,
        roles=roles,
        all_or_nothing=msg.all_or_nothing,
    )


def request_to_proto(req: WhatIfRequest) -> pb.WhatIfRequest:
    msg = pb.WhatIfRequest(
        namespace=req.namespace, rbg=req.rbg, units=req.units, all_or_nothing=req.all_or_nothing
    )
    for r in req.roles:
        role = msg.roles.add(
            name=r.name, pods_per_unit=r.pods_per_unit, gpus_per_pod=r.gpus_per_pod
        )
        role.labels.update(r.labels)
        role.annotations.update(r.annotations)
        if r.instance_size is not None:
            role.instance_size = r.instance_size
    return msg


def result_to_proto(res: WhatIfResult) -> pb.WhatIfResponse:
    msg = pb.WhatIfResponse(
        units_requested=res.units_requested,
        units_placeable=res.units_placeable,
        feasible=res.feasible,
        cost=res.cost,
        score_cost=res.score_cost,
        kv_path_cost=res.kv_path_cost,
        warnings=res.warnings,
    )
    for p in res.placements:
        out = msg.placements.add(
            unit=p.unit,
            role=p.role,
            pod=p.pod,
            node=p.node,
            gpus=p.gpus,
            locality=p.locality or "",
            score=p.score,
            instance=p.instance or "",
        )
        if p.total is not None:
            out.total = p.total
    if res.first_unfit_unit is not None:
        msg.first_unfit_unit = res.first_unfit_unit
    for r in res.reasons:
        reason = msg.reasons.add(
            role=r.role, pod=r.pod, nodes_total=r.nodes_total, message=r.message
        )
        for code, n in r.rejections:
            reason.rejections.add(code=code, nodes=n)
    if res.snapshot_age_seconds is not None:
        msg.snapshot_age_seconds = res.snapshot_age_seconds
    return msg


def result_from_proto(msg: pb.WhatIfResponse) -> WhatIfResult:
    return WhatIfResult(
        units_requested=msg.units_requested,
        units_placeable=msg.units_placeable,
        placements=[
            PodPlacement(
                unit=p.unit,
                role=p.role,
                pod=p.pod,
                node=p.node,
                gpus=tuple(p.gpus),
                locality=p.locality or None,
                score=p.score,
                total=p.total if p.HasField("total") else None,
                instance=p.instance or None,
            )
            for p in msg.placements
        ],
        score_cost=msg.score_cost,
        kv_path_cost=msg.kv_path_cost,
        first_unfit_unit=msg.first_unfit_unit if msg.HasField("first_unfit_unit") else None,
        reasons=[
            RoleReason(
                role=r.role,
                pod=r.pod,
                nodes_total=r.nodes_total,
                rejections=tuple((c.code, c.nodes) for c in r.rejections),
                message=r.message,
            )
            for r in msg.reasons
        ],
        warnings=list(msg.warnings),
        snapshot_age_seconds=(
            msg.snapshot_age_seconds if msg.HasField("snapshot_age_seconds") else None
        ),
    )


# -- translation: Explain -------------------------------------------------------------------


def explanation_to_proto(ex: Explanation) -> pb.ExplainResponse:
    msg = pb.ExplainResponse(pod=ex.pod, rbg=ex.is_rbg, gpus=ex.gpus, warnings=ex.warnings)
    for v in ex.nodes:
        out = msg.nodes.add(
            node=v.node,
            passed=v.passed,
            code=v.code or "",
            reason=v.reason or "",
            gpus=v.gpus,
            locality=v.locality or "",
        )
        for term, detail in v.terms.items():
            t = out.terms.add(term=term, weight=float(detail.get("weight") or 0.0))
            score = detail.get("score")
            if score is not None:
                t.score = score
        if v.total is not None:
            out.total = v.total
        if v.score is not None:
            out.score = v.score
    return msg


def explanation_from_proto(msg: pb.ExplainResponse) -> Explanation:
    nodes = []
    for v in msg.nodes:
        terms: dict[str, dict[str, float | None]] = {
            t.term: {"score": t.score if t.HasField("score") else None, "weight": t.weight}
            for t in v.terms
        }
        nodes.append(
            NodeVerdict(
                node=v.node,
                passed=v.passed,
                code=v.code or None,
                reason=v.reason or None,
                terms=terms,
                total=v.total if v.HasField("total") else None,
                score=v.score if v.HasField("score") else None,
                gpus=tuple(v.gpus),
                locality=v.locality or None,
            )
        )
    return Explanation(
        pod=msg.pod, is_rbg=msg.rbg, gpus=msg.gpus, warnings=list(msg.warnings), nodes=nodes
    )


# -- translation: ClusterSummary ------------------------------------------------------------


def summary_to_proto(s: Summary) -> pb.ClusterSummaryResponse:
    msg = pb.ClusterSummaryResponse(
        nodes=s.nodes,
        nodes_with_topology=s.nodes_with_topology,
        gpus_allocatable=s.gpus_allocatable,
        gpus_free=s.gpus_free,
        pods=s.pods,
    )
    msg.largest_free_island_nodes.update(s.largest_free_island_nodes)
    for f in s.fits:
        msg.fits.add(
            gpus=f.gpus, nvlink_island=f.nvlink_island, numa_or_better=f.numa_or_better, any=f.any
        )
    for lv in s.levels:
        out = msg.levels.add(label=lv.label, kind=lv.kind)
        for d in lv.domains:
            out.domains.add(
                domain=d.domain,
                value=d.value,
                nodes=d.nodes,
                gpus_allocatable=d.gpus_allocatable,
                gpus_free=d.gpus_free,
                largest_free_island=d.largest_free_island,
            )
    if s.age_seconds is not None:
        msg.age_seconds = s.age_seconds
    return msg


def summary_from_proto(msg: pb.ClusterSummaryResponse) -> Summary:
    return Summary(
        nodes=msg.nodes,
        nodes_with_topology=msg.nodes_with_topology,
        gpus_allocatable=msg.gpus_allocatable,
        gpus_free=msg.gpus_free,
        largest_free_island_nodes=dict(sorted(msg.largest_free_island_nodes.items())),
        fits=tuple(IslandFit(f.gpus, f.nvlink_island, f.numa_or_better, f.any) for f in msg.fits),
        levels=tuple(
            LevelSummary(
                lv.label,
                lv.kind,
                tuple(
                    DomainSummary(
                        d.domain,
                        d.value,
                        d.nodes,
                        d.gpus_allocatable,
                        d.gpus_free,
                        d.largest_free_island,
                    )
                    for d in lv.domains
                ),
            )
            for lv in msg.levels
        ),
        pods=msg.pods,
        age_seconds=msg.age_seconds if msg.HasField("age_seconds") else None,
    )


# -- the servicer ---------------------------------------------------------------------------


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PlacementServicer(pb_grpc.PlacementServiceServicer):
    """Translates each call to the core; reads ``state.snapshot()`` once per call."""

    def __init__(
        self,
        state: Any,
        engine: PlacementEngine,
        *,
        scheduler_model: Any = None,
        extender_weight: int = DEFAULT_EXTENDER_WEIGHT,
    ) -> None:
        self.state = state
        self.engine = engine
        self.whatif_engine = PlacementEngine(engine.config, engine.terms)
        if scheduler_model is None:
            from topo_sched.sim.scheduler import SchedulerModel

            # Ties by node name: equal requests on an equal state get equal answers.
            scheduler_model = SchedulerModel(
                self.whatif_engine, extender_weight=extender_weight, tie_break="name"
            )
        self.scheduler_model = scheduler_model

    # -- plumbing ---------------------------------------------------------------------------

    def _snapshot(self) -> Any:
        if not self.state.ready:
            raise _Abort(
                grpc.StatusCode.UNAVAILABLE,
                "the cluster state has not synced yet; retry shortly",
            )
        return self.state.snapshot()

    def _age(self) -> float | None:
        try:
            return self.state.age_seconds()
        except Exception:  # the age is informative; never fail a call for it
            return None

    def _run(self, method: str, context: grpc.ServicerContext, fn: Callable[[], _T]) -> _T:
        started = time.perf_counter()
        try:
            out = fn()
        except _Abort as e:
            code, message = e.code, e.message
        except (WhatIfRequestError, PodSpecError) as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Exception as e:
            log.exception("gRPC %s failed", method)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error in {method}: {type(e).__name__}: {e}"
        else:
            log.debug("gRPC %s ok in %.1f ms", method, (time.perf_counter() - started) * 1000)
            return out
        log.info("gRPC %s: %s: %s", method, code.name, message)
        context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    # -- RPCs -------------------------------------------------------------------------------

    def WhatIf(self, request: pb.WhatIfRequest, context: grpc.ServicerContext) -> pb.WhatIfResponse:
        def run() -> pb.WhatIfResponse:
            req = request_from_proto(request)
            snap = self._snapshot()
            res = what_if(snap, self.whatif_engine, self.scheduler_model, req)
            res.snapshot_age_seconds = self._age()
            return result_to_proto(res)

        return self._run("WhatIf", context, run)

    def Explain(
        self, request: pb.ExplainRequest, context: grpc.ServicerContext
    ) -> pb.ExplainResponse:
        def run() -> pb.ExplainResponse:
            which = request.WhichOneof("pod")
            if which == "pod_json":
                try:
                    pod = json.loads(request.pod_json)
                except ValueError as e:
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"pod_json is not valid JSON: {e}"
                    ) from None
                if not isinstance(pod, Mapping):
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"pod_json must be a Pod object, got {type(pod).__name__}",
                    )
                snap = self._snapshot()
            elif which == "pod_ref":
                ns = request.pod_ref.namespace or "default"
                name = request.pod_ref.name
                if not name:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "pod_ref.name is empty")
                snap = self._snapshot()
                found = self.state.find_pod(ns, name)
                if found is None:
                    raise _Abort(grpc.StatusCode.NOT_FOUND, f"pod {ns}/{name} is not in the state")
                pod = found
            else:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "give pod_json or pod_ref")
            nodes = list(request.nodes) or None
            return explanation_to_proto(self.engine.explain(snap, pod, nodes))

        return self._run("Explain", context, run)

    def ClusterSummary(
        self, request: pb.ClusterSummaryRequest, context: grpc.ServicerContext
    ) -> pb.ClusterSummaryResponse:
        def run() -> pb.ClusterSummaryResponse:
            snap = self._snapshot()
            return summary_to_proto(cluster_summary(snap, age_seconds=self._age()))

        return self._run("ClusterSummary", context, run)


# -- the server -----------------------------------------------------------------------------

_ADDRESSES: weakref.WeakKeyDictionary[grpc.Server, str] = weakref.WeakKeyDictionary()


def _address(host: str, port: int) -> str:
    if host.startswith(("unix:", "unix-abstract:")):
        return host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


def bound_address(server: grpc.Server) -> str:
    """The address :func:`serve` bound (``host:port`` with the real port, or ``unix:...``)."""
    return _ADDRESSES[server]


def _follow_readiness(
    server: grpc.Server, state: Any, servicer: health.HealthServicer, poll_s: float
) -> None:
    """Keep the health status in step with ``state.ready`` until the server stops."""
    current: int | None = None
    while True:
        try:
            ready = bool(state.ready)
        except Exception:
            log.exception("reading the state's readiness failed")
            ready = False
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        if status != current:
            for name in ("", SERVICE_NAME):
                servicer.set(name, status)
            if current is not None or ready:
                log.info(
                    "gRPC health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                )
            current = status
        if not server.wait_for_termination(timeout=poll_s):
            return  # stopped


def serve(
    state: Any,
    engine: PlacementEngine,
    *,
    host: str = "0.0.0.0",
    port: int = 0,
    tls: TlsConfig | None = None,
    max_workers: int = 8,
    scheduler_model: Any = None,
    extender_weight: int = DEFAULT_EXTENDER_WEIGHT,
    ready_poll_s: float = 1.0,
) -> grpc.Server:
    """Start the placement service (plus health and reflection); return the running server.

    ``host`` may be ``unix:/path/to.sock`` (then ``port`` is ignored). ``port`` 0 picks a
    free port; :func:`bound_address` tells which. ``tls`` None means plaintext. Raises
    :class:`TlsConfigError` for unreadable TLS files and ``RuntimeError`` when the address
    cannot be bound. Stop it with ``server.stop(grace)``.
    """
    creds = tls.server_credentials() if tls is not None else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="placement-grpc"),
        # gRPC sets SO_REUSEPORT by default: a second server on a taken port would "succeed".
        options=[("grpc.so_reuseport", 0)],
    )
    servicer = PlacementServicer(
        state, engine, scheduler_model=scheduler_model, extender_weight=extender_weight
    )
    pb_grpc.add_PlacementServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = _address(host, port)
    try:
        bound = (
            server.add_secure_port(address, creds)
            if creds is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen on {address}: {e}") from None
    if not bound and not address.startswith(("unix:", "unix-abstract:")):
        raise RuntimeError(f"cannot listen on {address}")
    if not address.startswith(("unix:", "unix-abstract:")):
        address = _address(host, bound)
    server.start()
    _ADDRESSES[server] = address
    threading.Thread(
        target=_follow_readiness,
        args=(server, state, health_servicer, ready_poll_s),
        name="placement-grpc-health",
        daemon=True,
    ).start()
    log.info(
        "placement gRPC service on %s (%s)", address, "TLS" if tls is not None else "plaintext"
    )
    return server
