"""ActBuffer against a dictionary (Amaranth sim): banks, a partial last bank, byte-pair
write enables and the read latency of 1 + READ_STAGES cycles. The fast NPU tests' buffer
has one bank, so the bank select is checked here. A read in the cycle that writes its
word is undefined (blockram.BlockRam): the simulation gives the old word inverted."""

import random

import pytest
from amaranth.sim import Simulator

from tessera.hdl.actbuffer import BANK_WORDS, READ_STAGES, ActBuffer

pytestmark = pytest.mark.rtl


@pytest.mark.parametrize("entries", [300, 2 * BANK_WORDS + 452])
def test_actbuffer_reads_what_was_written(entries):
    dut = ActBuffer(width=32, entries=entries, granularity=16)
    rng = random.Random(entries)
    model = {}
    checked = {"reads": 0, "collisions": 0}

    async def bench(ctx):
        # (address, expected word) of the reads still in flight, oldest first
        in_flight: list[tuple[int, int | None]] = []
        for _ in range(4000):
            write = rng.random() < 0.5
            w_addr = rng.randrange(entries)
            w_data = rng.getrandbits(32)
            w_en = rng.randrange(4) if write else 0
            r_addr = rng.choice(list(model)) if model and rng.random() < 0.8 else 0
            if model and rng.random() < 0.05:
                w_addr = r_addr
            ctx.set(dut.wr.addr, w_addr)
            ctx.set(dut.wr.data, w_data)
            ctx.set(dut.wr.en, w_en)
            ctx.set(dut.rd.addr, r_addr)
            want = model.get(r_addr)
            if want is not None and w_en and w_addr == r_addr:
                want ^= 0xFFFF_FFFF
                checked["collisions"] += 1
            in_flight.append((r_addr, want))
            if len(in_flight) > 1 + READ_STAGES:
                addr, want = in_flight.pop(0)
                if want is not None:
                    assert ctx.get(dut.rd.data) == want, addr
                    checked["reads"] += 1
            await ctx.tick()
            # The write lands after the read of the same cycle has sampled its address.
            if w_en:
                old = model.get(w_addr, 0)
                for half in range(2):
                    if w_en >> half & 1:
                        mask = 0xFFFF << (16 * half)
                        old = (old & ~mask) | (w_data & mask)
                model[w_addr] = old

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert checked["reads"] > 1000 and checked["collisions"] > 10, checked
