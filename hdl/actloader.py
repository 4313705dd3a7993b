"""The activation loader: streams the chain's input slice, row by row, into the ring buffer.

The activation buffer holds ``R = capacity // (IN_W * IN_CB_CNT)`` input rows; row ``y``
lives in slot ``y mod R``. The loader fetches rows in order and may overwrite a slot only
when the chain no longer needs the row in it (``y < need_lo + R``); the chain engine starts
an output row when the rows of its kernel window have landed. So DRAM streaming overlaps
compute and every input byte is read once per chain, as the cycle model charges. When the
whole slice fits (``R >= IN_H``) and the next chain reads the same slice, the top skips the
load altogether (the slice is still resident).

A segment is a run of blocks contiguous in DRAM: a whole row when the chain reads the full
depth of the tensor, else one pixel's ``IN_CB_CNT`` blocks. Per segment one mantissa burst
train, then one exponent burst train (the exponent plane is byte-addressed, so a beat may
carry the exponents of two blocks; even and odd entries live in two memories).
"""

from amaranth import Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.memory import WritePort
from amaranth.lib.wiring import In, Out

from tessera.config import NPUConfig
from tessera.hdl.bus import BEAT_BYTES, BurstPort
from tessera.hdl.loader import BurstBudget, lg


def act_entries(cfg: NPUConfig) -> int:
    """Blocks the activation buffer holds (N mantissa bytes + 1 exponent byte each)."""
    return cfg.act_buffer_bytes // (cfg.native_dim + 1)


def entry_bits(cfg: NPUConfig) -> int:
    return max(1, (act_entries(cfg) - 1).bit_length())


