"""The placed-design reading behind ``tessera synth --no-route``: tiles from nextpnr's
placed JSON mapped onto the yosys netlist, long connections, the placed Fmax estimate."""

from pathlib import Path

from netlists import cell

from tessera.hdl.placement import (
    cell_tiles,
    format_long_connections,
    format_routed_groups,
    long_connections,
    placed_route_ps,
    predicted_route_ps,
    routed_groups,
)
from tessera.hdl.synth import _log_placed_fmax


def _netlist() -> dict:
    # reg_a drives a LUT next to it and a far one; a far FF is clocked by net 9 (a clock
    # pin: not a data connection, however long)
    cells = {
        "reg_a": cell("TRELLIS_FF", Q=("output", [2]), CLK=("input", [9])),
        "near_lut": cell("LUT4", A=("input", [2]), Z=("output", [3])),
        "far_lut": cell("LUT4", A=("input", [2]), Z=("output", [4])),
        "clk_buf": cell("LUT4", A=("input", [5]), Z=("output", [9])),
        "far_ff": cell("TRELLIS_FF", DI=("input", [3]), CLK=("input", [9])),
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


def test_routed_groups_take_nextpnrs_arrival_per_endpoint():
    # detailed net timings: per net, the routed arrival (ns) at each endpoint it reaches
    def net(name: str, *ends: tuple[str, str, float]) -> dict:
        endpoints = [{"cell": c, "port": p, "delay": [ns / 2, ns]} for c, p, ns in ends]
        return {"driver": f"{name}_LUT4_Z", "port": "F", "net": name, "endpoints": endpoints}

    report = {
        "detailed_net_timings": [
            net("a_next", ("acc_TRELLIS_FF_Q_1", "DI", 12.5), ("acc_TRELLIS_FF_Q_2", "DI", 9.0)),
            net("b_en", ("acc_TRELLIS_FF_Q_3", "CE", 11.0)),
            net("addr_LUT4_Z", ("vrf.1.7", "ADB13", 14.0), ("vrf.0.2", "ADB9", 10.5)),
            net("fine", ("other_TRELLIS_FF_Q", "DI", 3.0)),
        ]
    }
    groups, total = routed_groups(report, period_ns=10.0)
    assert total == 6
    assert [(g.name, g.worst_ns, g.over, g.endpoints) for g in groups] == [
        ("vrf.#.# ADB#", 14.0, 2, 2),  # block RAM address pins, one group
        ("acc", 12.5, 2, 3),  # the flip-flops of one register, whichever pin
        ("other", 3.0, 0, 1),
    ]
    assert groups[0].net == "addr"  # the worst endpoint's net, without yosys' cell path
    text = format_routed_groups(groups, total, 10.0)
    assert text.splitlines()[0].endswith("worst 14.00 ns; 4 of 6 endpoints over 10.0 ns")
    assert "acc  <- a_next" in text and "other" not in text
