"""Whole-feature-map kernels shared by the instruction simulator and the reference.

They apply :mod:`tessera.numerics` to a whole layer at once. The MVU sum is done as a
float64 matrix product on the tensor/weight grids; it is exact because the compiler
guarantees every partial sum stays below ``2**53`` (``numerics.accumulator_bound_bits``
<= 54 with a sign bit, i.e. magnitudes < 2**53), so any summation order BLAS picks gives
the same integers (each product of two grid values has at most 16 significant bits, so
it is exact too, fused or not).

The first part (int64 grids) is what the reference executor uses. The second part is
the instruction simulator's fast path: grids as exact float64 integers, window
unrolling band by band (:class:`Windows`), pooling compiled in one pass
(:func:`pool_lanes`), and a small thread pool for independent bands
(:func:`run_parallel`); the simulator's per-vector arithmetic after the product is
compiled, in :mod:`tessera.sim.vector`.

Why not float32 products: the grid values are up to 24-bit (8-bit mantissas shifted by
up to the activation window) and the weight grid up to 16-bit, and sums run over
thousands of terms to ~2**41 and more. float32 holds 24 bits, so no split of the
operands keeps its partial sums exact at useful sizes.

Byte-digit products (:class:`WeightOperand`): the activation grid, offset to be
non-negative, is 3 unsigned byte digits and the weight grid 2 signed ones; onnxruntime's
``MatMulInteger`` (u8 x s8 -> int32) makes all 6 digit products in one call, exact while
``K * 255 * 128 < 2**31``, and a compiled pass adds them up with their shifts. On a CPU
with AVX-512 VNNI (``vpdpbusd`` accumulates in int32) that is 2-3x faster than one
float64 product for the 3x3 and wide 1x1 convolutions (measured, one thread: 3136 x 576 x
64: 4.3 -> 1.5 ms; 49 x 4608 x 512: 6.4 -> 2.0 ms) and slower for narrow reductions
(3136 x 64 x 256: 2.3 -> 5.8 ms, the int32 outputs dominate), hence the threshold
:data:`DIGITS_MIN_K`. Without VNNI the kernel sums pairs of u8 x s8 products in int16
with saturation (AVX2 ``vpmaddubsw``), and u8 x u8 has no fast kernel (6 passes took
1.7 - 2.5x the float64 time); so a probe with saturating operands (:func:`digit_products_exact`)
decides once per process, and where it fails every product stays float64. Where the CPU
and OS offer Intel AMX tiles, the digit products run on them instead
(:mod:`tessera.sim.amx`, probed the same way: :func:`amx_products_exact`), 1.3 - 2.8x
faster than onnxruntime's kernel on the simulator's shapes, and faster than float64
products down to K = 64 (:data:`AMX_DIGITS_MIN_K`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import operator
import os
import queue
import threading

import numpy as np
from numba import njit

from tessera import numerics
from tessera.sim import amx
from tessera.sim.vector import RINT_MAGIC, uix, wide_vectors


def gather_windows(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads_tl: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
    fill: int = 0,
) -> np.ndarray:
    """``x`` [H, W, C] -> windows [OH, OW, kh, kw, C]; out-of-range positions read ``fill``."""
    h, w, c = x.shape
    kh, kw = kernel
    sh, sw = stride
    pt, pl = pads_tl
    dh, dw = dilation
    oh, ow = out_hw
    need_h = (oh - 1) * sh + (kh - 1) * dh + 1
    need_w = (ow - 1) * sw + (kw - 1) * dw + 1
    pb = max(0, need_h - pt - h)
    pr = max(0, need_w - pl - w)
    xp = np.full((h + pt + pb, w + pl + pr, c), fill, dtype=x.dtype)
    xp[pt : pt + h, pl : pl + w] = x
    s0, s1, s2 = xp.strides
    return np.lib.stride_tricks.as_strided(
        xp,
        shape=(oh, ow, kh, kw, c),
        strides=(s0 * sh, s1 * sw, s0 * dh, s1 * dw, s2),
        writeable=False,
    )


def im2col(
    grid: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads_tl: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> np.ndarray:
    """Grid ints [H, W, C] -> float64 rows [OH*OW, kh*kw*C], one per output pixel."""
    win = gather_windows(grid.astype(np.float64), kernel, stride, pads_tl, dilation, out_hw)
    return np.ascontiguousarray(win.reshape(out_hw[0] * out_hw[1], -1))


#: While :func:`record_products` is active: the (outputs, reduction, pixels, activation
#: digits, weight digits) of every exact product made; the digits are 0 for a float64
#: product.
_PRODUCTS: list[tuple[int, int, int, int, int]] | None = None


@contextlib.contextmanager
def record_products():
    """Collect the shape and kind of every exact product made inside (``tessera bench
    sim`` times the products of a run alone, to show how much of the simulator's time
    they set)."""
    global _PRODUCTS
    _PRODUCTS = shapes = []
    try:
        yield shapes
    finally:
        _PRODUCTS = None


def gemm_exact(cols: np.ndarray, weight_grid: np.ndarray, skip_zero: bool = True) -> np.ndarray:
    """Exact integer accumulators [O, P] of ``weight_grid @ cols.T``, as float64 (see the
    module doc): one row per output channel, the orientation OpenBLAS runs up to twice
    as fast for these shapes (few pixels, many outputs) and the simulator's vector path
    reads lane-major. With ``skip_zero``, all-zero weight columns (channel padding) are
    left out: they add nothing.
    """
    wg = weight_grid.astype(np.float64, copy=False)
    if skip_zero:
        used = np.flatnonzero(np.any(wg != 0, axis=0))
        if used.size < 0.75 * wg.shape[1]:
            wg, cols = wg[:, used], cols[:, used]
    if _PRODUCTS is not None:
        _PRODUCTS.append((wg.shape[0], wg.shape[1], cols.shape[0], 0, 0))
    return wg @ cols.T


def mvu(
    grid: np.ndarray,
    weight_grid: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads_tl: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> np.ndarray:
    """Exact conv on grids: ``grid`` [H, W, CBin*N] ints, ``weight_grid`` [O, kh*kw*CBin*N].

    Returns int64 accumulators [OH*OW, O].
    """
    cols = im2col(grid, kernel, stride, pads_tl, dilation, out_hw)
    return gemm_exact(cols, weight_grid).T.astype(np.int64)


def pool(
    grid: np.ndarray,
    kind_max: bool,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads_tl: tuple[int, int],
    out_hw: tuple[int, int],
) -> np.ndarray:
    """Lane-wise window max or exact sum on the grid: [H, W, C] -> [OH, OW, C]."""
    win = gather_windows(grid, kernel, stride, pads_tl, (1, 1), out_hw)
    return win.max(axis=(2, 3)) if kind_max else win.sum(axis=(2, 3))


def weight_grid(tiles_q: np.ndarray, tiles_e: np.ndarray, w_floor: int, ob: int) -> np.ndarray:
    """Tiles [ob*K, N, N] ordered [ob][kpos][cb] -> grid matrix [ob*N, K*N]."""
    t, n, _ = tiles_q.shape
    k = t // ob
    if np.any(tiles_e < w_floor):
        raise ValueError("weight tile exponent below the layer's floor")
    g = np.left_shift(tiles_q, (tiles_e - w_floor)[..., None])  # [t, row, col]
    return g.reshape(ob, k, n, n).transpose(0, 2, 1, 3).reshape(ob * n, k * n)


def read_clamped_grid(
    q: np.ndarray, e: np.ndarray, emax: int, window: int
) -> tuple[np.ndarray, int]:
    """Blocks [H, W, CB, N] -> grid ints [H, W, CB*N] and the grid exponent."""
    floor = emax - window
    g = numerics.to_grid(q, e, floor)
    h, w, cb, n = q.shape
    return g.reshape(h, w, cb * n), floor


# --------------------------------------------------------------------------- simulator
#
# The instruction simulator's fast path: grids and accumulators as exact float64
# integers; accumulators lane-major ([B*N, P], a row per output channel), as the vector
# path after the product (:func:`tessera.sim.vector.chain_vectors`) reads them. Every
# grid value and every product of two is below ``2**53`` and so exact in float64 (the
# compiler bounds the accumulator, see the module doc).


def pow2(e: np.ndarray | int, dtype=np.float64) -> np.ndarray:
    """Exact ``2**e`` for integer ``e`` (0 below the float type's range)."""
    return np.ldexp(dtype(1), np.asarray(e, dtype=np.int32))


def grid_f64(q: np.ndarray, e: np.ndarray, floor: int) -> np.ndarray:
    """:func:`numerics.to_grid` on storage blocks ``q`` [..., N] (any int dtype), ``e`` [...].

    ``rint(q * 2**(e - floor))``: exact for ``e >= floor``, and for ``e < floor`` it is the
    clamp's ``rne_shift(q, floor - e)`` (the clamped block then sits at shift 0): ``np.rint``
    rounds half to even, and scaling by a power of two only moves the binary point (a
    result below the smallest normal float is < 0.5 and rounds to 0 either way).
    """
    g = q.astype(np.float64)
    g *= pow2(e.astype(np.int64) - floor)[..., None]
    return np.rint(g, out=g)


def weight_grid_f64(tq: np.ndarray, te: np.ndarray, w_floor: int, ob: int) -> np.ndarray:
    """:func:`weight_grid` as float64, from raw tiles ``tq`` [ob*K, N, N], ``te`` [ob*K, N]."""
    t, n, _ = tq.shape
    k = t // ob
    if np.any(te < w_floor):
        raise ValueError("weight tile exponent below the layer's floor")
    scale = pow2(te.astype(np.int64) - w_floor)  # [t, row]
    out = np.empty((ob, n, k, n))
    np.multiply(
        tq.reshape(ob, k, n, n).transpose(0, 2, 1, 3),
        scale.reshape(ob, k, n, 1).transpose(0, 2, 1, 3),
        out=out,
    )
    return out.reshape(ob * n, k * n)


@functools.lru_cache(maxsize=64)
def _grid_factors(floor: int) -> np.ndarray:
    """:func:`grid_f64`'s factor ``2**(e - floor)`` for every int8 exponent, at ``e + 128``
    (the compiled kernels scale blocks as they read them). Read-only: it is shared."""
    factors = pow2(np.arange(-128, 128) - floor)
    factors.flags.writeable = False
    return factors


def pool_lanes(
    q: np.ndarray,
    e: np.ndarray,
    floor: int,
    kind_max: bool,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads_tl: tuple[int, int],
    out_hw: tuple[int, int],
) -> np.ndarray:
    """:func:`pool` of :func:`grid_f64` ``(q, e, floor)``, lane-major: storage blocks ``q``
    [H, W, CB, N], ``e`` [H, W, CB] -> window maxima or exact sums [CB*N, OH*OW] (as the
    vector path reads them), positions outside the input reading 0.

    One compiled pass that scales each block as it reads it: the grid, the unrolled
    windows and the transpose are never materialised (the network's first max pool is
    a 112 x 112 x 64 input).
    """
    scale = _grid_factors(floor)
    pixels = out_hw[0] * out_hw[1]
    lanes = np.empty((q.shape[2] * q.shape[3], pixels))
    step = max(64, -(-pixels // (4 * parallel_workers())))

    def band(p0: int) -> None:
        p1 = min(pixels, p0 + step)
        pixel_major = np.empty((p1 - p0, lanes.shape[0]))
        _pool_pixels(q, e, scale, kind_max, *kernel, *stride, *pads_tl, out_hw[1], p0,
                     pixel_major)  # fmt: skip
        lanes[:, p0:p1] = pixel_major.T

    run_parallel(band, range(0, pixels, step))
    return lanes


@njit(cache=True, nogil=True)
def _pool_pixels(q, e, scale, kind_max, kh, kw, sh, sw, pt, pl, ow, first, out) -> None:
    """Output pixels ``first..first+len(out)`` (pixel-major) of :func:`pool_lanes`."""
    h, w, cb, n = q.shape
    acc = np.empty(n)
    for i in range(out.shape[0]):
        p = first + i
        y0, x0 = (p // ow) * sh - pt, (p % ow) * sw - pl
        for b in range(cb):
            # A window position outside the input reads 0.
            outside = not (0 <= y0 and y0 + kh <= h and 0 <= x0 and x0 + kw <= w)
            for lane in range(n):
                acc[lane] = 0.0 if (outside or not kind_max) else -np.inf
            for y in range(max(y0, 0), min(y0 + kh, h)):
                for x in range(max(x0, 0), min(x0 + kw, w)):
                    s = scale[e[y, x, b] + 128]
                    for lane in range(n):
                        g = (q[y, x, b, lane] * s + RINT_MAGIC) - RINT_MAGIC
                        acc[lane] = max(acc[lane], g) if kind_max else acc[lane] + g
            for lane in range(n):
                out[i, uix(b * n + lane)] = acc[lane]


@functools.lru_cache(maxsize=64)
def _all_channels(count: int) -> np.ndarray:
    """``arange(count)``, shared (every layer's windows ask for one; none writes it). Left
    writeable: a read-only array is another type to numba, so every kernel taking
    channels would be compiled twice."""
    return np.arange(count)


class Windows:
    """The kernel windows of every output pixel over an input tensor's grid, unrolled
    on demand: ``rows(y0, y1)`` is the ``[(y1-y0)*OW, kh*kw*C]`` block of :func:`im2col`
    of :func:`grid_f64` (channels ``chans`` only, if given) for output rows ``y0..y1``.

    The grid is never built: each call scales the stored blocks as it reads them, in one
    compiled pass, so callers working band by band on threads get their band's rows in
    cache, and a whole float64 grid is neither written nor read back. The blocks are
    copied (8-bit mantissas: an eighth of the grid) so later DRAM writes cannot change
    the rows, unless the caller knows none comes while the windows are in use
    (``copy=False``).
    """

    def __init__(
        self, q, e, floor, chans, kernel, stride, pads_tl, dilation, out_hw, copy: bool = True
    ) -> None:
        how = True if copy else None  # None: only where the dtype needs it
        self.q, self.e = np.array(q, copy=how), np.array(e, dtype=np.int8, copy=how)
        n = q.shape[3]
        self.all_channels = chans is None
        self.chans = _all_channels(q.shape[2] * n) if chans is None else np.asarray(chans)
        self.scale = _grid_factors(floor)
        self.geometry = (*kernel, *stride, *pads_tl, *dilation)
        self.out_hw = out_hw
        # Every window one input pixel, all channels: rows are the input's pixels.
        self._pixelwise = (
            self.all_channels
            and self.geometry == (1, 1, 1, 1, 0, 0, 1, 1)
            and out_hw == q.shape[:2]
        )
        self.k = kernel[0] * kernel[1] * len(self.chans)
        self._planes: np.ndarray | None = None  # None also when they do not fit
        self._planes_made = False
        self._first_digit = 0
        self._lock = threading.Lock()

    def rows(self, y0: int, y1: int) -> np.ndarray:
        out = np.empty(((y1 - y0) * self.out_hw[1], self.k))
        _unroll(
            self.q, self.e, self.scale, self.all_channels, self.chans, *self.geometry,
            self.out_hw[1], y0, y1, out,
        )  # fmt: skip
        return out

    def make_digit_planes(self) -> None:
        """Make the input's digit planes for :meth:`digit_rows` (once), in bands of input
        rows on the thread pool: called before the bands of a product start, they need
        not wait for the first of them to make all the planes."""
        with self._lock:
            if self._planes_made:
                return
            h, w = self.q.shape[:2]
            planes = np.empty((ACT_DIGITS, h, w, len(self.chans)), np.uint8)
            step = max(1, -(-h // (2 * parallel_workers())))
            ors: list[int] = []

            def band(y0: int) -> None:
                ors.append(_digit_planes(self.q, self.e, self.scale, self.all_channels,
                                         self.chans, y0, min(h, y0 + step), planes))  # fmt: skip

            run_parallel(band, range(0, h, step))
            ok = min(ors, default=0) >= 0
            bits = functools.reduce(operator.or_, ors, 0)
            first = 0
            while ok and first < ACT_DIGITS - 1 and not (bits >> (8 * first)) & 255:
                first += 1  # the offset 2**23 has no bits there, so these are 0
            self._planes = planes[first:] if ok else None
            self._first_digit, self._planes_made = first, True

    def digit_rows(self, y0: int, y1: int) -> tuple[np.ndarray, int] | None:
        """``rows(y0, y1) + 2**(8*ACT_DIGITS - 1)`` as unsigned byte planes ``[digits,
        (y1-y0)*OW, K]`` (least significant plane first, each plane C-contiguous), and
        the index of the first plane (its weight is ``256**first``), for
        :class:`WeightOperand`; ``None`` if a value does not fit :data:`ACT_DIGITS` bytes.

        The input's digit planes are made once (each input value converted once, not
        once per window it falls in); the rows are then byte copies out of them, or,
        where every window is one input pixel of every channel (a 1x1 convolution at
        stride 1, unpadded), views of them. Low planes that are zero everywhere are left
        out: where a tensor's block exponents all lie 8 or more above its window's floor
        (as in every ResNet-50 layer input), each product then takes two activation
        digits, not three.
        """
        self.make_digit_planes()
        if self._planes is None:
            return None
        digits = self._planes.shape[0]
        p = (y1 - y0) * self.out_hw[1]
        if self._pixelwise:
            return self._planes[:, y0:y1].reshape(digits, p, self.k), self._first_digit
        out = np.empty((digits, p, self.k), np.uint8)
        planes, dst = self._planes, out
        words = planes.shape[3] % 8 == 0  # copy 8 bytes at a time
        if words:
            planes, dst = planes.view(np.uint64), out.view(np.uint64)
        fills = _zero_digits(ACT_DIGITS, words)[self._first_digit :]
        _gather_digit_rows(planes, fills, *self.geometry, self.out_hw[1], y0, y1, dst)
        return out, self._first_digit


@njit(cache=True, nogil=True)
def _window_pixels(h, w, kh, kw, sh, sw, pt, pl, dh, dw, ow, y0, y1):
    """The input pixel (``y * w + x``, or -1 outside the input) at each window position
    of each output pixel of rows ``y0..y1``: [(y1-y0)*OW, kh*kw]."""
    out = np.empty(((y1 - y0) * ow, kh * kw), np.int64)
    for oy in range(y0, y1):
        for ox in range(ow):
            r = (oy - y0) * ow + ox
            for dy in range(kh):
                iy = oy * sh - pt + dy * dh
                for dx in range(kw):
                    ix = ox * sw - pl + dx * dw
                    inside = 0 <= iy < h and 0 <= ix < w
                    out[r, dy * kw + dx] = iy * w + ix if inside else -1
    return out


@njit(cache=True, nogil=True)
def _unroll(q, e, scale, all_channels, chans, kh, kw, sh, sw, pt, pl, dh, dw, ow, y0, y1, out):
    h, w, cb, n = q.shape
    c = chans.shape[0]
    pixels = _window_pixels(h, w, kh, kw, sh, sw, pt, pl, dh, dw, ow, y0, y1)
    row = np.empty(cb * n)  # one input pixel's grid values, when only ``chans`` are kept
    for r in range(pixels.shape[0]):
        for t in range(pixels.shape[1]):
            col = t * c
            pix = pixels[r, t]
            iy, ix = pix // w, pix % w
            if pix < 0:
                for j in range(c):
                    out[r, uix(col + j)] = 0.0
                continue
            dst = out[r] if all_channels else row
            at = col if all_channels else 0
            for b in range(cb):
                s = scale[e[iy, ix, b] + 128]
                for lane in range(n):
                    v = q[iy, ix, b, lane] * s
                    dst[uix(at + b * n + lane)] = (v + RINT_MAGIC) - RINT_MAGIC
            if not all_channels:
                for j in range(c):
                    out[r, uix(col + j)] = row[chans[j]]


@njit(cache=True, nogil=True)
def _digit_planes(q, e, scale, all_channels, chans, y0, y1, out) -> int:
    """Byte digits of ``grid + 2**(8*D - 1)`` of the input values of rows ``y0..y1``
    (channels ``chans``) into ``out`` [D, H, W, C]. Returns the OR of all those offset
    values (a zero byte in it: that plane is all zero), or -1 if a value is outside
    ``[-2**(8*D-1), 2**(8*D-1))``."""
    wide_vectors()
    _h, w, cb, n = q.shape
    c = chans.shape[0]
    digits = out.shape[0]
    half = np.int64(1) << (8 * digits - 1)
    row = np.empty(c, np.int64)
    bits = np.int64(0)
    for y in range(y0, y1):
        for x in range(w):
            if all_channels:
                for b in range(cb):
                    s = scale[e[y, x, b] + 128]
                    for lane in range(n):
                        g = (q[y, x, b, lane] * s + RINT_MAGIC) - RINT_MAGIC
                        row[uix(b * n + lane)] = np.int64(g) + half
            else:
                for j in range(c):
                    b, lane = chans[j] // n, chans[j] % n
                    g = (q[y, x, b, lane] * scale[e[y, x, b] + 128] + RINT_MAGIC) - RINT_MAGIC
                    row[j] = np.int64(g) + half
            bad = False
            pixel_bits = np.int64(0)
            for j in range(c):
                bad |= (row[j] < 0) | (row[j] >= 2 * half)
                pixel_bits |= row[j]
            if bad:
                return -1
            bits |= pixel_bits
            for d in range(digits):
                if (pixel_bits >> (8 * d)) & 255:
                    for j in range(c):
                        out[uix(d), uix(y), uix(x), uix(j)] = (row[uix(j)] >> (8 * d)) & 255
                else:  # a zero digit everywhere (the low one, in ResNet-50): stores only
                    for j in range(c):
                        out[uix(d), uix(y), uix(x), uix(j)] = 0
    return bits


@functools.cache
def _zero_digits(digits: int, words: bool) -> np.ndarray:
    """The byte digits of 0 + ``2**(8*digits - 1)``, each repeated to a uint64 if
    ``words`` (what :func:`_gather_digit_rows` writes outside the input)."""
    fills = np.array([(1 << (8 * digits - 1)) >> (8 * d) & 255 for d in range(digits)])
    if words:
        return fills.astype(np.uint64) * np.uint64(0x0101010101010101)
    return fills.astype(np.uint8)


@njit(cache=True, nogil=True)
def _gather_digit_rows(planes, fills, kh, kw, sh, sw, pt, pl, dh, dw, ow, y0, y1, out) -> None:
    """The windows of output rows ``y0..y1`` out of digit planes [D, H, W, C] into
    ``out`` [D, P, kh*kw*C]; positions outside the input read ``fills[d]`` (the digits
    of 0). Either as bytes or, when C allows, as 8-byte words (both views alike)."""
    digits, h, w, c = planes.shape
    pixels = _window_pixels(h, w, kh, kw, sh, sw, pt, pl, dh, dw, ow, y0, y1)
    for d in range(digits):
        for r in range(pixels.shape[0]):
            for t in range(pixels.shape[1]):
                col = t * c
                pix = pixels[r, t]
                if pix >= 0:
                    src = planes[d, pix // w, pix % w]
                    for j in range(c):
                        out[d, r, uix(col + j)] = src[j]
                else:
                    for j in range(c):
                        out[d, r, uix(col + j)] = fills[d]


#: Reductions from which :class:`WeightOperand` uses byte-digit products (if exact on
#: this CPU): below it the int32 digit products (4 or 6 per accumulator) cost more than
#: the float64 product (measured with 6: K = 64 2.5x slower, K = 256 1.6x faster; with
#: 4, 3136 pixels x K = 64 x 256 outputs still took 6.6 ms against 1.9 ms).
DIGITS_MIN_K = 192
#: The same on AMX tiles, where a 32 x 32 block's digit products cost little beside its
#: int64 sum and lane-major write: ResNet-50's products with K = 64, 128 and 147 take
#: 0.74x, 0.45x and 0.70x the float64 time there, with their digit planes.
AMX_DIGITS_MIN_K = 64
#: Byte digits of the activation grid: mantissa_bits + act_exp_window <= 24 bits (a
#: wider grid does not fit: :meth:`Windows.digit_rows` says so and the product is float64).
ACT_DIGITS = 3
_DIGIT_SESSION = None
_DIGIT_EXACT: bool | None = None
_AMX_EXACT: bool | None = None
_DIGIT_LOCK = threading.Lock()
#: Set by :func:`float64_products`: every product float64 (to compare the two ways).
_FORCE_FLOAT64 = False


def matmul_integer_session(b: np.ndarray | None = None):
    """onnxruntime session of one ``MatMulInteger`` (u8 A [M, K] x s8 B [K, N] -> int32)
    with one intra-op thread (the simulator runs several at once on its own threads).
    With ``b``, B is that constant: onnxruntime packs it once, not on every call."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, ["m", "k"])]
    if b is None:
        inputs.append(helper.make_tensor_value_info("B", TensorProto.INT8, ["k", "n"]))
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "digit_products",
        inputs,
        [helper.make_tensor_value_info("Y", TensorProto.INT32, ["m", "n"])],
        [] if b is None else [numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = False
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _digit_session():
    """The shared :func:`matmul_integer_session` whose B is an input."""
    global _DIGIT_SESSION
    with _DIGIT_LOCK:
        if _DIGIT_SESSION is None:
            _DIGIT_SESSION = matmul_integer_session()
    return _DIGIT_SESSION


def digit_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int32 ``a @ b`` of u8 ``a`` [M, K] and s8 ``b`` [K, N] (exact where
    :func:`digit_products_exact`)."""
    return _digit_session().run(None, {"A": a, "B": b})[0]


def digit_products_exact() -> bool:
    """Whether this CPU's u8 x s8 ``MatMulInteger`` is exact on the digits' whole range,
    probed once per process with the operands that saturate int16 pair sums (all 255
    against all 127 and all -128) and with random ones, at the row counts products use,
    with B as an input and as a constant (packed once: another kernel may run it)."""
    global _DIGIT_EXACT
    if _DIGIT_EXACT is None:
        _DIGIT_EXACT = all(
            np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64))
            for a, b in _probe_cases()
            for got in (digit_product(a, b), matmul_integer_session(b).run(None, {"A": a})[0])
        )
    return _DIGIT_EXACT


def _probe_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Digit products whose exactness decides a kernel: the operands that saturate
    int16 pair sums (all 255 against all 127 and all -128), the longest reduction the
    digits allow against all 255s, and random ones at the row counts products use."""
    rng = np.random.default_rng(0)
    k_max = (2**31 - 1) // (255 * 128)
    return [
        (np.full((ACT_DIGITS, 512), 255, np.uint8), np.full((512, 3), 127, np.int8)),
        (np.full((ACT_DIGITS, 512), 255, np.uint8), np.full((512, 3), -128, np.int8)),
        (np.full((33, k_max), 255, np.uint8), np.full((k_max, 2), -128, np.int8)),
        (
            rng.integers(0, 256, (ACT_DIGITS * 37, 1000), dtype=np.uint8),
            rng.integers(-128, 128, (1000, 2 * 40), dtype=np.int8),
        ),
    ]


def amx_products_exact() -> bool:
    """Whether digit products run on AMX tiles (:mod:`tessera.sim.amx`): the CPU and OS
    offer them and the probe's products are exact (checked once per process)."""
    global _AMX_EXACT
    if _AMX_EXACT is None:
        _AMX_EXACT = amx.available() and all(
            np.array_equal(_amx_probe_product(a, b), a.astype(np.int64) @ b.astype(np.int64))
            for a, b in _probe_cases()
        )
    return _AMX_EXACT


def _amx_probe_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` through :func:`amx.digit_accumulators` (one digit each, no offset)."""
    out = np.empty((b.shape[1], a.shape[0]))
    amx.digit_accumulators(a[None], amx.PackedWeights([b]), 0, np.zeros(b.shape[1], np.int64), out)
    return out.T


def pack_digits(digits: list[np.ndarray]):
    """Weight digits (s8 [K, O] each, least significant first), packed once for many
    :func:`digit_accumulators` calls: laid out for AMX tiles where those make the
    products, else all side by side ([K, digits*O]) in an onnxruntime session of their
    own."""
    if amx_products_exact():
        return amx.PackedWeights(digits)
    return matmul_integer_session(np.ascontiguousarray(np.concatenate(digits, axis=1)))


def digit_accumulators(packed, a: np.ndarray, first: int, corr: np.ndarray, out: np.ndarray):
    """The accumulators ``out`` [O, P] (float64) of activation digit planes ``a`` [D, P, K]
    (the first of weight ``256**first``) and weights packed by :func:`pack_digits`:
    the digit products added up with their weights, less ``corr`` (the offset's share)."""
    if isinstance(packed, amx.PackedWeights):
        amx.digit_accumulators(a, packed, first, corr, out)
        return
    y = packed.run(None, {"A": np.ascontiguousarray(a).reshape(-1, a.shape[-1])})[0]
    outs = out.shape[0]
    add_digit_products(y, a.shape[1], first, a.shape[0], y.shape[1] // outs, outs, corr, out)


@contextlib.contextmanager
def float64_products():
    """Make every product inside a float64 one (tests compare both ways bit for bit)."""
    global _FORCE_FLOAT64
    old, _FORCE_FLOAT64 = _FORCE_FLOAT64, True
    try:
        yield
    finally:
        _FORCE_FLOAT64 = old


def _balanced_digits(grid: np.ndarray) -> list[np.ndarray]:
    """Signed byte digits ``d_j`` in [-128, 127] with ``grid == sum(d_j * 256**j)``."""
    rest = grid.astype(np.int64)
    digits = []
    while True:
        d = ((rest + 128) & 255) - 128
        digits.append(d.astype(np.int8))
        rest = (rest - d) >> 8
        if not rest.any():
            return digits


@njit(cache=True, nogil=True)
def add_digit_products(y, pixels, act_first, act_digits, w_digits, outs, correction, out) -> None:
    """``out[o, p] = sum_ij y[i*P + p, j*O + o] << 8*(act_first + i + j) - correction[o]``:
    the digit products added up with their weights, lane-major as the vector path reads
    them (16 pixels at a time, so both the reads and the transposed writes stay in cache)."""
    tile = 16
    acc = np.empty((tile, outs), np.int64)
    for p0 in range(0, pixels, tile):
        p1 = min(pixels, p0 + tile)
        for p in range(p0, p1):
            for o in range(outs):
                acc[p - p0, o] = -correction[o]
            for i in range(act_digits):
                for j in range(w_digits):
                    shift = 8 * (act_first + i + j)
                    for o in range(outs):
                        acc[p - p0, o] += np.int64(y[i * pixels + p, j * outs + o]) << shift
        for o in range(outs):
            for p in range(p0, p1):
                out[o, p] = acc[p - p0, o]


class WeightOperand:
    """A layer's float64 weight grid ``grid`` [O, K] and, made on first use, its byte
    digits, for exact products ``grid[c0:c1] @ windows.rows(y0, y1).T`` (:meth:`product`),
    as byte-digit products where those are exact and faster, else float64."""

    def __init__(self, grid: np.ndarray) -> None:
        self.grid = grid
        self._digits: list[np.ndarray] | None = None
        self._colsum: np.ndarray | None = None
        # A slice's digits as MatMulInteger's B operand; once used again (later runs),
        # a session of its own instead, with them packed once (bytes kept, for nbytes):
        # on the short bands of late layers, packing B on every call cost up to 40 %.
        self._slices: dict[tuple[int, int], np.ndarray] = {}
        self._packed: dict[tuple[int, int], tuple[object, int]] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        digits = sum(d.nbytes for d in self._digits or ())
        slices = sum(b.nbytes for b in self._slices.values())
        packed = sum(size for _, size in self._packed.values())
        return self.grid.nbytes + digits + slices + packed

    def _digit_count(self) -> int:
        """The weight digits the products take, or 0 where they are float64 ones (off,
        a short reduction, an inexact CPU kernel, or sums that could overflow)."""
        k = self.grid.shape[1]
        on_amx = amx_products_exact()
        if (
            _FORCE_FLOAT64
            or k < (AMX_DIGITS_MIN_K if on_amx else DIGITS_MIN_K)
            or not (on_amx or digit_products_exact())
        ):
            return 0
        w_digits = len(self._weight_digits())
        return w_digits if self._sums_fit(k, w_digits) else 0

    @staticmethod
    def _sums_fit(k: int, w_digits: int) -> bool:
        """Whether every digit sum (up to K products of 255 * 128) fits int32, and every
        shifted term of the int64 total fits too (weights wider than 16 bits, from a wider
        weight exponent window, take a third digit and a larger shift)."""
        largest = k * 255 * 128
        return largest < 2**31 and largest << (8 * (ACT_DIGITS + w_digits - 2)) < 2**63

    def _digit_sums(self, a: np.ndarray, first: int, c0: int, c1: int, out: np.ndarray):
        """:meth:`product`'s accumulators from digit planes ``a`` [D, P, K], with the weight
        digits of outputs ``c0..c1`` packed once (:func:`pack_digits`). On onnxruntime's
        kernel a slice is packed when it is used again and goes through the shared
        session the first time: a session per slice used once is not worth making, and a
        run's first products stay as fast."""
        key = (c0, c1)
        digits = [d[c0:c1].T for d in self._weight_digits()]
        corr = self._colsum[c0:c1]
        with self._lock:
            packed = self._packed.get(key)
            if packed is None and (self._slices.pop(key, None) is not None or amx_products_exact()):
                made = pack_digits(digits)  # tiles (their bytes) or a session (its B's)
                size = made.nbytes if isinstance(made, amx.PackedWeights) else None
                packed = self._packed[key] = (made, size or sum(d.nbytes for d in digits))
            elif packed is None:
                b = self._slices[key] = np.ascontiguousarray(np.concatenate(digits, axis=1))
        if packed is not None:
            digit_accumulators(packed[0], a, first, corr, out)
            return
        y = digit_product(np.ascontiguousarray(a).reshape(-1, a.shape[-1]), b)
        add_digit_products(y, a.shape[1], first, a.shape[0], len(digits), c1 - c0, corr, out)

    def _weight_digits(self) -> list[np.ndarray]:
        """The grid's balanced byte digits (made on first use)."""
        with self._lock:
            if self._digits is None:
                # grid + offset: the correction subtracts offset * (sum over K of grid)
                self._colsum = self.grid.astype(np.int64).sum(axis=1) << (8 * ACT_DIGITS - 1)
                self._digits = _balanced_digits(self.grid)
            return self._digits

    def prepare(self, windows: Windows) -> None:
        """Make what :meth:`product` will read from ``windows`` before bands of products
        start on threads (the digit planes, if the products are byte-digit ones)."""
        if self._digit_count():
            windows.make_digit_planes()

    def product(self, windows: Windows, y0: int, y1: int, c0: int, c1: int) -> np.ndarray:
        """Exact accumulators [c1-c0, (y1-y0)*OW] (float64) of outputs ``c0..c1`` over
        output rows ``y0..y1`` of ``windows``."""
        w_digits = self._digit_count()
        if w_digits:
            a = windows.digit_rows(y0, y1)
            if a is not None:
                a, first = a
                act_digits, pixels = a.shape[:2]
                if _PRODUCTS is not None:
                    _PRODUCTS.append((c1 - c0, a.shape[2], pixels, act_digits, w_digits))
                out = np.empty((c1 - c0, pixels))
                self._digit_sums(a, first, c0, c1, out)
                return out
        return gemm_exact(windows.rows(y0, y1), self.grid[c0:c1], skip_zero=False)


# --------------------------------------------------------------------------- threads
#
# Work that splits into independent pieces (pixel bands of a layer) runs on a small
# thread pool; numpy releases the GIL in its loops and in BLAS. OpenBLAS is held to one
# thread meanwhile: two levels of threads would oversubscribe the cores, and OpenBLAS's
# spinning threads degrade badly when the machine is shared. Results do not depend on
# any of this (every piece is exact and written to its own slice).


class _Helpers:
    """The pool's threads: each takes a function from ``jobs`` and puts what it raised
    (``None`` if nothing) into the queue that came with it. Lighter than futures: a run
    hands work over about a hundred times, and ``ThreadPoolExecutor``'s submit and
    result were about a sixth of the time it spent outside those sections."""

    def __init__(self, count: int) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(count):
            threading.Thread(target=self._serve, name=f"tessera-sim-{i}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, done = self.jobs.get()
            try:
                fn()
            except BaseException as exc:  # handed to the caller, which raises it
                done.put(exc)
            else:
                done.put(None)


_POOL: _Helpers | None = None
_POOL_LOCK = threading.Lock()
_BLAS: tuple | None = None


@functools.cache
def parallel_workers() -> int:
    """Threads used for band-parallel work (the CPUs this process may run on, at most 4;
    asked once: a simulator run splits its work a hundred times)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def _openblas() -> tuple:
    """(get, set) thread-count functions of numpy's bundled OpenBLAS, or ``()``."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ()
        libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
        for path in glob.glob(os.path.join(libs, "*openblas*.so*")):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            names = (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", ""))
            for pre, suf in names:
                get = getattr(lib, f"{pre}get_num_threads{suf}", None)
                put = getattr(lib, f"{pre}set_num_threads{suf}", None)
                if get is not None and put is not None:
                    put.argtypes = [ctypes.c_int]
                    _BLAS = (get, put)
                    break
            if _BLAS:
                break
    return _BLAS


_BLAS_LOCK = threading.Lock()
_BLAS_HOLD = [0, 0]  # [holders, thread count to restore]


@contextlib.contextmanager
def blas_single_thread():
    """Hold OpenBLAS to one thread (yields whether it could); nests across threads. A
    thread already inside a hold (a simulator run; its parallel sections, a hundred a
    run, ask again) only counts the nesting."""
    if getattr(_BLAS_HELD, "depth", 0) > 0:
        _BLAS_HELD.depth += 1
        try:
            yield True
        finally:
            _BLAS_HELD.depth -= 1
        return
    blas = _openblas()
    if not blas:
        yield False
        return
    get, put = blas
    with _BLAS_LOCK:
        if _BLAS_HOLD[0] == 0:
            _BLAS_HOLD[1] = get()
            put(1)
        _BLAS_HOLD[0] += 1
    _BLAS_HELD.depth = getattr(_BLAS_HELD, "depth", 0) + 1
    try:
        yield True
    finally:
        _BLAS_HELD.depth -= 1
        with _BLAS_LOCK:
            _BLAS_HOLD[0] -= 1
            if _BLAS_HOLD[0] == 0:
                put(_BLAS_HOLD[1])


#: How many :func:`blas_single_thread` holds this thread is inside.
_BLAS_HELD = threading.local()


_IN_PARALLEL = threading.local()


def run_parallel(fn, items) -> None:
    """``fn(item)`` for every item, on the thread pool when that can help.

    The caller works through the items too, beside ``workers - 1`` pool threads, each
    taking the next item when it is free: on a shared machine a thread that is not
    scheduled for a while then delays only its current item, not a fixed share.
    """
    global _POOL
    items = list(items)
    workers = parallel_workers()
    nested = getattr(_IN_PARALLEL, "active", False)  # never wait on the pool from it
    if len(items) < 2 or workers < 2 or nested:
        for it in items:
            fn(it)
        return
    with blas_single_thread() as single:
        if not single:  # BLAS threads cannot be held back: do not add ours on top
            for it in items:
                fn(it)
            return
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = _Helpers(workers - 1)
        pending = iter(items)
        lock = threading.Lock()

        def drain() -> None:
            _IN_PARALLEL.active = True
            try:
                while True:
                    with lock:
                        item = next(pending, _DONE)
                    if item is _DONE:
                        return
                    fn(item)
            finally:
                _IN_PARALLEL.active = False

        done: queue.SimpleQueue = queue.SimpleQueue()  # this call's own: callers may overlap
        helpers = min(workers, len(items)) - 1
        for _ in range(helpers):
            _POOL.jobs.put((drain, done))
        try:
            drain()
        finally:
            errors = [done.get() for _ in range(helpers)]
        for exc in errors:
            if exc is not None:
                raise exc


_DONE = object()
