"""The chain's vector path, compiled: normalize -> MFU ops -> re-block to storage.

Everything a chain does after its reducer (the MVU sum, the pool, or a plain read) is
per vector: N lanes and one exponent. :func:`chain_vectors` runs that whole path for
every vector of a chain (or of a band of its pixels) in one compiled loop, so each value
is read once as an accumulator and written once as a storage mantissa, instead of a
dozen whole-array numpy passes. It is :mod:`tessera.numerics` step for step (each
normalize's rescaling is applied by the pass of the step after it, see
:func:`_plan_normalize`), and the simulator tests compare its results bit for bit with
the reference executor, which uses :mod:`tessera.numerics` directly.

Lanes are held as exact integers in float64 (so the loops vectorise; AVX2 has no 64-bit
arithmetic shift). Why that is exact: (1) every value is an integer below ``2**53``:
accumulators by the compiler's bound (:mod:`tessera.sim.kernels`), wide mantissas have
at most ``mfu_mantissa_bits <= 24`` bits and stored constants 16, so an aligned sum of
two is below ``2**25`` and a ``vv_mul`` product below ``2**40``. (2) Multiplying by
``2**-s`` only moves the binary point; a result below the smallest normal number is
< 0.5, and 0 is what any rounding of it gives. (3) Rounding to an integer is half to
even, so ``round(x * 2**-s)`` is :func:`~tessera.numerics.rne_shift` ``(x, s)``. (4) The
exponent field of an exact integer gives its bit length.

The function releases the GIL, so the simulator's thread pool runs bands side by side.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from tessera import numerics

#: MFU op codes of the ``ops`` table (column 0).
OP_RELU, OP_ADD, OP_MAX, OP_MUL = 0, 1, 2, 3
#: Operand sources (column 1): a VRF constant (per output block) or the AUX tensor.
SRC_VRF, SRC_AUX = 0, 1
#: ``ops`` codes of the ISA's MFU mnemonics.
OP_CODES = {"v_relu": OP_RELU, "vv_add": OP_ADD, "vv_max": OP_MAX, "vv_mul": OP_MUL}

_E_ZERO, _E_MIN, _E_MAX = numerics.E_ZERO, numerics.E_MIN, numerics.E_MAX


#: ``2.0**-s`` for the shifts that can leave anything of a value below ``2**53``; any
#: larger shift rounds it to 0, as the last entry (2**-64) does too.
_NEG_POW2 = np.ldexp(1.0, -np.arange(65))
#: ``2.0**k`` for the left shifts of the re-blocking to storage (at most 40).
_POS_POW2 = np.ldexp(1.0, np.arange(41))
#: Adding and subtracting 1.5 * 2**52 rounds a float below 2**51 to an integer, half to
#: even (the FPU's rounding mode), in two vectorisable instructions; an integer is left
#: as it is, so a factor of 1.0 makes it a no-op.
RINT_MAGIC = 6755399441055744.0


@njit(cache=True, inline="always")
def uix(i: int) -> np.uint64:
    """An index known to be non-negative, as numba's type for it (for the compiled
    kernels' inner loops). A signed index is wrapped (``i + size`` if negative) per
    access, which LLVM cannot see through in a loop, so it turns such reads and writes
    into gathers and scatters: the vector path's load pass and the window unrolling ran
    2.3x slower that way."""
    return np.uint64(i)


@njit(cache=True, inline="always")
def _shift_factor(s: int) -> float:
    """The factor whose product, rounded, is ``rne_shift(x, s)`` (``s >= 0``)."""
    return _NEG_POW2[min(s, 64)]


@njit(cache=True, inline="always")
def _max_into(old: float, new: float) -> float:
    """``max(old, new)`` for a running maximum ``a[p] = _max_into(a[p], x)``.

    Written as plain ``max(a[p], x)``, LLVM turns the update into a conditional (masked)
    store, which AMD cores run several times slower than the vectorised select this
    form gives (``old + 0.0`` is not the loaded value to LLVM; for ``old >= 0`` it is
    the same number).
    """
    return max(old + 0.0, new)


@njit(cache=True, inline="always")
def _round_clip(x: float, f: float, lim: float) -> float:
    """``clip(rne(x * f), -lim, lim)``: one vector's rescaling in a normalize."""
    return min(max((x * f + RINT_MAGIC) - RINT_MAGIC, -lim), lim)


