"""Byte-digit matrix products on Intel AMX tiles, where the CPU and the OS offer them.

The simulator's exact products are sums of u8 x s8 digit products in int32
(:class:`tessera.sim.kernels.WeightOperand`). onnxruntime's ``MatMulInteger`` makes them
with AVX-512 VNNI (64 multiply-adds per instruction); an AMX ``tdpbusd`` makes a whole
16 x 16 x 64 block (16,384) per instruction and, like ``vpdpbusd``, adds the u8 x s8
products to int32 accumulators without saturation, so the same bound keeps them exact
(every digit sum below ``2**31``, see :mod:`tessera.sim.kernels`). Measured on this
project's 2-core Emerald Rapids machine, one thread: 1.3 - 2.8x onnxruntime's speed on
the simulator's band shapes.

numba has no AMX intrinsics, so the few instructions are inline assembly (llvmlite's
``InlineAsm``; LLVM assembles them once the native asm parser is initialised). The tiles
hold no values across calls: every call loads its tile configuration and releases the
tiles at its end, so threads may call it side by side. Linux hands a process the tile
state only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``), made in
:func:`available` before any tile instruction runs.

Operands: activation digit planes [D, P, K] u8, rows of K contiguous bytes, as the
digit rows come; weight digits packed once per weight slice into the tiles' layout
(:class:`PackedWeights`: four consecutive K of a column side by side, K padded to 64 and
N to 32 with zeros). :func:`digit_accumulators` adds the digit products up block by
block, so the int32 products never leave the L1 cache; the last rows of A go through
tiles of as many rows, so they need no padded copy.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from tessera.sim.vector import uix, wide_vectors

#: Tile shapes: every tile is 16 rows of 64 bytes (A: 16 x 64 u8; B: 16 rows of 16
#: columns x 4 K; C: 16 x 16 int32). K steps by 64, a block of C is 32 x 32 (tiles 4-7
#: accumulate, 0-1 hold A's two row halves, 2-3 B's two column halves).
_ROWS, _BYTES = 16, 64
_TILE_BYTES = _ROWS * _BYTES
BLOCK_K, BLOCK_M, BLOCK_N = 64, 32, 32
#: Bytes of B kept in the L2 cache at a time (half this CPU's 2 MiB per core).
_GROUP_BYTES = 1 << 20
_XFEATURE_XTILEDATA = 18
_ARCH_REQ_XCOMP_PERM = 0x1023
_SYS_ARCH_PRCTL = 158  # x86_64


def _tile_config(first_rows: int, second_rows: int) -> np.ndarray:
    """The 64-byte ``ldtilecfg`` operand (palette 1): B tiles 2-3 of 16 rows x 64 bytes;
    A's row halves 0 and 1 and their C tiles (4-5 and 6-7) of ``first_rows`` and
    ``second_rows`` rows (0: the tile is not configured)."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    colsb, rows = cfg[16:32].view(np.uint16), cfg[48:56]
    for tile, r in ((0, first_rows), (1, second_rows), (2, _ROWS), (3, _ROWS), (4, first_rows),
                    (5, first_rows), (6, second_rows), (7, second_rows)):  # fmt: skip
        if r:
            colsb[tile], rows[tile] = _BYTES, r
    return cfg


#: Tile configurations by the rows of A a block takes: ``_CONFIGS[0]`` for whole 32-row
#: blocks, ``_CONFIGS[t]`` for a last block of ``t`` rows. Tiles of fewer rows read and
#: write only those rows, so the last rows need no padded copy and their block no more
#: tile products than its rows need (one row half, 2 of the 4 products, up to 16 rows).
_CONFIGS = np.stack(
    [_tile_config(_ROWS, _ROWS)]
    + [_tile_config(min(t, _ROWS), max(0, t - _ROWS)) for t in range(1, BLOCK_M)]
)


@functools.cache
def available() -> bool:
    """Whether this process may run AMX int8 tiles (x86-64 Linux, a CPU with AMX-INT8
    that LLVM knows, the OS granting the tile state; ``TESSERA_AMX=0`` turns it off)."""
    if os.environ.get("TESSERA_AMX", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    llvm.initialize_native_target()
    features = llvm.get_host_cpu_features()
    if not (features.get("amx-tile") and features.get("amx-int8")):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        return False
    llvm.initialize_native_asmparser()  # the kernel's inline assembly needs it
    return True


def _instruction(template: str, operands: int):
    """A numba intrinsic emitting one instruction of inline assembly that takes
    ``operands`` integer registers (addresses, strides) and has side effects on memory."""

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.VoidType(), [i64] * len(args))
        constraint = ",".join(["r"] * len(args) + ["~{memory}"])
        builder.call(ir.InlineAsm(fnty, template, constraint, side_effect=True), list(args))
        return context.get_dummy_value()

    if operands == 0:

        @intrinsic
        def emit(typingctx):
            return types.void(), codegen

    elif operands == 1:

        @intrinsic
        def emit(typingctx, a):
            return types.void(types.int64), codegen

    else:

        @intrinsic
        def emit(typingctx, a, b):
            return types.void(types.int64, types.int64), codegen

    return emit


