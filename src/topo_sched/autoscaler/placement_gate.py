"""Placement-aware scaling: ask the extender before a scale-up, rank pods before a scale-down.

Two helpers for :class:`~topo_sched.autoscaler.controller.Controller`, both talking to the
extender's gRPC ``topo_sched.v1.PlacementService`` through
:class:`~topo_sched.rpc.placement_client.PlacementClient`.

Scale-up gate (:func:`gate_scale_up`)
-------------------------------------

Before a scale-up the autoscaler asks ``WhatIf`` whether the new pods would fit, in whole
ratio units, and only asks for what fits:

==================================  ===========================================================
decision                            what the gate does
==================================  ===========================================================
hold, or no role grows              passes it through unchanged (nothing asked)
strict mode, current in ratio       asks WhatIf for k = desired units - current units whole
                                    units; desired becomes current + the p units that fit
                                    (p = k: unchanged; p = 0: hold at current)
band mode, or a strict-mode change  one WhatIf of ONE unit made of every growing role's delta
that also restores the ratio        (e.g. +3 prefill, +1 decode); fits: unchanged; does not:
                                    hold at current (all or nothing)
extender unreachable, timed out,    ``degraded``: the plain decision stands (the controller
rejected the request, or the RBG's  logs it and counts ``placement_unavailable_total``)
templates cannot be read
==================================  ===========================================================

The rules (which units are asked for, what may be applied) are the pure
:mod:`topo_sched.scaling.gate`, shared with the simulator's ``placement-aware`` policy; this
module builds the request from the RBG and asks the extender. A unit counts only when every
pod of it found a node (``what_if`` drops the pods of a unit that did not fit), so the result
is never a prefill without its decode. Roles that shrink in the same band-mode change are
not credited: the what-if does not see the capacity they would free (conservative).

What one unit of a role is (:func:`role_units`), from the RBG object:

- pods per unit = ratio weight (strict; the role's delta in band mode) x pods per instance,
  where pods per instance is ``leaderWorkerPattern.size`` (1 for ``standalonePattern``);
- GPUs per pod: ``nvidia.com/gpu`` of the pod template's containers (requests, else limits;
  summed over containers, at least the largest init container's), as kube-scheduler counts;
- labels: the template's labels plus the v1alpha2 labels the RBG controller puts on every pod
  of the role (``rbg.workloads.x-k8s.io/group-name``, ``.../role-name``); per-pod RBG labels
  (instance, component) are set by what-if itself;
- annotations: the template's ``metadata.annotations``, so ``topo-sched.io/*`` placement
  overrides (``intra-node: required``, ``pack-level``, ...) apply to the hypothetical pods.

The template is ``standalonePattern.template`` or ``leaderWorkerPattern.template``; a
``templateRef`` names one of ``spec.roleTemplates`` and its ``patch`` is merged in (maps
merged key by key, lists of named items such as containers merged by name, other lists
replaced: a simplified strategic merge). The older shape (``role.template`` with
``leaderWorkerSet.size`` / ``patchLeaderTemplate``) is read too.

Simplification for leader/worker roles: what-if gives every pod of an instance one shape, so
the LEADER's pod template (``template`` merged with ``leaderTemplatePatch``) stands for all
pods of the instance; a ``workerTemplatePatch`` that asks for a different number of GPUs or
different annotations is not modelled.

Scale-down ordering (:func:`order_scale_down`)
----------------------------------------------

Kubernetes lets some owners be told which pods to remove first: a ReplicaSet deletes pods
with a lower ``controller.kubernetes.io/pod-deletion-cost`` first (after unscheduled, pending
and not-ready pods). Before a scale-down, for each role that shrinks, the running pods of the
role (listed by the RBG's group and role labels) are ranked by placement quality, worst first,
and annotated with a cost that rises with quality: ``round(1000 x quality)``, quality in 0..1.
Leader/worker pods are ranked per instance (all pods of an instance get the instance's cost).

Quality is the extender's ``Explain`` of the pod on its own node: the weighted ``total`` of the
terms (0..1; a node the probe is rejected on counts 0, a node no term has an opinion on 0.5).
The extender judges a pod for the GPUs still free on a node, and a running pod's own GPUs
count as taken there (on a full node the pod itself would be rejected "gpus-in-use"), so the
probe is the pod with its ``nvidia.com/gpu`` request removed (and a fresh uid): what remains
are the terms that judge where the pod sits relative to the rest of its group
(prefill-decode proximity, instance packing, spread), which is what differs between the
instances of a role. The GPU-fit terms, which cannot judge GPUs already held, sit out.

This only helps a workload whose controller honours the annotation (ReplicaSet, i.e. a
Deployment-style workload). **StatefulSet-style ordinal scale-down ignores it**: a
StatefulSet always removes the highest ordinals, whatever their cost. It is opt-in
(``topo-sched autoscaler --deletion-cost``) and needs ``list`` and ``patch`` on pods. A
failure to rank or annotate never blocks the scale-down: the controller logs it and counts
``deletion_cost_failures_total``.

Concurrency: no state of its own; called from the controller's loop thread.
"""

