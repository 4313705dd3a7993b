"""``tessera compile``: ONNX model -> ``PROG.tsr``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tessera.config import DEFAULT_PRESET, PRESETS, get_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="compile an ONNX model to an NPU program (.tsr)",
        description="Compile an ONNX model (opset 13-17) for the tessera NPU.",
    )
    p.add_argument("model", type=Path, help="ONNX model file")
    p.add_argument("-o", "--output", type=Path, required=True, help="program file to write")
    p.add_argument(
        "--config", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="NPU configuration"
    )
    p.add_argument("--plan", action="store_true", help="print passes, placement and memory map")
    p.add_argument(
        "--outputs",
        default=None,
        help="comma-separated tensor names to use as outputs (cut the graph there)",
    )
    p.set_defaults(func=_compile)


def _compile(args: argparse.Namespace) -> int:
    from tessera.compiler.driver import compile_model, format_plan

    cfg = get_config(args.config)
    t0 = time.perf_counter()
    outputs = [s for s in args.outputs.split(",") if s] if args.outputs else None
    prog, _, _ = compile_model(args.model, cfg, outputs)
    prog.save(args.output)
    dt = time.perf_counter() - t0
    if args.plan:
        print(format_plan(prog))
    man = prog.manifest
    print(
        f"wrote {args.output}: {len(prog.instructions)} instructions, "
        f"{sum(layer['chains'] for layer in man['layers'])} chains, "
        f"{man['dram_bytes_needed'] / 2**20:.2f} MiB DRAM needed of "
        f"{cfg.dram_bytes / 2**20:.0f} MiB ({cfg.name}), compiled in {dt:.1f} s"
    )
    return 0
