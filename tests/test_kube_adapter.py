"""The Kubernetes adapters against recorded kube-apiserver v1.26 exchanges.

Every test runs the real kubernetes Python client over HTTP against ``ApiserverReplay``
(tests/support/apiserver_replay.py), which answers from the files in
``../shared/fixtures/kube-apiserver/`` and fails the test on any request it has no recording for.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import kubernetes.client
import pytest

from topo_sched.kube import errors
from topo_sched.kube.client import KubeConfigError, build_api_client
from topo_sched.kube.nodes import get_node, list_nodes, patch_node_annotations
from topo_sched.kube.pods import BindResult, create_binding
from topo_sched.kube.watch import ListWatch

pytest_plugins = ("tests.support.apiserver_replay",)

RBG = ("workloads.x-k8s.io", "v1alpha2", "llm", "rolebasedgroups", "demo")
GROUP_SELECTOR = "rbg.workloads.x-k8s.io/group-name=demo"


def names(objs: list[dict[str, Any]]) -> list[str]:
    return [o["metadata"]["name"] for o in objs]


class EventLog:
    """An on_event callback that remembers (type, key) and what the store held after each."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.objects: list[dict[str, Any]] = []
        self.store_after: list[set[str]] = []
        self.lw: ListWatch | None = None

    def __call__(self, event_type: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]
        self.events.append((event_type, key))
        self.objects.append(obj)
        if self.lw is not None:
            self.store_after.append(self.lw.keys())


def listwatch(list_func: Any, *args: Any, **kwargs: Any) -> tuple[ListWatch, EventLog]:
    log = EventLog()
    lw = ListWatch(list_func, *args, on_event=log, clock=lambda: 1000.0, **kwargs)
    log.lw = lw
    return lw, log


# -- nodes: merge patch of annotations ---------------------------------------------------


def test_patch_node_annotations_sets_topology(apiserver_replay, kube_fixture):
    fx = kube_fixture("0130-nodes-merge-patch-topology-annotations.json")
    server = apiserver_replay("0130-nodes-merge-patch-topology-annotations.json")
    wanted = fx["request"]["body"]["metadata"]["annotations"]

    result = patch_node_annotations(server.api_client(), "gpu-node-1", wanted)

    assert result == fx["response"]["body"]["metadata"]["annotations"]
    assert (
        result["topo-sched.io/gpu-allocation"]
        == '{"0":"llm/demo-prefill-0","1":"llm/demo-prefill-0"}'
    )
    sent = server.requests[0]
    assert sent.headers["content-type"] == "application/merge-patch+json"
    assert sent.body == fx["request"]["body"]


def test_patch_with_stale_resource_version_is_a_conflict(apiserver_replay, kube_fixture):
    fx = kube_fixture("0140-nodes-merge-patch-stale-resourceversion-409.json")
    server = apiserver_replay("0140-nodes-merge-patch-stale-resourceversion-409.json")
    annotations = fx["request"]["body"]["metadata"]["annotations"]

    with pytest.raises(errors.Conflict) as caught:
        patch_node_annotations(
            server.api_client(), "gpu-node-1", annotations, resource_version="211"
        )

    assert caught.value.status == 409
    assert "the object has been modified" in caught.value.message
    assert not isinstance(caught.value, errors.AlreadyBoundElsewhere)
    assert server.requests[0].body == fx["request"]["body"]


def test_patch_null_deletes_the_annotation(apiserver_replay, kube_fixture):
    fx = kube_fixture("0180-nodes-merge-patch-delete-annotation-null.json")
    server = apiserver_replay("0180-nodes-merge-patch-delete-annotation-null.json")

    result = patch_node_annotations(
        server.api_client(), "gpu-node-1", {"topo-sched.io/agent-heartbeat": None}
    )

    assert "topo-sched.io/agent-heartbeat" not in result
    assert set(result) == {"topo-sched.io/topology", "topo-sched.io/gpu-allocation"}
    assert server.requests[0].body == {
        "metadata": {"annotations": {"topo-sched.io/agent-heartbeat": None}}
    }
    assert server.requests[0].body == fx["request"]["body"]


