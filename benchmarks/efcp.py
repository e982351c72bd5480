"""EFCP (error-feedback compressed M-FAC / GGT): state bytes/param and step time on one GPU, next to the fp32
dense-index reference layout; plus a CPU-sized training run that picks the error-feedback format.

    python3 benchmarks/efcp.py --out DIR              # on the H100: DIR/efcp.{json,md,png}
    python3 benchmarks/efcp.py --cpu-smoke --out DIR  # tiny sizes on the CPU: checks this script's logic
    python3 benchmarks/efcp.py --quality --out DIR    # DIR/efcp.quality.{json,md}: EF formats on a small MLP (CPU)

Speed rows (m = 1024, density 1 %, damping 1e-6, d = 11.7M and 110M parameters, fp32 params in 1M-element tensors):

* ``lowbit EFMFAC`` with each error-feedback format: ``ms/step`` (CUDA events, median), state bytes/param (every
  state tensor; the fp32 gradient workspace is listed apart), the time of the two ring passes (``ring_dots`` +
  ``ring_combine_update_``) and its ratio to their bytes floor (the ring read twice at the measured copy bandwidth).
* ``reference fp32 dense-index``: this file's pure-torch implementation of the reference semantics in the EFCP
  reference layout (int64 global indices + fp32 values, fp32 error feedback, the same block top-k and Woodbury
  core, the ring passes as gathers and ``index_add_`` over chunks of rows).
* ``ista-daslab-optimizers``: measured only if it imports on the machine (it needs a CUDA build at install time).

The ring is pre-filled with random entries (a full window, as after m steps) so timings see a full ring. One step of
``EFMFAC`` is then captured in a CUDA graph and replayed: its result must equal an eager step from the same state
(0 host syncs; the eager step also runs under ``torch.cuda.set_sync_debug_mode("error")``).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from step_time import _version, copy_bandwidth_gbs, kernel_launches, time_calls  # noqa: E402

RESNET18, BERT_BASE = 11_689_512, 109_482_240
M, DENSITY, DAMPING, LR = 1024, 0.01, 1e-6, 1e-6
EF_FORMATS = ("Q8", "Q4", "BF16", "F32")


def ef_format(name: str):
    import lowbit_compile as lbc

    return getattr(lbc, name)()


# --------------------------------------------------------------------------------------------------------------
# The reference layout (pure torch): int64 global indices + fp32 values, fp32 error feedback
# --------------------------------------------------------------------------------------------------------------
class DenseIndexEFMFAC:
    """EF + block top-k + sparse M-FAC (Woodbury core) with the EFCP reference's storage: ``index`` int64 [m, K]
    global positions, ``values`` fp32 [m, K], fp32 error feedback; ``K = k * num_blocks``."""

    def __init__(self, params, lr, m, density, damping, block=4096, rows_per_chunk=64):
        from lowbit_compile.templates.efcp import entries_per_block

        self.params, self.lr, self.m, self.damping = list(params), lr, m, damping
        self.numel = sum(p.numel() for p in self.params)
        self.block, self.k = block, entries_per_block(density, block)
        self.num_blocks = -(-self.numel // block)
        device = self.params[0].device
        self.error = torch.zeros(self.num_blocks * block, device=device)
        self.index = torch.zeros(m, self.num_blocks * self.k, dtype=torch.int64, device=device)
        self.values = torch.zeros(m, self.num_blocks * self.k, device=device)
        self.gram = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.head = torch.zeros((), dtype=torch.int64, device=device)
        self.rows_per_chunk = rows_per_chunk

    def state_tensors(self):
        return [self.error, self.index, self.values, self.gram, self.head]

    @torch.no_grad()
    def step(self):
        from lowbit_compile.optim.efcp import mfac_coefficients

        g = torch.zeros_like(self.error)
        g[: self.numel] = torch.cat([p.grad.reshape(-1) for p in self.params])
        a = (self.error + g).view(self.num_blocks, self.block)
        top = a.abs().topk(self.k, dim=1).indices
        index = (top + torch.arange(self.num_blocks, device=a.device)[:, None] * self.block).reshape(-1)
        values = a.reshape(-1)[index]
        self.error.copy_(a.reshape(-1)).index_fill_(0, index, 0.0)
        slot = self.head.view(1)
        self.index.index_copy_(0, slot, index[None])
        self.values.index_copy_(0, slot, values[None])
        c = torch.zeros_like(self.error).index_copy_(0, index, values)
        dots = torch.cat([(self.values[r: r + self.rows_per_chunk] * c[self.index[r: r + self.rows_per_chunk]])
                          .sum(1, dtype=torch.float64) for r in range(0, self.m, self.rows_per_chunk)])
        self.gram.index_copy_(0, slot, dots[None]).index_copy_(1, slot, dots[:, None])
        alpha, u_scale = mfac_coefficients(self.gram, dots, torch.tensor(self.damping, device=a.device))
        alpha = alpha.float()
        for r in range(0, self.m, self.rows_per_chunk):
            rows = slice(r, r + self.rows_per_chunk)
            c.index_add_(0, self.index[rows].reshape(-1), (self.values[rows] * alpha[rows, None]).reshape(-1))
        offset = 0
        for p in self.params:
            p.sub_(c[offset: offset + p.numel()].view_as(p) * (u_scale * self.lr))
            offset += p.numel()
        self.head.add_(1).remainder_(self.m)

    def prefill(self, generator):
        for r in range(0, self.m, self.rows_per_chunk):
            rows = min(self.rows_per_chunk, self.m - r)
            rel = torch.randint(0, self.block, (rows, self.num_blocks, self.k), device=self.error.device,
                                generator=generator).sort(dim=-1).values
            starts = torch.arange(self.num_blocks, device=self.error.device)[None, :, None] * self.block
            self.index[r: r + rows] = (rel + starts).reshape(rows, -1)
            self.values[r: r + rows] = torch.randn(rows, self.index.shape[1], device=self.error.device,
                                                   generator=generator) * 1e-3
        self.gram.copy_(torch.eye(self.m, dtype=torch.float64, device=self.error.device))


# --------------------------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------------------------
def prefill_ring(opt, generator) -> None:
    """Fill every slot of every top-k group's ring with random sorted block-relative entries."""
    for group in opt.param_groups:
        state = opt.state[group["params"][0]]
        layout = opt._flat_groups[group["params"][0]].layout
        chunk = max(1, (1 << 27) // (layout.num_blocks * layout.k))
        for first in range(0, layout.m, chunk):
            slots = slice(first, min(layout.m, first + chunk))
            n = slots.stop - slots.start
            rel = torch.randint(0, layout.block, (layout.num_blocks, n, layout.k), device=state["head"].device,
                                generator=generator, dtype=torch.int32).sort(dim=-1).values
            state["ring.index_low"][:, slots] = (rel & 255).to(torch.uint8)
            high = rel >> 8
            if layout.k % 2:
                high = torch.cat((high, torch.zeros_like(high[..., :1])), dim=-1)
            state["ring.index_high"][:, slots] = (high[..., 0::2] | (high[..., 1::2] << 4)).to(torch.uint8)
            state["ring.codes"][:, slots] = torch.randint(0, 256, rel.shape, device=rel.device, generator=generator,
                                                          dtype=torch.int32).to(torch.uint8)
        state["ring.scale"].copy_(torch.rand(state["ring.scale"].shape, device=rel.device, generator=generator) * 1e-3)
        state["gram"].copy_(torch.eye(layout.m, dtype=torch.float64, device=rel.device))


def make_params(numel: int, device, generator, dtype=torch.float32, piece: int = 1 << 20):
    sizes = [piece] * (numel // piece) + ([numel % piece] if numel % piece else [])
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, device=device, generator=generator, dtype=dtype) * 0.02)
        p.grad = torch.randn(n, device=device, generator=generator, dtype=dtype) * 1e-3
        params.append(p)
    return params


