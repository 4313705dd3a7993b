"""Preprocessing (Pillow + numpy) against the same steps done with ``tf.image``.

The reference is what the seeds' TensorFlow preprocessing does: ``tf.io.decode_png`` /
``decode_jpeg`` with ``channels=3``, the aspect-preserving size computed in float32 with
``tf.math.rint`` (TF-slim's ``_smallest_size_at_least``), ``tf.image.resize`` bilinear
without antialiasing, a centre crop by slicing, mean subtraction and scaling in float32.
Photos are the real ones scikit-image and scikit-learn ship, encoded here.

Measured on this machine: the PNG path and the JPEG path with ``dct_method=
"INTEGER_ACCURATE"`` agree to 0.0 (bit-identical float32 tensors); with TensorFlow's
default (fast) JPEG IDCT the decoded pixels differ by up to 18 levels (mean 1.04) and the
preprocessed tensors by up to 16.0 (see ``test_jpeg_default_idct_difference``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from tessera.errors import ImageDecodeError, TesseraError
from tessera.preprocess import (
    IMAGENET_MEAN_RGB,
    PRESETS,
    PreprocessSpec,
    decode_image,
    get_preset,
    preprocess,
    preprocess_image,
    resized_shape,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("skimage") is None,
    reason="the reference needs TensorFlow and scikit-image (pip install .[dev])",
)

# The bound; the measured difference is 0.0.
TOLERANCE = 1e-3
# Specs covering every branch: crop (RGB and BGR), DenseNet scaling, SSD's plain resize.
SPECS = [
    PRESETS["resnet"],
    PRESETS["densenet"],
    PRESETS["ssd"],
    PreprocessSpec("rgb-crop", channel_order="RGB"),
]


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    return tensorflow


def _photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {
        "astronaut": skimage.data.astronaut(),  # 512x512
        "coffee": skimage.data.coffee(),  # 400x600, landscape
        "chelsea": skimage.data.chelsea(),  # 300x451, odd width
    }
    sample = load_sample_images()
    for filename, image in zip(sample.filenames, sample.images, strict=True):
        photos[os.path.splitext(os.path.basename(filename))[0]] = image  # china, flower
    # Portrait orientation, and a thumbnail that is upscaled 20x instead of shrunk.
    photos["coffee-portrait"] = np.ascontiguousarray(photos["coffee"].transpose(1, 0, 2))
    photos["chelsea-thumbnail"] = np.ascontiguousarray(photos["chelsea"][::25, ::25])
    return photos


PHOTOS = _photos()


def _encode(image: Image.Image | np.ndarray, fmt: str, **options: object) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _tf_steps(tf, decoded, spec: PreprocessSpec) -> np.ndarray:
    """The seeds' preprocessing written with tf.image, from a decoded uint8 tensor."""
    image = tf.cast(decoded, tf.float32)
    height, width = image.shape[:2]
    if spec.resize_shorter is None:
        image = tf.image.resize(image, [spec.size, spec.size], method="bilinear", antialias=False)
    else:
        shorter = tf.cast(min(height, width), tf.float32)
        scale = tf.constant(spec.resize_shorter, tf.float32) / shorter
        new_h = int(tf.math.rint(tf.cast(height, tf.float32) * scale))
        new_w = int(tf.math.rint(tf.cast(width, tf.float32) * scale))
        image = tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=False)
        top, left = (new_h - spec.size) // 2, (new_w - spec.size) // 2
        image = image[top : top + spec.size, left : left + spec.size]
    image = (image - tf.constant(spec.mean, tf.float32)) * tf.constant(spec.scale, tf.float32)
    if spec.channel_order == "BGR":
        image = image[..., ::-1]
    return image.numpy()[np.newaxis]


def _check(got: np.ndarray, want: np.ndarray, spec: PreprocessSpec) -> None:
    assert got.shape == want.shape == spec.output_shape
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


# ------------------------------------------------------------------ matches tf.image
@pytest.mark.parametrize("name", PHOTOS)
def test_png_matches_tf_image(tf, name: str) -> None:
    """Decode, resize and crop path without any JPEG decoder difference."""
    data = _encode(PHOTOS[name], "PNG")
    decoded = tf.io.decode_png(data, channels=3)
    np.testing.assert_array_equal(decode_image(data), decoded.numpy())
    for spec in SPECS:
        _check(preprocess(data, spec), _tf_steps(tf, decoded, spec), spec)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("subsampling", [0, 2], ids=["444", "420"])