from __future__ import annotations

import copy
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import kubernetes.client

from topo_sched import labels as L
from topo_sched.kube import rbg as rbgapi
from topo_sched.kube.client import call_json, list_all
from topo_sched.placement.whatif import RoleRequest, WhatIfRequest, WhatIfResult
from topo_sched.rpc.placement_client import PlacementError, PlacementUnavailable
from topo_sched.scaling.config import Target
from topo_sched.scaling.gate import gate_outcome, scale_up_ask, shape_text
from topo_sched.scaling.signals import Decision

__all__ = [
    "POD_DELETION_COST",
    "DeletionCostResult",
    "GateResult",
    "KubePodLister",
    "PlacementLike",
    "PodLister",
    "RoleShape",
    "RoleTemplateError",
    "gate_scale_up",
    "order_scale_down",
    "role_units",
    "shape_text",
]

log = logging.getLogger(__name__)

#: Annotation a ReplicaSet reads to pick which pods to delete first (lower first).
POD_DELETION_COST = L.ANNOTATION_POD_DELETION_COST
#: Cost = round(quality x this); quality in 0..1.
COST_SCALE = 1000
#: Quality of a pod on a node where no placement term has an opinion.
NEUTRAL_QUALITY = 0.5

_RBG_LABEL_PREFIXES = ("rbg.workloads.x-k8s.io/", "rolebasedgroup.workloads.x-k8s.io/")
MERGE_PATCH = "application/merge-patch+json"


class RoleTemplateError(ValueError):
    """A role's pod template cannot be turned into a what-if role (names the role)."""


class PlacementLike(Protocol):
    """What the gate needs of :class:`~topo_sched.rpc.placement_client.PlacementClient`."""

    def what_if(self, request: WhatIfRequest) -> WhatIfResult: ...

    def explain(
        self,
        pod: Mapping[str, Any] | None = None,
        *,
        namespace: str | None = None,
        name: str | None = None,
        nodes: Sequence[str] | None = None,
    ) -> Any: ...


# -- what one unit of a role is -------------------------------------------------------------


@dataclass(frozen=True)
class RoleShape:
    """One role's pods as the RBG controller would create them (what-if's view)."""

    name: str
    gpus_per_pod: int
    #: Pods per instance: ``leaderWorkerPattern.size``, 1 for single-pod instances.
    pods_per_instance: int
    labels: Mapping[str, str]
    annotations: Mapping[str, str]

    def request(self, replicas: int) -> RoleRequest:
        """This role's share of a unit of ``replicas`` instances."""
        size = self.pods_per_instance
        return RoleRequest(
            name=self.name,
            pods_per_unit=replicas * size,
            gpus_per_pod=self.gpus_per_pod,
            labels=dict(self.labels),
            annotations=dict(self.annotations),
            instance_size=size if size > 1 else None,
        )


def _merge(base: Any, patch: Any) -> Any:
    """A simplified strategic merge: maps by key, lists of named maps by name."""
    if isinstance(base, Mapping) and isinstance(patch, Mapping):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, Mapping) and "name" in x for x in [*base, *patch])
    ):
        out_list = [dict(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out_list)}
        for item in patch:
            if item["name"] in index:
                i = index[item["name"]]
                out_list[i] = _merge(out_list[i], item)
            else:
                out_list.append(copy.deepcopy(dict(item)))
        return out_list
    return copy.deepcopy(patch)