def _snapshot(opt):
    tensors = [t for s in opt.state.values() for t in s.values()] + [f.flat for f in opt._flat_groups.values()]
    return tensors, [t.clone() for t in tensors]


def graph_check(opt, device) -> dict:
    """Run one eager step under sync-debug mode "error"; if it does not synchronise, capture one step in a CUDA
    graph, replay it, and compare with an eager step from the same state."""
    result = {}
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        torch.cuda.synchronize()
        result["sync_debug_error_mode"] = "no synchronizing call"
    except RuntimeError as error:
        result["sync_debug_error_mode"] = f"raised: {error}"[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if result["sync_debug_error_mode"] != "no synchronizing call":
        result["captured"] = False
        return result
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    tensors, start = _snapshot(opt)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in tensors]
    for t, s in zip(tensors, start):
        t.copy_(s)
    opt.step()
    torch.cuda.synchronize()
    exact, max_rel = True, 0.0
    for t, r in zip(tensors, replayed):
        if t.is_floating_point():
            scale = float(t.double().abs().max().clamp_min(1e-30))
            max_rel = max(max_rel, float((t.double() - r.double()).abs().max()) / scale)
        else:
            exact &= bool(torch.equal(t, r))
    result.update(captured=True, integer_state_equal=exact, float_max_rel_diff=max_rel,
                  replay_changed_state=any(not torch.equal(r, s) for r, s in zip(replayed, start)))
    result["graph_ms"] = statistics.median(time_calls(graph.replay, device, target_s=1.0, min_reps=10))
    return result


