"""The allow-list: pointwise ATen/prims ops the fused kernel can compute, each with its ``tl`` expression.

An op is allowed when it is listed here (by its overload name, so ops that only some torch versions have, such as
inductor's ``prims.fma``, need no version checks). Both graph flavours are covered: inductor's post-grad graph
(decomposed: ``convert_element_type``, ``fma``, ``add(alpha=)``, ``clamp_min``) and the aot-eager graph (undecomposed:
``_to_copy``, ``lerp``, ``clamp``, ``addcdiv``, ``isfinite``).

Semantics follow ATen: arithmetic runs in the node's result dtype (bf16/fp16 results are computed in fp32 and rounded
to nearest even, as ATen's opmath does); comparisons in the promoted dtype of their operands. Under the interpreter
every fp32 operation is IEEE (numpy). On the GPU ``/``, ``sqrt`` and ``rsqrt`` are Triton's fast forms (``div.full``,
2 ulp; ``sqrt.approx``/``rsqrt.approx``, about 1 ulp; a tensor divided by a 0-d scalar or a number is multiplied by
the correctly rounded reciprocal, computed once per program, 1.5 ulp): correctly rounded ``div_rn``/``sqrt_rn`` cost
~10 instructions each and the fused kernel must stay memory-bound; ``exp``/``log``/``pow`` (exp2/log2 based) are a few ulp from torch's
(``pow``'s error grows with ``|y * log2 x|``). Triton may also contract a multiply and an add into an FMA.

0-d values (the launch's scalar program: bias corrections, ``1 - lr * wd``) are computed once per program, so they
take the exact forms: correctly rounded division and square root, and ``pow``/``exp``/``log`` as torch's CUDA kernels
compute them (libdevice) on the GPU, in float64 rounded once under the interpreter (torch's CPU results, but for
values within 1e-14 of a rounding tie).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch.fx import Node

from ..templates.fused_update import dtype_name, tl_dtype


@dataclasses.dataclass(frozen=True)
class Value:
    """An operand in generated code: its source text, dtype and whether it is a 0-d scalar (for type promotion)."""

    text: str
    dtype: torch.dtype
    scalar: bool = False


def literal(x, dtype: torch.dtype) -> str:
    """A Python number as source text of ``dtype``'s kind."""
    if dtype == torch.bool:
        return "1" if x else "0"
    if dtype.is_floating_point:
        x = float(x)
        if math.isnan(x):
            return 'float("nan")'
        if math.isinf(x):
            return 'float("inf")' if x > 0 else '-float("inf")'
        return repr(x)
    return repr(int(x))


def cast(v: Value | bool | int | float, dtype: torch.dtype) -> str:
    """Source text of ``v`` converted to ``dtype`` with torch's conversion rules."""
    if not isinstance(v, Value):
        return literal(v, dtype)
    if v.dtype == dtype:
        return v.text
    if dtype == torch.bool:
        return f"({v.text} != 0)"
    if dtype == torch.bfloat16:
        # The interpreter's cast truncates; round to nearest even explicitly.
        return f"_bf16_rne({cast(v, torch.float32)})"
    return f"{v.text}.to({tl_dtype(dtype_name(dtype))})"


def _example(v):
    if isinstance(v, Value):
        return torch.empty(() if v.scalar else (1,), dtype=v.dtype, device="meta")
    return v


def promoted(*operands) -> torch.dtype:
    """ATen's result dtype of ``operands`` (Values and Python numbers), dimensioned tensors beating 0-d ones."""
    from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes
    _, result = elementwise_dtypes(*map(_example, operands),
                                   type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT)
    return result


@dataclasses.dataclass
class Op:
    """One node being emitted: its converted operands (Values for tensors, Python objects otherwise) and its
    result dtype. ``compute`` is the dtype arithmetic runs in."""

    args: tuple
    kwargs: dict
    out: torch.dtype
    scalar: bool = False  # a 0-d value: exact forms (see the module docstring)

    @property
    def compute(self) -> torch.dtype:
        return torch.float32 if self.out in (torch.bfloat16, torch.float16) else self.out

    def arg(self, i, name=None, default=None):
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def x(self, i, name=None, default=None, dtype=None) -> str:
        """Operand ``i`` (or keyword ``name``) as text in ``dtype`` (default: the compute dtype)."""
        return cast(self.arg(i, name, default), dtype or self.compute)


