"""Leader election with a ``coordination.k8s.io/v1`` Lease: one autoscaler replica acts.

The algorithm is client-go's ``leaderelection`` with a ``LeaseLock``, in one synchronous call
(``try_acquire_or_renew``) that the controller loop makes on every tick:

1. GET the Lease. 404 -> POST a new one naming us (``acquireTime`` = ``renewTime`` = now,
   ``leaseTransitions: 0``) -> leader. A 409 ``AlreadyExists`` on that POST means another
   candidate created it first: GET it again and go on with step 2.
2. Held by another identity and not expired -> not leader.
3. Expired, or ``holderIdentity`` empty (released) -> take over: PUT the Lease as read (its
   ``metadata.resourceVersion`` included) with us as holder, ``acquireTime`` = ``renewTime``
   = now and ``leaseTransitions`` + 1. A 409 means another candidate wrote it first: we lost
   the race -> not leader.
4. Held by us -> renew: PUT with ``renewTime`` = now (``acquireTime`` and
   ``leaseTransitions`` kept). A 409 means someone else wrote the Lease since we read it
   (they took it over) -> not leader.

Expiry is judged on OUR clock, as client-go does, never by comparing the Lease's
``renewTime`` with our wall clock (the holder's clock may be skewed): the Lease is expired
when its record (holder, acquire/renew times, transitions, duration) has not changed for
``lease_duration_s`` seconds since we first saw it. A freshly started candidate therefore
waits one lease duration before it takes over a Lease whose holder stopped renewing.

Times are written as ``MicroTime``: ``2026-01-01T00:00:00.000000Z`` (six fractional digits,
``Z``); the apiserver refuses other layouts. Bodies go out as raw JSON (the generated
``V1Lease`` model would rewrite them as ``2026-01-01T00:00:00+00:00``).

``is_leader`` is True only while our last successful acquire/renew is younger than
``renew_deadline_s`` (shorter than ``lease_duration_s``): a leader that cannot renew steps
down before any other candidate can consider the Lease expired, so two replicas never act
at once. A transient error (5xx, an unreachable apiserver, an unexpected 4xx such as a 422)
is logged and does not end leadership by itself; the deadline does. ``release()`` hands the
Lease back (empty holder, ``leaseDurationSeconds: 1``) so a successor takes over at once.

Concurrency model: called from the controller loop thread only. ``try_acquire_or_renew``,
``release`` and ``is_leader`` read and write the elector's state without locks; the caller
must call ``try_acquire_or_renew`` more often than ``renew_deadline_s`` (client-go's default
retry period is 2 s for a 10 s deadline) and check ``is_leader`` before every write it makes.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import kubernetes.client
import urllib3

from topo_sched.kube import rbg as rbgapi
from topo_sched.kube.errors import AlreadyExists, Conflict, KubeError, NotFound

log = logging.getLogger(__name__)

_CALL_ERRORS: tuple[type[BaseException], ...] = (KubeError, urllib3.exceptions.HTTPError, OSError)


def micro_time(seconds: float) -> str:
    """``2026-01-01T00:00:00.000000Z``: the ``metav1.MicroTime`` wire format (UTC)."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """One candidate in a Lease election (see the module doc)."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration_s: float = 15,
        renew_deadline_s: float = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not identity:
            raise ValueError("identity must not be empty")
        if not 0 < renew_deadline_s < lease_duration_s:
            raise ValueError("need 0 < renew_deadline_s < lease_duration_s")
        self.api_client = api_client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self._clock = clock
        #: Our clock when we last acquired or renewed; None while not leader.
        self._renewed_at: float | None = None
        #: The last Lease object we read or wrote (for release()).
        self._lease: dict[str, Any] | None = None
        #: The holder record last seen, and our clock when it last changed.
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0

    # -- public ------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True while our last acquire/renew is younger than ``renew_deadline_s``."""
        if self._renewed_at is None:
            return False
        if self._clock() - self._renewed_at < self.renew_deadline_s:
            return True
        log.warning(
            "lease %s: not renewed for %.1fs (deadline %.1fs); stepping down",
            self._key,
            self._clock() - self._renewed_at,
            self.renew_deadline_s,
        )
        self._renewed_at = None
        return False

    @property
    def holder(self) -> str | None:
        """The holder named in the Lease as last seen (None before the first read)."""
        if self._lease is None:
            return None
        return (self._lease.get("spec") or {}).get("holderIdentity") or None

    def try_acquire_or_renew(self) -> bool:
        """One election round; True when we hold the Lease afterwards."""
        now = self._clock()
        try:
            lease = self._get()
        except NotFound:
            return self._create(now)
        except _CALL_ERRORS as exc:
            return self._transient(now, "read", exc)
        return self._acquire_or_renew(lease, now)

    def release(self) -> bool:
        """Give the Lease up (empty holder, 1 s duration); True if released.

        Sent when the Lease as last seen names us (even past the renew deadline: if someone
        took it over since, the PUT's stale resourceVersion makes it a harmless 409).
        """
        self._renewed_at = None
        lease = self._lease
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return False
        now = self._clock()
        body = copy.deepcopy(lease)
        spec = body.setdefault("spec", {})
        spec.update(
            {
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "acquireTime": micro_time(now),
                "renewTime": micro_time(now),
            }
        )
        try:
            self._lease = self._put(body)
        except _CALL_ERRORS as exc:
            log.warning("lease %s: release failed (it will expire on its own): %s", self._key, exc)
            return False
        log.info("lease %s: released by %s", self._key, self.identity)
        return True

    # -- steps -------------------------------------------------------------------------------

    def _create(self, now: float) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_duration_s),
                "acquireTime": micro_time(now),
                "renewTime": micro_time(now),
                "leaseTransitions": 0,
            },
        }
        try:
            created = rbgapi.request_json(self.api_client, "POST", self._collection, body=body)
        except AlreadyExists:
            log.info("lease %s: created by another candidate first; reading it", self._key)
            try:
                lease = self._get()
            except _CALL_ERRORS as exc:
                return self._transient(now, "read after create conflict", exc)
            return self._acquire_or_renew(lease, now)
        except _CALL_ERRORS as exc:
            return self._transient(now, "create", exc)
        log.info("lease %s: created; %s is leader", self._key, self.identity)
        self._became_leader(created, now)
        return True

    def _acquire_or_renew(self, lease: dict[str, Any], now: float) -> bool:
        self._lease = lease
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        self._observe(spec, now)
        body = copy.deepcopy(lease)
        new_spec = body.setdefault("spec", {})
        if holder == self.identity:
            action = "renew"
            new_spec["renewTime"] = micro_time(now)
            new_spec["leaseDurationSeconds"] = int(self.lease_duration_s)
        else:
            if holder and not self._expired(now):
                if self._renewed_at is not None:
                    log.warning("lease %s: now held by %s; lost leadership", self._key, holder)
                self._renewed_at = None
                log.debug("lease %s: held by %s; not leader", self._key, holder)
                return False
            action = "take over"
            log.info(
                "lease %s: %s; %s takes over",
                self._key,
                f"holder {holder} expired" if holder else "no holder",
                self.identity,
            )
            new_spec.update(
                {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": int(self.lease_duration_s),
                    "acquireTime": micro_time(now),
                    "renewTime": micro_time(now),
                    "leaseTransitions": int(spec.get("leaseTransitions") or 0) + 1,
                }
            )
        try:
            written = self._put(body)
        except Conflict as exc:
            log.info("lease %s: %s lost the race (409): %s", self._key, action, exc.message)
            if self._renewed_at is not None:
                log.warning("lease %s: lost leadership", self._key)
            self._renewed_at = None
            return False
        except _CALL_ERRORS as exc:
            return self._transient(now, action, exc)
        if action == "take over":
            log.info("lease %s: %s is leader", self._key, self.identity)
        else:
            log.debug("lease %s: renewed by %s", self._key, self.identity)
        self._became_leader(written, now)
        return True

    # -- state -------------------------------------------------------------------------------

    def _became_leader(self, lease: dict[str, Any] | None, now: float) -> None:
        if lease:
            self._lease = lease
            self._observe(lease.get("spec") or {}, now)
        self._renewed_at = now

    def _observe(self, spec: dict[str, Any], now: float) -> None:
        record = (
            spec.get("holderIdentity"),
            spec.get("acquireTime"),
            spec.get("renewTime"),
            spec.get("leaseTransitions"),
            spec.get("leaseDurationSeconds"),
        )
        if record != self._observed:
            self._observed = record
            self._observed_at = now

    def _expired(self, now: float) -> bool:
        return now - self._observed_at >= self.lease_duration_s

    def _transient(self, now: float, action: str, exc: BaseException) -> bool:
        """An error that says nothing about the holder: leadership lasts until the deadline."""
        still = self._renewed_at is not None and now - self._renewed_at < self.renew_deadline_s
        log.warning(
            "lease %s: %s failed: %s; %s",
            self._key,
            action,
            exc,
            "still leader until the renew deadline" if still else "not leader",
        )
        if not still:
            self._renewed_at = None
        return still

    # -- API ---------------------------------------------------------------------------------

    @property
    def _key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def _collection(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{quote(self.namespace, safe='')}/leases"

    def _get(self) -> dict[str, Any]:
        return rbgapi.request_json(
            self.api_client, "GET", f"{self._collection}/{quote(self.name, safe='')}"
        )

    def _put(self, body: dict[str, Any]) -> dict[str, Any]:
        return rbgapi.request_json(
            self.api_client, "PUT", f"{self._collection}/{quote(self.name, safe='')}", body=body
        )
