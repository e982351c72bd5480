"""Tasks of the quality suite. Every task needs no download: Python's own documentation (char-level LM), sklearn's
bundled digits, and MNIST-1D generated procedurally by ``mnist1d.data.make_dataset`` (never its downloading loader).

A task builds a fresh model from a seed, draws training batches from a seeded generator (the same batches in the same
order for every optimizer) and evaluates on a fixed held-out split.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit_compile.demo import CharData, CharTransformer, Config as CharConfig, lm_loss


@dataclasses.dataclass
class Task:
    name: str
    steps: int
    lr: float  # shared by every AdamW variant; other rules take their own shared default (see run.py)
    make_model: Callable[[], nn.Module]
    train_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    val_set: tuple[torch.Tensor, torch.Tensor]
    classification: bool
    data_info: dict

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


def _cross_entropy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(inputs), targets)


def _classification_task(name: str, x_train, y_train, x_val, y_val, make_model, steps: int, lr: float, batch: int,
                         data_info: dict) -> Task:
    def train_batch(generator: torch.Generator):
        rows = torch.randint(0, len(x_train), (batch,), generator=generator)
        return x_train[rows], y_train[rows]
    return Task(name, steps, lr, make_model, train_batch, _cross_entropy, (x_val, y_val), True, data_info)


def char_lm(quick: bool = False) -> Task:
    cfg = CharConfig(layers=1, d_model=32 if quick else 64, heads=2, context=32 if quick else 64,
                     batch=8 if quick else 16, steps=20 if quick else 300, lr=3e-3, warmup=0, eval_every=0,
                     eval_batches=2 if quick else 8)
    data = CharData.from_pydoc_topics()
    val_generator = torch.Generator().manual_seed(12345)
    val_batches = [data.batch(data.val, cfg.batch, cfg.context, val_generator, torch.device("cpu"))
                   for _ in range(cfg.eval_batches)]

    def train_batch(generator: torch.Generator):
        return data.batch(data.train, cfg.batch, cfg.context, generator, torch.device("cpu"))
    return Task("char_lm", cfg.steps, cfg.lr, lambda: CharTransformer(len(data.vocab), cfg), train_batch, lm_loss,
                ([x for x, _ in val_batches], [y for _, y in val_batches]), False,
                dict(text="pydoc_data.topics", text_sha256=data.sha256, characters=len(data.train) + len(data.val),
                     vocabulary=len(data.vocab), model=dataclasses.asdict(cfg)))


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, x_val, y_train, y_val


def digits_mlp(quick: bool = False) -> Task:
    x_train, x_val, y_train, y_val = _digits()
    hidden = 128

    def model():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, 10))
    return _classification_task("digits_mlp", x_train, y_train, x_val, y_val, model, 20 if quick else 300, 3e-3, 32,
                                dict(data="sklearn load_digits", train=len(x_train), val=len(x_val)))


def digits_cnn(quick: bool = False) -> Task:
    x_train, x_val, y_train, y_val = _digits()
    x_train, x_val = x_train[:, None], x_val[:, None]

    def model():
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, padding=1), nn.GELU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 64), nn.GELU(), nn.Linear(64, 10))
    return _classification_task("digits_cnn", x_train, y_train, x_val, y_val, model, 20 if quick else 300, 3e-3, 32,
                                dict(data="sklearn load_digits", train=len(x_train), val=len(x_val)))


def mnist1d_mlp(quick: bool = False) -> Task:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if quick:
        args.num_samples = 1000
    data = make_dataset(args)  # procedural, seeded by args.seed: no download
    x_train = torch.tensor(data["x"], dtype=torch.float32)
    x_val = torch.tensor(data["x_test"], dtype=torch.float32)
    y_train = torch.tensor(data["y"], dtype=torch.int64)
    y_val = torch.tensor(data["y_test"], dtype=torch.int64)
    width = x_train.shape[1]

    def model():
        return nn.Sequential(nn.Linear(width, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    return _classification_task("mnist1d_mlp", x_train, y_train, x_val, y_val, model, 20 if quick else 600, 3e-3,
                                64, dict(data="mnist1d.make_dataset (procedural)", generator_seed=args.seed,
                                         train=len(x_train), val=len(x_val)))


TASKS: dict[str, Callable[[bool], Task]] = {
    "char_lm": char_lm, "digits_mlp": digits_mlp, "digits_cnn": digits_cnn, "mnist1d_mlp": mnist1d_mlp}
