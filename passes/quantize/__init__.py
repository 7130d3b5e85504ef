"""Quantization passes (lossy): static QDQ, dynamic, weight-only and float16."""

from .dynamic import QuantizeDynamicPass
from .float16 import ConvertFloat16Pass
from .static import QuantizeStaticPass
from .weights import QuantizeWeightsPass

__all__ = ["ConvertFloat16Pass", "QuantizeDynamicPass", "QuantizeStaticPass", "QuantizeWeightsPass"]
