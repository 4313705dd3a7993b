"""Run programs on the NPU RTL: build (cached), hand jobs to cocotb, collect DRAM and cycles.

Used by the RTL tests and by ``tessera run --backend rtl``. One cocotb session runs many
jobs (programs with their DRAM images) back to back, because starting the simulator costs
more than a small program.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tessera.config import NPUConfig
from tessera.hdl import rtlsim

TEST_MODULE = "tessera.hdl.testbench.tb_npu"


@dataclass
class RtlResult:
    mem: np.ndarray
    cycles: int
    monitored: int
    error: int
    beats_read: int
    beats_written: int
    #: (launch, done) cycle of every chain, counted from start
    chains: np.ndarray


def imem_depth_for(n_words: int) -> int:
    """Instruction memory depth for a program: a power of two >= 1024 holding it."""
    depth = 1024
    while depth < n_words + 1:
        depth *= 2
    return depth


def build_npu(cfg: NPUConfig, imem_depth: int = 1024) -> rtlsim.Build:
    from tessera.hdl.npu import NPU

    return rtlsim.build(NPU(cfg, imem_depth=imem_depth), "npu")


def run_jobs(
    cfg: NPUConfig,
    jobs: list[tuple[np.ndarray, np.ndarray]],
    max_cycles: int = 10_000_000,
    imem_depth: int | None = None,
) -> list[RtlResult]:
    """Run ``(words, dram image)`` jobs on the RTL of ``cfg``; results in job order."""
    depth = imem_depth or imem_depth_for(max(len(w) for w, _ in jobs))
    b = build_npu(cfg, depth)
    with tempfile.TemporaryDirectory(prefix="tessera-rtl-") as tmp:
        folder = Path(tmp)
        for i, (words, image) in enumerate(jobs):
            np.savez(
                folder / f"job_{i}.npz",
                words=np.asarray(words, dtype=np.uint64),
                image=np.asarray(image, dtype=np.uint8),
                max_cycles=max_cycles,
            )
        b.run(
            TEST_MODULE,
            Path(__file__).parent / "testbench",
            extra_env={"TESSERA_RTL_JOBS": str(folder)},
        )
        out = []
        for i in range(len(jobs)):
            r = np.load(folder / f"result_{i}.npz")
            out.append(
                RtlResult(
                    mem=r["mem"].copy(),
                    cycles=int(r["cycles"]),
                    monitored=int(r["monitored"]),
                    error=int(r["error"]),
                    beats_read=int(r["beats_read"]),
                    beats_written=int(r["beats_written"]),
                    chains=r["chains"].copy(),
                )
            )
    return out


def run_program_rtl(prog, mem: np.ndarray, max_cycles: int = 2_000_000_000) -> int:
    """Run a compiled program on its config's RTL; ``mem`` (the DRAM image) is updated in place.

    Returns the NPU's cycle count; an NPU error status raises :class:`TesseraError`.
    """
    import sys

    from tessera.errors import TesseraError
    from tessera.hdl.toolchain import find_simulator

    print(f"rtl: {find_simulator().describe()}", file=sys.stderr)
    (res,) = run_jobs(prog.config, [(prog.instructions, mem)], max_cycles=max_cycles)
    if res.error:
        raise TesseraError(
            f"the NPU stopped with error code {res.error:#04x} (see tessera.hdl.npu)"
        )
    mem[:] = res.mem
    return res.cycles
