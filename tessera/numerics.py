"""The number format, defined once: calibration-free block floating point (BFP).

This module *is* the numerics specification. ``docs/numerics.md`` explains it in prose;
the compiler (weight quantization), the numpy reference executor, the instruction-set
simulator and the RTL testbenches all call these functions, so there is exactly one
definition of every rounding, shift and saturation.

Formats
-------
* **Storage BFP** (activations and weights in DRAM): a block of N signed mantissas
  ``q`` with ``|q| <= 2**(m-1) - 1`` (symmetric two's complement, the most negative code is
  never produced) and one exponent ``e`` (int8, ``-127..127``); value ``q * 2**e``. A block
  whose mantissas are all zero carries ``E_ZERO = -128`` so it never raises a tensor's
  maximum exponent.
* **Wide BFP** (vectors inside the multifunction units): N signed mantissas with
  ``|q| <= 2**(M-1) - 1`` and one internal exponent (the reachable exponents fit 12 bits
  signed; see docs/numerics.md).
* **Accumulator**: an exact signed integer with a known LSB exponent.

All arithmetic below is on int64 numpy arrays. The one rounding rule is
round-half-to-even on right shifts (:func:`rne_shift`); the one overflow rule is
saturation to the symmetric range.
"""

from __future__ import annotations

import numpy as np

#: Exponent of an all-zero block (storage and wide).
E_ZERO = -128
#: Storage exponent range for non-zero blocks.
E_MIN = -127
E_MAX = 127
#: Shifts at or beyond this many bits leave nothing of a value below 2**61.
_MAX_SHIFT = 62


def sat_limit(bits: int) -> int:
    """Largest mantissa magnitude of a ``bits``-wide symmetric signed mantissa."""
    return (1 << (bits - 1)) - 1


def rne_shift(x: np.ndarray, shift: np.ndarray | int) -> np.ndarray:
    """``x / 2**shift`` rounded half to even, for integer ``x`` and ``shift >= 0``.

    In hardware: an arithmetic right shift plus a round bit, a sticky bit and the LSB.
    Computed as ``(x + 2**(s-1) - 1 + lsb) >> s`` with ``lsb`` the LSB of ``x >> s``,
    which rounds up exactly when the remainder is above half, or half with an odd
    quotient.
    """
    x = np.asarray(x, dtype=np.int64)
    s = np.minimum(np.asarray(shift, dtype=np.int64), _MAX_SHIFT)
    if np.any(s < 0):
        raise ValueError("rne_shift needs non-negative shifts")
    if not np.any(s):
        return x
    active = s > 0
    bias = (np.left_shift(np.int64(1), s) >> 1) - active
    lsb = (x >> s) & active
    return (x + bias + lsb) >> s


def _block_absmax(x: np.ndarray) -> np.ndarray:
    """Largest magnitude of each block (last axis)."""
    return np.abs(x).max(axis=-1)


def bit_length(a: np.ndarray) -> np.ndarray:
    """Bits needed for non-negative integers ``a`` (0 for 0), exact for all int64."""
    a = np.asarray(a, dtype=np.int64)
    _, e = np.frexp(a.astype(np.float64))
    e = e.astype(np.int64)
    # float64 conversion may round a value just below a power of two up to it.
    too_big = (e > 0) & (a < np.left_shift(np.int64(1), np.clip(e - 1, 0, 62)))
    return np.where(too_big, e - 1, e)


# --------------------------------------------------------------------------- storage


