"""Run programs on the NPU RTL: build (cached), hand jobs to cocotb, collect DRAM and cycles.

Two harnesses. :func:`run_jobs` runs many small programs back to back in one cocotb
session (starting the simulator costs more than a small program) against the Python
``DramModel``, watching every cycle (chain launch and done times): the RTL tests use it.
:func:`run_in_simulated_dram` runs one program on ``npu_dram``, the NPU with a Verilog
DRAM of the same timing inside the simulation, where Python wakes only to report progress:
``tessera run --backend rtl`` and whole networks use it.
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


@dataclass
class DramRunResult:
    mem: np.ndarray
    cycles: int
    error: int
    #: wall seconds from ``start`` to ``done`` (the simulation proper, no build or load)
    wall: float


def simulated_dram_bytes(cfg: NPUConfig, image_bytes: int) -> int:
    """Memory of the ``npu_dram`` build for an image: a power of two (so programs of
    similar size share a build) of at least 1 MiB, at most the configuration's DRAM."""
    size = 1 << 20
    while size < image_bytes:
        size *= 2
    return min(size, cfg.dram_bytes)


def build_npu_dram(
    cfg: NPUConfig, imem_depth: int, dram_bytes: int, threads: int = 1
) -> rtlsim.Build:
    from tessera.hdl.npu import NPU
    from tessera.hdl.testbench.dram_top import TOPLEVEL, wrapper_verilog

    wrapper = (TOPLEVEL, wrapper_verilog(imem_depth, dram_bytes))
    return rtlsim.build(NPU(cfg, imem_depth=imem_depth), "npu", wrapper=wrapper, threads=threads)


def run_in_simulated_dram(
    cfg: NPUConfig,
    words: np.ndarray,
    image: np.ndarray,
    max_cycles: int = 2_000_000_000,
    progress_cycles: int = 1_000_000,
    threads: int = 1,
) -> DramRunResult:
    """Run one program on the RTL of ``cfg`` with the DRAM inside the simulation.

    ``image`` is the DRAM image (at most the configuration's DRAM); the result holds the
    image after the run. Raises :class:`AssertionError` when the NPU is not done after
    ``max_cycles`` or touched memory outside the DRAM. ``threads`` > 1 runs a
    multi-threaded Verilator model (whole networks on an otherwise idle machine).
    """
    from tessera.hdl.testbench.dram_top import read_hex, write_hex

    image = np.asarray(image, dtype=np.uint8)
    if image.size > cfg.dram_bytes:
        raise ValueError(
            f"DRAM image of {image.size} bytes exceeds the {cfg.dram_bytes} bytes of {cfg.name}"
        )
    dram_bytes = simulated_dram_bytes(cfg, image.size)
    b = build_npu_dram(cfg, imem_depth_for(len(words)), dram_bytes, threads)
    with tempfile.TemporaryDirectory(prefix="tessera-rtl-") as tmp:
        folder = Path(tmp)
        n_words = write_hex(image, folder / "dram_in.hex")
        np.savez(
            folder / "job.npz", words=np.asarray(words, dtype=np.uint64), max_cycles=max_cycles
        )
        b.run(
            "tessera.hdl.testbench.tb_npu_dram",
            Path(__file__).parent / "testbench",
            extra_env={
                "TESSERA_RTL_JOB": str(folder / "job.npz"),
                "TESSERA_RTL_PROGRESS_CYCLES": str(progress_cycles),
            },
            plusargs=[
                f"+dram_in={folder / 'dram_in.hex'}",
                f"+dram_out={folder / 'dram_out.hex'}",
                f"+dram_words={n_words}",
            ],
        )
        r = np.load(folder / "result.npz")
        if int(r["fault"]):
            raise AssertionError(
                f"the NPU accessed DRAM byte {int(r['fault_addr']):#x}: outside the "
                f"{dram_bytes} bytes simulated, or an odd address or empty burst"
            )
        if not int(r["done"]):
            raise AssertionError(f"NPU not done after {max_cycles} cycles (pc={int(r['pc'])})")
        mem = read_hex(folder / "dram_out.hex", image.size)
    return DramRunResult(mem, int(r["cycles"]), int(r["error"]), float(r["wall"]))


def run_program_rtl(prog, mem: np.ndarray, max_cycles: int = 2_000_000_000) -> int:
    """Run a compiled program on its config's RTL; ``mem`` (the DRAM image) is updated in place.

    Returns the NPU's cycle count; an NPU error status raises :class:`TesseraError`.
    """
    import sys

    from tessera.errors import TesseraError
    from tessera.hdl.toolchain import find_simulator

    print(f"rtl: {find_simulator().describe()}", file=sys.stderr)
    res = run_in_simulated_dram(prog.config, prog.instructions, mem, max_cycles=max_cycles)
    if res.error:
        raise TesseraError(
            f"the NPU stopped with error code {res.error:#04x} (see tessera.hdl.npu)"
        )
    mem[:] = res.mem
    return res.cycles
