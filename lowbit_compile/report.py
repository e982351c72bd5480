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
    """``num_tensors`` parameters' regions with one kernel spec: a part of the ``lowbit::fused_update_`` launch number
    ``launch`` (one launch per device runs every part; ``source`` is the launch's generated kernel)."""

    spec: str
    num_tensors: int
    source: str
    regions: tuple[str, ...]
    device: str
    launch: int = 0
    launch_spec: str = ""  # the whole launch's spec (``templates.fused_update.LaunchSpec``)


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
    scalar_writes: tuple[str, ...] = ()  # 0-d graph inputs (the step counter) the launches write

    @property
    def launches(self) -> int:
        return len({g.launch for g in self.fused})

    def __str__(self) -> str:
        lines = [f"lowbit: {sum(g.num_tensors for g in self.fused)} regions fused into {len(self.fused)} kernel "
                 f"spec(s), {self.launches} launch(es), {len(self.unfused)} unfused"]
        lines += [f"  {self.note}"] if self.note else []
        lines += [f"  the launches also write {', '.join(self.scalar_writes)}"] if self.scalar_writes else []
        for g in self.fused:
            more = " ..." if g.num_tensors > 1 else ""
            lines.append(f"  fused x{g.num_tensors} on {g.device} (launch {g.launch}): {g.regions[0]}{more}")
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
