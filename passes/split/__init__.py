"""Split passes (lossless): mark partitions; ``onnxopt split`` exports them as standalone stage models."""

from .at_tensors import SplitAtTensorsPass
from .stages import SplitStagesPass
from .supported_ops import SplitSupportedOpsPass

__all__ = ["SplitAtTensorsPass", "SplitStagesPass", "SplitSupportedOpsPass"]
