"""Built-in rules and drop-in classes: fp32 state reproduces torch.optim (and the Lion / AdEMAMix papers); 8- and 4-bit
state track the fp32 trajectory; rules are elementwise and functional."""
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit_compile as lbc  # noqa: F401  (registers the anchor ops)
from lowbit_compile import optim
from lowbit_compile.optim import rules

# (our class, torch.optim class, keyword arguments, {our state name: torch's state name})
TORCH_TWINS = [
    (optim.AdamW, torch.optim.AdamW, {}, {"m": "exp_avg", "v": "exp_avg_sq"}),
    (optim.AdamW, torch.optim.AdamW, {"weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.99), "eps": 1e-6},
     {"m": "exp_avg", "v": "exp_avg_sq"}),
    (optim.Adam, torch.optim.Adam, {}, {"m": "exp_avg", "v": "exp_avg_sq"}),
    (optim.Adam, torch.optim.Adam, {"weight_decay": 0.01}, {"m": "exp_avg", "v": "exp_avg_sq"}),
    (optim.SGD, torch.optim.SGD, {}, {}),
    (optim.SGD, torch.optim.SGD, {"weight_decay": 0.01, "maximize": True}, {}),
    (optim.SGD, torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}, {"momentum_buffer": "momentum_buffer"}),
    (optim.SGD, torch.optim.SGD, {"momentum": 0.9, "dampening": 0.3}, {"momentum_buffer": "momentum_buffer"}),
    (optim.SGD, torch.optim.SGD, {"momentum": 0.8, "nesterov": True}, {"momentum_buffer": "momentum_buffer"}),
    (optim.RMSprop, torch.optim.RMSprop, {}, {"square_avg": "square_avg"}),
    (optim.RMSprop, torch.optim.RMSprop, {"centered": True, "weight_decay": 0.01},
     {"square_avg": "square_avg", "grad_avg": "grad_avg"}),
    (optim.RMSprop, torch.optim.RMSprop, {"momentum": 0.9, "maximize": True},
     {"square_avg": "square_avg", "momentum_buffer": "momentum_buffer"}),
    (optim.RMSprop, torch.optim.RMSprop, {"momentum": 0.5, "centered": True, "alpha": 0.9},
     {"square_avg": "square_avg", "grad_avg": "grad_avg", "momentum_buffer": "momentum_buffer"}),
    (optim.Adagrad, torch.optim.Adagrad, {}, {"state_sum": "sum"}),
    (optim.Adagrad, torch.optim.Adagrad, {"lr_decay": 0.1, "initial_accumulator_value": 0.1, "weight_decay": 0.01},
     {"state_sum": "sum"}),
]


@given(case=st.integers(0, len(TORCH_TWINS) - 1), lr=st.sampled_from([1e-3, 1e-2, 1e-1]),
       shape=st.sampled_from([(1,), (33,), (40, 50), (3, 4, 5)]), steps=st.integers(1, 6),
       grad_scale=st.sampled_from([1e-3, 1.0, 1e2]), seed=st.integers(0, 2**31 - 1))
def test_fp32_state_matches_torch_optim(case, lr, shape, steps, grad_scale, seed):
    ours_cls, torch_cls, kwargs, state_names = TORCH_TWINS[case]
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(shape, generator=gen)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours_opt = ours_cls([ours], lr=lr, bits=32, **kwargs)
    torch_opt = torch_cls([theirs], lr=lr, **kwargs)
    for _ in range(steps):
        grad = torch.randn(shape, generator=gen) * grad_scale
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        ours_opt.step()
        torch_opt.step()
    assert not torch.equal(theirs.detach(), start)
    # fp32 rounding of the largest intermediate (start or the distance moved) bounds each element's difference
    scale = max(float(start.abs().max()), float((theirs.detach() - start).abs().max()))
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=2e-6 * scale)
    for name, torch_name in state_names.items():
        expected = torch_opt.state[theirs][torch_name]
        # absolute slack relative to the state's scale: weight decay can cancel the gradient in single elements
        torch.testing.assert_close(ours_opt.state[ours][name], expected, rtol=1e-5,
                                   atol=1e-5 * float(expected.abs().max()))


def lion_reference(p, grads, lr, beta1, beta2, weight_decay):
    """Lion, Algorithm 2 of Chen et al. 2023, in float64."""
    m = torch.zeros_like(p)
    for g in grads:
        c = beta1 * m + (1 - beta1) * g
        p = p - lr * (torch.sign(c) + weight_decay * p)
        m = beta2 * m + (1 - beta2) * g
    return p


