"""The BFP logic in hdl/bfp.py equals tessera.numerics on random vectors (Amaranth sim)."""

import numpy as np
import pytest
from amaranth import Cat, ClockDomain, Module, Mux, Signal, signed
from amaranth.hdl import Value
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from tessera import numerics
from tessera.hdl import bfp

pytestmark = pytest.mark.rtl
N = 4


# The NPU's phased pipeline composes the rules of hdl/bfp.py itself (OR of magnitudes over
# the phases, registered shift, separate shift and round cycles). These whole-vector
# compositions of the same functions are this test's reference: they check the rules
# end to end against numerics.normalize / numerics.to_storage.


def normalize_by_union(
    m: Module, xs: list[Value], union: Value, lsb: Value, bits: int, name: str
) -> tuple[list[Signal], Signal]:
    """The lanes ``xs`` of a vector whose :func:`bfp.magnitude_union` is ``union`` -> mantissas
    of ``bits`` and the vector's exponent (numerics.normalize).

    After the shift every lane fits ``bits`` signed bits (|x| <= max), so the shifters
    build only those.
    """
    shift = bfp.normalize_shift(m, union, bits, name)
    mask = bfp.below_mask(m, shift, len(union), f"{name}_mask")
    qs = [
        bfp.saturate(
            m, bfp.rne_shift(m, x, shift, f"{name}_rne{i}", mask, bits), bits, f"{name}_q{i}"
        )
        for i, x in enumerate(xs)
    ]
    e = Signal(signed(bfp.EXP_BITS), name=f"{name}_e")
    m.d.comb += e.eq(Mux(union == 0, numerics.E_ZERO, lsb + shift))
    return qs, e


def normalize(
    m: Module, xs: list[Value], lsb: Value, bits: int, name: str
) -> tuple[list[Signal], Signal]:
    """Integer lanes at LSB exponent ``lsb`` -> (mantissas of ``bits``, exponent).

    numerics.normalize: shift right just enough for the largest magnitude to fit
    ``bits - 1`` magnitude bits, round half to even, saturate; all-zero -> E_ZERO.
    """
    union = bfp.magnitude_union(m, xs, name)
    return normalize_by_union(m, xs, union, lsb, bits, name)


def to_storage(
    m: Module, xs: list[Value], e_in: Value, bits: int, name: str
) -> tuple[list[Signal], Signal]:
    """numerics.to_storage: normalize to ``bits``, then clamp the exponent to int8."""
    q1, e1 = normalize(m, xs, e_in, bits, f"{name}_n")
    clamp = bfp.clamp_decision(m, e1, bits, name)
    limits = [bfp.sticky_limit(m, q, f"{name}_lim{i}") for i, q in enumerate(q1)]
    qs, ec = bfp.clamp_lanes(m, q1, clamp, bits, name, limits), clamp.e
    e = Signal(signed(8), name=f"{name}_ez")
    m.d.comb += e.eq(Mux(Cat(*[q.any() for q in qs]).any(), ec, numerics.E_ZERO))
    return qs, e


class Harness(wiring.Component):
    """normalize(x, lsb, 16) and to_storage(x, lsb, 8) side by side."""

    def __init__(self, width: int):
        self.width = width
        super().__init__(
            {
                "x": In(data.ArrayLayout(signed(width), N)),
                "lsb": In(signed(16)),
                "nq": Out(data.ArrayLayout(signed(16), N)),
                "ne": Out(signed(16)),
                "sq": Out(data.ArrayLayout(signed(8), N)),
                "se": Out(signed(8)),
            }
        )

    def elaborate(self, platform):
        m = Module()
        xs = [self.x[i] for i in range(N)]
        q, e = normalize(m, xs, self.lsb, 16, "n")
        m.d.comb += [self.nq[i].eq(q[i]) for i in range(N)] + [self.ne.eq(e)]
        q, e = to_storage(m, xs, self.lsb, 8, "s")
        m.d.comb += [self.sq[i].eq(q[i]) for i in range(N)] + [self.se.eq(e)]
        return m