def _pattern_template(rbg: Mapping[str, Any], pattern: Mapping[str, Any], role: str) -> dict:
    if isinstance(pattern.get("template"), Mapping):
        return dict(pattern["template"])
    ref = pattern.get("templateRef")
    if isinstance(ref, Mapping):
        name = ref.get("name")
        spec = rbg.get("spec") or {}
        for tpl in spec.get("roleTemplates") or []:
            if isinstance(tpl, Mapping) and tpl.get("name") == name:
                return _merge(dict(tpl.get("template") or {}), ref.get("patch") or {})
        raise RoleTemplateError(f"role {role}: templateRef {name!r} is not in spec.roleTemplates")
    return {}


def leader_template(rbg: Mapping[str, Any], role: Mapping[str, Any]) -> tuple[dict, int]:
    """The pod template of a role's (leader) pods and the pods per instance."""
    name = str(role.get("name"))
    lwp = role.get("leaderWorkerPattern")
    if isinstance(lwp, Mapping):
        size = _whole(lwp.get("size", 1), f"role {name}: leaderWorkerPattern.size")
        tpl = _pattern_template(rbg, lwp, name)
        return _merge(tpl, lwp.get("leaderTemplatePatch") or {}), size
    sp = role.get("standalonePattern")
    if isinstance(sp, Mapping):
        return _pattern_template(rbg, sp, name), 1
    # The older shape: role.template, role.leaderWorkerSet {size, patchLeaderTemplate}.
    tpl = dict(role.get("template") or {})
    lws = role.get("leaderWorkerSet")
    if isinstance(lws, Mapping):
        size = _whole(lws.get("size", 1), f"role {name}: leaderWorkerSet.size")
        return _merge(tpl, lws.get("patchLeaderTemplate") or {}), size
    return tpl, 1


def _whole(raw: Any, where: str) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise RoleTemplateError(f"{where}: {raw!r} is not a whole number") from None
    if value < 0:
        raise RoleTemplateError(f"{where}: {raw!r} is negative")
    return value


def template_gpus(template: Mapping[str, Any], role: str) -> int:
    """``nvidia.com/gpu`` one pod of the template asks for (as kube-scheduler counts it)."""
    spec = template.get("spec") or {}

    def per_container(key: str) -> list[int]:
        out = []
        for i, c in enumerate(spec.get(key) or []):
            res = (c or {}).get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            raw = req.get(L.RESOURCE_NVIDIA_GPU, lim.get(L.RESOURCE_NVIDIA_GPU, 0))
            out.append(_whole(raw, f"role {role}: {key}[{i}] {L.RESOURCE_NVIDIA_GPU}"))
        return out

    return max([sum(per_container("containers")), *per_container("initContainers")])


def role_units(rbg: Mapping[str, Any], target: Target) -> dict[str, RoleShape]:
    """Per target role, in placement order (prefill, decode, then the rest): its pod shape."""
    group = str((rbg.get("metadata") or {}).get("name") or target.name)
    by_name = {r.get("name"): r for r in rbgapi.rbg_roles(rbg)}
    order = [target.prefill_role, target.decode_role]
    order += [r for r in target.roles if r not in order]
    out: dict[str, RoleShape] = {}
    for name in order:
        if name is None:
            continue
        role = by_name.get(name)
        if role is None:
            raise RoleTemplateError(f"role {name} is not in the RBG's spec.roles")
        tpl, size = leader_template(rbg, role)
        if size < 1:
            raise RoleTemplateError(f"role {name}: pods per instance must be >= 1, got {size}")
        meta = tpl.get("metadata") or {}
        labels = {
            str(k): str(v)
            for k, v in (meta.get("labels") or {}).items()
            if not str(k).startswith(_RBG_LABEL_PREFIXES)
        }
        labels[L.RBG_GROUP_NAME] = group
        labels[L.RBG_ROLE_NAME] = name
        annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
        out[name] = RoleShape(name, template_gpus(tpl, name), size, labels, annotations)
    return out