EMITTERS: dict[str, Callable[[Op], str]] = {}


def pointwise(*names: str):
    def register(fn):
        for name in names:
            EMITTERS[name] = fn
        return fn
    return register


def _arith(op: Op, symbol: str, bool_symbol: str) -> str:
    return f"({op.x(0)} {bool_symbol if op.compute == torch.bool else symbol} {op.x(1)})"


def _plus_scaled(op: Op, base: str, i: int, sign: int) -> str:
    """``base + sign * alpha * operand i``; with an alpha, one fused multiply-add, as ATen's kernels compute it."""
    alpha = op.kwargs.get("alpha", 1)
    if alpha == 1:
        return f"({base} {'+' if sign > 0 else '-'} {op.x(i)})"
    return f"tl.fma({literal(sign * alpha, op.compute)}, {op.x(i)}, {base})"


@pointwise("aten.add.Tensor", "aten.add.Scalar")
def _add(op):
    if op.compute == torch.bool:
        return _arith(op, "+", "|")
    return _plus_scaled(op, op.x(0), 1, +1)


@pointwise("aten.sub.Tensor", "aten.sub.Scalar")
def _sub(op):
    return _plus_scaled(op, op.x(0), 1, -1)


@pointwise("aten.rsub.Tensor", "aten.rsub.Scalar")
def _rsub(op):
    return _plus_scaled(op, op.x(1), 0, -1)


@pointwise("aten.mul.Tensor", "aten.mul.Scalar")
def _mul(op):
    return _arith(op, "*", "&")


def _true_div(a: str, b: str, exact: bool = False) -> str:
    return f"_exact_div({a}, {b})" if exact else f"({a} / {b})"


@pointwise("aten.div.Tensor", "aten.div.Scalar", "aten.true_divide.Tensor")
def _div(op):
    dividend, divisor = op.arg(0), op.arg(1)
    by_scalar = not isinstance(divisor, Value) or divisor.scalar
    if op.compute == torch.float32 and by_scalar and isinstance(dividend, Value) and not dividend.scalar:
        return f"_div_by_scalar({op.x(0)}, {op.x(1)})"
    return _true_div(op.x(0), op.x(1), op.scalar)


@pointwise("aten.div.Tensor_mode", "aten.div.Scalar_mode")
def _div_mode(op):
    mode = op.kwargs.get("rounding_mode")
    quotient = _true_div(op.x(0), op.x(1), op.scalar)
    if mode is None:
        return quotient
    if mode == "floor":
        return f"tl.floor({quotient})"
    return f"tl.where({quotient} < 0, tl.ceil({quotient}), tl.floor({quotient}))"


@pointwise("aten.neg.default")
def _neg(op):
    return f"(-{op.x(0)})"


@pointwise("aten.reciprocal.default")
def _reciprocal(op):
    return _true_div("1.0", op.x(0), op.scalar)


@pointwise("aten.square.default")
def _square(op):
    return f"({op.x(0)} * {op.x(0)})"


# The exact forms of 0-d values' functions (prelude of templates/fused_update.py).
_SCALAR_FORMS = {"tl.sqrt": "_exact_sqrt", "tl.math.rsqrt": "_exact_rsqrt", "tl.exp": "_scalar_exp",
                 "tl.log": "_scalar_log"}


def _unary(fn: str):
    return lambda op: f"{_SCALAR_FORMS.get(fn, fn) if op.scalar else fn}({op.x(0)})"


for _name, _fn in {"abs": "tl.abs", "sqrt": "tl.sqrt", "rsqrt": "tl.math.rsqrt", "exp": "tl.exp", "exp2": "tl.exp2",
                   "log": "tl.log", "log2": "tl.log2", "sin": "tl.sin",
                   "cos": "tl.cos", "erf": "tl.erf", "floor": "tl.floor", "ceil": "tl.ceil", "sign": "_sign",
                   "sgn": "_sign", "tanh": "_tanh", "round": "_rint"}.items():
    pointwise(f"aten.{_name}.default")(_unary(_fn))


