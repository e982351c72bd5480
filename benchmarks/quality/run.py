"""Train every (task, optimizer, seed) of the quality suite and write JSON + Markdown + PNG.

    python -m benchmarks.quality.run [--quick] [--seeds 3] [--tasks char_lm,...] [--optimizers torch_adamw,...]
                                     [--out benchmarks/results]

Each run starts from the seed's initial weights and sees the seed's batches in the same order, whatever the optimizer.
Hyper-parameters are shared defaults, never tuned per optimizer: every AdamW variant (and Shampoo's AdamW grafting)
uses the task's lr; Lion uses lr/10 with 10x the weight decay (the usual Lion conversion, constant lr * wd); SGD uses
a fixed lr of 0.05 with momentum 0.9; EF-M-FAC takes the settings of the EFCP format study
(benchmarks/results/efcp.quality.md). The learning rate is constant. Our optimizers run eagerly here (their anchor ops'
pure-torch paths, which are the reference codecs): on these tiny CPU models an inductor compile per run would cost far
more than the run itself; agreement of the compiled path with eager is the backend tests' concern, not this suite's.
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

from .tasks import TASKS, Task

WEIGHT_DECAY = 0.01
ADAM_BETAS = (0.9, 0.999)


@dataclasses.dataclass(frozen=True)
class OptimizerChoice:
    label: str
    build: Callable[[list, float], torch.optim.Optimizer]


def _shampoo(bits: int, **options):
    def build(params, lr):
        return lbc_optim.Shampoo(params, lr=lr, bits=bits, precondition_frequency=10, inverse_root_frequency=20,
                                 grafting="adamw", betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, **options)
    return build


OPTIMIZERS: dict[str, OptimizerChoice] = {
    "torch_adamw": OptimizerChoice("torch AdamW fp32", lambda p, lr: torch.optim.AdamW(
        p, lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)),
    "adamw32": OptimizerChoice("lowbit AdamW 32-bit", lambda p, lr: lbc_optim.AdamW(
        p, lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, bits=32)),
    "adamw8": OptimizerChoice("lowbit AdamW 8-bit", lambda p, lr: lbc_optim.AdamW(
        p, lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, bits=8)),
    "adamw4": OptimizerChoice("lowbit AdamW 4-bit", lambda p, lr: lbc_optim.AdamW(
        p, lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, bits=4)),
    "sgd8": OptimizerChoice("lowbit SGD-momentum 8-bit", lambda p, lr: lbc_optim.SGD(
        p, lr=0.05, momentum=0.9, bits=8)),
    "lion8": OptimizerChoice("lowbit Lion 8-bit", lambda p, lr: lbc_optim.Lion(
        p, lr=lr / 10, betas=(0.9, 0.99), weight_decay=10 * WEIGHT_DECAY, bits=8)),
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


def train(task: Task, optimizer: str, seed: int, evaluations: int = 10) -> dict:
    """One run; returns its curves, final validation metrics, state bytes/param and median ms/step."""
    torch.manual_seed(seed)
    model = task.make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[optimizer].build(params, task.lr)
    batches = torch.Generator().manual_seed(seed)
    eval_every = max(1, task.steps // evaluations)
    train_losses, val_curve, step_ms, opt_ms = [], [], [], []
    for step in range(task.steps):
        inputs, targets = task.train_batch(batches)
        started = time.perf_counter()
        loss = task.loss(model, inputs, targets)
        loss.backward()
        opt_started = time.perf_counter()
        opt.step()
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
                finite=all(map(lambda v: v == v and abs(v) != float("inf"), train_losses)),
                state_bytes_per_param=state_bytes(opt) / sum(p.numel() for p in params),
                parameters=sum(p.numel() for p in params),
                step_ms=statistics.median(step_ms[1:] or step_ms), opt_step_ms=statistics.median(opt_ms[1:] or opt_ms),
                train_losses=train_losses, val_curve=val_curve)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="quality", help="file stem of the outputs under --out")
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
    return args


def main(argv: list[str] | None = None) -> dict:
    from . import report

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.name}.json"
    payload = dict(environment=dict(torch=torch.__version__, device="cpu", threads=args.threads, quick=args.quick,
                                    eager=True), optimizers={k: v.label for k, v in OPTIMIZERS.items()},
                   reference=REFERENCE, tasks={}, runs=[])
    if args.append and json_path.exists():
        payload = json.loads(json_path.read_text())
        payload["optimizers"].update({k: v.label for k, v in OPTIMIZERS.items()})
    for task_name in args.tasks.split(","):
        task = TASKS[task_name](args.quick)
        payload["tasks"][task_name] = dict(steps=task.steps, lr=task.lr, **task.data_info)
        for optimizer in args.optimizers.split(","):
            for seed in range(args.seeds):
                started = time.perf_counter()
                run = train(task, optimizer, seed)
                payload["runs"].append(run)
                print(f"{task_name:12s} {optimizer:12s} seed {seed}: val loss {run['val_loss']:.4f} "
                      f"acc {run['val_acc'] if run['val_acc'] is not None else float('nan'):.4f} "
                      f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
                json_path.write_text(json.dumps(payload))  # partial results survive an interrupted suite
    report.write(payload, args.out, args.name)
    return payload


if __name__ == "__main__":
    main()
