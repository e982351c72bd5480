"""``lbc.Optimizer``: a ``torch.optim.Optimizer`` that runs a plain-Python update rule over block-quantized state.

A rule is ``rule(p, g, *states, *, step, **hyperparameters) -> (p, *states)`` over fp32 tensors. Each declared state
is stored in its own format (``lbc.Q8()``, ``lbc.Q4(signed=False)``, ``lbc.F32()`` ...). One step runs, for every
parameter with a gradient, exactly this sequence (the *step-graph contract* the ``lowbit`` compiler pass matches)::

    p32 = p.to(float32); g32 = g.to(float32)
    x_i = lowbit.dequant(codes_i, absmax_i, spec_i, shape)   |  buffer_i.to(float32)      (per state, in order)
    outs = rule(p32, g32, *x, step=step, **hp)               # hp and step: 0-d fp32 tensors of the group
    ok = isfinite(g32)
    new_p = where(ok, outs[0], p32); new_x_i = where(ok, outs[i + 1], x_i)
    lowbit.requant_(codes_i, absmax_i, new_x_i, spec_i)      |  buffer_i.copy_(new_x_i)
    p.copy_(new_p); nonfinite.add_((~ok).sum())

Eagerly the anchor ops run their pure-torch codecs, so an uncompiled ``opt.step()`` is the numerical reference for
``torch.compile(opt.step, backend="lowbit")``.

Why state is allocated when a group is added rather than lazily in ``_init_group``: schedulers assign floats to
``group["lr"]`` and tuples to ``group["betas"]``; a compiled step guards on those values, so each assignment would
recompile. Groups are therefore ``ParamGroup`` dicts that turn such assignments into in-place ``fill_`` of the 0-d
tensors the step reads. Dynamo (checked on torch 2.13) cannot pass a dict subclass to the ``_init_group`` protocol (its optimizer
support calls ``getitem_const``/``items`` on each group and fails on ``UserDefinedDictVariable``), so the compiled
step never touches ``param_groups`` or ``_init_group``: it reads a per-group plan of plain tuples built here, and all
state exists, at static addresses, before the first step.
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Callable, NamedTuple

import torch

from .. import ops  # noqa: F401  (registers torch.ops.lowbit.dequant / requant_)
from ..formats import Format, Plain, Quantized, as_format, check_quantizable, empty_state, encode

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Keys of a param group that are not hyperparameters of the rule.
STRUCTURE_KEYS = ("params", "param_names", "rule", "state", "init")
COUNTER_KEYS = ("step", "nonfinite")


# --------------------------------------------------------------------------------------------------------------
# Param groups
# --------------------------------------------------------------------------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _holds_tensors(value) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, tuple) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value))


def _fill(key: str, current, value) -> None:
    """Write ``value`` into the tensor(s) ``current`` in place (no new tensor objects: compiled steps hold them)."""
    if isinstance(current, torch.Tensor):
        if value is current:
            return
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex():
                raise ValueError(f"param group key {key!r} holds one real value; got a tensor of shape "
                                 f"{tuple(value.shape)} and dtype {value.dtype}")
            current.copy_(value.detach().reshape(()))
        elif _is_number(value):
            current.fill_(value)
        else:
            raise TypeError(f"param group key {key!r} holds a tensor hyperparameter; cannot assign "
                            f"{type(value).__name__} {value!r} (give a number or a one-element tensor)")
        return
    if not isinstance(value, (tuple, list)) or len(value) != len(current):
        raise ValueError(f"param group key {key!r} holds {len(current)} values; cannot assign {value!r}")
    for i, (c, v) in enumerate(zip(current, value)):
        _fill(f"{key}[{i}]", c, v)


class ParamGroup(dict):
    """A param group of ``lbc.Optimizer``. Its hyperparameters are 0-d fp32 tensors on the parameters' device (tuples
    of them for ``betas``); assigning a number, tuple or tensor to such a key *fills* the existing tensors in place,
    because compiled steps read those tensors as graph inputs: LR/momentum schedulers that assign floats cause no
    recompilation. Keys fixed when the group is created (params, rule, state, init and hyperparameters held as Python
    constants such as ``nesterov``) refuse different values. Other keys (e.g. a scheduler's ``initial_lr``) behave
    like a plain dict's."""

    fixed_keys: frozenset = frozenset()

    def _protected(self, key) -> bool:
        return dict.__contains__(self, key) and (key in self.fixed_keys or _holds_tensors(dict.__getitem__(self, key)))

    def __setitem__(self, key, value):
        if dict.__contains__(self, key):
            current = dict.__getitem__(self, key)
            if _holds_tensors(current):
                _fill(key, current, value)
                return
            if key in self.fixed_keys:
                if value is current or (not isinstance(value, torch.Tensor) and value == current):
                    return
                raise ValueError(f"param group key {key!r} is fixed when the group is created (it is {current!r}); "
                                 "build a new optimizer or add a param group to change it")
        dict.__setitem__(self, key, value)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def __delitem__(self, key):
        if self._protected(key):
            raise KeyError(f"param group key {key!r} cannot be removed: the optimizer's step uses it")
        dict.__delitem__(self, key)

    def pop(self, key, *default):
        if self._protected(key):
            raise KeyError(f"param group key {key!r} cannot be removed: the optimizer's step uses it")
        return dict.pop(self, key, *default)

    def popitem(self):
        raise KeyError("param group entries cannot be removed: the optimizer's step uses them")

    def clear(self):
        raise KeyError("param group entries cannot be removed: the optimizer's step uses them")


# --------------------------------------------------------------------------------------------------------------
# Rule signatures
# --------------------------------------------------------------------------------------------------------------
def _name_of(fn) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


@dataclasses.dataclass(frozen=True)
class _Signature:
    """What a rule (or an init function) accepts: its keyword-only hyperparameters, their defaults, whether it takes
    ``step`` and arbitrary keywords."""

    name: str
    keywords: tuple[str, ...]
    defaults: dict
    takes_step: bool
    takes_any_keyword: bool

    @classmethod
    def of(cls, fn, role: str, positional: tuple[str, ...]) -> "_Signature":
        """Read ``fn``'s signature; it is called with the tensors named in ``positional``."""
        if not callable(fn):
            raise TypeError(f"{role} must be a function, got {fn!r}")
        name = _name_of(fn)
        try:
            parameters = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError) as err:
            raise TypeError(f"{role} {name}: cannot read its signature ({err})") from err
        accepted = [q for q in parameters if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
        required = [q for q in accepted if q.default is q.empty]
        takes_any_positional = any(q.kind == q.VAR_POSITIONAL for q in parameters)
        if len(required) > len(positional) or (len(accepted) < len(positional) and not takes_any_positional):
            raise TypeError(f"{role} {name} takes positional arguments ({', '.join(q.name for q in accepted)}) but "
                            f"is called with {len(positional)}: ({', '.join(positional)})")
        keyword_only = [q for q in parameters if q.kind == q.KEYWORD_ONLY]
        keywords = tuple(q.name for q in keyword_only if q.name != "step")
        reserved = sorted(set(keywords) & set(STRUCTURE_KEYS + ("nonfinite",)))
        if reserved:
            raise TypeError(f"{role} {name}: keyword(s) {reserved} are reserved by lbc.Optimizer")
        defaults = {q.name: q.default for q in keyword_only if q.default is not q.empty and q.name != "step"}
        return cls(name, keywords, defaults, any(q.name == "step" for q in keyword_only),
                   any(q.kind == q.VAR_KEYWORD for q in parameters))


def _as_formats(state) -> dict[str, Format]:
    if state is None:
        return {}
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of name -> format such as {{'m': lbc.Q8()}}, got {state!r}")
    formats = {}
    for name, fmt in state.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"state name {name!r} must be a Python identifier")
        try:
            formats[name] = as_format(fmt)
        except (TypeError, ValueError) as err:
            raise type(err)(f"state {name!r}: {err}") from err
    return formats


