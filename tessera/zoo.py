"""Model zoo: reproducible ONNX exports of the Keras ImageNet classifiers we benchmark,
and of SSD300-VGG16 (``ssd_vgg``, built in :mod:`tessera.ssd`), the seeds' detector.

The compiler and simulator need real network *topologies* (ResNet bottlenecks, DenseNet
concatenations, VGG's 400 MB fully connected layer), but this machine has no network, so
ImageNet weights cannot be downloaded. Each model is therefore the stock
``keras.applications`` definition with seeded random weights, which makes an export a pure
function of ``(name, seed, recipe)`` and lets every test and benchmark share one cached file
under ``build/zoo/``. A real weights file can be given instead of a seed.

Export runs in a child process (``python -m tessera.zoo``) for two reasons: TensorFlow's
memory is returned to the OS when the child exits, and the child can select the pure-Python
protobuf implementation before anything imports protobuf. With the default upb
implementation, tf2onnx's optimizer copies every constant into the node protos again on
each of its ~26 passes and upb arenas never free the old copies, so memory grows by one
copy of the weights per pass; its default error catching adds a deep copy of the graph per
pass on top (ResNet-50 converted in 6.7 GB that way, VGG-16 was OOM-killed on 24 GB). With
pure-Python protobuf the weight bytes are shared immutable ``bytes`` objects and the passes
cost no memory (ResNet-50: 2.4 GB). VGG-16 then peaks at 11.4 GB, in TensorFlow's own
variable freezing and grappler, which copy the 553 MB of weights several times.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from tessera.errors import TesseraError

if TYPE_CHECKING:
    import keras
    import numpy as np

# Bump whenever a change here alters the exported bytes (model init, BN calibration,
# converter options), so stale cache entries are never reused.
RECIPE_VERSION = "4"

INPUT_NAME = "input"
INPUT_SHAPE = (1, 224, 224, 3)  # NHWC float32, exactly as Keras defines the models
OPSET = 17

# Seeded Gaussian images for the data-dependent init: enough samples per channel for the
# BatchNorm statistics even at the 7x7 stages (4*49 = 196), and a cheap forward pass.
_CALIBRATION_BATCH = 4
#: Std of the calibration images: that of mean-subtracted 8-bit RGB pixels (the seeds'
#: preprocessing), so real preprocessed photos give logits of the intended spread rather than
#: a one-hot softmax. Tests feed seeded N(0, INPUT_STD) inputs for the same reason.
INPUT_STD = 64.0
# Keras ResNet names the BatchNorm ending each residual branch conv<S>_block<B>_3_bn.
_RESIDUAL_BRANCH_BN_SUFFIX = "_3_bn"
# Std of the classifier's logits on the calibration images: a peaked, not one-hot, softmax.
_LOGIT_STD = 2.0
# SSD's feature maps (tessera.ssd.SOURCES, repeated so `zoo list` needs no import of it).
_SSD_SOURCES = ("conv4_3", "fc7", "conv8_2", "conv9_2", "conv10_2", "conv11_2")


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One entry of the zoo.

    ``params`` is recorded here (and checked by the tests) so that ``tessera zoo list``
    does not need to import TensorFlow and build the network.
    """

    name: str
    keras_class: str  # attribute of ``keras.applications``
    params: int
    # tf2onnx's ``from_keras`` names each graph output after the Keras output layer, which
    # is the classifier ``Dense(1000, activation="softmax", name="predictions")`` for all
    # four applications; the output is the softmax probabilities, shape [1, 1000].
    output_names: tuple[str, ...] = ("predictions",)
    #: NHWC input shape of the exported graph.
    input_shape: tuple[int, ...] = INPUT_SHAPE
    #: For models that are not ``keras.applications``: the module whose
    #: ``build_keras_model()`` defines the network and ``initialize_weights(model, seed,
    #: images)`` seeds it (``keras_class`` is then only the name ``zoo list`` prints).
    module: str = ""
    #: Version of that module's recipe, part of the cache key (see ``RECIPE_VERSION``), so
    #: changing one model's init does not invalidate every other model's export.
    recipe: str = ""


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("resnet50", "ResNet50", 25_636_712),
        ZooModel("resnet152", "ResNet152", 60_419_944),
        ZooModel("densenet121", "DenseNet121", 8_062_504),
        ZooModel("vgg16", "VGG16", 138_357_544),
        # SSD300 on VGG-16 (tessera.ssd): 12 head outputs, 6 box + 6 class maps.
        ZooModel(
            "ssd_vgg",
            "SSD300",
            26_285_486,
            output_names=(
                *(f"loc_{s}" for s in _SSD_SOURCES),
                *(f"conf_{s}" for s in _SSD_SOURCES),
            ),
            input_shape=(1, 300, 300, 3),
            module="tessera.ssd",
            recipe="ssd2",
        ),
    )
}


