"""Per-operator tests: small ONNX graphs compiled, simulated and checked two ways.

Every case builds a tiny opset-17 model with seeded random weights, compiles it for an
ECP5 preset and runs it on a seeded random input, then checks

1. the contract: the instruction simulator and the numpy reference executor agree bit for
   bit on every output (``np.array_equal``); and
2. accuracy: the result is within the BFP error budget of onnxruntime's FP32 result.

A wrong padding, a transposed weight or a misplaced channel block drives the cosine far
below 0.99 and the relative error to tens of percent, so the tolerances below catch layout
and lowering bugs, not just numerics drift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tessera import cli, layout, numerics
from tessera.compiler.driver import compile_model
from tessera.compiler.ir import Graph
from tessera.compiler.lower import Lowered
from tessera.config import get_config
from tessera.program import Program
from tessera.runtime.host import prepare_dram, quantize_input
from tessera.sim.executor import Simulator
from tessera.sim.run import run_program

# --------------------------------------------------------------------------- tolerances
# Storage BFP keeps 8-bit mantissas (7 bits + sign) with one exponent per block of N
# channels, so a stored value is off by at most half an LSB: 2**-8 .. 2**-7 of its block's
# maximum. A layer quantizes its input, its weights (per tile row) and its output, and the
# errors of a dot product partly cancel, so one layer stays around 1-2 % of the output's
# largest magnitude. We check ``max|ours - ort| / max|ort|`` and the cosine similarity.
# Measured: single layers <= 1.6 % and cosine >= 0.99992 in the cases below, <= 2.2 % and
# >= 0.99984 over 3000 random conv shapes; graphs of 2-6 layers <= 2.2 % and >= 0.99986.
# A real bug is far outside (error > 100 %, cosine < 0.2): test_tolerances_catch_layout_bugs.
#: One NPU layer (conv, pool, eltwise) after the quantized input.
TOL_LAYER = 0.03
COS_LAYER = 0.999
#: Graphs of 2-6 layers: every re-quantization adds its own share of error.
TOL_NET = 0.05
COS_NET = 0.998

OPSET = 17
#: onnx may stamp a newer IR version than the installed onnxruntime reads; 8 is opset 17's.
IR_VERSION = 8
CFG_85F = "ulx3s-85f"
#: The small preset: native dimension 8 instead of 16, so block boundaries move.
CFG_25F = "ulx3s-25f"


# --------------------------------------------------------------------------- model building
@dataclass
class Net:
    """Accumulates nodes and seeded random initializers of one small ONNX graph."""

    seed: int = 0
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, value: np.ndarray | float, prefix: str = "c", dtype=np.float32) -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=f"{op_type}_{out}", **attrs)
        )
        return out

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int | tuple[int, int] = 3,
        stride: int = 1,
        pads: list[int] | None = None,
        dilation: int = 1,
        bias: bool = True,
        out: str | None = None,
        **attrs,
    ) -> str:
        """He-initialised conv; ``pads`` default to 'same' for odd kernels at stride 1."""
        kh, kw = (k, k) if isinstance(k, int) else k
        w = self.rng.standard_normal((cout, cin, kh, kw)) * np.sqrt(2.0 / (cin * kh * kw))
        inputs = [x, self.const(w, "w")]
        if bias:
            inputs.append(self.const(0.2 * self.rng.standard_normal(cout), "b"))
        if pads is None and "auto_pad" not in attrs:
            ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
            pads = [ph, pw, ph, pw]
        if pads is not None:
            attrs["pads"] = pads
        return self.op(
            "Conv",
            inputs,
            out,
            kernel_shape=[kh, kw],
            strides=[stride, stride],
            dilations=[dilation, dilation],
            **attrs,
        )

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [
            r.uniform(0.5, 1.5, c),  # scale
            0.2 * r.standard_normal(c),  # bias
            0.2 * r.standard_normal(c),  # mean
            r.uniform(0.5, 2.0, c),  # var
        ]
        return self.op(
            "BatchNormalization", [x, *(self.const(p, "bn") for p in params)], epsilon=1e-3
        )

    def gemm_weight(self, k: int, o: int, trans_b: bool) -> str:
        w = self.rng.standard_normal((k, o)) * np.sqrt(1.0 / k)
        return self.const(w.T if trans_b else w, "fc")

    def model(self, inputs: dict[str, list[int]], outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "test",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
            self.inits,
        )
        m = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
        )
        # Give the outputs their inferred shapes, which the checker requires.
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        for out, inf in zip(m.graph.output, inferred.graph.output, strict=True):
            out.type.CopyFrom(inf.type)
        onnx.checker.check_model(m)
        return m


def random_input(shape: list[int] | tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FP32 results with graph optimizations off: onnxruntime's Pad fusion (PR #18136) folds
    a zero Pad into MaxPool's pads, which pad with -inf, and so changes the result."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def accuracy(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs error relative to the reference's max magnitude, cosine similarity)."""
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    scale = np.abs(b).max()
    err = float(np.abs(a - b).max() / scale) if scale else float(np.abs(a).max())
    den = np.linalg.norm(a) * np.linalg.norm(b)
    cos = float(a @ b / den) if den else float(np.array_equal(a, b))
    return err, cos


