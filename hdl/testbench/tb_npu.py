"""cocotb test module: run every job of a job folder on the NPU (see tessera.hdl.rtlrun).

A job is ``job_<i>.npz`` with ``words`` (uint64 program), ``image`` (uint8 DRAM image) and
``max_cycles``; the result ``result_<i>.npz`` holds the DRAM after the run and the counts.
"""

import os
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock

from tessera.hdl.testbench.dram import DramModel
from tessera.hdl.testbench.host import HostDriver, reset


@cocotb.test()
async def run_jobs(dut):
    folder = Path(os.environ["TESSERA_RTL_JOBS"])
    jobs = sorted(folder.glob("job_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    size = max(int(np.load(j)["image"].size) for j in jobs)
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dram = DramModel(dut, size + 64)
    if os.environ.get("TESSERA_RTL_LOG"):
        dram.log = []
    cocotb.start_soon(dram.run())
    await reset(dut)
    host = HostDriver(dut, dram)
    for job in jobs:
        data = np.load(job)
        image = np.zeros(size + 64, dtype=np.uint8)
        image[: data["image"].size] = data["image"]
        out = await host.run(data["words"], image, int(data["max_cycles"]))
        idx = job.stem.split("_")[1]
        if dram.log is not None:
            print("WRITES", [(hex(a), hex(d), s) for a, d, s in dram.log if a >= 880])
            dram.log.clear()
        np.savez(
            folder / f"result_{idx}.npz",
            mem=out.mem[: data["image"].size],
            cycles=out.cycles,
            monitored=out.monitored,
            error=out.error,
            beats_read=out.beats_read,
            beats_written=out.beats_written,
            chains=np.array(out.chains, dtype=np.int64).reshape(-1, 2),
        )
