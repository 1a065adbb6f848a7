"""Apply a scaling decision to a RoleBasedGroup: one change for all roles, or none.

``RbgActuator.apply(namespace, name, {"prefill": 4, "decode": 2})`` reads the RBG, then
writes the roles whose replicas differ from ``desired``:

- Roles WITHOUT a scaling adapter change together in ONE JSON Patch on the RBG. For every
  role named in ``desired`` the patch first ``test``s ``/spec/roles/N/name`` (the role is
  still at index N) and ``/spec/roles/N/replicas`` (it still has the replicas we read), then
  ``replace``s the replicas of the roles that change. The apiserver applies all ops or none,
  so these roles move atomically, and a concurrent writer makes the patch fail (a bare 422)
  instead of being overwritten. Unchanged roles are tested too, so a ratio is never built on
  a value that someone else just changed.
- Roles WITH ``scalingAdapter.enable: true`` are written through the
  RoleBasedGroupScalingAdapter ``<rbg>-<role>``: a merge patch of ``spec.replicas`` on its
  ``/scale`` subresource, conditional on the Scale's resourceVersion read just before. RBG's
  validating webhook denies any RBG update that sets such a role to something other than the
  adapter's ``spec.replicas``, so these roles are never in the RBG patch. The adapter's
  ``spec.replicas`` is the current value of such a role (the RBG's copy may lag until the RBG
  controller syncs it). If the adapter does not exist (yet), the webhook lets a direct change
  through, and the role goes into the RBG patch (logged as a warning).

Write order (the choice this module makes). Writes to two objects cannot be atomic, so a
failure between them leaves one role changed and the other not, until the rollback below
restores the first write. The order keeps that from happening where it can:

1. The RBG patch goes FIRST. It is the write most likely to be refused: it passes RBG's
   validating webhook (``failurePolicy: Fail``: a down webhook fails every RBG update with
   500, a policy can deny it with 403), its ``test`` ops fail on any concurrent change of
   the roles, and RBAC for ``rolebasedgroups`` is separate from the adapters'. When it fails
   nothing has been written, so the ratio is not disturbed at all and there is nothing to
   roll back. The adapters' ``/scale`` is not under RBG's webhook (its rule covers
   ``rolebasedgroups`` UPDATE only) and is guarded only by a resourceVersion, so a failure
   after the RBG patch is rare, and then the patch is undone.
2. Adapter writes follow, the smallest relative change (``|log(new/old)|``) first, ties in
   ``spec.roles`` order: if a later write fails and its rollback fails too, the role left
   changed is the one whose change moves the ratio least.

Retries. Conflicts (409 from a stale resourceVersion on ``/scale``; the bare 422 of a failed
JSON Patch ``test``), webhook denials (403 with ``admission webhook "..." denied``), plain
5xx and a refused connection are retried up to ``max_attempts`` tries in all (the first try
included), with exponential backoff through the injected ``sleep``. Before anything was
written a retry re-reads the RBG and plans again (a role may have gained an adapter, the
replicas may have moved). A later adapter write is retried alone after re-reading its Scale.
Not retried: an unreachable webhook (500 ``failed calling webhook``: it fails every RBG
update, so retrying would only hammer the apiserver; the message says so), an RBAC 403 (the
message names the verb and resource to grant), 404, 401, and a 422 with ``causes`` (a schema
error that a retry cannot fix).

Rollback. When a write fails after earlier ones succeeded, the earlier ones are written back
in reverse order: the RBG with a JSON Patch that tests the roles still hold the values we
wrote and replaces them with the old ones, an adapter with its old ``spec.replicas``
conditional on the resourceVersion our write produced. A rollback never overwrites a value
someone else changed in the meantime; then it fails, and the result says which role is left
changed (``code="rollback-failed"``) so the caller can raise an alarm.

Everything is logged (logger ``topo_sched.autoscaler.actuator``): the plan, every write and
its result, every retry with its reason, every rollback.

Concurrency: an ``RbgActuator`` keeps no state between calls, but one ``apply`` must not run
concurrently with another on the same RBG (the controller loop calls it from one thread).
The ``ApiClient`` may be shared.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client
import urllib3

from topo_sched.kube import rbg as rbgapi
from topo_sched.kube.errors import (
    Conflict,
    Forbidden,
    InternalError,
    Invalid,
    KubeError,
    NotFound,
    Unauthorized,
    WebhookUnavailable,
)
from topo_sched.scaling.signals import Decision

log = logging.getLogger(__name__)

#: Errors of the HTTP layer itself (connection refused, timeout, reset).
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)
_CALL_ERRORS: tuple[type[BaseException], ...] = (KubeError, *TRANSPORT_ERRORS)

_RBAC_DENIAL = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<resource>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?'
    r'(?: in the namespace "(?P<namespace>[^"]*)")?'
)
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did.

    - ``applied``: the RBG now has the desired replicas (also True when it already had them).
    - ``attempts``: tries made (1 = the first try worked or failed for good).
    - ``changed``: role -> (old, new) for every role this call left changed: all written
      roles on success, nothing after a complete rollback, the roles stuck at the new value
      when a rollback failed.
    - ``message``: one line for logs and Events, naming the roles and what happened.
    - ``rolled_back``: a write failed after another one had succeeded, and that one was
      written back (the RBG is as before the call).
    - ``code``: short machine-readable outcome: applied, noop, conflict, webhook-denied,
      webhook-unavailable, forbidden, unauthorized, not-found, invalid, unknown-role,
      invalid-request, server-error, unreachable, error, rollback-failed.
    """

    applied: bool
    attempts: int
    changed: dict[str, tuple[int, int]]
    message: str
    rolled_back: bool = False
    code: str = "applied"


