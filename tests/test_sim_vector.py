"""The simulator's compiled vector path equals tessera.numerics, op for op."""

from __future__ import annotations

import inspect
import re
import threading
import time

import llvmlite.binding as llvm
import numpy as np
import pytest
from numba import njit

from tessera import numerics
from tessera.sim import amx, kernels, vector

N = 16


def _numerics_chain(x, e_in, normalize_first, wide, store, ops, cq, ce, aq, ae):
    """The same chain written with tessera.numerics on [P, B, N] arrays."""
    p, b = ae.shape
    v = x.reshape(p, b, N).astype(np.int64)
    e = np.broadcast_to(e_in, (p, b)).astype(np.int64)
    if normalize_first:
        v, e = numerics.normalize(v, e, wide)
    for k, (code, src) in enumerate(ops):
        if code == vector.OP_RELU:
            v, e = numerics.wide_relu(v, e, wide)
            continue
        if src == vector.SRC_VRF:
            yq, ye = np.broadcast_to(cq[k], (p, b, N)), np.broadcast_to(ce[k], (p, b))
        else:
            yq, ye = aq.reshape(p, b, N), ae
        fn = {vector.OP_ADD: numerics.wide_add, vector.OP_MAX: numerics.wide_max}
        fn[vector.OP_MUL] = numerics.wide_mul
        v, e = fn[code](v, e, yq, ye, wide)
    return numerics.to_storage(v, e, store)


def _case(rng, p, b, kind):
    """Random chain inputs; ``kind`` picks the value range that stresses one path."""
    if kind == "acc":  # exact accumulators up to 2**52, float64 as the MVU gives them
        mag = 2.0 ** rng.integers(0, 53, size=(p, b * N))
        x = np.rint(rng.uniform(-1, 1, size=(p, b * N)) * mag)
        e_in = rng.integers(-160, 100, size=(1, b))
        first = True
    else:  # stored blocks read as they are (int8 mantissas, int8 exponents)
        x = rng.integers(-127, 128, size=(p, b * N)).astype(np.int8)
        e_in = rng.integers(-128, 128, size=(p, b))
        first = False
    x[rng.random(x.shape) < 0.2] = 0
    zero_rows = rng.random((p, b)) < 0.1
    x.reshape(p, b, N)[zero_rows] = 0
    k = rng.integers(0, 5)
    ops = np.stack([rng.integers(0, 4, size=k), rng.integers(0, 2, size=k)], axis=1)
    ops = ops.reshape(-1, 2).astype(np.int64)
    cq = rng.integers(-(2**15) + 1, 2**15, size=(max(k, 1), b, N)).astype(np.int64)
    ce = rng.integers(-140, 60, size=(max(k, 1), b)).astype(np.int64)
    ce[rng.random(ce.shape) < 0.1] = numerics.E_ZERO
    aq = rng.integers(-127, 128, size=(p, b * N)).astype(np.int8)
    ae = rng.integers(-128, 128, size=(p, b)).astype(np.int8)
    return x, e_in.astype(np.int64), first, ops, cq, ce, aq, ae


