"""The model zoo: exported ONNX interface, fidelity to Keras, seeding, weights loading, errors.

Exports go through :func:`tessera.zoo.cached_export`, so they land in the shared build cache
(``$TESSERA_BUILD_DIR/zoo``) and the compiler and simulator tests reuse them; a warm cache
makes this file take ~30 s; a cold one adds ~25 s for each of its three ResNet-50 exports.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tessera import zoo
from tessera.errors import TesseraError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tf2onnx") is None,
    reason="the model zoo needs TensorFlow and tf2onnx (pip install .[zoo])",
)

# Largest |onnxruntime - Keras| allowed, relative to the largest Keras output. Both run the
# same float32 network (tf2onnx folds BatchNorm into the convolutions, so the rounding
# differs); with the zoo's init the models are well conditioned and differ by ~5e-6.
REL_TOL = 1e-4


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def _check_against_keras(name: str, path: Path) -> None:
    """Interface checks, then onnxruntime vs ``model.predict`` on a seeded random image."""
    model = onnx.load(path)
    (graph_input,) = model.graph.input
    assert graph_input.name == zoo.INPUT_NAME == "input"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 224, 224, 3]
    assert tuple(o.name for o in model.graph.output) == zoo.output_names(name)
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == zoo.OPSET

    keras_model = zoo.build_keras_model(name, seed=0)
    assert keras_model.count_params() == zoo.MODELS[name].params  # what `zoo list` prints
    x = np.random.default_rng(1234).standard_normal(zoo.INPUT_SHAPE, dtype=np.float32)
    expected = keras_model.predict(x, verbose=0)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {zoo.INPUT_NAME: x}
    )
    assert got.shape == expected.shape == (1, 1000)
    np.testing.assert_allclose(got, expected, rtol=0, atol=REL_TOL * np.abs(expected).max())
    # The init must give a peaked softmax, otherwise the comparison above is vacuous.
    assert expected.max() > 3 / 1000


@pytest.fixture(scope="module")
def resnet50_seed0() -> Path:
    return zoo.cached_export("resnet50", seed=0)


@pytest.fixture(scope="module")
def resnet50_seed1() -> Path:
    return zoo.cached_export("resnet50", seed=1)


def test_resnet50_export_matches_keras(resnet50_seed0: Path) -> None:
    assert resnet50_seed0 == zoo.cache_path("resnet50", seed=0)
    assert resnet50_seed0.parent == zoo.build_dir() / "zoo"
    _check_against_keras("resnet50", resnet50_seed0)


def test_batchnorm_is_folded_and_biases_are_kept(resnet50_seed0: Path) -> None:
    """The graph shape the compiler expects: BN folded into the Conv weights and biases, the
    classifier a Gemm with its bias (a zero bias would be deleted by the converter), a single
    NHWC -> NCHW Transpose at the input."""
    nodes = onnx.load(resnet50_seed0).graph.node
    ops = [n.op_type for n in nodes]
    assert "BatchNormalization" not in ops and "Mul" not in ops
    assert ops.count("Conv") == 53 and all(len(n.input) == 3 for n in nodes if n.op_type == "Conv")
    assert ops.count("Transpose") == 1 and ops[0] == "Transpose"
    assert ops[-3:] == ["Squeeze", "Gemm", "Softmax"]


def test_seed_determines_the_weights(resnet50_seed0: Path, resnet50_seed1: Path) -> None:
    first = zoo.build_keras_model("resnet50", seed=1).get_weights()
    again = zoo.build_keras_model("resnet50", seed=1).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))

    seed0, seed1 = _initializers(resnet50_seed0), _initializers(resnet50_seed1)
    assert seed0.keys() == seed1.keys()
    large = [k for k, v in seed0.items() if v.size > 1000]
    assert len(large) > 50
    assert not any(np.array_equal(seed0[k], seed1[k]) for k in large)


def test_weights_file_replaces_the_seeded_init(tmp_path: Path, resnet50_seed1: Path) -> None:
    """Seed-1 weights saved to a file and exported over a seed-0 init give the seed-1 export:
    loading works, and equal weights convert to equal ONNX across processes."""
    weights = tmp_path / "resnet50-seed1.weights.h5"
    zoo.build_keras_model("resnet50", seed=1).save_weights(weights)
    loaded = zoo.cached_export("resnet50", seed=0, weights=weights)
    assert loaded != zoo.cache_path("resnet50", seed=0)
    expected = _initializers(resnet50_seed1)
    got = _initializers(loaded)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_unknown_model_name_lists_the_valid_ones(tmp_path: Path) -> None:
    for call in (
        lambda: zoo.cached_export("resnet51"),
        lambda: zoo.export_model("resnet51", tmp_path / "x.onnx"),
        lambda: zoo.build_keras_model("resnet51"),
    ):
        with pytest.raises(TesseraError, match="unknown zoo model 'resnet51'") as exc:
            call()
        assert all(name in str(exc.value) for name in zoo.model_names())


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(TesseraError, match="weights file not found") as exc:
        zoo.cached_export("resnet50", weights=missing)
    assert str(missing) in str(exc.value)


def test_invalid_weights_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.weights.h5"
    bad.write_bytes(b"not an HDF5 file")
    with pytest.raises(TesseraError, match="cannot load weights for resnet50") as exc:
        zoo.export_model("resnet50", tmp_path / "out.onnx", weights=bad)
    assert str(bad) in str(exc.value)
    assert not (tmp_path / "out.onnx").exists()


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tessera")
    zoo.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_export_copies_the_cached_file(tmp_path: Path, resnet50_seed0: Path) -> None:
    out = tmp_path / "r50.onnx"
    args = _cli(["zoo", "export", "resnet50", "-o", str(out)])
    assert args.func(args) == 0
    assert out.read_bytes() == resnet50_seed0.read_bytes()

    args = _cli(["zoo", "export", "vgg17", "-o", str(out)])
    with pytest.raises(TesseraError, match="valid names: resnet50, resnet152"):
        args.func(args)


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    args = _cli(["zoo", "list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for line, model in zip(out.splitlines()[1:], zoo.MODELS.values(), strict=True):
        assert line.split()[:3] == [model.name, model.keras_class, f"{model.params:,}"]
        assert "x".join(map(str, model.input_shape)) in line  # 1x224x224x3, SSD 1x300x300x3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "resnet152", "densenet121"])
def test_large_export_matches_keras(name: str) -> None:
    """VGG-16's 138 M parameters (553 MB) export in ~80 s with an 11.4 GB peak in the child
    process; ResNet-152 takes ~55 s (5.8 GB), DenseNet-121 ~30 s (2.1 GB)."""
    _check_against_keras(name, zoo.cached_export(name, seed=0))
