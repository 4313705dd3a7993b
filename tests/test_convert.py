"""``tessera convert``: Keras and SavedModel to ONNX, cut at named tensors, and its errors.

A small residual CNN (conv, conv, add, relu, global pool, softmax) is saved as ``.keras``,
``.h5`` and a SavedModel (``model.export``). Every cut is checked against the Keras
sub-model between the same layers, in onnxruntime, to 1e-4.

Only the CLI test goes through the child process (``tessera convert`` as a user runs it),
because on this 2-core machine each child spends 5-15 s importing TensorFlow; the other
cases run the child's body (:func:`tessera.convert._convert_child`) in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tessera import cli, zoo
from tessera.convert import _convert_child, convert, list_names
from tessera.errors import TesseraError

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("tensorflow") is None
        or importlib.util.find_spec("tf2onnx") is None,
        reason="conversion needs TensorFlow and tf2onnx (pip install .[zoo])",
    ),
    # Keras' own model.save calls np.array on TF tensors the numpy-1 way (Keras 3.15).
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

TOLERANCE = 1e-4
# Tensors of the SavedModel's frozen signature graph (Keras names its call "tiny_1").
SM_CONV1 = "StatefulPartitionedCall/tiny_1/conv1_1/Relu"
SM_CONV2 = "StatefulPartitionedCall/tiny_1/conv2_1/BiasAdd"
SM_POOL = "StatefulPartitionedCall/tiny_1/pool_1/Mean"


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


@pytest.fixture(scope="module")
def model(keras):
    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(image)
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    y = keras.layers.Add(name="add")([x, y])
    y = keras.layers.Activation("relu", name="relu2")(y)
    y = keras.layers.GlobalAveragePooling2D(name="pool")(y)
    out = keras.layers.Dense(10, activation="softmax", name="predictions")(y)
    return keras.Model(image, out, name="tiny")


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = {"keras": folder / "tiny.keras", "h5": folder / "tiny.h5", "sm": folder / "tiny_sm"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    model.export(paths["sm"], verbose=False)
    return paths


def _convert_in_process(
    source: Path, out: Path, inputs: list[str] = (), outputs: list[str] = ()
) -> Path:
    kind = "saved_model" if source.is_dir() else "keras"
    args = [kind, str(source), json.dumps(list(inputs)), json.dumps(list(outputs)), ""]
    _convert_child(out, args)
    return out


def _run(path: Path, feeds: dict[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.name for o in session.get_outputs()], session.run(None, feeds)


def _random(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(7).standard_normal(shape, dtype=np.float32)


# ------------------------------------------------------------------ conversions
def test_keras_cut_at_inner_layers_via_cli(keras, model, saved, tmp_path, capsys) -> None:
    out = tmp_path / "cut.onnx"
    argv = ["convert", str(saved["keras"]), "-o", str(out), "--inputs", "conv1"]
    assert cli.main([*argv, "--outputs", "pool"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("conv1", [1, 16, 16, 8])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("pool", [1, 8])]
    x = _random((1, 16, 16, 8))
    sub_model = keras.Model(model.get_layer("conv1").output, model.get_layer("pool").output)
    (got,) = session.run(None, {"conv1": x})
    np.testing.assert_allclose(got, sub_model(x), rtol=0, atol=TOLERANCE)


def test_saved_model_cut_at_inner_tensors(keras, model, saved, tmp_path) -> None:
    """Cut inputs become placeholders; outputs may mix tensor names and signature keys."""
    out = _convert_in_process(saved["sm"], tmp_path / "sm.onnx", [SM_CONV1], [SM_POOL, "output_0"])
    x = _random((1, 16, 16, 8))
    names, (pool, probs) = _run(out, {SM_CONV1: x})
    assert names == [SM_POOL, "output_0"]
    sub_model = keras.Model(
        model.get_layer("conv1").output, [model.get_layer("pool").output, model.output]
    )
    want_pool, want_probs = sub_model(x)
    np.testing.assert_allclose(pool, want_pool, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(probs, want_probs, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("source", ["h5", "sm"])
def test_whole_model_by_default(model, saved, tmp_path, source: str) -> None:
    """Without --inputs/--outputs: the model's own interface, batch fixed to 1."""
    out = _convert_in_process(saved[source], tmp_path / "whole.onnx")
    x = _random((1, 16, 16, 3))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert (graph_input.name, graph_input.shape) == ("image", [1, 16, 16, 3])
    want_output = "predictions" if source == "h5" else "output_0"  # layer name / signature key
    assert [o.name for o in session.get_outputs()] == [want_output]
    (got,) = session.run(None, {"image": x})
    np.testing.assert_allclose(got, model(x), rtol=0, atol=TOLERANCE)