class ActLoader(wiring.Component):
    @staticmethod
    def port_signature(cfg: NPUConfig, name: str) -> WritePort.Signature:
        """Signature of one buffer write port (the chain engine passes them through)."""
        if name == "mant_wr":
            return WritePort.Signature(
                addr_width=entry_bits(cfg), shape=cfg.native_dim * 8, granularity=16
            )
        half = (act_entries(cfg) + 1) // 2
        return WritePort.Signature(addr_width=max(1, (half - 1).bit_length()), shape=8)

    def __init__(self, cfg: NPUConfig):
        self.cfg = cfg
        n = cfg.native_dim
        eb = entry_bits(cfg)
        self.half_depth = (act_entries(cfg) + 1) // 2
        super().__init__(
            {
                "start": In(1),
                "resident": In(1),
                "mant_addr": In(32),
                "exp_addr": In(32),
                "ih": In(16),
                "seg_blocks": In(eb + 1),
                "segs_per_row": In(16),
                "seg_mstep": In(32),
                "seg_estep": In(32),
                "rowblocks": In(eb + 1),
                "ring": In(eb + 1),  # R * rowblocks entries
                "ring_rows": In(16),
                "need_lo": In(16),
                "rows_loaded": Out(16),
                "busy": Out(1),
                "streaming": Out(1),  # busy and not waiting for ring space
                "bus": Out(BurstPort),
                "mant_wr": In(WritePort.Signature(addr_width=eb, shape=n * 8, granularity=16)),
                "exp_wr0": In(
                    WritePort.Signature(
                        addr_width=max(1, (self.half_depth - 1).bit_length()), shape=8
                    )
                ),
                "exp_wr1": In(
                    WritePort.Signature(
                        addr_width=max(1, (self.half_depth - 1).bit_length()), shape=8
                    )
                ),
            }
        )

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        n = cfg.native_dim
        gran = n // 2  # beats per block of mantissas
        eb = entry_bits(cfg)

        y = Signal(16)
        seg = Signal(16)
        slot = Signal(eb + 1)  # first entry of the current row's slot
        ebase = Signal(eb + 1)  # first entry of the current segment
        m_ptr = Signal(32)
        e_ptr = Signal(32)
        req_addr = Signal(32)
        budget = BurstBudget("budget")  # beats still to request in this phase
        inflight = Signal(range(3))  # bursts granted and not done: up to two, back to back
        k = Signal(range(max(2, gran)))  # granule within the block (mantissa phase)
        entry = Signal(eb + 1)
        b = Signal(32)  # byte address of the current exponent beat

        bus = self.bus

        m.d.comb += [bus.write.eq(0), bus.addr.eq(req_addr), bus.len.eq(budget.chunk)]
        m.d.sync += inflight.eq(inflight + bus.grant - bus.done)
        with m.If(bus.grant):
            m.d.sync += [
                req_addr.eq(req_addr + BEAT_BYTES * budget.chunk),
                *budget.take(),
            ]

        # The buffers' writes leave through a register: the buffers' block RAMs sit across
        # the die, and nothing else stands between this logic (the exponents' entry and
        # range arithmetic, the bus's data) and their write pins (blockram.BlockRam has no
        # read-during-write emulation, which used to delay writes by a cycle). A word lands
        # a cycle later, before the chain may read it: ``rows_loaded`` and ``busy`` move
        # after a segment's last beat, a cycle or more later still.
        ports = [self.mant_wr, self.exp_wr0, self.exp_wr1]
        mw, *wr = [p.signature.flip().create(path=(f"staged{i}",)) for i, p in enumerate(ports)]
        for staged, port in zip([mw, *wr], ports, strict=True):
            m.d.sync += [
                port.addr.eq(staged.addr),
                port.data.eq(staged.data),
                port.en.eq(staged.en),
            ]
        m.d.comb += [
            mw.addr.eq(entry),
            mw.data.eq(bus.rdata << (k * 16) if gran > 1 else bus.rdata),
        ]
        # Exponent beat at byte b: bytes b, b+1 -> entries ebase + (b - e_ptr) + 0/1.
        rel = Signal(signed(34))
        m.d.comb += rel.eq(b.as_signed() - e_ptr.as_signed())
        e0 = Signal(eb + 2)
        m.d.comb += e0.eq(ebase + rel)
        ok0 = Signal()
        ok1 = Signal()
        m.d.comb += [
            ok0.eq((rel >= 0) & (rel < self.seg_blocks)),
            ok1.eq((rel + 1 >= 0) & (rel + 1 < self.seg_blocks)),
        ]
        for byte in range(2):
            ent = Signal(eb + 2, name=f"ent{byte}")
            m.d.comb += ent.eq(e0 + byte)
            for par in range(2):
                with m.If(ent[0] == par):
                    m.d.comb += [
                        wr[par].addr.eq(ent[1:]),
                        wr[par].data.eq(bus.rdata[8 * byte : 8 * byte + 8]),
                    ]
        m.d.comb += self.busy.eq(0)
        # Row y's slot is free (the rows before need_lo are read), and y is past the
        # input: flags worked out a cycle ahead, so the add and the compares and the
        # state change, with the streaming flag that holds the weight loader's requests,
        # are in different cycles. ROW reads them from its second cycle, when they are
        # y's (need_lo only grows within a chain).
        room = Signal()
        done_rows = Signal()
        room_fresh = Signal()
        m.d.sync += [room.eq(y < self.need_lo + self.ring_rows), done_rows.eq(y == self.ih)]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [
                        y.eq(0),
                        slot.eq(0),
                        m_ptr.eq(self.mant_addr),
                        e_ptr.eq(self.exp_addr),
                        self.rows_loaded.eq(0),
                    ]
                    with m.If(self.resident):
                        m.d.sync += self.rows_loaded.eq(self.ih)
                    with m.Else():
                        m.next = "ROW"
            with m.State("ROW"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += room_fresh.eq(1)
                with m.If(done_rows & room_fresh):
                    m.d.sync += room_fresh.eq(0)
                    m.next = "IDLE"
                with m.Elif(room & room_fresh):
                    m.d.comb += self.streaming.eq(1)
                    m.d.sync += [seg.eq(0), ebase.eq(slot), room_fresh.eq(0)]
                    m.next = "SEG"
            with m.State("SEG"):
                m.d.comb += [self.busy.eq(1), self.streaming.eq(1)]
                m.d.sync += [
                    req_addr.eq(m_ptr),
                    *budget.load(self.seg_blocks << lg(gran)),
                    entry.eq(ebase),
                    k.eq(0),
                ]
                m.next = "MANT"
            with m.State("MANT"):
                m.d.comb += self.streaming.eq(1)
                m.d.comb += [self.busy.eq(1), bus.req.eq(budget.due & (inflight < 2))]
                with m.If(bus.rvalid):
                    m.d.comb += mw.en.eq(1 << k if gran > 1 else 1)
                    if gran > 1:
                        m.d.sync += k.eq(k + 1)
                        with m.If(k == gran - 1):
                            m.d.sync += [k.eq(0), entry.eq(entry + 1)]
                    else:
                        m.d.sync += entry.eq(entry + 1)
                with m.If(bus.done & (inflight == 1) & ~budget.due):
                    m.d.sync += [
                        req_addr.eq(e_ptr & ~1),
                        b.eq(e_ptr & ~1),
                        *budget.load((self.seg_blocks + e_ptr[0] + 1) >> 1),
                    ]
                    m.next = "EXP"
            with m.State("EXP"):
                m.d.comb += self.streaming.eq(1)
                m.d.comb += [self.busy.eq(1), bus.req.eq(budget.due & (inflight < 2))]
                with m.If(bus.rvalid):
                    m.d.sync += b.eq(b + 2)
                    for byte, ok in enumerate((ok0, ok1)):
                        ent = e0 + byte
                        for par in range(2):
                            with m.If(ok & (ent[0] == par)):
                                m.d.comb += wr[par].en.eq(1)
                with m.If(bus.done & (inflight == 1) & ~budget.due):
                    m.d.sync += [
                        m_ptr.eq(m_ptr + self.seg_mstep),
                        e_ptr.eq(e_ptr + self.seg_estep),
                        ebase.eq(ebase + self.seg_blocks),
                        seg.eq(seg + 1),
                    ]
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.comb += [self.busy.eq(1), self.streaming.eq(1)]
                with m.If(seg == self.segs_per_row):
                    nxt = slot + self.rowblocks
                    m.d.sync += [
                        y.eq(y + 1),
                        self.rows_loaded.eq(y + 1),
                        slot.eq(nxt),
                    ]
                    with m.If(nxt >= self.ring):
                        m.d.sync += slot.eq(0)
                    m.next = "ROW"
                with m.Else():
                    m.next = "SEG"
        return m
