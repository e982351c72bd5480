"""Built-in update rules, written exactly as a user would write one.

A rule takes fp32 tensors ``p, g, *states`` and keyword-only hyperparameters (0-d fp32 tensors, tuples of them for
``betas``, or Python bools for structural switches such as ``nesterov``) plus ``step``, the 1-based step count, and
returns ``(p, *states)``. Rules are pure elementwise math: no in-place ops, no reductions, and no Python branches on
tensor values (first-step special cases use ``torch.where``). The formulas follow torch.optim's single-tensor
implementations operation by operation, so fp32 state reproduces torch.optim to fp32 rounding.
"""
from __future__ import annotations

import torch


def _adam_direction(g, m, v, *, betas, eps, step):
    """Adam's moment updates and its bias-corrected direction ``m_hat / (sqrt(v_hat) + eps)``."""
    beta1, beta2 = betas
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    direction = (m / bias_correction1) / (v.sqrt() / bias_correction2.sqrt() + eps)
    return direction, m, v


def adam(p, g, m, v, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False, step):
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient, as torch.optim.Adam."""
    if maximize:
        g = -g
    g = g + weight_decay * p
    direction, m, v = _adam_direction(g, m, v, betas=betas, eps=eps, step=step)
    return p - lr * direction, m, v


def adamw(p, g, m, v, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False, step):
    """AdamW (Loshchilov & Hutter): weight decay decoupled from the gradient, as torch.optim.AdamW."""
    if maximize:
        g = -g
    p = p * (1 - lr * weight_decay)
    direction, m, v = _adam_direction(g, m, v, betas=betas, eps=eps, step=step)
    return p - lr * direction, m, v


def sgd(p, g, *, lr=1e-3, weight_decay=0.0, maximize=False):
    """Plain SGD, as torch.optim.SGD with momentum=0."""
    if maximize:
        g = -g
    g = g + weight_decay * p
    return (p - lr * g,)


def sgd_momentum(p, g, momentum_buffer, *, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, step):
    """SGD with (Nesterov) momentum and dampening, as torch.optim.SGD: on the first step the buffer is set to the
    gradient itself (no dampening)."""
    if maximize:
        g = -g
    g = g + weight_decay * p
    momentum_buffer = torch.where(step == 1, g, momentum * momentum_buffer + (1 - dampening) * g)
    direction = g + momentum * momentum_buffer if nesterov else momentum_buffer
    return p - lr * direction, momentum_buffer


def lion(p, g, m, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
    """Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023): the sign of an interpolation of
    momentum and gradient, decoupled weight decay."""
    if maximize:
        g = -g
    beta1, beta2 = betas
    update = torch.sign(m + (1 - beta1) * (g - m))
    p = p * (1 - lr * weight_decay) - lr * update
    m = m + (1 - beta2) * (g - m)
    return p, m


def _rmsprop(p, g, square_avg, grad_avg, momentum_buffer, *, lr, alpha, eps, weight_decay, momentum, maximize):
    """torch.optim.RMSprop; ``grad_avg`` is None unless centered, ``momentum_buffer`` None unless momentum."""
    if maximize:
        g = -g
    g = g + weight_decay * p
    square_avg = alpha * square_avg + (1 - alpha) * g * g
    if grad_avg is None:
        avg = square_avg.sqrt() + eps
    else:
        grad_avg = grad_avg + (1 - alpha) * (g - grad_avg)
        avg = (square_avg - grad_avg * grad_avg).sqrt() + eps
    if momentum_buffer is None:
        return p - lr * (g / avg), square_avg, grad_avg, None
    momentum_buffer = momentum * momentum_buffer + g / avg
    return p - lr * momentum_buffer, square_avg, grad_avg, momentum_buffer


def rmsprop(p, g, square_avg, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, maximize=False):
    """RMSprop (Hinton), as torch.optim.RMSprop(centered=False, momentum=0)."""
    p, square_avg, _, _ = _rmsprop(p, g, square_avg, None, None, lr=lr, alpha=alpha, eps=eps,
                                   weight_decay=weight_decay, momentum=None, maximize=maximize)
    return p, square_avg


def rmsprop_centered(p, g, square_avg, grad_avg, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, maximize=False):
    """Centered RMSprop (Graves 2013): normalises by the variance estimate, as torch.optim.RMSprop(centered=True)."""
    p, square_avg, grad_avg, _ = _rmsprop(p, g, square_avg, grad_avg, None, lr=lr, alpha=alpha, eps=eps,
                                          weight_decay=weight_decay, momentum=None, maximize=maximize)
    return p, square_avg, grad_avg


def rmsprop_momentum(p, g, square_avg, momentum_buffer, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                     momentum=0.9, maximize=False):
    """RMSprop with momentum, as torch.optim.RMSprop(momentum>0)."""
    p, square_avg, _, momentum_buffer = _rmsprop(p, g, square_avg, None, momentum_buffer, lr=lr, alpha=alpha,
                                                 eps=eps, weight_decay=weight_decay, momentum=momentum,
                                                 maximize=maximize)
    return p, square_avg, momentum_buffer


def rmsprop_centered_momentum(p, g, square_avg, grad_avg, momentum_buffer, *, lr=1e-2, alpha=0.99, eps=1e-8,
                              weight_decay=0.0, momentum=0.9, maximize=False):
    """Centered RMSprop with momentum, as torch.optim.RMSprop(centered=True, momentum>0)."""
    return _rmsprop(p, g, square_avg, grad_avg, momentum_buffer, lr=lr, alpha=alpha, eps=eps,
                    weight_decay=weight_decay, momentum=momentum, maximize=maximize)


def adagrad(p, g, state_sum, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False, step):
    """Adagrad (Duchi et al.), as torch.optim.Adagrad. The accumulator starts at ``initial_accumulator_value``
    through ``adagrad_init``."""
    if maximize:
        g = -g
    g = g + weight_decay * p
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum = state_sum + g * g
    return p - clr * (g / (state_sum.sqrt() + eps)), state_sum


def adagrad_init(p, *, initial_accumulator_value=0.0):
    """Initial Adagrad accumulator: ``initial_accumulator_value`` everywhere."""
    return (torch.zeros_like(p) + initial_accumulator_value,)


def ademamix(p, g, m1, m2, nu, *, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None,
             eps=1e-8, weight_decay=1e-2, step):
    """AdEMAMix (Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024, Algorithm 1):
    Adam's fast EMA ``m1`` plus ``alpha`` times a slow, not bias-corrected EMA ``m2`` with decay ``beta3``; decoupled
    weight decay. With ``t_alpha`` / ``t_beta3`` (step counts) alpha warms up linearly and beta3 follows the paper's
    schedule from beta1 to beta3 (both then stay at their final values)."""
    beta1, beta2, beta3 = betas
    if t_alpha is not None:
        alpha = torch.minimum(step * alpha / t_alpha, alpha)
    if t_beta3 is not None:
        log_beta1, log_beta3 = torch.log(beta1), torch.log(beta3)
        fraction = step / t_beta3
        beta3 = torch.minimum(
            torch.exp(log_beta1 * log_beta3 / ((1 - fraction) * log_beta3 + fraction * log_beta1)), beta3)
    m1 = beta1 * m1 + (1 - beta1) * g
    m2 = beta3 * m2 + (1 - beta3) * g
    nu = beta2 * nu + (1 - beta2) * g * g
    m1_hat = m1 / (1 - beta1**step)
    nu_hat = nu / (1 - beta2**step)
    p = p * (1 - lr * weight_decay) - lr * (m1_hat + alpha * m2) / (nu_hat.sqrt() + eps)
    return p, m1, m2, nu


__all__ = ["adam", "adamw", "sgd", "sgd_momentum", "lion", "rmsprop", "rmsprop_centered", "rmsprop_momentum",
           "rmsprop_centered_momentum", "adagrad", "adagrad_init", "ademamix"]
