"""Loading and saving models safely.

Loading reads the protobuf without external data, checks every external-data reference
(confined to the model's directory: no ``..``, absolute paths, symlinks or hard links;
file present; offset/length inside it), makes sparse tensors dense (onnx_ir reads none)
and checks the graph's structure, then hands the model
to onnx_ir, whose external tensors are memory-mapped lazily. Saving writes to a
temporary file in the destination directory and renames it into place; models whose
weights would not fit a 2 GB protobuf are saved with external data.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .errors import InputError, UsageError
from .graph_checks import check_graph_structure, rename_duplicate_nodes, sort_nodes
from .external_data import check_external_data
from .sparse_tensors import densify_sparse

# Protobuf cannot exceed 2 GiB; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Writing external data: two threads (computing lazy tensors overlaps with writing), and
# at most this many bytes of materialized tensors held at once (plus one oversized tensor).
SAVE_WORKERS = 2
SAVE_MAX_IN_FLIGHT_BYTES = 256 << 20


def check_model_file(path: Path) -> None:
    """Refuse anything that is not a readable, non-empty regular file."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"model file not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot access model {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{path} is a directory, not an ONNX model file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path} is not a regular file (FIFO, socket or device); refusing to read it")
    if info.st_size == 0:
        raise InputError(f"{path} is empty (0 bytes), not an ONNX model")


def read_proto(path: str | os.PathLike, notes: list[str] | None = None) -> onnx.ModelProto:
    """The model protobuf without external data, after file and structure checks.

    Sparse tensors are made dense (sparse_tensors.py), nodes out of topological order are
    sorted and repeated node names made unique; ``notes`` receives one line for each such change."""
    path = Path(path)
    check_model_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read model {path}: {exc.strerror}") from None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path} is not a valid ONNX protobuf (truncated or corrupt): {exc}") from None
    del data
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise InputError(f"{path} does not contain an ONNX model (no graph or IR version)")
    _check_versions(proto, path)
    check_external_data(proto, path.parent)
    densified = densify_sparse(proto, path.parent, str(path))
    if notes is not None:
        notes.extend(densified)
    check_graph_structure(proto, path)
    reordered = sort_nodes(proto) + rename_duplicate_nodes(proto)
    if notes is not None:
        notes.extend(reordered)
    return proto


def _check_versions(proto: onnx.ModelProto, path: Path) -> None:
    if proto.ir_version > onnx.IR_VERSION:
        raise InputError(
            f"{path} uses IR version {proto.ir_version}, newer than this onnx supports ({onnx.IR_VERSION})"
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise InputError(
                f"{path} imports opset {opset.version}, newer than this onnx supports ({newest})"
            )


def load_model(path: str | os.PathLike, notes: list[str] | None = None) -> ir.Model:
    """Load a model as onnx_ir, external tensors memory-mapped lazily after safety checks.

    ``notes`` receives a line for each change made while loading (sparse tensors densified,
    nodes sorted)."""
    path = Path(path)
    proto = read_proto(path, notes)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises several types on malformed graphs
        raise InputError(f"{path} cannot be read as an ONNX graph: {exc}") from None
    ir.external_data.set_base_dir(model.graph, path.parent.resolve())
    return model


def _has_initializers_of(model: ir.Model, kinds: tuple[type, ...]) -> bool:
    from .graph_walk import all_graphs

    return any(isinstance(value.const_value, kinds)
               for graph in all_graphs(model) for value in getattr(graph, "initializers", {}).values())


def has_deferred_tensors(model: ir.Model) -> bool:
    """Initializers read from a file (external data) or computed on demand (lazy)."""
    return _has_initializers_of(model, (ir.ExternalTensor, ir.LazyTensor))


def weights_bytes(model: ir.Model) -> int:
    """Bytes of every initializer and Constant tensor, in all graphs (nothing is read)."""
    from .graph_walk import all_graphs

    total = 0
    for graph in all_graphs(model):
        for value in getattr(graph, "initializers", {}).values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain == "":
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                total += attr.value.nbytes
    return total


def needs_external_data(model: ir.Model) -> bool:
    """Weights over ~1.8 GB, or initializers computed lazily (streamed one by one, never all embedded)."""
    return weights_bytes(model) > EXTERNAL_DATA_THRESHOLD or _has_initializers_of(model, (ir.LazyTensor,))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    protect: tuple[str | os.PathLike, ...] = (),
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; never over a path listed in ``protect``.

    ``external_data=None`` decides by size: weights over ~1.8 GB go to ``<name>.data``
    beside the model (the only way past protobuf's 2 GB limit); so do models with lazily
    computed initializers (``ir.LazyTensor``, e.g. weights quantized from external data),
    which are computed and written one at a time instead of all embedded in one protobuf.
    External data is written by ``SAVE_WORKERS`` threads holding at most
    ``SAVE_MAX_IN_FLIGHT_BYTES`` of materialized tensors at once.
    """
    path = Path(path)
    for guarded in protect:
        if path.exists() and same_file(path, guarded):
            raise UsageError(f"refusing to overwrite the input model {guarded}; choose another -o path or pass --in-place")
    if path.exists() and path.is_dir():
        raise UsageError(f"output path {path} is a directory")
    directory = path.parent if str(path.parent) else Path(".")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"output directory {directory} is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    use_external = needs_external_data(model) if external_data is None else external_data
    data_name = path.name + ".data"
    if use_external:
        for guarded in protect:
            guarded_data = Path(guarded).parent / data_name
            if (directory / data_name).exists() and same_file(directory / data_name, guarded_data):
                raise UsageError(f"refusing to overwrite {guarded_data}, which the input model reads")
    def write(tmp_name: str) -> None:
        if use_external:
            ir.save(model, tmp_name, external_data=data_name, max_workers=SAVE_WORKERS,
                    max_in_flight_bytes=SAVE_MAX_IN_FLIGHT_BYTES)
        else:
            _save_inline(model, tmp_name)

    return write_atomically(path, write)


def write_atomically(path: Path, write) -> Path:
    """Call ``write(tmp_name)`` on a temporary file beside ``path``, then rename it into place
    (removed on any failure); the file gets the mode a plain open() would give it."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        write(tmp_name)
        os.chmod(tmp_name, default_file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def default_file_mode() -> int:
    """0o666 less the umask: what a plain open() would have created (mkstemp uses 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _save_inline(model: ir.Model, tmp_name: str) -> None:
    """Serialize with every tensor embedded: external tensors are read into the protobuf."""
    proto = ir.to_proto(model)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _proto_tensors(proto)):
        model = ir.external_data.load_to_model(model)
        proto = ir.to_proto(model)
    with open(tmp_name, "wb") as handle:
        handle.write(proto.SerializeToString())


def _proto_tensors(proto: onnx.ModelProto):
    from .external_data import iter_tensors

    return iter_tensors(proto)
