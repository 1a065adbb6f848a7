"""RoleBasedGroup (RBG) reads and writes, and the scale subresource of its scaling adapters.

The RBG (``workloads.x-k8s.io/v1alpha2``, plural ``rolebasedgroups``) has no ``/scale``
subresource (a GET of ``.../rolebasedgroups/demo/scale`` is a 404 that reads as if the RBG
were missing). A role's size is ``spec.roles[i].replicas``; what is running is
``status.roleStatuses[]`` (``name``, ``replicas``, ``readyReplicas``, ``updatedReplicas``,
all required once the status is written).

A role with ``scalingAdapter.enable: true`` is sized through its
RoleBasedGroupScalingAdapter, which the RBG controller creates as ``<rbg>-<role>``
(``adapter_name``). The adapter has a ``scale`` subresource (``autoscaling/v1 Scale``:
``spec.replicas``, ``status.replicas``, ``status.selector``), and RBG's validating webhook
denies an RBG update that sets such a role's replicas to anything but the adapter's
``spec.replicas`` (HTTP 403, ``admission webhook "vrolebasedgroup.kb.io" denied the
request``). So: roles without an adapter are written with a JSON Patch on the RBG
(``json_patch_rbg``), roles with one through ``patch_scale``.

``request_json`` sends a raw JSON request (method + path + dict body) and returns the parsed
answer. It exists because the generated client coerces typed bodies (``V1Lease``,
``CoreV1Event``) into pydantic models, which rewrites times: a ``MicroTime`` such as
``2026-01-01T00:00:00.000000Z`` goes out as ``2026-01-01T00:00:00+00:00``, which the
apiserver refuses to parse as a MicroTime. It is generic (the Lease and Event writers use it);
it would sit better in ``topo_sched.kube.client`` next to ``call_json``.

Errors are ``topo_sched.kube.errors.KubeError`` subclasses.

Concurrency: no state; safe to call from any thread with a shared ``ApiClient``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from topo_sched.kube.client import call_json
from topo_sched.kube.errors import translate_errors
from topo_sched.scaling.signals import RoleReplicas

log = logging.getLogger(__name__)

GROUP = "workloads.x-k8s.io"
VERSION = "v1alpha2"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RoleBasedGroup"
PLURAL = "rolebasedgroups"
ADAPTER_KIND = "RoleBasedGroupScalingAdapter"
ADAPTER_PLURAL = "rolebasedgroupscalingadapters"

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"

#: ``spec.roles[].replicas`` when absent (the CRD's default).
DEFAULT_ROLE_REPLICAS = 1


def _custom(api_client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client)


# -- the RBG ---------------------------------------------------------------------------------


def get_rbg(api_client: kubernetes.client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    """The RoleBasedGroup ``namespace/name`` as JSON (``NotFound`` when it does not exist)."""
    return call_json(
        _custom(api_client).get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
    )


def json_patch_rbg(
    api_client: kubernetes.client.ApiClient,
    namespace: str,
    name: str,
    ops: list[dict[str, Any]],
) -> dict[str, Any]:
    """Apply a JSON Patch (RFC 6902) to the RBG; return the RBG as written.

    The whole patch applies or none of it does. A failed ``test`` op and a path that does not
    exist both come back as the same bare 422 ``Invalid`` (no ``causes``); a schema violation
    is a 422 with ``causes``.
    """
    rbg = call_json(
        _custom(api_client).patch_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        ops,
        _content_type=JSON_PATCH,
    )
    log.debug("JSON-patched RBG %s/%s: %s", namespace, name, ops)
    return rbg


def rbg_roles(rbg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``spec.roles`` (empty when absent)."""
    return list(((rbg.get("spec") or {}).get("roles")) or [])


def role_replicas(rbg: Mapping[str, Any]) -> dict[str, RoleReplicas]:
    """Per role: spec replicas (``desired``) and ``status.roleStatuses[].readyReplicas``.

    A role with no status entry yet (the controller has not written one) counts 0 ready.
    """
    ready: dict[str, int] = {}
    for entry in (rbg.get("status") or {}).get("roleStatuses") or []:
        if entry.get("name"):
            ready[entry["name"]] = int(entry.get("readyReplicas") or 0)
    return {
        role["name"]: RoleReplicas(
            desired=spec_replicas(role),
            ready=ready.get(role["name"], 0),
        )
        for role in rbg_roles(rbg)
        if role.get("name")
    }


def spec_replicas(role: Mapping[str, Any]) -> int:
    """A role's ``replicas`` (the CRD default 1 when absent)."""
    value = role.get("replicas")
    return DEFAULT_ROLE_REPLICAS if value is None else int(value)


def scaling_adapter_roles(rbg: Mapping[str, Any]) -> set[str]:
    """Names of the roles with ``scalingAdapter.enable: true``."""
    return {
        role["name"]
        for role in rbg_roles(rbg)
        if role.get("name") and bool((role.get("scalingAdapter") or {}).get("enable"))
    }


def adapter_name(rbg_name: str, role: str) -> str:
    """The name the RBG controller gives a role's scaling adapter: ``<rbg>-<role>``."""
    return f"{rbg_name}-{role}"


# -- the scaling adapter's scale subresource -------------------------------------------------


def get_scale(
    api_client: kubernetes.client.ApiClient, namespace: str, adapter: str
) -> dict[str, Any]:
    """The adapter's ``autoscaling/v1 Scale`` (``spec.replicas``, ``metadata.resourceVersion``)."""
    return call_json(
        _custom(api_client).get_namespaced_custom_object_scale,
        GROUP,
        VERSION,
        namespace,
        ADAPTER_PLURAL,
        adapter,
    )


def patch_scale(
    api_client: kubernetes.client.ApiClient,
    namespace: str,
    adapter: str,
    replicas: int,
    *,
    resource_version: str | None = None,
) -> dict[str, Any]:
    """Set the adapter's ``spec.replicas`` with a merge patch on ``/scale``; return the Scale.

    With ``resource_version`` the write is conditional: 409 ``Conflict`` when the adapter
    changed since that version.
    """
    body: dict[str, Any] = {"spec": {"replicas": int(replicas)}}
    if resource_version is not None:
        body = {"metadata": {"resourceVersion": resource_version}, **body}
    scale = call_json(
        _custom(api_client).patch_namespaced_custom_object_scale,
        GROUP,
        VERSION,
        namespace,
        ADAPTER_PLURAL,
        adapter,
        body,
        _content_type=MERGE_PATCH,
    )
    log.debug("patched scale of %s/%s to %d replicas", namespace, adapter, replicas)
    return scale


def scale_replicas(scale: Mapping[str, Any]) -> int:
    """``spec.replicas`` of a Scale (0 when absent, as the apiserver omits a zero)."""
    return int((scale.get("spec") or {}).get("replicas") or 0)


def resource_version(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion") or None


# -- raw JSON requests -----------------------------------------------------------------------


def request_json(
    api_client: kubernetes.client.ApiClient,
    method: str,
    path: str,
    *,
    body: Any = None,
    content_type: str = "application/json",
    query: Mapping[str, str] | None = None,
) -> Any:
    """Send ``method path`` with a JSON ``body`` exactly as given; return the parsed answer.

    ``path`` is the URL path (its parts already percent-encoded where needed). Non-2xx
    answers raise the typed ``KubeError``; transport failures (connection refused, timeouts)
    raise urllib3's exceptions as the generated methods do.
    """
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type
    with translate_errors():
        request = api_client.param_serialize(
            method.upper(),
            path,
            query_params=list((query or {}).items()) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = api_client.call_api(*request)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
    return json.loads(data) if data else None
