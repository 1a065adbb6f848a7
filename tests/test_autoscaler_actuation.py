"""The autoscaler's Kubernetes side against recorded kube-apiserver v1.26 exchanges.

RBG actuation (JSON Patch + scaling adapters, retries, rollback), Events and the Lease
election run the real kubernetes client over HTTP against ``ApiserverReplay``, which answers
from ``../shared/fixtures/kube-apiserver/`` and fails a test on any request it has no
recording for. The replay matches on method + path only, so every test asserts the bodies
the code sent itself. Variants (other names, resourceVersions, replicas, statuses) are
derived from the recorded files in memory; the files are never edited.

Files 0640-1260 come from one cluster (RBG uid 7c0ae746-...), 1270-1340 from a second one
with RBG's validating webhook (RBG uid 693febf6-..., adapter ``demo-prefill`` uid
5ba3cd3e-..., resourceVersions restarting at 203).
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import kubernetes.client
import pytest

from topo_sched.autoscaler.actuator import ApplyResult, RbgActuator
from topo_sched.autoscaler.events import EventRecorder, rfc3339
from topo_sched.autoscaler.leader import LeaseElector, micro_time
from topo_sched.kube import errors
from topo_sched.kube import rbg as rbgapi
from topo_sched.scaling.signals import Decision, RoleReplicas

pytest_plugins = ("tests.support.apiserver_replay",)

RBG_PATH = "/apis/workloads.x-k8s.io/v1alpha2/namespaces/llm/rolebasedgroups/demo"
ADAPTERS = "/apis/workloads.x-k8s.io/v1alpha2/namespaces/llm/rolebasedgroupscalingadapters"
LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/llm/leases/topo-sched-autoscaler"
T0 = 1767225600.0  # 2026-01-01T00:00:00Z, the time written into the recorded Leases/Events
WEBHOOK_PREFILL_UID = "5ba3cd3e-e6eb-4a74-8cb3-bac539182b03"  # adapter demo-prefill, 1280

F_GET = "0650-rbg-get.json"
F_PATCH_OK = "0690-rbg-json-patch-test-and-replace-replicas.json"
F_PATCH_TEST_FAILED = "0700-rbg-json-patch-test-failed-422.json"
F_GET_AFTER_PATCH = "0730-rbg-get-after-patch.json"
F_PUT_CURRENT = "0740-rbg-put-current-resourceversion.json"
F_RBAC = "1110-authz-forbidden-patch-rbg-403.json"
F_WH_GET = "1300-rbg-get-after-webhook-denial-unchanged.json"
F_WH_DENIED = "1290-rbg-json-patch-both-roles-replicas-webhook-denied-403.json"
F_WH_DECODE_OK = "1310-rbg-json-patch-decode-replicas-webhook-allowed-200.json"
F_WH_DOWN_SAME = "1320-rbg-json-patch-decode-replicas-same-patch-webhook-unreachable-500.json"
F_WH_DOWN = "1330-rbg-json-patch-decode-replicas-3-webhook-unreachable-500.json"
F_WH_GET_AFTER_DOWN = "1340-rbg-get-after-webhook-unreachable-unchanged.json"


class Sleeps(list):
    """A ``sleep`` that records the delays instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# -- deriving exchanges from the recordings -------------------------------------------------


def derived(
    base: dict[str, Any],
    name: str,
    *,
    method: str | None = None,
    path: str | None = None,
    status: int | None = None,
    body: Any = ...,
) -> dict[str, Any]:
    """A copy of a recorded exchange with the given parts replaced (named for the log)."""
    fx = copy.deepcopy(base)
    fx["name"] = name
    if method is not None:
        fx["request"]["method"] = method
    if path is not None:
        fx["request"]["path"] = path
    if status is not None:
        fx["response"]["status"] = status
    if body is not ...:
        fx["response"]["body"] = body
    return fx


def rbg_body(fx: dict[str, Any], *, rv: str | None = None, **replicas: int) -> dict[str, Any]:
    """The RBG in a recorded answer, with replicas (and resourceVersion) changed."""
    obj = copy.deepcopy(fx["response"]["body"])
    for role in obj["spec"]["roles"]:
        if role["name"] in replicas:
            role["replicas"] = replicas[role["name"]]
    if rv is not None:
        obj["metadata"]["resourceVersion"] = rv
    return obj