# -- the plan --------------------------------------------------------------------------------


@dataclass
class _DirectRole:
    index: int
    role: str
    old: int
    new: int


@dataclass
class _RbgPatch:
    """One JSON Patch on the RBG for the roles without a scaling adapter."""

    roles: list[_DirectRole]
    wrote: bool = False

    @property
    def changed(self) -> list[_DirectRole]:
        return [r for r in self.roles if r.old != r.new]

    def ops(self) -> list[dict[str, Any]]:
        tests: list[dict[str, Any]] = []
        for r in self.roles:
            tests.append(_op("test", f"/spec/roles/{r.index}/name", r.role))
            tests.append(_op("test", f"/spec/roles/{r.index}/replicas", r.old))
        replaces = [_op("replace", f"/spec/roles/{r.index}/replicas", r.new) for r in self.changed]
        return tests + replaces

    def undo_ops(self) -> list[dict[str, Any]]:
        tests: list[dict[str, Any]] = []
        for r in self.changed:
            tests.append(_op("test", f"/spec/roles/{r.index}/name", r.role))
            tests.append(_op("test", f"/spec/roles/{r.index}/replicas", r.new))
        replaces = [_op("replace", f"/spec/roles/{r.index}/replicas", r.old) for r in self.changed]
        return tests + replaces

    def role_changes(self) -> dict[str, tuple[int, int]]:
        return {r.role: (r.old, r.new) for r in self.changed}

    def describe(self) -> str:
        return f"RBG patch ({_changes_text(self.role_changes())})"


@dataclass
class _AdapterWrite:
    """``spec.replicas`` of one scaling adapter, through its ``/scale`` subresource."""

    index: int
    role: str
    adapter: str
    old: int
    new: int
    resource_version: str | None
    written_version: str | None = None
    wrote: bool = False

    @property
    def needed(self) -> bool:
        return self.old != self.new

    @property
    def relative_change(self) -> float:
        if self.old <= 0 or self.new <= 0:
            return math.inf
        return abs(math.log(self.new / self.old))

    def role_changes(self) -> dict[str, tuple[int, int]]:
        return {self.role: (self.old, self.new)}

    def describe(self) -> str:
        return f"scale of adapter {self.adapter} ({_changes_text(self.role_changes())})"


_Step = _RbgPatch | _AdapterWrite


