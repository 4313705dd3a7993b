"""Bad input gets a clear error: the specific exception, a message that says what was wrong,
where, and what is accepted; through the CLI, exit status 2 and one line on stderr."""

from __future__ import annotations

import dataclasses
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tessera import cli
from tessera.compiler.driver import compile_model
from tessera.compiler.onnx_import import SUPPORTED_OPS, load_model
from tessera.config import get_config
from tessera.errors import (
    CapacityError,
    ModelLoadError,
    ProgramFormatError,
    TesseraError,
    UnsupportedModelError,
)
from tessera.program import FORMAT_VERSION, MAGIC, Program
from tessera.sim.run import run_program

CFG = get_config("ulx3s-85f")
MIB = 2**20


# --------------------------------------------------------------------------- helpers
def make_model(
    nodes: list[onnx.NodeProto],
    x_shape: list[int],
    outputs: list[str],
    weights: dict[str, np.ndarray],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def conv_node(name: str, x: str, w: str, y: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], name=name, pads=[1, 1, 1, 1], **attrs)


def weight(cout: int, cin: int, k: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((cout, cin, k, k)) * 0.1).astype(np.float32)


def small_model() -> onnx.ModelProto:
    """conv 3x3 (16 -> 16) + relu: a valid model to damage or feed bad inputs."""
    nodes = [conv_node("conv", "x", "w", "c"), helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [1, 16, 8, 8], ["y"], {"w": weight(16, 16)})


def cli_fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in-process; assert exit status 2 and one clean line on stderr."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tessera {argv[0]}: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def program_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prog") / "p.tsr"
    compile_model(small_model(), CFG)[0].save(path)
    return path


# --------------------------------------------------------------------------- model files
def test_truncated_onnx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = small_model().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=re.escape(str(path))) as exc:
        compile_model(path, CFG)
    assert "truncated" in str(exc.value)
    line = cli_fails(["compile", str(path), "-o", str(tmp_path / "p.tsr")], capsys)
    assert str(path) in line


def test_missing_onnx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError, match=re.escape(f"{path}: no such file")):
        load_model(path)
    cli_fails(["compile", str(path), "-o", str(tmp_path / "p.tsr")], capsys)


@pytest.mark.parametrize(
    "content",
    [b"this is not an ONNX model\n", b"\x89PNG\r\n\x1a\n" + bytes(100), b""],
    ids=["text", "png", "empty"],
)
def test_not_an_onnx_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        compile_model(path, CFG)


# --------------------------------------------------------------------------- unsupported graphs
def test_unsupported_op_sin(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    nodes = [conv_node("conv", "x", "w", "c"), helper.make_node("Sin", ["c"], ["y"], name="wave")]
    model = make_model(nodes, [1, 16, 8, 8], ["y"], {"w": weight(16, 16)})
    with pytest.raises(UnsupportedModelError) as exc:
        compile_model(model, CFG)
    msg = str(exc.value)
    assert "'wave'" in msg and "'Sin'" in msg
    assert "supported operators: " + ", ".join(SUPPORTED_OPS) in msg
    onnx.save(model, tmp_path / "sin.onnx")
    line = cli_fails(["compile", str(tmp_path / "sin.onnx"), "-o", str(tmp_path / "p.tsr")], capsys)
    assert "'wave'" in line and "Conv" in line


def test_unsupported_op_lstm() -> None:
    """A recurrent layer on a conv feature map (as in a CRNN text recognizer)."""
    r = np.random.default_rng(0)
    nodes = [
        conv_node("conv", "x", "w", "c"),
        helper.make_node("Reshape", ["c", "shape"], ["seq"], name="to_seq"),
        helper.make_node("LSTM", ["seq", "W", "R"], ["y"], name="rnn", hidden_size=8),
    ]
    weights = {
        "w": weight(16, 16),
        "shape": np.array([1, 16, 64], dtype=np.int64),
        "W": r.standard_normal((1, 32, 64)).astype(np.float32),
        "R": r.standard_normal((1, 32, 8)).astype(np.float32),
    }
    model = make_model(nodes, [1, 16, 8, 8], ["y"], weights)
    with pytest.raises(UnsupportedModelError) as exc:
        compile_model(model, CFG)
    msg = str(exc.value)
    # The reshape to a sequence is refused first, naming the node and what is supported.
    assert "'to_seq'" in msg and "Reshape" in msg and "only flatten" in msg
    # Without it, the LSTM itself is named.
    del model.graph.node[1]
    model.graph.node[1].input[0] = "c"
    with pytest.raises(
        UnsupportedModelError,
        match=r"'rnn' \(LSTM\): operator 'LSTM' is not "
        r"supported; supported operators: Conv, Gemm",
    ):
        compile_model(model, CFG)


def test_unsupported_conv_group() -> None:
    nodes = [conv_node("grouped", "x", "w", "y", group=2)]
    model = make_model(nodes, [1, 16, 8, 8], ["y"], {"w": weight(16, 8)})
    with pytest.raises(UnsupportedModelError) as exc:
        compile_model(model, CFG)
    msg = str(exc.value)
    assert "'grouped'" in msg and "'group'=2" in msg and "only group=1" in msg


@pytest.mark.parametrize(
    ("node", "words"),
    [
        (
            helper.make_node(
                "MaxPool", ["x"], ["y"], name="mp", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            ),
            ["'mp'", "MaxPool", "after a ReLU"],
        ),
        (
            helper.make_node(
                "AveragePool", ["x"], ["y"], name="ap", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            ),
            ["'ap'", "count_include_pad=0", "supported"],
        ),
        (
            helper.make_node("MaxPool", ["x"], ["y"], name="mp", kernel_shape=[2, 2], ceil_mode=1),
            ["'mp'", "ceil_mode"],
        ),
        (helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=2), ["'sm'", "'axis'=2"]),
    ],
)
def test_unsupported_attribute_values(node: onnx.NodeProto, words: list[str]) -> None:
    model = make_model([node], [1, 16, 8, 8], ["y"], {})
    with pytest.raises(UnsupportedModelError) as exc:
        compile_model(model, CFG)
    for w in words:
        assert w in str(exc.value)