def test_jpeg_matches_tf_accurate_idct(tf, name: str, subsampling: int) -> None:
    """Pillow decodes JPEG exactly as TF does with the accurate integer IDCT."""
    data = _encode(PHOTOS[name], "JPEG", quality=90, subsampling=subsampling)
    decoded = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
    np.testing.assert_array_equal(decode_image(data), decoded.numpy())
    for spec in SPECS:
        _check(preprocess(data, spec), _tf_steps(tf, decoded, spec), spec)


def test_jpeg_default_idct_difference(tf) -> None:
    """TF's default ``dct_method`` is libjpeg's fast IDCT, which Pillow cannot select.

    This pins down how far that default is from our (accurate) decoding, so a change in
    either decoder shows up here. Measured on the five photos at JPEG qualities 75-95: at
    most 18 levels on single decoded pixels, 1.04 on average, and up to 16.0 in the
    preprocessed tensor (the bilinear weights can put almost all weight on one pixel).
    """
    worst_pixel, worst_tensor, mean_pixel = 0, 0.0, []
    for name in ("astronaut", "coffee", "chelsea", "china", "flower"):
        for quality, subsampling in ((75, 2), (90, 0), (95, 2)):
            data = _encode(PHOTOS[name], "JPEG", quality=quality, subsampling=subsampling)
            fast = tf.io.decode_jpeg(data, channels=3)  # TF defaults
            pixel_diff = np.abs(decode_image(data).astype(int) - fast.numpy().astype(int))
            worst_pixel = max(worst_pixel, int(pixel_diff.max()))
            mean_pixel.append(pixel_diff.mean())
            spec = PRESETS["resnet"]
            tensor_diff = np.abs(preprocess(data, spec) - _tf_steps(tf, fast, spec))
            worst_tensor = max(worst_tensor, float(tensor_diff.max()))
    print(
        f"TF default JPEG IDCT vs ours: max pixel {worst_pixel}, mean pixel "
        f"{np.mean(mean_pixel):.3f}, max preprocessed {worst_tensor:.3f}"
    )
    assert worst_pixel <= 24 and np.mean(mean_pixel) < 2 and worst_tensor <= worst_pixel


def test_elongated_image_matches_tf(tf) -> None:
    """A 6x500 strip is upscaled to 256x21333 and cropped; only the crop is computed."""
    strip = np.ascontiguousarray(PHOTOS["coffee"][200:206, 50:550])
    data = _encode(strip, "PNG")
    assert resized_shape(6, 500, 256) == (256, 21333)
    spec = PRESETS["resnet"]
    _check(preprocess(data, spec), _tf_steps(tf, tf.io.decode_png(data, channels=3), spec), spec)


# ------------------------------------------------------------------ odd image kinds
def _odd_pngs(tf) -> dict[str, bytes]:
    photo = PHOTOS["chelsea"]
    rng = np.random.default_rng(0)
    noise16 = rng.integers(0, 2**16, (37, 53, 4), dtype=np.uint16)
    palette = Image.fromarray(photo).convert("P")
    return {
        "gray": _encode(Image.fromarray(photo).convert("L"), "PNG"),
        "gray-alpha": _encode(Image.fromarray(photo).convert("LA"), "PNG"),
        "1-bit": _encode(Image.fromarray(photo).convert("1"), "PNG"),
        "palette": _encode(palette, "PNG"),
        "palette-transparency": _encode(palette, "PNG", transparency=7),
        "rgba": _encode(Image.fromarray(photo).convert("RGBA"), "PNG"),
        "interlaced": _encode(photo, "PNG", optimize=False, interlace=1),
        "animated": _encode(
            Image.fromarray(photo), "PNG", save_all=True, append_images=[palette.convert("RGB")]
        ),
        # Pillow cannot write 16-bit colour PNGs; TensorFlow can.
        "16-bit-gray": tf.io.encode_png(noise16[..., :1]).numpy(),
        "16-bit-gray-alpha": tf.io.encode_png(noise16[..., :2]).numpy(),
        "16-bit-rgb": tf.io.encode_png(noise16[..., :3]).numpy(),
        "16-bit-rgba": tf.io.encode_png(noise16).numpy(),
    }


ODD_PNGS = [
    "gray",
    "gray-alpha",
    "1-bit",
    "palette",
    "palette-transparency",
    "rgba",
    "interlaced",
    "animated",
    "16-bit-gray",
    "16-bit-gray-alpha",
    "16-bit-rgb",
    "16-bit-rgba",
]


