"""Node reads and annotation writes, as plain JSON dicts.

The agent publishes a node's topology and GPU allocation as annotations; the extender reads
nodes. Annotations are written with a JSON merge patch (RFC 7386,
``application/merge-patch+json``): keys in the patch are set, a ``None`` value deletes the key,
keys not in the patch are left alone, so writers of different keys never clobber each other.
Pass ``resource_version`` to make the write conditional (409 ``Conflict`` when the node changed
since that version); without it the patch applies to whatever is current.

Errors are ``topo_sched.kube.errors.KubeError`` subclasses (``NotFound``, ``Conflict``,
``Invalid`` for a bad annotation key ...).

Concurrency: no state; safe to call from any thread with a shared ``ApiClient``.
"""

from __future__ import annotations

import logging
from typing import Any

import kubernetes.client

from topo_sched.kube.client import call_json, list_all, selector_kwargs

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


def get_node(api_client: kubernetes.client.ApiClient, name: str) -> dict[str, Any]:
    """The Node object ``name`` as JSON."""
    return call_json(kubernetes.client.CoreV1Api(api_client).read_node, name)


def list_nodes(
    api_client: kubernetes.client.ApiClient,
    *,
    label_selector: str | None = None,
    field_selector: str | None = None,
    page_size: int | None = None,
) -> list[dict[str, Any]]:
    """All nodes (matching the selectors), following pagination when ``page_size`` is set."""
    kwargs = selector_kwargs(label_selector, field_selector)
    api = kubernetes.client.CoreV1Api(api_client)
    return list_all(api.list_node, page_size=page_size, **kwargs).items


def patch_node_annotations(
    api_client: kubernetes.client.ApiClient,
    node_name: str,
    annotations: dict[str, str | None],
    *,
    resource_version: str | None = None,
) -> dict[str, str]:
    """Set (str) or delete (None) annotations with a merge patch; return the node's annotations."""
    metadata: dict[str, Any] = {"annotations": dict(annotations)}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    api = kubernetes.client.CoreV1Api(api_client)
    node = call_json(api.patch_node, node_name, {"metadata": metadata}, _content_type=MERGE_PATCH)
    log.debug("patched annotations %s on node %s", sorted(annotations), node_name)
    return dict((node.get("metadata") or {}).get("annotations") or {})
