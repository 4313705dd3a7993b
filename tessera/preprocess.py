"""Host-side image preprocessing: encoded JPEG/PNG bytes to the featurizer's input tensor.

The seeds run this stage on the CPU in front of the FPGA, written with ``tf.image``:

    decode to 8-bit RGB -> bilinear resize so the shorter side is 256 -> centre crop
    224x224 -> subtract the per-channel ImageNet means R 123.68, G 116.779, B 103.939
    (no division by a standard deviation) -> optional scaling factor -> RGB or BGR order
    -> float32 NHWC [1, 224, 224, 3]

and SSD-VGG resizes the whole image to 300x300 instead of resizing and cropping.

It runs at serving time, where pulling in TensorFlow (~1 GB, seconds to import) for a
decode and a resize is not acceptable, so this module uses Pillow and numpy only.
``tests/test_preprocess.py`` shows it matches the same steps done with ``tf.image``. What
"the same" means, step by step:

* **JPEG decoding.** Pillow's libjpeg-turbo uses the accurate integer IDCT; its pixels are
  identical to ``tf.io.decode_jpeg(..., dct_method="INTEGER_ACCURATE")``. TensorFlow's
  *default* ``dct_method`` is libjpeg's fast integer IDCT, which Pillow cannot select; on
  the sample photos it is off by up to 18 levels on single pixels (1.04 on average, up to
  16.0 after preprocessing), a loss of decoding accuracy, not a different specification,
  so we keep the accurate one.
* **PNG decoding** gives the same bytes as ``tf.io.decode_png(..., channels=3)``, including
  the conversions below.
* **Resizing** has the semantics of ``tf.image.resize(method="bilinear",
  antialias=False)``: half-pixel centres, no low-pass filter when shrinking (Pillow's own
  bilinear resampling widens its kernel when downscaling, so it is not used), computed in
  float32 in TensorFlow's operation order. On the sample photos (PNG, or JPEG with the
  accurate IDCT) the output tensors are bit-identical to TensorFlow's.
* **EXIF orientation** is ignored, as TensorFlow's decoders ignore it, unless a spec asks
  for it (``apply_exif_orientation``).
* **Odd images** are converted to 8-bit RGB the way TensorFlow's decoders do with
  ``channels=3`` (see :func:`decode_image`); broken input raises
  :class:`~tessera.errors.ImageDecodeError`.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from tessera.errors import ImageDecodeError, TesseraError

# Per-channel means of the ImageNet training set, R, G, B, as the seeds specify them.
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
CHANNEL_ORDERS = ("RGB", "BGR")
# Encoded formats accepted: the seeds' service takes JPEG or PNG bytes. Restricting Pillow
# to these also keeps its decoders for rarer formats away from bytes sent over the network.
_FORMATS = ("JPEG", "PNG")
_SIGNATURES = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}
# Pillow modes that hold 16-bit grayscale samples (16-bit grayscale PNGs open as "I;16").
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """The parameters of the preprocessing stage, stored in a deployable package.

    ``size`` is the side of the square output. With ``resize_shorter`` set, the image is
    first resized, keeping its aspect ratio, so that its shorter side has that length, and
    the centre ``size`` x ``size`` is cropped; with ``resize_shorter=None`` the whole image
    is resized to ``size`` x ``size`` (SSD). ``mean`` is given in R, G, B order whatever
    ``channel_order`` is: it is subtracted before the channels are reordered. ``scale``
    multiplies after the mean subtraction (DenseNet's 0.017). ``apply_exif_orientation``
    rotates photos by their EXIF orientation tag; TensorFlow's decoders ignore the tag, so
    the seeds' pipeline did too, and it is off in every preset.
    """

    name: str
    size: int = 224
    resize_shorter: int | None = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN_RGB
    scale: float = 1.0
    channel_order: str = "RGB"
    apply_exif_orientation: bool = False

    def __post_init__(self) -> None:
        # Specs also come from package files, so every field is checked, not just typed.
        if not isinstance(self.name, str) or not self.name:
            raise TesseraError(f"preprocessing name must be a non-empty string, got {self.name!r}")
        if not _is_int(self.size) or self.size < 1:
            raise TesseraError(f"preprocessing size must be a positive integer, got {self.size!r}")
        if self.resize_shorter is not None and (
            not _is_int(self.resize_shorter) or self.resize_shorter < self.size
        ):
            raise TesseraError(
                f"resize_shorter must be None or an integer >= size ({self.size}) so the "
                f"centre crop fits, got {self.resize_shorter!r}"
            )
        mean = tuple(self.mean) if isinstance(self.mean, (list, tuple)) else ()
        if len(mean) != 3 or not all(_is_finite_number(m) for m in mean):
            raise TesseraError(f"mean must be three numbers (R, G, B), got {self.mean!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in mean))
        if not _is_finite_number(self.scale) or self.scale == 0:
            raise TesseraError(f"scale must be a finite nonzero number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.channel_order not in CHANNEL_ORDERS:
            raise TesseraError(
                f"channel_order must be one of {', '.join(CHANNEL_ORDERS)}, "
                f"got {self.channel_order!r}"
            )
        if not isinstance(self.apply_exif_orientation, bool):
            raise TesseraError(
                f"apply_exif_orientation must be true or false, got {self.apply_exif_orientation!r}"
            )

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """Shape of :func:`preprocess`'s result: NHWC with a batch of one."""
        return (1, self.size, self.size, 3)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form, the inverse of :meth:`from_dict`."""
        return {
            "name": self.name,
            "size": self.size,
            "resize_shorter": self.resize_shorter,
            "mean": list(self.mean),
            "scale": self.scale,
            "channel_order": self.channel_order,
            "apply_exif_orientation": self.apply_exif_orientation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """Rebuild a spec from :meth:`to_dict`'s output.

        Missing or unknown keys are errors rather than silently defaulted: a package written
        by another version must not be preprocessed differently from how it was built.
        """
        if not isinstance(data, Mapping):
            raise TesseraError(f"preprocessing spec must be a mapping, got {type(data).__name__}")
        expected = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = expected - data.keys(), data.keys() - expected
        if missing or unknown:
            raise TesseraError(
                "preprocessing spec has "
                + "; ".join(
                    f"{what} keys {sorted(map(str, keys))}"
                    for what, keys in (("missing", missing), ("unknown", unknown))
                    if keys
                )
                + f"; expected exactly {sorted(expected)}"
            )
        return cls(**data)


PRESETS: dict[str, PreprocessSpec] = {
    # ResNet-50/152 and VGG-16: BGR, the seeds' 2018 default, which is also what Keras'
    # ImageNet weights for these networks expect ("caffe" mode: BGR, these means, no scale).
    "resnet": PreprocessSpec("resnet", channel_order="BGR"),
    "vgg": PreprocessSpec("vgg", channel_order="BGR"),
    # DenseNet-121: the seeds scale by 0.017 after the means (~1/58.8, in place of a
    # division by the standard deviation), with BGR input as in its Caffe release.
    "densenet": PreprocessSpec("densenet", scale=0.017, channel_order="BGR"),
    # SSD-VGG: the seeds' "ssd_300_vgg/..." tensor names are those of the TensorFlow SSD
    # port, whose preprocessing subtracts the means in RGB order and resizes the whole
    # image to 300x300 without keeping the aspect ratio.
    "ssd": PreprocessSpec("ssd", size=300, resize_shorter=None, channel_order="RGB"),
}


def get_preset(name: str) -> PreprocessSpec:
    """The preprocessing of a seed model family, failing with the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise TesseraError(
            f"unknown preprocessing {name!r}; valid names: {', '.join(PRESETS)}"
        ) from None


def preprocess(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Encoded JPEG/PNG bytes to the float32 NHWC tensor ``spec.output_shape``."""
    return preprocess_image(
        decode_image(data, apply_exif_orientation=spec.apply_exif_orientation), spec
    )


def preprocess_image(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The steps after decoding, on an 8-bit RGB ``[H, W, 3]`` array.

    Only the pixels inside the centre crop are interpolated: the result is the same as
    resizing the whole image and then cropping, but a very elongated image (shorter side
    resized to 256, longer side to hundreds of thousands of pixels) costs no memory.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise TesseraError(f"expected an RGB image of shape [H, W, 3], got {list(image.shape)}")
    height, width = image.shape[:2]
    if spec.resize_shorter is None:
        out = resize_bilinear(image, (spec.size, spec.size))
    else:
        resized = resized_shape(height, width, spec.resize_shorter)
        top, left = ((r - spec.size) // 2 for r in resized)
        out = resize_bilinear(image, resized, window=(top, left, spec.size, spec.size))
    out -= np.asarray(spec.mean, dtype=np.float32)
    out *= np.float32(spec.scale)
    if spec.channel_order == "BGR":
        out = out[..., ::-1]
    return np.ascontiguousarray(out[np.newaxis], dtype=np.float32)


def resized_shape(height: int, width: int, shorter: int) -> tuple[int, int]:
    """Size after an aspect-preserving resize that makes the shorter side ``shorter``.

    The longer side is ``longer * shorter / shorter_side`` rounded to the nearest integer,
    ties to even, as ``tf.math.rint`` rounds in TF-slim's ``_smallest_size_at_least`` (the
    exact fraction is rounded, so the result does not depend on float precision).
    """
    if height <= width:
        return shorter, round(Fraction(width * shorter, height))
    return round(Fraction(height * shorter, width)), shorter


def resize_bilinear(
    image: np.ndarray,
    size: tuple[int, int],
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Resize ``[H, W, C]`` to ``size`` like ``tf.image.resize(method="bilinear")``.

    TensorFlow (``antialias=False``, half-pixel centres) samples output pixel ``i`` at the
    input coordinate ``(i + 0.5) * in / out - 0.5``, clamps the two neighbours to the image
    and interpolates between them; it never averages more than 2x2 input pixels, even when
    shrinking. The arithmetic here is float32 in TensorFlow's order (interpolate along x in
    the upper and lower row, then along y) so the results agree to float32 rounding.

    ``window = (top, left, height, width)`` computes only that part of the output, which is
    identical to slicing the full result (each output pixel is computed independently).
    Returns float32 ``[height, width, C]``.
    """
    out_h, out_w = size
    top, left, win_h, win_w = window if window is not None else (0, 0, out_h, out_w)
    if not (0 <= top and top + win_h <= out_h and 0 <= left and left + win_w <= out_w):
        raise TesseraError(f"window {window} is outside the {out_h}x{out_w} output")
    y_low, y_high, y_lerp = _interpolation(image.shape[0], out_h, top, win_h)
    x_low, x_high, x_lerp = _interpolation(image.shape[1], out_w, left, win_w)
    # Gather the needed rows before converting, so a large 8-bit image is never converted
    # to float32 as a whole.
    upper_rows = image[y_low].astype(np.float32)
    lower_rows = image[y_high].astype(np.float32)
    x_lerp = x_lerp[np.newaxis, :, np.newaxis]
    upper = upper_rows[:, x_low] + (upper_rows[:, x_high] - upper_rows[:, x_low]) * x_lerp
    lower = lower_rows[:, x_low] + (lower_rows[:, x_high] - lower_rows[:, x_low]) * x_lerp
    return upper + (lower - upper) * y_lerp[:, np.newaxis, np.newaxis]


def _interpolation(
    in_size: int, out_size: int, start: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices and weights of output pixels ``start .. start+count-1`` along one
    axis, computed in float32 exactly as TensorFlow's ``compute_interpolation_weights``."""
    scale = np.float32(in_size) / np.float32(out_size)
    position = (np.arange(start, start + count, dtype=np.float32) + np.float32(0.5)) * scale
    position -= np.float32(0.5)
    floor = np.floor(position)
    low = np.maximum(floor.astype(np.int64), 0)
    high = np.minimum(np.ceil(position).astype(np.int64), in_size - 1)
    return low, high, position - floor


def decode_image(data: bytes, *, apply_exif_orientation: bool = False) -> np.ndarray:
    """Decode JPEG or PNG bytes to an 8-bit RGB ``[H, W, 3]`` array, as TensorFlow would.

    Conversions match ``tf.io.decode_jpeg``/``decode_png`` with ``channels=3``:

    * grayscale (any bit depth) is replicated to R = G = B; 1, 2 and 4-bit samples are
      scaled to 0-255;
    * palette images are expanded through their palette;
    * an alpha channel (RGBA, gray + alpha, palette transparency) is dropped, not composited
      over a background: the colour values are kept as stored;
    * 16-bit PNGs keep the high byte of each sample (``value >> 8``), which is what
      ``decode_png(dtype=tf.uint8)`` does (libpng's ``png_set_strip_16``), not rounding
      ``value * 255 / 65535``;
    * CMYK (and YCCK) JPEGs become ``R = (255 - C) * (255 - K) // 255`` and likewise for G
      and B, TensorFlow's integer formula; Pillow has already undone the inversion that
      Adobe-marked files store;
    * of a multi-picture JPEG (MPO, as phone cameras write) or an animated PNG, the first
      picture is decoded.

    EXIF orientation is ignored unless ``apply_exif_orientation`` is set, as TensorFlow
    ignores it. Empty, truncated or corrupt bytes, images of zero width or height, and
    other formats raise :class:`~tessera.errors.ImageDecodeError`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty image: 0 bytes")
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as image:
            image.load()
            if apply_exif_orientation:
                image = ImageOps.exif_transpose(image)
            return _to_rgb8(image)
    except Image.UnidentifiedImageError:
        # Pillow also refuses headers it cannot use (e.g. 0 pixels wide) this way.
        kind = next(
            (k for k, magic in _SIGNATURES.items() if bytes(data[:8]).startswith(magic)), None
        )
        if kind is not None:
            raise ImageDecodeError(
                f"corrupt {kind} image ({len(data)} bytes): its header is invalid "
                "(zero width or height, or a damaged header)"
            ) from None
        raise ImageDecodeError(
            f"not a JPEG or PNG image ({len(data)} bytes starting with {bytes(data[:8])!r})"
        ) from None
    except ImageDecodeError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise ImageDecodeError(
            f"corrupt or truncated image ({len(data)} bytes): {type(exc).__name__}: {exc}"
        ) from exc


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """The conversions :func:`decode_image` documents, from a loaded Pillow image."""
    if image.mode == "CMYK":
        cmyk = np.asarray(image, dtype=np.int32)
        rgb = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) // 255
        return rgb.astype(np.uint8)
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow would clip these to 255 when converting; take the high byte instead.
        gray = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., np.newaxis], 3, axis=2)
    return np.asarray(image.convert("RGB"))
