"""End-to-end accuracy on a trained network: FP32 (onnxruntime) vs the NPU (bit-exact simulator).

The operator tests check layers against onnxruntime with error tolerances, and the zoo models
have random weights, so neither says whether BFP quantisation keeps a *trained* classifier
correct. This test does: a small CNN with the block types the compiler treats specially (a
residual block whose Add is fused into a conv epilogue, a DenseNet-style concat block placed
zero-copy, stride-2 conv, max/average/global pooling, a Dense softmax classifier) is trained
on scikit-learn's digits, which ship with scikit-learn (no download), exported with tf2onnx
exactly as a user would, compiled for the ULX3S-85F and run image by image through the
instruction simulator. The top-1 accuracy may drop by at most one point.

Training and export run in a child process (this file run as a script), like ``tessera.zoo``
does, so TensorFlow's start-up time and memory stay out of the pytest process. The ONNX file
is cached under ``$TESSERA_BUILD_DIR/digits`` (default ``build/digits``), keyed by a hash of
the recipe's source code and the toolchain versions, so reruns skip the ~30 s of training.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tessera.compiler.driver import compile_model
from tessera.config import get_config
from tessera.sim.run import run_program
from tessera.zoo import INPUT_NAME, OPSET, build_dir

# ----------------------------------------------------------------------------- the recipe
SEED = 0
SIZE = 32  # digits are 8x8; upsampled so that the network has a real spatial hierarchy
# Three channels, not one: with a single input channel tf2onnx replaces the NHWC -> NCHW
# boundary Transpose by a Reshape [1,32,32,1] -> [1,1,32,32], which the importer rejects
# (only flatten and vector reshapes are supported). Grey replicated to RGB is a common
# preprocessing step anyway.
CHANNELS = 3
TEST_FRACTION = 0.3
EPOCHS = 10
BATCH = 16
LEARNING_RATE = 3e-3
OUTPUT_NAME = "probs"
CONFIG = "ulx3s-85f"

# ----------------------------------------------------------------------------- the bounds
MAX_DROP = 0.01  # top-1 accuracy points lost by the NPU vs FP32
MIN_FP32 = 0.90  # a broken (e.g. untrained) model must not pass by dropping nothing
REFERENCE_IMAGES = 4  # images also run on the reference executor to compare bit for bit


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Linear interpolation ``[n_out, n_in]`` with half-pixel centres (``tf.image.resize``).

    A matrix rather than scipy/TensorFlow so that the parent process, which evaluates, can
    rebuild the exact test images without importing TensorFlow.
    """
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits upsampled to NHWC ``[N, SIZE, SIZE, CHANNELS]`` in [0, 1], split 70/30 stratified.

    Deterministic, so the child (training) and the parent (evaluation) agree on the split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    a = bilinear_matrix(digits.images.shape[1], SIZE)
    images = np.einsum("ij,njk,lk->nil", a, digits.images / 16.0, a).astype(np.float32)
    images = np.repeat(images[..., None], CHANNELS, axis=-1)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        digits.target,
        test_size=TEST_FRACTION,
        stratify=digits.target,
        random_state=SEED,
    )
    return x_train, y_train, x_test, y_test


def build_model():
    """Stem, residual block, stride-2 conv, two-layer dense block, transition, classifier.

    Channel counts are multiples of 16 (the ULX3S-85F native dimension) so every concat
    input fills whole channel blocks and the compiler can write the producers straight into
    the concat buffer. BatchNorm momentum is 0.9 rather than Keras' 0.99 because a few
    hundred steps are not enough for 0.99 moving statistics to forget their initial values,
    which makes the inference-mode model much worse than the training-mode one.
    """
    import keras
    from keras import layers

    def bn(x):
        return layers.BatchNormalization(momentum=0.9)(x)

    def conv(x, filters, kernel=3, strides=1):
        return layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)

    inp = keras.Input((SIZE, SIZE, CHANNELS), name=INPUT_NAME)
    x = layers.ReLU()(bn(conv(inp, 16)))
    x = layers.MaxPooling2D(2)(x)  # 16x16x16
    # Residual block: conv-BN-relu-conv-BN + identity shortcut, relu after the add.
    y = conv(layers.ReLU()(bn(conv(x, 16))), 16)
    x = layers.ReLU()(layers.Add()([x, bn(y)]))
    x = conv(x, 32, strides=2)  # 8x8x32
    # Dense block (pre-activation, DenseNet style): each layer's output joins its input.
    for _ in range(2):
        y = conv(layers.ReLU()(bn(x)), 16)
        x = layers.Concatenate()([x, y])  # 48, then 64 channels
    x = conv(layers.ReLU()(bn(x)), 32, kernel=1)  # transition
    x = layers.AveragePooling2D(2)(x)  # 4x4x32
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(10, activation="softmax", name=OUTPUT_NAME)(x)
    return keras.Model(inp, out)


