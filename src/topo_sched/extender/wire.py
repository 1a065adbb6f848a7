"""The kube-scheduler extender wire format (``k8s.io/kube-scheduler/extender/v1``), as pydantic.

The Go structs have no json tags, so every key is the Go field name (``Pod``, ``NodeNames``,
``FailedNodes`` ...), not lowerCamelCase. The scheduler always sends both ``Nodes`` and
``NodeNames`` and sets the unused one to ``null`` (``nodeCacheCapable`` decides which).
Pod and Node objects stay raw dicts: the extender hands them to the placement core and echoes
Node objects back unchanged, so modelling them would only cost time and risk losing fields.

Replies are decoded by Go's case-insensitive ``encoding/json``, which ignores unknown keys; the
``Warnings`` list on :class:`ExtenderFilterResult` is ours (humans and tests read it, the
scheduler does not).

Captured requests and replies: ``shared/fixtures/kube-scheduler-extender/``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

__all__ = [
    "MAX_EXTENDER_PRIORITY",
    "ExtenderArgs",
    "ExtenderBindingArgs",
    "ExtenderBindingResult",
    "ExtenderFilterResult",
    "HostPriority",
    "NodeList",
    "ValidationError",
    "describe_validation_error",
]

#: ``extenderv1.MaxExtenderPriority``: prioritize scores are integers 0..10.
MAX_EXTENDER_PRIORITY = 10


class _Wire(BaseModel):
    # Unknown keys are ignored, as Go's decoder does; keys are matched case-sensitively
    # because the scheduler always sends the exact Go names.
    model_config = ConfigDict(extra="ignore", populate_by_name=False)


class NodeList(_Wire):
    """``v1.NodeList`` as the scheduler sends it: ``{"metadata": {}, "items": [Node, ...]}``."""

    metadata: dict[str, Any] | None = None
    items: list[dict[str, Any]] | None = None


class ExtenderArgs(_Wire):
    """Body of ``POST <prefix>/filter`` and ``POST <prefix>/prioritize``."""

    Pod: dict[str, Any]
    Nodes: NodeList | None = None
    NodeNames: list[StrictStr] | None = None


class ExtenderFilterResult(_Wire):
    """Reply to filter. Exactly one of ``Nodes``/``NodeNames`` carries the survivors.

    ``FailedNodes``: node -> reason, preemption may help. ``FailedAndUnresolvableNodes``:
    node -> reason, preemption cannot help. ``Error`` non-empty fails the whole scheduling
    attempt (the extender never sets it for a node problem).
    """

    Nodes: NodeList | None = None
    NodeNames: list[str] | None = None
    FailedNodes: dict[str, str] = Field(default_factory=dict)
    FailedAndUnresolvableNodes: dict[str, str] = Field(default_factory=dict)
    Error: str = ""
    #: Not in the Go struct (ignored by the scheduler): notes such as a bad per-RBG annotation.
    Warnings: list[str] = Field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object to send: the five Go keys always, ``Warnings`` only when non-empty.

        Node objects are passed through as the same dicts (no copy, no re-validation).
        """
        out: dict[str, Any] = {
            "Nodes": None
            if self.Nodes is None
            else {"metadata": self.Nodes.metadata or {}, "items": self.Nodes.items or []},
            "NodeNames": self.NodeNames,
            "FailedNodes": self.FailedNodes,
            "FailedAndUnresolvableNodes": self.FailedAndUnresolvableNodes,
            "Error": self.Error,
        }
        if self.Warnings:
            out["Warnings"] = self.Warnings
        return out


class HostPriority(_Wire):
    """One element of the ``HostPriorityList`` that prioritize answers (a bare JSON list)."""

    Host: str
    Score: int = Field(ge=0, le=MAX_EXTENDER_PRIORITY)


class ExtenderBindingArgs(_Wire):
    """Body of ``POST <prefix>/bind``."""

    PodName: StrictStr = Field(min_length=1)
    PodNamespace: StrictStr = Field(min_length=1)
    PodUID: StrictStr = ""
    Node: StrictStr = Field(min_length=1)


class ExtenderBindingResult(_Wire):
    """Reply to bind: ``Error`` empty means the pod is bound."""

    Error: str = ""


def describe_validation_error(exc: ValidationError, *, limit: int = 3) -> str:
    """A short, human text for a request that did not match the wire model."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(body)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)
