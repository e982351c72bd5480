"""Shampoo step time and state memory on one GPU, ours (4-bit and 32-bit) next to Distributed Shampoo and fused AdamW.

    python3 benchmarks/shampoo.py --out DIR            # on the H100: DIR/shampoo.{json,md,png}
    python3 benchmarks/shampoo.py --cpu-smoke --out DIR  # one d=64 layer on the CPU: checks this script's logic
    python3 benchmarks/shampoo.py --plot DIR/shampoo.json   # redraw the PNG from a result file (no GPU needed)

Workload: the 12-layer d=1024 stack of DESIGN.md §7 (per layer Wqkv 3072x1024, Wo 1024x1024, W1 4096x1024, W2 1024x4096
and two 1024 vectors; 151.0M fp32 parameters), max preconditioner dim 1024, Adam(W) grafting, lr 1e-3, random gradients
(new ones before every step, outside the timed region).

Step times are CUDA-event times, two ways. Alone: single ``opt.step()`` calls after the GPU drained (the host's time
before the first kernel included). Back-to-back (b2b): runs of plain steps enqueued without synchronising, two pre-drawn
gradient sets alternating (``_common.back_to_back_ms``): the GPU's time per step when the host runs ahead, as in
training, where the optimizer's host work overlaps the backward pass; a host-bound step measures its host time. Ours is
timed separately as a plain step, a statistics-refresh step (every T1 = 100) and a statistics + inverse-root step (every
T2 = 500), forced by setting the optimizer's step counter (the work of a step does not depend on the state's values: no
data-dependent branches); amortized = ((T2 - T2/T1) plain + (T2/T1 - 1) refresh + 1 both) / T2 from the medians, with
the plain step alone or back-to-back (refresh steps always alone). Distributed Shampoo (facebookresearch/optimizers, put
under .ext/, not part of this repository) runs 130 steps at precondition_frequency = start_preconditioning_step = 100:
its refresh is step 100, its plain step the median of steps 101-130 (back-to-back: steps 131-190), amortized = (99 plain
+ refresh) / 100. State bytes: ours counted from the state tensors (all state, and the preconditioner alone); for every
optimizer also the anchor script's measure, memory allocated after the steps minus parameters and gradients. Peak: max
memory allocated, parameters and gradients included.

Ours runs with its default per-step path (decode the 4-bit roots per chunk of blocks, cuBLAS TF32 batched matmuls),
eagerly and, for 4 bits, also as ``torch.compile(opt.step, backend="lowbit")`` (the per-step work one inductor graph,
each refresh chunk shape its own compiled region) and as the same with ``mode="reduce-overhead"`` (the per-step graph
replayed as a CUDA graph: its kernels are one launch; the gradients, new tensors at every step as in training, are
copied into the graph's buffers, the state is read in place), timed the same way after the compiling steps (the
first plain, refresh and root steps, reported as first_*_ms, include compilation and graph recording). The fused Triton
dequant-matmul (``fused=True``) is timed on its own on this workload's block batch (144 blocks of 1024 x 1024), for its
tile candidates, next to decode + cuBLAS for the same two products.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / ".ext"))

from benchmarks._common import (back_to_back_ms, cuda_event_ms, environment, grouped_bar_plot, markdown_table,  # noqa: E402
                               write_json)

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
T1, T2 = 100, 500
# The workload: the GPU run's, or (--cpu-smoke) one d=64 layer on the CPU with few timed steps.
SETUP = {"device": "cuda", "width": 1024, "plain_steps": 30}


def layer_shapes(layers: int, width: int | None = None) -> list[tuple[int, ...]]:
    w = width or SETUP["width"]
    return [(3 * w, w), (w, w), (4 * w, w), (w, 4 * w), (w,), (w,)] * layers


def make_params(layers: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=SETUP["device"]).manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, device=SETUP["device"], generator=gen) * 0.02)
            for s in layer_shapes(layers)]


def set_grads(params, seed: int) -> None:
    gen = torch.Generator(device=SETUP["device"]).manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, device=SETUP["device"], generator=gen) * 1e-2


def timed(fn) -> float:
    if SETUP["device"] != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    return cuda_event_ms(fn)


def timed_steps(step, params, seeds) -> list[float]:
    times = []
    for seed in seeds:
        set_grads(params, seed)
        times.append(timed(step))
    return times


def back_to_back_plain_ms(step, params, steps: int, repeats: int = 5, before=lambda: None) -> float:
    """Plain steps back to back (``_common.back_to_back_ms``: the GPU's time per step when the host runs ahead, as in
    training; a host-bound step measures its host time). Two gradient sets drawn beforehand alternate by assignment,
    so the timed runs enqueue optimizer work only; ``before`` runs ahead of each step (keeps a step counter off the
    refresh steps)."""
    sets = []
    for seed in (7, 8):
        set_grads(params, seed)
        sets.append([p.grad for p in params])
    calls = itertools.count()

    def one():
        for p, g in zip(params, sets[next(calls) % 2]):
            p.grad = g
        before()
        step()
    return statistics.median(back_to_back_ms(one, torch.device(SETUP["device"]), steps, repeats))


class Run:
    """Memory bookkeeping around one optimizer: parameters and gradients first, then the optimizer."""

    def __init__(self, layers: int):
        self.cuda = SETUP["device"] == "cuda"
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.params = make_params(layers)
        set_grads(self.params, 0)
        if self.cuda:
            torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated() if self.cuda else 0
        self.numel = sum(p.numel() for p in self.params)

    def memory(self) -> dict:
        if not self.cuda:
            return {}
        torch.cuda.synchronize()
        return {"allocated_B_per_param": (torch.cuda.memory_allocated() - self.base) / self.numel,
                "peak_GB": torch.cuda.max_memory_allocated() / 1e9}


# --------------------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------------------
def bench_adamw(layers: int) -> dict:
    run = Run(layers)
    opt = torch.optim.AdamW(run.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, fused=True)
    timed_steps(opt.step, run.params, range(1, 6))
    times = timed_steps(opt.step, run.params, range(100, 100 + SETUP["plain_steps"]))
    plain = statistics.median(times)
    b2b = back_to_back_plain_ms(opt.step, run.params, SETUP["plain_steps"])
    return {"name": "torch AdamW fused", "plain_ms": plain, "amortized_ms": plain, "mean_ms": statistics.mean(times),
            "plain_b2b_ms": b2b, "amortized_b2b_ms": b2b,
            **run.memory(), "state_B_per_param": 8.0}


def bench_distributed_shampoo(layers: int) -> dict:
    from distributed_shampoo import AdamPreconditionerConfig, DistributedShampoo
    run = Run(layers)
    opt = DistributedShampoo(run.params, lr=LR, betas=BETAS, epsilon=1e-12, weight_decay=0.0,
                             max_preconditioner_dim=1024, precondition_frequency=T1, start_preconditioning_step=T1,
                             grafting_config=AdamPreconditionerConfig(beta2=BETAS[1], epsilon=EPS))
    times = timed_steps(opt.step, run.params, range(1, 131))
    refresh_index = max(range(T1 - 5, T1 + 5), key=lambda i: times[i])  # step T1 (its counter's first refresh)
    refresh = times[refresh_index]
    plain = statistics.median(times[refresh_index + 1:])
    # Steps 131-190: plain steps (the next refresh is step 200).
    b2b = back_to_back_plain_ms(opt.step, run.params, steps=20, repeats=3)
    return {"plain_b2b_ms": b2b, "amortized_b2b_ms": ((T1 - 1) * b2b + refresh) / T1,"name": f"Distributed Shampoo fp32 (eigh), f={T1}", "plain_ms": plain, "refresh_ms": refresh,
            "amortized_ms": ((T1 - 1) * plain + refresh) / T1, "refresh_step": refresh_index + 1,
            "first_steps_ms": statistics.median(times[5:T1 - 1]), **run.memory()}


def bench_ours(layers: int, bits: int, compiled: bool = False, mode: str | None = None) -> dict:
    from torch._dynamo.utils import counters

    from lowbit_compile.optim.shampoo import Shampoo
    run = Run(layers)
    opt = Shampoo(run.params, lr=LR, bits=bits, betas=BETAS, eps=EPS, max_preconditioner_dim=SETUP["width"],
                  precondition_frequency=T1, inverse_root_frequency=T2, grafting="adamw")
    if compiled:
        torch._dynamo.reset()
        counters.clear()
    step = torch.compile(opt.step, backend="lowbit", mode=mode) if compiled else opt.step
    # Compile everything once: plain steps, a statistics refresh, an inverse-root refresh (the step counter is Python
    # state read outside the compiled graph, so setting it forces a refresh step).
    first_steps = timed_steps(step, run.params, range(1, 4))
    opt._step = T1 - 1
    first_refresh = timed_steps(step, run.params, [4])[0]
    opt._step = T2 - 1
    first_root = timed_steps(step, run.params, [5])[0]
    graphs_compiled = counters["stats"]["unique_graphs"] if compiled else None
    opt._step = 10 * T2
    plain_times = timed_steps(step, run.params, range(100, 100 + SETUP["plain_steps"]))
    refresh_times, both_times = [], []
    for k in range(1, 4):
        opt._step = 10 * T2 + k * T1 - 1
        refresh_times += timed_steps(step, run.params, [200 + k])
    for k in (20, 30):
        opt._step = k * T2 - 1
        both_times += timed_steps(step, run.params, [300 + k])
    opt._step = 10 * T2
    plain_b2b = back_to_back_plain_ms(step, run.params, SETUP["plain_steps"],
                                      before=lambda: setattr(opt, "_step", 10 * T2))
    plain, refresh, both = (statistics.median(t) for t in (plain_times, refresh_times, both_times))
    per_window = T2 // T1

    def amortized_over(plain_ms):
        return ((T2 - per_window) * plain_ms + (per_window - 1) * refresh + both) / T2
    amortized = amortized_over(plain)
    label = "" if not compiled else f" compiled (backend=lowbit{', mode=' + mode if mode else ''})"
    row = {"name": f"ours Shampoo {bits}-bit{label}",
           "plain_ms": plain, "refresh_ms": refresh, "refresh_and_root_ms": both, "amortized_ms": amortized,
           "plain_b2b_ms": plain_b2b, "amortized_b2b_ms": amortized_over(plain_b2b),
           "first_steps_ms": first_steps, "first_refresh_ms": first_refresh, "first_root_ms": first_root,
           "plain_times_ms": plain_times, "refresh_times_ms": refresh_times, "both_times_ms": both_times,
           "state_B_per_param": opt.state_bytes() / run.numel,
           "preconditioner_B_per_param": opt.state_bytes(preconditioner_only=True) / run.numel,
           "refresh_counts": opt.refresh_counts(), **run.memory()}
    if compiled:
        # Graphs after the compiling steps and at the end (equal: no recompilation), and the step's graph breaks
        # (expected: only the un-traced _begin_step).
        row.update(graphs_after_warmup=graphs_compiled, graphs_at_end=counters["stats"]["unique_graphs"],
                   graph_breaks=sorted({reason.split("\n")[0][:120] for reason in counters["graph_break"]}),
                   cudagraph_skips=counters["inductor"]["cudagraph_skips"])
        return row
    # The preconditioning alone (both fused dequant-matmuls of every block, norms and grafting scale).
    grads = [p.grad for p in run.params]
    grads2d = [None if s is None else g.reshape(s) for g, s in zip(grads, opt._shapes2d)]
    precondition = statistics.median(timed(lambda: opt._directions(grads, grads2d)) for _ in range(10))
    flops = sum(2 * b.rows * b.cols * (b.rows + b.cols) for batch in opt.batches for b in batch.blocks)
    row.update(precondition_ms=precondition, precondition_tflops=flops / precondition / 1e9)
    return row


# --------------------------------------------------------------------------------------------------------------
# Kernel tiles
# --------------------------------------------------------------------------------------------------------------
# The best two of a first sweep (2026-11-23, H100): quantized 128,256,32,8,3 14.8 ms > 128,128,64,8,3 19.9 >
# 128,128,32,8,3 20.8 > 128,64,32,4,4 22.8 > 64,128,32,4,4 25.3; transposed 64,256,32,8,3 8.8 > 64,128,32,4,3 13.8 >
# 64,128,64,4,3 15.0 > 32,128,32,4,4 17.6 > 64,64,32,4,4 27.1.
CANDIDATES = {
    "quantized": [(128, 256, 32, 8, 3), (128, 128, 32, 8, 3)],
    "quantized_transposed": [(64, 256, 32, 8, 3), (64, 128, 32, 4, 3)],
}


def _tiles_text(tiles) -> str:
    return ",".join(map(str, tiles))


def sweep_tiles(count: int = 144, order: int = 1024) -> list[dict]:
    """Times each candidate tile shape of the two per-step kernels on ``count`` blocks of ``order``; keeps the
    fastest in ``templates.shampoo.TILES``; also times dequantize + cuBLAS (TF32) for the same products."""
    import triton

    from lowbit_compile.formats import Q4
    from lowbit_compile.optim.shampoo import _decode_rows, _encode_rows
    from lowbit_compile.templates import shampoo as templates

    fmt = Q4(map="linear2")
    gen = torch.Generator(device="cuda").manual_seed(1)
    root = torch.randn(count, order, order, device="cuda", generator=gen) / order**0.5
    lhs = templates.QuantizedRows(*_encode_rows(root, fmt), fmt, order)
    del root
    diag = torch.ones(count, order, device="cuda")
    grad = torch.randn(count, order, order, device="cuda", generator=gen)
    work = torch.empty_like(grad)
    out = torch.empty_like(grad)
    flops = 2 * count * order**3
    rows = []
    for kind, transposed in (("quantized", False), ("quantized_transposed", True)):
        rhs = templates.batch_table(work, transposed=True) if transposed else templates.batch_table(grad)
        dst = templates.batch_table(out, transposed=True) if transposed else templates.batch_table(work)
        best = None
        for tiles in CANDIDATES[kind]:
            templates.TILES[kind] = tiles
            call = lambda: templates.batched_matmul(lhs, rhs, dst, order, order, order, lhs_transposed=transposed,
                                                    diag=diag, sanitize=transposed)
            try:
                ms = triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")
                rows.append({"kernel": kind, "tiles": _tiles_text(tiles), "ms": ms, "tflops": flops / ms / 1e9})
                if best is None or ms < best[0]:
                    best = (ms, tiles)
            except Exception as error:  # a candidate that does not compile (shared memory, registers) is skipped
                rows.append({"kernel": kind, "tiles": _tiles_text(tiles), "error": repr(error)[:200]})
        templates.TILES[kind] = best[1]
        rows.append({"kernel": kind, "chosen": _tiles_text(best[1]), "ms": best[0]})

    def unfused():
        decoded = _decode_rows(lhs)
        torch.bmm(decoded, grad, out=work)
        torch.bmm(work, decoded, out=out)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        ms = triton.testing.do_bench(unfused, warmup=25, rep=200, return_mode="median")
    finally:
        torch.set_float32_matmul_precision(previous)
    rows.append({"kernel": "dequantize + 2 cuBLAS TF32 bmm (both products)", "ms": ms, "tflops": 2 * flops / ms / 1e9})
    return rows


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
COLUMNS = [("name", "optimizer", "s"), ("amortized_b2b_ms", "amortized ms/step back-to-back", ".2f"),
           ("amortized_ms", "amortized ms/step alone", ".2f"), ("plain_b2b_ms", "plain step ms back-to-back", ".2f"),
           ("plain_ms", "plain step ms alone", ".2f"), ("refresh_ms", "refresh step ms", ".1f"),
           ("refresh_and_root_ms", "refresh+root step ms", ".1f"),
           ("state_B_per_param", "state B/param", ".3f"),
           ("preconditioner_B_per_param", "preconditioner B/param", ".3f"),
           ("allocated_B_per_param", "allocated B/param", ".2f"), ("peak_GB", "peak GB", ".2f")]


def report(result: dict) -> str:
    env = result["environment"]
    width = result.get("width", 1024)
    rows = [r for r in result["optimizers"] if "error" not in r]
    lines = [f"# Shampoo — {env.get('device')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}; {env.get('date')}. {result['numel'] / 1e6:.1f}M "
             f"fp32 parameters ({result['layers']} layers d={width}), max preconditioner dim {width}, AdamW "
             f"grafting, T1 = {T1}, T2 = {T2}." + (" CPU smoke run: timings check the script, not the code."
                                                   if result.get("cpu_smoke") else ""),
             "", markdown_table(rows, COLUMNS), ""]
    for r in result["optimizers"]:
        if "error" in r:
            lines.append(f"- {r['name']}: failed: {r['error']}")
    ours = {r["name"]: r for r in rows}
    four, thirty_two = ours.get("ours Shampoo 4-bit"), ours.get("ours Shampoo 32-bit")
    if four:
        lines.append(f"- 4-bit: preconditioning alone {four['precondition_ms']:.2f} ms "
                     f"({four['precondition_tflops']:.0f} TFLOP/s over the two products per block); refresh counts "
                     f"{four['refresh_counts']}.")
    if four and thirty_two:
        ratio = thirty_two["preconditioner_B_per_param"] / four["preconditioner_B_per_param"]
        lines.append(f"- preconditioner state 32-bit / 4-bit = {ratio:.2f}x.")
    for r in rows:
        if "graphs_at_end" in r:
            first = ", ".join(f"{t:.0f}" for t in r["first_steps_ms"])
            lines.append(f"- {r['name']}: first steps {first} ms, first refresh {r['first_refresh_ms']:.0f} ms, first "
                         f"root {r['first_root_ms']:.0f} ms (compilation included); graphs compiled "
                         f"{r['graphs_after_warmup']} after those steps, {r['graphs_at_end']} at the end; graph "
                         f"breaks: {r['graph_breaks']}" + (f"; CUDA graphs skipped {r['cudagraph_skips']} times"
                                                           if "reduce-overhead" in r["name"] else "") + ".")
    if "tiles" not in result:
        return "\n".join(lines)
    lines += ["", "## Fused dequant-matmul (fused=True) vs decode + cuBLAS, 144 blocks of 1024 x 1024", "",
              markdown_table(result["tiles"], [("kernel", "kernel", "s"), ("tiles", "BM,BN,BK,warps,stages", "s"),
                                               ("chosen", "chosen", "s"), ("ms", "ms", ".3f"),
                                               ("tflops", "TFLOP/s", ".0f"), ("error", "error", "s")]), ""]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    rows = [r for r in result["optimizers"] if "error" not in r]
    names = [r["name"] for r in rows]
    grouped_bar_plot(path, f"Shampoo, {result['numel'] / 1e6:.0f}M params — {result['environment'].get('device')}",
                     names, {"amortized ms/step back-to-back": [r.get("amortized_b2b_ms") for r in rows],
                             "amortized ms/step alone": [r.get("amortized_ms") for r in rows],
                             "allocated state B/param": [r.get("allocated_B_per_param") for r in rows]},
                     "ms  |  bytes/param", reference=(10.0, "target 10 ms (4-bit)"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--plot", help="redraw the PNG from this result JSON and exit")
    parser.add_argument("--only", help="run only optimizers whose name contains this")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="one d=64 layer on the CPU, few steps, no kernel sweep or Distributed Shampoo")
    args = parser.parse_args()
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        plot(result, str(Path(args.plot).with_suffix(".png")))
        return
    if args.cpu_smoke:
        SETUP.update(device="cpu", width=64, plain_steps=3)
        args.layers = 1
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or pass --cpu-smoke")
    os.makedirs(args.out, exist_ok=True)
    result = {"environment": environment(), "layers": args.layers, "width": SETUP["width"],
              "cpu_smoke": args.cpu_smoke, "numel": sum(torch.Size(s).numel() for s in layer_shapes(args.layers))}
    print(json.dumps(result["environment"]), flush=True)
    if not args.cpu_smoke:
        try:
            result["tiles"] = sweep_tiles()
        except Exception:
            traceback.print_exc()
            result["tiles"] = [{"kernel": "sweep", "error": traceback.format_exc(limit=3)[-300:]}]
        print(json.dumps(result["tiles"]), flush=True)
    benches = [("torch AdamW fused", lambda: bench_adamw(args.layers)),
               ("ours Shampoo 4-bit", lambda: bench_ours(args.layers, 4)),
               ("ours Shampoo 4-bit compiled (backend=lowbit)", lambda: bench_ours(args.layers, 4, compiled=True)),
               ("ours Shampoo 4-bit compiled (backend=lowbit, mode=reduce-overhead)",
                lambda: bench_ours(args.layers, 4, compiled=True, mode="reduce-overhead")),
               ("ours Shampoo 32-bit", lambda: bench_ours(args.layers, 32))]
    if not args.cpu_smoke:
        benches.append(("Distributed Shampoo", lambda: bench_distributed_shampoo(args.layers)))
    result["optimizers"] = []
    for name, bench in benches:
        if args.only and args.only not in name:
            continue
        try:
            row = bench()
        except Exception as error:
            traceback.print_exc()
            row = {"name": name, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        result["optimizers"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("times_ms")}), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = Path(args.out)
    write_json(str(out / "shampoo.json"), result)
    (out / "shampoo.md").write_text(report(result))
    print(report(result))
    try:
        plot(result, str(out / "shampoo.png"))
    except Exception as error:  # matplotlib may be missing on the GPU machine: redraw later with --plot
        print(f"no plot: {error!r}")


if __name__ == "__main__":
    main()
