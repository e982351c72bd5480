"""The fused optimizer-update kernel and the ``lowbit::fused_update_`` op that launches it.

A ``KernelSpec`` describes one update region completely: which tensors it reads and writes (roles), the 0-d
scalars it reads, the full sums it accumulates, and its body as lines of ``tl`` expressions. A ``LaunchSpec`` is one
launch: its parts (a ``KernelSpec`` each, over its own list of parameters: e.g. the quantized-state tensors and the
small ones that keep fp32 state) and, for launches over small tensors, the step's 0-d math (bias corrections, the step
counter's increment) that every program computes itself. The compiler pass (``lowbit_compile.passes``) builds the
specs from the graph; this module renders them into Triton source, compiles it once per launch spec, and launches it
over all the parameters: a program is (part, tensor index, run of tiles of whole blocks), so one launch covers every
tensor of every part through per-role pointer tables.

Per program, in one pass over memory: load the plain tensors (fp32/bf16/fp16) and the codes and block scales of
each quantized state, decode, run the body, then for each quantized output zero the padding lanes, compute the new
block scales, encode and store; store the plain outputs (bf16 with round-to-nearest-even, or stochastic rounding);
add each program's partial sums into the accumulators (``tl.atomic_add``, skipped when the partial sum is 0).

Numerics: under the interpreter every fp32 operation is IEEE, so CPU tests see exactly torch's arithmetic (up to
``exp``/``log`` ulps). On the GPU the body's ``/`` and ``sqrt`` are Triton's fast forms and Triton may contract a
multiply and an add into an FMA (see ``passes/pointwise.py``): parameters agree with eager to a few fp32 ulps, and a
state value that lands next to a midpoint can take the neighbouring code. The codecs themselves are exact.

The op rebuilds its kernel from the ``spec`` string alone, so compiled graphs loaded from inductor's FX-graph cache
(where the pass does not run) still work.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import threading

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .._compat import triton_interpreting
from ..formats import Quantized, parse_spec
from .codecs import codec_constants, codec_tables

SPEC_VERSION = 2

_TL_DTYPES = {
    "float32": "tl.float32", "bfloat16": "tl.bfloat16", "float16": "tl.float16", "float64": "tl.float64",
    "int64": "tl.int64", "int32": "tl.int32", "int16": "tl.int16", "int8": "tl.int8", "uint8": "tl.uint8",
    "bool": "tl.int1",
}
PLAIN_TENSOR_DTYPES = ("float32", "bfloat16", "float16")
ACCUMULATOR_DTYPES = ("int64", "int32", "float32")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: the spelling specs use."""
    return str(dtype).removeprefix("torch.")


def tl_dtype(name: str) -> str:
    """Source text of the ``tl`` dtype for a dtype name."""
    try:
        return _TL_DTYPES[name]
    except KeyError:
        raise ValueError(f"no Triton dtype for {name!r}") from None


def role_format(role: str) -> Quantized | None:
    """The quantized format of a role, or None for a plain tensor role (a dtype name)."""
    if role in _TL_DTYPES:
        return None
    fmt = parse_spec(role)
    if not isinstance(fmt, Quantized):
        raise ValueError(f"a role is a dtype name or a quantized format spec, got {role!r}")
    return fmt


