"""Weight-only quantization (W8A16, W4A16) of the decoders: scheme, kernels, layers, GPTQ, whole models."""

from llm.quant.linear import Int4Linear, Int8Linear
from llm.quant.model import (DEFAULT_SKIP, CalibrationBatch, is_quantized, load_quantized, quantize_linear, quantize_model,
                             quantized_bytes, save_quantized)
from llm.quant.scheme import QuantScheme

__all__ = ["DEFAULT_SKIP", "CalibrationBatch", "Int4Linear", "Int8Linear", "QuantScheme", "is_quantized", "load_quantized",
           "quantize_linear", "quantize_model", "quantized_bytes", "save_quantized"]
