"""The output writer: storage blocks from the pipeline -> the OUT tensor in DRAM.

Blocks arrive in sweep order (pixel, then output block). Two engines share the work, each
with its own port to the arbiter:

* the mantissa engine writes *runs* of blocks whose mantissas are contiguous in DRAM (the
  blocks of one pixel, or of many pixels when the chain writes the tensor's full depth) as
  one burst of up to ``RUN_MAX`` blocks, popping each block as its last beat leaves;
* the exponent engine collects the popped blocks' exponent bytes while their addresses are
  contiguous and writes them as one burst, with byte strobes on a partial first or last
  beat, when the run breaks, its buffer is full or the chain ends.

So DRAM time stays close to bytes / bandwidth, as the cycle model charges. The writer also
keeps the largest written exponent for ``OUT_EREG``.
"""

from amaranth import Cat, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from tessera.config import NPUConfig
from tessera.hdl.bus import BurstPort
from tessera.hdl.lutfifo import LutFIFO

#: Blocks the writer buffers: the chain engine never has more than this many in flight.
DEPTH = 64
#: Longest mantissa burst, in blocks.
RUN_MAX = 8
#: Exponent bytes collected before a flush.
EXP_BUF = 16


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
                "ebus": Out(BurstPort),
            }
        )

    def elaborate(self, platform):
        m = Module()
        n = self.cfg.native_dim
        gran = n // 2  # beats per block
        m.submodules.fifo = fifo = LutFIFO(width=n * 8 + 8, depth=DEPTH)
        m.d.comb += [
            fifo.w_en.eq(self.in_valid),
            fifo.w_data.eq(Cat(self.in_q, self.in_e)),
        ]
        q = fifo.r_data[: n * 8]
        e = fifo.r_data[n * 8 :].as_signed()

        # The next block to write: its DRAM addresses and what is left of the chain and of
        # its pixel are registers stepped with each block, so the burst decision compares
        # registers only (no 32-bit adds or compares of the chain's fields in its cycle).
        pix_m = Signal(32)  # first mantissa / exponent address of the current pixel
        pix_e = Signal(32)
        mant = Signal(32)  # the next block's mantissa / exponent address
        ea = Signal(32)
        left_pix = Signal(16)  # blocks left in the current pixel, this one included
        full_depth = Signal()  # the chain writes whole pixels: runs may cross pixels
        # min(left, RUN_MAX) of the chain and of the pixel: small, so the run length and
        # "everything is written" are cheap.
        chain_sat = Signal(range(RUN_MAX + 1))
        pix_sat = Signal(range(RUN_MAX + 1))
        left_chain = Signal(32)

        # ------------------------------------------------------------ exponent engine
        ebuf = Signal(8 * EXP_BUF)  # byte i at bits 8i..8i+7
        ebase = Signal(32)
        eend = Signal(32)  # ebase + ecount: where the next byte must go to join
        ecount = Signal(range(EXP_BUF + 1))
        eflush = Signal()  # a flush burst is requested or moving
        rel = Signal(signed(6))  # byte offset of the beat being written from ebase
        push = Signal()
        fits = Signal()
        m.d.comb += fits.eq((ecount == 0) | ((ea == eend) & (ecount < EXP_BUF)))
        eb = self.ebus
        m.d.comb += [
            eb.write.eq(1),
            eb.addr.eq(ebase & ~1),
            eb.len.eq((ecount + ebase[0] + 1) >> 1),
        ]
        lo_ok = (rel >= 0) & (rel < ecount)
        hi_ok = (rel + 1 >= 0) & (rel + 1 < ecount)
        m.d.comb += [
            eb.wdata.eq(Cat(ebuf.word_select(rel[:4], 8), ebuf.word_select((rel + 1)[:4], 8))),
            eb.wstrb.eq(Cat(lo_ok, hi_ok)),
        ]
        start_flush = Signal()
        with m.FSM(name="exp"):
            with m.State("COLLECT"):
                with m.If(push & fits):
                    m.d.sync += ebuf.word_select(ecount[: (EXP_BUF - 1).bit_length()], 8).eq(e)
                    m.d.sync += [ecount.eq(ecount + 1), eend.eq(eend + 1)]
                    with m.If(ecount == 0):
                        m.d.sync += [ebase.eq(ea), eend.eq(ea + 1)]
                with m.If(start_flush & (ecount != 0)):
                    m.d.sync += rel.eq(-ebase[0])  # the first beat starts at an even byte
                    m.next = "REQ"
            with m.State("REQ"):
                m.d.comb += [eb.req.eq(1), eflush.eq(1)]
                with m.If(eb.grant):
                    m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += eflush.eq(1)
                with m.If(eb.wtake):
                    m.d.sync += rel.eq(rel + 2)
                with m.If(eb.done):
                    m.d.sync += ecount.eq(0)
                    m.next = "COLLECT"

        # ------------------------------------------------------------ mantissa engine
        run = Signal(range(RUN_MAX + 1))  # blocks in the current burst
        k = Signal(range(gran + 1))  # beat inside the block
        bus = self.bus
        m.d.comb += [bus.write.eq(1), bus.wstrb.eq(0b11), bus.wdata.eq(q.word_select(k, 16))]

        def saturated(count: Signal) -> Mux:
            return Mux(count > RUN_MAX, RUN_MAX, count)

        def saturated_less_one(count: Signal) -> Mux:
            """``saturated(count - 1)``, comparing ``count`` (not the difference) with a
            constant, so the subtract and the compare are side by side."""
            return Mux(count > RUN_MAX + 1, RUN_MAX, count - 1)

        pop = Signal()
        m.d.comb += push.eq(pop)
        # Blocks in the FIFO (it never fills: the chain engine keeps fewer in flight), and
        # min(that, RUN_MAX) as a register: the burst decision reads 4 bits, not the
        # FIFO's level adder. Both successors are ready before ``pop`` picks one.
        held = Signal(range(DEPTH + 1))
        held_sat = Signal(range(RUN_MAX + 1))
        arrived = held + self.in_valid
        m.d.sync += [
            held.eq(Mux(pop, arrived - 1, arrived)),
            held_sat.eq(Mux(pop, saturated(arrived - 1), saturated(arrived))),
        ]

        # ``left_pix == 1``, kept as a flag with it: it picks the next address of four
        # 32-bit registers when a block's last beat is taken.
        pixel_ends = Signal()

        def advance():
            return [
                pixel_ends.eq(Mux(pixel_ends, self.ocnt == 1, left_pix == 2)),
                self.written.eq(self.written + 1),
                left_chain.eq(left_chain - 1),
                chain_sat.eq(saturated_less_one(left_chain)),
                left_pix.eq(Mux(pixel_ends, self.ocnt, left_pix - 1)),
                pix_sat.eq(Mux(pixel_ends, saturated(self.ocnt), saturated_less_one(left_pix))),
                pix_m.eq(Mux(pixel_ends, pix_m + self.pixel_mstep, pix_m)),
                pix_e.eq(Mux(pixel_ends, pix_e + self.pixel_estep, pix_e)),
                mant.eq(Mux(pixel_ends, pix_m + self.pixel_mstep, mant + n)),
                ea.eq(Mux(pixel_ends, pix_e + self.pixel_estep, ea + 1)),
                self.emax.eq(Mux(e > self.emax, e, self.emax)),
            ]

        with m.FSM(name="mant"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [
                        pix_m.eq(self.mant_addr),
                        pix_e.eq(self.exp_addr),
                        mant.eq(self.mant_addr),
                        ea.eq(self.exp_addr),
                        left_pix.eq(self.ocnt),
                        pixel_ends.eq(self.ocnt == 1),
                        pix_sat.eq(saturated(self.ocnt)),
                        left_chain.eq(self.total),
                        chain_sat.eq(saturated(self.total)),
                        full_depth.eq(self.pixel_mstep == self.ocnt * n),
                        self.written.eq(0),
                        self.emax.eq(-128),
                    ]
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.comb += self.busy.eq(1)
                # The next run, were it to start: min(what is left, what is held).
                left = Mux(full_depth, chain_sat, pix_sat)
                m.d.sync += [run.eq(Mux(left < held_sat, left, held_sat)), k.eq(0)]
                with m.If(chain_sat == 0):
                    m.d.comb += start_flush.eq(1)
                    with m.If(~eflush & (ecount == 0)):
                        m.next = "IDLE"
                with m.Elif(fifo.r_rdy & (held_sat != 0)):
                    # The run's exponents (contiguous among themselves) must join the
                    # exponent buffer; otherwise flush it first. A burst cannot pause.
                    # The run fits the buffer's room if either of its bounds does.
                    room = EXP_BUF - ecount
                    joins = Signal()
                    m.d.comb += joins.eq(
                        ~eflush
                        & ((ecount == 0) | ((ea == eend) & ((left <= room) | (held_sat <= room))))
                    )
                    with m.If(joins):
                        m.next = "REQ"
                    with m.Else():
                        m.d.comb += start_flush.eq(1)
            with m.State("REQ"):
                m.d.comb += [
                    self.busy.eq(1),
                    bus.req.eq(1),
                    bus.addr.eq(mant),
                    bus.len.eq(run * gran),
                ]
                with m.If(bus.grant):
                    m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += self.busy.eq(1)
                # A block leaves the FIFO with its last beat; its exponent joins the buffer.
                last_beat = k == gran - 1
                with m.If(bus.wtake):
                    m.d.sync += k.eq(Mux(last_beat, 0, k + 1))
                    with m.If(last_beat):
                        m.d.comb += [pop.eq(1), fifo.r_en.eq(1)]
                        m.d.sync += advance()
                with m.If(bus.done):
                    m.next = "NEXT"
        with m.If(ecount == EXP_BUF):
            m.d.comb += start_flush.eq(1)
        return m