@pointwise("aten.trunc.default")
def _trunc(op):
    x = op.x(0)
    return f"tl.where({x} < 0, tl.ceil({x}), tl.floor({x}))"


@pointwise("aten.log10.default")
def _log10(op):
    return f"(tl.log({op.x(0)}) * {1 / math.log(10)!r})"


@pointwise("aten.log1p.default")
def _log1p(op):
    # log(u) corrected by the rounding error of u = 1 + x (Goldberg), exact where 1 + x == 1.
    x = op.x(0)
    u = f"(1.0 + {x})"
    return f"tl.where({u} == 1.0, {x}, tl.log({u}) * {_true_div(x, f'({u} - 1.0)', op.scalar)})"


@pointwise("aten.expm1.default")
def _expm1(op):
    x = op.x(0)
    u = f"tl.exp({x})"
    return (f"tl.where({u} == 1.0, {x}, tl.where({u} - 1.0 == -1.0, -1.0, "
            f"{_true_div(f'({u} - 1.0) * {x}', f'tl.log({u})', op.scalar)}))")


@pointwise("aten.sigmoid.default")
def _sigmoid(op):
    return _true_div("1.0", f"(1.0 + tl.exp(-{op.x(0)}))", op.scalar)


@pointwise("aten.relu.default")
def _relu(op):
    x = op.x(0)
    return f"tl.where({x} < 0, 0.0, {x})"


# ATen computes these exponents by multiplication, square root and division (as its pow kernels special-case them).
_POW_SPECIAL = {2: "({x} * {x})", 3: "({x} * {x} * {x})", 1: "{x}", 0.5: "tl.sqrt({x})",
                -0.5: "tl.math.rsqrt({x})", -1: "(1.0 / {x})", -2: "(1.0 / ({x} * {x}))"}
_POW_SPECIAL_EXACT = {**_POW_SPECIAL, 0.5: "_exact_sqrt({x})", -0.5: "_exact_rsqrt({x})",
                      -1: "_exact_div(1.0, {x})", -2: "_exact_div(1.0, {x} * {x})"}


@pointwise("aten.pow.Tensor_Scalar")
def _pow_scalar(op):
    exponent = op.args[1]
    x = op.x(0)
    if exponent == 0:
        return f"({x} * 0.0 + 1.0)"
    special = _POW_SPECIAL_EXACT if op.scalar else _POW_SPECIAL
    if exponent in special:
        return special[exponent].format(x=x)
    return f"{_pow_function(op)}({x}, {literal(exponent, op.compute)})"


def _pow_function(op) -> str:
    return "_scalar_pow" if op.scalar else "_pow"


@pointwise("aten.pow.Tensor_Tensor")
def _pow_tensor(op):
    return f"{_pow_function(op)}({op.x(0)}, {op.x(1)})"


@pointwise("aten.pow.Scalar")
def _pow_scalar_base(op):
    y = op.x(1)
    return f"{_pow_function(op)}(tl.zeros_like({y}) + {literal(op.args[0], op.compute)}, {y})"


def _nan_propagating(fn: str, a: str, b: str) -> str:
    return f"tl.{fn}({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"


@pointwise("aten.maximum.default")
def _maximum(op):
    return _nan_propagating("maximum", op.x(0), op.x(1))


@pointwise("aten.minimum.default")
def _minimum(op):
    return _nan_propagating("minimum", op.x(0), op.x(1))


@pointwise("aten.clamp.default", "aten.clamp.Tensor")
def _clamp(op):
    out = op.x(0)
    low, high = op.arg(1, "min"), op.arg(2, "max")
    if low is not None:
        out = _nan_propagating("maximum", out, cast(low, op.compute))
    if high is not None:
        out = _nan_propagating("minimum", out, cast(high, op.compute))
    return out


@pointwise("aten.clamp_min.default", "aten.clamp_min.Tensor")
def _clamp_min(op):
    return _nan_propagating("maximum", op.x(0), op.x(1))


@pointwise("aten.clamp_max.default", "aten.clamp_max.Tensor")
def _clamp_max(op):
    return _nan_propagating("minimum", op.x(0), op.x(1))


