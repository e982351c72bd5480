"""GPU-only checks (the ``cuda`` marker): CUDA graphs through mode="reduce-overhead". Step time is measured by
benchmarks/step_time.py, not asserted here."""
from __future__ import annotations

import pytest
import torch

from lowbit_compile import formats as F
from lowbit_compile.testing import synchronises
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
    assert kernel._spilling == {fused_update.geometry(kernel.spec, "cuda")}


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
                   if fused_update.geometry(k.spec, "cuda").max_registers is not None]
        assert kernels, "no register-capped kernel ran"
        assert all(not k._spilling for k in kernels), [k.spec for k in kernels]


def test_a_step_is_one_kernel():
    """An 8-bit AdamW step over large (quantized) and small (fp32-state) tensors is one kernel: both state layouts are
    parts of one launch, which also computes the 0-d math (bias corrections) and increments the step counter. Its
    result is eager's, step after step (the counter is written by the last of ~200 programs to finish, after all of
    them read it)."""
    from torch.profiler import ProfilerActivity, profile

    from lowbit_compile import optim
    sizes = (3 * 2**18 + 5, 8192, 100, 50)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in sizes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = optim.AdamW(params, lr=1e-3, weight_decay=0.01, bits=8)
    eager = optim.AdamW(twins, lr=1e-3, weight_decay=0.01, bits=8)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="lowbit")
    for _ in range(5):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        step()
        eager.step()
    torch.cuda.synchronize()
    assert opt._plans[0].step.item() == eager._plans[0].step.item() == 5
    for p, q in zip(params, twins):
        # a state value next to a midpoint may take the neighbouring code: a few elements' updates differ by ~1%
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-4)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert kernels == ["fused_update_kernel"], kernels
    assert opt._plans[0].step.item() == 6


def test_new_gradient_addresses_do_not_synchronise_the_host():
    """Gradients at new addresses make the launch build new pointer tables; that must not synchronise the host
    (pinned, asynchronous copies; the step's stream waits for them), and the step still follows eager."""
    from lowbit_compile import optim
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (5000, 300)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, eager = optim.AdamW(params, bits=8), optim.AdamW(twins, bits=8)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="lowbit")
    keep = []
    for k in range(4):
        for p, q in zip(params, twins):
            keep.append(torch.empty(1024, device="cuda"))  # the next gradient lands at a new address
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        if k:
            assert synchronises(step) is None
        else:
            step()
        eager.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