@njit(cache=True, inline="always")
def _plan_normalize(amax, amax_bits, e, bits: int, f, cnt: int) -> None:
    """:func:`tessera.numerics.normalize` of the first ``cnt`` vectors, planned but not
    applied: ``f[p]`` is the factor that :func:`_round_clip` (at this ``bits``' limit)
    applies to vector ``p``'s lanes, 1.0 if none; ``e[p]`` becomes its exponent (LSB
    exponent on entry) and ``amax[p]`` its largest magnitude after the rescaling.

    That maximum needs no pass over the lanes: ``x -> clip(rne(x * f))`` is odd and
    monotone, so the largest rescaled magnitude is the rescaled largest one. So the
    next step's pass over the lanes applies the rescaling as it reads them, instead of
    a pass of its own. ``amax_bits`` is ``amax``'s int64 view, whose exponent field is
    an exact integer's bit length (no libm call).
    """
    lim = float((1 << (bits - 1)) - 1)
    for p in range(cnt):
        f[p] = 1.0
        if amax[p] == 0.0:
            e[p] = _E_ZERO
            continue
        s = ((amax_bits[p] >> 52) & 0x7FF) - 1022 - (bits - 1)
        if s > 0:
            f[p] = _shift_factor(s)
            e[p] += s
            amax[p] = _round_clip(amax[p], f[p], lim)


@njit(cache=True, inline="always")
def _operand_lane(y, aux: bool, aux_q, const_q, k: int, b: int, lane: int, t0: int, r0: int,
                  cnt: int) -> None:  # fmt: skip
    """``y[p]``: lane ``lane`` of block ``b`` of op ``k``'s operand for the tile's pixels
    (from the AUX tensor, or the VRF constant, the same for every pixel)."""
    if aux:
        for p in range(cnt):
            y[p] = aux_q[uix(t0 + p), uix(r0 + lane)]
    else:
        c = float(const_q[k, b, lane])
        for p in range(cnt):
            y[p] = c


#: Pixels per tile: a tile's vectors (N x 64 float64, 8 KiB at N = 16) and per-pixel
#: scratch stay in the L1 cache through all the passes of a chain's path.
_TILE = 64


