"""What placement stretched: connections whose driver and reader nextpnr put far apart.

nextpnr's ``--report`` lists critical paths only after routing, and routing the 85F build
does not finish within a session; its placed design (``--write`` after ``--no-route``)
does give every cell's tile. On the 85F, routing delay grows with distance, and the
placed estimate's slowest endpoints sit behind connections that cross much of the chip,
so this maps the placed tiles back onto the yosys netlist (nextpnr keeps yosys' cell
names for the cells it does not merge) and lists those connections, grouped by the
register family or memory port that drives them: what to pipeline or floorplan next.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from dataclasses import dataclass

from tessera.hdl.timing import CLOCK_PORTS, group_name, net_drivers, net_names, source_name

_TILE = re.compile(r"X(\d+)/Y(\d+)/")


@dataclass(frozen=True)
class LongConnection:
    """A net whose driver and farthest reader are ``span`` tiles apart (Manhattan)."""

    span: int
    fanout: int
    median_span: int
    net: str
    driver_type: str
    driver_tile: tuple[int, int]


def cell_tiles(placed: dict) -> dict[str, tuple[int, int]]:
    """Cell name -> (x, y) tile from a placed nextpnr JSON (the ``NEXTPNR_BEL`` attribute)."""
    tiles = {}
    for module in placed["modules"].values():
        for name, cell in module["cells"].items():
            bel = cell.get("attributes", {}).get("NEXTPNR_BEL", "")
            m = _TILE.match(bel)
            if m:
                tiles[name] = (int(m.group(1)), int(m.group(2)))
    return tiles


#: Picoseconds per unit of nextpnr-ecp5's placement-time delay estimate, speed grade 6
#: (``Arch::predictDelay``: 120 - 22 x the grade index).
PREDICT_UNIT_PS = 120


def predicted_route_ps(dx: int, dy: int) -> int:
    """nextpnr-ecp5's estimate of a connection spanning ``dx`` x ``dy`` tiles before it is
    routed: the first 5 tiles each way cost 2 units, every further tile 1, plus 3. A
    connection across 140 tiles is about 19 ns: a 100 MHz design cannot have one."""
    near = min(dx, 5) + min(dy, 5)
    return PREDICT_UNIT_PS * (3 + max(dx - 5, 0) + max(dy - 5, 0) + 2 * near)


def placed_route_ps(tiles: dict[str, tuple[int, int]]) -> Callable[[str | None, str], float]:
    """A ``route_ps`` for :func:`tessera.hdl.timing.estimate` from placed tiles; a cell
    nextpnr merged away (no tile of its own) is priced as a neighbour's connection."""
    unknown = predicted_route_ps(1, 1)

    def route(driver: str | None, reader: str) -> float:
        a = tiles.get(driver) if driver is not None else None
        b = tiles.get(reader)
        if a is None or b is None:
            return unknown
        return predicted_route_ps(abs(a[0] - b[0]), abs(a[1] - b[1]))

    return route


