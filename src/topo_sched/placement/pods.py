"""What the placement core needs to know about a pod, read from its Kubernetes JSON.

Pure: takes the raw dict (as kube-scheduler or the API sends it), returns a frozen PodInfo.
A dict that is not a usable Pod raises PodSpecError naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from topo_sched import labels as L


class PodSpecError(ValueError):
    """The pod object lacks a field placement needs, or has it in the wrong type."""


@dataclass(frozen=True)
class RbgIdentity:
    group: str
    role: str
    instance: str | None = None
    component: str | None = None  # leader | worker

    @property
    def pd_side(self) -> str | None:
        """ "prefill" or "decode" when the role name says so, else None."""
        r = self.role.lower()
        if "prefill" in r:
            return "prefill"
        if "decode" in r:
            return "decode"
        return None


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str | None
    gpus: int
    rbg: RbgIdentity | None
    node_name: str | None = None
    #: Pods in one leader/worker instance (RBG injects RBG_LWP_GROUP_SIZE), when known.
    instance_size: int | None = None
    active: bool = True  # False once Succeeded/Failed: holds no GPUs
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _mapping(obj: Any, where: str) -> Mapping[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise PodSpecError(f"{where} must be an object, got {type(obj).__name__}")
    return obj


def _str_map(obj: Any, where: str) -> dict[str, str]:
    m = _mapping(obj, where)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        raise PodSpecError(f"{where} must map strings to strings")
    return dict(m)


def _quantity(value: Any, where: str) -> int:
    """An extended-resource quantity: whole numbers only ("2", 2)."""
    if isinstance(value, bool):
        raise PodSpecError(f"{where} must be a whole number, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value.strip())
    else:
        raise PodSpecError(f"{where} must be a whole number, got {value!r}")
    if n < 0:
        raise PodSpecError(f"{where} must not be negative")
    return n


def _container_gpus(containers: Any, where: str) -> list[int]:
    if containers is None:
        return []
    if not isinstance(containers, list):
        raise PodSpecError(f"{where} must be a list")
    out = []
    for i, c in enumerate(containers):
        c = _mapping(c, f"{where}[{i}]")
        res = _mapping(c.get("resources"), f"{where}[{i}].resources")
        req = _mapping(res.get("requests"), f"{where}[{i}].resources.requests")
        lim = _mapping(res.get("limits"), f"{where}[{i}].resources.limits")
        # Extended resources must have requests == limits; a limit alone implies the request.
        raw = req.get(L.RESOURCE_NVIDIA_GPU, lim.get(L.RESOURCE_NVIDIA_GPU, 0))
        out.append(_quantity(raw, f"{where}[{i}] {L.RESOURCE_NVIDIA_GPU}"))
    return out


def _instance_size(containers: Any, annotations: Mapping[str, str]) -> int | None:
    raw = annotations.get(L.ANNOTATION_INSTANCE_SIZE)
    if raw is None and isinstance(containers, list):
        for c in containers:
            for env in (c.get("env") or []) if isinstance(c, Mapping) else []:
                if isinstance(env, Mapping) and env.get("name") == L.ENV_RBG_LWP_GROUP_SIZE:
                    raw = env.get("value")
    if isinstance(raw, str) and raw.strip().isdigit() and int(raw) > 0:
        return int(raw)
    return None


def rbg_identity(pod_labels: Mapping[str, str]) -> RbgIdentity | None:
    group = pod_labels.get(L.RBG_GROUP_NAME) or pod_labels.get(L.RBG_LEGACY_GROUP_NAME)
    role = pod_labels.get(L.RBG_ROLE_NAME) or pod_labels.get(L.RBG_LEGACY_ROLE_NAME)
    if not group or not role:
        return None
    return RbgIdentity(
        group=group,
        role=role,
        instance=pod_labels.get(L.RBG_ROLE_INSTANCE_NAME),
        component=pod_labels.get(L.RBG_COMPONENT_NAME),
    )


def pod_info(pod: Any) -> PodInfo:
    """Read a Pod JSON object; raises PodSpecError for anything placement cannot use."""
    pod = _mapping(pod, "Pod")
    if not pod:
        raise PodSpecError("Pod is missing")
    meta = _mapping(pod.get("metadata"), "Pod.metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise PodSpecError("Pod.metadata.name is missing")
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str):
        raise PodSpecError("Pod.metadata.namespace must be a string")
    uid = meta.get("uid")
    pod_labels = _str_map(meta.get("labels"), "Pod.metadata.labels")
    annotations = _str_map(meta.get("annotations"), "Pod.metadata.annotations")
    spec = _mapping(pod.get("spec"), "Pod.spec")
    status = _mapping(pod.get("status"), "Pod.status")
    gpus = sum(_container_gpus(spec.get("containers"), "Pod.spec.containers"))
    init = _container_gpus(spec.get("initContainers"), "Pod.spec.initContainers")
    gpus = max([gpus, *init])
    node_name = spec.get("nodeName") or None
    if node_name is not None and not isinstance(node_name, str):
        raise PodSpecError("Pod.spec.nodeName must be a string")
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=uid if isinstance(uid, str) else None,
        gpus=gpus,
        rbg=rbg_identity(pod_labels),
        node_name=node_name,
        instance_size=_instance_size(spec.get("containers"), annotations),
        active=status.get("phase") not in ("Succeeded", "Failed"),
        labels=pod_labels,
        annotations=annotations,
    )
