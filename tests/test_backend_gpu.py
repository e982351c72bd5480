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


def test_register_cap_that_spills_is_dropped(monkeypatch):
    """A kernel that spills under its launch shape's register cap is launched uncapped from its second launch on;
    both launches give eager's result. (The cap of 24 registers makes the 4-bit AdamW kernel spill.)"""
    from lowbit_compile.templates import fused_update
    from test_backend_numerics import run_both
    tight = fused_update.LaunchShape(512, 4, 8, 24)
    monkeypatch.setitem(fused_update.GPU_LAUNCH_SHAPES, 4, tight)
    monkeypatch.setattr(fused_update, "_KERNELS", {})
    problem = make_problem([(3000,), (64, 65)], (F.Q4(min_quant_numel=0), F.Q4(signed=False, min_quant_numel=0)),
                           hp=RULES["adamw"][2], nonfinite=0.01)
    with torch._inductor.config.patch(fx_graph_cache=False):
        got, want = run_both(problem, adamw, "lowbit", steps=2, nonfinite=0.01)
    assert_all_fused(2)
    assert_problems_close(got, want, steps=2)
    [kernel] = fused_update._KERNELS.values()
    assert kernel._spilling_shapes == {fused_update.tile_shape(kernel.spec, "cuda")}


def test_default_register_cap_does_not_spill_for_builtin_four_bit_rules(monkeypatch):
    """The 4-bit launch shape's cap is chosen for the built-in rules: it must not make them spill (it would then be
    dropped, and the cap would be pointless)."""
    from lowbit_compile import optim
    from lowbit_compile.templates import fused_update
    monkeypatch.setattr(fused_update, "_KERNELS", {})
    for build in (lambda ps: optim.AdamW(ps, bits=4), lambda ps: optim.Lion(ps, bits=4),
                  lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, bits=4)):
        fused_update._KERNELS.clear()
        params = [torch.nn.Parameter(torch.randn(8192, device="cuda")) for _ in range(2)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = build(params)
        torch._dynamo.reset()
        torch.compile(opt.step, backend="lowbit")()
        torch.cuda.synchronize()
        kernels = [k for k in fused_update._KERNELS.values()
                   if fused_update.tile_shape(k.spec, "cuda").max_registers is not None]
        assert kernels, "no register-capped kernel ran"
        assert all(not k._spilling_shapes for k in kernels), [k.spec for k in kernels]


def test_step_runs_one_kernel_per_state_layout_plus_one_for_the_scalars():
    """An 8-bit AdamW step over large (quantized) and small (fp32-state) tensors: one fused kernel per state layout
    and one kernel for all the 0-d math (step counter, bias corrections), nothing else."""
    from torch.profiler import ProfilerActivity, profile

    from lowbit_compile import optim
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (8192, 8192, 100, 50)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = optim.AdamW(params, lr=1e-3, weight_decay=0.01, bits=8)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="lowbit")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert kernels.count("fused_update_kernel") == 2, kernels
    assert len(kernels) == 3, kernels
