"""The kustomize manifests under manifests/: parse, validate offline against the Kubernetes 1.26
schemas (kubernetes-validate ships them), and hold the project's promises: least-privilege RBAC,
a scheduler configuration that points at the Service we declare, the agent's read-only
PodResources mount, RBG examples scheduled by topo-scheduler, an autoscaler whose configuration
parses and targets an example RBG, kustomizations that list every file.
"""

from __future__ import annotations

import functools
import itertools
import posixpath
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = REPO_ROOT / "manifests"
K8S_VERSION = "1.26"

NAMESPACE = "topo-sched"
SCHEDULER_NAME = "topo-scheduler"
RBG_API_VERSION = "workloads.x-k8s.io/v1alpha2"
RBG_COMMIT = "993491fba9bfdf377d3cd18c8833da20ce0ec87b"
GPU = "nvidia.com/gpu"
POD_RESOURCES_DIR = "/var/lib/kubelet/pod-resources"
#: Built-in roles the manifests may reference without declaring them.
BUILTIN_CLUSTER_ROLES = {"system:kube-scheduler", "system:volume-scheduler"}
BUILTIN_ROLES = {("kube-system", "extension-apiserver-authentication-reader")}
#: Sum of the default v1.26 score-plugin weights (TaintToleration 3, NodeAffinity 2,
#: PodTopologySpread 2, InterPodAffinity 2, NodeResourcesFit 1, BalancedAllocation 1,
#: ImageLocality 1) x MaxNodeScore 100.
DEFAULT_PLUGIN_SCORE_MAX = 12 * 100


# --- loading ---------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _load_all(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]


def _yaml_files() -> list[Path]:
    return sorted(p for ext in ("*.yaml", "*.yml") for p in MANIFESTS.rglob(ext))


def _rel(p: Path) -> str:
    return p.relative_to(MANIFESTS).as_posix()


@functools.cache
def _kustomization_files() -> tuple[Path, ...]:
    return tuple(p for p in _yaml_files() if p.name == "kustomization.yaml")


@functools.cache
def _resource_files() -> tuple[Path, ...]:
    return tuple(p for p in _yaml_files() if p.name != "kustomization.yaml")


@functools.cache
def _docs() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(relative path, object) for every Kubernetes object in a resource file."""
    out = []
    for p in _resource_files():
        for d in _load_all(p.read_text()):
            out.append((_rel(p), d))
    return tuple(out)


def _objects(kind: str, *, api_version: str | None = None) -> list[dict[str, Any]]:
    return [
        d
        for _, d in _docs()
        if d["kind"] == kind and (api_version is None or d["apiVersion"] == api_version)
    ]


def _one(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in _objects(kind)
        if d["metadata"]["name"] == name and d["metadata"].get("namespace") == namespace
    ]
    assert len(found) == 1, f"expected exactly one {kind} {namespace}/{name}, found {len(found)}"
    return found[0]


def _builtin_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in _docs() if d["apiVersion"] != RBG_API_VERSION]


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner description, pod template spec) of every built-in workload."""
    for d in _objects("Deployment") + _objects("DaemonSet"):
        yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


# --- files and kustomizations ------------------------------------------------------------------


def test_manifests_exist() -> None:
    names = {_rel(p) for p in _yaml_files()}
    for required in (
        "kustomization.yaml",
        "agent/kustomization.yaml",
        "extender/kustomization.yaml",
        "autoscaler/kustomization.yaml",
        "examples/kustomization.yaml",
    ):
        assert required in names
    assert (MANIFESTS / "README.md").is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_every_yaml_document_parses(path: Path) -> None:
    docs = _load_all(path.read_text())
    assert docs, f"{_rel(path)} has no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{_rel(path)}: a document is not a mapping"
        assert d.get("apiVersion") and d.get("kind"), f"{_rel(path)}: apiVersion/kind missing"
        if path.name != "kustomization.yaml":
            assert d.get("metadata", {}).get("name"), f"{_rel(path)}: metadata.name missing"


