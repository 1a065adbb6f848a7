"""A thin client for the extender's ``topo_sched.v1.PlacementService`` (the autoscaler's).

Returns the core dataclasses (:class:`~topo_sched.placement.whatif.WhatIfResult`,
:class:`~topo_sched.placement.engine.Explanation`,
:class:`~topo_sched.placement.whatif.Summary`), so callers never touch protobuf.

Errors are typed:

- :class:`PlacementUnavailable`: the service could not answer (unreachable, refused, TLS
  handshake failed, deadline exceeded, not synced yet, internal error, ...). The autoscaler
  degrades to its plain policy on it. Raised quickly: calls do not wait for the channel to
  become ready, and every call has a deadline of ``timeout_s``.
- :class:`PlacementRequestError` (also a ``ValueError``): the service rejected the request
  (INVALID_ARGUMENT, NOT_FOUND, OUT_OF_RANGE): a bug on the caller's side; retrying will
  not help.

Both derive from :class:`PlacementError` and carry the gRPC status ``code`` and the
server's ``details``; the gRPC exception is not chained.

One channel per client, created on first use and reused (gRPC reconnects by itself); the
client is safe to share between threads. ``close()`` (or ``with``) releases it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from topo_sched.placement.engine import Explanation
from topo_sched.placement.whatif import Summary, WhatIfRequest, WhatIfResult
from topo_sched.rpc.placement_server import (
    SERVICE_NAME,
    explanation_from_proto,
    request_to_proto,
    result_from_proto,
    summary_from_proto,
)
from topo_sched.rpc.topo_sched.v1 import placement_pb2 as pb
from topo_sched.rpc.topo_sched.v1 import placement_pb2_grpc as pb_grpc

__all__ = [
    "ClientTls",
    "PlacementClient",
    "PlacementError",
    "PlacementRequestError",
    "PlacementUnavailable",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Statuses that mean "the request is wrong", not "the service cannot answer".
_REQUEST_ERRORS = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}
)


class PlacementError(RuntimeError):
    """The placement service answered with an error or not at all."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details


class PlacementUnavailable(PlacementError):
    """The placement service cannot answer now; fall back to a placement-blind policy."""


class PlacementRequestError(PlacementError, ValueError):
    """The placement service rejected the request as malformed or naming something unknown."""


@dataclass(frozen=True)
class ClientTls:
    """Client TLS from PEM files.

    ``ca_file``: roots to verify the server with (None: the system roots). ``cert_file`` and
    ``key_file``: the client certificate for mTLS. ``server_name``: the name to verify in the
    server's certificate when it differs from the target's host (e.g. a Service DNS name).
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None) -> bytes | None:
            if p is None:
                return None
            try:
                return Path(p).read_bytes()
            except OSError as e:
                raise PlacementError(f"TLS file {p}: cannot read: {e.strerror or e}") from None

        if (self.cert_file is None) != (self.key_file is None):
            raise PlacementError("client TLS needs both cert_file and key_file, or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


class PlacementClient:
    """``PlacementClient("extender.topo-sched:9090", timeout_s=2)``; ``unix:/path`` works too."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 2.0,
        tls: ClientTls | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.target = target
        self.timeout_s = timeout_s
        self.tls = tls
        self._options = list(options)
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.PlacementServiceStub | None = None

    # -- channel ----------------------------------------------------------------------------

    def _get_stub(self) -> pb_grpc.PlacementServiceStub:
        if self._stub is None:
            options = list(self._options)
            if self.tls is not None:
                if self.tls.server_name:
                    options.append(("grpc.ssl_target_name_override", self.tls.server_name))
                self._channel = grpc.secure_channel(
                    self.target, self.tls.credentials(), options=options
                )
            else:
                self._channel = grpc.insecure_channel(self.target, options=options)
            self._stub = pb_grpc.PlacementServiceStub(self._channel)
        return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    def __enter__(self) -> PlacementClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, fn: Callable[[pb_grpc.PlacementServiceStub], _T]) -> _T:
        stub = self._get_stub()
        try:
            return fn(stub)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = (e.details() if hasattr(e, "details") else None) or ""
            name = code.name if code is not None else "UNKNOWN"
            if code in _REQUEST_ERRORS:
                raise PlacementRequestError(
                    f"{SERVICE_NAME}/{method} at {self.target} rejected the request: "
                    f"{name}: {details}",
                    code,
                    details,
                ) from None
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                why = f"no answer within {self.timeout_s:g} s"
            else:
                why = f"{name}: {details}" if details else name
            raise PlacementUnavailable(
                f"placement service {self.target} unavailable ({method}): {why}", code, details
            ) from None

    # -- calls ------------------------------------------------------------------------------

    def what_if(self, request: WhatIfRequest) -> WhatIfResult:
        """Would ``request.units`` more ratio units fit, and where (see ``placement.whatif``)."""
        msg = request_to_proto(request)
        reply = self._call("WhatIf", lambda s: s.WhatIf(msg, timeout=self.timeout_s))
        return result_from_proto(reply)

    def explain(
        self,
        pod: Mapping[str, Any] | None = None,
        *,
        namespace: str | None = None,
        name: str | None = None,
        nodes: Sequence[str] | None = None,
    ) -> Explanation:
        """Per-node verdicts for a Pod object, or for the pod ``namespace/name`` in the state."""
        if (pod is None) == (name is None):
            raise ValueError("give either a pod object or name= (with namespace=)")
        if pod is not None:
            msg = pb.ExplainRequest(pod_json=json.dumps(pod), nodes=list(nodes or ()))
        else:
            ref = pb.PodRef(namespace=namespace or "default", name=name or "")
            msg = pb.ExplainRequest(pod_ref=ref, nodes=list(nodes or ()))
        reply = self._call("Explain", lambda s: s.Explain(msg, timeout=self.timeout_s))
        return explanation_from_proto(reply)

    def cluster_summary(self) -> Summary:
        """Free GPUs by island size and per topology domain, and the state's age."""
        msg = pb.ClusterSummaryRequest()
        reply = self._call(
            "ClusterSummary", lambda s: s.ClusterSummary(msg, timeout=self.timeout_s)
        )
        return summary_from_proto(reply)
