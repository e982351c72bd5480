"""Helpers shared by the GPU benchmarks: timing, measured copy bandwidth, and result files (JSON, Markdown, PNG).

Bandwidths count bytes read plus bytes written, as the copy bandwidth does, so "fraction of copy bandwidth" compares
like with like. Without a CUDA device the timers fall back to wall-clock time, which is only good for smoke-testing a
script (e.g. under TRITON_INTERPRET=1), never for numbers.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch
import triton


def median_ms(fn: Callable[[], object], *, repeats: int = 3, warmup_ms: int = 25, rep_ms: int = 200) -> dict:
    """Median time of ``fn`` in ms: ``repeats`` independent ``triton.testing.do_bench`` medians, reported as their
    median with the spread (min/max), so a difference smaller than the spread reads as noise."""
    if torch.cuda.is_available():
        samples = [triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
                   for _ in range(repeats)]
    else:
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples)}


def gb_per_s(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth(numel: int = 1 << 28, device="cuda") -> dict:
    """Device-to-device copy of ``numel`` random fp32 values; GB/s counting bytes read plus bytes written."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    timing = median_ms(lambda: dst.copy_(src))
    return {"numel": numel, **timing, "gb_per_s": gb_per_s(2 * 4 * numel, timing["ms"])}


def environment() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "interpreted": os.environ.get("TRITON_INTERPRET") == "1"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["device"] = "cpu"
    return info


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns`` = (key, header, format spec such as ".1f"); missing or None values print as "n/a"."""
    def cell(row, key, spec):
        value = row.get(key)
        return "n/a" if value is None else format(value, spec)
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, key, spec) for key, _, spec in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


def grouped_bar_plot(path: str, title: str, categories: Sequence[str], series: dict[str, Sequence[float | None]],
                     ylabel: str, reference: tuple[float, str] | None = None) -> None:
    """One group of bars per category, one bar per series (None leaves a gap); optional horizontal reference line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(categories) + 2), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        present = [(x, v) for x, v in zip(xs, values) if v is not None]
        bars = ax.bar([x for x, _ in present], [v for _, v in present], width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    if reference is not None:
        ax.axhline(reference[0], color="black", linestyle="--", linewidth=1, label=reference[1])
    ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def cuda_event_ms(fn) -> float:
    """Milliseconds of one call of ``fn`` on the current CUDA stream, between two CUDA events."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def back_to_back_ms(fn: Callable[[], object], device: torch.device, steps: int, repeats: int = 5) -> list[float]:
    """Milliseconds per call of ``steps`` calls enqueued without synchronising, between two CUDA events (median of
    ``repeats`` such runs is the caller's): the GPU's time per step once the host runs ahead of it, as it does in
    training, where the step's host work overlaps the backward pass still running on the GPU. Host-bound steps
    (host time per call above the GPU's) measure the host instead. On the CPU: wall clock per call."""
    def run():
        for _ in range(steps):
            fn()

    times = []
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            times.append(cuda_event_ms(run) / steps)
        else:
            begin_s = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - begin_s) / steps)
    return times
