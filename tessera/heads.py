"""Featurizer cuts and classifier heads: the seeds' "featurize on the FPGA, classify on the CPU".

Brainwave's models were split in two: a quantized *featurizer* (ResNet-50 up to ``pool5``,
VGG-16 up to ``fc7``, DenseNet-121 up to its global pool) running on the FPGA, and a small
*classifier head* (one fully connected layer and a softmax) running on the host CPU. The
split is what makes transfer learning cheap: a user keeps the featurizer and trains only a
new head on its features for their own classes.

This module does both halves:

* :func:`split_classifier` cuts an ONNX classifier at the input of its final linear layer
  into a featurizer (output ``features``) and a :class:`LinearHead`;
  :func:`cached_featurizer` does it for the zoo models (``tessera zoo export NAME
  --featurizer``), taking the head's weights from the full export's initializers, so no
  second TensorFlow run is needed.
* :class:`LinearHead` is the head in float32 numpy (``softmax(features @ W + b)``), read
  from and written to ONNX as ``Gemm`` + ``Softmax``.
* :func:`train_head` fits a softmax classifier (multinomial logistic regression) to
  features, and ``tessera head train`` runs it on a folder of labelled images (one
  sub-folder per class) pushed through preprocessing and the featurizer program.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tessera.errors import TesseraError

if TYPE_CHECKING:
    import onnx

    from tessera.package import NPU, Package

#: Name of the featurizer's output and of the head's input in every ONNX file written here.
FEATURES_NAME = "features"
#: Name of the head's output: that of the zoo's full classifier (the Keras layer).
PREDICTIONS_NAME = "predictions"
#: ONNX metadata key under which a head carries its class names (a JSON list).
LABELS_METADATA_KEY = "tessera.labels"
#: Opset and IR version of the ONNX written here (the zoo's opset; IR 8 is its minimum).
OPSET = 17
IR_VERSION = 8

#: Bump when a change here alters the bytes of the derived featurizer/head files, so the
#: cached ones (keyed by the full export they come from) are not reused.
CUT_RECIPE_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class FeaturizerCut:
    """Where a zoo model is cut, as the seeds cut it.

    ``layer`` is the Keras layer whose output feeds the classifier (it appears in the ONNX
    node names tf2onnx writes, which is checked), ``features`` the feature count.
    """

    layer: str
    features: int


FEATURIZER_CUTS: dict[str, FeaturizerCut] = {
    "resnet50": FeaturizerCut("avg_pool", 2048),  # the seeds' pool5
    "resnet152": FeaturizerCut("avg_pool", 2048),
    "densenet121": FeaturizerCut("avg_pool", 1024),
    "vgg16": FeaturizerCut("fc2", 4096),  # the seeds' fc7 (Keras' fc2, after its ReLU)
}

# Extensions of the files a class folder may hold for `tessera head train`.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FEATURE_SUFFIX = ".npy"


# --------------------------------------------------------------------------- the head
@dataclasses.dataclass(frozen=True, eq=False)
class LinearHead:
    """A classifier head: ``softmax(features @ weight + bias)`` in float32.

    ``weight`` is ``[features, classes]``, ``bias`` ``[classes]``. Without ``softmax`` the
    head returns the logits. The arithmetic is float32 like onnxruntime's, so the host head
    agrees with the head run in onnxruntime to float32 rounding.
    """

    weight: np.ndarray
    bias: np.ndarray
    softmax: bool = True

    def __post_init__(self) -> None:
        weight = np.asarray(self.weight, dtype=np.float32)
        bias = np.asarray(self.bias, dtype=np.float32)
        if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
            raise TesseraError(f"head weight must be [features, classes], got {list(weight.shape)}")
        if bias.shape != (weight.shape[1],):
            raise TesseraError(
                f"head bias must have shape [{weight.shape[1]}], got {list(bias.shape)}"
            )
        if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
            raise TesseraError("head weights contain NaN or Inf")
        object.__setattr__(self, "weight", np.ascontiguousarray(weight))
        object.__setattr__(self, "bias", np.ascontiguousarray(bias))

    @property
    def num_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """``[1, F]`` (or any shape holding F values per row, e.g. ``[1, F, 1, 1]``) to
        ``[rows, classes]`` float32 probabilities (logits without ``softmax``)."""
        x = np.asarray(features, dtype=np.float32)
        x = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1)
        if x.shape[1] != self.num_features:
            raise TesseraError(
                f"the head takes {self.num_features} features, got {x.shape[1]} per row"
            )
        logits = x @ self.weight + self.bias
        if not self.softmax:
            return logits
        return softmax(logits)

    # ----------------------------------------------------------------- ONNX
    @classmethod
    def from_onnx(cls, model: onnx.ModelProto | str | os.PathLike[str]) -> LinearHead:
        """Read a head from ONNX: one input, then ``Flatten``/``Reshape``/``Squeeze``/
        ``Identity`` (layout only), a ``Gemm`` or ``MatMul`` (+ ``Add``) with constant
        weights, and an optional final ``Softmax``; nothing else is a linear head."""
        import onnx
        from onnx import numpy_helper

        if not isinstance(model, onnx.ModelProto):
            model = _load_onnx(model)
        graph = model.graph
        consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in consts]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise TesseraError(
                f"a classifier head has one input and one output; this graph has inputs "
                f"{inputs} and outputs {[o.name for o in graph.output]}"
            )
        current = inputs[0]
        weight = bias = None
        has_softmax = False
        for node in graph.node:
            op = node.op_type
            where = f"head node {node.name or op!r} ({op})"
            if op == "Constant":
                consts[node.output[0]] = numpy_helper.to_array(
                    onnx.helper.get_attribute_value(node.attribute[0])
                )
                continue
            if has_softmax:
                raise TesseraError(f"{where} follows the Softmax; the Softmax must come last")
            data_inputs = [i for i in node.input if i and i not in consts]
            if data_inputs != [current]:
                raise TesseraError(
                    f"{where} does not continue the chain from {current!r}; a linear head is a "
                    "single chain of nodes"
                )
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if op in ("Flatten", "Reshape", "Squeeze", "Identity", "Dropout"):
                if weight is not None:
                    raise TesseraError(f"{where} after the linear layer is not supported")
            elif op in ("Gemm", "MatMul"):
                if weight is not None:
                    raise TesseraError(f"{where}: the head has more than one linear layer")
                if node.input[0] != current:
                    raise TesseraError(f"{where}: the features must be the first operand")
                if len(node.input) < 2 or node.input[1] not in consts:
                    raise TesseraError(f"{where}: the weight must be a constant")
                b_matrix = consts[node.input[1]].astype(np.float32)
                if b_matrix.ndim != 2:
                    raise TesseraError(f"{where}: weight must be 2-D, got {list(b_matrix.shape)}")
                if op == "Gemm":
                    if attrs.get("transA", 0):
                        raise TesseraError(f"{where}: transA=1 is not a head layout")
                    if attrs.get("transB", 0):
                        b_matrix = b_matrix.T
                    weight = np.float32(attrs.get("alpha", 1.0)) * b_matrix
                    if len(node.input) > 2 and node.input[2]:
                        bias = np.float32(attrs.get("beta", 1.0)) * _bias_vector(
                            consts[node.input[2]], weight.shape[1], where
                        )
                else:
                    weight = b_matrix
            elif op == "Add" and weight is not None and bias is None:
                other = next(i for i in node.input if i != current)
                bias = _bias_vector(consts[other], weight.shape[1], where)
            elif op == "Softmax" and weight is not None:
                axis = attrs.get("axis", -1)
                if axis not in (-1, 1):
                    raise TesseraError(f"{where}: softmax over axis {axis}, expected the classes")
                has_softmax = True
            else:
                raise TesseraError(
                    f"{where} is not part of a linear classifier head (Gemm or MatMul+Add, "
                    "optional Softmax, layout ops before them)"
                )
            current = node.output[0]
        if weight is None:
            raise TesseraError("the head graph has no Gemm or MatMul")
        if current != graph.output[0].name:
            raise TesseraError(f"the head's output {graph.output[0].name!r} is not its last node")
        if bias is None:
            bias = np.zeros(weight.shape[1], np.float32)
        return cls(weight, np.array(bias), has_softmax)

    def to_onnx(
        self,
        labels: Sequence[str] | None = None,
        input_name: str = FEATURES_NAME,
        output_name: str = PREDICTIONS_NAME,
    ) -> onnx.ModelProto:
        """``Gemm`` (+ ``Softmax``) taking ``[1, F]``, the shape the featurizer produces.

        ``labels``, if given, are stored as metadata so ``tessera package --head`` finds the
        class names without a separate file. The bytes depend only on the arguments.
        """
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        if labels is not None and len(labels) != self.num_classes:
            raise TesseraError(f"{len(labels)} labels for a head of {self.num_classes} classes")
        logits = output_name if not self.softmax else "logits"
        nodes = [helper.make_node("Gemm", [input_name, "weight", "bias"], [logits], name="fc")]
        if self.softmax:
            nodes.append(helper.make_node("Softmax", [logits], [output_name], axis=1))
        graph = helper.make_graph(
            nodes,
            "classifier_head",
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, self.num_features])],
            [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [1, self.num_classes])],
            initializer=[
                numpy_helper.from_array(self.weight, "weight"),
                numpy_helper.from_array(self.bias, "bias"),
            ],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tessera"
        )
        model.ir_version = IR_VERSION
        if labels is not None:
            helper.set_model_props(model, {LABELS_METADATA_KEY: json.dumps(list(labels))})
        onnx.checker.check_model(model)
        return model


def _bias_vector(value: np.ndarray, classes: int, where: str) -> np.ndarray:
    """A Gemm ``C`` or Add operand as a ``[classes]`` vector (scalar, ``[C]`` or ``[1, C]``)."""
    flat = np.asarray(value, dtype=np.float32).reshape(-1)
    if flat.size not in (1, classes):
        raise TesseraError(f"{where}: bias of shape {list(np.shape(value))} for {classes} classes")
    return np.broadcast_to(flat, (classes,)).copy()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32, shifted by the maximum (as onnxruntime)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def head_labels(model: onnx.ModelProto) -> list[str] | None:
    """Class names stored in a head's metadata by :meth:`LinearHead.to_onnx`, if any."""
    for prop in model.metadata_props:
        if prop.key == LABELS_METADATA_KEY:
            try:
                labels = json.loads(prop.value)
            except json.JSONDecodeError:
                labels = None
            if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
                raise TesseraError(f"head metadata {LABELS_METADATA_KEY!r} is not a list of names")
            return labels
    return None


