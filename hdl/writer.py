"""The output writer: storage blocks from the pipeline -> the OUT tensor in DRAM.

Blocks arrive in sweep order (pixel, then output block). Each block's N mantissa bytes go
out as one burst; its exponent byte is merged with its neighbour's when both fall into one
16-bit beat (consecutive blocks of one pixel, or of consecutive pixels when the chain
writes the full depth), so exponents cost about half a beat each, as the cycle model
assumes. The writer also keeps the largest written exponent for ``OUT_EREG``.
"""

from amaranth import Cat, Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from tessera.config import NPUConfig
from tessera.hdl.bus import BurstPort

#: Blocks the writer buffers: the chain engine never has more than this many in flight.
DEPTH = 64


class Writer(wiring.Component):
    def __init__(self, cfg: NPUConfig):
        self.cfg = cfg
        n = cfg.native_dim
        super().__init__(
            {
                "start": In(1),
                "mant_addr": In(32),  # out_addr + OUT_CB_OFF * N
                "exp_addr": In(32),  # exponent plane + OUT_CB_OFF
                "pixel_mstep": In(32),  # OUT_CB * N
                "pixel_estep": In(32),  # OUT_CB
                "ocnt": In(16),
                "total": In(32),  # blocks of the chain
                "in_valid": In(1),
                "in_q": In(n * 8),
                "in_e": In(signed(8)),
                "written": Out(32),
                "emax": Out(signed(16)),
                "busy": Out(1),
                "bus": Out(BurstPort),
            }
        )

    def elaborate(self, platform):
        m = Module()
        n = self.cfg.native_dim
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=n * 8 + 8, depth=DEPTH)
        m.d.comb += [
            fifo.w_en.eq(self.in_valid),
            fifo.w_data.eq(Cat(self.in_q, self.in_e)),
        ]
        q = fifo.r_data[: n * 8]
        e = fifo.r_data[n * 8 :].as_signed()

        pix_m = Signal(32)
        pix_e = Signal(32)
        ob = Signal(16)
        k = Signal(range(n // 2 + 1))
        pend = Signal()
        pend_addr = Signal(32)
        pend_data = Signal(16)
        pend_strb = Signal(2)
        mant = Signal(32)
        ea = Signal(32)
        m.d.comb += [mant.eq(pix_m + (ob * n)), ea.eq(pix_e + ob)]
        bus = self.bus
        m.d.comb += [bus.write.eq(1)]

        def advance():
            stmts = [fifo.r_en.eq(1)]
            return stmts

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [
                        pix_m.eq(self.mant_addr),
                        pix_e.eq(self.exp_addr),
                        ob.eq(0),
                        self.written.eq(0),
                        self.emax.eq(-128),
                    ]
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.comb += self.busy.eq(1)
                with m.If(self.written == self.total):
                    with m.If(pend):
                        m.next = "FLUSH_END"
                    with m.Else():
                        m.next = "IDLE"
                with m.Elif(fifo.r_rdy):
                    m.d.sync += k.eq(0)
                    m.next = "MANT"
            with m.State("MANT"):
                m.d.comb += [
                    self.busy.eq(1),
                    bus.req.eq(1),
                    bus.addr.eq(mant),
                    bus.len.eq(n // 2),
                    bus.wdata.eq(q.word_select(k, 16)),
                    bus.wstrb.eq(0b11),
                ]
                with m.If(bus.grant):
                    m.next = "MANT_DATA"
            with m.State("MANT_DATA"):
                m.d.comb += [
                    self.busy.eq(1),
                    bus.wdata.eq(q.word_select(k, 16)),
                    bus.wstrb.eq(0b11),
                ]
                with m.If(bus.wtake):
                    m.d.sync += k.eq(k + 1)
                with m.If(bus.done):
                    m.next = "EXP"
            with m.State("EXP"):
                m.d.comb += self.busy.eq(1)
                word = ea & ~1
                byte_data = Cat(e, e)
                with m.If(pend & (pend_addr != word)):
                    m.next = "FLUSH"  # an unrelated pending beat goes first
                with m.Else():
                    m.d.comb += fifo.r_en.eq(1)
                    m.d.sync += [
                        self.written.eq(self.written + 1),
                        pend_addr.eq(word),
                        ob.eq(ob + 1),
                    ]
                    with m.If(e > self.emax):
                        m.d.sync += self.emax.eq(e)
                    with m.If(ob + 1 == self.ocnt):
                        m.d.sync += [
                            ob.eq(0),
                            pix_m.eq(pix_m + self.pixel_mstep),
                            pix_e.eq(pix_e + self.pixel_estep),
                        ]
                    with m.If(ea[0]):
                        m.d.sync += [
                            pend_data[8:].eq(e),
                            pend_strb.eq(pend_strb | 0b10),
                            pend.eq(1),
                        ]
                        m.next = "FLUSH"
                    with m.Else():
                        m.d.sync += [pend_data.eq(byte_data), pend_strb.eq(0b01), pend.eq(1)]
                        m.next = "NEXT"
            for state, after in (("FLUSH", "NEXT"), ("FLUSH_END", "NEXT")):
                with m.State(state):
                    m.d.comb += [
                        self.busy.eq(1),
                        bus.req.eq(1),
                        bus.addr.eq(pend_addr),
                        bus.len.eq(1),
                        bus.wdata.eq(pend_data),
                        bus.wstrb.eq(pend_strb),
                    ]
                    with m.If(bus.grant):
                        m.next = state + "_DATA"
                with m.State(state + "_DATA"):
                    m.d.comb += [
                        self.busy.eq(1),
                        bus.wdata.eq(pend_data),
                        bus.wstrb.eq(pend_strb),
                    ]
                    with m.If(bus.done):
                        m.d.sync += [pend.eq(0), pend_strb.eq(0)]
                        m.next = after
        del advance
        return m
