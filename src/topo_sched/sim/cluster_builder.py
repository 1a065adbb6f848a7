"""Synthetic clusters as raw Kubernetes JSON: Nodes that carry real NodeTopology records, Pods.

The objects have the shape ``kubectl get nodes,pods -A -o json`` gives, so anything that reads a
cluster snapshot (``ClusterSnapshot.from_objects``, the extender in snapshot mode, the
simulator) takes them as they are. Node internals come from NodeTopology records passed in,
normally ones parsed from real ``nvidia-smi topo -m`` captures (:func:`bundled_topology`).

Pure apart from :func:`bundled_topology`, which reads a record shipped in the package.
"""

from __future__ import annotations

import json
import string
import uuid
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, Literal

from topo_sched import labels as L
from topo_sched.topology.model import NodeTopology

#: The records in ``topo_sched/data/topologies/`` (see its README for their sources).
HGX_H100_8GPU = "hgx-h100-8gpu"
PCIE_8X_RTX4090_2SOCKET = "pcie-8x-rtx4090-2socket"

#: schedulerName of the pods this module makes (the profile the extender is configured on).
SCHEDULER_NAME = "topo-scheduler"


def bundled_topology(name: str) -> NodeTopology:
    """A NodeTopology shipped in ``topo_sched/data/topologies/<name>.json``."""
    text = (
        resources.files("topo_sched")
        .joinpath("data", "topologies", f"{name}.json")
        .read_text(encoding="utf-8")
    )
    return NodeTopology.from_json(text)


def _uid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "topo-sched.io/sim/" + "/".join(parts)))