def _load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    from tessera.compiler.onnx_import import load_model

    return load_model(path)


# --------------------------------------------------------------------------- the split
def classifier_input(model: onnx.ModelProto) -> str | None:
    """The tensor feeding a classifier's final linear layer, or ``None`` if the graph does
    not end in ``Gemm``/``MatMul(+Add)`` (+ ``Softmax``) on its single output."""
    if len(model.graph.output) != 1:
        return None
    producers = {o: n for n in model.graph.node for o in n.output}
    consts = {t.name for t in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"
    }
    node = producers.get(model.graph.output[0].name)
    if node is not None and node.op_type == "Softmax":
        node = producers.get(node.input[0])
    if node is not None and node.op_type == "Add":
        data = [i for i in node.input if i not in consts]
        node = producers.get(data[0]) if len(data) == 1 else None
        if node is None or node.op_type != "MatMul":
            return None
    if node is None or node.op_type not in ("Gemm", "MatMul") or node.input[1] not in consts:
        return None
    return node.input[0]


def split_classifier(
    model: onnx.ModelProto, features_name: str = FEATURES_NAME
) -> tuple[onnx.ModelProto, LinearHead]:
    """Cut a classifier at the input of its final linear layer.

    Returns the featurizer (the nodes and weights the cut tensor needs, its output renamed
    ``features_name`` with float32 type and shape ``[1, F]``) and the head, built from the
    full graph's own initializers, so the two halves compute exactly what the whole did.
    """
    cut = classifier_input(model)
    if cut is None:
        raise TesseraError(
            "the model does not end in a linear classifier (Gemm or MatMul+Add, optional "
            "Softmax) on a single output, so there is no head to split off"
        )
    featurizer = prune_to_output(model, cut, features_name)
    head = LinearHead.from_onnx(_tail(model, cut))
    return featurizer, head


