"""Kubernetes Events about an RBG, so ``kubectl describe rbg`` shows what the autoscaler did.

``EventRecorder.record(rbg, reason, message)`` POSTs one core/v1 ``Event`` to the RBG's
namespace, shaped as kube-apiserver v1.26 accepts it (fixtures 0950, 0980):

- ``involvedObject``: the RBG's ``apiVersion``, ``kind``, ``name``, ``namespace`` and ``uid``
  (the namespace must equal the Event's own, or the apiserver answers 422);
- ``metadata.name``: ``<rbg>.<suffix>`` where the suffix is the creation time in nanoseconds
  as hex, made strictly increasing per recorder (client-go's scheme), so two Events from
  the same recorder never share a name;
- ``firstTimestamp`` = ``lastTimestamp`` (RFC 3339, seconds), ``count: 1``,
  ``source.component`` and ``reportingComponent`` = ``component``, ``reportingInstance``
  = ``instance`` (default: ``$POD_NAME``, else the host name). ``eventTime`` is left out,
  as a core/v1 Event may do. Repeated Events are not aggregated.

Events are best-effort: a failure never reaches the caller. A 409 ``AlreadyExists`` (the
name is taken) is logged at info, any other error (RBAC, validation, an unreachable
apiserver, a malformed RBG dict) at warning; ``record`` then returns None.

The body is sent as raw JSON (``topo_sched.kube.rbg.request_json``), not through the
generated ``CoreV1Event`` model, which would rewrite the timestamps.

Concurrency: ``record`` may be called from any thread; the name suffix is taken under a lock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import kubernetes.client

from topo_sched.kube import rbg as rbgapi
from topo_sched.kube.errors import AlreadyExists

log = logging.getLogger(__name__)

DEFAULT_COMPONENT = "topo-sched-autoscaler"
#: core/v1 Event message limit the apiserver enforces (1 KiB is the documented bound).
MAX_MESSAGE = 1024


def rfc3339(seconds: float) -> str:
    """``2026-01-01T00:00:00Z``: the ``metav1.Time`` wire format (whole seconds, UTC)."""
    return datetime.fromtimestamp(int(seconds), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _default_instance() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname() or DEFAULT_COMPONENT


class EventRecorder:
    """Creates core/v1 Events about RBGs; never raises from ``record``."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        component: str = DEFAULT_COMPONENT,
        *,
        instance: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api_client = api_client
        self.component = component
        self.instance = instance or _default_instance()
        self._clock = clock
        self._lock = threading.Lock()
        self._last_suffix = 0

    def record(
        self, rbg: Mapping[str, Any], reason: str, message: str, type: str = "Normal"
    ) -> dict[str, Any] | None:
        """Create an Event about ``rbg``; return the created Event, or None if that failed."""
        try:
            event = self.build(rbg, reason, message, type)
        except (KeyError, TypeError, AttributeError) as exc:
            log.warning("not recording event %s (%s): bad RBG object: %r", reason, message, exc)
            return None
        namespace = event["metadata"]["namespace"]
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/events"
        try:
            created = rbgapi.request_json(self.api_client, "POST", path, body=event)
        except AlreadyExists as exc:
            log.info(
                "event %s/%s already exists; not recorded again (%s)",
                namespace,
                event["metadata"]["name"],
                exc.message,
            )
            return None
        except Exception as exc:  # best-effort: an Event must never break a scaling tick
            log.warning(
                "could not record event %s on %s/%s (%s): %s",
                reason,
                namespace,
                event["involvedObject"]["name"],
                message,
                exc,
            )
            return None
        log.debug(
            "recorded event %s/%s: %s %s", namespace, event["metadata"]["name"], reason, message
        )
        return created

    def build(
        self, rbg: Mapping[str, Any], reason: str, message: str, type: str = "Normal"
    ) -> dict[str, Any]:
        """The Event body ``record`` sends (a new unique name each call)."""
        meta = rbg["metadata"]
        name = meta["name"]
        namespace = meta["namespace"]
        now = self._clock()
        stamp = rfc3339(now)
        involved = {
            "apiVersion": rbg.get("apiVersion") or rbgapi.API_VERSION,
            "kind": rbg.get("kind") or rbgapi.KIND,
            "name": name,
            "namespace": namespace,
        }
        if meta.get("uid"):
            involved["uid"] = meta["uid"]
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{self._suffix(now)}", "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:MAX_MESSAGE],
            "type": type,
            "source": {"component": self.component},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
        }

    def _suffix(self, now: float) -> str:
        with self._lock:
            nanos = max(int(now * 1_000_000_000), self._last_suffix + 1)
            self._last_suffix = nanos
        return f"{nanos:x}"
