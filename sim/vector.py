"""The chain's vector path, compiled: normalize -> MFU ops -> re-block to storage.

Everything a chain does after its reducer (the MVU sum, the pool, or a plain read) is
per vector: N lanes and one exponent. :func:`chain_vectors` runs that whole path for
every vector of a chain (or of a band of its pixels) in one compiled loop, so each value
is read once as an accumulator and written once as a storage mantissa, instead of a
dozen whole-array numpy passes. It is :mod:`tessera.numerics` step for step (each
normalize's rescaling is applied by the pass of the step after it, see
:func:`_planned`), and the simulator tests compare its results bit for bit with
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

Where the wide and storage mantissas have at most :data:`NARROW_BITS` (16) bits and the
body has no ``vv_mul``, the lanes after the first normalize are float32 instead, twice
as many per vector instruction (the reducer's lanes are normalized in float64 first:
accumulators reach ``2**53``). Why that is exact too: (1') every lane is then an integer
below ``2**15`` in magnitude, an operand shifted to a common exponent too (VRF constants
and stored mantissas have at most 16 bits), and a sum of two below ``2**16``: all exact
in float32's 24-bit significand. (2') The factors ``2**-s`` (``s <= 64``) and ``2**k``
(``k <= 40``) are normal float32 numbers, and a rescaled non-zero integer is at least
``2**-64``, far above float32's smallest normal, so (2) holds. (3') Adding and
subtracting :data:`RINT_MAGIC32` rounds a float32 below ``2**22`` half to even; the only
larger values are the exponent clamp's left shifts, whose results saturate at the
storage limit (below ``2**15``) however they are rounded. (A ``vv_mul`` product reaches
``2**31``: such chains stay float64.)

Nor does the vector width (256 or 512 bits, :func:`wide_vectors`) change a result: each
lane goes through the same IEEE operations, without fast-math (so no contraction into
FMAs or reassociation), and the per-vector maxima are the same in any order.

The function releases the GIL, so the simulator's thread pool runs bands side by side.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

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
#: The same for float32: adding and subtracting 1.5 * 2**23 rounds a float32 below 2**22.
RINT_MAGIC32 = np.float32(12582912.0)


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorise the compiled function that calls this with 512-bit vectors
    where the CPU has them (its ``prefer-vector-width`` attribute; a no-op without
    AVX-512).

    numba compiles for the host CPU, but LLVM's tuning for Intel's AVX-512 cores (Ice
    Lake to Emerald Rapids) prefers 256-bit vectors. Set per function, not through
    ``NUMBA_CPU_FEATURES``, which would change every numba function in the process.
    Measured on this project's Emerald Rapids machine, one thread: the vector path of a
    ResNet-50 run 0.88x the time, its digit planes 0.90x, the input's quantization
    0.93x. Not everywhere: the pooling loops (16 lanes a pixel) ran 1.7x slower so. The
    results are the same bits: each lane's operations are the same IEEE ones.
    """

    def codegen(context, builder, signature, args):
        # llvmlite's attribute set takes known names only; LLVM reads a string
        # attribute of the function as the X86 backend's vector-width choice.
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.void(), codegen


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
def _max_into(old, new):
    """``max(old, new)`` for a running maximum ``a[p] = _max_into(a[p], x)``.

    Written as plain ``max(a[p], x)``, LLVM turns the update into a conditional (masked)
    store, which AMD cores run several times slower than the vectorised select this
    form gives (``old - new + new`` is not the loaded value to LLVM; for the exact
    integers here it is the same number).
    """
    return max(old - new + new, new)


@njit(cache=True, inline="always")
def _round_clip(x, f, lim, magic):
    """``clip(rne(x * f), -lim, lim)``: one vector's rescaling in a normalize (``magic``
    is :data:`RINT_MAGIC` or :data:`RINT_MAGIC32`, of the lanes' float type)."""
    return min(max((x * f + magic) - magic, -lim), lim)


@njit(cache=True, inline="always")
def _aligned_op(code: int, x, f, fx, y, fy, lim, magic, pending: bool):
    """``vv_add`` or ``vv_max`` of one lane: ``x`` rescaled by its pending factor ``f``
    (unless no vector of the tile has one: ``pending``), both operands then shifted to
    the common exponent (``fx``, ``fy``). Scalars only (see :func:`_planned`)."""
    xa = ((_round_clip(x, f, lim, magic) if pending else x) * fx + magic) - magic
    ya = (y * fy + magic) - magic
    return xa + ya if code == OP_ADD else max(xa, ya)


