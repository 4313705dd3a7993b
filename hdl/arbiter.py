"""Fixed-priority burst arbiter: the NPU's units share one DRAM port, a burst at a time."""

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from tessera.hdl.bus import LEN_BITS, BurstPort, MemBus


class Arbiter(wiring.Component):
    """Grant whole bursts to ``ports[0]`` first, then ``ports[1]``, ...

    Priority follows what keeps the datapath running: the output writer (its FIFO backs up
    the pipeline), then the AUX reader, the activation loader and the weight loader, which
    runs ahead of the chain anyway. A burst is never interrupted, so units keep their bursts
    short (a few dozen beats) to bound the wait of the others.
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
        sel = Signal(range(self.n_ports))
        left = Signal(LEN_BITS)
        write = Signal()

        # Read data fans out to every port; only the selected one sees rvalid.
        for p in ports:
            m.d.comb += p.rdata.eq(mem.rdata)

        with m.FSM():
            with m.State("IDLE"):
                # Lowest index wins: iterate in reverse so the last assignment is port 0.
                for i in reversed(range(self.n_ports)):
                    p = ports[i]
                    with m.If(p.req):
                        m.d.comb += [
                            mem.cmd_valid.eq(1),
                            mem.cmd_write.eq(p.write),
                            mem.cmd_addr.eq(p.addr),
                            mem.cmd_len.eq(p.len),
                        ]
                any_req = Signal()
                m.d.comb += any_req.eq(0)
                for p in ports:
                    with m.If(p.req):
                        m.d.comb += any_req.eq(1)
                winner = Signal(range(self.n_ports))
                for i in reversed(range(self.n_ports)):
                    with m.If(ports[i].req):
                        m.d.comb += winner.eq(i)
                with m.If(any_req & mem.cmd_ready):
                    for i, p in enumerate(ports):
                        with m.If(winner == i):
                            m.d.comb += p.grant.eq(1)
                            m.d.sync += [left.eq(p.len), write.eq(p.write)]
                    m.d.sync += sel.eq(winner)
                    m.next = "BUSY"
            with m.State("BUSY"):
                for i, p in enumerate(ports):
                    with m.If(sel == i):
                        with m.If(write):
                            m.d.comb += [
                                mem.wvalid.eq(1),
                                mem.wdata.eq(p.wdata),
                                mem.wstrb.eq(p.wstrb),
                                p.wtake.eq(mem.wready),
                            ]
                        with m.Else():
                            m.d.comb += p.rvalid.eq(mem.rvalid)
                beat = Signal()
                with m.If(write):
                    m.d.comb += beat.eq(mem.wready)
                with m.Else():
                    m.d.comb += beat.eq(mem.rvalid)
                with m.If(beat):
                    m.d.sync += left.eq(left - 1)
                    with m.If(left == 1):
                        for i, p in enumerate(ports):
                            with m.If(sel == i):
                                m.d.comb += p.done.eq(1)
                        m.next = "IDLE"
        return m
