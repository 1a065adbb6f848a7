"""The autoscaler's control loop: signals in, one coordinated change per RBG out.

:class:`Controller` joins the pieces: per target and tick it reads the RBG (its roles'
replicas), reads the target's signals (Prometheus), asks the pure policy
(:func:`topo_sched.scaling.policy.decide`) for a :class:`~topo_sched.scaling.signals.Decision`,
and, for a ``scale`` decision outside dry-run, applies it with the actuator and records a
Kubernetes Event on the RBG.

Sources and sinks are small protocols, so the same loop runs live and offline:

========================  ==========================================  ========================
role                      live                                        offline / tests
========================  ==========================================  ========================
:class:`SignalsSource`    ``metrics.prometheus.PrometheusSignals``    any ``read(target, now)``
:class:`RbgSource`        :class:`KubeRbgSource` (``get_rbg``)        :class:`FileRbgSource`
:class:`Actuator`         ``autoscaler.actuator.RbgActuator``         None (dry run)
:class:`EventSink`        ``autoscaler.events.EventRecorder``         None
:class:`Elector`          ``autoscaler.leader.LeaseElector``          None (always acts)
placement (optional)      ``rpc.placement_client.PlacementClient``    None (placement-blind)
:class:`PodLister`        ``placement_gate.KubePodLister``            None (no deletion cost)
========================  ==========================================  ========================

What a tick guarantees, per target:

- It never raises. A missing RBG (404, or not in the file) holds with code ``rbg-missing``;
  an unreadable one (apiserver down, RBAC) with ``rbg-unreadable``; an unreachable
  Prometheus with the policy's ``unreachable`` (holding never scales down); anything
  unexpected with ``error`` (logged with its traceback).
- The policy state (:class:`~topo_sched.scaling.policy.ScalingState`: the recommendations of
  the stabilisation windows and the changes for the rate limits) is kept here, one per
  target. It records a change only when the change was made: when the write fails, when
  the controller is no longer the leader, and in dry run, the state keeps the pre-change
  record plus the new recommendation, so a rate limit never counts a change that did not
  happen.
- A failed write turns the decision into a ``hold`` (code ``write-failed``, desired =
  current) whose reason carries the actuator's message, and records a ``Warning`` Event
  ``ScaleFailed``; a successful one records a ``Normal`` Event ``Scaled`` whose message is
  the decision's reason (``scale up to 4P,2D: ...``).
- One log line per decision, ``decision target=... action=... code=... current=...
  desired=... reason=...``; the same fields ride on the record as ``fields`` (a dict), which
  the CLI's JSON log format writes as JSON keys.

Placement (``placement``: the extender's gRPC service; see
:mod:`topo_sched.autoscaler.placement_gate`). Without it the controller is placement-blind, as
before. With it, a ``scale`` decision that grows any role is first put to ``WhatIf``, in dry
run too (it is read-only):

- every unit fits: unchanged;
- some fit (strict mode, whole units): desired shrinks to current + the units that fit, the
  code stays, the reason's shape is the applied one and it says what was left out
  (``...; placed 1 of 2 units: decode: 0/64 nodes: ... (wanted 6P,3D)``);
- none fit (or, in band mode, the one change does not): a ``hold`` with code
  ``unplaceable``, desired = current; never a prefill without its decode;
- the extender unreachable (or the request rejected): the plain decision stands, with a
  warning log line, ``; placement not checked (<cause>)`` in the reason, and
  ``topo_sched_autoscaler_placement_unavailable_total{target}`` counted.

The policy state then records only the change that is applied: none for ``unplaceable``,
the partial one (current -> current + placeable units) for a partial scale-up, exactly as
for a failed write. While units are pending a ``Warning`` Event ``PendingCapacity`` (the
what-if reasons) is recorded on the RBG (not in dry run, not when no longer the leader); an
identical message at most once per ``PENDING_EVENT_INTERVAL_S`` (5 min) per target.
``topo_sched_autoscaler_pending_units{target}`` is the units left out by the last decision
(0 when none, or when the decision was no scale-up; unchanged while the extender is down).

Deletion cost (``deletion_cost=True`` with ``placement`` and ``pods``): before writing a
scale-down, the shrinking roles' running pods get ``controller.kubernetes.io/pod-deletion-cost``
(worst placed lowest; see ``placement_gate.order_scale_down``). Only a ReplicaSet-style owner
honours it; StatefulSet ordinal scale-down ignores it. A failure never blocks the scale-down:
a warning and ``topo_sched_autoscaler_deletion_cost_failures_total{target}``.

Leader election (:meth:`Controller.run`). The loop wakes at least every ``renew_period_s``
(2 s, client-go's retry period) to renew the Lease, and ticks only while it is the leader
and the tick interval (``intervalSeconds``, 30 s by default) has elapsed: the Lease lasts
15 s, shorter than a tick interval, so renewal cannot wait for ticks. A long tick (many
targets, a Prometheus that times out) renews between targets too, and every write is
preceded by an ``is_leader`` check: a controller that lost the Lease mid-tick holds
(``not-leader``) instead of writing. On gaining leadership the policy state is dropped,
because another replica may have scaled in the meantime; a fresh state counts the current
size as a recommendation, so it never scales down at once. On stop the Lease is released.

Metrics (prometheus_client, on the controller's own :class:`CollectorRegistry`):
``topo_sched_autoscaler_replicas`` and ``..._desired_replicas`` {target, role},
``..._decisions_total`` {target, action, code}, ``..._tick_duration_seconds`` and
``..._leader`` (1 while this replica acts); with placement, ``..._pending_units`` and
``..._placement_unavailable_total`` {target}; with deletion cost,
``..._deletion_cost_patches_total`` and ``..._deletion_cost_failures_total`` {target}.

Concurrency model: ONE thread runs the loop (``run``/``step``/``tick``); it alone touches
the policy state, the sources and the sinks, none of which are thread-safe (the Prometheus
client's session, the elector's state). The metrics HTTP server
(``prometheus_client.start_http_server``) runs in its own daemon thread and only reads the
registry, which prometheus_client guards with its own locks. ``stop_event`` is the only
object another thread (a signal handler) may touch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import urllib3
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from topo_sched.autoscaler.actuator import ApplyResult
from topo_sched.autoscaler.placement_gate import (
    GateResult,
    PlacementLike,
    PodLister,
    gate_scale_up,
    order_scale_down,
    shape_text,
)
from topo_sched.kube import rbg as rbgapi
from topo_sched.kube.errors import KubeError, NotFound
from topo_sched.scaling.config import AutoscalerConfig, Target
from topo_sched.scaling.gate import apply_gate
from topo_sched.scaling.policy import ScalingState, decide
from topo_sched.scaling.signals import Decision, TargetSignals

log = logging.getLogger(__name__)

#: How often the loop renews the Lease (client-go's default retry period).
DEFAULT_RENEW_PERIOD_S = 2.0

_TICK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

#: An identical PendingCapacity message is recorded at most once per this many seconds.
PENDING_EVENT_INTERVAL_S = 300.0


# -- protocols -------------------------------------------------------------------------------


@runtime_checkable
class SignalsSource(Protocol):
    """Where a target's signals come from (``PrometheusSignals``). Should never raise."""

    def read(self, target: Target, now: float | None = None) -> TargetSignals: ...