def scale_exchange(
    kube_fixture: Any,
    adapter: str,
    *,
    replicas: int,
    rv: str,
    uid: str = WEBHOOK_PREFILL_UID,
    method: str = "GET",
) -> dict[str, Any]:
    """GET (from 0840) or merge-PATCH (from 0870) of ``<adapter>/scale`` in the webhook cluster.

    The second cluster never wrote the adapter's status, so the Scale looks like 0840's:
    ``status.replicas: 0`` and no selector.
    """
    base = (
        "0840-rbgsa-get-scale-before-status.json"
        if method == "GET"
        else ("0870-rbgsa-merge-patch-scale.json")
    )
    fx = kube_fixture(base)
    body = fx["response"]["body"]
    body["metadata"].update({"name": adapter, "uid": uid, "resourceVersion": rv})
    body["spec"]["replicas"] = replicas
    body["status"] = {"replicas": 0}
    return derived(
        fx, f"{base} as {method} {adapter} {replicas} rv {rv}", path=f"{ADAPTERS}/{adapter}/scale"
    )


def scale_conflict(kube_fixture: Any, adapter: str) -> dict[str, Any]:
    """A 409 on a conditional merge patch of ``/scale`` (0880's answer, as a PATCH)."""
    fx = kube_fixture("0880-rbgsa-put-scale-stale-resourceversion-409.json")
    body = fx["response"]["body"]
    body["message"] = body["message"].replace("demo-prefill", adapter)
    body["details"]["name"] = adapter
    return derived(
        fx, f"409 on PATCH {adapter}/scale", method="PATCH", path=f"{ADAPTERS}/{adapter}/scale"
    )


def scale_rbac_denied(kube_fixture: Any, adapter: str) -> dict[str, Any]:
    """1110's RBAC 403, as the apiserver words it for the adapters' scale subresource."""
    fx = kube_fixture(F_RBAC)
    body = fx["response"]["body"]
    body["message"] = (
        f'rolebasedgroupscalingadapters.workloads.x-k8s.io "{adapter}" is forbidden: User '
        '"system:serviceaccount:topo-sched:autoscaler" cannot patch resource '
        '"rolebasedgroupscalingadapters/scale" in API group "workloads.x-k8s.io" in the '
        'namespace "llm"'
    )
    body["details"] = {
        "name": adapter,
        "group": "workloads.x-k8s.io",
        "kind": "rolebasedgroupscalingadapters",
    }
    return derived(fx, f"RBAC 403 on PATCH {adapter}/scale", path=f"{ADAPTERS}/{adapter}/scale")


def without_adapter(fx: dict[str, Any], name: str) -> dict[str, Any]:
    """1300 as a reader that has not seen ``scalingAdapter`` on prefill yet would get it."""
    body = copy.deepcopy(fx["response"]["body"])
    for role in body["spec"]["roles"]:
        role.pop("scalingAdapter", None)
    return derived(fx, name, body=body)


def requests(server: Any, method: str, path: str) -> list[Any]:
    return [r for r in server.requests if r.method == method and r.path.split("?")[0] == path]


def replaced_roles(ops: list[dict[str, Any]]) -> set[int]:
    return {
        int(op["path"].split("/")[3])
        for op in ops
        if op["op"] == "replace" and op["path"].endswith("/replicas")
    }


# -- kube/rbg.py -----------------------------------------------------------------------------


def test_role_replicas_read_spec_and_status(kube_fixture):
    status_fx = kube_fixture("0800-rbg-get-status-subresource.json")["response"]["body"]
    assert rbgapi.role_replicas(status_fx) == {
        "prefill": RoleReplicas(desired=6, ready=0),
        "decode": RoleReplicas(desired=3, ready=0),
    }
    ready = copy.deepcopy(status_fx)
    ready["status"]["roleStatuses"][0]["readyReplicas"] = 5
    assert rbgapi.role_replicas(ready)["prefill"] == RoleReplicas(desired=6, ready=5)
    before_status = kube_fixture(F_GET)["response"]["body"]
    assert rbgapi.role_replicas(before_status) == {
        "prefill": RoleReplicas(desired=2, ready=0),
        "decode": RoleReplicas(desired=1, ready=0),
    }


def test_scaling_adapter_roles_and_names(kube_fixture):
    with_adapter = kube_fixture("1270-rbg-create-v1alpha2-prefill-scalingadapter-enabled.json")[
        "response"
    ]["body"]
    assert rbgapi.scaling_adapter_roles(with_adapter) == {"prefill"}
    assert rbgapi.scaling_adapter_roles(kube_fixture(F_GET)["response"]["body"]) == set()
    assert rbgapi.adapter_name("demo", "prefill") == "demo-prefill"