@dataclass
class _Plan:
    rbg: dict[str, Any]
    steps: list[_Step] = field(default_factory=list)

    @property
    def changes(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for step in self.steps:
            out.update(step.role_changes())
        return out


class _UnknownRoles(Exception):
    pass


@dataclass
class _Run:
    """One ``apply`` call's bookkeeping."""

    namespace: str
    name: str
    attempts: int = 1

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class _Failure:
    code: str
    retryable: bool
    reason: str
    what: str = ""

    @property
    def message(self) -> str:
        return f"{self.what}: {self.reason}" if self.what else self.reason


@dataclass
class _Retry:
    failure: _Failure


def _op(op: str, path: str, value: Any) -> dict[str, Any]:
    return {"op": op, "path": path, "value": value}


def _changes_text(changes: Mapping[str, tuple[int, int]]) -> str:
    return ", ".join(f"{role} {old}->{new}" for role, (old, new) in changes.items())


# -- error classification --------------------------------------------------------------------


def rbac_message(exc: Forbidden, verb: str, resource: str, namespace: str) -> str:
    """Say which permission is missing, from the apiserver's RBAC denial text."""
    match = _RBAC_DENIAL.search(exc.message)
    user = "the autoscaler's ServiceAccount"
    group = rbgapi.GROUP
    if match:
        user = f'User "{match.group("user")}"'
        verb = match.group("verb")
        resource = match.group("resource")
        group = match.group("group") or ""
        namespace = match.group("namespace") or namespace
    return (
        f"RBAC denied: {user} lacks permission to {verb} {resource} "
        f"(apiGroup {group or 'core'!r}) in namespace {namespace}; grant verbs [{verb}] "
        f"on resources [{resource}] in apiGroups [{group!r}] to the autoscaler's Role; "
        f"apiserver said: {exc.message}"
    )


def _classify(exc: BaseException, what: str, verb: str, resource: str, namespace: str) -> _Failure:
    failure = _reason(exc, verb, resource, namespace)
    failure.what = what
    return failure


def _reason(exc: BaseException, verb: str, resource: str, namespace: str) -> _Failure:
    if isinstance(exc, WebhookUnavailable):
        return _Failure(
            "webhook-unavailable",
            False,
            f"admission webhook {exc.webhook or '?'} is unreachable and fails closed "
            f"(failurePolicy: Fail), so the apiserver rejects every update of {resource} until "
            f"it is back; not retrying; apiserver said: {exc.message}",
        )
    if isinstance(exc, Forbidden):
        if exc.by_admission_webhook:
            return _Failure(
                "webhook-denied",
                True,
                f"admission webhook {exc.webhook} denied it: {exc.denial}",
            )
        return _Failure("forbidden", False, f"{rbac_message(exc, verb, resource, namespace)}")
    if isinstance(exc, Unauthorized):
        return _Failure("unauthorized", False, f"credentials rejected: {exc.message}")
    if isinstance(exc, Conflict):
        return _Failure("conflict", True, f"changed since it was read: {exc.message}")
    if isinstance(exc, Invalid):
        if not exc.causes:
            # A failed JSON Patch `test` op (or a role index that no longer exists): the same
            # bare 422 for both; a fresh read settles either.
            return _Failure(
                "conflict",
                True,
                "the object changed since it was read (JSON Patch test failed)",
            )
        return _Failure("invalid", False, f"rejected as invalid: {exc.message}")
    if isinstance(exc, NotFound):
        return _Failure("not-found", False, f"not found: {exc.message}")
    if isinstance(exc, InternalError) or (
        isinstance(exc, KubeError) and exc.status in _RETRY_STATUSES
    ):
        return _Failure("server-error", True, f"apiserver error: {exc}")
    if isinstance(exc, KubeError):
        return _Failure("error", False, f"{exc}")
    return _Failure("unreachable", True, f"apiserver unreachable: {exc!r}")


# -- the actuator ----------------------------------------------------------------------------


class RbgActuator:
    """Applies desired replicas to an RBG's roles as one change (see the module doc)."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        max_attempts: int = 3,
        sleep: Callable[[float], None] = time.sleep,
        backoff_s: float = 0.5,
        max_backoff_s: float = 4.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.api_client = api_client
        self.max_attempts = max_attempts
        self._sleep = sleep
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    # -- public ------------------------------------------------------------------------------

    def apply_decision(self, decision: Decision) -> ApplyResult:
        """Apply ``decision.desired`` to the RBG ``decision.name`` (``namespace/name``)."""
        namespace, _, name = decision.name.partition("/")
        return self.apply(namespace, name, decision.desired)

    def apply(self, namespace: str, name: str, desired: Mapping[str, int]) -> ApplyResult:
        """Set every role in ``desired`` to its replicas, all or nothing (see the module doc)."""
        run = _Run(namespace, name)
        bad = {
            role: value
            for role, value in desired.items()
            if isinstance(value, bool) or not isinstance(value, int) or value < 0
        }
        if not desired or bad:
            why = f"bad replicas {bad}" if bad else "no roles given"
            return self._give_up(run, _Failure("invalid-request", False, f"{why}; nothing written"))
        log.info("RBG %s: applying %s", run.key, dict(desired))
        while True:
            try:
                plan = self._plan(run, desired)
            except _UnknownRoles as exc:
                return self._give_up(run, _Failure("unknown-role", False, str(exc)))
            except _CALL_ERRORS as exc:
                failure = _classify(
                    exc, f"read of RBG {run.key} or its adapters", "get", rbgapi.PLURAL, namespace
                )
                if failure.retryable and run.attempts < self.max_attempts:
                    self._pause(run, failure)
                    continue
                return self._give_up(run, failure)
            if not plan.steps:
                message = f"RBG {run.key}: already at {dict(desired)}; nothing to write"
                log.info(message)
                return ApplyResult(True, run.attempts, {}, message, code="noop")
            outcome = self._execute(run, plan)
            if isinstance(outcome, ApplyResult):
                return outcome
            self._pause(run, outcome.failure)

    # -- planning ----------------------------------------------------------------------------

    def _plan(self, run: _Run, desired: Mapping[str, int]) -> _Plan:
        rbg = rbgapi.get_rbg(self.api_client, run.namespace, run.name)
        roles = rbgapi.rbg_roles(rbg)
        index = {role.get("name"): i for i, role in enumerate(roles)}
        unknown = sorted(set(desired) - set(index))
        if unknown:
            raise _UnknownRoles(
                f"no role(s) {unknown} in the RBG (roles: {list(index)}); nothing written"
            )
        with_adapter = rbgapi.scaling_adapter_roles(rbg)
        direct: list[_DirectRole] = []
        adapters: list[_AdapterWrite] = []
        for i, role in enumerate(roles):
            role_name = role.get("name")
            if role_name not in desired:
                continue
            new = int(desired[role_name])
            in_rbg = rbgapi.spec_replicas(role)
            if role_name in with_adapter:
                write = self._adapter_write(run, i, role_name, in_rbg, new)
                if write is not None:
                    adapters.append(write)
                    continue
            direct.append(_DirectRole(i, role_name, in_rbg, new))
        plan = _Plan(rbg)
        patch = _RbgPatch(direct)
        if patch.changed:
            plan.steps.append(patch)
        needed = [a for a in adapters if a.needed]
        plan.steps.extend(sorted(needed, key=lambda a: (a.relative_change, a.index)))
        log.info(
            "RBG %s (resourceVersion %s): plan %s",
            run.key,
            rbgapi.resource_version(rbg),
            "; ".join(step.describe() for step in plan.steps) or "nothing to change",
        )
        return plan

    def _adapter_write(
        self, run: _Run, index: int, role: str, in_rbg: int, new: int
    ) -> _AdapterWrite | None:
        adapter = rbgapi.adapter_name(run.name, role)
        try:
            scale = rbgapi.get_scale(self.api_client, run.namespace, adapter)
        except NotFound:
            log.warning(
                "RBG %s: role %s has scalingAdapter.enable but adapter %s does not exist; "
                "RBG's webhook lets a direct change through then, so the role goes into the "
                "RBG patch",
                run.key,
                role,
                adapter,
            )
            return None
        current = rbgapi.scale_replicas(scale)
        if current != in_rbg:
            log.info(
                "RBG %s: adapter %s has spec.replicas %d, the RBG's role %s shows %d "
                "(not synced yet); the adapter is authoritative",
                run.key,
                adapter,
                current,
                role,
                in_rbg,
            )
        return _AdapterWrite(index, role, adapter, current, new, rbgapi.resource_version(scale))

    # -- writing -----------------------------------------------------------------------------

    def _execute(self, run: _Run, plan: _Plan) -> ApplyResult | _Retry:
        done: list[_Step] = []
        for step in plan.steps:
            try:
                self._write(run, step)
            except _CALL_ERRORS as exc:
                failure = self._classify_write(run, step, exc)
                if not done:
                    if failure.retryable and run.attempts < self.max_attempts:
                        return _Retry(failure)
                    return self._give_up(run, failure)
                failure = self._retry_step(run, step, failure)
                if failure is not None:
                    return self._roll_back(run, done, step, failure)
            if step.wrote:
                done.append(step)
        changes: dict[str, tuple[int, int]] = {}
        for step in done:
            changes.update(step.role_changes())
        message = f"RBG {run.key}: scaled {_changes_text(changes)}"
        if run.attempts > 1:
            message += f" (after {run.attempts} attempts)"
        log.info(message)
        return ApplyResult(True, run.attempts, changes, message)

    def _write(self, run: _Run, step: _Step) -> None:
        if isinstance(step, _RbgPatch):
            ops = step.ops()
            log.info("RBG %s: writing %s: JSON Patch %s", run.key, step.describe(), ops)
            written = rbgapi.json_patch_rbg(self.api_client, run.namespace, run.name, ops)
            step.wrote = True
            log.info(
                "RBG %s: %s done (resourceVersion %s, generation %s)",
                run.key,
                step.describe(),
                rbgapi.resource_version(written),
                (written.get("metadata") or {}).get("generation"),
            )
            return
        log.info(
            "RBG %s: writing %s (if resourceVersion %s)",
            run.key,
            step.describe(),
            step.resource_version,
        )
        scale = rbgapi.patch_scale(
            self.api_client,
            run.namespace,
            step.adapter,
            step.new,
            resource_version=step.resource_version,
        )
        step.wrote = True
        step.written_version = rbgapi.resource_version(scale)
        log.info(
            "RBG %s: %s done (Scale resourceVersion %s)",
            run.key,
            step.describe(),
            step.written_version,
        )

    def _classify_write(self, run: _Run, step: _Step, exc: BaseException) -> _Failure:
        if isinstance(step, _RbgPatch):
            return _classify(exc, step.describe(), "patch", rbgapi.PLURAL, run.namespace)
        return _classify(
            exc, step.describe(), "patch", f"{rbgapi.ADAPTER_PLURAL}/scale", run.namespace
        )

    def _retry_step(self, run: _Run, step: _Step, failure: _Failure) -> _Failure | None:
        """Retry a write that follows a successful one, alone; None once it is done."""
        while (
            failure.retryable
            and isinstance(step, _AdapterWrite)
            and run.attempts < self.max_attempts
        ):
            self._pause(run, failure)
            try:
                self._refresh_adapter(run, step)
                if not step.wrote:
                    self._write(run, step)
                return None
            except _CALL_ERRORS as exc:
                failure = self._classify_write(run, step, exc)
        return failure

    def _refresh_adapter(self, run: _Run, step: _AdapterWrite) -> None:
        scale = rbgapi.get_scale(self.api_client, run.namespace, step.adapter)
        current = rbgapi.scale_replicas(scale)
        step.resource_version = rbgapi.resource_version(scale)
        if current == step.new:
            # Most likely our failed-looking write went through (a lost answer): count it as
            # ours, so a rollback undoes it.
            log.info(
                "RBG %s: adapter %s already has %d replicas; nothing to write",
                run.key,
                step.adapter,
                current,
            )
            step.wrote = True
            step.written_version = step.resource_version
            return
        if current != step.old:
            log.warning(
                "RBG %s: adapter %s was changed from %d to %d by another writer (an HPA?) "
                "while scaling; writing %d over it",
                run.key,
                step.adapter,
                step.old,
                current,
                step.new,
            )
        step.old = current

    # -- rollback ----------------------------------------------------------------------------

    def _roll_back(
        self, run: _Run, done: list[_Step], failed: _Step, failure: _Failure
    ) -> ApplyResult:
        written = "; ".join(step.describe() for step in done)
        log.error(
            "RBG %s: %s failed after %s succeeded: %s; rolling back",
            run.key,
            failed.describe(),
            written,
            failure.reason,
        )
        restored: list[_Step] = []
        stuck: list[tuple[_Step, str]] = []
        for step in reversed(done):
            error = self._undo(run, step)
            if error is None:
                restored.append(step)
            else:
                stuck.append((step, error))
        head = (
            f"RBG {run.key}: {failed.describe()} failed ({failure.reason}) after {written} "
            "had succeeded"
        )
        if not stuck:
            undone = "; ".join(
                f"{step.describe()} undone, "
                + ", ".join(
                    f"{role} restored to {old}" for role, (old, _) in step.role_changes().items()
                )
                for step in restored
            )
            message = f"{head}; rolled back: {undone}; nothing is changed"
            log.error(message)
            return ApplyResult(
                False, run.attempts, {}, message, rolled_back=True, code=failure.code
            )
        left: dict[str, tuple[int, int]] = {}
        for step, _ in stuck:
            left.update(step.role_changes())
        problems = "; ".join(f"undoing {step.describe()} failed: {error}" for step, error in stuck)
        if restored:
            problems += "; undone: " + "; ".join(step.describe() for step in restored)
        message = (
            f"{head}; ROLLBACK FAILED: {problems}; left changed: {_changes_text(left)} while "
            f"{failed.describe()} is not applied: the ratio is off until fixed"
        )
        log.error(message)
        return ApplyResult(False, run.attempts, left, message, code="rollback-failed")

    def _undo(self, run: _Run, step: _Step) -> str | None:
        """Write back what ``step`` changed; None on success, else why it failed."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                if isinstance(step, _RbgPatch):
                    ops = step.undo_ops()
                    log.warning(
                        "RBG %s: rolling back %s: JSON Patch %s", run.key, step.describe(), ops
                    )
                    rbgapi.json_patch_rbg(self.api_client, run.namespace, run.name, ops)
                else:
                    log.warning(
                        "RBG %s: rolling back %s: %s to %d (if resourceVersion %s)",
                        run.key,
                        step.describe(),
                        step.adapter,
                        step.old,
                        step.written_version,
                    )
                    rbgapi.patch_scale(
                        self.api_client,
                        run.namespace,
                        step.adapter,
                        step.old,
                        resource_version=step.written_version,
                    )
                log.warning("RBG %s: rolled back %s", run.key, step.describe())
                return None
            except _CALL_ERRORS as exc:
                failure = self._classify_write(run, step, exc)
                if isinstance(step, _AdapterWrite) and failure.code == "conflict":
                    error = self._recheck_adapter_for_undo(run, step)
                    if error is not None:
                        return error
                elif failure.code == "conflict":
                    return f"{failure.reason}: someone else changed it after our write; left as is"
                elif not failure.retryable:
                    return failure.reason
                if attempt < self.max_attempts:
                    self._sleep(self._delay(attempt))
                else:
                    return failure.reason
        return "rollback attempts exhausted"  # pragma: no cover - the loop always returns

    def _recheck_adapter_for_undo(self, run: _Run, step: _AdapterWrite) -> str | None:
        """After a 409 on an undo: retry only if the adapter still holds what we wrote."""
        try:
            scale = rbgapi.get_scale(self.api_client, run.namespace, step.adapter)
        except _CALL_ERRORS as exc:
            return f"re-reading adapter {step.adapter} failed: {exc}"
        current = rbgapi.scale_replicas(scale)
        if current != step.new:
            return (
                f"adapter {step.adapter} was changed to {current} by someone else after our "
                "write; left as is"
            )
        step.written_version = rbgapi.resource_version(scale)
        return None

    # -- helpers -----------------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        return min(self.backoff_s * (2 ** (attempt - 1)), self.max_backoff_s)

    def _pause(self, run: _Run, failure: _Failure) -> None:
        delay = self._delay(run.attempts)
        log.warning(
            "RBG %s: %s; retrying in %.2fs (attempt %d of %d)",
            run.key,
            failure.message,
            delay,
            run.attempts + 1,
            self.max_attempts,
        )
        self._sleep(delay)
        run.attempts += 1

    def _give_up(self, run: _Run, failure: _Failure) -> ApplyResult:
        message = f"RBG {run.key}: {failure.message}"
        if failure.retryable:
            message += f" (gave up after {run.attempts} attempts)"
        log.error(message)
        return ApplyResult(False, run.attempts, {}, message, code=failure.code)
