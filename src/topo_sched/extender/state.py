"""The extender's view of the cluster: raw Node and Pod objects, and snapshots built from them.

One :class:`ClusterState` serves both sources:

- offline, from a snapshot file (``kubectl get nodes,pods -A -o json``: a ``List`` of Node and
  Pod items; a plain JSON/YAML list of objects, or any mapping with ``items``, works too), see
  :func:`load_objects_file` and :meth:`ClusterState.from_file`;
- live, from two list+watch loops (Nodes, Pods) over the Kubernetes API, see
  :meth:`ClusterState.start_live`.

Concurrency model
-----------------
Writers are the watch threads (one per resource) and the bind path (a threadpool thread).
They change the raw objects only while holding ``_lock``, and only for as long as a few dict
operations take. Readers are the request handlers: they call :meth:`ClusterState.snapshot`,
which returns a reference to an immutable :class:`~topo_sched.placement.snapshot.ClusterSnapshot`
and never waits for a watch.

The snapshot is rebuilt lazily. Each change bumps a generation counter (the "dirty flag");
the first request that finds the snapshot older than the data rebuilds it, outside the lock,
from a shallow copy of the objects. Requests that arrive while a rebuild runs get the
previous snapshot at once (it is at most one event burst old) instead of queueing behind it,
so a burst of requests causes one rebuild, not one each. Only before the very first snapshot
exists do requests wait for the build.

``record_binding`` (after a successful bind) applies ``with_binding`` to the current snapshot
at once, so the next pod of the same group sees the placement before any watch event
arrives; a rebuild that was already running re-applies the bindings recorded meanwhile. The
bound pod is kept as "assumed" (like kube-scheduler's assume cache) until the watch shows it
bound or gone, so a late watch event carrying the still-unbound pod cannot erase it.

Placement history (``namespace/name`` -> last node, from bindings, bound pods seen and
deletions) feeds the placement-stability term: a recreated pod of the same name can go back
to its slot. It is bounded (oldest entries dropped first).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

__all__ = [
    "ClusterState",
    "SnapshotFileError",
    "load_objects_file",
    "pod_key",
    "split_objects",
]

#: Signature of ``ClusterSnapshot.from_objects``; injectable for tests.
SnapshotBuilder = Callable[[list[dict[str, Any]], list[dict[str, Any]], Any, dict[str, str]], Any]

NODE = "Node"
POD = "Pod"

#: Pods that finished hold no GPUs; the live pod watch leaves them out.
POD_FIELD_SELECTOR = "status.phase!=Succeeded,status.phase!=Failed"


class SnapshotFileError(ValueError):
    """A cluster snapshot file that cannot be read or holds no usable Node/Pod objects."""


# -- helpers on raw objects -----------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def pod_key(pod: Mapping[str, Any]) -> str | None:
    """``namespace/name`` of a pod object (namespace defaults to ``default``), None if unnamed."""
    meta = _meta(pod)
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    ns = meta.get("namespace") or "default"
    return f"{ns}/{name}" if isinstance(ns, str) else None


def _node_key(node: Mapping[str, Any]) -> str | None:
    name = _meta(node).get("name")
    return name if isinstance(name, str) and name else None


def _uid(obj: Mapping[str, Any]) -> str | None:
    uid = _meta(obj).get("uid")
    return uid if isinstance(uid, str) and uid else None


def _node_name(pod: Mapping[str, Any]) -> str | None:
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        return None
    name = spec.get("nodeName")
    return name if isinstance(name, str) and name else None


def _with_node_name(pod: Mapping[str, Any], node: str) -> dict[str, Any]:
    spec = pod.get("spec")
    spec = dict(spec) if isinstance(spec, Mapping) else {}
    spec["nodeName"] = node
    return {**pod, "spec": spec}


def _same_pod(a: str | None, b: str | None) -> bool:
    """Same pod incarnation: uids equal, or one side does not know its uid."""
    return a is None or b is None or a == b


# -- snapshot files -------------------------------------------------------------------------


def _kind_of(obj: Mapping[str, Any]) -> str | None:
    kind = obj.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    # The scheduler's and some tools' copies carry no kind: guess from the shape.
    spec = obj.get("spec")
    if isinstance(spec, Mapping) and "containers" in spec:
        return POD
    if "namespace" in _meta(obj):
        return POD
    return NODE


def split_objects(
    items: Iterable[Any], *, source: str = "snapshot"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Nodes and Pods out of a list of objects; nested ``*List`` objects are flattened.

    Objects of other kinds are skipped (logged at DEBUG). An item that is not an object, or a
    Node/Pod without ``metadata.name``, raises :class:`SnapshotFileError` naming its position.
    """
    nodes: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []

    def walk(seq: Iterable[Any], where: str) -> None:
        for i, obj in enumerate(seq):
            at = f"{where}[{i}]"
            if not isinstance(obj, dict):
                raise SnapshotFileError(
                    f"{source}: {at} is not a Kubernetes object (got {type(obj).__name__})"
                )
            kind = _kind_of(obj)
            if kind and kind.endswith("List") and isinstance(obj.get("items"), list):
                walk(obj["items"], f"{at}.items")
                continue
            if kind not in (NODE, POD):
                log.debug("%s: %s is a %s; skipped", source, at, kind)
                continue
            key = _node_key(obj) if kind == NODE else pod_key(obj)
            if key is None:
                raise SnapshotFileError(f"{source}: {at} ({kind}) has no metadata.name")
            (nodes if kind == NODE else pods).append(obj)

    walk(items, "items")
    return nodes, pods