def _as_hyperparameter(name: str, value, device: torch.device):
    """Numbers become 0-d fp32 tensors on ``device`` (tuples of numbers: tuples of them); bools, None and strings stay
    Python constants (structural switches: changing one means a different graph)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if _is_number(value):
        return torch.tensor(float(value), dtype=torch.float32, device=device)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"hyperparameter {name!r} must be one real value, got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        return value.detach().to(device=device, dtype=torch.float32).reshape(()).clone()
    if isinstance(value, (tuple, list)) and len(value) > 0:
        return tuple(_as_hyperparameter(f"{name}[{i}]", v, device) for i, v in enumerate(value))
    raise TypeError(f"hyperparameter {name!r} must be a number, a tuple of numbers, a bool, None or a string; "
                    f"got {type(value).__name__} {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Per-parameter state and the per-group plan the step reads
# --------------------------------------------------------------------------------------------------------------
class QuantizedStorage(NamedTuple):
    codes: torch.Tensor
    absmax: torch.Tensor
    spec: str


class PlainStorage(NamedTuple):
    buffer: torch.Tensor


class _Slot(NamedTuple):
    param: torch.Tensor
    name: str
    storages: tuple  # one QuantizedStorage | PlainStorage per declared state

    @property
    def label(self) -> str:
        return f"parameter {self.name}"


class _GroupPlan(NamedTuple):
    rule: Callable
    rule_name: str
    state_names: tuple[str, ...]
    rule_kwargs: dict  # keyword -> 0-d tensor / tuple of them / constant; includes "step" when the rule takes it
    step: torch.Tensor
    nonfinite: torch.Tensor
    slots: tuple[_Slot, ...]


def _fallback_reason(fmt: Format, numel: int) -> str | None:
    if isinstance(fmt, Quantized) and not fmt.stores_quantized(numel):
        return f"{numel} elements < min_quant_numel={fmt.min_quant_numel}: stored as fp32"
    return None


def _allocate(param: torch.Tensor, label: str, formats: dict[str, Format], initial) -> tuple[dict, tuple]:
    """State tensors of one parameter: ``{key: tensor}`` for ``Optimizer.state`` and the storages for the plan."""
    tensors, storages = {}, []
    numel = param.numel()
    for i, (name, fmt) in enumerate(formats.items()):
        value = None if initial is None else initial[i]
        if isinstance(fmt, Quantized) and fmt.stores_quantized(numel):
            if value is None:
                codes, absmax = empty_state(numel, fmt, param.device)
            else:
                check_quantizable(value, fmt, name=f"initial {name!r} of {label}")
                codes, absmax = encode(value, fmt)
            tensors[f"{name}.codes"], tensors[f"{name}.absmax"] = codes, absmax
            storages.append(QuantizedStorage(codes, absmax, fmt.spec))
        else:
            dtype = fmt.dtype if isinstance(fmt, Plain) else torch.float32
            buffer = torch.zeros(param.shape, dtype=dtype, device=param.device)
            if value is not None:
                buffer.copy_(value)
            tensors[name] = buffer
            storages.append(PlainStorage(buffer))
    return tensors, tuple(storages)


def _initial_values(init, signature: _Signature | None, hyperparameters: dict, param, label, formats) -> tuple | None:
    """``init``'s initial state values for ``param`` (None without an init: zeros)."""
    if init is None:
        return None
    kwargs = {k: hyperparameters[k] for k in signature.keywords if k in hyperparameters}
    values = init(param.detach().to(torch.float32), **kwargs)
    if not isinstance(values, (tuple, list)) or len(values) != len(formats):
        raise ValueError(f"init {signature.name} must return one tensor per state {tuple(formats)} for {label}, "
                         f"got {values!r}")
    for name, value in zip(formats, values):
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            raise ValueError(f"init {signature.name}: initial {name!r} of {label} must be a tensor of shape "
                             f"{tuple(param.shape)}, got {value!r}")
    return tuple(values)


