"""Mermaid `stateDiagram-v2` export of the transition table (printed by `deepspm fsm --mermaid`).

One edge per (row, source) in table order, guards in brackets; the golden test pins the output so
every change to the FSM shows up in review.
"""

from __future__ import annotations

from .states import TERMINAL_STATES, State
from .table import TABLE, Transition


def mermaid(table: tuple[Transition, ...] = TABLE) -> str:
    """The diagram as text, ending with a newline; deterministic (table order, then source order)."""
    lines = [
        "stateDiagram-v2",
        "    %% generated from deepspm.fsm.table.TABLE by deepspm.fsm.diagram.mermaid(); do not edit",
        f"    [*] --> {State.idle.value}",
    ]
    for row in table:
        label = row.trigger if row.guard is None else f"{row.trigger} [{row.guard}]"
        lines.extend(f"    {source.value} --> {row.dest.value} : {label}" for source in row.sources)
    terminal = [s for s in State if s in TERMINAL_STATES]
    lines.extend(f"    {s.value} --> [*]" for s in terminal)
    lines.append("    classDef terminal font-weight:bold,stroke-width:3px")
    lines.extend(f"    class {s.value} terminal" for s in terminal)
    return "\n".join(lines) + "\n"