@njit(cache=True, nogil=True)
def chain_vectors(
    x: np.ndarray,
    e_in: np.ndarray,
    normalize_first: bool,
    wide_bits: int,
    store_bits: int,
    ops: np.ndarray,
    const_q: np.ndarray,
    const_e: np.ndarray,
    aux_q: np.ndarray,
    aux_e: np.ndarray,
    out_q: np.ndarray,
    out_e: np.ndarray,
) -> int:
    """Run a chain's vector path; results into ``out_q``/``out_e``, and the largest
    exponent written returned (what the chain's ``OUT_EREG`` takes the maximum with).

    ``x`` [B*N, P] holds the reducer's exact integer lanes lane-major (lane ``l`` of
    block ``b`` of every pixel is row ``b*N + l``, so every inner loop runs over pixels),
    at exponents ``e_in`` [B, P or 1] (one column: the same for every pixel). With
    ``normalize_first`` they are normalized to ``wide_bits`` (accumulators, pool sums);
    without, they are already wide vectors (a plain read of stored blocks). ``ops``
    [K, 2]: the body's MFU ops in order, (``OP_*``, ``SRC_*``); op ``k`` with a VRF
    operand reads ``const_q[k, b]`` [N] and ``const_e[k, b]``, an AUX operand reads
    ``aux_q`` [P, B*N] and ``aux_e`` [P, B], pixel-major as stored (views into DRAM do:
    a tile's reads stay in a few cache lines, so no transposed copy is needed). The
    result is re-blocked to ``store_bits`` and written pixel-major, as stored: ``out_q``
    [P, B*N], ``out_e`` [P, B]. Every step is per vector, so the pixels are taken a tile
    at a time.
    """
    p_count, blocks = out_e.shape
    n = x.shape[0] // blocks
    # Nothing here is bounds-checked: a caller's shape mistake must fail, not write
    # past an array.
    uses_aux = False
    for k in range(ops.shape[0]):
        uses_aux |= ops[k, 0] != OP_RELU and ops[k, 1] == SRC_AUX
    if (
        x.shape[0] != blocks * n
        or x.shape[1] != p_count
        or out_q.shape[0] != p_count
        or out_q.shape[1] != blocks * n
        or e_in.shape[0] != blocks
        or (e_in.shape[1] != 1 and e_in.shape[1] != p_count)
        or ops.shape[1] != 2
        or const_q.shape[0] < ops.shape[0]
        or const_q.shape[1] != blocks
        or const_q.shape[2] != n
        or const_e.shape[0] < ops.shape[0]
        or const_e.shape[1] != blocks
        or (uses_aux and (aux_q.shape[0] != p_count or aux_q.shape[1] != blocks * n))
        or (uses_aux and (aux_e.shape[0] != p_count or aux_e.shape[1] != blocks))
    ):
        raise ValueError("chain_vectors: operand shapes do not match the output")
    per_pixel_e = e_in.shape[1] > 1
    v = np.empty((n, _TILE))
    y = np.empty(_TILE)
    amax = np.empty(_TILE)
    amax_bits = amax.view(np.int64)
    e = np.empty(_TILE, np.int64)
    ye = np.empty(_TILE, np.int64)
    f = np.empty(_TILE)  # the planned rescaling of the vectors, applied by the next pass
    fx = np.empty(_TILE)
    fy = np.empty(_TILE)
    fz = np.empty(_TILE)
    wide_lim = float((1 << (wide_bits - 1)) - 1)
    lim = float((1 << (store_bits - 1)) - 1)
    largest = _E_ZERO
    for b in range(blocks):
        r0 = b * n
        for t0 in range(0, p_count, _TILE):
            cnt = min(_TILE, p_count - t0)
            for p in range(cnt):
                amax[p] = 0.0
                f[p] = 1.0
            for lane in range(n):
                for p in range(cnt):
                    v[lane, p] = x[uix(r0 + lane), uix(t0 + p)]
                    amax[p] = _max_into(amax[p], abs(v[lane, p]))
            for p in range(cnt):
                e[p] = e_in[b, uix(t0 + p if per_pixel_e else 0)]
            # Every planned rescaling clips at wide_lim; with no normalize first the lanes
            # are wide vectors already, which a factor of 1.0 and that clip leave alone.
            if normalize_first:
                _plan_normalize(amax, amax_bits, e, wide_bits, f, cnt)
            for k in range(ops.shape[0]):
                code = ops[k, 0]
                aux = ops[k, 1] == SRC_AUX
                for p in range(cnt):
                    amax[p] = 0.0
                if code == OP_RELU:
                    for lane in range(n):
                        for p in range(cnt):
                            r = max(_round_clip(v[lane, p], f[p], wide_lim), 0.0)
                            v[lane, p] = r
                            amax[p] = _max_into(amax[p], r)
                    _plan_normalize(amax, amax_bits, e, wide_bits, f, cnt)
                    continue
                for p in range(cnt):
                    ye[p] = aux_e[uix(t0 + p), b] if aux else const_e[k, b]
                if code == OP_MUL:
                    for lane in range(n):
                        _operand_lane(y, aux, aux_q, const_q, k, b, lane, t0, r0, cnt)
                        for p in range(cnt):
                            r = _round_clip(v[lane, p], f[p], wide_lim) * y[p]
                            v[lane, p] = r
                            amax[p] = _max_into(amax[p], abs(r))
                    for p in range(cnt):
                        e[p] += ye[p]
                    _plan_normalize(amax, amax_bits, e, wide_bits, f, cnt)
                    continue
                # vv_add / vv_max: both operands to the larger exponent, then combine.
                for p in range(cnt):
                    ea = max(e[p], ye[p])
                    fx[p] = _shift_factor(ea - e[p])
                    fy[p] = _shift_factor(ea - ye[p])
                    e[p] = ea
                for lane in range(n):
                    _operand_lane(y, aux, aux_q, const_q, k, b, lane, t0, r0, cnt)
                    for p in range(cnt):
                        xr = _round_clip(v[lane, p], f[p], wide_lim)
                        xa = (xr * fx[p] + RINT_MAGIC) - RINT_MAGIC
                        ya = (y[p] * fy[p] + RINT_MAGIC) - RINT_MAGIC
                        r = xa + ya if code == OP_ADD else max(xa, ya)
                        v[lane, p] = r
                        amax[p] = _max_into(amax[p], abs(r))
                _plan_normalize(amax, amax_bits, e, wide_bits, f, cnt)
            # tessera.numerics.to_storage: normalize to store_bits, then bring the
            # exponent into int8 (a left shift that saturates, or a right shift that may
            # zero the vector). Each rescaling is planned per vector here (its largest
            # magnitude tells whether the last one leaves anything), and the one pass
            # below applies the pending one, these two, and writes the result.
            _plan_normalize(amax, amax_bits, e, store_bits, fx, cnt)
            for p in range(cnt):
                fz[p] = 1.0
                if amax[p] == 0.0:
                    pass  # E_ZERO already
                elif e[p] > _E_MAX:
                    fz[p] = _POS_POW2[min(e[p] - _E_MAX, 40)]
                    e[p] = _E_MAX
                elif e[p] < _E_MIN:
                    fz[p] = _shift_factor(_E_MIN - e[p])
                    top = (amax[p] * fz[p] + RINT_MAGIC) - RINT_MAGIC
                    e[p] = _E_MIN if top != 0.0 else _E_ZERO  # only this shift zeroes a vector
                out_e[uix(t0 + p), b] = e[p]
                largest = max(largest, e[p])
            for lane in range(n):
                for p in range(cnt):
                    r = _round_clip(v[lane, p], f[p], wide_lim)
                    r = _round_clip(r, fx[p], lim)
                    v[lane, p] = _round_clip(r, fz[p], lim)
            for p in range(cnt):
                for lane in range(n):
                    out_q[uix(t0 + p), uix(r0 + lane)] = v[lane, p]
    return largest


