"""A DRAM model speaking the NPU's burst bus (``tessera.hdl.bus.MemBus``).

Ideal timing, the channel the cycle model assumes: one 16-bit beat per cycle, up to two
bursts outstanding so beats stream back to back, read data one cycle after the command.
Everything is sampled and driven on the falling clock edge, where the NPU's registered
outputs and the commands offered from them are stable.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from cocotb.triggers import FallingEdge


class DramModel:
    """Byte-addressed memory behind the ``mem__*`` ports of the NPU top."""

    def __init__(self, dut, size: int) -> None:
        self.dut = dut
        self.mem = np.zeros(size, dtype=np.uint8)
        self.beats_read = 0
        self.beats_written = 0
        self.commands = 0
        #: (address, data, strobes) of every write beat when set to a list (debugging).
        self.log: list | None = None

    def load(self, image: np.ndarray) -> None:
        self.mem[:] = 0
        self.mem[: len(image)] = image

    def _check(self, addr: int, nbytes: int) -> None:
        if addr < 0 or addr + nbytes > len(self.mem):
            raise AssertionError(
                f"NPU accessed DRAM bytes {addr:#x}..{addr + nbytes:#x} outside the "
                f"{len(self.mem)} bytes of the image"
            )

    async def run(self) -> None:
        """Serve commands forever (start with ``cocotb.start_soon``).

        Up to two bursts are outstanding (the one moving data and the next, commanded
        while the first streams), so consecutive bursts' beats follow without a gap. At
        each falling edge the model drives the read beat or takes the write beat that moves
        at the coming rising edge, then accepts a command at that edge if there is room.
        """
        dut = self.dut
        mem = self.mem
        dut.mem__cmd_ready.value = 1
        dut.mem__rvalid.value = 0
        dut.mem__wready.value = 0
        queue: deque[list[int]] = deque()
        cur: list[int] | None = None  # [addr, beats left, write]
        while True:
            await FallingEdge(dut.clk)
            if cur is None and queue:
                cur = queue.popleft()
            rvalid = wready = 0
            if cur is not None:
                addr = cur[0]
                self._check(addr, 2)
                if cur[2]:
                    wready = 1
                    if int(dut.mem__wvalid.value):
                        data = int(dut.mem__wdata.value)
                        strb = int(dut.mem__wstrb.value)
                        if self.log is not None:
                            self.log.append((addr, data, strb))
                        if strb & 1:
                            mem[addr] = data & 0xFF
                        if strb & 2:
                            mem[addr + 1] = data >> 8
                        cur[0] += 2
                        cur[1] -= 1
                        self.beats_written += 1
                else:
                    rvalid = 1
                    dut.mem__rdata.value = int(mem[addr]) | int(mem[addr + 1]) << 8
                    cur[0] += 2
                    cur[1] -= 1
                    self.beats_read += 1
                if cur[1] == 0:
                    cur = None
            dut.mem__rvalid.value = rvalid
            dut.mem__wready.value = wready
            room = (cur is not None) + len(queue) < 2
            dut.mem__cmd_ready.value = int(room)
            if room and int(dut.mem__cmd_valid.value):
                self.commands += 1
                addr = int(dut.mem__cmd_addr.value)
                length = int(dut.mem__cmd_len.value)
                if addr & 1 or length == 0:
                    raise AssertionError(f"bad DRAM command addr={addr:#x} len={length}")
                queue.append([addr, length, int(dut.mem__cmd_write.value)])
