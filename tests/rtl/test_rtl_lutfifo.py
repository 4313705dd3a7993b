"""LutFIFO behaves as Amaranth's SyncFIFOBuffered cycle for cycle (Amaranth sim): the
writer swapped one for the other, and the cycle model's agreement rests on the timing."""

import random

import pytest
from amaranth import Module
from amaranth.back import rtlil
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.sim import Simulator

from tessera.hdl.lutfifo import LutFIFO

pytestmark = pytest.mark.rtl


@pytest.mark.parametrize("depth", [2, 5, 16])
def test_lutfifo_matches_syncfifobuffered(depth):
    m = Module()
    m.submodules.ours = ours = LutFIFO(width=12, depth=depth)
    m.submodules.ref = ref = SyncFIFOBuffered(width=12, depth=depth)
    rng = random.Random(depth)
    seen = {"reads": 0, "full": 0}

    async def bench(ctx):
        for cycle in range(3000):
            # Phases of mostly writing and mostly reading, so the FIFO fills and drains.
            write_bias = 0.8 if (cycle // 200) % 2 == 0 else 0.3
            w_en, r_en, data = rng.random() < write_bias, rng.random() < 0.5, rng.getrandbits(12)
            for fifo in (ours, ref):
                ctx.set(fifo.w_en, w_en)
                ctx.set(fifo.w_data, data)
                ctx.set(fifo.r_en, r_en)
            for name in ("w_rdy", "r_rdy", "level"):
                assert ctx.get(getattr(ours, name)) == ctx.get(getattr(ref, name)), (cycle, name)
            if ctx.get(ref.r_rdy):
                assert ctx.get(ours.r_data) == ctx.get(ref.r_data), cycle
                seen["reads"] += r_en
            seen["full"] += not ctx.get(ref.w_rdy)
            await ctx.tick()

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert seen["reads"] > 500 and seen["full"] > 10, seen


def test_lutfifo_storage_asks_yosys_for_distributed_ram():
    text = rtlil.convert(LutFIFO(width=8, depth=4))
    memory = text.index("memory width 8 size 3")
    assert 'attribute \\ram_style "distributed"' in text[text.rindex("\n\n", 0, memory) : memory]