# -- the scale-up gate ----------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    """What the placement gate made of a decision.

    ``desired``: what may be applied (= the decision's when nothing was left out or the gate
    was degraded; = current when nothing fits). ``requested_units``: units asked of WhatIf
    (0: not a scale-up, nothing asked; in band mode, and for a strict change that restores the
    ratio, the whole change is 1 unit). ``pending_units`` = requested - placeable.
    ``reasons``: per role that did not fit, what-if's message (``decode: 0/64 nodes: ...``).
    ``degraded``: the extender could not be consulted; ``message`` says why and ``cause``
    names it in a few words (``placement service unavailable``, ``placement request
    rejected``, ``RBG pod templates unreadable``).
    """

    desired: dict[str, int]
    placeable_units: int = 0
    requested_units: int = 0
    pending_units: int = 0
    reasons: list[str] = field(default_factory=list)
    degraded: bool = False
    message: str = ""
    #: Placement cost of the units that fit (what-if's ``cost``), when asked.
    cost: float | None = None
    cause: str = ""

    @property
    def checked(self) -> bool:
        """WhatIf was asked and answered."""
        return self.requested_units > 0 and not self.degraded


def gate_scale_up(
    decision: Decision, rbg: Mapping[str, Any], target: Target, client: PlacementLike
) -> GateResult:
    """Scale up only by what fits: see the module doc. Never raises for the client's errors.

    Which units are asked for and what may be applied are decided by the pure
    :mod:`topo_sched.scaling.gate` (the simulator's ``placement-aware`` policy uses the same
    functions); this function builds the request from the RBG and asks the extender.
    """
    plain = GateResult(desired=dict(decision.desired))
    ask = scale_up_ask(target, decision)
    if ask is None:
        return plain
    try:
        shapes = role_units(rbg, target)
    except RoleTemplateError as exc:
        why = f"cannot build the what-if request: {exc}"
        return _degraded(decision, why, "RBG pod templates unreadable")
    per_unit = ask.replicas
    roles = tuple(s.request(per_unit[s.name]) for s in shapes.values() if s.name in per_unit)
    request = WhatIfRequest(
        namespace=target.namespace,
        rbg=target.name,
        units=ask.units,
        roles=roles,
        all_or_nothing=True,
    )
    try:
        result = client.what_if(request)
    except PlacementUnavailable as exc:
        return _degraded(decision, str(exc), "placement service unavailable")
    except PlacementError as exc:  # PlacementRequestError (a bug), unreadable TLS files
        log.error("placement gate for %s: %s", target.rbg, exc)
        return _degraded(decision, str(exc), "placement request rejected")
    out = gate_outcome(
        target,
        decision,
        ask,
        int(result.units_placeable),
        [r.message for r in result.reasons],
        result.cost,
    )
    return GateResult(
        desired=out.desired,
        placeable_units=out.placeable_units,
        requested_units=out.requested_units,
        pending_units=out.pending_units,
        reasons=out.reasons,
        message=out.message,
        cost=out.cost,
    )


def _degraded(decision: Decision, why: str, cause: str) -> GateResult:
    return GateResult(desired=dict(decision.desired), degraded=True, message=why, cause=cause)


# -- pods, and the scale-down ordering ------------------------------------------------------


@runtime_checkable
class PodLister(Protocol):
    """Lists a target's pods and annotates them (:class:`KubePodLister`)."""

    def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[Mapping[str, Any]]:
        """Pods of ``namespace`` carrying every label in ``labels``."""
        ...

    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Any:
        """Set annotations on one pod (a JSON merge patch)."""
        ...


class KubePodLister:
    """Pods from the Kubernetes API: ``list_namespaced_pod`` with a label selector, and a
    merge patch of ``metadata.annotations`` (RBAC: ``list`` and ``patch`` on pods)."""

    def __init__(self, api_client: kubernetes.client.ApiClient, *, page_size: int = 500) -> None:
        self.api_client = api_client
        self.page_size = page_size

    def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[Mapping[str, Any]]:
        api = kubernetes.client.CoreV1Api(self.api_client)
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return list_all(
            api.list_namespaced_pod, namespace, label_selector=selector, page_size=self.page_size
        ).items

    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Any:
        api = kubernetes.client.CoreV1Api(self.api_client)
        body = {"metadata": {"annotations": dict(annotations)}}
        return call_json(api.patch_namespaced_pod, name, namespace, body, _content_type=MERGE_PATCH)


@dataclass
class DeletionCostResult:
    """What :func:`order_scale_down` did."""

    #: Per shrinking role: (pod, node, quality) worst first.
    ranked: dict[str, list[tuple[str, str, float]]] = field(default_factory=dict)
    #: (pod, cost) written.
    patched: list[tuple[str, int]] = field(default_factory=list)
    #: (pod, cost) already carrying that cost.
    unchanged: list[tuple[str, int]] = field(default_factory=list)
    #: One line per failure (listing, an Explain, a patch).
    errors: list[str] = field(default_factory=list)


