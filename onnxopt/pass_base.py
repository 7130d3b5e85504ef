"""The pass contract: a small in-place onnx_ir pass with a name, options and a fidelity."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

import onnx_ir as ir

from .options import NoOptions
from .target import GENERIC, apply_defaults


class Fidelity(str, enum.Enum):
    """Whether a pass must keep outputs equal (lossless) or may change them (lossy)."""

    LOSSLESS = "lossless"
    LOSSY = "lossy"


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """onnx_ir's result plus statistics: snake_case keys with units (``nodes_removed``)."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class PassContext:
    """What the runner hands to a pass: calibration feeds, cached analyses and the target CPU.

    Passes ask the context for analyses instead of recomputing them; the runner
    invalidates the cache whenever a pass reports that it modified the model. ``target``
    (:class:`onnxopt.target.Target`) is the CPU whose kernels the model is for; without one,
    passes assume ``generic`` (choices exact on every ORT CPU kernel).
    """

    def __init__(self, feeds: list[dict[str, Any]] | None = None, progress: Any = None, target: Any = None):
        self.feeds = feeds or []
        self.progress = progress
        self.target = target
        self._analyses: dict[Any, Any] = {}

    def analysis(self, key: Any, compute):
        """Return the cached analysis ``key``, computing it with ``compute()`` on a miss."""
        if key not in self._analyses:
            self._analyses[key] = compute()
        return self._analyses[key]

    def value_shapes(self, model: ir.Model) -> dict:
        """name -> (shape, dtype) of every main-graph tensor, measured with ORT on the first feed."""
        from .split_measure import measure_value_shapes

        return self.analysis("value_shapes", lambda: measure_value_shapes(model, self.feeds))

    def node_latency(self, model: ir.Model) -> list[float]:
        """Seconds per run of each main-graph node (graph order), measured with ORT's profiler."""
        from .split_measure import measure_node_latency

        return self.analysis("node_latency", lambda: measure_node_latency(model, self.feeds))

    def invalidate(self) -> None:
        self._analyses.clear()


class Pass(ir.passes.InPlacePass):
    """Base of every onnxopt pass.

    Subclasses set ``name`` (kebab-case verb-object), ``Options`` (a frozen dataclass)
    and implement ``call(model) -> PassResult``. The first docstring line is the
    summary printed by ``onnxopt passes``. A pass never opens files, parses flags or
    creates ORT sessions; it keeps no state between calls.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    fidelity_of: ClassVar[Fidelity] = Fidelity.LOSSLESS
    # The runner measures this pass's speed-up in ORT after every change (onnxopt/speed.py).
    measures_speed: ClassVar[bool] = False

    def __init__(self, options: Any = None, context: PassContext | None = None, **kwargs: Any):
        if options is not None and kwargs:
            raise TypeError("pass either an options object or keyword options, not both")
        self.options = options if options is not None else self.Options(**kwargs)
        self.context = context if context is not None else PassContext()
        # Options left unset (``auto``/None) that the target decides: resolved here, so that
        # ``self.options`` are the options the pass runs with; ``kernel_choices`` says why.
        self.kernel_choices: dict[str, str] = {}
        defaults = self.target_defaults(self.target)
        if defaults:
            self.options, self.kernel_choices = apply_defaults(self.options, defaults, self.target)

    @property
    def target(self):
        """The context's target CPU, ``generic`` when the runner gave none."""
        return self.context.target or GENERIC

    def target_defaults(self, target) -> dict[str, tuple[Any, str]]:
        """Option name -> (value, why) for options this pass lets the target decide; {} by default."""
        return {}

    def speed_ladder(self) -> list[tuple[dict, str]]:
        """(option changes, label) placements to try, in order, when the result is too slow:
        each keeps more of ORT's float fusions. [] by default."""
        return []

    @property
    def fidelity(self) -> Fidelity:
        """Lossless or lossy for these options; override when it depends on them."""
        return self.fidelity_of

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
