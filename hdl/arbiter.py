"""Fixed-priority burst arbiter: the NPU's units share one DRAM port, a burst at a time.

Bursts are granted in priority order and may be queued: a command is issued whenever the
memory accepts one and fewer than ``QUEUE`` bursts are outstanding, so the next burst's
command overlaps the current burst's data and the data beats stream back to back (the
cycle model charges DRAM time as bytes / bandwidth, with no per-burst cost). Data beats
belong to the oldest outstanding burst; the port that owns it sees ``rvalid`` / ``wtake``
and, on its last beat, ``done``.
"""

from amaranth import Module, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import Out

from tessera.hdl.bus import LEN_BITS, BurstPort, MemBus

#: Outstanding bursts (the one moving data plus the next one already commanded).
QUEUE = 2


class Arbiter(wiring.Component):
    """Grant bursts to ``p0`` first, then ``p1``, ...

    Priority follows what keeps the datapath running: the output writer (its FIFO backs up
    the pipeline), then the AUX reader, the activation loader and the weight loader, which
    runs ahead of the chain anyway.
    """

    def __init__(self, n_ports: int):
        self.n_ports = n_ports
        super().__init__(
            {
                "mem": Out(MemBus),
                **{f"p{i}": Out(BurstPort.flip()) for i in range(n_ports)},
            }
        )

    def ports(self) -> list:
        return [getattr(self, f"p{i}") for i in range(self.n_ports)]

    def elaborate(self, platform):
        m = Module()
        ports = self.ports()
        mem = self.mem
        entry = data.StructLayout(
            {"sel": range(self.n_ports), "len": LEN_BITS, "write": 1, "valid": 1}
        )
        q = [Signal(entry, name=f"q{i}") for i in range(QUEUE)]  # q[0] moves data
        left = Signal(LEN_BITS)  # beats left of q[0]

        for p in ports:
            m.d.comb += p.rdata.eq(mem.rdata)

        # Data phase of the oldest burst.
        head = q[0]
        beat = Signal()
        for i, p in enumerate(ports):
            with m.If(head.valid & (head.sel == i)):
                with m.If(head.write):
                    m.d.comb += [
                        mem.wvalid.eq(1),
                        mem.wdata.eq(p.wdata),
                        mem.wstrb.eq(p.wstrb),
                        p.wtake.eq(mem.wready),
                    ]
                with m.Else():
                    m.d.comb += p.rvalid.eq(mem.rvalid)
        with m.If(head.valid):
            with m.If(head.write):
                m.d.comb += beat.eq(mem.wready)
            with m.Else():
                m.d.comb += beat.eq(mem.rvalid)
        last = Signal()
        m.d.comb += last.eq(beat & (left == 1))
        for i, p in enumerate(ports):
            with m.If(last & (head.sel == i)):
                m.d.comb += p.done.eq(1)

        # Command phase: the highest-priority requester, if a queue slot is free.
        # Only registered state decides whether a command is offered: the memory samples
        # cmd_valid before the beat of this cycle is known to it.
        full = Signal()
        m.d.comb += full.eq(q[QUEUE - 1].valid)
        winner = Signal(range(self.n_ports))
        any_req = Signal()
        for i in reversed(range(self.n_ports)):
            with m.If(ports[i].req):
                m.d.comb += [winner.eq(i), any_req.eq(1)]
        for i, p in enumerate(ports):
            with m.If(winner == i):
                m.d.comb += [
                    mem.cmd_write.eq(p.write),
                    mem.cmd_addr.eq(p.addr),
                    mem.cmd_len.eq(p.len),
                ]
        m.d.comb += mem.cmd_valid.eq(any_req & ~full)
        issued = Signal()
        m.d.comb += issued.eq(mem.cmd_valid & mem.cmd_ready)
        for i, p in enumerate(ports):
            with m.If(issued & (winner == i)):
                m.d.comb += p.grant.eq(1)
        new = Signal(entry)
        m.d.comb += [
            new.sel.eq(winner),
            new.len.eq(mem.cmd_len),
            new.write.eq(mem.cmd_write),
            new.valid.eq(1),
        ]

        # Queue update: pop on the last beat, push on issue.
        with m.If(beat & ~last):
            m.d.sync += left.eq(left - 1)
        with m.If(last):
            # q[1] (or the new command) becomes the head
            with m.If(q[1].valid):
                m.d.sync += [q[0].eq(q[1]), left.eq(q[1].len)]
                with m.If(issued):
                    m.d.sync += q[1].eq(new)
                with m.Else():
                    m.d.sync += q[1].valid.eq(0)
            with m.Elif(issued):
                m.d.sync += [q[0].eq(new), left.eq(new.len), q[1].valid.eq(0)]
            with m.Else():
                m.d.sync += q[0].valid.eq(0)
        with m.Elif(issued):
            with m.If(~q[0].valid):
                m.d.sync += [q[0].eq(new), left.eq(new.len)]
            with m.Else():
                m.d.sync += q[1].eq(new)
        return m
