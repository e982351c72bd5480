"""GPU-only checks (the ``cuda`` marker): CUDA graphs through mode="reduce-overhead". Step time is measured by
benchmarks/step_time.py, not asserted here."""
from __future__ import annotations

import pytest
import torch

from lowbit_compile import formats as F
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
