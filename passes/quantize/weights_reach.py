"""Where a stored weight ends up: the weight inputs it reaches, directly or through data-movement ops.

quantize-weights quantizes the weight input of MatMul (B), Gemm (B), Conv (W), Gather
(data) and LSTM/GRU/RNN (W, R). Exported models often reach those inputs through
Slice/Split/Concat/Transpose/Reshape/Squeeze/Unsqueeze/Identity (an LSTM's gates
reordered inside an If body); :func:`follow_weight` follows a stored weight through them and
traces which stored axis each consumer sees as its output-channel or reduction axis.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from .placement import DEFAULT_DOMAINS, constant_array

# (op_type, input index) of the weight input of each supported consumer.
RECURRENT = ("LSTM", "GRU", "RNN")  # W and R: [directions, gates x hidden, input or hidden]
WEIGHT_SLOTS = {("MatMul", 1), ("Gemm", 1), ("Conv", 1), ("Gather", 0)}
WEIGHT_SLOTS |= {(op, index) for op in RECURRENT for index in (1, 2)}
CONSUMER_OPS = frozenset(op for op, _ in WEIGHT_SLOTS)
# Ops whose output only selects and rearranges elements of their data input (input 0; any input of Concat).
DATA_MOVEMENT = ("Slice", "Split", "Concat", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity")


def weight_axes(node: ir.Node, rank: int) -> tuple[int | None, int | None]:
    """(output-channel axis, reduction axis) of the weight of ``node``; None when it has none."""
    if rank < 2:
        return None, None
    if node.op_type in RECURRENT:
        return (1, 2) if rank == 3 else (None, None)
    if node.op_type == "MatMul":
        return rank - 1, rank - 2
    if node.op_type == "Gemm":
        trans = node.attributes.get("transB")
        return (0, 1) if trans is not None and trans.as_int() else (1, 0)
    if node.op_type == "Conv":
        return 0, 1
    attr = node.attributes.get("axis")  # Gather: one scale per gathered slice
    channel = (attr.as_int() if attr is not None else 0) % rank
    return channel, rank - 1 if channel != rank - 1 else 0


# The stored weight's axis behind each axis of a tensor (None: an inserted axis); None when unknown.
Origin = tuple[int | None, ...] | None


@dataclasses.dataclass
class Reach:
    """Where a stored weight ends up: weight inputs reached through data-movement ops."""

    slots: list[tuple[ir.Node, int, Origin]] = dataclasses.field(default_factory=list)
    moved: bool = False  # some path crosses a data-movement op
    problem: str | None = None  # first use that is neither

    def consumers(self) -> list[ir.Node]:
        return list(dict.fromkeys(node for node, _, _ in self.slots))

    def stored_axis(self, which: int) -> int | None:
        """The stored axis that every consumer sees as its channel (0) or reduction (1) axis, if they agree."""
        axes = {_traced(node, origin, which) for node, _, origin in self.slots}
        return axes.pop() if len(axes) == 1 else None


def _traced(node: ir.Node, origin: Origin, which: int) -> int | None:
    if origin is None:
        return None
    axis = weight_axes(node, len(origin))[which]
    return None if axis is None else origin[axis]


def follow_weight(value: ir.Value, rank: int) -> Reach:
    """Follow ``value`` through data-movement ops to the weight inputs it feeds."""
    reach = Reach()
    stack: list[tuple[ir.Value, Origin]] = [(value, tuple(range(rank)))]
    while stack:
        current, origin = stack.pop()
        if current is not value and current.is_graph_output():
            op = current.producer().op_type
            reach.problem = reach.problem or f"reaches graph output '{current.name}' through {op}"
        for use in current.uses():
            node, index = use.node, use.idx
            default = node.domain in DEFAULT_DOMAINS
            if default and (node.op_type, index) in WEIGHT_SLOTS:
                reach.slots.append((node, index, origin))
            elif default and node.op_type in DATA_MOVEMENT and (index == 0 or node.op_type == "Concat"):
                reach.moved = True
                stack.extend((out, _moved(node, origin)) for out in node.outputs)
            else:
                reach.problem = reach.problem or f"also used by {node.op_type} '{node.name}' input {index}"
    return reach


def _moved(node: ir.Node, origin: Origin) -> Origin:
    """The stored axis behind each output axis of a data-movement node, given its data input's."""
    if origin is None or node.op_type in ("Slice", "Split", "Concat", "Identity"):
        return origin
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        order = perm.as_ints() if perm is not None else range(len(origin) - 1, -1, -1)
        return tuple(origin[p] for p in order)
    axes = _axes_operand(node)
    if node.op_type not in ("Squeeze", "Unsqueeze") or axes is None:
        return None  # Reshape (elements keep their order, axes do not), or axes unknown
    if node.op_type == "Squeeze":
        removed = {a % len(origin) for a in axes}
        return tuple(o for i, o in enumerate(origin) if i not in removed)
    rank = len(origin) + len(axes)
    inserted, rest = {a % rank for a in axes}, iter(origin)
    return tuple(None if i in inserted else next(rest) for i in range(rank))


def _axes_operand(node: ir.Node) -> list[int] | None:
    """The ``axes`` of Squeeze/Unsqueeze: attribute before opset 13, constant input after."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return list(attr.as_ints())
    array = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if array is None else [int(a) for a in array.reshape(-1)]
