"""The ``subsample_strided_pointwise`` pass: strided 1x1 convs read a 1x1 max-pool subsample.

A small ResNet-v1-like block: a 3x3 conv + ReLU (so the shared tensor is not a graph input),
two 1x1 stride-2 convs reading it whose outputs are added, a global average pool. Compiled
for small custom configurations that force (or avoid) several chains per conv and an input
slice that does (not) fit the activation buffer, then simulated: the instruction simulator
and the reference executor must agree bit for bit and stay close to onnxruntime.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from test_ops import COS_NET, TOL_NET, Net, accuracy, random_input, run_ort

from tessera.compiler import driver, passes
from tessera.compiler.driver import compile_model
from tessera.compiler.ir import Graph, Node
from tessera.config import NPUConfig, get_config
from tessera.sim.run import run_program

C, HW, COUT = 64, 16, 192
BASE = get_config("ulx3s-85f")  # N = 16
#: 36 tiles per half: the 3x3 conv over 64 channels needs 9 * 4 per output block, a 1x1
#: conv 4, so a 1x1 conv to 192 channels (12 blocks) runs in 2 chains of 9 blocks. 512
#: activation-buffer entries: the 16x16x4-block tensor (1024) does not fit, its 8x8
#: subsample (256) does, and the 3x3 conv's and the global pool's rows still do.
SMALL = dataclasses.replace(
    BASE, name="test-small-buffers", tile_buffer_tiles=36, act_buffer_bytes=512 * 17
)
#: Each 1x1 conv in one chain, and the shared tensor fits the activation buffer.
ROOMY = dataclasses.replace(BASE, name="test-roomy", tile_buffer_tiles=512)


def block(
    kinds: tuple[tuple[int, int, int], ...] = ((1, 2, 0), (1, 2, 0)), cout: int = COUT
) -> onnx.ModelProto:
    """conv3x3+relu -> t; one conv (kernel, stride, pad) per ``kinds`` on t; sum; GAP."""
    net = Net(3)
    t = net.op("Relu", [net.conv("x", C, C, k=3)])
    ys = [net.conv(t, C, cout, k=k, stride=s, pads=[p] * 4) for k, s, p in kinds]
    y = ys[0]
    for other in ys[1:]:
        y = net.op("Add", [y, other])
    y = net.op("GlobalAveragePool", [y], out="y")
    return net.model({"x": [1, C, HW, HW]}, [y])


def subsample_nodes(g: Graph) -> list[Node]:
    return [n for n in g.nodes if n.op == "pool" and n.attrs["kernel"] == (1, 1)]


def pass_log(g: Graph) -> str:
    (line,) = [x for x in g.log if x.startswith("subsample_strided_pointwise:")]
    return line


def strided_convs(g: Graph) -> list[Node]:
    """The convs after the first (3x3, stride 1) one, before the global pool."""
    return [n for n in g.nodes if n.op == "conv"][1:]


def run_checked(model: onnx.ModelProto, cfg: NPUConfig) -> dict[str, np.ndarray]:
    """Compile for ``cfg``; simulator == reference (all of DRAM); close to onnxruntime."""
    prog, _, _ = compile_model(model, cfg)
    feeds = {"x": random_input([1, C, HW, HW])}
    sim = run_program(prog, feeds, "sim")
    ref = run_program(prog, feeds, "reference")
    assert np.array_equal(sim.mem, ref.mem), "simulator DRAM != reference DRAM"
    assert np.array_equal(sim.outputs["y"], ref.outputs["y"])
    want = run_ort(model, feeds)["y"]
    err, cos = accuracy(sim.outputs["y"], want)
    assert err <= TOL_NET and cos >= COS_NET, (err, cos)
    return sim.outputs["y"]


def test_shared_subsample_when_the_convs_reread_their_input(monkeypatch) -> None:
    model = block()
    _, g, low = compile_model(model, SMALL)
    line = pass_log(g)
    assert line.startswith(
        "subsample_strided_pointwise: 1 inputs subsampled for 2 strided 1x1 convs"
    ), line
    (pool,) = subsample_nodes(g)
    assert pool.attrs == {
        "kind": "max",
        "kernel": (1, 1),
        "stride": (2, 2),
        "pads": (0, 0, 0, 0),
        "count_include_pad": False,
        "pad_semantics": "onnx",
    }
    assert g.shape(pool.outputs[0]) == (C, HW // 2, HW // 2)
    assert g.producer(pool.inputs[0]).attrs["kernel"] == (3, 3)
    convs = strided_convs(g)
    assert len(convs) == 2
    for conv in convs:
        assert conv.attrs["stride"] == (1, 1)
        assert conv.inputs[0] == pool.outputs[0]
        assert conv.source in pool.source
    assert g.nodes.index(pool) < min(g.nodes.index(c) for c in convs)
    # The pass's chain estimate is what lowering emits: 2 chains per conv, so without the
    # subsample the 16x16 input (too big for the activation buffer) is read 4 times.
    chains = {L["name"]: L["chains"] for L in low.layers}
    assert [chains[c.name] for c in convs] == [2, 2]
    assert chains[pool.name] == 1
    assert "4 reads -> 1 + 1 of 1/4" in line

    ours = run_checked(model, SMALL)
    # Same values as the program without the pass, up to the MFU's rounding.
    monkeypatch.setattr(driver.passes, "subsample_strided_pointwise", lambda g, cfg: None)
    prog_old, g_old, _ = compile_model(model, SMALL)
    assert not subsample_nodes(g_old)
    old = run_program(prog_old, {"x": random_input([1, C, HW, HW])}).outputs["y"]
    err, cos = accuracy(ours, old)
    assert err <= 0.01 and cos >= 0.9999, (err, cos)


def test_nothing_when_each_conv_runs_in_one_chain() -> None:
    """One chain per conv and the input stays resident between them: no saving."""
    model = block()
    _, g, low = compile_model(model, ROOMY)
    assert pass_log(g) == "subsample_strided_pointwise: none; 2 left alone (no DRAM saving)"
    assert not subsample_nodes(g)
    convs = strided_convs(g)
    assert [c.attrs["stride"] for c in convs] == [(2, 2), (2, 2)]
    chains = {L["name"]: L["chains"] for L in low.layers}
    assert [chains[c.name] for c in convs] == [1, 1]
    run_checked(model, ROOMY)


@pytest.mark.parametrize(
    ("cout", "applied"),
    [
        (COUT, True),  # 2 chains, the input does not fit: 2 reads vs 1 + 1/4 + 1/4
        (128, False),  # 1 chain: 1 read vs 1 + 1/4 + 1/4
    ],
)
def test_single_conv_needs_two_chains(cout: int, applied: bool) -> None:
    _, g, _ = compile_model(block(((1, 2, 0),), cout=cout), SMALL)
    assert bool(subsample_nodes(g)) is applied, pass_log(g)
    (conv,) = strided_convs(g)
    assert conv.attrs["stride"] == ((1, 1) if applied else (2, 2))


@pytest.mark.parametrize(
    "kinds",
    [
        ((1, 2, 1), (1, 2, 1)),  # 1x1 stride 2 with padding
        ((3, 2, 1), (3, 2, 1)),  # 3x3 stride 2
    ],
    ids=["padded-1x1", "3x3"],
)
def test_padded_or_wider_strided_convs_are_left_alone(kinds) -> None:
    model = block(kinds)
    _, g, _ = compile_model(model, SMALL)
    assert pass_log(g) == "subsample_strided_pointwise: none"
    assert not subsample_nodes(g)
    assert all(c.attrs["stride"] == (2, 2) for c in strided_convs(g))


def test_only_the_pointwise_conv_of_a_mixed_pair() -> None:
    """A 3x3 stride-2 conv keeps reading the tensor itself; the 1x1 one reads the subsample."""
    model = block(((3, 2, 1), (1, 2, 0)))
    _, g, _ = compile_model(model, SMALL)
    (pool,) = subsample_nodes(g)
    wide, point = sorted(strided_convs(g), key=lambda c: c.attrs["kernel"], reverse=True)
    assert wide.attrs["stride"] == (2, 2) and wide.inputs[0] == pool.inputs[0]
    assert point.attrs["stride"] == (1, 1) and point.inputs[0] == pool.outputs[0]
    run_checked(model, SMALL)


def test_graph_input_and_dilation_are_left_alone() -> None:
    net = Net(4)
    a = net.conv("x", C, COUT, k=1, stride=2, pads=[0] * 4)
    b = net.conv("x", C, COUT, k=1, stride=2, pads=[0] * 4)
    t = net.op("Relu", [net.op("Add", [a, b])])
    y = net.conv(t, COUT, C, k=1, stride=2, pads=[0] * 4, dilation=2)
    model = net.model({"x": [1, C, HW, HW]}, [y])
    g = driver.build_graph(model)
    passes.subsample_strided_pointwise(g, SMALL)
    assert g.log[-1] == "subsample_strided_pointwise: none"
    assert not subsample_nodes(g)
    assert all(n.attrs["stride"] == (2, 2) for n in g.nodes if n.op == "conv")