def test_get_and_patch_scale(apiserver_replay, kube_fixture):
    patch_fx = kube_fixture("0870-rbgsa-merge-patch-scale.json")
    server = apiserver_replay("0860-rbgsa-get-scale.json", patch_fx)
    api = server.api_client()

    scale = rbgapi.get_scale(api, "llm", "demo-prefill")
    written = rbgapi.patch_scale(api, "llm", "demo-prefill", 8)

    assert rbgapi.scale_replicas(scale) == 6
    assert rbgapi.resource_version(scale) == "258"
    assert rbgapi.scale_replicas(written) == 8
    sent = server.requests[1]
    assert sent.headers["content-type"] == "application/merge-patch+json"
    assert sent.body == patch_fx["request"]["body"]


def test_patch_scale_with_resource_version_is_conditional(apiserver_replay, kube_fixture):
    server = apiserver_replay(scale_conflict(kube_fixture, "demo-prefill"))
    with pytest.raises(errors.Conflict):
        rbgapi.patch_scale(server.api_client(), "llm", "demo-prefill", 10, resource_version="258")
    assert server.requests[0].body == {
        "metadata": {"resourceVersion": "258"},
        "spec": {"replicas": 10},
    }


# -- actuator: roles without an adapter (one JSON Patch) ---------------------------------------


def test_json_patch_tests_name_and_replicas_then_replaces(apiserver_replay, kube_fixture):
    recorded = kube_fixture(F_PATCH_OK)
    server = apiserver_replay(F_GET, F_PATCH_OK)
    sleeps = Sleeps()

    result = RbgActuator(server.api_client(), sleep=sleeps).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    assert result == ApplyResult(
        applied=True,
        attempts=1,
        changed={"prefill": (2, 4), "decode": (1, 2)},
        message="RBG llm/demo: scaled prefill 2->4, decode 1->2",
    )
    assert server.served() == [F_GET, F_PATCH_OK]
    (patch,) = requests(server, "PATCH", RBG_PATH)
    assert patch.headers["content-type"] == "application/json-patch+json"
    # The same ops in the same order as the recorded request the apiserver accepted.
    assert patch.body == recorded["request"]["body"]
    tests = [op for op in patch.body if op["op"] == "test"]
    assert {op["path"] for op in tests} == {
        "/spec/roles/0/name",
        "/spec/roles/0/replicas",
        "/spec/roles/1/name",
        "/spec/roles/1/replicas",
    }
    assert patch.body.index(tests[-1]) < min(
        i for i, op in enumerate(patch.body) if op["op"] == "replace"
    )
    assert sleeps == []


def test_apply_decision_uses_namespace_and_name(apiserver_replay):
    server = apiserver_replay(F_GET, F_PATCH_OK)
    decision = Decision(
        name="llm/demo",
        current={"prefill": 2, "decode": 1},
        desired={"prefill": 4, "decode": 2},
        action="scale",
        reason="demand",
    )
    result = RbgActuator(server.api_client(), sleep=Sleeps()).apply_decision(decision)
    assert result.applied and result.changed == {"prefill": (2, 4), "decode": (1, 2)}


def test_failed_test_op_rereads_and_retries(apiserver_replay, kube_fixture):
    # 0700: the recorded patch failed its `test` (the RBG had moved to 4/2); 0730 reads 4/2.
    done = derived(
        kube_fixture(F_PATCH_OK),
        "0690 answering 6/3 (body of 0740)",
        body=kube_fixture(F_PUT_CURRENT)["response"]["body"],
    )
    server = apiserver_replay(F_GET, F_PATCH_TEST_FAILED, F_GET_AFTER_PATCH, done)
    sleeps = Sleeps()

    result = RbgActuator(server.api_client(), sleep=sleeps).apply(
        "llm", "demo", {"prefill": 6, "decode": 3}
    )

    assert result.applied
    assert result.attempts == 2
    assert result.changed == {"prefill": (4, 6), "decode": (2, 3)}
    assert server.served() == [F_GET, F_PATCH_TEST_FAILED, F_GET_AFTER_PATCH, done["name"]]
    first, second = (r.body for r in requests(server, "PATCH", RBG_PATH))
    assert {"op": "test", "path": "/spec/roles/0/replicas", "value": 2} in first
    assert {"op": "test", "path": "/spec/roles/0/replicas", "value": 4} in second
    assert {"op": "test", "path": "/spec/roles/1/replicas", "value": 2} in second
    assert {"op": "replace", "path": "/spec/roles/0/replicas", "value": 6} in second
    assert {"op": "replace", "path": "/spec/roles/1/replicas", "value": 3} in second
    assert sleeps == [0.5]


