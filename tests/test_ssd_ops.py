"""Compiler support for SSD, op by op, in the style of ``tests/test_ops.py``.

Two pieces: the ``fold_scale_into_conv`` pass (SSD's learnable L2-norm scale folded into the
``conv4_3`` heads' weights), and the split of a graph around its L2 normalisation into a trunk
program, the host stage and a head program (``tessera.ssd.split_model`` / ``compile_ssd`` /
``run_ssd``). Each small graph is compiled, run on the simulator and on the reference
executor, which must leave the same DRAM image byte for byte, and compared with onnxruntime's
FP32 result within the per-layer error budget of ``tests/test_ops.py``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_ops import (
    COS_NET,
    TOL_LAYER,
    TOL_NET,
    Net,
    accuracy,
    check,
    ops_of,
    random_input,
    run_ort,
)

from tessera import ssd
from tessera.compiler import passes
from tessera.config import get_config
from tessera.errors import TesseraError, UnsupportedModelError
from tessera.program import Program
from tessera.sim.run import run_program


# --------------------------------------------------------------------------- fold_scale_into_conv
def _scaled_convs(scale_shape: tuple[int, ...], seed: int = 0, **conv_kw) -> onnx.ModelProto:
    """x -> Mul(per-channel scale) -> a 3x3 conv and a 1x1 conv (two readers)."""
    net = Net(seed)
    scale = net.rng.uniform(0.25, 4.0, scale_shape) * net.rng.choice([-1.0, 1.0], scale_shape)
    h = net.op("Mul", ["x", net.const(scale)])
    a = net.conv(h, 24, 16, k=3, out="a", **conv_kw)
    b = net.conv(h, 24, 8, k=1, out="b")
    return net.model({"x": [1, 24, 9, 9]}, [a, b])


@pytest.mark.parametrize("scale_shape", [(1, 24, 1, 1), (24, 1, 1), ()])
def test_scale_folds_into_every_conv_reading_it(scale_shape: tuple[int, ...]) -> None:
    c = check(_scaled_convs(scale_shape), random_input([1, 24, 9, 9]))
    assert ops_of(c) == ["conv", "conv"]
    assert "fold_scale_into_conv: 1 per-channel Mul folded" in "\n".join(c.graph.log)
    assert all(n.inputs[0] == c.graph.inputs[0].tensor for n in c.graph.nodes)


@pytest.mark.parametrize("conv_kw", [{"dilation": 2}, {"stride": 2, "pads": [1, 0, 2, 1]}])
def test_scale_fold_is_exact_with_zero_padding(conv_kw: dict) -> None:
    """Padded positions are zero before and after scaling, so padding and dilation keep the
    folded conv equal to the original (within the one-layer budget, not two layers')."""
    c = check(_scaled_convs((1, 24, 1, 1), seed=1, **conv_kw), random_input([1, 24, 9, 9], 2))
    assert ops_of(c) == ["conv", "conv"]
    assert max(err for err, _ in c.stats.values()) <= TOL_LAYER


def test_scale_fold_matches_the_unfolded_chain_closely(monkeypatch: pytest.MonkeyPatch) -> None:
    """Folding removes one 8-bit rounding of the activations: at least as close to FP32 as
    the eltwise chain it replaces (measured with the pass taken out of the pipeline)."""
    model = _scaled_convs((1, 24, 1, 1), seed=3)
    x = random_input([1, 24, 9, 9], 4)
    folded = check(model, x)
    without = tuple(p for p in passes.PIPELINE if p is not passes.fold_scale_into_conv)
    run_pipeline = passes.run_pipeline
    monkeypatch.setattr(passes, "run_pipeline", lambda g: run_pipeline(g, without))
    unfolded = check(model, x, tol=TOL_NET)
    assert ops_of(unfolded) == ["eltwise", "conv", "conv"]
    for name in ("a", "b"):
        assert folded.stats[name][0] <= unfolded.stats[name][0] * 1.5


def test_scale_not_folded_when_a_reader_is_not_a_conv() -> None:
    """A Mul also read by a Relu (or any non-conv) must stay: its output is needed as is."""
    net = Net(5)
    h = net.op("Mul", ["x", net.const(net.rng.uniform(0.5, 2.0, (1, 16, 1, 1)))])
    a = net.conv(h, 16, 16, out="a")
    r = net.op("Relu", [h], "r")
    c = check(net.model({"x": [1, 16, 6, 6]}, [a, r]), random_input([1, 16, 6, 6]), tol=TOL_NET)
    assert "eltwise" in ops_of(c)
    assert "fold_scale_into_conv: 0" in "\n".join(c.graph.log)


def test_scale_not_folded_when_it_is_a_graph_output() -> None:
    net = Net(6)
    h = net.op("Mul", ["x", net.const(net.rng.uniform(0.5, 2.0, (1, 16, 1, 1)))], "h")
    a = net.conv(h, 16, 16, out="a")
    c = check(net.model({"x": [1, 16, 6, 6]}, [a, h]), random_input([1, 16, 6, 6]), tol=TOL_NET)
    assert ops_of(c) == ["eltwise", "conv"]


def test_affine_with_shift_is_not_folded_forward() -> None:
    """A shift would reach padded positions through the conv's bias: not folded."""
    net = Net(7)
    h = net.op("Mul", ["x", net.const(net.rng.uniform(0.5, 2.0, (1, 16, 1, 1)))])
    h = net.op("Add", [h, net.const(net.rng.uniform(-1, 1, (1, 16, 1, 1)))])
    y = net.conv(h, 16, 16, out="y")
    c = check(net.model({"x": [1, 16, 6, 6]}, [y]), random_input([1, 16, 6, 6]), tol=TOL_NET)
    assert ops_of(c) == ["eltwise", "conv"]


def test_scale_read_as_residual_is_not_folded() -> None:
    net = Net(8)
    h = net.op("Mul", ["x", net.const(net.rng.uniform(0.5, 2.0, (1, 16, 1, 1)))])
    y = net.op("Add", [net.conv("x", 16, 16), h], "y")
    c = check(net.model({"x": [1, 16, 6, 6]}, [y]), random_input([1, 16, 6, 6]), tol=TOL_NET)
    assert ops_of(c) == ["eltwise", "conv"]
    assert c.graph.nodes[1].attrs.get("residual")


# --------------------------------------------------------------------------- L2-norm split
def _tiny_ssd(layout: str = "nchw", seed: int = 0, eps_op: str = "Max") -> onnx.ModelProto:
    """A two-source SSD in miniature, built the way tf2onnx exports ``tessera.ssd``.

    ``conv4_3`` (16 channels, ReLU) feeds the L2 normalisation (scope ``.../conv4_3_norm_1/``:
    Square, ReduceSum, Max(eps), Sqrt, Reciprocal, Mul(gamma), Mul(x)) and a max pool and
    conv (``fc7``); each source has a box and a class head, transposed to NHWC outputs.
    With ``layout="nhwc"`` the normalisation runs on an NHWC view (the form tf2onnx emits
    without its transpose optimizer); with ``layout="mixed"`` the square is taken in NCHW
    and the rest in NHWC, through Transposes named outside the scope (as some tf2onnx
    exports of the SSD come out); ``eps_op="Add"`` builds sqrt(sum + eps) instead, which
    the split must refuse.
    """
    net = Net(seed)
    scope = "model/conv4_3_norm_1/"
    c43 = net.op("Relu", [net.conv("x", 8, 16)], "conv4_3_relu")
    if layout in ("nhwc", "mixed"):
        src = net.op("Transpose", [c43], "conv4_3_nhwc", perm=[0, 2, 3, 1])
        axis = -1
        gamma_shape = (16,)
    else:
        src, axis, gamma_shape = c43, 1, (1, 16, 1, 1)
    gamma = net.const(net.rng.uniform(10.0, 30.0, gamma_shape), "gamma")
    nodes = net.nodes
    sq = f"{scope}Square:0"
    squared = c43 if layout == "mixed" else src
    nodes.append(onnx.helper.make_node("Mul", [squared, squared], [sq], name=f"{scope}Square"))
    if layout == "mixed":  # an NCHW square, summed in NHWC
        sq = net.op("Transpose", [sq], "Transpose__112", perm=[0, 2, 3, 1])
    axes = net.const(np.array([axis]), "axes", dtype=np.int64)
    ss = f"{scope}Sum:0"
    nodes.append(
        onnx.helper.make_node("ReduceSum", [sq, axes], [ss], name=f"{scope}Sum", keepdims=1)
    )
    eps = net.const(np.array(1e-12), "eps")
    guarded = f"{scope}Maximum:0"
    nodes.append(onnx.helper.make_node(eps_op, [ss, eps], [guarded], name=f"{scope}Maximum"))
    root = f"{scope}Rsqrt:0"
    nodes.append(onnx.helper.make_node("Sqrt", [guarded], [root], name=f"{scope}Rsqrt"))
    inv = f"{scope}Rsqrt__1:0"
    nodes.append(onnx.helper.make_node("Reciprocal", [root], [inv], name=f"{scope}Rsqrt__1"))
    factor = f"{scope}mul:0"
    nodes.append(onnx.helper.make_node("Mul", [inv, gamma], [factor], name=f"{scope}mul"))
    norm = f"{scope}mul_1:0"
    nodes.append(onnx.helper.make_node("Mul", [src, factor], [norm], name=f"{scope}mul_1"))
    if layout in ("nhwc", "mixed"):
        norm = net.op("Transpose", [norm], "norm_nchw", perm=[0, 3, 1, 2])
    pooled = net.op("MaxPool", [c43], kernel_shape=[2, 2], strides=[2, 2])
    fc7 = net.op("Relu", [net.conv(pooled, 16, 32)])
    outputs = []
    for kind, width in (("loc", 4), ("conf", 3)):
        for name, source, channels in (("conv4_3", norm, 16), ("fc7", fc7, 32)):
            head = net.conv(source, channels, 2 * width)
            outputs.append(net.op("Transpose", [head], f"{kind}_{name}", perm=[0, 2, 3, 1]))
    return net.model({"x": [1, 8, 12, 12]}, outputs)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "mixed"])