def quantize_float(
    x: np.ndarray, bits: int, min_exp: np.ndarray | int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float blocks (last axis = one block) to storage BFP.

    The shared exponent is the smallest that keeps the block's largest magnitude below
    ``2**(bits-1)`` (so no calibration data is needed: the data picks its own scale);
    mantissas round half to even and saturate. ``min_exp`` raises exponents (the
    compiler's per-layer weight window); all-zero blocks get ``E_ZERO`` unless ``min_exp``
    is given, in which case they get ``min_exp``.
    """
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize non-finite values (NaN or Inf) to BFP")
    amax = _block_absmax(x)
    _, k = np.frexp(amax)  # amax < 2**k
    e = k.astype(np.int64) - (bits - 1)
    if min_exp is not None:
        e = np.maximum(e, min_exp)
    e = np.clip(e, E_MIN, E_MAX)
    lim = sat_limit(bits)
    # x * 2**-e is the exact product, rounded once, as ldexp would give it (2**-e is a
    # normal float for every storage exponent), at a fraction of ldexp's cost.
    scale = np.ldexp(1.0, -e)
    y = x * scale[..., None]
    q = np.clip(np.rint(y, out=y), -lim, lim, out=y).astype(np.int64)
    # Rounding and clipping are monotone in |x|, so a block is all zero exactly when its
    # largest magnitude rounds to zero.
    zero = np.rint(amax * scale) == 0
    if min_exp is None:
        e = np.where(zero, E_ZERO, e)
    else:
        e = np.where(zero, np.broadcast_to(np.clip(min_exp, E_MIN, E_MAX), e.shape), e)
    return q, e.astype(np.int64)


def dequantize(q: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Exact float64 value of BFP blocks (storage or wide)."""
    return np.ldexp(np.asarray(q, dtype=np.float64), np.asarray(e, dtype=np.int64)[..., None])


def normalize(x: np.ndarray, lsb_exp: np.ndarray | int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer lanes (last axis = one vector) at LSB exponent ``lsb_exp`` -> wide BFP.

    Shifts right just enough for the largest magnitude to fit ``bits`` (round half to
    even, then saturate); an all-zero vector gets ``E_ZERO``.
    """
    x = np.asarray(x, dtype=np.int64)
    lsb = np.broadcast_to(np.asarray(lsb_exp, dtype=np.int64), x.shape[:-1])
    amax = _block_absmax(x)
    shift = np.maximum(bit_length(amax) - (bits - 1), 0)
    lim = sat_limit(bits)
    q = np.clip(rne_shift(x, shift[..., None]), -lim, lim)
    e = np.where(amax == 0, E_ZERO, lsb + shift)
    return q, e.astype(np.int64)


def to_storage(q: np.ndarray, e: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-block a wide vector to storage BFP: the write path of every chain.

    Normalizes to ``bits``, then clamps the exponent to the int8 range: above ``E_MAX``
    the mantissas saturate, below ``E_MIN`` they are shifted (rounded) onto ``E_MIN``.
    """
    q, e = normalize(q, e, bits)
    lim = sat_limit(bits)
    over = e > E_MAX
    if np.any(over):
        up = np.clip(e - E_MAX, 0, 40)[..., None]
        q = np.where(over[..., None], np.clip(q << up, -lim, lim), q)
        e = np.where(over, E_MAX, e)
    # An all-zero vector (E_ZERO) takes the shift too: it stays zero and gets E_ZERO back
    # below, while a non-zero vector whose exponent is exactly E_ZERO is clamped like
    # any other instead of being stored under the all-zero marker.
    under = e < E_MIN
    if np.any(under):
        q = np.where(under[..., None], rne_shift(q, np.maximum(E_MIN - e, 0)[..., None]), q)
        e = np.where(under, E_MIN, e)
    zero = ~np.any(q != 0, axis=-1)
    e = np.where(zero, E_ZERO, e)
    return q, e.astype(np.int64)


# --------------------------------------------------------------------------- MVU operands


def clamp_to_floor(
    q: np.ndarray, e: np.ndarray, floor: np.ndarray | int
) -> tuple[np.ndarray, np.ndarray]:
    """Move blocks whose exponent is below ``floor`` onto it (rounding their mantissas).

    The MVU reads every activation block through this clamp with
    ``floor = tensor_max_exp - D``; afterwards every block of the tensor is an integer
    multiple of ``2**floor`` no larger than ``2**(m-1+D)``, which bounds the accumulator.
    """
    e = np.asarray(e, dtype=np.int64)
    floor = np.asarray(floor, dtype=np.int64)
    below = e < floor
    shift = np.where(below, floor - e, 0)
    q = rne_shift(q, shift[..., None])
    return q, np.where(below, floor, e)


def to_grid(q: np.ndarray, e: np.ndarray, floor: np.ndarray | int) -> np.ndarray:
    """Clamped blocks as exact integers on the tensor grid ``2**floor``.

    ``q * 2**(e - floor)`` is what the MVU multiplies after its per-block shift; as one
    integer per element it lets numpy do a whole layer as one float64 matrix product
    that is exact (see :func:`accumulator_bound_bits`).
    """
    q, e = clamp_to_floor(q, e, floor)
    return np.left_shift(q, (e - np.asarray(floor, dtype=np.int64))[..., None])


def accumulator_bound_bits(
    k_elements: int, mantissa_bits: int, act_window: int, weight_window: int
) -> int:
    """Bits (sign included) the exact MVU sum of ``k_elements`` products can need.

    Each product is at most ``(2**(m-1)-1)**2 * 2**(D + Dw)`` on the accumulator grid.
    The compiler refuses a layer whose bound exceeds the accumulator width, and the
    simulator relies on the bound staying <= 53 bits to sum exactly in float64.
    """
    lim = sat_limit(mantissa_bits)
    worst = k_elements * lim * lim << (act_window + weight_window)
    return int(worst).bit_length() + 1


# --------------------------------------------------------------------------- MFU ops


def align(
    xq: np.ndarray, xe: np.ndarray, yq: np.ndarray, ye: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bring two wide vectors to their larger exponent (smaller one shifted, RNE)."""
    e = np.maximum(xe, ye)
    xa = rne_shift(xq, (e - xe)[..., None])
    ya = rne_shift(yq, (e - ye)[..., None])
    return xa, ya, e


def wide_add(xq, xe, yq, ye, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Vector add with exponent alignment (bias, residual add)."""
    xa, ya, e = align(xq, xe, yq, ye)
    return normalize(xa + ya, e, bits)


def wide_max(xq, xe, yq, ye, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Lane-wise maximum with exponent alignment."""
    xa, ya, e = align(xq, xe, yq, ye)
    return normalize(np.maximum(xa, ya), e, bits)


def wide_mul(xq, xe, cq, ce, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Lane-wise product with a constant vector (per-channel scale, 1/k of avg pooling)."""
    return normalize(
        np.asarray(xq, np.int64) * np.asarray(cq, np.int64), np.asarray(xe) + np.asarray(ce), bits
    )


def wide_relu(xq, xe, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """max(x, 0); renormalized so an all-negative vector becomes the canonical zero."""
    return normalize(np.maximum(xq, 0), xe, bits)


def quantize_wide(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Float constants (bias, scale) -> wide BFP, as the compiler stores them."""
    return quantize_float(x, bits)