def _running(pod: Mapping[str, Any]) -> bool:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    phase = (pod.get("status") or {}).get("phase")
    return (
        bool(spec.get("nodeName"))
        and not meta.get("deletionTimestamp")
        and phase
        not in (
            "Succeeded",
            "Failed",
        )
    )


def _instance(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return (meta.get("labels") or {}).get(L.RBG_ROLE_INSTANCE_NAME) or str(meta.get("name"))


def placement_probe(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The pod as Explain should judge it where it runs: no GPU request, a fresh uid."""
    probe = copy.deepcopy(dict(pod))
    meta = probe.setdefault("metadata", {})
    meta["uid"] = str(uuid.uuid4())  # the engine memoises contexts by uid
    spec = probe.get("spec") or {}
    for key in ("containers", "initContainers"):
        for c in spec.get(key) or []:
            res = (c or {}).get("resources") or {}
            for part in ("requests", "limits"):
                if isinstance(res.get(part), dict):
                    res[part].pop(L.RESOURCE_NVIDIA_GPU, None)
    return probe


def pod_quality(client: PlacementLike, pod: Mapping[str, Any]) -> float:
    """0..1: the extender's weighted total for the pod (probe) on its own node."""
    node = (pod.get("spec") or {})["nodeName"]
    expl = client.explain(placement_probe(pod), nodes=[node])
    verdict = next((v for v in expl.nodes if v.node == node), None)
    if verdict is None or not verdict.passed:
        return 0.0
    return NEUTRAL_QUALITY if verdict.total is None else float(verdict.total)


def order_scale_down(
    decision: Decision, target: Target, pods: PodLister, client: PlacementLike
) -> DeletionCostResult:
    """Annotate the running pods of each shrinking role with a pod-deletion cost.

    Worst placed = lowest cost. Never raises: every failure is one line in ``errors``; a role
    any of whose pods could not be judged is left as it is (a partial ranking would mislead).
    """
    out = DeletionCostResult()
    for role, n in decision.desired.items():
        if n >= decision.current.get(role, 0):
            continue
        selector = {L.RBG_GROUP_NAME: target.name, L.RBG_ROLE_NAME: role}
        try:
            listed = pods.list_pods(target.namespace, selector)
        except Exception as exc:
            out.errors.append(f"role {role}: cannot list pods: {type(exc).__name__}: {exc}")
            continue
        running = sorted(
            (p for p in listed if _running(p)), key=lambda p: p["metadata"].get("name", "")
        )
        if len(running) < 2:
            continue
        qualities: dict[str, float] = {}
        failed = False
        for p in running:
            name = p["metadata"]["name"]
            try:
                qualities[name] = pod_quality(client, p)
            except PlacementError as exc:
                out.errors.append(f"role {role}: cannot judge pod {name}: {exc}")
                failed = True
                break
            except Exception as exc:  # a malformed pod object, a bug
                out.errors.append(f"role {role}: cannot judge pod {name}: {exc!r}")
                failed = True
                break
        if failed:
            continue
        # Leader/worker pods: one cost per instance (the mean of its pods).
        instance_of = {p["metadata"]["name"]: _instance(p) for p in running}
        members: dict[str, list[float]] = {}
        for name, q in qualities.items():
            members.setdefault(instance_of[name], []).append(q)
        quality = {inst: sum(qs) / len(qs) for inst, qs in members.items()}
        pod_q = {name: quality[inst] for name, inst in instance_of.items()}
        order = sorted(running, key=lambda p: (pod_q[p["metadata"]["name"]], p["metadata"]["name"]))
        out.ranked[role] = [
            (p["metadata"]["name"], p["spec"]["nodeName"], pod_q[p["metadata"]["name"]])
            for p in order
        ]
        for p in order:
            name = p["metadata"]["name"]
            q = pod_q[name]
            cost = math.floor(q * COST_SCALE + 0.5)
            have = (p["metadata"].get("annotations") or {}).get(POD_DELETION_COST)
            if have == str(cost):
                out.unchanged.append((name, cost))
                continue
            try:
                pods.patch_pod_annotations(target.namespace, name, {POD_DELETION_COST: str(cost)})
            except Exception as exc:
                out.errors.append(f"pod {name}: cannot annotate: {type(exc).__name__}: {exc}")
                continue
            out.patched.append((name, cost))
    return out
