"""One registered multiplier: a MULT18X18D on ECP5, plain ``*`` elsewhere.

yosys maps an inferred multiply to a MULT18X18D but leaves it combinational (no input or
output registers absorbed), which cost a 64-lane MAC array a quarter of its Fmax on the
85F. So for ECP5 synthesis the DSP is instantiated with REG_INPUTA/B and REG_OUTPUT; the
generic path used in simulation has the same two-cycle latency, so the RTL simulated and
the RTL synthesized schedule identically.
"""

from amaranth import ClockSignal, Instance, Module, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

#: Cycles from operands to product.
LATENCY = 2


class Multiplier(wiring.Component):
    """``p = a * b`` two cycles later (operands registered, product registered); signed
    operands unless ``is_signed=False``."""

    def __init__(self, a_bits: int, b_bits: int, *, ecp5: bool = False, is_signed: bool = True):
        if max(a_bits, b_bits) > 18:
            raise ValueError("a MULT18X18D takes operands of at most 18 bits")
        self.a_bits, self.b_bits, self.ecp5, self.is_signed = a_bits, b_bits, ecp5, is_signed
        shape = signed if is_signed else unsigned
        super().__init__(
            {"a": In(shape(a_bits)), "b": In(shape(b_bits)), "p": Out(shape(a_bits + b_bits))}
        )

    def elaborate(self, platform):
        m = Module()
        if self.ecp5:
            shape = signed if self.is_signed else unsigned
            a18 = Signal(shape(18))
            b18 = Signal(shape(18))
            p36 = Signal(shape(36))
            m.d.comb += [a18.eq(self.a), b18.eq(self.b), self.p.eq(p36)]
            ports = {
                "p_REG_INPUTA_CLK": "CLK0",
                "p_REG_INPUTB_CLK": "CLK0",
                "p_REG_OUTPUT_CLK": "CLK0",
                "p_CLK0_DIV": "ENABLED",
                "p_GSR": "DISABLED",
                "i_SIGNEDA": int(self.is_signed),
                "i_SIGNEDB": int(self.is_signed),
                "i_SOURCEA": 0,
                "i_SOURCEB": 0,
                "i_CLK0": ClockSignal(),
                "i_CE0": 1,
                "i_RST0": 0,
            }
            for i in range(18):
                ports[f"i_A{i}"] = a18[i]
                ports[f"i_B{i}"] = b18[i]
            for i in range(36):
                ports[f"o_P{i}"] = p36[i]
            m.submodules.dsp = Instance("MULT18X18D", **ports)
        else:
            ra = Signal.like(self.a)
            rb = Signal.like(self.b)
            m.d.sync += [ra.eq(self.a), rb.eq(self.b), self.p.eq(ra * rb)]
        return m
