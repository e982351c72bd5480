"""EFCP: error-feedback compressed full-matrix preconditioners (sparse or low-rank M-FAC and GGT).

Every step, per param group (reference/efcp_anchors.md §3)::

    a = e + g;  c = compress(a);  e = a - c        # error feedback; c is what is stored
    ring[head] = c                                  # sliding window of the last m compressed gradients (rows of G)
    s = G c;  K[head, :] = K[:, head] = s           # Gram matrix K = G G^T of the stored rows, float64
    u = precondition(c)                             # M-FAC or GGT, through an m x m core on K
    v = momentum * v + u  (if momentum > 0);  p = p * (1 - lr * weight_decay) - lr * v
    head = (head + 1) % m

M-FAC (``EFMFAC``): ``u = (damping I + G^T G / m)^{-1} c = (c - G^T coef) / damping`` with
``(m damping I + K) coef = s`` (Woodbury; Cholesky in float64). The 1/m scaling is kept while the window fills, as
in the reference. GGT (``EFGGT``): ``u = ((G^T G)^{1/2} + eps I)^{-1} c = (c + G^T alpha) / eps`` with
``alpha = V diag(-1 / (sigma (sigma + eps))) V^T s`` from ``eigh(K) = V diag(sigma^2) V^T``.

Compressors:

* ``"topk"`` (default): the group's parameters are flattened into one vector (each parameter becomes a view into
  it, so every step is a fixed number of kernel launches whatever the number of tensors), split into blocks of
  ``block`` elements; each block keeps its ``round(density * block)`` largest ``|a|`` (ties: lowest index), stored
  as 12-bit block-relative indices and 8-bit codes with one scale per block and slot; the 8-bit rounding error goes
  back into ``e``. Kernels: ``lowbit_compile.templates.efcp``. The error feedback ``e`` is stored in ``ef_format``.
* ``"lowrank"``: per matrix parameter (reshaped to ``(shape[0], -1)``), one warm-started power iteration of rank
  ``rank`` (PowerSGD): ``P = orthonormalize(A Q); Q = A^T P; c = P Q^T``, per-tensor fp32 error feedback;
  parameters with fewer than two dimensions enter the window exactly, without error feedback. All tensors share one
  window and one m x m core.

Non-finite gradient elements are treated as 0: they never reach the parameters or the state. Nothing in ``step``
synchronises with the host. Hyperparameters ``lr``, ``weight_decay`` and ``damping``/``eps`` are 0-d fp32 tensors
in the param groups (assigning a number fills them in place, so a captured CUDA graph sees schedules); ``m``,
``density``, ``block``, ``ef_format``, ``compressor``, ``rank`` and ``momentum`` are fixed when a group is created.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import torch

from ..formats import Q8, Plain, Quantized, as_format
from ..templates import efcp as kernels
from .core import Optimizer as _RuleOptimizer
from .core import ParamGroup, StateReport, StateRow, evaluate_closure, saved_groups_and_state

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMPRESSORS = ("topk", "lowrank")
# Chosen from benchmarks/results/efcp.quality.md: Q8 error feedback trains like fp32; Q4 loses accuracy.
DEFAULT_EF_FORMAT = Q8()
# Eigenvalues of K below this fraction of the largest are treated as 0 (their directions lie outside the window's
# span up to rounding, where G^T v = 0 and the exact contribution vanishes).
_EIGENVALUE_CUTOFF = 1e-12

_STRUCTURE_KEYS = ("m", "density", "block", "ef_format", "compressor", "rank", "momentum")
_FIXED_KEYS = frozenset(("params", "param_names") + _STRUCTURE_KEYS)


# --------------------------------------------------------------------------------------------------------------
# The m x m cores
# --------------------------------------------------------------------------------------------------------------
def mfac_coefficients(gram: torch.Tensor, dots: torch.Tensor, damping: torch.Tensor):
    """M-FAC: ``(alpha, u_scale)`` with ``u = u_scale * (x + G^T alpha) = (damping I + G^T G / m)^{-1} x`` for
    ``dots = G x`` and ``gram = G G^T`` (float64 [m, m])."""
    m = gram.shape[0]
    system = gram.clone()
    system.diagonal().add_(damping.double() * m)
    factor = torch.linalg.cholesky_ex(system).L  # no error check: no host sync; a failed factor is caught below
    y = torch.linalg.solve_triangular(factor, dots[:, None], upper=False)
    coef = torch.linalg.solve_triangular(factor.mT, y, upper=True)[:, 0]
    alpha = torch.where(torch.isfinite(coef), -coef, 0.0)
    return alpha, torch.reciprocal(damping)


def ggt_coefficients(gram: torch.Tensor, dots: torch.Tensor, eps: torch.Tensor):
    """GGT: ``(alpha, u_scale)`` with ``u = u_scale * (x + G^T alpha) = ((G^T G)^{1/2} + eps I)^{-1} x``."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.clamp_min(0.0)
    keep = eigenvalues > eigenvalues[-1] * _EIGENVALUE_CUTOFF
    sigma = torch.where(keep, eigenvalues.sqrt(), 1.0)
    gain = torch.where(keep, -1.0 / (sigma * (sigma + eps.double())), 0.0)
    alpha = vectors @ (gain * (vectors.mT @ dots))
    alpha = torch.where(torch.isfinite(alpha), alpha, 0.0)
    return alpha, torch.reciprocal(eps)