@dataclasses.dataclass
class Row:
    optimizer: str
    numel: int
    status: str = "ok"
    ms_median: float | None = None
    ms_min: float | None = None
    state_bytes_per_param: float | None = None
    workspace_bytes_per_param: float | None = None
    ring_passes_ms: float | None = None
    ring_floor_ms: float | None = None
    ring_ratio_to_floor: float | None = None
    compress_ms: float | None = None
    kernel_launches: int | None = None
    graph: dict | None = None
    error_trace: str | None = None


def measure_ours(numel, device, bandwidth, fmt, target_s, check_graph: bool, cls_name="EFMFAC", m=M) -> Row:
    from lowbit_compile.optim import efcp
    from lowbit_compile.templates import efcp as kernels

    generator = torch.Generator(device=device).manual_seed(0)
    params = make_params(numel, device, generator)
    core = {"damping": DAMPING} if cls_name == "EFMFAC" else {"eps": 1e-5}
    opt = getattr(efcp, cls_name)(params, lr=LR, m=m, density=DENSITY, ef_format=ef_format(fmt), **core)
    row = Row(f"lowbit {cls_name} m={m} EF {opt.param_groups[0]['ef_format']}", numel)
    prefill_ring(opt, generator)
    report = opt.describe()
    row.state_bytes_per_param = report.bytes_per_param
    row.workspace_bytes_per_param = opt.workspace_bytes() / numel
    times = time_calls(opt.step, device, target_s, min_reps=10)
    row.ms_median, row.ms_min = statistics.median(times), min(times)
    if device.type == "cuda":
        row.kernel_launches = kernel_launches(opt.step, device)[0]

    group = opt.param_groups[0]
    flat = opt._flat_groups[group["params"][0]]
    state = opt.state[group["params"][0]]
    ring = kernels.SparseRing(state["ring.index_low"], state["ring.index_high"], state["ring.codes"],
                              state["ring.scale"])
    ef = kernels.ErrorFeedback(state["error"], state["error.absmax"], group["ef_format"])
    alpha = torch.zeros(flat.layout.m, device=device)
    zero = torch.zeros((), device=device)
    compress, dots_of, combine = kernels.implementations(device)
    dots_ms = statistics.median(time_calls(lambda: dots_of(flat.workspace, ring, flat.layout), device, target_s / 2,
                                           min_reps=10))
    combine_ms = statistics.median(time_calls(lambda: combine(
        flat.workspace, flat.flat, None, ring, alpha, flat.layout, lr=zero, u_scale=zero, weight_decay=zero,
        momentum=zero), device, target_s / 2, min_reps=10))
    row.compress_ms = statistics.median(time_calls(lambda: compress(
        flat.workspace, ef, ring, state["head"], flat.layout), device, target_s / 2, min_reps=10))
    row.ring_passes_ms = dots_ms + combine_ms
    row.ring_floor_ms = 2 * flat.layout.ring_bytes() / (bandwidth * 1e9) * 1e3
    row.ring_ratio_to_floor = row.ring_passes_ms / row.ring_floor_ms
    if check_graph and device.type == "cuda":
        try:
            row.graph = graph_check(opt, device)
        except Exception as error:
            row.graph = {"captured": False, "error": f"{type(error).__name__}: {error}"[:400]}
    return row


def measure_reference(numel, device, target_s) -> Row:
    generator = torch.Generator(device=device).manual_seed(0)
    params = make_params(numel, device, generator)
    opt = DenseIndexEFMFAC(params, LR, M, DENSITY, DAMPING)
    opt.prefill(generator)
    row = Row("reference fp32 dense-index (pure torch)", numel)
    row.state_bytes_per_param = sum(t.numel() * t.element_size() for t in opt.state_tensors()) / numel
    times = time_calls(opt.step, device, target_s, min_reps=5, max_reps=50)
    row.ms_median, row.ms_min = statistics.median(times), min(times)
    if device.type == "cuda":
        row.kernel_launches = kernel_launches(opt.step, device)[0]
    return row


