"""Real photos and a small labelled image set for the package, head and score tests.

The photos are the ones scikit-image and scikit-learn ship (no downloads). A labelled set
is made by treating each photo as a class and drawing random crops (50-80 % of each side),
horizontal flips and brightness changes (x0.75-1.25) from it, saved as JPEG: different
crops of one photo share its content and colours but not a single pixel position, so a
classifier has to generalise a little to recognise held-out crops.

``tiny_featurizer`` is a three-layer random CNN with a global pool (64 features) for
tests that push dozens of images through the simulator: ~0.05 s an image where the
ResNet-50 featurizer takes ~1.5 s.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageEnhance


def photos() -> dict[str, np.ndarray]:
    """Five RGB photos by name: astronaut, coffee, chelsea (a cat), china, flower."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {
        "astronaut": skimage.data.astronaut(),
        "coffee": skimage.data.coffee(),
        "chelsea": skimage.data.chelsea(),
    }
    sample = load_sample_images()
    for filename, image in zip(sample.filenames, sample.images, strict=True):
        out[os.path.splitext(os.path.basename(filename))[0]] = image
    return out


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    """Encode an RGB array as PNG or JPEG (quality 90) bytes."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def augmented_crops(image: np.ndarray, count: int, rng: np.random.Generator) -> list[bytes]:
    """``count`` random crops of ``image`` with flips and brightness changes, as JPEG."""
    h, w = image.shape[:2]
    out = []
    for _ in range(count):
        f = rng.uniform(0.5, 0.8)
        ch, cw = int(h * f), int(w * f)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        im = Image.fromarray(image[y : y + ch, x : x + cw])
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.75, 1.25))
        out.append(encode(im, "JPEG"))
    return out


def write_labelled_set(
    root: Path, classes: list[str], per_class: int, seed: int
) -> dict[str, list[Path]]:
    """One sub-folder of ``per_class`` augmented crops per photo in ``classes``."""
    rng = np.random.default_rng(seed)
    all_photos = photos()
    files: dict[str, list[Path]] = {}
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        files[name] = []
        for i, data in enumerate(augmented_crops(all_photos[name], per_class, rng)):
            path = folder / f"{name}_{i:02d}.jpg"
            path.write_bytes(data)
            files[name].append(path)
    return files


def tiny_featurizer(seed: int = 0) -> onnx.ModelProto:
    """NHWC [1, 224, 224, 3] -> 3 strided conv + ReLU -> global pool -> ``features`` [1, 64].

    He-initialised random weights; the first layer is scaled down by the pixel scale (64,
    the std of preprocessed pixels) so the activations stay near unit size.
    """
    rng = np.random.default_rng(seed)
    layers = [(3, 16, 8, 4, 2), (16, 32, 3, 2, 1), (32, 64, 3, 2, 1)]  # cin, cout, k, s, pad
    nodes = [helper.make_node("Transpose", ["input"], ["x0"], perm=[0, 3, 1, 2])]
    inits = []
    for i, (cin, cout, k, s, p) in enumerate(layers):
        w = rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))
        if i == 0:
            w /= 64.0
        b = rng.normal(0, 0.1, cout)
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [f"x{i}", f"w{i}", f"b{i}"],
                [f"c{i}"],
                kernel_shape=[k, k],
                strides=[s, s],
                pads=[p] * 4,
            ),
            helper.make_node("Relu", [f"c{i}"], [f"x{i + 1}"]),
        ]
    nodes += [
        helper.make_node("GlobalAveragePool", ["x3"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["features"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 224, 224, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 64])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_classifier(classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """:func:`tiny_featurizer` followed by ``Gemm`` + ``Softmax`` to ``predictions``."""
    rng = np.random.default_rng(seed + 1)
    model = tiny_featurizer(seed)
    g = model.graph
    g.node.extend(
        [
            helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["predictions"], axis=1),
        ]
    )
    g.initializer.extend(
        [
            numpy_helper.from_array(
                (rng.standard_normal((64, classes)) * 0.5).astype(np.float32), "fc_w"
            ),
            numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "fc_b"),
        ]
    )
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("predictions", TensorProto.FLOAT, [1, classes]))
    return model