@pointwise("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def _where(op):
    return f"tl.where({op.x(0, dtype=torch.bool)}, {op.x(1)}, {op.x(2)})"


@pointwise("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(op):
    return f"tl.where({op.x(1, dtype=torch.bool)}, {op.x(2)}, {op.x(0)})"


@pointwise("aten.lerp.Scalar", "aten.lerp.Tensor")
def _lerp(op):
    # ATen's two-sided formula as its kernels evaluate it: fma(w, end - start, start) below |w| = 0.5,
    # fma(w - 1, end - start, end) above (exact at weight 0 and 1).
    start, end, weight = op.x(0), op.x(1), op.arg(2, "weight")
    diff = f"({end} - {start})"
    if not isinstance(weight, Value):
        if abs(weight) < 0.5:
            return f"tl.fma({literal(weight, op.compute)}, {diff}, {start})"
        return f"tl.fma({literal(weight - 1, op.compute)}, {diff}, {end})"
    w = cast(weight, op.compute)
    low = f"tl.abs({w}) < 0.5"
    return f"tl.fma(tl.where({low}, {w}, {w} - 1.0), {diff}, tl.where({low}, {start}, {end}))"


@pointwise("aten.addcmul.default")
def _addcmul(op):
    value = op.kwargs.get("value", 1)
    return f"({op.x(0)} + {literal(value, op.compute)} * {op.x(1)} * {op.x(2)})"


@pointwise("aten.addcdiv.default")
def _addcdiv(op):
    value = op.kwargs.get("value", 1)
    return f"({op.x(0)} + {_true_div(f'{literal(value, op.compute)} * {op.x(1)}', op.x(2), op.scalar)})"


@pointwise("prims.fma.default")
def _fma(op):
    return f"tl.fma({op.x(0)}, {op.x(1)}, {op.x(2)})"


@pointwise("prims.convert_element_type.default", "aten._to_copy.default", "aten.clone.default",
           "aten.alias.default", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
           "aten.squeeze.default", "aten.squeeze.dim", "aten.unsqueeze.default", "aten.expand.default")
def _convert(op):
    # Views and copies are the identity on the flat, contiguous element order the kernel works in (regions.py
    # checks the element counts); only the dtype can change.
    return cast(op.args[0], op.out)


@pointwise("aten.copy.default")
def _copy(op):
    # copy(dst, src): src converted to dst's dtype; dst's values are never read.
    return cast(op.args[1], op.out)


def _comparison(symbol: str):
    def emit(op):
        dtype = promoted(op.args[0], op.args[1])
        return f"({cast(op.args[0], dtype)} {symbol} {cast(op.args[1], dtype)})"
    return emit


for _name, _symbol in {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}.items():
    pointwise(f"aten.{_name}.Tensor", f"aten.{_name}.Scalar")(_comparison(_symbol))


@pointwise("aten.logical_not.default")
def _logical_not(op):
    return f"({op.x(0, dtype=torch.bool)} == 0)"


def _logical(symbol: str):
    return lambda op: f"({op.x(0, dtype=torch.bool)} {symbol} {op.x(1, dtype=torch.bool)})"


for _name, _symbol in {"and": "&", "or": "|", "xor": "^"}.items():
    pointwise(f"aten.logical_{_name}.default")(_logical(_symbol))
    pointwise(f"aten.bitwise_{_name}.Tensor", f"aten.bitwise_{_name}.Scalar")(
        lambda op, s=_symbol: f"({op.x(0)} {s} {op.x(1)})")


@pointwise("aten.bitwise_not.default")
def _bitwise_not(op):
    return f"({op.x(0)} == 0)" if op.out == torch.bool else f"(~{op.x(0)})"


def _float_operand(op) -> str:
    source = op.args[0]
    return cast(source, source.dtype if source.dtype.is_floating_point else torch.float32)


@pointwise("aten.isnan.default")
def _isnan(op):
    x = _float_operand(op)
    return f"({x} != {x})"


@pointwise("aten.isinf.default")
def _isinf(op):
    return f'(tl.abs({_float_operand(op)}) == float("inf"))'


@pointwise("aten.isposinf.default")
def _isposinf(op):
    return f'({_float_operand(op)} == float("inf"))'


@pointwise("aten.isneginf.default")
def _isneginf(op):
    return f'({_float_operand(op)} == -float("inf"))'


@pointwise("aten.isfinite.default")
def _isfinite(op):
    x = _float_operand(op)
    return f'(({x} == {x}) & (tl.abs({x}) != float("inf")))'


@pointwise("aten.nan_to_num.default")
def _nan_to_num(op):
    x = op.x(0)
    big = torch.finfo(op.compute).max
    nan, posinf, neginf = op.arg(1, "nan", 0.0), op.arg(2, "posinf"), op.arg(3, "neginf")
    posinf = big if posinf is None else posinf
    neginf = -big if neginf is None else neginf
    return (f'tl.where({x} != {x}, {literal(nan, op.compute)}, tl.where({x} == float("inf"), '
            f'{literal(posinf, op.compute)}, tl.where({x} == -float("inf"), {literal(neginf, op.compute)}, {x})))')


def _filled(op, value) -> str:
    shape = "[]" if op.scalar else "[ROWS, COLS]"
    return f"tl.full({shape}, {literal(value, op.compute)}, {tl_dtype(dtype_name(op.compute))})"


@pointwise("aten.full.default", "aten.full_like.default")
def _full(op):
    return _filled(op, op.args[1])


@pointwise("aten.scalar_tensor.default")
def _scalar_tensor(op):
    return _filled(op, op.args[0])


@pointwise("aten.zeros_like.default")
def _zeros_like(op):
    return _filled(op, 0)


@pointwise("aten.ones_like.default")
def _ones_like(op):
    return _filled(op, 1)


# Ops whose tensor arguments are not read element by element (only their shape or dtype matter).
SHAPE_ONLY_ARGUMENTS = {"aten.copy.default": (0,), "aten.full_like.default": (0,), "aten.zeros_like.default": (0,),
                        "aten.ones_like.default": (0,)}
# Ops that only reinterpret the element order; regions.py requires their input to be contiguous.
VIEWS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.squeeze.default",
         "aten.squeeze.dim", "aten.unsqueeze.default", "aten.expand.default"}


def op_name(target) -> str:
    """The allow-list key of a call_function target ("aten.add.Tensor")."""
    return str(target)


def is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and op_name(target) in EMITTERS


def operand_nodes(node) -> list:
    """The graph nodes ``node`` reads element by element (not those only its shape or dtype come from)."""
    skip = SHAPE_ONLY_ARGUMENTS.get(op_name(node.target), ())
    operands = [a for i, a in enumerate(node.args) if i not in skip and isinstance(a, Node)]
    return operands + [a for a in node.kwargs.values() if isinstance(a, Node)]


def emit_node(node, operand: Callable[[Node], Value], scalar: bool = False) -> str:
    """The ``tl`` expression of a pointwise graph node; ``operand`` gives the Value of each node it reads (called in
    argument order)."""
    skip = SHAPE_ONLY_ARGUMENTS.get(op_name(node.target), ())
    args = tuple(None if i in skip else operand(a) if isinstance(a, Node) else a for i, a in enumerate(node.args))
    kwargs = {k: operand(v) if isinstance(v, Node) else v for k, v in node.kwargs.items()}
    return emit(node.target, args, kwargs, node.meta["val"].dtype, scalar)


def emit(target, args: tuple, kwargs: dict, out: torch.dtype, scalar: bool = False) -> str:
    """The ``tl`` expression of one node (``scalar``: a 0-d node, exact forms); bf16/fp16 results are computed in
    fp32 and rounded."""
    op = Op(args, kwargs, out, scalar)
    text = EMITTERS[op_name(target)](op)
    if op.compute != out and not op_name(target).startswith(("prims.convert", "aten._to_copy", "aten.copy")):
        text = cast(Value(text, op.compute), out)
    return text


__all__ = ["Value", "EMITTERS", "SHAPE_ONLY_ARGUMENTS", "VIEWS", "emit", "emit_node", "operand_nodes", "is_pointwise", "op_name", "cast",
           "literal", "promoted"]