@runtime_checkable
class RbgSource(Protocol):
    """Reads an RBG as JSON; raises :class:`RbgMissing` or :class:`RbgReadError`."""

    def get(self, namespace: str, name: str) -> Mapping[str, Any]: ...


@runtime_checkable
class Actuator(Protocol):
    """Writes all roles' replicas as one change (``RbgActuator``). Should never raise."""

    def apply(self, namespace: str, name: str, desired: Mapping[str, int]) -> ApplyResult: ...


@runtime_checkable
class EventSink(Protocol):
    """Records an Event about an RBG (``EventRecorder``); best-effort."""

    def record(
        self, rbg: Mapping[str, Any], reason: str, message: str, type: str = "Normal"
    ) -> Any: ...


@runtime_checkable
class Elector(Protocol):
    """Leader election (``LeaseElector``)."""

    @property
    def is_leader(self) -> bool: ...

    def try_acquire_or_renew(self) -> bool: ...

    def release(self) -> bool: ...


class RbgMissing(LookupError):
    """The RBG does not exist (404, or not in the file)."""


class RbgReadError(RuntimeError):
    """The RBG could not be read (apiserver unreachable, RBAC, ...)."""


class RbgFileError(ValueError):
    """An ``--rbg-file`` that cannot be read or holds no RoleBasedGroup."""


