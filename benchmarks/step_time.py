"""Optimizer step time against the bytes floor, ours and the anchors, in one run on one GPU.

    python3 benchmarks/step_time.py --out DIR          # on the H100: writes DIR/step_time.{json,md,png}
    python3 benchmarks/step_time.py --cpu-smoke --out DIR   # tiny shapes on the CPU: checks this script's logic

Workloads: (a) 64 x 4096x4096 parameters (1.07B) with fp32 and with bf16 params/grads; (b) the parameter list of
a GPT-2-124M-shaped model (148 tensors, most of them small). Optimizers: torch AdamW fused (state in the param dtype),
bitsandbytes AdamW8bit, torchao AdamW8bit / AdamW4bit, and ours, ``lowbit_compile.optim.AdamW(bits=32|8|4)``
with ``torch.compile(opt.step, backend="lowbit")``. One row per pair; an optimizer that cannot be built or run
gives a row that says why instead of ending the run.

Per row: ms/step back-to-back (steps enqueued without synchronising, CUDA events around a run of them: the GPU's
time per step when the host runs ahead, as in training) and alone (each step timed by itself after the GPU drained,
so the host's time before the first launch counts too), optimizer-state bytes/param (counted from the state
tensors), bytes one step must move at least (params and state read and written once, grads read once), the
achieved GB/s over those bytes (back-to-back), the ratio to the bytes floor (those bytes / the device-to-device
copy bandwidth measured in this run, reads plus writes), compile seconds (first step minus a typical one), CUDA
kernel launches in one step (torch.profiler), and the relative error of the first step's update against the exact fp32 AdamW
update, so a fast optimizer that does not update is caught.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout without installing

from benchmarks._common import back_to_back_ms, cuda_event_ms, synchronize  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 1e-2


# --------------------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------------------
def gpt2_shapes(vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 (HF Conv1D layout: weights are in x out), the LM head tied to ``wte``.
    The defaults give GPT-2 124M: 148 tensors, 124,439,808 parameters."""
    layer = [(width,), (width,),                          # ln_1 weight, bias
             (width, 3 * width), (3 * width,),            # attn.c_attn
             (width, width), (width,),                    # attn.c_proj
             (width,), (width,),                          # ln_2
             (width, 4 * width), (4 * width,),            # mlp.c_fc
             (4 * width, width), (width,)]                # mlp.c_proj
    return [(vocab, width), (context, width), *layer * layers, (width,), (width,)]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def workloads(cpu_smoke: bool) -> list[Workload]:
    """In the order they run: what the issue's acceptance needs first, so a time-out costs the least."""
    if cpu_smoke:
        big, gpt2 = ((64, 64),) * 8, tuple(gpt2_shapes(vocab=256, context=32, width=32, layers=2))
        return [Workload("8 x 64x64 fp32", big, torch.float32), Workload("GPT-2-shaped tiny fp32", gpt2, torch.float32),
                Workload("8 x 64x64 bf16", big, torch.bfloat16)]
    big, gpt2 = ((4096, 4096),) * 64, tuple(gpt2_shapes())
    return [Workload("64 x 4096x4096 fp32", big, torch.float32), Workload("GPT-2 124M fp32", gpt2, torch.float32),
            Workload("64 x 4096x4096 bf16", big, torch.bfloat16)]


# --------------------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    compile_mode: str | None = None  # torch.compile(opt.step, backend="lowbit", mode=...) when not None
    needs_cuda: bool = False
    only_many_tensors: bool = False  # worth a row only where launch overhead matters (the GPT-2 list)

    @property
    def compiled(self) -> bool:
        return self.compile_mode is not None


def _torch_fused(params):
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)


def _bnb_adamw8bit(params):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def _torchao(cls_name: str):
    def build(params):
        import torchao.optim

        return getattr(torchao.optim, cls_name)(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    return build


def _ours(bits: int):
    def build(params):
        from lowbit_compile import optim

        return optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, bits=bits)
    return build


