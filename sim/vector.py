"""The chain's vector path, compiled: normalize -> MFU ops -> re-block to storage.

Everything a chain does after its reducer (the MVU sum, the pool, or a plain read) is
per vector: N lanes and one exponent. :func:`chain_vectors` runs that whole path for
every vector of a chain (or of a band of its pixels) in one compiled loop, so each value
is read once as an accumulator and written once as a storage mantissa, instead of a
dozen whole-array numpy passes. It is :mod:`tessera.numerics` step for step, and the
simulator tests compare its results bit for bit with the reference executor, which uses
:mod:`tessera.numerics` directly.

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
#: ``2.0**k`` for the left shifts of :func:`_to_storage` (at most 40).
_POS_POW2 = np.ldexp(1.0, np.arange(41))
#: Adding and subtracting 1.5 * 2**52 rounds a float below 2**51 to an integer, half to
#: even (the FPU's rounding mode), in two vectorisable instructions.
_RINT_MAGIC = 6755399441055744.0


@njit(cache=True, inline="always")
def _rne_shift(v: np.ndarray, s: int) -> None:
    """:func:`tessera.numerics.rne_shift` of the vector ``v`` in place (``s >= 0``)."""
    if s > 0:
        f = _NEG_POW2[min(s, 64)]
        for i in range(v.size):
            v[i] = (v[i] * f + _RINT_MAGIC) - _RINT_MAGIC


@njit(cache=True, inline="always")
def _normalize(v: np.ndarray, lsb: int, bits: int, cell: np.ndarray, word: np.ndarray) -> int:
    """:func:`tessera.numerics.normalize` of the vector ``v`` in place; returns its exponent.

    ``cell`` is a one-element float64 scratch array and ``word`` its int64 view: they
    read a float's exponent field (an exact integer's bit length) without a libm call.
    """
    amax = 0.0
    for i in range(v.size):
        amax = max(amax, abs(v[i]))
    if amax == 0.0:
        return _E_ZERO
    cell[0] = amax
    shift = ((word[0] >> 52) & 0x7FF) - 1022 - (bits - 1)
    if shift <= 0:
        return lsb
    _rne_shift(v, shift)
    lim = float((1 << (bits - 1)) - 1)
    for i in range(v.size):
        v[i] = min(max(v[i], -lim), lim)
    return lsb + shift


@njit(cache=True, inline="always")
def _to_storage(v: np.ndarray, e: int, bits: int, cell: np.ndarray, word: np.ndarray) -> int:
    """:func:`tessera.numerics.to_storage` of ``v`` in place; returns the exponent."""
    e = _normalize(v, e, bits, cell, word)
    lim = float((1 << (bits - 1)) - 1)
    if e > _E_MAX:
        f = _POS_POW2[min(e - _E_MAX, 40)]
        for i in range(v.size):
            v[i] = min(max(v[i] * f, -lim), lim)
        e = _E_MAX
    elif e < _E_MIN and e != _E_ZERO:
        _rne_shift(v, _E_MIN - e)
        e = _E_MIN
    for i in range(v.size):
        if v[i] != 0.0:
            return e
    return _E_ZERO


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
) -> None:
    """Run a chain's vector path on pixel-major vectors; results into ``out_q``/``out_e``.

    ``x`` [P, B*N]: the reducer's exact integer lanes (vector ``b`` of pixel ``p`` is
    ``x[p, b*N:(b+1)*N]``), at exponent ``e_in`` [P or 1, B] (one row: the same for every
    pixel). With ``normalize_first`` they are normalized to ``wide_bits`` (accumulators,
    pool sums); without, they are already wide vectors (a plain read of stored blocks).
    ``ops`` [K, 2]: the body's MFU ops in order, (``OP_*``, ``SRC_*``); op ``k`` with a
    VRF operand reads ``const_q[k, b]`` [N] and ``const_e[k, b]``, an AUX operand reads
    ``aux_q[p, b*N:(b+1)*N]`` and ``aux_e[p, b]``. The result is re-blocked to
    ``store_bits``: ``out_q`` [P, B*N], ``out_e`` [P, B].
    """
    p_count, blocks = out_e.shape
    n = x.shape[1] // blocks
    per_pixel_e = e_in.shape[0] > 1
    v = np.empty(n, np.float64)
    y = np.empty(n, np.float64)
    cell = np.empty(1, np.float64)
    word = cell.view(np.int64)
    for p in range(p_count):
        er = p if per_pixel_e else 0
        for b in range(blocks):
            c0 = b * n
            for i in range(n):
                v[i] = x[p, c0 + i]
            e = np.int64(e_in[er, b])
            if normalize_first:
                e = _normalize(v, e, wide_bits, cell, word)
            for k in range(ops.shape[0]):
                code = ops[k, 0]
                if code == OP_RELU:
                    for i in range(n):
                        v[i] = max(v[i], 0.0)
                    e = _normalize(v, e, wide_bits, cell, word)
                    continue
                if ops[k, 1] == SRC_VRF:
                    for i in range(n):
                        y[i] = const_q[k, b, i]
                    ye = np.int64(const_e[k, b])
                else:
                    for i in range(n):
                        y[i] = aux_q[p, c0 + i]
                    ye = np.int64(aux_e[p, b])
                if code == OP_MUL:
                    for i in range(n):
                        v[i] = v[i] * y[i]
                    e = _normalize(v, e + ye, wide_bits, cell, word)
                    continue
                # vv_add / vv_max: both operands to the larger exponent, then combine.
                ea = max(e, ye)
                _rne_shift(v, ea - e)
                _rne_shift(y, ea - ye)
                if code == OP_ADD:
                    for i in range(n):
                        v[i] += y[i]
                else:
                    for i in range(n):
                        v[i] = max(v[i], y[i])
                e = _normalize(v, ea, wide_bits, cell, word)
            e = _to_storage(v, e, store_bits, cell, word)
            for i in range(n):
                out_q[p, c0 + i] = v[i]
            out_e[p, b] = e
