"""A memory whose reads may not overlap a write of the same word: block RAM without the
read-during-write logic yosys adds otherwise.

Amaranth's synchronous read port promises the old word when the same cycle writes it. A
DP16KD does not keep that promise between its two ports, so yosys emulates it: it delays
every write by a cycle and puts a bypass multiplexer on the read data. The multiplexer
sits between the block RAM and the register behind the read, which keeps that register
out of the block RAM's output register (:mod:`tessera.hdl.outreg`) and leaves the block
RAM's 5.8 ns clock-to-output in front of the logic.

The NPU never reads a word in the cycle it is written and uses what it read (the
sequencer and the chain engine order loads before the reads that need them), so here a
collision's word is left undefined: on ECP5 the memory carries yosys' ``no_rw_check``
(its read ports are built as a combinational read into a register, which
``memory_dff`` folds into a synchronous port, the form it applies ``no_rw_check`` to). The
simulation model returns the word with every bit inverted after a collision, so a test
that used such a word would no longer match the instruction-set simulator bit for bit.
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory, ReadPort, WritePort
from amaranth.lib.wiring import Out


class BlockRam(wiring.Component):
    """``depth`` words of ``width`` bits: one write port ``wr`` and ``reads`` read ports
    ``rd0``, ``rd1``, ... that answer a cycle after their address, as Amaranth's
    synchronous ports do, except after a write of the same word in the same cycle."""

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        reads: int = 1,
        granularity: int | None = None,
        ecp5: bool = False,
    ):
        self.width, self.depth, self.reads, self.ecp5 = width, depth, reads, ecp5
        self.granularity = granularity
        aw = max(1, (depth - 1).bit_length())
        super().__init__(
            {
                "wr": Out(WritePort.Signature(addr_width=aw, shape=width, granularity=granularity)),
                **{
                    f"rd{i}": Out(ReadPort.Signature(addr_width=aw, shape=width))
                    for i in range(reads)
                },
            }
        )

    def elaborate(self, platform):
        m = Module()
        attrs = {"no_rw_check": 1} if self.ecp5 else {}
        m.submodules.mem = mem = Memory(shape=self.width, depth=self.depth, init=[], attrs=attrs)
        wp = mem.write_port(granularity=self.granularity)
        m.d.comb += [wp.addr.eq(self.wr.addr), wp.data.eq(self.wr.data), wp.en.eq(self.wr.en)]
        for i in range(self.reads):
            rd = getattr(self, f"rd{i}")
            if self.ecp5:
                rp = mem.read_port(domain="comb")
                word = Signal(self.width, name=f"rd{i}_word", reset_less=True)
                m.d.comb += rp.addr.eq(rd.addr)
                with m.If(rd.en):
                    m.d.sync += word.eq(rp.data)
                m.d.comb += rd.data.eq(word)
            else:
                rp = mem.read_port()
                collided = Signal(name=f"rd{i}_collided")
                m.d.comb += [rp.addr.eq(rd.addr), rp.en.eq(rd.en)]
                with m.If(rd.en):
                    m.d.sync += collided.eq(self.wr.en.any() & (self.wr.addr == rd.addr))
                m.d.comb += rd.data.eq(Mux(collided, ~rp.data, rp.data))
        return m
