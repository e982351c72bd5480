"""The fused optimizer-update kernel and the ``lowbit::fused_update_`` op that launches it.

A ``KernelSpec`` describes one update region completely: which tensors it reads and writes (roles), the 0-d
scalars it reads, the full sums it accumulates, and its body as lines of ``tl`` expressions. The compiler pass
(``lowbit_compile.passes``) builds the spec from the graph; this module renders it into Triton source, compiles it
once per spec, and launches it over a whole group of parameters: a program is (tensor index, tile of whole blocks),
so one launch covers every tensor of the group through per-role pointer tables.

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

SPEC_VERSION = 1

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
        fields = dataclasses.asdict(self)
        fields["version"] = SPEC_VERSION
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_string(cls, text: str) -> "KernelSpec":
        try:
            fields = json.loads(text)
            version = fields.pop("version")
        except (ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"spec: not a fused-update kernel spec: {text[:80]!r}") from err
        if version != SPEC_VERSION:
            raise ValueError(f"spec: version {version} is not {SPEC_VERSION}; recompile (clear the inductor cache)")
        fields["sums"] = tuple((int(i), str(v)) for i, v in fields["sums"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    @property
    def quantized_block_sizes(self) -> list[int]:
        return [fmt.block for fmt in map(role_format, self.inputs + self.mutated) if fmt is not None]

    def slots(self, roles: tuple[str, ...]) -> int:
        """Tensors per parameter in a list of roles: 2 for a quantized role (codes, scales), else 1."""
        return sum(1 if role_format(r) is None else 2 for r in roles)


# --------------------------------------------------------------------------------------------------------------
# Source generation
# --------------------------------------------------------------------------------------------------------------
# Helpers the body emitters and the stores call. Only tl/tl.math (the interpreter has no libdevice).
_PRELUDE = '''\
import triton
import triton.language as tl

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
    rows: int
    cols: int
    num_warps: int
    tiles_per_program: int = 1
    max_registers: int | None = None  # ptxas register cap per thread (Triton's ``maxnreg``); None: ptxas decides

    @property
    def elements(self) -> int:
        return self.rows * self.cols

    @property
    def program_elements(self) -> int:
        return self.elements * self.tiles_per_program


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


def tile_shape(spec: KernelSpec, device_type: str) -> TileShape:
    """Columns = the largest quantized block (every quantized role then covers whole blocks per tile; smaller
    blocks are reshaped), rows fill the tile."""
    cols = max(spec.quantized_block_sizes, default=256)
    if device_type == "cuda":
        bits = min((fmt.bits for fmt in map(role_format, spec.inputs + spec.mutated) if fmt is not None), default=32)
        launch = GPU_LAUNCH_SHAPES[bits]
        return TileShape(max(1, launch.elements // cols), cols, launch.warps, launch.tiles, launch.max_registers)
    return TileShape(max(1, INTERPRETER_TILE_ELEMENTS // cols), cols, 4, INTERPRETER_TILES_PER_PROGRAM)


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


def render_source(spec: KernelSpec) -> str:
    """Triton source of the kernel for ``spec`` (a module defining ``fused_update_kernel``)."""
    # The pass may run under a fake-tensor mode; the codebook constants are real tensors.
    with unset_fake_temporarily():
        return _render_source(spec)


def _render_source(spec: KernelSpec) -> str:
    args = ["program_tensor", "program_start", "numels"]
    for prefix, roles in (("in", spec.inputs), ("mut", spec.mutated)):
        for i, role in enumerate(roles):
            tab = f"{prefix}{i}_tab"
            args += [tab] if role_format(role) is None else [
                f"{tab}_codes", f"{tab}_scales", f"{tab}_codebook", f"{tab}_lower"]
    args += [f"s{i}_ptr" for i in range(len(spec.scalars))]
    args += [f"acc{i}_ptr" for i in range(len(spec.accumulators))]
    if spec.stochastic_rounding:
        args.append("seed_ptr")
    args += ["ROWS: tl.constexpr", "COLS: tl.constexpr", "TILES: tl.constexpr", "ALIGNED: tl.constexpr"]

    used = "\n".join(spec.body + spec.outputs + tuple(v for _, v in spec.sums))
    # Pointers advance to the tile's start (64-bit) and lanes index it with 32-bit offsets; a full tile loads and
    # stores without element masks so both vectorize.
    # Per program: its tensor and first tile, the scalars and the tensor's base pointers; then a loop over TILES
    # consecutive tiles of that tensor (tiles past the tensor's end are fully masked).
    prologue = [
        "pid = tl.program_id(0)",
        "t = tl.load(program_tensor + pid)",
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
    for i in range(len(spec.scalars)):
        if _referenced(f"s{i}", used):
            prologue.append(f"s{i} = tl.load(s{i}_ptr)")
    for prefix, roles in (("in", spec.inputs), ("mut", spec.mutated)):
        for i, role in enumerate(roles):
            name, tab, fmt = f"{prefix}{i}", f"{prefix}{i}_tab", role_format(role)
            if fmt is None and (_referenced(name, used) or prefix == "mut"):
                _table_pointer(src, f"{name}_ptr", tab, tl_dtype(role), "start")
            if not _referenced(name, used):
                continue
            if fmt is None:
                lines.append(f"{name} = _load_tile({name}_ptr, local, inb, full)")
            else:
                _load_quantized(src, name, fmt, tab)
    lines += list(spec.body)
    if spec.stochastic_rounding:
        prologue.append("seed = tl.load(seed_ptr) + t * 1000003")
    for i, (role, value) in enumerate(zip(spec.mutated, spec.outputs)):
        name, tab, fmt = f"mut{i}", f"mut{i}_tab", role_format(role)
        if fmt is not None:
            _store_quantized(src, name, value, fmt, tab)
            continue
        if role == "bfloat16":
            rounded = (f"_bf16_stochastic(({value}).to(tl.float32), seed, (start + local).to(tl.uint32))"
                       if spec.stochastic_rounding else f"_bf16_rne(({value}).to(tl.float32))")
        else:
            rounded = f"({value}).to({tl_dtype(role)})"
        lines.append(f"_store_tile({name}_ptr, local, {rounded}, inb, full)")
    for k, (index, value) in enumerate(spec.sums):
        acc = spec.accumulators[index]
        # Partial sums per row (one warp's reduction, no block-wide barrier), added only where nonzero: integer
        # ones fit int32 (a row holds < 2**31 elements), which reduces cheaper than int64.
        partial = "tl.float32" if acc == "float32" else "tl.int32"
        lines += [
            f"part{k} = tl.sum(tl.where(inb, {value}, 0).to({partial}), axis=1).to({tl_dtype(acc)})",
            f"tl.atomic_add(acc{index}_ptr + tl.zeros([ROWS], tl.int32), part{k}, mask=part{k} != 0)",
        ]
    body = "\n".join("    " + line for line in prologue + ["for sub in range(TILES):"])
    body += "\n" + "\n".join("        " + line for line in lines)
    header = "\n".join(f"# {line}" for line in spec.to_string().splitlines())
    return (f"{_PRELUDE}\n\n{header}\n@triton.jit\ndef fused_update_kernel(\n        "
            + ",\n        ".join(args) + f",\n):\n{body}\n")


# --------------------------------------------------------------------------------------------------------------
# Compilation and launch
# --------------------------------------------------------------------------------------------------------------
def _kernel_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"lowbit_compile_kernels_{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


class FusedUpdateKernel:
    """A compiled spec: the Triton kernel plus its launch geometry. ``launch`` builds (and caches) the pointer
    tables for the tensors it is given."""

    def __init__(self, spec: KernelSpec):
        self.spec = spec
        self.source = render_source(spec)
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
        self.in_slots = spec.slots(spec.inputs)
        self.mut_slots = spec.slots(spec.mutated)
        self._tables: dict[tuple, TableSet] = {}
        self._spilling_shapes: set[TileShape] = set()

    # Pointer tables are kept for as long as the kernel lives: CUDA graphs replay with the addresses they captured.
    MAX_TABLE_SETS = 4096

    def count(self, mutated: list[torch.Tensor], inputs: list[torch.Tensor]) -> int:
        """Number of parameters the lists hold (checked against the spec)."""
        spec = self.spec
        tensors = len(mutated) - len(spec.accumulators)
        if self.mut_slots:
            count, rest = divmod(tensors, self.mut_slots)
        else:
            count, rest = divmod(len(inputs), self.in_slots)
        if rest or tensors < 0 or len(inputs) != count * self.in_slots or \
                (self.mut_slots and tensors != count * self.mut_slots):
            raise ValueError(
                f"mutated/inputs: expected {self.mut_slots} mutated and {self.in_slots} input tensors per parameter "
                f"plus {len(spec.accumulators)} accumulators, got {len(mutated)} and {len(inputs)}")
        return count

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

    def _build_tables(self, mutated, inputs, scalars, count, device) -> "TableSet":
        spec = self.spec
        numels = None
        rows: list[list[int]] = []

        def check(t, what, dtype=None):
            if t.device != device:
                raise ValueError(f"{what}: expected a tensor on {device}, got {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"{what}: must be contiguous")
            if dtype is not None and t.dtype != dtype:
                raise ValueError(f"{what}: expected {dtype}, got {t.dtype}")

        for list_name, roles, tensors in (("inputs", spec.inputs, inputs), ("mutated", spec.mutated, mutated)):
            for r, (role, group) in enumerate(zip(roles, self._role_tensors(roles, tensors, count))):
                fmt = role_format(role)
                if fmt is None:
                    dtype = getattr(torch, role)
                    for i, x in enumerate(group):
                        check(x, f"{list_name} role {r} ({role}) of parameter {i}", dtype)
                    sizes = [x.numel() for x in group]
                    if numels is None:
                        numels = sizes
                    elif sizes != numels:
                        raise ValueError(f"{list_name} role {r}: element counts {sizes} differ from {numels}")
                    rows.append([x.data_ptr() for x in group])
                else:
                    codes, scales = group
                    for i, (c, s) in enumerate(zip(codes, scales)):
                        check(c, f"{list_name} role {r} ({role}) codes of parameter {i}", torch.uint8)
                        check(s, f"{list_name} role {r} ({role}) scales of parameter {i}", torch.float32)
                    rows.append([c.data_ptr() for c in codes])
                    rows.append([s.data_ptr() for s in scales])
        quantized = [(role_format(r), g) for roles, tensors in ((spec.inputs, inputs), (spec.mutated, mutated))
                     for r, g in zip(roles, self._role_tensors(roles, tensors, count))
                     if role_format(r) is not None]
        for fmt, (codes, scales) in quantized:
            for i, (c, s, n) in enumerate(zip(codes, scales, numels)):
                if s.numel() != fmt.num_blocks(n) or c.numel() != fmt.num_code_bytes(n):
                    raise ValueError(
                        f"{fmt.spec} state of parameter {i}: {n} elements need {fmt.num_blocks(n)} scales and "
                        f"{fmt.num_code_bytes(n)} code bytes, got {s.numel()} and {c.numel()}")
        for i, s in enumerate(scalars):
            check(s, f"scalars[{i}]", getattr(torch, spec.scalars[i]))
            if s.dim() != 0:
                raise ValueError(f"scalars[{i}]: expected a 0-d tensor, got shape {tuple(s.shape)}")
        for i, a in enumerate(mutated[len(mutated) - len(spec.accumulators):]):
            check(a, f"accumulator {i}", getattr(torch, spec.accumulators[i]))
            if a.dim() != 0:
                raise ValueError(f"accumulator {i}: expected a 0-d tensor, got shape {tuple(a.shape)}")

        per_program = tile_shape(spec, device.type).program_elements
        programs = [-(-n // per_program) for n in numels]
        starts = [0]
        for k in programs:
            starts.append(starts[-1] + k)
        program_tensor = [i for i, k in enumerate(programs) for _ in range(k)]
        for fmt in {f for f in map(role_format, spec.inputs + spec.mutated) if f is not None}:
            codec_tables(fmt, device)  # created and cached on first use: let that happen here, outside graph pools
        return TableSet(torch.tensor(program_tensor, dtype=torch.int32).to(device),
                        torch.tensor(starts[:-1], dtype=torch.int32).to(device),
                        torch.tensor(numels, dtype=torch.int64).to(device),
                        torch.tensor(rows, dtype=torch.int64).reshape(len(rows), count).to(device),
                        all(address % 16 == 0 for row in rows for address in row))

    def tables(self, mutated, inputs, scalars):
        count = self.count(mutated, inputs)
        device = (mutated or inputs)[0].device
        key = (device, count, tuple(t.data_ptr() for t in mutated), tuple(t.data_ptr() for t in inputs),
               tuple(t.numel() for t in mutated), tuple(t.numel() for t in inputs))
        found = self._tables.get(key)
        if found is None:
            if len(self._tables) >= self.MAX_TABLE_SETS:
                self._tables.pop(next(iter(self._tables)))
            found = _outside_graph_pools(
                device, lambda: self._build_tables(mutated, inputs, scalars, count, device))
            self._tables[key] = found
        return found

    def launch(self, mutated: list[torch.Tensor], inputs: list[torch.Tensor], scalars: list[torch.Tensor]) -> None:
        spec = self.spec
        if len(scalars) != len(spec.scalars):
            raise ValueError(f"scalars: the spec reads {len(spec.scalars)} scalars, got {len(scalars)}")
        if not mutated and not inputs:
            return
        device = (mutated or inputs)[0].device
        interpreting = triton_interpreting()
        if interpreting != (device.type == "cpu") or device.type not in ("cpu", "cuda"):
            raise RuntimeError(
                f"lowbit::fused_update_ got tensors on {device} with TRITON_INTERPRET={int(interpreting)}: its Triton "
                "kernel runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 only (the lowbit backend "
                "leaves other regions unfused)")
        tables = self.tables(mutated, inputs, scalars)
        if tables.program_tensor.numel() == 0:
            return
        args = [tables.program_tensor, tables.program_start, tables.numels]
        row = 0
        for roles in (spec.inputs, spec.mutated):
            for role in roles:
                fmt = role_format(role)
                if fmt is None:
                    args.append(tables.pointers[row])
                    row += 1
                else:
                    codebook, lower = codec_tables(fmt, device)
                    args += [tables.pointers[row], tables.pointers[row + 1], codebook, lower]
                    row += 2
        args += list(scalars)
        args += list(mutated[len(mutated) - len(spec.accumulators):])
        seed = _seed(device) if spec.stochastic_rounding else None
        if seed is not None:
            args.append(seed)
        shape = tile_shape(spec, device.type)
        capped = shape.max_registers is not None and shape not in self._spilling_shapes
        options = {"maxnreg": shape.max_registers} if capped else {}
        with _quiet_interpreter(interpreting):
            compiled = self.kernel[(tables.program_tensor.numel(),)](
                *args, ROWS=shape.rows, COLS=shape.cols, TILES=shape.tiles_per_program, ALIGNED=tables.aligned,
                num_warps=shape.num_warps, **options)
        if capped and getattr(compiled, "n_spills", 0) > 0:
            # The cap suits the built-in rules; a larger one spills under it: launch it uncapped from now on (this
            # launch's result is right either way, spilling only costs time).
            self._spilling_shapes.add(shape)
        if seed is not None:
            seed.add_(1)


_SEEDS: dict[torch.device, torch.Tensor] = {}


def _seed(device: torch.device) -> torch.Tensor:
    """A device-side seed advanced after every stochastic-rounding launch (no host state, so CUDA-graph safe)."""
    if device not in _SEEDS:
        _SEEDS[device] = _outside_graph_pools(
            device, lambda: torch.randint(0, 2**31 - 1, (), dtype=torch.int64).to(device))
    return _SEEDS[device]


@dataclasses.dataclass(frozen=True)
class TableSet:
    """Launch tables for one list of tensors: the tensor of every program, each tensor's first program, element
    counts, and one row of data pointers per role slot (codes and scales are a slot each)."""

    program_tensor: torch.Tensor
    program_start: torch.Tensor
    numels: torch.Tensor
    pointers: torch.Tensor
    aligned: bool  # every pointer a multiple of 16 bytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.program_tensor, self.program_start, self.numels, self.pointers]


_ALLOCATING_THREAD: list = []


def _outside_graph_pools(device: torch.device, build):
    """``build()`` (which makes tensors that outlive the launch: pointer tables, the seed, the codec tables it asks
    for first) with its allocations kept out of CUDA-graph memory pools and out of any graph being captured.

    While cudagraph trees warm a graph up, every allocation the warming thread makes goes to the graph's private
    pool, and tensors that stay alive there are an error; during capture (which cudagraph trees run with
    ``capture_error_mode="thread_local"``) the capturing thread may not copy host-to-device. So CUDA work happens on
    a helper thread and its own stream, which is then synchronised with. This is what lets a captured step take
    gradients that cudagraph trees copied into static buffers (addresses unlike those seen in warm-up). On the CPU
    ``build`` just runs."""
    if device.type != "cuda":
        return build()
    if not _ALLOCATING_THREAD:
        _ALLOCATING_THREAD.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lowbit-tables"))

    def run():
        with torch.cuda.device(device):
            if device not in _SIDE_STREAMS:
                _SIDE_STREAMS[device] = torch.cuda.Stream(device)
            side = _SIDE_STREAMS[device]
            with torch.cuda.stream(side):
                made = build()
            side.synchronize()
            return made

    made = _ALLOCATING_THREAD[0].submit(run).result()
    main = torch.cuda.current_stream(device)
    for tensor in (made.tensors() if isinstance(made, TableSet) else [made]):
        tensor.record_stream(main)  # used (and one day freed) on this stream, not the helper's
    return made


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


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
                found = FusedUpdateKernel(KernelSpec.from_string(spec))
                _KERNELS[spec] = found
    return found


# Defined with the low-level ``torch.library.Library`` API, not ``torch.library.custom_op``: a custom_op runs
# Python autograd, ADInplaceOrView and aliasing-check layers on every call, each converting the tensor lists between
# Python and C++ and bumping version counters one tensor at a time. For a group of hundreds of tensors that host work
# cost more than the kernel itself (H100: benchmarks/results/profile_steps.exploratory.md, runs 2 and 3). Here the
# dispatcher goes straight to ``_fused_update`` (there is no autograd formula: an optimizer step runs under no_grad),
# which bumps every mutated tensor's version counter in one call, so autograd still sees the in-place update.
_LIBRARY = torch.library.Library("lowbit", "FRAGMENT")
_LIBRARY.define("fused_update_(Tensor(a!)[] mutated, Tensor[] inputs, Tensor[] scalars, str spec) -> ()")


def _fused_update(mutated: list[torch.Tensor], inputs: list[torch.Tensor], scalars: list[torch.Tensor],
                  spec: str) -> None:
    """Run the fused update ``spec`` over a group of parameters: ``mutated`` and ``inputs`` hold, role by role,
    each parameter's tensor (quantized roles: all codes, then all scales), ``mutated`` ends with the accumulators;
    ``scalars`` are the 0-d tensors the body reads."""
    kernel_for(spec).launch(mutated, inputs, scalars)
    torch._C._increment_version(mutated)


for _dispatch_key in ("CPU", "CUDA"):
    _LIBRARY.impl("fused_update_", _fused_update, _dispatch_key)


@torch.library.register_fake("lowbit::fused_update_", lib=_LIBRARY)
def _(mutated, inputs, scalars, spec):
    return None


fused_update_ = torch.ops.lowbit.fused_update_


__all__ = ["KernelSpec", "FusedUpdateKernel", "fused_update_", "kernel_for", "render_source", "tile_shape",
           "LaunchShape", "GPU_LAUNCH_SHAPES", "dtype_name", "tl_dtype", "role_format"]
