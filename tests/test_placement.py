"""The placed-design reading behind ``tessera synth --no-route``: tiles from nextpnr's
placed JSON mapped onto the yosys netlist, long connections, the placed Fmax estimate."""

from pathlib import Path

from netlists import cell

from tessera.hdl.placement import (
    cell_tiles,
    format_long_connections,
    long_connections,
    placed_route_ps,
    predicted_route_ps,
    routed_route_ps,
)
from tessera.hdl.synth import _log_placed_fmax
from tessera.hdl.timing import estimate


def _netlist() -> dict:
    # reg_a drives a LUT next to it and a far one; a far FF is clocked by net 9 (a clock
    # pin: not a data connection, however long)
    cells = {
        "reg_a": cell("TRELLIS_FF", Q=("output", [2]), CLK=("input", [9])),
        "near_lut": cell("LUT4", A=("input", [2]), Z=("output", [3])),
        "far_lut": cell("LUT4", A=("input", [2]), Z=("output", [4])),
        "clk_buf": cell("LUT4", A=("input", [5]), Z=("output", [9])),
        "far_ff": cell("TRELLIS_FF", DI=("input", [3]), CLK=("input", [9]), Q=("output", [8])),
    }
    netnames = {
        "reg_a": {"bits": [2], "hide_name": 0},
        "clk": {"bits": [9], "hide_name": 0},
        "n3": {"bits": [3], "hide_name": 0},
    }
    return {"modules": {"npu": {"cells": cells, "netnames": netnames}}}


def _placed(tiles: dict[str, tuple[int, int]]) -> dict:
    cells = {
        name: {"attributes": {"NEXTPNR_BEL": f"X{x}/Y{y}/SLICEA"}} for name, (x, y) in tiles.items()
    }
    cells["merged_away"] = {"attributes": {}}
    return {"modules": {"top": {"cells": cells}}}


def test_tiles_come_from_the_bel_names():
    tiles = cell_tiles(_placed({"reg_a": (12, 34)}))
    assert tiles == {"reg_a": (12, 34)}


def test_long_connections_measure_driver_to_farthest_reader():
    tiles = cell_tiles(
        _placed(
            {
                "reg_a": (0, 0),
                "near_lut": (3, 4),
                "far_lut": (40, 20),
                "clk_buf": (0, 1),
                "far_ff": (80, 80),
            }
        )
    )
    conns = long_connections(_netlist(), tiles, min_span=50)
    # reg_a -> far_lut is 60 tiles; near_lut -> far_ff is 153; the clock net reaches
    # far_ff's CLK 159 tiles away but is a clock pin
    assert [(c.net, c.span, c.fanout) for c in conns] == [("n3", 153, 1), ("reg_a", 60, 2)]
    assert conns[1].median_span == 60 and conns[1].driver_tile == (0, 0)
    assert long_connections(_netlist(), tiles, min_span=154) == []
    text = format_long_connections(conns, 50)
    assert text.startswith("2 nets reach a reader 50 or more tiles")
    assert "reg_a" in text and "n3" in text


def test_placed_fmax_is_the_last_estimate_per_clock(tmp_path: Path):
    log = tmp_path / "nextpnr.log"
    log.write_text(
        "Info: Max frequency for clock '$glbnet$clk': 20.10 MHz (FAIL at 100.00 MHz)\n"
        "Info: Running simulated annealing placer for refinement.\n"
        "Info: Max frequency for clock '$glbnet$clk': 30.50 MHz (FAIL at 100.00 MHz)\n"
    )
    assert _log_placed_fmax(log) == {"clk": 30.5}


def test_placed_route_prices_follow_nextpnrs_estimate():
    assert predicted_route_ps(0, 0) == 120 * 3
    assert predicted_route_ps(5, 5) == 120 * (3 + 2 * 10)
    # across the chip: 19 ns, two periods at 100 MHz
    assert predicted_route_ps(140, 0) == 120 * (3 + 135 + 2 * 5)
    route = placed_route_ps({"a": (0, 0), "b": (10, 3)})
    assert route("a", "b") == predicted_route_ps(10, 3)
    assert route(None, "b") == route("a", "merged") == predicted_route_ps(1, 1)


def _routed_report() -> dict:
    # nextpnr's detailed net timings (ns): reg_a reaches far_lut over a long route, and
    # near_lut's net reaches far_ff; "fa$CCU2_COMB1" is half of a carry cell nextpnr split
    def net(driver: str, *ends: tuple[str, float]) -> dict:
        endpoints = [{"cell": c, "port": "A", "delay": [ns / 2, ns]} for c, ns in ends]
        return {"driver": driver, "port": "Q", "net": driver, "endpoints": endpoints}

    return {
        "detailed_net_timings": [
            net("reg_a", ("near_lut", 0.4), ("far_lut", 6.0)),
            net("near_lut", ("far_ff", 3.5)),
            net("fa$CCU2_COMB1", ("far_ff", 1.0)),
        ]
    }


def test_routed_prices_are_nextpnrs_routed_delays():
    route, pairs = routed_route_ps(_routed_report(), lambda _d, _r: 123.0)
    assert pairs == 4
    assert route("reg_a", "far_lut") == 6000.0
    assert route("reg_a", "near_lut") == 400.0
    assert route("fa", "far_ff") == 1000.0  # the split carry cell under its yosys name
    assert route("near_lut", "reg_a") == route(None, "far_ff") == 123.0  # not routed: fallback


def test_routed_estimate_ranks_the_slow_route_first():
    route, _ = routed_route_ps(_routed_report(), lambda _d, _r: 0.0)
    est = estimate(_netlist(), period_ns=4.0, route_ps=route)
    # reg_a (0.4 clock-to-out) -> 0.4 -> near_lut (0.15) -> 3.5 -> far_ff (0.1 set-up)
    assert est.failing == 1
    assert abs(est.worst_ns - (0.4 + 0.4 + 0.15 + 3.5 + 0.1)) < 1e-9
