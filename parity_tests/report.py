"""Observed parity maxima collected during a run, printed as one table by conftest's summary hook.

Framework-free on purpose: the summary hook imports it even when no parity test ran.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Observation:
    check: str
    case: str
    target: str
    item: str
    observed: str
    bound: str
    ok: bool


OBSERVATIONS: list[Observation] = []


def record(check: str, case: str, target: str, item: str, observed: str, bound: str, ok: bool) -> Observation:
    observation = Observation(check, case, target, item, observed, bound, bool(ok))
    OBSERVATIONS.append(observation)
    print(f"[parity] {check} {case} {target} {item}: {observed} (bound {bound}){'' if ok else '  FAILED'}")
    return observation


def table() -> list[str]:
    """The observations as aligned text lines, header first."""
    header = ("check", "case", "target", "item", "observed", "bound", "")
    rows = [header] + [
        (o.check, o.case, o.target, o.item, o.observed, o.bound, "" if o.ok else "FAILED") for o in OBSERVATIONS
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