def train_and_export(out_path: Path) -> None:
    """Train (seeded, deterministic ops) and export with tf2onnx at batch 1, opset 17."""
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    x_train, y_train, x_test, y_test = load_split()
    model = build_model()
    steps = EPOCHS * -(-len(x_train) // BATCH)
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps)
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=BATCH, epochs=EPOCHS, verbose=0)
    _, acc = model.evaluate(x_test, y_test, verbose=0)
    print(f"keras test accuracy {acc:.4f}", file=sys.stderr)
    # The compiler supports batch 1 only, so the exported input is fixed at [1, H, W, C].
    spec = (tf.TensorSpec((1, SIZE, SIZE, CHANNELS), tf.float32, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    out_path.write_bytes(proto.SerializeToString())


# ----------------------------------------------------------------------------- the cache
def _recipe_key() -> str:
    """Hash of everything the exported bytes depend on: recipe code, constants, toolchain."""
    parts = [
        inspect.getsource(f) for f in (bilinear_matrix, load_split, build_model, train_and_export)
    ]
    parts.append(
        repr(
            (
                SEED,
                SIZE,
                CHANNELS,
                TEST_FRACTION,
                EPOCHS,
                BATCH,
                LEARNING_RATE,
                OUTPUT_NAME,
                INPUT_NAME,
                OPSET,
            )
        )
    )
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "scikit-learn", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Let one pytest-xdist worker train while the others wait for its file."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_model() -> Path:
    """The trained ONNX file, training it in a child process first if it is not cached.

    The file appears atomically (written to a temporary name, then renamed), so an
    interrupted run never leaves a truncated model behind to be reused.
    """
    path = build_dir() / "digits" / f"digits-cnn-{_recipe_key()}.onnx"
    with _file_lock(path.with_suffix(".lock")):
        if path.is_file():
            return path
        for module in ("tensorflow", "tf2onnx"):
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{module} is needed to train the digits model (pip install .[zoo])")
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            tmp_onnx = Path(tmp) / path.name
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF2ONNX_CATCH_ERRORS="FALSE")
            proc = subprocess.run(
                [sys.executable, __file__, str(tmp_onnx)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0 or not tmp_onnx.is_file():
                pytest.fail(
                    f"training/exporting the digits model failed (status {proc.returncode}):\n"
                    + proc.stderr[-4000:]
                )
            os.replace(tmp_onnx, path)
    return path


# ----------------------------------------------------------------------------- the test
def test_digits_accuracy_drop() -> None:
    """Top-1 accuracy on the NPU is within one point of FP32 on the 540 held-out digits."""
    pytest.importorskip("sklearn")
    import onnxruntime as ort

    started = time.monotonic()
    model_path = cached_model()
    trained = time.monotonic()
    _, _, x_test, y_test = load_split()
    batches = [x[None] for x in x_test]

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    fp32 = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for x in batches])
    acc_fp32 = float(np.mean(fp32.argmax(axis=1) == y_test))

    prog, _, _ = compile_model(model_path, get_config(CONFIG))
    layers = prog.manifest["layers"]
    # The blocks under test must really run on the NPU the way they are meant to: the
    # shortcut fused into a conv, the concats placed zero-copy, only softmax on the host.
    assert any(layer.get("aux") for layer in layers), "residual add was not fused"
    assert sum(layer["op"] == "concat" for layer in layers) == 2
    assert [s["op"] for s in prog.manifest["host_stages"]] == ["softmax"]

    npu = np.concatenate(
        [run_program(prog, {INPUT_NAME: x}, "sim").outputs[OUTPUT_NAME] for x in batches]
    )
    acc_npu = float(np.mean(npu.argmax(axis=1) == y_test))
    simulated = time.monotonic()

    for i, x in enumerate(batches[:REFERENCE_IMAGES]):
        ref = run_program(prog, {INPUT_NAME: x}, "reference").outputs[OUTPUT_NAME]
        assert np.array_equal(ref, npu[i : i + 1]), f"image {i}: simulator != reference"

    flips = int(np.sum(fp32.argmax(axis=1) != npu.argmax(axis=1)))
    print(
        f"\ndigits: {len(y_test)} test images, FP32 top-1 {acc_fp32:.4f}, NPU ({CONFIG}) top-1 "
        f"{acc_npu:.4f}, drop {100 * (acc_fp32 - acc_npu):+.2f} points, {flips} predictions "
        f"changed, max |dp| {np.abs(fp32 - npu).max():.4f}; model {trained - started:.1f} s, "
        f"FP32 + compile + sim {simulated - trained:.1f} s"
    )
    assert acc_fp32 >= MIN_FP32, f"FP32 accuracy {acc_fp32:.4f}: the model did not train"
    assert acc_fp32 - acc_npu <= MAX_DROP, (
        f"NPU top-1 {acc_npu:.4f} vs FP32 {acc_fp32:.4f}: drop exceeds {100 * MAX_DROP} point"
    )


if __name__ == "__main__":
    # Child process of cached_model(): python tests/test_digits.py OUT.onnx
    train_and_export(Path(sys.argv[1]))
