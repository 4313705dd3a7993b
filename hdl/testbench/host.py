"""Host driver: load a program and a DRAM image into the NPU, run it, read the results back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cocotb.triggers import ClockCycles, FallingEdge

from tessera.hdl.testbench.dram import DramModel


@dataclass
class RunOutcome:
    mem: np.ndarray
    cycles: int  # the NPU's own cycle counter
    monitored: int  # cycles between start and done, counted by the testbench
    error: int
    beats_read: int
    beats_written: int
    #: (launch cycle, done cycle) of every chain, when the chain engine is visible
    chains: list[tuple[int, int]]


class CycleMonitor:
    """Counts clock cycles from ``start`` to ``done`` independently of the NPU's counter."""

    def __init__(self) -> None:
        self.count = 0

    def tick(self) -> None:
        self.count += 1


async def reset(dut) -> None:
    """Holds the NPU in reset for three cycles with the host inputs idle."""
    dut.start.value = 0
    dut.prog_we.value = 0
    dut.rst.value = 1
    await ClockCycles(dut.clk, 3)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


async def load_program(dut, words: np.ndarray) -> None:
    """Writes the program into the NPU's instruction memory, one word a cycle."""
    for i, w in enumerate(words.tolist()):
        await FallingEdge(dut.clk)
        dut.prog_we.value = 1
        dut.prog_addr.value = i
        dut.prog_data.value = int(w)
    await FallingEdge(dut.clk)
    dut.prog_we.value = 0


async def pulse_start(dut) -> None:
    """One cycle of ``start``, driven between clock edges as the host bus would."""
    await FallingEdge(dut.clk)
    dut.start.value = 1
    await FallingEdge(dut.clk)
    dut.start.value = 0


class HostDriver:
    """Drives the control/status port of the NPU top as a CPU would over its bus."""

    def __init__(self, dut, dram: DramModel) -> None:
        self.dut = dut
        self.dram = dram

    async def run(self, words: np.ndarray, image: np.ndarray, max_cycles: int) -> RunOutcome:
        dut = self.dut
        self.dram.load(image)
        r0, w0 = self.dram.beats_read, self.dram.beats_written
        await load_program(dut, words)
        await pulse_start(dut)
        mon = CycleMonitor()
        chains: list[tuple[int, int]] = []
        try:
            engine_done, launched = dut.chain.done, dut.chain.launch
        except AttributeError:
            engine_done = launched = None
        starts: list[int] = []
        while not int(dut.done.value):
            await FallingEdge(dut.clk)
            mon.tick()
            if engine_done is not None:
                if int(launched.value):
                    starts.append(mon.count)
                if int(engine_done.value) and starts:
                    chains.append((starts.pop(0), mon.count))
            if mon.count > max_cycles:
                import os

                for path in os.environ.get("TESSERA_RTL_DUMP", "").split():
                    h = dut
                    for part in path.split("."):
                        h = getattr(h, part)
                    print(f"DUMP {path} = {h.value}")
                raise AssertionError(
                    f"NPU not done after {max_cycles} cycles (pc={int(dut.pc.value)})"
                )
        try:
            print(
                f"PERF stall_rows={int(dut.chain.stall_rows.value)}"
                f" stall_credit={int(dut.chain.stall_credit.value)}"
            )
        except AttributeError:
            pass
        return RunOutcome(
            mem=self.dram.mem.copy(),
            cycles=int(dut.cycles.value),
            monitored=mon.count,
            error=int(dut.error.value),
            beats_read=self.dram.beats_read - r0,
            beats_written=self.dram.beats_written - w0,
            chains=chains,
        )