@pytest.mark.parametrize("kind", ["acc", "stored"])
@pytest.mark.parametrize("seed", range(40))
def test_chain_vectors_equals_numerics(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    p, b = int(rng.integers(1, 40 if seed % 2 else 200)), int(rng.integers(1, 5))
    wide, store = (24, 8) if seed % 3 else (16, 6)
    x, e_in, first, ops, cq, ce, aq, ae = _case(rng, p, b, kind)
    out_q = np.empty((p, b * N), np.int8)
    out_e = np.empty((p, b), np.int8)
    largest = vector.chain_vectors(
        x.T, e_in.T, first, wide, store, ops, cq, ce, aq, ae, out_q, out_e
    )
    want_q, want_e = _numerics_chain(x, e_in, first, wide, store, ops, cq, ce, aq, ae)
    np.testing.assert_array_equal(out_e, want_e)
    assert largest == want_e.max()
    np.testing.assert_array_equal(out_q.reshape(p, b, N), want_q)


def test_vector_path_compiles_to_512_bit_vectors_on_avx512() -> None:
    """:func:`vector.wide_vectors` reaches LLVM: on an AVX-512 CPU whose tuning keeps to
    256-bit vectors (Intel's, Ice Lake to Emerald Rapids), the vector path's float32
    loops run on 512-bit registers, as the same loops without it do not. A numba or
    llvmlite change that drops the attribute fails here, not as a slower simulator."""
    llvm.initialize_native_target()
    if not llvm.get_host_cpu_features().get("avx512f"):
        pytest.skip("this CPU has no AVX-512")
    rng = np.random.default_rng(0)
    x, e_in, first, ops, cq, ce, aq, ae = _case(rng, 70, 2, "acc")
    p, b = ae.shape
    narrow = (np.float32(2**15 - 1), np.float32(127), np.float32(1))
    args = (np.ascontiguousarray(x.T), e_in.T.copy(), first, 16, 8, ops[ops[:, 0] != 3], cq,
            ce, aq, ae, np.empty((p, b * N), np.int8), np.empty((p, b), np.int8),
            vector.RINT_MAGIC32, *narrow)  # fmt: skip
    packed_512 = re.compile(r"v(add|max|min)ps\s[^\n]*%zmm")

    def packed_512_ops(with_attribute: bool) -> int:
        source = inspect.getsource(vector._chain_tiles.py_func)
        if not with_attribute:
            source = source.replace("    wide_vectors()\n", "")
        scope = dict(vars(vector))
        exec(source.replace("@njit(cache=True, nogil=True)\n", ""), scope)
        compiled = njit(nogil=True)(scope["_chain_tiles"])
        compiled(*args)
        return sum(len(packed_512.findall(a)) for a in compiled.inspect_asm().values())

    if packed_512_ops(False):
        pytest.skip("LLVM's tuning for this CPU already prefers 512-bit vectors")
    assert packed_512_ops(True) > 0


@pytest.mark.parametrize("kind", ["acc", "stored"])
@pytest.mark.parametrize("seed", range(6))
def test_relu_after_an_op_zeroes_all_negative_vectors(kind: str, seed: int) -> None:
    """A ReLU after an op (folded into that op's pass) turns a vector whose lanes are all
    negative into the canonical zero (``E_ZERO``), which the next op then aligns to its
    operand; vectors with positive lanes keep their exponent."""
    rng = np.random.default_rng(100 + seed)
    p, b = 70, 3
    x, e_in, first, _ops, _cq, _ce, aq, ae = _case(rng, p, b, kind)
    v = x.reshape(p, b, N)
    negative = rng.random((p, b)) < 0.5
    v[negative] = -np.abs(v[negative]) - 1
    # The first op keeps them negative (a small negative constant added); the last adds
    # the AUX operand at its own exponents.
    ops = np.array([[vector.OP_ADD, vector.SRC_VRF], [vector.OP_RELU, 0], [vector.OP_ADD, 1]])
    cq = -rng.integers(0, 2**15, size=(3, b, N))
    ce = rng.integers(-140, -100, size=(3, b))
    out_q = np.empty((p, b * N), np.int8)
    out_e = np.empty((p, b), np.int8)
    vector.chain_vectors(x.T, e_in.T, first, 16, 8, ops, cq, ce, aq, ae, out_q, out_e)
    want_q, want_e = _numerics_chain(x, e_in, first, 16, 8, ops, cq, ce, aq, ae)
    np.testing.assert_array_equal(out_e, want_e)
    np.testing.assert_array_equal(out_q.reshape(p, b, N), want_q)


def test_rounding_ties_and_saturation() -> None:
    """Ties round to even and a rounded-up maximum saturates, as numerics says."""
    x = np.array([[255.0, 253.0, -255.0, 1.0] + [0.0] * (N - 4)])
    out_q, out_e = np.empty((1, N), np.int8), np.empty((1, 1), np.int8)
    no_ops = np.zeros((0, 2), np.int64)
    dummy_c, dummy_e = np.zeros((1, 1, N), np.int64), np.zeros((1, 1), np.int64)
    vector.chain_vectors(
        x.T, np.zeros((1, 1), np.int64), True, 8, 8, no_ops, dummy_c, dummy_e,
        np.zeros((1, N), np.int8), np.zeros((1, 1), np.int8), out_q, out_e,
    )  # fmt: skip
    # 255/2 = 127.5 -> 128 (even) -> saturates to 127; 253/2 = 126.5 -> 126; 1/2 -> 0.
    assert out_q[0, :4].tolist() == [127, 126, -127, 0]
    assert out_e[0, 0] == 1


def test_mismatched_shapes_are_refused() -> None:
    """The compiled loop has no bounds checks, so it checks its operands' shapes first."""
    x = np.zeros((2 * N, 5))
    ok = dict(
        e_in=np.zeros((2, 1), np.int64), ops=np.zeros((0, 2), np.int64),
        cq=np.zeros((1, 2, N), np.int64), ce=np.zeros((1, 2), np.int64),
        aq=np.zeros((1, 1), np.int8), ae=np.zeros((1, 1), np.int8),
        out_q=np.empty((5, 2 * N), np.int8), out_e=np.empty((5, 2), np.int8),
    )  # fmt: skip

    def run(**changes: np.ndarray) -> None:
        a = {**ok, **changes}
        vector.chain_vectors(
            x, a["e_in"], True, 24, 8, a["ops"], a["cq"], a["ce"], a["aq"], a["ae"],
            a["out_q"], a["out_e"],
        )  # fmt: skip

    run()
    with pytest.raises(ValueError, match="shapes"):
        run(out_q=np.empty((5, 3 * N), np.int8), out_e=np.empty((5, 3), np.int8))
    with pytest.raises(ValueError, match="shapes"):
        run(out_q=np.empty((6, 2 * N), np.int8), out_e=np.empty((6, 2), np.int8))
    with pytest.raises(ValueError, match="shapes"):  # an AUX op without its operand
        run(ops=np.array([[vector.OP_ADD, vector.SRC_AUX]], np.int64))
    with pytest.raises(ValueError, match="shapes"):  # a VRF op without its constants
        run(ops=np.array([[vector.OP_ADD, vector.SRC_VRF]] * 2, np.int64))


@pytest.mark.parametrize("bits", [3, 5, 8, 16])
@pytest.mark.parametrize("seed", range(6))
def test_compiled_quantize_equals_numerics(bits: int, seed: int) -> None:
    """The host's compiled input quantizer is numerics.quantize_float, bit for bit: over
    the whole exponent range, all-zero blocks, blocks that round to zero or saturate,
    and exact ties (half an LSB above a mantissa of every parity)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(300, N)) * 2.0 ** rng.integers(-140, 140, size=(300, 1))
    x[rng.random(x.shape) < 0.2] = 0.0
    x[:10] = 0.0
    lsb = 2.0 ** rng.integers(-120, 120, size=(40, 1))
    ties = (rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(40, N)) + 0.5) * lsb
    top = (2 ** (bits - 1) - 1) * lsb  # the block's maximum: sets the exponent to lsb's
    x = np.concatenate([x, np.concatenate([top, ties[:, 1:]], axis=1)])
    x[-5:] = 2.0**-1080  # below anything a storage exponent reaches: rounds to zero
    want_q, want_e = numerics.quantize_float(x.reshape(-1, 2, N // 2), bits)
    got_q, got_e = vector.quantize_blocks(x.reshape(-1, 2, N // 2), bits)
    np.testing.assert_array_equal(got_e, want_e)
    np.testing.assert_array_equal(got_q, want_q)
    assert (want_e == numerics.E_ZERO).any() and (np.abs(want_q) == 2 ** (bits - 1) - 1).any()
    with pytest.raises(ValueError, match="non-finite"):
        vector.quantize_blocks(np.array([[1.0, np.nan]]), bits)


@pytest.mark.parametrize("seed", range(12))
def test_compiled_pool_equals_pool_of_the_grid(seed: int) -> None:
    """The simulator's one-pass pool equals kernels.pool on kernels.grid_f64, with
    padding, strides and blocks below the grid floor (which round)."""
    rng = np.random.default_rng(seed)
    h, w, cb = (int(v) for v in rng.integers(1, 9, 3))
    kh, kw, sh, sw = (int(v) for v in rng.integers(1, 4, 4))
    pt, pl = int(rng.integers(0, kh)), int(rng.integers(0, kw))
    oh = (h + pt - kh) // sh + 1 + int(rng.integers(0, 2))
    ow = (w + pl - kw) // sw + 1 + int(rng.integers(0, 2))
    oh, ow = max(oh, 1), max(ow, 1)
    q = rng.integers(-127, 128, (h, w, cb, N)).astype(np.int8)
    e = rng.integers(-30, 0, (h, w, cb)).astype(np.int8)
    floor = -20
    for kind_max in (True, False):
        got = kernels.pool_lanes(q, e, floor, kind_max, (kh, kw), (sh, sw), (pt, pl), (oh, ow))
        grid = kernels.grid_f64(q, e, floor).reshape(h, w, cb * N)
        want = kernels.pool(grid, kind_max, (kh, kw), (sh, sw), (pt, pl), (oh, ow))
        np.testing.assert_array_equal(got, want.reshape(oh * ow, cb * N).T)


@pytest.mark.parametrize("seed", range(12))
def test_unrolled_windows_equal_im2col_of_the_grid(seed: int) -> None:
    """Windows.rows (compiled, scaled as read) equals im2col of grid_f64, with padding,
    strides, dilation, a channel subset and blocks below the grid floor."""
    rng = np.random.default_rng(seed)
    h, w, cb = (int(v) for v in rng.integers(1, 9, 3))
    kh, kw, sh, sw, dh, dw = (int(v) for v in rng.integers(1, 4, 6))
    pt, pl = int(rng.integers(0, kh)), int(rng.integers(0, kw))
    oh = max(1, (h + pt - (kh - 1) * dh - 1) // sh + 1 + int(rng.integers(0, 2)))
    ow = max(1, (w + pl - (kw - 1) * dw - 1) // sw + 1 + int(rng.integers(0, 2)))
    q = rng.integers(-127, 128, (h, w, cb, N)).astype(np.int8)
    e = rng.integers(-30, 0, (h, w, cb)).astype(np.int8)
    chans = np.sort(rng.choice(cb * N, size=int(rng.integers(1, cb * N + 1)), replace=False))
    geometry = ((kh, kw), (sh, sw), (pt, pl), (dh, dw), (oh, ow))
    grid = kernels.grid_f64(q, e, -20).reshape(h, w, cb * N)
    for subset in (None, chans):
        win = kernels.Windows(q, e, -20, subset, *geometry)
        want = kernels.im2col(grid if subset is None else grid[..., subset], *geometry)
        y0 = int(rng.integers(0, oh))
        np.testing.assert_array_equal(win.rows(0, oh), want)
        np.testing.assert_array_equal(win.rows(y0, oh), want[y0 * ow :])


def _digit_case(rng: np.random.Generator, extreme: bool, pixelwise: bool = False):
    """Windows over random blocks (exponents spanning the whole 16-bit activation window,
    some below the floor) and a weight grid of 8-bit mantissas shifted by up to 8;
    ``pixelwise``: a 1x1 convolution at stride 1, unpadded (rows are views of planes)."""
    h, w, cb = (int(v) for v in rng.integers(2, 8, 3))
    kh, kw, sh, sw = (int(v) for v in rng.integers(1, 4, 4))
    pt, pl = int(rng.integers(0, kh)), int(rng.integers(0, kw))
    oh = max(1, (h + pt - kh) // sh + 1 + int(rng.integers(0, 2)))
    ow = max(1, (w + pl - kw) // sw + 1 + int(rng.integers(0, 2)))
    if pixelwise:
        kh = kw = sh = sw = 1
        pt = pl = 0
        oh, ow = h, w
    floor = -20
    if extreme:  # the largest magnitudes at the top of the window, both signs
        q = rng.choice(np.array([-128, 127], np.int8), (h, w, cb, N))
        e = np.full((h, w, cb), floor + 16, np.int8)
    else:
        q = rng.integers(-128, 128, (h, w, cb, N)).astype(np.int8)
        e = rng.integers(floor - 3, floor + 17, (h, w, cb)).astype(np.int8)
    geometry = ((kh, kw), (sh, sw), (pt, pl), (1, 1), (oh, ow))
    outs = int(rng.integers(1, 5)) * N
    k = kh * kw * cb * N
    wq = (
        rng.choice(np.array([-128, 127]), (outs, k))
        if extreme
        else rng.integers(-128, 128, (outs, k))
    )
    shift = np.full((outs, k), 8) if extreme else rng.integers(0, 9, (outs, k))
    grid = (wq << shift).astype(np.float64)
    return q, e, floor, geometry, grid


@pytest.mark.parametrize("kernel", ["amx", "onnxruntime"])
@pytest.mark.parametrize("seed", range(16))
def test_digit_products_equal_float64_products(seed: int, kernel: str, monkeypatch) -> None:
    """WeightOperand's byte-digit products (u8 x s8 on AMX tiles or onnxruntime's
    MatMulInteger, offset activation digits, balanced weight digits) equal the float64
    product of the same grids, on whole layers (again with the weight digits packed once)
    and on bands of rows and outputs, at the extremes of both grids' ranges."""
    if not kernels.digit_products_exact():
        pytest.skip("this CPU's MatMulInteger is not exact on the digits' range")
    monkeypatch.setattr(kernels, "DIGITS_MIN_K", 1)
    monkeypatch.setattr(kernels, "AMX_DIGITS_MIN_K", 1)
    if kernel == "onnxruntime":
        monkeypatch.setattr(kernels, "_AMX_EXACT", False)
    elif not kernels.amx_products_exact():
        pytest.skip("no AMX tiles on this CPU or OS")
    rng = np.random.default_rng(seed)
    q, e, floor, geometry, grid = _digit_case(rng, extreme=seed % 4 == 0, pixelwise=seed % 3 == 1)
    oh = geometry[4][0]
    operand = kernels.WeightOperand(grid)
    win = kernels.Windows(q, e, floor, None, *geometry)
    with kernels.record_products() as made:
        got = operand.product(win, 0, oh, 0, grid.shape[0])
    assert made and all(act_digits for *_, act_digits, _ in made)
    np.testing.assert_array_equal(got, kernels.gemm_exact(win.rows(0, oh), grid, False))
    # Used again, the slice's digits go to a session of their own (packed once).
    np.testing.assert_array_equal(operand.product(win, 0, oh, 0, grid.shape[0]), got)
    assert list(operand._packed) == [(0, grid.shape[0])]
    y0, c1 = int(rng.integers(0, oh)), N * int(rng.integers(1, grid.shape[0] // N + 1))
    band = operand.product(win, y0, oh, N // 2, c1)
    np.testing.assert_array_equal(band, got[N // 2 : c1, y0 * geometry[4][1] :])


@pytest.mark.parametrize("lowest", [0, 8, 16])
def test_digit_products_leave_out_zero_low_planes(lowest: int, monkeypatch) -> None:
    """When every block exponent lies ``lowest`` or more above the floor, the low
    activation planes are all zero: the product takes 3 - lowest // 8 activation digits
    and still equals the float64 product."""
    if not kernels.digit_products_exact():
        pytest.skip("this CPU's MatMulInteger is not exact on the digits' range")
    monkeypatch.setattr(kernels, "DIGITS_MIN_K", 1)
    monkeypatch.setattr(kernels, "AMX_DIGITS_MIN_K", 1)
    rng = np.random.default_rng(lowest)
    q, e, floor, geometry, grid = _digit_case(rng, extreme=False)
    e = np.maximum(e, floor + lowest).astype(np.int8)
    e[0, 0, 0] = floor + lowest  # that plane is in use
    q[0, 0, 0, 0] = 1
    oh = geometry[4][0]
    win = kernels.Windows(q, e, floor, None, *geometry)
    with kernels.record_products() as made:
        got = kernels.WeightOperand(grid).product(win, 0, oh, 0, grid.shape[0])
    assert [act_digits for *_, act_digits, _ in made] == [kernels.ACT_DIGITS - lowest // 8]
    np.testing.assert_array_equal(got, kernels.gemm_exact(win.rows(0, oh), grid, False))


def test_digit_products_fall_back_when_not_exact(monkeypatch) -> None:
    """Where the probe finds the int8 product inexact (as AVX2's saturating pair sums
    would be), an activation does not fit 3 bytes, or the weights are so wide that the
    int64 total could overflow, every product is float64."""
    rng = np.random.default_rng(1)
    q, e, floor, geometry, grid = _digit_case(rng, extreme=False)
    monkeypatch.setattr(kernels, "DIGITS_MIN_K", 1)
    monkeypatch.setattr(kernels, "AMX_DIGITS_MIN_K", 1)
    oh = geometry[4][0]
    want = kernels.gemm_exact(kernels.Windows(q, e, floor, None, *geometry).rows(0, oh), grid)
    too_wide = e.copy()
    too_wide[0, 0, 0] = floor + 17  # 127 << 17 needs a fourth byte
    # weights of 31 bits (4 digits) over K >= 257: a shifted digit sum could pass 2**63
    assert grid.shape[1] >= 257
    cases = [(False, e, grid), (True, too_wide, grid), (True, e, grid * 2.0**15)]
    for exact, exps, weights in cases:
        monkeypatch.setattr(kernels, "_DIGIT_EXACT", exact)
        monkeypatch.setattr(kernels, "_AMX_EXACT", exact and kernels.amx_products_exact())
        win = kernels.Windows(q, exps, floor, None, *geometry)
        with kernels.record_products() as made:
            got = kernels.WeightOperand(weights).product(win, 0, oh, 0, grid.shape[0])
        assert made and not any(act_digits for *_, act_digits, _ in made)
        if exps is e and weights is grid:
            np.testing.assert_array_equal(got, want)


def test_digit_probe_catches_saturating_pair_sums(monkeypatch) -> None:
    """The probe fails a MatMulInteger that saturates int16 sums of product pairs."""

    def saturating(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        pairs = a.astype(np.int64).reshape(a.shape[0], -1, 2, 1) * b.astype(np.int64).reshape(
            1, -1, 2, b.shape[1]
        )
        return np.clip(pairs.sum(axis=2), -(2**15), 2**15 - 1).sum(axis=1).astype(np.int32)

    monkeypatch.setattr(kernels, "_DIGIT_EXACT", None)
    monkeypatch.setattr(kernels, "digit_product", saturating)
    assert kernels.digit_products_exact() is False


@pytest.mark.parametrize(
    "m, k, n, digits",
    [
        (1, 1, 1, (2, 2)),
        (31, 100, 7, (2, 2)),
        (33, 64, 33, (2, 2)),
        (16, 200, 32, (3, 2)),
        (17, 64, 16, (2, 3)),
        (48, 130, 48, (3, 3)),
        (64, 576, 256, (2, 2)),
        (97, 4608, 40, (2, 2)),
    ],
)
def test_amx_digit_accumulators_on_uneven_shapes(
    m: int, k: int, n: int, digits: tuple[int, int]
) -> None:
    """Accumulators summed from AMX tile products equal int64 ones where no dimension is
    a whole number of tiles (the last rows on tiles of fewer rows, up to 16 or more; K
    and N padded with zeros), on rows of a larger array, at the extremes of both digit
    ranges, with 2 or 3 digits a side (digit pairs of one weight summed in the tiles),
    their shifts and the offset's correction."""
    if not kernels.amx_products_exact():
        pytest.skip("no AMX tiles on this CPU or OS")
    rng = np.random.default_rng(m * k * n)
    ad, wd = digits
    a = rng.integers(0, 256, (ad, m + 9, k), dtype=np.uint8)[:, 5 : 5 + m]
    w = rng.integers(-128, 128, (wd, k, n), dtype=np.int8)
    a[:, 0], w[:, :, 0] = 255, -128
    corr = rng.integers(0, 2**40, n)
    got = np.empty((n, m))
    amx.digit_accumulators(a, amx.PackedWeights(list(w)), 0, corr, got)
    want = -corr[:, None]
    for i in range(ad):
        for j in range(wd):
            want = want + ((a[i].astype(np.int64) @ w[j].astype(np.int64)).T << 8 * (i + j))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("digits", [2, 3])
def test_amx_digit_pairs_are_not_summed_in_the_tiles_when_they_could_overflow(
    digits: int,
) -> None:
    """Two or three digit pairs of one weight at long reductions and extreme digits sum
    to more than int32 holds: each pair's tile sum is added up in int64 on its own (with
    3 x 3 digits, nine of them)."""
    if not kernels.amx_products_exact():
        pytest.skip("no AMX tiles on this CPU or OS")
    k = (2**31 - 1) // (255 * 128) if digits == 2 else 2**31 // (3 * 255 * 128) + 1
    a = np.full((digits, 3, k), 255, np.uint8)
    w = np.full((digits, k, 2), -128, np.int8)
    got = np.empty((2, 3))
    amx.digit_accumulators(a, amx.PackedWeights(list(w)), 0, np.zeros(2, np.int64), got)
    weight = sum(256 ** (i + j) for i in range(digits) for j in range(digits))
    np.testing.assert_array_equal(got, np.full((2, 3), k * 255 * -128 * weight))


def test_run_parallel_runs_every_item_once_and_raises_what_an_item_raised(monkeypatch) -> None:
    """The thread pool's hand-over: every item runs exactly once with two workers, also
    for callers on several threads at the same time (each waits only for its own
    items), and an item's exception reaches the caller from whichever thread ran it."""
    monkeypatch.setattr(kernels, "parallel_workers", lambda: 2)
    seen: list[int] = []
    lock = threading.Lock()

    def record(item: int) -> None:
        time.sleep(0.001 * (item % 3))
        with lock:
            seen.append(item)

    early: list[int] = []  # calls that returned before all their items had run

    def caller(base: int) -> None:
        for r in range(20):
            items = range(base + 10 * r, base + 10 * r + 10)
            kernels.run_parallel(record, items)
            with lock:
                if not set(items) <= set(seen):
                    early.append(items[0])

    threads = [threading.Thread(target=caller, args=(1000 * t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert early == []
    assert sorted(seen) == sorted(1000 * t + i for t in range(3) for i in range(200))

    def fail(item: int) -> None:
        time.sleep(0.01 if item == 0 else 0)
        if item == 3:
            raise ValueError(f"item {item}")

    with pytest.raises(ValueError, match="item 3"):
        kernels.run_parallel(fail, range(6))
    kernels.run_parallel(record, [7, 8])  # the pool still works afterwards
    assert seen[-2:] in ([7, 8], [8, 7])