def test_patch_invalid_annotation_key_is_invalid(apiserver_replay):
    server = apiserver_replay("0200-nodes-merge-patch-invalid-annotation-key-422.json")

    with pytest.raises(errors.Invalid) as caught:
        patch_node_annotations(server.api_client(), "gpu-node-1", {"topo-sched.io/bad key": "x"})

    assert caught.value.status == 422
    assert 'Invalid value: "topo-sched.io/bad key"' in caught.value.message
    assert {c["field"] for c in caught.value.causes} == {"metadata.annotations"}


# -- nodes: get and list -------------------------------------------------------------------


def test_get_node_and_missing_node(apiserver_replay):
    server = apiserver_replay("0110-nodes-get-gpu-node-1.json", "0120-nodes-get-missing-404.json")
    api = server.api_client()

    node = get_node(api, "gpu-node-1")
    assert node["metadata"]["labels"]["topo-sched.io/rack"] == "rack-a1"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    with pytest.raises(errors.NotFound, match='nodes "gpu-node-404" not found'):
        get_node(api, "gpu-node-404")


def test_list_nodes_follows_continue_tokens(apiserver_replay, kube_fixture):
    token = kube_fixture("0080-nodes-list-limit-1-first-page.json")["response"]["body"]["metadata"][
        "continue"
    ]
    server = apiserver_replay(
        "0080-nodes-list-limit-1-first-page.json", "0090-nodes-list-limit-1-second-page.json"
    )

    nodes = list_nodes(server.api_client(), page_size=1)

    assert names(nodes) == ["gpu-node-1", "gpu-node-2"]
    assert [r.query.get("continue") for r in server.requests] == [None, [token]]


def test_list_nodes_restarts_when_continue_token_expired(apiserver_replay):
    server = apiserver_replay(
        "0080-nodes-list-limit-1-first-page.json",
        "1180-nodes-list-continue-token-compacted-410.json",
        "0070-nodes-list.json",
    )

    nodes = list_nodes(server.api_client(), page_size=1)

    assert names(nodes) == ["gpu-node-1", "gpu-node-2"]
    assert "limit" not in server.requests[-1].query


def test_invalid_token_is_unauthorized(apiserver_replay):
    server = apiserver_replay("1140-authn-invalid-token-401.json")

    with pytest.raises(errors.Unauthorized) as caught:
        list_nodes(server.api_client())

    assert caught.value.status == 401


# -- bindings --------------------------------------------------------------------------------


def test_binding_created(apiserver_replay, kube_fixture):
    fx = kube_fixture("0270-binding-create-gpu-node-1-201.json")
    server = apiserver_replay("0270-binding-create-gpu-node-1-201.json")
    uid = fx["request"]["body"]["metadata"]["uid"]

    result = create_binding(server.api_client(), "llm", "demo-prefill-0", "gpu-node-1", uid=uid)

    assert result == BindResult("llm", "demo-prefill-0", "gpu-node-1", already_bound=False)
    assert server.requests[0].body == fx["request"]["body"]
    assert server.requests[0].headers["content-type"] == "application/json"


def test_binding_same_node_again_is_success(apiserver_replay):
    server = apiserver_replay("0280-binding-same-node-again-409.json")

    result = create_binding(server.api_client(), "llm", "demo-prefill-0", "gpu-node-1")

    assert result.already_bound
    assert result.node == "gpu-node-1"


def test_binding_to_another_node_names_the_bound_node(apiserver_replay):
    server = apiserver_replay("0290-binding-different-node-after-bound-409.json")

    with pytest.raises(errors.AlreadyBoundElsewhere) as caught:
        create_binding(server.api_client(), "llm", "demo-prefill-0", "gpu-node-2")

    assert caught.value.bound_node == "gpu-node-1"
    assert isinstance(caught.value, errors.Conflict)
    assert server.requests[0].body["target"]["name"] == "gpu-node-2"


