"""The AUX reader: the second operand tensor (a residual), block by block, ahead of the MFU.

Blocks are read in the chain's sweep order (pixel, output block) into a small FIFO; the
chain engine issues block ``j`` into the pipeline only once the reader has queued it, so the
MFU slot that consumes it never waits.
"""

from amaranth import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from tessera.config import NPUConfig
from tessera.hdl.bus import BurstPort

DEPTH = 8


class AuxReader(wiring.Component):
    def __init__(self, cfg: NPUConfig):
        self.cfg = cfg
        n = cfg.native_dim
        super().__init__(
            {
                "start": In(1),
                "mant_addr": In(32),  # AUX_ADDR + AUX_CB_OFF * N
                "exp_addr": In(32),  # exponent plane + AUX_CB_OFF
                "pixel_mstep": In(32),  # AUX_CB * N
                "pixel_estep": In(32),
                "ocnt": In(16),
                "total": In(32),
                "queued": Out(32),  # blocks pushed so far in this chain
                "out_q": Out(n * 8),
                "out_e": Out(8),
                "out_valid": Out(1),
                "pop": In(1),
                "bus": Out(BurstPort),
            }
        )

    def elaborate(self, platform):
        m = Module()
        n = self.cfg.native_dim
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=n * 8 + 8, depth=DEPTH)
        m.d.comb += [
            self.out_q.eq(fifo.r_data[: n * 8]),
            self.out_e.eq(fifo.r_data[n * 8 :]),
            self.out_valid.eq(fifo.r_rdy),
            fifo.r_en.eq(self.pop),
        ]
        pix_m = Signal(32)
        pix_e = Signal(32)
        ob = Signal(16)
        k = Signal(range(n // 2 + 1))
        buf = Signal(n * 8)
        # The block's mantissa and exponent addresses (pix_m + ob * N, pix_e + ob) and
        # "ob is the pixel's last block" are registers stepped with ob, so the burst
        # requests and the beat handling read flip-flops, not adders and a compare.
        m_addr = Signal(32)
        ea = Signal(32)
        ob_last = Signal()
        bus = self.bus
        m.d.comb += [bus.write.eq(0), fifo.w_data.eq(Cat(buf, Signal(8)))]
        ebyte = Signal(8)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [
                        pix_m.eq(self.mant_addr),
                        pix_e.eq(self.exp_addr),
                        m_addr.eq(self.mant_addr),
                        ea.eq(self.exp_addr),
                        ob.eq(0),
                        ob_last.eq(self.ocnt == 1),
                        self.queued.eq(0),
                    ]
                    m.next = "NEXT"
            with m.State("NEXT"):
                with m.If(self.queued == self.total):
                    m.next = "IDLE"
                with m.Elif(fifo.level < DEPTH - 1):
                    m.d.sync += k.eq(0)
                    m.next = "MANT"
            with m.State("MANT"):
                m.d.comb += [bus.req.eq(1), bus.addr.eq(m_addr), bus.len.eq(n // 2)]
                with m.If(bus.grant):
                    m.next = "EXP"
            # The exponent's burst is asked for right after the mantissas' (the arbiter
            # queues both), so lower-priority bursts cannot come between them.
            with m.State("EXP"):
                m.d.comb += [bus.req.eq(1), bus.addr.eq(ea & ~1), bus.len.eq(1)]
                with m.If(bus.grant):
                    m.next = "DATA"
            with m.State("DATA"):
                with m.If(bus.rvalid & (k == n // 2)):
                    m.next = "NEXT"
        # The block's beats: N / 2 mantissa beats, then the exponent's.
        with m.If(bus.rvalid):
            with m.If(k < n // 2):
                m.d.sync += [
                    buf.word_select(k[: max(1, (n // 2 - 1).bit_length())], 16).eq(bus.rdata),
                    k.eq(k + 1),
                ]
            with m.Else():
                m.d.comb += [
                    ebyte.eq(bus.rdata.word_select(ea[0], 8)),
                    fifo.w_en.eq(1),
                    fifo.w_data.eq(Cat(buf, ebyte)),
                ]
                m.d.sync += self.queued.eq(self.queued + 1)
                with m.If(ob_last):
                    next_m = pix_m + self.pixel_mstep
                    next_e = pix_e + self.pixel_estep
                    m.d.sync += [ob.eq(0), ob_last.eq(self.ocnt == 1)]
                    m.d.sync += [pix_m.eq(next_m), pix_e.eq(next_e)]
                    m.d.sync += [m_addr.eq(next_m), ea.eq(next_e)]
                with m.Else():
                    m.d.sync += [ob.eq(ob + 1), ob_last.eq(ob + 2 == self.ocnt)]
                    m.d.sync += [m_addr.eq(m_addr + n), ea.eq(ea + 1)]
        return m
