"""``ListWatch``: an in-memory mirror of one Kubernetes resource, kept by list + watch.

Usage::

    nodes = ListWatch(CoreV1Api(api).list_node, on_event=handle)
    nodes.start()                  # background thread; nodes.stop() ends it
    nodes.items()                  # snapshot of the current objects

    pods = ListWatch(CoreV1Api(api).list_namespaced_pod, "llm",
                     label_selector="rbg.workloads.x-k8s.io/group-name=demo")
    pods.run_once(timeout_seconds=5)   # one bounded pass, for tests

The loop. List everything (following pagination), remember the list's resourceVersion, then
watch from it with bookmarks on. ``ADDED``/``MODIFIED`` replace the stored object,
``DELETED`` removes it (a label-selector watch also reports an object that stops matching as
``DELETED`` and one that starts matching again as ``ADDED``), ``BOOKMARK`` only advances the
resourceVersion, and every event advances it. When the server says the resourceVersion is too
old (an ``ERROR`` event with code 410, or an HTTP 410), the mirror re-lists (saying so in a
warning log line) and continues from the new list. A watch that just ends (its
``timeoutSeconds`` ran out) is re-opened from the last resourceVersion.

Callbacks. ``on_event(type, obj)`` is called for each change to the mirror, after the store
was updated: ``ADDED``/``MODIFIED``/``DELETED`` from the watch, and for a (re-)list the
difference it made (``ADDED`` for new keys, ``MODIFIED`` for a changed resourceVersion,
``DELETED`` with the last known object for keys that disappeared), so a consumer that only
follows callbacks stays consistent across re-lists. Bookmarks are not passed on. A callback
that raises is logged and does not stop the loop.

Objects are the raw JSON dicts from the wire, keyed ``namespace/name`` (``name`` for cluster
scoped objects). They are never mutated after they are stored; an update replaces the dict.
The list is read with ``_preload_content=False`` and parsed here. The watch uses
``kubernetes.watch.Watch`` with object deserialization turned off: a subclass whose
``get_return_type`` returns None makes ``Watch.unmarshal_event`` hand back the parsed event
as is. (``Watch.stream(..., deserialize=False)`` is not usable: in kubernetes-client 37 it
then fails with ``KeyError: 'raw_object'`` on an ERROR event.) ``timeout_seconds`` is always
passed, which also turns off ``Watch``'s own silent one-shot retry after a 410, so the 410
reaches this class as an ``ApiException`` and is handled by a re-list.

Concurrency model. Exactly one thread runs the loop: the caller of ``run_once`` or the
background thread of ``start``; never both (``run_once`` while started raises). Only that
thread mutates the store, the resourceVersion, ``synced`` and ``last_sync_time``, and only it
calls ``on_event``. Readers on other threads (``items``, ``get``, ``keys``, the properties)
take ``_lock`` and get snapshots, so they never see a half-applied event. ``stop`` may be
called from any thread: it sets a flag and closes the open watch connection, then joins.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch

from topo_sched.kube.client import list_all, selector_kwargs
from topo_sched.kube.errors import Gone, from_api_exception, from_status

log = logging.getLogger(__name__)

EventHandler = Callable[[str, dict[str, Any]], None]

DEFAULT_WATCH_TIMEOUT_S = 300
_BACKOFF_INITIAL_S = 0.5
_BACKOFF_MAX_S = 30.0


class _RawWatch(Watch):
    """A ``Watch`` that yields the parsed JSON events without building client model objects."""

    def get_return_type(self, func: Callable[..., Any]) -> None:
        return None


class _Expired(Exception):
    """The watch's resourceVersion is too old; a re-list is needed."""


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name``, or ``name`` for a cluster-scoped object."""
    metadata = obj.get("metadata") or {}
    namespace = metadata.get("namespace")
    name = metadata.get("name", "")
    return f"{namespace}/{name}" if namespace else name


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


class ListWatch:
    """An in-memory mirror of one resource kept by list + watch (see the module doc)."""

    def __init__(
        self,
        list_func: Callable[..., Any],
        *list_args: Any,
        label_selector: str | None = None,
        field_selector: str | None = None,
        on_event: EventHandler | Iterable[EventHandler] | None = None,
        page_size: int | None = None,
        watch_timeout_seconds: int = DEFAULT_WATCH_TIMEOUT_S,
        name: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._list_func = list_func
        self._list_args = list_args
        self._selectors = selector_kwargs(label_selector, field_selector)
        self._handlers = _handlers(on_event)
        self._page_size = page_size
        self._watch_timeout_s = watch_timeout_seconds
        self.name = name or getattr(list_func, "__name__", "listwatch")
        self._clock = clock
        self._lock = threading.Lock()
        self._store: dict[str, dict[str, Any]] = {}
        self._rv: str | None = None
        self._synced = False
        self._last_sync_time: float | None = None
        self._needs_list = True
        self._stop = threading.Event()
        self._watch: _RawWatch | None = None
        self._thread: threading.Thread | None = None

    # -- read side (any thread) ------------------------------------------------------------
    @property
    def synced(self) -> bool:
        """True once the first full list has been stored."""
        with self._lock:
            return self._synced

    @property
    def last_sync_time(self) -> float | None:
        """Clock time (``time.time()`` by default) of the last successful (re-)list."""
        with self._lock:
            return self._last_sync_time

    @property
    def resource_version(self) -> str | None:
        """The resourceVersion the next watch starts from."""
        with self._lock:
            return self._rv

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._store.values())

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._store)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._store.get(key)

    def add_handler(self, handler: EventHandler) -> None:
        """Register another callback; call before the loop runs."""
        self._handlers.append(handler)

    # -- loop (one thread) -----------------------------------------------------------------
    def run_once(self, timeout_seconds: float = 5) -> None:
        """One bounded pass: list if needed, one watch of at most ``timeout_seconds``.

        A 410 during the watch is answered with a re-list before returning. Other API errors
        are raised as ``KubeError``.
        """
        if self._thread is not None:
            raise RuntimeError(f"ListWatch {self.name} runs in a thread; run_once is not allowed")
        self._stop.clear()
        self._pass(max(1, math.ceil(timeout_seconds)))

    def start(self) -> None:
        """Run the loop forever in a daemon thread until ``stop()``."""
        if self._thread is not None:
            raise RuntimeError(f"ListWatch {self.name} already started")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run_forever, name=f"listwatch-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the background loop (closing an open watch) and wait for it to end."""
        self._stop.set()
        thread = self._thread
        deadline = time.monotonic() + timeout_s
        while True:
            self._close_watch()  # again each round: a watch may have just opened its connection
            if thread is None or not thread.is_alive() or time.monotonic() >= deadline:
                break
            thread.join(0.05)
        if thread is not None and thread.is_alive():
            log.warning("ListWatch %s: thread did not stop within %.1fs", self.name, timeout_s)
        self._thread = None

    def _close_watch(self) -> None:
        watch = self._watch
        if watch is not None:
            watch.stop()

    def _run_forever(self) -> None:
        backoff = _BACKOFF_INITIAL_S
        while not self._stop.is_set():
            try:
                self._pass(self._watch_timeout_s)
                backoff = _BACKOFF_INITIAL_S
            except Exception as exc:  # keep the mirror alive through any failure
                if self._stop.is_set():
                    break
                log.warning("ListWatch %s: %s; retrying in %.1fs", self.name, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _pass(self, timeout_seconds: int) -> None:
        if self._needs_list:
            self._relist()
        try:
            self._watch_once(timeout_seconds)
        except _Expired as exc:
            log.warning("ListWatch %s: watch expired (410: %s); re-listing", self.name, exc)
            self._needs_list = True
            self._relist()

    def _relist(self) -> None:
        result = list_all(
            self._list_func, *self._list_args, page_size=self._page_size, **self._selectors
        )
        fresh = {object_key(obj): obj for obj in result.items}
        with self._lock:
            old = self._store
            self._store = fresh
            self._rv = result.resource_version
            self._synced = True
            self._last_sync_time = self._clock()
        self._needs_list = False
        log.info(
            "ListWatch %s: listed %d objects at resourceVersion %s",
            self.name,
            len(fresh),
            result.resource_version,
        )
        for event_type, obj in _diff(old, fresh):
            self._notify(event_type, obj)

    def _watch_once(self, timeout_seconds: int) -> None:
        if self._stop.is_set():
            return
        self._watch = _RawWatch()
        try:
            with contextlib.closing(self._stream(self._watch, timeout_seconds)) as events:
                for event in events:
                    self._apply(event)
                    if self._stop.is_set():
                        break
        except ApiException as exc:
            error = from_api_exception(exc)
            if isinstance(error, Gone):
                raise _Expired(error.message) from exc
            raise error from exc
        finally:
            self._watch = None

    def _stream(self, watch: _RawWatch, timeout_seconds: int) -> Iterator[dict[str, Any]]:
        return watch.stream(
            self._list_func,
            *self._list_args,
            resource_version=self._rv,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_seconds,
            _request_timeout=(10, timeout_seconds + 30),
            **self._selectors,
        )

    def _apply(self, event: Mapping[str, Any]) -> None:
        event_type = str(event.get("type"))
        obj = event.get("raw_object") or event.get("object") or {}
        if event_type == "ERROR":
            self._raise_error_event(obj)
        rv = _resource_version(obj)
        if event_type == "BOOKMARK":
            self._set_rv(rv)
            return
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("ListWatch %s: ignoring unknown event type %r", self.name, event_type)
            return
        with self._lock:
            if event_type == "DELETED":
                self._store.pop(object_key(obj), None)
            else:
                self._store[object_key(obj)] = obj
            if rv:
                self._rv = rv
        self._notify(event_type, obj)

    def _raise_error_event(self, status: Mapping[str, Any]) -> None:
        error = from_status(dict(status))
        if isinstance(error, Gone):
            raise _Expired(error.message)
        raise error

    def _set_rv(self, rv: str | None) -> None:
        if rv:
            with self._lock:
                self._rv = rv

    def _notify(self, event_type: str, obj: dict[str, Any]) -> None:
        for handler in self._handlers:
            try:
                handler(event_type, obj)
            except Exception:
                log.exception(
                    "ListWatch %s: on_event handler failed for %s %s",
                    self.name,
                    event_type,
                    object_key(obj),
                )


def _handlers(on_event: EventHandler | Iterable[EventHandler] | None) -> list[EventHandler]:
    if on_event is None:
        return []
    if callable(on_event):
        return [on_event]
    return list(on_event)


def _diff(
    old: Mapping[str, dict[str, Any]], new: Mapping[str, dict[str, Any]]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The events that turn ``old`` into ``new``: ADDED, MODIFIED (rv changed), DELETED."""
    for key, obj in new.items():
        if key not in old:
            yield "ADDED", obj
        elif _resource_version(old[key]) != _resource_version(obj):
            yield "MODIFIED", obj
    for key, obj in old.items():
        if key not in new:
            yield "DELETED", obj