def long_connections(
    netlist: dict, tiles: dict[str, tuple[int, int]], min_span: int, top: str = "npu"
) -> list[LongConnection]:
    """Nets of ``netlist`` (yosys JSON) reaching a reader ``min_span`` or more tiles from
    their driver, longest first. Clock pins and cells without a tile are left out."""
    module = netlist["modules"][top]
    cells = module["cells"]
    names = net_names(module)
    driver = net_drivers(cells)
    readers: dict[int, list[str]] = collections.defaultdict(list)
    for cname, cell in cells.items():
        for port, bits in cell["connections"].items():
            if cell["port_directions"].get(port) == "output" or port in CLOCK_PORTS:
                continue
            for b in bits:
                if isinstance(b, int):
                    readers[b].append(cname)
    found = []
    for b, cnames in readers.items():
        src = driver.get(b)
        if src not in tiles:
            continue
        x, y = tiles[src]
        spans = sorted(abs(x - tiles[c][0]) + abs(y - tiles[c][1]) for c in cnames if c in tiles)
        if spans and spans[-1] >= min_span:
            found.append(
                LongConnection(
                    spans[-1],
                    len(cnames),
                    spans[len(spans) // 2],
                    names.get(b, f"net {b}"),
                    cells[src]["type"],
                    (x, y),
                )
            )
    found.sort(key=lambda c: (-c.span, c.net))
    return found


def format_long_connections(conns: list[LongConnection], min_span: int, top: int = 40) -> str:
    """Families of long connections (most nets first), then the longest nets."""
    families: dict[str, list[LongConnection]] = collections.defaultdict(list)
    for c in conns:
        # every index folded: one family per register array or memory port kind
        families[re.sub(r"\d+", "#", group_name(c.net))].append(c)
    lines = [
        f"{len(conns)} nets reach a reader {min_span} or more tiles from their driver "
        "(nextpnr placement, Manhattan distance in tiles)",
        "",
        f"{'nets':>6s} {'longest':>8s}  family",
    ]
    ranked = sorted(families.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    for name, members in ranked[:top]:
        lines.append(f"{len(members):6d} {max(c.span for c in members):8d}  {name}")
    lines += ["", f"{'span':>5s} {'fanout':>7s} {'median':>7s}  {'driver':11s} {'at':10s} net"]
    for c in conns[:top]:
        at = f"{c.driver_tile[0]},{c.driver_tile[1]}"
        lines.append(
            f"{c.span:5d} {c.fanout:7d} {c.median_span:7d}  {c.driver_type:11s} {at:10s} {c.net}"
        )
    return "\n".join(lines)


#: Data pins of a flip-flop (its memory and DSP peers have named, indexed data pins).
_FF_PINS = ("DI", "M", "CE", "LSR")


@dataclass(frozen=True)
class RoutedGroup:
    """Endpoints of one register family or memory / DSP port kind after routing."""

    name: str
    worst_ns: float
    over: int  # endpoints whose arrival exceeds the period
    endpoints: int
    net: str  # the net into the worst endpoint


def routed_groups(report: dict, period_ns: float) -> tuple[list[RoutedGroup], int]:
    """Every endpoint's routed arrival, grouped, slowest group first; and the number of
    endpoints. nextpnr's ``--detailed-timing-report`` gives, per net, the arrival time at
    each timing endpoint it reaches (the worst path into that pin, routed), where its
    report and log name only the critical path."""
    groups: dict[str, list] = {}
    total = 0
    for net in report.get("detailed_net_timings", []):
        for end in net["endpoints"]:
            total += 1
            ns = float(end["delay"][1])
            name = group_name(end["cell"])
            if end["port"] not in _FF_PINS:  # one group per memory / DSP kind and port
                name = re.sub(r"\d+", "#", f"{end['cell']} {end['port']}")
            g = groups.setdefault(name, [0.0, 0, 0, ""])
            if ns > g[0]:
                g[0], g[3] = ns, net["net"]
            g[1] += ns > period_ns
            g[2] += 1
    found = [RoutedGroup(k, w, o, n, source_name(net)) for k, (w, o, n, net) in groups.items()]
    found.sort(key=lambda g: (-g.worst_ns, g.name))
    return found, total


def format_routed_groups(
    groups: list[RoutedGroup], total: int, period_ns: float, top: int = 60
) -> str:
    """The endpoint groups over the period, slowest first."""
    over = sum(g.over for g in groups)
    worst = groups[0].worst_ns if groups else 0.0
    lines = [
        f"routed arrival at each endpoint (nextpnr --detailed-timing-report): worst "
        f"{worst:.2f} ns; {over} of {total} endpoints over {period_ns:.1f} ns",
        "",
        f"{'worst':>7s} {'over':>6s} {'of':>6s}  group  <- net into the worst endpoint",
    ]
    for g in [g for g in groups if g.over][:top]:
        lines.append(f"{g.worst_ns:7.2f} {g.over:6d} {g.endpoints:6d}  {g.name}  <- {g.net}")
    return "\n".join(lines)
