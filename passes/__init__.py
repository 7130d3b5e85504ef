"""The onnxopt pass library, installed as ``onnxopt.passes``.

``PASSES`` is the one explicit registry table (name -> class), in the order
``onnxopt passes`` lists them; ``FAMILIES`` maps a family name to its default
sub-pipeline.
"""

from __future__ import annotations

from .cleanup import (
    EliminateCommonSubexpressionsPass,
    EliminateIdentitiesPass,
    InferShapesPass,
    RemoveUnusedPass,
    SortTopologicallyPass,
)
from .cleanup_fold import FoldConstantsPass
from .float16 import ConvertFloat16Pass
from .quantize_weights import QuantizeWeightsPass

PASSES: tuple = (
    # cleanup (lossless)
    FoldConstantsPass,
    EliminateIdentitiesPass,
    EliminateCommonSubexpressionsPass,
    RemoveUnusedPass,
    SortTopologicallyPass,
    InferShapesPass,
    # quantize (lossy)
    QuantizeWeightsPass,
    ConvertFloat16Pass,
)

FAMILIES: dict[str, list[str]] = {
    "cleanup": [
        "fold-constants",
        "eliminate-identities",
        "eliminate-common-subexpressions",
        "remove-unused",
        "sort-topologically",
    ],
}
