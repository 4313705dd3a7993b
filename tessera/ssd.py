"""SSD300 on a VGG-16 trunk: the Keras model, its NPU/host split, anchors, decoding and NMS.

The fifth seed model detects objects: a VGG-16 trunk at 300 x 300, six feature maps
(``conv4_3``, ``fc7``, ``conv8_2``, ``conv9_2``, ``conv10_2``, ``conv11_2``: 38, 19, 10, 5, 3
and 1 cells a side) and on each a 3 x 3 box head (``loc_*``: 4 offsets per default box) and a
3 x 3 class head (``conf_*``: ``num_classes`` logits per default box), 8732 default boxes in
all. The twelve head outputs are what the NPU computes; the host turns them into detections.

Where each part runs, and why
-----------------------------
* **NPU: every convolution, pooling and ReLU**, dilated ``fc6`` included (the MVU walks a
  dilated window like any other), the extra layers and all twelve heads.
* **Host: the L2 normalisation of ``conv4_3``** (``y = gamma * x / sqrt(max(sum_c x^2,
  eps))`` per pixel, ``gamma`` a learnable per-channel scale initialised to 20). The NPU
  cannot compute it under ``docs/numerics.md``: every MFU operand is either a constant
  vector or a stored tensor added or maxed lane-wise, so there is no product of two
  activations (no ``x^2``), no reduction across the lanes of a block outside the MVU, and
  no square root or division by a per-pixel value. Adding them means a new spec section,
  new ISA operations, simulator, reference and RTL changes, for one layer of the model.
  Instead the network is split into two NPU programs with a host stage between them
  (:func:`split_model`):

  1. the **trunk program**: image -> everything that does not depend on the normalised
     ``conv4_3`` (the whole trunk and extra layers, ten of the twelve heads), plus the
     raw ``conv4_3`` (ReLU output) as an extra output;
  2. the **host stage** reads ``conv4_3``, divides each pixel by its norm in float64 and
     quantizes the unit vectors as the next program's input (:func:`l2_normalize`);
  3. the **head program**: the two ``conv4_3`` heads. The learnable scale ``gamma`` stays
     in the ONNX graph as a per-channel multiply in front of them, which the compiler's
     ``fold_scale_into_conv`` pass folds into their weights: it is quantized with the
     weights and the host stage has no parameters but ``eps``.

  The cost of the round trip is one extra copy of ``conv4_3`` each way, 38 x 38 x 512
  mantissas plus one exponent per block of N channels: 785,536 bytes at N = 16
  (ulx3s-85f) and 762,432 bytes at N = 32 (``large``), read by the host and written
  back, ~1.5 MB in all (:meth:`CompiledSSD.host_transfer_bytes`). Against the NPU's
  work, 31.4 G MACs (the cycle model: 257.6 M cycles = 2.58 s at 100 MHz on an 85F-sized
  NPU, 6.25 ms on ``large``), that is nothing where the host sits on the DRAM bus (7.9 ms
  at the ULX3S's 200 MB/s), ~1.5 s over USB 2 full speed (~1 MB/s), and ~5.2 s over
  the ULX3S's FT231X UART (~300 kB/s), as much again as uploading the 300 x 300 input
  (1.53 MB in storage BFP): behind a UART the host link, not the NPU, sets SSD's
  latency, with or without this stage. That is the price of not extending the ISA. The
  host arithmetic itself (1444 norms of 512 values, float64) takes 2-15 ms.

Fit: SSD300 has 26.3 M parameters, 26.4 MiB as 8-bit BFP tiles with their exponents
(weights and constants of both programs: 26.9 MiB), and its 300 x 300 x 64 ``conv1``
maps need 13.1 MiB of activations at the peak: 39.5 MiB for the trunk program, over the
ULX3S-85F's 32 MiB (the compiler says by how much); ``fc7``'s 3 x 3 heads also need 576
tiles of 16 x 16 per output block where the 85F's tile buffer holds 384. It runs on the
``large`` preset.

Anchors, decoding and NMS (:func:`default_anchors`, :func:`decode_detections`) follow the
original SSD300 (Liu et al., 2016, Caffe ``ssd_pascal.py``): box sizes 30, 60, 111, 162,
213, 264 (and 315) pixels, aspect ratios {2} on ``conv4_3``, ``conv10_2``, ``conv11_2`` and
{2, 3} elsewhere, variances 0.1 (centre) and 0.2 (size), per-class NMS at IoU 0.45 keeping
the top 200. Boxes come out as ``[class_id, score, ymin, xmin, ymax, xmax]`` in coordinates
relative to the image (0..1).

Packaging (``tessera package ssd.onnx --preprocess ssd --config large``, see
:func:`detector_package`): a ``detector`` package holds the trunk program as its program and
:class:`SSDDetectionStage` as its host stage (head program, L2 norm, the 8732 default boxes,
the :class:`DetectionOptions`). ``Package.run`` returns TensorFlow object-detection API
tensors (:data:`DETECTION_OUTPUTS`: ``detection_boxes`` ``[1, K, 4]``,
``detection_scores`` and ``detection_classes`` ``[1, K]``, ``num_detections`` ``[1]``, K =
``max_detections``, zero-padded), fixed-size so the scoring service stacks a batch; the
twelve head maps stay inside (:meth:`SSDDetectionStage.heads` gives them).
``tessera score`` prints the detections (``--score-threshold``, ``--iou-threshold``,
``--max-detections`` override the stored defaults).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx
import onnx.numpy_helper

from tessera.package import HostStage, Package, register_host_stage
from tessera.preprocess import PreprocessSpec
from tessera.score import ResultKind, register_result_kind

if TYPE_CHECKING:
    import keras

    from tessera.config import NPUConfig
    from tessera.program import Program
    from tessera.sim.run import RunResult

# --------------------------------------------------------------------------- architecture
IMAGE_SIZE = 300
INPUT_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE, 3)  # NHWC float32, as the zoo's other models
#: PASCAL VOC's 20 classes plus background (class 0).
NUM_CLASSES = 21
#: Class names of the 21 outputs (SSD300's VOC0712 order; class 0 is never reported).
VOC_LABELS = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
#: The feature maps the heads read, in anchor order.
SOURCES = ("conv4_3", "fc7", "conv8_2", "conv9_2", "conv10_2", "conv11_2")
FEATURE_SIZES = (38, 19, 10, 5, 3, 1)
#: Default boxes per cell: 1 + 1 + 2 * len(aspect ratios) of the source.
BOXES_PER_CELL = (4, 6, 6, 6, 4, 4)
LOC_OUTPUTS = tuple(f"loc_{s}" for s in SOURCES)
CONF_OUTPUTS = tuple(f"conf_{s}" for s in SOURCES)
#: ONNX graph outputs of the zoo export, in this order: six box heads, then six class heads.
OUTPUT_NAMES = LOC_OUTPUTS + CONF_OUTPUTS
#: Keras layer name of the L2 normalisation (tf2onnx scopes its ONNX nodes with it).
L2NORM_LAYER = "conv4_3_norm"
L2NORM_GAMMA_INIT = 20.0
#: ``tf.math.l2_normalize``'s default: only guards an all-zero pixel against 0 / 0.
L2NORM_EPSILON = 1e-12
#: Pre-activation std the data-dependent init gives each head (see initialize_weights):
#: box offsets of unit scale (the variance encoding makes trained ones ~N(0, 1)), class
#: logits as peaked as the zoo's classifiers.
LOC_STD = 1.0
CONF_STD = 2.0
#: Added to the background logit of every default box by the init: with it ~94 % of the
#: boxes are background and a few hundred class scores exceed 0.5 on a calibration-like
#: input, as for a trained detector, instead of 99 % of the boxes claiming some object.
BACKGROUND_LOGIT = 6.0


def build_keras_model(num_classes: int = NUM_CLASSES) -> keras.Model:
    """SSD300-VGG16 in Keras, with Keras' default (untrained) weights.

    Layer for layer the Caffe original: VGG-16's 13 convs with ``pool3`` rounding up (38
    from 75, Caffe's ``ceil_mode``; here ``padding="same"``, the same 38 x 38 grid),
    ``pool5`` 3 x 3 stride 1, ``fc6`` a 3 x 3 conv with dilation 6 and ``fc7`` 1 x 1 (the
    subsampled fully connected layers), the extra layers ``conv8_1`` .. ``conv11_2``
    (stride-2 3 x 3 convs padded by one on each side through ``ZeroPadding2D``, as
    Caffe's ``pad: 1``, then two unpadded 3 x 3 convs down to 1 x 1), and twelve linear
    3 x 3 heads. The outputs are the raw head maps ``[1, H, W, boxes * 4]`` and ``[1, H,
    W, boxes * num_classes]``: reshaping them into one box list is the host's job, where
    it costs nothing, instead of the NPU's, where it would be a copy.
    """
    import keras
    from keras import layers

    def conv(x, filters: int, kernel: int, name: str, **kw):
        return layers.Conv2D(
            filters, kernel, padding=kw.pop("padding", "same"), activation="relu", name=name, **kw
        )(x)

    image = keras.Input(shape=INPUT_SHAPE[1:], batch_size=1, name="input")
    x = image
    for block, (filters, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3)), start=1):
        for i in range(1, convs + 1):
            x = conv(x, filters, 3, f"conv{block}_{i}")
        if block == 4:
            conv4_3 = x
        padding = "same" if block == 3 else "valid"
        x = layers.MaxPooling2D(2, 2, padding=padding, name=f"pool{block}")(x)
    for i in (1, 2, 3):
        x = conv(x, 512, 3, f"conv5_{i}")
    x = layers.MaxPooling2D(3, 1, padding="same", name="pool5")(x)
    x = conv(x, 1024, 3, "fc6", dilation_rate=6)
    fc7 = conv(x, 1024, 1, "fc7")
    sources = [l2_normalization_class()(name=L2NORM_LAYER)(conv4_3), fc7]
    x = fc7
    for block, (mid, out, stride) in enumerate(
        ((256, 512, 2), (128, 256, 2), (128, 256, 1), (128, 256, 1)), start=8
    ):
        x = conv(x, mid, 1, f"conv{block}_1")
        if stride == 2:
            x = layers.ZeroPadding2D(1, name=f"conv{block}_pad")(x)
        x = conv(x, out, 3, f"conv{block}_2", strides=stride, padding="valid")
        sources.append(x)
    heads = {}
    for name, src, boxes in zip(SOURCES, sources, BOXES_PER_CELL, strict=True):
        for kind, width in (("loc", 4), ("conf", num_classes)):
            heads[f"{kind}_{name}"] = layers.Conv2D(
                boxes * width, 3, padding="same", name=f"{kind}_{name}"
            )(src)
    return keras.Model(image, [heads[n] for n in OUTPUT_NAMES], name="ssd300_vgg16")


@functools.cache
def l2_normalization_class() -> type:
    """The Keras L2 normalisation layer class (defined lazily: Keras is imported only to
    build the model; pass it as ``custom_objects`` to load a saved ``.keras`` SSD)."""
    import keras
    from keras import ops

    class L2Normalization(keras.layers.Layer):
        """``gamma * x / sqrt(max(sum_c x^2, eps))`` over the channel axis (ParseNet's
        L2Norm with a learnable per-channel scale): conv4_3's features have a larger
        scale than the deeper maps', and normalising them lets its heads train at the
        same rate as the others."""

        def __init__(self, gamma_init: float = L2NORM_GAMMA_INIT, **kwargs) -> None:
            super().__init__(**kwargs)
            self.gamma_init = gamma_init

        def build(self, input_shape) -> None:
            self.gamma = self.add_weight(
                name="gamma",
                shape=(input_shape[-1],),
                initializer=keras.initializers.Constant(self.gamma_init),
            )

        def call(self, x):
            squares = ops.sum(ops.square(x), axis=-1, keepdims=True)
            return x * ops.rsqrt(ops.maximum(squares, L2NORM_EPSILON)) * self.gamma

        def get_config(self) -> dict:
            return {**super().get_config(), "gamma_init": self.gamma_init}

    return L2Normalization


def initialize_weights(model: keras.Model, seed: int, images: np.ndarray) -> None:
    """Seeded data-dependent init of the SSD, the zoo's recipe carried over to a DAG.

    As for VGG-16 (``zoo._calibrate_plain_chain``), each hidden conv's kernel is scaled so
    that its pre-activation output has std 1 on the calibration ``images`` (seeded
    N(0, INPUT_STD^2) pictures), and every bias is drawn from N(0, 0.1); the box heads are
    scaled to std :data:`LOC_STD` and the class heads to :data:`CONF_STD`, so box offsets
    move boxes by a fraction of their size and class scores are peaked but not one-hot.
    Without it the random VGG's activations shrink ~1.4x per ReLU layer and the deepest
    heads would output rounding noise. The layers are visited in the model's topological
    order, each evaluated on its calibrated inputs, so a branch sees what it will see at
    inference. ``gamma`` keeps its init of 20. Finally the class heads' background
    logits get :data:`BACKGROUND_LOGIT`, so that, as with trained weights, most default
    boxes are background and NMS sees a sparse set of confident boxes rather than 8732
    near-ties (which would make any comparison of two implementations' detections a
    lottery).
    """
    import keras

    from tessera.zoo import _rescale_output

    rng = np.random.default_rng(seed)
    values: dict[int, np.ndarray] = {id(model.inputs[0]): images}
    for layer in model.layers[1:]:
        inputs = layer.input
        args = [values[id(t)] for t in inputs] if isinstance(inputs, list) else values[id(inputs)]
        if isinstance(layer, keras.layers.Conv2D):
            target = {"loc": LOC_STD, "conf": CONF_STD}.get(layer.name.split("_")[0], 1.0)
            _rescale_output(layer, args, target, rng)
            if layer.name.startswith("conf_"):
                boxes = BOXES_PER_CELL[SOURCES.index(layer.name.removeprefix("conf_"))]
                bias = layer.bias.numpy()
                bias[:: bias.size // boxes] += BACKGROUND_LOGIT  # channel 0 of every box
                layer.bias.assign(bias)
        values[id(layer.output)] = np.asarray(layer(args))


# --------------------------------------------------------------------------- NPU/host split
@dataclasses.dataclass(frozen=True)
class L2NormSite:
    """The L2 normalisation found in an ONNX graph (see :func:`find_l2_normalization`).

    ``y = transpose(gamma * x / sqrt(max(sum(x^2, channel_axis), epsilon)), perm)``, with
    ``gamma`` broadcast along ``channel_axis`` of ``x``; ``perm`` is the identity when the
    output keeps the input's layout (tf2onnx's transpose optimizer usually achieves that).
    """

    x: str
    y: str
    channel_axis: int
    perm: tuple[int, ...]
    gamma: np.ndarray
    epsilon: float
    nodes: tuple[str, ...]


def _scope_pattern(layer: str) -> re.Pattern[str]:
    # tf2onnx names a Keras layer's nodes "<model>/<layer>_1/<op>" (Keras 3 appends "_1").
    return re.compile(rf"(^|/){re.escape(layer)}(_\d+)?/")


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant node output, else None."""
    init = _initializers(model).get(name)
    if init is not None:
        return onnx.numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return onnx.numpy_helper.to_array(attr.t)
    return None