CONTENDERS = [
    Contender("torch AdamW fused", _torch_fused),
    Contender("lowbit AdamW 8-bit", _ours(8), compile_mode="default"),
    Contender("lowbit AdamW 4-bit", _ours(4), compile_mode="default"),
    Contender("bitsandbytes AdamW8bit", _bnb_adamw8bit, needs_cuda=True),
    Contender("lowbit AdamW 32-bit", _ours(32), compile_mode="default"),
    Contender("lowbit AdamW 8-bit reduce-overhead", _ours(8), compile_mode="reduce-overhead", needs_cuda=True,
              only_many_tensors=True),
    Contender("torchao AdamW8bit", _torchao("AdamW8bit"), needs_cuda=True),
    Contender("torchao AdamW4bit", _torchao("AdamW4bit"), needs_cuda=True),
]


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], object], device: torch.device, target_s: float, min_reps: int,
               max_reps: int = 200) -> list[float]:
    """Milliseconds of each of many calls after warm-up: CUDA events on the GPU, the host clock on the CPU."""
    for _ in range(3):
        fn()
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    reps = int(min(max_reps, max(min_reps, target_s / max(time.perf_counter() - started, 1e-6))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            times.append(cuda_event_ms(fn))
        else:
            begin_s = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin_s))
    return times


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy rate, bytes read plus bytes written: the ceiling for a pass over memory."""
    numel = (2 * 1024**3 if device.type == "cuda" else 64 * 1024**2) // 4
    source = torch.rand(numel, device=device)
    target = torch.empty_like(source)
    ms = statistics.median(time_calls(lambda: target.copy_(source), device, target_s=1.0, min_reps=10))
    del source, target
    return 2 * numel * 4 / (ms / 1e3) / 1e9


def tensor_bytes(tensors, seen: set[int]) -> int:
    """Bytes of distinct storages among ``tensors``, looking inside tensor subclasses (torchao's quantized state);
    storages already in ``seen`` (a codebook shared by all parameters, say) count once."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            total += tensor_bytes([getattr(t, name) for name in names], seen)
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    return sum(tensor_bytes(per_param.values(), seen) for per_param in opt.state.values())


def kernel_launches(step: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """(kernels, memcpy/memset operations) the device runs for one step, from a torch.profiler trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        synchronize(device)
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = sum(1 for e in device_events if e.name.startswith(("Memcpy", "Memset")))
    return len(device_events) - copies, copies


def adamw_first_update(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The change of ``p`` that exact AdamW makes at step 1 (bias-corrected moments are g and g**2), after rounding
    the new ``p`` to its own dtype, so a bf16 parameter's rounding is not counted as the optimizer's error."""
    exact = p.double() * (1 - LR * WEIGHT_DECAY) - LR * g.double() / (g.double().abs() + EPS)
    return exact.to(p.dtype).double() - p.double()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


@dataclasses.dataclass
class Row:
    workload: str
    optimizer: str
    status: str  # "ok", "failed: <error>" or "skipped: <why>"
    numel: int = 0
    ms_median: float | None = None  # each step alone: the host's time before its first launch counts
    ms_min: float | None = None
    ms_max: float | None = None
    reps: int | None = None
    ms_back_to_back: float | None = None  # median of runs of steps enqueued without synchronising
    back_to_back_steps: int | None = None
    first_step_s: float | None = None
    compile_s: float | None = None
    state_bytes_per_param: float | None = None
    allocated_bytes_per_param: float | None = None  # device memory the optimizer added, whatever it holds
    moved_bytes_per_param: float | None = None
    floor_ms: float | None = None
    achieved_gbs: float | None = None  # over the back-to-back time
    ratio_to_floor: float | None = None  # back-to-back time / floor
    ratio_alone_to_floor: float | None = None
    kernel_launches: int | None = None
    memcpy_memset: int | None = None
    update_rel_err_first: float | None = None  # first (largest) tensor
    update_rel_err_last: float | None = None  # last tensor (small: kept in fp32 state by the 8/4-bit optimizers)
    error_trace: str | None = None


def measure(workload: Workload, contender: Contender, device: torch.device, bandwidth_gbs: float,
            target_s: float, min_reps: int) -> Row:
    row = Row(workload.name, contender.name, "ok", numel=workload.numel)
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in workload.shapes:
        p = torch.nn.Parameter(
            (torch.randn(shape, device=device, generator=generator) * 0.02).to(workload.dtype))
        p.grad = (torch.randn(shape, device=device, generator=generator) * 1e-3).to(workload.dtype)
        params.append(p)
    checked = {"first": 0, "last": len(params) - 1}
    before = {k: params[i].detach().clone() for k, i in checked.items()}
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None

    opt = contender.build(params)
    step = opt.step
    if contender.compiled:
        step = torch.compile(opt.step, backend="lowbit", mode=contender.compile_mode)
    started = time.perf_counter()
    step()
    synchronize(device)
    row.first_step_s = time.perf_counter() - started
    if allocated_before is not None:
        row.allocated_bytes_per_param = (torch.cuda.memory_allocated(device) - allocated_before) / workload.numel
    state = optimizer_state_bytes(opt)
    row.state_bytes_per_param = state / workload.numel

    for key, index in checked.items():
        expected = adamw_first_update(before[key], params[index].grad)
        actual = params[index].detach().double() - before[key].double()
        setattr(row, f"update_rel_err_{key}", relative_error(actual, expected))
    del before, expected, actual

    times = time_calls(step, device, target_s, min_reps)
    row.ms_median, row.ms_min, row.ms_max, row.reps = statistics.median(times), min(times), max(times), len(times)
    if contender.compiled:
        row.compile_s = max(0.0, row.first_step_s - row.ms_median / 1e3)

    param_bytes = sum(p.numel() * p.element_size() for p in params)
    moved = 3 * param_bytes + 2 * state  # params read + written, grads (same dtype) read, state read + written
    row.moved_bytes_per_param = moved / workload.numel
    row.back_to_back_steps = max(3, min(50, len(times) // 3))
    row.ms_back_to_back = statistics.median(back_to_back_ms(step, device, row.back_to_back_steps))
    row.floor_ms = moved / (bandwidth_gbs * 1e9) * 1e3
    row.achieved_gbs = moved / (row.ms_back_to_back / 1e3) / 1e9
    row.ratio_to_floor = row.ms_back_to_back / row.floor_ms
    row.ratio_alone_to_floor = row.ms_median / row.floor_ms
    if device.type == "cuda":
        try:
            row.kernel_launches, row.memcpy_memset = kernel_launches(step, device)
            if row.kernel_launches == 0:  # every step launches something: the profiler saw nothing
                row.status = "ok (profiler recorded no CUDA kernels)"
        except Exception as error:  # a broken profiler must not hide the timing
            row.status = f"ok (profiler failed: {type(error).__name__}: {error})"[:300]
    return row


def measured_row(workload: Workload, contender: Contender, device: torch.device, bandwidth: float, target_s: float,
                 min_reps: int) -> Row:
    """``measure``, or a row that says why it failed; device memory released after either."""
    try:
        row = measure(workload, contender, device, bandwidth, target_s, min_reps)
    except Exception as error:
        row = Row(workload.name, contender.name, f"failed: {type(error).__name__}: {error}"[:300],
                  error_trace=traceback.format_exc()[-4000:])
    release(device)
    return row


def print_row(row: Row) -> None:
    print(json.dumps({k: v for k, v in dataclasses.asdict(row).items() if k != "error_trace"}), flush=True)


@contextlib.contextmanager
def launched_as(shape):
    """The fused kernel launched with ``fused_update.LaunchShape`` ``shape`` for every state width while the block
    runs (kernels compiled before or inside it are dropped: their pointer tables are laid out per tile size)."""
    from lowbit_compile.templates import fused_update

    default = dict(fused_update.GPU_LAUNCH_SHAPES)
    fused_update.GPU_LAUNCH_SHAPES.update({bits: shape for bits in default})
    fused_update._KERNELS.clear()
    try:
        yield
    finally:
        fused_update.GPU_LAUNCH_SHAPES.update(default)
        fused_update._KERNELS.clear()


def tile_sweep(device: torch.device, bandwidth: float, shapes: list, target_s: float, min_reps: int) -> list[Row]:
    """Our 8-bit and 4-bit AdamW on the first workload with each ``fused_update.LaunchShape`` of the fused kernel:
    the data behind ``GPU_LAUNCH_SHAPES``."""
    workload = workloads(cpu_smoke=device.type != "cuda")[0]
    rows = []
    for shape in shapes:
        for contender in CONTENDERS:
            if contender.name not in ("lowbit AdamW 8-bit", "lowbit AdamW 4-bit"):
                continue
            named = dataclasses.replace(contender, name=f"{contender.name} [launch {shape}]")
            with launched_as(shape):
                rows.append(measured_row(workload, named, device, bandwidth, target_s, min_reps))
            print_row(rows[-1])
    return rows


def release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_all(device: torch.device, cpu_smoke: bool, budget_s: float, target_s: float, min_reps: int,
            only_workloads: list[str] | None, only_optimizers: list[str] | None) -> tuple[float, list[Row]]:
    deadline = time.perf_counter() + budget_s
    bandwidth = copy_bandwidth_gbs(device)
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s", flush=True)
    rows: list[Row] = []
    for workload in workloads(cpu_smoke):
        if only_workloads and not any(w in workload.name for w in only_workloads):
            continue
        for contender in CONTENDERS:
            if only_optimizers and not any(o in contender.name for o in only_optimizers):
                continue
            if contender.only_many_tensors and len(set(workload.shapes)) == 1:
                continue
            if contender.needs_cuda and device.type != "cuda":
                row = Row(workload.name, contender.name, "skipped: needs CUDA")
            elif time.perf_counter() > deadline:
                row = Row(workload.name, contender.name, f"skipped: time budget of {budget_s:.0f} s spent")
            else:
                row = measured_row(workload, contender, device, bandwidth, target_s, min_reps)
            rows.append(row)
            print_row(row)
    return bandwidth, rows


# --------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(meta: dict, rows: list[Row]) -> str:
    lines = [f"# Optimizer step time — {meta['device_name']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, bitsandbytes {meta['bitsandbytes']}, "
             f"torchao {meta['torchao']}; {meta['date']}. Copy bandwidth measured in this run (read + write): "
             f"{meta['copy_bandwidth_gbs']:.0f} GB/s.", "",
             "ms/step back-to-back: median of 5 runs of N steps enqueued without synchronising, CUDA events around "
             "the N (the GPU's time per step when the host runs ahead, as in training, where a step's host work "
             "overlaps the backward pass; a host-bound step measures the host). Alone: median over many steps each "
             "timed by itself after the GPU drained, so the host's time before the first launch counts too. "
             "Floor: the bytes one step must move "
             "(params read+written, grads read, optimizer state read+written, all once) over the copy bandwidth; "
             "GB/s and × floor use the back-to-back time. "
             "Compile s: first step minus a typical one. Launches: CUDA kernels (+ memcpy/memset) in one step "
             "(torch.profiler). Update err: ‖Δp − Δp_AdamW‖/‖Δp_AdamW‖ of the first step (exact AdamW, "
             "new p rounded to the param dtype), first and last tensor.",
             ""]
    header = ("optimizer", "ms/step back-to-back", "× floor", "ms/step alone", "alone min–max", "alone × floor",
              "state B/param", "moved B/param", "floor ms", "GB/s", "compile s", "launches", "update err", "status")
    for workload in dict.fromkeys(r.workload for r in rows):
        numel = next((r.numel for r in rows if r.workload == workload and r.numel), 0)
        lines += [f"## {workload}" + (f" ({numel:,} params)" if numel else ""), "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in (r for r in rows if r.workload == workload):
            spread = f"{_fmt(r.ms_min)}–{_fmt(r.ms_max)}" if r.ms_min is not None else "-"
            launches = "-" if r.kernel_launches is None else f"{r.kernel_launches} (+{r.memcpy_memset})"
            errors = "-" if r.update_rel_err_first is None else \
                f"{r.update_rel_err_first:.1e} / {r.update_rel_err_last:.1e}"
            lines.append("| " + " | ".join([
                r.optimizer, _fmt(r.ms_back_to_back, 3), _fmt(r.ratio_to_floor), _fmt(r.ms_median, 3), spread,
                _fmt(r.ratio_alone_to_floor), _fmt(r.state_bytes_per_param, 3), _fmt(r.moved_bytes_per_param),
                _fmt(r.floor_ms, 3), _fmt(r.achieved_gbs, 0), _fmt(r.compile_s, 1), launches, errors,
                r.status.replace("|", "/")]) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.workload for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.8), squeeze=False)
    for ax, workload in zip(axes[0], names):
        measured = [r for r in rows if r.workload == workload and r.ms_back_to_back is not None]
        labels = [r.optimizer for r in measured]
        ax.barh(labels, [r.ms_back_to_back for r in measured], color="tab:blue", label="ms/step back-to-back")
        ax.scatter([r.ms_median for r in measured], labels, color="tab:orange", marker="o", s=18, zorder=3,
                   label="ms/step alone")
        ax.scatter([r.floor_ms for r in measured], labels, color="black", marker="|", s=300, zorder=3,
                   label="bytes floor")
        for y, r in enumerate(measured):
            ax.annotate(f" {r.ms_back_to_back:.2f} ({r.ratio_to_floor:.1f}×)",
                        (max(r.ms_back_to_back, r.ms_median), y), va="center", fontsize=8)
        ax.set(title=workload, xlabel="ms per optimizer step")
        ax.set_xlim(0, 1.45 * max([max(r.ms_median, r.ms_back_to_back) for r in measured], default=1.0))
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as error:
        return f"unavailable ({type(error).__name__})"


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU, skipping anchors that need CUDA: tests this script's logic")
    parser.add_argument("--budget-s", type=float, default=380.0,
                        help="start no new measurement after this many seconds (rows after it say so)")
    parser.add_argument("--target-s", type=float, default=1.5, help="seconds of timed steps per row")
    parser.add_argument("--min-reps", type=int, default=10, help="timed steps per row at least")
    parser.add_argument("--workloads", help="comma-separated substrings of workload names to run (default: all)")
    parser.add_argument("--optimizers", help="comma-separated substrings of optimizer names to run (default: all)")
    parser.add_argument("--tile-sweep", default="",
                        help="comma-separated ELEMENTSxWARPSxTILES[xREGISTERS] fused-kernel launch shapes to time "
                             "after the main table (e.g. 1024x4x1,1024x8x8x64)")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny tensors: a second OpenMP thread only adds spin-waiting to the timings
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: run on the GPU machine, or pass --cpu-smoke")
    import lowbit_compile.backend  # noqa: F401  (registers backend="lowbit")

    started = time.perf_counter()
    bandwidth, rows = run_all(device, args.cpu_smoke, args.budget_s, args.target_s, args.min_reps,
                              args.workloads.split(",") if args.workloads else None,
                              args.optimizers.split(",") if args.optimizers else None)
    if args.tile_sweep:
        from lowbit_compile.templates.fused_update import LaunchShape
        shapes = [LaunchShape.parse(item) for item in args.tile_sweep.split(",")]
        rows += tile_sweep(device, bandwidth, shapes, args.target_s, args.min_reps)
    meta = dict(device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                or "cpu", torch=torch.__version__, triton=_version("triton"), bitsandbytes=_version("bitsandbytes"),
                torchao=_version("torchao"), python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), copy_bandwidth_gbs=bandwidth, cpu_smoke=args.cpu_smoke,
                wall_s=time.perf_counter() - started, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_time.json").write_text(json.dumps(dict(meta=meta, rows=[dataclasses.asdict(r) for r in rows]),
                                                        indent=1))
    report = markdown(meta, rows)
    (args.out / "step_time.md").write_text(report)
    plot(rows, args.out / "step_time.png", f"optimizer step time vs bytes floor — {meta['device_name']}, "
                                           f"torch {meta['torch']}")
    print(report)
    print(f"wrote {args.out}/step_time.{{json,md,png}} in {meta['wall_s']:.0f} s")
    return rows


if __name__ == "__main__":
    main()