def test_conflicts_are_retried_a_bounded_number_of_times(apiserver_replay, kube_fixture):
    exchanges = []
    for i in range(3):
        exchanges += [
            derived(kube_fixture(F_GET), f"get {i}"),
            derived(kube_fixture(F_PATCH_TEST_FAILED), f"422 {i}"),
        ]
    # A fourth round would be answered: prove it is never asked for.
    exchanges += [derived(kube_fixture(F_GET), "get 3"), kube_fixture(F_PATCH_OK)]
    server = apiserver_replay(*exchanges)
    sleeps = Sleeps()

    result = RbgActuator(server.api_client(), max_attempts=3, sleep=sleeps).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    assert not result.applied
    assert result.code == "conflict"
    assert result.attempts == 3
    assert "gave up after 3 attempts" in result.message
    assert len(requests(server, "PATCH", RBG_PATH)) == 3
    assert sleeps == [0.5, 1.0]


def test_nothing_to_do_writes_nothing(apiserver_replay):
    server = apiserver_replay(F_GET_AFTER_PATCH)
    result = RbgActuator(server.api_client(), sleep=Sleeps()).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )
    assert result.applied and result.code == "noop" and result.changed == {}
    assert [r.method for r in server.requests] == ["GET"]


def test_unknown_role_writes_nothing(apiserver_replay):
    server = apiserver_replay(F_GET)
    result = RbgActuator(server.api_client(), sleep=Sleeps()).apply(
        "llm", "demo", {"prefill": 4, "router": 1}
    )
    assert not result.applied and result.code == "unknown-role"
    assert "router" in result.message
    assert [r.method for r in server.requests] == ["GET"]


def test_rbac_denial_fails_at_once_naming_the_permission(apiserver_replay, kube_fixture):
    server = apiserver_replay(F_GET, F_RBAC, derived(kube_fixture(F_GET), "retry get"))
    sleeps = Sleeps()

    result = RbgActuator(server.api_client(), sleep=sleeps).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    assert not result.applied
    assert result.code == "forbidden"
    assert result.attempts == 1
    assert sleeps == []
    assert len(requests(server, "PATCH", RBG_PATH)) == 1
    assert 'User "fixture-nobody" lacks permission to patch rolebasedgroups' in result.message
    assert "grant verbs [patch] on resources [rolebasedgroups]" in result.message
    assert "workloads.x-k8s.io" in result.message


# -- actuator: roles with a scaling adapter ----------------------------------------------------


def adapter_route(kube_fixture: Any) -> list[Any]:
    """1300 (prefill has an adapter at 2) -> scale GET -> 1310 (decode 1->2) -> scale PATCH."""
    return [
        F_WH_GET,
        scale_exchange(kube_fixture, "demo-prefill", replicas=2, rv="204"),
        F_WH_DECODE_OK,
        scale_exchange(kube_fixture, "demo-prefill", replicas=4, rv="206", method="PATCH"),
    ]


def test_adapter_role_goes_through_scale_and_the_rest_through_the_rbg(
    apiserver_replay, kube_fixture
):
    server = apiserver_replay(*adapter_route(kube_fixture))
    sleeps = Sleeps()

    result = RbgActuator(server.api_client(), sleep=sleeps).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    assert result.applied and result.attempts == 1
    assert result.changed == {"decode": (1, 2), "prefill": (2, 4)}
    # Order: read the RBG and the adapter, then the RBG patch first, the adapter second.
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", RBG_PATH),
        ("GET", f"{ADAPTERS}/demo-prefill/scale"),
        ("PATCH", RBG_PATH),
        ("PATCH", f"{ADAPTERS}/demo-prefill/scale"),
    ]
    rbg_patch = requests(server, "PATCH", RBG_PATH)[0]
    assert rbg_patch.body == [
        {"op": "test", "path": "/spec/roles/1/name", "value": "decode"},
        {"op": "test", "path": "/spec/roles/1/replicas", "value": 1},
        {"op": "replace", "path": "/spec/roles/1/replicas", "value": 2},
    ]
    # Everything the recorded, webhook-allowed 1310 patch did, plus the replicas guard.
    recorded = kube_fixture(F_WH_DECODE_OK)["request"]["body"]
    assert all(op in rbg_patch.body for op in recorded)
    scale_patch = requests(server, "PATCH", f"{ADAPTERS}/demo-prefill/scale")[0]
    assert scale_patch.headers["content-type"] == "application/merge-patch+json"
    assert scale_patch.body == {"metadata": {"resourceVersion": "204"}, "spec": {"replicas": 4}}
    assert sleeps == []


