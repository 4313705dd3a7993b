"""``tessera convert``: a TensorFlow SavedModel or Keras model to ONNX, cut at named tensors.

This is the seeds' ``AccelOnnxConverter.convert_tf_model(model, input_tensors,
output_tensors)``: the part of the graph between the named inputs and outputs is exported
with tf2onnx, so a user can, for example, keep only a classifier's featurizer for the NPU.
Where the seeds' service answered a wrong tensor name with a null-reference error, a
:class:`~tessera.errors.TesseraError` here lists the names that exist, closest first.

What a name means depends on the source:

* **Keras** (``.keras``, ``.h5``): top-level layer names. An input names the layer whose
  output becomes the graph input, so ``--inputs conv1`` feeds what ``conv1`` produced and
  the layers after it run; an output names the layer whose output is returned. The cut
  model is an ordinary Keras sub-model, which is also how the tests check the export.
* **SavedModel** (a folder with ``saved_model.pb``): tensors of the signature's graph
  after its variables are frozen to constants, written ``node:k`` or ``node`` (output 0),
  or the signature's own input and output keys. ``tessera convert SOURCE --list`` prints
  them. Cut inputs become placeholders; every output must depend on the named inputs only.

The ONNX graph's inputs and outputs carry exactly the names given (the model's own ones by
default), and an unknown leading (batch) dimension becomes 1: the NPU, like the seeds'
service, runs one image at a time. Conversion runs in a child process with the memory
settings of :mod:`tessera.zoo` (VGG-16 fits in this machine's 24 GB that way).
"""

from __future__ import annotations

import argparse
import difflib
import json
import pathlib
import resource
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tessera import zoo
from tessera.errors import TesseraError

if TYPE_CHECKING:
    import keras
    import onnx
    import tensorflow as tf

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
# Names listed in an unknown-name error; a ResNet SavedModel has thousands of nodes.
_MAX_LISTED = 40
# Nodes of a frozen graph that are plumbing, not values anyone cuts at: left out of the
# listings, still accepted as names. "Func/" nodes are inlined function boundaries.
_PLUMBING_OPS = frozenset({"Const", "NoOp"})
_PLUMBING_PREFIXES = ("Func/",)
_PLACEHOLDER_PREFIX = "tessera_input"


def source_kind(path: pathlib.Path) -> str:
    """``"keras"`` or ``"saved_model"``, from what is at ``path``."""
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise TesseraError(
            f"{path} is a folder without saved_model.pb: not a TensorFlow SavedModel"
        )
    if path.is_file():
        if path.suffix.lower() in KERAS_SUFFIXES:
            return "keras"
        raise TesseraError(
            f"{path}: expected a Keras model file ({', '.join(KERAS_SUFFIXES)}) or a "
            "TensorFlow SavedModel folder"
        )
    raise TesseraError(f"model not found: {path}")


def convert(
    source: str | pathlib.Path,
    out_path: str | pathlib.Path,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
    signature: str | None = None,
) -> pathlib.Path:
    """Convert ``source`` to ONNX at ``out_path``, cut at ``inputs`` and ``outputs``.

    Empty ``inputs``/``outputs`` mean the model's own. ``signature`` picks a SavedModel
    signature (default ``serving_default``, or the only one). The work happens in a child
    process; its errors are raised here as :class:`TesseraError`.
    """
    src = pathlib.Path(source)
    kind = source_kind(src)
    _check_names(inputs, outputs)
    if signature is not None and kind != "saved_model":
        raise TesseraError("--signature applies to SavedModels only")
    args = [kind, str(src.resolve()), json.dumps(list(inputs)), json.dumps(list(outputs))]
    args.append(signature or "")
    return zoo.run_export_child("tessera.convert", args, out_path, f"converting {src}")


def list_names(source: str | pathlib.Path, signature: str | None = None) -> list[str]:
    """One line per name ``--inputs``/``--outputs`` accept, with its shape (in-process)."""
    src = pathlib.Path(source)
    zoo._quiet_tensorflow_import()
    return [f"{name}  {about}" for name, about in _open(source_kind(src), src, signature).names()]


