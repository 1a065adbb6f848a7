"""Binding a pod to a node (``POST .../pods/{name}/binding``), with the extender's semantics.

kube-scheduler hands the bind to the extender and may retry it, so a bind must be idempotent:

- ``201`` (body: a ``Status`` with ``status: Success``): bound.
- ``409`` whose message says ``is already assigned to node "X"``: the pod is already bound.
  If X is the requested node this is a retry of a bind that worked -> success
  (``BindResult.already_bound`` is True). Otherwise ``AlreadyBoundElsewhere`` naming X.
  (The apiserver gives the same 409 for both cases; only the node name tells them apart.)
- Any other failure: its typed ``KubeError`` (``NotFound`` for a missing pod, ``Forbidden``,
  a plain ``Conflict`` for a stale resourceVersion precondition ...).

The apiserver (v1.26) does not check that the target node exists, and ignores
``metadata.uid`` in the Binding body (the generic create path clears it), so ``uid`` is sent
for the record but is not a guard against binding a recreated pod of the same name.

The response is read raw (``_preload_content=False``): the Python client would try to read the
``Status`` body as a ``V1Binding`` and raise a pydantic ``ValidationError`` after the pod was
bound. The generated client sends this POST without a Content-Type (and ignores
``_content_type`` for it), so the header is passed explicitly.

Concurrency: no state; safe to call from any thread with a shared ``ApiClient``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import kubernetes.client

from topo_sched.kube.client import call_json
from topo_sched.kube.errors import AlreadyBoundElsewhere, Conflict

log = logging.getLogger(__name__)

_ASSIGNED = re.compile(r'is already assigned to node "(?P<node>[^"]*)"')


@dataclass(frozen=True)
class BindResult:
    """A successful bind; ``already_bound`` when the pod was already on ``node`` (a retry)."""

    namespace: str
    pod: str
    node: str
    already_bound: bool = False


def create_binding(
    api_client: kubernetes.client.ApiClient,
    namespace: str,
    pod: str,
    node: str,
    *,
    uid: str | None = None,
) -> BindResult:
    """Bind ``namespace/pod`` to ``node``; idempotent for a pod already on ``node``."""
    api = kubernetes.client.CoreV1Api(api_client)
    try:
        call_json(
            api.create_namespaced_pod_binding,
            pod,
            namespace,
            _binding_body(namespace, pod, node, uid),
            _headers={"Content-Type": "application/json"},
        )
    except Conflict as exc:
        return _already_assigned(exc, namespace, pod, node)
    log.info("bound pod %s/%s to node %s", namespace, pod, node)
    return BindResult(namespace, pod, node)


def _binding_body(
    namespace: str, pod: str, node: str, uid: str | None
) -> kubernetes.client.V1Binding:
    return kubernetes.client.V1Binding(
        api_version="v1",
        kind="Binding",
        metadata=kubernetes.client.V1ObjectMeta(name=pod, namespace=namespace, uid=uid),
        target=kubernetes.client.V1ObjectReference(api_version="v1", kind="Node", name=node),
    )


def _already_assigned(exc: Conflict, namespace: str, pod: str, node: str) -> BindResult:
    match = _ASSIGNED.search(exc.message)
    if match is None:
        raise exc
    bound_node = match.group("node")
    if bound_node != node:
        raise AlreadyBoundElsewhere(
            bound_node, exc.status, exc.reason, exc.message, details=exc.details, body=exc.body
        ) from exc
    log.info(
        "pod %s/%s already bound to node %s; bind retry treated as success", namespace, pod, node
    )
    return BindResult(namespace, pod, node, already_bound=True)
