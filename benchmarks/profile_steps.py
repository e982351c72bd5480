"""Where a step's device time goes: the torch.profiler kernel table of a few steps, per case.

    python3 benchmarks/profile_steps.py                       # every case, on the GPU
    python3 benchmarks/profile_steps.py --cases adamw8 shampoo4

A diagnostic, not a benchmark: it prints, per case, the wall time of a step (CUDA events), the summed kernel time
per step and the kernels that take it, so a gap between a kernel's own time and the step's time, or an unexpected
kernel (an fp32 SIMT GEMM where a TF32 one was meant), shows. The numbers that go into the results are the
benchmarks' (step_time.py, shampoo.py).

With ``--python-profile`` each case's host side is also run under cProfile (top functions by own time).

Cases: adamw8 / adamw4 (ours compiled, 64 x 4096² fp32), gpt2_ours8 / gpt2_torch (the GPT-2-124M list), shampoo4 /
shampoo32 (a plain step of ours on the 12-layer d=1024 stack, its preconditioning alone and, 4-bit, a
statistics-refresh step), shampoo_fused (a plain step with the Triton templates), shampoo_compiled (a plain 4-bit
step compiled, default and reduce-overhead modes), host_ops (host cost of one torch op by tensor size),
shampoo_refresh (plain and refresh step times per QR panel and chunk size), host (64 tiny tensors: a step's host cost
alone, with inductor's size asserts off (our default) and on), tf32 (a batched 1024³ matmul under each float32 matmul
precision).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import cuda_event_ms  # noqa: E402
from benchmarks.shampoo import make_params as shampoo_params, set_grads  # noqa: E402
from benchmarks.step_time import BETAS, EPS, LR, WEIGHT_DECAY, gpt2_shapes  # noqa: E402


def event_ms(fn, reps: int = 10) -> float:
    return statistics.median(cuda_event_ms(fn) for _ in range(reps))


def host_ms(fn, reps: int) -> float:
    """Host time to enqueue one call (no synchronisation inside the timed loop)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    ended = time.perf_counter()
    torch.cuda.synchronize()
    return (ended - started) * 1e3 / reps


def python_profile(fn, reps: int, rows: int = 22) -> None:
    """The Python functions (and C calls) that take the host's time, by own time."""
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(reps):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print("```\n" + "\n".join(line[:190] for line in lines[start:start + rows + 1]) + "\n```", flush=True)


def profile(name: str, fn, steps: int = 3, rows: int = 14, reps: int = 10) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    wall = event_ms(fn, reps)
    host = host_ms(fn, reps)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3 / steps
    print(f"\n### {name}: step {wall:.3f} ms (CUDA events, median of {reps}); host {host:.3f} ms/step to enqueue; "
          f"kernels {busy:.3f} ms/step, {len(kernels) / steps:.0f} launches/step", flush=True)
    totals: dict[str, list[float]] = {}
    for e in kernels:
        totals.setdefault(e.name, []).append(e.device_time / 1e3)
    print("| ms/step | launches/step | kernel |\n|---|---|---|")
    for kernel, times in sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        print(f"| {sum(times) / steps:.3f} | {len(times) / steps:.1f} | {kernel[:150]} |")
    sys.stdout.flush()
    if PYTHON_PROFILE:
        python_profile(fn, max(1, min(reps, 20)))


def _params(shapes, dtype=torch.float32):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, device="cuda", generator=gen) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, device="cuda", generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


def case_ours(shapes, bits: int, name: str, mode: str = "default", options: dict | None = None) -> None:
    from lowbit_compile import optim

    params = _params(shapes)
    opt = optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, bits=bits)
    step = torch.compile(opt.step, backend="lowbit", **({"mode": mode} if options is None else {"options": options}))
    profile(f"{name}{'' if options is None else f' {options}'}", step)
    torch._dynamo.reset()


def case_torch_fused(shapes, name: str) -> None:
    params = _params(shapes)
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
    profile(name, opt.step)


def case_shampoo(bits: int) -> None:
    from lowbit_compile.optim.shampoo import Shampoo

    params = shampoo_params(12)
    set_grads(params, 1)
    opt = Shampoo(params, lr=1e-3, bits=bits, max_preconditioner_dim=1024)
    opt._step = 1000  # plain steps only (no refresh at step 1001..)
    profile(f"Shampoo {bits}-bit plain step", opt.step)
    grads = [p.grad for p in params]
    grads2d = [None if s is None else g.reshape(s) for g, s in zip(grads, opt._shapes2d)]
    profile(f"Shampoo {bits}-bit preconditioning alone (_directions)", lambda: opt._directions(grads, grads2d))
    if bits == 4:
        def refresh_step():
            opt._step = 1099  # the next step refreshes the statistics
            opt.step()
        profile("Shampoo 4-bit statistics-refresh step", refresh_step, steps=1, reps=3, rows=20)


def case_shampoo_compiled() -> None:
    """A plain 4-bit step compiled with backend="lowbit", by inductor mode (reduce-overhead: CUDA graphs). New
    gradients before every call, as in training and in benchmarks/shampoo.py (so CUDA graphs copy them in)."""
    from lowbit_compile.optim.shampoo import Shampoo

    for mode in ("default", "reduce-overhead"):
        params = shampoo_params(12)
        opt = Shampoo(params, lr=1e-3, bits=4, max_preconditioner_dim=1024)
        opt._step = 1000  # plain steps only
        step = torch.compile(opt.step, backend="lowbit", mode=mode)

        def fresh_step():
            for p in params:
                p.grad = torch.empty_like(p).normal_(0.0, 1e-2)
            step()
        profile(f"Shampoo 4-bit plain step compiled, mode={mode} (includes drawing new gradients)", fresh_step)
        torch._dynamo.reset()