def _spec_text(spec) -> str:
    """A spec dataclass as the JSON string the op carries, with the spec format's version."""
    fields = dataclasses.asdict(spec)
    fields["version"] = SPEC_VERSION
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def _spec_fields(text: str, kind: str, required: tuple[str, ...]) -> dict:
    """The fields of a ``kind`` spec string (version checked and dropped); a clear error for anything else."""
    try:
        fields = json.loads(text)
        version = fields.pop("version")
        for key in required:
            fields[key]
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise ValueError(f"spec: not a fused-update {kind} spec: {text[:80]!r}") from err
    if version != SPEC_VERSION:
        raise ValueError(f"spec: version {version} is not {SPEC_VERSION}; recompile (clear the inductor cache)")
    return fields


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One fused update, independent of how many tensors it is launched over.

    Roles are dtype names (plain tensors) or quantized format specs (a codes + scales pair). Inside ``body`` the
    loaded value of input role ``i`` is ``in{i}``, of mutated role ``i`` ``mut{i}`` (quantized roles decoded to
    fp32), scalar ``i`` is ``s{i}``; body lines are ``v{k} = <tl expression>``. ``outputs[i]`` names the value
    stored into mutated role ``i``; ``sums`` lists ``(accumulator index, value name)`` pairs whose full sums over
    the tensor are added into the 0-d accumulators."""

    inputs: tuple[str, ...]
    mutated: tuple[str, ...]
    scalars: tuple[str, ...]
    accumulators: tuple[str, ...]
    body: tuple[str, ...]
    outputs: tuple[str, ...]
    sums: tuple[tuple[int, str], ...] = ()
    stochastic_rounding: bool = False

    def __post_init__(self):
        if len(self.outputs) != len(self.mutated):
            raise ValueError(f"outputs: one value per mutated role, got {len(self.outputs)} for {len(self.mutated)}")
        for name in self.scalars:
            tl_dtype(name)
        for name in self.accumulators:
            if name not in ACCUMULATOR_DTYPES:
                raise ValueError(f"accumulators: dtype must be one of {ACCUMULATOR_DTYPES}, got {name!r}")
        for role in self.inputs + self.mutated:
            if role_format(role) is None and role not in PLAIN_TENSOR_DTYPES:
                raise ValueError(f"tensor roles must be one of {PLAIN_TENSOR_DTYPES}, got {role!r}")
        for index, _ in self.sums:
            if not 0 <= index < len(self.accumulators):
                raise ValueError(f"sums: accumulator index {index} out of range")
        if all(role_format(role) is not None for role in self.inputs + self.mutated):
            # Element counts come from the plain tensors: a quantized state's storage only knows whole blocks.
            raise ValueError("a kernel spec needs at least one plain tensor role")

    def to_string(self) -> str:
        return _spec_text(self)

    @classmethod
    def from_string(cls, text: str) -> "KernelSpec":
        return cls.from_fields(_spec_fields(text, "kernel", ("sums",)))

    @classmethod
    def from_fields(cls, fields: dict) -> "KernelSpec":
        """From the JSON fields of ``to_string`` (without the version)."""
        fields = dict(fields, sums=tuple((int(i), str(v)) for i, v in fields["sums"]))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    @property
    def quantized_block_sizes(self) -> list[int]:
        return [fmt.block for fmt in map(role_format, self.inputs + self.mutated) if fmt is not None]

    def slots(self, roles: tuple[str, ...]) -> int:
        """Tensors per parameter in a list of roles: 2 for a quantized role (codes, scales), else 1."""
        return sum(1 if role_format(r) is None else 2 for r in roles)


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """One launch of the fused kernel: its parts, each a ``KernelSpec`` run over its own list of parameters, and the
    0-d program every program runs before its part.

    ``scalars``: dtypes of the launch's 0-d inputs ``x{i}``: the op's ``scalars`` list, then the ``len(stores)`` 0-d
    tensors the launch also writes (the tail of the op's ``mutated`` list). ``scalar_body``: lines
    ``c{k} = <tl expression>`` over them and earlier lines. ``stores[k]``: the value (an ``x``/``c`` name) written into
    stored input ``k``, by the last program to read the inputs. ``bindings[p][i]``:
    the value part ``p`` reads as its scalar ``i``; ``part_accumulators[p][i]``: the launch accumulator part ``p`` adds
    its accumulator ``i`` into."""

    parts: tuple[KernelSpec, ...]
    bindings: tuple[tuple[str, ...], ...]
    part_accumulators: tuple[tuple[int, ...], ...]
    scalars: tuple[str, ...] = ()
    scalar_body: tuple[str, ...] = ()
    stores: tuple[str, ...] = ()
    accumulators: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.parts:
            raise ValueError("a launch needs at least one part")
        if len(self.bindings) != len(self.parts) or len(self.part_accumulators) != len(self.parts):
            raise ValueError("bindings and part_accumulators: one entry per part")
        for name in self.scalars:
            tl_dtype(name)
        if len(self.stores) > len(self.scalars):
            raise ValueError(f"stores: {len(self.stores)} stored inputs, but only {len(self.scalars)} scalars")
        for name in self.accumulators:
            if name not in ACCUMULATOR_DTYPES:
                raise ValueError(f"accumulators: dtype must be one of {ACCUMULATOR_DTYPES}, got {name!r}")
        defined = {f"x{i}" for i in range(len(self.scalars))}
        for line in self.scalar_body:
            name = line.split(" = ", 1)[0]
            if not re.fullmatch(r"c\d+", name):
                raise ValueError(f"scalar_body: lines are 'c<k> = <expression>', got {line!r}")
            defined.add(name)
        for p, (spec, bound, accs) in enumerate(zip(self.parts, self.bindings, self.part_accumulators)):
            if len(bound) != len(spec.scalars) or not set(bound) <= defined:
                raise ValueError(f"bindings[{p}]: one defined value per scalar of the part, got {bound}")
            if len(accs) != len(spec.accumulators) or any(
                    not 0 <= a < len(self.accumulators) or self.accumulators[a] != d
                    for a, d in zip(accs, spec.accumulators)):
                raise ValueError(f"part_accumulators[{p}]: launch accumulators of the part's dtypes, got {accs}")
        if not set(self.stores) <= defined:
            raise ValueError(f"stores: values must be defined, got {self.stores}")

    @classmethod
    def single(cls, spec: KernelSpec) -> "LaunchSpec":
        """``spec`` alone, its scalars read straight from the op's ``scalars``."""
        return cls((spec,), (tuple(f"x{i}" for i in range(len(spec.scalars))),),
                   (tuple(range(len(spec.accumulators))),), spec.scalars, accumulators=spec.accumulators)

    @property
    def plain_scalars(self) -> int:
        """How many of ``scalars`` the op's ``scalars`` list holds (the rest are the stored ones)."""
        return len(self.scalars) - len(self.stores)

    def to_string(self) -> str:
        return _spec_text(self)

    @classmethod
    def from_string(cls, text: str) -> "LaunchSpec":
        fields = _spec_fields(text, "launch", ("parts",))
        parts = tuple(KernelSpec.from_fields(p) for p in fields.pop("parts"))
        nested = {k: tuple(tuple(x) for x in v) for k, v in fields.items() if k in ("bindings", "part_accumulators")}
        flat = {k: tuple(v) for k, v in fields.items() if k not in nested}
        return cls(parts, **nested, **flat)


# --------------------------------------------------------------------------------------------------------------
# Source generation
# --------------------------------------------------------------------------------------------------------------
# Helpers the body emitters and the stores call. Only tl/tl.math (the interpreter has no libdevice).
_PRELUDE = '''\
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lowbit_compile.templates import codecs


@triton.jit
def _pow(x, y):
    # exp2(y * log2|x|) with the sign and the special cases of C's pow.
    y = tl.zeros_like(x) + y
    r = tl.exp2(y * tl.log2(tl.abs(x)))
    y_integral = tl.floor(y) == y
    y_odd = y_integral & (tl.floor(y * 0.5) * 2.0 != y)
    r = tl.where((x < 0) & y_odd, -r, r)
    r = tl.where((x < 0) & (y_integral == 0), float("nan"), r)
    return tl.where((y == 0) | (x == 1) | ((x == -1) & (tl.abs(y) == float("inf"))), 1.0, r)


@triton.jit
def _div_by_scalar(x, divisor):
    # One correctly rounded reciprocal per program and a multiply per element instead of a division per element.
    # The interpreter keeps IEEE division so that CPU tests compare exactly with torch.
    if codecs.COMPILED:
        return x * tl.math.div_rn(tl.full((), 1.0, tl.float32), divisor)
    else:
        return x / divisor


# Exact forms for 0-d values (computed once per program): correctly rounded division and square root; pow, exp and
# log as torch's CUDA kernels compute them (libdevice) and, under the interpreter, in float64 rounded once.
@triton.jit
def _exact_div(x, y):
    if codecs.COMPILED:
        return tl.math.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _exact_sqrt(x):
    if codecs.COMPILED:
        return tl.math.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _exact_rsqrt(x):
    return _exact_div(1.0, _exact_sqrt(x))


@triton.jit
def _scalar_pow(x, y):
    y = tl.zeros_like(x) + y
    if codecs.COMPILED:
        return libdevice.pow(x, y)
    else:
        return _pow(x.to(tl.float64), y.to(tl.float64)).to(x.dtype)


@triton.jit
def _scalar_exp(x):
    if codecs.COMPILED:
        return libdevice.exp(x)
    else:
        return tl.exp(x.to(tl.float64)).to(x.dtype)


@triton.jit
def _scalar_log(x):
    if codecs.COMPILED:
        return libdevice.log(x)
    else:
        return tl.log(x.to(tl.float64)).to(x.dtype)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x * 0.0)).to(x.dtype)


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _rint(x):
    # round half to even
    r = tl.floor(x + 0.5)
    return tl.where((r - x == 0.5) & (tl.floor(r * 0.5) * 2.0 != r), r - 1.0, r)


@triton.jit
def _load_tile(ptr, local, inb, full):
    if full:
        x = tl.load(ptr + local)
    else:
        x = tl.load(ptr + local, mask=inb, other=0)
    return x


@triton.jit
def _store_tile(ptr, local, x, inb, full):
    if full:
        tl.store(ptr + local, x)
    else:
        tl.store(ptr + local, x, mask=inb)


@triton.jit
def _bf16_bits(x, rounding):
    # fp32 -> bf16 by integer rounding: the interpreter's cast truncates and the GPU's rounds to nearest even,
    # this is the same on both. NaN stays a (quiet) NaN.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = tl.where(x != x, bits | 0x400000, bits + rounding)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _bf16_rne(x):
    bits = x.to(tl.uint32, bitcast=True)
    return _bf16_bits(x, 0x7FFF + ((bits >> 16) & 1))


@triton.jit
def _bf16_stochastic(x, seed, offsets):
    return _bf16_bits(x, tl.randint(seed, offsets).to(tl.uint32) & 0xFFFF)
'''


@dataclasses.dataclass(frozen=True)
class TileShape:
    """How one part of a launch walks its tensors: tiles of ``rows x cols`` elements, ``tiles_per_program`` of them
    per program."""

    rows: int
    cols: int
    tiles_per_program: int = 1

    @property
    def elements(self) -> int:
        return self.rows * self.cols

    @property
    def program_elements(self) -> int:
        return self.elements * self.tiles_per_program


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a launch runs: each part's tile shape, and what holds for the whole kernel (warps, a register cap)."""

    parts: tuple[TileShape, ...]
    num_warps: int
    max_registers: int | None = None  # ptxas register cap per thread (Triton's ``maxnreg``); None: ptxas decides


@dataclasses.dataclass(frozen=True)
class LaunchShape:
    """How the fused kernel is launched on the GPU: elements per tile, warps, tiles one program walks through, and an
    optional register cap. Written ``ELEMENTSxWARPSxTILES[xREGISTERS]`` by the benchmarks' sweeps (``parse``)."""

    elements: int
    warps: int
    tiles: int
    max_registers: int | None = None

    @classmethod
    def parse(cls, text: str) -> "LaunchShape":
        numbers = [int(n) for n in text.split("x")]
        if len(numbers) not in (3, 4):
            raise ValueError(f"launch shape: expected ELEMENTSxWARPSxTILES[xREGISTERS], got {text!r}")
        return cls(*numbers)

    def __str__(self) -> str:
        return "x".join(str(n) for n in dataclasses.astuple(self) if n is not None)


# GPU launch shape per narrowest state width of a spec (8, 4, or 32 when no state is quantized).
# 8 bits, 512 elements / 2 warps: one 256-element block per warp (block maxima are warp reductions), 8 elements per
# thread, 80 registers (offline sm_90 compile of the 8-bit AdamW kernel, benchmarks/results/sass_counts.exploratory.md).
# 1024/4 has the same per-thread layout; on the H100, 16 x 4096^2 fp32 params, 5 interleaved rounds
# (benchmarks/results/fused_ablation.md) 512/2 took 7.38 against 7.55 ms per 1G params (median; faster in 4 of 5
# rounds); earlier single-round runs had it at -7% and +1% (fused_ablation.prefetch.exploratory.md, .run2.md).
# 2048/8 and 1024/8 were slower (fused_ablation.exploratory.md). A register cap of 72 timed 7.23 but spills 24 bytes.
# 4 bits, 512 elements / 4 warps, at most 48 registers: one 128-element block per warp, 4 per thread, the layout of a
# 16-byte fp32 store, so the parameter store needs no shared-memory shuffle. Uncapped the 4-bit AdamW kernel takes 64
# registers (50% occupancy), at 48 it does not spill (62.5%); 6.63 against 6.95 ms per 1G params (median of 5
# rounds, faster in 4 of 5; fused_ablation.md; the earlier run2.md had a cap of 56 at 6.51 against 6.85). A kernel
# that would spill under the cap (a rule with more state) runs uncapped: see ``FusedUpdateKernel.launch``. At 1024/4
# it needs 128 registers (25% occupancy): 8.37 against 6.52 (fused_ablation.run1.exploratory.md).
# 8 tiles per program: a program first chases the launch tables (tensor index, element count, data pointers:
# dependent loads), which the tiles of one tensor then share: 8 tiles against 1 took 7.71 against 9.83 ms for 8-bit
# AdamW on 64 x 4096^2 fp32 params (benchmarks/results/step_time.md as of commit e9a5ec0, tile sweep).
GPU_LAUNCH_SHAPES = {8: LaunchShape(512, 2, 8), 4: LaunchShape(512, 4, 8, 48), 32: LaunchShape(1024, 4, 8)}
# The interpreter runs a program's lanes as numpy arrays: fewer, larger programs are faster.
INTERPRETER_TILE_ELEMENTS = 4096
INTERPRETER_TILES_PER_PROGRAM = 1


def state_bits(spec: KernelSpec) -> int:
    """The narrowest quantized state width of a part (32 when none is quantized)."""
    return min((fmt.bits for fmt in map(role_format, spec.inputs + spec.mutated) if fmt is not None), default=32)


def geometry(launch: LaunchSpec, device_type: str) -> Geometry:
    """Columns = a part's largest quantized block (every quantized role then covers whole blocks per tile; smaller
    blocks are reshaped), rows fill the tile. On the GPU the part with the narrowest state (the one the launch shapes
    were tuned for, and where a group's bytes are) sets the warps and the register cap; every part keeps its own
    elements per warp and tiles per program."""
    shapes = []
    lead_bits = min(state_bits(spec) for spec in launch.parts)
    lead = GPU_LAUNCH_SHAPES[lead_bits]
    for spec in launch.parts:
        cols = max(spec.quantized_block_sizes, default=256)
        if device_type == "cuda":
            own = GPU_LAUNCH_SHAPES[state_bits(spec)]
            # A part with wider state (the small tensors that keep fp32 state) walks 4 elements per thread: the
            # kernel's registers are those of its heaviest part, and they set the lead part's occupancy.
            elements = (own.elements // own.warps if state_bits(spec) == lead_bits else 128) * lead.warps
            shapes.append(TileShape(max(1, elements // cols), cols, own.tiles))
        else:
            shapes.append(TileShape(max(1, INTERPRETER_TILE_ELEMENTS // cols), cols, INTERPRETER_TILES_PER_PROGRAM))
    if device_type == "cuda":
        return Geometry(tuple(shapes), lead.warps, lead.max_registers)
    return Geometry(tuple(shapes), 4)


def _referenced(name: str, text: str) -> bool:
    return re.search(rf"\b{name}\b", text) is not None


@dataclasses.dataclass
class _Source:
    """Kernel body lines: ``prologue`` runs once per program, ``loop`` once per tile."""

    prologue: list[str]
    loop: list[str]


def _quantized_pointers(src: _Source, name: str, fmt: Quantized, tab: str) -> None:
    """The tile's blocks of a quantized role: row index, which rows exist, codes and scales pointers."""
    if any(line.startswith(f"{name}_rows =") for line in src.loop):
        return
    b = fmt.block
    src.loop += [f"{name}_rows = tl.arange(0, TILE // {b})",
                 f"{name}_row_ok = {name}_rows < (left + {b - 1}) // {b}"]
    _table_pointer(src, f"{name}_codes_ptr", f"{tab}_codes", "tl.uint8", f"start // {8 // fmt.bits}")
    _table_pointer(src, f"{name}_scale_ptr", f"{tab}_scales", "tl.float32", f"start // {b}")


def _table_pointer(src: _Source, name: str, table: str, dtype: str, offset: str) -> None:
    """``name`` = this tensor's address from ``table`` as a ``dtype`` pointer (loaded once per program), advanced
    by ``offset`` elements. When the launcher found every address a multiple of 16 bytes (ALIGNED), the kernel is
    told so and vectorizes; the hint must sit in the kernel body, on the pointer (a hint inside a called function
    is lost)."""
    src.prologue += [f"{name}_base = tl.load({table} + t).to(tl.pointer_type({dtype}))",
                     "if ALIGNED:",
                     f"    {name}_base = tl.multiple_of({name}_base, 16)"]
    src.loop.append(f"{name} = {name}_base + {offset}")


def _code_offsets(name: str, fmt: Quantized) -> str:
    width = fmt.block * fmt.bits // 8
    return f"{name}_rows[:, None] * {width} + tl.arange(0, {width})[None, :]"


def _load_quantized(src: _Source, name: str, fmt: Quantized, tab: str) -> None:
    """Decode the tile's blocks of a quantized role into ``name`` ([ROWS, COLS] fp32)."""
    _quantized_pointers(src, name, fmt, tab)
    codes = (f"tl.load({name}_codes_ptr + {_code_offsets(name, fmt)}, mask={name}_row_ok[:, None], other=0)")
    src.loop += [
        f"{name}_scale = tl.load({name}_scale_ptr + {name}_rows, mask={name}_row_ok, other=0.0)",
        f"{name}_codes = " + (f"{codes}.to(tl.int32)" if fmt.bits == 8 else f"codecs.unpack_nibbles({codes})"),
        f"{name} = tl.reshape(codecs.decode({name}_codes, {name}_scale, {tab}_codebook), [ROWS, COLS])",
    ]


def _store_quantized(src: _Source, name: str, value: str, fmt: Quantized, tab: str) -> None:
    """Encode ``value`` into the role's codes and scales; padding lanes count as 0 (as formats.encode pads)."""
    _quantized_pointers(src, name, fmt, tab)
    b, constants = fmt.block, codec_constants(fmt)
    codes = f"{name}_new_codes.to(tl.uint8)" if fmt.bits == 8 else f"codecs.pack_nibbles({name}_new_codes)"
    src.loop += [
        f"{name}_new = tl.reshape(tl.where(inb, ({value}).to(tl.float32), 0.0), [TILE // {b}, {b}])",
        f"{name}_new_scale = codecs.block_scale({name}_new, {constants['SIGNED']}, {constants['LOWEST']!r})",
        f"{name}_new_codes = codecs.encode({name}_new, {name}_new_scale, {tab}_lower, {constants['BITS']}, "
        f"{constants['MAP']}, {constants['SIGNED']})",
        f"tl.store({name}_scale_ptr + {name}_rows, {name}_new_scale, mask={name}_row_ok)",
        f"tl.store({name}_codes_ptr + {_code_offsets(name, fmt)}, {codes}, mask={name}_row_ok[:, None])",
    ]


def render_source(launch: LaunchSpec | KernelSpec) -> str:
    """Triton source of the kernel for ``launch`` (a module defining ``fused_update_kernel``); a ``KernelSpec`` is
    rendered as the launch of that part alone."""
    if isinstance(launch, KernelSpec):
        launch = LaunchSpec.single(launch)
    # The pass may run under a fake-tensor mode; the codebook constants are real tensors.
    with unset_fake_temporarily():
        return _render_launch(launch)


def _render_part(launch: LaunchSpec, k: int) -> tuple[str, list[str]]:
    """Source of the ``@triton.jit`` function ``_part{k}`` that runs one program of part ``k``, and the names of its
    table arguments (the launch passes them through)."""
    spec = launch.parts[k]
    tables = []
    for prefix, roles in (("in", spec.inputs), ("mut", spec.mutated)):
        for i, role in enumerate(roles):
            tab = f"{prefix}{i}_tab"
            tables += [tab] if role_format(role) is None else [
                f"{tab}_codes", f"{tab}_scales", f"{tab}_codebook", f"{tab}_lower"]
    args = ["pid", "t", "program_start", "numels", *tables]
    args += [f"x{i}_ptr" for i in range(len(launch.scalars))]
    args += [f"acc{i}_ptr" for i in range(len(spec.accumulators))]
    if launch.stores:
        args += ["done_ptr", "programs"]
    if spec.stochastic_rounding:
        args.append("seed")
    args += ["ROWS: tl.constexpr", "COLS: tl.constexpr", "TILES: tl.constexpr", "ALIGNED: tl.constexpr"]

    used = "\n".join(spec.body + spec.outputs + tuple(v for _, v in spec.sums))
    # Pointers advance to the tile's start (64-bit) and lanes index it with 32-bit offsets; a full tile loads and
    # stores without element masks so both vectorize.
    # Per program: its tensor's element count and base pointers; then a loop over TILES consecutive tiles of that
    # tensor (tiles past the tensor's end are fully masked).
    prologue = [
        "TILE: tl.constexpr = ROWS * COLS",
        "first = (pid - tl.load(program_start + t)).to(tl.int64) * TILES",
        "numel = tl.load(numels + t)",
        "local = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]",
    ]
    src = _Source(prologue, [
        "start = (first + sub) * TILE",
        "left = tl.maximum(tl.minimum(numel - start, TILE), 0).to(tl.int32)",
        "full = left == TILE",
        "inb = local < left",
    ])
    lines = src.loop
    for prefix, roles in (("in", spec.inputs), ("mut", spec.mutated)):
        for i, role in enumerate(roles):
            value, tab, fmt = f"{prefix}{i}", f"{prefix}{i}_tab", role_format(role)
            if fmt is None and (_referenced(value, used) or prefix == "mut"):
                _table_pointer(src, f"{value}_ptr", tab, tl_dtype(role), "start")
            if not _referenced(value, used):
                continue
            if fmt is None:
                lines.append(f"{value} = _load_tile({value}_ptr, local, inb, full)")
            else:
                _load_quantized(src, value, fmt, tab)
    # The launch's 0-d program runs once, in the first tile, after that tile's loads are issued: its dependent chain
    # (pow, exact division, the count below) then overlaps their latency instead of delaying them. Run before the
    # loop it made an 8-bit AdamW step ~5% slower on the H100 (benchmarks/results/launch_overhead.exploratory.md).
    # The launch's 0-d program runs once per program, after the loads of the tensor's table entries are issued, so
    # its dependent chain (pow, exact division, the count) overlaps their latency. It is a function of its own:
    # inlined into the parts it took 116 registers (8-bit with fp32-state small tensors) and spilled under the 4-bit
    # cap (offline sm_90 compile, benchmarks/results/launch_sass.exploratory.md).
    scalar_params = [f"x{i}_ptr" for i in range(len(launch.scalars))] + (["done_ptr", "programs"] if launch.stores else [])
    if launch.scalar_body or launch.stores:
        prologue.append(f"{''.join(f's{i}, ' for i in range(len(spec.scalars)))}_ = _scalars{k}({', '.join(scalar_params)})")
    else:  # the part's scalars are the launch's inputs
        prologue += [f"s{i} = tl.load({value}_ptr)" for i, value in enumerate(launch.bindings[k])
                     if _referenced(f"s{i}", used)]
    lines += list(spec.body)
    if spec.stochastic_rounding:
        prologue.append("seed = seed + t * 1000003")
    for i, (role, value) in enumerate(zip(spec.mutated, spec.outputs)):
        target, tab, fmt = f"mut{i}", f"mut{i}_tab", role_format(role)
        if fmt is not None:
            _store_quantized(src, target, value, fmt, tab)
            continue
        if role == "bfloat16":
            rounded = (f"_bf16_stochastic(({value}).to(tl.float32), seed, (start + local).to(tl.uint32))"
                       if spec.stochastic_rounding else f"_bf16_rne(({value}).to(tl.float32))")
        else:
            rounded = f"({value}).to({tl_dtype(role)})"
        lines.append(f"_store_tile({target}_ptr, local, {rounded}, inb, full)")
    for j, (index, value) in enumerate(spec.sums):
        acc = spec.accumulators[index]
        # Partial sums per row (one warp's reduction, no block-wide barrier), added only where nonzero: integer
        # ones fit int32 (a row holds < 2**31 elements), which reduces cheaper than int64.
        partial = "tl.float32" if acc == "float32" else "tl.int32"
        lines += [
            f"part{j} = tl.sum(tl.where(inb, {value}, 0).to({partial}), axis=1).to({tl_dtype(acc)})",
            f"tl.atomic_add(acc{index}_ptr + tl.zeros([ROWS], tl.int32), part{j}, mask=part{j} != 0)",
        ]
    body = "\n".join("    " + line for line in prologue + ["for sub in range(TILES):"])
    body += "\n" + "\n".join("        " + line for line in lines)
    header = "\n".join(f"# {line}" for line in spec.to_string().splitlines())
    # Registers set occupancy, and ptxas allocates them over the whole kernel: several parts inlined took more than
    # the heaviest alone (8-bit AdamW with fp32-state small tensors: 111 registers against 80, offline sm_90 compile,
    # benchmarks/results/launch_sass.exploratory.md); called as functions they do not. A lone part is inlined (80
    # registers either way; the timed configuration).
    decorator = "@triton.jit" if len(launch.parts) == 1 else "@triton.jit(noinline=True)"
    # The function returns the part's scalars and a 0 (a tuple even when the part reads no scalar).
    program = _scalar_program(launch, k) + [f"return {''.join(f's{i}, ' for i in range(len(spec.scalars)))}0"]
    scalars = (f"@triton.jit(noinline=True)\ndef _scalars{k}({', '.join(scalar_params)}):\n"
               + "\n".join("    " + line for line in program) + "\n")
    return (f"{scalars}\n\n{header}\n{decorator}\ndef _part{k}(\n        " + ",\n        ".join(args)
            + f",\n):\n{body}\n"), tables


def _scalar_program(launch: LaunchSpec, k: int) -> list[str]:
    """Lines that load the launch's 0-d inputs, compute its 0-d program, bind part ``k``'s scalars ``s{i}``, and
    let the last program to have read the inputs write the stored ones."""
    spec, bound = launch.parts[k], launch.bindings[k]
    lines = _zero_d_values(launch, bound)
    lines += [f"s{i} = ({value}).to({tl_dtype(dtype)})" for i, (value, dtype) in enumerate(zip(bound, spec.scalars))]
    if launch.stores:
        # A program's reads come before its count (the barrier holds its warps until all have read; acq_rel orders
        # the reads before the count, and the last program's writes after every count).
        lines += ["tl.debug_barrier()",
                  'done = tl.atomic_add(done_ptr, 1, sem="acq_rel")',
                  "if done == programs - 1:"]
        lines += [f"    {line}" for line in _stores(launch)]
    return lines


def _zero_d_values(launch: LaunchSpec, read: tuple[str, ...]) -> list[str]:
    """Load the launch's 0-d inputs that its 0-d program, its stores or the values ``read`` use, then the program."""
    used = "\n".join(launch.scalar_body + launch.stores + read)
    lines = [f"x{i} = tl.load(x{i}_ptr)" for i in range(len(launch.scalars)) if _referenced(f"x{i}", used)]
    return lines + list(launch.scalar_body)


def _stores(launch: LaunchSpec) -> list[str]:
    """Write the stored inputs and reset the count of programs that have read them."""
    first = launch.plain_scalars
    lines = [f"tl.store(x{first + j}_ptr, ({value}).to({tl_dtype(launch.scalars[first + j])}))"
             for j, value in enumerate(launch.stores)]
    return lines + ["tl.store(done_ptr, 0)"]


# The seeds of two parts' stochastic rounding differ by this much, so their tensors draw different streams.
_PART_SEED_STRIDE = 1 << 40


def _render_launch(launch: LaunchSpec) -> str:
    """The kernel: each program loads its tensor index and runs its part's function (which also computes the
    launch's 0-d program); with no program at all, one writes the stored 0-d values."""
    functions, part_args = [], []
    args = ["program_tensor", "programs"] + [f"part_end{k}" for k in range(len(launch.parts))]
    for k in range(len(launch.parts)):
        text, tables = _render_part(launch, k)
        functions.append(text)
        names = [f"p{k}_program_start", f"p{k}_numels"] + [f"p{k}_{tab}" for tab in tables]
        args += names
        part_args.append(names)
    pointers = [f"x{i}_ptr" for i in range(len(launch.scalars))]
    args += pointers
    args += [f"acc{i}_ptr" for i in range(len(launch.accumulators))]
    stochastic = any(spec.stochastic_rounding for spec in launch.parts)
    if stochastic:
        args.append("seed_ptr")
    if launch.stores:
        args.append("done_ptr")
    args += [f"P{k}_{c}: tl.constexpr" for k in range(len(launch.parts)) for c in ("ROWS", "COLS", "TILES", "ALIGNED")]

    lines = ["pid = tl.program_id(0)", "t = tl.load(program_tensor + pid)"]
    if stochastic:
        lines.append("seed = tl.load(seed_ptr)")
    for k, (spec, accs) in enumerate(zip(launch.parts, launch.part_accumulators)):
        call = ["pid", "t", *part_args[k], *pointers, *(f"acc{a}_ptr" for a in accs)]
        if launch.stores:
            call += ["done_ptr", "programs"]
        if spec.stochastic_rounding:
            call.append(f"seed + {k * _PART_SEED_STRIDE}")
        call += [f"P{k}_{c}" for c in ("ROWS", "COLS", "TILES", "ALIGNED")]
        lines += [f"{'if' if k == 0 else 'elif'} pid < part_end{k}:", f"    _part{k}({', '.join(call)})"]
    if launch.stores:
        # No tensor has an element: the launch runs one program, which only writes the stored inputs.
        lines.append("if programs == 0:")
        lines += [f"    {line}" for line in _zero_d_values(launch, ()) + _stores(launch)]
    header = "\n".join(f"# {line}" for line in launch.to_string().splitlines())
    kernel = (f"{header}\n@triton.jit\ndef fused_update_kernel(\n        " + ",\n        ".join(args)
              + ",\n):\n" + "\n".join("    " + line for line in lines) + "\n")
    return _PRELUDE + "\n\n" + "\n\n".join(functions) + "\n\n" + kernel


# --------------------------------------------------------------------------------------------------------------
# Compilation and launch
# --------------------------------------------------------------------------------------------------------------
def _kernel_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"lowbit_compile_kernels_{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


class FusedUpdateKernel:
    """A compiled launch spec: the Triton kernel plus its launch geometry. ``launch`` builds (and caches) the pointer
    tables for the tensors it is given."""

    def __init__(self, spec: LaunchSpec | KernelSpec):
        self.spec = LaunchSpec.single(spec) if isinstance(spec, KernelSpec) else spec
        self.source = render_source(self.spec)
        digest = hashlib.sha256(self.source.encode()).hexdigest()[:24]
        path = os.path.join(_kernel_dir(), f"fused_update_{digest}.py")
        if not os.path.exists(path):
            # @triton.jit reads the source back from the file: write it whole before anyone imports it.
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                f.write(self.source)
            os.replace(tmp, path)
        module_spec = importlib.util.spec_from_file_location(f"lowbit_fused_update_{digest}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        self.kernel = module.fused_update_kernel
        self.path = path
        self.in_slots = [part.slots(part.inputs) for part in self.spec.parts]
        self.mut_slots = [part.slots(part.mutated) for part in self.spec.parts]
        self._tables: dict[tuple, TableSet] = {}
        self._spilling: set[Geometry] = set()

    # Pointer tables are kept for as long as the kernel lives: CUDA graphs replay with the addresses they captured.
    MAX_TABLE_SETS = 4096

    def counts(self, mutated: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[int]:
        """Number of parameters of a single-part launch's lists (checked against the spec)."""
        if len(self.spec.parts) != 1:
            raise ValueError(f"counts: a launch of {len(self.spec.parts)} parts needs its parameter count per part")
        extra = len(self.spec.accumulators) + len(self.spec.stores)
        if self.mut_slots[0]:
            count = (len(mutated) - extra) // self.mut_slots[0]
        else:
            count = len(inputs) // max(self.in_slots[0], 1)
        return [max(count, 0)]

    def _split(self, mutated, inputs, counts):
        """Per part: (mutated, inputs) tensors; then the accumulators and the stored scalars."""
        spec = self.spec
        if len(counts) != len(spec.parts) or any(c < 0 for c in counts):
            raise ValueError(f"counts: one parameter count per part ({len(spec.parts)}), got {list(counts)}")
        n_mut = sum(c * s for c, s in zip(counts, self.mut_slots))
        n_in = sum(c * s for c, s in zip(counts, self.in_slots))
        extra = len(spec.accumulators) + len(spec.stores)
        if len(mutated) != n_mut + extra or len(inputs) != n_in:
            raise ValueError(
                f"mutated/inputs: for {list(counts)} parameters per part expected {n_mut} mutated tensors plus "
                f"{len(spec.accumulators)} accumulators and {len(spec.stores)} stored scalars, and {n_in} inputs; "
                f"got {len(mutated)} and {len(inputs)}")
        parts, m, i = [], 0, 0
        for count, mut_slots, in_slots in zip(counts, self.mut_slots, self.in_slots):
            parts.append((mutated[m: m + count * mut_slots], inputs[i: i + count * in_slots]))
            m += count * mut_slots
            i += count * in_slots
        return parts, mutated[n_mut: n_mut + len(spec.accumulators)], mutated[n_mut + len(spec.accumulators):]

    @staticmethod
    def _role_tensors(roles, tensors, count):
        """Per role: the tensors of every parameter (quantized roles: (codes list, scales list))."""
        grouped, at = [], 0
        for role in roles:
            if role_format(role) is None:
                grouped.append(tensors[at: at + count])
                at += count
            else:
                grouped.append((tensors[at: at + count], tensors[at + count: at + 2 * count]))
                at += 2 * count
        return grouped

    @staticmethod
    def _check(t, what, device, dtype=None, zero_dim=False):
        if t.device != device:
            raise ValueError(f"{what}: expected a tensor on {device}, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{what}: must be contiguous")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{what}: expected {dtype}, got {t.dtype}")
        if zero_dim and t.dim() != 0:
            raise ValueError(f"{what}: expected a 0-d tensor, got shape {tuple(t.shape)}")

    def _part_tables(self, p, mutated, inputs, count, device, shape: TileShape):
        """Part ``p``'s element counts, its rows of data pointers, and its number of programs per tensor."""
        spec = self.spec.parts[p]
        numels = None
        rows: list[list[int]] = []
        where = f"part {p} " if len(self.spec.parts) > 1 else ""
        for list_name, roles, tensors in (("inputs", spec.inputs, inputs), ("mutated", spec.mutated, mutated)):
            for r, (role, group) in enumerate(zip(roles, self._role_tensors(roles, tensors, count))):
                fmt = role_format(role)
                if fmt is None:
                    dtype = getattr(torch, role)
                    for i, x in enumerate(group):
                        self._check(x, f"{where}{list_name} role {r} ({role}) of parameter {i}", device, dtype)
                    sizes = [x.numel() for x in group]
                    if numels is None:
                        numels = sizes
                    elif sizes != numels:
                        raise ValueError(f"{where}{list_name} role {r}: element counts {sizes} differ from {numels}")
                    rows.append([x.data_ptr() for x in group])
                else:
                    codes, scales = group
                    for i, (c, s) in enumerate(zip(codes, scales)):
                        self._check(c, f"{where}{list_name} role {r} ({role}) codes of parameter {i}", device,
                                    torch.uint8)
                        self._check(s, f"{where}{list_name} role {r} ({role}) scales of parameter {i}", device,
                                    torch.float32)
                    rows.append([c.data_ptr() for c in codes])
                    rows.append([s.data_ptr() for s in scales])
        numels = numels or []
        for roles, tensors in ((spec.inputs, inputs), (spec.mutated, mutated)):
            for role, group in zip(roles, self._role_tensors(roles, tensors, count)):
                fmt = role_format(role)
                if fmt is None:
                    continue
                for i, (c, s, n) in enumerate(zip(*group, numels)):
                    if s.numel() != fmt.num_blocks(n) or c.numel() != fmt.num_code_bytes(n):
                        raise ValueError(
                            f"{where}{fmt.spec} state of parameter {i}: {n} elements need {fmt.num_blocks(n)} scales "
                            f"and {fmt.num_code_bytes(n)} code bytes, got {s.numel()} and {c.numel()}")
                codec_tables(fmt, device)  # created and cached on first use: let that happen here, outside graph pools
        programs = [-(-n // shape.program_elements) for n in numels]
        return numels, rows, programs

    def _build_tables(self, mutated, inputs, scalars, counts, device) -> "TableSet":
        spec = self.spec
        parts, accumulators, stored = self._split(mutated, inputs, counts)
        for i, s in enumerate(scalars):
            self._check(s, f"scalars[{i}]", device, getattr(torch, spec.scalars[i]), zero_dim=True)
        for i, a in enumerate(accumulators):
            self._check(a, f"accumulator {i}", device, getattr(torch, spec.accumulators[i]), zero_dim=True)
        for i, s in enumerate(stored):
            self._check(s, f"stored scalar {i}", device, getattr(torch, spec.scalars[spec.plain_scalars + i]),
                        zero_dim=True)
        shapes = geometry(spec, device.type).parts
        program_tensor, part_ends, part_tables = [], [], []
        for p, ((part_mutated, part_inputs), count) in enumerate(zip(parts, counts)):
            numels, rows, programs = self._part_tables(p, part_mutated, part_inputs, count, device, shapes[p])
            starts = [len(program_tensor)]
            for k in programs:
                starts.append(starts[-1] + k)
            program_tensor += [i for i, k in enumerate(programs) for _ in range(k)]
            part_ends.append(len(program_tensor))
            part_tables.append(PartTables(
                _host_to_device(starts[:-1], torch.int32, device),
                _host_to_device(numels, torch.int64, device),
                _host_to_device(rows, torch.int64, device).reshape(len(rows), count),
                all(address % 16 == 0 for row in rows for address in row)))
        done = torch.zeros((), dtype=torch.int32, device=device) if spec.stores else None
        return TableSet(_host_to_device(program_tensor or [0], torch.int32, device), tuple(part_ends),
                        len(program_tensor), tuple(part_tables), done)

    def tables(self, mutated, inputs, scalars, counts):
        device = (mutated or inputs)[0].device
        key = (device, tuple(counts), tuple(t.data_ptr() for t in mutated), tuple(t.data_ptr() for t in inputs),
               tuple(t.numel() for t in mutated), tuple(t.numel() for t in inputs))
        found = self._tables.get(key)
        if found is None:
            if len(self._tables) >= self.MAX_TABLE_SETS:
                self._tables.pop(next(iter(self._tables)))
            found = _outside_graph_pools(
                device, lambda: self._build_tables(mutated, inputs, scalars, counts, device))
            self._tables[key] = found
        return found

    def launch(self, mutated: list[torch.Tensor], inputs: list[torch.Tensor], scalars: list[torch.Tensor],
               counts: list[int] | None = None) -> None:
        spec = self.spec
        if len(scalars) != spec.plain_scalars:
            raise ValueError(f"scalars: the spec reads {spec.plain_scalars} scalars, got {len(scalars)}")
        if not mutated and not inputs:
            return
        if counts is None:
            counts = self.counts(mutated, inputs)
        device = (mutated or inputs)[0].device
        interpreting = triton_interpreting()
        if interpreting != (device.type == "cpu") or device.type not in ("cpu", "cuda"):
            raise RuntimeError(
                f"lowbit::fused_update_ got tensors on {device} with TRITON_INTERPRET={int(interpreting)}: its Triton "
                "kernel runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 only (the lowbit backend "
                "leaves other regions unfused)")
        tables = self.tables(mutated, inputs, scalars, counts)
        if tables.programs == 0 and not spec.stores:
            return
        _, accumulators, stored = self._split(mutated, inputs, counts)
        args = [tables.program_tensor, tables.programs, *tables.part_ends]
        for part, part_tables in zip(spec.parts, tables.parts):
            args += [part_tables.program_start, part_tables.numels]
            row = 0
            for roles in (part.inputs, part.mutated):
                for role in roles:
                    fmt = role_format(role)
                    if fmt is None:
                        args.append(part_tables.pointers[row])
                        row += 1
                    else:
                        codebook, lower = codec_tables(fmt, device)
                        args += [part_tables.pointers[row], part_tables.pointers[row + 1], codebook, lower]
                        row += 2
        args += [*scalars, *stored, *accumulators]
        seed = _seed(device) if any(part.stochastic_rounding for part in spec.parts) else None
        if seed is not None:
            args.append(seed)
        if tables.done is not None:
            args.append(tables.done)
        shape = geometry(spec, device.type)
        constants = {}
        for k, (tile, part_tables) in enumerate(zip(shape.parts, tables.parts)):
            constants.update({f"P{k}_ROWS": tile.rows, f"P{k}_COLS": tile.cols, f"P{k}_TILES": tile.tiles_per_program,
                              f"P{k}_ALIGNED": part_tables.aligned})
        capped = shape.max_registers is not None and shape not in self._spilling
        options = {"maxnreg": shape.max_registers} if capped else {}
        grid = max(tables.programs, 1)  # with no program, one still writes the stored scalars
        with _quiet_interpreter(interpreting):
            compiled = self.kernel[(grid,)](*args, **constants, num_warps=shape.num_warps, **options)
        if capped and getattr(compiled, "n_spills", 0) > 0:
            # The cap suits the built-in rules; a larger one spills under it: launch it uncapped from now on (this
            # launch's result is right either way, spilling only costs time).
            self._spilling.add(shape)
        if seed is not None:
            seed.add_(1)


_SEEDS: dict[torch.device, torch.Tensor] = {}


def _seed(device: torch.device) -> torch.Tensor:
    """A device-side seed advanced after every stochastic-rounding launch (no host state, so CUDA-graph safe)."""
    if device not in _SEEDS:
        _SEEDS[device] = _outside_graph_pools(
            device, lambda: torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device))
    return _SEEDS[device]


@dataclasses.dataclass(frozen=True)
class PartTables:
    """One part's tables: each tensor's first program, element counts, and one row of data pointers per role slot
    (codes and scales are a slot each)."""

    program_start: torch.Tensor
    numels: torch.Tensor
    pointers: torch.Tensor
    aligned: bool  # every pointer a multiple of 16 bytes


@dataclasses.dataclass(frozen=True)
class TableSet:
    """Launch tables for one list of tensors: the tensor of every program (indices into its part's tables), where
    each part's programs end, their number, the parts' tables, and the counter of programs that have read the
    launch's 0-d inputs, which lets the last one write the stored ones (and reset it to 0)."""

    program_tensor: torch.Tensor
    part_ends: tuple[int, ...]
    programs: int
    parts: tuple[PartTables, ...]
    done: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        found = [self.program_tensor] + [t for p in self.parts for t in (p.program_start, p.numels, p.pointers)]
        return found + ([self.done] if self.done is not None else [])


_ALLOCATING_THREAD: list = []


def _outside_graph_pools(device: torch.device, build):
    """``build()`` (which makes tensors that outlive the launch: pointer tables, the seed, the codec tables it asks
    for first) with its allocations kept out of CUDA-graph memory pools and out of any graph being captured.

    While cudagraph trees warm a graph up, every allocation the warming thread makes goes to the graph's private
    pool, and tensors that stay alive there are an error; during capture (which cudagraph trees run with
    ``capture_error_mode="thread_local"``) the capturing thread may not copy host-to-device. So CUDA work happens on
    a helper thread and its own stream. This is what lets a captured step take gradients that cudagraph trees copied
    into static buffers (addresses unlike those seen in warm-up). The host waits for that stream only while a graph
    is being captured (the capture may not wait on work outside it); otherwise the current stream waits on it, so a
    step that meets new addresses (tables rebuilt) does not synchronise the host. On the CPU ``build`` just runs."""
    if device.type != "cuda":
        return build()
    if not _ALLOCATING_THREAD:
        _ALLOCATING_THREAD.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lowbit-tables"))

    capturing = torch.cuda.is_current_stream_capturing()

    def run():
        with torch.cuda.device(device):
            if device not in _SIDE_STREAMS:
                _SIDE_STREAMS[device] = torch.cuda.Stream(device)
            side = _SIDE_STREAMS[device]
            with torch.cuda.stream(side):
                made = build()
            built = side.record_event()
            if capturing:
                built.synchronize()
            return made, built

    made, built = _ALLOCATING_THREAD[0].submit(run).result()
    main = torch.cuda.current_stream(device)
    if not capturing:
        main.wait_event(built)
    for tensor in (made.tensors() if isinstance(made, TableSet) else [made]):
        tensor.record_stream(main)  # used (and one day freed) on this stream, not the helper's
    return made


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A table from host values without synchronising: through pinned memory, copied asynchronously (the pinned
    block is not reused before the copy is done: torch's host allocator records the copy's stream)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@contextlib.contextmanager
def _quiet_interpreter(interpreting: bool):
    """Padding lanes legitimately compute 0/0 and the like; numpy would warn for each under the interpreter."""
    if not interpreting:
        yield
        return
    import numpy as np
    with np.errstate(all="ignore"):
        yield


_KERNELS: dict[str, FusedUpdateKernel] = {}
_KERNELS_LOCK = threading.Lock()


def kernel_for(spec: str) -> FusedUpdateKernel:
    """The compiled kernel of a spec string (compiled once per process)."""
    found = _KERNELS.get(spec)
    if found is None:
        with _KERNELS_LOCK:
            found = _KERNELS.get(spec)
            if found is None:
                found = FusedUpdateKernel(LaunchSpec.from_string(spec))
                _KERNELS[spec] = found
    return found


# Defined with the low-level ``torch.library.Library`` API, not ``torch.library.custom_op``: a custom_op runs
# Python autograd, ADInplaceOrView and aliasing-check layers on every call, each converting the tensor lists between
# Python and C++ and bumping version counters one tensor at a time. For a group of hundreds of tensors that host work
# cost more than the kernel itself (H100: benchmarks/results/profile_steps.exploratory.md, runs 2 and 3). Here the
# dispatcher goes straight to ``_fused_update`` (there is no autograd formula: an optimizer step runs under no_grad),
# which bumps every mutated tensor's version counter in one call, so autograd still sees the in-place update.
_LIBRARY = torch.library.Library("lowbit", "FRAGMENT")
_LIBRARY.define("fused_update_(Tensor(a!)[] mutated, Tensor[] inputs, Tensor[] scalars, int[] counts, str spec) "
                "-> ()")


def _fused_update(mutated: list[torch.Tensor], inputs: list[torch.Tensor], scalars: list[torch.Tensor],
                  counts: list[int], spec: str) -> None:
    """Run the fused launch ``spec`` over its parts' parameters (``counts[p]`` for part ``p``): ``mutated`` and
    ``inputs`` hold, part by part and role by role, each parameter's tensor (quantized roles: all codes, then all
    scales); ``mutated`` ends with the accumulators and then the 0-d tensors the launch writes; ``scalars`` are the
    0-d tensors it reads."""
    kernel_for(spec).launch(mutated, inputs, scalars, counts)
    torch._C._increment_version(mutated)


for _dispatch_key in ("CPU", "CUDA"):
    _LIBRARY.impl("fused_update_", _fused_update, _dispatch_key)


@torch.library.register_fake("lowbit::fused_update_", lib=_LIBRARY)
def _(mutated, inputs, scalars, counts, spec):
    return None


fused_update_ = torch.ops.lowbit.fused_update_


__all__ = ["KernelSpec", "LaunchSpec", "FusedUpdateKernel", "fused_update_", "kernel_for", "render_source", "geometry",
           "Geometry", "TileShape", "LaunchShape", "GPU_LAUNCH_SHAPES", "dtype_name", "tl_dtype", "role_format",
           "state_bits"]