def ademamix_reference(p, grads, lr, beta1, beta2, beta3_final, alpha_final, t_alpha, t_beta3, eps, weight_decay):
    """AdEMAMix, Algorithm 1 of Pagliardini et al. 2024 (with its alpha / beta3 schedulers), in float64."""
    m1, m2, nu = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        alpha = alpha_final if t_alpha is None else min(t * alpha_final / t_alpha, alpha_final)
        beta3 = beta3_final
        if t_beta3 is not None:
            log1, log3 = math.log(beta1), math.log(beta3_final)
            beta3 = min(math.exp(log1 * log3 / ((1 - t / t_beta3) * log3 + (t / t_beta3) * log1)), beta3_final)
        m1 = beta1 * m1 + (1 - beta1) * g
        m2 = beta3 * m2 + (1 - beta3) * g
        nu = beta2 * nu + (1 - beta2) * g * g
        m1_hat, nu_hat = m1 / (1 - beta1**t), nu / (1 - beta2**t)
        p = p - lr * ((m1_hat + alpha * m2) / (nu_hat.sqrt() + eps) + weight_decay * p)
    return p


@given(lr=st.sampled_from([1e-4, 1e-2]), betas=st.sampled_from([(0.9, 0.99), (0.95, 0.98)]),
       weight_decay=st.sampled_from([0.0, 0.1]), steps=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_lion_matches_the_paper(lr, betas, weight_decay, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(300, generator=gen)
    grads = [torch.randn(300, generator=gen) for _ in range(steps)]
    w = torch.nn.Parameter(start.clone())
    opt = optim.Lion([w], lr=lr, betas=betas, weight_decay=weight_decay, bits=32)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    expected = lion_reference(start.double(), [g.double() for g in grads], lr, *betas, weight_decay)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-6, atol=1e-6)


@given(schedule=st.sampled_from([(None, None), (3, 5), (10, 2)]), alpha=st.sampled_from([1.0, 5.0]),
       betas=st.sampled_from([(0.9, 0.999, 0.9999), (0.8, 0.99, 0.95)]), weight_decay=st.sampled_from([0.0, 0.01]),
       steps=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_ademamix_matches_the_paper(schedule, alpha, betas, weight_decay, steps, seed):
    t_alpha, t_beta3 = schedule
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(300, generator=gen)
    grads = [torch.randn(300, generator=gen) for _ in range(steps)]
    w = torch.nn.Parameter(start.clone())
    opt = optim.AdEMAMix([w], lr=1e-2, betas=betas, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3,
                         weight_decay=weight_decay, bits=32)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    expected = ademamix_reference(start.double(), [g.double() for g in grads], 1e-2, *betas, alpha, t_alpha, t_beta3,
                                  1e-8, weight_decay)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-5, atol=1e-5)


TRACKED = [(optim.AdamW, {"lr": 1e-2}), (optim.Adam, {"lr": 1e-2}), (optim.SGD, {"lr": 0.1, "momentum": 0.9}),
           (optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}), (optim.Lion, {"lr": 1e-3}),
           (optim.RMSprop, {"lr": 1e-2}), (optim.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5}),
           (optim.Adagrad, {"lr": 0.1}), (optim.AdEMAMix, {"lr": 1e-2, "t_alpha": 20, "t_beta3": 20})]


@pytest.mark.parametrize("cls, kwargs", TRACKED, ids=lambda v: getattr(v, "__name__", str(v)))
def test_low_bit_state_tracks_fp32(cls, kwargs):
    """20 steps on a noisy quadratic: the distance from the fp32 trajectory, relative to how far fp32 moved, stays
    small (measured: 8-bit <= 0.017, 4-bit <= 0.25), and the loss reached is about the same."""
    results = {}
    for bits in (32, 8, 4):
        gen = torch.Generator().manual_seed(0)
        start, target = torch.randn(64, 64, generator=gen), torch.randn(64, 64, generator=gen)
        w = torch.nn.Parameter(start.clone())
        opt = cls([w], bits=bits, **kwargs)
        assert opt.describe().rows[0].fallback is None
        for _ in range(20):
            w.grad = (w.detach() - target) + 0.5 * torch.randn(64, 64, generator=gen)
            opt.step()
        results[bits] = (w.detach().clone(), ((w.detach() - target) ** 2).mean().item())
    moved = (results[32][0] - start).norm()
    for bits, bound in ((8, 0.05), (4, 0.4)):
        assert (results[bits][0] - results[32][0]).norm() / moved < bound, bits
        assert results[bits][1] == pytest.approx(results[32][1], rel=0.15), bits


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


def _t(value):
    return torch.tensor(value, dtype=torch.float32)


