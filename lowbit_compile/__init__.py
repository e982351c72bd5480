"""lowbit_compile: memory-efficient optimizers as a compiler problem."""
from .formats import (BF16, F32, Q4, Q8, Format, Plain, QTensor, Quantized, as_format, dequantize,
                      parse_spec, quantize)
from . import ops  # noqa: F401  (registers the lowbit:: anchor ops)
from . import backend  # noqa: F401  (registers backend="lowbit"/"lowbit_aot_eager" and lowbit::fused_update_)
from . import optim
from .report import compile_report
from .optim import Optimizer

__version__ = "0.1.0"

__all__ = ["F32", "BF16", "Q8", "Q4", "Format", "Plain", "Quantized", "QTensor", "quantize", "dequantize",
           "as_format", "parse_spec", "Optimizer", "optim", "compile_report"]
