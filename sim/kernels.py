"""Whole-feature-map kernels shared by the instruction simulator and the reference.

They apply :mod:`tessera.numerics` to a whole layer at once. The MVU sum is done as one
float64 matrix product on the tensor/weight grids; it is exact because the compiler
guarantees every partial sum stays below ``2**53`` (``numerics.accumulator_bound_bits``
<= 54 with a sign bit, i.e. magnitudes < 2**53), so any summation order BLAS picks gives
the same integers.
"""

from __future__ import annotations

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
# ``[B, N, P]`` (output block, lane, pixel) as float64 and exponents ``[B, P]`` as int64,
# so that every per-vector reduction runs over the middle axis with a contiguous inner
# axis (an order of magnitude faster in numpy than reducing a short last axis).
#
# Why float64 is exact here: every mantissa, accumulator and intermediate below is an
# integer of magnitude < 2**53 (the compiler bounds the accumulator, see the module doc;
# wide mantissas have at most 24 bits, so an aligned sum has at most 25 and a
# ``vv_mul`` product at most 48). Such integers are exact float64 values; adding two of
# them whose sum stays < 2**53 is exact; multiplying by ``2**-s`` only changes the
# exponent (no float64 underflow is reachable: ``|x| >= 1`` and ``s < 1000``, and a
# product below 2**-1074 would round to 0, which is also the exact RNE result); and
# ``np.rint`` rounds half to even, so ``rint(x * 2**-s)`` is exactly
# :func:`tessera.numerics.rne_shift` ``(x, s)`` (which caps ``s`` at 62; any ``s >= 54``
# gives 0 both ways since ``|x| < 2**53``). ``np.frexp`` of an exact integer gives its bit
# length. Each function below is the same formula as its :mod:`tessera.numerics`
# counterpart step for step, with work skipped only where it is provably a no-op.


def pow2(e: np.ndarray | int) -> np.ndarray:
    """Exact float64 ``2**e`` for integer ``e`` (0.0 below float64's range)."""
    return np.ldexp(1.0, np.asarray(e, dtype=np.int32))


def lm_normalize(
    x: np.ndarray, lsb: np.ndarray | int, bits: int, amax: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`numerics.normalize` on lane-major ``x`` [B, N, P] -> (q [B, N, P], e [B, P]).

    ``amax`` (the lane-wise maximum magnitude [B, P]) may be passed when the caller already
    has it. May return ``x`` itself (or overwrite nothing else) when no vector needs a shift.
    """
    if amax is None:
        amax = np.abs(x).max(axis=1)
    _, bl = np.frexp(amax)
    shift = np.maximum(bl - (bits - 1), 0)
    lsb = np.asarray(lsb, dtype=np.int64)
    e = np.where(amax == 0, numerics.E_ZERO, lsb + shift)
    if not shift.any():
        # amax < 2**(bits-1): nothing to round, nothing to saturate.
        return x, e
    f = pow2(-shift)
    q = x * f[:, None, :]
    np.rint(q, out=q)
    lim = numerics.sat_limit(bits)
    # RNE is monotone and odd, so a vector's largest |q| is rint(amax * f).
    if np.any(np.rint(amax * f) > lim):
        np.clip(q, -lim, lim, out=q)
    return q, e


def lm_shift(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``numerics.rne_shift(x, s)`` for lane-major ``x`` and per-vector shifts ``s >= 0``."""
    if not s.any():
        return x
    q = x * pow2(-s)[:, None, :]
    return np.rint(q, out=q)


def lm_align(xq, xe, yq, ye):
    """:func:`numerics.align`; ``yq`` may be [B, N, 1] (a constant broadcast over pixels)."""
    e = np.maximum(xe, ye)
    xa = lm_shift(xq, e - xe)
    dy = e - ye
    if dy.any():
        ya = yq * pow2(-dy)[:, None, :]
        np.rint(ya, out=ya)
    else:
        ya = yq
    return xa, ya, e


def lm_wide_add(xq, xe, yq, ye, bits: int):
    xa, ya, e = lm_align(xq, xe, yq, ye)
    return lm_normalize(xa + ya, e, bits)


def lm_wide_max(xq, xe, yq, ye, bits: int):
    xa, ya, e = lm_align(xq, xe, yq, ye)
    return lm_normalize(np.maximum(xa, ya), e, bits)


def lm_wide_mul(xq, xe, cq, ce, bits: int):
    return lm_normalize(xq * cq, xe + ce, bits)


def lm_wide_relu(xq, xe, bits: int):
    r = np.maximum(xq, 0)
    return lm_normalize(r, xe, bits, amax=r.max(axis=1))


def lm_to_storage(q: np.ndarray, e: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`numerics.to_storage`, lane-major."""
    q, e = lm_normalize(q, e, bits)
    lim = numerics.sat_limit(bits)
    over = e > numerics.E_MAX
    if np.any(over):
        up = np.where(over, np.clip(e - numerics.E_MAX, 0, 40), 0)
        q = np.clip(q * pow2(up)[:, None, :], -lim, lim)
        e = np.where(over, numerics.E_MAX, e)
    under = (e < numerics.E_MIN) & (e != numerics.E_ZERO)
    if np.any(under):
        q = lm_shift(q, np.where(under, numerics.E_MIN - e, 0))
        e = np.where(under, numerics.E_MIN, e)
        # Only a shift can zero a normalized non-zero vector.
        e = np.where(~np.any(q != 0, axis=1), numerics.E_ZERO, e)
    return q, e


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


def gemm_exact_t(cols: np.ndarray, wg: np.ndarray) -> np.ndarray:
    """Exact accumulators transposed, ``wg @ cols.T`` [O, P], as float64 (see module doc)."""
    used = np.flatnonzero(np.any(wg != 0, axis=0))
    if used.size < 0.75 * wg.shape[1]:  # skip all-zero columns (channel padding)
        return wg[:, used] @ cols[:, used].T
    return wg @ cols.T


def im2col_f64(
    grid: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads_tl: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> np.ndarray:
    """:func:`im2col` of a float64 grid, without copies where the window is one pixel."""
    h, w, c = grid.shape
    if kernel == (1, 1) and stride == (1, 1) and pads_tl == (0, 0) and out_hw == (h, w):
        return grid.reshape(h * w, c)
    win = gather_windows(grid, kernel, stride, pads_tl, dilation, out_hw)
    return win.reshape(out_hw[0] * out_hw[1], -1)
