"""A quick delay estimate of a synthesized ECP5 netlist: register-to-register paths grouped
by the signal they end in, deepest first, seconds after yosys.

nextpnr takes about an hour to place and route the 85F build on this machine, and its report
names one critical path; pipelining work needs the *list* of slow paths after every change.
This walks yosys' JSON netlist (``synth_ecp5 -json``) once: every cell output's arrival is
the latest input arrival plus the cell's delay plus a constant per routed connection (carry
chains and the wide-function muxes' data inputs are dedicated wires), starting at the
registers' clock-to-output. The delays are
rough unit figures, not the device's timing model; routing dominates on the 85F and is far
from constant, so the figures rank paths and show which fixes helped, they are not an
Fmax (nextpnr's placed estimate has been 1.6 - 1.8 times the worst path here).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from dataclasses import dataclass, field

#: Picoseconds per routed connection between cells.
ROUTE_PS = 700
#: Combinational cells: inputs, outputs, delay in ps.
COMB_CELLS = {
    "LUT4": (("A", "B", "C", "D"), ("Z",), 150),
    "PFUMX": (("ALUT", "BLUT", "C0"), ("Z",), 150),
    "L6MUX21": (("D0", "D1", "SD"), ("Z",), 150),
}
#: Clock-to-output of the sequential cells (nextpnr's figures for speed grade 6: a block
#: RAM port without its output register 5.8 ns, with it 0.96 ns) ...
CLOCK_TO_OUT_PS = {"TRELLIS_FF": 400, "DP16KD": 5800, "MULT18X18D": 1000, "TRELLIS_DPR16X4": 400}
DP16KD_OUTREG_PS = 960
#: ... and their set-up time.
SETUP_PS = {"TRELLIS_FF": 100, "DP16KD": 200, "MULT18X18D": 200, "TRELLIS_DPR16X4": 200}
#: A MULT18X18D with none of its registers (what yosys infers for a multiply in logic)
#: passes A / B to P combinationally: a rough figure for the array, of the order of the
#: registered one's clock-to-output plus a few LUT levels.
MULT_COMB_PS = 4000
_MULT_REGS = ("REG_INPUTA_CLK", "REG_INPUTB_CLK", "REG_PIPELINE_CLK", "REG_OUTPUT_CLK")
_CARRY_IN = "CIN"
#: Inputs fed by a dedicated wire inside the slice, like the carry chain: a wide function's
#: muxes take the LUT4 outputs of their own slice (PFUMX) and the PFUMX outputs beside
#: them (L6MUX21); only their selects are routed.
_DEDICATED_INPUTS = {("PFUMX", "ALUT"), ("PFUMX", "BLUT"), ("L6MUX21", "D0"), ("L6MUX21", "D1")}
#: Clock pins of the sequential cells (not data inputs of a path).
CLOCK_PORTS = ("CLK", "CLKA", "CLKB", "CLK0", "CLK1", "CLK2", "CLK3", "WCK")


def _registered_port(cell: dict, port: str) -> bool:
    """A DP16KD data output (``DOA*`` / ``DOB*``) whose port has its output register."""
    if not port.startswith("DO"):
        return False
    return cell["parameters"].get(f"REGMODE_{port[2]}", "NOREG").strip() == "OUTREG"


def _combinational_mult(cell: dict) -> bool:
    """A MULT18X18D without any register: a combinational cell, not a path's start or end."""
    if cell["type"] != "MULT18X18D":
        return False
    return all(cell["parameters"].get(p, "NONE").strip() == "NONE" for p in _MULT_REGS)


def _arcs(cell: dict) -> list[tuple[str, str, int]]:
    """(input port, output port, delay ps) of a combinational cell."""
    cell_type = cell["type"]
    if _combinational_mult(cell):
        ports = cell["connections"]
        ins = [p for p in ports if p[0] in "AB" and p[1:].isdigit()]
        outs = [p for p in ports if p[0] == "P" and p[1:].isdigit()]
        return [(i, o, MULT_COMB_PS) for i in ins for o in outs]
    if cell_type in COMB_CELLS:
        ins, outs, delay = COMB_CELLS[cell_type]
        return [(i, o, delay) for i in ins for o in outs]
    if cell_type == "CCU2C":  # two bits of a carry chain
        arcs = [(i, o, 300) for i in ("A0", "B0", "C0", "D0") for o in ("S0", "COUT")]
        arcs += [(i, "S1", 350) for i in ("A0", "B0", "C0", "D0")]
        arcs += [(i, o, 300) for i in ("A1", "B1", "C1", "D1") for o in ("S1", "COUT")]
        return [*arcs, (_CARRY_IN, "S0", 250), (_CARRY_IN, "S1", 280), (_CARRY_IN, "COUT", 60)]
    if cell_type == "TRELLIS_DPR16X4":  # distributed RAM: the read is combinational
        return [("RAD", "DO", 400)]
    return []


