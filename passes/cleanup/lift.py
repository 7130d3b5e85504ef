"""lift-constants: onnx_ir's LiftConstantsToInitializersPass, over every graph.

Exporters such as Paddle2ONNX keep every weight in a ``Constant`` node; as initializers they
are one less node each, and every later pass (folding, pattern rewrites) reads them directly.
onnx_ir's pass already visits If/Loop/Scan bodies (a body's constant becomes that body's
initializer) and lifts every form (``value``, ``value_ints``, ``value_string``...).

Below IR version 4 an initializer must also be a graph input, so nothing is lifted (lifting
would add inputs to the model's signature). Constants inside functions stay nodes (a
function cannot hold initializers), and so does a constant that is itself a graph output;
both count in ``constants_kept``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

import onnxopt


def _is_constant(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


class LiftConstantsPass(onnxopt.Pass):
    """Turn Constant nodes into initializers, in the main graph and every If/Loop/Scan body."""

    name = "lift-constants"

    @dataclasses.dataclass(frozen=True)
    class Options:
        size_limit: int = field(
            default=0,
            metadata={"help": "lift only constants of at least this many elements (0: all)"},
        )

        def __post_init__(self):
            if self.size_limit < 0:
                raise ValueError("size_limit must be >= 0")

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        total = sum(1 for node in onnxopt.all_nodes(model) if _is_constant(node))
        if model.ir_version is not None and model.ir_version >= 4:
            LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=self.options.size_limit)(model)
        kept = sum(1 for node in onnxopt.all_nodes(model) if _is_constant(node))
        # Lifting is all onnx_ir's pass does: one Constant node out, one initializer in.
        lifted = total - kept
        stats = {"constants_lifted": lifted, "constants_kept": kept, "initializers_added": lifted}
        return onnxopt.PassResult(model, lifted > 0, stats)
