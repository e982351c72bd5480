"""Throughput of the Triton block codecs (lowbit_compile.templates.codecs) on a GPU, next to bitsandbytes'
blockwise 8-bit quantize/dequantize (block 256, its dynamic maps) and the measured device-to-device copy bandwidth.

    PYTHONPATH=. python benchmarks/codecs.py --out benchmarks/results

First checks correctness on the device (codes, absmax and decoded values identical to lowbit_compile.formats on a
16M-element slice of every format; the 8-bit encoders on every float32 in [-1, 1]), then times quantize and
dequantize of 256M fp32 elements per format (a few launch configurations; the library default is reported in the
table, the sweep in the JSON). Bytes counted: fp32 values (4 B/element) + codes + fp32 block scales, read plus
written, as the copy bandwidth is counted. Writes codecs.json, codecs.md and codecs.png into --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from _common import (copy_bandwidth, environment, gb_per_s, grouped_bar_plot, markdown_table, median_ms,
                     write_json)
from lowbit_compile import formats as F
from lowbit_compile.templates import codecs as C

FORMATS = [F.Q8(True), F.Q8(False), F.Q4(True), F.Q4(False), F.Q4(map="linear2")]
# (elements per program, warps); (None, None) is the library's default for the format, the one the table reports.
SWEEP = [(None, None), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16)]


def sample_values(numel: int, fmt: F.Quantized, seed: int, device) -> torch.Tensor:
    """Optimizer-state-like values: normal noise over four decades of magnitude (non-negative for unsigned)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(numel, generator=gen, device=device)
    x *= torch.pow(10.0, -4 * torch.rand(numel, generator=gen, device=device))
    return x.abs_() if not fmt.signed else x


def check_correctness(fmt: F.Quantized, numel: int, device) -> dict:
    x = sample_values(numel, fmt, 1, device)
    want_codes, want_absmax = F.encode(x, fmt)
    codes = ((want_codes.int() + 1) % 256).to(torch.uint8)      # poison: wrong everywhere
    absmax = torch.full_like(want_absmax, float("nan"))
    C.quantize_into(x, codes, absmax, fmt)
    out = torch.full_like(x, float("nan"))
    C.dequantize_into(want_codes, want_absmax, fmt, out)
    result = {"numel": numel, "codes_equal": bool(torch.equal(codes, want_codes)),
              "absmax_equal": bool(torch.equal(absmax, want_absmax)),
              "decoded_equal": bool(torch.equal(out, F.decode(want_codes, want_absmax, fmt, numel)))}
    result["ok"] = result["codes_equal"] and result["absmax_equal"] and result["decoded_equal"]
    return result


def check_every_float_in_unit_interval(fmt: F.Quantized, device, stride: int = 1) -> dict:
    """Code of every ``stride``-th float32 in [-1, 1] (both signs, from bit patterns) vs searchsorted."""
    midpoints = fmt.midpoints.to(device)
    one = 0x3F800000
    chunk = 1 << 27
    checked = mismatches = 0
    for sign in (0, -(2**31)):
        for start in range(0, one + 1, chunk * stride):
            bits = torch.arange(start, min(start + chunk * stride, one + 1), stride, dtype=torch.int32,
                                device=device)
            y = (bits + sign).view(torch.float32)
            mismatches += int((C.encode_normalized(y, fmt) != torch.searchsorted(midpoints, y).to(torch.uint8)).sum())
            checked += y.numel()
    return {"checked": checked, "mismatches": mismatches, "ok": mismatches == 0}


