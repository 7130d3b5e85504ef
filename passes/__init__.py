"""The onnxopt pass library, installed as ``onnxopt.passes``.

``PASSES`` is the one explicit registry table (name -> class), in the order
``onnxopt passes`` lists them; ``FAMILIES`` maps a family name to its default
sub-pipeline; ``DISPATCH`` maps a name to the pass chosen by one of its options.
"""

from __future__ import annotations

from .cleanup import (
    EliminateCommonSubexpressionsPass,
    EliminateIdentitiesPass,
    FoldConstantsPass,
    InferShapesPass,
    LiftConstantsPass,
    RemoveUnusedPass,
    RewritePatternsPass,
    SortTopologicallyPass,
)
from .prune import DropPrunedInitializersPass, PruneChannelsPass, PruneWeightsPass
from .quantize import ConvertFloat16Pass, QuantizeDynamicPass, QuantizeStaticPass, QuantizeWeightsPass
from .share import ClipWeightsPass, ClusterWeightsPass, MergeIdenticalWeightsPass, MergeSimilarWeightsPass
from .split import SplitAtTensorsPass, SplitStagesPass, SplitSupportedOpsPass

PASSES: tuple = (
    # cleanup (lossless)
    LiftConstantsPass,
    FoldConstantsPass,
    RewritePatternsPass,
    EliminateIdentitiesPass,
    EliminateCommonSubexpressionsPass,
    RemoveUnusedPass,
    SortTopologicallyPass,
    InferShapesPass,
    # quantize (lossy)
    QuantizeStaticPass,
    QuantizeDynamicPass,
    QuantizeWeightsPass,
    ConvertFloat16Pass,
    # prune (lossy; lossless with lossless=true)
    PruneChannelsPass,
    PruneWeightsPass,
    DropPrunedInitializersPass,
    # share (merge-identical lossless; the others lossy)
    MergeIdenticalWeightsPass,
    MergeSimilarWeightsPass,
    ClusterWeightsPass,
    ClipWeightsPass,
    # split (lossless: partition marks only; `onnxopt split` exports the stages)
    SplitAtTensorsPass,
    SplitStagesPass,
    SplitSupportedOpsPass,
)

FAMILIES: dict[str, list[str]] = {
    "cleanup": [
        "lift-constants",
        "fold-constants",
        "rewrite-patterns",
        "eliminate-identities",
        "eliminate-common-subexpressions",
        "remove-unused",
        "sort-topologically",
    ],
    "prune": ["prune-channels", "drop-pruned-initializers"],
    "share": ["merge-identical-weights"],
}

# `-p quantize:mode=M,...` picks the pass for mode M; the other options go to that pass
# (the canonical pipeline text names the pass itself, e.g. `quantize-static:...`).
DISPATCH: dict[str, tuple[str, str, dict[str, str]]] = {
    "quantize": ("mode", "static", {
        "static": "quantize-static",
        "dynamic": "quantize-dynamic",
        "weights": "quantize-weights",
        "float16": "convert-float16",
    }),
}