def test_unsupported_input_rank() -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="r")
    with pytest.raises(UnsupportedModelError, match=r"graph input 'x' has shape \[1, 64\]"):
        compile_model(make_model([node], [1, 64], ["y"], {}), CFG)


# --------------------------------------------------------------------------- capacity
def _over_by(msg: str, cfg_mib: float) -> None:
    """The message states what is needed, what the board has and by how much it is over."""
    m = re.search(r"needs ([\d.]+) MiB .* has ([\d.]+) MiB: over by ([\d.]+) MiB", msg)
    assert m, msg
    need, have, over = (float(g) for g in m.groups())
    assert have == cfg_mib
    assert need > have and over == pytest.approx(need - have, abs=0.11)


def test_activations_too_big_for_dram() -> None:
    """A 64-channel 3x3 conv on a megapixel image: 64 MiB of activations, cheap to compile."""
    nodes = [
        conv_node("conv1", "x", "w1", "c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        conv_node("conv2", "r1", "w2", "y"),
    ]
    weights = {"w1": weight(64, 3), "w2": weight(16, 64)}
    model = make_model(nodes, [1, 3, 1024, 1024], ["y"], weights)
    with pytest.raises(CapacityError) as exc:
        compile_model(model, CFG)
    msg = str(exc.value)
    _over_by(msg, 32.0)
    assert "ulx3s-85f" in msg and "of activations at peak" in msg


def _fc_model(k_shape: list[int], out: int) -> onnx.ModelProto:
    """Flatten + Gemm with all-zero weights but one per row: the size is what matters."""
    k = int(np.prod(k_shape))
    w = np.zeros((k, out), dtype=np.float32)
    w[np.arange(out) % k, np.arange(out)] = 1.0
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w"], ["y"], name="fc"),
    ]
    return make_model(nodes, k_shape, ["y"], {"w": w})


def test_weights_too_big_for_dram() -> None:
    """The weight accounting on a board with 4 MiB of DRAM, where 4.2 M weights overflow
    it (the same model scaled to the real 32 MiB costs 10 s and 2 GB to quantize; it runs
    as the slow test below)."""
    small = dataclasses.replace(CFG, name="ulx3s-85f-4mib", dram_bytes=4 * MIB)
    with pytest.raises(CapacityError) as exc:
        compile_model(_fc_model([1, 32, 8, 8], 2048), small)
    msg = str(exc.value)
    _over_by(msg, 4.0)
    m = re.search(r"\(([\d.]+) MiB of weights and constants at 8-bit mantissas", msg)
    assert m and float(m.group(1)) > 4.0, msg


@pytest.mark.slow
def test_weights_too_big_for_the_real_board() -> None:
    """A 6144 x 6000 fully connected layer: 36.9 M weights, 37 MiB of 8-bit tiles
    (quantizing them takes 10 s and 2 GB)."""
    with pytest.raises(CapacityError) as exc:
        compile_model(_fc_model([1, 32, 12, 16], 6000), CFG)
    _over_by(str(exc.value), 32.0)