def prune_to_output(model: onnx.ModelProto, tensor: str, new_name: str) -> onnx.ModelProto:
    """The sub-graph computing ``tensor`` (renamed ``new_name``), with only its weights.

    The output's shape is that of the classifier's features: ``[1, F]`` from the tensor's
    value info if recorded, else inferred by onnx's shape inference.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    if tensor not in producers:
        raise TesseraError(f"{tensor!r} is not computed by any node: nothing to cut")
    needed_tensors = {tensor}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed_tensors for o in node.output):
            keep.append(node)
            needed_tensors.update(i for i in node.input if i)
    keep.reverse()
    shape = _tensor_shape(model, tensor)
    nodes = []
    for node in keep:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for k, out in enumerate(copy.output):
            if out == tensor:
                copy.output[k] = new_name
        nodes.append(copy)
    new = helper.make_graph(
        nodes,
        graph.name,
        [i for i in graph.input if i.name in needed_tensors],
        [helper.make_tensor_value_info(new_name, TensorProto.FLOAT, shape)],
        initializer=[t for t in graph.initializer if t.name in needed_tensors],
        value_info=[v for v in graph.value_info if v.name in needed_tensors and v.name != tensor],
    )
    out = helper.make_model(new, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    return out


def _tensor_shape(model: onnx.ModelProto, tensor: str) -> list[int | str | None]:
    import onnx

    def dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in vi.type.tensor_type.shape.dim
        ]

    for vi in model.graph.value_info:
        if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
            return dims(vi)
    # Inference on a weight-free copy: shapes do not need the (up to 500 MB) weights.
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:
        init.ClearField("raw_data")
        init.ClearField("float_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:
        return [1, None]
    for vi in inferred.graph.value_info:
        if vi.name == tensor:
            return dims(vi)
    return [1, None]


def _tail(model: onnx.ModelProto, cut: str) -> onnx.ModelProto:
    """The nodes after ``cut`` as a graph taking ``cut`` as input (for :meth:`from_onnx`)."""
    from onnx import TensorProto, helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    needed = {graph.output[0].name}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i and i != cut and i in producers)
    keep.reverse()
    used = {i for n in keep for i in n.input}
    new = helper.make_graph(
        keep,
        "head",
        [helper.make_tensor_value_info(cut, TensorProto.FLOAT, None)],
        list(graph.output),
        initializer=[t for t in graph.initializer if t.name in used],
    )
    return helper.make_model(new, opset_imports=list(model.opset_import))


def merge_featurizer_and_head(featurizer: onnx.ModelProto, head: LinearHead) -> onnx.ModelProto:
    """One graph: the featurizer, then ``Flatten`` + the head's ``Gemm`` + ``Softmax``.

    Used to run the head on the NPU: compiled together, the features stay in DRAM in block
    floating point and feed the FC layer directly, in one program and one run.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if len(featurizer.graph.output) != 1:
        raise TesseraError(
            f"the featurizer must have one output to attach a head, it has "
            f"{len(featurizer.graph.output)}"
        )
    features = featurizer.graph.output[0].name
    taken = {o for n in featurizer.graph.node for o in n.output} | {
        t.name for t in featurizer.graph.initializer
    }
    prefix = "tessera_head/"
    while any(name.startswith(prefix) for name in taken):
        prefix = "_" + prefix
    flat, weight, bias, logits = (prefix + s for s in ("flat", "weight", "bias", "logits"))
    output = PREDICTIONS_NAME if PREDICTIONS_NAME not in taken else prefix + PREDICTIONS_NAME
    merged = onnx.ModelProto()
    merged.CopyFrom(featurizer)
    g = merged.graph
    g.node.extend(
        [
            helper.make_node("Flatten", [features], [flat], axis=1, name=prefix + "flatten"),
            helper.make_node("Gemm", [flat, weight, bias], [logits], name=prefix + "fc"),
        ]
    )
    if head.softmax:
        g.node.append(helper.make_node("Softmax", [logits], [output], axis=1, name=prefix + "sm"))
    else:
        g.node.append(helper.make_node("Identity", [logits], [output], name=prefix + "out"))
    g.initializer.extend(
        [numpy_helper.from_array(head.weight, weight), numpy_helper.from_array(head.bias, bias)]
    )
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, head.num_classes]))
    return merged


