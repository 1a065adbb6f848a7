"""Typed errors for Kubernetes API failures.

Every adapter in ``topo_sched.kube`` raises a ``KubeError`` subclass instead of the client's
``ApiException``, so callers branch on the type (``NotFound``, ``Conflict`` ...) and on a few
parsed facts, not on status numbers and message text. ``from_api_exception`` does the
translation from the ``Status`` body the apiserver sends with every error; ``translate_errors``
is the context manager the adapters wrap their calls in.

Two 403s look alike on the wire (same ``code`` and ``reason``) and need different handling: an
RBAC denial (``... is forbidden: User "x" cannot patch resource ...``, with ``details``) is a
deployment bug, while a validating admission webhook denial (``admission webhook "name" denied
the request: ...``, without ``details``) is a policy answer about this particular change.
``Forbidden.by_admission_webhook`` tells them apart by that message prefix, the only reliable
sign. Likewise a 500 whose message says ``failed calling webhook "name"`` becomes
``WebhookUnavailable`` (the webhook is down and ``failurePolicy: Fail`` blocks every write).

Concurrency: pure functions and immutable-after-construction exception objects; safe from any
thread.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kubernetes.client.exceptions import ApiException

_WEBHOOK_DENIED = re.compile(r'^admission webhook "(?P<name>[^"]+)" denied the request(?::\s*)?')
_WEBHOOK_CALL_FAILED = re.compile(r'failed calling webhook "(?P<name>[^"]+)"')


class KubeError(Exception):
    """A failed Kubernetes API call, with the fields of its ``Status`` body."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.details: dict[str, Any] = details or {}
        self.body = body

    @property
    def causes(self) -> list[dict[str, Any]]:
        """``details.causes`` (field, reason, message), empty when the server gave none."""
        return list(self.details.get("causes") or [])


class BadRequest(KubeError):
    """400: the request itself is malformed (for example, a body that is not valid JSON)."""


class Unauthorized(KubeError):
    """401: the credentials were missing, wrong or expired."""


class Forbidden(KubeError):
    """403: RBAC refused the caller, or a validating admission webhook denied the change."""

    @property
    def by_admission_webhook(self) -> bool:
        """True for an admission webhook denial, False for an authorization (RBAC) denial."""
        return _WEBHOOK_DENIED.match(self.message) is not None

    @property
    def webhook(self) -> str | None:
        """Name of the denying admission webhook, None for an RBAC denial."""
        match = _WEBHOOK_DENIED.match(self.message)
        return match.group("name") if match else None

    @property
    def denial(self) -> str:
        """The webhook's own message (prefix removed), or the whole message for RBAC."""
        match = _WEBHOOK_DENIED.match(self.message)
        return self.message[match.end() :] if match else self.message


class NotFound(KubeError):
    """404: the object (or its namespace) does not exist."""


class Conflict(KubeError):
    """409: optimistic-concurrency conflict, already exists, or the operation cannot apply."""


class AlreadyExists(Conflict):
    """409 with reason AlreadyExists: a create of a name that is taken."""


class AlreadyBoundElsewhere(Conflict):
    """409 on a Binding: the pod is already assigned to another node (``bound_node``)."""

    def __init__(self, bound_node: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bound_node = bound_node


class Gone(KubeError):
    """410: the resourceVersion or continue token is too old (compacted/expired)."""

    @property
    def continue_token(self) -> str | None:
        """The fresh continue token an expired paginated list may carry (``metadata.continue``)."""
        metadata = (self.body or {}).get("metadata") or {}
        return metadata.get("continue") or None


class UnsupportedMediaType(KubeError):
    """415: the patch type is not accepted for this resource (e.g. strategic merge on a CR)."""


class Invalid(KubeError):
    """422: validation rejected the object; ``causes`` names the fields."""


class InternalError(KubeError):
    """500 (or other 5xx): the apiserver failed to process the request."""


class WebhookUnavailable(InternalError):
    """500 because a ``failurePolicy: Fail`` admission webhook could not be called."""

    @property
    def webhook(self) -> str | None:
        match = _WEBHOOK_CALL_FAILED.search(self.message)
        return match.group("name") if match else None


_BY_STATUS: dict[int, type[KubeError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    415: UnsupportedMediaType,
    422: Invalid,
}


def parse_status(body: str | bytes | None) -> dict[str, Any] | None:
    """The ``Status`` object in an error body, or None when the body is not one."""
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except (TypeError, ValueError):
        return None
    if isinstance(parsed, dict) and parsed.get("kind") == "Status":
        return parsed
    return None


def _error_class(status: int, reason: str, message: str) -> type[KubeError]:
    if status == 409 and reason == "AlreadyExists":
        return AlreadyExists
    if status >= 500:
        return WebhookUnavailable if _WEBHOOK_CALL_FAILED.search(message) else InternalError
    return _BY_STATUS.get(status, KubeError)


def from_status(status_body: dict[str, Any]) -> KubeError:
    """Build the typed error for a ``Status`` object (an error body or a watch ERROR event)."""
    code = int(status_body.get("code") or 0)
    reason = str(status_body.get("reason") or "")
    message = str(status_body.get("message") or reason)
    cls = _error_class(code, reason, message)
    return cls(code, reason, message, details=status_body.get("details"), body=status_body)


def from_api_exception(exc: ApiException) -> KubeError:
    """Translate an ``ApiException``; falls back to its HTTP status and reason without a body.

    The watch helper raises ``ApiException(status, reason="Reason: message")`` with no body
    for ERROR events; that case is parsed too.
    """
    status_body = parse_status(exc.body)
    if status_body is not None:
        status_body.setdefault("code", exc.status)
        return from_status(status_body)
    status = int(exc.status or 0)
    reason, _, message = str(exc.reason or "").partition(": ")
    message = message or str(exc.body or reason)
    cls = _error_class(status, reason, message)
    return cls(status, reason, message)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise any ``ApiException`` raised inside the block as its typed ``KubeError``."""
    try:
        yield
    except ApiException as exc:
        raise from_api_exception(exc) from exc