def test_adapter_role_is_never_patched_on_the_rbg(apiserver_replay, kube_fixture):
    """1290: patching prefill (adapter enabled) directly is denied; the actuator never does."""
    denied = kube_fixture(F_WH_DENIED)
    assert 0 in replaced_roles(denied["request"]["body"])  # what got denied
    assert (
        'ScalingAdapter "demo-prefill" has spec.replicas 2' in denied["response"]["body"]["message"]
    )
    server = apiserver_replay(*adapter_route(kube_fixture))

    RbgActuator(server.api_client(), sleep=Sleeps()).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    for patch in requests(server, "PATCH", RBG_PATH):
        assert 0 not in replaced_roles(patch.body)
        assert all(not op["path"].startswith("/spec/roles/0/") for op in patch.body)
    assert requests(server, "PATCH", f"{ADAPTERS}/demo-prefill/scale")[0].body["spec"] == {
        "replicas": 4
    }


def test_webhook_denial_rereads_and_routes_through_the_adapter(apiserver_replay, kube_fixture):
    # A first read that does not show prefill's adapter yet: both roles go into the patch,
    # the webhook denies it (1290); the re-read (1300) shows the adapter.
    stale = without_adapter(kube_fixture(F_WH_GET), "1300 without scalingAdapter")
    server = apiserver_replay(stale, F_WH_DENIED, *adapter_route(kube_fixture))
    sleeps = Sleeps()

    result = RbgActuator(server.api_client(), sleep=sleeps).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    assert result.applied and result.attempts == 2
    assert result.changed == {"decode": (1, 2), "prefill": (2, 4)}
    first, second = (r.body for r in requests(server, "PATCH", RBG_PATH))
    assert replaced_roles(first) == {0, 1}
    assert replaced_roles(second) == {1}
    assert sleeps == [0.5]


def test_persistent_webhook_denial_gives_up_with_the_denial(apiserver_replay, kube_fixture):
    exchanges = []
    for i in range(2):
        exchanges += [
            without_adapter(kube_fixture(F_WH_GET), f"stale read {i}"),
            derived(kube_fixture(F_WH_DENIED), f"denied {i}"),
        ]
    server = apiserver_replay(*exchanges)

    result = RbgActuator(server.api_client(), max_attempts=2, sleep=Sleeps()).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    assert not result.applied and result.code == "webhook-denied"
    assert result.attempts == 2
    assert "vrolebasedgroup.kb.io" in result.message
    assert "cannot be changed to 4 while scalingAdapter.enable is true" in result.message


def test_unreachable_webhook_fails_at_once_without_retrying(apiserver_replay, kube_fixture):
    prefill_scale = scale_exchange(kube_fixture, "demo-prefill", replicas=2, rv="204")
    # A retry would be answered (the same 500 again); prove none is made.
    server = apiserver_replay(
        F_WH_GET_AFTER_DOWN,
        prefill_scale,
        F_WH_DOWN,
        derived(kube_fixture(F_WH_GET_AFTER_DOWN), "retry get"),
        derived(prefill_scale, "retry scale get"),
        F_WH_DOWN_SAME,
    )
    sleeps = Sleeps()

    result = RbgActuator(server.api_client(), sleep=sleeps).apply(
        "llm", "demo", {"prefill": 2, "decode": 3}
    )

    assert not result.applied
    assert result.code == "webhook-unavailable"
    assert result.attempts == 1 and not result.rolled_back and result.changed == {}
    assert sleeps == []
    (patch,) = requests(server, "PATCH", RBG_PATH)
    assert {"op": "replace", "path": "/spec/roles/1/replicas", "value": 3} in patch.body
    assert "admission webhook vrolebasedgroup.kb.io is unreachable" in result.message
    assert "not retrying" in result.message
    assert "connection refused" in result.message


def test_adapter_conflict_is_retried_alone(apiserver_replay, kube_fixture):
    server = apiserver_replay(
        F_WH_GET,
        scale_exchange(kube_fixture, "demo-prefill", replicas=2, rv="204"),
        F_WH_DECODE_OK,
        scale_conflict(kube_fixture, "demo-prefill"),
        scale_exchange(kube_fixture, "demo-prefill", replicas=2, rv="207"),
        scale_exchange(kube_fixture, "demo-prefill", replicas=4, rv="208", method="PATCH"),
    )
    sleeps = Sleeps()

    result = RbgActuator(server.api_client(), sleep=sleeps).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    assert result.applied and result.attempts == 2
    assert result.changed == {"decode": (1, 2), "prefill": (2, 4)}
    assert len(requests(server, "PATCH", RBG_PATH)) == 1  # the RBG patch is not redone
    first, second = requests(server, "PATCH", f"{ADAPTERS}/demo-prefill/scale")
    assert first.body["metadata"] == {"resourceVersion": "204"}
    assert second.body == {"metadata": {"resourceVersion": "207"}, "spec": {"replicas": 4}}
    assert sleeps == [0.5]


# -- actuator: rollback ----------------------------------------------------------------------