@pytest.mark.parametrize("kind", ODD_PNGS)
def test_odd_png_converted_like_tf(tf, kind: str) -> None:
    data = _odd_pngs(tf)[kind]
    got = decode_image(data)
    assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3
    np.testing.assert_array_equal(got, tf.io.decode_png(data, channels=3).numpy())
    spec = PRESETS["resnet"]
    _check(preprocess(data, spec), _tf_steps(tf, tf.io.decode_png(data, channels=3), spec), spec)


def test_16_bit_png_keeps_high_byte(tf) -> None:
    """``value >> 8``, not ``round(value * 255 / 65535)``: 0x80FF -> 0x80, not 0x81."""
    values = np.array([[[0x0000], [0x00FF], [0x80FF], [0xFFFF]]], dtype=np.uint16)
    got = decode_image(tf.io.encode_png(values).numpy())
    np.testing.assert_array_equal(got[..., 0], [[0x00, 0x00, 0x80, 0xFF]])
    np.testing.assert_array_equal(got[..., 0], got[..., 2])


@pytest.mark.parametrize("kind", ["gray", "cmyk", "mpo"])
def test_odd_jpeg_converted_like_tf(tf, kind: str) -> None:
    photo = Image.fromarray(PHOTOS["chelsea"])
    if kind == "mpo":  # multi-picture JPEG, as phone cameras write: the first picture
        second = Image.fromarray(PHOTOS["coffee"])
        data = _encode(photo, "MPO", save_all=True, append_images=[second], quality=90)
    else:  # Pillow marks CMYK JPEGs as Adobe (stored inverted)
        data = _encode(photo.convert("L" if kind == "gray" else "CMYK"), "JPEG", quality=90)
    want = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy()
    got = decode_image(data)
    np.testing.assert_array_equal(got, want)
    if kind == "cmyk":  # the conversion is a real one, not a no-op on the colours
        assert np.abs(got.astype(int) - PHOTOS["chelsea"].astype(int)).mean() < 8


def test_exif_orientation_ignored_like_tf_unless_asked(tf) -> None:
    photo = PHOTOS["chelsea"]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = _encode(photo, "JPEG", quality=90, exif=exif.tobytes())
    stored = decode_image(data)
    assert stored.shape == photo.shape
    np.testing.assert_array_equal(
        stored, tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy()
    )
    upright = decode_image(data, apply_exif_orientation=True)
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))
    spec = dataclasses.replace(PRESETS["resnet"], apply_exif_orientation=True)
    np.testing.assert_array_equal(preprocess(data, spec), preprocess_image(upright, spec))


# ------------------------------------------------------------------ bad input
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _zero_width_png() -> bytes:
    """A PNG that is well formed except that its header says 0 pixels wide."""
    header = struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4))
        + _png_chunk(b"IEND", b"")
    )


