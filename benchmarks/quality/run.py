"""Train every (task, optimizer, seed) of the quality suite and write JSON + Markdown + PNG.

    python -m benchmarks.quality.run [--quick] [--seeds 3] [--tasks char_lm,...] [--optimizers torch_adamw,...]
                                     [--device cpu|cuda] [--scale small|large] [--budget-s SECONDS]
                                     [--out benchmarks/results] [--name STEM]

Each run starts from the seed's initial weights and sees the seed's batches in the same order, whatever the optimizer.
Hyper-parameters are shared defaults, never tuned per optimizer: every AdamW variant (and Shampoo's AdamW grafting)
uses the task's lr; Lion uses lr/10 with 10x the weight decay (the usual Lion conversion, constant lr * wd); SGD uses
a fixed lr of 0.05 with momentum 0.9; EF-M-FAC takes the settings of the EFCP format study
(benchmarks/results/efcp.quality.md). The learning rate is constant. Our optimizers run eagerly by default (on the CPU
their anchor ops' pure-torch paths, which are the reference codecs): on small CPU models an inductor compile per run
would cost far more than the run itself; agreement of the compiled path with eager is the backend tests' concern, not
this suite's. With ``--compile`` our first-order optimizers (lowbit AdamW, SGD, Lion) step through
``torch.compile(opt.step, backend="lowbit")``, compiled afresh per run: on a GPU their eager step launches each
tensor's dequantize, rule and requantize separately (14 ms for 32-bit and 34 ms for 8-bit AdamW per step on the large
char LM, H100), so the GPU mode needs it to fit its time budget. Shampoo, EF-M-FAC and torch's AdamW stay eager.

Two modes (``tasks.py`` gives each task's settings and why): ``--device cpu --scale small`` (the default; what
``benchmarks/results/quality.md`` and the README's longer CPU job run) and ``--device cuda --scale large`` (one H100;
output stem ``quality_gpu``, so the CPU results are not overwritten). With ``--compile``, 5 seeds of the four tasks x
torch_adamw,adamw32,adamw8,adamw4,shampoo32,shampoo4 took 377 + 272 s on the H100 in two calls of ``gpu_run.sh
quality`` (the second with ``--append``), more than one 10-minute device call. On a GPU the timings synchronise the device around the forward/backward and the optimizer step, so
ms/step is device time plus host time, not launch time alone.

``--budget-s`` stops starting new runs once that many seconds have passed since the suite began; the report then
covers only the (task, optimizer) pairs whose every seed finished (the runs of a pair cut short stay in the JSON under
``incomplete_runs``), and the pairs skipped are printed and recorded under ``skipped``. After the first run of each
task the suite prints a per-run time estimate for it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from lowbit_compile import optim as lbc_optim
from lowbit_compile.demo import state_bytes

from .tasks import SCALES, TASKS, Task

WEIGHT_DECAY = 0.01
ADAM_BETAS = (0.9, 0.999)


@dataclasses.dataclass(frozen=True)
class OptimizerChoice:
    label: str
    build: Callable[[list, float], torch.optim.Optimizer]
    compilable: bool = False  # an lbc.Optimizer rule: --compile runs its step through the lowbit backend


def _shampoo(bits: int, **options):
    def build(params, lr, precondition_frequency=10, inverse_root_frequency=20):
        return lbc_optim.Shampoo(params, lr=lr, bits=bits, precondition_frequency=precondition_frequency,
                                 inverse_root_frequency=inverse_root_frequency, grafting="adamw", betas=ADAM_BETAS,
                                 weight_decay=WEIGHT_DECAY, **options)
    build.takes_refresh_periods = True  # train() passes the task's T1/T2 (Task.shampoo) as keywords
    return build


OPTIMIZERS: dict[str, OptimizerChoice] = {
    "torch_adamw": OptimizerChoice("torch AdamW fp32", lambda p, lr: torch.optim.AdamW(
        p, lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)),
    # The same update in torch's fused (one-kernel) implementation: a control for how far runs that differ only in
    # floating-point rounding drift apart on a GPU (not a reference: the gaps are measured against torch_adamw).
    "torch_adamw_fused": OptimizerChoice("torch AdamW fp32, fused=True", lambda p, lr: torch.optim.AdamW(
        p, lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, fused=True)),
    "adamw32": OptimizerChoice("lowbit AdamW 32-bit", lambda p, lr: lbc_optim.AdamW(
        p, lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, bits=32), compilable=True),
    "adamw8": OptimizerChoice("lowbit AdamW 8-bit", lambda p, lr: lbc_optim.AdamW(
        p, lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, bits=8), compilable=True),
    "adamw4": OptimizerChoice("lowbit AdamW 4-bit", lambda p, lr: lbc_optim.AdamW(
        p, lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, bits=4), compilable=True),
    "sgd8": OptimizerChoice("lowbit SGD-momentum 8-bit", lambda p, lr: lbc_optim.SGD(
        p, lr=0.05, momentum=0.9, bits=8), compilable=True),
    "lion8": OptimizerChoice("lowbit Lion 8-bit", lambda p, lr: lbc_optim.Lion(
        p, lr=lr / 10, betas=(0.9, 0.99), weight_decay=10 * WEIGHT_DECAY, bits=8), compilable=True),
    "shampoo32": OptimizerChoice("Shampoo 32-bit", _shampoo(32)),
    "shampoo4": OptimizerChoice("Shampoo 4-bit", _shampoo(4)),
    "shampoo4_sr": OptimizerChoice("Shampoo 4-bit, stochastic eigenvector rounding",
                                   _shampoo(4, eigenvector_rounding="stochastic")),
    "shampoo4_unrotated": OptimizerChoice("Shampoo 4-bit, eigenvectors stored unrotated (the paper's)",
                                          _shampoo(4, eigenvector_rotation="none")),
    "shampoo4_sr_unrotated": OptimizerChoice("Shampoo 4-bit, unrotated, stochastic eigenvector rounding",
                                             _shampoo(4, eigenvector_rotation="none",
                                                      eigenvector_rounding="stochastic")),
    # The settings of benchmarks/results/efcp.quality.md (its lr is M-FAC's own scale, not AdamW's).
    "efmfac": OptimizerChoice("EF-M-FAC (Q8 error feedback)", lambda p, lr: lbc_optim.EFMFAC(
        p, lr=0.01, m=64, density=0.01, damping=1e-3)),
}
REFERENCE = "torch_adamw"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_optimizer(optimizer: str, params: list, task: Task) -> torch.optim.Optimizer:
    """The optimizer of a run: the choice's build with the task's lr (and the task's Shampoo T1/T2 if it takes them)."""
    build = OPTIMIZERS[optimizer].build
    if getattr(build, "takes_refresh_periods", False):
        return build(params, task.lr, **task.shampoo)
    return build(params, task.lr)


def train(task: Task, optimizer: str, seed: int, evaluations: int = 10, compile_backend: str | None = None) -> dict:
    """One run; returns its curves, final validation metrics, state bytes/param and median ms/step (the first step,
    which compiles, left out). With ``compile_backend``, a compilable choice steps through
    ``torch.compile(opt.step, backend=compile_backend)``, compiled afresh for the run."""
    torch.manual_seed(seed)  # seeds the CPU generator the model is drawn from (and every CUDA generator)
    model = task.make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, params, task)
    compiled = compile_backend is not None and OPTIMIZERS[optimizer].compilable
    if compiled:
        # A new optimizer object fails the previous run's guards: without a reset the runs would pile up recompiles
        # of one code object until Dynamo's limit and then step eagerly.
        torch._dynamo.reset()
    step_fn = torch.compile(opt.step, backend=compile_backend) if compiled else opt.step
    batches = torch.Generator().manual_seed(seed)
    eval_every = max(1, task.steps // evaluations)
    device = task.device
    train_losses, val_curve, step_ms, opt_ms = [], [], [], []
    for step in range(task.steps):
        inputs, targets = task.train_batch(batches)
        _sync(device)
        started = time.perf_counter()
        loss = task.loss(model, inputs, targets)
        loss.backward()
        _sync(device)
        opt_started = time.perf_counter()
        step_fn()
        _sync(device)
        finished = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step_ms.append(1e3 * (finished - started))
        opt_ms.append(1e3 * (finished - opt_started))
        train_losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == task.steps:
            val_loss, val_acc = task.evaluate(model)
            val_curve.append((step + 1, val_loss, val_acc))
    _, val_loss, val_acc = val_curve[-1]
    return dict(task=task.name, optimizer=optimizer, seed=seed, steps=task.steps, val_loss=val_loss, val_acc=val_acc,
                compiled=compiled, finite=all(map(lambda v: v == v and abs(v) != float("inf"), train_losses)),
                state_bytes_per_param=state_bytes(opt) / sum(p.numel() for p in params),
                parameters=sum(p.numel() for p in params),
                step_ms=statistics.median(step_ms[1:] or step_ms), opt_step_ms=statistics.median(opt_ms[1:] or opt_ms),
                train_losses=train_losses, val_curve=val_curve)


def default_name(device: str, scale: str) -> str:
    """quality (CPU, small), quality_gpu (GPU, large); any other pairing gets its own stem, so none overwrites."""
    gpu = torch.device(device).type != "cpu"
    native = "large" if gpu else "small"
    return "quality" + ("_gpu" if gpu else "") + ("" if scale == native else f"_{scale}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 steps (tiny models at small scale): a smoke test")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--scale", default="small", choices=SCALES,
                        help="small: the CPU settings (default); large: the GPU settings (see tasks.py)")
    parser.add_argument("--compile", nargs="?", const="lowbit", default=None, metavar="BACKEND",
                        help="step our first-order optimizers (lowbit AdamW, SGD, Lion) through torch.compile with "
                             "this backend (default lowbit); Shampoo, EF-M-FAC and torch's AdamW stay eager")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new run after this many seconds; report only the pairs whose seeds all ran")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None,
                        help="file stem of the outputs under --out (default: quality for CPU/small, quality_gpu for "
                             "GPU/large, quality[_gpu]_<scale> otherwise)")
    parser.add_argument("--append", action="store_true",
                        help="add these runs to an existing <out>/<name>.json instead of starting a new one")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    for flag, known in (("tasks", TASKS), ("optimizers", OPTIMIZERS)):
        unknown = [n for n in getattr(args, flag).split(",") if n not in known]
        if unknown:
            parser.error(f"--{flag}: unknown {unknown}; choose from {list(known)}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.budget_s is not None and args.budget_s < 0:
        parser.error(f"--budget-s must be >= 0, got {args.budget_s}")
    if args.name is None:
        args.name = default_name(args.device, args.scale)
    return args


def environment(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        versions = dict(cuda=torch.version.cuda)
    else:
        import platform
        name = platform.machine()
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
        except OSError:
            pass
        versions = {}
    return dict(torch=torch.__version__, device=device.type, device_name=name, **versions, threads=args.threads,
                quick=args.quick, eager=args.compile is None, compile_backend=args.compile, scale=args.scale,
                settings={})


def _split_incomplete(runs: list[dict], planned: dict[tuple[str, str], int]) -> tuple[list[dict], list[dict]]:
    """This invocation's runs split into those of pairs whose planned seeds all ran, and the rest."""
    done: dict[tuple[str, str], int] = {}
    for run in runs:
        done[(run["task"], run["optimizer"])] = done.get((run["task"], run["optimizer"]), 0) + 1
    incomplete = {key for key, seeds in planned.items() if done.get(key, 0) < seeds}
    return ([r for r in runs if (r["task"], r["optimizer"]) not in incomplete],
            [r for r in runs if (r["task"], r["optimizer"]) in incomplete])


def main(argv: list[str] | None = None) -> dict:
    from . import report

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.name}.json"
    payload = dict(environment=environment(args), optimizers={k: v.label for k, v in OPTIMIZERS.items()},
                   reference=REFERENCE, tasks={}, runs=[])
    if args.append and json_path.exists():
        stored = json.loads(json_path.read_text())
        mine, theirs = payload["environment"], stored["environment"]
        for key, default in (("device", "cpu"), ("scale", "small"), ("quick", False), ("compile_backend", None)):
            if theirs.get(key, default) != mine[key]:
                sys.exit(f"--append: {json_path} holds {key}={theirs.get(key, default)!r} runs, this is "
                         f"{key}={mine[key]!r}; give another --name")
        theirs.setdefault("settings", {})
        payload = stored
        payload["optimizers"].update({k: v.label for k, v in OPTIMIZERS.items()})
    task_names, optimizers = args.tasks.split(","), args.optimizers.split(",")
    planned = {(t, o): args.seeds for t in task_names for o in optimizers}
    started_suite = time.perf_counter()
    skipped: list[dict] = []
    stored_runs, new_runs = list(payload["runs"]), []

    def out_of_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - started_suite >= args.budget_s

    for task_name in task_names:
        if out_of_budget():
            skipped += [dict(task=task_name, optimizer=o, seeds_done=0, seeds=args.seeds) for o in optimizers]
            continue
        task = TASKS[task_name](args.quick, args.device, args.scale)
        payload["tasks"][task_name] = dict(steps=task.steps, lr=task.lr, **task.data_info)
        payload["environment"]["settings"][task_name] = task.settings
        first_run = True
        for optimizer in optimizers:
            seeds_done = 0
            for seed in range(args.seeds):
                if out_of_budget():
                    break
                started = time.perf_counter()
                run = train(task, optimizer, seed, compile_backend=args.compile)
                elapsed = time.perf_counter() - started
                run["wall_s"] = elapsed
                payload["runs"].append(run)
                new_runs.append(run)
                seeds_done += 1
                print(f"{task_name:12s} {optimizer:12s} seed {seed}: val loss {run['val_loss']:.4f} "
                      f"acc {run['val_acc'] if run['val_acc'] is not None else float('nan'):.4f} "
                      f"({elapsed:.1f} s)", file=sys.stderr, flush=True)
                if first_run:
                    first_run = False
                    runs = len(optimizers) * args.seeds
                    print(f"{task_name}: first run {elapsed:.1f} s ({run['step_ms']:.2f} ms/step, "
                          f"{task.steps} steps) -> estimate ~{elapsed:.1f} s/run, {runs} runs ~{runs * elapsed:.0f} s "
                          f"for this task (Shampoo runs take longer per step)", file=sys.stderr, flush=True)
                json_path.write_text(json.dumps(payload))  # partial results survive an interrupted suite
            if seeds_done < args.seeds:
                skipped.append(dict(task=task_name, optimizer=optimizer, seeds_done=seeds_done, seeds=args.seeds))
    complete, incomplete = _split_incomplete(new_runs, planned)
    payload["runs"] = stored_runs + complete
    if incomplete or skipped:
        payload["incomplete_runs"] = payload.get("incomplete_runs", []) + incomplete
        payload["skipped"] = payload.get("skipped", []) + skipped
        print(f"budget of {args.budget_s} s used after {time.perf_counter() - started_suite:.1f} s; skipped "
              f"(task, optimizer) pairs, left out of the report: "
              + ", ".join(f"{s['task']}/{s['optimizer']} ({s['seeds_done']}/{s['seeds']} seeds ran)" for s in skipped),
              file=sys.stderr, flush=True)
    report.write(payload, args.out, args.name)
    return payload


if __name__ == "__main__":
    main()