def make_node(
    name: str,
    labels: Mapping[str, str],
    topology: NodeTopology | None,
    allocatable_gpus: int = 8,
    *,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A Ready Node with ``allocatable_gpus`` GPUs and the topology in its annotation.

    The record is stamped with the node's name, as the agent publishes it. ``topology=None``
    gives a node without the annotation (no agent). ``kubernetes.io/hostname`` is set to the
    name unless the labels give it.
    """
    node_labels = {L.LABEL_HOSTNAME: name, **labels}
    ann = dict(annotations or {})
    if topology is not None:
        if topology.gpu_count < allocatable_gpus:
            raise ValueError(
                f"node {name}: {allocatable_gpus} allocatable GPUs but the topology "
                f"has {topology.gpu_count}"
            )
        ann[L.ANNOTATION_TOPOLOGY] = topology.model_copy(update={"node_name": name}).to_json()
        product = topology.gpus[0].name if topology.gpus else None
        if product:
            node_labels.setdefault("nvidia.com/gpu.product", product.replace(" ", "-"))
    node_labels.setdefault("nvidia.com/gpu.count", str(allocatable_gpus))
    resources_ = {
        "cpu": "96",
        "memory": "1056Gi",
        "pods": "110",
        L.RESOURCE_NVIDIA_GPU: str(allocatable_gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": _uid("node", name),
            "labels": node_labels,
            "annotations": ann,
        },
        "spec": {},
        "status": {
            "capacity": dict(resources_),
            "allocatable": dict(resources_),
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }


def zone_name(i: int) -> str:
    """zone-a, zone-b, ..., zone-z, zone-aa, ..."""
    letters = string.ascii_lowercase
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = letters[r] + out
    return f"zone-{out}"


def rack_name(r: int) -> str:
    return f"rack-{r:02d}"


def node_name(rack: int, slot: int) -> str:
    return f"gpu-r{rack:02d}-n{slot:02d}"


def make_rack_cluster(
    racks: int = 8,
    nodes_per_rack: int = 8,
    kinds: Sequence[NodeTopology] = (),
    zones: int = 2,
    *,
    per: Literal["rack", "node"] = "rack",
    allocatable_gpus: int | None = None,
) -> list[dict[str, Any]]:
    """``racks x nodes_per_rack`` Nodes labelled with zone, rack and hostname.

    Kinds are assigned deterministically, cycling through ``kinds``: by rack (``per="rack"``:
    rack r is ``kinds[r % len(kinds)]``, so ``[hgx] * 6 + [pcie] * 2`` gives six HGX racks then
    two PCIe racks) or by node (``per="node"``: node j of rack r is
    ``kinds[(r * nodes_per_rack + j) % len(kinds)]``). Racks fill zones in order, as evenly as
    they divide: rack r is in zone ``r * zones // racks``. Each node has as many allocatable GPUs
    as its topology has GPUs, unless ``allocatable_gpus`` says otherwise.
    """
    if not kinds:
        raise ValueError("kinds must name at least one NodeTopology")
    if racks < 1 or nodes_per_rack < 1 or not 1 <= zones <= racks:
        raise ValueError("need racks >= 1, nodes_per_rack >= 1 and 1 <= zones <= racks")
    nodes: list[dict[str, Any]] = []
    for r in range(racks):
        for j in range(nodes_per_rack):
            k = r if per == "rack" else r * nodes_per_rack + j
            topo = kinds[k % len(kinds)]
            labels = {
                L.LABEL_ZONE: zone_name(r * zones // racks),
                L.LABEL_RACK: rack_name(r),
            }
            gpus = allocatable_gpus if allocatable_gpus is not None else topo.gpu_count
            nodes.append(make_node(node_name(r, j), labels, topo, gpus))
    return nodes


def _pod(
    namespace: str,
    name: str,
    gpus: int,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None,
    uid: str | None,
    node: str | None,
) -> dict[str, Any]:
    res = {
        "limits": {L.RESOURCE_NVIDIA_GPU: str(gpus)},
        "requests": {
            "cpu": str(max(1, 8 * gpus)),
            "memory": f"{max(1, 64 * gpus)}Gi",
            L.RESOURCE_NVIDIA_GPU: str(gpus),
        },
    }
    spec: dict[str, Any] = {
        "schedulerName": SCHEDULER_NAME,
        "containers": [{"name": "engine", "image": "lmsysorg/sglang:v0.5.9", "resources": res}],
        "restartPolicy": "Always",
    }
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or _uid("pod", namespace, name),
            "labels": dict(labels),
            "annotations": dict(annotations or {}),
        },
        "spec": spec,
        "status": {"phase": "Running" if node else "Pending"},
    }


def make_rbg_pod(
    namespace: str,
    group: str,
    role: str,
    index: int,
    gpus: int,
    instance: str | None = None,
    component: str | None = None,
    annotations: Mapping[str, str] | None = None,
    *,
    uid: str | None = None,
    instance_size: int | None = None,
) -> dict[str, Any]:
    """A pending RBG (v1alpha2 labels) pod asking for ``gpus`` ``nvidia.com/gpu``.

    ``instance_size`` sets the ``RBG_LWP_GROUP_SIZE`` env var the RBG controller injects
    into leader/worker pods.

    Named ``<group>-<role>-<index>``, or ``<instance>-<index>`` for a member of a multi-node
    instance (index 0 being the leader, as RBG's leader/worker pattern numbers them).
    """
    pod_labels = {L.RBG_GROUP_NAME: group, L.RBG_ROLE_NAME: role}
    if instance is not None:
        pod_labels[L.RBG_ROLE_INSTANCE_NAME] = instance
    if component is not None:
        pod_labels[L.RBG_COMPONENT_NAME] = component
    name = f"{instance}-{index}" if instance is not None else f"{group}-{role}-{index}"
    pod = _pod(namespace, name, gpus, pod_labels, annotations, uid, None)
    if instance_size is not None:
        env = [{"name": L.ENV_RBG_LWP_GROUP_SIZE, "value": str(instance_size)}]
        pod["spec"]["containers"][0]["env"] = env
    return pod


def make_plain_pod(
    namespace: str,
    name: str,
    gpus: int,
    *,
    node: str | None = None,
    labels: Mapping[str, str] | None = None,
    uid: str | None = None,
) -> dict[str, Any]:
    """A pod that is not part of any RBG; bound (Running) when ``node`` is given."""
    return _pod(namespace, name, gpus, labels or {"app": name}, None, uid, node)


def bound(pod: Mapping[str, Any], node: str) -> dict[str, Any]:
    """A copy of the pod as the API shows it once bound to the node and running."""
    out = json.loads(json.dumps(pod))
    out["spec"]["nodeName"] = node
    out["status"] = {**out.get("status", {}), "phase": "Running"}
    return out


def gpu_allocation_annotation(owners: Mapping[int, str]) -> dict[str, str]:
    """The agent's ``topo-sched.io/gpu-allocation`` annotation: GPU index -> "ns/pod"."""
    return {L.ANNOTATION_GPU_ALLOCATION: json.dumps({str(i): o for i, o in sorted(owners.items())})}


def as_list(objects: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A ``v1 List`` (what ``kubectl get nodes,pods -A -o json`` prints)."""
    return {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": list(objects)}