def test_l2norm_site_is_found_and_checked(layout: str) -> None:
    model = _tiny_ssd(layout)
    site = ssd.find_l2_normalization(model)
    assert site.x == "conv4_3_relu"
    assert site.y == "model/conv4_3_norm_1/mul_1:0"
    assert site.channel_axis == 1
    assert site.perm == ((0, 1, 2, 3) if layout == "nchw" else (0, 2, 3, 1))
    assert site.epsilon == pytest.approx(1e-12)
    assert site.gamma.shape == (16,) and np.all((site.gamma >= 10) & (site.gamma <= 30))
    # the Transpose between the square and the sum is part of the layer
    assert len(site.nodes) == (8 if layout == "mixed" else 7)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "mixed"])
def test_split_runs_trunk_host_head_bit_exact_and_close_to_fp32(layout: str) -> None:
    """Trunk program -> host L2 norm -> head program, against onnxruntime on the whole
    graph: both programs sim == reference on the whole DRAM, every head within budget,
    and the learnable scale folded into the two conv4_3 heads (no eltwise left)."""
    model = _tiny_ssd(layout, seed=1)
    split = ssd.split_model(model)
    assert split.head_outputs == ("loc_conv4_3", "conf_conv4_3")
    assert split.trunk_outputs == ("loc_fc7", "conf_fc7", "conv4_3_relu")
    compiled = ssd.compile_ssd(model, get_config("ulx3s-85f"))
    assert [layer["op"] for layer in compiled.head.manifest["layers"]] == ["conv", "conv"]
    x = random_input([1, 8, 12, 12], 3)
    sim = ssd.run_ssd(compiled, x, "sim")
    ref = ssd.run_ssd(compiled, x, "reference")
    assert np.array_equal(sim.trunk.mem, ref.trunk.mem), "trunk: simulator DRAM != reference"
    assert np.array_equal(sim.head.mem, ref.head.mem), "head: simulator DRAM != reference"
    expected = run_ort(model, {"x": x})
    assert list(sim.outputs) == [o.name for o in model.graph.output]
    for name, want in expected.items():
        assert np.array_equal(sim.outputs[name], ref.outputs[name]), name
        assert sim.outputs[name].shape == want.shape
        err, cos = accuracy(sim.outputs[name], want)
        assert err <= TOL_NET and cos >= COS_NET, (name, err, cos)