@njit(cache=True, inline="always")
def _planned(a, a_float_bits: int, e: int, bits: int, lim, magic):
    """:func:`tessera.numerics.normalize` of one vector with largest magnitude ``a``
    (an exact integer) at exponent ``e``, planned but not applied: (the factor that
    :func:`_round_clip` at ``lim``, this ``bits``' limit, applies to its lanes, 1 if
    none; its exponent; its largest magnitude after the rescaling).

    That maximum needs no pass over the lanes: ``x -> clip(rne(x * f))`` is odd and
    monotone, so the largest rescaled magnitude is the rescaled largest one. So the
    next step's pass over the lanes applies the rescaling as it reads them, instead of
    a pass of its own. ``a_float_bits`` is ``a`` as float64 bits, whose exponent field
    is an exact integer's bit length (no libm call).

    Scalars only: numba reference-counts the arrays a function is given, even inlined,
    with atomic instructions, which cost more than this whole step where the tile loops
    did it per vector.
    """
    if a == 0:
        return 1.0, _E_ZERO, a
    s = ((a_float_bits >> 52) & 0x7FF) - 1022 - (bits - 1)
    if s <= 0:
        return 1.0, e, a
    f = _shift_factor(s)
    return f, e + s, _round_clip(a, f, lim, magic)