# -- RBG sources -----------------------------------------------------------------------------

_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)


class KubeRbgSource:
    """RBGs from the Kubernetes API (``kube.rbg.get_rbg``)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def get(self, namespace: str, name: str) -> Mapping[str, Any]:
        try:
            return rbgapi.get_rbg(self.api_client, namespace, name)
        except NotFound as exc:
            raise RbgMissing(f"RBG {namespace}/{name} not found: {exc.message}") from None
        except KubeError as exc:
            raise RbgReadError(f"cannot read RBG {namespace}/{name}: {exc}") from None
        except _TRANSPORT_ERRORS as exc:
            raise RbgReadError(
                f"cannot read RBG {namespace}/{name}: Kubernetes API unreachable: {exc}"
            ) from None


def _flatten(doc: Any) -> Iterable[Any]:
    if doc is None:
        return
    if isinstance(doc, list):
        for item in doc:
            yield from _flatten(item)
    elif isinstance(doc, Mapping) and isinstance(doc.get("items"), list):
        yield from _flatten(doc["items"])  # a List (kubectl get -o json/yaml)
    else:
        yield doc


def load_rbg_objects(path: str | Path) -> list[dict[str, Any]]:
    """The RoleBasedGroup objects in a file: one object, a multi-document YAML, or a List.

    JSON is read as YAML (a superset). Objects of other kinds are skipped; a file with no RBG
    at all is an error.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RbgFileError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise RbgFileError(f"{p}: not valid YAML or JSON: {exc}") from None
    found: list[dict[str, Any]] = []
    for obj in (o for d in docs for o in _flatten(d)):
        if not isinstance(obj, Mapping):
            raise RbgFileError(f"{p}: expected Kubernetes objects, found {type(obj).__name__}")
        if obj.get("kind") != rbgapi.KIND:
            log.debug("%s: skipping a %s", p, obj.get("kind") or "object without kind")
            continue
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            raise RbgFileError(f"{p}: a RoleBasedGroup without metadata.name")
        found.append(dict(obj))
    if not found:
        raise RbgFileError(f"{p}: no RoleBasedGroup (kind: {rbgapi.KIND}) in the file")
    return found


