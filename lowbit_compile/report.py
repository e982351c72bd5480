"""What the lowbit pass did to the last graph it compiled: ``lbc.compile_report()``.

Recorded when the pass runs. A compiled graph loaded from inductor's FX-graph cache skips the pass, so it leaves
no report (clear the cache, or set ``TORCHINDUCTOR_FX_GRAPH_CACHE=0``, to see one).
"""
from __future__ import annotations

import collections
import dataclasses
import threading


@dataclasses.dataclass(frozen=True)
class FusedGroup:
    """One ``lowbit::fused_update_`` launch: ``num_tensors`` parameters' regions run by one generated kernel."""

    spec: str
    num_tensors: int
    source: str
    regions: tuple[str, ...]
    device: str


@dataclasses.dataclass(frozen=True)
class UnfusedRegion:
    """A region left as it was (its anchors run their eager reference code); ``op`` is the op that blocked it, if
    one did."""

    region: str
    reason: str
    op: str | None = None


@dataclasses.dataclass(frozen=True)
class CompileReport:
    fused: tuple[FusedGroup, ...] = ()
    unfused: tuple[UnfusedRegion, ...] = ()
    graph: str = ""  # the post-grad graph after the pass
    note: str = ""  # set when the backend took another route than the pass (CPU without Triton)

    @property
    def launches(self) -> int:
        return len(self.fused)

    def __str__(self) -> str:
        lines = [f"lowbit: {sum(g.num_tensors for g in self.fused)} regions fused into {self.launches} launch(es), "
                 f"{len(self.unfused)} unfused"] + ([f"  {self.note}"] if self.note else [])
        for g in self.fused:
            more = " ..." if g.num_tensors > 1 else ""
            lines.append(f"  fused x{g.num_tensors} on {g.device}: {g.regions[0]}{more}")
        for u in self.unfused:
            lines.append(f"  unfused {u.region}: {u.reason}" + (f" [{u.op}]" if u.op else ""))
        return "\n".join(lines)


_HISTORY: collections.deque = collections.deque(maxlen=32)
_LOCK = threading.Lock()


def record(report: CompileReport) -> None:
    with _LOCK:
        _HISTORY.append(report)


def compile_report() -> CompileReport:
    """The report of the most recent graph the lowbit pass ran on (an empty report if it has not run)."""
    with _LOCK:
        return _HISTORY[-1] if _HISTORY else CompileReport()


def clear_compile_reports() -> None:
    """Forget earlier reports (so a compilation served from the cache, which leaves none, is recognisable)."""
    with _LOCK:
        _HISTORY.clear()


def compile_reports() -> list[CompileReport]:
    """Reports of the most recent graphs (oldest first, up to 32): a step with graph breaks compiles several."""
    with _LOCK:
        return list(_HISTORY)


__all__ = ["CompileReport", "FusedGroup", "UnfusedRegion", "compile_report", "compile_reports",
           "clear_compile_reports", "record"]
