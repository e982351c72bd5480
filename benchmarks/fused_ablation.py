"""What bounds the fused AdamW update kernel: time it with parts of its codec work replaced by cheap stand-ins.

    python3 benchmarks/fused_ablation.py --out DIR          # on the GPU: DIR/fused_ablation.{json,md}
    python3 benchmarks/fused_ablation.py --cpu-smoke --out DIR   # tiny tensors under TRITON_INTERPRET=1

The kernel spec is the one the lowbit pass generates for ``lbc.optim.AdamW(bits=B)`` on this device; the kernel is
then launched directly (no torch.compile) on 16 x 4096^2 fp32 parameters, median of 30 timed launches after
warm-up (``step_time.time_calls``).
``base`` times the update part alone, its 0-d scalars given; ``launch`` the whole launch the pass generates (every
program also computes the step's 0-d math, and the last to read the step counter increments it). The stand-in
variants replace, in the base part's generated source: ``nodecode``: the codebook lookups of the decode by arithmetic on the code;
``nomid``: the 8-bit encoder's boundary lookup (the candidate code is kept); ``nogather``: both; ``trivenc``: the
whole encoder by ``y * 127 + 128``; ``trivall``: decode and encode both; ``analytic4`` (4-bit only, exact): the
dynamic map's encoder as the 8-bit one (analytic candidate + one lookup) instead of the 4-step search; ``table1/2``, ``table1/8``
(8-bit): the decode's and the encoder's lookups with their index shifted right by 1 / 3 bits, so a warp's 32
scattered lookups touch fewer cache lines of the 1 KB tables. Stand-ins
give wrong state values: the point is the time, against the same memory traffic (params, grads, codes and scales
read and written as in the real kernel).
Launch shapes are ``ELEMENTSxWARPSxTILES[xREGISTERS]`` (tile elements, warps, tiles per program, register cap;
``fused_update.LaunchShape``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.step_time import launched_as, time_calls  # noqa: E402
from lowbit_compile.templates import codecs as C  # noqa: E402


@triton.jit
def decode_without_lookup(codes, scale, codebook_ptr):
    return (codes.to(tl.float32) * (1.0 / 128.0) - 1.0) * scale[:, None]


@triton.jit
def encode_without_boundary_lookup(x, scale, lower_ptr, BITS: tl.constexpr, MAP: tl.constexpr, SIGNED: tl.constexpr):
    """The 8-bit dynamic encoder's candidate code (exact or one above), without the correcting lookup."""
    return C.dynamic_candidate(C._divide_rows(x, scale), BITS, SIGNED)


@triton.jit
def encode_analytic4(x, scale, lower_ptr, BITS: tl.constexpr, MAP: tl.constexpr, SIGNED: tl.constexpr):
    """The 4-bit dynamic map encoded like the 8-bit one (analytic candidate + one boundary lookup, exact too) instead
    of the 4-step binary search of the midpoints (4 lookups per element); the linear map keeps its closed form."""
    y = C._divide_rows(x, scale)
    if MAP == C._LINEAR:
        code = C._encode_linear(y, BITS)
    else:
        code = C._encode_dynamic(y, lower_ptr, BITS, SIGNED)
    return code


@triton.jit
def decode_narrow_table(codes, scale, codebook_ptr, SHIFT: tl.constexpr):
    """The decode's lookup with its index shifted right: every lookup lands in the first 1 / 2**SHIFT of the table."""
    return C.table_lookup(codebook_ptr, codes >> SHIFT) * scale[:, None]


@triton.jit
def encode_narrow_table(x, scale, lower_ptr, BITS: tl.constexpr, MAP: tl.constexpr, SIGNED: tl.constexpr,
                        SHIFT: tl.constexpr):
    """The 8-bit dynamic encoder with its boundary lookup's index shifted right (as ``decode_narrow_table``)."""
    y = C._divide_rows(x, scale)
    code = C.dynamic_candidate(y, BITS, SIGNED)
    return code - (y <= C.table_lookup(lower_ptr, code >> SHIFT)).to(tl.int32)


@triton.jit
def encode_trivially(x, scale, lower_ptr, BITS: tl.constexpr, MAP: tl.constexpr, SIGNED: tl.constexpr):
    y = C._divide_rows(x, scale)
    return tl.minimum(tl.maximum((y * 127.0 + 128.0).to(tl.int32), 0), 255)


