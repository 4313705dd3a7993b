"""The number format's edge cases: rounding, saturation, exponent range, alignment."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera import numerics as nx


def rne_exact(x: int, s: int) -> int:
    f = Fraction(x, 1 << s)
    fl = math.floor(f)
    r = f - fl
    return fl + (1 if r > Fraction(1, 2) or (r == Fraction(1, 2) and fl % 2) else 0)


@given(st.integers(-(2**60), 2**60), st.integers(0, 70))
def test_rne_shift_matches_exact_rounding(x: int, s: int) -> None:
    assert int(nx.rne_shift(np.array([x]), s)[0]) == rne_exact(x, min(s, 62))


def test_rne_ties_go_to_even() -> None:
    x = np.array([1, 3, 5, 7, -1, -3, -5, -7, 6, -6])
    assert nx.rne_shift(x, 1).tolist() == [0, 2, 2, 4, 0, -2, -2, -4, 3, -3]


@given(st.integers(0, 2**62))
def test_bit_length_exact(a: int) -> None:
    assert int(nx.bit_length(np.array([a]))[0]) == a.bit_length()


@given(
    st.lists(
        st.floats(-1e30, 1e30, allow_nan=False, allow_subnormal=False), min_size=16, max_size=16
    ),
    st.sampled_from([4, 6, 8, 10]),
)
def test_quantize_float_error_bound(vals: list[float], bits: int) -> None:
    x = np.array(vals)
    q, e = nx.quantize_float(x[None], bits)
    lim = nx.sat_limit(bits)
    assert np.all(np.abs(q) <= lim)
    amax = np.max(np.abs(x))
    if amax == 0 or (q == 0).all():
        assert e[0] == nx.E_ZERO or amax < 2.0**nx.E_MIN
        return
    back = nx.dequantize(q, e)[0]
    step = 2.0 ** float(e[0])
    # Round to nearest: half a step, plus saturation of the one value that rounds up to 2**(b-1).
    assert np.max(np.abs(back - x)) <= step * 1.0 + 1e-300
    assert amax < (lim + 1) * step  # the exponent is the smallest that fits


def test_quantize_float_saturates_instead_of_overflowing() -> None:
    # 127.75 * 2^k rounds to 128 -> saturates to 127 with the same exponent.
    x = np.array([[127.75, 1.0]])
    q, e = nx.quantize_float(x, 8)
    assert q[0, 0] == 127 and e[0] == 0


def test_quantize_zero_block_and_min_exp() -> None:
    q, e = nx.quantize_float(np.zeros((2, 4)), 8)
    assert (q == 0).all() and (e == nx.E_ZERO).all()
    q, e = nx.quantize_float(np.array([[1e-3, 0, 0, 0]]), 8, min_exp=-5)
    assert e[0] == -5 and q[0, 0] == 0  # far below the floor: flushed, exponent kept
    q, e = nx.quantize_float(np.array([[0.75, 0, 0, 0]]), 8, min_exp=-5)
    assert e[0] == -5 and q[0, 0] == 24


def test_quantize_rejects_nan() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        nx.quantize_float(np.array([[np.nan, 1.0]]), 8)


def test_to_storage_exponent_range() -> None:
    big = nx.to_storage(np.array([[100, -3]]), np.array([200]), 8)
    assert big[1][0] == nx.E_MAX and big[0].tolist() == [[127, -127]]
    tiny = nx.to_storage(np.array([[100, 3]]), np.array([-130]), 8)
    assert tiny[1][0] == nx.E_MIN and tiny[0].tolist() == [[12, 0]]  # 100/8 = 12.5 -> 12
    gone = nx.to_storage(np.array([[1, 1]]), np.array([-200]), 8)
    assert gone[1][0] == nx.E_ZERO and (gone[0] == 0).all()
    # A non-zero vector whose exponent is exactly E_ZERO is clamped onto E_MIN, not
    # stored under the all-zero marker: 127 * 2**-128 -> 64 * 2**-127 (63.5 to even).
    edge = nx.to_storage(np.array([[127, -3]]), np.array([nx.E_ZERO]), 8)
    assert edge[1][0] == nx.E_MIN and edge[0].tolist() == [[64, -2]]
    zero = nx.to_storage(np.array([[0, 0]]), np.array([nx.E_ZERO]), 8)
    assert zero[1][0] == nx.E_ZERO and (zero[0] == 0).all()


def test_normalize_shifts_only_when_needed() -> None:
    q, e = nx.normalize(np.array([[100, -50]]), np.array([3]), 8)
    assert q.tolist() == [[100, -50]] and e[0] == 3
    q, e = nx.normalize(np.array([[1000, -3]]), np.array([0]), 8)
    assert e[0] == 3 and q.tolist() == [[125, 0]]  # -3/8 = -0.375 -> 0


def test_clamp_to_floor_bounds_grid() -> None:
    q = np.array([[127, -127], [5, 3]])
    e = np.array([10, -20])
    g = nx.to_grid(q, e, 10 - 16)
    assert g[0].tolist() == [127 << 16, -127 << 16]
    assert g[1].tolist() == [0, 0]  # 5 * 2^-20 below the grid 2^-6: rounds to 0
    assert np.abs(g).max() <= 127 << 16


@given(
    st.lists(st.integers(-(2**15) + 1, 2**15 - 1), min_size=4, max_size=4),
    st.lists(st.integers(-(2**15) + 1, 2**15 - 1), min_size=4, max_size=4),
    st.integers(-40, 40),
    st.integers(-40, 40),
)
def test_wide_add_close_to_exact(xq, yq, xe, ye) -> None:
    x, y = np.array([xq]), np.array([yq])
    q, e = nx.wide_add(x, np.array([xe]), y, np.array([ye]), 16)
    exact = nx.dequantize(x, np.array([xe])) + nx.dequantize(y, np.array([ye]))
    got = nx.dequantize(q, e)
    # Each alignment shift and the renormalisation round once: <= 1.5 ulp of the result.
    ulp = 2.0 ** max(xe, ye)
    assert np.max(np.abs(got - exact)) <= 1.5 * ulp * (2 if e[0] > max(xe, ye) else 1)


def test_wide_mul_and_relu() -> None:
    q, e = nx.wide_mul(
        np.array([[3, -4]]), np.array([0]), np.array([[16384, 16384]]), np.array([-15]), 16
    )
    assert nx.dequantize(q, e).tolist() == [[1.5, -2.0]]
    q, e = nx.wide_relu(np.array([[-3, -4]]), np.array([5]), 16)
    assert (q == 0).all() and e[0] == nx.E_ZERO


def test_accumulator_bound() -> None:
    # ResNet-50's largest reduction (3x3x512) fits the 54-bit ALU54B accumulator ...
    assert nx.accumulator_bound_bits(3 * 3 * 512, 8, 16, 8) <= 53
    # ... and so does VGG-16's fc6 (7x7x512), the largest of the zoo.
    assert nx.accumulator_bound_bits(7 * 7 * 512, 8, 16, 8) <= 54
    assert nx.accumulator_bound_bits(1 << 20, 8, 16, 8) > 54
