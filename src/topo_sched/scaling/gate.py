"""The placement gate's pure part: what a scale-up asks what-if for, and what may be applied.

Shared by the live autoscaler (:mod:`topo_sched.autoscaler.placement_gate`, which asks the
extender's ``WhatIf`` over gRPC) and the simulator's ``placement-aware`` scaling policy
(:mod:`topo_sched.sim.runner`, which calls :func:`topo_sched.placement.whatif.what_if` on its
own snapshot). Only the asking differs; which units are asked for, how many of them may be
applied, and what the policy state remembers are decided here, once.

- :func:`scale_up_ask`: a ``scale`` decision that grows a role becomes an :class:`UnitAsk`.
  Strict mode, current replicas in ratio, desired in ratio: ``k`` whole ratio units (every
  role at its ratio weight per unit). Otherwise (band mode, or a strict change that also
  restores the ratio): ONE unit made of every growing role's delta, all or nothing. Holds,
  scale-downs and changes where no role grows ask nothing (None).
- :func:`gate_outcome`: given how many of the asked units what-if could place, the replicas
  that may be applied: all of the decision when every unit fits; current + the units that
  fit (whole-unit asks only); else hold at current. Never a prefill without its decode: a
  unit counts only when every pod of it found a node (what-if's rule).
- :func:`apply_gate`: the decision and policy state to keep. Nothing left out: unchanged.
  Nothing fits: a ``hold`` with code ``unplaceable`` and the state as if no change was made
  (so the rate-limit periods do not count a change that did not happen). Some units fit: the
  decision cut to them, the change recorded at its real size.

Pure: no I/O, no clock (the caller passes ``now``), no gRPC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from topo_sched.scaling.config import Mode, Target
from topo_sched.scaling.policy import ScalingState, replicas_for_units, units_of
from topo_sched.scaling.signals import Decision

__all__ = [
    "GateOutcome",
    "UnitAsk",
    "apply_gate",
    "gate_outcome",
    "growing",
    "scale_up_ask",
    "shape_text",
    "units_word",
    "whole_units",
]


def shape_text(replicas: Mapping[str, int]) -> str:
    """``4P,2D``: as the policy's reasons write a shape."""
    return ",".join(f"{n}{r[0].upper()}" for r, n in replicas.items())


def units_word(n: int) -> str:
    return f"{n} unit" if n == 1 else f"{n} units"


def growing(decision: Decision) -> dict[str, int]:
    """Per role that grows: by how many replicas."""
    return {
        r: n - decision.current.get(r, 0)
        for r, n in decision.desired.items()
        if n > decision.current.get(r, 0)
    }


def whole_units(target: Target, decision: Decision) -> tuple[int, int] | None:
    """(current units, units to add) when the change is whole strict-mode units, else None."""
    if target.mode is not Mode.STRICT:
        return None
    cur = units_of(target, decision.current)
    want = units_of(target, decision.desired)
    if cur != int(cur) or want != int(want) or want <= cur:
        return None
    if decision.current != replicas_for_units(target, cur):
        return None  # the change also restores the ratio: not whole units
    if decision.desired != replicas_for_units(target, want):
        return None
    return int(cur), int(want) - int(cur)


@dataclass(frozen=True)
class UnitAsk:
    """What a scale-up asks what-if for."""

    #: Units to ask for (``k``); 1 when the change is asked as one unit of deltas.
    units: int
    #: True: ``units`` whole ratio units; False: one unit of the growing roles' deltas.
    whole: bool
    #: Units now (whole-unit asks only; 0 otherwise).
    current_units: int
    #: Per role in one asked unit: replicas (instances). Whole units: every role of the target
    #: at its ratio weight; otherwise only the growing roles, at their deltas.
    replicas: dict[str, int]