class FileRbgSource:
    """RBGs from a file (see :func:`load_rbg_objects`), read once, for offline runs.

    An object without a ``status`` (a manifest rather than a ``kubectl get`` dump) is taken
    as fully rolled out: every role's ``readyReplicas`` equals its spec replicas, else the
    policy would refuse every scale-down as "rolling out". An object that has a status is
    used as it is. A namespace absent from the object is ``default``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        for obj in load_rbg_objects(self.path):
            meta = obj.get("metadata") or {}
            key = (meta.get("namespace") or "default", meta["name"])
            if "status" not in obj:
                obj["status"] = {
                    "roleStatuses": [
                        {
                            "name": role["name"],
                            "replicas": rbgapi.spec_replicas(role),
                            "readyReplicas": rbgapi.spec_replicas(role),
                            "updatedReplicas": rbgapi.spec_replicas(role),
                        }
                        for role in rbgapi.rbg_roles(obj)
                        if role.get("name")
                    ]
                }
            obj["metadata"] = {**meta, "namespace": key[0]}
            self.objects[key] = obj

    def get(self, namespace: str, name: str) -> Mapping[str, Any]:
        try:
            return self.objects[(namespace, name)]
        except KeyError:
            have = ", ".join(f"{ns}/{n}" for ns, n in sorted(self.objects)) or "none"
            raise RbgMissing(f"RBG {namespace}/{name} is not in {self.path} (has {have})") from None


# -- structured log fields -------------------------------------------------------------------


def _replicas_text(replicas: Mapping[str, int]) -> str:
    return ",".join(f"{role}:{n}" for role, n in replicas.items()) or "-"


def kv_text(fields: Mapping[str, Any]) -> str:
    """``a=1 b="two words"``: values with spaces, quotes or ``=`` are JSON-quoted."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, Mapping):
            text = _replicas_text(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        if not text or any(c in text for c in ' "=\\\n\t'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


# -- the controller --------------------------------------------------------------------------


class Controller:
    """The autoscaler loop for every target in ``config`` (see the module doc)."""

    def __init__(
        self,
        config: AutoscalerConfig,
        signals: SignalsSource,
        rbgs: RbgSource,
        actuator: Actuator | None = None,
        events: EventSink | None = None,
        *,
        clock: Callable[[], float] = time.time,
        dry_run: bool = False,
        elector: Elector | None = None,
        renew_period_s: float = DEFAULT_RENEW_PERIOD_S,
        registry: CollectorRegistry | None = None,
        placement: PlacementLike | None = None,
        pods: PodLister | None = None,
        deletion_cost: bool = False,
    ) -> None:
        if renew_period_s <= 0:
            raise ValueError("renew_period_s must be > 0")
        self.config = config
        self.signals = signals
        self.rbgs = rbgs
        self.actuator = actuator
        self.events = events
        self.elector = elector
        self.dry_run = dry_run or actuator is None
        self.renew_period_s = renew_period_s
        self._clock = clock
        self._states: dict[str, ScalingState] = {}
        self._last_renew: float | None = None
        self._was_leader = False
        self._next_tick: float | None = None
        self.last_decisions: list[Decision] = []
        #: The extender's placement service (a ``PlacementClient``); None: placement-blind.
        self.placement = placement
        self.pods = pods
        self.deletion_cost = deletion_cost
        #: Target -> (last PendingCapacity message, when it was recorded).
        self._pending_events: dict[str, tuple[str, float]] = {}
        #: Per target, what the placement gate made of the last decision (with placement).
        self.last_gates: dict[str, GateResult] = {}

        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.m_current = Gauge(
            "topo_sched_autoscaler_replicas",
            "Replicas of a target's role in the RBG spec, as last read.",
            ["target", "role"],
            registry=r,
        )
        self.m_desired = Gauge(
            "topo_sched_autoscaler_desired_replicas",
            "Replicas the last decision wants for a target's role (= current on hold).",
            ["target", "role"],
            registry=r,
        )
        self.m_decisions = Counter(
            "topo_sched_autoscaler_decisions",
            "Decisions by target, action (scale, hold) and reason code (a bounded set: "
            "demand, slo, window, rate-limit, min, max, steady, stale, missing, nan, "
            "unreachable, rolling-out, rbg-missing, rbg-unreadable, write-failed, not-leader, "
            "error, ...).",
            ["target", "action", "code"],
            registry=r,
        )
        self.m_tick = Histogram(
            "topo_sched_autoscaler_tick_duration_seconds",
            "Time one tick takes over all targets (signals, decision, writes).",
            buckets=_TICK_BUCKETS,
            registry=r,
        )
        self.m_leader = Gauge(
            "topo_sched_autoscaler_leader",
            "1 while this replica is the one that acts (holds the Lease, or runs without "
            "leader election), else 0.",
            registry=r,
        )
        self.m_pending = Gauge(
            "topo_sched_autoscaler_pending_units",
            "Ratio units the last decision wanted but the placement service said cannot be "
            "placed now (0 when none; a band-mode change counts as one unit).",
            ["target"],
            registry=r,
        )
        self.m_placement_unavailable = Counter(
            "topo_sched_autoscaler_placement_unavailable",
            "Scale-ups applied without a placement check because the placement service "
            "could not answer (unreachable, timed out, rejected the request).",
            ["target"],
            registry=r,
        )
        self.m_cost_patches = Counter(
            "topo_sched_autoscaler_deletion_cost_patches",
            "Pods annotated with controller.kubernetes.io/pod-deletion-cost before a "
            "scale-down (--deletion-cost).",
            ["target"],
            registry=r,
        )
        self.m_cost_failures = Counter(
            "topo_sched_autoscaler_deletion_cost_failures",
            "Failures to rank or annotate pods before a scale-down (the scale-down goes on).",
            ["target"],
            registry=r,
        )

    # -- state -------------------------------------------------------------------------------

    def state(self, target: str) -> ScalingState:
        """The policy state kept for ``namespace/name`` (empty before its first tick)."""
        return self._states.get(target, ScalingState())

    @property
    def is_leader(self) -> bool:
        return True if self.elector is None else self.elector.is_leader

    # -- one tick ----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[Decision]:
        """One decision per target, applied unless dry run; never raises."""
        started = time.monotonic()
        at = self._clock() if now is None else float(now)
        decisions = []
        for target in self.config.targets:
            self._renew_if_due()
            try:
                decision = self._tick_target(target, at)
            except Exception as exc:  # a bug must not stop the other targets or the loop
                log.exception("target %s: tick failed", target.rbg)
                why = f"internal error: {type(exc).__name__}: {exc}; holding"
                decision = Decision(target.rbg, {}, {}, "hold", why, "error")
            self._observe(decision)
            decisions.append(decision)
        self.m_tick.observe(time.monotonic() - started)
        self.last_decisions = decisions
        return decisions

    def _tick_target(self, target: Target, now: float) -> Decision:
        key = target.rbg
        try:
            rbg = self.rbgs.get(target.namespace, target.name)
        except RbgMissing as exc:
            return Decision(key, {}, {}, "hold", f"{exc}; holding", "rbg-missing")
        except Exception as exc:  # RbgReadError, or any other source's failure
            return Decision(key, {}, {}, "hold", f"{exc}; holding", "rbg-unreadable")
        replicas = rbgapi.role_replicas(rbg)
        try:
            signals = self.signals.read(target, now=now)
        except Exception as exc:  # the protocol says never raise; do not trust it
            signals = TargetSignals(source_error=f"{type(exc).__name__}: {exc}")
        state = self.state(key)
        decision, new_state = decide(target, signals, replicas, state, now)
        unchanged = dataclasses.replace(new_state, changes=state.changes)
        gate: GateResult | None = None
        if self.placement is not None and decision.action == "scale":
            decision, new_state, gate = self._gate(target, rbg, decision, new_state, unchanged, now)
        if self.placement is not None:
            self.last_gates[key] = gate or GateResult(desired=dict(decision.desired))
            if gate is None or not gate.degraded:
                self.m_pending.labels(key).set(gate.pending_units if gate else 0)
        decision = self._act(target, rbg, decision, new_state, unchanged)
        if gate is not None and gate.pending_units and not self.dry_run and self.is_leader:
            self._pending_capacity_event(target, rbg, gate, decision, now)
        return decision

    def _act(
        self,
        target: Target,
        rbg: Mapping[str, Any],
        decision: Decision,
        new_state: ScalingState,
        unchanged: ScalingState,
    ) -> Decision:
        """Apply a ``scale`` decision (unless dry run); keep the policy state accordingly."""
        key = target.rbg
        if decision.action != "scale":
            self._states[key] = new_state
            return decision
        if self.dry_run or self.actuator is None:
            self._states[key] = unchanged  # nothing was changed: no change to rate-limit
            return decision
        if not self.is_leader:
            self._states[key] = unchanged
            return _held(decision, "not-leader", "no longer the leader; not writing")
        if self.deletion_cost and any(
            n < decision.current.get(r, 0) for r, n in decision.desired.items()
        ):
            self._order_scale_down(target, decision)
        result = self._apply(target, decision)
        if not result.applied:
            self._states[key] = unchanged
            held = _held(decision, "write-failed", f"not applied: {result.message}")
            self._event(rbg, "ScaleFailed", held.reason, "Warning")
            return held
        self._states[key] = new_state
        if result.changed or result.code != "noop":
            self._event(rbg, "Scaled", decision.reason, "Normal")
        return decision

    # -- placement ---------------------------------------------------------------------------

    def _gate(
        self,
        target: Target,
        rbg: Mapping[str, Any],
        decision: Decision,
        new_state: ScalingState,
        unchanged: ScalingState,
        now: float,
    ) -> tuple[Decision, ScalingState, GateResult]:
        """Put a ``scale`` decision to WhatIf; return the decision, the state to keep, and why."""
        assert self.placement is not None
        try:
            gate = gate_scale_up(decision, rbg, target, self.placement)
        except Exception as exc:  # gate_scale_up handles the client's errors; a bug otherwise
            log.exception("target %s: placement gate failed", target.rbg)
            why = f"placement gate failed: {type(exc).__name__}: {exc}"
            gate = GateResult(
                desired=dict(decision.desired),
                degraded=True,
                message=why,
                cause="placement check failed",
            )
        if gate.degraded:
            self.m_placement_unavailable.labels(target.rbg).inc()
            fields = {"target": target.rbg, "degraded": True, "reason": gate.message}
            log.warning(
                "placement unavailable target=%s: applying the plain decision: %s",
                target.rbg,
                gate.message,
                extra={"fields": fields},
            )
            reason = f"{decision.reason}; placement not checked ({gate.cause})"
            return dataclasses.replace(decision, reason=reason), new_state, gate
        if not gate.pending_units and gate.checked:
            log.debug("target %s: %s", target.rbg, gate.message)
        decided, state = apply_gate(target, decision, gate, new_state, unchanged, now)
        return decided, state, gate

    def _pending_capacity_event(
        self,
        target: Target,
        rbg: Mapping[str, Any],
        gate: GateResult,
        decision: Decision,
        now: float,
    ) -> None:
        """A ``PendingCapacity`` Warning on the RBG; an identical one at most every 5 min."""
        if decision.action == "scale":
            what = f"scaling to {shape_text(decision.desired)}"
        else:
            what = f"holding at {shape_text(decision.current)}"
        message = (
            f"{gate.pending_units} of {gate.requested_units} ratio unit(s) cannot be placed now "
            f"({what}): {gate.message}"
        )
        last = self._pending_events.get(target.rbg)
        if last is not None and last[0] == message and now - last[1] < PENDING_EVENT_INTERVAL_S:
            return
        self._pending_events[target.rbg] = (message, now)
        self._event(rbg, "PendingCapacity", message, "Warning")

    def _order_scale_down(self, target: Target, decision: Decision) -> None:
        """Pod-deletion costs before a scale-down; never raises, never blocks it."""
        if self.placement is None or self.pods is None:
            return
        try:
            result = order_scale_down(decision, target, self.pods, self.placement)
        except Exception as exc:  # order_scale_down collects its errors; a bug otherwise
            log.exception("target %s: ranking pods for the scale-down failed", target.rbg)
            self.m_cost_failures.labels(target.rbg).inc()
            log.warning("target %s: no deletion costs set: %s", target.rbg, exc)
            return
        for role, ranked in result.ranked.items():
            order = ", ".join(f"{pod}@{node}={q:.3f}" for pod, node, q in ranked)
            log.info("deletion cost target=%s role=%s worst first: %s", target.rbg, role, order)
        if result.patched:
            self.m_cost_patches.labels(target.rbg).inc(len(result.patched))
        for line in result.errors:
            self.m_cost_failures.labels(target.rbg).inc()
            log.warning("deletion cost target=%s: %s; scaling down anyway", target.rbg, line)

    def _apply(self, target: Target, decision: Decision) -> ApplyResult:
        assert self.actuator is not None
        try:
            return self.actuator.apply(target.namespace, target.name, dict(decision.desired))
        except Exception as exc:  # RbgActuator does not raise; another actuator might
            log.exception("target %s: actuator raised", target.rbg)
            return ApplyResult(False, 1, {}, f"{type(exc).__name__}: {exc}", code="error")

    def _event(self, rbg: Mapping[str, Any], reason: str, message: str, type_: str) -> None:
        if self.events is None:
            return
        try:
            self.events.record(rbg, reason, message, type_)
        except Exception:  # best-effort
            log.warning("could not record event %s", reason, exc_info=True)

    def _observe(self, d: Decision) -> None:
        for role, n in d.current.items():
            self.m_current.labels(d.name, role).set(n)
        for role, n in d.desired.items():
            self.m_desired.labels(d.name, role).set(n)
        self.m_decisions.labels(d.name, d.action, d.code).inc()
        fields = {
            "target": d.name,
            "action": d.action,
            "code": d.code,
            "current": dict(d.current),
            "desired": dict(d.desired),
            "reason": d.reason,
        }
        if self.dry_run and d.action == "scale":
            fields["dry_run"] = True
        level = logging.WARNING if d.code in ("write-failed", "error") else logging.INFO
        log.log(level, "decision %s", kv_text(fields), extra={"fields": fields})

    # -- the loop ----------------------------------------------------------------------------

    def _renew_if_due(self) -> bool:
        """Renew the Lease if ``renew_period_s`` passed since the last round; leader now?"""
        if self.elector is None:
            self.m_leader.set(1)
            return True
        now = self._clock()
        if self._last_renew is None or now - self._last_renew >= self.renew_period_s:
            self._last_renew = now
            try:
                self.elector.try_acquire_or_renew()
            except Exception:  # LeaseElector does not raise; another elector might
                log.exception("leader election round failed")
        leader = self.elector.is_leader
        if leader and not self._was_leader:
            log.info("became the leader; starting from a fresh policy state")
            self._states.clear()
            self._next_tick = None  # tick at once
        elif self._was_leader and not leader:
            log.warning("lost leadership; not ticking until it is regained")
        self._was_leader = leader
        self.m_leader.set(1 if leader else 0)
        return leader

    def step(self) -> float:
        """One pass of the loop: renew when due, tick when leader and due.

        Returns the seconds to wait before the next pass (at most ``renew_period_s`` while
        there is an elector).
        """
        leader = self._renew_if_due()
        now = self._clock()
        if leader and (self._next_tick is None or now >= self._next_tick):
            started = now
            self.tick()
            self._next_tick = started + self.config.interval_seconds
            now = self._clock()
            if self._next_tick <= now:  # the tick overran the interval: next one now-ish
                self._next_tick = now
        if self.elector is None:
            assert self._next_tick is not None
            return max(0.0, self._next_tick - now)
        if not leader or self._next_tick is None:
            return self.renew_period_s
        until_renew = self.renew_period_s - (now - (self._last_renew or now))
        return max(0.0, min(until_renew, self._next_tick - now))

    def run(self, stop_event: threading.Event) -> None:
        """Loop until ``stop_event`` is set; release the Lease on the way out."""
        log.info(
            "autoscaler loop: %d target(s), every %gs%s%s",
            len(self.config.targets),
            self.config.interval_seconds,
            ", dry run" if self.dry_run else "",
            f", leader election (renew every {self.renew_period_s:g}s)" if self.elector else "",
        )
        try:
            while not stop_event.is_set():
                try:
                    delay = self.step()
                except Exception:  # never let the loop die
                    log.exception("autoscaler loop pass failed")
                    delay = self.renew_period_s
                stop_event.wait(delay)
        finally:
            if self.elector is not None:
                try:
                    self.elector.release()
                except Exception:
                    log.warning("releasing the Lease failed", exc_info=True)
            self.m_leader.set(0)
            self._was_leader = False
            log.info("autoscaler loop stopped")


def _held(decision: Decision, code: str, why: str) -> Decision:
    """The hold a ``scale`` decision becomes when it was not applied."""
    return dataclasses.replace(
        decision,
        desired=dict(decision.current),
        action="hold",
        reason=f"{decision.reason}; {why}",
        code=code,
        units_desired=decision.units_current,
    )


def decisions_json(decisions: Iterable[Decision]) -> dict[str, Any]:
    """``{"targets": [{"name", "current", "desired", "action", "reason", "code"}, ...]}``."""
    return {"targets": [d.to_dict() for d in decisions]}