def _signatures(rule, init, formats: dict) -> tuple[_Signature, _Signature | None]:
    rule_signature = _Signature.of(rule, "rule", ("p", "g", *formats))
    return rule_signature, None if init is None else _Signature.of(init, "init", ("p",))


def _param_name(group_index: int, param_index: int, names) -> str:
    return names[param_index] if names is not None else f"param_groups[{group_index}]['params'][{param_index}]"


# --------------------------------------------------------------------------------------------------------------
# The step (eager, or traced by Dynamo: no host syncs, no branches on tensor values)
# --------------------------------------------------------------------------------------------------------------
def _load(storage, shape: list[int]) -> torch.Tensor:
    if isinstance(storage, QuantizedStorage):
        return torch.ops.lowbit.dequant(storage.codes, storage.absmax, storage.spec, shape)
    return storage.buffer.to(torch.float32)


def _store(storage, value: torch.Tensor) -> None:
    if isinstance(storage, QuantizedStorage):
        torch.ops.lowbit.requant_(storage.codes, storage.absmax, value, storage.spec)
    else:
        storage.buffer.copy_(value)


def _check_gradient(slot: _Slot, grad: torch.Tensor) -> None:
    # torch itself refuses gradients of another shape or dtype (complex included), but not sparse ones
    if grad.is_sparse:
        raise TypeError(f"{slot.label} has a sparse gradient; lbc.Optimizer needs dense gradients")