def test_adapter_failure_after_rbg_patch_restores_the_rbg(apiserver_replay, kube_fixture):
    restored = derived(
        kube_fixture(F_WH_DECODE_OK),
        "rollback patch (decode back to 1)",
        body=rbg_body(kube_fixture(F_WH_GET), rv="206", decode=1),
    )
    server = apiserver_replay(
        F_WH_GET,
        scale_exchange(kube_fixture, "demo-prefill", replicas=2, rv="204"),
        F_WH_DECODE_OK,
        scale_rbac_denied(kube_fixture, "demo-prefill"),
        restored,
    )

    result = RbgActuator(server.api_client(), sleep=Sleeps()).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    assert not result.applied
    assert result.rolled_back
    assert result.code == "forbidden"
    assert result.changed == {}
    forward, undo = requests(server, "PATCH", RBG_PATH)
    assert forward.exchange == F_WH_DECODE_OK
    assert undo.exchange == restored["name"]
    assert undo.body == [
        {"op": "test", "path": "/spec/roles/1/name", "value": "decode"},
        {"op": "test", "path": "/spec/roles/1/replicas", "value": 2},
        {"op": "replace", "path": "/spec/roles/1/replicas", "value": 1},
    ]
    assert len(requests(server, "PATCH", f"{ADAPTERS}/demo-prefill/scale")) == 1  # no RBAC retry
    # The message names both writes: the failed one and the one undone.
    assert "scale of adapter demo-prefill (prefill 2->4) failed" in result.message
    assert "RBG patch (decode 1->2) undone, decode restored to 1" in result.message
    assert "rolebasedgroupscalingadapters/scale" in result.message


def test_second_adapter_failure_restores_the_first_adapter(apiserver_replay, kube_fixture):
    # Both roles with an adapter (as in ../rbg/scaling-adapter-with-hpa.yaml): two /scale
    # writes, prefill first (same relative change; spec order). decode keeps conflicting.
    rbg = kube_fixture(F_WH_GET)
    rbg["response"]["body"]["spec"]["roles"][1]["scalingAdapter"] = {"enable": True}
    decode_uid = "0d0d0d0d-0000-4000-8000-000000000001"
    server = apiserver_replay(
        derived(rbg, "1300 with an adapter on decode too"),
        scale_exchange(kube_fixture, "demo-prefill", replicas=2, rv="204"),
        scale_exchange(kube_fixture, "demo-decode", replicas=1, rv="206", uid=decode_uid),
        scale_exchange(kube_fixture, "demo-prefill", replicas=4, rv="207", method="PATCH"),
        scale_conflict(kube_fixture, "demo-decode"),
        scale_exchange(kube_fixture, "demo-decode", replicas=1, rv="208", uid=decode_uid),
        scale_conflict(kube_fixture, "demo-decode"),
        scale_exchange(kube_fixture, "demo-prefill", replicas=2, rv="209", method="PATCH"),
    )

    result = RbgActuator(server.api_client(), max_attempts=2, sleep=Sleeps()).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    assert not result.applied and result.rolled_back and result.code == "conflict"
    assert result.attempts == 2
    assert requests(server, "PATCH", RBG_PATH) == []
    forward, undo = requests(server, "PATCH", f"{ADAPTERS}/demo-prefill/scale")
    assert forward.body == {"metadata": {"resourceVersion": "204"}, "spec": {"replicas": 4}}
    # The restoring write: the old replicas, conditional on the version our write made.
    assert undo.body == {"metadata": {"resourceVersion": "207"}, "spec": {"replicas": 2}}
    assert "scale of adapter demo-decode (decode 1->2) failed" in result.message
    assert "prefill restored to 2" in result.message


def test_failed_rollback_is_reported(apiserver_replay, kube_fixture):
    down = kube_fixture(F_WH_DOWN)
    server = apiserver_replay(
        F_WH_GET,
        scale_exchange(kube_fixture, "demo-prefill", replicas=2, rv="204"),
        F_WH_DECODE_OK,
        scale_rbac_denied(kube_fixture, "demo-prefill"),
        derived(down, "the rollback patch meets the webhook down"),
    )

    result = RbgActuator(server.api_client(), sleep=Sleeps()).apply(
        "llm", "demo", {"prefill": 4, "decode": 2}
    )

    assert not result.applied and not result.rolled_back
    assert result.code == "rollback-failed"
    assert result.changed == {"decode": (1, 2)}
    assert "ROLLBACK FAILED" in result.message
    assert "demo-prefill" in result.message and "decode 1->2" in result.message
    assert len(requests(server, "PATCH", RBG_PATH)) == 2  # no retry storm on the 500


# -- events ----------------------------------------------------------------------------------