def test_sequential_model_cut(keras, tmp_path) -> None:
    """Sequential layers are called twice when Keras builds them; cutting still works."""
    keras.utils.set_random_seed(1)
    seq = keras.Sequential(
        [
            keras.Input((12,), name="features"),
            keras.layers.Dense(6, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    path = tmp_path / "seq.keras"
    seq.save(path)
    x = _random((1, 6))
    out = _convert_in_process(path, tmp_path / "seq.onnx", ["hidden"], ["logits"])
    names, (got,) = _run(out, {"hidden": x})
    assert names == ["logits"]
    np.testing.assert_allclose(got, seq.get_layer("logits")(x), rtol=0, atol=TOLERANCE)
    whole = _convert_in_process(path, tmp_path / "seq-whole.onnx")
    features = _random((1, 12))
    names, (got,) = _run(whole, {"features": features})
    assert names == ["logits"]
    np.testing.assert_allclose(got, seq(features), rtol=0, atol=TOLERANCE)


# ------------------------------------------------------------------ wrong names
def test_wrong_keras_name_lists_layers_closest_first(saved, tmp_path) -> None:
    with pytest.raises(TesseraError) as info:
        _convert_in_process(saved["keras"], tmp_path / "x.onnx", ["conv1"], ["pol"])
    message = str(info.value)
    assert "no output layer named 'pol'; names that exist, closest first: pool, " in message
    for layer in ("image", "conv1", "conv2", "add", "relu2", "predictions"):
        assert layer in message


def test_wrong_saved_model_name_lists_tensors_closest_first(saved, tmp_path) -> None:
    """A short name is matched against the long graph paths that contain it."""
    with pytest.raises(TesseraError) as info:
        _convert_in_process(saved["sm"], tmp_path / "x.onnx", ["conv1_1/Relu"], [SM_POOL])
    message = str(info.value)
    assert (
        f"no input tensor named 'conv1_1/Relu'; names that exist, closest first: {SM_CONV1}, "
        in message
    )
    assert message.index(SM_CONV1) < message.index("image")
    assert "output_0" in message and SM_POOL in message


def test_same_tensor_under_two_names(saved, tmp_path) -> None:
    with pytest.raises(TesseraError, match=r"tensors \['image:0'\] are named more than once"):
        _convert_in_process(saved["sm"], tmp_path / "x.onnx", ["image", "image:0"], [SM_POOL])


def test_unknown_output_index(saved, tmp_path) -> None:
    with pytest.raises(TesseraError, match="no output tensor named 'add_x:3'"):
        _convert_in_process(saved["sm"], tmp_path / "x.onnx", [SM_CONV1], ["add_x:3"])


# ------------------------------------------------------------------ cuts that do not close
def test_keras_output_not_computable_from_inputs(saved, tmp_path) -> None:
    """pool needs conv1's output through the residual add, not only conv2's."""
    with pytest.raises(TesseraError, match=r"cannot cut the model from inputs \['conv2'\]"):
        _convert_in_process(saved["keras"], tmp_path / "x.onnx", ["conv2"], ["pool"])


def test_saved_model_output_depends_on_uncut_input(saved, tmp_path) -> None:
    with pytest.raises(TesseraError, match=r"also depend on \['image'\], which the inputs"):
        _convert_in_process(saved["sm"], tmp_path / "x.onnx", [SM_CONV2], [SM_POOL])


def test_saved_model_input_feeding_nothing(saved, tmp_path) -> None:
    with pytest.raises(TesseraError, match=r"inputs \['image'\] do not feed any of the outputs"):
        _convert_in_process(saved["sm"], tmp_path / "x.onnx", ["image", SM_CONV1], [SM_POOL])


def test_shared_layer_cannot_be_cut_at(keras, tmp_path) -> None:
    inputs = keras.Input((4,), name="x")
    shared = keras.layers.Dense(4, name="shared")
    path = tmp_path / "shared.keras"
    keras.Model(inputs, keras.layers.Dense(2, name="out")(shared(shared(inputs)))).save(path)
    with pytest.raises(TesseraError, match="layer 'shared' is called 2 times"):
        _convert_in_process(path, tmp_path / "x.onnx", ["shared"], ["out"])


# ------------------------------------------------------------------ listing
def test_list_names(saved) -> None:
    keras_lines = list_names(saved["keras"])
    assert "conv1  [?,16,16,8] float32" in keras_lines
    assert "image  [?,16,16,3] float32 (model input)" in keras_lines
    assert "predictions  [?,10] float32 (model output)" in keras_lines
    sm_lines = list_names(saved["sm"])
    assert "image  signature input = image:0" in sm_lines
    assert "output_0  signature output = Identity:0" in sm_lines
    assert f"{SM_CONV1}  Relu [?,16,16,8] float32" in sm_lines
    assert not any(line.startswith("Func/") or " Const " in line for line in sm_lines)


# ------------------------------------------------------------------ checked before the child
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.keras", "-o", "x.onnx"], "model not found"),
        (["{folder}", "-o", "x.onnx"], "folder without saved_model.pb"),
        (["{file}.txt", "-o", "x.onnx"], r"expected a Keras model file \(.keras, .h5, .hdf5\)"),
        (["{keras}"], "give -o MODEL.onnx"),
        (["{keras}", "-o", "x.onnx", "--signature", "serve"], "SavedModels only"),
        (["{keras}", "-o", "x.onnx", "--inputs", "a,a"], "input names given more than once: a"),
        (["{keras}", "-o", "x.onnx", "--outputs", "a,,b"], "empty output name"),
        (["{keras}", "-o", "x.onnx", "--inputs", "a", "--outputs", "a"], "both input and output"),
    ],
)
def test_bad_arguments_exit_2(saved, tmp_path, capsys, argv: list[str], message: str) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    fill = {"folder": str(tmp_path), "file": str(tmp_path / "notes"), "keras": str(saved["keras"])}
    assert cli.main(["convert", *(a.format(**fill) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera convert: error: ")
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err)


# ------------------------------------------------------------------ VGG-16 within memory
_BUILD_VGG16 = """
import sys
import numpy as np
import keras
from tessera import zoo

model = zoo.build_keras_model("vgg16", seed=0)
model.save(sys.argv[1])
x = np.random.default_rng(5).uniform(-128, 128, (1, 224, 224, 3)).astype(np.float32)
np.save(sys.argv[2], x)
np.save(sys.argv[3], keras.Model(model.input, model.get_layer("fc2").output).predict(x, verbose=0))
"""


@pytest.mark.slow
def test_vgg16_featurizer_cut_fits_in_memory(tmp_path) -> None:
    """VGG-16 (138 M parameters) saved as .keras, cut at fc2 (the seeds' fc7, 4096
    features) by ``tessera convert``'s child process: measured 105 s and a 9.1 GB peak in
    the child (2 min 16 s for the whole test).

    The model is built and saved in a throwaway process so this one never holds its
    weights, and the zoo's VGG-16 export lock is held throughout, so that under
    ``pytest -n 2`` a zoo export of VGG-16 (11.4 GB) never runs at the same time.
    """
    paths = [tmp_path / n for n in ("vgg16.keras", "x.npy", "fc2.npy")]
    with zoo._file_lock(zoo.cache_path("vgg16").with_suffix(".lock")):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        subprocess.run([sys.executable, "-c", _BUILD_VGG16, *map(str, paths)], check=True, env=env)
        out = convert(paths[0], tmp_path / "vgg16_fc2.onnx", outputs=["fc2"])
    x, want = np.load(paths[1]), np.load(paths[2])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("fc2", [1, 4096])]
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * np.abs(want).max())