def test_binding_missing_pod_is_not_found(apiserver_replay):
    server = apiserver_replay("0300-binding-pod-not-found-404.json")

    with pytest.raises(errors.NotFound, match='pods "demo-prefill-404" not found'):
        create_binding(server.api_client(), "llm", "demo-prefill-404", "gpu-node-1")


def test_binding_without_rbac_is_forbidden(apiserver_replay):
    server = apiserver_replay("1120-authz-forbidden-create-binding-403.json")

    with pytest.raises(errors.Forbidden) as caught:
        create_binding(server.api_client(), "llm", "demo-prefill-0", "gpu-node-2")

    assert not caught.value.by_admission_webhook
    assert 'User "fixture-nobody" cannot create resource "pods/binding"' in caught.value.message


# -- error classification: webhook vs RBAC ---------------------------------------------------


def patch_rbg(api: kubernetes.client.ApiClient, body: list[dict[str, Any]]) -> None:
    custom = kubernetes.client.CustomObjectsApi(api)
    with errors.translate_errors():
        custom.patch_namespaced_custom_object(
            *RBG, body, _content_type="application/json-patch+json"
        )


def test_webhook_denial_and_rbac_denial_are_told_apart(apiserver_replay, kube_fixture):
    denied = kube_fixture("1290-rbg-json-patch-both-roles-replicas-webhook-denied-403.json")
    rbac = kube_fixture("1110-authz-forbidden-patch-rbg-403.json")
    server = apiserver_replay(denied, rbac)
    api = server.api_client()

    with pytest.raises(errors.Forbidden) as by_webhook:
        patch_rbg(api, denied["request"]["body"])
    with pytest.raises(errors.Forbidden) as by_rbac:
        patch_rbg(api, rbac["request"]["body"])

    assert by_webhook.value.by_admission_webhook
    assert by_webhook.value.webhook == "vrolebasedgroup.kb.io"
    assert by_webhook.value.denial.startswith(
        'spec.roles[0].replicas (role "prefill"): cannot be changed to 4'
    )
    assert not by_rbac.value.by_admission_webhook
    assert by_rbac.value.webhook is None
    assert by_rbac.value.details["kind"] == "rolebasedgroups"


def test_unreachable_webhook_is_webhook_unavailable(apiserver_replay, kube_fixture):
    fx = kube_fixture("1320-rbg-json-patch-decode-replicas-same-patch-webhook-unreachable-500.json")
    server = apiserver_replay(fx)

    with pytest.raises(errors.WebhookUnavailable) as caught:
        patch_rbg(server.api_client(), fx["request"]["body"])

    assert isinstance(caught.value, errors.InternalError)
    assert caught.value.status == 500
    assert caught.value.webhook == "vrolebasedgroup.kb.io"
    assert "connection refused" in caught.value.message


# -- watch -----------------------------------------------------------------------------------


def test_node_watch_tracks_add_modify_delete(apiserver_replay, kube_fixture):
    server = apiserver_replay(
        "0440-nodes-list-before-watch.json", "0490-watch-nodes-added-modified-deleted-bookmark.json"
    )
    lw, log = listwatch(kubernetes.client.CoreV1Api(server.api_client()).list_node)
    assert not lw.synced

    lw.run_once(timeout_seconds=5)

    assert lw.synced and lw.last_sync_time == 1000.0
    assert lw.keys() == {"gpu-node-1", "gpu-node-2"}
    assert log.events == [
        ("ADDED", "gpu-node-1"),
        ("ADDED", "gpu-node-2"),
        ("MODIFIED", "gpu-node-1"),
        ("ADDED", "gpu-node-3"),
        ("MODIFIED", "gpu-node-3"),
        ("DELETED", "gpu-node-3"),
    ]
    assert "gpu-node-3" in log.store_after[3] and "gpu-node-3" not in log.store_after[5]
    allocation = lw.get("gpu-node-1")["metadata"]["annotations"]["topo-sched.io/gpu-allocation"]
    assert "llm/demo-decode-0" in allocation
    assert lw.resource_version == "236"  # from the BOOKMARK
    server.assert_all_used()


