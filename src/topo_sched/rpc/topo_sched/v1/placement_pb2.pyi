from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoleUnit(_message.Message):
    __slots__ = ("name", "pods_per_unit", "gpus_per_pod", "labels", "annotations", "instance_size")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PODS_PER_UNIT_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_POD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    pods_per_unit: int
    gpus_per_pod: int
    labels: _containers.ScalarMap[str, str]
    annotations: _containers.ScalarMap[str, str]
    instance_size: int
    def __init__(self, name: _Optional[str] = ..., pods_per_unit: _Optional[int] = ..., gpus_per_pod: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., annotations: _Optional[_Mapping[str, str]] = ..., instance_size: _Optional[int] = ...) -> None: ...

class WhatIfRequest(_message.Message):
    __slots__ = ("namespace", "rbg", "units", "roles", "all_or_nothing")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    RBG_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    ALL_OR_NOTHING_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    rbg: str
    units: int
    roles: _containers.RepeatedCompositeFieldContainer[RoleUnit]
    all_or_nothing: bool
    def __init__(self, namespace: _Optional[str] = ..., rbg: _Optional[str] = ..., units: _Optional[int] = ..., roles: _Optional[_Iterable[_Union[RoleUnit, _Mapping]]] = ..., all_or_nothing: _Optional[bool] = ...) -> None: ...

class PodPlacement(_message.Message):
    __slots__ = ("unit", "role", "pod", "node", "gpus", "locality", "score", "total", "instance")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    unit: int
    role: str
    pod: str
    node: str
    gpus: _containers.RepeatedScalarFieldContainer[int]
    locality: str
    score: int
    total: float
    instance: str
    def __init__(self, unit: _Optional[int] = ..., role: _Optional[str] = ..., pod: _Optional[str] = ..., node: _Optional[str] = ..., gpus: _Optional[_Iterable[int]] = ..., locality: _Optional[str] = ..., score: _Optional[int] = ..., total: _Optional[float] = ..., instance: _Optional[str] = ...) -> None: ...

class RejectionCount(_message.Message):
    __slots__ = ("code", "nodes")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    code: str
    nodes: int
    def __init__(self, code: _Optional[str] = ..., nodes: _Optional[int] = ...) -> None: ...

class RoleReason(_message.Message):
    __slots__ = ("role", "pod", "nodes_total", "rejections", "message")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NODES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    role: str
    pod: str
    nodes_total: int
    rejections: _containers.RepeatedCompositeFieldContainer[RejectionCount]
    message: str
    def __init__(self, role: _Optional[str] = ..., pod: _Optional[str] = ..., nodes_total: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[RejectionCount, _Mapping]]] = ..., message: _Optional[str] = ...) -> None: ...

