"""Which 4-bit part of Shampoo costs quality: a diagnosis run of the quality suite's Shampoo on one task.

    python -m benchmarks.quality.shampoo_ablation [--task char_lm] [--seeds 3] [--variants NAME,...]
                                                  [--out benchmarks/results] [--quick]

Variants (same seeds, data and hyperparameters as ``benchmarks/quality/run.py``): 32-bit Shampoo, 4-bit Shampoo with
its eigenvectors stored unrotated (the paper's storage; every simulated variant starts from it) and block-rotated (the
optimizer's default, ``Shampoo(eigenvector_rotation="block_hadamard")``, the storage the rotation variants below led
to); 4-bit with the eigenvectors kept in fp32 (the inverse root's off-diagonal still 4-bit); 4-bit with the root's
off-diagonal kept in fp32; and fp32 eigenvectors that are rounded through the 4-bit format only where the statistics refresh reads
them (rebuilding A = Vᵀ diag(λ) V), or only where the inverse-root refresh reads them; and 4-bit with 0, 2 or 4
Björck steps before the statistics rebuild instead of 1 (is the loss non-orthogonality?). Rotation variants test
whether a fixed orthogonal change of the eigenvectors' coordinates before rounding helps (rows with a few large
entries, localized eigenvectors, are what per-block absmax scaling quantizes worst): the rows are rounded as
``decode(encode(V H)) Hᵀ``, H a randomized Hadamard matrix (random ±1 signs times the normalized Sylvester
Hadamard) for power-of-2 orders and, for other orders, a random orthogonal matrix (QR of a Gaussian) or no rotation;
or H block-diagonal, a randomized Hadamard on each whole 64-entry quantization block of a row. H is fixed by the
order alone (no state). Rounded in both refreshes this is rotated 4-bit storage end to end; the
unrotated control rounded in both refreshes is plain 4-bit eigenvector storage again. Factors that 4-bit Shampoo
keeps in fp32 (``FactorSide.fmt`` None) are never rounded. The variants swap storage and wrap methods of one optimizer
instance: a diagnostic, not an API. ``--variants`` runs a subset (AdamW, 32-bit and unrotated 4-bit Shampoo always
run: the keeps scale, and the baseline of the per-seed paired differences reported). Writes
``quality.shampoo_ablation.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import statistics
from pathlib import Path

import torch

from lowbit_compile.optim import shampoo as shampoo_module

from . import run as suite
from .tasks import TASKS

BASELINES = ("shampoo32", "shampoo4_unrotated")
_ROUNDING = {"rotation": None}  # the rotation of the refresh being wrapped; None: no rounding
_stored_rows = shampoo_module.FactorSide.eigenvector_rows


def _sylvester(order: int) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of a power-of-2 order (fp64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(order)


@functools.lru_cache(maxsize=None)
def _rotation_matrix(order: int, rotation: str) -> torch.Tensor | None:
    """The fixed orthogonal H of an order (fp32, CPU), seeded by the order alone; None for no rotation. "hadamard":
    diag(±1) times Sylvester for power-of-2 orders, the Q of a Gaussian's QR (diag R > 0) otherwise; "hadamard_pow2":
    the same for power-of-2 orders, no rotation otherwise; "hadamard_blocks": block-diagonal, diag(±1) times Sylvester
    on every whole quantization block of a row (64 entries), a last partial block left as it is."""
    power_of_two = order & (order - 1) == 0
    if rotation == "none" or (rotation == "hadamard_pow2" and not power_of_two):
        return None
    generator = torch.Generator().manual_seed(order)
    if rotation == "hadamard_blocks":
        block = shampoo_module.EIGENVECTOR_FORMAT.block
        h = torch.eye(order, dtype=torch.float64)
        for start in range(0, order - block + 1, block):
            signs = torch.randint(0, 2, (block,), generator=generator, dtype=torch.float64) * 2 - 1
            h[start:start + block, start:start + block] = signs[:, None] * _sylvester(block)
        return h.float()
    if power_of_two:
        signs = torch.randint(0, 2, (order,), generator=generator, dtype=torch.float64) * 2 - 1
        return (signs[:, None] * _sylvester(order)).float()
    q, r = torch.linalg.qr(torch.randn(order, order, generator=generator, dtype=torch.float64))
    return (q * r.diagonal().sign()).float()


def _rounded(rows: torch.Tensor, rotation: str) -> torch.Tensor:
    """``rows`` through the 4-bit eigenvector format in the rotation's coordinates: ``decode(encode(V H)) Hᵀ``."""
    from lowbit_compile.templates.shampoo import QuantizedRows
    fmt = shampoo_module.EIGENVECTOR_FORMAT
    h = _rotation_matrix(rows.shape[-1], rotation)
    h = None if h is None else h.to(rows.device)
    rotated = rows if h is None else rows @ h
    decoded = shampoo_module._decode_rows(QuantizedRows(*shampoo_module._encode_rows(rotated.contiguous(), fmt), fmt,
                                                        rows.shape[-1]))
    return (decoded if h is None else decoded @ h.mT).contiguous()


def _eigenvector_rows(side):
    """The side's eigenvector rows, rounded through the 4-bit format while a wrapped refresh runs (factors that 4-bit
    Shampoo keeps in fp32 are left alone)."""
    rows = _stored_rows(side)
    if _ROUNDING["rotation"] is None or side.fmt is None:
        return rows
    return _rounded(rows, _ROUNDING["rotation"])


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


def _round_while(opt, method_name: str, rotation: str) -> None:
    method = getattr(opt, method_name)

    def wrapped(*args, **kwargs):
        _ROUNDING["rotation"] = rotation
        try:
            return method(*args, **kwargs)
        finally:
            _ROUNDING["rotation"] = None
    setattr(opt, method_name, wrapped)


