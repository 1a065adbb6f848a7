"""Every Kubernetes label, annotation and resource key topo-sched reads or writes.

One module, one constant per key, each with a comment saying who sets it and what it means,
so that a grep for a key lands here and nowhere else.
"""

from __future__ import annotations

# --- RoleBasedGroup (workloads.x-k8s.io) pod labels, set by the RBG controller -----------------

#: Name of the RoleBasedGroup a pod belongs to (RBG v1alpha2).
RBG_GROUP_NAME = "rbg.workloads.x-k8s.io/group-name"
#: Role inside the group: "prefill", "decode", "router", ... (RBG v1alpha2).
RBG_ROLE_NAME = "rbg.workloads.x-k8s.io/role-name"
#: One instance of a role: all pods of a multi-node leader/worker instance share it.
RBG_ROLE_INSTANCE_NAME = "rbg.workloads.x-k8s.io/role-instance-name"
#: "leader" or "worker" inside a leader/worker instance.
RBG_COMPONENT_NAME = "rbg.workloads.x-k8s.io/component-name"
#: Legacy (v1alpha1) group label, still set by older RBG controllers.
RBG_LEGACY_GROUP_NAME = "rolebasedgroup.workloads.x-k8s.io/name"
#: Legacy (v1alpha1) role label.
RBG_LEGACY_ROLE_NAME = "rolebasedgroup.workloads.x-k8s.io/role"

#: Env var RBG injects into leader/worker pods: pods per instance (1 leader + workers).
ENV_RBG_LWP_GROUP_SIZE = "RBG_LWP_GROUP_SIZE"

# --- Node annotations published by the topo-sched agent ----------------------------------------

#: The node's NodeTopology record (JSON, apiVersion topo-sched.io/v1). Written only on change.
ANNOTATION_TOPOLOGY = "topo-sched.io/topology"
#: JSON object: GPU index (string) -> "namespace/pod" holding it. Written on change, rate-limited.
ANNOTATION_GPU_ALLOCATION = "topo-sched.io/gpu-allocation"

# --- Resources ----------------------------------------------------------------------------------

#: The extended resource NVIDIA's device plugin advertises; device IDs are GPU UUIDs.
RESOURCE_NVIDIA_GPU = "nvidia.com/gpu"

# --- Node labels that describe where a node sits in the cluster, coarse to fine ------------------

#: Well-known zone label (cloud providers, kubeadm users).
LABEL_ZONE = "topology.kubernetes.io/zone"
#: Region label; coarser than zone.
LABEL_REGION = "topology.kubernetes.io/region"
#: NVIDIA topograph: spine switch a node hangs under.
LABEL_NVIDIA_SPINE = "network.topology.nvidia.com/spine"
#: NVIDIA topograph: block (leaf group) of a node.
LABEL_NVIDIA_BLOCK = "network.topology.nvidia.com/block"
#: GKE compact placement: block and sub-block.
LABEL_GKE_BLOCK = "cloud.google.com/gce-topology-block"
LABEL_GKE_SUBBLOCK = "cloud.google.com/gce-topology-subblock"
#: AWS EC2 network topology: layer 1 is the farthest from the instance, layer 3 the nearest.
LABEL_AWS_LAYER_1 = "topology.k8s.aws/network-node-layer-1"
LABEL_AWS_LAYER_2 = "topology.k8s.aws/network-node-layer-2"
LABEL_AWS_LAYER_3 = "topology.k8s.aws/network-node-layer-3"
#: Plain rack label for clusters with no vendor labels; topo-sched's own convention.
LABEL_RACK = "topo-sched.io/rack"
#: Rack label some clusters use (seen in the kube-scheduler captures).
LABEL_K8S_RACK = "topology.kubernetes.io/rack"
#: Multi-node NVLink domain (GB200 NVL72 and similar), set by NVIDIA's GPU feature discovery.
LABEL_GPU_CLIQUE = "nvidia.com/gpu.clique"
#: The node itself.
LABEL_HOSTNAME = "kubernetes.io/hostname"

# --- Per-RBG placement overrides: annotations on the role's pod template ------------------------
# Invalid values are reported in the filter result and the cluster defaults are used instead.

#: "required" (filter nodes that cannot give one NVLink island or NUMA node) or "preferred".
ANNOTATION_INTRA_NODE = "topo-sched.io/intra-node"
#: Level (label key or kind: rack, block, clique, ...) one leader/worker instance must share.
ANNOTATION_PACK_LEVEL = "topo-sched.io/pack-level"
#: "required" or "preferred" for instance packing.
ANNOTATION_PACK_MODE = "topo-sched.io/pack-mode"
#: Level across which a role's instances are spread; setting it turns spreading on.
ANNOTATION_SPREAD_LEVEL = "topo-sched.io/spread-level"
#: KV-cache bytes per token of the served model; scales the prefill-decode proximity weight.
ANNOTATION_KV_BYTES_PER_TOKEN = "topo-sched.io/kv-bytes-per-token"
#: Term weights, e.g. "pd_proximity=4,spread=1"; terms not named keep the cluster default.
ANNOTATION_WEIGHTS = "topo-sched.io/weights"
#: Pods per leader/worker instance, where the pod does not carry RBG_LWP_GROUP_SIZE.
ANNOTATION_INSTANCE_SIZE = "topo-sched.io/instance-size"

# --- Pod annotations topo-sched writes --------------------------------------------------------

#: Kubernetes' deletion-cost hint (ReplicaSet-style owners delete the lowest first); the
#: autoscaler sets it with --deletion-cost so the worst-placed instances go first.
ANNOTATION_POD_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
