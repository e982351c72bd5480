"""lbc.Optimizer under torch.compile (Dynamo + aot_eager): one graph, no graph breaks, zero recompiles while LR /
momentum schedulers change hyperparameters, results equal to the eager step, and the anchors of the step-graph
contract present in the captured graph."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import lowbit_compile as lbc  # noqa: F401  (registers the anchor ops)
from lowbit_compile import optim
from lowbit_compile.formats import BF16, Q4, Q8
from lowbit_compile.optim import Optimizer


# A scheduler built after compiling opt.step cannot see the compiled calls, so it warns (as with torch.optim).
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 64, generator=gen)),  # quantized state
            torch.nn.Parameter(torch.randn(33, generator=gen).bfloat16())]  # fp32 fallback state, bf16 param


def set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def assert_same_state(opt_a, params_a, opt_b, params_b):
    for p, q in zip(params_a, params_b):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
        assert torch.equal(group_a["step"], group_b["step"])
        assert torch.equal(group_a["lr"], group_b["lr"])


def assert_one_graph_without_breaks():
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


SCHEDULERS = {
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=1e-4),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=25),  # cycles beta1
    "plateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULERS))
def test_schedulers_cause_no_recompiles(schedule):
    params, twins = make_params(), make_params()
    opt = optim.AdamW(params, lr=1e-2, bits=8)
    eager = optim.AdamW(twins, lr=1e-2, bits=8)
    # the same schedule on torch.optim with float hyperparameters: the values our tensors must follow
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    step = torch.compile(opt.step, backend="aot_eager")
    schedulers = [SCHEDULERS[schedule](o) for o in (opt, eager, plain)]
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    seen_lrs = set()
    for _ in range(20):
        set_grads(params, gen_a)
        set_grads(twins, gen_b)
        step()
        eager.step()
        plain.step()
        for scheduler in schedulers:
            scheduler.step(1.0) if schedule == "plateau" else scheduler.step()
        group, expected = opt.param_groups[0], plain.param_groups[0]
        assert group["lr"].item() == pytest.approx(expected["lr"], rel=1e-6)
        assert [b.item() for b in group["betas"]] == pytest.approx(list(expected["betas"]), rel=1e-6)
        seen_lrs.add(group["lr"].item())
    assert len(seen_lrs) >= 5  # the schedule really changed the learning rate
    assert_one_graph_without_breaks()
    assert_same_state(opt, params, eager, twins)


def test_scheduler_built_before_compiling_still_gives_one_graph():
    """The scheduler replaces opt.step with a wrapper from a file Dynamo skips (torch.optim behaves the same): that
    wrapper runs eagerly, the optimizer step inside is still one graph and never recompiles."""
    params = make_params()
    opt = optim.AdamW(params, bits=8)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=25)
    step = torch.compile(opt.step, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        set_grads(params, gen)
        step()
        scheduler.step()
    assert counters["stats"]["unique_graphs"] == 1
    assert all("lr_scheduler.py" in reason for reason in counters["graph_break"])


def test_assigning_floats_and_tuples_causes_no_recompiles():
    params, twins = make_params(), make_params()
    opt, eager = optim.AdamW(params, bits=4), optim.AdamW(twins, bits=4)
    step = torch.compile(opt.step, backend="aot_eager")
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    lr = opt.param_groups[0]["lr"]
    for i in range(6):
        set_grads(params, gen_a)
        set_grads(twins, gen_b)
        step()
        eager.step()
        for group in (opt.param_groups[0], eager.param_groups[0]):
            group["lr"] = 1e-3 * (i + 2)
            group["betas"] = (0.9 - 0.01 * i, 0.99)
            group["weight_decay"] = 0.1 * i
            group["initial_lr"] = 1e-3 * i  # a key the step does not read
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(7e-3)
    assert_one_graph_without_breaks()
    assert_same_state(opt, params, eager, twins)


def issue_adamw(p, g, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step):
    """The rule of issue 3, verbatim."""
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    p = p * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)
    return p, m, v


COMPILED_CASES = {
    "issue-rule": lambda ps: Optimizer(ps, issue_adamw, {"m": Q8(), "v": Q8(signed=False)}, lr=3e-4),
    "AdamW-4bit": lambda ps: optim.AdamW(ps, bits=4, weight_decay=0.1),
    "Adam-32bit": lambda ps: optim.Adam(ps, bits=32, maximize=True),
    "SGD": lambda ps: optim.SGD(ps, lr=0.1),
    "SGD-nesterov": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "Lion": lambda ps: optim.Lion(ps, lr=1e-3, weight_decay=0.1),
    "RMSprop-centered-momentum": lambda ps: optim.RMSprop(ps, momentum=0.9, centered=True),
    "Adagrad": lambda ps: optim.Adagrad(ps, lr_decay=0.01, initial_accumulator_value=0.1),
    "AdEMAMix": lambda ps: optim.AdEMAMix(ps, t_alpha=4, t_beta3=4),
    "groups": lambda ps: Optimizer([{"params": ps[:1]}, {"params": ps[1:], "rule": lbc.optim.rules.lion,
                                                         "state": {"m": BF16()}}],
                                   lbc.optim.rules.adamw, {"m": Q8(), "v": Q4(signed=False)}, lr=1e-2),
}


@pytest.mark.parametrize("case", sorted(COMPILED_CASES))
def test_compiled_step_equals_eager_step(case):
    params, twins = make_params(), make_params()
    opt, eager = COMPILED_CASES[case](params), COMPILED_CASES[case](twins)
    step = torch.compile(opt.step, backend="aot_eager")
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for i in range(3):
        set_grads(params, gen_a)
        set_grads(twins, gen_b)
        if i == 2:  # skipped elements count on both paths
            params[0].grad[0, :5] = float("nan")
            twins[0].grad[0, :5] = float("nan")
        step()
        eager.step()
    assert_one_graph_without_breaks()
    assert_same_state(opt, params, eager, twins)
    assert opt.nonfinite_count.item() == eager.nonfinite_count.item() == 5


def test_captured_graph_keeps_the_contract_anchors():
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    params = make_params() + [torch.nn.Parameter(torch.randn(80, 80))]
    opt = Optimizer(params, lbc.optim.rules.adamw, {"m": Q8(), "v": Q4(signed=False)})
    step = torch.compile(opt.step, backend=record)
    params[2].grad = torch.randn(80, 80)  # only this one and the first get gradients
    params[0].grad = torch.randn(64, 64)
    step()
    assert len(graphs) == 1
    calls = [(n.target, n.args) for n in graphs[0].graph.nodes if n.op == "call_function"]
    dequants = [args for target, args in calls if target is torch.ops.lowbit.dequant]
    requants = [args for target, args in calls if target is torch.ops.lowbit.requant_]
    specs = ["Q8:dynamic:s:256", "Q4:linear:u:128"]
    assert [(a[2], a[3]) for a in dequants] == [(s, [64, 64]) for s in specs] + [(s, [80, 80]) for s in specs]
    assert [a[3] for a in requants] == specs * 2
    assert sum(target is torch.isfinite for target, _ in calls) == 2


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cuda_compiled_step_with_schedule_equals_eager(backend, device):
    gen = torch.Generator().manual_seed(5)
    shapes = [(256, 512), (1000,), (3, 4097)]
    starts = [torch.randn(s, generator=gen) for s in shapes]
    params = [torch.nn.Parameter(x.to(device)) for x in starts]
    twins = [torch.nn.Parameter(x.to(device)) for x in starts]
    opt, eager = optim.AdamW(params, lr=1e-2, bits=8), optim.AdamW(twins, lr=1e-2, bits=8)
    assert opt.param_groups[0]["lr"].device == params[0].device
    step = torch.compile(opt.step, backend=backend)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=25) for o in (opt, eager)]
    for i in range(20):
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
        if i == 3:
            grads[0][0, :7] = float("nan")
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        step()
        eager.step()
        for scheduler in schedulers:
            scheduler.step()
    assert_one_graph_without_breaks()
    assert opt.nonfinite_count.device == params[0].device and opt.nonfinite_count.item() == 7
    for p, q in zip(params, twins):
        # inductor may reassociate the rule's arithmetic by an ulp, which can move a code by one step; over 20
        # steps such elements drift by about lr x one code step (measured 4e-4 on 4 of 131072 elements)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-3)
        assert ((p - q).abs() > 1e-5).float().mean() < 1e-3


@pytest.mark.cuda
def test_cuda_graphs_with_fresh_gradients_every_step(device):
    """mode="reduce-overhead" as a user writes it: nothing marked static by hand, a new gradient tensor every step
    (cudagraph trees copy them into static buffers whose addresses differ from the warm-up's)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(300, 257), (1000,), (64,)]
    starts = [torch.randn(s, generator=gen) for s in shapes]
    params = [torch.nn.Parameter(x.to(device)) for x in starts]
    twins = [torch.nn.Parameter(x.to(device)) for x in starts]
    opt, eager = optim.AdamW(params, lr=1e-2, bits=8), optim.AdamW(twins, lr=1e-2, bits=8)
    from torch._dynamo.utils import counters
    counters.clear()
    step = torch.compile(opt.step, backend="lowbit", mode="reduce-overhead")
    for _ in range(6):
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        step()
        eager.step()
    torch.cuda.synchronize()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-3)
        assert ((p - q).abs() > 1e-5).float().mean() < 1e-3