def ista_row(numel) -> Row:
    if importlib.util.find_spec("ista_daslab_optimizers") is None:
        return Row("ista-daslab-optimizers SparseMFAC", numel,
                   status="skipped: not installed on this machine (PyPI has no binary wheel of ista-daslab-optimizers-"
                          "cuda for this Python, so pip would build its CUDA extensions from source; the GPU machine "
                          "has no network and no time budget for that build)")
    return Row("ista-daslab-optimizers SparseMFAC", numel, status="skipped: installed but not wired up here")


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_speed(device, cpu_smoke: bool, target_s: float, budget_s: float) -> tuple[float, list[Row]]:
    bandwidth = copy_bandwidth_gbs(device)
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s", flush=True)
    sizes = (50_000, 200_000) if cpu_smoke else (RESNET18, BERT_BASE)
    deadline = time.perf_counter() + budget_s
    rows = []
    plan = []
    for i, numel in enumerate(sizes):
        plan += [("ours", numel, fmt, i == 0 and fmt == "Q8") for fmt in EF_FORMATS]
        plan += [("reference", numel, None, False), ("ista", numel, None, False)]
    plan.append(("ggt", sizes[0], "Q8", True))
    for kind, numel, fmt, check in plan:
        if time.perf_counter() > deadline:
            rows.append(Row(f"{kind} EF {fmt}", numel, status=f"skipped: time budget of {budget_s:.0f} s spent"))
            continue
        try:
            if kind == "ours":
                row = measure_ours(numel, device, bandwidth, fmt, target_s, check)
            elif kind == "ggt":
                row = measure_ours(numel, device, bandwidth, fmt, target_s, check, cls_name="EFGGT", m=100)
            elif kind == "reference":
                row = measure_reference(numel, device, target_s)
            else:
                row = ista_row(numel)
        except Exception as error:
            row = Row(f"{kind} EF {fmt}", numel, status=f"failed: {type(error).__name__}: {error}"[:300],
                      error_trace=traceback.format_exc()[-4000:])
        release(device)
        rows.append(row)
        print(json.dumps({k: v for k, v in dataclasses.asdict(row).items() if k != "error_trace"}), flush=True)
    return bandwidth, rows


