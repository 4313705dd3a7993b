"""Whole zoo networks: compiled, simulated and checked against the reference and onnxruntime.

For each network the program is compiled with two outputs, the last feature tensor (the
global-pool output, or for VGG-16 the input of the classifier, fc7) and the softmax, and run
on a seeded random input at the scale of preprocessed pixels (``zoo.INPUT_STD``):

1. the instruction simulator and the numpy reference executor leave the same DRAM image,
   byte for byte (every resident activation, exponent and output), also for a second
   input, which the simulator runs by the first run's trace;
2. the feature tensor has cosine similarity >= 0.99 to onnxruntime's FP32 result.

ResNet-152 (63 MiB) and VGG-16 (148 MiB) do not fit the ULX3S-85F's 32 MiB: they run on the
``large`` preset, and compiling them for the board fails with the sizes in the message.
ResNet-50 and DenseNet-121 take ~1 min each (export, compile, two runs); the other two take
2-4 min and export VGG-16 with a 9-11 GB peak, so they are marked slow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tessera import zoo
from tessera.compiler.driver import compile_model, cut_outputs
from tessera.config import get_config
from tessera.errors import CapacityError
from tessera.runtime.host import prepare_dram
from tessera.sim.executor import Simulator
from tessera.sim.run import run_program

#: The issue's bar for the last feature tensor against FP32.
MIN_FEATURE_COSINE = 0.99


@dataclass(frozen=True)
class Case:
    name: str
    config: str


CASES = [
    pytest.param(Case("resnet50", "ulx3s-85f"), id="resnet50"),
    pytest.param(Case("densenet121", "ulx3s-85f"), id="densenet121"),
    pytest.param(Case("resnet152", "large"), id="resnet152", marks=pytest.mark.slow),
    pytest.param(Case("vgg16", "large"), id="vgg16", marks=pytest.mark.slow),
]


def feature_tensor(model: onnx.ModelProto) -> str:
    """The last feature tensor: the global-pool output, else the classifier's input."""
    pools = [n.output[0] for n in model.graph.node if n.op_type == "GlobalAveragePool"]
    if pools:
        return pools[-1]
    fcs = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    return fcs[-1].input[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def onnxruntime_outputs(
    model: onnx.ModelProto, names: list[str], x: np.ndarray
) -> dict[str, np.ndarray]:
    # Graph optimisations off: ORT's Pad+MaxPool fusion mis-pads (see tests/test_ops.py).
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        cut_outputs(model, names).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return dict(zip(names, session.run(names, {zoo.INPUT_NAME: x}), strict=True))


@pytest.mark.parametrize("case", CASES)
def test_network_bit_exact_and_close_to_fp32(case: Case) -> None:
    model = onnx.load(zoo.cached_export(case.name, seed=0))
    feature = feature_tensor(model)
    (prediction,) = zoo.output_names(case.name)
    names = [feature, prediction]
    prog, _, _ = compile_model(model, get_config(case.config), outputs=names)
    x = zoo.sample_input(seed=7)

    sim = run_program(prog, {zoo.INPUT_NAME: x}, "sim")
    ref = run_program(prog, {zoo.INPUT_NAME: x}, "reference")
    assert np.array_equal(sim.mem, ref.mem), "simulator DRAM image != reference DRAM image"
    for name in names:
        assert np.array_equal(sim.outputs[name], ref.outputs[name]), name
    # A second input follows the first run's trace (Simulator.replayed): bit-exact too.
    x2 = zoo.sample_input(seed=8)
    mem, origin = prepare_dram(prog, {zoo.INPUT_NAME: x2})
    replay = Simulator(prog.config, mem, origin)
    replay.run(prog.instructions)
    assert replay.replayed
    assert np.array_equal(mem, run_program(prog, {zoo.INPUT_NAME: x2}, "reference").mem)

    expected = onnxruntime_outputs(model, names, x)
    assert sim.outputs[feature].shape == expected[feature].shape
    cos = cosine(sim.outputs[feature], expected[feature])
    print(f"{case.name}: feature {feature} cosine {cos:.6f}")
    assert cos >= MIN_FEATURE_COSINE, f"{case.name}: feature cosine {cos:.5f}"
    assert sim.outputs[prediction].shape == expected[prediction].shape


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet152", "vgg16"])
def test_network_too_big_for_the_board_says_by_how_much(name: str) -> None:
    with pytest.raises(CapacityError) as exc:
        compile_model(zoo.cached_export(name, seed=0), get_config("ulx3s-85f"))
    msg = str(exc.value)
    m = re.search(
        r"needs ([\d.]+) MiB of DRAM \(([\d.]+) MiB of weights .* ulx3s-85f has 32.0 MiB: "
        r"over by ([\d.]+) MiB",
        msg,
    )
    assert m, msg
    need, weights, over = (float(v) for v in m.groups())
    assert weights > 32.0 and over == pytest.approx(need - 32.0, abs=0.11)