@pytest.mark.parametrize("width", [20, 40])
def test_normalize_and_to_storage_match_numerics(width):
    rng = np.random.default_rng(width)
    dut = Harness(width)
    cases = []
    for _ in range(600):
        bits = int(rng.integers(1, width))
        x = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), N, dtype=np.int64)
        if rng.random() < 0.1:
            x[:] = 0
        if rng.random() < 0.2:  # exact halves: the round-to-even cases
            x = (x >> 3) << 3 | 4
        lsb = int(rng.integers(-200, 150))
        cases.append((x, lsb))

    async def bench(ctx):
        for x, lsb in cases:
            for i in range(N):
                ctx.set(dut.x[i], int(x[i]))
            ctx.set(dut.lsb, lsb)
            q, e = numerics.normalize(x[None], lsb, 16)
            assert [ctx.get(dut.nq[i]) for i in range(N)] == q[0].tolist(), (x, lsb)
            assert ctx.get(dut.ne) == int(e[0]), (x, lsb)
            q, e = numerics.to_storage(x[None], np.array([lsb]), 8)
            assert [ctx.get(dut.sq[i]) for i in range(N)] == q[0].tolist(), (x, lsb)
            assert ctx.get(dut.se) == int(e[0]), (x, lsb)

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("width", [1, 3, 16, 18, 33, 54])
def test_bit_length_tree_matches_python(width):
    m = Module()
    a = Signal(width)
    bl = bfp.bit_length(m, a, "bl")
    rng = np.random.default_rng(width)
    values = [0, 1, (1 << width) - 1] + [
        int(rng.integers(0, 1 << 62)) % (1 << width) >> int(rng.integers(0, width))
        for _ in range(200)
    ]

    async def bench(ctx):
        for v in values:
            ctx.set(a, v)
            assert ctx.get(bl) == v.bit_length(), v

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("width", [1, 2, 9, 24, 54])
def test_sticky_limit_gives_the_masks_sticky_bit(width):
    """rne_split's sticky bit from the sticky limit (a compare, from the registered search
    over slices of x, or the one-cycle search with a clamped shift) equals the one from
    below_mask (mask and OR) for every shift that rounds (s >= 1; at 0 there is no round
    bit), and the rounded results agree for every shift, on values with their lowest set
    bit anywhere."""
    m = Module()
    m.domains.sync = ClockDomain()  # (a 1-bit value has no slice to register)
    x = Signal(signed(width))
    s = Signal(range(width + 1))
    r_mask, by_mask = bfp.rne_split(m, x, s, "m")
    limit = Signal(range(width + 2))
    m.d.comb += limit.eq(bfp.sticky_limit_join(bfp.sticky_limit_parts(m, x, "lim"), width))
    r_limit, by_limit = bfp.rne_split(m, x, s, "l", limit=limit)
    one_cycle = bfp.sticky_limit(m, x, "one")
    r_one, by_one = bfp.rne_split(m, x, s, "o", limit=one_cycle, clamped=True)
    rounded_mask = bfp.rne_round(m, r_mask, by_mask, "rm")
    rounded_limit = bfp.rne_round(m, r_limit, by_limit, "rl")
    rounded_one = bfp.rne_round(m, r_one, by_one, "ro")
    rng = np.random.default_rng(width)
    values = {0, -1, 1, -(1 << (width - 1)), (1 << (width - 1)) - 1}
    for low in range(width):
        for _ in range(3):
            v = (int(rng.integers(0, 1 << 62)) << low | 1 << low) % (1 << width)
            values.add(v - (1 << width) if v >> (width - 1) else v)

    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1

    async def bench(ctx):
        for v in sorted(v for v in values if lo <= v <= hi):
            ctx.set(x, v)
            await ctx.tick()  # the search's slices are registered
            for shift in range(width + 1):
                ctx.set(s, shift)
                if shift:
                    assert ctx.get(by_limit) == ctx.get(by_mask), (v, shift)
                    assert ctx.get(by_one) == ctx.get(by_mask), (v, shift)
                assert ctx.get(rounded_limit) == ctx.get(rounded_mask), (v, shift)
                assert ctx.get(rounded_one) == ctx.get(rounded_mask), (v, shift)
                assert ctx.get(rounded_limit) == numerics.rne_shift(np.int64(v), shift), (v, shift)

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
