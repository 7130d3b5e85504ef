"""Passes used only by the core tests: one correct, one lying, one breaking, one crashing."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt import Fidelity, Pass, PassResult
from onnxopt.registry import Registry


@dataclasses.dataclass(frozen=True)
class NoiseOptions:
    scale: float = dataclasses.field(default=0.01, metadata={"help": "relative noise added to weights"})


class RenameNodesPass(Pass):
    """Give every unnamed node a name (lossless, changes nothing numerically)."""

    name = "name-nodes"

    def call(self, model):
        count = 0
        for index, node in enumerate(model.graph):
            if not node.name:
                node.name = f"node_{index}"
                count += 1
        return PassResult(model, count > 0, {"nodes_named": count})


class PerturbWeightsPass(Pass):
    """Add relative noise to every float initializer (lossy)."""

    name = "perturb-weights"
    Options = NoiseOptions
    fidelity_of = Fidelity.LOSSY

    def call(self, model):
        rng = np.random.default_rng(0)
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if array.dtype == np.float32:
                noise = rng.standard_normal(array.shape).astype(np.float32) * self.options.scale * np.abs(array).max()
                value.const_value = ir.tensor(array + noise, name=value.name)
        return PassResult(model, True, {})


class BreakWeightsPass(PerturbWeightsPass):
    """Claims to be lossless but changes weights."""

    name = "break-weights"
    fidelity_of = Fidelity.LOSSLESS


class LyingPass(PerturbWeightsPass):
    """Changes the graph but says it did not."""

    name = "lying-pass"

    def call(self, model):
        extra = ir.node("Identity", [model.graph.outputs[0]], num_outputs=1)
        model.graph.append(extra)
        return PassResult(model, False, {})


class CrashPass(Pass):
    """Raises an unexpected exception."""

    name = "crash"

    def call(self, model):
        raise ZeroDivisionError("boom")


def core_registry() -> Registry:
    return Registry([RenameNodesPass, PerturbWeightsPass, BreakWeightsPass, LyingPass, CrashPass, RetypeToHalfPass],
                    {"tidy": ["name-nodes"]})


class RetypeToHalfPass(Pass):
    """Mutates value types in place (breaks the model): rollback must restore them."""

    name = "retype-half"
    fidelity_of = Fidelity.LOSSY

    def call(self, model):
        for node in model.graph:
            for out in node.outputs:
                out.dtype = ir.DataType.FLOAT16
        return PassResult(model, True, {})