def _kustomization(path: Path) -> dict[str, Any]:
    (k,) = _load_all(path.read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    return k


def test_kustomizations_list_only_existing_files_and_every_file_is_listed() -> None:
    listed: set[Path] = set()
    for kpath in _kustomization_files():
        k = _kustomization(kpath)
        # No transformers that would rewrite objects behind the files' backs: the scheduler's
        # RoleBinding must stay in kube-system, selectors must stay as written.
        for forbidden in ("namespace", "commonLabels", "namePrefix", "nameSuffix"):
            assert forbidden not in k, f"{_rel(kpath)} uses {forbidden}"
        resources = k.get("resources", [])
        assert resources, f"{_rel(kpath)} lists no resources"
        assert len(resources) == len(set(resources)), f"{_rel(kpath)} lists a file twice"
        for entry in resources:
            target = (kpath.parent / entry).resolve()
            assert MANIFESTS in target.parents, f"{_rel(kpath)}: {entry} is outside manifests/"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), (
                    f"{_rel(kpath)}: directory {entry} has no kustomization.yaml"
                )
            else:
                assert target.is_file(), f"{_rel(kpath)}: {entry} does not exist"
                listed.add(target)
    unlisted = sorted(_rel(p) for p in _resource_files() if p.resolve() not in listed)
    assert not unlisted, f"YAML files no kustomization lists: {unlisted}"


def test_top_kustomization_deploys_agent_extender_and_autoscaler_not_examples() -> None:
    k = _kustomization(MANIFESTS / "kustomization.yaml")
    assert sorted(k["resources"]) == ["agent", "autoscaler", "extender"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (built-in kustomize) absent")
@pytest.mark.parametrize("target", ["", "examples", "autoscaler"])
def test_kustomize_builds(target: str) -> None:
    """`kubectl kustomize` (offline) accepts the tree and emits every object exactly once."""
    root = MANIFESTS / target
    out = subprocess.run(
        ["kubectl", "kustomize", str(root)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    built = _load_all(out.stdout)
    if target:
        expected = [d for f, d in _docs() if f.startswith(f"{target}/")]
    else:  # the top level deploys everything but the examples
        expected = [d for f, d in _docs() if not f.startswith("examples/")]

    def key(d: dict[str, Any]) -> tuple[str, str, str, str]:
        m = d["metadata"]
        return (d["apiVersion"], d["kind"], m.get("namespace", ""), m["name"])

    assert sorted(map(key, built)) == sorted(map(key, expected))


# --- schema validation ------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test: validation must be offline."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _validate(doc: dict[str, Any]) -> None:
    try:
        used = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}")
    assert used == K8S_VERSION, f"validated against {used}, not {K8S_VERSION}"


@pytest.mark.parametrize(
    "doc",
    [d for _, d in _builtin_docs()],
    ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in _builtin_docs()],
)
def test_builtin_kinds_validate_offline_against_k8s_1_26(
    doc: dict[str, Any], no_network: None
) -> None:
    _validate(doc)


def test_only_known_api_groups_are_used() -> None:
    for f, d in _docs():
        if f.startswith("examples/"):
            assert d["apiVersion"] == RBG_API_VERSION, f
        else:
            assert d["apiVersion"] != RBG_API_VERSION, f


def test_images_are_pinned() -> None:
    images = []
    for _, spec in _pod_specs():
        images += [c["image"] for c in spec.get("containers", []) + spec.get("initContainers", [])]
    for tpl in _rbg_templates():
        images += [c["image"] for c in tpl["template"]["spec"]["containers"]]
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), f"unpinned image {image}"


def test_namespaced_objects_live_in_topo_sched() -> None:
    _one("Namespace", NAMESPACE)
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for f, d in _builtin_docs():
        ns = d["metadata"].get("namespace")
        if d["kind"] in cluster_scoped:
            assert ns is None, f"{f}: {d['kind']} has a namespace"
        elif (d["kind"], ns) == ("RoleBinding", "kube-system"):
            assert d["roleRef"]["name"] == "extension-apiserver-authentication-reader", f
        else:
            assert ns == NAMESPACE, f"{f}: {d['kind']}/{d['metadata']['name']} in {ns!r}"


# --- RBAC --------------------------------------------------------------------------------------