def test_pod_watch_follows_bind_and_delete(apiserver_replay):
    server = apiserver_replay(
        "0510-pods-list-llm-before-watch.json",
        "0570-watch-pods-llm-added-modified-deleted-bookmark.json",
    )
    lw, log = listwatch(kubernetes.client.CoreV1Api(server.api_client()).list_namespaced_pod, "llm")

    lw.run_once(timeout_seconds=5)

    decode = [t for t, key in log.events if key == "llm/demo-decode-0"]
    assert decode == ["ADDED", "MODIFIED", "MODIFIED", "MODIFIED", "MODIFIED", "DELETED"]
    bind_event = log.objects[2]
    assert bind_event["spec"]["nodeName"] == "gpu-node-1"
    assert lw.keys() == {"llm/demo-prefill-0"}
    assert lw.resource_version == "243"


def test_label_selector_watch_follows_objects_leaving_and_rejoining(apiserver_replay):
    server = apiserver_replay(
        "0580-pods-list-llm-labelselector-before-watch.json",
        "0630-watch-pods-llm-labelselector-transitions.json",
    )
    api = kubernetes.client.CoreV1Api(server.api_client())
    lw, log = listwatch(api.list_namespaced_pod, "llm", label_selector=GROUP_SELECTOR)

    lw.run_once(timeout_seconds=5)

    prefill3 = "llm/demo-prefill-3"
    assert log.events[1:] == [
        ("ADDED", prefill3),
        ("DELETED", prefill3),  # group-name set to "other": left the selector
        ("ADDED", prefill3),  # back to "demo"
        ("MODIFIED", prefill3),
        ("DELETED", prefill3),
    ]
    assert [prefill3 in keys for keys in log.store_after[1:]] == [True, False, True, True, False]
    assert lw.keys() == {"llm/demo-prefill-0"}
    assert server.requests[1].query["labelSelector"] == [GROUP_SELECTOR]


@pytest.mark.parametrize(
    "expired_watch",
    [
        "1150-watch-nodes-compacted-resourceversion-410-error-event.json",
        "1210-watch-nodes-compacted-resourceversion-410-error-event-watchcache-disabled.json",
    ],
)
def test_expired_watch_error_event_relists(apiserver_replay, kube_fixture, caplog, expired_watch):
    fresh = kube_fixture("1200-nodes-list-after-compaction.json")["response"]["body"]
    server = apiserver_replay(
        "0070-nodes-list.json", expired_watch, "1200-nodes-list-after-compaction.json"
    )
    lw, log = listwatch(kubernetes.client.CoreV1Api(server.api_client()).list_node)

    with caplog.at_level(logging.WARNING, logger="topo_sched.kube.watch"):
        lw.run_once(timeout_seconds=5)

    assert sorted(lw.items(), key=lambda o: o["metadata"]["name"]) == fresh["items"]
    assert lw.resource_version == fresh["metadata"]["resourceVersion"] == "284"
    assert log.events[2:] == [("MODIFIED", "gpu-node-1"), ("MODIFIED", "gpu-node-2")]
    assert any("410" in r.getMessage() and "re-listing" in r.getMessage() for r in caplog.records)
    server.assert_all_used()


