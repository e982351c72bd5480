"""The main job: train a small character-level transformer with 32-bit torch AdamW and with our 32-, 8- and 4-bit
AdamW compiled through ``torch.compile(opt.step, backend="lowbit")``, then print a table and write a loss plot.

    python -m lowbit_compile.demo [--steps N] [--device cpu|cuda] [--optimizers torch,adamw32,adamw8,adamw4]
                                  [--quick] [--out DIR]

The text is Python's own documentation (``pydoc_data.topics``), so nothing is downloaded. Every optimizer starts
from the same initial weights and sees the same batches in the same order; only the optimizer differs.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    layers: int
    d_model: int
    heads: int
    context: int
    batch: int
    steps: int
    lr: float
    warmup: int
    eval_every: int
    eval_batches: int
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8


# Sized so that all four optimizers finish in under 4 minutes on 2 CPU cores with one torch thread (one training
# step of this model takes ~75 ms there). Every weight matrix has >= 4096 elements, so its state is really stored
# in 8/4 bits.
CPU_CONFIG = Config(layers=2, d_model=128, heads=4, context=64, batch=32, steps=500, lr=3e-3, warmup=50,
                    eval_every=100, eval_batches=8)
GPU_CONFIG = Config(layers=4, d_model=256, heads=8, context=128, batch=64, steps=2000, lr=2e-3, warmup=100,
                    eval_every=200, eval_batches=16)
# For tests: seconds, not minutes. With d_model=32 the MLP matrices have exactly 4096 elements, the smallest size
# whose state is quantized, and every other tensor is smaller: both state layouts are exercised.
QUICK_CONFIG = Config(layers=1, d_model=32, heads=2, context=32, batch=8, steps=30, lr=1e-2, warmup=3,
                      eval_every=10, eval_batches=2)


# --------------------------------------------------------------------------------------------------------------
# Data: Python's own documentation, character level
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CharData:
    vocab: str
    train: torch.Tensor  # int64 token ids
    val: torch.Tensor
    sha256: str

    @classmethod
    def from_pydoc_topics(cls, val_fraction: float = 0.1) -> "CharData":
        from pydoc_data.topics import topics

        text = "\n".join(topics[key] for key in sorted(topics))
        vocab = "".join(sorted(set(text)))
        index = {ch: i for i, ch in enumerate(vocab)}
        ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
        split = int(len(ids) * (1 - val_fraction))
        return cls(vocab, ids[:split], ids[split:], hashlib.sha256(text.encode("utf-8")).hexdigest())

    def batch(self, split: torch.Tensor, batch: int, context: int, generator: torch.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(split) - context - 1, (batch,), generator=generator)
        rows = torch.stack([split[s:s + context + 1] for s in starts.tolist()])
        rows = rows.to(device)
        return rows[:, :-1], rows[:, 1:]


# --------------------------------------------------------------------------------------------------------------
# Model: a pre-norm GPT-style decoder
# --------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp_in = nn.Linear(d_model, 4 * d_model)
        self.mlp_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.ln_attn(x)).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x))))


class CharTransformer(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.Sequential(*(Block(cfg.d_model, cfg.heads) for _ in range(cfg.layers)))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.ln_final(self.blocks(x)))


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------------------------------------------
# Optimizers under comparison
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OptimizerChoice:
    label: str
    build: Callable[[list[nn.Parameter], Config, torch.device], torch.optim.Optimizer]
    compiled: bool  # step runs through torch.compile(opt.step, backend="lowbit")


def _torch_adamw(params, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")


def _lowbit_adamw(bits: int):
    def build(params, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
        from lowbit_compile import optim

        return optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, bits=bits)
    return build


OPTIMIZERS: dict[str, OptimizerChoice] = {
    "torch": OptimizerChoice("torch AdamW fp32 (eager)", _torch_adamw, compiled=False),
    "adamw32": OptimizerChoice("lowbit AdamW 32-bit", _lowbit_adamw(32), compiled=True),
    "adamw8": OptimizerChoice("lowbit AdamW 8-bit", _lowbit_adamw(8), compiled=True),
    "adamw4": OptimizerChoice("lowbit AdamW 4-bit", _lowbit_adamw(4), compiled=True),
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (moments, codes, block scales, step counters)."""
    return sum(t.numel() * t.element_size() for per_param in opt.state.values() for t in per_param.values()
               if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    name: str
    label: str
    train_losses: list[float]
    val_curve: list[tuple[int, float]]  # (step, validation loss)
    final_train_loss: float  # mean of the last tenth of the steps: single batches are noisy
    val_loss: float
    state_bytes_per_param: float
    step_ms: float  # median forward + backward + optimizer step
    opt_step_ms: float  # median optimizer step alone
    compile_s: float  # first optimizer step minus a typical one: tracing and code generation
    graphs_compiled: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_cosine(cfg: Config) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to a tenth of the peak: the usual LR schedule for small transformers."""
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    loss = sum(lm_loss(model, x, y).item() for x, y in batches) / len(batches)
    model.train()
    return loss


def train_one(name: str, cfg: Config, data: CharData, device: torch.device, seed: int,
              progress: bool = True) -> RunResult:
    from tqdm import tqdm

    choice = OPTIMIZERS[name]
    torch.manual_seed(seed)
    model = CharTransformer(len(data.vocab), cfg).to(device)
    params = list(model.parameters())
    opt = choice.build(params, cfg, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg))
    step_fn = opt.step
    if choice.compiled:
        torch._dynamo.reset()
        step_fn = torch.compile(opt.step, backend="lowbit")
    torch._dynamo.utils.counters.clear()

    batches = torch.Generator().manual_seed(seed)  # the same batches in the same order for every optimizer
    val_batches = [data.batch(data.val, cfg.batch, cfg.context, torch.Generator().manual_seed(seed + 1 + i), device)
                   for i in range(cfg.eval_batches)]
    train_losses: list[float] = []
    val_curve: list[tuple[int, float]] = []
    step_times: list[float] = []
    opt_times: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"{choice.label:26s}", disable=not progress, leave=True, file=sys.stderr)
    for step in bar:
        inputs, targets = data.batch(data.train, cfg.batch, cfg.context, batches, device)
        _sync(device)
        started = time.perf_counter()
        loss = lm_loss(model, inputs, targets)
        loss.backward()
        _sync(device)
        opt_started = time.perf_counter()
        step_fn()
        _sync(device)
        finished = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        step_times.append(finished - started)
        opt_times.append(finished - opt_started)
        train_losses.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val_curve.append((step + 1, evaluate(model, val_batches)))
            bar.set_postfix(train=f"{train_losses[-1]:.3f}", val=f"{val_curve[-1][1]:.3f}")
    bar.close()

    typical_opt = statistics.median(opt_times[1:]) if len(opt_times) > 1 else opt_times[0]
    tail = train_losses[-max(1, cfg.steps // 10):]
    return RunResult(
        name=name, label=choice.label, train_losses=train_losses, val_curve=val_curve,
        final_train_loss=sum(tail) / len(tail), val_loss=val_curve[-1][1],
        state_bytes_per_param=state_bytes(opt) / sum(p.numel() for p in params),
        step_ms=1e3 * statistics.median(step_times[1:] or step_times),
        opt_step_ms=1e3 * typical_opt,
        compile_s=max(0.0, opt_times[0] - typical_opt) if choice.compiled else 0.0,
        graphs_compiled=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
TABLE_COLUMNS = ("optimizer", "final train loss", "val loss", "state B/param", "ms/step", "opt ms/step",
                 "compile s", "graphs")


def table_rows(results: list[RunResult]) -> list[tuple[str, ...]]:
    return [(r.label, f"{r.final_train_loss:.4f}", f"{r.val_loss:.4f}", f"{r.state_bytes_per_param:.3f}",
             f"{r.step_ms:.1f}", f"{r.opt_step_ms:.2f}", f"{r.compile_s:.1f}" if r.name != "torch" else "-",
             str(r.graphs_compiled) if r.name != "torch" else "-") for r in results]


def format_table(results: list[RunResult]) -> str:
    rows = [TABLE_COLUMNS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    line = lambda row: "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows[1:])])


def plot_losses(results: list[RunResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    line_styles = ("-", "--", "-.", ":")  # the curves nearly coincide: keep each one visible
    for i, r in enumerate(results):
        style = line_styles[i % len(line_styles)]
        losses = torch.tensor(r.train_losses)
        window = max(1, len(losses) // 50)
        smooth = losses.unfold(0, window, 1).mean(1)
        train_ax.plot(range(window, window + len(smooth)), smooth.tolist(), style, label=r.label, linewidth=1.2)
        val_ax.plot(*zip(*r.val_curve), style, marker="o", label=r.label)
    train_ax.set(title="training loss (moving average)", xlabel="step", ylabel="cross-entropy (nats/char)")
    val_ax.set(title="validation loss", xlabel="step", ylabel="cross-entropy (nats/char)")
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowbit_compile.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="training steps per optimizer (default: 500 on CPU, 2000 on GPU)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help=f"comma-separated subset of {','.join(OPTIMIZERS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny model (for tests)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="where the plot and results.json go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: half the cores it may use)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    unknown = [name for name in args.optimizers.split(",") if name not in OPTIMIZERS]
    if unknown:
        parser.error(f"--optimizers: unknown {unknown}; choose from {list(OPTIMIZERS)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        # Half the cores this process may use: torch's OpenMP threads spin-wait for each other, so when anything
        # else runs (an inductor compile worker, another job) a thread per core crawls: on 2 cores with one busy
        # neighbour, two threads made a training step of the default model many times slower than one.
        torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) // 2))
    cfg = QUICK_CONFIG if args.quick else GPU_CONFIG if device.type == "cuda" else CPU_CONFIG
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps, warmup=min(cfg.warmup, max(1, args.steps // 10)),
                                  eval_every=min(cfg.eval_every, args.steps))
    import lowbit_compile.backend  # noqa: F401  (registers backend="lowbit")

    data = CharData.from_pydoc_topics()
    names = args.optimizers.split(",")
    model_params = sum(p.numel() for p in CharTransformer(len(data.vocab), cfg).parameters())
    print(f"text: pydoc_data.topics, {len(data.train) + len(data.val):,} characters, sha256 {data.sha256[:16]}…, "
          f"vocabulary {len(data.vocab)}, train/val {len(data.train):,}/{len(data.val):,}")
    print(f"model: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, context {cfg.context}, "
          f"{model_params:,} parameters; {cfg.steps} steps of batch {cfg.batch}; device {device} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    results = [train_one(name, cfg, data, device, args.seed, progress=not args.no_progress) for name in names]

    table = format_table(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / "loss.png"
    plot_losses(results, plot_path, f"char-level transformer on pydoc_data.topics, {model_params:,} params, "
                                    f"{cfg.steps} steps, {device.type}")
    summary = dict(config=dataclasses.asdict(cfg), device=str(device), torch=torch.__version__,
                   text_sha256=data.sha256, parameters=model_params, table=table,
                   results=[dataclasses.asdict(r) for r in results])
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"plot: {plot_path}  results: {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
