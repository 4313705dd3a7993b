"""The MVU floorplan (``hdl/floorplan.py``) on a yosys-shaped netlist of the 85F's MVU:
each lane's DSPs in one DSP row in product order, each weight block RAM on the block RAM
row beside the DSPs it feeds, everything else left to nextpnr (no tools needed)."""

import re

import pytest

from tessera.hdl.floorplan import GEOMETRY, apply_floorplan, format_floorplan, mvu_floorplan

pytestmark = pytest.mark.rtl

LANES, N, SLICES, DEPTH = 8, 16, 4, 3  # the 85F: 16 DSPs and 4 x 3 weight block RAMs a lane


def _cell(kind, ins, outs):
    conns = {
        **{f"I{i}": [b] for i, b in enumerate(ins)},
        **{f"O{i}": [b] for i, b in enumerate(outs)},
    }
    dirs = {
        **{f"I{i}": "input" for i in range(len(ins))},
        **{f"O{i}": "output" for i in range(len(outs))},
    }
    return {"type": kind, "connections": conns, "port_directions": dirs, "attributes": {}}


def _mvu_netlist():
    """Tile block RAMs (4 bytes wide, 3 deep) -> depth mux -> two registers -> DSPs; an
    activation RAM through registers into every lane; shift RAMs into plain registers."""
    cells, nxt = {}, iter(range(10, 10**6))
    for lane in range(LANES):
        for k in range(N):
            b = next(nxt)
            cells[f"chain.mvu.mul{lane}_{k}.dsp"] = _cell("MULT18X18D", [b], [next(nxt)])
            cells[f"chain.mvu.w_lane{lane}.ff{k}"] = _cell("TRELLIS_FF", [next(nxt)], [b])
        for s in range(SLICES):
            mux_outs = [next(nxt) for _ in range(4)]
            for j, k in enumerate(range(4 * s, 4 * s + 4)):
                w_lane_in = cells[f"chain.mvu.w_lane{lane}.ff{k}"]["connections"]["I0"][0]
                cells[f"chain.mvu.w_first{lane}.ff{k}"] = _cell(
                    "TRELLIS_FF", [mux_outs[j]], [w_lane_in]
                )
            ram_outs = [[next(nxt) for _ in range(4)] for _ in range(DEPTH)]
            for d in range(DEPTH):
                cells[f"tiles.0.{(d * LANES + lane) * SLICES + s}"] = _cell(
                    "DP16KD", [1], ram_outs[d]
                )
            for j in range(4):
                cells[f"mux{lane}_{s}_{j}"] = _cell("LUT4", [r[j] for r in ram_outs], [mux_outs[j]])
    act = [next(nxt) for _ in range(LANES)]
    cells["act_mant.0.0"] = _cell("DP16KD", [2], act)
    for lane in range(LANES):
        a = cells[f"chain.mvu.mul{lane}_0.dsp"]
        a["connections"]["I1"], a["port_directions"]["I1"] = [act[lane]], "input"
    cells["tiles.0.200"] = _cell("DP16KD", [3], [next(nxt)])
    cells["chain.mvu.sh0_0"] = _cell(
        "TRELLIS_FF", [cells["tiles.0.200"]["connections"]["O0"][0]], [next(nxt)]
    )
    return {"modules": {"npu": {"cells": cells}}}


def _xy(bel):
    x, y = re.match(r"X(\d+)/Y(\d+)/", bel).groups()
    return int(x), int(y)


def test_lanes_get_their_dsps_and_weight_rams_side_by_side():
    netlist = _mvu_netlist()
    bels = mvu_floorplan(netlist, "LFE5U-85F")
    assert len(set(bels.values())) == len(bels)  # no site twice
    rows = set()
    for lane in range(LANES):
        sites = [_xy(bels[f"chain.mvu.mul{lane}_{k}.dsp"]) for k in range(N)]
        assert len({y for _, y in sites}) == 1, lane  # one DSP row
        xs = [x for x, _ in sites]
        assert xs == sorted(xs) and xs[-1] - xs[0] < 40, (lane, xs)  # product order, compact
        dsp_y = sites[0][1]
        rows.add((dsp_y, xs[0]))
        for s in range(SLICES):
            fed = sum(xs[4 * s : 4 * s + 4]) / 4
            for d in range(DEPTH):
                bel = bels[f"tiles.0.{(d * LANES + lane) * SLICES + s}"]
                assert re.fullmatch(r"X\d+/Y\d+/EBR[0-3]", bel)
                x, y = _xy(bel)
                assert abs(y - dsp_y) == 12 and abs(x - fed) <= 6, (lane, s, d, bel, fed)
    assert len(rows) == LANES
    # the activation RAM feeds every lane and the shift RAM no DSP: nextpnr places them
    assert "act_mant.0.0" not in bels and "tiles.0.200" not in bels
    assert len(bels) == LANES * (N + SLICES * DEPTH)
    apply_floorplan(netlist, bels)
    cells = netlist["modules"]["npu"]["cells"]
    assert cells["chain.mvu.mul3_5.dsp"]["attributes"]["BEL"] == bels["chain.mvu.mul3_5.dsp"]
    assert "BEL" not in cells["act_mant.0.0"]["attributes"]
    assert format_floorplan(bels).startswith(f"{len(bels)} cells pinned")


def test_no_floorplan_without_a_geometry_or_room():
    assert "LFE5U-25F" not in GEOMETRY
    assert mvu_floorplan(_mvu_netlist(), "LFE5U-25F") == {}
    netlist = _mvu_netlist()  # a ninth lane: more lanes than the 85F has slots
    cells = netlist["modules"]["npu"]["cells"]
    cells["chain.mvu.mul8_0.dsp"] = _cell("MULT18X18D", [5], [6])
    assert mvu_floorplan(netlist, "LFE5U-85F") == {}
