"""Tasks of the quality suite. Every task needs no download: Python's own documentation (char-level LM), sklearn's
bundled digits, and MNIST-1D generated procedurally by ``mnist1d.data.make_dataset`` (never its downloading loader).

A task builds a fresh model from a seed, draws training batches from a seeded generator (the same batches in the same
order for every optimizer) and evaluates on a fixed held-out split.

Every factory takes ``(quick=False, device="cpu", scale="small")``. Data, models and the validation split live on
``device``; batch indices are always drawn from the caller's CPU generator and only then moved, so the batch sequence
of a seed is the same on every device and for every optimizer. ``make_model`` builds the model on the CPU (from the
CPU generator that ``torch.manual_seed`` seeded) and then moves it: a seed's initial weights do not depend on the
device either. ``quick`` keeps the scale's models (tiny ones at small scale) and cuts training to 20 steps.

**Small** (the default; CPU, ~2 cores, one torch thread; ``benchmarks/results/quality.md``): the settings the suite
has always had. **Large** (one H100; ``benchmarks/results/quality_gpu.md``): the four tasks x torch_adamw, adamw32,
adamw8, adamw4, shampoo32, shampoo4 x 5 seeds = 120 runs took 377 + 272 s in two calls (char LM and digits MLP, then
digits CNN and MNIST-1D) with ``--compile``, 1-15 s a run. On a GPU these models are host-bound, not FLOP-bound: a
step costs its kernel launches (forward + backward ~1-2 ms, our compiled first-order step 0.6-1.4 ms — eagerly
14-34 ms, per-tensor launches —, Shampoo's eager per-step path 2-5.5 ms), so the settings buy quality by width (free on
the GPU) and spend the step budget where the task has data to use it:

- ``char_lm``: 2 layers, d_model 128, 4 heads, context 128, batch 32, 800 steps (small: 1 layer, d_model 64,
  context 64, batch 16, 300 steps): ~4x the tokens per step and 2.7x the steps; 16 validation batches of 32 x 128.
- ``digits_mlp``: hidden 512, batch 64, 600 steps (small: 128, 32, 300). sklearn's digits has 1347 training images,
  so more steps would only measure over-fitting (600 x 64 is ~28 epochs).
- ``digits_cnn``: channels 64/128, dense 256, batch 64, 600 steps (small: 32/64, 64, 32, 300); same data limit.
- ``mnist1d_mlp``: 20 000 generated samples (16 000 train / 4 000 validation, ~4 s to generate on one CPU core;
  small: the default 5 000), hidden 512, batch 128, 1500 steps (small: 256, 64, 600): the one task whose data grows,
  and the cheapest per step, so it takes the most steps.

Shampoo's statistics / inverse-root refresh periods T1 / T2 (``Task.shampoo``): small keeps T1=10, T2=20 at every
step count (30 statistics and 15 root refreshes in 300 steps: very frequent, which is what the 4-bit eigenvector
storage is stressed by). Large scales them with the steps: T1 = steps // 40, T2 = 5 T1 (char_lm 20/100, digits 15/75,
MNIST-1D 37/185), i.e. 40 statistics and 8 inverse-root refreshes per run, closer to a real run's ratio of step to
refresh cost while still refreshing often enough for the 4-bit storage to matter.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit_compile.demo import CharData, CharTransformer, Config as CharConfig, lm_loss

SCALES = ("small", "large")
QUICK_STEPS = 20
SMALL_SHAMPOO = dict(precondition_frequency=10, inverse_root_frequency=20)


def shampoo_frequencies(steps: int, scale: str) -> dict:
    """Shampoo's T1 / T2 for a run of ``steps`` at ``scale`` (see the module docstring)."""
    if scale == "small":
        return dict(SMALL_SHAMPOO)
    t1 = max(1, steps // 40)
    return dict(precondition_frequency=t1, inverse_root_frequency=5 * t1)


@dataclasses.dataclass
class Task:
    name: str
    steps: int
    lr: float  # shared by every AdamW variant; other rules take their own shared default (see run.py)
    make_model: Callable[[], nn.Module]  # on ``device``
    train_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # CPU generator -> device tensors
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    val_set: tuple[torch.Tensor, torch.Tensor]
    classification: bool
    data_info: dict
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    scale: str = "small"
    batch: int = 0
    shampoo: dict = dataclasses.field(default_factory=lambda: dict(SMALL_SHAMPOO))  # Shampoo's T1/T2 keywords
    model_info: dict = dataclasses.field(default_factory=dict)

    @property
    def settings(self) -> dict:
        """What a run of this task is (recorded in the results' environment)."""
        return dict(scale=self.scale, steps=self.steps, lr=self.lr, batch=self.batch, shampoo=dict(self.shampoo),
                    model=dict(self.model_info))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float | None]:
        """(validation loss, validation accuracy or None for the language model)."""
        model.eval()
        inputs, targets = self.val_set
        if self.classification:
            logits = model(inputs)
            result = F.cross_entropy(logits, targets).item(), (logits.argmax(1) == targets).float().mean().item()
        else:
            result = sum(self.loss(model, x, y).item() for x, y in zip(inputs, targets)) / len(inputs), None
        model.train()
        return result


