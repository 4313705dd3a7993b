"""The stock TensorFlow Serving protos, and numpy <-> ``TensorProto`` conversion without TF.

The service speaks ``tensorflow.serving.PredictionService`` with the generated modules that
the ``tensorflow-serving-api`` wheel ships (not a look-alike), so any TF-Serving client
works against it. Those modules import the TensorFlow framework protos
(``tensorflow.core.framework.tensor_pb2`` and friends), which only the TensorFlow wheel
provides; importing them the ordinary way first runs ``tensorflow/__init__.py``: 9 s and
~3,600 modules on this machine, for a client that sends one picture.

:func:`protos` therefore imports the stock generated files without executing TensorFlow's
package initialiser: for the duration of the import it puts a bare package module named
``tensorflow`` (whose ``__path__`` is the installed TensorFlow folder) into
``sys.modules``, imports the ``*_pb2`` files (plain generated code; ``tensorflow.core`` and
its sub-packages have empty ``__init__.py`` files) and then removes the bare module again.
The loaded proto modules stay registered, so a later ``import tensorflow`` in the same
process finds them, reuses them (no double registration in the descriptor pool) and
initialises normally (tested in ``tests/test_service.py``). If TensorFlow is already
imported, the ordinary import is used. Loading takes ~0.15 s.

The tensor helpers here replace ``tf.make_tensor_proto`` / ``tf.make_ndarray`` for the two
kinds of tensors the service exchanges (float arrays and encoded image strings) and a few
numeric types clients commonly send.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tessera.errors import TesseraError

_LOCK = threading.Lock()
_NS: types.SimpleNamespace | None = None

_MODULES = {
    "predict_pb2": "tensorflow_serving.apis.predict_pb2",
    "get_model_metadata_pb2": "tensorflow_serving.apis.get_model_metadata_pb2",
    "model_pb2": "tensorflow_serving.apis.model_pb2",
    "prediction_service_pb2_grpc": "tensorflow_serving.apis.prediction_service_pb2_grpc",
    "tensor_pb2": "tensorflow.core.framework.tensor_pb2",
    "tensor_shape_pb2": "tensorflow.core.framework.tensor_shape_pb2",
    "types_pb2": "tensorflow.core.framework.types_pb2",
    "meta_graph_pb2": "tensorflow.core.protobuf.meta_graph_pb2",
}

INSTALL_HINT = (
    "the gRPC service needs grpcio, the TensorFlow framework protos (tensorflow-cpu) and "
    "tensorflow-serving-api; install with: pip install 'tessera[serve]' && pip install "
    "--no-deps 'tensorflow-serving-api>=2.16,<2.22' (its wheel requires the `tensorflow` "
    "package, which would install a second copy of TensorFlow next to tensorflow-cpu)"
)


def protos() -> types.SimpleNamespace:
    """The stock generated modules, as attributes named like the modules (``predict_pb2``...)."""
    global _NS
    with _LOCK:
        if _NS is None:
            _NS = _load()
        return _NS


def _load() -> types.SimpleNamespace:
    stub: types.ModuleType | None = None
    if "tensorflow" not in sys.modules:
        spec = importlib.util.find_spec("tensorflow")
        if spec is None or not spec.submodule_search_locations:
            raise TesseraError(f"TensorFlow framework protos not found; {INSTALL_HINT}")
        stub = types.ModuleType("tensorflow")
        stub.__path__ = list(spec.submodule_search_locations)
        stub.__spec__ = importlib.machinery.ModuleSpec("tensorflow", None, is_package=True)
        stub.__spec__.submodule_search_locations = stub.__path__
        sys.modules["tensorflow"] = stub
    try:
        loaded = {short: importlib.import_module(full) for short, full in _MODULES.items()}
    except ImportError as exc:
        raise TesseraError(f"cannot import the TF-Serving protos ({exc}); {INSTALL_HINT}") from None
    finally:
        if stub is not None and sys.modules.get("tensorflow") is stub:
            del sys.modules["tensorflow"]
    return types.SimpleNamespace(**loaded)


# --------------------------------------------------------------------------- tensors
def _float_types() -> dict[int, np.dtype]:
    t = protos().types_pb2
    return {
        t.DT_FLOAT: np.dtype("<f4"),
        t.DT_DOUBLE: np.dtype("<f8"),
        t.DT_HALF: np.dtype("<f2"),
        t.DT_INT32: np.dtype("<i4"),
        t.DT_INT64: np.dtype("<i8"),
        t.DT_UINT8: np.dtype("u1"),
    }


_VAL_FIELDS = {
    "float_val": "<f4",
    "double_val": "<f8",
    "int_val": "<i4",
    "int64_val": "<i8",
}


def dtype_name(dtype: int) -> str:
    """``DT_FLOAT`` for 1, for error messages that say what was sent."""
    try:
        return protos().types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"dtype {dtype}"


def tensor_shape(tp: Any) -> list[int]:
    """The shape of a ``TensorProto`` (unknown_rank reads as a scalar)."""
    return [int(d.size) for d in tp.tensor_shape.dim]


def to_ndarray(tp: Any, content: memoryview | None = None) -> np.ndarray | list[bytes]:
    """``TensorProto`` -> float/int ndarray, or a flat list of bytes for ``DT_STRING``.

    ``content``: the tensor's ``tensor_content`` when it was kept out of ``tp`` (see
    :func:`parse_predict_request`); the array is then a view of it. Raises
    :class:`ValueError` with a message naming the problem (wrong element count,
    unsupported dtype); the service turns it into INVALID_ARGUMENT.
    """
    t = protos().types_pb2
    shape = tensor_shape(tp)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {shape} has an unknown (negative) dimension")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if tp.dtype == t.DT_STRING:
        vals = list(tp.string_val)
        if len(vals) != count:
            raise ValueError(f"DT_STRING tensor of shape {shape} holds {len(vals)} strings")
        return vals
    dtypes = _float_types()
    if tp.dtype not in dtypes:
        raise ValueError(
            f"unsupported tensor dtype {dtype_name(tp.dtype)}; send DT_STRING (encoded image) "
            "or DT_FLOAT"
        )
    dt = dtypes[tp.dtype]
    # Every read of a bytes field makes a new copy of it (600 kB for a 224x224x3 float
    # input), so the content is read once and the array is a view of that copy.
    if content is None:
        content = memoryview(tp.tensor_content)
    if content:
        if content.nbytes != count * dt.itemsize:
            raise ValueError(
                f"tensor_content holds {content.nbytes} bytes, shape {shape} of "
                f"{dtype_name(tp.dtype)} needs {count * dt.itemsize}"
            )
        arr = np.frombuffer(content, dtype=dt)
    else:
        arr = _from_val_fields(tp, dt, count)
    return arr.reshape(shape)


def _from_val_fields(tp: Any, dt: np.dtype, count: int) -> np.ndarray:
    t = protos().types_pb2
    if tp.dtype == t.DT_HALF:
        # half_val carries the float16 bit patterns in int32 slots.
        vals = np.array(tp.half_val, dtype=np.uint16).view(np.float16)
    else:
        field = {
            t.DT_FLOAT: "float_val",
            t.DT_DOUBLE: "double_val",
            t.DT_INT32: "int_val",
            t.DT_UINT8: "int_val",
            t.DT_INT64: "int64_val",
        }[tp.dtype]
        vals = np.array(getattr(tp, field), dtype=_VAL_FIELDS[field]).astype(dt)
    if len(vals) == count:
        return vals
    # TF semantics: a shorter list is padded with its last value (one value fills all).
    if 0 < len(vals) < count:
        return np.concatenate([vals, np.full(count - len(vals), vals[-1], dtype=vals.dtype)])
    if count == 0 and len(vals) == 0:
        return vals
    raise ValueError(f"tensor of {count} elements carries {len(vals)} values")


def from_ndarray(value: np.ndarray | list[bytes] | bytes, into: Any = None) -> Any:
    """ndarray (float32 or other numbers) or encoded bytes -> ``TensorProto``.

    Floats travel as little-endian ``tensor_content`` (what ``tf.make_tensor_proto`` does
    for arrays), the compact form; bytes become a ``DT_STRING`` tensor of shape [n].
    ``into``: an empty ``TensorProto`` inside a message (``response.outputs[name]``) to fill
    in place: building a separate tensor and ``CopyFrom``-ing it would copy the content
    once more, and every copy of a large tensor is a fresh allocation of its size.
    """
    p = protos()
    tp = p.tensor_pb2.TensorProto() if into is None else into
    if isinstance(value, (bytes, bytearray)):
        value = [bytes(value)]
    if isinstance(value, list):
        tp.dtype = p.types_pb2.DT_STRING
        tp.tensor_shape.dim.add(size=len(value))
        tp.string_val.extend(bytes(v) for v in value)
        return tp
    tp.tensor_content = _numeric_header(value, tp).tobytes()
    return tp


def _numeric_header(value: np.ndarray, tp: Any) -> np.ndarray:
    """Set ``tp``'s dtype and shape for ``value``; the data as a contiguous little-endian
    array (``value`` itself when it is one already), other dtypes as float32."""
    t = protos().types_pb2
    arr = np.asarray(value)
    kinds = {"f4": t.DT_FLOAT, "f8": t.DT_DOUBLE, "f2": t.DT_HALF, "i4": t.DT_INT32}
    kinds.update({"i8": t.DT_INT64, "u1": t.DT_UINT8})
    key = f"{arr.dtype.kind}{arr.dtype.itemsize}"
    if key not in kinds:
        arr = arr.astype(np.float32)
        key = "f4"
    tp.dtype = kinds[key]
    for d in arr.shape:
        tp.tensor_shape.dim.add(size=int(d))
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))


# --------------------------------------------------------------------------- wire format
#: Field numbers of the stock protos: ``PredictRequest.inputs`` (a map, sent as entries
#: with the key as field 1 and the value as field 2) and ``TensorProto.tensor_content``.
_PREDICT_INPUTS = 2
_MAP_KEY = 1
_MAP_VALUE = 2
_TENSOR_CONTENT = 4


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_prefix(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(length)


def serialize_predict_request(request: Any, arrays: dict[str, np.ndarray]) -> bytes:
    """``request`` (a ``PredictRequest`` without these inputs) serialised with ``arrays`` as
    its inputs, the same bytes a ``PredictRequest`` holding them would parse from.

    Each array's data is copied once, straight into the message. Filling the request's
    tensors and serialising it copies a 600 kB input four times (``tobytes``, into the
    message, the encoder's buffer, the result), ~0.1 ms on the critical path of every
    float request. The protobuf wire format is a specification: a message is its fields
    one after another, a map entry a small message of key and value, so the input tensors
    are written around the array's own buffer.
    """
    parts: list[bytes | memoryview] = [request.SerializeToString()]
    tensor_cls = protos().tensor_pb2.TensorProto
    for name, value in arrays.items():
        header = tensor_cls()
        data = memoryview(_numeric_header(value, header).reshape(-1)).cast("B")
        tensor = [header.SerializeToString(), _length_prefix(_TENSOR_CONTENT, data.nbytes), data]
        key = name.encode()
        tensor_len = sum(len(x) for x in tensor)
        entry = [_length_prefix(_MAP_KEY, len(key)), key, _length_prefix(_MAP_VALUE, tensor_len)]
        entry_len = sum(len(x) for x in entry) + tensor_len
        parts += [_length_prefix(_PREDICT_INPUTS, entry_len), *entry, *tensor]
    return b"".join(parts)


#: Fields a message level may have before the request goes to the stock parser instead (a
#: real request has a handful; values sent unpacked, one field each, could be millions).
_MAX_FIELDS = 1024


@dataclass(frozen=True)
class ParsedPredict:
    """A ``PredictRequest`` whose inputs' ``tensor_content`` stayed in the received message:
    ``request`` holds everything else, ``contents`` those bytes as views, by input name."""

    request: Any
    contents: dict[str, memoryview]


def parse_predict_request(data: bytes) -> ParsedPredict:
    """``PredictRequest.FromString(data)`` without copying the input tensors' data.

    The stock parser copies each ``tensor_content`` into the message, and every read of
    the field copies it again: two copies of a 600 kB input, ~0.3 ms of the request's
    critical path here. Here the request is parsed from the message minus those fields,
    and the contents are views of ``data``. Anything this reader does not handle (groups,
    a map entry with a repeated key or value, malformed bytes, more than
    :data:`_MAX_FIELDS` fields, which Python would walk slowly) goes to the stock parser,
    which decides as it always did.
    """
    request_cls = protos().predict_pb2.PredictRequest
    try:
        rest, contents = _split_contents(memoryview(data))
    except ValueError:
        return ParsedPredict(request_cls.FromString(data), {})
    return ParsedPredict(request_cls.FromString(rest), contents)


def _split_contents(view: memoryview) -> tuple[bytes, dict[str, memoryview]]:
    """The request's bytes without its inputs' ``tensor_content``, and those contents."""
    parts: list[memoryview | bytes] = []
    contents: dict[str, memoryview] = {}
    for field, start, body, end in _fields(view, 0, len(view)):
        if len(parts) > _MAX_FIELDS:
            raise ValueError("too many fields for this reader")
        if field != (_PREDICT_INPUTS, 2):
            parts.append(view[start:end])
            continue
        key_field, key, tensor_body, tensor_end = _map_entry(view, body, end)
        # A later entry of the same key replaces an earlier one, as in protobuf.
        contents.pop(key, None)
        tensor: list[memoryview] = []
        for tfield, tstart, tbody, tend in _fields(view, tensor_body, tensor_end):
            if tfield == (_TENSOR_CONTENT, 2):
                contents[key] = view[tbody:tend]  # the last one counts, as in protobuf
            else:
                tensor.append(view[tstart:tend])
            if len(tensor) > _MAX_FIELDS:
                raise ValueError("too many fields for this reader")
        if key not in contents:
            parts.append(view[start:end])
            continue
        tensor_len = sum(x.nbytes for x in tensor)
        entry = [key_field, _length_prefix(_MAP_VALUE, tensor_len), *tensor]
        parts += [_length_prefix(_PREDICT_INPUTS, sum(len(x) for x in entry)), *entry]
    return b"".join(parts), contents


def _map_entry(view: memoryview, start: int, end: int) -> tuple[memoryview, str, int, int]:
    """A string-keyed map entry: its key field, the key, and the span of its value."""
    key_field: memoryview | None = None
    key = ""
    value: tuple[int, int] | None = None
    for field, fstart, body, fend in _fields(view, start, end):
        if field == (_MAP_KEY, 2) and key_field is None:
            key_field = view[fstart:fend]
            key = bytes(view[body:fend]).decode()  # invalid UTF-8: ValueError
        elif field == (_MAP_VALUE, 2) and value is None:
            value = (body, fend)
        else:
            raise ValueError("map entry with repeated or unexpected fields")
    if key_field is None or value is None:
        raise ValueError("map entry without key or value")
    return key_field, key, *value


def _fields(
    view: memoryview, pos: int, end: int
) -> Iterator[tuple[tuple[int, int], int, int, int]]:
    """Each field in ``view[pos:end]``: ((number, wire type), start, start of the value
    (after the length of a length-delimited one), end)."""
    while pos < end:
        start = pos
        tag, pos = _read_varint(view, pos, end)
        wire = tag & 7
        if wire == 0:
            body = pos
            _, stop = _read_varint(view, pos, end)
        elif wire == 2:
            length, body = _read_varint(view, pos, end)
            stop = body + length
        elif wire in (1, 5):
            body = pos
            stop = pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire} (groups) not read here")
        if tag >> 3 == 0 or stop > end:
            raise ValueError("malformed field")
        yield (tag >> 3, wire), start, body, stop
        pos = stop


def _read_varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated or overlong varint")
