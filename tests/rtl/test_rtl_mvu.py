"""The MVU's accumulators equal the exact grid sums of the simulator's kernels (Amaranth sim)."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from tessera.config import NPUConfig
from tessera.hdl.mvu import MVU, OPERAND_STAGES, WEIGHT_STAGES, latency

pytestmark = pytest.mark.rtl

#: The weight grid's floor: the tile buffer holds each row's exponent, the MVU its shift.
WFLOOR = -5


@pytest.mark.parametrize("n,lanes", [(8, 2), (4, 4)])
def test_mvu_matches_exact_grid_sum(n, lanes):
    cfg = NPUConfig(name="t", native_dim=n, lanes=lanes)
    dut = MVU(cfg)
    rng = np.random.default_rng(n * 10 + lanes)
    groups = n // lanes
    blocks = []
    for _ in range(12):
        k = int(rng.integers(1, 5))
        a = rng.integers(-127, 128, (k, n))
        sa = rng.integers(0, 17, k)
        w = rng.integers(-127, 128, (k, n, n))  # [pass][row][col]
        sw = rng.integers(0, 9, (k, n))
        # numerics: grid(a) = a << sa, grid(w) = w << sw per row; acc = sum_k W_k @ a_k.
        want = sum((w[i] << sw[i][:, None]) @ (a[i] << sa[i]) for i in range(k))
        blocks.append((k, a, sa, w, sw, want))
    got = []

    # One beat per cycle: (first, last, group, activation block, its shift, the lanes'
    # weight rows, their shifts). The weights go in the MVU's weight lag later.
    beats = [
        (i == 0, i == k - 1, g, a[i], sa[i], w[i][g * lanes : (g + 1) * lanes], sw[i])
        for k, a, sa, w, sw, _ in blocks
        for i in range(k)
        for g in range(groups)
    ]
    lag = OPERAND_STAGES - WEIGHT_STAGES

    async def drive(ctx):
        ctx.set(dut.wfloor, WFLOOR)
        for t in range(len(beats) + lag):
            ctx.set(dut.valid, t < len(beats))
            if t < len(beats):
                first, last, g, act, act_shift, _, _ = beats[t]
                ctx.set(dut.first, first)
                ctx.set(dut.last, last)
                ctx.set(dut.group, g)
                for c in range(n):
                    ctx.set(dut.act[c], int(act[c]))
                ctx.set(dut.act_shift, int(act_shift))
            if t >= lag:
                _, _, g, _, _, rows, shifts = beats[t - lag]
                for lane in range(lanes):
                    ctx.set(dut.w_exp[lane], int(shifts[g * lanes + lane]) + WFLOOR)
                    for c in range(n):
                        ctx.set(dut.w[lane][c], int(rows[lane][c]))
            await ctx.tick()
        ctx.set(dut.valid, 0)
        await ctx.tick().repeat(latency(cfg) + 4)

    async def watch(ctx):
        async for _clk, _rst, valid, acc in ctx.tick().sample(dut.out_valid, dut.acc):
            if valid:
                got.append([int(acc[r]) for r in range(n)])

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(drive)
    sim.add_process(watch)
    sim.run_until(1e-8 * (sum(b[0] for b in blocks) * groups + latency(cfg) + 10))
    assert len(got) == len(blocks)
    for (_, _, _, _, _, want), g in zip(blocks, got, strict=True):
        assert g == want.tolist()