def test_tile_buffer_too_small() -> None:
    """One output block of a 3x3 conv over 1024 channels needs 576 tiles; a half holds 384."""
    nodes = [conv_node("wide", "x", "w", "y")]
    model = make_model(nodes, [1, 1024, 4, 4], ["y"], {"w": weight(16, 1024)})
    expected = (
        r"'wide' \(Conv\): one output block needs 576 weight tiles; .* holds 384 per half "
        r"\(short by 192 tiles\)"
    )
    with pytest.raises(CapacityError, match=expected):
        compile_model(model, CFG)


# --------------------------------------------------------------------------- program files
def _damaged(program_file: Path, tmp_path: Path, how: str) -> Path:
    data = bytearray(program_file.read_bytes())
    if how == "flipped byte":
        data[len(data) // 2] ^= 0x5A
    elif how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "wrong version":
        struct.pack_into("<I", data, len(MAGIC), FORMAT_VERSION + 1)
    elif how == "not a program":
        data = bytearray(b"hello world\n")
    path = tmp_path / f"{how.replace(' ', '_')}.tsr"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("flipped byte", "sha256 mismatch"),
        ("truncated", "truncated"),
        ("wrong version", f"version {FORMAT_VERSION + 1} is not supported"),
        ("not a program", "not a tessera program"),
    ],
)
def test_damaged_program_file(
    program_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    how: str,
    words: str,
) -> None:
    path = _damaged(program_file, tmp_path, how)
    with pytest.raises(ProgramFormatError, match=re.escape(words)):
        Program.load(path)
    np.save(tmp_path / "x.npy", np.zeros((1, 16, 8, 8), np.float32))
    argv = ["run", str(path), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y")]
    line = cli_fails(argv, capsys)
    assert str(path) in line and words in line
    assert not (tmp_path / "y.npz").exists()


def test_damaged_program_via_subprocess(program_file: Path, tmp_path: Path) -> None:
    """The installed entry point, as a user runs it: status 2, one line, no traceback."""
    path = _damaged(program_file, tmp_path, "flipped byte")
    np.save(tmp_path / "x.npy", np.zeros((1, 16, 8, 8), np.float32))
    argv = ["run", str(path), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y")]
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"tessera run: error: {re.escape(str(path))}: corrupted: .*sha256 mismatch", line
    )


def test_report_on_damaged_program(
    program_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_fails(["report", str(_damaged(program_file, tmp_path, "truncated"))], capsys)


def test_missing_program_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ProgramFormatError, match="cannot read program"):
        Program.load(tmp_path / "none.tsr")
    cli_fails(["report", str(tmp_path / "none.tsr")], capsys)


# --------------------------------------------------------------------------- run inputs
@pytest.fixture(scope="module")
def program() -> Program:
    return compile_model(small_model(), CFG)[0]


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ({"x": np.zeros((1, 8, 8, 16), np.float32)}, "shape [1, 16, 8, 8], got [1, 8, 8, 16]"),
        ({"x": np.zeros((16, 8, 8), np.float32)}, "'x' must have shape [1, 16, 8, 8], got [16, 8"),
        ({"x": np.full((1, 16, 8, 8), np.nan, np.float32)}, "'x' contains NaN or Inf"),
        ({"x": np.full((1, 16, 8, 8), np.inf, np.float32)}, "'x' contains NaN or Inf"),
        ({"x": np.zeros((1, 16, 8, 8), np.int32)}, "'x' must be float32, got int32"),
        ({"input": np.zeros((1, 16, 8, 8), np.float32)}, "missing inputs ['x']"),
    ],
    ids=["nhwc-shape", "no-batch", "nan", "inf", "int", "wrong-name"],
)
@pytest.mark.parametrize("backend", ["sim", "reference"])
def test_bad_run_inputs(program: Program, inputs: dict, words: str, backend: str) -> None:
    with pytest.raises(TesseraError, match=re.escape(words)):
        run_program(program, inputs, backend)


def test_unknown_backend(program: Program) -> None:
    with pytest.raises(TesseraError, match="unknown backend 'fpga'; available: sim, reference"):
        run_program(program, {"x": np.zeros((1, 16, 8, 8), np.float32)}, "fpga")


def test_bad_input_via_cli(
    program_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["run", str(program_file), "--output", str(tmp_path / "y.npz"), "--input"]
    bad = np.zeros((1, 16, 8, 8), np.float32)
    bad[0, 3, 2, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert "contains NaN or Inf" in cli_fails([*base, str(tmp_path / "nan.npy")], capsys)
    np.save(tmp_path / "small.npy", np.zeros((1, 16, 4, 4), np.float32))
    assert "must have shape" in cli_fails([*base, str(tmp_path / "small.npy")], capsys)
    (tmp_path / "x.txt").write_text("1 2 3\n")
    assert "not a .npy/.npz file" in cli_fails([*base, str(tmp_path / "x.txt")], capsys)
    assert "no such file" in cli_fails([*base, str(tmp_path / "none.npy")], capsys)