# --------------------------------------------------------------------------- zoo featurizers
def featurizer_cache_paths(
    name: str, seed: int = 0, weights: str | os.PathLike[str] | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
    """Where :func:`cached_featurizer` keeps the two halves of a zoo model.

    They are named after the full export they are cut from (whose key covers recipe,
    toolchain, seed and weights) plus :data:`CUT_RECIPE_VERSION`, so they go stale exactly
    when it does or when the cut changes.
    """
    from tessera import zoo

    full = zoo.cache_path(name, seed, weights)
    stem = f"{full.stem}-cut{CUT_RECIPE_VERSION}"
    return full.with_name(f"{stem}-featurizer.onnx"), full.with_name(f"{stem}-head.onnx")


def cached_featurizer(
    name: str, seed: int = 0, weights: str | os.PathLike[str] | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
    """The featurizer and ImageNet head ONNX files of zoo model ``name``, cut as the seeds
    cut it (see :data:`FEATURIZER_CUTS`), deriving them from the cached full export."""
    import onnx

    from tessera import zoo

    zoo.get_model(name)
    cut = FEATURIZER_CUTS.get(name)
    if cut is None:
        raise TesseraError(
            f"zoo model {name!r} has no featurizer cut; models with one: "
            + ", ".join(FEATURIZER_CUTS)
        )
    feat_path, head_path = featurizer_cache_paths(name, seed, weights)
    with zoo._file_lock(feat_path.with_suffix(".lock")):
        if feat_path.is_file() and head_path.is_file():
            return feat_path, head_path
        full = onnx.load(str(zoo.cached_export(name, seed, weights)))
        tensor = classifier_input(full)
        producer = next((n for n in full.graph.node if tensor in n.output), None)
        featurizer, head = split_classifier(full)
        del full
        if (
            producer is None
            or f"/{cut.layer}" not in producer.name
            or head.num_features != cut.features
        ):
            raise TesseraError(
                f"{name}: the classifier's input is {tensor!r} with {head.num_features} "
                f"features; expected the output of layer {cut.layer!r} with {cut.features}"
            )
        _atomic_write(head_path, head.to_onnx().SerializeToString())
        _atomic_write(feat_path, featurizer.SerializeToString())
    return feat_path, head_path


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_featurizer(
    name: str,
    out_path: str | os.PathLike[str],
    head_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    weights: str | os.PathLike[str] | None = None,
) -> None:
    """Copy the cached featurizer (and head) of ``name`` to the given paths."""
    feat, head = cached_featurizer(name, seed, weights)
    for src, dst in ((feat, out_path), (head, head_path)):
        if dst is not None:
            pathlib.Path(dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


# --------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainResult:
    """A trained head and how well it fits its training set."""

    head: LinearHead
    classes: list[str]
    train_accuracy: float
    iterations: int


def train_head(
    features: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    l2: float = 1e-3,
    iterations: int = 1000,
) -> TrainResult:
    """Fit a softmax classifier (multinomial logistic regression, L2-regularised).

    Features are standardised (per-feature mean and std) for the optimisation, which makes
    one step size fit every feature scale; the scaling is folded back into the weights, so
    the head takes the featurizer's raw output. The objective is minimised by Nesterov's
    accelerated gradient descent with step ``1/L`` (``L`` bounds the Hessian: the softmax
    cross-entropy's is at most half the features' Gram matrix), which is deterministic and
    needs nothing beyond numpy. ``l2`` penalises the standardised weights; with far more
    features than images (2048 vs tens) some penalty is needed for a finite solution.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise TesseraError(f"need [N, F] features and N labels, got {x.shape} and {y.shape}")
    k = len(classes)
    if k < 2:
        raise TesseraError(f"need at least two classes to train a classifier, got {k}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
        raise TesseraError(f"labels must be class ids 0..{k - 1}")
    missing = [classes[c] for c in range(k) if not np.any(y == c)]
    if missing:
        raise TesseraError(f"classes without any sample: {missing}")
    if not np.all(np.isfinite(x)):
        raise TesseraError("features contain NaN or Inf")
    n = len(x)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-12] = 1.0  # constant features carry no information; keep them at zero
    xs = np.hstack([(x - mean) / std, np.ones((n, 1))])
    onehot = np.eye(k)[y]
    lipschitz = 0.5 * np.linalg.norm(xs, 2) ** 2 / n + l2
    step = 1.0 / lipschitz
    reg = np.full((xs.shape[1], 1), l2)
    reg[-1] = 0.0  # the bias is not penalised

    def gradient(w: np.ndarray) -> np.ndarray:
        p = softmax(xs @ w)
        return xs.T @ (p - onehot) / n + reg * w

    w = np.zeros((xs.shape[1], k))
    prev = w
    for t in range(iterations):
        look = w + (t / (t + 3)) * (w - prev)
        prev, w = w, look - step * gradient(look)
    weight = w[:-1] / std[:, None]
    bias = w[-1] - mean @ weight
    head = LinearHead(weight.astype(np.float32), bias.astype(np.float32), softmax=True)
    accuracy = float(np.mean(head(x.astype(np.float32)).argmax(axis=1) == y))
    return TrainResult(head, list(classes), accuracy, iterations)


def accuracy(head: LinearHead, features: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``head`` on ``[N, F]`` features."""
    return float(np.mean(head(np.asarray(features, np.float32)).argmax(axis=1) == labels))


# --------------------------------------------------------------------------- featurizing
@dataclasses.dataclass
class Featurizer:
    """Preprocessing + the featurizer program: encoded image bytes to a feature vector.

    Built from a package (:meth:`from_path`), which carries the preprocessing and the
    program; the features are the program's output, which is what a host head consumes.
    """

    package: Package
    npu: NPU | None = None

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike[str],
        preprocess: str | None = None,
        config: str | None = None,
        npu: NPU | None = None,
    ) -> Featurizer:
        """``.tpkg`` (featurizer, or classifier with a host head), ``.tsr`` program (needs
        ``preprocess``) or ``.onnx`` model (compiled for ``config``; a classifier is cut
        before its head)."""
        from tessera import package as pkg
        from tessera.program import Program

        p = pathlib.Path(path)
        suffix = p.suffix.lower()
        if suffix == pkg.SUFFIX:
            loaded = pkg.load_package(p)
            if loaded.kind == "classifier" and loaded.host is None:
                raise TesseraError(
                    f"{p}: the classifier head of this package runs on the NPU, so its program "
                    "does not output features; package it with the head on the host"
                )
            if loaded.kind not in ("classifier", "featurizer"):
                raise TesseraError(f"{p}: a {loaded.kind} package is no featurizer")
            return cls(loaded, npu)
        if preprocess is None:
            raise TesseraError(f"{p}: pass --preprocess for a {suffix or 'program'} featurizer")
        if suffix == ".tsr":
            program = Program.load(p)
            built = pkg.Package.for_program(program, preprocess=preprocess, name=p.stem)
            return cls(built, npu)
        if suffix == ".onnx":
            built = pkg.build_package(
                p, preprocess=preprocess, config=config, name=p.stem, kind="featurizer"
            )
            return cls(built, npu)
        raise TesseraError(f"{p}: expected a featurizer .tpkg, .tsr or .onnx file")

    @property
    def output_name(self) -> str:
        return self.package.program_outputs[0]

    def __call__(self, data: bytes) -> np.ndarray:
        """Features of one encoded image as a 1-D float32 vector."""
        x = self.package.preprocess_image(data)
        out = self.package.run_npu({self.package.input_name: x}, self.npu)
        return np.asarray(out[self.output_name], np.float32).reshape(-1)


@dataclasses.dataclass
class Dataset:
    """Labelled feature vectors: ``features[i]`` belongs to ``classes[labels[i]]``."""

    features: np.ndarray
    labels: np.ndarray
    classes: list[str]
    sources: list[str]

    def save(self, path: str | os.PathLike[str]) -> None:
        """An ``.npz`` that :func:`load_dataset` reads back (the CLI's saved features)."""
        np.savez(
            path,
            features=self.features,
            labels=self.labels,
            classes=np.array(self.classes),
            sources=np.array(self.sources),
        )


def load_dataset(
    path: str | os.PathLike[str],
    featurizer: Callable[[bytes], np.ndarray] | None = None,
    progress: bool = False,
) -> Dataset:
    """Labelled features from an ``.npz`` (saved by :meth:`Dataset.save`) or a folder.

    A folder holds one sub-folder per class (its name is the label; classes in sorted
    order); each holds images (``.jpg``, ``.jpeg``, ``.png``, run through ``featurizer``)
    and/or ``.npy`` feature vectors. Hidden files are skipped; any other file is an error,
    as is an unreadable image, since silently dropping training data skews the classes.
    """
    from tessera.preprocess import ImageDecodeError

    p = pathlib.Path(path)
    if p.is_file() and p.suffix.lower() == ".npz":
        return _load_npz(p)
    if not p.is_dir():
        raise TesseraError(f"{p}: expected a folder of class sub-folders or a features .npz")
    class_dirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_dirs) < 2:
        raise TesseraError(
            f"{p}: found {len(class_dirs)} class sub-folder(s); need one per class, at least two"
        )
    items: list[tuple[pathlib.Path, int]] = []
    for label, d in enumerate(class_dirs):
        files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
        bad = [f.name for f in files if f.suffix.lower() not in (*IMAGE_SUFFIXES, FEATURE_SUFFIX)]
        if bad:
            raise TesseraError(
                f"{d}: unexpected files {bad[:5]}; a class folder holds images "
                f"({', '.join(IMAGE_SUFFIXES)}) or {FEATURE_SUFFIX} feature vectors"
            )
        if not files:
            raise TesseraError(f"{d}: the class folder is empty")
        items += [(f, label) for f in files]
    if featurizer is None and any(f.suffix.lower() != FEATURE_SUFFIX for f, _ in items):
        raise TesseraError(f"{p} holds images: pass --featurizer to compute their features")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="features", unit="image", file=sys.stderr)
    vectors = []
    try:
        for f, _ in items:
            if f.suffix.lower() == FEATURE_SUFFIX:
                vectors.append(np.load(f, allow_pickle=False).astype(np.float32).reshape(-1))
            else:
                try:
                    vectors.append(featurizer(f.read_bytes()))
                except ImageDecodeError as exc:
                    raise TesseraError(f"{f}: {exc}") from None
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    sizes = {len(v) for v in vectors}
    if len(sizes) != 1:
        raise TesseraError(f"{p}: feature vectors of different lengths {sorted(sizes)}")
    return Dataset(
        np.stack(vectors),
        np.array([label for _, label in items]),
        [d.name for d in class_dirs],
        [str(f) for f, _ in items],
    )


