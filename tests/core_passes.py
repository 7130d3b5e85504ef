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
    return Registry([RenameNodesPass, PerturbWeightsPass, BreakWeightsPass, LyingPass, CrashPass, RetypeToHalfPass,
                     PerturbMatMulsPass, PerturbMatMulsPromotablePass, DanglingInputPass],
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


@dataclasses.dataclass(frozen=True)
class NodeNoiseOptions:
    scale: float = 0.001
    loud_node: str = ""
    exclude_nodes: tuple[str, ...] = ()


class PerturbMatMulsPass(Pass):
    """Perturbs each MatMul's weight; the node named ``loud_node`` gets 1000x the noise.

    Honours ``exclude_nodes`` and reports ``quantized_nodes`` like a quantization pass,
    so the runner's mixed-precision fallback can keep nodes in float."""

    name = "perturb-matmuls"
    Options = NodeNoiseOptions
    fidelity_of = Fidelity.LOSSY

    def noise(self, node_name: str) -> float:
        return self.options.scale * (1000 if node_name == self.options.loud_node else 1)

    def call(self, model):
        import re

        rng = np.random.default_rng(0)
        touched = []
        for index, node in enumerate(model.graph):
            if node.op_type != "MatMul":
                continue
            if not node.name:
                node.name = f"MatMul_{index}"
            if any(re.search(p, node.name) for p in self.options.exclude_nodes):
                continue
            weight = node.inputs[1]
            array = weight.const_value.numpy()
            noisy = array + rng.standard_normal(array.shape).astype(np.float32) * self.noise(node.name) * np.abs(array).max()
            weight.const_value = ir.tensor(noisy, name=weight.name)
            touched.append(node.name)
        stats = {"quantized_nodes": touched}
        if hasattr(self.options, "promote_nodes"):
            stats["promoted_nodes"] = sorted(n for n in touched if self._promoted(n))
        return PassResult(model, bool(touched), stats)

    def _promoted(self, name: str) -> bool:
        import re

        return any(re.search(p, name) for p in getattr(self.options, "promote_nodes", ()))


@dataclasses.dataclass(frozen=True)
class PromotableNoiseOptions(NodeNoiseOptions):
    promote_nodes: tuple[str, ...] = ()
    promoted_gain: float = 0.01
    higher_gains: tuple[float, ...] = ()  # further rungs of the promotion ladder


class PerturbMatMulsPromotablePass(PerturbMatMulsPass):
    """Like perturb-matmuls; nodes named by ``promote_nodes`` get ``promoted_gain`` times the noise."""

    name = "perturb-matmuls-promotable"
    Options = PromotableNoiseOptions

    def noise(self, node_name: str) -> float:
        gain = self.options.promoted_gain if self._promoted(node_name) else 1.0
        return super().noise(node_name) * gain

    def promotion_ladder(self) -> list[tuple[dict, str]]:
        if self.options.promoted_gain >= 1:
            return []
        return [({}, "quieter noise")] + [({"promoted_gain": g}, f"gain {g:g}") for g in self.options.higher_gains]


class DanglingInputPass(Pass):
    """Adds a node reading a value no node produces (breaks the graph's structure)."""

    name = "dangle"

    def call(self, model):
        ghost = ir.Value(name="ghost", type=ir.TensorType(ir.DataType.FLOAT))
        model.graph.append(ir.node("Relu", [ghost], num_outputs=1))
        return PassResult(model, True, {})