def bnb_functions(fmt: F.Quantized, device):
    """bitsandbytes' blockwise 8-bit kernels for ``fmt``'s map, or a string saying why there are none."""
    if fmt.bits != 8 or fmt.block != 256:
        return "bitsandbytes has no blockwise kernel for this format"
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        return f"bitsandbytes not importable: {err}"
    code = bnb.functional.create_dynamic_map(signed=fmt.signed).to(device)

    def quantize(x):
        return torch.ops.bitsandbytes.quantize_blockwise.default(x, code, fmt.block)

    def dequantize(codes, absmax, out):
        torch.ops.bitsandbytes.dequantize_blockwise.out(codes, absmax, code, fmt.block, torch.float32, out=out)

    return {"version": bnb.__version__, "quantize": quantize, "dequantize": dequantize, "code": code}


def time_format(fmt: F.Quantized, numel: int, device, copy_gbs: float, sweep) -> dict:
    x = sample_values(numel, fmt, 2, device)
    codes = torch.empty(fmt.num_code_bytes(numel), dtype=torch.uint8, device=device)
    absmax = torch.empty(fmt.num_blocks(numel), dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    nbytes = 4 * numel + codes.numel() + 4 * absmax.numel()
    row = {"format": fmt.spec, "numel": numel, "bytes": nbytes, "sweep": []}
    for elements, warps in sweep:
        launch = {"elements_per_program": elements, "num_warps": warps}
        q = median_ms(lambda: C.quantize_into(x, codes, absmax, fmt, **launch))
        d = median_ms(lambda: C.dequantize_into(codes, absmax, fmt, out, **launch))
        row["sweep"].append({"elements_per_program": elements, "num_warps": warps,
                             "quantize": {**q, "gb_per_s": gb_per_s(nbytes, q["ms"])},
                             "dequantize": {**d, "gb_per_s": gb_per_s(nbytes, d["ms"])}})
    default = row["sweep"][0]
    row["quantize_gbs"] = default["quantize"]["gb_per_s"]
    row["dequantize_gbs"] = default["dequantize"]["gb_per_s"]
    row["quantize_ms"] = default["quantize"]["ms"]
    row["dequantize_ms"] = default["dequantize"]["ms"]
    row["quantize_copy_fraction"] = row["quantize_gbs"] / copy_gbs
    row["dequantize_copy_fraction"] = row["dequantize_gbs"] / copy_gbs
    for op in ("quantize", "dequantize"):
        best = max(row["sweep"][1:], key=lambda s: s[op]["gb_per_s"])
        row[f"best_{op}"] = f"{best['elements_per_program']}/{best['num_warps']}w {best[op]['gb_per_s']:.0f}"

    bnb = bnb_functions(fmt, device)
    if isinstance(bnb, str):
        row["bnb"] = bnb
        return row
    bnb_codes, bnb_absmax = bnb["quantize"](x)
    q = median_ms(lambda: bnb["quantize"](x))
    d = median_ms(lambda: bnb["dequantize"](bnb_codes, bnb_absmax, out))
    row["bnb"] = {"version": bnb["version"], "quantize": q, "dequantize": d}
    row["bnb_quantize_gbs"] = gb_per_s(nbytes, q["ms"])
    row["bnb_dequantize_gbs"] = gb_per_s(nbytes, d["ms"])
    row["quantize_vs_bnb"] = row["quantize_gbs"] / row["bnb_quantize_gbs"]
    row["dequantize_vs_bnb"] = row["dequantize_gbs"] / row["bnb_dequantize_gbs"]
    # How often bitsandbytes' nearest-code search picks a different code than the reference (informational:
    # bnb does not stretch negative-extreme blocks and breaks ties its own way).
    head = x[: 1 << 22]
    bnb_head_codes = bnb["quantize"](head)[0].view(-1)
    row["bnb_codes_equal_fraction"] = float((bnb_head_codes == F.encode(head, fmt)[0]).float().mean())
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="directory for codecs.*")
    parser.add_argument("--numel", type=int, default=1 << 28, help="elements timed per format (default 256M)")
    parser.add_argument("--check-numel", type=int, default=1 << 24, help="elements of the correctness slice")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and a sparse unit-interval check, to test the script itself (e.g. on CPU)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stride, sweep = 1, SWEEP
    if args.smoke:
        args.numel, args.check_numel, stride, sweep = 8192 + 17, 4096 + 5, 1 << 20, SWEEP[:2]
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    print("environment:", env, flush=True)

    checks = {}
    for fmt in FORMATS:
        checks[fmt.spec] = {"slice": check_correctness(fmt, args.check_numel, device)}
        if fmt.bits == 8:
            checks[fmt.spec]["every_float32_in_unit_interval"] = check_every_float_in_unit_interval(fmt, device, stride)
        print("correctness", fmt.spec, checks[fmt.spec], flush=True)
    if not all(part["ok"] for check in checks.values() for part in check.values()):
        write_json(os.path.join(args.out, "codecs.json"), {"environment": env, "correctness": checks})
        print("CORRECTNESS FAILED: not timing", flush=True)
        return 1

    copy = copy_bandwidth(device=device) if not args.smoke else copy_bandwidth(1 << 16, device)
    print(f"d2d copy bandwidth (read+write): {copy['gb_per_s']:.0f} GB/s", flush=True)
    rows = []
    for fmt in FORMATS:
        rows.append(time_format(fmt, args.numel, device, copy["gb_per_s"], sweep))
        print("timed", {k: v for k, v in rows[-1].items() if k != "sweep"}, flush=True)

    columns = [("format", "format", "s"), ("quantize_gbs", "quantize GB/s", ".0f"),
               ("quantize_copy_fraction", "of copy", ".0%"), ("bnb_quantize_gbs", "bnb quantize GB/s", ".0f"),
               ("quantize_vs_bnb", "vs bnb", ".2f"), ("dequantize_gbs", "dequantize GB/s", ".0f"),
               ("dequantize_copy_fraction", "of copy", ".0%"), ("bnb_dequantize_gbs", "bnb dequantize GB/s", ".0f"),
               ("dequantize_vs_bnb", "vs bnb", ".2f"), ("best_quantize", "best q (elem/warps GB/s)", "s"),
               ("best_dequantize", "best dq", "s")]
    table = markdown_table(rows, columns)
    launch = ", ".join(f"{kernel} {bits}-bit {e}/{w}" for (kernel, bits), (e, w) in C._LAUNCH.items())
    header = (f"# Triton block codecs vs bitsandbytes\n\n{env.get('device')}, torch {env['torch']}, "
              f"triton {env['triton']}, {env['date']}. {args.numel} fp32 elements per format; GB/s counts fp32 "
              f"values + codes + fp32 scales, read + written. Device-to-device copy: {copy['gb_per_s']:.0f} GB/s. "
              f"Median of 3 do_bench medians with the library's default launch (elements / warps per program: "
              f"{launch}); the last columns give the best of the swept launches.\n\n"
              f"Correctness on the device before timing: codes, absmax and "
              f"decoded values identical to lowbit_compile.formats on {args.check_numel} elements per format; "
              f"8-bit encoders identical to searchsorted on every {'' if stride == 1 else f'{stride}-th '}"
              f"float32 in [-1, 1].\n\n")
    with open(os.path.join(args.out, "codecs.md"), "w") as f:
        f.write(header + table + "\n")
    write_json(os.path.join(args.out, "codecs.json"),
               {"environment": env, "copy": copy, "correctness": checks, "results": rows})
    categories = [r["format"] for r in rows]
    grouped_bar_plot(
        os.path.join(args.out, "codecs.png"), f"Block codecs, {args.numel} fp32 elements, {env.get('device')}",
        categories,
        {"quantize (ours)": [r["quantize_gbs"] for r in rows],
         "quantize (bnb)": [r.get("bnb_quantize_gbs") for r in rows],
         "dequantize (ours)": [r["dequantize_gbs"] for r in rows],
         "dequantize (bnb)": [r.get("bnb_dequantize_gbs") for r in rows]},
        "GB/s (read + write)", reference=(copy["gb_per_s"], "d2d copy"))
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
