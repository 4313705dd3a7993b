"""Run a compiled program on a backend: one entry point for every way of executing it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tessera.errors import TesseraError
from tessera.program import Program
from tessera.runtime.host import prepare_dram, read_outputs
from tessera.sim.executor import Simulator
from tessera.sim.reference import ReferenceExecutor

BACKENDS = ("sim", "reference", "rtl")


@dataclass
class RunResult:
    outputs: dict[str, np.ndarray]
    mem: np.ndarray
    cycles: int | None


def run_program(
    prog: Program, inputs: dict[str, np.ndarray], backend: str = "sim", progress: bool = False
) -> RunResult:
    """Execute ``prog`` on ``inputs`` (ONNX names -> float arrays)."""
    if backend not in BACKENDS:
        raise TesseraError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    mem, origin = prepare_dram(prog, inputs)
    bar = None
    if progress:
        from tqdm import tqdm

        total = (
            len(prog.manifest["layers"])
            if backend == "reference"
            else sum(layer["chains"] for layer in prog.manifest["layers"])
        )
        unit = "layer" if backend == "reference" else "chain"
        bar = tqdm(total=total, desc=f"{backend}", unit=unit, leave=False)
    cb = bar.update if bar is not None else None
    try:
        if backend == "sim":
            sim = Simulator(prog.config, mem, origin)
            cycles = sim.run(prog.instructions, progress=cb)
        elif backend == "rtl":
            # The Amaranth NPU in an RTL simulator (cocotb + Verilator): tessera.hdl.rtlrun.
            from tessera.hdl.rtlrun import run_program_rtl

            cycles = run_program_rtl(prog, mem)
        else:
            ReferenceExecutor(prog, mem).run(progress=cb)
            cycles = None
    finally:
        if bar is not None:
            bar.close()
    return RunResult(read_outputs(prog, mem), mem, cycles)