#: Pixels per tile: a tile's vectors (N x 64 lanes, 8 KiB at N = 16 in float64) and the
#: per-pixel scratch stay in the L1 cache through all the passes of a chain's path.
_TILE = 64
#: The widest wide and storage mantissas whose vectors float32 lanes hold exactly (see
#: the module doc); a chain with a ``vv_mul`` (products to 2**31) runs in float64.
NARROW_BITS = 16


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
    at a time, in float32 lanes where those are exact (:data:`NARROW_BITS`), else
    float64.
    """
    p_count, blocks = out_e.shape
    n = x.shape[0] // blocks
    # Nothing here is bounds-checked: a caller's shape mistake must fail, not write
    # past an array.
    uses_aux = False
    uses_mul = False
    for k in range(ops.shape[0]):
        uses_aux |= ops[k, 0] != OP_RELU and ops[k, 1] == SRC_AUX
        uses_mul |= ops[k, 0] == OP_MUL
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
    wide_lim, lim = (1 << (wide_bits - 1)) - 1, (1 << (store_bits - 1)) - 1
    args = (x, e_in, normalize_first, wide_bits, store_bits, ops, const_q, const_e, aux_q,
            aux_e, out_q, out_e)  # fmt: skip
    # Every float the lanes meet is of one type: numba would widen a float32 expression
    # with a float64 (or int) operand, and RINT_MAGIC32 rounds only in float32.
    if wide_bits <= NARROW_BITS and store_bits <= NARROW_BITS and not uses_mul:
        limits = (np.float32(wide_lim), np.float32(lim), np.float32(1.0))
        return _chain_tiles(*args, RINT_MAGIC32, *limits)
    return _chain_tiles(*args, RINT_MAGIC, float(wide_lim), float(lim), 1.0)


@njit(cache=True, nogil=True)
def _chain_tiles(
    x, e_in, normalize_first, wide_bits, store_bits, ops, const_q, const_e, aux_q, aux_e,
    out_q, out_e, magic, wide_lim, lim, one,
) -> int:  # fmt: skip
    """:func:`chain_vectors` on lanes of ``magic``'s float type (``wide_lim``, ``lim``
    and ``one`` are of it too)."""
    wide_vectors()
    p_count, blocks = out_e.shape
    n = x.shape[0] // blocks
    per_pixel_e = e_in.shape[1] > 1
    zero = magic - magic
    v = np.full((n, _TILE), zero)
    yt = np.full((n, _TILE), zero)  # an MFU op's operand lanes
    amax = np.full(_TILE, zero)
    smax = np.full(_TILE, zero)  # largest signed lane, for a ReLU folded into a pass
    f = np.full(_TILE, one)  # the planned rescaling of the vectors, applied by the next pass
    fx = np.full(_TILE, one)
    fy = np.full(_TILE, one)
    fz = np.full(_TILE, one)
    e = np.empty(_TILE, np.int64)
    ye = np.empty(_TILE, np.int64)
    # The reducer's lanes are normalized in float64 (accumulators reach 2**53).
    amax64 = np.empty(_TILE)
    f64 = np.empty(_TILE)
    scratch = np.empty(1)
    scratch_bits = scratch.view(np.int64)
    wide_lim64 = float((1 << (wide_bits - 1)) - 1)
    largest = _E_ZERO
    for b in range(blocks):
        r0 = b * n
        for t0 in range(0, p_count, _TILE):
            cnt = min(_TILE, p_count - t0)
            for p in range(cnt):
                e[p] = e_in[b, uix(t0 + p if per_pixel_e else 0)]
                amax64[p] = 0.0
                f[p] = one
            for lane in range(n):
                for p in range(cnt):
                    amax64[p] = _max_into(amax64[p], abs(x[uix(r0 + lane), uix(t0 + p)]))
            if normalize_first:
                for p in range(cnt):
                    scratch[0] = amax64[p]
                    f64[p], e[p], amax64[p] = _planned(
                        amax64[p], scratch_bits[0], e[p], wide_bits, wide_lim64, RINT_MAGIC
                    )
                for lane in range(n):
                    for p in range(cnt):
                        xv = x[uix(r0 + lane), uix(t0 + p)]
                        v[lane, p] = _round_clip(xv, f64[p], wide_lim64, RINT_MAGIC)
            else:
                for lane in range(n):
                    for p in range(cnt):
                        v[lane, p] = x[uix(r0 + lane), uix(t0 + p)]
            for p in range(cnt):
                amax[p] = amax64[p]
            # Whether a vector of the tile has a rescaling pending (f != 1). Often none
            # has: the loops below then skip it, a third of an op's work per lane (LLVM
            # makes a loop of each kind, as the flag does not change inside them).
            pending = False
            for k in range(ops.shape[0]):
                code = ops[k, 0]
                if code == OP_RELU and k > 0 and ops[k - 1, 0] != OP_RELU:
                    continue  # folded into op k - 1's pass (see below)
                # A ReLU right after this op is folded into its pass: ReLU commutes with
                # the normalize's odd, monotone rescaling, so the pass stores max(r, 0)
                # and the plan below takes the ReLU's largest magnitude from the largest
                # signed lane: one pass over the tile less.
                relu_next = code != OP_RELU and k + 1 < ops.shape[0] and ops[k + 1, 0] == OP_RELU
                lower = zero if relu_next else -magic  # -magic: below every lane
                if code != OP_RELU:  # the operand's lanes and exponents for the tile
                    aux = ops[k, 1] == SRC_AUX
                    for p in range(cnt):
                        ye[p] = aux_e[uix(t0 + p), b] if aux else const_e[k, b]
                    for lane in range(n):
                        c = const_q[k, b, lane]
                        for p in range(cnt):
                            yt[lane, p] = aux_q[uix(t0 + p), uix(r0 + lane)] if aux else c
                if code == OP_ADD or code == OP_MAX:  # both to the larger exponent
                    for p in range(cnt):
                        ea = max(e[p], ye[p])
                        fx[p] = _shift_factor(ea - e[p])
                        fy[p] = _shift_factor(ea - ye[p])
                        e[p] = ea
                elif code == OP_MUL:
                    for p in range(cnt):
                        e[p] += ye[p]
                for p in range(cnt):
                    amax[p] = zero
                    smax[p] = -magic
                # One loop per op: with the op chosen inside, LLVM computed every op's
                # result and selected one (the vector path ran 7 % slower).
                if code == OP_RELU:
                    for lane in range(n):
                        for p in range(cnt):
                            r = max(_round_clip(v[lane, p], f[p], wide_lim, magic), zero)
                            v[lane, p] = r
                            amax[p] = _max_into(amax[p], r)
                elif code == OP_MUL:
                    for lane in range(n):
                        for p in range(cnt):
                            r = _round_clip(v[lane, p], f[p], wide_lim, magic) * yt[lane, p]
                            v[lane, p] = max(r, lower)
                            amax[p] = _max_into(amax[p], abs(r))
                            smax[p] = _max_into(smax[p], r)
                elif relu_next:
                    for lane in range(n):
                        for p in range(cnt):
                            r = _aligned_op(code, v[lane, p], f[p], fx[p], yt[lane, p], fy[p],
                                            wide_lim, magic, pending)  # fmt: skip
                            v[lane, p] = max(r, zero)
                            amax[p] = _max_into(amax[p], abs(r))
                            smax[p] = _max_into(smax[p], r)
                else:  # the same without the ReLU (its two more operations per lane)
                    for lane in range(n):
                        for p in range(cnt):
                            r = _aligned_op(code, v[lane, p], f[p], fx[p], yt[lane, p], fy[p],
                                            wide_lim, magic, pending)  # fmt: skip
                            v[lane, p] = r
                            amax[p] = _max_into(amax[p], abs(r))
                pending = False
                for p in range(cnt):
                    scratch[0] = amax[p]
                    f[p], e[p], amax[p] = _planned(amax[p], scratch_bits[0], e[p], wide_bits,
                                                   wide_lim, magic)  # fmt: skip
                    pending |= f[p] != one
                if relu_next:  # the ReLU's renormalize: an all-negative vector is zero
                    for p in range(cnt):
                        amax[p] = max(_round_clip(smax[p], f[p], wide_lim, magic), zero)
                        if amax[p] == 0:
                            e[p] = _E_ZERO
            # tessera.numerics.to_storage: normalize to store_bits, then bring the
            # exponent into int8 (a left shift that saturates, or a right shift that may
            # zero the vector). Each rescaling is planned per vector here (its largest
            # magnitude tells whether the last one leaves anything), and the one pass
            # below applies the pending one, these two, and writes the result.
            for p in range(cnt):
                scratch[0] = amax[p]
                fx[p], e[p], amax[p] = _planned(amax[p], scratch_bits[0], e[p], store_bits, lim,
                                                magic)  # fmt: skip
            clamped = False  # a vector of the tile has its exponent clamped
            for p in range(cnt):
                fz[p] = one
                if amax[p] == 0:
                    pass  # E_ZERO already
                elif e[p] > _E_MAX:
                    fz[p] = _POS_POW2[min(e[p] - _E_MAX, 40)]
                    e[p] = _E_MAX
                elif e[p] < _E_MIN:
                    fz[p] = _shift_factor(_E_MIN - e[p])
                    top = (amax[p] * fz[p] + magic) - magic
                    e[p] = _E_MIN if top != 0 else _E_ZERO  # only this shift zeroes a vector
                clamped |= fz[p] != one
                out_e[uix(t0 + p), b] = e[p]
                largest = max(largest, e[p])
            for lane in range(n):
                for p in range(cnt):
                    r = _round_clip(v[lane, p], f[p], wide_lim, magic) if pending else v[lane, p]
                    r = _round_clip(r, fx[p], lim, magic)
                    v[lane, p] = _round_clip(r, fz[p], lim, magic) if clamped else r
            for p in range(cnt):
                for lane in range(n):
                    out_q[uix(t0 + p), uix(r0 + lane)] = v[lane, p]
    return largest


def quantize_blocks(
    x: np.ndarray, bits: int, out: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tessera.numerics.quantize_float` (no ``min_exp``) compiled: float blocks
    (last axis = one block) -> storage mantissas and exponents, as int64 (into ``out``,
    C-contiguous arrays of those shapes, if given).

    Every run quantizes its input (802 k values for ResNet-50) before the program starts;
    numpy's dozen passes over the blocks took 8 ms of it, this one pass well under 1.
    """
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize non-finite values (NaN or Inf) to BFP")
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    q, e = (
        out if out is not None else (np.empty(x.shape, np.int64), np.empty(x.shape[:-1], np.int64))
    )
    if (
        q.shape != x.shape
        or e.shape != x.shape[:-1]
        or not (q.flags.c_contiguous and e.flags.c_contiguous)
    ):
        raise ValueError("quantize_blocks: out does not fit the blocks")
    _quantize_rows(
        flat, float(numerics.sat_limit(bits)), bits, q.reshape(flat.shape), e.reshape(-1)
    )
    return q, e


@njit(cache=True, nogil=True)
def _quantize_rows(x: np.ndarray, lim: float, bits: int, q: np.ndarray, e: np.ndarray) -> None:
    wide_vectors()
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