_STAND_INS = {
    "base": [],
    "launch": [],
    # The launch with the 0-d program's fast forms (exp2/log2 pow, approximate division and square root).
    "launch_fast": [("= _scalar_pow(", "= _pow("), ("= _exact_sqrt(", "= tl.sqrt("), ("= _exact_div(", "= tl.fdiv(")],
    # The launch without the step counter's store (no barrier, no atomic count): what the 0-d math alone costs.
    "launch_nostore": [("    tl.debug_barrier()\n", ""), ('tl.atomic_add(done_ptr, 1, sem="acq_rel")', "0")],
    "nodecode": [("codecs.decode(", "ablation.decode_without_lookup(")],
    "nomid": [("codecs.encode(", "ablation.encode_without_boundary_lookup(")],
    "nogather": [("codecs.decode(", "ablation.decode_without_lookup("),
                 ("codecs.encode(", "ablation.encode_without_boundary_lookup(")],
    "trivenc": [("codecs.encode(", "ablation.encode_trivially(")],
    "trivall": [("codecs.decode(", "ablation.decode_without_lookup("), ("codecs.encode(", "ablation.encode_trivially(")],
    "analytic4": [("codecs.encode(", "ablation.encode_analytic4(")],
    # Same lookups, narrower tables (probes of the L1 cost of a warp's scattered lookups, which grows with the number
    # of distinct cache lines they touch).
    "table1/2": [("codecs.decode(", "ablation.decode_narrow_table("), ("codecs.encode(", "ablation.encode_narrow_table("),
                 ("_codebook)", "_codebook, 1)"), ("8, 0, False)", "8, 0, False, 1)"), ("8, 0, True)", "8, 0, True, 1)")],
    "table1/8": [("codecs.decode(", "ablation.decode_narrow_table("), ("codecs.encode(", "ablation.encode_narrow_table("),
                 ("_codebook)", "_codebook, 3)"), ("8, 0, False)", "8, 0, False, 3)"), ("8, 0, True)", "8, 0, True, 3)")],
}
_WHOLE_UPDATE = {"base", "launch", "launch_nostore", "launch_fast"}
_EIGHT_BIT_ONLY = {"nomid", "nogather", "table1/2", "table1/8"}
_FOUR_BIT_ONLY = {"analytic4"}


def adamw_spec(bits: int, device: torch.device) -> str:
    """The launch spec the lowbit pass generates for our AdamW at ``bits`` on ``device`` (one part, its 0-d program
    and the step counter's store)."""
    from lowbit_compile import optim
    from lowbit_compile.report import clear_compile_reports, compile_report
    params = [torch.nn.Parameter(torch.randn(4096, device=device)) for _ in range(2)]  # large enough to quantize
    for p in params:
        p.grad = torch.randn_like(p)
    opt = optim.AdamW(params, lr=1e-3, weight_decay=1e-2, bits=bits)
    clear_compile_reports()
    with torch._inductor.config.patch(fx_graph_cache=False):
        torch.compile(opt.step, backend="lowbit")()
    torch._dynamo.reset()
    fused = compile_report().fused
    if len(fused) != 1:
        raise RuntimeError(f"expected one fused launch for AdamW {bits}-bit, got {len(fused)}")
    return fused[0].launch_spec


