"""``tessera run`` and ``tessera report``: execute a program, or read its cycle model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tessera.errors import TesseraError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a program on an input (simulator or reference)")
    p.add_argument("program", type=Path, help="program file (.tsr)")
    p.add_argument("--input", type=Path, required=True, help=".npy (single input) or .npz")
    p.add_argument("--output", type=Path, required=True, help=".npz with every graph output")
    p.add_argument("--backend", default="sim", choices=["sim", "rtl"], help="execution backend")
    p.add_argument(
        "--reference",
        action="store_true",
        help="run the numpy reference executor (layer by layer) instead of the ISA simulator",
    )
    p.set_defaults(func=_run)

    r = sub.add_parser("report", help="per-layer MACs, cycles, MVU utilisation, DRAM bytes")
    r.add_argument("program", type=Path, help="program file (.tsr)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=_report)


def _load_inputs(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    if not path.exists():
        raise TesseraError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise TesseraError(f"{path}: not a .npy/.npz file ({exc})") from None
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise TesseraError(f"the program takes {len(names)} inputs {names}; pass an .npz")
        return {names[0]: data}
    return {k: data[k] for k in data.files}


def _run(args: argparse.Namespace) -> int:
    from tessera.program import Program
    from tessera.sim.run import run_program

    prog = Program.load(args.program)
    names = [i["name"] for i in prog.manifest["inputs"]]
    inputs = _load_inputs(args.input, names)
    backend = "reference" if args.reference else args.backend
    t0 = time.perf_counter()
    result = run_program(prog, inputs, backend, progress=True)
    dt = time.perf_counter() - t0
    np.savez(args.output, **result.outputs)
    msg = f"{backend}: {len(result.outputs)} outputs -> {args.output} in {dt:.2f} s"
    if result.cycles is not None:
        cfg = prog.config
        msg += (
            f"; {result.cycles} cycles = {result.cycles / cfg.clock_hz * 1e3:.2f} ms on {cfg.name}"
        )
    print(msg)
    return 0


def _report(args: argparse.Namespace) -> int:
    from tessera.program import Program
    from tessera.sim.report import build_report, format_report

    prog = Program.load(args.program)
    rep = build_report(prog)
    if args.json:
        print(json.dumps(rep, indent=None))
    else:
        print(format_report(rep))
    return 0