def quantize_blocks(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tessera.numerics.quantize_float` (no ``min_exp``) compiled: float blocks
    (last axis = one block) -> storage mantissas and exponents, as int64.

    Every run quantizes its input (802 k values for ResNet-50) before the program starts;
    numpy's dozen passes over the blocks took 8 ms of it, this one pass well under 1.
    """
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize non-finite values (NaN or Inf) to BFP")
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    q = np.empty(flat.shape, np.int64)
    e = np.empty(flat.shape[0], np.int64)
    _quantize_rows(flat, float(numerics.sat_limit(bits)), bits, q, e)
    return q.reshape(x.shape), e.reshape(x.shape[:-1])


@njit(cache=True, nogil=True)
def _quantize_rows(x: np.ndarray, lim: float, bits: int, q: np.ndarray, e: np.ndarray) -> None:
    for i in range(x.shape[0]):
        amax = 0.0
        for j in range(x.shape[1]):
            amax = max(amax, abs(x[i, j]))
        ex = min(max(math.frexp(amax)[1] - (bits - 1), _E_MIN), _E_MAX)
        scale = math.ldexp(1.0, -ex)  # a normal float for every storage exponent
        # Clipped to lim + 1 before the rounding (monotone, integer bounds: the same
        # result), so every value rounded is far below the magic constant's 2**51.
        top = min(amax * scale, lim + 1.0)
        if (top + RINT_MAGIC) - RINT_MAGIC == 0.0:  # the largest magnitude rounds to 0
            e[i] = _E_ZERO
            for j in range(x.shape[1]):
                q[i, j] = 0
            continue
        e[i] = ex
        for j in range(x.shape[1]):
            y = min(max(x[i, j] * scale, -lim - 1.0), lim + 1.0)
            q[i, j] = int(min(max((y + RINT_MAGIC) - RINT_MAGIC, -lim), lim))
