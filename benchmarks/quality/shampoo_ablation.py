"""Which 4-bit part of Shampoo costs quality: a diagnosis run of the quality suite's Shampoo on one task.

    python -m benchmarks.quality.shampoo_ablation [--task char_lm] [--seeds 3] [--out benchmarks/results] [--quick]

Variants (same seeds, data and hyperparameters as ``benchmarks/quality/run.py``): 32-bit and 4-bit Shampoo; 4-bit
with the eigenvectors kept in fp32 (the inverse root's off-diagonal still 4-bit); 4-bit with the root's off-diagonal
kept in fp32; and fp32 eigenvectors that are rounded through the 4-bit format only where the statistics refresh reads
them (rebuilding A = Vᵀ diag(λ) V), or only where the inverse-root refresh reads them; and 4-bit with 0, 2 or 4
Björck steps before the statistics rebuild instead of 1 (is the loss non-orthogonality?). The variants swap storage and
wrap methods of one optimizer instance: a diagnostic, not an API. Writes ``quality.shampoo_ablation.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch

from lowbit_compile.optim import shampoo as shampoo_module

from . import run as suite
from .tasks import TASKS

_ROUND_EIGENVECTORS = {"on": False}
_stored_rows = shampoo_module.FactorSide.eigenvector_rows


def _eigenvector_rows(side):
    """The side's eigenvector rows, rounded through the 4-bit format while a wrapped refresh runs."""
    rows = _stored_rows(side)
    if not _ROUND_EIGENVECTORS["on"]:
        return rows
    from lowbit_compile.templates.shampoo import QuantizedRows
    fmt = shampoo_module.EIGENVECTOR_FORMAT
    return shampoo_module._decode_rows(QuantizedRows(*shampoo_module._encode_rows(rows, fmt), fmt,
                                                     rows.shape[-1])).contiguous()


@contextlib.contextmanager
def _patched_rows():
    shampoo_module.FactorSide.eigenvector_rows = _eigenvector_rows
    try:
        yield
    finally:
        shampoo_module.FactorSide.eigenvector_rows = _stored_rows


def _keep_fp32(opt, names: tuple[str, ...]) -> None:
    for batch in opt.batches:
        for side in (batch.left, batch.right):
            for name in names:
                stored = getattr(side, name)
                if not isinstance(stored, torch.Tensor):
                    setattr(side, name, shampoo_module._decode_rows(stored).contiguous())


def _round_while(opt, method_name: str) -> None:
    method = getattr(opt, method_name)

    def wrapped(*args, **kwargs):
        _ROUND_EIGENVECTORS["on"] = True
        try:
            return method(*args, **kwargs)
        finally:
            _ROUND_EIGENVECTORS["on"] = False
    setattr(opt, method_name, wrapped)


def _variant(fp32: tuple[str, ...] = (), rounded_in: str | None = None, statistics_bjorck_steps: int | None = None):
    def build(params, lr):
        opt = suite._shampoo(4)(params, lr)
        _keep_fp32(opt, fp32)
        if rounded_in is not None:
            _round_while(opt, rounded_in)
        if statistics_bjorck_steps is not None:
            opt.statistics_bjorck_steps = statistics_bjorck_steps
        return opt
    return build


VARIANTS = {
    "shampoo32": ("Shampoo 32-bit", None),
    "shampoo4": ("Shampoo 4-bit", None),
    "eigenvectors_fp32": ("4-bit, eigenvectors fp32", _variant(("eigenvectors",))),
    "root_fp32": ("4-bit, root off-diagonal fp32", _variant(("root_offdiagonal",))),
    "rounded_for_statistics": ("fp32 eigenvectors, 4-bit-rounded for the statistics refresh only",
                               _variant(("eigenvectors",), "_refresh_statistics")),
    "rounded_for_root": ("fp32 eigenvectors, 4-bit-rounded for the inverse-root refresh only",
                         _variant(("eigenvectors",), "_refresh_roots")),
    **{f"statistics_bjorck{k}": (f"4-bit, {k} Björck steps before the statistics rebuild (default 1)",
                                 _variant(statistics_bjorck_steps=k)) for k in (0, 2, 4)},
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.shampoo_ablation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="char_lm", choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="the suite's tiny setting (smoke test)")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds must be >= 2 (a seed std is reported), got {args.seeds}")
    torch.set_num_threads(1)
    task = TASKS[args.task](args.quick)
    for name, (label, build) in VARIANTS.items():
        if build is not None:
            suite.OPTIMIZERS[name] = suite.OptimizerChoice(label, build)
    losses = {}
    with _patched_rows():
        for name in [suite.REFERENCE, *VARIANTS]:
            losses[name] = [suite.train(task, name, seed)["val_loss"] for seed in range(args.seeds)]
            print(f"{name:24s} {statistics.mean(losses[name]):.4f} ± {statistics.stdev(losses[name]):.4f}",
                  flush=True)
    adamw, full = statistics.mean(losses[suite.REFERENCE]), statistics.mean(losses["shampoo32"])
    rows = [dict(variant=name, label=suite.OPTIMIZERS[name].label, mean=statistics.mean(values),
                 std=statistics.stdev(values), keeps=(adamw - statistics.mean(values)) / (adamw - full))
            for name, values in losses.items()]
    payload = dict(task=args.task, seeds=args.seeds, val_losses=losses, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.shampoo_ablation.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# Shampoo 4-bit ablation — {args.task}, {args.seeds} seeds (CPU{', quick' if args.quick else ''})", "",
             "Validation loss mean ± seed std; keeps = share of 32-bit Shampoo's improvement over torch AdamW.", "",
             "| variant | val loss | keeps |", "|---|---|---|"]
    lines += [f"| {r['label']} | {r['mean']:.4f} ± {r['std']:.4f} | {r['keeps']:.0%} |" for r in rows]
    (args.out / "quality.shampoo_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
