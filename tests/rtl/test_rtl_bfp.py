"""The BFP logic in hdl/bfp.py equals tessera.numerics on random vectors (Amaranth sim)."""

import numpy as np
import pytest
from amaranth import Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from tessera import numerics
from tessera.hdl import bfp

pytestmark = pytest.mark.rtl
N = 4


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
        q, e = bfp.normalize(m, xs, self.lsb, 16, "n")
        m.d.comb += [self.nq[i].eq(q[i]) for i in range(N)] + [self.ne.eq(e)]
        q, e = bfp.to_storage(m, xs, self.lsb, 8, "s")
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