def _inner_transposes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Transposes named outside the layer's scope that only connect its nodes.

    tf2onnx's transpose optimizer leaves some Transposes where the layout changes and
    names them after no layer (``Transpose__112``); which ones, and where, varies from one
    export of the same model to the next. One that reads a tensor of the layer and is read
    only by the layer's nodes is part of the layer.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    members = {id(n) for n in nodes}
    produced = {t for n in nodes for t in n.output}
    found: list[onnx.NodeProto] = []
    grew = True
    while grew:
        grew = False
        for n in model.graph.node:
            if id(n) in members or n.op_type != "Transpose" or n.input[0] not in produced:
                continue
            out = n.output[0]
            users = readers.get(out, [])
            if users and out not in graph_outputs and all(id(u) in members for u in users):
                found.append(n)
                members.add(id(n))
                produced.add(out)
                grew = True
    return found


def find_l2_normalization(model: onnx.ModelProto, layer: str = L2NORM_LAYER) -> L2NormSite:
    """Locate the Keras L2 normalisation layer ``layer`` in a tf2onnx graph and read it.

    The layer's nodes are found by their name scope; from them: the one tensor read from
    outside (through Transposes, whose permutations are composed), the one tensor read by
    the rest of the graph, ``gamma`` (the per-channel constant), ``epsilon`` (the constant
    of the ``Max``) and the channel axis (the ``ReduceSum`` axis mapped back to the input).
    What is read this way is then *checked*: the scope is run by onnxruntime on a random
    input (one pixel all zero, to exercise ``epsilon``) and must equal the float64 formula
    of :class:`L2NormSite` to 1e-5, so a differently built normalisation is refused with a
    clear error instead of being silently mis-run on the host.
    """
    from tessera.errors import UnsupportedModelError

    scope = _scope_pattern(layer)
    nodes = [n for n in model.graph.node if scope.search(n.name)]
    if not nodes:
        raise UnsupportedModelError(
            f"no L2 normalisation layer {layer!r} in the graph (no node named '.../{layer}/...')"
        )
    nodes += _inner_transposes(model, nodes)
    produced = {t for n in nodes for t in n.output}
    producer = {t: n for n in model.graph.node for t in n.output}
    inside = {id(n) for n in nodes}
    outside = [n for n in model.graph.node if id(n) not in inside]
    read_outside = {t for n in outside for t in n.input} | {o.name for o in model.graph.output}
    ys = sorted(produced & read_outside)
    if len(ys) != 1:
        raise UnsupportedModelError(f"L2 normalisation {layer!r}: outputs {ys}, expected one")

    def source(t: str) -> tuple[str, tuple[int, ...]]:
        """Follow Transposes back from ``t``: (source tensor, perm with t = transpose(src))."""
        perm: tuple[int, ...] = (0, 1, 2, 3)
        while t in producer and producer[t].op_type == "Transpose":
            node = producer[t]
            p = next(onnx.helper.get_attribute_value(a) for a in node.attribute)
            perm = tuple(p[i] for i in perm)
            t = node.input[0]
        return t, perm

    def fail(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"L2 normalisation {layer!r}: {what}; supported: gamma * x / sqrt(max(sum(x^2), "
            "eps)) over the channel axis, as tessera.ssd builds it"
        )

    external = {
        t for n in nodes for t in n.input if t and t not in produced and _constant(model, t) is None
    }
    sources = {source(t)[0] for t in external}
    if len(sources) != 1:
        raise fail(f"reads {sorted(sources)}, expected one activation")
    (x,) = sources
    final = producer[ys[0]]
    if final.op_type != "Mul":
        raise fail(f"its output is computed by {final.op_type}, expected Mul")
    direct = [source(t) for t in final.input if t not in produced]
    if len(direct) != 1 or direct[0][0] != x:
        raise fail("its output is not the input times a per-pixel factor")
    perm = direct[0][1]
    reduce = [n for n in nodes if n.op_type == "ReduceSum"]
    maxes = [n for n in nodes if n.op_type == "Max"]
    if len(reduce) != 1 or len(maxes) != 1:
        raise fail("expected one ReduceSum and one Max")
    axes = _constant(model, reduce[0].input[1]) if len(reduce[0].input) > 1 else None
    if axes is None or axes.size != 1:
        raise fail("the ReduceSum must have one constant axis")
    # The ReduceSum reads x^2 through Transposes: map its axis back to x's axes.
    square_src, square_perm = source(reduce[0].input[0])
    square = producer.get(square_src)
    factors = [source(t) for t in square.input] if square is not None else []
    if square is None or square.op_type != "Mul" or len(set(factors)) != 1 or factors[0][0] != x:
        raise fail("the ReduceSum does not read x * x")
    # ReduceSum input axis a is x^2's axis square_perm[a], which is x's axis perm[that].
    axis = int(axes.reshape(-1)[0]) % 4
    channel_axis = factors[0][1][square_perm[axis]]
    eps_values = [v for v in (_constant(model, t) for t in maxes[0].input) if v is not None]
    if len(eps_values) != 1 or eps_values[0].size != 1:
        raise fail("the Max must compare with one scalar constant")
    epsilon = float(eps_values[0].reshape(-1)[0])
    gammas = [v for v in (_constant(model, t) for n in nodes for t in n.input) if v is not None]
    gammas = [g for g in gammas if g.size > 1]
    if len(gammas) != 1:
        raise fail(f"expected one per-channel scale, found {len(gammas)}")
    site = L2NormSite(
        x=x,
        y=ys[0],
        channel_axis=channel_axis,
        perm=perm,
        gamma=gammas[0].reshape(-1).astype(np.float64),
        epsilon=epsilon,
        nodes=tuple(n.name for n in nodes),
    )
    _check_l2_site(model, site, fail)
    return site


