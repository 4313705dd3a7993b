"""``tessera bench rtl``: a whole network through the NPU's RTL, bit for bit against the ISA
simulator, with the RTL simulation's speed.

The network is compiled for the configuration, one seeded input goes into a DRAM image,
and the same image runs on the instruction simulator and on the RTL (Verilator, with the
DRAM inside the simulation: :mod:`tessera.hdl.testbench.dram_top`). The whole DRAM after
the run must match byte for byte; the cycle counts are compared with the cycle model's
2 % contract. The first run for a configuration also builds the Verilator model (minutes;
cached after). ``tests/rtl/test_rtl_resnet50.py`` (marker ``slow``) asserts the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


def register(bsub: argparse._SubParsersAction) -> None:
    """Adds ``rtl`` under ``tessera bench``."""
    s = bsub.add_parser(
        "rtl", help="a whole network through the RTL simulation, bit-exact vs the simulator"
    )
    s.add_argument("--model", default="resnet50", help="zoo model name or an .onnx path")
    s.add_argument("--config", default="ulx3s-85f", help="NPU configuration")
    s.add_argument("--seed", type=int, default=0, help="weights (zoo) and input seed")
    s.add_argument(
        "--progress-cycles",
        type=int,
        default=2_000_000,
        help="print a progress line every this many simulated cycles",
    )
    s.add_argument(
        "--threads",
        type=int,
        default=1,
        help="Verilator model threads (a separate build; for an otherwise idle machine)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object instead")
    s.set_defaults(func=_bench_rtl)


@dataclass
class RtlComparison:
    model: str
    config: str
    instructions: int
    dram_bytes: int
    model_cycles: int
    rtl_cycles: int
    rtl_error: int
    threads: int
    bit_exact: bool
    bytes_differing: int
    #: wall seconds of the RTL simulation from start to done (no build, no image I/O)
    rtl_seconds: float
    #: wall seconds of the whole RTL step: build (cached), image in, simulation, image out
    rtl_total_seconds: float
    sim_seconds: float

    @property
    def cycle_difference(self) -> float:
        """RTL cycles relative to the cycle model's, as a fraction."""
        return (self.rtl_cycles - self.model_cycles) / self.model_cycles

    @property
    def rtl_cycles_per_second(self) -> float:
        return self.rtl_cycles / self.rtl_seconds if self.rtl_seconds else 0.0


def compare_network(
    model: str | Path,
    config: str,
    seed: int = 0,
    progress_cycles: int = 2_000_000,
    threads: int = 1,
) -> RtlComparison:
    """Compile ``model`` (zoo name or ONNX path) for ``config`` and run one seeded input on
    the instruction simulator and on the RTL, from the same DRAM image."""
    from tessera.compiler.driver import compile_model
    from tessera.config import get_config
    from tessera.hdl.rtlrun import run_in_simulated_dram
    from tessera.runtime.host import build_dram
    from tessera.sim.executor import Simulator

    path = Path(model)
    if path.suffix != ".onnx":
        from tessera.zoo import cached_export

        path = cached_export(str(model), seed=seed)
    cfg = get_config(config)
    prog, _, _ = compile_model(path, cfg)
    spec = prog.manifest["inputs"][0]
    x = np.random.default_rng(seed).standard_normal(spec["shape"]).astype(np.float32)
    image = build_dram(prog, {spec["name"]: x})
    expected = image.copy()
    t0 = time.perf_counter()
    model_cycles = Simulator(cfg, expected).run(prog.instructions)
    sim_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rtl = run_in_simulated_dram(cfg, prog.instructions, image, progress_cycles=progress_cycles)
    total_s = time.perf_counter() - t0
    differing = int(np.count_nonzero(rtl.mem != expected))
    return RtlComparison(
        model=path.name,
        config=cfg.name,
        instructions=len(prog.instructions),
        dram_bytes=int(image.size),
        model_cycles=int(model_cycles),
        rtl_cycles=rtl.cycles,
        rtl_error=rtl.error,
        threads=threads,
        bit_exact=differing == 0,
        bytes_differing=differing,
        rtl_seconds=rtl.wall,
        rtl_total_seconds=total_s,
        sim_seconds=sim_s,
    )


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Sends file descriptor 1 to stderr: the Verilator build and cocotb write their logs
    to the inherited stdout, which ``--json`` keeps for the one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _bench_rtl(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tessera.hdl.toolchain import find_simulator

    console = Console(stderr=args.json)
    console.print(
        f"RTL simulator: {find_simulator().describe()}; progress lines come from the "
        "simulation every --progress-cycles cycles"
    )
    with _stdout_to_stderr() if args.json else contextlib.nullcontext():
        r = compare_network(args.model, args.config, args.seed, args.progress_cycles, args.threads)
    if args.json:
        print(
            json.dumps(
                {
                    **asdict(r),
                    "cycle_difference": r.cycle_difference,
                    "rtl_cycles_per_second": r.rtl_cycles_per_second,
                }
            )
        )
        return 0 if r.bit_exact and not r.rtl_error else 1
    table = Table(
        title=f"tessera bench rtl: {r.model} on {r.config}, Verilator threads: {r.threads}"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("instructions / DRAM image", f"{r.instructions} / {r.dram_bytes:,} bytes")
    table.add_row(
        "RTL == simulator, whole DRAM",
        "yes, bit for bit" if r.bit_exact else f"NO: {r.bytes_differing:,} bytes differ",
    )
    table.add_row("NPU error code", f"{r.rtl_error:#04x}")
    table.add_row("RTL cycles", f"{r.rtl_cycles:,}")
    table.add_row(
        "cycle model", f"{r.model_cycles:,} (RTL {100 * r.cycle_difference:+.2f} %, contract 2 %)"
    )
    table.add_row(
        "RTL simulation, start to done",
        f"{r.rtl_seconds:.0f} s = {r.rtl_cycles_per_second:,.0f} cycles/s",
    )
    table.add_row(
        "RTL step in all (build if not cached, image in/out)", f"{r.rtl_total_seconds:.0f} s"
    )
    table.add_row(
        "ISA simulator, same program",
        f"{r.sim_seconds:.2f} s (the RTL took {r.rtl_seconds / max(r.sim_seconds, 1e-9):,.1f}x "
        "as long)",
    )
    console.print(table)
    return 0 if r.bit_exact and not r.rtl_error else 1
