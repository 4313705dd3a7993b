"""DRAM layouts, defined once: activation tensors, weight tiles and constant vectors.

The compiler packs with these functions, the simulator, the reference executor and the
host runtime unpack with them, and the RTL's DMA follows the same byte order
(little-endian throughout).

* **Activation tensor** ``H x W x CB`` blocks of N lanes: all mantissas first
  (``[H][W][CB][N]``, int8 when m <= 8 else int16), then one int8 exponent per block
  (``[H][W][CB]``).
* **Weight tile**: N x N mantissas ``[row = output lane][col = input lane]`` followed by N
  int8 row exponents; tiles are contiguous.
* **Wide constant vector**: N int16 mantissas followed by one int16 exponent.
"""

from __future__ import annotations

import functools

import numpy as np

ALIGN = 64


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@functools.cache  # asked hundreds of times a simulator run; a dtype is immutable
def mantissa_dtype(mantissa_bits: int) -> np.dtype:
    return np.dtype("<i1") if mantissa_bits <= 8 else np.dtype("<i2")


def tensor_bytes(h: int, w: int, cb: int, n: int, mantissa_bits: int) -> int:
    """Bytes of one activation tensor (mantissa plane + exponent plane), aligned."""
    return align_up(h * w * cb * n * mantissa_dtype(mantissa_bits).itemsize + h * w * cb)


def tensor_exp_offset(h: int, w: int, cb: int, n: int, mantissa_bits: int) -> int:
    return h * w * cb * n * mantissa_dtype(mantissa_bits).itemsize


def pack_tensor(q: np.ndarray, e: np.ndarray, mantissa_bits: int) -> bytes:
    """``q`` [H, W, CB, N], ``e`` [H, W, CB] -> bytes."""
    body = q.astype(mantissa_dtype(mantissa_bits)).tobytes() + e.astype("<i1").tobytes()
    return body + bytes(align_up(len(body)) - len(body))


def tensor_planes(
    mem: np.ndarray, addr: int, h: int, w: int, cb: int, n: int, mantissa_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """A whole tensor's mantissa and exponent planes in a uint8 DRAM array, as views
    ([H, W, CB, N] of the mantissa type, [H, W, CB] int8)."""
    dt = mantissa_dtype(mantissa_bits)
    nm = h * w * cb * n
    q = mem[addr : addr + nm * dt.itemsize].view(dt).reshape(h, w, cb, n)
    eo = addr + nm * dt.itemsize
    return q, mem[eo : eo + h * w * cb].view("<i1").reshape(h, w, cb)


def unpack_tensor(
    mem: np.ndarray, addr: int, h: int, w: int, cb: int, n: int, mantissa_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole tensor from a uint8 DRAM array as int64 ``q`` and ``e``."""
    q, e = tensor_planes(mem, addr, h, w, cb, n, mantissa_bits)
    return q.astype(np.int64), e.astype(np.int64)


def write_tensor_blocks(
    mem: np.ndarray,
    addr: int,
    geom: tuple[int, int, int],
    cb_off: int,
    q: np.ndarray,
    e: np.ndarray,
    n: int,
    mantissa_bits: int,
) -> None:
    """Write blocks ``[H, W, cnt, N]`` at block offset ``cb_off`` of a tensor in place."""
    h, w, cb = geom
    dt = mantissa_dtype(mantissa_bits)
    nm = h * w * cb * n
    mant = mem[addr : addr + nm * dt.itemsize].view(dt).reshape(h, w, cb, n)
    cnt = q.shape[2]
    mant[:, :, cb_off : cb_off + cnt, :] = q
    eo = addr + nm * dt.itemsize
    exps = mem[eo : eo + h * w * cb].view("<i1").reshape(h, w, cb)
    exps[:, :, cb_off : cb_off + cnt] = e


def tile_bytes(n: int, mantissa_bits: int) -> int:
    return n * n * mantissa_dtype(mantissa_bits).itemsize + n


def pack_tiles(q: np.ndarray, e: np.ndarray, mantissa_bits: int) -> bytes:
    """``q`` [T, N, N] (row = output lane), ``e`` [T, N] -> bytes, tile after tile."""
    t, n, _ = q.shape
    dt = mantissa_dtype(mantissa_bits)
    mant = np.ascontiguousarray(q.astype(dt).reshape(t, n * n)).view(np.uint8)
    rows = np.concatenate([mant, e.astype("<i1").view(np.uint8)], axis=1)
    return rows.tobytes()


def unpack_tiles(
    mem: np.ndarray, addr: int, count: int, n: int, mantissa_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    dt = mantissa_dtype(mantissa_bits)
    tb = tile_bytes(n, mantissa_bits)
    raw = mem[addr : addr + count * tb].reshape(count, tb)
    mb = n * n * dt.itemsize
    q = raw[:, :mb].copy().view(dt).reshape(count, n, n).astype(np.int64)
    e = raw[:, mb:].copy().view("<i1").reshape(count, n).astype(np.int64)
    return q, e


def const_bytes(n: int) -> int:
    return 2 * n + 2


def pack_consts(q: np.ndarray, e: np.ndarray) -> bytes:
    """``q`` [V, N] int16 mantissas, ``e`` [V] exponents -> bytes."""
    v = np.concatenate([q.astype("<i2"), e.astype("<i2")[:, None]], axis=1)
    return v.tobytes()


def unpack_consts(mem: np.ndarray, addr: int, count: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    raw = mem[addr : addr + count * const_bytes(n)].copy().view("<i2").reshape(count, n + 1)
    return raw[:, :n].astype(np.int64), raw[:, n].astype(np.int64)