def _variant(fp32: tuple[str, ...] = (), rounded_in: tuple[str, ...] = (), rotation: str = "none",
             statistics_bjorck_steps: int | None = None):
    def build(params, lr, **refresh_periods):
        opt = suite._shampoo(4, eigenvector_rotation="none")(params, lr, **refresh_periods)
        _keep_fp32(opt, fp32)
        for method_name in rounded_in:
            _round_while(opt, method_name, rotation)
        if statistics_bjorck_steps is not None:
            opt.statistics_bjorck_steps = statistics_bjorck_steps
        return opt
    build.takes_refresh_periods = True  # the task's T1/T2, like the suite's own Shampoo choices
    return build


_BOTH = ("_refresh_statistics", "_refresh_roots")
_HADAMARD = "a randomized Hadamard rotation (random orthogonal for orders not a power of 2)"
VARIANTS = {
    "shampoo32": ("Shampoo 32-bit", None),
    "shampoo4_unrotated": ("Shampoo 4-bit, eigenvectors stored unrotated (the paper's; every variant below "
                           "starts from it)", None),
    "shampoo4": ("Shampoo 4-bit, eigenvectors stored block-rotated (the default)", None),
    "eigenvectors_fp32": ("4-bit, eigenvectors fp32", _variant(("eigenvectors",))),
    "root_fp32": ("4-bit, root off-diagonal fp32", _variant(("root_offdiagonal",))),
    "rounded_for_statistics": ("fp32 eigenvectors, 4-bit-rounded for the statistics refresh only",
                               _variant(("eigenvectors",), ("_refresh_statistics",))),
    "rounded_for_root": ("fp32 eigenvectors, 4-bit-rounded for the inverse-root refresh only",
                         _variant(("eigenvectors",), ("_refresh_roots",))),
    **{f"statistics_bjorck{k}": (f"4-bit, {k} Björck steps before the statistics rebuild (default 1)",
                                 _variant(statistics_bjorck_steps=k)) for k in (0, 2, 4)},
    "rounded_for_both": ("fp32 eigenvectors, 4-bit-rounded for both refreshes (control: 4-bit eigenvectors again)",
                         _variant(("eigenvectors",), _BOTH)),
    "rotated_for_both": (f"fp32 eigenvectors, 4-bit-rounded after {_HADAMARD}, both refreshes",
                         _variant(("eigenvectors",), _BOTH, "hadamard")),
    "rotated_pow2_for_both": ("fp32 eigenvectors, 4-bit-rounded after a randomized Hadamard rotation for power-of-2 "
                              "orders (others unrotated), both refreshes",
                              _variant(("eigenvectors",), _BOTH, "hadamard_pow2")),
    "rotated_for_statistics": (f"fp32 eigenvectors, 4-bit-rounded after {_HADAMARD}, statistics refresh only",
                               _variant(("eigenvectors",), ("_refresh_statistics",), "hadamard")),
    "block_rotated_for_both": ("fp32 eigenvectors, 4-bit-rounded after a randomized Hadamard rotation of every whole "
                               "64-entry quantization block, both refreshes",
                               _variant(("eigenvectors",), _BOTH, "hadamard_blocks")),
}


def _paired(values: list[float], baseline: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-seed differences ``values - baseline``."""
    differences = [v - b for v, b in zip(values, baseline)]
    return statistics.mean(differences), statistics.stdev(differences) / math.sqrt(len(differences))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.shampoo_ablation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="char_lm", choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {list(VARIANTS)} (default all); "
                             f"{suite.REFERENCE} and {', '.join(BASELINES)} always run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="the suite's tiny setting (smoke test)")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds must be >= 2 (a seed std is reported), got {args.seeds}")
    selected = [name for name in args.variants.split(",") if name]
    unknown = [name for name in selected if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    names = [suite.REFERENCE, *BASELINES, *(name for name in VARIANTS if name in selected and name not in BASELINES)]
    torch.set_num_threads(1)
    task = TASKS[args.task](args.quick)
    for name, (label, build) in VARIANTS.items():
        if build is not None:
            suite.OPTIMIZERS[name] = suite.OptimizerChoice(label, build)
    losses = {}
    with _patched_rows():
        for name in names:
            losses[name] = [suite.train(task, name, seed)["val_loss"] for seed in range(args.seeds)]
            print(f"{name:24s} {statistics.mean(losses[name]):.4f} ± {statistics.stdev(losses[name]):.4f}",
                  flush=True)
    adamw, full = statistics.mean(losses[suite.REFERENCE]), statistics.mean(losses["shampoo32"])
    rows = [dict(variant=name, label=suite.OPTIMIZERS[name].label, mean=statistics.mean(values),
                 std=statistics.stdev(values), keeps=(adamw - statistics.mean(values)) / (adamw - full),
                 vs_shampoo4=_paired(values, losses[BASELINES[1]]))
            for name, values in losses.items()]
    payload = dict(task=args.task, seeds=args.seeds, val_losses=losses, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.shampoo_ablation.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# Shampoo 4-bit ablation — {args.task}, {args.seeds} seeds (CPU{', quick' if args.quick else ''})", "",
             "Validation loss mean ± seed std; keeps = share of 32-bit Shampoo's improvement over torch AdamW; "
             "Δ vs 4-bit = mean ± s.e. of the per-seed paired differences to Shampoo 4-bit with unrotated eigenvectors "
             "(negative: better).", "",
             "| variant | val loss | keeps | Δ vs 4-bit unrotated |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['mean']:.4f} ± {r['std']:.4f} | {r['keeps']:.0%} | "
              f"{r['vs_shampoo4'][0]:+.4f} ± {r['vs_shampoo4'][1]:.4f} |" for r in rows]
    (args.out / "quality.shampoo_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