RULE_CALLS = [
    (rules.adam, 2, dict(lr=_t(0.1), betas=(_t(0.9), _t(0.99)), eps=_t(1e-8), weight_decay=_t(0.1), maximize=True,
                         step=_t(2.0))),
    (rules.adamw, 2, dict(lr=_t(0.1), betas=(_t(0.9), _t(0.99)), eps=_t(1e-8), weight_decay=_t(0.1), step=_t(2.0))),
    (rules.sgd, 0, dict(lr=_t(0.1), weight_decay=_t(0.1), maximize=True)),
    (rules.sgd_momentum, 1, dict(lr=_t(0.1), momentum=_t(0.9), dampening=_t(0.1), weight_decay=_t(0.1),
                                 nesterov=True, step=_t(1.0))),
    (rules.lion, 1, dict(lr=_t(0.1), betas=(_t(0.9), _t(0.99)), weight_decay=_t(0.1))),
    (rules.rmsprop, 1, dict(lr=_t(0.1), alpha=_t(0.9), eps=_t(1e-8), weight_decay=_t(0.1))),
    (rules.rmsprop_centered, 2, dict(lr=_t(0.1), alpha=_t(0.9), eps=_t(1e-8), weight_decay=_t(0.1))),
    (rules.rmsprop_momentum, 2, dict(lr=_t(0.1), alpha=_t(0.9), eps=_t(1e-8), weight_decay=_t(0.1),
                                     momentum=_t(0.9))),
    (rules.rmsprop_centered_momentum, 3, dict(lr=_t(0.1), alpha=_t(0.9), eps=_t(1e-8), weight_decay=_t(0.1),
                                              momentum=_t(0.9), maximize=True)),
    (rules.adagrad, 1, dict(lr=_t(0.1), lr_decay=_t(0.1), weight_decay=_t(0.1), eps=_t(1e-10), step=_t(3.0))),
    (rules.ademamix, 3, dict(lr=_t(0.1), betas=(_t(0.9), _t(0.99), _t(0.999)), alpha=_t(5.0), t_alpha=_t(10.0),
                             t_beta3=_t(10.0), eps=_t(1e-8), weight_decay=_t(0.1), step=_t(3.0))),
]


@pytest.mark.parametrize("rule, num_states, kwargs", RULE_CALLS, ids=lambda v: getattr(v, "__name__", ""))
def test_rules_are_elementwise_and_functional(rule, num_states, kwargs):
    """Only pointwise ATen ops, nothing in place, inputs untouched, one output per input of p's shape: what the
    compiler pass can fuse into one kernel."""
    inputs = [torch.randn(6, 7) for _ in range(2)] + [torch.rand(6, 7) for _ in range(num_states)]
    copies = [x.clone() for x in inputs]
    recorder = _RecordOps()
    with recorder:
        outs = rule(*inputs, **kwargs)
    assert len(outs) == 1 + num_states and all(o.shape == (6, 7) and o.dtype == torch.float32 for o in outs)
    assert all(torch.equal(x, y) for x, y in zip(inputs, copies))
    for op in recorder.ops:
        assert torch.Tag.pointwise in op.tags and not op._schema.is_mutable, op


def test_sgd_first_step_sets_the_buffer_to_the_gradient():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = optim.SGD([w], lr=1.0, momentum=0.9, dampening=0.5, bits=32)
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    assert torch.equal(opt.state[w]["momentum_buffer"], torch.tensor([1.0, 2.0, 3.0]))
    opt.step()
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], torch.tensor([1.4, 2.8, 4.2]))


@pytest.mark.parametrize("cls, kwargs, states", [
    (optim.AdamW, {}, {"m": "Q8:dynamic:s:256", "v": "Q8:dynamic:u:256"}),
    (optim.Lion, {"bits": 4}, {"m": "Q4:dynamic:s:128"}),
    (optim.SGD, {"momentum": 0.9, "bits": 4}, {"momentum_buffer": "Q4:dynamic:s:128"}),
    (optim.SGD, {}, {}),
    (optim.RMSprop, {"centered": True, "momentum": 0.9},
     {"square_avg": "Q8:dynamic:u:256", "grad_avg": "Q8:dynamic:s:256", "momentum_buffer": "Q8:dynamic:s:256"}),
    (optim.Adagrad, {"bits": 4}, {"state_sum": "Q4:linear:u:128"}),
    (optim.AdEMAMix, {"bits": 32}, {"m1": "F32", "m2": "F32", "nu": "F32"}),
])
def test_drop_in_classes_declare_state_by_bits(cls, kwargs, states):
    opt = cls([torch.nn.Parameter(torch.randn(4))], **kwargs)
    assert {name: fmt.spec for name, fmt in opt.param_groups[0]["state"].items()} == states


def test_drop_in_classes_validate_like_torch():
    w = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="nesterov momentum requires"):
        optim.SGD([w], momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="three betas"):
        optim.AdEMAMix([w], betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="initial_accumulator_value must be >= 0"):
        optim.Adagrad([w], initial_accumulator_value=-1.0)