# --------------------------------------------------------------------------------------------------------------
# Per-group runtime (not state: rebuilt when the optimizer is built)
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _FlatGroup:
    """A top-k group: its parameters are views into ``flat``; ``workspace`` holds the gradient, then c, then the
    unscaled update, one step at a time."""

    layout: kernels.RingLayout
    flat: torch.Tensor
    workspace: torch.Tensor
    momentum: torch.Tensor  # 0-d fp32


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _orthonormalize_(columns: torch.Tensor) -> torch.Tensor:
    """Modified Gram-Schmidt on the columns of ``columns`` in place (a zero column stays 0)."""
    for i in range(columns.shape[1]):
        column = columns[:, i]
        column.div_(column.norm() + 1e-8)
        if i + 1 < columns.shape[1]:
            rest = columns[:, i + 1:]
            rest.sub_(column[:, None] * (column @ rest)[None, :])
    return columns


# --------------------------------------------------------------------------------------------------------------
# The optimizers
# --------------------------------------------------------------------------------------------------------------
class _ErrorFeedbackPreconditioner(torch.optim.Optimizer):
    _core_key: str
    _core: Callable

    def __init__(self, params, defaults: dict):
        self._flat_groups: dict[torch.Tensor, _FlatGroup] = {}
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        index = len(self.param_groups)
        where = f"{type(self).__name__} param_groups[{index}]"
        if "params" not in param_group:
            raise ValueError(f"{where} has no 'params'")
        params, names = _RuleOptimizer._unpack_params(param_group["params"], where)
        unknown = sorted(set(param_group) - set(self.defaults) - {"params", "param_names"})
        if unknown:
            raise TypeError(f"{where}: unknown option(s) {unknown}; known: {sorted(self.defaults)}")
        options = {**self.defaults, **{k: v for k, v in param_group.items() if k not in ("params", "param_names")}}
        self._check_params(params, names, where)
        device, dtype = params[0].device, params[0].dtype
        structure = self._check_options(options, where)
        hyper = {}
        for key in ("lr", "weight_decay", self._core_key):
            value = options[key]
            if isinstance(value, torch.Tensor):
                value = float(value)
            if not _is_number(value) or not math.isfinite(value) or value < 0 or (key == self._core_key and value <= 0):
                bound = "> 0" if key == self._core_key else ">= 0"
                raise ValueError(f"{where}: {key} must be a finite number {bound}, got {options[key]!r}")
            hyper[key] = torch.tensor(float(value), dtype=torch.float32, device=device)

        group = ParamGroup()
        group.fixed_keys = _FIXED_KEYS
        dict.update(group, params=params, **({"param_names": names} if names is not None else {}), **structure,
                    **hyper)
        with torch.no_grad():
            if structure["compressor"] == "topk":
                self._init_topk(group, dtype, device)
            else:
                self._init_lowrank(group, device)
        self.param_groups.append(group)

    def _check_params(self, params, names, where: str) -> None:
        if not params:
            raise ValueError(f"{where} has no parameters")
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        mine = set()
        first = params[0]
        for i, p in enumerate(params):
            label = f"{where} parameter {names[i]!r}" if names else f"{where}['params'][{i}]"
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{label} is a {type(p).__name__}, not a tensor")
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(f"{label} has dtype {p.dtype}; supported: {', '.join(map(str, PARAM_DTYPES))}")
            if p.is_sparse or not p.is_leaf:
                raise ValueError(f"{label} must be a dense leaf tensor")
            if p.device != first.device or p.dtype != first.dtype:
                raise ValueError(f"{label} is {p.dtype} on {p.device} but the group's first parameter is "
                                 f"{first.dtype} on {first.device}: one param group holds one dtype on one device")
            if id(p) in seen or id(p) in mine:
                raise ValueError(f"{label} appears in more than one place")
            mine.add(id(p))
        if sum(p.numel() for p in params) == 0:
            raise ValueError(f"{where} has no parameter elements")

    def _check_options(self, options: dict, where: str) -> dict:
        m, block, rank = options["m"], options["block"], options["rank"]
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"{where}: m (the window) must be an int >= 1, got {m!r}")
        if options["compressor"] not in COMPRESSORS:
            raise ValueError(f"{where}: compressor must be one of {COMPRESSORS}, got {options['compressor']!r}")
        momentum = options["momentum"]
        if not _is_number(momentum) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"{where}: momentum must be a number in [0, 1), got {momentum!r}")
        structure = {"m": m, "density": options["density"], "block": block, "compressor": options["compressor"],
                     "rank": rank, "momentum": float(momentum)}
        if options["compressor"] == "topk":
            if not isinstance(block, int) or isinstance(block, bool):
                raise ValueError(f"{where}: block must be an int, got {block!r}")
            density = options["density"]
            if not _is_number(density):
                raise ValueError(f"{where}: density must be a number, got {density!r}")
            try:
                kernels.entries_per_block(float(density), block)
                kernels.RingLayout(1, block, 1, m)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            try:
                fmt = as_format(options["ef_format"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}: ef_format: {err}") from None
            if isinstance(fmt, Quantized) and (not fmt.signed or block % fmt.block):
                raise ValueError(f"{where}: ef_format {fmt!r} must be signed with a block dividing block={block}")
            if isinstance(fmt, Plain) and fmt.dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"{where}: ef_format must be F32, BF16, Q8 or Q4, got {fmt!r}")
            structure["density"] = float(density)
            structure["ef_format"] = fmt.spec
        else:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"{where}: rank must be an int >= 1, got {rank!r}")
            structure["ef_format"] = "F32"
        return structure

    def _init_topk(self, group: dict, dtype: torch.dtype, device: torch.device) -> None:
        params = group["params"]
        numel = sum(p.numel() for p in params)
        layout = kernels.RingLayout(numel, group["block"], kernels.entries_per_block(group["density"], group["block"]),
                                    group["m"])
        flat = torch.empty(numel, dtype=dtype, device=device)
        offset = 0
        for p in params:
            n = p.numel()
            flat[offset: offset + n].copy_(p.detach().reshape(-1))
            p.data = flat[offset: offset + n].view(p.shape)
            offset += n
        ef = kernels.empty_error_feedback(group["ef_format"], layout, device)
        dict.__setitem__(group, "ef_format", ef.spec)  # F32 where a quantized format falls back
        ring = kernels.empty_ring(layout, device)
        state = {"error": ef.values, "error.absmax": ef.absmax, "ring.index_low": ring.index_low,
                 "ring.index_high": ring.index_high, "ring.codes": ring.codes, "ring.scale": ring.scale,
                 **self._window_state(group["m"], device)}
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros(numel, dtype=torch.float32, device=device)
        self.state[params[0]] = state
        self._flat_groups[params[0]] = _FlatGroup(
            layout, flat, torch.zeros(layout.padded_numel, dtype=torch.float32, device=device),
            torch.tensor(group["momentum"], dtype=torch.float32, device=device))

    def _init_lowrank(self, group: dict, device: torch.device) -> None:
        m, rank = group["m"], group["rank"]
        for p in group["params"]:
            state = {}
            if p.dim() >= 2:
                rows, cols = p.shape[0], p.numel() // p.shape[0]
                state["error"] = torch.zeros(rows, cols, dtype=torch.float32, device=device)
                state["basis"] = torch.randn(cols, rank, dtype=torch.float32, device=device)
                state["ring.left"] = torch.zeros(m, rows, rank, dtype=torch.float32, device=device)
                state["ring.right"] = torch.zeros(m, cols, rank, dtype=torch.float32, device=device)
            else:
                state["ring.vector"] = torch.zeros(m, p.numel(), dtype=torch.float32, device=device)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=device)
            self.state[p] = state
        self.state[group["params"][0]].update(self._window_state(m, device))

    @staticmethod
    def _window_state(m: int, device) -> dict:
        return {"gram": torch.zeros(m, m, dtype=torch.float64, device=device),
                "head": torch.zeros((), dtype=torch.int64, device=device)}

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One update of every group with at least one gradient; ``closure`` runs first with gradients enabled."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            grads = [p.grad for p in group["params"]]
            if all(g is None for g in grads):
                continue
            for i, g in enumerate(grads):
                if g is not None and g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__}: param_groups[...]['params'][{i}] has a sparse "
                                       "gradient; EFCP takes dense gradients")
            if group["compressor"] == "topk":
                self._step_topk(group, grads)
            else:
                self._step_lowrank(group, grads)
        return loss

    def _coefficients(self, group: dict, gram: torch.Tensor, dots: torch.Tensor):
        return type(self)._core(gram, dots, group[self._core_key])

    @staticmethod
    def _append_gram(window: dict, dots: torch.Tensor) -> None:
        slot = window["head"].view(1)
        window["gram"].index_copy_(0, slot, dots[None, :])
        window["gram"].index_copy_(1, slot, dots[:, None])

    def _step_topk(self, group: dict, grads: list) -> None:
        params = group["params"]
        flat = self._flat_groups[params[0]]
        layout = flat.layout
        state = self.state[params[0]]
        pieces = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(params, grads)]
        torch.cat(pieces, out=flat.workspace[: layout.numel])

        ring = kernels.SparseRing(state["ring.index_low"], state["ring.index_high"], state["ring.codes"],
                                  state["ring.scale"])
        ef = kernels.ErrorFeedback(state["error"], state["error.absmax"], group["ef_format"])
        compress, dots_of, combine = kernels.implementations(flat.workspace.device)
        compress(flat.workspace, ef, ring, state["head"], layout)
        dots = dots_of(flat.workspace, ring, layout)
        self._append_gram(state, dots)
        alpha, u_scale = self._coefficients(group, state["gram"], dots)
        combine(flat.workspace, flat.flat, state.get("momentum_buffer"), ring, alpha.float(), layout, lr=group["lr"],
                u_scale=u_scale, weight_decay=group["weight_decay"], momentum=flat.momentum)
        state["head"].add_(1).remainder_(layout.m)

    def _step_lowrank(self, group: dict, grads: list) -> None:
        params = group["params"]
        window = self.state[params[0]]
        slot = window["head"].view(1)
        dots = torch.zeros(group["m"], dtype=torch.float64, device=params[0].device)
        compressed = []
        for p, g in zip(params, grads):
            state = self.state[p]
            g = torch.zeros(p.shape, dtype=torch.float32, device=p.device) if g is None else g.float()
            g = torch.where(torch.isfinite(g), g, 0.0)
            if "ring.vector" in state:
                x = g.reshape(-1)
                state["ring.vector"].index_copy_(0, slot, x[None, :])
                dots += state["ring.vector"].double() @ x.double()
                compressed.append((x,))
                continue
            a = g.reshape(state["error"].shape) + state["error"]
            left = _orthonormalize_(a @ state["basis"])
            right = a.mT @ left
            state["error"].copy_(a - left @ right.mT)
            state["basis"].copy_(right)
            state["ring.left"].index_copy_(0, slot, left[None])
            state["ring.right"].index_copy_(0, slot, right[None])
            # <L_j R_j^T, P Q^T>_F = sum((L_j^T P) * (R_j^T Q))
            dots += ((state["ring.left"].mT @ left).double() * (state["ring.right"].mT @ right).double()).sum((1, 2))
            compressed.append((left, right))
        self._append_gram(window, dots)
        alpha, u_scale = self._coefficients(group, window["gram"], dots)
        alpha = alpha.float()
        lr, weight_decay = group["lr"], group["weight_decay"]
        for p, x in zip(params, compressed):
            state = self.state[p]
            if len(x) == 1:
                u = x[0] + alpha @ state["ring.vector"]
            else:
                left, right = x
                m, rows, rank = state["ring.left"].shape
                stacked_left = state["ring.left"].permute(1, 0, 2).reshape(rows, m * rank)
                stacked_right = (state["ring.right"] * alpha[:, None, None]).permute(1, 0, 2).reshape(-1, m * rank)
                u = left @ right.mT + stacked_left @ stacked_right.mT
            u = u.reshape(p.shape) * u_scale
            if "momentum_buffer" in state:
                state["momentum_buffer"].mul_(group["momentum"]).add_(u)
                u = state["momentum_buffer"]
            p.copy_(p.float() * (1.0 - lr * weight_decay) - lr * u)
        window["head"].add_(1).remainder_(group["m"])

    # ---------------------------------------------------------------- inspection
    def describe(self) -> StateReport:
        """Every state tensor with its bytes, and the state bytes per parameter element (``bytes_per_param``)."""
        rows, numel = [], 0
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                numel += p.numel()
                for key, tensor in self.state.get(p, {}).items():
                    fmt, block = str(tensor.dtype).removeprefix("torch."), None
                    if key.startswith("error") and group["compressor"] == "topk":
                        spec = as_format(group["ef_format"])
                        fmt, block = spec.spec, getattr(spec, "block", None)
                    rows.append(StateRow(param=f"param_groups[{gi}]['params'][{pi}]", shape=tuple(tensor.shape),
                                         state=key, format=fmt, block=block,
                                         bytes=tensor.numel() * tensor.element_size(), fallback=None))
        return StateReport(tuple(rows), numel)

    def workspace_bytes(self) -> int:
        """Bytes of the per-group gradient workspaces (fp32, one per top-k group): scratch, not state."""
        return sum(f.workspace.numel() * f.workspace.element_size() for f in self._flat_groups.values())

    # ---------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()`` of an optimizer with the same groups and options. Everything is checked before
        anything is written; values are copied into the existing tensors and never cast (the float64 Gram matrix
        and fp32 scales stay so on bf16 parameters)."""
        saved_groups, saved_state = saved_groups_and_state(state_dict, len(self.param_groups))
        copies, fills = [], []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            where = f"param_groups[{gi}]"
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}: the state dict has {len(saved['params'])} parameters, this optimizer "
                                 f"{len(group['params'])}")
            for key in _STRUCTURE_KEYS:
                if saved.get(key) != group[key]:
                    raise ValueError(f"{where}[{key!r}]: the state dict has {saved.get(key)!r}, this optimizer "
                                     f"{group[key]!r}")
            for key in ("lr", "weight_decay", self._core_key):
                value = saved[key]
                if not (_is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1)):
                    raise ValueError(f"{where}[{key!r}]: expected one number, got {value!r}")
                fills.append((group, key, value))
            for p, saved_id in zip(group["params"], saved["params"]):
                ours, theirs = self.state.get(p, {}), saved_state.get(saved_id, {})
                if set(ours) != set(theirs):
                    raise ValueError(f"{where}: parameter {saved_id} has state {sorted(theirs)} in the state dict, "
                                     f"{sorted(ours)} here")
                for key, tensor in ours.items():
                    value = theirs[key]
                    if (not isinstance(value, torch.Tensor) or value.shape != tensor.shape
                            or value.dtype != tensor.dtype):
                        raise ValueError(f"{where}: parameter {saved_id}, state {key!r}: expected a {tensor.dtype} "
                                         f"tensor of shape {tuple(tensor.shape)}, got {value!r:.80}")
                    copies.append((tensor, value))
        with torch.no_grad():
            for tensor, value in copies:
                tensor.copy_(value)
        for group, key, value in fills:
            group[key] = value


class EFMFAC(_ErrorFeedbackPreconditioner):
    """Error-feedback compressed M-FAC: ``u = (damping I + G^T G / m)^{-1} c`` over a window of the last ``m``
    compressed gradients ``c`` (see the module docstring).

    Args:
        params: parameters or param-group dicts (one dtype and device per group).
        lr: learning rate.
        m: window size (any int >= 1).
        density: fraction of each block kept by top-k (``k = round(density * block)`` must be in [1, block - 1]).
        damping: Tikhonov damping lambda (> 0).
        ef_format: storage of the error feedback: ``lbc.F32()``, ``lbc.BF16()``, ``lbc.Q8()`` or ``lbc.Q4()``.
        block: top-k block (power of two <= 4096: the ring stores 12-bit block-relative indices).
        compressor: ``"topk"`` or ``"lowrank"``; ``rank``: rank of the low-rank compressor.
        momentum: ``v = momentum * v + u`` (0: no buffer). weight_decay: decoupled, ``p *= 1 - lr * weight_decay``.
    """

    _core_key = "damping"
    _core = staticmethod(mfac_coefficients)

    def __init__(self, params, lr: float, m: int = 1024, density: float = 0.01, damping: float = 1e-6, *,
                 ef_format=DEFAULT_EF_FORMAT, block: int = kernels.MAX_BLOCK, compressor: str = "topk",
                 rank: int = 4, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, m=m, density=density, damping=damping, ef_format=ef_format,
                                      block=block, compressor=compressor, rank=rank, momentum=momentum,
                                      weight_decay=weight_decay))


class EFGGT(_ErrorFeedbackPreconditioner):
    """Error-feedback compressed GGT (windowed full-matrix AdaGrad): ``u = ((G^T G)^{1/2} + eps I)^{-1} c`` over
    the last ``m`` compressed gradients. Arguments as ``EFMFAC``, with ``eps`` in place of ``damping``.

    The core is ``torch.linalg.eigh``, which checks its result on the host: an EFGGT step synchronises once (seen on
    the H100 under ``torch.cuda.set_sync_debug_mode("error")``) and cannot be captured in a CUDA graph; EFMFAC's
    step does not synchronise."""

    _core_key = "eps"
    _core = staticmethod(ggt_coefficients)

    def __init__(self, params, lr: float, m: int = 100, density: float = 0.01, eps: float = 1e-5, *,
                 ef_format=DEFAULT_EF_FORMAT, block: int = kernels.MAX_BLOCK, compressor: str = "topk",
                 rank: int = 4, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, m=m, density=density, eps=eps, ef_format=ef_format, block=block,
                                      compressor=compressor, rank=rank, momentum=momentum,
                                      weight_decay=weight_decay))


__all__ = ["EFMFAC", "EFGGT", "mfac_coefficients", "ggt_coefficients", "DEFAULT_EF_FORMAT", "COMPRESSORS"]
