"""GPU-only checks (the ``cuda`` marker): CUDA graphs through mode="reduce-overhead", and the step time of 8-bit
AdamW on 64 x 4096^2 fp32 parameters against its bytes floor."""
from __future__ import annotations

import statistics

import pytest
import torch

from lowbit_compile import formats as F
from lowbit_compile.report import compile_report
from test_backend_numerics import (RULES, adamw, assert_all_fused, assert_problems_close, compile_step,
                                   contract_step, make_problem)

pytestmark = pytest.mark.cuda


def _mark_static(problem):
    for t in [*problem.params, *problem.grads, problem.step_t, problem.nonfinite, *problem.hp.values()]:
        torch._dynamo.mark_static_address(t)
    for state in problem.states:
        for s in state:
            for t in (s if isinstance(s, tuple) else (s,)):
                torch._dynamo.mark_static_address(t)


def test_cuda_graphs_with_reduce_overhead():
    from torch._dynamo.utils import counters
    problem = make_problem([(3000,), (64, 65), (1,)], (F.Q8(min_quant_numel=0), F.Q4(signed=False, min_quant_numel=0)),
                           hp=RULES["adamw"][2], nonfinite=0.01)
    eager = problem.clone()
    _mark_static(problem)
    step_fn = contract_step(adamw, problem.formats)
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = compile_step(step_fn, "lowbit", mode="reduce-overhead")
        for _ in range(4):
            compiled(*problem.args())
            step_fn(*eager.args())
    torch.cuda.synchronize()
    assert_all_fused(3)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert_problems_close(problem, eager, steps=4)


def test_step_time_of_8bit_adamw_on_1b_fp32_parameters():
    shapes = [(4096, 4096)] * 64
    formats = (F.Q8(), F.Q8(signed=False))
    problem = make_problem([(1,)], formats, hp=RULES["adamw"][2])  # scalars only; tensors built on the GPU below
    problem.params = [torch.randn(s, device="cuda") for s in shapes]
    problem.grads = [torch.randn(s, device="cuda") * 1e-3 for s in shapes]
    problem.states, problem.formats = [], []
    for p in problem.params:
        problem.states.append([F.empty_state(p.numel(), fmt, "cuda") for fmt in formats])
        problem.formats.append(formats)
    compiled = compile_step(contract_step(adamw, problem.formats), "lowbit")
    for _ in range(5):
        compiled(*problem.args())
    assert_all_fused(64)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(50):
        start.record()
        compiled(*problem.args())
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    numel = sum(p.numel() for p in problem.params)
    floor_ms = 16.06 * numel / 2994e9 * 1e3
    print(f"\n8-bit AdamW, 64 x 4096^2 fp32: {ms:.2f} ms/step median of 50 (floor {floor_ms:.2f} ms, "
          f"{16.06 * numel / ms / 1e6:.0f} GB/s, {ms / floor_ms:.2f}x floor); {compile_report().launches} launch")
    assert ms < 3 * floor_ms
