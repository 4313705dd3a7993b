"""ONNX -> IR: the first pass of the pipeline.

Every ONNX value becomes one of three things: a constant (numpy), an activation (an IR
tensor plus the permutation from its ONNX axes to the canonical ``N, C, H, W``), or a
flattened activation (an IR tensor plus the order its axes were flattened in). Layout
ops (Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Identity) therefore cost nothing:
they only change that bookkeeping, which is how tf2onnx's NHWC boundary transposes and
Keras' NHWC flatten before the classifier disappear.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tessera.compiler.ir import Graph, GraphInput, GraphOutput, Node, Tensor
from tessera.errors import ModelLoadError, UnsupportedModelError

CANONICAL = (0, 1, 2, 3)

SUPPORTED_OPS = (
    "Conv",
    "Gemm",
    "MatMul",
    "BatchNormalization",
    "Relu",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Pad",
    "Transpose",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Dropout",
    "Softmax",
    "Constant",
    "Cast",
)


@dataclass(frozen=True)
class Act:
    """An activation: IR tensor ``tensor``; ONNX axis ``i`` is canonical axis ``perm[i]``."""

    tensor: str
    perm: tuple[int, ...]


@dataclass(frozen=True)
class Flat:
    """A rank-2 ``[1, K]`` view of an IR tensor, flattened in canonical axis ``order``."""

    tensor: str
    order: tuple[int, ...]


Value = Act | Flat | np.ndarray


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file with errors that say what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types on truncated input
        raise ModelLoadError(
            f"{path}: not a valid ONNX file ({type(exc).__name__}: {exc}); "
            "was it truncated or is it another format?"
        ) from None
    if not model.graph.node:
        raise ModelLoadError(f"{path}: the ONNX graph has no nodes (truncated or empty file?)")
    return model


class _Importer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.values: dict[str, Value] = {}
        self.tensors: dict[str, Tensor] = {}
        self.nodes: list[Node] = []
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13
        )
        self._counter = 0

    # ------------------------------------------------------------------ helpers
    def fail(self, node: onnx.NodeProto, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"node {node.name or '<unnamed>'!r} ({node.op_type}): {what}")

    def new_tensor(self, hint: str, shape: tuple[int, int, int]) -> str:
        name = hint
        while name in self.tensors:
            self._counter += 1
            name = f"{hint}_{self._counter}"
        self.tensors[name] = Tensor(name, tuple(int(s) for s in shape))
        return name

    def const(self, node: onnx.NodeProto, i: int, what: str) -> np.ndarray:
        if i >= len(node.input) or not node.input[i]:
            raise self.fail(node, f"missing input {i} ({what})")
        v = self.values.get(node.input[i])
        if not isinstance(v, np.ndarray):
            raise self.fail(node, f"input {i} ({what}) must be a constant initializer")
        return v

    def optional_const(self, node: onnx.NodeProto, i: int) -> np.ndarray | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        v = self.values.get(node.input[i])
        if not isinstance(v, np.ndarray):
            raise self.fail(node, f"input {i} must be a constant initializer")
        return v

    def act(self, node: onnx.NodeProto, i: int = 0, canonical: bool = True) -> Act:
        v = self.values.get(node.input[i])
        if isinstance(v, Flat):
            shape = self.tensors[v.tensor].shape
            if shape[1:] == (1, 1):
                return Act(v.tensor, CANONICAL)
        if not isinstance(v, Act):
            raise self.fail(node, f"input {node.input[i]!r} must be a 4-D activation tensor")
        if canonical and v.perm != CANONICAL:
            raise self.fail(
                node,
                f"input layout {v.perm} is not NCHW; the compiler lowers {node.op_type} "
                "only on NCHW tensors (transpose the input first)",
            )
        return v

    @staticmethod
    def attrs(node: onnx.NodeProto) -> dict:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def onnx_shape(self, v: Value) -> tuple[int, ...]:
        if isinstance(v, np.ndarray):
            return v.shape
        if isinstance(v, Act):
            c, h, w = self.tensors[v.tensor].shape
            canon = (1, c, h, w)
            return tuple(canon[p] for p in v.perm)
        c, h, w = self.tensors[v.tensor].shape
        return (1, c * h * w)

    def emit(self, op: str, node: onnx.NodeProto, inputs: list[str], shape, **kw) -> str:
        out = self.new_tensor(node.output[0] or f"{op}_{len(self.nodes)}", shape)
        self.nodes.append(
            Node(
                op=op,
                name=node.name or out,
                inputs=inputs,
                outputs=[out],
                attrs=kw.pop("attrs", {}),
                params=kw.pop("params", {}),
                source=f"{node.op_type}:{node.name}",
            )
        )
        return out

    def channel_vector(self, node: onnx.NodeProto, c: np.ndarray, x: Act | Flat) -> np.ndarray:
        """A constant that broadcasts along the channel axis only, as a [C] vector."""
        channels = self.tensors[x.tensor].shape[0]
        c = np.asarray(c, dtype=np.float64)
        if c.size == 1:
            return np.full(channels, float(c.reshape(-1)[0]))
        shape = self.onnx_shape(x)
        if c.ndim > len(shape):
            raise self.fail(node, f"constant of shape {c.shape} does not broadcast to {shape}")
        full = (1,) * (len(shape) - c.ndim) + c.shape
        axes = [i for i, s in enumerate(full) if s != 1]
        if isinstance(x, Act):
            chan_axis = x.perm.index(1)
        else:
            if self.tensors[x.tensor].shape[1:] != (1, 1):
                raise self.fail(node, "per-element constants on a flattened map are not supported")
            chan_axis = 1
        if axes != [chan_axis] or full[chan_axis] != channels:
            raise self.fail(
                node,
                f"constant of shape {c.shape} is not per-channel for input shape {shape}; "
                "only scalars and per-channel constants are supported",
            )
        return c.reshape(-1)

    # ------------------------------------------------------------------ driver
    def run(self) -> Graph:
        g = self.model.graph
        for init in g.initializer:
            self.values[init.name] = numpy_helper.to_array(init).astype(np.float64, copy=False)
        inputs = []
        init_names = {i.name for i in g.initializer}
        for inp in g.input:
            if inp.name in init_names:
                continue
            dims = [
                d.dim_value if d.HasField("dim_value") else 0
                for d in inp.type.tensor_type.shape.dim
            ]
            inputs.append(self.import_input(inp.name, dims))
        for node in g.node:
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None or node.domain not in ("", "ai.onnx"):
                raise self.fail(
                    node,
                    f"operator {node.op_type!r} is not supported; supported operators: "
                    + ", ".join(SUPPORTED_OPS),
                )
            handler(node)
        outputs = []
        for out in g.output:
            v = self.values.get(out.name)
            if isinstance(v, Act):
                outputs.append(
                    GraphOutput(out.name, self.onnx_shape(v), v.tensor, "nchw", perm=v.perm)
                )
            elif isinstance(v, Flat):
                outputs.append(
                    GraphOutput(out.name, self.onnx_shape(v), v.tensor, "flat", order=v.order)
                )
            else:
                raise UnsupportedModelError(f"graph output {out.name!r} is a constant or unknown")
        graph = Graph(self.tensors, self.nodes, inputs, outputs)
        graph.log.append(f"import_onnx: {len(g.node)} ONNX nodes -> {len(self.nodes)} IR nodes")
        return graph

    def import_input(self, name: str, dims: list[int]) -> GraphInput:
        if len(dims) != 4 or dims[0] not in (0, 1):
            raise UnsupportedModelError(
                f"graph input {name!r} has shape {dims}; supported: one 4-D image tensor "
                "of batch 1 (NHWC [1,H,W,C] or NCHW [1,C,H,W])"
            )
        if 0 in dims[1:]:
            raise UnsupportedModelError(f"graph input {name!r} has dynamic dimensions {dims}")
        # Channels are the smallest of the non-batch axes when ambiguous is rare: images
        # have 1, 3 or 4 channels and spatial sizes >= 8; trust the last axis for NHWC.
        perm = (0, 2, 3, 1) if dims[3] <= 4 < dims[1] else CANONICAL
        # Unless the graph says otherwise: tf2onnx's boundary Transpose means NHWC, a
        # layout-sensitive op reading the input directly means NCHW (e.g. [1, 16, 4, 4]).
        nchw_ops = (
            "Conv",
            "BatchNormalization",
            "MaxPool",
            "AveragePool",
            "GlobalAveragePool",
            "GlobalMaxPool",
        )
        for node in (n for n in self.model.graph.node if name in n.input):
            if node.op_type == "Transpose":
                if tuple(self.attrs(node).get("perm", ())) == (0, 3, 1, 2):
                    perm = (0, 2, 3, 1)
                    break
            elif node.op_type in nchw_ops:
                perm = CANONICAL
                break
        canon = [0, 0, 0, 0]
        for i, p in enumerate(perm):
            canon[p] = dims[i]
        t = self.new_tensor(name, (canon[1], canon[2], canon[3]))
        self.values[name] = Act(t, perm)
        return GraphInput(name, tuple(int(d) if d else 1 for d in dims), t, perm)

    # ------------------------------------------------------------------ layout ops
    def op_Constant(self, node):
        a = self.attrs(node)
        if "value" not in a:
            raise self.fail(node, f"only the 'value' attribute is supported, got {list(a)}")
        self.values[node.output[0]] = numpy_helper.to_array(a["value"]).astype(np.float64)

    def op_Identity(self, node):
        self.values[node.output[0]] = self.values[node.input[0]]

    op_Dropout = op_Identity

    def op_Cast(self, node):
        v = self.values[node.input[0]]
        to = self.attrs(node).get("to")
        if to not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64):
            raise self.fail(node, f"cast to type {to} is not supported (only float)")
        self.values[node.output[0]] = v

    def op_Transpose(self, node):
        v = self.values[node.input[0]]
        perm = tuple(self.attrs(node).get("perm", ()))
        if isinstance(v, np.ndarray):
            self.values[node.output[0]] = np.transpose(v, perm or None)
        elif isinstance(v, Act):
            perm = perm or (3, 2, 1, 0)
            self.values[node.output[0]] = Act(v.tensor, tuple(v.perm[p] for p in perm))
        else:
            raise self.fail(node, "transpose of a flattened tensor is not supported")

    def _reshape_to(self, node, v: Value, shape: tuple[int, ...]) -> Value:
        if isinstance(v, np.ndarray):
            return v.reshape(shape)
        c, h, w = self.tensors[v.tensor].shape
        total = c * h * w
        if len(shape) == 2 and shape[0] == 1 and shape[1] == total:
            if isinstance(v, Flat):
                return v
            return Flat(v.tensor, tuple(p for p in v.perm if p != 0))
        moved = self._moved_unit_axes(v, shape)
        if moved is not None:
            return moved
        raise self.fail(
            node,
            f"reshape of {self.onnx_shape(v)} to {list(shape)} is not supported (only flatten "
            "to [1, K] and reshapes that only move size-1 axes, e.g. [1, H, W, 1] -> "
            "[1, 1, H, W] or [1, C] -> [1, C, 1, 1])",
        )

    def _moved_unit_axes(self, v: Act | Flat, shape: tuple[int, ...]) -> Act | None:
        """A rank-4 reshape that keeps the sizes > 1 in order only relabels axes.

        Row-major element order is unchanged when nothing but size-1 axes move, so the
        result is the same IR tensor seen through another permutation: tf2onnx emits such
        reshapes instead of transposes for grayscale images and for pooled vectors.
        """
        c, h, w = self.tensors[v.tensor].shape
        canon_size = {0: 1, 1: c, 2: h, 3: w}
        if isinstance(v, Act):
            src_axes = list(v.perm)
        else:
            src_axes = [0, *v.order]
        src_sizes = [canon_size[a] for a in src_axes]
        if len(shape) != 4 or [d for d in src_sizes if d != 1] != [d for d in shape if d != 1]:
            return None
        big = iter(a for a, d in zip(src_axes, src_sizes, strict=True) if d != 1)
        used = [next(big) if d != 1 else None for d in shape]
        spare = iter(sorted(a for a in range(4) if a not in used))
        perm = tuple(a if a is not None else next(spare) for a in used)
        return Act(v.tensor, perm)

    def op_Reshape(self, node):
        v = self.values[node.input[0]]
        target = [int(s) for s in self.const(node, 1, "shape")]
        src = self.onnx_shape(v)
        total = int(np.prod(src))
        target = [src[i] if s == 0 else s for i, s in enumerate(target)]
        if -1 in target:
            known = int(np.prod([s for s in target if s != -1]))
            target[target.index(-1)] = total // known
        self.values[node.output[0]] = self._reshape_to(node, v, tuple(target))

    def op_Flatten(self, node):
        v = self.values[node.input[0]]
        axis = self.attrs(node).get("axis", 1)
        shape = self.onnx_shape(v)
        if axis < 0:
            axis += len(shape)
        outer = int(np.prod(shape[:axis]))
        self.values[node.output[0]] = self._reshape_to(
            node, v, (outer, int(np.prod(shape)) // outer)
        )

    def _axes(self, node) -> list[int] | None:
        a = self.attrs(node)
        if "axes" in a:
            return list(a["axes"])
        if len(node.input) > 1 and node.input[1]:
            return [int(x) for x in self.const(node, 1, "axes")]
        return None

    def op_Squeeze(self, node):
        v = self.values[node.input[0]]
        shape = self.onnx_shape(v)
        axes = self._axes(node)
        if axes is None:
            axes = [i for i, s in enumerate(shape) if s == 1]
        axes = [a + len(shape) if a < 0 else a for a in axes]
        new = tuple(s for i, s in enumerate(shape) if i not in axes)
        if isinstance(v, np.ndarray):
            self.values[node.output[0]] = v.reshape(new)
            return
        if 0 in axes and len(new) < 2:
            raise self.fail(node, "squeezing the batch axis to a 1-D tensor is not supported")
        self.values[node.output[0]] = self._reshape_to(node, v, new if len(new) > 1 else (1, *new))

    def op_Unsqueeze(self, node):
        v = self.values[node.input[0]]
        shape = list(self.onnx_shape(v))
        axes = sorted(self._axes(node) or [])
        rank = len(shape) + len(axes)
        for a in axes:
            shape.insert(a + rank if a < 0 else a, 1)
        self.values[node.output[0]] = self._reshape_to(node, v, tuple(shape))

    # ------------------------------------------------------------------ compute ops
    def op_Conv(self, node):
        x = self.act(node)
        w = self.const(node, 1, "weight")
        b = self.optional_const(node, 2)
        a = self.attrs(node)
        if a.get("group", 1) != 1:
            raise self.fail(node, f"attribute 'group'={a['group']} is not supported (only group=1)")
        if w.ndim != 4:
            raise self.fail(node, f"only 2-D convolutions are supported (weight rank {w.ndim})")
        cin, h, wd = self.tensors[x.tensor].shape
        cout, wcin, kh, kw = w.shape
        if wcin != cin:
            raise self.fail(node, f"weight expects {wcin} input channels, input has {cin}")
        stride = tuple(a.get("strides", (1, 1)))
        dil = tuple(a.get("dilations", (1, 1)))
        pads = self._pads(node, a, (h, wd), (kh, kw), stride, dil)
        oh = (h + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (wd + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
        params = {"weight": w, "bias": b if b is not None else np.zeros(cout)}
        out = self.emit(
            "conv",
            node,
            [x.tensor],
            (cout, oh, ow),
            params=params,
            attrs={
                "kernel": (kh, kw),
                "stride": stride,
                "pads": pads,
                "dilation": dil,
                "relu": False,
            },
        )
        self.values[node.output[0]] = Act(out, CANONICAL)

    def _pads(self, node, a, hw, k, stride, dil) -> tuple[int, int, int, int]:
        """ONNX pads/auto_pad -> (top, left, bottom, right)."""
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("NOTSET", ""):
            p = list(a.get("pads", (0, 0, 0, 0)))
            if len(p) != 4:
                raise self.fail(node, f"attribute 'pads'={p} must have 4 values")
            return (p[0], p[1], p[2], p[3])
        if auto == "VALID":
            return (0, 0, 0, 0)
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            res = []
            for i in range(2):
                out = -(-hw[i] // stride[i])
                total = max(0, (out - 1) * stride[i] + dil[i] * (k[i] - 1) + 1 - hw[i])
                small, big = total // 2, total - total // 2
                res.append((small, big) if auto == "SAME_UPPER" else (big, small))
            return (res[0][0], res[1][0], res[0][1], res[1][1])
        raise self.fail(node, f"attribute 'auto_pad'={auto!r} is not supported")

    def _fc(self, node, x: Flat | Act, wmat: np.ndarray, bias: np.ndarray | None):
        """A fully connected layer as a conv whose kernel covers the whole map."""
        if isinstance(x, Act):
            x = Flat(x.tensor, (1, 2, 3))
        c, h, w = self.tensors[x.tensor].shape
        k, o = wmat.shape
        if k != c * h * w:
            raise self.fail(node, f"weight has {k} rows, input has {c * h * w} features")
        sizes = {1: c, 2: h, 3: w}
        wt = wmat.T.reshape((o, *[sizes[a] for a in x.order]))
        perm = [x.order.index(a) + 1 for a in (1, 2, 3)]
        conv_w = np.transpose(wt, [0, *perm])  # [O, C, H, W]
        out = self.emit(
            "conv",
            node,
            [x.tensor],
            (o, 1, 1),
            params={"weight": conv_w, "bias": bias if bias is not None else np.zeros(o)},
            attrs={
                "kernel": (h, w),
                "stride": (1, 1),
                "pads": (0, 0, 0, 0),
                "dilation": (1, 1),
                "relu": False,
            },
        )
        self.values[node.output[0]] = Flat(out, (1, 2, 3))

    def op_MatMul(self, node):
        x = self.values.get(node.input[0])
        if not isinstance(x, (Flat, Act)):
            raise self.fail(node, "first input must be an activation")
        w = self.const(node, 1, "weight matrix")
        if w.ndim != 2:
            raise self.fail(node, f"only matrix weights are supported, got shape {w.shape}")
        self._fc(node, x, w, None)

    def op_Gemm(self, node):
        a = self.attrs(node)
        if a.get("transA", 0):
            raise self.fail(node, "attribute 'transA'=1 is not supported")
        x = self.values.get(node.input[0])
        if not isinstance(x, (Flat, Act)):
            raise self.fail(node, "first input must be an activation")
        w = self.const(node, 1, "B") * a.get("alpha", 1.0)
        if a.get("transB", 0):
            w = w.T
        c = self.optional_const(node, 2)
        bias = None if c is None else np.broadcast_to(c * a.get("beta", 1.0), (w.shape[1],))
        self._fc(node, x, w, None if bias is None else np.array(bias))

    def op_BatchNormalization(self, node):
        x = self.act(node)
        a = self.attrs(node)
        scale, bias, mean, var = (
            self.const(node, i, n) for i, n in enumerate(("scale", "B", "mean", "var"), start=1)
        )
        s = scale / np.sqrt(var + a.get("epsilon", 1e-5))
        self._affine(node, x, s, bias - mean * s)

    def _affine(self, node, x: Act | Flat, scale, shift):
        c, h, w = self.tensors[x.tensor].shape
        params = {}
        if scale is not None:
            params["scale"] = np.asarray(scale, dtype=np.float64)
        if shift is not None:
            params["shift"] = np.asarray(shift, dtype=np.float64)
        out = self.emit(
            "eltwise", node, [x.tensor], (c, h, w), params=params, attrs={"relu": False}
        )
        self.values[node.output[0]] = dataclasses.replace(x, tensor=out)

    def _act_or_flat(self, node, i) -> Act | Flat:
        v = self.values.get(node.input[i])
        if not isinstance(v, (Act, Flat)):
            raise self.fail(node, f"input {node.input[i]!r} must be an activation")
        return v

    def op_Relu(self, node):
        x = self._act_or_flat(node, 0)
        out = self.emit(
            "eltwise", node, [x.tensor], self.tensors[x.tensor].shape, attrs={"relu": True}
        )
        self.values[node.output[0]] = dataclasses.replace(x, tensor=out)

    def _binary(self, node, kind: str):
        a, b = (self.values.get(n) for n in node.input[:2])
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}
            self.values[node.output[0]] = fn[kind](a, b)
            return
        if kind == "add" and isinstance(a, (Act, Flat)) and isinstance(b, (Act, Flat)):
            if self.onnx_shape(a) != self.onnx_shape(b) or (
                isinstance(a, Act) and isinstance(b, Act) and a.perm != b.perm
            ):
                raise self.fail(node, "adding tensors of different shapes/layouts is not supported")
            out = self.emit(
                "eltwise",
                node,
                [a.tensor, b.tensor],
                self.tensors[a.tensor].shape,
                attrs={"relu": False},
            )
            self.values[node.output[0]] = dataclasses.replace(a, tensor=out)
            return
        if isinstance(a, np.ndarray):
            if kind in ("sub", "div"):
                raise self.fail(node, "constant minus/over an activation is not supported")
            a, b = b, a
        if not isinstance(a, (Act, Flat)):
            raise self.fail(node, "needs an activation input")
        cvec = self.channel_vector(node, b, a)
        if kind == "add":
            self._affine(node, a, None, cvec)
        elif kind == "sub":
            self._affine(node, a, None, -cvec)
        elif kind == "mul":
            self._affine(node, a, cvec, None)
        else:
            self._affine(node, a, 1.0 / cvec, None)

    def op_Add(self, node):
        self._binary(node, "add")

    def op_Sub(self, node):
        self._binary(node, "sub")

    def op_Mul(self, node):
        self._binary(node, "mul")

    def op_Div(self, node):
        self._binary(node, "div")

    def op_Concat(self, node):
        vals = [self._act_or_flat(node, i) for i in range(len(node.input))]
        axis = self.attrs(node)["axis"]
        first = vals[0]
        if isinstance(first, Flat):
            if any(self.tensors[v.tensor].shape[1:] != (1, 1) for v in vals):
                raise self.fail(node, "concat of flattened maps is not supported")
            perm = CANONICAL
            vals = [Act(v.tensor, CANONICAL) for v in vals]
        else:
            perm = first.perm
        if axis < 0:
            axis += 4
        if perm[axis] != 1:
            raise self.fail(
                node,
                f"attribute 'axis'={axis} is not the channel axis; "
                "only channel concatenation is supported",
            )
        hw = self.tensors[vals[0].tensor].shape[1:]
        for v in vals:
            if v.perm != perm or self.tensors[v.tensor].shape[1:] != hw:
                raise self.fail(node, "inputs differ in layout or spatial size")
        c = sum(self.tensors[v.tensor].shape[0] for v in vals)
        out = self.emit("concat", node, [v.tensor for v in vals], (c, *hw))
        self.values[node.output[0]] = (
            Act(out, perm) if isinstance(first, Act) else Flat(out, (1, 2, 3))
        )

    def _pool(self, node, kind: str, global_: bool):
        x = self.act(node)
        c, h, w = self.tensors[x.tensor].shape
        a = self.attrs(node)
        if global_:
            k, stride, pads = (h, w), (1, 1), (0, 0, 0, 0)
        else:
            k = tuple(a["kernel_shape"])
            stride = tuple(a.get("strides", (1, 1)))
            if tuple(a.get("dilations", (1, 1))) != (1, 1):
                raise self.fail(node, f"attribute 'dilations'={a['dilations']} is not supported")
            if a.get("ceil_mode", 0):
                raise self.fail(node, "attribute 'ceil_mode'=1 is not supported")
            pads = self._pads(node, a, (h, w), k, stride, (1, 1))
        oh = (h + pads[0] + pads[2] - k[0]) // stride[0] + 1
        ow = (w + pads[1] + pads[3] - k[1]) // stride[1] + 1
        attrs = {
            "kind": kind,
            "kernel": k,
            "stride": stride,
            "pads": pads,
            "count_include_pad": bool(a.get("count_include_pad", 0)),
            "pad_semantics": "onnx",
        }
        out = self.emit("pool", node, [x.tensor], (c, oh, ow), attrs=attrs)
        self.values[node.output[0]] = Act(out, CANONICAL)

    def op_MaxPool(self, node):
        if len(node.output) > 1 and node.output[1]:
            raise self.fail(node, "the Indices output is not supported")
        self._pool(node, "max", False)

    def op_AveragePool(self, node):
        self._pool(node, "avg", False)

    def op_GlobalAveragePool(self, node):
        self._pool(node, "avg", True)

    def op_GlobalMaxPool(self, node):
        self._pool(node, "max", True)

    def op_Pad(self, node):
        x = self.act(node, canonical=False)
        a = self.attrs(node)
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            raise self.fail(node, f"attribute 'mode'={mode!r} is not supported (only constant)")
        if self.opset >= 11:
            pads = [int(p) for p in self.const(node, 1, "pads")]
            value = self.optional_const(node, 2)
            value = 0.0 if value is None else float(np.asarray(value).reshape(-1)[0])
        else:
            pads = list(a["pads"])
            value = a.get("value", 0.0)
        if value != 0.0:
            raise self.fail(node, f"constant_value={value} is not supported (only 0)")
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        canon_b, canon_e = [0] * 4, [0] * 4
        for i, p in enumerate(x.perm):
            canon_b[p], canon_e[p] = begin[i], end[i]
        if canon_b[:2] != [0, 0] or canon_e[:2] != [0, 0] or min(pads) < 0:
            raise self.fail(node, f"pads={pads}: only non-negative spatial padding is supported")
        c, h, w = self.tensors[x.tensor].shape
        shape = (c, h + canon_b[2] + canon_e[2], w + canon_b[3] + canon_e[3])
        out = self.emit(
            "pad",
            node,
            [x.tensor],
            shape,
            attrs={"pads": (canon_b[2], canon_b[3], canon_e[2], canon_e[3])},
        )
        self.values[node.output[0]] = Act(out, x.perm)

    def op_Softmax(self, node):
        x = self._act_or_flat(node, 0)
        shape = self.onnx_shape(x)
        axis = self.attrs(node).get("axis", -1 if self.opset >= 13 else 1)
        if axis < 0:
            axis += len(shape)
        chan_axis = 1 if isinstance(x, Flat) else x.perm.index(1)
        if isinstance(x, Flat) and self.tensors[x.tensor].shape[1:] != (1, 1):
            raise self.fail(node, "softmax over a flattened map is not supported")
        if axis != chan_axis:
            raise self.fail(node, f"attribute 'axis'={axis}: only softmax over channels")
        out = self.emit("softmax", node, [x.tensor], self.tensors[x.tensor].shape)
        self.values[node.output[0]] = dataclasses.replace(x, tensor=out)


def import_onnx(model: onnx.ModelProto | str | Path) -> Graph:
    """Import an ONNX model (or file) into the IR, resolving layout ops."""
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    return _Importer(model).run()