def _check(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def _on(device: torch.device, build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Build on the CPU (the seeded CPU generator draws the weights), then move: same initial weights everywhere."""
    return lambda: build().to(device)


def _cross_entropy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(inputs), targets)


def _classification_task(name: str, x_train, y_train, x_val, y_val, make_model, steps: int, lr: float, batch: int,
                         data_info: dict, device: torch.device, scale: str, model_info: dict) -> Task:
    x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))

    def train_batch(generator: torch.Generator):
        rows = torch.randint(0, len(x_train), (batch,), generator=generator).to(device)
        return x_train[rows], y_train[rows]
    return Task(name, steps, lr, _on(device, make_model), train_batch, _cross_entropy, (x_val, y_val), True,
                data_info, device, scale, batch, shampoo_frequencies(steps, scale), model_info)


def char_lm(quick: bool = False, device: torch.device | str = "cpu", scale: str = "small") -> Task:
    _check(scale)
    device = torch.device(device)
    if scale == "small":
        cfg = CharConfig(layers=1, d_model=32 if quick else 64, heads=2, context=32 if quick else 64,
                         batch=8 if quick else 16, steps=QUICK_STEPS if quick else 300, lr=3e-3, warmup=0,
                         eval_every=0, eval_batches=2 if quick else 8)
    else:
        cfg = CharConfig(layers=2, d_model=128, heads=4, context=128, batch=32, steps=QUICK_STEPS if quick else 800,
                         lr=3e-3, warmup=0, eval_every=0, eval_batches=2 if quick else 16)
    data = CharData.from_pydoc_topics()
    train_ids, val_ids = data.train.to(device), data.val.to(device)
    offsets = torch.arange(cfg.context + 1, device=device)

    def windows(split: torch.Tensor, generator: torch.Generator):
        # The draw of CharData.batch (same generator calls, same windows), gathered on the device.
        starts = torch.randint(0, len(split) - cfg.context - 1, (cfg.batch,), generator=generator)
        rows = split[starts.to(device)[:, None] + offsets]
        return rows[:, :-1], rows[:, 1:]

    val_generator = torch.Generator().manual_seed(12345)
    val_batches = [windows(val_ids, val_generator) for _ in range(cfg.eval_batches)]
    return Task("char_lm", cfg.steps, cfg.lr, _on(device, lambda: CharTransformer(len(data.vocab), cfg)),
                lambda generator: windows(train_ids, generator), lm_loss,
                ([x for x, _ in val_batches], [y for _, y in val_batches]), False,
                dict(text="pydoc_data.topics", text_sha256=data.sha256, characters=len(data.train) + len(data.val),
                     vocabulary=len(data.vocab), model=dataclasses.asdict(cfg)),
                device, scale, cfg.batch, shampoo_frequencies(cfg.steps, scale),
                dict(layers=cfg.layers, d_model=cfg.d_model, heads=cfg.heads, context=cfg.context,
                     eval_batches=cfg.eval_batches))


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, x_val, y_train, y_val


def digits_mlp(quick: bool = False, device: torch.device | str = "cpu", scale: str = "small") -> Task:
    _check(scale)
    x_train, x_val, y_train, y_val = _digits()
    hidden, batch, steps = (128, 32, 300) if scale == "small" else (512, 64, 600)

    def model():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, 10))
    return _classification_task("digits_mlp", x_train, y_train, x_val, y_val, model, QUICK_STEPS if quick else steps,
                                3e-3, batch, dict(data="sklearn load_digits", train=len(x_train), val=len(x_val)),
                                torch.device(device), scale, dict(hidden=hidden))


def digits_cnn(quick: bool = False, device: torch.device | str = "cpu", scale: str = "small") -> Task:
    _check(scale)
    x_train, x_val, y_train, y_val = _digits()
    x_train, x_val = x_train[:, None], x_val[:, None]
    (c1, c2, dense), batch, steps = ((32, 64, 64), 32, 300) if scale == "small" else ((64, 128, 256), 64, 600)

    def model():
        return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.GELU(), nn.Conv2d(c1, c2, 3, padding=1), nn.GELU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 16, dense), nn.GELU(),
                             nn.Linear(dense, 10))
    return _classification_task("digits_cnn", x_train, y_train, x_val, y_val, model, QUICK_STEPS if quick else steps,
                                3e-3, batch, dict(data="sklearn load_digits", train=len(x_train), val=len(x_val)),
                                torch.device(device), scale, dict(channels=[c1, c2], dense=dense))


def mnist1d_mlp(quick: bool = False, device: torch.device | str = "cpu", scale: str = "small") -> Task:
    _check(scale)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if quick:
        args.num_samples = 1000
    elif scale == "large":
        args.num_samples = 20000
    data = make_dataset(args)  # procedural, seeded by args.seed: no download
    x_train = torch.tensor(data["x"], dtype=torch.float32)
    x_val = torch.tensor(data["x_test"], dtype=torch.float32)
    y_train = torch.tensor(data["y"], dtype=torch.int64)
    y_val = torch.tensor(data["y_test"], dtype=torch.int64)
    width = x_train.shape[1]
    hidden, batch, steps = (256, 64, 600) if scale == "small" else (512, 128, 1500)

    def model():
        return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, 10))
    return _classification_task("mnist1d_mlp", x_train, y_train, x_val, y_val, model, QUICK_STEPS if quick else steps,
                                3e-3, batch, dict(data="mnist1d.make_dataset (procedural)", generator_seed=args.seed,
                                                  num_samples=args.num_samples, train=len(x_train), val=len(x_val)),
                                torch.device(device), scale, dict(hidden=hidden))


TASKS: dict[str, Callable[..., Task]] = {
    "char_lm": char_lm, "digits_mlp": digits_mlp, "digits_cnn": digits_cnn, "mnist1d_mlp": mnist1d_mlp}
