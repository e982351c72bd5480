"""What the pass does to the graph: one launch per kernel spec, nothing of the regions left behind, unfusable
regions reported with the op that blocked them (and still computed right), legality checks, the report."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from lowbit_compile import formats as F
from lowbit_compile.report import compile_report
from test_backend_numerics import (DEVICE, RULES, adamw, assert_all_fused, assert_problems_close, compile_step,
                                   contract_step, lion, make_problem, run_both, sgd_nesterov)

Q8S, Q8U = F.Q8(min_quant_numel=0), F.Q8(signed=False, min_quant_numel=0)
ADAMW_HP = RULES["adamw"][2]


def test_n_parameters_of_one_spec_are_one_launch_in_the_generated_code():
    shapes = [(300,), (17, 20), (1000,), (3, 5, 7), (256,), (1,)]
    problem = make_problem(shapes, (Q8S, Q8U), hp=ADAMW_HP)
    eager = problem.clone()
    step_fn = contract_step(adamw, problem.formats)
    compiled = compile_step(step_fn, "lowbit")
    _, codes = run_and_get_code(compiled, *problem.args())
    step_fn(*eager.args())
    assert_problems_close(problem, eager)
    assert_all_fused(len(shapes))
    wrapper = "\n".join(codes)
    assert wrapper.count("torch.ops.lowbit.fused_update_.default(") == 1, wrapper
    for leftover in ("lowbit.dequant", "lowbit.requant_", "auto_functionalized"):
        assert leftover not in wrapper


def test_the_fused_op_bumps_the_version_of_every_tensor_it_writes(monkeypatch):
    """Autograd must see the kernel's in-place writes (a tensor saved for backward and then stepped on must raise, as
    with torch's own fused optimizers): the op bumps every mutated tensor's version, and no input's. The kernel is
    replaced by one that writes nothing, so only the op's own bookkeeping is seen (the interpreter's stores would
    bump versions by themselves)."""
    from lowbit_compile.templates import fused_update

    class NoKernel:
        def launch(self, mutated, inputs, scalars, counts):
            pass

    monkeypatch.setattr(fused_update, "kernel_for", lambda spec: NoKernel())
    mutated = [torch.zeros(3), torch.zeros(2, dtype=torch.uint8), torch.zeros((), dtype=torch.int64)]
    inputs, scalars = [torch.ones(3)], [torch.ones(())]
    before = [t._version for t in mutated + inputs + scalars]
    torch.ops.lowbit.fused_update_(mutated, inputs, scalars, [1], "unused")
    assert [t._version for t in mutated + inputs + scalars] == [v + 1 for v in before[:3]] + before[3:]


def test_small_tensors_with_fp32_state_are_a_second_part_of_the_same_launch():
    # The optimizer keeps state in fp32 under min_quant_numel: a second kernel spec, run by the same launch.
    def formats(numel):
        return (F.Q8(), F.Q8(signed=False)) if numel >= 4096 else (F.F32(), F.F32())

    problem = make_problem([(4096,), (5000,), (300,), (7, 3)], formats, hp=ADAMW_HP)
    got, want = run_both(problem, adamw, "lowbit_aot_eager", steps=2)
    assert_all_fused(4, parts=2)
    assert sorted(g.num_tensors for g in compile_report().fused) == [2, 2]
    assert_problems_close(got, want, steps=2)


def test_parameters_of_different_dtypes_are_different_parts_of_one_launch():
    fp32 = make_problem([(300,), (40,)], (F.Q8(min_quant_numel=0),), hp=RULES["lion"][2], seed=1)
    bf16 = make_problem([(200,)], (F.Q8(min_quant_numel=0),), param_dtype=torch.bfloat16, hp=RULES["lion"][2])
    problem = fp32.clone()
    problem.params += bf16.params
    problem.grads += bf16.grads
    problem.states += bf16.states
    problem.formats += bf16.formats
    got, want = run_both(problem, lion, "lowbit", steps=2)
    assert_all_fused(3, parts=2)
    assert_problems_close(got, want, steps=2)


def cumsum_rule(p, g, m, *, lr, step):
    m = 0.9 * m + g
    p = p - lr * torch.cumsum(m.reshape(-1), 0).reshape(m.shape) * 1e-3
    return p, m


@pytest.mark.parametrize("backend", ["lowbit", "lowbit_aot_eager"])
def test_non_elementwise_rule_is_reported_unfused_and_still_right(backend):
    problem = make_problem([(300,), (20, 6)], (Q8S,), hp=dict(lr=0.1), seed=2)
    got, want = run_both(problem, cumsum_rule, backend, steps=2)
    report = compile_report()
    assert report.launches == 0
    assert len(report.unfused) == 2, str(report)
    assert all(u.op == "aten.cumsum.default" and "cumsum" in u.reason for u in report.unfused), str(report)
    assert "lowbit.requant_" in report.graph or "auto_functionalized" in report.graph
    assert_problems_close(got, want)


def two_group_step(first_rule, second_rule, formats, shared_counter: bool):
    """Two parameter groups in one graph (the optimizer's step over all its groups), each following the contract;
    with ``shared_counter`` both count non-finite gradients into the same tensor."""
    first, second = contract_step(first_rule, formats[0]), contract_step(second_rule, formats[1])

    def step_fn(a, b):
        first(*a.args())
        second(*(b.args()[:5] + ((a.nonfinite,) if shared_counter else (b.nonfinite,))))

    return step_fn


@pytest.mark.parametrize("shared_counter", [False, True])
def test_an_unfusable_group_blocks_only_what_shares_its_counter(shared_counter):
    a = make_problem([(300,), (50,)], (Q8S,), hp=dict(lr=0.1), seed=4, nonfinite=0.02)
    b = make_problem([(200,)], (Q8S,), hp=RULES["sgd_nesterov"][2], seed=5, nonfinite=0.02)
    step_fn = two_group_step(cumsum_rule, sgd_nesterov, (a.formats, b.formats), shared_counter)
    ea, eb = a.clone(), b.clone()
    compile_step(step_fn, "lowbit_aot_eager")(a, b)
    step_fn(ea, eb)
    report = compile_report()
    if shared_counter:
        assert report.launches == 0
        assert any("shares the accumulator" in u.reason for u in report.unfused), str(report)
    else:
        assert report.launches == 1 and report.fused[0].num_tensors == 1, str(report)
        # The launch also writes the 0-d results around it: both step counters (a's rule does not read its step)
        # and a's non-finite counter (its unfused regions' sums, computed before the launch, plus the old count).
        assert len(report.scalar_writes) == 3, str(report)
    assert sum(u.op == "aten.cumsum.default" for u in report.unfused) == 2, str(report)
    assert_problems_close(a, ea)
    assert_problems_close(b, eb)
    assert a.nonfinite.item() > 0


def test_a_value_read_outside_the_update_blocks_its_region():
    problem = make_problem([(300,)], (Q8S, Q8U), hp=ADAMW_HP, seed=6)
    peak = torch.zeros((), device=DEVICE)

    def rule_with_probe(p, g, m, v, **hp):
        p, m, v = adamw(p, g, m, v, **hp)
        peak.copy_(m.abs().amax())  # m is now read by a reduction the kernel does not compute
        return p, m, v

    step_fn = contract_step(rule_with_probe, problem.formats)
    eager = problem.clone()
    compile_step(step_fn, "lowbit_aot_eager")(*problem.args())
    compiled_peak = peak.clone()
    step_fn(*eager.args())
    eager_peak = peak.clone()
    report = compile_report()
    assert report.launches == 0 and report.unfused[0].op == "aten.amax.default", str(report)
    assert "outside the update" in report.unfused[0].reason
    assert_problems_close(problem, eager)
    assert torch.equal(compiled_peak, eager_peak)


def test_report_holds_spec_source_and_regions():
    problem = make_problem([(300,), (129,)], (Q8S, Q8U), hp=ADAMW_HP)
    run_both(problem, adamw, "lowbit_aot_eager", steps=1)
    report = compile_report()
    (group,) = report.fused
    assert group.num_tensors == 2 and group.device.startswith(DEVICE)
    assert "def fused_update_kernel(" in group.source and "codecs.encode(" in group.source
    assert '"mutated":["float32","Q8:dynamic:s:256","Q8:dynamic:u:256"]' in group.spec
    assert len(group.regions) == 2 and all("requant_" in r and "copy_ into" in r for r in group.regions)
    assert "1 launch" in str(report)


def test_user_post_grad_pass_still_runs_after_ours():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []

    class Probe(CustomGraphPass):
        def __call__(self, graph):
            seen.append([n.target for n in graph.nodes])

        def uuid(self):
            return "probe-v1"

    problem = make_problem([(300,)], (Q8S,), hp=RULES["sgd_nesterov"][2])
    got, want = run_both(problem, sgd_nesterov, "lowbit", steps=1,
                         options={"post_grad_custom_pre_pass": Probe()})
    assert seen and torch.ops.lowbit.fused_update_.default in seen[0]
    assert_problems_close(got, want)


def test_empty_parameters_still_advance_the_step_counter():
    """Every tensor of the launch has 0 elements: no program has a tile, yet the launch still writes the step."""
    problem = make_problem([(0,), (0, 3)], (Q8S, F.F32()), hp=ADAMW_HP)
    got, want = run_both(problem, adamw, "lowbit_aot_eager", steps=3)
    assert_all_fused(2)
    assert got.step_t.item() == 3
    assert_problems_close(got, want, steps=3)


def test_param_groups_are_parts_of_one_launch_with_their_own_counters():
    """Two optimizer param groups (8-bit and 4-bit state, their own lr and step): one launch, two step counters; a
    group without gradients keeps its counter."""
    from lowbit_compile import optim
    torch.manual_seed(0)
    shapes = [(5000,), (300,), (4500,), (7, 3)]
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]

    def build(ps):
        four_bit = {"m": F.Q4(), "v": F.Q4(signed=False)}
        return optim.AdamW([{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "state": four_bit}], lr=1e-3)

    compiled, eager = build(params), build(twins)
    step = compile_step(compiled.step, "lowbit")
    for k in range(3):
        for i, (p, q) in enumerate(zip(params, twins)):
            p.grad = None if k == 2 and i >= 2 else torch.randn_like(p)
            q.grad = None if p.grad is None else p.grad.clone()
        step()
        eager.step()
        if k == 0:
            report = compile_report()
            assert report.launches == 1 and len(report.fused) == 4 and len(report.scalar_writes) == 2, str(report)
    assert [plan.step.item() for plan in compiled._plans] == [plan.step.item() for plan in eager._plans] == [3, 2]
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_launch_spec_round_trip_and_errors():
    from lowbit_compile.templates.fused_update import KernelSpec, LaunchSpec
    part = KernelSpec(("float32",), ("float32",), ("float32",), (), ("v0 = (mut0 - s0 * in0)",), ("v0",))
    launch = LaunchSpec((part, part), (("c0",), ("x0",)), ((), ()), ("float32", "float32"),
                        ("c0 = (x0 * 2.0)", "c1 = (x1 + 1.0)"), ("c1",))
    assert LaunchSpec.from_string(launch.to_string()) == launch
    assert launch.plain_scalars == 1
    with pytest.raises(ValueError, match="bindings\\[0\\]"):
        LaunchSpec((part,), (("c9",),), ((),), ("float32",))
    with pytest.raises(ValueError, match="scalar_body"):
        LaunchSpec((part,), (("x0",),), ((),), ("float32",), ("x = x0",))
    with pytest.raises(ValueError, match="version"):
        LaunchSpec.from_string(launch.to_string().replace('"version":2', '"version":1'))
    with pytest.raises(ValueError, match="not a fused-update launch spec"):
        LaunchSpec.from_string(part.to_string())


def test_launches_over_large_tensors_leave_the_0d_math_to_inductor(monkeypatch):
    """Above MOVE_MAX_AVERAGE_NUMEL elements per tensor the launch reads the 0-d values inductor computes (moving
    them in would cost every program latency); the step counter is then written by inductor too."""
    from lowbit_compile.passes import fuse_updates
    monkeypatch.setattr(fuse_updates, "MOVE_MAX_AVERAGE_NUMEL", 100)
    problem = make_problem([(300,), (200,)], (Q8S, Q8U), hp=ADAMW_HP)
    got, want = run_both(problem, adamw, "lowbit_aot_eager", steps=2)
    report = compile_report()
    assert report.launches == 1 and not report.scalar_writes and not report.unfused, str(report)
    assert '"scalar_body":[]' in report.fused[0].launch_spec
    assert "aten.pow" in report.graph and "aten.copy_" in report.graph  # bias corrections, step write-back
    assert_problems_close(got, want, steps=2)


def test_each_device_launch_claims_only_its_own_0d_write_backs():
    """Two step counters on two devices: the launch on one device moves only that device's increment (a write-back
    claimed by two launches would be applied twice)."""
    from torch.fx import Graph

    from lowbit_compile.passes.regions import GraphFacts
    from lowbit_compile.passes.scalar_program import build_scalar_program
    graph = Graph()
    nodes = {}
    for name, device in (("a", "cpu"), ("b", "meta")):
        step = graph.placeholder(f"step_{name}")
        step.meta["val"] = torch.zeros((), device=device)
        new = graph.call_function(torch.ops.aten.add.Tensor, (step, 1))
        new.meta["val"] = torch.zeros((), device=device)
        graph.call_function(torch.ops.aten.copy_.default, (step, new))
        nodes[name] = (step, new)
    graph.output(None)
    program = build_scalar_program(graph, GraphFacts.of(graph), [], set(), torch.device("cpu"))
    assert program.stored == [nodes["a"][0]] and program.moved == {nodes["a"][1]}
    assert program.stores == ["c0"] and program.body == ["c0 = (x0 + 1.0)"]
