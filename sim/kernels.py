"""Whole-feature-map kernels shared by the instruction simulator and the reference.

They apply :mod:`tessera.numerics` to a whole layer at once. The MVU sum is done as a
float64 matrix product on the tensor/weight grids; it is exact because the compiler
guarantees every partial sum stays below ``2**53`` (``numerics.accumulator_bound_bits``
<= 54 with a sign bit, i.e. magnitudes < 2**53), so any summation order BLAS picks gives
the same integers (each product of two grid values has at most 16 significant bits, so
it is exact too, fused or not).

The first part (int64, pixel-major) is what the reference executor uses. The second
part is the instruction simulator's fast path: the same numerics on exact float
integers in a lane-major layout (``lm_*``, with the exactness argument next to them),
window unrolling band by band (:class:`Windows`), and a small thread pool for
independent bands (:func:`run_parallel`).

Why not int8 or float32 products: the grid values are up to 24-bit (8-bit mantissas
shifted by up to the activation window) and the weight grid up to 16-bit, and sums run
over thousands of terms to ~2**41 and more. float32 holds 24 bits, so no split of the
operands keeps its partial sums exact at useful sizes; int8 x int8 -> int32 products
(onnxruntime MatMulInteger) are exact but need 2 x 2 byte digits, four passes, which
measured slower than one float64 product here (and its u8 x s8 kernel saturates int16
pair sums on AVX2 without VNNI, so only u8 x u8 would be exact at all).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tessera import numerics


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


def gemm_exact(cols: np.ndarray, weight_grid: np.ndarray) -> np.ndarray:
    """Exact integer accumulators [P, O] of ``cols @ weight_grid.T`` (see module doc)."""
    wg = weight_grid.astype(np.float64)
    used = np.any(wg != 0, axis=0)
    if used.mean() < 0.75:  # skip all-zero columns (channel padding): same exact sums
        return (cols[:, used] @ wg[:, used].T).astype(np.int64)
    return (cols @ wg.T).astype(np.int64)


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
    return gemm_exact(im2col(grid, kernel, stride, pads_tl, dilation, out_hw), weight_grid)


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


# --------------------------------------------------------------------------- lane-major
#
# The instruction simulator's fast path. Wide vectors are held *lane-major*: mantissas
# ``[N, B, P]`` (lane, output block, pixel) and exponents ``[B, P]`` (int64), so that every
# per-vector reduction runs over the leading axis with one long contiguous inner loop
# (an order of magnitude faster in numpy than reducing a short last axis), and
# per-vector factors broadcast along the leading axis. Wide mantissas are float32;
# accumulators, grids and ``vv_mul`` products are float64.
#
# Why this is exact. (1) Every value is an integer that its float type represents
# exactly: accumulators and grids are < 2**53 (the compiler bounds the accumulator, see
# the module doc), wide mantissas have at most 24 bits (``mfu_mantissa_bits <= 24``,
# stored constants 16), an aligned sum of two of them is < 2**24 in magnitude, and a
# ``vv_mul`` product (< 2**47) is formed in float64. Sums and maxima of such values are
# therefore exact. (2) Multiplying by ``2**-s`` only moves the binary point: the product
# is exact unless it falls below the smallest normal number, and then it is < 0.5, whose
# RNE result 0 is what any rounding of it gives too. (3) ``np.rint`` rounds half to even,
# so ``rint(x * 2**-s)`` is exactly :func:`tessera.numerics.rne_shift` ``(x, s)`` (which
# caps ``s`` at 62; every ``s >= 54`` gives 0 both ways). Roundings are always done in
# the input's float type before a narrowing store, never by the float32 cast itself.
# (4) ``np.frexp`` of an exact integer gives its bit length. Each function below is the
# same formula as its :mod:`tessera.numerics` counterpart step for step, with work
# skipped only where it is provably a no-op.

W32 = np.float32  #: dtype of wide mantissas


def pow2(e: np.ndarray | int, dtype=np.float64) -> np.ndarray:
    """Exact ``2**e`` for integer ``e`` (0 below the float type's range)."""
    return np.ldexp(dtype(1), np.asarray(e, dtype=np.int32))


def _neg_pow2(s: np.ndarray, dtype) -> np.ndarray:
    """``2**-s`` for integer ``s >= 0``, built from its exponent bits.

    ``s`` is capped (at 1000 for float64, 100 for float32) where that keeps the factor a
    normal number: every value scaled here is below ``2**53`` (float64) or ``2**25``
    (float32), so any shift from 54 (26) up rounds it to 0 whether capped or not.
    """
    if dtype == np.float64:
        return ((1023 - np.minimum(s, 1000)) << 52).view(np.float64)
    return ((127 - np.minimum(s, 100)).astype(np.int32) << 23).view(np.float32)


def _bit_length(amax: np.ndarray) -> np.ndarray:
    """Bit length of non-negative exact float integers (garbage <= 0 for 0), from the
    float's exponent field: ``x = 1.f * 2**(E - bias)`` has ``E - bias + 1`` bits."""
    if amax.dtype == np.float64:
        return (amax.view(np.int64) >> 52) - 1022
    return (amax.view(np.int32) >> 23).astype(np.int64) - 126


def _mark_zero(e: np.ndarray, amax: np.ndarray) -> None:
    """All-zero vectors get ``E_ZERO`` (in place)."""
    if amax.min() == 0:
        e[amax == 0] = numerics.E_ZERO


def lm_normalize(
    x: np.ndarray, lsb: np.ndarray | int, bits: int, amax: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`numerics.normalize` on lane-major ``x`` [N, B, P] -> (q, e [B, P], max |q|).

    ``x`` is float64 or float32 (exact integers) and is consumed (it may be overwritten or
    returned); ``q`` is float32 (``bits <= 24``). ``amax``, the lane-wise maximum
    magnitude [B, P] of ``x``, may be passed when the caller has it; the one of ``q`` is
    returned for the next step.
    """
    if amax is None:
        amax = np.abs(x).max(axis=0)
    lsb = np.asarray(lsb, dtype=np.int64)
    if amax.max() < 1 << (bits - 1):
        # Every vector fits: nothing to shift, round or saturate.
        e = np.array(np.broadcast_to(lsb, amax.shape))
        _mark_zero(e, amax)
        return (x if x.dtype == W32 else x.astype(W32)), e, amax.astype(W32)
    shift = np.maximum(_bit_length(amax) - (bits - 1), 0)
    e = lsb + shift
    _mark_zero(e, amax)
    f = _neg_pow2(shift, x.dtype)
    np.multiply(x, f, out=x)
    q = x if x.dtype == W32 else np.empty(x.shape, W32)
    np.rint(x, out=q)  # rounded in x's type, then stored (exactly) as float32
    lim = numerics.sat_limit(bits)
    # RNE is monotone and odd, so a vector's largest |q| is rint(amax * f); it exceeds
    # lim = 2**(bits-1) - 1 exactly when amax * f >= lim + 1/2 (a tie rounds to even).
    qmax = np.rint(amax * f)
    if qmax.max() > lim:
        np.clip(q, -lim, lim, out=q)
        np.minimum(qmax, lim, out=qmax)
    return q, e, qmax.astype(W32)


def lm_shift(x: np.ndarray, s: np.ndarray, inplace: bool = False) -> np.ndarray:
    """``numerics.rne_shift(x, s)`` for lane-major float32 ``x``, per-vector ``s >= 0``."""
    if s.max() == 0:
        return x
    f = _neg_pow2(s, W32)
    q = np.multiply(x, f, out=x) if inplace else x * f
    return np.rint(q, out=q)


def lm_align(xq, xe, yq, ye):
    """:func:`numerics.align`; consumes ``xq``; ``yq`` may be [N, B, 1] (a constant
    broadcast over pixels) and is left alone."""
    e = np.maximum(xe, ye)
    return lm_shift(xq, e - xe, inplace=True), lm_shift(yq, e - ye), e


def lm_wide_add(xq, xe, yq, ye, bits: int):
    """:func:`numerics.wide_add`; consumes ``xq`` (full shape), ``yq`` may broadcast."""
    xa, ya, e = lm_align(xq, xe, yq, ye)
    return lm_normalize(np.add(xa, ya, out=xa), e, bits)


def lm_wide_max(xq, xe, yq, ye, bits: int):
    xa, ya, e = lm_align(xq, xe, yq, ye)
    return lm_normalize(np.maximum(xa, ya, out=xa), e, bits)


def lm_wide_mul(xq, xe, cq, ce, bits: int):
    return lm_normalize(np.multiply(xq, cq, dtype=np.float64), xe + ce, bits)


def lm_wide_relu(xq, xe, bits: int):
    """:func:`numerics.wide_relu`; consumes ``xq``."""
    r = np.maximum(xq, np.zeros((1, 1, xq.shape[2]), xq.dtype), out=xq)
    return lm_normalize(r, xe, bits, amax=r.max(axis=0))


def lm_to_storage(
    q: np.ndarray, e: np.ndarray, bits: int, amax: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`numerics.to_storage`, lane-major; consumes ``q`` (``amax``: its max |q|)."""
    q, e, _ = lm_normalize(q, e, bits, amax)
    lim = numerics.sat_limit(bits)
    if e.max() > numerics.E_MAX:
        over = e > numerics.E_MAX
        up = np.where(over, np.clip(e - numerics.E_MAX, 0, 40), 0)
        q = np.clip(q * pow2(up, W32), -lim, lim)
        e = np.where(over, numerics.E_MAX, e)
    under = (e < numerics.E_MIN) & (e != numerics.E_ZERO) if e.min() < numerics.E_MIN else None
    if under is not None and under.any():
        q = lm_shift(q, np.where(under, numerics.E_MIN - e, 0))
        e = np.where(under, numerics.E_MIN, e)
        # Only a shift can zero a normalized non-zero vector.
        e = np.where(~np.any(q != 0, axis=0), numerics.E_ZERO, e)
    return q, e


def to_lane_major(x: np.ndarray, n: int, dtype=W32, rows: int = 128) -> np.ndarray:
    """Pixel-major blocks [P, B*N] -> lane-major [N, B, P] in ``dtype``, transposed in
    row blocks (cache-friendly)."""
    p = x.shape[0]
    x = x.reshape(p, -1, n)
    out = np.empty((n, x.shape[1], p), dtype)
    for i in range(0, p, rows):
        out[:, :, i : i + rows] = x[i : i + rows].transpose(2, 1, 0)
    return out


def grid_f64(q: np.ndarray, e: np.ndarray, floor: int) -> np.ndarray:
    """:func:`numerics.to_grid` on storage blocks ``q`` [..., N] (any int dtype), ``e`` [...].

    ``rint(q * 2**(e - floor))``: exact for ``e >= floor``, and for ``e < floor`` it is the
    clamp's ``rne_shift(q, floor - e)`` (the clamped block then sits at shift 0).
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


def used_columns(wg: np.ndarray) -> np.ndarray | None:
    """Indices of the weight-grid columns that are not all zero, if worth skipping the rest."""
    used = np.flatnonzero(np.any(wg != 0, axis=0))
    return used if used.size < 0.75 * wg.shape[1] else None


def lane_outer(wg: np.ndarray, n: int) -> np.ndarray:
    """Weight-grid rows reordered from [block][lane] to [lane][block], so the product
    ``wg @ cols.T`` comes out as lane-major vectors [N, B, P]."""
    o, k = wg.shape
    return np.ascontiguousarray(wg.reshape(o // n, n, k).transpose(1, 0, 2)).reshape(o, k)


def gemm_exact_t(
    cols: np.ndarray, wg: np.ndarray, used: np.ndarray | bool | None = True
) -> np.ndarray:
    """Exact accumulators transposed, ``wg @ cols.T`` [O, P], as float64 (see module doc).

    ``used``: columns to keep (all-zero weight columns, i.e. channel padding, add nothing);
    ``True`` finds them, ``None`` keeps all.
    """
    if used is True:
        used = used_columns(wg)
    if used is not None:
        return wg[:, used] @ cols[:, used].T
    return wg @ cols.T


class Windows:
    """The kernel windows of every output pixel over an input tensor's grid, unrolled
    on demand: ``rows(y0, y1)`` is the ``[(y1-y0)*OW, kh*kw*C]`` block of :func:`im2col`
    for output rows ``y0..y1``, so callers can work band by band in cache.

    The grid (:func:`grid_f64` of the blocks, channels ``chans`` only if given) is built
    once, zero-padded, in parallel row bands.
    """

    def __init__(self, q, e, floor, chans, kernel, stride, pads_tl, dilation, out_hw):
        h, w, cb, n = q.shape
        kh, kw = kernel
        (sh, sw), (pt, pl), (dh, dw) = stride, pads_tl, dilation
        oh, ow = self.out_hw = out_hw
        q2 = q.reshape(h, w, cb * n)
        scale = pow2(e.astype(np.int64) - floor)  # [H, W, CB]
        if chans is None:
            c = cb * n
            chan_block = None
        else:
            c = len(chans)
            chan_block = chans // n
        need_h = (oh - 1) * sh + (kh - 1) * dh + 1
        need_w = (ow - 1) * sw + (kw - 1) * dw + 1
        pb, pr = max(0, need_h - pt - h), max(0, need_w - pl - w)
        self.identity = kernel == (1, 1) and stride == (1, 1) and pads_tl == (0, 0)
        self.identity &= out_hw == (h, w)
        xp = np.empty((h + pt + pb, w + pl + pr, c))
        if pt or pb or pl or pr:
            xp[:pt], xp[pt + h :], xp[:, :pl], xp[:, pl + w :] = 0, 0, 0, 0

        def fill(y0: int) -> None:
            y1 = min(h, y0 + rows_per)
            dst = xp[pt + y0 : pt + y1, pl : pl + w]
            if chans is None:
                d4 = dst.reshape(y1 - y0, w, cb, n)
                np.multiply(q[y0:y1], scale[y0:y1, :, :, None], out=d4)
            else:
                np.multiply(q2[y0:y1, :, chans], scale[y0:y1, :, chan_block], out=dst)
            np.rint(dst, out=dst)

        # Parallel row bands only when each is worth a thread hand-off.
        rows_per = h if h * w * c < 1 << 18 else max(1, -(-h // parallel_workers()))
        run_parallel(fill, range(0, h, rows_per))
        self.grid = xp
        s0, s1, s2 = xp.strides
        self.win = np.lib.stride_tricks.as_strided(
            xp,
            shape=(oh, ow, kh, kw, c),
            strides=(s0 * sh, s1 * sw, s0 * dh, s1 * dw, s2),
            writeable=False,
        )
        self.k = kh * kw * c

    def rows(self, y0: int, y1: int) -> np.ndarray:
        if self.identity:
            return self.grid[y0:y1].reshape(-1, self.k)
        return self.win[y0:y1].reshape(-1, self.k)


# --------------------------------------------------------------------------- threads
#
# Work that splits into independent pieces (pixel bands of a layer) runs on a small
# thread pool; numpy releases the GIL in its loops and in BLAS. OpenBLAS is held to one
# thread meanwhile: two levels of threads would oversubscribe the cores, and OpenBLAS's
# spinning threads degrade badly when the machine is shared. Results do not depend on
# any of this (every piece is exact and written to its own slice).

_POOL: ThreadPoolExecutor | None = None
_BLAS: tuple | None = None


def parallel_workers() -> int:
    """Threads used for band-parallel work (the CPUs this process may run on, at most 4)."""
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
    """Hold OpenBLAS to one thread (yields whether it could); nests across threads."""
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
    try:
        yield True
    finally:
        with _BLAS_LOCK:
            _BLAS_HOLD[0] -= 1
            if _BLAS_HOLD[0] == 0:
                put(_BLAS_HOLD[1])


def run_parallel(fn, items) -> None:
    """``fn(item)`` for every item, on the thread pool when that can help."""
    global _POOL
    items = list(items)
    workers = parallel_workers()
    nested = threading.current_thread().name.startswith("tessera-sim")  # never wait on itself
    if len(items) < 2 or workers < 2 or nested:
        for it in items:
            fn(it)
        return
    with blas_single_thread() as single:
        if not single:  # BLAS threads cannot be held back: do not add ours on top
            for it in items:
                fn(it)
            return
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tessera-sim")
        for f in [_POOL.submit(fn, it) for it in items]:
            f.result()