def case_shampoo_refresh() -> None:
    """Plain and statistics-refresh step times of 4-bit Shampoo for several QR panels and chunk sizes, with the peak
    memory a refresh adds."""
    from lowbit_compile.optim.shampoo import Shampoo

    params = shampoo_params(12)
    print("\n### Shampoo 4-bit: refresh variants\n| qr_panel | chunk_blocks | plain ms | host ms | refresh ms | "
          "refresh peak extra GB |\n|---|---|---|---|---|---|", flush=True)
    for panel, chunk in ((128, 16), (1024, 16), (512, 16), (1024, 32), (1024, 48)):
        set_grads(params, 1)
        opt = Shampoo(params, lr=1e-3, bits=4, max_preconditioner_dim=1024, qr_panel=panel, chunk_blocks=chunk)
        opt._step = 1000
        for _ in range(3):
            opt.step()
        plain = event_ms(opt.step, 10)
        host = host_ms(opt.step, 10)
        times = []
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for k in range(3):
            opt._step = 1099 + 100 * k
            times.append(event_ms(opt.step, 1))
        extra = (torch.cuda.max_memory_allocated() - base) / 1e9
        print(f"| {panel} | {chunk} | {plain:.2f} | {host:.2f} | {statistics.median(times):.1f} | {extra:.2f} |",
              flush=True)
        del opt
        torch.cuda.empty_cache()


def case_host_ops() -> None:
    """Host cost of single torch ops on small and on 64 MB tensors (does the host time grow with the size?)."""
    print("\n### host µs per op\n| op | 4 KB | 64 MB |\n|---|---|---|", flush=True)
    small, big = torch.randn(1024, device="cuda"), torch.randn(16, 1024, 1024, device="cuda")
    ops = {"empty_like": torch.empty_like, "isfinite": torch.isfinite, "mul 2": lambda x: x * 2,
           "nan_to_num_": lambda x: x.nan_to_num_(0.0, 0.0, 0.0), "clone": torch.clone}
    for name, op in ops.items():
        for x in (small, big):
            for _ in range(5):  # first calls load kernels
                op(x)
        cells = [host_ms(lambda: op(x), 200) * 1e3 for x in (small, big)]
        print(f"| {name} | {cells[0]:.1f} | {cells[1]:.1f} |", flush=True)


def case_shampoo_fused() -> None:
    from lowbit_compile.optim.shampoo import Shampoo

    params = shampoo_params(12)
    set_grads(params, 1)
    opt = Shampoo(params, lr=1e-3, bits=4, max_preconditioner_dim=1024, fused=True)
    opt._step = 1000
    profile("Shampoo 4-bit plain step, fused=True", opt.step, rows=8)


def case_tf32() -> None:
    from lowbit_compile.optim.shampoo import matmul_precision

    a = torch.randn(144, 1024, 1024, device="cuda")
    b = torch.randn(144, 1024, 1024, device="cuda")
    flops = 2 * 144 * 1024**3
    print(f"\n### bmm 144 x 1024³: precision flags {torch.get_float32_matmul_precision()!r}, "
          f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    for precision in ("tf32", "ieee"):
        with matmul_precision(precision):
            flags = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
            ms = event_ms(lambda: torch.bmm(a, b))
            ms_add = event_ms(lambda: torch.baddbmm(a, a, b))
        print(f"- {precision}: flags {flags}, bmm {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s), baddbmm {ms_add:.3f} ms")
    profile("bmm under matmul_precision('tf32')", lambda: _with_precision("tf32", lambda: torch.bmm(a, b)), rows=4)


def _with_precision(precision, fn):
    from lowbit_compile.optim.shampoo import matmul_precision

    with matmul_precision(precision):
        return fn()


CASES = {
    "tf32": case_tf32,
    "shampoo4": lambda: case_shampoo(4),
    "shampoo32": lambda: case_shampoo(32),
    "adamw8": lambda: case_ours(((4096, 4096),) * 64, 8, "ours 8-bit AdamW, 64 x 4096² fp32"),
    "adamw4": lambda: case_ours(((4096, 4096),) * 64, 4, "ours 4-bit AdamW, 64 x 4096² fp32"),
    "gpt2_ours8": lambda: case_ours(gpt2_shapes(), 8, "ours 8-bit AdamW, GPT-2 list"),
    "gpt2_torch": lambda: case_torch_fused(gpt2_shapes(), "torch fused AdamW, GPT-2 list"),
    "shampoo_refresh": case_shampoo_refresh,
    "shampoo_compiled": case_shampoo_compiled,
    "shampoo_fused": case_shampoo_fused,
    "host_ops": case_host_ops,
    "host": lambda: [case_ours(((64, 64),) * 64, 8, "ours 8-bit AdamW, 64 x 64² fp32 (host-bound)", options=o)
                     for o in (None, {"size_asserts": True})],
}
PYTHON_PROFILE = False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--python-profile", action="store_true", help="also cProfile the host side of each case")
    args = parser.parse_args()
    global PYTHON_PROFILE
    PYTHON_PROFILE = args.python_profile
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for name in args.cases:
        try:
            CASES[name]()
        except Exception as error:  # one broken case must not hide the others
            print(f"\n### {name} failed: {type(error).__name__}: {error}", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
