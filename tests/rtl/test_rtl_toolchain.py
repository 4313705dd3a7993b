"""The RTL tool chain works: Amaranth -> Verilog -> cocotb 2 on the chosen simulator."""

from pathlib import Path

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from tessera.hdl import rtlsim
from tessera.hdl.toolchain import find_simulator

pytestmark = pytest.mark.rtl


class Counter(wiring.Component):
    en: In(1)
    count: Out(8)

    def elaborate(self, platform):
        m = Module()
        with m.If(self.en):
            m.d.sync += self.count.eq(self.count + 1)
        return m


def test_simulator_found_and_new_enough():
    sim = find_simulator()
    print("RTL simulator:", sim.describe())
    assert sim.name in ("verilator", "icarus")
    assert sim.version >= ((5, 36) if sim.name == "verilator" else (11, 0))


def test_cocotb_runs_an_amaranth_counter(tmp_path):
    b = rtlsim.build(Counter(), "counter", cache=tmp_path)
    b.run("tb_smoke", Path(__file__).parent)
