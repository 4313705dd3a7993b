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

Operands: activation digit planes [D, P, K] u8, each row-major, as the digit rows come;
weight digits packed once per weight slice into the tiles' layout (:class:`PackedB`:
four consecutive K of a column side by side, K padded to 64 and N to 32 with zeros).
:func:`digit_accumulators` adds the digit products up block by block, so the int32
products never leave the L1 cache.
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


def _tile_config() -> np.ndarray:
    """The 64-byte ``ldtilecfg`` operand: palette 1, tiles 0-7 of 16 rows x 64 bytes."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:32].view(np.uint16)[:8] = _BYTES
    cfg[48:56] = _ROWS
    return cfg


_CONFIG = _tile_config()


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


@njit(cache=True, nogil=True, inline="always")
def _block(a0, a_stride, k_steps, b0, c0, c_stride) -> None:
    """One 32 x 32 block of C at ``c0``: the 32 rows of A from ``a0`` times the packed
    B tiles from ``b0`` (columns 0 - 15, then ``k_steps`` tiles on, columns 16 - 31)."""
    a1 = a0 + _ROWS * a_stride
    b1 = b0 + k_steps * _TILE_BYTES
    _zero_c00()
    _zero_c01()
    _zero_c10()
    _zero_c11()
    for ks in range(k_steps):
        _load_a0(a0 + ks * BLOCK_K, a_stride)
        _load_a1(a1 + ks * BLOCK_K, a_stride)
        _load_b0(b0 + ks * _TILE_BYTES, _BYTES)
        _load_b1(b1 + ks * _TILE_BYTES, _BYTES)
        _dot_c00()
        _dot_c01()
        _dot_c10()
        _dot_c11()
    c1 = c0 + _ROWS * c_stride
    _store_c00(c0, c_stride)
    _store_c01(c0 + _BYTES, c_stride)
    _store_c10(c1, c_stride)
    _store_c11(c1 + _BYTES, c_stride)


class PackedB:
    """A s8 B [K, N] as the tiles load it: ``data`` [N_pad/16, K_pad/4, 64], one tile of
    16 columns x 64 K after the other (1 KiB each, so a tile load reads contiguous
    bytes: with rows of the whole padded width, 4 KiB apart for N = 1024, every row of
    a tile fell in the same L1 cache set), and within a tile row k/4 holding the K
    values k..k+3 of each column side by side."""

    def __init__(self, b: np.ndarray) -> None:
        k, n = b.shape
        self.k, self.n = k, n
        self.k_pad = -(-k // BLOCK_K) * BLOCK_K
        self.n_pad = -(-n // BLOCK_N) * BLOCK_N
        padded = np.zeros((self.k_pad, self.n_pad), np.int8)
        padded[:k, :n] = b
        tiles = padded.reshape(self.k_pad // 4, 4, self.n_pad // _ROWS, _ROWS)
        self.data = np.ascontiguousarray(tiles.transpose(2, 0, 3, 1)).reshape(
            self.n_pad // _ROWS, self.k_pad // 4, _BYTES
        )

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@njit(cache=True, nogil=True)
def _accumulator_blocks(config, a_addrs, a_stride, rows, k_steps, b_addrs, n_blocks, first,
                        corr, out, p0, scratch, acc) -> None:  # fmt: skip
    """:func:`digit_accumulators` of A's rows ``0..rows`` (a multiple of 32) into
    ``out``'s columns ``p0..p0+rows``, A planes and packed weight digits by address (of
    each block only what falls inside ``out`` is written)."""
    outs, pixels = out.shape
    s_addr, s_stride = scratch.ctypes.data, scratch.strides[0]
    _load_config(config.ctypes.data)
    # B's column blocks in groups of about 1 MiB (all digits), each group kept in the L2
    # cache while every row block of A passes it: sweeping all of a large B for each row
    # block made a 777 x 4608 x 1024 product 2x slower.
    group = max(1, _GROUP_BYTES // (k_steps * BLOCK_K * BLOCK_N * b_addrs.shape[0]))
    for g0 in range(0, n_blocks, group):
        for m0 in range(0, rows, BLOCK_M):
            for nb in range(g0, min(n_blocks, g0 + group)):
                # Every digit pair's tile product, added up with its weight while the
                # block is in the L1 cache, then written lane-major.
                acc[:] = 0
                for i in range(a_addrs.shape[0]):
                    for j in range(b_addrs.shape[0]):
                        b0 = b_addrs[j] + 2 * nb * k_steps * _TILE_BYTES
                        _block(a_addrs[i] + m0 * a_stride, a_stride, k_steps, b0, s_addr,
                               s_stride)  # fmt: skip
                        shift = 8 * (first + i + j)
                        for p in range(BLOCK_M):
                            for o in range(BLOCK_N):
                                acc[p, o] += np.int64(scratch[p, o]) << shift
                for o in range(min(BLOCK_N, outs - nb * BLOCK_N)):
                    row = nb * BLOCK_N + o
                    for p in range(min(BLOCK_M, pixels - p0 - m0)):
                        out[row, p0 + m0 + p] = acc[p, o] - corr[row]
    _release()


def digit_accumulators(planes: np.ndarray, weights: list[PackedB], first: int,
                       corr: np.ndarray, out: np.ndarray) -> None:  # fmt: skip
    """``out[o, p] = sum_ij (A_i @ W_j)[p, o] << 8*(first + i + j) - corr[o]`` (float64,
    lane-major as the vector path reads it) of activation digit planes ``planes`` [D, P,
    K] (each C-contiguous) and weight digits ``weights`` (one packed B [K, O] each).

    :class:`tessera.sim.kernels.WeightOperand`'s sum of digit products, made 32 x 32
    block by block on the tiles and added up while the block is in the L1 cache, so the
    int32 digit products (4x the accumulators' size) are never written out and read
    back. Exact as that sum is: each tile sum is an int32 digit sum, each shifted term
    and the total fit int64 (the caller's bound), and the total, below ``2**53``, is an
    exact float64.
    """
    if not available():
        raise RuntimeError("AMX tiles are not available to this process")
    d, m, k = planes.shape
    w0 = weights[0]
    if (
        k != w0.k
        or planes.dtype != np.uint8
        or not all(p.flags.c_contiguous for p in planes)
        or any(w.k != w0.k or w.n != w0.n for w in weights)
        or out.shape != (w0.n, m)
        or corr.shape != (w0.n,)
    ):
        raise ValueError("amx.digit_accumulators: operand shapes do not fit")
    main = BLOCK_M * ((m - 1) // BLOCK_M) if m else 0
    k_steps, n_blocks = w0.k_pad // BLOCK_K, w0.n_pad // BLOCK_N
    b_addrs = np.array([w.data.ctypes.data for w in weights], np.int64)
    scratch = np.empty((BLOCK_M, BLOCK_N), np.int32)
    acc = np.empty((BLOCK_M, BLOCK_N), np.int64)
    if main:
        a_addrs = np.array([p.ctypes.data for p in planes], np.int64)
        _accumulator_blocks(_CONFIG, a_addrs, planes.strides[1], main, k_steps, b_addrs,
                            n_blocks, first, corr, out, 0, scratch, acc)  # fmt: skip
    tail = np.zeros((d, BLOCK_M, w0.k_pad), np.uint8)
    tail[:, : m - main, :k] = planes[:, main:]
    a_addrs = np.array([p.ctypes.data for p in tail], np.int64)
    _accumulator_blocks(_CONFIG, a_addrs, tail.strides[1], BLOCK_M, k_steps, b_addrs, n_blocks,
                        first, corr, out, main, scratch, acc)  # fmt: skip