def time_variant(spec_text: str, variant: str, shape, device: torch.device,
                 numel: int, count: int) -> dict:
    from lowbit_compile import formats as F
    from lowbit_compile.templates import fused_update as FU

    render = FU.render_source

    def patched(spec):
        source = render(spec).replace("from lowbit_compile.templates import codecs",
                                      "from lowbit_compile.templates import codecs\n"
                                      "from benchmarks import fused_ablation as ablation")
        for old, new in _STAND_INS[variant]:
            source = source.replace(old, new)
        return source

    try:
        FU.render_source = patched
        with launched_as(shape) if shape is not None else contextlib.nullcontext():
            launch = FU.LaunchSpec.from_string(spec_text)
            spec = launch.parts[0]
            # "launch": the launch as generated (every program computes the 0-d math, the last one to read the step
            # counter increments it); every other variant: the part alone, its scalars given.
            whole = variant.startswith("launch")
            kernel = FU.FusedUpdateKernel(launch if whole else spec)
            params = [torch.randn(numel, device=device) * 0.02 for _ in range(count)]
            grads = [torch.randn(numel, device=device) * 1e-3 for _ in range(count)]
            mutated = list(params)
            for role in spec.mutated[1:]:
                if role == "float32":
                    mutated += [torch.zeros(numel, device=device) for _ in range(count)]
                    continue
                storage = [F.empty_state(numel, F.parse_spec(role), device) for _ in range(count)]
                mutated += [s[0] for s in storage] + [s[1] for s in storage]
            mutated.append(torch.zeros((), dtype=torch.int64, device=device))
            if whole:
                mutated.append(torch.zeros((), device=device))  # the step counter
                scalars = [torch.tensor(1e-3, device=device) for _ in range(launch.plain_scalars)]
            else:
                values = [1 - 1e-5, 1e-3, 0.1, 0.1, 0.999, 0.001, 0.0316, 1e-8]
                scalars = [torch.tensor(v, device=device) for v in values[:len(spec.scalars)]]
            launch = lambda: kernel.launch(mutated, grads, scalars)  # noqa: E731
            reps = 30 if device.type == "cuda" else 1
            times = time_calls(launch, device, target_s=0.0, min_reps=reps, max_reps=reps)
    finally:
        FU.render_source = render
    ms = statistics.median(times)
    state = sum(t.numel() * t.element_size() for t in mutated[count:count * kernel.mut_slots[0]])
    moved = 12 * numel * count + 2 * state  # params read + written, grads read, state read + written
    return dict(variant=variant, shape="default" if shape is None else str(shape), ms=ms, ms_per_1g=ms * 1e9 / (numel * count),
                moved_bytes_per_param=moved / (numel * count), gbs=moved / ms / 1e6)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny tensors under the interpreter")
    parser.add_argument("--bits", default="8,4,32", help="comma-separated AdamW state widths")
    parser.add_argument("--variants", default=",".join(_STAND_INS))
    parser.add_argument("--shapes", default="default",
                        help="comma-separated ELEMENTSxWARPSxTILES[xREGISTERS], or default (GPU_LAUNCH_SHAPES)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every row this many times, rounds interleaved (drift hits all rows alike); the "
                             "table reports the median over rounds and the range")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    numel, count = (1000, 2) if args.cpu_smoke else (4096 * 4096, 16)
    from lowbit_compile.templates.fused_update import LaunchShape
    shapes = [None if item == "default" else LaunchShape.parse(item) for item in args.shapes.split(",")]
    specs = {bits: adamw_spec(bits, device) for bits in map(int, args.bits.split(","))}
    timings = []
    for round_index in range(args.rounds):
        for bits, spec in specs.items():
            for variant in args.variants.split(","):
                if variant not in _WHOLE_UPDATE and (bits == 32 or (variant in _EIGHT_BIT_ONLY and bits != 8)
                                          or (variant in _FOUR_BIT_ONLY and bits != 4)):
                    continue  # nothing to replace, or a stand-in for a part this width does not have
                for shape in shapes:
                    timing = dict(bits=bits, round=round_index,
                                  **time_variant(spec, variant, shape, device, numel, count))
                    timings.append(timing)
                    print(json.dumps(timing), flush=True)
    rows = []
    for key in dict.fromkeys((t["bits"], t["variant"], t["shape"]) for t in timings):
        mine = [t for t in timings if (t["bits"], t["variant"], t["shape"]) == key]
        ms = statistics.median(t["ms"] for t in mine)
        first = {k: v for k, v in mine[0].items() if k != "round"}
        rows.append(dict(first, ms=ms, ms_per_1g=ms * 1e9 / (numel * count), rounds=[t["ms"] for t in mine],
                         gbs=first["moved_bytes_per_param"] * numel * count / ms / 1e6))
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    meta = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), numel=numel * count)
    meta["rounds"] = args.rounds
    (args.out / "fused_ablation.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Fused AdamW kernel ablation — {name}", "", f"torch {meta['torch']}, triton {meta['triton']}; "
             f"{meta['date']}; {numel * count:,} fp32 params. Stand-ins: see benchmarks/fused_ablation.py.", "",
             f"Rounds: {args.rounds} (ms: median over rounds; range: fastest - slowest round).", "",
             "| bits | variant | launch shape | ms | range | ms per 1G params | GB/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['variant']} | {r['shape']} | {r['ms']:.3f} | {min(r['rounds']):.3f} - "
              f"{max(r['rounds']):.3f} | {r['ms_per_1g']:.2f} | {r['gbs']:.0f} |" for r in rows]
    (args.out / "fused_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