def scale_up_ask(target: Target, decision: Decision) -> UnitAsk | None:
    """The what-if a ``scale`` decision needs, or None (hold, or no role grows)."""
    grow = growing(decision)
    if decision.action != "scale" or not grow:
        return None
    whole = whole_units(target, decision)
    if whole is not None:
        cur_units, k = whole
        return UnitAsk(k, True, cur_units, {r: int(w) for r, w in target.roles.items()})
    return UnitAsk(1, False, 0, dict(grow))


@dataclass(frozen=True)
class GateOutcome:
    """What may be applied after what-if answered ``placeable`` of ``ask.units`` units."""

    #: Replicas per role of the decision (= the decision's when everything fits; = current
    #: when nothing does).
    desired: dict[str, int]
    requested_units: int
    placeable_units: int
    #: requested - placeable (0 when everything fits).
    pending_units: int
    #: Per role that did not fit, what-if's message (``decode: 0/64 nodes: ...``).
    reasons: list[str] = field(default_factory=list)
    message: str = ""
    #: Placement cost of the units that fit (what-if's ``cost``).
    cost: float | None = None


def gate_outcome(
    target: Target,
    decision: Decision,
    ask: UnitAsk,
    placeable: int,
    reasons: Sequence[str] = (),
    cost: float | None = None,
) -> GateOutcome:
    """Scale up only by what fits (see the module doc)."""
    k = ask.units
    placeable = max(0, min(int(placeable), k))
    if placeable == k:
        cost_txt = f" (cost {cost:.2f})" if cost is not None else ""
        return GateOutcome(
            desired=dict(decision.desired),
            requested_units=k,
            placeable_units=k,
            pending_units=0,
            message=f"placement: {units_word(k)} placeable{cost_txt}",
            cost=cost,
        )
    if ask.whole and placeable > 0:
        desired = replicas_for_units(target, ask.current_units + placeable)
    else:
        desired = dict(decision.current)
        placeable = 0
    why = "; ".join(reasons) or "no reason given"
    return GateOutcome(
        desired={r: desired.get(r, decision.current.get(r, 0)) for r in decision.desired},
        requested_units=k,
        placeable_units=placeable,
        pending_units=k - placeable,
        reasons=list(reasons),
        message=f"placed {placeable} of {units_word(k)}: {why}",
        cost=cost,
    )


class GateAnswer(Protocol):
    """What :func:`apply_gate` reads of a gate's answer (GateOutcome, the live GateResult)."""

    @property
    def desired(self) -> dict[str, int]: ...

    @property
    def pending_units(self) -> int: ...

    @property
    def message(self) -> str: ...


def apply_gate(
    target: Target,
    decision: Decision,
    outcome: GateAnswer,
    new_state: ScalingState,
    unchanged: ScalingState,
    now: float,
) -> tuple[Decision, ScalingState]:
    """The decision and the policy state to keep once the gate has answered.

    ``new_state`` is what :func:`~topo_sched.scaling.policy.decide` returned with the
    decision; ``unchanged`` the same without the change it recorded (``changes`` of the state
    passed to ``decide``).
    """
    if not outcome.pending_units:
        return decision, new_state
    if outcome.desired == decision.current:
        held = dataclasses.replace(
            decision,
            desired=dict(decision.current),
            action="hold",
            reason=f"{decision.reason}; {outcome.message}; holding",
            code="unplaceable",
            units_desired=decision.units_current,
        )
        return held, unchanged
    wanted = shape_text(decision.desired)
    reason = decision.reason
    head = f"scale up to {wanted}"
    if reason.startswith(head):
        reason = f"scale up to {shape_text(outcome.desired)}{reason[len(head) :]}"
    cur_units = units_of(target, decision.current)
    new_units = units_of(target, outcome.desired)
    partial = dataclasses.replace(
        decision,
        desired=dict(outcome.desired),
        reason=f"{reason}; {outcome.message} (wanted {wanted})",
        units_desired=new_units,
    )
    return partial, unchanged.record_change(now, cur_units, new_units)
