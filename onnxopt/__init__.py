"""onnxopt: rewrite ONNX graphs to make models smaller and faster, validated with ONNX Runtime."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "Fidelity", "InputError", "NoOptions", "OnnxoptError", "Pass", "PassContext", "PassCrashed", "PassResult",
    "PassSpec", "UnsafeExternalDataError", "UsageError", "ValidationFailed", "all_graphs", "all_nodes",
    "count_nodes", "parse_pipeline", "parse_recipe", "pipeline_text",
]

from .errors import (  # noqa: E402
    InputError,
    OnnxoptError,
    PassCrashed,
    UnsafeExternalDataError,
    UsageError,
    ValidationFailed,
)
from .graph_walk import all_graphs, all_nodes, count_nodes  # noqa: E402
from .options import NoOptions  # noqa: E402
from .pass_base import Fidelity, Pass, PassContext, PassResult  # noqa: E402
from .spec import PassSpec, parse_pipeline, parse_recipe, pipeline_text  # noqa: E402