def _check_names(inputs: Sequence[str], outputs: Sequence[str]) -> None:
    for what, names in (("input", inputs), ("output", outputs)):
        if any(not name for name in names):
            raise TesseraError(f"empty {what} name in {list(names)}")
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            raise TesseraError(f"{what} names given more than once: {', '.join(repeated)}")
    both = sorted(set(inputs) & set(outputs))
    if both:
        raise TesseraError(f"names given as both input and output: {', '.join(both)}")


def _unknown_name(role: str, name: str, known: Sequence[str], source: pathlib.Path) -> TesseraError:
    """The error for a name that does not exist, listing those that do, closest first.

    Graph names are long paths, so names containing the one given come first, then
    difflib's closest matches, then the rest in graph order, up to ``_MAX_LISTED``.
    """
    containing = [k for k in known if name in k]
    close = difflib.get_close_matches(name, known, n=8, cutoff=0.3)
    ordered = list(dict.fromkeys([*containing, *close, *known]))
    shown = ordered[:_MAX_LISTED]
    message = f"{source}: no {role} named {name!r}; names that exist, closest first: " + ", ".join(
        shown
    )
    if len(ordered) > len(shown):
        message += (
            f", ... and {len(ordered) - len(shown)} more "
            f"(`tessera convert {source} --list` prints them all)"
        )
    return TesseraError(message)


def _shape_text(shape: Any) -> str:
    """``[?,16,16,8]``; ``?`` alone for a TensorFlow shape of unknown rank."""
    try:
        dims = list(shape)
    except ValueError:
        return "?"
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _batch_one(shape: Sequence[int | None]) -> list[int | None]:
    """The shape with an unknown leading (batch) dimension fixed to 1."""
    dims = list(shape)
    if dims and dims[0] is None:
        dims[0] = 1
    return dims


