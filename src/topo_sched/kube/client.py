"""Building a Kubernetes ``ApiClient``, and calling the API for raw JSON.

``build_api_client`` picks the first configuration source that applies, in this order:

1. an explicit server URL (``server=``, with optional bearer ``token`` and CA file);
2. an explicit kubeconfig path (``kubeconfig=``, optional ``context``);
3. in-cluster config (service-account token, ``KUBERNETES_SERVICE_HOST``/``_PORT``);
4. the default kubeconfig (``$KUBECONFIG``, else ``~/.kube/config``).

An explicit source that is given but broken (an unreadable kubeconfig, an unknown context)
raises at once instead of falling through to another cluster: a scheduler extender silently
binding pods in the wrong cluster is worse than a start-up error. When no source applies,
``KubeConfigError`` lists every source tried and why each was skipped.

``call_json`` and ``list_all`` call a generated API method with ``_preload_content=False`` and
parse the JSON body themselves. The adapters work on plain dicts (the raw JSON): the client's
model objects are slow to build, drop fields they do not know, and sometimes fail to build at
all (a ``201`` Binding answer is a ``Status``, which the client tries to read as a
``V1Binding`` and raises a pydantic ``ValidationError`` for, after the pod was bound).

Concurrency: these functions keep no state. An ``ApiClient`` (urllib3 pool) may be shared by
threads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.config import ConfigException, load_incluster_config, load_kube_config

from topo_sched.kube.errors import Gone, translate_errors

log = logging.getLogger(__name__)

DEFAULT_KUBECONFIG = "~/.kube/config"


class KubeConfigError(RuntimeError):
    """No usable Kubernetes API configuration; ``tried`` says what was tried and why it failed."""

    def __init__(self, tried: list[str]) -> None:
        self.tried = tried
        lines = "\n".join(f"  - {entry}" for entry in tried)
        super().__init__(f"no usable Kubernetes API configuration; tried:\n{lines}")


def build_api_client(
    *,
    server: str | None = None,
    token: str | None = None,
    ca_cert: str | None = None,
    verify_ssl: bool = True,
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    in_cluster: bool = True,
    default_kubeconfig: bool = True,
) -> kubernetes.client.ApiClient:
    """An ApiClient from the first configuration source that applies (see module doc)."""
    if server:
        return kubernetes.client.ApiClient(
            _explicit_configuration(server, token, ca_cert, verify_ssl)
        )
    tried = ["explicit server URL: not given"]
    if kubeconfig is not None:
        path = str(Path(kubeconfig).expanduser())
        return kubernetes.client.ApiClient(_kubeconfig_configuration(path, context, tried))
    tried.append("kubeconfig path: not given")
    if in_cluster:
        configuration = _incluster_configuration(tried)
        if configuration is not None:
            return kubernetes.client.ApiClient(configuration)
    else:
        tried.append("in-cluster config: disabled")
    if default_kubeconfig:
        paths = _default_kubeconfig_paths()
        if any(Path(p).expanduser().is_file() for p in paths.split(os.pathsep)):
            return kubernetes.client.ApiClient(_kubeconfig_configuration(paths, context, tried))
        tried.append(f"default kubeconfig {paths}: file not found")
    else:
        tried.append("default kubeconfig: disabled")
    raise KubeConfigError(tried)


def _explicit_configuration(
    server: str, token: str | None, ca_cert: str | None, verify_ssl: bool
) -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration(host=server.rstrip("/"))
    configuration.verify_ssl = verify_ssl
    if ca_cert:
        configuration.ssl_ca_cert = ca_cert
    if token:
        configuration.api_key["BearerToken"] = token
        configuration.api_key_prefix["BearerToken"] = "Bearer"
    log.info("Kubernetes API: explicit server %s", server)
    return configuration


def _kubeconfig_configuration(
    path: str, context: str | None, tried: list[str]
) -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    try:
        load_kube_config(
            config_file=path,
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    except (ConfigException, OSError, ValueError, TypeError) as exc:
        tried.append(f"kubeconfig {path}{_context_note(context)}: {exc}")
        raise KubeConfigError(tried) from exc
    log.info(
        "Kubernetes API: kubeconfig %s%s -> %s", path, _context_note(context), configuration.host
    )
    return configuration


def _incluster_configuration(tried: list[str]) -> kubernetes.client.Configuration | None:
    configuration = kubernetes.client.Configuration()
    try:
        load_incluster_config(client_configuration=configuration)
    except ConfigException as exc:
        tried.append(f"in-cluster config: {exc}")
        return None
    log.info("Kubernetes API: in-cluster config -> %s", configuration.host)
    return configuration


def _default_kubeconfig_paths() -> str:
    """``$KUBECONFIG`` (may list several files, merged by the loader), else ~/.kube/config."""
    return os.environ.get("KUBECONFIG") or str(Path(DEFAULT_KUBECONFIG).expanduser())


def _context_note(context: str | None) -> str:
    return f" (context {context})" if context else ""


# -- raw JSON calls ------------------------------------------------------------------------


def call_json(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a generated API method and return its parsed JSON body (None when empty).

    Errors come back as ``topo_sched.kube.errors.KubeError`` subclasses.
    """
    with translate_errors():
        response = method(*args, _preload_content=False, **kwargs)
    try:
        data = response.data
    finally:
        response.release_conn()
    return json.loads(data) if data else None


@dataclass
class ListResult:
    """All items of a (possibly paginated) list, and the list's resourceVersion."""

    items: list[dict[str, Any]] = field(default_factory=list)
    resource_version: str = ""


def list_all(
    list_method: Callable[..., Any],
    *args: Any,
    page_size: int | None = None,
    **kwargs: Any,
) -> ListResult:
    """Every item of a list call, following ``metadata.continue`` page by page.

    If a continue token expires mid-way (410), the list restarts once from scratch, without
    pagination, so the result is one consistent snapshot.
    """
    try:
        return _list_pages(list_method, args, kwargs, page_size)
    except Gone:
        if page_size is None:
            raise
        log.warning("list continue token expired (410); restarting the list without pagination")
        return _list_pages(list_method, args, kwargs, None)


def _list_pages(
    list_method: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    page_size: int | None,
) -> ListResult:
    result = ListResult()
    token: str | None = None
    while True:
        page_kwargs = dict(kwargs)
        if page_size is not None:
            page_kwargs["limit"] = page_size
        if token:
            page_kwargs["_continue"] = token
        page = call_json(list_method, *args, **page_kwargs)
        metadata = page.get("metadata") or {}
        result.items.extend(page.get("items") or [])
        result.resource_version = str(metadata.get("resourceVersion") or "")
        token = metadata.get("continue")
        if not token:
            return result


def selector_kwargs(label_selector: str | None, field_selector: str | None) -> dict[str, str]:
    """The list/watch keyword arguments for the selectors that are set."""
    kwargs: dict[str, str] = {}
    if label_selector:
        kwargs["label_selector"] = label_selector
    if field_selector:
        kwargs["field_selector"] = field_selector
    return kwargs