def _fmt(value, digits=2):
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def speed_markdown(meta, rows) -> str:
    lines = [f"# EFCP — {meta['device_name']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; {meta['date']}. m = {M}, density {DENSITY:.0%}, "
             f"damping {DAMPING}, fp32 params. Copy bandwidth measured in this run (read + write): "
             f"{meta['copy_bandwidth_gbs']:.0f} GB/s.", "",
             "State: every optimizer-state tensor (ring, error feedback, Gram matrix, head); the fp32 gradient "
             "workspace is listed apart. Ring passes: `ring_dots` + `ring_combine_update_` (the latter includes the "
             "parameter update); floor: the ring read twice at the copy bandwidth. Launches: CUDA kernels in one "
             "step (torch.profiler).", ""]
    header = ("optimizer", "ms/step", "state B/param", "workspace B/param", "compress ms", "ring passes ms",
              "ring floor ms", "× floor", "launches", "status")
    for numel in dict.fromkeys(r.numel for r in rows):
        lines += [f"## d = {numel / 1e6:.1f}M", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in (r for r in rows if r.numel == numel):
            lines.append("| " + " | ".join([
                r.optimizer, _fmt(r.ms_median, 3), _fmt(r.state_bytes_per_param), _fmt(r.workspace_bytes_per_param),
                _fmt(r.compress_ms, 3), _fmt(r.ring_passes_ms, 3), _fmt(r.ring_floor_ms, 3),
                _fmt(r.ring_ratio_to_floor), _fmt(r.kernel_launches), r.status.replace("|", "/")]) + " |")
        lines.append("")
    for r in rows:
        if r.graph:
            lines.append(f"CUDA graph, {r.optimizer}, d = {r.numel / 1e6:.1f}M: "
                         + ", ".join(f"{k} = {v}" for k, v in r.graph.items()))
            lines.append("")
    return "\n".join(lines)


def speed_plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.ms_median is not None]
    sizes = list(dict.fromkeys(r.numel for r in measured))
    fig, axes = plt.subplots(2, len(sizes), figsize=(7 * len(sizes), 7), squeeze=False)
    for col, numel in enumerate(sizes):
        these = [r for r in measured if r.numel == numel]
        labels = [r.optimizer for r in these]
        axes[0][col].barh(labels, [r.state_bytes_per_param for r in these], color="tab:green")
        axes[0][col].axvline(31, color="black", ls="--", lw=1, label="target 31 B/param")
        axes[0][col].set(title=f"d = {numel / 1e6:.1f}M: optimizer state", xlabel="bytes / param")
        axes[1][col].barh(labels, [r.ms_median for r in these], color="tab:blue")
        axes[1][col].set(title=f"d = {numel / 1e6:.1f}M: step time", xlabel="ms / step (median)", xscale="log")
        for ax in (axes[0][col], axes[1][col]):
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Quality: which error-feedback format (CPU, pure-torch path = the kernels' reference)
# --------------------------------------------------------------------------------------------------------------
def quality_run(name: str, seed: int, steps: int, lr: float, m: int, damping: float) -> dict:
    from lowbit_compile.optim.efcp import EFMFAC

    data = torch.Generator().manual_seed(1234)
    inputs, hidden, classes = 64, 256, 10
    teacher = [torch.randn(inputs, 32, generator=data), torch.randn(32, classes, generator=data)]
    x = torch.randn(6144, inputs, generator=data)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)
    x_train, y_train, x_test, y_test = x[:4096], y[:4096], x[4096:], y[4096:]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                torch.nn.ReLU(), torch.nn.Linear(hidden, classes))
    opt = EFMFAC(model.parameters(), lr=lr, m=m, density=DENSITY, damping=damping, ef_format=ef_format(name))
    order = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        batch = torch.randint(0, 4096, (128,), generator=order)
        loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        train_loss = float(torch.nn.functional.cross_entropy(model(x_train), y_train))
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return dict(ef_format=name, seed=seed, lr=lr, train_loss=train_loss, test_accuracy=accuracy,
                loss_curve=losses[:: max(1, steps // 50)], state_bytes_per_param=opt.describe().bytes_per_param,
                numel=sum(p.numel() for p in model.parameters()))


def run_quality(out: Path, steps: int, seeds: int) -> None:
    m, damping = 64, 1e-3
    started = time.perf_counter()
    runs = [quality_run(fmt, seed, steps, lr, m, damping)
            for lr in (0.01,) for fmt in EF_FORMATS for seed in range(seeds)]
    meta = dict(torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), steps=steps, seeds=seeds,
                m=m, damping=damping, density=DENSITY, wall_s=time.perf_counter() - started,
                task="MLP 64-256-256-10 on a tanh-teacher 10-class task, 4096 train / 2048 test, batch 128")
    out.mkdir(parents=True, exist_ok=True)
    (out / "efcp.quality.json").write_text(json.dumps(dict(meta=meta, runs=runs), indent=1))
    lines = ["# EFCP error-feedback format: training quality (CPU)", "",
             f"{meta['task']}; EFMFAC m = {m}, density {DENSITY:.0%}, damping {damping}, block 4096, {steps} steps, "
             f"{seeds} seeds; torch {meta['torch']}, {meta['date']}. Mean ± std over seeds.", "",
             "| lr | EF format | final train loss | test accuracy | state B/param |", "|---|---|---|---|---|"]
    for lr in dict.fromkeys(r["lr"] for r in runs):
        for fmt in EF_FORMATS:
            these = [r for r in runs if r["lr"] == lr and r["ef_format"] == fmt]
            loss = torch.tensor([r["train_loss"] for r in these])
            acc = torch.tensor([r["test_accuracy"] for r in these])
            lines.append(f"| {lr} | {fmt} | {loss.mean():.4f} ± {loss.std():.4f} | {acc.mean():.4f} ± "
                         f"{acc.std():.4f} | {these[0]['state_bytes_per_param']:.2f} |")
    (out / "efcp.quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: tests this script's logic")
    parser.add_argument("--quality", action="store_true", help="the EF-format training comparison (CPU)")
    parser.add_argument("--quality-steps", type=int, default=400)
    parser.add_argument("--quality-seeds", type=int, default=3)
    parser.add_argument("--target-s", type=float, default=1.0)
    parser.add_argument("--budget-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.quality:
        run_quality(args.out, args.quality_steps, args.quality_seeds)
        return
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: run on the GPU machine, or pass --cpu-smoke / --quality")
    started = time.perf_counter()
    bandwidth, rows = run_speed(device, args.cpu_smoke, args.target_s, args.budget_s)
    meta = dict(device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, triton=_version("triton"), python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), copy_bandwidth_gbs=bandwidth, cpu_smoke=args.cpu_smoke,
                m=M, density=DENSITY, damping=DAMPING, wall_s=time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "efcp.json").write_text(json.dumps(dict(meta=meta, rows=[dataclasses.asdict(r) for r in rows]),
                                                   indent=1))
    report = speed_markdown(meta, rows)
    (args.out / "efcp.md").write_text(report)
    speed_plot(rows, args.out / "efcp.png", f"EFCP M-FAC, m = {M}, density 1% — {meta['device_name']}")
    print(report)


if __name__ == "__main__":
    main()