def model_names() -> list[str]:
    """Names accepted by :func:`export_model` and ``tessera zoo export``."""
    return list(MODELS)


def get_model(name: str) -> ZooModel:
    """Look a model up, failing with the list of valid names (the usual user typo)."""
    try:
        return MODELS[name]
    except KeyError:
        raise TesseraError(
            f"unknown zoo model {name!r}; valid names: {', '.join(MODELS)}"
        ) from None


def output_names(name: str) -> tuple[str, ...]:
    """ONNX graph output names of an exported zoo model (tf2onnx keeps the Keras names)."""
    return get_model(name).output_names


def build_dir() -> pathlib.Path:
    """Root of generated artefacts: ``$TESSERA_BUILD_DIR``, else ``build/`` of the checkout.

    Outside a source checkout (installed package) it falls back to ``./build``.
    """
    env = os.environ.get("TESSERA_BUILD_DIR")
    if env:
        return pathlib.Path(env)
    repo = pathlib.Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / "build"
    return pathlib.Path.cwd() / "build"


def _checked_weights(weights: str | os.PathLike[str] | None) -> pathlib.Path | None:
    if weights is None:
        return None
    path = pathlib.Path(weights)
    if not path.is_file():
        raise TesseraError(f"weights file not found: {path}")
    return path


def _file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _toolchain_versions() -> str:
    """Versions of the packages that shape the exported graph, for the cache key."""
    found = []
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{dist}={importlib.metadata.version(dist)}")
    return ",".join(found)


def cache_path(
    name: str, seed: int = 0, weights: str | os.PathLike[str] | None = None
) -> pathlib.Path:
    """Where :func:`cached_export` keeps an export: ``build/zoo/<name>-seed<N>-<key>.onnx``.

    The key hashes everything else the bytes depend on: the recipe version, the converter
    toolchain versions and the content (not the path) of the weights file.
    """
    get_model(name)
    weights_path = _checked_weights(weights)
    weights_digest = _file_sha256(weights_path) if weights_path else "seeded"
    recipe = RECIPE_VERSION + (f"+{get_model(name).recipe}" if get_model(name).recipe else "")
    key_text = "\0".join((recipe, _toolchain_versions(), name, str(seed), weights_digest))
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    return build_dir() / "zoo" / f"{name}-seed{seed}-{key}.onnx"


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Serialise exports of the same file across processes (pytest-xdist workers).

    Two concurrent VGG-16 exports would need ~22 GB, and the second one is wasted work.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_export(
    name: str, seed: int = 0, weights: str | os.PathLike[str] | None = None
) -> pathlib.Path:
    """Path of the ONNX export of ``name``, exporting it first if it is not cached yet."""
    path = cache_path(name, seed, weights)
    with _file_lock(path.with_suffix(".lock")):
        if not path.is_file():
            export_model(name, path, seed=seed, weights=weights)
    return path


def export_model(
    name: str,
    out_path: str | os.PathLike[str],
    seed: int = 0,
    weights: str | os.PathLike[str] | None = None,
) -> pathlib.Path:
    """Export ``name`` to ``out_path`` in a child process (see the module docstring).

    The file appears atomically: the child writes a temporary file next to it which is
    renamed only once complete, so an interrupted export never leaves a truncated model.
    """
    get_model(name)
    weights_path = _checked_weights(weights)
    args = [name, str(seed)]
    if weights_path is not None:
        args.append(str(weights_path.resolve()))
    return run_export_child("tessera.zoo", args, out_path, f"exporting {name}")