def _check_outputs(plan: _GroupPlan, slot: _Slot, outs) -> None:
    expected = ("p",) + plan.state_names
    if not isinstance(outs, (tuple, list)) or len(outs) != len(expected):
        got = f"{len(outs)} values" if isinstance(outs, (tuple, list)) else f"a {type(outs).__name__}"
        raise ValueError(f"rule {plan.rule_name} returned {got} for {slot.label}; it must return "
                         f"{len(expected)} tensors ({', '.join(expected)})")
    for what, out in zip(("p",) + plan.state_names, outs):
        if not isinstance(out, torch.Tensor) or out.shape != slot.param.shape:
            shown = tuple(out.shape) if isinstance(out, torch.Tensor) else repr(out)
            raise ValueError(f"rule {plan.rule_name} returned {shown} as the new {what!r} of {slot.label}; "
                             f"expected a tensor of shape {tuple(slot.param.shape)}")


def _step_parameter(plan: _GroupPlan, slot: _Slot) -> None:
    param, grad = slot.param, slot.param.grad
    _check_gradient(slot, grad)
    p32 = param.to(torch.float32)
    g32 = grad.to(torch.float32)
    shape = list(param.shape)
    states = [_load(storage, shape) for storage in slot.storages]
    outs = plan.rule(p32, g32, *states, **plan.rule_kwargs)
    _check_outputs(plan, slot, outs)
    ok = torch.isfinite(g32)
    new_p = torch.where(ok, outs[0], p32)
    for storage, old, new in zip(slot.storages, states, outs[1:]):
        _store(storage, torch.where(ok, new, old))
    param.copy_(new_p)
    plan.nonfinite.add_((~ok).sum())


def _step_group(plan: _GroupPlan) -> None:
    slots = [slot for slot in plan.slots if slot.param.grad is not None]
    if not slots:
        return
    plan.step.add_(1)
    for slot in slots:
        _step_parameter(plan, slot)


# --------------------------------------------------------------------------------------------------------------
# describe()
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StateRow:
    """One stored state tensor of one parameter."""

    param: str
    shape: tuple[int, ...]
    state: str
    format: str  # the spec actually stored ("F32" when a quantized format fell back)
    block: int | None
    bytes: int
    fallback: str | None  # why a quantized format is stored as fp32, else None