class WhatIfResponse(_message.Message):
    __slots__ = ("units_requested", "units_placeable", "feasible", "placements", "cost", "score_cost", "kv_path_cost", "first_unfit_unit", "reasons", "warnings", "snapshot_age_seconds")
    UNITS_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    UNITS_PLACEABLE_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    SCORE_COST_FIELD_NUMBER: _ClassVar[int]
    KV_PATH_COST_FIELD_NUMBER: _ClassVar[int]
    FIRST_UNFIT_UNIT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    units_requested: int
    units_placeable: int
    feasible: bool
    placements: _containers.RepeatedCompositeFieldContainer[PodPlacement]
    cost: float
    score_cost: float
    kv_path_cost: float
    first_unfit_unit: int
    reasons: _containers.RepeatedCompositeFieldContainer[RoleReason]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    snapshot_age_seconds: float
    def __init__(self, units_requested: _Optional[int] = ..., units_placeable: _Optional[int] = ..., feasible: _Optional[bool] = ..., placements: _Optional[_Iterable[_Union[PodPlacement, _Mapping]]] = ..., cost: _Optional[float] = ..., score_cost: _Optional[float] = ..., kv_path_cost: _Optional[float] = ..., first_unfit_unit: _Optional[int] = ..., reasons: _Optional[_Iterable[_Union[RoleReason, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., snapshot_age_seconds: _Optional[float] = ...) -> None: ...

class PodRef(_message.Message):
    __slots__ = ("namespace", "name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("pod_json", "pod_ref", "nodes")
    POD_JSON_FIELD_NUMBER: _ClassVar[int]
    POD_REF_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    pod_json: str
    pod_ref: PodRef
    nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pod_json: _Optional[str] = ..., pod_ref: _Optional[_Union[PodRef, _Mapping]] = ..., nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class TermScore(_message.Message):
    __slots__ = ("term", "score", "weight")
    TERM_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    term: str
    score: float
    weight: float
    def __init__(self, term: _Optional[str] = ..., score: _Optional[float] = ..., weight: _Optional[float] = ...) -> None: ...

class NodeVerdict(_message.Message):
    __slots__ = ("node", "passed", "code", "reason", "terms", "total", "score", "gpus", "locality")
    NODE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_FIELD_NUMBER: _ClassVar[int]
    node: str
    passed: bool
    code: str
    reason: str
    terms: _containers.RepeatedCompositeFieldContainer[TermScore]
    total: float
    score: int
    gpus: _containers.RepeatedScalarFieldContainer[int]
    locality: str
    def __init__(self, node: _Optional[str] = ..., passed: _Optional[bool] = ..., code: _Optional[str] = ..., reason: _Optional[str] = ..., terms: _Optional[_Iterable[_Union[TermScore, _Mapping]]] = ..., total: _Optional[float] = ..., score: _Optional[int] = ..., gpus: _Optional[_Iterable[int]] = ..., locality: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("pod", "rbg", "gpus", "warnings", "nodes")
    POD_FIELD_NUMBER: _ClassVar[int]
    RBG_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    pod: str
    rbg: bool
    gpus: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeVerdict]
    def __init__(self, pod: _Optional[str] = ..., rbg: _Optional[bool] = ..., gpus: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., nodes: _Optional[_Iterable[_Union[NodeVerdict, _Mapping]]] = ...) -> None: ...

class ClusterSummaryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IslandFit(_message.Message):
    __slots__ = ("gpus", "nvlink_island", "numa_or_better", "any")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    NVLINK_ISLAND_FIELD_NUMBER: _ClassVar[int]
    NUMA_OR_BETTER_FIELD_NUMBER: _ClassVar[int]
    ANY_FIELD_NUMBER: _ClassVar[int]
    gpus: int
    nvlink_island: int
    numa_or_better: int
    any: int
    def __init__(self, gpus: _Optional[int] = ..., nvlink_island: _Optional[int] = ..., numa_or_better: _Optional[int] = ..., any: _Optional[int] = ...) -> None: ...

class DomainSummary(_message.Message):
    __slots__ = ("domain", "value", "nodes", "gpus_allocatable", "gpus_free", "largest_free_island")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    GPUS_ALLOCATABLE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FREE_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FREE_ISLAND_FIELD_NUMBER: _ClassVar[int]
    domain: str
    value: str
    nodes: int
    gpus_allocatable: int
    gpus_free: int
    largest_free_island: int
    def __init__(self, domain: _Optional[str] = ..., value: _Optional[str] = ..., nodes: _Optional[int] = ..., gpus_allocatable: _Optional[int] = ..., gpus_free: _Optional[int] = ..., largest_free_island: _Optional[int] = ...) -> None: ...

class LevelSummary(_message.Message):
    __slots__ = ("label", "kind", "domains")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    label: str
    kind: str
    domains: _containers.RepeatedCompositeFieldContainer[DomainSummary]
    def __init__(self, label: _Optional[str] = ..., kind: _Optional[str] = ..., domains: _Optional[_Iterable[_Union[DomainSummary, _Mapping]]] = ...) -> None: ...

class ClusterSummaryResponse(_message.Message):
    __slots__ = ("nodes", "nodes_with_topology", "gpus_allocatable", "gpus_free", "largest_free_island_nodes", "fits", "levels", "pods", "age_seconds")
    class LargestFreeIslandNodesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    NODES_FIELD_NUMBER: _ClassVar[int]
    NODES_WITH_TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    GPUS_ALLOCATABLE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FREE_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FREE_ISLAND_NODES_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    nodes: int
    nodes_with_topology: int
    gpus_allocatable: int
    gpus_free: int
    largest_free_island_nodes: _containers.ScalarMap[int, int]
    fits: _containers.RepeatedCompositeFieldContainer[IslandFit]
    levels: _containers.RepeatedCompositeFieldContainer[LevelSummary]
    pods: int
    age_seconds: float
    def __init__(self, nodes: _Optional[int] = ..., nodes_with_topology: _Optional[int] = ..., gpus_allocatable: _Optional[int] = ..., gpus_free: _Optional[int] = ..., largest_free_island_nodes: _Optional[_Mapping[int, int]] = ..., fits: _Optional[_Iterable[_Union[IslandFit, _Mapping]]] = ..., levels: _Optional[_Iterable[_Union[LevelSummary, _Mapping]]] = ..., pods: _Optional[int] = ..., age_seconds: _Optional[float] = ...) -> None: ...
