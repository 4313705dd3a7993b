"""A real zoo layer shape at full width on the ``ulx3s-85f`` build: a ResNet-50 bottleneck.

conv1x1 256->64 + ReLU, conv3x3 64->64 + ReLU, conv1x1 64->256 + residual add + ReLU on a
56x56x256 input (the first stage of ResNet-50), compiled for the 85F preset (N=16, 8 lanes,
128 MVU multipliers) and run on that RTL build with the DRAM inside the simulation (the
build whole networks use); bit-exact against the simulator.
"""

import time

import numpy as np
import pytest
from nets import Net

from tessera.compiler.driver import compile_model
from tessera.config import get_config
from tessera.runtime.host import build_dram
from tessera.sim.executor import Simulator

pytestmark = [pytest.mark.rtl, pytest.mark.slow]


def bottleneck(h: int = 56, c: int = 256, mid: int = 64):
    n = Net(50)
    a = n.relu(n.conv("x", c, mid, 1))
    b = n.relu(n.conv(a, mid, mid, 3))
    y = n.conv(b, mid, c, 1)
    y = n.relu(n.op("Add", [y, "x"]))
    return n.model([1, c, h, h], [y])


def test_resnet50_bottleneck_full_width_bit_exact():
    from tessera.hdl.rtlrun import run_in_simulated_dram

    cfg = get_config("ulx3s-85f")
    prog, _, _ = compile_model(bottleneck(), cfg)
    x = np.random.default_rng(0).standard_normal((1, 256, 56, 56)).astype(np.float32)
    mem = build_dram(prog, {"x": x})
    ref = mem.copy()
    cycles = Simulator(cfg, ref).run(prog.instructions)
    t0 = time.perf_counter()
    r = run_in_simulated_dram(cfg, prog.instructions, mem, max_cycles=50 * cycles)
    dt = time.perf_counter() - t0
    rel = 100 * (r.cycles - cycles) / cycles
    print(f"bottleneck: RTL {r.cycles} cycles, model {cycles} ({rel:+.1f} %),")
    print(f"  {r.cycles / dt:.0f} RTL cycles/s, {dt:.0f} s")
    assert r.error == 0
    assert np.array_equal(r.mem, ref)
    assert abs(rel) <= 2  # the cycle model's contract (docs/hardware.md), in percent
