"""Triton source templates: block codecs (``codecs``) and the kernels generated from them.

Importing this package imports Triton: on a machine without a GPU set ``TRITON_INTERPRET=1`` before that.
"""
from .codecs import (MAP_DYNAMIC, MAP_LINEAR, MAP_LINEAR2, codec_constants, codec_tables, dequantize,
                     dequantize_into, encode_normalized, quantize, quantize_into)

__all__ = ["MAP_DYNAMIC", "MAP_LINEAR", "MAP_LINEAR2", "codec_constants", "codec_tables", "quantize",
           "quantize_into", "dequantize", "dequantize_into", "encode_normalized"]