def _load_npz(path: pathlib.Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("features", "labels", "classes") if k not in data.files]
            if missing:
                raise TesseraError(
                    f"{path}: missing arrays {missing}; expected features [N, F], labels [N], "
                    "classes [C] (as written by --save-features)"
                )
            features = data["features"].astype(np.float32)
            labels = data["labels"].astype(np.int64)
            if "sources" in data.files:
                sources = [str(s) for s in data["sources"]]
            else:
                sources = [f"{path}[{i}]" for i in range(len(labels))]
            return Dataset(features, labels, [str(c) for c in data["classes"]], sources)
    except (OSError, ValueError) as exc:
        raise TesseraError(f"{path}: not a features .npz ({exc})") from None


def holdout_split(
    labels: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified train/held-out split: ``fraction`` of each class held out
    (at least one image when ``fraction > 0``, never all of a class)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1) if fraction > 0 else 0
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


# --------------------------------------------------------------------------- CLI
def _cmd_train(args: argparse.Namespace) -> int:
    from tessera.package import backend_npu

    featurizer = None
    source = pathlib.Path(args.data)
    if args.featurizer:
        featurizer = Featurizer.from_path(
            args.featurizer, args.preprocess, args.config, npu=backend_npu(args.backend)
        )
    if not 0.0 <= args.holdout < 1.0:
        raise TesseraError(f"--holdout must be in [0, 1), got {args.holdout}")
    data = load_dataset(source, featurizer, progress=True)
    if args.save_features:
        data.save(args.save_features)
    train_idx, test_idx = holdout_split(data.labels, args.holdout, args.seed)
    result = train_head(
        data.features[train_idx],
        data.labels[train_idx],
        data.classes,
        l2=args.l2,
        iterations=args.iterations,
    )
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.head.to_onnx(labels=data.classes).SerializeToString())
    labels_path = pathlib.Path(args.labels)
    labels_path.parent.mkdir(parents=True, exist_ok=True)
    labels_path.write_text("".join(f"{c}\n" for c in data.classes), encoding="utf-8")
    line = (
        f"wrote {out} ({len(data.classes)} classes, {data.features.shape[1]} features) and "
        f"{labels_path}; trained on {len(train_idx)} samples, train accuracy "
        f"{result.train_accuracy:.3f}"
    )
    if len(test_idx):
        held = accuracy(result.head, data.features[test_idx], data.labels[test_idx])
        chance = 1 / len(data.classes)
        line += f", held-out accuracy {held:.3f} on {len(test_idx)} (chance {chance:.3f})"
    print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tessera head train`` to the CLI."""
    from tessera.config import DEFAULT_PRESET, PRESETS
    from tessera.preprocess import PRESETS as PREPROCESS_PRESETS

    head = sub.add_parser("head", help="classifier heads on featurizer outputs")
    head_sub = head.add_subparsers(dest="head_command", required=True)
    train = head_sub.add_parser(
        "train",
        help="train a softmax classifier head on featurizer features (transfer learning)",
        description="Train a softmax classifier (multinomial logistic regression) on features "
        "and write it as ONNX (Gemm + Softmax) for `tessera package --head`. DATA is a folder "
        "with one sub-folder per class (images and/or .npy feature vectors) or an .npz saved "
        "by --save-features.",
    )
    train.add_argument("data", help="folder of class sub-folders, or a features .npz")
    train.add_argument("-o", "--output", required=True, help="head ONNX file to write")
    train.add_argument(
        "--labels",
        required=True,
        help="labels file to write: the class names, one per line (line i = class id i); "
        "they are also stored in the head's metadata",
    )
    train.add_argument(
        "--featurizer",
        help="featurizer for image folders: a .tpkg, a .tsr (with --preprocess) or an .onnx "
        "model (compiled with --config; a classifier is cut before its head)",
    )
    train.add_argument(
        "--preprocess", choices=sorted(PREPROCESS_PRESETS), help="preprocessing for .tsr/.onnx"
    )
    train.add_argument(
        "--config", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="NPU config for .onnx"
    )
    train.add_argument("--backend", default="sim", help="execution backend (default sim)")
    train.add_argument("--save-features", help="also write the features to this .npz")
    train.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of each class held out to report accuracy on (default 0)",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    train.add_argument("--l2", type=float, default=1e-3, help="L2 penalty (default 1e-3)")
    train.add_argument("--iterations", type=int, default=1000, help="gradient steps")
    train.set_defaults(func=_cmd_train)
