"""The default-domain opset of a model, and upgrading it when a pass needs newer operators.

``ensure_opset`` tries onnx's C++ version converter through a protobuf round trip at this
boundary, then onnxscript's IR version converter (targets 18 and newer; it inlines
functions). onnxscript 0.7 leaves some nodes unconverted without an error (Split's
``split`` attribute, 11 -> 18), so every result must pass onnx's checker before it
replaces the model in place. A failure is a ``UsageError`` naming the versions and each
converter's complaint, never a silently broken or unconverted model.
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

    Also raises the IR version to the minimum that opset needs. Raises ``UsageError`` when
    no converter produces a model that passes onnx's checker.
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
    for label, convert in (("onnx", _convert_with_onnx), ("onnxscript", _convert_with_onnxscript)):
        try:
            candidate = convert(model, minimum)
            if candidate is not None:
                _check(candidate, minimum)
                converted = candidate
                break
        except Exception as exc:  # noqa: BLE001 - every attempt's failure is reported below
            errors.append(f"{label}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    if converted is None:
        detail = "; ".join(errors) or "no converter available"
        raise UsageError(
            f"cannot upgrade the model from opset {current} to opset {minimum}: {detail}. "
            f"Convert it with a newer exporter, or choose options that need opset {current} or less"
        )
    _replace_contents(model, converted)
    model.ir_version = max(model.ir_version, min_ir_version(minimum))
    return True


def require_opset(model: ir.Model, needed: int, *, allow_upgrade: bool, refusal: str) -> str | None:
    """Make sure the model imports at least opset ``needed``: upgrade it in place (returns
    ``"old->new"``), or, when upgrades are not allowed, raise ``UsageError(refusal)``.
    Returns None when the model was already new enough.
    """
    current = default_opset(model)
    if needed <= current:
        return None
    if not allow_upgrade:
        raise UsageError(refusal.format(needed=needed, current=current))
    ensure_opset(model, needed)
    return f"{current}->{needed}"


def _convert_with_onnxscript(model: ir.Model, target: int) -> ir.Model | None:
    try:
        from onnxscript.version_converter import convert_version
    except ImportError:
        return None
    if target < 18:  # onnxscript converts to 18 and newer only
        return None
    work = _with_base_dir(ir.from_proto(ir.to_proto(model)), model)
    convert_version(work, target, fallback=False)
    return work if default_opset(work) >= target else None


def _convert_with_onnx(model: ir.Model, target: int) -> ir.Model:
    proto = ir.to_proto(model)
    converted = onnx.version_converter.convert_version(proto, target)
    if proto.functions and not converted.functions:  # the converter drops local functions
        converted.functions.extend(proto.functions)
    return _with_base_dir(ir.from_proto(converted), model)


def _external_base_dir(model: ir.Model) -> str | None:
    from .graph_walk import all_graphs

    for graph in all_graphs(model):
        for value in getattr(graph, "initializers", {}).values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return value.const_value.base_dir
    return None


def _with_base_dir(converted: ir.Model, original: ir.Model) -> ir.Model:
    """Protobuf round trips forget where external data lives: point it back at the original's directory."""
    base_dir = _external_base_dir(original)
    if base_dir:
        ir.external_data.set_base_dir(converted.graph, base_dir)
    return converted


def _check(model: ir.Model, minimum: int) -> None:
    """The converted model must have the opset and pass onnx's checker (converters can leave stale nodes)."""
    if default_opset(model) < minimum:
        raise ValueError(f"the converter left opset {default_opset(model)}")
    model.ir_version = max(model.ir_version, min_ir_version(minimum))
    from .verify import proto_for_checking

    onnx.checker.check_model(proto_for_checking(model))


def _replace_contents(model: ir.Model, source: ir.Model) -> None:
    model.graph = source.graph  # opset_imports live on the graph
    model.functions.clear()
    model.functions.update(source.functions)
    if source.ir_version > model.ir_version:
        model.ir_version = source.ir_version