def _check_l2_site(model: onnx.ModelProto, site: L2NormSite, fail) -> None:
    """Run the found nodes with onnxruntime and compare them with the formula."""
    import onnxruntime as ort

    shape = _inferred_shapes(model)[site.x]
    channels = shape[site.channel_axis]
    if site.gamma.size != channels:
        raise fail(f"gamma has {site.gamma.size} values for {channels} channels")
    # Everything between x and y (the scope and any Transposes in front of it).
    sub = _subgraph(model, [(site.x, shape)], [site.y])
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    pixel = [slice(None) if a == site.channel_axis else 0 for a in range(4)]
    x[tuple(pixel)] = 0  # one all-zero pixel: the epsilon case
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run([site.y], {site.x: x})
    want = l2_normalize(x.astype(np.float64), site.channel_axis, site.epsilon)
    gamma_shape = [channels if a == site.channel_axis else 1 for a in range(4)]
    want = np.transpose(want * site.gamma.reshape(gamma_shape), site.perm)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise fail("the graph does not compute the L2 normalisation formula")


def l2_normalize(x: np.ndarray, channel_axis: int, epsilon: float = L2NORM_EPSILON) -> np.ndarray:
    """The host stage: ``x / sqrt(max(sum(x^2), epsilon))`` over ``channel_axis``, float64.

    ``tf.math.l2_normalize``'s form: ``epsilon`` only matters for a pixel whose channels
    are all zero (after the ReLU that happens), which it maps to zero instead of NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    squares = np.sum(x * x, axis=channel_axis, keepdims=True)
    return x / np.sqrt(np.maximum(squares, epsilon))


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor of ``model`` from ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    return shapes


def _subgraph(
    model: onnx.ModelProto,
    inputs: Sequence[tuple[str, Sequence[int]]],
    outputs: Sequence[str],
    prefix: Sequence[onnx.NodeProto] = (),
    extra_initializers: Sequence[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    """A model computing ``outputs`` from the float tensors ``inputs`` (name, shape).

    Keeps the nodes of ``model`` that ``outputs`` need, stopping at ``inputs``, in their
    original order, after the ``prefix`` nodes (which compute some of the kept nodes'
    inputs), and copies the initializers they read.
    """
    pool = list(model.graph.node)
    producer = {t: i for i, n in enumerate(pool) for t in n.output}
    stop = {name for name, _ in inputs} | {t for n in prefix for t in n.output}
    keep: set[int] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if t in stop or t not in producer or producer[t] in keep:
            continue
        keep.add(producer[t])
        stack.extend(i for i in pool[producer[t]].input if i)
    kept = [*prefix, *(pool[i] for i in sorted(keep))]
    read = {t for n in kept for t in n.input}
    inits = [t for t in model.graph.initializer if t.name in read]
    graph = onnx.helper.make_graph(
        kept,
        model.graph.name,
        [
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape))
            for name, shape in inputs
        ],
        [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs],
        [*inits, *extra_initializers],
    )
    return onnx.helper.make_model(
        graph, opset_imports=model.opset_import, ir_version=model.ir_version
    )


@dataclasses.dataclass
class SSDSplit:
    """An SSD graph cut around its L2 normalisation (see the module docstring).

    ``trunk`` maps the image to ``trunk_outputs`` (the heads that do not depend on the
    normalisation, then ``site.x``); ``head`` maps :attr:`head_input` (the unit-norm
    ``conv4_3``, NCHW) to ``head_outputs``, starting with the multiply by ``gamma``.
    """

    trunk: onnx.ModelProto
    head: onnx.ModelProto
    site: L2NormSite
    trunk_outputs: tuple[str, ...]
    head_outputs: tuple[str, ...]
    head_input: str
    output_names: tuple[str, ...]


def split_model(model: onnx.ModelProto, layer: str = L2NORM_LAYER) -> SSDSplit:
    """Cut an SSD ONNX graph into the trunk program, the host stage and the head program.

    The head program's input is the normalised ``conv4_3`` in NCHW, ``[1, C, H, W]``: the
    compiler infers an input's layout from the Transpose that reads it, and the head
    program's input is read by the ``gamma`` multiply, so it is given the layout the
    compiler assumes then. The multiply (``gamma`` as ``[1, C, 1, 1]``) and, if the
    original output had another layout, a Transpose to it recreate ``site.y`` exactly.
    """
    site = find_l2_normalization(model, layer)
    shapes = _inferred_shapes(model)
    graph_outputs = [o.name for o in model.graph.output]
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    after_y = {site.y}
    stack = [site.y]
    while stack:
        for n in readers.get(stack.pop(), []):
            for t in n.output:
                if t not in after_y:
                    after_y.add(t)
                    stack.append(t)
    head_outputs = tuple(o for o in graph_outputs if o in after_y)
    trunk_outputs = (*(o for o in graph_outputs if o not in after_y), site.x)
    (image,) = (i for i in model.graph.input if i.name not in _initializers(model))
    image_shape = [d.dim_value for d in image.type.tensor_type.shape.dim]
    trunk = _subgraph(model, [(image.name, image_shape)], trunk_outputs)

    x_shape = shapes[site.x]
    channels = x_shape[site.channel_axis]
    spatial = [a for a in range(1, 4) if a != site.channel_axis]
    to_nchw = (0, site.channel_axis, *spatial)  # x = transpose(nchw, inverse of to_nchw)
    nchw_shape = [x_shape[a] for a in to_nchw]
    head_input = f"{layer}/unit"
    gamma_name = f"{layer}/gamma"
    gamma = onnx.numpy_helper.from_array(
        site.gamma.reshape(1, channels, 1, 1).astype(np.float32), gamma_name
    )
    # y's axis i is x's axis perm[i], which is NCHW axis to_nchw[perm[i]].
    y_from_nchw = [to_nchw[p] for p in site.perm]
    scaled = site.y if y_from_nchw == [0, 1, 2, 3] else f"{layer}/scaled"
    prefix = [
        onnx.helper.make_node("Mul", [head_input, gamma_name], [scaled], name=f"{layer}/gamma")
    ]
    if scaled != site.y:
        prefix.append(
            onnx.helper.make_node(
                "Transpose", [scaled], [site.y], perm=y_from_nchw, name=f"{layer}/to_layout"
            )
        )
    head = _subgraph(
        model, [(head_input, nchw_shape)], head_outputs, prefix=prefix, extra_initializers=[gamma]
    )
    return SSDSplit(
        trunk=trunk,
        head=head,
        site=site,
        trunk_outputs=trunk_outputs,
        head_outputs=head_outputs,
        head_input=head_input,
        output_names=tuple(graph_outputs),
    )


# --------------------------------------------------------------------------- two programs
@dataclasses.dataclass(frozen=True)
class L2NormStage:
    """The host stage between the trunk and the head program.

    Reads trunk output :attr:`source` in its ONNX layout (ONNX axis ``i`` is NCHW axis
    ``perm[i]``, as in the program manifest), writes head input :attr:`target` in NCHW:
    :func:`l2_normalize` over the channels, in float64, which the head program's input
    quantization then rounds to storage BFP like any input.
    """

    source: str
    target: str
    perm: tuple[int, ...] = (0, 1, 2, 3)
    epsilon: float = L2NORM_EPSILON

    def __call__(self, trunk_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The head program's inputs from the trunk program's outputs."""
        nchw = np.transpose(trunk_outputs[self.source], np.argsort(self.perm))
        return {self.target: l2_normalize(nchw, 1, self.epsilon)}

    def to_dict(self) -> dict:
        """JSON-serialisable form (for a package manifest)."""
        return {"op": "l2_normalize", **dataclasses.asdict(self), "perm": list(self.perm)}

    @classmethod
    def from_dict(cls, data: dict) -> L2NormStage:
        from tessera.errors import TesseraError

        if data.get("op") != "l2_normalize":
            raise TesseraError(f"unknown SSD host stage {data.get('op')!r}")
        try:
            perm = tuple(int(a) for a in data["perm"])
            stage = cls(str(data["source"]), str(data["target"]), perm, float(data["epsilon"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TesseraError(f"invalid SSD host stage {data!r}: {exc}") from None
        if sorted(perm) != [0, 1, 2, 3] or perm[0] != 0:
            raise TesseraError(f"invalid SSD host stage: perm {list(perm)}")
        return stage


#: A way to run a program: ``npu(program, inputs) -> outputs`` keyed by ONNX names (the
#: same signature as ``tessera.package.backend_npu``'s runners).
NPURunner = Callable[["Program", dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclasses.dataclass
class CompiledSSD:
    """An SSD compiled for one NPU configuration: two programs and the host stage between.

    ``output_names`` is the original graph's output order (six box heads, six class heads
    for the zoo model); :func:`run_heads` and :func:`run_ssd` return the outputs in that
    order. To store it: the two programs' ``to_bytes()`` and :meth:`params`; to load it:
    :meth:`from_parts`.
    """

    trunk: Program
    head: Program
    stage: L2NormStage
    output_names: tuple[str, ...]

    @property
    def input_name(self) -> str:
        """The image input of the trunk program (``input`` for the zoo model)."""
        return self.trunk.manifest["inputs"][0]["name"]

    def params(self) -> dict:
        """JSON-serialisable description of everything but the two programs."""
        return {"stage": self.stage.to_dict(), "output_names": list(self.output_names)}

    @classmethod
    def from_parts(cls, trunk: Program, head: Program, params: dict) -> CompiledSSD:
        """Rebuild from the two programs and :meth:`params`, checking they fit together."""
        from tessera.errors import TesseraError

        stage = L2NormStage.from_dict(params.get("stage", {}))
        names = tuple(params.get("output_names", ()))
        trunk_out = [o["name"] for o in trunk.manifest["outputs"]]
        head_in = [i["name"] for i in head.manifest["inputs"]]
        head_out = [o["name"] for o in head.manifest["outputs"]]
        problems = []
        if stage.source not in trunk_out:
            problems.append(f"the trunk program has no output {stage.source!r}")
        if head_in != [stage.target]:
            problems.append(f"the head program takes {head_in}, not [{stage.target!r}]")
        missing = [n for n in names if n not in trunk_out + head_out]
        if not names or missing:
            problems.append(f"outputs {missing or 'none'} are computed by neither program")
        if trunk.config.fingerprint() != head.config.fingerprint():
            problems.append("the two programs are compiled for different NPU configurations")
        if problems:
            raise TesseraError("inconsistent SSD programs: " + "; ".join(problems))
        return cls(trunk, head, stage, names)

    def host_transfer_bytes(self) -> tuple[int, int]:
        """(bytes the host reads, bytes it writes) for the host stage: the DRAM images
        of ``conv4_3`` in storage BFP, mantissas plus block exponents."""
        from tessera import layout

        cfg = self.trunk.config
        src = next(o for o in self.trunk.manifest["outputs"] if o["name"] == self.stage.source)
        dst = next(i for i in self.head.manifest["inputs"] if i["name"] == self.stage.target)
        n, m = cfg.native_dim, cfg.mantissa_bits
        read = layout.tensor_bytes(src["h"], src["w"], src["cb_cnt"], n, m)
        write = layout.tensor_bytes(dst["h"], dst["w"], dst["cb"], n, m)
        return read, write + 4  # + the input's exponent maximum word


def compile_ssd(model: onnx.ModelProto | str, cfg: NPUConfig) -> CompiledSSD:
    """Split an SSD graph (:func:`split_model`) and compile both parts for ``cfg``."""
    from tessera.compiler.driver import compile_model
    from tessera.compiler.onnx_import import load_model

    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    split = split_model(model)
    trunk, _, _ = compile_model(split.trunk, cfg)
    head, _, _ = compile_model(split.head, cfg)
    source = next(o for o in trunk.manifest["outputs"] if o["name"] == split.site.x)
    stage = L2NormStage(split.site.x, split.head_input, tuple(source["perm"]), split.site.epsilon)
    return CompiledSSD(trunk, head, stage, split.output_names)


def run_heads(compiled: CompiledSSD, image: np.ndarray, npu: NPURunner) -> dict[str, np.ndarray]:
    """Trunk program, host L2 normalisation, head program through ``npu``: the twelve
    head outputs by name, in :attr:`CompiledSSD.output_names` order. Any backend (the
    simulator, the reference, the RTL, a board) plugs in as ``npu``."""
    trunk = npu(compiled.trunk, {compiled.input_name: image})
    head = npu(compiled.head, compiled.stage(trunk))
    found = {**trunk, **head}
    return {n: found[n] for n in compiled.output_names}


@dataclasses.dataclass
class SSDRun:
    """What :func:`run_ssd` did: the head outputs and both programs' runs."""

    outputs: dict[str, np.ndarray]
    trunk: RunResult
    head: RunResult
    #: Seconds spent in the host stage (the quantization happens in the head's DRAM build).
    host_seconds: float


def run_ssd(compiled: CompiledSSD, image: np.ndarray, backend: str = "sim") -> SSDRun:
    """:func:`run_heads` on a ``tessera.sim.run`` backend, keeping both runs' DRAM images
    and cycle counts (what the tests compare). Every backend sees the same host
    arithmetic (float64, deterministic), so the simulator and the reference agree bit for
    bit on both programs' DRAM when they agree on the trunk's."""
    import time

    from tessera.sim.run import run_program

    runs: list[RunResult] = []

    def npu(program: Program, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runs.append(run_program(program, inputs, backend))
        return runs[-1].outputs

    trunk_outputs = npu(compiled.trunk, {compiled.input_name: image})
    started = time.perf_counter()
    head_inputs = compiled.stage(trunk_outputs)
    host_seconds = time.perf_counter() - started
    npu(compiled.head, head_inputs)
    found = {**runs[0].outputs, **runs[1].outputs}
    outputs = {n: found[n] for n in compiled.output_names}
    return SSDRun(outputs, runs[0], runs[1], host_seconds)


# --------------------------------------------------------------------------- anchors
@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """The default boxes of SSD300 (Caffe ``PriorBox`` of ``ssd_pascal.py``), per source.

    Box sizes are in pixels of the ``image_size`` input: per cell a square of
    ``min_size``, a square of ``sqrt(min_size * max_size)``, then for each aspect ratio
    ``r`` a ``min_size*sqrt(r)`` wide, ``min_size/sqrt(r)`` high box and its transpose, in
    that order (which is the order of the head's channels: box ``b`` of a cell is channels
    ``4b..4b+3`` of ``loc`` and ``b*C..b*C+C-1`` of ``conf``). Cell ``(i, j)`` of a map is
    centred at ``((j + offset) * step, (i + offset) * step)`` pixels.
    """

    image_size: int = IMAGE_SIZE
    feature_sizes: tuple[int, ...] = FEATURE_SIZES
    steps: tuple[float, ...] = (8, 16, 32, 64, 100, 300)
    min_sizes: tuple[float, ...] = (30, 60, 111, 162, 213, 264)
    max_sizes: tuple[float, ...] = (60, 111, 162, 213, 264, 315)
    aspect_ratios: tuple[tuple[float, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    offset: float = 0.5
    #: Box-offset variances of the centre and of the log size (the loc heads' scaling).
    variances: tuple[float, float] = (0.1, 0.2)

    @classmethod
    def from_scales(
        cls, scales: Sequence[float] = (0.1, 0.2, 0.375, 0.55, 0.725, 0.9, 1.05), **kw
    ) -> AnchorConfig:
        """The paper's linear scales (fractions of the image; one more than sources,
        the last being the largest source's second square) instead of Caffe's pixels."""
        size = kw.get("image_size", IMAGE_SIZE)
        return cls(
            min_sizes=tuple(s * size for s in scales[:-1]),
            max_sizes=tuple(s * size for s in scales[1:]),
            **kw,
        )

    @property
    def boxes_per_cell(self) -> tuple[int, ...]:
        return tuple(2 + 2 * len(r) for r in self.aspect_ratios)


def default_anchors(config: AnchorConfig | None = None) -> np.ndarray:
    """Default boxes ``[A, 4]`` as ``(cx, cy, w, h)`` relative to the image (8732 for SSD300).

    Ordered by source, then row ``i``, column ``j``, then box: the order in which the
    head maps ``[1, H, W, boxes * 4]`` flatten (see :class:`AnchorConfig`).
    """
    c = config or AnchorConfig()
    per_source = []
    for f, step, lo, hi, ratios in zip(
        c.feature_sizes, c.steps, c.min_sizes, c.max_sizes, c.aspect_ratios, strict=True
    ):
        sizes = [(lo, lo), (np.sqrt(lo * hi),) * 2]
        for r in ratios:
            sizes += [(lo * np.sqrt(r), lo / np.sqrt(r)), (lo / np.sqrt(r), lo * np.sqrt(r))]
        wh = np.array(sizes, dtype=np.float64) / c.image_size  # [boxes, (w, h)]
        centres = (np.arange(f, dtype=np.float64) + c.offset) * step / c.image_size
        cy, cx = np.meshgrid(centres, centres, indexing="ij")  # [f, f], row i, column j
        boxes = np.empty((f, f, len(sizes), 4))
        boxes[..., 0] = cx[..., None]
        boxes[..., 1] = cy[..., None]
        boxes[..., 2:] = wh
        per_source.append(boxes.reshape(-1, 4))
    return np.concatenate(per_source)


# --------------------------------------------------------------------------- decode + NMS
def decode_boxes(
    loc: np.ndarray, anchors: np.ndarray, variances: tuple[float, float] = (0.1, 0.2)
) -> np.ndarray:
    """Box offsets ``[A, 4]`` ``(dx, dy, dw, dh)`` -> corners ``[A, 4]`` ``(ymin, xmin,
    ymax, xmax)``, relative to the image (Caffe's ``CENTER_SIZE`` code with variances):
    ``cx = acx + dx * v0 * aw``, ``w = aw * exp(dw * v1)`` and the same for y and h."""
    loc = np.asarray(loc, dtype=np.float64)
    acx, acy, aw, ah = anchors.T
    cx = acx + loc[:, 0] * variances[0] * aw
    cy = acy + loc[:, 1] * variances[0] * ah
    w = aw * np.exp(loc[:, 2] * variances[1])
    h = ah * np.exp(loc[:, 3] * variances[1])
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one ``(ymin, xmin, ymax, xmax)`` box with each of
    ``boxes`` (0 where the union is empty)."""
    return pairwise_iou(np.asarray(box)[None], boxes)[0]


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` IoUs of two sets of ``(ymin, xmin, ymax, xmax)`` boxes; an
    inverted box has area 0 and an empty union gives IoU 0."""
    a = np.asarray(a, dtype=np.float64)[:, None, :]
    b = np.asarray(b, dtype=np.float64)[None, :, :]
    ih = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0)
    iw = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0)
    inter = ih * iw
    union = _area(a) + _area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _area(boxes: np.ndarray) -> np.ndarray:
    height = np.maximum(boxes[..., 2] - boxes[..., 0], 0)
    return height * np.maximum(boxes[..., 3] - boxes[..., 1], 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, top_k: int) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best first.

    The ``top_k`` best boxes are candidates (ties: lower index first); a candidate is
    kept unless its IoU with an already kept box is above ``iou_threshold``.
    """
    order = np.argsort(-scores, kind="stable")[:top_k]
    candidates = boxes[order]
    # All pairwise overlaps at once (top_k <= a few hundred), then one greedy sweep: a
    # kept box suppresses every later candidate it overlaps too much.
    overlaps = pairwise_iou(candidates, candidates)
    suppressed = np.zeros(len(order), dtype=bool)
    keep: list[int] = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlaps[i] > iou_threshold
    return order[keep].astype(np.int64)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def decode_detections(
    loc_list: Sequence[np.ndarray],
    conf_list: Sequence[np.ndarray],
    anchors: np.ndarray | None = None,
    *,
    variances: tuple[float, float] = (0.1, 0.2),
    score_threshold: float = 0.01,
    iou_threshold: float = 0.45,
    pre_nms_top_k: int = 400,
    top_k: int = 200,
    clip: bool = True,
) -> np.ndarray:
    """The SSD host stage: head maps -> detections ``[K, 6]`` ``[class_id, score, ymin,
    xmin, ymax, xmax]``, best first, boxes relative to the image.

    ``loc_list`` and ``conf_list`` are the six box and class head outputs in source order,
    NHWC ``[1, H, W, boxes * 4]`` and ``[1, H, W, boxes * C]`` as the zoo exports them;
    ``anchors`` defaults to :func:`default_anchors` (SSD300). The steps are Caffe's
    ``DetectionOutput``: softmax over the ``C`` classes (class 0 is background and never
    reported), decode against the anchors (clipped to the image when ``clip``), then per
    class the boxes scoring above ``score_threshold``, the best ``pre_nms_top_k`` of them
    through NMS at ``iou_threshold``, and the best ``top_k`` over all classes.
    """
    from tessera.errors import TesseraError

    if anchors is None:
        anchors = default_anchors()
    if len(loc_list) != len(conf_list):
        raise TesseraError(f"{len(loc_list)} box heads but {len(conf_list)} class heads")
    boxes_per_head = [np.asarray(x).size // 4 for x in loc_list]
    sizes = [np.asarray(x).size for x in conf_list]
    num_classes = sizes[0] // max(boxes_per_head[0], 1) if sizes else 0
    if num_classes < 2 or sizes != [n * num_classes for n in boxes_per_head]:
        raise TesseraError(
            f"class heads of {sizes} values do not hold the same number (>= 2) of classes "
            f"for each of the {boxes_per_head} boxes of the box heads"
        )
    loc = np.concatenate([np.asarray(x).reshape(-1, 4) for x in loc_list])
    conf = np.concatenate([np.asarray(x).reshape(-1, num_classes) for x in conf_list])
    if len(loc) != len(anchors):
        raise TesseraError(f"the heads give {len(loc)} boxes, the anchors are {len(anchors)}")
    boxes = decode_boxes(loc, anchors, variances)
    if clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    scores = softmax(conf)
    found = []
    for c in range(1, num_classes):
        candidates = np.flatnonzero(scores[:, c] > score_threshold)
        kept = nms(boxes[candidates], scores[candidates, c], iou_threshold, pre_nms_top_k)
        found += [(c, scores[i, c], i) for i in candidates[kept]]
    # Best first; equal scores by class, then anchor, so the order is reproducible.
    found.sort(key=lambda d: (-d[1], d[0], d[2]))
    found = found[:top_k]
    out = np.zeros((len(found), 6))
    for row, (c, score, i) in zip(out, found, strict=True):
        row[0], row[1], row[2:] = c, score, boxes[i]
    return out


def detect(outputs: dict[str, np.ndarray], **kwargs) -> np.ndarray:
    """:func:`decode_detections` of a run's outputs keyed by the zoo's output names."""
    return decode_detections(
        [outputs[n] for n in LOC_OUTPUTS], [outputs[n] for n in CONF_OUTPUTS], **kwargs
    )


# --------------------------------------------------------------------------- the package
#: A detector package's outputs, named and shaped as TensorFlow's object-detection API
#: exports them: boxes ``[1, K, 4]`` (ymin, xmin, ymax, xmax, relative), scores ``[1, K]``,
#: class ids ``[1, K]`` (as float32, 1 .. classes - 1; 0 is background and never
#: reported) and ``[1]`` the number of valid rows; rows past it are zero.
DETECTION_OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")
#: Host stage type name stored in packages (``tessera.package.PLUGIN_MODULES`` maps it here).
STAGE_TYPE = "ssd_detection"


@dataclasses.dataclass(frozen=True)
class DetectionOptions:
    """The detector's post-processing knobs, stored in the package as its defaults.

    ``score_threshold``: a class score must exceed it (Caffe's ``confidence_threshold``;
    0.01 there, for evaluating mAP over every box; 0.5 here, for deployment);
    ``iou_threshold``: per-class NMS drops a box overlapping a better one by more;
    ``pre_nms_top_k``: best boxes per class entering NMS; ``max_detections``: detections
    kept over all classes, best first, which is also the fixed ``K`` of the package's
    output tensors; ``clip``: clip boxes to the image.
    """

    score_threshold: float = 0.5
    iou_threshold: float = 0.45
    pre_nms_top_k: int = 400
    max_detections: int = 100
    clip: bool = True

    def __post_init__(self) -> None:
        from tessera.errors import TesseraError

        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        def count(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        problems = []
        if not (number(self.score_threshold) and 0.0 <= self.score_threshold < 1.0):
            problems.append(f"score threshold must be in [0, 1), got {self.score_threshold!r}")
        if not (number(self.iou_threshold) and 0.0 <= self.iou_threshold <= 1.0):
            problems.append(f"IoU threshold must be in [0, 1], got {self.iou_threshold!r}")
        if not count(self.pre_nms_top_k):
            problems.append(f"pre-NMS top k must be a positive integer, got {self.pre_nms_top_k!r}")
        if not count(self.max_detections):
            problems.append(
                f"max detections must be a positive integer, got {self.max_detections!r}"
            )
        if not isinstance(self.clip, bool):
            problems.append(f"clip must be true or false, got {self.clip!r}")
        if problems:
            raise TesseraError("detection options: " + "; ".join(problems))
        object.__setattr__(self, "score_threshold", float(self.score_threshold))
        object.__setattr__(self, "iou_threshold", float(self.iou_threshold))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> DetectionOptions:
        from tessera.errors import TesseraError

        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not set(data) <= known:
            what = sorted(set(data) - known) if isinstance(data, dict) else type(data).__name__
            raise TesseraError(f"detection options: unknown {what}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides: object) -> DetectionOptions:
        """A copy with the given (non-None) fields changed, checked again."""
        changed = {k: v for k, v in overrides.items() if v is not None}
        return self.from_dict({**self.to_dict(), **changed})


def head_output_names(names: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """``(box heads, class heads)`` of an SSD's outputs: ``loc_<source>`` and
    ``conf_<source>`` pairs in the order the box heads come; None if ``names`` are not
    such pairs (the zoo's ``ssd_vgg`` outputs are)."""
    loc = tuple(n for n in names if n.startswith("loc_"))
    conf = tuple("conf_" + n.removeprefix("loc_") for n in loc)
    if not loc or set(names) != set(loc) | set(conf) or len(names) != 2 * len(loc):
        return None
    return loc, conf


def is_ssd_model(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s outputs are SSD head maps (``loc_*``/``conf_*`` pairs), which is
    how ``tessera package`` recognises a detector."""
    return head_output_names([o.name for o in model.graph.output]) is not None


class SSDDetectionStage(HostStage):
    """The SSD's host stage in a package: everything after the trunk program.

    The package's ``program`` is the trunk; this stage holds the head program (run
    through the package's NPU runner, so both run on the same device), the L2
    normalisation between them (:class:`L2NormStage`), the default boxes (an array, so the
    package decodes the same way whatever this module's defaults become) and the
    post-processing :class:`DetectionOptions`. Called with the trunk's outputs it returns
    the :data:`DETECTION_OUTPUTS` tensors, ``K = options.max_detections`` rows each,
    zero-padded, so a batch of images stacks into ``[B, K, ...]`` (what the scoring
    service does). :meth:`heads` gives the twelve raw head maps instead.
    """

    type_name: ClassVar[str] = STAGE_TYPE

    def __init__(
        self,
        head: Program,
        l2norm: L2NormStage,
        loc_names: Sequence[str],
        conf_names: Sequence[str],
        anchors: np.ndarray,
        num_classes: int,
        options: DetectionOptions | None = None,
        variances: tuple[float, float] = (0.1, 0.2),
    ) -> None:
        from tessera.errors import TesseraError

        self.head = head
        self.l2norm = l2norm
        self.loc_names = tuple(loc_names)
        self.conf_names = tuple(conf_names)
        self.anchors = np.asarray(anchors, dtype=np.float64)
        self.classes = num_classes
        self.options = options or DetectionOptions()
        self.variances = (float(variances[0]), float(variances[1]))
        problems = []
        head_in = [i["name"] for i in head.manifest["inputs"]]
        head_out = [o["name"] for o in head.manifest["outputs"]]
        if head_in != [l2norm.target]:
            problems.append(f"the head program takes {head_in}, not [{l2norm.target!r}]")
        if not self.loc_names or len(self.loc_names) != len(self.conf_names):
            problems.append(f"box heads {self.loc_names} and class heads {self.conf_names}")
        if set(head_out) - set(self.loc_names + self.conf_names):
            problems.append(f"the head program outputs {head_out}, not only head maps")
        if self.anchors.ndim != 2 or self.anchors.shape[1] != 4:
            problems.append(f"anchors of shape {list(self.anchors.shape)}, expected [A, 4]")
        elif not np.all(np.isfinite(self.anchors)):
            problems.append("anchors hold NaN or Inf")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            problems.append(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not all(np.isfinite(v) and v > 0 for v in self.variances):
            problems.append(f"variances must be positive, got {list(self.variances)}")
        # The head program's maps: num_classes logits for every 4 box offsets.
        shapes = {o["name"]: o["shape"] for o in head.manifest["outputs"]}
        for loc, conf in zip(self.loc_names, self.conf_names, strict=False):
            if loc in shapes and conf in shapes and not problems:
                boxes = int(np.prod(shapes[loc])) // 4
                if int(np.prod(shapes[conf])) != boxes * num_classes:
                    problems.append(f"{conf} {shapes[conf]} does not hold {num_classes} classes")
        if problems:
            raise TesseraError(f"{STAGE_TYPE} stage: " + "; ".join(problems))

    # ----------------------------------------------------------------- HostStage
    def params(self) -> dict:
        return {
            "l2norm": self.l2norm.to_dict(),
            "loc": list(self.loc_names),
            "conf": list(self.conf_names),
            "num_classes": self.classes,
            "variances": list(self.variances),
            "options": self.options.to_dict(),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {"anchors": self.anchors}

    def programs(self) -> dict[str, Program]:
        return {"head": self.head}

    @classmethod
    def from_parts(
        cls, params: dict, arrays: dict[str, np.ndarray], programs: dict[str, Program]
    ) -> SSDDetectionStage:
        from tessera.errors import TesseraError

        keys = {"l2norm", "loc", "conf", "num_classes", "variances", "options"}
        if set(params) != keys or set(arrays) != {"anchors"} or set(programs) != {"head"}:
            raise TesseraError(
                f"{STAGE_TYPE} needs params {sorted(keys)}, array anchors and program head; "
                f"got {sorted(params)}, {sorted(arrays)} and {sorted(programs)}"
            )
        names = [params["loc"], params["conf"]]
        if not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in names):
            raise TesseraError(f"{STAGE_TYPE}: loc and conf must be lists of output names")
        variances = params["variances"]
        if not (
            isinstance(variances, list)
            and len(variances) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in variances)
        ):
            raise TesseraError(f"{STAGE_TYPE}: variances must be two numbers")
        if arrays["anchors"].dtype != np.float64:
            raise TesseraError(f"{STAGE_TYPE}: anchors must be float64")
        return cls(
            programs["head"],
            L2NormStage.from_dict(params["l2norm"]),
            params["loc"],
            params["conf"],
            arrays["anchors"],
            params["num_classes"],
            DetectionOptions.from_dict(params["options"]),
            (variances[0], variances[1]),
        )

    def input_names(self) -> list[str]:
        """What the stage reads of the trunk program: the unnormalised ``conv4_3`` and the
        head maps the trunk computes."""
        from_head = {o["name"] for o in self.head.manifest["outputs"]}
        return [
            self.l2norm.source,
            *(n for n in self.loc_names + self.conf_names if n not in from_head),
        ]

    def num_outputs(self) -> int:
        return len(DETECTION_OUTPUTS)

    def num_classes(self) -> int:
        return self.classes

    def output_shapes(self) -> list[tuple[int, ...]]:
        k = self.options.max_detections
        return [(1, k, 4), (1, k), (1, k), (1,)]

    def describe(self) -> str:
        o = self.options
        return (
            f"SSD: L2 norm and head program after the trunk, {len(self.anchors)} default "
            f"boxes, per-class NMS at IoU {o.iou_threshold:g}, scores > {o.score_threshold:g}, "
            f"up to {o.max_detections} detections"
        )

    def __call__(self, npu_outputs: Mapping[str, np.ndarray], npu: NPURunner) -> list[np.ndarray]:
        return detection_tensors(self.detections(self.heads(npu_outputs, npu)), self.options)

    # ----------------------------------------------------------------- steps
    def heads(self, trunk_outputs: Mapping[str, np.ndarray], npu: NPURunner) -> dict:
        """The head maps by name, box heads then class heads: the host L2 normalisation
        of the trunk's ``conv4_3``, then the head program through ``npu``."""
        found = {**trunk_outputs, **npu(self.head, self.l2norm(dict(trunk_outputs)))}
        return {n: found[n] for n in self.loc_names + self.conf_names}

    def detections(self, heads: Mapping[str, np.ndarray]) -> np.ndarray:
        """:func:`decode_detections` of the head maps with the stage's anchors and options:
        ``[K, 6]`` ``[class_id, score, ymin, xmin, ymax, xmax]``, float64."""
        o = self.options
        return decode_detections(
            [heads[n] for n in self.loc_names],
            [heads[n] for n in self.conf_names],
            self.anchors,
            variances=self.variances,
            score_threshold=o.score_threshold,
            iou_threshold=o.iou_threshold,
            pre_nms_top_k=o.pre_nms_top_k,
            top_k=o.max_detections,
            clip=o.clip,
        )

    def with_options(self, **overrides: object) -> SSDDetectionStage:
        """The same stage with some :class:`DetectionOptions` fields changed."""
        return SSDDetectionStage(
            self.head,
            self.l2norm,
            self.loc_names,
            self.conf_names,
            self.anchors,
            self.classes,
            self.options.replace(**overrides),
            self.variances,
        )


register_host_stage(SSDDetectionStage)


def detection_tensors(detections: np.ndarray, options: DetectionOptions) -> list[np.ndarray]:
    """``[n, 6]`` detections -> the :data:`DETECTION_OUTPUTS` tensors, float32, ``K =
    options.max_detections`` rows, zero past ``n``."""
    k = options.max_detections
    d = np.asarray(detections, dtype=np.float64)[:k]
    n = len(d)
    boxes = np.zeros((1, k, 4), np.float32)
    scores = np.zeros((1, k), np.float32)
    classes = np.zeros((1, k), np.float32)
    boxes[0, :n] = d[:, 2:]
    scores[0, :n] = d[:, 1]
    classes[0, :n] = d[:, 0]
    return [boxes, scores, classes, np.array([n], np.float32)]


def detections_from_tensors(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, count: np.ndarray
) -> np.ndarray:
    """The valid rows of one image's :data:`DETECTION_OUTPUTS` tensors as ``[n, 6]``
    ``[class_id, score, ymin, xmin, ymax, xmax]`` (float32 values, as stored)."""
    from tessera.errors import TesseraError

    n = int(np.asarray(count).reshape(-1)[0])
    boxes = np.asarray(boxes).reshape(-1, 4)
    scores, classes = np.asarray(scores).reshape(-1), np.asarray(classes).reshape(-1)
    if not 0 <= n <= min(len(boxes), len(scores), len(classes)):
        raise TesseraError(f"num_detections {n} for {len(scores)} rows")
    out = np.empty((n, 6), np.float32)
    out[:, 0], out[:, 1], out[:, 2:] = classes[:n], scores[:n], boxes[:n]
    return out


def compiled_from_package(pkg: Package) -> CompiledSSD:
    """The :class:`CompiledSSD` inside a detector package (trunk, head program, L2 norm)."""
    from tessera.errors import TesseraError

    if not isinstance(pkg.host, SSDDetectionStage):
        raise TesseraError(f"package {pkg.name!r} is no SSD detector")
    stage = pkg.host
    params = {"stage": stage.l2norm.to_dict(), "output_names": stage.loc_names + stage.conf_names}
    return CompiledSSD.from_parts(pkg.program, stage.head, params)


def detector_package(
    compiled: CompiledSSD,
    *,
    name: str = "ssd_vgg",
    preprocess: str | PreprocessSpec = "ssd",
    labels: str | os.PathLike[str] | Sequence[str] | None = None,
    input_name: str = "images",
    output_names: Sequence[str] | None = None,
    options: DetectionOptions | Mapping[str, object] | None = None,
    anchors: AnchorConfig | None = None,
) -> Package:
    """A ``detector`` package around a compiled SSD: the trunk as the package's program,
    :class:`SSDDetectionStage` (head program, L2 norm, anchors of ``anchors``, default
    SSD300's, and ``options``) as its host stage. ``labels`` default to
    :data:`VOC_LABELS` for 21 classes; output names to :data:`DETECTION_OUTPUTS`."""
    from tessera.errors import TesseraError
    from tessera.labels import load_labels
    from tessera.preprocess import get_preset

    heads = head_output_names(compiled.output_names)
    if heads is None:
        raise TesseraError(
            f"the SSD's outputs {list(compiled.output_names)} are not loc_*/conf_* head pairs"
        )
    loc_names, conf_names = heads
    shapes = {
        o["name"]: o["shape"]
        for p in (compiled.trunk, compiled.head)
        for o in p.manifest["outputs"]
    }
    boxes = sum(int(np.prod(shapes[n])) for n in loc_names) // 4
    num_classes = sum(int(np.prod(shapes[n])) for n in conf_names) // max(boxes, 1)
    anchor_boxes = default_anchors(anchors)
    if boxes != len(anchor_boxes):
        raise TesseraError(
            f"the SSD's box heads give {boxes} boxes but the default boxes are "
            f"{len(anchor_boxes)} (SSD300's anchors need the 300x300 six-map layout)"
        )
    if not isinstance(options, DetectionOptions):
        options = DetectionOptions.from_dict(dict(options or {}))
    cfg = anchors or AnchorConfig()
    stage = SSDDetectionStage(
        compiled.head,
        compiled.stage,
        loc_names,
        conf_names,
        anchor_boxes,
        num_classes,
        options,
        cfg.variances,
    )
    if isinstance(labels, (str, os.PathLike)):
        labels = load_labels(labels, num_classes=num_classes)
    elif labels is None and num_classes == len(VOC_LABELS):
        labels = list(VOC_LABELS)
    elif labels is None:
        raise TesseraError(
            f"the detector has {num_classes} classes (background first): pass --labels "
            "(one name per line)"
        )
    spec = preprocess if isinstance(preprocess, PreprocessSpec) else get_preset(preprocess)
    return Package(
        name,
        "detector",
        spec,
        compiled.trunk,
        list(labels),
        input_name,
        list(output_names or DETECTION_OUTPUTS),
        stage,
    )


def build_detector_package(
    model: onnx.ModelProto | str,
    cfg: NPUConfig,
    **kwargs,
) -> Package:
    """Compile an SSD for ``cfg`` (:func:`compile_ssd`) and package it
    (:func:`detector_package`, which takes ``kwargs``). A configuration the SSD does not
    fit fails with the sizes and the presets to use instead."""
    from tessera.config import PRESETS
    from tessera.errors import CapacityError

    preprocess = kwargs.get("preprocess", "ssd")
    if preprocess is not None:
        # Before the compilation: a wrong preset would otherwise only fail after it.
        from tessera.compiler.onnx_import import load_model
        from tessera.preprocess import get_preset

        spec = preprocess if isinstance(preprocess, PreprocessSpec) else get_preset(preprocess)
        model = model if isinstance(model, onnx.ModelProto) else load_model(model)
        _check_input_shape(model, spec)
    try:
        compiled = compile_ssd(model, cfg)
    except CapacityError as exc:
        others = [n for n, c in PRESETS.items() if c.dram_bytes > cfg.dram_bytes]
        hint = f"; use a larger configuration: --config {' or '.join(others)}" if others else ""
        raise CapacityError(f"SSD does not fit {cfg.name}: {exc}{hint}") from None
    return detector_package(compiled, **kwargs)


def _check_input_shape(model: onnx.ModelProto, spec: PreprocessSpec) -> None:
    from tessera.errors import TesseraError
    from tessera.preprocess import PRESETS

    initializers = _initializers(model)
    (image,) = (i for i in model.graph.input if i.name not in initializers)
    shape = [d.dim_value for d in image.type.tensor_type.shape.dim]
    if shape != list(spec.output_shape):
        fit = [n for n, s in PRESETS.items() if list(s.output_shape) == shape]
        raise TesseraError(
            f"the model input {image.name!r} has shape {shape} but preprocessing "
            f"{spec.name!r} produces {list(spec.output_shape)}"
            + (f"; presets that fit: {', '.join(fit)}" if fit else "")
        )


# --------------------------------------------------------------------------- tessera score
def _detector_result(pkg: Package, outputs: Mapping[str, np.ndarray], top: int) -> dict:
    dets = detections_from_tensors(*(outputs[n] for n in pkg.output_names))
    return {
        "detections": [
            {
                "class_id": int(c),
                "label": pkg.labels[int(c)],
                "score": float(score),
                "box": [float(v) for v in box],
            }
            for c, score, *box in dets
        ]
    }


def _detector_text(result: dict) -> list[str]:
    if not result["detections"]:
        return ["   (no detections)"]
    return [
        f"  {rank:>2}. {d['score']:7.4f}  {d['label']} ({d['class_id']})  box [ymin, xmin, "
        f"ymax, xmax] = [{', '.join(f'{v:.3f}' for v in d['box'])}]"
        for rank, d in enumerate(result["detections"], start=1)
    ]


def configure_package(pkg: Package, options: Mapping[str, object]) -> Package:
    """``pkg`` with some of its stored :class:`DetectionOptions` overridden (tessera
    score's ``--score-threshold``, ``--iou-threshold``, ``--max-detections``)."""
    from tessera.errors import TesseraError

    if not isinstance(pkg.host, SSDDetectionStage):
        raise TesseraError(f"package {pkg.name!r} is no SSD detector")
    if not options:
        return pkg
    return dataclasses.replace(pkg, host=pkg.host.with_options(**options))


register_result_kind("detector", ResultKind(_detector_result, _detector_text, configure_package))
