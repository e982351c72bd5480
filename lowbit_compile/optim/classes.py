"""Drop-in optimizers with torch.optim's argument names and defaults, plus ``bits`` for the state format:
8 → ``Q8`` (signed for moments that change sign, unsigned for non-negative ones), 4 → ``Q4`` likewise (unsigned 4-bit
uses the linear map without zero), 32 → ``F32``. Quantized formats keep fp32 state for tensors smaller than
``min_quant_numel`` elements."""
from __future__ import annotations

from ..formats import F32, MIN_QUANT_NUMEL, Q4, Q8, Format
from . import rules
from .core import Optimizer

BITS = (8, 4, 32)


def state_formats(bits: int, min_quant_numel: int = MIN_QUANT_NUMEL, **signed: bool) -> dict[str, Format]:
    """``{name: format}`` for ``bits``, one entry per keyword (``True`` = signed state), in keyword order."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if bits == 32:
        return {name: F32() for name in signed}
    make = Q8 if bits == 8 else Q4
    return {name: make(is_signed, min_quant_numel=min_quant_numel) for name, is_signed in signed.items()}


def _no_amsgrad(amsgrad: bool, cls: str) -> None:
    if amsgrad:
        raise ValueError(f"lbc.optim.{cls}: amsgrad=True is not supported")


class Adam(Optimizer):
    """torch.optim.Adam with ``bits``-bit moments (``m`` signed, ``v`` unsigned)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, bits=8, min_quant_numel=MIN_QUANT_NUMEL):
        _no_amsgrad(amsgrad, "Adam")
        super().__init__(params, rules.adam, state_formats(bits, min_quant_numel, m=True, v=False), lr=lr,
                         betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)


class AdamW(Optimizer):
    """torch.optim.AdamW with ``bits``-bit moments (``m`` signed, ``v`` unsigned)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, bits=8, min_quant_numel=MIN_QUANT_NUMEL):
        _no_amsgrad(amsgrad, "AdamW")
        super().__init__(params, rules.adamw, state_formats(bits, min_quant_numel, m=True, v=False), lr=lr,
                         betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)


class SGD(Optimizer):
    """torch.optim.SGD; with ``momentum`` > 0 the momentum buffer is stored in ``bits`` bits (no state otherwise)."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, bits=8, min_quant_numel=MIN_QUANT_NUMEL):
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires a momentum > 0 and zero dampening")
        if momentum == 0:
            state_formats(bits)  # validates bits
            super().__init__(params, rules.sgd, {}, lr=lr, weight_decay=weight_decay, maximize=maximize)
        else:
            super().__init__(params, rules.sgd_momentum,
                             state_formats(bits, min_quant_numel, momentum_buffer=True), lr=lr, momentum=momentum,
                             dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)


class Lion(Optimizer):
    """Lion (Chen et al. 2023) with a ``bits``-bit momentum; defaults of the paper's reference code."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, bits=8,
                 min_quant_numel=MIN_QUANT_NUMEL):
        super().__init__(params, rules.lion, state_formats(bits, min_quant_numel, m=True), lr=lr, betas=betas,
                         weight_decay=weight_decay, maximize=maximize)


class RMSprop(Optimizer):
    """torch.optim.RMSprop; ``square_avg`` unsigned, ``grad_avg`` (centered) and ``momentum_buffer`` (momentum > 0)
    signed, all in ``bits`` bits."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False, bits=8, min_quant_numel=MIN_QUANT_NUMEL):
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        signed = {"square_avg": False}
        if centered:
            signed["grad_avg"] = True
        if momentum > 0:
            signed["momentum_buffer"] = True
        rule = {(False, False): rules.rmsprop, (True, False): rules.rmsprop_centered,
                (False, True): rules.rmsprop_momentum, (True, True): rules.rmsprop_centered_momentum}[
                    (bool(centered), momentum > 0)]
        extra = {"momentum": momentum} if momentum > 0 else {}
        super().__init__(params, rule, state_formats(bits, min_quant_numel, **signed), lr=lr, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, maximize=maximize, **extra)


class Adagrad(Optimizer):
    """torch.optim.Adagrad with a ``bits``-bit (unsigned) accumulator starting at ``initial_accumulator_value``."""

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10, *,
                 maximize=False, bits=8, min_quant_numel=MIN_QUANT_NUMEL):
        if initial_accumulator_value < 0:
            raise ValueError(f"initial_accumulator_value must be >= 0, got {initial_accumulator_value}")
        super().__init__(params, rules.adagrad, state_formats(bits, min_quant_numel, state_sum=False),
                         init=rules.adagrad_init, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize)


class AdEMAMix(Optimizer):
    """AdEMAMix (Pagliardini et al. 2024) with ``bits``-bit EMAs (``m1``, ``m2`` signed, ``nu`` unsigned); argument
    names and defaults of bitsandbytes' AdEMAMix."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None, eps=1e-8,
                 weight_decay=1e-2, *, bits=8, min_quant_numel=MIN_QUANT_NUMEL):
        if len(betas) != 3:
            raise ValueError(f"AdEMAMix takes three betas (beta1, beta2, beta3), got {betas!r}")
        super().__init__(params, rules.ademamix, state_formats(bits, min_quant_numel, m1=True, m2=True, nu=False),
                         lr=lr, betas=betas, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                         weight_decay=weight_decay)


__all__ = ["Adam", "AdamW", "SGD", "Lion", "RMSprop", "Adagrad", "AdEMAMix", "state_formats"]