def load_objects_file(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read a cluster snapshot file (JSON or YAML) -> (nodes, pods).

    Accepts the output of ``kubectl get nodes,pods -A -o json`` (or ``-o yaml``), a plain list
    of objects, or any mapping with an ``items`` list. Raises :class:`SnapshotFileError` with
    a one-line reason for an unreadable file, a parse error, a wrong top-level shape, or a
    file with no Node objects.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SnapshotFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise SnapshotFileError(f"{p}: is a directory, expected a snapshot file") from None
    except UnicodeDecodeError as e:
        raise SnapshotFileError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise SnapshotFileError(f"{p}: cannot read: {e.strerror or e}") from None
    if not text.strip():
        raise SnapshotFileError(f"{p}: file is empty")
    data: Any
    try:
        data = json.loads(text)
    except ValueError as json_err:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SnapshotFileError(
                f"{p}: neither JSON ({json_err}) nor YAML: {problem}{where}"
            ) from None
        except RecursionError:
            raise SnapshotFileError(f"{p}: nested too deeply to parse") from None
    except RecursionError:
        raise SnapshotFileError(f"{p}: nested too deeply to parse") from None
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict) and isinstance(data.get("items"), list):
        items = data["items"]
    elif isinstance(data, dict) and data.get("kind") in (NODE, POD):
        items = [data]
    else:
        shape = type(data).__name__ if not isinstance(data, dict) else "a mapping without items"
        raise SnapshotFileError(
            f"{p}: expected a List of Node and Pod objects "
            f"(kubectl get nodes,pods -A -o json), got {shape}"
        )
    nodes, pods = split_objects(items, source=str(p))
    if not nodes:
        raise SnapshotFileError(
            f"{p}: holds no Node objects (use kubectl get nodes,pods -A -o json)"
        )
    return nodes, pods


# -- the state ------------------------------------------------------------------------------


def _default_builder() -> SnapshotBuilder:
    from topo_sched.placement.snapshot import ClusterSnapshot

    def build(nodes, pods, config, history):  # type: ignore[no-untyped-def]
        return ClusterSnapshot.from_objects(nodes, pods, config, history)

    return build