@dataclass
class Checked:
    """What a check ran: the compiled artefacts and the three sets of outputs."""

    prog: Program
    graph: Graph
    lowered: Lowered
    sim: dict[str, np.ndarray]
    ort: dict[str, np.ndarray]
    stats: dict[str, tuple[float, float]]


def check(
    model: onnx.ModelProto,
    x: np.ndarray,
    config: str = CFG_85F,
    tol: float = TOL_LAYER,
    min_cos: float = COS_LAYER,
) -> Checked:
    """Compile ``model``, assert sim == reference bit for bit and closeness to onnxruntime."""
    prog, graph, lowered = compile_model(model, get_config(config))
    feeds = {model.graph.input[0].name: x}
    sim_run = run_program(prog, feeds, "sim")
    ref_run = run_program(prog, feeds, "reference")
    # Every byte of DRAM, not just the outputs: intermediate activations, exponents, padding.
    assert np.array_equal(sim_run.mem, ref_run.mem), "simulator DRAM != reference DRAM"
    # A second input, other values and exponents: this run follows the first one's trace.
    again = {name: np.flip(v) * np.float32(-1.7) for name, v in feeds.items()}
    mem, origin = prepare_dram(prog, again)
    replay = Simulator(prog.config, mem, origin)
    replay.run(prog.instructions)
    assert replay.replayed
    assert np.array_equal(mem, run_program(prog, again, "reference").mem), (
        "replayed run != reference"
    )
    sim, ref = sim_run.outputs, ref_run.outputs
    expected = run_ort(model, feeds)
    assert sorted(sim) == sorted(ref) == sorted(expected)
    stats = {}
    for name, want in expected.items():
        assert sim[name].dtype == np.float32
        assert sim[name].shape == want.shape, name
        assert np.array_equal(sim[name], ref[name]), f"{name}: simulator != reference"
        err, cos = accuracy(sim[name], want)
        stats[name] = (err, cos)
        assert err <= tol and cos >= min_cos, (
            f"{name}: max error {err:.4f} of max|ort| (tol {tol}), cosine {cos:.6f} (min {min_cos})"
        )
    return Checked(prog, graph, lowered, sim, expected, stats)


def ops_of(c: Checked) -> list[str]:
    return [n.op for n in c.graph.nodes]


def single_conv(cin: int, cout: int, hw: tuple[int, int], seed: int = 0, **kw) -> onnx.ModelProto:
    net = Net(seed)
    y = net.conv("x", cin, cout, out="y", **kw)
    return net.model({"x": [1, cin, *hw]}, [y])


# --------------------------------------------------------------------------- tolerances
@pytest.mark.parametrize(
    "bug", ["flipped kernel", "swapped channels", "shifted padding", "one block off"]
)
def test_tolerances_catch_layout_bugs(bug: str) -> None:
    """Our output against onnxruntime on a model with a typical lowering bug must fail."""
    model = single_conv(32, 32, (8, 8), k=3)
    x = random_input([1, 32, 8, 8])
    prog, _, _ = compile_model(model, get_config(CFG_85F))
    ours = run_program(prog, {"x": x}).outputs["y"]
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    w = numpy_helper.to_array(model.graph.initializer[0])
    if bug == "flipped kernel":
        w = w[:, :, ::-1, ::-1]
    elif bug == "swapped channels":
        w = w.transpose(1, 0, 2, 3)
    elif bug == "one block off":  # input channel blocks 0 and 1 swapped
        w = np.concatenate([w[:, 16:], w[:, :16]], axis=1)
    else:
        pads = next(a for a in bad.graph.node[0].attribute if a.name == "pads")
        pads.ints[:] = [0, 0, 2, 2]
    name = bad.graph.initializer[0].name
    bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), name))
    err, cos = accuracy(ours, run_ort(bad, {"x": x})["y"])
    assert err > 10 * TOL_NET and cos < 0.9, (err, cos)


