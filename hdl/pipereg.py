"""One pipeline register of an operand distribution tree, kept apart from its twins.

A tree that copies one value into registers near each of its readers only shortens the
wires if the copies stay copies: yosys' ``opt_merge`` folds registers with the same input
into one (a ``keep`` on the wire does not stop it), which turns the tree back into one
register driving every reader across the die. On ECP5 the register is therefore built from
instantiated ``TRELLIS_FF`` cells, which yosys does not merge; elsewhere (simulation) it is
a plain register with the same one-cycle latency.
"""

from amaranth import ClockSignal, Instance, Module, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out


class DistributionRegister(wiring.Component):
    """``q`` is ``d`` one cycle later (no reset: it carries data, valid travels apart)."""

    def __init__(self, width: int, *, ecp5: bool = False):
        self.width, self.ecp5 = width, ecp5
        super().__init__({"d": In(unsigned(width)), "q": Out(unsigned(width))})

    def elaborate(self, platform):
        m = Module()
        if self.ecp5:
            for bit in range(self.width):
                m.submodules[f"ff{bit}"] = Instance(
                    "TRELLIS_FF",
                    p_GSR="DISABLED",
                    p_CEMUX="1",
                    p_CLKMUX="CLK",
                    p_LSRMUX="LSR",
                    p_REGSET="RESET",
                    p_SRMODE="LSR_OVER_CE",
                    i_CLK=ClockSignal(),
                    i_LSR=0,
                    i_CE=1,
                    i_DI=self.d[bit],
                    o_Q=self.q[bit],
                )
        else:
            q = Signal(self.width, reset_less=True)
            m.d.sync += q.eq(self.d)
            m.d.comb += self.q.eq(q)
        return m
