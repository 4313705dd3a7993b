"""cocotb test module: one program on ``npu_dram``, the NPU with its DRAM in the simulation.

Python touches the simulation only to load the program, pulse ``start``, wake once every
``TESSERA_RTL_PROGRESS_CYCLES`` cycles to report progress (one line on stderr) and check for
a DRAM fault, and dump the DRAM when ``done`` rises; the clock is the wrapper's own
(``PERIOD_NS``). The job file ``TESSERA_RTL_JOB`` (npz) holds ``words`` and ``max_cycles``; the
result (``result.npz`` beside it) the NPU's cycle counter, its error code, the fault state
and the wall time; the DRAM image goes out through ``$writememh`` (see ``dram_top``).
"""

import os
import sys
import time
from pathlib import Path

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge, First, RisingEdge, Timer

from tessera.hdl.testbench.host import load_program, pulse_start, reset

#: The clock period of ``npu_dram`` (``always #5 clk = ~clk``).
PERIOD_NS = 10


@cocotb.test()
async def run_program(dut):
    job_path = Path(os.environ["TESSERA_RTL_JOB"])
    job = np.load(job_path)
    max_cycles = int(job["max_cycles"])
    chunk = int(os.environ.get("TESSERA_RTL_PROGRESS_CYCLES", "1000000"))
    dut.dump.value = 0
    await reset(dut)
    await load_program(dut, job["words"])
    await pulse_start(dut)
    t0 = time.perf_counter()
    waited = 0
    while not int(dut.done.value):
        await First(RisingEdge(dut.done), Timer(chunk * PERIOD_NS, unit="ns"))
        waited += chunk
        cycles = int(dut.cycles.value)
        dt = time.perf_counter() - t0
        print(
            f"rtl: {cycles:,} cycles, {dt:.0f} s, {cycles / max(dt, 1e-9):,.0f} cycles/s",
            file=sys.stderr,
            flush=True,
        )
        if int(dut.fault.value) or waited > max_cycles:
            break
    await FallingEdge(dut.clk)
    wall = time.perf_counter() - t0
    done = int(dut.done.value)
    cycles = int(dut.cycles.value)
    error = int(dut.error.value)
    dut.dump.value = 1
    await FallingEdge(dut.clk)
    dut.dump.value = 0
    await FallingEdge(dut.clk)
    np.savez(
        job_path.parent / "result.npz",
        done=done,
        cycles=cycles,
        error=error,
        fault=int(dut.fault.value),
        fault_addr=int(dut.fault_addr.value),
        pc=int(dut.pc.value),
        wall=wall,
    )