def test_event_about_the_rbg(apiserver_replay, kube_fixture):
    recorded = kube_fixture("0950-events-core-v1-create-about-rbg.json")
    server = apiserver_replay(recorded)
    rbg = kube_fixture(F_GET)["response"]["body"]
    recorder = EventRecorder(
        server.api_client(), instance="topo-sched-autoscaler-0", clock=lambda: T0
    )

    created = recorder.record(rbg, "ScaledRoles", recorded["request"]["body"]["message"])

    assert created is not None and created["metadata"]["uid"]
    (sent,) = server.requests
    assert sent.method == "POST" and sent.path == "/api/v1/namespaces/llm/events"
    name = sent.body["metadata"].pop("name")
    expected = copy.deepcopy(recorded["request"]["body"])
    expected["metadata"].pop("name")
    assert sent.body == expected
    assert re.fullmatch(r"demo\.[0-9a-f]+", name)
    assert rfc3339(T0) == "2026-01-01T00:00:00Z"


def test_event_names_are_unique(kube_fixture):
    rbg = kube_fixture(F_GET)["response"]["body"]
    recorder = EventRecorder(kubernetes.client.ApiClient(), instance="x", clock=lambda: T0)
    names = {recorder.build(rbg, "R", "m")["metadata"]["name"] for _ in range(5)}
    assert len(names) == 5


def test_event_conflict_and_failures_are_swallowed(apiserver_replay, kube_fixture, caplog):
    server = apiserver_replay(
        "0960-events-core-v1-create-duplicate-409.json",
        "0970-events-core-v1-create-namespace-mismatch-422.json",
    )
    rbg = kube_fixture(F_GET)["response"]["body"]
    recorder = EventRecorder(server.api_client(), instance="i", clock=lambda: T0)

    with caplog.at_level(logging.INFO, logger="topo_sched.autoscaler.events"):
        assert recorder.record(rbg, "ScaledRoles", "again") is None
        assert recorder.record(rbg, "ScaledRoles", "rejected", type="Warning") is None
        assert recorder.record({"metadata": {}}, "ScaledRoles", "no name") is None

    text = caplog.text
    assert "already exists" in text
    assert "could not record event" in text and "does not match event.namespace" in text
    assert "bad RBG object" in text


def test_event_with_apiserver_down_is_swallowed(kube_fixture):
    configuration = kubernetes.client.Configuration(host="http://127.0.0.1:9")
    configuration.retries = 0
    recorder = EventRecorder(kubernetes.client.ApiClient(configuration), instance="i")
    assert recorder.record(kube_fixture(F_GET)["response"]["body"], "R", "m") is None


# -- leader election -------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


ME = "topo-sched-autoscaler-7d9f-abcde"  # the holder in the recorded Leases
OTHER = "topo-sched-autoscaler-7d9f-fghij"  # the candidate of 1070's takeover


def missing_lease(kube_fixture: Any) -> dict[str, Any]:
    """1050's 404, for the Lease name the recordings use."""
    fx = kube_fixture("1050-lease-get-missing-404.json")
    body = fx["response"]["body"]
    body["message"] = body["message"].replace("no-such-lease", "topo-sched-autoscaler")
    body["details"]["name"] = "topo-sched-autoscaler"
    return derived(fx, "1050 for topo-sched-autoscaler", path=LEASE_PATH)


def elector(server: Any, identity: str, clock: Clock) -> LeaseElector:
    return LeaseElector(server.api_client(), "llm", "topo-sched-autoscaler", identity, clock=clock)


def test_micro_time_format():
    assert micro_time(T0) == "2026-01-01T00:00:00.000000Z"
    assert micro_time(T0 + 10.25) == "2026-01-01T00:00:10.250000Z"


def test_missing_lease_is_created(apiserver_replay, kube_fixture):
    created = kube_fixture("1020-lease-create.json")
    server = apiserver_replay(missing_lease(kube_fixture), created)
    election = elector(server, ME, Clock())

    assert election.try_acquire_or_renew() is True

    assert election.is_leader
    get, post = server.requests
    assert (get.method, get.path) == ("GET", LEASE_PATH)
    assert post.method == "POST"
    assert post.body == created["request"]["body"]  # MicroTimes exactly as recorded


def test_create_conflict_reads_the_winner(apiserver_replay, kube_fixture):
    server = apiserver_replay(
        missing_lease(kube_fixture),
        "1030-lease-create-again-409.json",
        "1040-lease-get.json",
    )
    election = elector(server, OTHER, Clock())

    assert election.try_acquire_or_renew() is False

    assert not election.is_leader
    assert election.holder == ME
    assert [r.method for r in server.requests] == ["GET", "POST", "GET"]


