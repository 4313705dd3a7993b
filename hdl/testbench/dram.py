"""A DRAM model speaking the NPU's burst bus (``tessera.hdl.bus.MemBus``).

Ideal timing, the channel the cycle model assumes: one 16-bit beat per cycle, a command is
accepted while the previous burst's last beat moves, read data follows the command by one
cycle. Everything is sampled and driven on the falling clock edge, where the NPU's
registered outputs and the combinational handshakes derived from them are stable.
"""

from __future__ import annotations

import numpy as np
from cocotb.triggers import FallingEdge


class DramModel:
    """Byte-addressed memory behind the ``mem_*`` ports of the NPU top."""

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

        At each falling edge: drive the read beat or take the write beat that moves at the
        coming rising edge, and accept a new command at that edge when the burst in flight
        ends there (so bursts stream back to back).
        """
        dut = self.dut
        mem = self.mem
        dut.mem__cmd_ready.value = 1
        dut.mem__rvalid.value = 0
        dut.mem__wready.value = 0
        read_left = write_left = 0
        addr = 0
        while True:
            await FallingEdge(dut.clk)
            if read_left:
                self._check(addr, 2)
                dut.mem__rdata.value = int(mem[addr]) | int(mem[addr + 1]) << 8
                dut.mem__rvalid.value = 1
                addr += 2
                read_left -= 1
                self.beats_read += 1
            else:
                dut.mem__rvalid.value = 0
            if write_left:
                dut.mem__wready.value = 1
                if int(dut.mem__wvalid.value):
                    data = int(dut.mem__wdata.value)
                    strb = int(dut.mem__wstrb.value)
                    self._check(addr, 2)
                    if self.log is not None:
                        self.log.append((addr, data, strb))
                    if strb & 1:
                        mem[addr] = data & 0xFF
                    if strb & 2:
                        mem[addr + 1] = data >> 8
                    addr += 2
                    write_left -= 1
                    self.beats_written += 1
            else:
                dut.mem__wready.value = 0
            free = read_left == 0 and write_left == 0
            dut.mem__cmd_ready.value = int(free)
            if free and int(dut.mem__cmd_valid.value):
                self.commands += 1
                addr = int(dut.mem__cmd_addr.value)
                length = int(dut.mem__cmd_len.value)
                if addr & 1 or length == 0:
                    raise AssertionError(f"bad DRAM command addr={addr:#x} len={length}")
                if int(dut.mem__cmd_write.value):
                    write_left = length
                else:
                    read_left = length