def test_split_head_input_is_the_unit_norm_map() -> None:
    """The host writes x / |x| per pixel; an all-zero pixel (ReLU) stays zero (epsilon)."""
    x = np.zeros((1, 4, 2, 2))
    x[0, :, 0, 0] = [3.0, 4.0, 0.0, 0.0]
    x[0, :, 1, 1] = [1.0, 1.0, 1.0, 1.0]
    u = ssd.l2_normalize(x, 1)
    assert u[0, :, 0, 0].tolist() == [0.6, 0.8, 0.0, 0.0]
    assert u[0, :, 1, 1].tolist() == [0.5] * 4
    assert not np.any(u[0, :, 0, 1]) and np.all(np.isfinite(u))


def test_split_refuses_a_different_normalisation() -> None:
    with pytest.raises(UnsupportedModelError, match="L2 normalisation 'conv4_3_norm'"):
        ssd.split_model(_tiny_ssd(eps_op="Add"))


def test_split_without_the_layer_says_so() -> None:
    net = Net()
    y = net.conv("x", 8, 8, out="y")
    with pytest.raises(UnsupportedModelError, match="no L2 normalisation layer 'conv4_3_norm'"):
        ssd.split_model(net.model({"x": [1, 8, 6, 6]}, [y]))


def test_compiled_ssd_round_trips_through_bytes_and_json() -> None:
    """What a package stores (two .tsr byte strings and JSON params) rebuilds the same
    pipeline; run_heads with any NPU runner gives run_ssd's outputs."""
    model = _tiny_ssd("nhwc", seed=2)
    compiled = ssd.compile_ssd(model, get_config("ulx3s-25f"))
    params = json.loads(json.dumps(compiled.params()))
    again = ssd.CompiledSSD.from_parts(
        Program.from_bytes(compiled.trunk.to_bytes()),
        Program.from_bytes(compiled.head.to_bytes()),
        params,
    )
    assert again.stage == compiled.stage and again.output_names == compiled.output_names
    x = random_input([1, 8, 12, 12], 5)
    want = ssd.run_ssd(compiled, x, "sim").outputs

    def npu(program: Program, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_program(program, inputs, "reference").outputs

    got = ssd.run_heads(again, x, npu)
    assert list(got) == list(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_compiled_ssd_refuses_mismatched_parts() -> None:
    compiled = ssd.compile_ssd(_tiny_ssd(seed=4), get_config("ulx3s-85f"))
    params = compiled.params()
    with pytest.raises(TesseraError, match="inconsistent SSD programs: the trunk program"):
        ssd.CompiledSSD.from_parts(compiled.head, compiled.trunk, params)
    other = ssd.compile_ssd(_tiny_ssd(seed=4), get_config("ulx3s-25f"))
    with pytest.raises(TesseraError, match="different NPU configurations"):
        ssd.CompiledSSD.from_parts(compiled.trunk, other.head, params)
    bad = {**params, "stage": {**params["stage"], "perm": [1, 0, 2, 3]}}
    with pytest.raises(TesseraError, match="perm"):
        ssd.CompiledSSD.from_parts(compiled.trunk, compiled.head, bad)
    with pytest.raises(TesseraError, match="unknown SSD host stage"):
        ssd.CompiledSSD.from_parts(compiled.trunk, compiled.head, {"stage": {"op": "x"}})
