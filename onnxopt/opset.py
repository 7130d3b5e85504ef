"""The default-domain opset of a model, and upgrading it when a pass needs newer operators.

``ensure_opset`` tries onnxscript's version converter on the IR (it supports targets
18 and newer), then onnx's C++ version converter through a protobuf round trip at this
boundary. Either way the model object is updated in place, and a failure is a
``UsageError`` naming the versions involved, never a silently unconverted model.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from .errors import UsageError

_DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: ir.Model) -> int:
    """The model's default-domain (``ai.onnx``) opset version; 1 when it imports none."""
    for domain in _DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return int(model.opset_imports[domain])
    return 1


def min_ir_version(opset: int) -> int:
    """The smallest IR version that may carry ``opset`` of the default domain."""
    try:
        return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    except (ValueError, KeyError):  # newer than this onnx knows
        return onnx.IR_VERSION


def ensure_opset(model: ir.Model, minimum: int) -> bool:
    """Upgrade ``model`` in place to default opset ``minimum`` if it is older; return whether it did.

    Also raises the IR version to the minimum that opset needs. Functions are inlined
    by the converter when it has to rewrite them.
    """
    current = default_opset(model)
    if current >= minimum:
        return False
    if minimum > onnx.defs.onnx_opset_version():
        raise UsageError(
            f"opset {minimum} is needed but the installed onnx {onnx.__version__} knows only up to "
            f"opset {onnx.defs.onnx_opset_version()}"
        )
    errors = []
    converted = None
    try:
        converted = _convert_with_onnxscript(model, minimum)
    except Exception as exc:  # noqa: BLE001 - collected and reported below
        errors.append(f"onnxscript: {exc}")
    if converted is None:
        try:
            converted = _convert_with_onnx(model, minimum)
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(f"onnx: {exc}")
    if converted is None or default_opset(converted) < minimum:
        detail = "; ".join(errors) or "the converter left the opset unchanged"
        raise UsageError(
            f"cannot upgrade the model from opset {current} to opset {minimum}: {detail}. "
            f"Convert it with a newer exporter, or choose options that need opset {current} or less"
        )
    _replace_contents(model, converted)
    model.ir_version = max(model.ir_version, min_ir_version(minimum))
    return True


def _convert_with_onnxscript(model: ir.Model, target: int) -> ir.Model | None:
    try:
        from onnxscript.version_converter import convert_version
    except ImportError:
        return None
    if target < 18:  # onnxscript converts to 18 and newer only
        return None
    work = ir.from_proto(ir.to_proto(model))
    convert_version(work, target, fallback=False)
    return work if default_opset(work) >= target else None


def _convert_with_onnx(model: ir.Model, target: int) -> ir.Model:
    proto = ir.to_proto(model)
    converted = onnx.version_converter.convert_version(proto, target)
    return ir.from_proto(converted)


def _replace_contents(model: ir.Model, source: ir.Model) -> None:
    model.graph = source.graph  # opset_imports live on the graph
    model.functions.clear()
    model.functions.update(source.functions)
    if source.ir_version > model.ir_version:
        model.ir_version = source.ir_version