def test_renew_own_lease(apiserver_replay, kube_fixture):
    renew = kube_fixture("1060-lease-put-renew-current-resourceversion.json")
    server = apiserver_replay("1040-lease-get.json", renew)
    clock = Clock(T0 + 10)
    election = elector(server, ME, clock)

    assert election.try_acquire_or_renew() is True

    put = server.requests[1]
    assert put.method == "PUT" and put.path == LEASE_PATH
    assert put.body["metadata"]["resourceVersion"] == "266"
    assert put.body["spec"] == renew["request"]["body"]["spec"]
    assert election.is_leader
    clock.now = T0 + 10 + 9.9
    assert election.is_leader
    clock.now = T0 + 10 + 10.0  # renew deadline passed without a renewal: step down
    assert not election.is_leader


def test_takeover_after_expiry_loses_the_race(apiserver_replay, kube_fixture):
    stale = kube_fixture("1070-lease-put-stale-resourceversion-409.json")
    server = apiserver_replay(
        "1040-lease-get.json",
        derived(kube_fixture("1040-lease-get.json"), "1040 again"),
        derived(kube_fixture("1040-lease-get.json"), "1040 once more"),
        "1070-lease-put-stale-resourceversion-409.json",
    )
    clock = Clock(T0)
    election = elector(server, OTHER, clock)

    assert election.try_acquire_or_renew() is False  # held by ME, first seen now
    clock.now = T0 + 5
    assert election.try_acquire_or_renew() is False  # unchanged for 5 s < 15 s
    assert [r.method for r in server.requests] == ["GET", "GET"]
    clock.now = T0 + 20
    assert election.try_acquire_or_renew() is False  # expired: take over, 409 -> lost

    assert not election.is_leader
    put = server.requests[-1]
    assert put.method == "PUT" and put.exchange == "1070-lease-put-stale-resourceversion-409.json"
    assert put.body["metadata"]["resourceVersion"] == "266"
    assert put.body["spec"] == stale["request"]["body"]["spec"]


def test_put_without_resource_version_422_is_handled(apiserver_replay, kube_fixture):
    no_rv = kube_fixture("1040-lease-get.json")
    del no_rv["response"]["body"]["metadata"]["resourceVersion"]
    server = apiserver_replay(
        derived(no_rv, "1040 without resourceVersion"),
        "1080-lease-put-without-resourceversion-422.json",
    )
    election = elector(server, ME, Clock(T0 + 10))

    assert election.try_acquire_or_renew() is False

    assert not election.is_leader
    assert "resourceVersion" not in server.requests[1].body["metadata"]


def test_leader_keeps_leading_through_a_failed_renewal_until_the_deadline(
    apiserver_replay, kube_fixture
):
    invalid = "1080-lease-put-without-resourceversion-422.json"
    server = apiserver_replay(
        "1040-lease-get.json",
        "1060-lease-put-renew-current-resourceversion.json",
        "1090-lease-get-after-renew.json",
        invalid,
        derived(kube_fixture("1090-lease-get-after-renew.json"), "1090 again"),
        derived(kube_fixture(invalid), "1080 again"),
    )
    clock = Clock(T0 + 10)
    election = elector(server, ME, clock)
    assert election.try_acquire_or_renew() is True

    clock.now = T0 + 12
    assert election.try_acquire_or_renew() is True  # renewal failed, deadline not reached
    clock.now = T0 + 20
    assert election.try_acquire_or_renew() is False  # 10 s since the last renewal
    assert not election.is_leader


def test_release_hands_the_lease_back(apiserver_replay, kube_fixture):
    renewed = kube_fixture("1060-lease-put-renew-current-resourceversion.json")
    released_body = copy.deepcopy(renewed["response"]["body"])
    released_body["metadata"]["resourceVersion"] = "268"
    released_body["spec"].update({"holderIdentity": "", "leaseDurationSeconds": 1})
    server = apiserver_replay(
        "1040-lease-get.json", renewed, derived(renewed, "release", body=released_body)
    )
    clock = Clock(T0 + 10)
    election = elector(server, ME, clock)
    assert election.try_acquire_or_renew()

    clock.now = T0 + 11
    assert election.release() is True

    put = server.requests[-1]
    assert put.body["metadata"]["resourceVersion"] == "267"
    assert put.body["spec"]["holderIdentity"] == ""
    assert put.body["spec"]["leaseDurationSeconds"] == 1
    assert put.body["spec"]["renewTime"] == "2026-01-01T00:00:11.000000Z"
    assert not election.is_leader
    assert election.release() is False  # not leader any more: nothing sent
    assert len(server.requests) == 3