# --------------------------------------------------------------------------- Conv
@pytest.mark.parametrize(
    ("k", "stride", "pads"),
    [
        (1, 1, [0, 0, 0, 0]),
        (3, 1, [1, 1, 1, 1]),
        (5, 1, [2, 2, 2, 2]),
        (7, 2, [3, 3, 3, 3]),  # ResNet stem
        (1, 2, [0, 0, 0, 0]),  # ResNet projection shortcut
        (3, 2, [0, 0, 1, 1]),  # TF 'same' at stride 2: pad only bottom/right
        (3, 1, [2, 0, 1, 3]),  # every side different
        (3, 1, [0, 0, 0, 0]),  # valid
    ],
)
def test_conv_kernel_stride_pads(k: int, stride: int, pads: list[int]) -> None:
    check(
        single_conv(20, 40, (13, 11), k=k, stride=stride, pads=pads), random_input([1, 20, 13, 11])
    )


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_auto_pad_same_upper(stride: int) -> None:
    model = single_conv(16, 16, (10, 9), k=3, stride=stride, auto_pad="SAME_UPPER")
    c = check(model, random_input([1, 16, 10, 9]))
    assert c.sim["y"].shape == (1, 16, -(-10 // stride), -(-9 // stride))


def test_conv_dilation_2() -> None:
    check(single_conv(16, 32, (12, 12), k=3, dilation=2), random_input([1, 16, 12, 12]))


@pytest.mark.parametrize(("cin", "cout"), [(3, 10), (20, 40), (16, 16), (32, 10), (3, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_channels_not_multiple_of_block(cin: int, cout: int, bias: bool) -> None:
    check(single_conv(cin, cout, (8, 8), bias=bias), random_input([1, cin, 8, 8]))


def test_conv_small_map_nchw() -> None:
    """NCHW input whose width is at most 4 (and so looks like NHWC [1, H, W, C<=4])."""
    check(single_conv(16, 16, (4, 4), k=3), random_input([1, 16, 4, 4]))


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "pads"),
    [(3, 10, 3, 1, [1, 1, 1, 1]), (20, 40, 5, 2, [2, 1, 2, 1]), (8, 8, 1, 1, [0, 0, 0, 0])],
)
def test_conv_on_native_dim_8(cin: int, cout: int, k: int, stride: int, pads: list[int]) -> None:
    model = single_conv(cin, cout, (9, 9), k=k, stride=stride, pads=pads)
    check(model, random_input([1, cin, 9, 9]), config=CFG_25F)


def test_conv_relu() -> None:
    net = Net()
    y = net.op("Relu", [net.conv("x", 20, 24)], "y")
    c = check(net.model({"x": [1, 20, 8, 8]}, [y]), random_input([1, 20, 8, 8]))
    assert ops_of(c) == ["conv"]  # relu runs in the conv's chain
    assert c.sim["y"].min() >= 0


def test_conv_batchnorm_folded() -> None:
    net = Net()
    y = net.op("Relu", [net.bn(net.conv("x", 16, 40, bias=False), 40)], "y")
    c = check(net.model({"x": [1, 16, 8, 8]}, [y]), random_input([1, 16, 8, 8]))
    assert ops_of(c) == ["conv"]


def test_biased_conv_then_mul_add_folds() -> None:
    """Trained Keras weights: a Conv with a bias keeps grappler from folding the following
    BatchNorm, which arrives as per-channel Mul then Add; both fold into the conv."""
    net = Net()
    h = net.conv("x", 16, 24, bias=True)
    h = net.op("Mul", [h, net.const(net.rng.uniform(0.5, 1.5, (1, 24, 1, 1)))])
    h = net.op("Add", [h, net.const(net.rng.uniform(-0.5, 0.5, (1, 24, 1, 1)))])
    y = net.op("Relu", [h], "y")
    c = check(net.model({"x": [1, 16, 8, 8]}, [y]), random_input([1, 16, 8, 8]))
    assert ops_of(c) == ["conv"]


def test_preactivation_batchnorm_relu_conv() -> None:
    """DenseNet's BN -> Relu -> Conv: the BN has no conv before it to fold into."""
    net = Net()
    y = net.conv(net.op("Relu", [net.bn("x", 24)]), 24, 16, out="y")
    c = check(net.model({"x": [1, 24, 8, 8]}, [y]), random_input([1, 24, 8, 8]), tol=TOL_NET)
    assert ops_of(c) == ["eltwise", "conv"]
    assert c.graph.nodes[0].attrs["relu"]


# --------------------------------------------------------------------------- Add / affine
def test_residual_add_of_two_conv_branches_relu() -> None:
    net = Net()
    a = net.conv("x", 16, 32, k=3)
    b = net.conv("x", 16, 32, k=1)
    y = net.op("Relu", [net.op("Add", [a, b])], "y")
    c = check(net.model({"x": [1, 16, 8, 8]}, [y]), random_input([1, 16, 8, 8]), tol=TOL_NET)
    assert ops_of(c) == ["conv", "conv"]
    assert c.graph.nodes[1].attrs.get("residual") and c.graph.nodes[1].attrs["relu"]


def test_resnet_identity_block() -> None:
    """conv-bn-relu-conv-bn + identity shortcut, then relu (the residual is a graph input)."""
    net = Net()
    h = net.op("Relu", [net.bn(net.conv("x", 32, 32, bias=False), 32)])
    h = net.bn(net.conv(h, 32, 32, bias=False), 32)
    y = net.op("Relu", [net.op("Add", [h, "x"])], "y")
    check(
        net.model({"x": [1, 32, 8, 8]}, [y]),
        random_input([1, 32, 8, 8]),
        tol=TOL_NET,
        min_cos=COS_NET,
    )


def test_add_two_plain_tensors() -> None:
    net = Net()
    r = net.op("Relu", [net.conv("x", 20, 20)])
    y = net.op("Add", [r, "x"], "y")
    c = check(net.model({"x": [1, 20, 8, 8]}, [y]), random_input([1, 20, 8, 8]), tol=TOL_NET)
    assert ops_of(c) == ["conv", "eltwise"]


def test_add_tensor_to_itself() -> None:
    net = Net()
    y = net.op("Add", ["x", "x"], "y")
    check(net.model({"x": [1, 20, 6, 6]}, [y]), random_input([1, 20, 6, 6]))


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
@pytest.mark.parametrize("shape", [(), (1,), (20, 1, 1), (1, 20, 1, 1)])
def test_constant_binary_op(op: str, shape: tuple[int, ...]) -> None:
    """Standalone eltwise chains on the graph input: scalar and per-channel constants."""
    net = Net(3)
    values = net.rng.uniform(0.5, 2.0, shape) * net.rng.choice([-1.0, 1.0], shape)
    y = net.op(op, ["x", net.const(values)], "y")
    c = check(net.model({"x": [1, 20, 6, 6]}, [y]), random_input([1, 20, 6, 6]))
    assert ops_of(c) == ["eltwise"]


def test_constant_ops_after_conv_fold_or_chain() -> None:
    """Mul/Add after a conv fold into it; after a Relu they become one eltwise chain."""
    net = Net()
    h = net.op("Mul", [net.conv("x", 16, 20), net.const(net.rng.uniform(0.5, 2, (20, 1, 1)))])
    h = net.op("Relu", [net.op("Add", [h, net.const(0.3)])])
    h = net.op("Sub", [h, net.const(net.rng.uniform(-1, 1, (1, 20, 1, 1)))])
    y = net.op("Div", [h, net.const(np.float32(1.7))], "y")
    c = check(net.model({"x": [1, 16, 8, 8]}, [y]), random_input([1, 16, 8, 8]), tol=TOL_NET)
    assert ops_of(c) == ["conv", "eltwise"]


def test_nhwc_preprocessing_then_transpose() -> None:
    """tf2onnx's Keras input: NHWC, per-channel Sub/Div on the last axis, then Transpose."""
    net = Net()
    h = net.op("Sub", ["x", net.const([0.4, -0.2, 0.1])])
    h = net.op("Div", [h, net.const([0.5, 1.5, 2.0])])
    h = net.op("Transpose", [h], perm=[0, 3, 1, 2])
    y = net.op("Relu", [net.conv(h, 3, 16)], "y")
    check(net.model({"x": [1, 12, 10, 3]}, [y]), random_input([1, 12, 10, 3]), tol=TOL_NET)


@pytest.mark.parametrize(
    ("k", "stride", "pads", "dilation"),
    [(7, 2, [3, 3, 3, 3], 1), (7, 2, [2, 3, 3, 2], 1), (3, 1, [1, 1, 1, 1], 2), (5, 3, [0] * 4, 1)],
)
def test_rgb_stem_conv_packs_columns(k: int, stride: int, pads: list[int], dilation: int) -> None:
    """A conv on a 3-channel input has its kernel columns packed into channels by the host."""
    net = Net()
    h = net.op("Transpose", ["x"], perm=[0, 3, 1, 2])
    h = net.conv(h, 3, 16, k=k, stride=stride, pads=pads, dilation=dilation)
    y = net.op("Relu", [h], "y")
    c = check(net.model({"x": [1, 23, 21, 3]}, [y]), random_input([1, 23, 21, 3]))
    (conv,) = [n for n in c.graph.nodes if n.op == "conv"]
    assert conv.attrs["kernel"] == (k, 1) and conv.params["weight"].shape[1] == 3 * k
    assert c.graph.inputs[0].columns["kernel_w"] == k


def _packed_input_numpy(x: np.ndarray, info: dict, n: int) -> np.ndarray:
    """The host's input buffer before quantizing, written with numpy: [H, W_out, CB*N]."""
    canon = np.transpose(x.astype(np.float64), np.argsort(info["perm"]))[0]  # [C, H, W]
    spec = info.get("columns")
    if spec:
        kw, sw, dw = spec["kernel_w"], spec["stride_w"], spec["dilation_w"]
        padded = np.pad(canon, ((0, 0), (0, 0), (spec["pad_left"], spec["pad_right"])))
        cols = np.arange(spec["out_w"])[None, :] * sw + np.arange(kw)[:, None] * dw
        canon = padded[:, :, cols].transpose(0, 2, 1, 3).reshape(-1, canon.shape[1], spec["out_w"])
    out = np.zeros((canon.shape[1], canon.shape[2], info["cb"] * n))
    out[:, :, : canon.shape[0]] = np.transpose(canon, (1, 2, 0))
    return out


@pytest.mark.parametrize(
    "k, stride, pads, dilation", [(7, 2, [3, 3, 3, 3], 1), (3, 1, [0, 2, 1, 1], 2)]
)
def test_input_placement_equals_numpy(k: int, stride: int, pads: list[int], dilation: int) -> None:
    """The host places an input (layout, packed kernel columns, block padding) and
    quantizes it in bands of rows, compiled; the result equals numpy's placement
    quantized by tessera.numerics."""
    net = Net()
    h = net.op("Transpose", ["x"], perm=[0, 3, 1, 2])
    h = net.conv(h, 3, 16, k=k, stride=stride, pads=pads, dilation=dilation, out="y")
    prog, _, _ = compile_model(net.model({"x": [1, 37, 29, 3]}, [h]), get_config(CFG_85F))
    (info,) = prog.manifest["inputs"]
    assert info.get("columns")
    cfg = prog.config
    x = random_input([1, 37, 29, 3]) * np.float32(40.0)
    for spec in (info, {**info, "columns": None}):
        if spec["columns"] is None:  # a plain input of the same shape
            spec = {**spec, "cb": 1}
        want = _packed_input_numpy(x, spec, cfg.native_dim)
        want_q, want_e = numerics.quantize_float(
            want.reshape(*want.shape[:2], spec["cb"], cfg.native_dim), cfg.mantissa_bits
        )
        got_q, got_e = quantize_input(x, spec, cfg)
        np.testing.assert_array_equal(got_q, want_q)
        np.testing.assert_array_equal(got_e, want_e)
    # A run's DRAM holds it quantized in place: the bytes layout.pack_tensor makes of it.
    mem, _origin = prepare_dram(prog, {"x": x})
    body = layout.pack_tensor(*quantize_input(x, info, cfg), cfg.mantissa_bits)
    got = mem[info["addr"] : info["addr"] + len(body)].tobytes()
    n, m = cfg.native_dim, cfg.mantissa_bits
    assert len(body) == layout.tensor_bytes(info["h"], info["w"], info["cb"], n, m)
    assert got == body


def test_grayscale_nhwc_reshaped_to_nchw() -> None:
    """tf2onnx turns the NHWC->NCHW transpose of a one-channel image into a Reshape
    [1, H, W, 1] -> [1, 1, H, W]: only a size-1 axis moves, so it is a relabelling."""
    net = Net()
    h = net.op("Reshape", ["x", net.const([1, 1, 12, 10], dtype=np.int64)])
    y = net.op("Relu", [net.conv(h, 1, 16)], "y")
    check(net.model({"x": [1, 12, 10, 1]}, [y]), random_input([1, 12, 10, 1]))


# --------------------------------------------------------------------------- Concat
def _concat_views(c: Checked) -> list[tuple[int, int, int]]:
    """(buffer, first block, blocks) of the first concat's output, then of its inputs."""
    node = next(n for n in c.graph.nodes if n.op == "concat")
    views = (c.lowered.views[t] for t in [*node.outputs, *node.inputs])
    return [(v.buffer, v.cb_off, v.cb_cnt) for v in views]


def test_concat_zero_copy_16_and_32_channels() -> None:
    net = Net()
    a = net.op("Relu", [net.conv("x", 16, 16)])
    b = net.op("Relu", [net.conv("x", 16, 32, k=1)])
    d = net.conv("x", 16, 20, k=3)  # last input need not be block aligned
    cat = net.op("Concat", [a, b, d], axis=1)
    y = net.conv(cat, 68, 24, k=1, out="y")
    c = check(net.model({"x": [1, 16, 8, 8]}, [y, cat]), random_input([1, 16, 8, 8]), tol=TOL_NET)
    # Each producer writes straight into its slice of the concat buffer.
    (buf, _, _), *_ = views = _concat_views(c)
    assert views == [(buf, 0, 5), (buf, 0, 1), (buf, 1, 2), (buf, 3, 2)]
    assert not any("copy" in n.name for n in c.graph.nodes)


def test_concat_with_graph_input_copies_it() -> None:
    """The graph input cannot be placed inside the concat buffer: a copy chain is added."""
    net = Net()
    cat = net.op("Concat", ["x", net.op("Relu", [net.conv("x", 16, 16)])], "y", axis=1)
    c = check(net.model({"x": [1, 16, 6, 6]}, [cat]), random_input([1, 16, 6, 6]))
    assert any("copy" in n.name for n in c.graph.nodes)


@pytest.mark.parametrize("config", [CFG_85F, CFG_25F])
def test_densenet_chain_of_concats(config: str) -> None:
    """Dense block: each layer's BN-Relu-Conv output is appended to the running concat."""
    growth = 16
    net = Net()
    feat = net.conv("x", 3, 32, k=3)
    channels = 32
    for _ in range(3):
        h = net.op("Relu", [net.bn(feat, channels)])
        h = net.conv(h, channels, growth, k=3)
        feat = net.op("Concat", [feat, h], axis=1)
        channels += growth
    y = net.op("Relu", [net.bn(feat, channels)], "y")
    c = check(
        net.model({"x": [1, 3, 8, 8]}, [y]),
        random_input([1, 3, 8, 8]),
        config=config,
        tol=TOL_NET,
        min_cos=COS_NET,
    )
    assert not any("copy" in n.name for n in c.graph.nodes)
    concats = [n for n in c.graph.nodes if n.op == "concat"]
    assert len({c.lowered.views[n.outputs[0]].buffer for n in concats}) == 1


# --------------------------------------------------------------------------- pooling / Pad
def _pool_model(x_shape: list[int], relu_conv: bool, op: str, **attrs) -> onnx.ModelProto:
    net = Net()
    h = "x"
    if relu_conv:
        h = net.op("Relu", [net.conv("x", x_shape[1], x_shape[1])])
    y = net.op(op, [h], "y", **attrs)
    return net.model({"x": x_shape}, [y])


@pytest.mark.parametrize(
    ("op", "relu_conv", "attrs"),
    [
        ("MaxPool", False, {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("MaxPool", True, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("MaxPool", True, {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [0, 0, 1, 1]}),
        ("AveragePool", False, {"kernel_shape": [2, 2], "strides": [2, 2]}),
        (
            "AveragePool",
            False,
            {
                "kernel_shape": [3, 3],
                "strides": [1, 1],
                "pads": [1, 1, 1, 1],
                "count_include_pad": 1,
            },
        ),
        ("AveragePool", True, {"kernel_shape": [3, 3], "strides": [2, 2]}),
        ("GlobalAveragePool", False, {}),
        ("GlobalMaxPool", False, {}),
    ],
)
@pytest.mark.parametrize("channels", [16, 20])
def test_pooling(op: str, relu_conv: bool, attrs: dict, channels: int) -> None:
    shape = [1, channels, 9, 8]
    tol, cos = (TOL_NET, COS_NET) if relu_conv else (TOL_LAYER, COS_LAYER)
    c = check(_pool_model(shape, relu_conv, op, **attrs), random_input(shape), tol=tol, min_cos=cos)
    assert ops_of(c)[-1] == "pool"


def test_pooling_on_native_dim_8() -> None:
    shape = [1, 12, 7, 7]
    model = _pool_model(shape, True, "MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    check(model, random_input(shape), config=CFG_25F, tol=TOL_NET)


def test_pad_before_conv() -> None:
    net = Net()
    p = net.op("Pad", ["x", net.const([0, 0, 1, 2, 0, 0, 2, 1], dtype=np.int64)])
    y = net.conv(p, 16, 16, k=3, pads=[0, 0, 0, 0], out="y")
    c = check(net.model({"x": [1, 16, 8, 8]}, [y]), random_input([1, 16, 8, 8]))
    assert ops_of(c) == ["conv"]
    assert c.graph.nodes[0].attrs["pads"] == (1, 2, 2, 1)


def test_pad_before_maxpool_on_signed_input() -> None:
    """Explicit zero padding (Keras ZeroPadding2D): the zeros take part in the max."""
    net = Net()
    p = net.op("Pad", ["x", net.const([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)])
    y = net.op("MaxPool", [p], "y", kernel_shape=[3, 3], strides=[2, 2])
    c = check(net.model({"x": [1, 16, 9, 9]}, [y]), random_input([1, 16, 9, 9]))
    assert ops_of(c) == ["pool"]


def test_pad_on_nhwc_input_before_transpose_and_conv() -> None:
    """ZeroPadding2D on the NHWC side of tf2onnx's boundary transpose (ResNet's stem)."""
    net = Net()
    p = net.op("Pad", ["x", net.const([0, 3, 3, 0, 0, 3, 3, 0], dtype=np.int64)])
    t = net.op("Transpose", [p], perm=[0, 3, 1, 2])
    y = net.op("Relu", [net.conv(t, 3, 16, k=7, stride=2, pads=[0, 0, 0, 0])], "y")
    c = check(net.model({"x": [1, 16, 16, 3]}, [y]), random_input([1, 16, 16, 3]))
    assert c.sim["y"].shape == (1, 16, 8, 8)


# --------------------------------------------------------------------------- FC / layout
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_after_flatten(trans_b: int, bias: bool) -> None:
    net = Net()
    f = net.op("Flatten", [net.op("Relu", [net.conv("x", 16, 20)])], axis=1)
    inputs = [f, net.gemm_weight(20 * 5 * 5, 10, bool(trans_b))]
    if bias:
        inputs.append(net.const(0.2 * net.rng.standard_normal(10)))
    y = net.op("Gemm", inputs, "y", transB=trans_b, alpha=0.5, beta=2.0)
    check(net.model({"x": [1, 16, 5, 5]}, [y]), random_input([1, 16, 5, 5]), tol=TOL_NET)


def test_matmul_after_nhwc_flatten_keras_style() -> None:
    """VGG in Keras: NHWC input, boundary Transpose, conv, Transpose to NHWC, Reshape to
    [1, -1] (so features are ordered H, W, C), then MatMul + Add (the Dense layer)."""
    net = Net()
    t = net.op("Transpose", ["x"], perm=[0, 3, 1, 2])
    h = net.op("Relu", [net.conv(t, 3, 24)])
    h = net.op("Transpose", [h], perm=[0, 2, 3, 1])
    f = net.op("Reshape", [h, net.const([1, -1], dtype=np.int64)])
    z = net.op("MatMul", [f, net.gemm_weight(6 * 7 * 24, 12, False)])
    y = net.op("Add", [z, net.const(0.2 * net.rng.standard_normal(12))], "y")
    c = check(net.model({"x": [1, 6, 7, 3]}, [y, f]), random_input([1, 6, 7, 3]), tol=TOL_NET)
    assert c.sim[f].shape == (1, 6 * 7 * 24)  # the flat output is presented in H, W, C order


def test_squeeze_unsqueeze_reshape_vectors() -> None:
    net = Net()
    g = net.op("GlobalAveragePool", [net.op("Relu", [net.conv("x", 16, 24)])])
    s = net.op("Squeeze", [g, net.const([2, 3], dtype=np.int64)])  # [1, 24]
    fc = net.op("Gemm", [s, net.gemm_weight(24, 32, True)], transB=1)  # [1, 32]
    u = net.op("Unsqueeze", [fc, net.const([2, 3], dtype=np.int64)])  # [1, 32, 1, 1]
    h = net.conv(u, 32, 20, k=1)  # a 1x1 conv on the vector
    y1 = net.op("Reshape", [h, net.const([1, -1], dtype=np.int64)], "y1")  # [1, 20]
    y2 = net.op("Reshape", [h, net.const([1, 1, 1, 20], dtype=np.int64)], "y2")
    model = net.model({"x": [1, 16, 6, 6]}, [y1, y2])
    c = check(model, random_input([1, 16, 6, 6]), tol=TOL_NET, min_cos=COS_NET)
    assert c.sim["y1"].shape == (1, 20) and c.sim["y2"].shape == (1, 1, 1, 20)


@pytest.mark.parametrize("axis", [1, -1])
def test_softmax_host_stage(axis: int) -> None:
    net = Net()
    f = net.op("Flatten", [net.op("GlobalAveragePool", [net.conv("x", 16, 16)])])
    z = net.op("Gemm", [f, net.gemm_weight(16, 10, True)], transB=1)
    y = net.op("Softmax", [net.op("Mul", [z, net.const(4.0)])], "y", axis=axis)
    c = check(net.model({"x": [1, 16, 6, 6]}, [y]), random_input([1, 16, 6, 6]), tol=TOL_NET)
    assert c.prog.manifest["host_stages"][0]["op"] == "softmax"
    np.testing.assert_allclose(c.sim["y"].sum(), 1.0, rtol=1e-5)


def test_small_classifier_tf2onnx_style() -> None:
    """NHWC input to softmax, as tf2onnx exports a Keras CNN: every layout op at once."""
    net = Net()
    h = net.op("Transpose", ["x"], perm=[0, 3, 1, 2])
    h = net.op("Relu", [net.bn(net.conv(h, 3, 16, bias=False), 16)])
    h = net.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = net.op("Relu", [net.conv(h, 16, 32, stride=2, auto_pad="SAME_UPPER", pads=None)])
    h = net.op("Transpose", [h], perm=[0, 2, 3, 1])
    f = net.op("Reshape", [h, net.const([1, -1], dtype=np.int64)])
    z = net.op(
        "Add",
        [net.op("MatMul", [f, net.gemm_weight(3 * 3 * 32, 10, False)]), net.const(np.zeros(10))],
    )
    y = net.op("Softmax", [z], "y", axis=-1)
    model = net.model({"x": [1, 12, 12, 3]}, [y])
    check(model, random_input([1, 12, 12, 3]), tol=TOL_NET, min_cos=COS_NET)


# --------------------------------------------------------------------------- random shapes
@st.composite
def conv_shapes(draw: st.DrawFn) -> dict:
    k = draw(st.sampled_from([1, 2, 3, 5, 7]))
    kw = draw(st.sampled_from([k, 1, 3]))
    dil = draw(st.sampled_from([1, 1, 2]))
    pads = [draw(st.integers(0, dil * (kk - 1))) for kk in (k, kw, k, kw)]
    span_h, span_w = dil * (k - 1) + 1, dil * (kw - 1) + 1
    h = draw(st.integers(max(1, span_h - pads[0] - pads[2]), 14))
    w = draw(st.integers(max(1, span_w - pads[1] - pads[3]), 14))
    return {
        "k": (k, kw),
        "stride": draw(st.integers(1, 3)),
        "dilation": dil,
        "pads": pads,
        "cin": draw(st.integers(1, 40)),
        "cout": draw(st.integers(1, 40)),
        "hw": (h, w),
        "bias": draw(st.booleans()),
        "relu": draw(st.booleans()),
        "config": draw(st.sampled_from([CFG_85F, CFG_25F])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_shapes())
def test_random_conv_shapes(s: dict) -> None:
    # The error is measured against the largest output; with a handful of outputs that
    # one can be a near-cancelling sum, so tiny outputs say nothing about accuracy.
    (k, kw), (h, w), p, d = s["k"], s["hw"], s["pads"], s["dilation"]
    oh = (h + p[0] + p[2] - d * (k - 1) - 1) // s["stride"] + 1
    ow = (w + p[1] + p[3] - d * (kw - 1) - 1) // s["stride"] + 1
    assume(s["cout"] * oh * ow >= 64)
    net = Net(s["seed"])
    y = net.conv(
        "x",
        s["cin"],
        s["cout"],
        k=s["k"],
        stride=s["stride"],
        pads=s["pads"],
        dilation=s["dilation"],
        bias=s["bias"],
        out=None if s["relu"] else "y",
    )
    if s["relu"]:
        y = net.op("Relu", [y], "y")
    shape = [1, s["cin"], *s["hw"]]
    check(net.model({"x": shape}, [y]), random_input(shape, s["seed"] + 1), config=s["config"])


# --------------------------------------------------------------------------- CLI
def test_cli_compile_run_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = Net()
    h = net.op("Relu", [net.conv("x", 3, 16)])
    h = net.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    f = net.op("Flatten", [h], "features")
    y = net.op("Gemm", [f, net.gemm_weight(16 * 4 * 4, 10, True)], "logits", transB=1)
    model_path, prog_path = tmp_path / "m.onnx", tmp_path / "p.tsr"
    onnx.save(net.model({"x": [1, 3, 8, 8]}, [y, f]), model_path)
    x = random_input([1, 3, 8, 8])
    np.save(tmp_path / "x.npy", x)

    assert cli.main(["compile", str(model_path), "-o", str(prog_path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "memory map:" in out and f"wrote {prog_path}" in out

    sim_npz, ref_npz = tmp_path / "sim.npz", tmp_path / "ref.npz"
    base = ["run", str(prog_path), "--input", str(tmp_path / "x.npy"), "--output"]
    assert cli.main([*base, str(sim_npz)]) == 0
    assert cli.main([*base, str(ref_npz), "--reference"]) == 0
    capsys.readouterr()
    with np.load(sim_npz) as a, np.load(ref_npz) as b:
        assert sorted(a.files) == sorted(b.files) == ["features", "logits"]
        for k in a.files:
            assert np.array_equal(a[k], b[k])
        assert a["logits"].shape == (1, 10)

    assert cli.main(["report", str(prog_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("macs", "total_cycles", "latency_ms", "mvu_utilization", "dram_bytes"):
        assert key in rep
    assert isinstance(rep["layers"], list) and rep["layers"]
    assert rep["macs"] == 16 * 8 * 8 * 3 * 9 + 10 * 16 * 4 * 4
    assert rep["total_cycles"] > 0 and 0 < rep["mvu_utilization"] <= 1
    # The floors are lower bounds of the modelled latency, the DSP one the lowest.
    assert rep["dsp_floor_ms"] <= rep["roofline_floor_ms"] <= rep["latency_ms"]


def test_recorded_products_cover_every_mac() -> None:
    """``kernels.record_products`` (what ``tessera bench sim`` replays) sees every product
    of a run: their MACs add up to the report's (channels a multiple of the block)."""
    from tessera.sim import kernels
    from tessera.sim.report import build_report

    net = Net(3)
    y = net.conv("x", 32, 48, out="a", k=3, pads=[1, 1, 1, 1])
    y = net.conv(y, 48, 16, k=1, out="y")
    model = net.model({"x": [1, 32, 9, 7]}, [y])
    prog, _, _ = compile_model(model, get_config(CFG_85F))
    with kernels.record_products() as shapes:
        run_program(prog, {"x": random_input([1, 32, 9, 7])}, "sim")
    assert shapes and sum(o * k * p for o, k, p, *_ in shapes) == build_report(prog)["macs"]


def test_weight_cache_follows_the_program_image() -> None:
    """The simulator reuses a layer's weight grid across runs without comparing its bytes
    only while the run's DRAM was copied from the same program image: two programs of one
    layout but other weights, run in turns, and a program whose weight segment is
    replaced, each give the reference's DRAM bit for bit."""
    cfg = get_config(CFG_85F)
    a, _, _ = compile_model(single_conv(32, 48, (7, 7), seed=0, k=3, pads=[1, 1, 1, 1]), cfg)
    b, _, _ = compile_model(single_conv(32, 48, (7, 7), seed=1, k=3, pads=[1, 1, 1, 1]), cfg)
    assert [addr for addr, _ in a.dram_segments] == [addr for addr, _ in b.dram_segments]
    feeds = {"x": random_input([1, 32, 7, 7])}

    def same_as_reference(prog: Program) -> bytes:
        sim = run_program(prog, feeds, "sim").mem
        assert np.array_equal(sim, run_program(prog, feeds, "reference").mem)
        return sim.tobytes()

    first = {id(p): same_as_reference(p) for p in (a, b)}
    assert first[id(a)] != first[id(b)]
    for prog in (a, a, b, b, a):
        assert same_as_reference(prog) == first[id(prog)]
    a.dram_segments[:] = b.dram_segments  # new bytes objects in the same places
    assert same_as_reference(a) == first[id(b)]