@dataclass
class PathGroup:
    """The endpoints whose register names differ only in indices, with their worst path."""

    name: str
    worst_ns: float
    failing: int  # endpoints of the group over the period
    path: list[tuple[str, str, float]] = field(default_factory=list)  # (cell, net, ns)


@dataclass
class TimingEstimate:
    period_ns: float
    endpoints: int
    failing: int
    worst_ns: float
    groups: list[PathGroup]


def net_names(module: dict) -> dict[int, str]:
    """A readable name per net bit: a user-visible one if there is, else the shortest."""
    names: dict[int, str] = {}
    for name, info in module["netnames"].items():
        bits = info["bits"]
        visible = not info.get("hide_name", 0)
        for i, b in enumerate(bits):
            if not isinstance(b, int):
                continue
            label = f"{name}[{i}]" if len(bits) > 1 else name
            old = names.get(b)
            if old is None or (visible and (old.startswith("$") or len(label) < len(old))):
                names[b] = label
    return names


def net_drivers(cells: dict) -> dict[int, str]:
    """The cell driving each net bit of a yosys module's ``cells``."""
    driver: dict[int, str] = {}
    for cname, cell in cells.items():
        for port, bits in cell["connections"].items():
            if cell["port_directions"].get(port) == "output":
                driver.update((b, cname) for b in bits if isinstance(b, int))
    return driver


def source_name(name: str) -> str:
    """A mapped net's name without the cell path yosys appends (``x_LUT4_Z_...`` -> ``x``)."""
    return re.sub(r"_(TRELLIS_FF|LUT4|CCU2C|PFUMX|L6MUX21|DP16KD|MULT18X18D)\S*", "", name)


def group_name(name: str) -> str:
    """``chain.vec.mv3_6[2]`` -> ``chain.vec.mv3_#``: one group per register array."""
    return re.sub(r"\d+$", "#", re.sub(r"\[\d+\]", "", source_name(name)))