_load_config = _instruction("ldtilecfg ($0)", 1)
_release = _instruction("tilerelease", 0)
_load_a0, _load_a1, _load_b0, _load_b1 = (
    _instruction(f"tileloadd ($0,$1,1), %tmm{t}", 2) for t in range(4)
)
_store_c00, _store_c01, _store_c10, _store_c11 = (
    _instruction(f"tilestored %tmm{t}, ($0,$1,1)", 2) for t in range(4, 8)
)
_zero_c00, _zero_c01, _zero_c10, _zero_c11 = (
    _instruction(f"tilezero %tmm{t}", 0) for t in range(4, 8)
)
# tdpbusd dst, src1 (u8 rows), src2 (s8, packed): AT&T order is src2, src1, dst.
_dot_c00 = _instruction("tdpbusd %tmm2, %tmm0, %tmm4", 0)
_dot_c01 = _instruction("tdpbusd %tmm3, %tmm0, %tmm5", 0)
_dot_c10 = _instruction("tdpbusd %tmm2, %tmm1, %tmm6", 0)
_dot_c11 = _instruction("tdpbusd %tmm3, %tmm1, %tmm7", 0)


class PackedWeights:
    """Weight digits (s8 [K, N] each, least significant first) as the tiles load B:
    ``data`` [digits, N_pad/16, K_pad/4, 64], one tile of 16 columns x 64 K after the
    other (1 KiB each, so a tile load reads contiguous bytes: with rows of the whole
    padded width, 4 KiB apart for N = 1024, every row of a tile fell in the same L1
    cache set), and within a tile row k/4 holding the K values k..k+3 of each column
    side by side; K padded to 64 and N to 32 with zeros."""

    def __init__(self, digits: list[np.ndarray]) -> None:
        k, n = digits[0].shape
        self.k, self.n, self.digits = k, n, len(digits)
        self.k_pad = -(-k // BLOCK_K) * BLOCK_K
        self.n_pad = -(-n // BLOCK_N) * BLOCK_N
        padded = np.zeros((self.digits, self.k_pad, self.n_pad), np.int8)
        for j, d in enumerate(digits):
            padded[j, :k, :n] = d
        tiles = padded.reshape(self.digits, self.k_pad // 4, 4, self.n_pad // _ROWS, _ROWS)
        self.data = np.ascontiguousarray(tiles.transpose(0, 3, 1, 4, 2)).reshape(
            self.digits, self.n_pad // _ROWS, self.k_pad // 4, _BYTES
        )

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@njit(cache=True, nogil=True, inline="always")
def _block_sums(a0, a_stride, a_plane, d, b0, b_digit, w, k_steps, halves, first, merge,
                scratch, shifts, acc, rows) -> None:  # fmt: skip
    """The first ``rows`` rows of ``acc`` (a 32 x 32 block, row-major, as each slot of
    ``scratch``) = the block's digit products added up with their weights: A's digit
    planes from ``a0`` (``a_plane`` apart) times B's digits from ``b0`` (``b_digit``
    apart; columns 0 - 15, then ``k_steps`` tiles on, 16 - 31), one row half of A or
    two. The products of one weight ``256**s`` (digit pairs i + j = s) are summed in the
    tiles when ``merge`` (their int32 sum cannot overflow), each stored and added up in
    int64 once."""
    s_addr, s_stride = scratch.ctypes.data, BLOCK_N * 4
    tile_k = k_steps * _TILE_BYTES
    slots = 0
    for s in range(d + w - 1):
        lo, hi = max(0, s - w + 1), min(d - 1, s)
        for i in range(lo, hi + 1):
            ai = a0 + i * a_plane
            ai1 = ai + _ROWS * a_stride
            bj = b0 + (s - i) * b_digit
            if i == lo or not merge:
                _zero_c00()
                _zero_c01()
                if halves == 2:
                    _zero_c10()
                    _zero_c11()
            for ks in range(k_steps):
                _load_a0(ai + ks * BLOCK_K, a_stride)
                _load_b0(bj + ks * _TILE_BYTES, _BYTES)
                _load_b1(bj + tile_k + ks * _TILE_BYTES, _BYTES)
                _dot_c00()
                _dot_c01()
                if halves == 2:
                    _load_a1(ai1 + ks * BLOCK_K, a_stride)
                    _dot_c10()
                    _dot_c11()
            if i == hi or not merge:  # the weight's sum, to a slot of its own
                slot = s_addr + slots * (BLOCK_M * BLOCK_N * 4)
                _store_c00(slot, s_stride)
                _store_c01(slot + _BYTES, s_stride)
                if halves == 2:
                    c1 = slot + _ROWS * s_stride
                    _store_c10(c1, s_stride)
                    _store_c11(c1 + _BYTES, s_stride)
                shifts[slots] = 8 * (first + s)
                slots += 1
    # The slots added up after all the tile products (not each right after its store,
    # which waited for the store): one pass for the usual three (2 x 2 digits, pairs of
    # one weight summed in the tiles), else one per slot. Flat loops over the rows'
    # values: as 2-D loops with numba's signed (wrapped) indices they ran half as fast.
    values = rows * BLOCK_N
    if slots == 3:
        h0, h1, h2 = shifts[0], shifts[1], shifts[2]
        o1, o2 = BLOCK_M * BLOCK_N, 2 * BLOCK_M * BLOCK_N
        for q in range(values):
            acc[uix(q)] = (
                (np.int64(scratch[uix(q)]) << h0)
                + (np.int64(scratch[uix(o1 + q)]) << h1)
                + (np.int64(scratch[uix(o2 + q)]) << h2)
            )
        return
    for q in range(values):
        acc[uix(q)] = np.int64(scratch[uix(q)]) << shifts[0]
    for sl in range(1, slots):
        shift, o = shifts[sl], sl * BLOCK_M * BLOCK_N
        for q in range(values):
            acc[uix(q)] += np.int64(scratch[uix(o + q)]) << shift


@njit(cache=True, nogil=True)
def _accumulate(configs, a, b, first, merge, corr, out) -> None:
    """:func:`digit_accumulators`' work: whole 32 x 32 blocks, then the last rows' blocks
    on tiles of as many rows (each block's accumulators written lane-major, less
    ``corr``, only where they fall inside ``out``)."""
    wide_vectors()
    d, pixels = a.shape[0], a.shape[1]
    a_base, a_plane, a_stride = a.ctypes.data, a.strides[0], a.strides[1]
    w, n_blocks, k_steps = b.shape[0], b.shape[1] // 2, b.shape[2] // 16
    b_base, b_digit = b.ctypes.data, b.strides[0]
    outs = out.shape[0]
    # A block's tile sums, row-major: a slot per weight, or per digit pair where
    # those are not summed in the tiles (at most 3 x 3)
    scratch = np.empty(d * w * BLOCK_M * BLOCK_N, np.int32)
    shifts = np.empty(d * w, np.int64)
    acc = np.empty(BLOCK_M * BLOCK_N, np.int64)
    main = pixels - pixels % BLOCK_M
    # B's column blocks in groups of about 1 MiB (all digits), each group kept in the L2
    # cache while every row block of A passes it: sweeping all of a large B for each row
    # block made a 777 x 4608 x 1024 product 2x slower.
    group = max(1, _GROUP_BYTES // (k_steps * BLOCK_K * BLOCK_N * w))
    _load_config(configs[0].ctypes.data)
    for g0 in range(0, n_blocks, group):
        for m0 in range(0, pixels, BLOCK_M):
            if m0 == main:  # the last rows: tiles of as many rows, on their own
                _load_config(configs[pixels - main].ctypes.data)
            rows = min(BLOCK_M, pixels - m0)
            halves = 1 if rows <= _ROWS else 2
            for nb in range(g0, min(n_blocks, g0 + group)):
                _block_sums(a_base + m0 * a_stride, a_stride, a_plane, d,
                            b_base + 2 * nb * k_steps * _TILE_BYTES, b_digit, w, k_steps,
                            halves, first, merge, scratch, shifts, acc, rows)  # fmt: skip
                for o in range(min(BLOCK_N, outs - nb * BLOCK_N)):
                    row = nb * BLOCK_N + o
                    c = corr[uix(row)]
                    for p in range(rows):
                        out[uix(row), uix(m0 + p)] = acc[uix(p * BLOCK_N + o)] - c
            if m0 == main:
                _load_config(configs[0].ctypes.data)
    _release()


def digit_accumulators(planes: np.ndarray, weights: PackedWeights, first: int,
                       corr: np.ndarray, out: np.ndarray) -> None:  # fmt: skip
    """``out[o, p] = sum_ij (A_i @ W_j)[p, o] << 8*(first + i + j) - corr[o]`` (float64,
    lane-major as the vector path reads it) of activation digit planes ``planes`` [D, P,
    K] (rows of K contiguous bytes) and weight digits ``weights``.

    :class:`tessera.sim.kernels.WeightOperand`'s sum of digit products, made 32 x 32
    block by block on the tiles and added up while the block is in the L1 cache, so the
    int32 digit products (4x the accumulators' size) are never written out and read
    back. Exact as that sum is: each tile sum is an int32 digit sum (digit pairs of one
    weight summed in the tiles only while their sum is bounded below ``2**31``), each
    shifted term and the total fit int64 (the caller's bound), and the total, below
    ``2**53``, is an exact float64.
    """
    if not available():
        raise RuntimeError("AMX tiles are not available to this process")
    d, m, k = planes.shape
    if (
        k != weights.k
        or planes.dtype != np.uint8
        or planes.strides[2] != 1
        or out.shape != (weights.n, m)
        or corr.shape != (weights.n,)
    ):
        raise ValueError("amx.digit_accumulators: operand shapes do not fit")
    if m:
        merge = min(d, weights.digits) * k * 255 * 128 < 2**31
        _accumulate(_CONFIGS, planes, weights.data, first, merge, corr, out)
