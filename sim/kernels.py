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