class _KerasSource:
    """A Keras model file; names are top-level layer names."""

    def __init__(self, path: pathlib.Path) -> None:
        import keras

        self.path = path
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:  # h5py, zipfile and Keras deserialisation raise their own
            raise TesseraError(f"cannot load Keras model {path}: {exc}") from exc
        self.tensors, self.ambiguous = self._layer_outputs(model)
        if isinstance(model, keras.Sequential):
            self.input_names = [model.inputs[0].name]
            self.output_names = [model.layers[-1].name]
        else:  # identity, not ==: KerasTensor's == builds a symbolic comparison
            self.input_names = _names_of(self.tensors, model.inputs)
            self.output_names = _names_of(self.tensors, model.outputs)

    @staticmethod
    def _layer_outputs(model: keras.Model) -> tuple[dict[str, Any], dict[str, int]]:
        """Each layer's output tensor in the model's graph, by layer name.

        A Sequential model's layers are called twice when Keras builds it, so their
        ``.output`` is not the model's tensor; the layers are called again here on a new
        input, in order, which gives one consistent graph sharing the same weights. In a
        functional model a layer called more than once has no single output: such layers
        are reported as ambiguous, with their call count.
        """
        import keras

        if isinstance(model, keras.Sequential):
            (model_input,) = model.inputs
            tensor = keras.Input(
                batch_shape=model_input.shape, dtype=model_input.dtype, name=model_input.name
            )
            outputs = {model_input.name: tensor}
            for layer in model.layers:
                tensor = layer(tensor)
                outputs[layer.name] = tensor
            return outputs, {}
        outputs, ambiguous = {}, {}
        for layer in model.layers:
            calls = len(layer._inbound_nodes)
            if calls > 1:
                ambiguous[layer.name] = calls
            else:
                outputs[layer.name] = layer.output
        return outputs, ambiguous

    def names(self) -> list[tuple[str, str]]:
        lines = []
        for name, tensor in self.tensors.items():
            role = " (model input)" if name in self.input_names else ""
            role = " (model output)" if name in self.output_names else role
            if isinstance(tensor, (list, tuple)):
                lines.append((name, f"{len(tensor)} outputs: cannot be cut at"))
            else:
                lines.append((name, f"{_shape_text(tensor.shape)} {tensor.dtype}{role}"))
        lines += [(n, f"called {c} times: cannot be cut at") for n, c in self.ambiguous.items()]
        return lines

    def _tensor(self, role: str, name: str) -> Any:
        if name in self.ambiguous:
            raise TesseraError(
                f"{self.path}: layer {name!r} is called {self.ambiguous[name]} times in the "
                "model, so it has no single output to cut at; cut at a layer called once"
            )
        if name not in self.tensors:
            raise _unknown_name(f"{role} layer", name, list(self.tensors), self.path)
        tensor = self.tensors[name]
        if isinstance(tensor, (list, tuple)):
            raise TesseraError(
                f"{self.path}: layer {name!r} has {len(tensor)} outputs; cut at a layer "
                "with one output"
            )
        return tensor

    def convert(self, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
        import keras
        import tensorflow as tf
        import tf2onnx

        inputs = inputs or self.input_names
        outputs = outputs or self.output_names
        in_tensors = [self._tensor("input", name) for name in inputs]
        out_tensors = [self._tensor("output", name) for name in outputs]
        try:
            sub_model = keras.Model(in_tensors, out_tensors)
        except ValueError as exc:
            raise TesseraError(
                f"{self.path}: cannot cut the model from inputs {inputs} to outputs {outputs}: "
                "every output must be computed from the listed inputs alone and every input "
                f"must feed an output (Keras: {exc})"
            ) from exc
        signature = [
            tf.TensorSpec(_batch_one(t.shape), t.dtype, name=name)
            for name, t in zip(inputs, in_tensors, strict=True)
        ]
        proto, _ = tf2onnx.convert.from_keras(sub_model, input_signature=signature, opset=zoo.OPSET)
        # tf2onnx names the outputs after the Keras output layers; make it exact.
        _rename_outputs(proto, outputs)
        return proto


def _names_of(tensors: dict[str, Any], wanted: Sequence[Any]) -> list[str]:
    """Names of the ``wanted`` tensors, in their order, by identity."""
    by_id = {id(tensor): name for name, tensor in tensors.items()}
    return [by_id[id(tensor)] for tensor in wanted]


class _SavedModelSource:
    """A SavedModel signature, frozen; names are tensors of the frozen graph."""

    def __init__(self, path: pathlib.Path, signature: str | None) -> None:
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )

        self.path = path
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as exc:  # TF raises OSError, ValueError, protobuf DecodeError...
            raise TesseraError(f"cannot load SavedModel {path}: {exc}") from exc
        signatures = dict(loaded.signatures)
        if not signatures:
            raise TesseraError(
                f"SavedModel {path} has no signatures; export it with a serving signature "
                "(Keras: model.export(path))"
            )
        if signature is None:
            if "serving_default" not in signatures and len(signatures) > 1:
                raise TesseraError(
                    f"SavedModel {path} has signatures {sorted(signatures)}; choose one "
                    "with --signature"
                )
            signature = "serving_default" if "serving_default" in signatures else min(signatures)
        if signature not in signatures:
            raise TesseraError(
                f"SavedModel {path} has no signature {signature!r}; it has {sorted(signatures)}"
            )
        function = signatures[signature]
        frozen = convert_variables_to_constants_v2(function)
        self.graph_def = frozen.graph.as_graph_def()
        self.graph = frozen.graph
        # The signature's keys name its placeholders and outputs (Keras' export: the Input
        # layer's name and "output_0"); outputs are flattened in tf.nest order.
        input_specs = function.structured_input_signature[1]
        self.input_names = sorted(key for key, spec in input_specs.items() if spec.name)
        self.aliases = {key: f"{input_specs[key].name}:0" for key in self.input_names}
        structured = function.structured_outputs
        self.output_names = sorted(structured) if isinstance(structured, dict) else []
        if len(self.output_names) == len(frozen.outputs):  # tf.nest sorts dict keys too
            self.aliases.update(
                {key: t.name for key, t in zip(self.output_names, frozen.outputs, strict=True)}
            )
        else:
            self.output_names = [t.name for t in frozen.outputs]

    def names(self) -> list[tuple[str, str]]:
        lines = [
            (key, f"signature {'input' if key in self.input_names else 'output'} = {tensor}")
            for key, tensor in self.aliases.items()
        ]
        for op in self.graph.get_operations():
            if op.type in _PLUMBING_OPS or op.name.startswith(_PLUMBING_PREFIXES):
                continue
            if op.type == "Identity" and op.name.endswith("/ReadVariableOp"):
                continue
            for index, out in enumerate(op.outputs):
                name = op.name if index == 0 else f"{op.name}:{index}"
                lines.append((name, f"{op.type} {_shape_text(out.shape)} {out.dtype.name}"))
        return lines

    def _tensor(self, role: str, name: str) -> tf.Tensor:
        target = self.aliases.get(name, name)
        try:
            return self.graph.get_tensor_by_name(target if ":" in target else f"{target}:0")
        except (KeyError, ValueError):
            raise _unknown_name(
                f"{role} tensor", name, [n for n, _ in self.names()], self.path
            ) from None

    def convert(self, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
        import tf2onnx

        inputs = inputs or self.input_names
        outputs = outputs or self.output_names
        in_tensors = [self._tensor("input", name) for name in inputs]
        out_tensors = [self._tensor("output", name) for name in outputs]
        resolved = [t.name for t in [*in_tensors, *out_tensors]]
        repeated = sorted({n for n in resolved if resolved.count(n) > 1})
        if repeated:  # e.g. a signature key and the tensor it stands for
            raise TesseraError(
                f"{self.path}: tensors {repeated} are named more than once among the inputs "
                "and outputs"
            )
        cut, placeholders = self._cut(inputs, in_tensors, outputs, out_tensors)
        renames = dict(zip(placeholders, inputs, strict=True))
        renames.update({t.name: name for t, name in zip(out_tensors, outputs, strict=True)})
        proto, _ = tf2onnx.convert.from_graph_def(
            cut,
            input_names=placeholders,
            output_names=[t.name for t in out_tensors],
            opset=zoo.OPSET,
            tensors_to_rename=renames,
        )
        return proto

    def _cut(
        self,
        inputs: list[str],
        in_tensors: list[tf.Tensor],
        outputs: list[str],
        out_tensors: list[tf.Tensor],
    ) -> tuple[Any, list[str]]:
        """The frozen GraphDef with each input tensor replaced by a placeholder, pruned to
        what the outputs need; fails if an output needs anything else fed.

        The needed nodes are found first and only they are copied: a SavedModel's frozen
        graph holds all its weights (553 MB for VGG-16), and every copy counts.
        """
        import tensorflow as tf

        nodes = {node.name: node for node in self.graph_def.node}
        placeholders: dict[str, str] = {}  # cut tensor -> name of the placeholder feeding it
        for index, tensor in enumerate(in_tensors):
            name = f"{_PLACEHOLDER_PREFIX}_{index}"
            while name in nodes:
                name += "_"
            placeholders[tensor.name] = name

        def cut_inputs(node: Any) -> list[str]:
            """The node's input list with the cut tensors read from their placeholders."""
            return [
                s if s.startswith("^") else placeholders.get(s if ":" in s else f"{s}:0", s)
                for s in node.input
            ]

        fed_by = set(placeholders.values())
        needed, fed, stack = set(), set(), [t.op.name for t in out_tensors]
        while stack:
            name = stack.pop()
            if name in fed_by:
                fed.add(name)
            elif name not in needed:
                needed.add(name)
                stack.extend(s.lstrip("^").split(":")[0] for s in cut_inputs(nodes[name]))
        unfed = sorted(n for n in needed if nodes[n].op == "Placeholder")
        if unfed:
            raise TesseraError(
                f"{self.path}: outputs {outputs} also depend on {unfed}, which the "
                f"inputs {inputs} do not cut off; add them to the inputs or cut later"
            )
        unused = [
            i for i, t in zip(inputs, in_tensors, strict=True) if placeholders[t.name] not in fed
        ]
        if unused:
            raise TesseraError(
                f"{self.path}: inputs {unused} do not feed any of the outputs {outputs}"
            )
        graph_def = tf.compat.v1.GraphDef()
        graph_def.versions.CopyFrom(self.graph_def.versions)
        graph_def.library.CopyFrom(self.graph_def.library)
        for tensor in in_tensors:
            placeholder = graph_def.node.add(name=placeholders[tensor.name], op="Placeholder")
            placeholder.attr["dtype"].type = tensor.dtype.as_datatype_enum
            if tensor.shape.rank is not None:
                shape = tf.TensorShape(_batch_one(tensor.shape.as_list()))
                placeholder.attr["shape"].shape.CopyFrom(shape.as_proto())
        for node in self.graph_def.node:
            if node.name in needed:
                copy = graph_def.node.add()
                copy.CopyFrom(node)
                copy.input[:] = cut_inputs(node)
        return graph_def, [f"{placeholders[t.name]}:0" for t in in_tensors]


def _open(kind: str, path: pathlib.Path, signature: str | None) -> _KerasSource | _SavedModelSource:
    return _KerasSource(path) if kind == "keras" else _SavedModelSource(path, signature)


def _rename_outputs(proto: onnx.ModelProto, names: list[str]) -> None:
    """Give the graph outputs ``names`` (in order), renaming every use of each tensor."""
    renames = {o.name: n for o, n in zip(proto.graph.output, names, strict=True) if o.name != n}
    if not renames:
        return
    for node in proto.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in [*proto.graph.output, *proto.graph.value_info]:
        value.name = renames.get(value.name, value.name)


def _convert_child(out_path: pathlib.Path, args: list[str]) -> None:
    """Body of ``python -m tessera.convert OUT RESULT KIND SOURCE INPUTS OUTPUTS SIG``."""
    kind, source, inputs_json, outputs_json, signature = args
    started = time.monotonic()
    zoo._quiet_tensorflow_import()
    import tensorflow as tf

    # tf2onnx drives TF1 graph APIs, each logging a deprecation notice that is no news to
    # the user.
    tf.get_logger().setLevel("ERROR")
    path = pathlib.Path(source)
    inputs, outputs = json.loads(inputs_json), json.loads(outputs_json)
    proto = _open(kind, path, signature or None).convert(inputs, outputs)
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if (inputs and got_in != inputs) or (outputs and got_out != outputs):
        raise RuntimeError(f"tf2onnx produced inputs {got_in} and outputs {got_out}")
    out_path.write_bytes(proto.SerializeToString())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"tessera convert: {path.name} -> inputs {got_in}, outputs {got_out} in "
        f"{time.monotonic() - started:.0f} s, peak RSS {peak_gb:.1f} GB",
        file=sys.stderr,
    )