def _grants(role: dict[str, Any]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """(apiGroup, resource, verb, resourceNames) for every combination a role's rules allow."""
    out = set()
    for rule in role["rules"]:
        assert not rule.get("nonResourceURLs"), f"{role['metadata']['name']}: nonResourceURLs"
        names = tuple(sorted(rule.get("resourceNames", [])))
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    out.add((g, r, v, names))
    return out


def test_no_wildcards_in_any_role() -> None:
    for role in _objects("ClusterRole") + _objects("Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']}: * in {field}"


def test_agent_cluster_role_is_exactly_get_and_patch_nodes() -> None:
    role = _one("ClusterRole", "topo-sched-agent")
    assert _grants(role) == {("", "nodes", "get", ()), ("", "nodes", "patch", ())}


def test_extender_cluster_role_is_read_nodes_pods_and_create_bindings() -> None:
    role = _one("ClusterRole", "topo-sched-extender")
    expected = {("", r, v, ()) for r in ("nodes", "pods") for v in ("get", "list", "watch")}
    expected.add(("", "pods/binding", "create", ()))
    assert _grants(role) == expected


def _bound_roles(sa_name: str) -> set[tuple[str, str | None, str]]:
    """(roleRef kind, binding namespace, roleRef name) bound to ServiceAccount topo-sched/sa."""
    out = set()
    for b in _objects("ClusterRoleBinding") + _objects("RoleBinding"):
        for s in b["subjects"]:
            if s["kind"] == "ServiceAccount" and (s["name"], s["namespace"]) == (
                sa_name,
                NAMESPACE,
            ):
                out.add(
                    (b["roleRef"]["kind"], b["metadata"].get("namespace"), b["roleRef"]["name"])
                )
    return out


def test_bindings_reference_declared_or_builtin_roles_and_accounts() -> None:
    sas = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in _objects("ServiceAccount")}
    croles = {d["metadata"]["name"] for d in _objects("ClusterRole")}
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in _objects("Role")}
    for b in _objects("ClusterRoleBinding") + _objects("RoleBinding"):
        ref = b["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        if ref["kind"] == "ClusterRole":
            assert ref["name"] in croles | BUILTIN_CLUSTER_ROLES, ref
        else:
            assert b["kind"] == "RoleBinding"
            key = (b["metadata"]["namespace"], ref["name"])
            assert key in roles | BUILTIN_ROLES, ref
        for s in b["subjects"]:
            assert s["kind"] == "ServiceAccount"
            assert (s["namespace"], s["name"]) in sas, s
    for owner, spec in _pod_specs():
        assert (NAMESPACE, spec["serviceAccountName"]) in sas, owner


def test_each_component_is_bound_to_exactly_its_roles() -> None:
    assert _bound_roles("topo-sched-agent") == {("ClusterRole", None, "topo-sched-agent")}
    assert _bound_roles("topo-sched-extender") == {("ClusterRole", None, "topo-sched-extender")}
    assert _bound_roles(SCHEDULER_NAME) == {
        ("ClusterRole", None, "system:kube-scheduler"),
        ("ClusterRole", None, "system:volume-scheduler"),
        ("Role", "kube-system", "extension-apiserver-authentication-reader"),
        ("Role", NAMESPACE, "topo-scheduler-leader-election"),
    }


def test_scheduler_lease_role_covers_only_its_own_lease() -> None:
    le = _scheduler_config()["leaderElection"]
    role = _one("Role", "topo-scheduler-leader-election", le["resourceNamespace"])
    assert _grants(role) == {
        ("coordination.k8s.io", "leases", "create", ()),
        ("coordination.k8s.io", "leases", "get", (le["resourceName"],)),
        ("coordination.k8s.io", "leases", "update", (le["resourceName"],)),
    }


# --- agent DaemonSet ---------------------------------------------------------------------------


def _agent() -> dict[str, Any]:
    return _one("DaemonSet", "topo-sched-agent", NAMESPACE)


def test_agent_mounts_pod_resources_hostpath_read_only() -> None:
    spec = _agent()["spec"]["template"]["spec"]
    (vol,) = [v for v in spec["volumes"] if "hostPath" in v]
    assert vol["hostPath"]["path"] == POD_RESOURCES_DIR
    (c,) = spec["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert mount["mountPath"] == POD_RESOURCES_DIR
    assert mount["readOnly"] is True


def test_agent_runs_on_gpu_nodes_without_taking_a_gpu() -> None:
    spec = _agent()["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(
        t["key"] == GPU and t["effect"] == "NoSchedule" and t["operator"] == "Exists"
        for t in spec["tolerations"]
    )
    (c,) = spec["containers"]
    assert GPU not in c["resources"].get("requests", {})
    assert GPU not in c["resources"].get("limits", {})
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    assert set(c["resources"]["limits"]) >= {"cpu", "memory"}
    env = {e["name"]: e for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["args"] == ["agent", "--node-name", "$(NODE_NAME)"]


def test_agent_container_is_locked_down() -> None:
    (c,) = _agent()["spec"]["template"]["spec"]["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert not sc.get("privileged")
    # Root is required for the root-owned socket; the manifest must not pretend otherwise.
    assert sc.get("runAsNonRoot") is not True


# --- extender and scheduler --------------------------------------------------------------------


@functools.cache
def _scheduler_config() -> dict[str, Any]:
    cm = _one("ConfigMap", "topo-scheduler-config", NAMESPACE)
    (cfg,) = _load_all(cm["data"]["config.yaml"])
    return cfg


def _container_mounting_config(deployment: dict[str, Any], path: str) -> dict[str, Any]:
    """Assert `path` in a Deployment's container is a key of a ConfigMap declared here."""
    spec = deployment["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    directory, key = posixpath.split(path)
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == directory]
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    cm = _one("ConfigMap", vol["configMap"]["name"], NAMESPACE)
    assert key in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {key}"
    return c


def _selected_by(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


#: Fields of kubescheduler.config.k8s.io/v1 as of v1.26. kube-scheduler decodes its config
#: strictly: an unknown or misspelt field stops it at start.
KSC_FIELDS = {
    "apiVersion",
    "kind",
    "parallelism",
    "leaderElection",
    "clientConnection",
    "healthzBindAddress",
    "metricsBindAddress",
    "enableProfiling",
    "enableContentionProfiling",
    "percentageOfNodesToScore",
    "podInitialBackoffSeconds",
    "podMaxBackoffSeconds",
    "profiles",
    "extenders",
}
KSC_LEADER_ELECTION_FIELDS = {
    "leaderElect",
    "leaseDuration",
    "renewDeadline",
    "retryPeriod",
    "resourceLock",
    "resourceName",
    "resourceNamespace",
}
#: v1.26 profiles have no percentageOfNodesToScore (added in 1.27).
KSC_PROFILE_FIELDS = {"schedulerName", "plugins", "pluginConfig"}
KSC_EXTENDER_FIELDS = {
    "urlPrefix",
    "filterVerb",
    "preemptVerb",
    "prioritizeVerb",
    "weight",
    "bindVerb",
    "enableHTTPS",
    "tlsConfig",
    "httpTimeout",
    "nodeCacheCapable",
    "managedResources",
    "ignorable",
}


def test_scheduler_configuration_uses_only_v1_26_fields() -> None:
    cfg = _scheduler_config()
    assert set(cfg) <= KSC_FIELDS, set(cfg) - KSC_FIELDS
    assert set(cfg["leaderElection"]) <= KSC_LEADER_ELECTION_FIELDS
    for profile in cfg["profiles"]:
        assert set(profile) <= KSC_PROFILE_FIELDS, set(profile) - KSC_PROFILE_FIELDS
    for ext in cfg["extenders"]:
        assert set(ext) <= KSC_EXTENDER_FIELDS, set(ext) - KSC_EXTENDER_FIELDS
        for r in ext["managedResources"]:
            assert set(r) <= {"name", "ignoredByScheduler"}


def test_scheduler_configuration() -> None:
    cfg = _scheduler_config()
    assert cfg["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert cfg["kind"] == "KubeSchedulerConfiguration"
    assert [p["schedulerName"] for p in cfg["profiles"]] == [SCHEDULER_NAME]
    assert cfg["percentageOfNodesToScore"] == 100
    le = cfg["leaderElection"]
    assert le["leaderElect"] is True
    assert (le["resourceName"], le["resourceNamespace"]) == (SCHEDULER_NAME, NAMESPACE)
    assert le.get("resourceLock", "leases") == "leases"
    assert "clientConnection" not in cfg or not cfg["clientConnection"].get("kubeconfig")


def test_scheduler_extender_entry() -> None:
    (ext,) = _scheduler_config()["extenders"]
    assert (ext["filterVerb"], ext["prioritizeVerb"], ext["bindVerb"]) == (
        "filter",
        "prioritize",
        "bind",
    )
    assert ext["nodeCacheCapable"] is True
    assert {"name": GPU, "ignoredByScheduler": False} in ext["managedResources"]
    assert ext["httpTimeout"] == "3s"
    assert ext.get("enableHTTPS", False) is False
    # An explicit decision, not the default by omission.
    assert isinstance(ext.get("ignorable"), bool)
    weight = ext["weight"]
    assert isinstance(weight, int) and weight >= 10
    # The extender's full range (0..10 x weight x 10) outweighs the default plugins' total.
    assert 10 * weight * 10 > DEFAULT_PLUGIN_SCORE_MAX


def test_extender_url_resolves_to_the_declared_service_and_container_port() -> None:
    (ext,) = _scheduler_config()["extenders"]
    url = urlsplit(ext["urlPrefix"])
    assert url.scheme == "http"
    assert url.path == "/scheduler"
    host_parts = url.hostname.split(".")
    assert host_parts[2:] in (["svc"], ["svc", "cluster", "local"]), url.hostname
    svc = _one("Service", host_parts[0], host_parts[1])
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == url.port]
    assert url.port == 8888
    selected = [
        d
        for d in _objects("Deployment")
        if d["metadata"]["namespace"] == svc["metadata"]["namespace"]
        and _selected_by(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
    ]
    assert [d["metadata"]["name"] for d in selected] == ["topo-sched-extender"]
    (c,) = selected[0]["spec"]["template"]["spec"]["containers"]
    target = port.get("targetPort", port["port"])
    ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
    assert (ports[target] if isinstance(target, str) else target) == 8888
    assert "--port" in c["args"] and c["args"][c["args"].index("--port") + 1] == "8888"


def test_extender_deployment() -> None:
    dep = _one("Deployment", "topo-sched-extender", NAMESPACE)
    spec = dep["spec"]["template"]["spec"]
    assert spec.get("schedulerName", "default-scheduler") == "default-scheduler"
    c = _container_mounting_config(dep, "/etc/topo-sched/placement.yaml")
    assert c["image"] == "ghcr.io/topo-sched/topo-sched:0.1.0"
    assert c["args"] == [
        "extender",
        "--config",
        "/etc/topo-sched/placement.yaml",
        "--port",
        "8888",
    ]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert GPU not in c["resources"].get("requests", {})
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_scheduler_deployment() -> None:
    dep = _one("Deployment", SCHEDULER_NAME, NAMESPACE)
    spec = dep["spec"]["template"]["spec"]
    # The second scheduler itself is placed by the default scheduler.
    assert spec.get("schedulerName", "default-scheduler") == "default-scheduler"
    assert spec["serviceAccountName"] == SCHEDULER_NAME
    c = _container_mounting_config(dep, "/etc/kubernetes/topo-scheduler/config.yaml")
    assert c["image"] == "registry.k8s.io/kube-scheduler:v1.26.1"
    assert "--config=/etc/kubernetes/topo-scheduler/config.yaml" in c["command"] + c.get("args", [])


def test_placement_configmap_holds_the_documented_defaults() -> None:
    cm = _one("ConfigMap", "topo-sched-placement", NAMESPACE)
    (cfg,) = _load_all(cm["data"]["placement.yaml"])
    assert cfg == {
        "weights": {
            "intra_node_fit": 3,
            "pd_proximity": 2,
            "instance_packing": 2,
            "best_fit": 1,
            "stability": 1,
            "spread": 0,
        },
        "intra_node": "preferred",
        "instance_packing": {"mode": "preferred", "level": "rack"},
        "spread": {"enabled": False, "level": "rack"},
        "levels": [],
        "kv_bytes_per_token": None,
    }
    config = pytest.importorskip("topo_sched.placement.config")
    parsed = config.parse_placement_config(cfg, source="topo-sched-placement")
    # The file spells out the defaults: parsing it gives what no file gives.
    assert parsed == config.PlacementConfig()


# --- RoleBasedGroup examples (CRD: structural checks only) -------------------------------------


def _rbgs() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in _docs() if d["apiVersion"] == RBG_API_VERSION]


def _role_template(role: dict[str, Any]) -> dict[str, Any]:
    patterns = [k for k in ("standalonePattern", "leaderWorkerPattern") if k in role]
    assert len(patterns) == 1, f"role {role['name']}: exactly one pattern expected"
    return role[patterns[0]]["template"]


def _rbg_templates() -> list[dict[str, Any]]:
    """Every role's pod template, wrapped as a v1 PodTemplate so the core schema applies."""
    out = []
    for _, rbg in _rbgs():
        for role in rbg["spec"]["roles"]:
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{rbg['metadata']['name']}-{role['name']}"},
                    "template": _role_template(role),
                }
            )
    return out


def test_examples_are_role_based_groups() -> None:
    rbgs = _rbgs()
    assert {f for f, _ in rbgs} == {
        "examples/sglang-pd-2p1d.yaml",
        "examples/sglang-pd-leader-worker.yaml",
    }
    for f, rbg in rbgs:
        assert rbg["kind"] == "RoleBasedGroup", f
        roles = rbg["spec"]["roles"]
        names = [r["name"] for r in roles]
        assert all(isinstance(n, str) and n for n in names), f
        assert len(names) == len(set(names)), f"{f}: duplicate role names"
        assert {"router", "prefill", "decode"} <= set(names), f
        for role in roles:
            r = role["replicas"]
            assert type(r) is int and r >= 1, f"{f}: {role['name']} replicas {r!r}"
            if "leaderWorkerPattern" in role:
                size = role["leaderWorkerPattern"]["size"]
                assert type(size) is int and size >= 2, f"{f}: {role['name']} size {size!r}"
            tpl = _role_template(role)
            assert tpl["spec"]["schedulerName"] == SCHEDULER_NAME, f"{f}: {role['name']}"


@pytest.mark.parametrize(
    "tpl", _rbg_templates(), ids=lambda t: t["metadata"]["name"] if isinstance(t, dict) else ""
)
def test_rbg_pod_templates_validate_as_core_pod_templates(
    tpl: dict[str, Any], no_network: None
) -> None:
    _validate(tpl)


def _gpus(container: dict[str, Any]) -> int:
    res = container.get("resources", {})
    req = res.get("requests", {}).get(GPU)
    lim = res.get("limits", {}).get(GPU)
    assert req == lim, f"{container['name']}: GPU request {req!r} != limit {lim!r}"
    return int(req or 0)


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_rbg_gpu_roles_request_what_their_tensor_parallelism_needs() -> None:
    seen = {}
    for _, rbg in _rbgs():
        for role in rbg["spec"]["roles"]:
            (c,) = _role_template(role)["spec"]["containers"]
            gpus = _gpus(c)
            tp = _flag(c["command"], "--tp-size")
            if role["name"] == "router":
                assert gpus == 0 and tp is None
                continue
            pods = role["leaderWorkerPattern"]["size"] if "leaderWorkerPattern" in role else 1
            assert int(tp) == gpus * pods, f"{rbg['metadata']['name']}/{role['name']}"
            seen[(rbg["metadata"]["name"], role["name"])] = (role["replicas"], gpus, pods)
    # 2P1D, prefill TP2 on 2 GPUs per pod.
    assert seen[("sglang-pd-inference", "prefill")][:2] == (2, 2)
    assert seen[("sglang-pd-inference", "decode")][0] == 1


def test_rbg_annotations_are_understood_by_topo_sched() -> None:
    config = pytest.importorskip("topo_sched.placement.config")
    defaults = config.PlacementConfig()
    by_rbg = {}
    for _, rbg in _rbgs():
        for role in rbg["spec"]["roles"]:
            ann = _role_template(role)["metadata"].get("annotations", {})
            if role["name"] == "router":
                assert not any(k.startswith("topo-sched.io/") for k in ann)
                continue
            policy, warnings = config.resolve_pod_policy(defaults, ann)
            assert warnings == [], f"{rbg['metadata']['name']}/{role['name']}: {warnings}"
            by_rbg[(rbg["metadata"]["name"], role["name"])] = policy
    for role in ("prefill", "decode"):
        p = by_rbg[("sglang-pd-inference", role)]
        assert (p.intra_node.value, p.kv_bytes_per_token) == ("required", 131072)
        q = by_rbg[("pd-disagg-lws", role)]
        assert (q.pack_mode.value, q.pack_level) == ("required", "rack")


def test_derived_examples_keep_the_rbg_attribution() -> None:
    for name in ("sglang-pd-2p1d.yaml", "sglang-pd-leader-worker.yaml"):
        head = (MANIFESTS / "examples" / name).read_text().split("\n---", 1)[0]
        assert "sgl-project/rbg" in head and RBG_COMMIT in head, name
        assert "Apache License, Version 2.0" in head and "Modified" in head, name


# --- autoscaler --------------------------------------------------------------------------------

AUTOSCALER = "topo-sched-autoscaler"
AUTOSCALER_CONFIG = "/etc/topo-sched/autoscaler.yaml"
AUTOSCALER_METRICS_PORT = 9102
RBG_GROUP = "workloads.x-k8s.io"


def _autoscaler() -> dict[str, Any]:
    return _one("Deployment", AUTOSCALER, NAMESPACE)


@functools.cache
def _autoscaler_raw_config() -> dict[str, Any]:
    cm = _one("ConfigMap", AUTOSCALER, NAMESPACE)
    (cfg,) = _load_all(cm["data"]["autoscaler.yaml"])
    return cfg


def _autoscaler_config() -> Any:
    config = pytest.importorskip("topo_sched.scaling.config")
    return config.parse_autoscaler_config(_autoscaler_raw_config(), source=AUTOSCALER)


def test_autoscaler_cluster_role_is_exactly_rbgs_adapters_scale_and_events() -> None:
    role = _one("ClusterRole", AUTOSCALER)
    expected = {(RBG_GROUP, "rolebasedgroups", v, ()) for v in ("get", "list", "watch", "patch")}
    expected.add((RBG_GROUP, "rolebasedgroupscalingadapters", "get", ()))
    expected |= {
        (RBG_GROUP, "rolebasedgroupscalingadapters/scale", v, ()) for v in ("get", "patch")
    }
    expected.add(("", "events", "create", ()))
    # Only used with --deletion-cost: list the shrinking role's pods, annotate them.
    expected |= {("", "pods", v, ()) for v in ("list", "patch")}
    assert _grants(role) == expected


def test_autoscaler_lease_role_covers_only_its_own_lease() -> None:
    le = _autoscaler_raw_config()["leaderElection"]
    assert le["enabled"] is True
    assert (le["namespace"], le["leaseName"]) == (NAMESPACE, AUTOSCALER)
    role = _one("Role", f"{AUTOSCALER}-leader-election", le["namespace"])
    assert _grants(role) == {
        ("coordination.k8s.io", "leases", "create", ()),
        ("coordination.k8s.io", "leases", "get", (le["leaseName"],)),
        ("coordination.k8s.io", "leases", "update", (le["leaseName"],)),
    }


def test_autoscaler_is_bound_to_exactly_its_roles() -> None:
    assert _bound_roles(AUTOSCALER) == {
        ("ClusterRole", None, AUTOSCALER),
        ("Role", NAMESPACE, f"{AUTOSCALER}-leader-election"),
    }
    assert _autoscaler()["spec"]["template"]["spec"]["serviceAccountName"] == AUTOSCALER


def test_autoscaler_deployment() -> None:
    dep = _autoscaler()
    assert dep["spec"]["replicas"] == 2  # one leader, one standby
    spec = dep["spec"]["template"]["spec"]
    assert spec.get("schedulerName", "default-scheduler") == "default-scheduler"
    c = _container_mounting_config(dep, AUTOSCALER_CONFIG)
    assert c["image"] == "ghcr.io/topo-sched/topo-sched:0.1.0"
    assert c["args"] == [
        "autoscaler",
        "--config",
        AUTOSCALER_CONFIG,
        "--metrics-port",
        str(AUTOSCALER_METRICS_PORT),
        "--identity",
        "$(POD_NAME)",
    ]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": AUTOSCALER_METRICS_PORT}
    probe = c["livenessProbe"]
    handler = probe.get("httpGet") or probe["tcpSocket"]
    assert handler["port"] in ("metrics", AUTOSCALER_METRICS_PORT)
    if "httpGet" in probe:
        assert handler["path"] == "/metrics"
    requests = c["resources"]["requests"]
    assert set(requests) == {"cpu", "memory"}
    assert GPU not in requests and GPU not in c["resources"].get("limits", {})


def test_autoscaler_meets_the_restricted_pod_security_level() -> None:
    spec = _autoscaler()["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    psc, sc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc.get("runAsUser", 1) != 0
    assert (sc.get("seccompProfile") or psc["seccompProfile"])["type"] == "RuntimeDefault"
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert not sc.get("privileged")
    assert not any("hostPath" in v for v in spec.get("volumes", []))
    assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"))


def test_autoscaler_metrics_service_selects_its_pods_port() -> None:
    svc = _one("Service", AUTOSCALER, NAMESPACE)
    selected = [
        d
        for d in _objects("Deployment")
        if d["metadata"]["namespace"] == NAMESPACE
        and _selected_by(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
    ]
    assert [d["metadata"]["name"] for d in selected] == [AUTOSCALER]
    (port,) = svc["spec"]["ports"]
    assert port["port"] == AUTOSCALER_METRICS_PORT
    (c,) = selected[0]["spec"]["template"]["spec"]["containers"]
    target = port.get("targetPort", port["port"])
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert (named[target] if isinstance(target, str) else target) == AUTOSCALER_METRICS_PORT


def test_autoscaler_config_parses_and_holds_the_documented_values() -> None:
    cfg = _autoscaler_config()
    config = pytest.importorskip("topo_sched.scaling.config")
    (t,) = cfg.targets
    assert dict(t.roles) == {"prefill": 2, "decode": 1}
    assert (t.prefill_role, t.decode_role) == ("prefill", "decode")
    assert t.mode is config.Mode.STRICT and t.band is None
    assert (t.units.min, t.units.max) == (1, 8)
    assert (t.slo.percentile, t.slo.ttft_seconds, t.slo.itl_seconds) == (0.9, 5, 0.04)
    assert t.metrics.preset is config.Preset.SGLANG
    assert t.metrics.role_label == "role"
    assert t.metrics.queries == {}
    assert t.capacity.prefill_tokens_per_second and t.capacity.decode_sequences
    # Defaults are spelled out in the file, and they are the defaults.
    raw = _autoscaler_raw_config()
    (raw_target,) = raw["targets"]
    assert {"scaleUp", "scaleDown"} <= set(raw_target["behavior"])
    assert t.behavior == config.Behavior()
    assert set(raw["leaderElection"]) == {
        "enabled",
        "leaseName",
        "namespace",
        "leaseDurationSeconds",
        "renewDeadlineSeconds",
    }
    assert cfg.leader_election == config.LeaderElection()
    le = cfg.leader_election
    assert 0 < le.renew_deadline_seconds < le.lease_duration_seconds


def _example_rbg(namespace: str, name: str) -> dict[str, Any]:
    # The examples name no namespace: `kubectl apply -k` puts them in the context's, "default".
    found = [
        rbg
        for _, rbg in _rbgs()
        if (rbg["metadata"].get("namespace", "default"), rbg["metadata"]["name"])
        == (namespace, name)
    ]
    assert len(found) == 1, f"no example RBG {namespace}/{name} in manifests/examples"
    return found[0]


def test_autoscaler_target_is_the_2p1d_example_rbg() -> None:
    cfg = _autoscaler_config()
    (t,) = cfg.targets
    rbg = _example_rbg(t.namespace, t.name)
    assert t.name == "sglang-pd-inference"
    replicas = {r["name"]: r["replicas"] for r in rbg["spec"]["roles"]}
    assert set(t.roles) <= set(replicas), f"roles {set(t.roles) - set(replicas)} not in the RBG"
    # The example as written is exactly one ratio unit (2P1D), inside units.min..units.max.
    units = {replicas[r] / w for r, w in t.roles.items()}
    assert len(units) == 1, f"example replicas {replicas} are not in ratio {dict(t.roles)}"
    (u,) = units
    assert t.units.min <= u <= t.units.max


_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


def _matchers(selector: str) -> list[tuple[str, str, str]]:
    """PromQL label matchers ``a="x",b=~"y"`` -> [(label, op, value)]; fails on anything else."""
    out, pos = [], 0
    text = selector.strip().strip("{}")
    while pos < len(text):
        m = _MATCHER.match(text, pos)
        assert m, f"not a label matcher at {text[pos:]!r}"
        out.append((m.group(1), m.group(2), m.group(3)))
        pos = m.end()
        if pos < len(text):
            assert text[pos] == ",", f"expected ',' at {text[pos:]!r}"
            pos += 1
    return out


def _series_matches(matchers: list[tuple[str, str, str]], labels: dict[str, str]) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        ok = {
            "=": have == value,
            "!=": have != value,
            "=~": re.fullmatch(value, have) is not None,
            "!~": re.fullmatch(value, have) is None,
        }[op]
        if not ok:
            return False
    return True


def _engine_pods(rbg: dict[str, Any]) -> dict[str, str]:
    """Pod name -> role of the example's engines, from the router's own prefill/decode URLs
    (``http://<pod>.s-<rbg>-<role>:8000``: the pods' hostnames, which are their names)."""
    (router,) = [r for r in rbg["spec"]["roles"] if r["name"] == "router"]
    (c,) = _role_template(router)["spec"]["containers"]
    args = c["command"] + c.get("args", [])
    pods = {}
    for flag, value in itertools.pairwise(args):
        if flag in ("--prefill", "--decode"):
            pods[urlsplit(value).hostname.split(".")[0]] = flag.removeprefix("--")
    return pods


def test_autoscaler_selector_matches_the_example_pods_as_prometheus_labels_them() -> None:
    cfg = _autoscaler_config()
    (t,) = cfg.targets
    rbg = _example_rbg(t.namespace, t.name)
    matchers = _matchers(t.metrics.selector)
    # The role matcher is the autoscaler's to add per query; the selector picks the RBG.
    assert t.metrics.role_label not in {label for label, _, _ in matchers}
    pods = _engine_pods(rbg)
    assert sorted(pods.values()) == ["decode", "prefill", "prefill"]

    def series(pod: str, role: str, namespace: str = t.namespace) -> dict[str, str]:
        # What a PodMonitor gives a series (plus role relabelled from the RBG role label).
        return {"namespace": namespace, "pod": pod, t.metrics.role_label: role}

    for pod, role in pods.items():
        assert _series_matches(matchers, series(pod, role)), pod
    # Not another namespace's copy, not the router, not another RBG.
    any_pod, any_role = next(iter(pods.items()))
    assert not _series_matches(matchers, series(any_pod, any_role, "elsewhere"))
    assert not _series_matches(matchers, series(f"{t.name}-router-0", "router"))
    for _, other in _rbgs():
        if other["metadata"]["name"] != t.name:
            for role in other["spec"]["roles"]:
                pod = f"{other['metadata']['name']}-{role['name']}-0"
                assert not _series_matches(matchers, series(pod, role["name"])), pod
