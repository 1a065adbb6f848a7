"""The placement core on small hand-built clusters: what a user of the extender would notice."""

from __future__ import annotations

import json

import pytest

from topo_sched import labels as L
from topo_sched.placement.config import (
    ConfigError,
    Mode,
    PlacementConfig,
    load_placement_config,
    resolve_pod_policy,
)
from topo_sched.placement.engine import NEUTRAL_SCORE, PlacementEngine
from topo_sched.placement.pods import PodSpecError, pod_info
from topo_sched.placement.snapshot import ClusterSnapshot
from topo_sched.topology.cluster import ClusterTopology, LevelKind
from topo_sched.topology.locality import Locality, LocalityIndex, mask_of
from topo_sched.topology.model import Gpu, GpuLink, Nic, NicLink, build_node_topology


def hgx(n: int = 8):
    """One NVLink island (NVSwitch), two NUMA nodes, a PIX NIC per GPU."""
    gpus = [Gpu(index=i, numa_node=i * 2 // n) for i in range(n)]
    links = [GpuLink(a=i, b=j, link="NV", nvlinks=18) for i in range(n) for j in range(i + 1, n)]
    nics = [Nic(name=f"mlx5_{i}") for i in range(n)]
    nic_links = [NicLink(gpu=i, nic=f"mlx5_{i}", link="PIX") for i in range(n)]
    return build_node_topology(
        source="test", gpus=gpus, gpu_links=links, nics=nics, nic_links=nic_links, nvswitch=True
    )


def pcie_box(n: int = 8):
    """No NVLink; two NUMA nodes; GPUs 0-1 and 4-5 under a switch with a NIC each."""
    gpus = [Gpu(index=i, numa_node=i * 2 // n) for i in range(n)]
    links = []
    for i in range(n):
        for j in range(i + 1, n):
            same_numa = i * 2 // n == j * 2 // n
            links.append(GpuLink(a=i, b=j, link="NODE" if same_numa else "SYS"))
    nics = [Nic(name="mlx5_0"), Nic(name="mlx5_1")]
    nic_links = [NicLink(gpu=i, nic="mlx5_0", link="PIX") for i in (0, 1)] + [
        NicLink(gpu=i, nic="mlx5_1", link="PIX") for i in (4, 5)
    ]
    return build_node_topology(
        source="test", gpus=gpus, gpu_links=links, nics=nics, nic_links=nic_links
    )


def node(name, rack, topo=None, gpus=8, allocation=None, zone="z1"):
    ann = {}
    if topo is not None:
        ann[L.ANNOTATION_TOPOLOGY] = topo.to_json()
    if allocation is not None:
        ann[L.ANNOTATION_GPU_ALLOCATION] = json.dumps(allocation)
    return {
        "metadata": {
            "name": name,
            "labels": {L.LABEL_RACK: rack, L.LABEL_ZONE: zone, L.LABEL_HOSTNAME: name},
            "annotations": ann,
        },
        "status": {"allocatable": {L.RESOURCE_NVIDIA_GPU: str(gpus)}},
    }


def pod(name, role=None, gpus=1, node_name=None, group="demo", instance=None, ann=None, ns="llm"):
    lbls = {}
    if role:
        lbls = {L.RBG_GROUP_NAME: group, L.RBG_ROLE_NAME: role}
        if instance:
            lbls[L.RBG_ROLE_INSTANCE_NAME] = instance
    return {
        "metadata": {"name": name, "namespace": ns, "labels": lbls, "annotations": ann or {}},
        "spec": {
            "nodeName": node_name,
            "containers": [
                {"name": "c", "resources": {"limits": {L.RESOURCE_NVIDIA_GPU: str(gpus)}}}
            ],
        },
    }


# -- topology: locality and cluster levels ---------------------------------------------------


def test_best_fit_prefers_one_numa_node_inside_an_island_and_tightest_group():
    idx = LocalityIndex.from_topology(hgx())
    fit = idx.best_fit(mask_of(range(8)), 2)
    assert fit.locality is Locality.NVLINK_ISLAND
    assert {g // 4 for g in fit.gpus} == {fit.gpus[0] // 4}  # both on one NUMA node
    # NUMA 0 has 1 free GPU, NUMA 1 has 4: a 1-GPU pod should take the lone GPU first.
    free = mask_of([3, 4, 5, 6, 7])
    assert idx.best_fit(free, 1).gpus == (3,)


def test_pcie_box_tiers():
    idx = LocalityIndex.from_topology(pcie_box())
    assert idx.best_fit(mask_of(range(8)), 4).locality is Locality.NUMA
    assert idx.best_fit(mask_of(range(8)), 8).locality is Locality.ANY
    # Without NUMA room, the PCIe switch with a NIC is the best left.
    no_numa = pcie_box().model_copy(update={"numa_nodes": []})
    idx2 = LocalityIndex.from_topology(no_numa)
    fit = idx2.best_fit(mask_of(range(8)), 2)
    assert fit.locality is Locality.PCIE_SWITCH_NIC and set(fit.gpus) in ({0, 1}, {4, 5})
    assert idx.best_fit(mask_of([0]), 2).locality is Locality.NONE


def test_cluster_shared_level_and_unused_levels_dropped():
    ct = ClusterTopology(
        {
            "a": {L.LABEL_ZONE: "z1", L.LABEL_RACK: "r1"},
            "b": {L.LABEL_ZONE: "z1", L.LABEL_RACK: "r1"},
            "c": {L.LABEL_ZONE: "z1", L.LABEL_RACK: "r2"},
            "d": {L.LABEL_ZONE: "z2", L.LABEL_RACK: "r1"},  # same rack name, other zone
        }
    )
    assert [lv.kind for lv in ct.levels] == [LevelKind.ZONE, LevelKind.RACK, LevelKind.HOST]
    assert ct.shared_level("a", "b").kind is LevelKind.RACK
    assert ct.shared_level("a", "c").kind is LevelKind.ZONE
    assert ct.shared_level("a", "d").label == ""  # nothing shared, rack names collide
    assert ct.distance("a", "a") == 0 < ct.distance("a", "b") < ct.distance("a", "c")


# -- pods and config -------------------------------------------------------------------------


def test_pod_info_reads_rbg_labels_and_gpu_requests():
    p = pod_info(pod("demo-prefill-0", "prefill", gpus=2))
    assert p.rbg and p.rbg.pd_side == "prefill" and p.gpus == 2
    legacy = pod("x", gpus=1)
    legacy["metadata"]["labels"] = {L.RBG_LEGACY_GROUP_NAME: "g", L.RBG_LEGACY_ROLE_NAME: "decode"}
    assert pod_info(legacy).rbg.pd_side == "decode"
    assert pod_info(pod("plain")).rbg is None


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda p: p.pop("metadata"), "metadata.name"),
        (lambda p: p["metadata"].update(labels=["x"]), "labels"),
        (lambda p: p["spec"].update(containers="nope"), "containers"),
        (
            lambda p: p["spec"]["containers"][0]["resources"]["limits"].update(
                {L.RESOURCE_NVIDIA_GPU: "1.5"}
            ),
            "nvidia.com/gpu",
        ),
    ],
)
def test_pod_info_names_the_broken_field(mutate, field):
    p = pod("x", "prefill")
    mutate(p)
    with pytest.raises(PodSpecError, match=field.replace(".", r"\.")):
        pod_info(p)


def test_config_file_errors_name_the_field(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("weights: {pd_proximity: -1}\n")
    with pytest.raises(ConfigError, match=r"weights\.pd_proximity"):
        load_placement_config(f)
    f.write_text("intra_node: sometimes\n")
    with pytest.raises(ConfigError, match="intra_node"):
        load_placement_config(f)
    f.write_text("unknown_key: 1\n")
    with pytest.raises(ConfigError, match="unknown_key"):
        load_placement_config(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_placement_config(tmp_path / "missing.yaml")


def test_bad_annotation_warns_and_keeps_defaults():
    cfg = PlacementConfig()
    policy, warnings = resolve_pod_policy(
        cfg,
        {
            L.ANNOTATION_INTRA_NODE: "sometimes",
            L.ANNOTATION_WEIGHTS: "pd_proximity=4,bogus=1",
            L.ANNOTATION_KV_BYTES_PER_TOKEN: "-3",
        },
    )
    assert policy.intra_node is Mode.PREFERRED
    assert policy.weights.pd_proximity == 4 and policy.weights.best_fit == cfg.weights.best_fit
    assert len(warnings) == 3
    assert any(L.ANNOTATION_INTRA_NODE in w for w in warnings)


# -- snapshot --------------------------------------------------------------------------------


def test_snapshot_counts_free_gpus_from_allocation_and_unreported_pods():
    nodes = [node("n1", "r1", hgx(), allocation={"0": "llm/a", "1": "llm/a", "7": "llm/gone"})]
    pods = [pod("a", gpus=2, node_name="n1"), pod("b", gpus=2, node_name="n1")]
    snap = ClusterSnapshot.from_objects(nodes, pods)
    st = snap.nodes["n1"]
    assert st.free_count == 4  # 8 - a(2, reported) - b(2, not reported yet); "gone" is free
    assert snap.placements["llm/a"].gpus == (0, 1)
    assert len(snap.placements["llm/b"].gpus) == 2
    snap2 = snap.with_binding(pod("c", "decode", gpus=4), "n1")
    assert snap2.nodes["n1"].free_count == 0 and snap.nodes["n1"].free_count == 4
    assert snap2.with_binding(pod("c", "decode", gpus=4), "n1") is snap2  # a re-sent bind


def test_broken_topology_annotation_is_judged_by_gpu_count():
    bad = node("n1", "r1")
    bad["metadata"]["annotations"][L.ANNOTATION_TOPOLOGY] = '{"not": "a record"}'
    snap = ClusterSnapshot.from_objects([bad], [])
    st = snap.nodes["n1"]
    assert not st.has_topology and st.free_count == 8 and "not a valid" in st.data_problem
    out = PlacementEngine().filter(snap, pod("p", "prefill", gpus=4), ["n1"])
    assert out.passed == ["n1"]


# -- engine ----------------------------------------------------------------------------------


def test_non_rbg_pod_is_never_blocked_or_steered():
    snap = ClusterSnapshot.from_objects([node("n1", "r1", hgx()), node("n2", "r1", gpus=1)], [])
    eng = PlacementEngine(PlacementConfig(intra_node=Mode.REQUIRED))
    p = pod("plain", gpus=8)
    assert eng.filter(snap, p, ["n1", "n2", "ghost"]).passed == ["n1", "n2", "ghost"]
    scores = {s for _, s in eng.prioritize(snap, p, ["n1", "n2", "ghost"])}
    assert len(scores) == 1


def test_unknown_node_passes_with_neutral_score():
    snap = ClusterSnapshot.from_objects([node("n1", "r1", hgx())], [])
    eng = PlacementEngine()
    out = eng.filter(snap, pod("p", "prefill", gpus=2), ["n1", "just-joined"])
    assert out.passed == ["n1", "just-joined"] and out.unknown_nodes == ["just-joined"]
    assert (
        dict(eng.prioritize(snap, pod("p", "prefill", 2), ["n1", "just-joined"]))["just-joined"]
        == NEUTRAL_SCORE
    )


def test_tp_group_goes_to_an_island_over_a_pcie_box():
    snap = ClusterSnapshot.from_objects(
        [node("box", "r1", pcie_box()), node("hgx", "r1", hgx())], []
    )
    scores = dict(PlacementEngine().prioritize(snap, pod("p", "prefill", gpus=8), ["box", "hgx"]))
    assert scores["hgx"] > scores["box"]


def test_required_intra_node_filters_with_reason_and_resolvability():
    # A PCIe box whose 4 free GPUs straddle both NUMA nodes.
    nodes = [
        node(
            "box",
            "r1",
            pcie_box(),
            allocation={"0": "llm/x", "1": "llm/x", "4": "llm/y", "5": "llm/y"},
        )
    ]
    pods = [pod("x", gpus=2, node_name="box"), pod("y", gpus=2, node_name="box")]
    snap = ClusterSnapshot.from_objects([*nodes, node("small", "r1", pcie_box())], pods)
    p = pod("p", "decode", gpus=4, ann={L.ANNOTATION_INTRA_NODE: "required"})
    out = PlacementEngine().filter(snap, p, ["box", "small"])
    assert out.passed == ["small"]
    assert "NUMA" in out.failed["box"]  # preemption could free a NUMA node: resolvable
    p8 = pod("p8", "decode", gpus=8, ann={L.ANNOTATION_INTRA_NODE: "required"})
    out8 = PlacementEngine().filter(snap, p8, ["small"])
    assert "never allows" in out8.unresolvable["small"]


def test_prefill_follows_its_decode_to_the_rack():
    nodes = [node(f"n{i}", f"r{i // 2}", hgx()) for i in range(6)]
    pods = [pod("demo-decode-0", "decode", gpus=2, node_name="n4")]
    snap = ClusterSnapshot.from_objects(nodes, pods)
    scores = dict(
        PlacementEngine().prioritize(
            snap, pod("demo-prefill-0", "prefill", 2), [f"n{i}" for i in range(6)]
        )
    )
    best = max(scores, key=scores.get)
    assert snap.cluster.shared_level(best, "n4").kind in (LevelKind.RACK, LevelKind.HOST)
    assert scores["n5"] > scores["n0"]
    # another group's decode does not pull it
    other = ClusterSnapshot.from_objects(nodes, [pod("o-decode-0", "decode", 2, "n4", group="o")])
    s2 = dict(
        PlacementEngine().prioritize(other, pod("demo-prefill-0", "prefill", 2), ["n0", "n5"])
    )
    assert s2["n0"] == s2["n5"]


def test_required_instance_packing_keeps_leader_and_workers_in_one_rack():
    nodes = [node(f"n{i}", f"r{i // 2}", hgx()) for i in range(4)]
    leader = pod("lw-decode-0", "decode", 8, "n0", instance="lw-decode-0")
    snap = ClusterSnapshot.from_objects(nodes, [leader])
    worker = pod(
        "lw-decode-0-1",
        "decode",
        8,
        instance="lw-decode-0",
        ann={L.ANNOTATION_PACK_MODE: "required", L.ANNOTATION_PACK_LEVEL: "rack"},
    )
    out = PlacementEngine().filter(snap, worker, ["n1", "n2", "n3"])
    assert out.passed == ["n1"]
    assert set(out.unresolvable) == {"n2", "n3"} and "rack" in out.unresolvable["n2"]


def test_recreated_pod_prefers_its_old_node_while_it_fits():
    nodes = [node(f"n{i}", "r0", hgx()) for i in range(3)]
    snap = ClusterSnapshot.from_objects(nodes, [], history={"llm/demo-decode-0": "n2"})
    scores = dict(
        PlacementEngine().prioritize(snap, pod("demo-decode-0", "decode", 4), ["n0", "n1", "n2"])
    )
    assert scores["n2"] == 10 and scores["n0"] < 10
    full = ClusterSnapshot.from_objects(
        nodes, [pod("other", gpus=8, node_name="n2")], history={"llm/demo-decode-0": "n2"}
    )
    out = PlacementEngine().filter(full, pod("demo-decode-0", "decode", 4), ["n0", "n1", "n2"])
    assert "n2" in out.failed and out.passed == ["n0", "n1"]


def test_best_fit_keeps_whole_nodes_free():
    nodes = [
        node("empty", "r0", hgx()),
        node("half", "r0", hgx(), allocation={str(i): "llm/x" for i in range(4)}),
    ]
    snap = ClusterSnapshot.from_objects(nodes, [pod("x", gpus=4, node_name="half")])
    scores = dict(
        PlacementEngine().prioritize(snap, pod("demo-prefill-0", "prefill", 4), ["empty", "half"])
    )
    assert scores["half"] > scores["empty"]


def test_explain_gives_reason_or_every_term():
    nodes = [node("n0", "r0", hgx()), node("n1", "r0", hgx(), gpus=2)]
    snap = ClusterSnapshot.from_objects(nodes, [])
    ex = PlacementEngine().explain(snap, pod("demo-prefill-0", "prefill", 4)).to_dict()
    by = {n["node"]: n for n in ex["nodes"]}
    assert by["n1"]["passed"] is False and "allocatable" in by["n1"]["reason"]
    assert (
        by["n0"]["passed"]
        and "intra_node_fit" in by["n0"]["terms"]
        and by["n0"]["locality"] == "nvlink-island"
    )


def test_fast_prioritize_equals_per_node_scoring():
    """The class/rack caches and the node-list index change nothing: the same scores as
    scoring every node on its own, with peers on some hosts and unknown nodes mixed in."""
    from topo_sched.placement.engine import normalise

    nodes = [
        node(f"n{i}", f"r{i % 5}", hgx() if i % 3 else pcie_box(), zone=f"z{i % 2}")
        for i in range(40)
    ]
    pods = [
        pod("demo-decode-0", "decode", 2, "n7"),
        pod("demo-decode-1", "decode", 4, "n12"),
        pod("bg-1", gpus=3, node_name="n3"),
        pod("bg-2", gpus=6, node_name="n21"),
    ]
    snap = ClusterSnapshot.from_objects(nodes, pods)
    eng = PlacementEngine()
    names = [f"n{i}" for i in range(40)] + ["ghost"]
    p = pod("demo-prefill-0", "prefill", 2)
    fast = eng.prioritize(snap, p, names)
    slow_eng = PlacementEngine()
    ctx = slow_eng.context(snap, p)
    totals = [None if n not in snap.nodes else slow_eng._total(ctx, snap.nodes[n]) for n in names]
    assert fast == list(zip(names, normalise(totals), strict=True))
    assert len({s for _, s in fast}) > 3  # a real spread of scores, not a degenerate case
    assert eng.prioritize(snap, p, names) == fast  # the cached node-list index gives the same


def test_consecutive_pods_of_a_role_share_cached_terms_without_changing_scores():
    """Pods of one role placed one after another reuse per-rack proximity results; each must
    still score exactly as on a fresh engine, also after a binding changes the snapshot."""
    nodes = [node(f"n{i}", f"r{i % 4}", hgx(), zone=f"z{i % 2}") for i in range(24)]
    snap = ClusterSnapshot.from_objects(nodes, [pod("demo-decode-0", "decode", 2, "n5")])
    names = [f"n{i}" for i in range(24)]
    shared = PlacementEngine()
    first = pod("demo-prefill-0", "prefill", 2)
    shared.prioritize(snap, first, names)
    for i in range(1, 4):
        p = pod(f"demo-prefill-{i}", "prefill", 2)
        assert shared.prioritize(snap, p, names) == PlacementEngine().prioritize(snap, p, names)
        snap = snap.with_binding(p, "n9")  # same cluster tree, new free GPUs
    other_group = pod("other-prefill-0", "prefill", 2, group="other")
    assert shared.prioritize(snap, other_group, names) == PlacementEngine().prioritize(
        snap, other_group, names
    )