def run_export_child(
    module: str, args: Sequence[str], out_path: str | os.PathLike[str], what: str
) -> pathlib.Path:
    """Run ``python -m MODULE OUT RESULT ARGS...`` to write an ONNX file to ``out_path``.

    Shared by the zoo and ``tessera convert``: the child gets the memory-saving environment
    of the module docstring and writes ONNX to ``OUT``; a user error travels back through
    the ``RESULT`` file (see :func:`child_main`) and is raised here as a
    :class:`TesseraError`, ``what`` ("exporting resnet50") naming the job if the child dies.
    The file appears atomically: ``OUT`` is a temporary file next to ``out_path``, renamed
    only once complete, so an interrupted export never leaves a truncated model.
    """
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python",
        # Let tf2onnx optimizer failures raise instead of silently keeping an unoptimised
        # graph; it also skips a deep copy of the graph per optimizer pass.
        TF2ONNX_CATCH_ERRORS="FALSE",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_onnx = pathlib.Path(tmp) / out.name
        result_file = pathlib.Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, str(tmp_onnx), str(result_file), *args]
        proc = subprocess.run(cmd, env=env, check=False)
        if result_file.is_file():
            result = json.loads(result_file.read_text())
            if "error" in result:
                raise TesseraError(result["error"])
        if proc.returncode != 0 or not tmp_onnx.is_file():
            how = (
                f"was killed by signal {-proc.returncode} (out of memory?)"
                if proc.returncode < 0
                else f"exited with status {proc.returncode}"
            )
            raise TesseraError(f"{what} failed: the export process {how}")
        os.replace(tmp_onnx, out)
    return out


def child_main(argv: Sequence[str], body: Callable[[pathlib.Path, list[str]], None]) -> int:
    """Child side of :func:`run_export_child`: ``argv`` is ``OUT RESULT ARGS...``.

    Runs ``body(OUT, ARGS)``; a :class:`TesseraError` is written to ``RESULT`` for the
    parent to raise with its message intact (a traceback on stderr would be noise).
    """
    out_path, result_file, *args = argv
    try:
        body(pathlib.Path(out_path), args)
    except TesseraError as exc:
        pathlib.Path(result_file).write_text(json.dumps({"error": str(exc)}))
        return 2
    return 0


def build_keras_model(
    name: str, seed: int = 0, weights: str | os.PathLike[str] | None = None
) -> keras.Model:
    """The Keras model behind a zoo export: seeded random init, or ``weights`` loaded.

    Building in the same process with the same arguments gives the same weights, which is
    how the tests compare the ONNX export against ``model.predict``.
    """
    spec = get_model(name)
    weights_path = _checked_weights(weights)
    _quiet_tensorflow_import()
    import keras

    keras.utils.set_random_seed(seed)
    if spec.module:
        module = importlib.import_module(spec.module)
        model = module.build_keras_model()
    else:
        model = getattr(keras.applications, spec.keras_class)(
            weights=None, include_top=True, classes=1000, input_shape=INPUT_SHAPE[1:]
        )
    if weights_path is not None:
        try:
            model.load_weights(weights_path)
        except Exception as exc:  # h5py, zipfile and Keras all raise their own types
            raise TesseraError(
                f"cannot load weights for {name} from {weights_path}: {exc}"
            ) from exc
    elif spec.module:
        module.initialize_weights(model, seed, _calibration_images(seed, spec.input_shape))
    else:
        initialize_weights(model, seed)
    return model


