"""A first-word-fall-through FIFO held in distributed (LUT) RAM.

Amaranth's ``SyncFIFOBuffered`` leaves the storage's kind to synthesis, and yosys puts a
wide FIFO of 64 words into block RAM. On the 85F, where the tile and activation buffers
take 200 of the 208 block RAM sites, the writer's FIFO got whatever sites were left, across
the die from the writer: its data out was the placed design's slowest path. In LUT RAM
(``ram_style = "distributed"``) the storage and its output register go where the writer is.

The behaviour is ``SyncFIFOBuffered``'s, cycle for cycle: the storage's read port is
synchronous, so the head word is in a register (``r_data``) and ``r_rdy`` says it is valid.
"""

from amaranth import Module, Mux, Signal
from amaranth.hdl import Value
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out


class LutFIFO(wiring.Component):
    def __init__(self, *, width: int, depth: int):
        if depth < 2:
            raise ValueError("the FIFO needs depth >= 2 (one word in storage, one at the head)")
        self.width, self.depth = width, depth
        super().__init__(
            {
                "w_en": In(1),
                "w_data": In(width),
                "w_rdy": Out(1),
                "r_en": In(1),
                "r_data": Out(width),
                "r_rdy": Out(1),
                "level": Out(range(depth + 1)),
            }
        )

    def elaborate(self, platform):
        m = Module()
        inner = self.depth - 1  # words in storage; the head word is in the read register
        storage = Memory(shape=self.width, depth=inner, init=[], attrs={"ram_style": "distributed"})
        m.submodules.storage = storage
        w_port = storage.write_port()
        r_port = storage.read_port(domain="sync")

        held = Signal(range(inner + 1))
        produce = Signal(range(inner))
        consume = Signal(range(inner))
        do_write = self.w_en & self.w_rdy
        # Move a word to the head when the storage has one and the head is free or leaving.
        do_fetch = (held != 0) & (~self.r_rdy | self.r_en)

        def wrap(i: Signal) -> Value:
            return Mux(i == inner - 1, 0, i + 1)

        m.d.comb += [
            self.w_rdy.eq(held != inner),
            w_port.addr.eq(produce),
            w_port.data.eq(self.w_data),
            w_port.en.eq(do_write),
            r_port.addr.eq(consume),
            r_port.en.eq(do_fetch),
            self.r_data.eq(r_port.data),
            self.level.eq(held + self.r_rdy),
        ]
        with m.If(do_write):
            m.d.sync += produce.eq(wrap(produce))
        with m.If(do_fetch):
            m.d.sync += [consume.eq(wrap(consume)), self.r_rdy.eq(1)]
        with m.Elif(self.r_en):
            m.d.sync += self.r_rdy.eq(0)
        with m.If(do_write & ~do_fetch):
            m.d.sync += held.eq(held + 1)
        with m.If(do_fetch & ~do_write):
            m.d.sync += held.eq(held - 1)
        return m