class ClusterState:
    """Raw Nodes and Pods under a lock, and a lazily rebuilt immutable snapshot of them.

    See the module docstring for the concurrency model. ``config`` is the
    :class:`~topo_sched.placement.config.PlacementConfig` the snapshots are built with.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        builder: SnapshotBuilder | None = None,
        history_limit: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._builder = builder or _default_builder()
        self._history_limit = max(1, history_limit)
        self._clock = clock
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self._pods: dict[str, dict[str, Any]] = {}
        #: pod key -> (uid, node) for pods we bound whose binding the watch has not shown yet.
        self._assumed: dict[str, tuple[str | None, str]] = {}
        self._history: OrderedDict[str, str] = OrderedDict()
        #: Bumped by every change; ``_event_generation`` only by changes other than bindings.
        self._generation = 0
        self._event_generation = 0
        self._snapshot: Any = None
        self._snapshot_generation = -1
        #: Generation a running rebuild copied its objects at; None when none runs.
        self._building_from: int | None = None
        #: Bindings recorded while a rebuild runs: (generation, pod, node).
        self._pending: list[tuple[int, dict[str, Any], str]] = []
        self._synced: dict[str, bool] = {NODE: False, POD: False}
        self._updated_at: float | None = None
        self._source = "empty"
        self._watches: list[Any] = []
        self._watch_by_kind: dict[str, Any] = {}
        self._watch_rv: dict[str, str | None] = {}
        self._closed = False

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, config: Any = None, **kwargs: Any) -> ClusterState:
        """A ready state from a snapshot file; raises :class:`SnapshotFileError`."""
        nodes, pods = load_objects_file(path)
        state = cls(config, **kwargs)
        state.load(nodes, pods, source=f"snapshot file {path}")
        return state

    @classmethod
    def from_objects(
        cls,
        nodes: Iterable[Mapping[str, Any]],
        pods: Iterable[Mapping[str, Any]],
        config: Any = None,
        **kwargs: Any,
    ) -> ClusterState:
        """A ready state from in-memory objects (tests, the simulator)."""
        state = cls(config, **kwargs)
        state.load(nodes, pods, source="objects")
        return state

    def load(
        self,
        nodes: Iterable[Mapping[str, Any]],
        pods: Iterable[Mapping[str, Any]],
        *,
        source: str = "objects",
    ) -> None:
        """Replace all objects at once and mark the state synced (offline mode)."""
        self.replace(NODE, nodes)
        self.replace(POD, pods)
        with self._lock:
            self._source = source
        log.info("cluster state loaded from %s: %d nodes, %d pods", source, *self.counts())

    # -- writers (watch threads, bind path) -----------------------------------------------

    def replace(self, kind: str, objects: Iterable[Mapping[str, Any]]) -> None:
        """A (re)list of ``kind``: the objects become exactly these; marks ``kind`` synced."""
        if kind == NODE:
            fresh_nodes = {k: dict(o) for o in objects if (k := _node_key(o))}
            with self._lock:
                self._nodes = fresh_nodes
                self._synced[NODE] = True
                self._touch()
            return
        if kind != POD:
            raise ValueError(f"unknown kind {kind!r}")
        fresh: dict[str, dict[str, Any]] = {}
        for o in objects:
            k = pod_key(o)
            if k is not None:
                fresh[k] = dict(o)
        with self._lock:
            for key, old in self._pods.items():
                if key not in fresh and (node := _node_name(old)):
                    self._remember(key, node)  # deleted while we were not watching
            for key in [k for k in self._assumed if k not in fresh]:
                del self._assumed[key]
            self._pods = {}
            for key, obj in fresh.items():
                self._put_pod(key, obj)
            self._synced[POD] = True
            self._touch()

    def apply_event(self, kind: str, event_type: str, obj: Mapping[str, Any]) -> None:
        """One watch event (``ADDED``/``MODIFIED``/``DELETED``) for a Node or Pod object.

        ``BOOKMARK`` only refreshes the state's age; other types are ignored.
        """
        if event_type == "BOOKMARK":
            with self._lock:
                self._updated_at = self._clock()
            return
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            return
        if kind == NODE:
            key = _node_key(obj)
            if key is None:
                return
            with self._lock:
                if event_type == "DELETED":
                    self._nodes.pop(key, None)
                else:
                    self._nodes[key] = dict(obj)
                self._touch()
            return
        if kind != POD:
            return
        key = pod_key(obj)
        if key is None:
            return
        with self._lock:
            if event_type == "DELETED":
                old = self._pods.pop(key, None)
                node = _node_name(obj) or (_node_name(old) if old else None)
                if node:
                    self._remember(key, node)
                self._assumed.pop(key, None)
            else:
                self._put_pod(key, dict(obj))
            self._touch()

    def mark_synced(self, kind: str, synced: bool = True) -> None:
        with self._lock:
            self._synced[kind] = synced
            self._touch()

    def record_binding(self, pod: Mapping[str, Any], node: str) -> None:
        """A bind of ``pod`` to ``node`` succeeded: show it in the snapshot now.

        Idempotent: recording the same pod on the same node twice changes nothing (a bind
        retry must not count the pod's GPUs twice).
        """
        key = pod_key(pod)
        if key is None:
            log.warning("record_binding: pod without metadata.name; not recorded")
            return
        uid = _uid(pod)
        with self._lock:
            self._remember(key, node)
            current = self._pods.get(key)
            if current is not None and _same_pod(uid, _uid(current)):
                if _node_name(current) == node:
                    return  # already known bound there (watch or an earlier record)
                base: Mapping[str, Any] = current
            else:
                base = pod
            bound = _with_node_name(base, node)
            self._pods[key] = bound
            self._assumed[key] = (uid or _uid(bound), node)
            was_current = self._snapshot is not None and (
                self._snapshot_generation == self._generation
            )
            self._generation += 1
            if self._building_from is not None:
                self._pending.append((self._generation, bound, node))
            if self._snapshot is not None:
                try:
                    self._snapshot = self._snapshot.with_binding(bound, node)
                except Exception:
                    log.exception("record_binding: with_binding(%s, %s) failed", key, node)
                    was_current = False
            if was_current:
                self._snapshot_generation = self._generation
            self._updated_at = self._clock()

    # -- readers --------------------------------------------------------------------------

    def is_current(self) -> bool:
        """True when :meth:`snapshot` would return at once without rebuilding."""
        with self._lock:
            return self._snapshot is not None and self._snapshot_generation == self._generation

    def snapshot(self) -> Any:
        """The current immutable snapshot; rebuilt here when the objects changed.

        Never blocks on a watch. While another thread rebuilds, returns the previous snapshot.
        """
        with self._lock:
            snap = self._snapshot
            if snap is not None and self._snapshot_generation == self._generation:
                return snap
        if not self._build_lock.acquire(blocking=snap is None):
            return snap
        try:
            with self._lock:
                if self._snapshot is not None and self._snapshot_generation == self._generation:
                    return self._snapshot
                gen = self._generation
                nodes = list(self._nodes.values())
                pods = list(self._pods.values())
                history = dict(self._history)
                self._building_from = gen
                self._pending = []
            started = time.perf_counter()
            try:
                new = self._builder(nodes, pods, self.config, history)
            except BaseException:
                with self._lock:
                    self._building_from = None
                    self._pending = []
                raise
            with self._lock:
                for _g, bound, node in self._pending:
                    try:
                        new = new.with_binding(bound, node)
                    except Exception:
                        log.exception(
                            "re-applying binding of %s to %s failed", pod_key(bound), node
                        )
                self._pending = []
                self._building_from = None
                self._snapshot = new
                # The bindings recorded meanwhile were re-applied; any other change since
                # ``gen`` leaves the new snapshot dirty for the next request.
                current = self._event_generation <= gen
                self._snapshot_generation = self._generation if current else gen
            log.debug(
                "snapshot rebuilt: %d nodes, %d pods in %.1f ms",
                len(nodes),
                len(pods),
                (time.perf_counter() - started) * 1000,
            )
            return new
        finally:
            self._build_lock.release()

    @property
    def ready(self) -> bool:
        """True once both Nodes and Pods have been listed (or a snapshot file was loaded)."""
        self._check_watches()
        with self._lock:
            return all(self._synced.values())

    @property
    def synced(self) -> dict[str, bool]:
        """Per kind (``Node``, ``Pod``): listed and delivered at least once."""
        self._check_watches()
        with self._lock:
            return dict(self._synced)

    def age_seconds(self) -> float | None:
        """Seconds since the state last learned something (event, bookmark, list, load).

        None before the first update. In snapshot mode it is the time since the file was read.
        In live mode a watch's resourceVersion moving on (bookmarks included) counts as an
        update, so a quiet but healthy watch keeps the age low.
        """
        self._check_watches()
        with self._lock:
            at = self._updated_at
        return None if at is None else max(0.0, self._clock() - at)

    @property
    def source(self) -> str:
        with self._lock:
            return self._source

    def counts(self) -> tuple[int, int]:
        """(number of nodes, number of pods) held now."""
        with self._lock:
            return len(self._nodes), len(self._pods)

    def find_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The raw pod object ``namespace/name``, or None."""
        with self._lock:
            return self._pods.get(f"{namespace}/{name}")

    def node_names(self) -> list[str]:
        with self._lock:
            return list(self._nodes)

    def history(self) -> dict[str, str]:
        """A copy of the placement history: ``namespace/name`` -> last node."""
        with self._lock:
            return dict(self._history)

    def assumed(self) -> dict[str, str]:
        """Pods we bound that the watch has not shown bound yet: key -> node."""
        with self._lock:
            return {k: node for k, (_uid, node) in self._assumed.items()}

    # -- internals (call with _lock held) -------------------------------------------------

    def _touch(self) -> None:
        self._generation += 1
        self._event_generation = self._generation
        self._updated_at = self._clock()

    def _remember(self, key: str, node: str) -> None:
        self._history[key] = node
        self._history.move_to_end(key)
        while len(self._history) > self._history_limit:
            self._history.popitem(last=False)

    def _put_pod(self, key: str, obj: dict[str, Any]) -> None:
        node = _node_name(obj)
        assumed = self._assumed.get(key)
        if assumed is not None:
            a_uid, a_node = assumed
            if not _same_pod(a_uid, _uid(obj)):
                del self._assumed[key]  # a new pod of the same name
            elif node is not None:
                del self._assumed[key]  # the watch caught up with our binding
                if node != a_node:
                    log.warning("pod %s: bound by us to %s, the API says %s", key, a_node, node)
            else:
                obj = _with_node_name(obj, a_node)  # stale event; keep our binding
                node = a_node
        if node:
            self._remember(key, node)
        self._pods[key] = obj

    # -- live mode ------------------------------------------------------------------------

    def start_live(
        self,
        api_client: Any,
        *,
        pod_field_selector: str | None = POD_FIELD_SELECTOR,
        page_size: int | None = 500,
        list_watch_factory: Callable[..., Any] | None = None,
    ) -> None:
        """Start two list+watch loops (Nodes; Pods of all namespaces) feeding this state.

        Pods that finished (Succeeded/Failed) hold no GPUs and are left out by the field
        selector; one that finishes shows up as a deletion. ``ready`` turns true once both
        loops listed and their list's events reached this state.
        """
        from kubernetes.client import CoreV1Api

        if list_watch_factory is None:
            from topo_sched.kube.watch import ListWatch

            list_watch_factory = ListWatch
        core = CoreV1Api(api_client)
        nodes = list_watch_factory(
            core.list_node,
            on_event=lambda t, o: self.apply_event(NODE, t, o),
            page_size=page_size,
            name="extender-nodes",
        )
        pods = list_watch_factory(
            core.list_pod_for_all_namespaces,
            field_selector=pod_field_selector,
            on_event=lambda t, o: self.apply_event(POD, t, o),
            page_size=page_size,
            name="extender-pods",
        )
        self.attach_watches({NODE: nodes, POD: pods}, source="live API")
        for w in (nodes, pods):
            w.start()

    def attach_watches(self, watches: Mapping[str, Any], *, source: str = "live API") -> None:
        """Follow ListWatch-like objects (``synced``, ``keys()``, ``resource_version``) whose
        ``on_event`` already calls :meth:`apply_event`; used by ``start_live`` and tests."""
        with self._lock:
            if self._closed:
                raise RuntimeError("state was stopped")
            self._watches = list(watches.values())
            self._watch_by_kind = dict(watches)
            self._watch_rv = {k: None for k in watches}
            self._source = source
            for kind in watches:
                self._synced[kind] = False

    def _check_watches(self) -> None:
        """Latch ``synced`` per kind once the watch listed and its events arrived here; note
        resourceVersion progress (bookmarks included) as a sign the state is current."""
        with self._lock:
            watches = dict(self._watch_by_kind)
        if not watches:
            return
        for kind, w in watches.items():
            try:
                rv = w.resource_version
                synced = w.synced
            except Exception:  # a broken watch object must not break readiness probes
                continue
            with self._lock:
                if rv is not None and rv != self._watch_rv.get(kind):
                    self._watch_rv[kind] = rv
                    self._updated_at = self._clock()
                if self._synced.get(kind) or not synced:
                    continue
                held = set(self._nodes) if kind == NODE else set(self._pods)
            # The watch sets ``synced`` before it delivers the list's events; wait for them.
            if w.keys() == held:
                with self._lock:
                    self._synced[kind] = True
                    log.info("cluster state: %s synced (%d objects)", kind, len(held))

    def stop(self) -> None:
        """Stop the watch loops (live mode); idempotent."""
        with self._lock:
            watches, self._watches = self._watches, []
            self._watch_by_kind = {}
            self._closed = True
        for w in watches:
            try:
                w.stop()
            except Exception:
                log.exception("stopping a watch failed")