def _name_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.list:
        for line in list_names(args.source, args.signature):
            print(line)
        return 0
    if not args.output:
        raise TesseraError("the ONNX file to write is missing: give -o MODEL.onnx (or --list)")
    print(convert(args.source, args.output, args.inputs, args.outputs, args.signature))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tessera convert`` to the CLI."""
    parser = sub.add_parser(
        "convert",
        help="convert a TensorFlow SavedModel or Keras model to ONNX, cut at named tensors",
        description="Convert a TensorFlow SavedModel folder or a Keras .keras/.h5 file to "
        f"ONNX (opset {zoo.OPSET}) with tf2onnx, keeping the part between the named inputs "
        "and outputs. Keras: layer names. SavedModel: tensor names of the frozen signature "
        "graph (node or node:k) or the signature's keys; --list prints them.",
    )
    parser.add_argument("source", help="SavedModel folder or Keras .keras/.h5 file")
    parser.add_argument("-o", "--output", help="ONNX file to write")
    parser.add_argument(
        "--inputs",
        type=_name_list,
        default=[],
        metavar="NAME[,..]",
        help="tensors that become the graph inputs (default: the model's inputs)",
    )
    parser.add_argument(
        "--outputs",
        type=_name_list,
        default=[],
        metavar="NAME[,..]",
        help="tensors that become the graph outputs (default: the model's outputs)",
    )
    parser.add_argument("--signature", help="SavedModel signature (default: serving_default)")
    parser.add_argument(
        "--list", action="store_true", help="print the names --inputs/--outputs accept and exit"
    )
    parser.set_defaults(func=_cmd_convert)


if __name__ == "__main__":
    sys.exit(zoo.child_main(sys.argv[1:], _convert_child))