@dataclasses.dataclass(frozen=True)
class StateReport:
    """``Optimizer.describe()``: every state tensor, and the state bytes per parameter element."""

    rows: tuple[StateRow, ...]
    numel: int  # parameter elements over all groups

    @property
    def total_bytes(self) -> int:
        return sum(row.bytes for row in self.rows)

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / self.numel if self.numel else 0.0

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __str__(self) -> str:
        header = ("param", "shape", "state", "format", "block", "bytes", "fallback")
        lines = [header] + [(r.param, str(list(r.shape)), r.state, r.format, str(r.block or "-"), str(r.bytes),
                             r.fallback or "") for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
        text.append(f"total {self.total_bytes} bytes of state for {self.numel} parameter elements = "
                    f"{self.bytes_per_param:.4f} bytes/param")
        return "\n".join(text)


# --------------------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------------------
class Optimizer(torch.optim.Optimizer):
    """Runs ``rule`` over every parameter with its state stored in the declared formats.

    Args:
        params: parameters, (name, parameter) pairs, or param-group dicts. A group may override ``rule``,
            ``state``, ``init`` and any hyperparameter.
        rule: ``rule(p, g, *states, *, step, **hyperparameters) -> (p, *states)``, elementwise fp32 math without
            in-place ops; keyword-only arguments are its hyperparameters (their defaults apply), ``step`` is the
            1-based step count of the group.
        state: ``{name: format}`` in the rule's positional order, e.g. ``{"m": lbc.Q8(), "v": lbc.Q8(signed=False)}``.
            Quantized formats keep fp32 state for tensors under the format's ``min_quant_numel``.
        init: optional ``init(p, **hyperparameters) -> tuple of fp32 tensors`` giving each state's initial value
            (default: zeros), e.g. Adagrad's ``initial_accumulator_value``; its keyword-only arguments are
            hyperparameters too.
        **hyperparameters: values for the rule's (and init's) keyword-only arguments, for every group.

    State is allocated when a group is added. Hyperparameters live in the groups as 0-d fp32 tensors on the
    parameters' device (bools, None and strings stay Python constants); assigning numbers to them fills the tensors
    in place (see ``ParamGroup``).
    """

    def __init__(self, params, rule: Callable, state: dict | None = None, *, init: Callable | None = None,
                 **hyperparameters):
        formats = _as_formats(state)
        rule_signature, init_signature = _signatures(rule, init, formats)
        self._check_known(hyperparameters, rule_signature, init_signature, "lbc.Optimizer")
        self._hyperparameters = dict(hyperparameters)
        self._plans: list[_GroupPlan] = []
        defaults = {**rule_signature.defaults, **({} if init_signature is None else init_signature.defaults),
                    **hyperparameters}
        super().__init__(params, {"rule": rule, "state": formats, "init": init, **defaults})
        self.register_state_dict_post_hook(_serialisable_groups, prepend=True)

    # ---------------------------------------------------------------- groups
    @staticmethod
    def _check_known(names, rule_signature: _Signature, init_signature: _Signature | None, where: str) -> None:
        signatures = [rule_signature] + ([] if init_signature is None else [init_signature])
        if any(s.takes_any_keyword for s in signatures):
            return
        known = set(rule_signature.keywords) | set(() if init_signature is None else init_signature.keywords)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise TypeError(f"{where}: unknown hyperparameter(s) {unknown} for rule {rule_signature.name}"
                            f"{'' if init_signature is None else ' / init ' + init_signature.name}; "
                            f"it accepts {sorted(known)}")

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        index = len(self.param_groups)
        where = f"param_groups[{index}]"
        if "params" not in group:
            raise ValueError(f"{where} has no 'params'")
        params, names = self._unpack_params(group.pop("params"), where)
        group.pop("param_names", None)
        for key in COUNTER_KEYS:
            if key in group:
                raise ValueError(f"{where}: {key!r} is kept by the optimizer and cannot be given")
        rule = group.pop("rule", self.defaults["rule"])
        formats = _as_formats(group.pop("state", self.defaults["state"]))
        init = group.pop("init", self.defaults["init"])
        rule_signature, init_signature = _signatures(rule, init, formats)
        self._check_known(group, rule_signature, init_signature, where)

        device = params[0].device if params else torch.device("cpu")
        param_names = [_param_name(index, i, names) for i in range(len(params))]
        self._check_params(params, [f"parameter {n}" for n in param_names], device)

        signatures = [rule_signature] + ([] if init_signature is None else [init_signature])
        names_known = list(dict.fromkeys(k for s in signatures for k in s.keywords))
        if any(s.takes_any_keyword for s in signatures):
            names_known += [k for k in dict.fromkeys([*self._hyperparameters, *group]) if k not in names_known]
        values = {}
        sources = [group, self._hyperparameters] + [s.defaults for s in signatures]  # by precedence
        for name in names_known:
            source = next((d for d in sources if name in d), None)
            if source is None:
                raise TypeError(f"{where}: rule {rule_signature.name} needs hyperparameter {name!r}; pass "
                                f"{name}=... to the optimizer or the param group")
            values[name] = _as_hyperparameter(name, source[name], device)

        step = torch.zeros((), dtype=torch.float32, device=device)
        nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        slots = []
        with torch.no_grad():
            for param, name in zip(params, param_names):
                label = f"parameter {name}"
                initial = _initial_values(init, init_signature, values, param, label, formats)
                tensors, storages = _allocate(param, label, formats, initial)
                self.state[param] = tensors
                slots.append(_Slot(param, name, storages))
        for tensor in [*params, step, nonfinite, *(t for s in slots for st in s.storages for t in st
                                                   if isinstance(t, torch.Tensor))]:
            torch._dynamo.mark_static_address(tensor)

        rule_kwargs = {k: values[k] for k in rule_signature.keywords if k in values}
        if rule_signature.takes_any_keyword:
            rule_kwargs.update({k: v for k, v in values.items() if k not in rule_kwargs
                                and (init_signature is None or k not in init_signature.keywords)})
        if rule_signature.takes_step:
            rule_kwargs["step"] = step
        fixed = {k for k, v in values.items() if not _holds_tensors(v)}

        stored = ParamGroup()
        stored.fixed_keys = frozenset(STRUCTURE_KEYS) | fixed
        dict.update(stored, params=params, **({"param_names": names} if names is not None else {}),
                    rule=rule, state=formats, init=init, **values, step=step, nonfinite=nonfinite)
        self.param_groups.append(stored)
        self._plans.append(_GroupPlan(rule, rule_signature.name, tuple(formats), rule_kwargs, step, nonfinite,
                                      tuple(slots)))

    @staticmethod
    def _unpack_params(params, where: str):
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(f"{where}: parameters must be an ordered collection (list), not a set")
        params = list(params)
        named = [isinstance(p, tuple) for p in params]
        if any(named) and not all(named):
            raise ValueError(f"{where}: give all parameters with names or none")
        names = [p[0] for p in params] if params and all(named) else None
        tensors = [p[1] for p in params] if names is not None else params
        return tensors, names

    def _check_params(self, params, labels, device) -> None:
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        mine = set()
        for param, label in zip(params, labels):
            if not isinstance(param, torch.Tensor):
                raise TypeError(f"{label} is a {type(param).__name__}; lbc.Optimizer optimizes tensors")
            if param.is_complex():
                raise TypeError(f"{label} is complex ({param.dtype}); lbc.Optimizer updates real parameters")
            if param.dtype not in PARAM_DTYPES:
                raise TypeError(f"{label} has dtype {param.dtype}; lbc.Optimizer updates "
                                f"{', '.join(str(d) for d in PARAM_DTYPES)} parameters")
            if param.is_sparse:
                raise TypeError(f"{label} is sparse; lbc.Optimizer updates dense parameters")
            if not param.is_leaf:
                raise ValueError(f"{label} is not a leaf tensor; an optimizer can only update leaves")
            if param.device != device:
                raise ValueError(f"{label} is on {param.device} but the group's first parameter is on {device}; "
                                 "put parameters of different devices in different param groups")
            if id(param) in seen:
                raise ValueError(f"{label} already belongs to another param group")
            if id(param) in mine:
                raise ValueError(f"{label} appears twice in its param group")
            mine.add(id(param))

    # ---------------------------------------------------------------- step
    def step(self, closure: Callable | None = None):
        """One update of every parameter that has a gradient; ``closure`` (re-evaluating the loss) runs first with
        gradients enabled and its result is returned."""
        loss = evaluate_closure(closure)
        with torch.no_grad():
            for plan in self._plans:
                _step_group(plan)
        return loss

    @property
    def nonfinite_count(self) -> torch.Tensor:
        """Gradient elements skipped because they were NaN/Inf, summed over all steps and groups: an int64 tensor on
        the first group's device (no host sync)."""
        counters = [plan.nonfinite for plan in self._plans]
        device = counters[0].device
        return torch.stack([c.to(device) for c in counters]).sum()

    # ---------------------------------------------------------------- inspection
    def describe(self) -> StateReport:
        """Every state tensor: parameter, shape, state name, stored format, block, bytes, and why a quantized format
        fell back to fp32."""
        rows = []
        numel = 0
        for group, plan in zip(self.param_groups, self._plans):
            for slot in plan.slots:
                numel += slot.param.numel()
                for (name, fmt), storage in zip(group["state"].items(), slot.storages):
                    quantized = isinstance(storage, QuantizedStorage)
                    nbytes = sum(t.numel() * t.element_size() for t in storage if isinstance(t, torch.Tensor))
                    rows.append(StateRow(
                        param=slot.name, shape=tuple(slot.param.shape),
                        state=name, format=storage.spec if quantized else Plain(storage.buffer.dtype).spec,
                        block=fmt.block if quantized else None, bytes=nbytes,
                        fallback=_fallback_reason(fmt, slot.param.numel())))
        return StateReport(tuple(rows), numel)

    # ---------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()`` of an optimizer with the same groups, formats and parameter shapes. Everything is
        checked before anything is written; values are copied into the existing tensors (addresses stay static) and
        never cast, so fp32 scales of bf16 parameters stay fp32."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        copies, assignments = self._plan_load(state_dict)
        for destination, source in copies:
            if isinstance(source, torch.Tensor):
                destination.copy_(source.detach().reshape(destination.shape))
            else:
                destination.fill_(source)
        for group, key, value in assignments:
            dict.__setitem__(group, key, value)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _plan_load(self, state_dict: dict):
        saved_groups, saved_state = saved_groups_and_state(state_dict, len(self.param_groups))
        copies, assignments = [], []
        for index, (group, plan, saved) in enumerate(zip(self.param_groups, self._plans, saved_groups)):
            where = f"param_groups[{index}]"
            if len(saved["params"]) != len(plan.slots):
                raise ValueError(f"{where}: the loaded state dict has {len(saved['params'])} parameters, this "
                                 f"optimizer has {len(plan.slots)}")
            ours = {name: fmt.spec for name, fmt in group["state"].items()}
            theirs = saved.get("state")
            if theirs != ours:
                theirs = theirs if isinstance(theirs, dict) else {}
                name = next(n for n in list(ours) + list(theirs) if ours.get(n) != theirs.get(n))
                raise ValueError(f"{where}, state {name!r}: the loaded state dict stores it as {theirs.get(name)}, "
                                 f"this optimizer as {ours.get(name)}")
            for slot, saved_id in zip(plan.slots, saved["params"]):
                copies += self._plan_param_load(slot, saved_state.get(saved_id))
            for key, value in saved.items():
                if key in STRUCTURE_KEYS:
                    continue
                if dict.__contains__(group, key):
                    current = dict.__getitem__(group, key)
                    if _holds_tensors(current):
                        copies += _plan_fill(f"{where}[{key!r}]", current, value)
                        continue
                    if key in group.fixed_keys:
                        if isinstance(value, torch.Tensor) or value != current:
                            raise ValueError(f"{where}[{key!r}]: the loaded state dict has {value!r}, this optimizer "
                                             f"{current!r} (fixed when the group was created)")
                        continue
                assignments.append((group, key, value))
        return copies, assignments

    def _plan_param_load(self, slot: _Slot, saved) -> list:
        ours = self.state[slot.param]
        if not isinstance(saved, dict):
            raise ValueError(f"{slot.label}: the loaded state dict has no state for it")
        if set(saved) != set(ours):
            raise ValueError(f"{slot.label}: the loaded state has entries {sorted(saved)}, this optimizer stores "
                             f"{sorted(ours)} (different formats, or a different min_quant_numel?)")
        copies = []
        for key, tensor in ours.items():
            value = saved[key]
            if not isinstance(value, torch.Tensor) or value.shape != tensor.shape or value.dtype != tensor.dtype:
                shown = (f"{value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                         else repr(value))
                raise ValueError(f"{slot.label}, state {key!r}: the loaded state dict has a {shown}, this optimizer "
                                 f"stores a {tensor.dtype} tensor of shape {tuple(tensor.shape)}")
            copies.append((tensor, value))
        return copies

    def __getstate__(self):
        return {**super().__getstate__(), "_plans": self._plans, "_hyperparameters": self._hyperparameters}

    def __setstate__(self, state):
        super().__setstate__(state)
        if _serialisable_groups not in self._optimizer_state_dict_post_hooks.values():
            self.register_state_dict_post_hook(_serialisable_groups, prepend=True)


def evaluate_closure(closure: Callable | None):
    """torch.optim's closure protocol: re-evaluate the loss with gradients enabled (also inside a no_grad step)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def saved_groups_and_state(state_dict, num_groups: int) -> tuple[list, dict]:
    """``(param_groups, state)`` of a ``state_dict()`` after checking its outline and group count."""
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError("load_state_dict expects a dict with 'state' and 'param_groups' (from state_dict())")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != num_groups:
        raise ValueError(f"the loaded state dict has {len(saved_groups)} param groups, this optimizer has "
                         f"{num_groups}")
    return saved_groups, saved_state


def _plan_fill(where: str, current, value) -> list:
    """Check that ``value`` fits the hyperparameter tensor(s) ``current``; return the (tensor, value) copies."""
    if isinstance(current, torch.Tensor):
        if _is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex()):
            return [(current, value)]
        raise ValueError(f"{where}: the loaded state dict has {value!r}, expected one number")
    if not isinstance(value, (tuple, list)) or len(value) != len(current):
        raise ValueError(f"{where}: the loaded state dict has {value!r}, expected {len(current)} values")
    return [c for i, (t, v) in enumerate(zip(current, value)) for c in _plan_fill(f"{where}[{i}]", t, v)]


def _serialisable_groups(optimizer: Optimizer, state_dict: dict) -> dict:
    """state_dict post-hook: functions and format objects become strings, so ``torch.load(weights_only=True)``
    reads the checkpoint."""
    for group in state_dict["param_groups"]:
        group["rule"] = _name_of(group["rule"])
        group["state"] = {name: fmt.spec for name, fmt in group["state"].items()}
        group["init"] = None if group["init"] is None else _name_of(group["init"])
    return state_dict


__all__ = ["Optimizer", "ParamGroup", "StateReport", "StateRow", "QuantizedStorage", "PlainStorage"]