def estimate(
    netlist: dict,
    period_ns: float,
    top: str = "npu",
    route_ps: Callable[[str | None, str], float] | None = None,
) -> TimingEstimate:
    """Arrival times over ``netlist`` (yosys JSON) and the endpoint groups over the period.

    ``route_ps(driver cell, reading cell)`` prices a connection (the driver is None for a
    top-level input); by default each costs :data:`ROUTE_PS`, before placement says how
    far apart the two are (:func:`tessera.hdl.placement.placed_route_ps`).
    """
    hop_ps = route_ps or (lambda _driver, _reader: ROUTE_PS)
    module = netlist["modules"][top]
    cells = module["cells"]
    names = net_names(module)
    driver = net_drivers(cells)

    arrival: dict[int, float] = {}
    came_from: dict[int, tuple[int, str]] = {}
    for cell in cells.values():
        t = cell["type"]
        if t not in CLOCK_TO_OUT_PS or _combinational_mult(cell):
            continue
        for port, bits in cell["connections"].items():
            # a distributed RAM's read data is combinational from its read address
            if cell["port_directions"].get(port) == "output" and (t, port) != (
                "TRELLIS_DPR16X4",
                "DO",
            ):
                ps = CLOCK_TO_OUT_PS[t]
                if t == "DP16KD" and _registered_port(cell, port):
                    ps = DP16KD_OUTREG_PS
                arrival.update((b, ps) for b in bits if isinstance(b, int))

    # Cells in topological order: a cell is ready once every combinational driver of its
    # timed inputs is done (Kahn's algorithm).
    arcs = {c: _arcs(cell) for c, cell in cells.items()}
    arcs = {c: a for c, a in arcs.items() if a}
    timed_inputs = {
        c: {b for i, _, _ in a for b in cells[c]["connections"].get(i, []) if isinstance(b, int)}
        for c, a in arcs.items()
    }
    # A cell waits for each of its timed input bits that a combinational cell drives, once
    # per bit even where the bit reaches several of its ports.
    readers: dict[int, list[str]] = collections.defaultdict(list)
    waiting: dict[str, int] = {}
    for c, bits in timed_inputs.items():
        comb_bits = [b for b in bits if driver.get(b) in arcs]
        waiting[c] = len(comb_bits)
        for b in comb_bits:
            readers[b].append(c)
    ready = collections.deque(c for c, n in waiting.items() if n == 0)
    while ready:
        cname = ready.popleft()
        conns = cells[cname]["connections"]
        for port_in, port_out, delay in arcs[cname]:
            dedicated = port_in == _CARRY_IN or (cells[cname]["type"], port_in) in _DEDICATED_INPUTS
            for b_in in conns.get(port_in, []):
                if not isinstance(b_in, int):
                    continue
                hop = 0 if dedicated else hop_ps(driver.get(b_in), cname)
                t = arrival.get(b_in, 0.0) + hop + delay
                for b_out in conns.get(port_out, []):
                    if isinstance(b_out, int) and t > arrival.get(b_out, -1.0):
                        arrival[b_out] = t
                        came_from[b_out] = (b_in, cname)
        for port_out in {o for _, o, _ in arcs[cname]}:
            for b_out in conns.get(port_out, []):
                for reader in readers.get(b_out, []) if isinstance(b_out, int) else []:
                    waiting[reader] -= 1
                    if waiting[reader] == 0:
                        ready.append(reader)

    ends: list[tuple[float, str, int]] = []
    for cname, cell in cells.items():
        t = cell["type"]
        if t not in SETUP_PS or _combinational_mult(cell):
            continue
        for port, bits in cell["connections"].items():
            if cell["port_directions"].get(port) != "input" or port in CLOCK_PORTS:
                continue
            if (t, port) == ("TRELLIS_DPR16X4", "RAD"):
                continue
            for b in bits:
                if isinstance(b, int) and b in arrival:
                    hop = hop_ps(driver.get(b), cname)
                    ends.append(((arrival[b] + hop + SETUP_PS[t]) / 1000, cname, b))
    ends.sort(key=lambda e: -e[0])

    def endpoint_name(cname: str, b: int) -> str:
        cell = cells[cname]
        if cell["type"] == "TRELLIS_FF":
            return names.get(cell["connections"]["Q"][0], cname)
        return f"{names.get(b, cname)} ({cell['type']})"

    def trace(b: int) -> list[tuple[str, str, float]]:
        steps = []
        while b in came_from:
            b_in, cname = came_from[b]
            steps.append((cells[cname]["type"], names.get(b, "?"), arrival[b] / 1000))
            b = b_in
        src = driver.get(b)
        first = cells[src]["type"] if src else "input"
        steps.append((first, names.get(b, "?"), arrival.get(b, 0.0) / 1000))
        return steps[::-1]

    groups: dict[str, PathGroup] = {}
    for ns, cname, b in ends:
        key = group_name(endpoint_name(cname, b))
        g = groups.get(key)
        if g is None:
            g = groups[key] = PathGroup(key, ns, 0, trace(b))
        g.failing += ns > period_ns
    failing = sum(1 for ns, _, _ in ends if ns > period_ns)
    return TimingEstimate(
        period_ns, len(ends), failing, ends[0][0] if ends else 0.0, list(groups.values())
    )


def format_estimate(
    est: TimingEstimate, top: int = 30, routes: str = "0.7 ns per connection, before placement"
) -> str:
    """The worst ``top`` endpoint groups over the period, each with its worst path;
    ``routes`` says how connections were priced."""
    lines = [
        f"estimated delay (unit cell delays, {routes}): worst "
        f"{est.worst_ns:.1f} ns; {est.failing} of {est.endpoints} endpoints over "
        f"{est.period_ns:.1f} ns"
    ]
    for g in [g for g in est.groups if g.worst_ns > est.period_ns][:top]:
        lines.append(f"\n{g.worst_ns:6.1f} ns  {g.failing:5d} over  {g.name}")
        last = None
        for cell_type, net, ns in g.path:
            short = source_name(net)
            if short == last:  # along a carry chain or inside one signal's logic
                continue
            last = short
            lines.append(f"    {ns:6.1f}  {cell_type:10s} {short}")
    return "\n".join(lines)