def _zero_height_jpeg() -> bytes:
    """A JPEG whose frame header (SOF0) says 0 lines high."""
    data = bytearray(_encode(PHOTOS["chelsea"], "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 7] = b"\0\0"
    return bytes(data)


def _bad_inputs() -> dict[str, tuple[object, str]]:
    photo = PHOTOS["chelsea"]
    jpeg, png = _encode(photo, "JPEG"), _encode(photo, "PNG")
    idat = png.index(b"IDAT")
    corrupt_png = png[: idat + 100] + bytes(b ^ 0xFF for b in png[idat + 100 : idat + 200])
    corrupt_png += png[idat + 200 :]
    return {
        "empty": (b"", "empty image"),
        "text": (b"this is not an image\n" * 10, "not a JPEG or PNG"),
        "random": (np.random.default_rng(0).bytes(4096), "not a JPEG or PNG"),
        "gif": (_encode(photo, "GIF"), "not a JPEG or PNG"),
        "bmp": (_encode(photo, "BMP"), "not a JPEG or PNG"),
        "jpeg-header-only": (jpeg[:200], "corrupt or truncated"),
        "jpeg-truncated": (jpeg[: len(jpeg) // 2], "corrupt or truncated"),
        "png-truncated": (png[: len(png) // 2], "corrupt or truncated"),
        "png-corrupt-data": (corrupt_png, "corrupt or truncated"),
        "png-zero-width": (_zero_width_png(), "corrupt PNG image .*header is invalid"),
        "jpeg-zero-height": (_zero_height_jpeg(), "corrupt JPEG image .*header is invalid"),
        "str-instead-of-bytes": ("photo.jpg", "expected encoded image bytes"),
    }


@pytest.mark.parametrize("kind", list(_bad_inputs()))
def test_bad_bytes_raise_image_decode_error(kind: str) -> None:
    data, message = _bad_inputs()[kind]
    with pytest.raises(ImageDecodeError, match=message) as info:
        preprocess(data, PRESETS["resnet"])  # type: ignore[arg-type]
    assert isinstance(info.value, TesseraError)  # the CLI prints it without a traceback


def test_no_tensorflow_at_serving_time(tmp_path) -> None:
    path = tmp_path / "astronaut.png"
    path.write_bytes(_encode(PHOTOS["astronaut"], "PNG"))
    code = (
        "import sys\n"
        "from tessera.preprocess import get_preset, preprocess\n"
        f"data = open({str(path)!r}, 'rb').read()\n"
        "assert preprocess(data, get_preset('resnet')).shape == (1, 224, 224, 3)\n"
        "heavy = {'tensorflow', 'keras', 'torch'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------ the spec
def test_presets_follow_the_seeds() -> None:
    for name in ("resnet", "vgg", "densenet", "ssd"):
        spec = get_preset(name)
        assert spec.name == name and spec.mean == IMAGENET_MEAN_RGB
    assert get_preset("resnet").output_shape == (1, 224, 224, 3)
    assert get_preset("resnet").resize_shorter == 256 and get_preset("resnet").scale == 1.0
    assert get_preset("densenet").scale == 0.017
    assert get_preset("ssd").output_shape == (1, 300, 300, 3)
    assert get_preset("ssd").resize_shorter is None
    assert not any(spec.apply_exif_orientation for spec in PRESETS.values())


def test_channel_order_and_scale() -> None:
    image = np.zeros((256, 256, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 200, 100, 50
    rgb = preprocess_image(image, PreprocessSpec("x", scale=0.5))
    bgr = preprocess_image(image, PreprocessSpec("x", scale=0.5, channel_order="BGR"))
    expected = (np.array([200, 100, 50], np.float32) - np.float32(IMAGENET_MEAN_RGB)) * 0.5
    np.testing.assert_array_equal(rgb[0, 5, 7], expected)
    np.testing.assert_array_equal(bgr[0, 5, 7], expected[::-1])


def test_spec_round_trips_through_json() -> None:
    for spec in [*PRESETS.values(), PreprocessSpec("custom", 96, 112, (1, 2, 3), 2, "BGR", True)]:
        text = json.dumps(spec.to_dict(), sort_keys=True)
        assert PreprocessSpec.from_dict(json.loads(text)) == spec
        assert json.dumps(PreprocessSpec.from_dict(json.loads(text)).to_dict(), sort_keys=True) == (
            text
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": 0}, "size must be a positive integer"),
        ({"size": 224.0}, "size must be a positive integer"),
        ({"resize_shorter": 200}, r"resize_shorter must be None or an integer >= size \(224\)"),
        ({"mean": [1, 2]}, r"mean must be three numbers"),
        ({"mean": [1, 2, float("nan")]}, r"mean must be three numbers"),
        ({"scale": 0}, "scale must be a finite nonzero number"),
        ({"scale": "0.017"}, "scale must be a finite nonzero number"),
        ({"channel_order": "rgb"}, "channel_order must be one of RGB, BGR"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"apply_exif_orientation": 1}, "apply_exif_orientation must be true or false"),
    ],
)
def test_spec_rejects_bad_values(change: dict[str, object], message: str) -> None:
    data = {**PRESETS["resnet"].to_dict(), **change}
    with pytest.raises(TesseraError, match=message):
        PreprocessSpec.from_dict(data)


def test_spec_rejects_missing_and_unknown_keys() -> None:
    data = PRESETS["resnet"].to_dict()
    del data["scale"]
    data["std"] = [58.4, 57.1, 57.4]
    with pytest.raises(TesseraError, match=r"missing keys \['scale'\]; unknown keys \['std'\]"):
        PreprocessSpec.from_dict(data)
    with pytest.raises(TesseraError, match="must be a mapping"):
        PreprocessSpec.from_dict([("name", "resnet")])  # type: ignore[arg-type]


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(TesseraError, match=r"unknown preprocessing 'resnet50'.*resnet, vgg"):
        get_preset("resnet50")


def test_preprocess_image_rejects_non_rgb_arrays() -> None:
    with pytest.raises(TesseraError, match=r"shape \[H, W, 3\], got \[10, 10\]"):
        preprocess_image(np.zeros((10, 10), np.uint8), PRESETS["resnet"])
