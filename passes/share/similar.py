"""merge-similar-weights: merge weights equal within a tolerance, or up to a transpose or a scalar scale.

For every pair of float32 weights (initializers or Constant nodes, any graph; not graph
inputs/outputs) of at least ``min_elements`` elements, in model order, a later weight ``b``
is replaced by an earlier kept weight ``a`` when ``b ≈ a`` (``|b - a| <= atol + rtol·|a|``),
``b ≈ aᵀ`` (2-D, ``transpose=true``; rewritten ``Transpose(a)``), ``b ≈ s·a`` (``scale=true``;
rewritten ``Mul(a, s)``, ``s`` the least-squares scalar) or ``b ≈ s·aᵀ``. The kept copy is
moved to the innermost scope both readers see (see merge-identical-weights); the rewrite
ops live in ``b``'s scope. Lossy unless the weights were bit-identical: the runner checks
the result against the budget. A cheap fingerprint (sorted |w| / max |w| at a few
quantiles, which a transpose or a scale does not change) skips hopeless comparisons.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.naming import Namer
from onnxopt.pass_base import Fidelity, Pass, PassResult
from onnxopt.passes.quantize.weights_store import Store

from .identical import merge_into
from .scope import Scopes, Weight, put_first, stored_weights

NAME = "merge-similar-weights"


@dataclasses.dataclass(frozen=True)
class MergeSimilarWeightsOptions:
    rtol: float = dataclasses.field(default=1e-3, metadata={"help": "relative tolerance of an element"})
    atol: float = dataclasses.field(default=1e-6, metadata={"help": "absolute tolerance of an element"})
    transpose: bool = dataclasses.field(default=True, metadata={"help": "also merge a 2-D weight with a transposed one"})
    scale: bool = dataclasses.field(default=True, metadata={"help": "also merge a weight with a scalar multiple"})
    min_elements: int = dataclasses.field(default=16, metadata={"help": "leave weights with fewer elements"})

    def __post_init__(self):
        if self.rtol < 0 or self.atol < 0:
            raise ValueError(f"{NAME}: rtol and atol must be >= 0")


@dataclasses.dataclass
class _Kept:
    weight: Weight
    array: np.ndarray
    print_: np.ndarray


def _fingerprint(w: np.ndarray) -> np.ndarray:
    flat = np.sort(np.abs(w.reshape(-1).astype(np.float64)))
    top = flat[-1] if flat[-1] > 0 else 1.0
    return flat[np.linspace(0, flat.size - 1, 9).astype(int)] / top


class MergeSimilarWeightsPass(Pass):
    """Merge weights equal within rtol/atol, or up to a transpose or a scalar scale (Transpose/Mul)."""

    name = NAME
    Options = MergeSimilarWeightsOptions
    fidelity_of = Fidelity.LOSSY

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        scopes, namer = Scopes(model), Namer(model)
        stats: dict = {"initializers_merged": 0, "bytes_saved": 0, "merged": {}}
        kept: dict[tuple, list[_Kept]] = {}
        for weight in stored_weights(model):
            tensor = weight.tensor
            if tensor.dtype != ir.DataType.FLOAT or tensor.size < opts.min_elements or weight.fixed():
                continue
            array = weight.array()
            key = (id(scopes.root(weight.graph)), int(tensor.size))
            candidates = kept.setdefault(key, [])
            fingerprint = _fingerprint(array)
            for other in candidates:
                if not np.allclose(fingerprint, other.print_, rtol=10 * opts.rtol + 1e-3, atol=10 * opts.atol + 1e-3):
                    continue
                relation = self._relation(other.array, array)
                if relation is not None:
                    stats["merged"][weight.value.name] = self._describe(other.weight, *relation)
                    saved, other.weight = self._merge(scopes, namer, other.weight, weight, *relation)
                    stats["bytes_saved"] += saved
                    stats["initializers_merged"] += 1
                    break
            else:
                candidates.append(_Kept(weight, array, fingerprint))
        return PassResult(model, stats["initializers_merged"] > 0, stats)

    def _relation(self, a: np.ndarray, b: np.ndarray) -> tuple[bool, float] | None:
        """(transposed, scale) with ``b ≈ scale · (aᵀ if transposed else a)``, or None."""
        opts = self.options
        forms = [(False, a)] if a.shape == b.shape else []
        if opts.transpose and a.ndim == 2 and a.T.shape == b.shape:
            forms.append((True, a.T))
        for transposed, form in forms:
            if np.allclose(b, form, rtol=opts.rtol, atol=opts.atol):
                return transposed, 1.0
            if opts.scale:
                wide = form.astype(np.float64)
                energy = float(np.sum(wide * wide))
                s = float(np.sum(wide * b)) / energy if energy > 0 else 0.0
                if s != 0.0 and np.allclose(b, np.float32(s) * form, rtol=opts.rtol, atol=opts.atol):
                    return transposed, s
        return None

    @staticmethod
    def _describe(kept: Weight, transposed: bool, scale: float) -> str:
        parts = [kept.value.name] + (["transposed"] if transposed else []) + ([f"x {scale:.6g}"] if scale != 1.0 else [])
        return " ".join(parts)

    def _merge(self, scopes: Scopes, namer: Namer, kept: Weight, weight: Weight, transposed: bool,
               scale: float) -> tuple[int, Weight]:
        """Replace ``weight`` by ``kept`` (transposed, scaled); returns the bytes saved and the kept
        weight where it now lives."""
        target = scopes.common([kept.graph, weight.graph])
        if not transposed and scale == 1.0:
            shared, saved = merge_into(scopes, [kept, weight], namer, target=target)
            return saved, _stored(target, shared)
        shared, saved = merge_into(scopes, [kept], namer, target=target)
        store = Store(weight.graph, namer, weight.const_node is not None or isinstance(weight.graph, ir.Function))
        out = shared
        if transposed:
            out = store.op("Transpose", [out], {"perm": [1, 0]})
        if scale != 1.0:
            out = store.op("Mul", [out, store.const(f"{weight.value.name}_scale", ir.tensor(np.float32(scale)))])
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(weight.tensor.shape.numpy())
        store.insert(None)
        producer = shared.producer()
        if producer is not None and scopes.of_node(producer) is weight.graph:
            put_first(weight.graph, producer)  # the kept Constant goes before the ops reading it
        weight.value.replace_all_uses_with(out)
        weight.remove()
        return saved + weight.nbytes - store.nbytes, _stored(target, shared)


def _stored(scope, value: ir.Value) -> Weight:
    producer = value.producer()
    tensor = producer.attributes["value"].as_tensor() if producer is not None else value.const_value
    return Weight(scope, value, producer, tensor)