def test_expired_watch_http_410_relists(apiserver_replay, kube_fixture):
    expired = kube_fixture("1150-watch-nodes-compacted-resourceversion-410-error-event.json")
    as_http_410 = copy.deepcopy(expired)
    as_http_410["response"] = {
        "status": 410,
        "headers": {"Content-Type": "application/json"},
        "body": expired["response"]["body"][0]["object"],
    }
    server = apiserver_replay(
        "0070-nodes-list.json", as_http_410, "1200-nodes-list-after-compaction.json"
    )
    lw, _ = listwatch(kubernetes.client.CoreV1Api(server.api_client()).list_node)

    lw.run_once(timeout_seconds=5)

    assert lw.resource_version == "284"
    assert lw.get("gpu-node-2")["metadata"]["resourceVersion"] == "276"
    server.assert_all_used()


def test_background_listwatch_syncs_and_stops_promptly(apiserver_replay, kube_fixture):
    idle = copy.deepcopy(kube_fixture("0490-watch-nodes-added-modified-deleted-bookmark.json"))
    idle["request"]["path"] = idle["request"]["path"].replace(
        "resourceVersion=232", "resourceVersion=236"
    )
    idle["response"]["body"] = []
    idle["replay"] = {"hold_open_s": 10}
    server = apiserver_replay(
        "0440-nodes-list-before-watch.json",
        "0490-watch-nodes-added-modified-deleted-bookmark.json",
        idle,
    )
    lw, log = listwatch(kubernetes.client.CoreV1Api(server.api_client()).list_node)

    lw.start()
    try:
        assert server.wait_for_requests(3, timeout_s=5), server.requests
    finally:
        started = time.monotonic()
        lw.stop()
    assert time.monotonic() - started < 2
    assert lw.keys() == {"gpu-node-1", "gpu-node-2"}
    assert ("DELETED", "gpu-node-3") in log.events
    assert server.requests[2].query["resourceVersion"] == ["236"]


# -- client construction and the harness itself ----------------------------------------------


def test_explicit_server_and_token(apiserver_replay):
    server = apiserver_replay("0110-nodes-get-gpu-node-1.json")
    api = build_api_client(server=server.url, token="abc123")

    assert get_node(api, "gpu-node-1")["metadata"]["name"] == "gpu-node-1"
    assert server.requests[0].headers["authorization"] == "Bearer abc123"


def test_kubeconfig_path(apiserver_replay, tmp_path):
    server = apiserver_replay("0110-nodes-get-gpu-node-1.json")
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: replay\n"
        f"clusters: [{{name: replay, cluster: {{server: '{server.url}'}}}}]\n"
        "users: [{name: me, user: {token: t0k}}]\n"
        "contexts: [{name: replay, context: {cluster: replay, user: me}}]\n"
    )
    api = build_api_client(kubeconfig=kubeconfig)

    assert get_node(api, "gpu-node-1")["metadata"]["name"] == "gpu-node-1"
    assert server.requests[0].headers["authorization"] == "Bearer t0k"


def test_no_configuration_names_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))

    with pytest.raises(KubeConfigError) as caught:
        build_api_client()

    text = str(caught.value)
    for source in ("explicit server", "kubeconfig path", "in-cluster", str(tmp_path / "missing")):
        assert source in text


def test_broken_explicit_kubeconfig_does_not_fall_back(tmp_path):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")

    with pytest.raises(KubeConfigError, match=str(kubeconfig)):
        build_api_client(kubeconfig=kubeconfig)


def test_replay_answers_unknown_requests_with_404_and_records_them(apiserver_replay):
    server = apiserver_replay("0110-nodes-get-gpu-node-1.json")
    server.allow_unmatched = True

    with pytest.raises(
        errors.NotFound, match="no unused recorded exchange matches GET /api/v1/nodes/gpu-node-9"
    ):
        get_node(server.api_client(), "gpu-node-9")

    assert [r.path for r in server.unmatched] == ["/api/v1/nodes/gpu-node-9"]
    assert [e.name for e in server.unused] == ["0110-nodes-get-gpu-node-1.json"]