def _calibration_images(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The data-dependent init's seeded N(0, INPUT_STD²) batch for a model input shape."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return INPUT_STD * rng.standard_normal((_CALIBRATION_BATCH, *shape[1:]), dtype=np.float32)


def initialize_weights(model: keras.Model, seed: int) -> None:
    """Replace Keras' default init by a seeded, data-dependent one with trained-like ranges.

    With the stock init the activations drift by orders of magnitude with depth and the
    softmax is uniform to a few parts in 1e3 (VGG-16: 1e-8), so its argmax is rounding noise
    and comparing an implementation's output against the reference tests little. Using the
    statistics of a batch of seeded N(0, INPUT_STD²) images, the BatchNorm layers are made to
    normalise (:func:`_calibrate_batchnorm`), or, without BatchNorm, each layer is scaled to
    unit output (:func:`_calibrate_plain_chain`); finally the classifier is scaled to logits
    of std ``_LOGIT_STD``, which gives a peaked softmax (top-1 probability 0.04-0.4).

    The logits are not centred over the images: the features of different noise images
    share a large common component (5-17x the image-dependent part), so a bias cancelling it
    would make the classifier ill-conditioned, float32 and quantised results disagreeing on
    the top-1. The ResNets therefore give most noise images the same top-1 class.

    Keras also zeroes every bias, and grappler deletes additions of zero, so the exported
    graph would lack the bias inputs that real weights have; the classifier's and VGG's
    biases are drawn from N(0, 0.1). The conv biases of the BN networks stay zero: the BN
    absorbs them anyway, and a nonzero one stops grappler folding the BN into the Conv (it
    then stays a Mul and an Add after a biased Conv, as happens with trained Keras weights).
    """
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    images = INPUT_STD * rng.standard_normal(
        (_CALIBRATION_BATCH, *INPUT_SHAPE[1:]), dtype=np.float32
    )
    classifier = model.layers[-1]
    bn_layers = [
        layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if bn_layers:
        _calibrate_batchnorm(model, bn_layers, rng, images)
        features = keras.Model(model.input, classifier.input)(images)
    else:
        features = _calibrate_plain_chain(model, rng, images)
    _rescale_output(classifier, features, _LOGIT_STD, rng)


def _calibrate_batchnorm(
    model: keras.Model,
    bn_layers: list[keras.layers.BatchNormalization],
    rng: np.random.Generator,
    images: np.ndarray,
) -> None:
    """Give a randomly initialised network BatchNorm layers that actually normalise.

    Keras initialises BN as the identity (gamma=1, beta=0, mean=0, var=1), so in a random
    ResNet-152 the activations grow or shrink by orders of magnitude over 150 layers. This
    is a data-dependent init: gamma ~ U(0.5, 1.5) and beta ~ N(0, 0.1) make every channel a
    little different, then each BN's moving mean/variance is set to the per-channel
    statistics of its own input over the calibration images, so at inference each BN output
    has mean ~beta and std ~gamma.

    The BN closing each ResNet residual branch (Keras names it ``*_3_bn``) gets a small
    gamma ~ U(0.1, 0.3) instead, as trained ResNets have (and "zero-init residual" training
    starts from): with full-size branches, 50 blocks of BN+ReLU make the random ResNet-152
    chaotic, a 1e-7 relative input change (float32 rounding) moving the softmax by 5e-4
    of its maximum, so no two correct float implementations would agree. With damped
    branches that sensitivity is ~3e-6.

    Later BN inputs depend on the calibrated earlier BNs, so the layers must be calibrated
    in topological order. A single forward pass in training mode with ``momentum = 0`` does
    exactly that: in training mode each BN normalises with the statistics of its current
    input and, with zero momentum, stores them verbatim as its moving statistics, which the
    next layers then see applied. It costs one batch-4 forward pass even for DenseNet-121's
    120 BN layers.
    """
    import numpy as np

    saved_momentum = {}
    for layer in bn_layers:
        channels = layer.moving_mean.shape
        low, high = (0.1, 0.3) if layer.name.endswith(_RESIDUAL_BRANCH_BN_SUFFIX) else (0.5, 1.5)
        layer.gamma.assign(rng.uniform(low, high, channels).astype(np.float32))
        layer.beta.assign(rng.normal(0.0, 0.1, channels).astype(np.float32))
        saved_momentum[layer] = layer.momentum
        layer.momentum = 0.0
    try:
        model(images, training=True)
    finally:
        for layer, momentum in saved_momentum.items():
            layer.momentum = momentum


def _calibrate_plain_chain(
    model: keras.Model, rng: np.random.Generator, images: np.ndarray
) -> np.ndarray:
    """Scale each hidden Conv/Dense of a network without BatchNorm (VGG-16) to unit output.

    Glorot init assumes linear layers; after each ReLU the signal shrinks by ~1.4x, so in
    the stock random VGG-16 the fc2 output std is ~0.003 and the logits' ~5e-6. As in
    layer-sequential unit-variance init (Mishkin & Matas, 2016), each layer's kernel is
    scaled, in order, so that its pre-activation output has std 1 on the calibration
    images. VGG is a plain chain, so running the layers one after the other on the batch
    visits them in topological order. Returns the classifier's input, which is left to the
    caller.
    """
    activations = images
    for index, layer in enumerate(model.layers[1:-1], start=1):
        if layer.input is not model.layers[index - 1].output:
            raise RuntimeError(f"{model.name} is not a chain of layers at {layer.name}")
        if getattr(layer, "kernel", None) is not None:
            _rescale_output(layer, activations, 1.0, rng)
        activations = layer(activations)
    return activations


def _rescale_output(
    layer: keras.layers.Layer, inputs: np.ndarray, target_std: float, rng: np.random.Generator
) -> None:
    """Scale a Conv/Dense kernel for a pre-activation output std of ``target_std`` on
    ``inputs``, then give it a N(0, 0.1) bias."""
    import keras
    import numpy as np

    # The bias is still Keras' zero, so this is the kernel's contribution alone.
    activation, layer.activation = layer.activation, keras.activations.linear
    try:
        pre_activation = np.asarray(layer(inputs))
    finally:
        layer.activation = activation
    layer.kernel.assign(layer.kernel.numpy() * (target_std / pre_activation.std()))
    layer.bias.assign(rng.normal(0.0, 0.1, layer.bias.shape).astype(np.float32))


def _quiet_tensorflow_import() -> None:
    """Import TensorFlow with its start-up chatter (oneDNN notices) kept off the terminal.

    ``TF_CPP_MIN_LOG_LEVEL`` silences TF's C++ logging, but the oneDNN notice is printed
    before absl logging is initialised and ignores it, so stderr is muted at the file
    descriptor level for the duration of the import. Errors still surface as exceptions.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _convert(model: keras.Model, name: str, out_path: pathlib.Path) -> None:
    """Convert with tf2onnx and check the interface the rest of tessera relies on."""
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec(get_model(name).input_shape, tf.float32, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    inputs = [i.name for i in proto.graph.input]
    outputs = tuple(o.name for o in proto.graph.output)
    if inputs != [INPUT_NAME] or outputs != output_names(name):
        raise RuntimeError(
            f"tf2onnx produced inputs {inputs} and outputs {list(outputs)}; expected "
            f"[{INPUT_NAME!r}] and {list(output_names(name))}: update ZooModel.output_names"
        )
    out_path.write_bytes(proto.SerializeToString())


def _export_in_this_process(
    name: str, seed: int, out_path: pathlib.Path, weights: pathlib.Path | None
) -> None:
    """Body of the export child process, with a step-by-step progress bar."""
    from tqdm import tqdm

    started = time.monotonic()
    init = f"load {weights.name}" if weights else "seeded init"
    with tqdm(total=3, desc=name, unit="step", file=sys.stderr) as bar:
        bar.set_postfix_str("import TensorFlow")
        _quiet_tensorflow_import()
        bar.update()
        bar.set_postfix_str(f"build + {init}")
        model = build_keras_model(name, seed, weights)
        bar.update()
        bar.set_postfix_str("tf2onnx conversion")
        _convert(model, name, out_path)
        bar.update()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"tessera zoo: exported {name} (seed {seed}) in {time.monotonic() - started:.0f} s, "
        f"peak RSS {peak_gb:.1f} GB",
        file=sys.stderr,
    )


def _export_child(out_path: pathlib.Path, args: list[str]) -> None:
    """Body of ``python -m tessera.zoo OUT RESULT NAME SEED [WEIGHTS]`` (internal)."""
    name, seed, *weights = args
    _export_in_this_process(
        name, int(seed), out_path, pathlib.Path(weights[0]) if weights else None
    )


def _cmd_export(args: argparse.Namespace) -> int:
    if args.featurizer or args.head_output:
        # The seeds' split (tessera.heads): featurizer for the NPU, ImageNet head for the CPU.
        if not args.featurizer:
            raise TesseraError("--head-output needs --featurizer")
        from tessera.heads import export_featurizer

        export_featurizer(args.name, args.output, args.head_output, args.seed, args.weights)
        print("\n".join(p for p in (args.output, args.head_output) if p))
        return 0
    path = cached_export(args.name, seed=args.seed, weights=args.weights)
    pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, args.output)
    print(args.output)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    print(f"{'name':<12} {'keras class':<12} {'params':>12}  {'input':<34} output")
    for m in MODELS.values():
        shape = "x".join(map(str, m.input_shape))
        inputs = f"{INPUT_NAME}: {shape} float32 NHWC"
        if m.module:
            outputs = f"{len(m.output_names)} head maps: {', '.join(m.output_names)}"
        else:
            outputs = ", ".join(f"{o}: 1x1000 softmax" for o in m.output_names)
        print(f"{m.name:<12} {m.keras_class:<12} {m.params:>12,}  {inputs:<34} {outputs}")
    return 0


def sample_input(seed: int = 0, shape: tuple[int, ...] = INPUT_SHAPE) -> np.ndarray:
    """A seeded stand-in for a preprocessed photo: N(0, INPUT_STD²) in the models' NHWC shape.

    It has the scale the zoo's init was calibrated at, so the softmax is peaked but not
    one-hot, which makes comparisons against FP32 meaningful without any image files.
    ``shape`` is a model's ``input_shape`` (SSD-VGG: 1x300x300x3).
    """
    import numpy as np

    return INPUT_STD * np.random.default_rng(seed).standard_normal(shape, np.float32)


def _cmd_sample_input(args: argparse.Namespace) -> int:
    import numpy as np

    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = get_model(args.model).input_shape
    np.save(out, sample_input(args.seed, shape))
    print(f"wrote {out}: {INPUT_NAME!r} {list(shape)} float32, N(0, {INPUT_STD:g}²)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tessera zoo {export,list,sample-input}`` to the CLI."""
    zoo = sub.add_parser("zoo", help="export the reference models to ONNX")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)

    export = zoo_sub.add_parser(
        "export",
        help="export a model (seeded random weights unless --weights) to ONNX",
        description=f"Export a Keras application to ONNX (opset {OPSET}, input "
        f"{INPUT_NAME!r} {list(INPUT_SHAPE)} float32 NHWC). Exports are cached under "
        "$TESSERA_BUILD_DIR/zoo (default build/zoo) by name, seed and weights content.",
    )
    export.add_argument("name", help=f"one of: {', '.join(MODELS)}")
    export.add_argument("-o", "--output", required=True, help="ONNX file to write")
    export.add_argument(
        "--weights", help="Keras weights file (.weights.h5, .h5 or .keras) instead of seeding"
    )
    export.add_argument("--seed", type=int, default=0, help="random init seed (default 0)")
    export.add_argument(
        "--featurizer",
        action="store_true",
        help="export the featurizer only, cut where the seeds cut (ResNet: global pool, 2048 "
        "features; VGG-16: fc7, 4096; DenseNet-121: global pool, 1024), output 'features'",
    )
    export.add_argument(
        "--head-output",
        help="with --featurizer: also write the ImageNet classifier head (Gemm + Softmax, "
        "input 'features') to this ONNX file",
    )
    export.set_defaults(func=_cmd_export)

    listing = zoo_sub.add_parser("list", help="list the models with parameter counts")
    listing.set_defaults(func=_cmd_list)

    sample = zoo_sub.add_parser(
        "sample-input",
        help="write a seeded random model input (.npy) at the scale of preprocessed pixels",
    )
    sample.add_argument("-o", "--output", required=True, help=".npy file to write")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument(
        "--model", default="resnet50", help="model whose input shape to use (ssd_vgg: 300x300)"
    )
    sample.set_defaults(func=_cmd_sample_input)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], _export_child))
