"""Optimizers: ``Optimizer`` runs any plain-Python update rule over block-quantized state; ``rules`` holds the
built-in rules; the drop-in classes take torch.optim's arguments plus ``bits``."""
from . import rules
from .classes import SGD, AdEMAMix, Adagrad, Adam, AdamW, Lion, RMSprop, state_formats
from .core import Optimizer, ParamGroup, PlainStorage, QuantizedStorage, StateReport, StateRow
from .efcp import EFGGT, EFMFAC
from .shampoo import Shampoo

__all__ = ["Optimizer", "ParamGroup", "StateReport", "StateRow", "QuantizedStorage", "PlainStorage", "rules",
           "Adam", "AdamW", "SGD", "Lion", "RMSprop", "Adagrad", "AdEMAMix", "state_formats", "EFMFAC", "EFGGT", "Shampoo"]
