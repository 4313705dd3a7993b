"""Small ONNX networks for the RTL tests, built with seeded random weights.

Each exercises what compiled programs contain: conv with stride, padding and dilation,
fused bias/BN/ReLU, residual add, channel concat, max/average/global pooling and a fully
connected layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


class Net:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, value: np.ndarray) -> str:
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), n))
        return n

    def op(self, kind: str, inputs: list[str], **attrs) -> str:
        out = self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, pad: int | None = None,
             dilation: int = 1) -> str:  # fmt: skip
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        b = 0.2 * self.rng.standard_normal(cout)
        p = dilation * (k - 1) // 2 if pad is None else pad
        return self.op("Conv", [x, self.const(w), self.const(b)], kernel_shape=[k, k],
                       strides=[stride, stride], pads=[p, p, p, p],
                       dilations=[dilation, dilation])  # fmt: skip

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def model(self, x_shape: list[int], outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "rtl",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        m = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
        )
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        for out, inf in zip(m.graph.output, inferred.graph.output, strict=True):
            out.type.CopyFrom(inf.type)
        return m


def conv_pool_net(seed: int = 1) -> onnx.ModelProto:
    """conv 3x3 + ReLU, max pool 2x2/2, conv 3x3 stride 2 dilation... and a 1x1 conv."""
    n = Net(seed)
    y = n.relu(n.conv("x", 3, 16, 3))
    y = n.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = n.relu(n.conv(y, 16, 16, 3, stride=2))
    y = n.conv(y, 16, 8, 3, dilation=2)
    y = n.conv(y, 8, 24, 1)
    return n.model([1, 3, 14, 14], [y])


def residual_net(seed: int = 2) -> onnx.ModelProto:
    """A ResNet basic block with a projection shortcut, then average pooling."""
    n = Net(seed)
    x = n.relu(n.conv("x", 8, 16, 3))
    y = n.relu(n.conv(x, 16, 16, 3))
    y = n.conv(y, 16, 16, 3)
    y = n.relu(n.op("Add", [y, x]))
    y = n.op(
        "AveragePool",
        [y],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        count_include_pad=1,
    )
    return n.model([1, 8, 10, 10], [y])


def concat_fc_net(seed: int = 3) -> onnx.ModelProto:
    """Two branches concatenated on channels (a DenseNet step), global pool and an FC."""
    n = Net(seed)
    a = n.relu(n.conv("x", 4, 8, 3))
    b = n.relu(n.conv("x", 4, 16, 1))
    c = n.op("Concat", [a, b], axis=1)
    c = n.relu(n.conv(c, 24, 16, 3, stride=2))
    g = n.op("GlobalAveragePool", [c])
    f = n.op("Flatten", [g], axis=1)
    w = n.rng.standard_normal((10, 16)) * 0.3
    y = n.op("Gemm", [f, n.const(w), n.const(0.1 * n.rng.standard_normal(10))], transB=1)
    return n.model([1, 4, 9, 9], [y])


def downsample_net(seed: int = 4) -> onnx.ModelProto:
    """A ResNet v1 downsampling bottleneck: the main branch's 1x1 stride-2 conv and the
    projection shortcut read one input, which the compiler subsamples once (a 1x1 max pool
    of stride 2) because the input does not stay in the activation buffer."""
    n = Net(seed)
    x = n.relu(n.conv("x", 8, 16, 3))
    y = n.relu(n.conv(x, 16, 16, 1, stride=2, pad=0))
    y = n.conv(y, 16, 32, 3)
    s = n.conv(x, 16, 32, 1, stride=2, pad=0)
    y = n.relu(n.op("Add", [y, s]))
    return n.model([1, 8, 12, 12], [y])


NETWORKS = {
    "conv_pool": conv_pool_net,
    "residual": residual_net,
    "concat_fc": concat_fc_net,
    "downsample": downsample_net,
}
