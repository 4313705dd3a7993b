"""Compiled small networks run on the NPU RTL bit for bit like the instruction simulator.

Conv with stride, padding and dilation, fused ReLU, max/average/global pooling, residual
add, channel concat, a fully connected layer and a subsampled strided 1x1 conv pair,
compiled by ``compile_model`` for the RTL test configuration; the whole DRAM after the run
must equal the simulator's.
"""

import numpy as np
import pytest
from nets import NETWORKS
from progs import RTL_TEST_CFG

from tessera.compiler.driver import compile_model
from tessera.runtime.host import build_dram, read_outputs
from tessera.sim.executor import Simulator

pytestmark = pytest.mark.rtl


@pytest.fixture(scope="module")
def runs():
    from tessera.hdl.rtlrun import run_jobs

    cases = []
    for name, make in NETWORKS.items():
        prog, _, _ = compile_model(make(), RTL_TEST_CFG)
        shape = prog.manifest["inputs"][0]["shape"]
        x = np.random.default_rng(len(name)).standard_normal(shape).astype(np.float32)
        mem = build_dram(prog, {prog.manifest["inputs"][0]["name"]: x})
        ref = mem.copy()
        cycles = Simulator(RTL_TEST_CFG, ref).run(prog.instructions)
        cases.append((name, prog, mem, ref, cycles))
    results = run_jobs(RTL_TEST_CFG, [(c[1].instructions, c[2]) for c in cases])
    return {c[0]: (c, r) for c, r in zip(cases, results, strict=True)}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_bit_exact(runs, name):
    (_, prog, _, ref, cycles), r = runs[name]
    assert r.error == 0
    assert np.array_equal(r.mem, ref), f"{np.count_nonzero(r.mem != ref)} DRAM bytes differ"
    for k, v in read_outputs(prog, ref).items():
        np.testing.assert_array_equal(read_outputs(prog, r.mem)[k], v)
    rel = (r.cycles - cycles) / cycles
    print(f"{name}: RTL {r.cycles} cycles, model {cycles} ({100 * rel:+.1f} %)")
    assert abs(rel) <= 0.02  # the cycle model's contract (docs/hardware.md)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_same_with_the_dram_inside_the_simulation(runs, name):
    """``npu_dram`` (what ``tessera run --backend rtl`` and whole networks use) times its
    Verilog DRAM exactly as the cocotb DramModel: the same memory and the same cycles."""
    from tessera.hdl.rtlrun import run_in_simulated_dram

    (_, prog, mem, ref, _), r = runs[name]
    inside = run_in_simulated_dram(RTL_TEST_CFG, prog.instructions, mem)
    assert inside.error == 0
    assert inside.cycles == r.cycles
    assert np.array_equal(inside.mem, ref)


def test_dram_inside_the_simulation_reports_an_access_outside_it():
    from tessera import isa
    from tessera.hdl.rtlrun import run_in_simulated_dram

    words = np.array(
        [isa.encode("s_ld", reg=isa.EXP_REG_BASE, addr=3 << 20), isa.encode("halt")],
        dtype=np.uint64,
    )
    with pytest.raises(AssertionError, match=r"byte 0x300000: outside the 1048576 bytes"):
        run_in_simulated_dram(RTL_TEST_CFG, words, np.zeros(1024, np.uint8), max_cycles=10_000)
