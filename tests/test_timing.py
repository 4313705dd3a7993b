"""The netlist delay estimate (``hdl/timing.py``) on a hand-made yosys netlist: arrival
times add up as documented, carry chains cost no routing hop, endpoints group by register."""

from netlists import cell

from tessera.hdl import timing


def _netlist() -> dict:
    """acc[0] -> LUT4 -> CCU2C (A0 -> COUT) -> CCU2C (CIN -> S0) -> acc[1]; and short
    paths acc[0] -> acc[2] -> acc[0] (other bits of the same register array)."""
    i, o = "input", "output"
    cells = {
        "ff0": cell("TRELLIS_FF", CLK=(i, [1]), DI=(i, [7]), Q=(o, [2])),
        "lut": cell("LUT4", A=(i, [2]), B=(i, ["0"]), C=(i, ["0"]), D=(i, ["0"]), Z=(o, [3])),
        "c0": cell("CCU2C", A0=(i, [3]), CIN=(i, ["0"]), S0=(o, [8]), COUT=(o, [4])),
        "c1": cell("CCU2C", A0=(i, ["0"]), CIN=(i, [4]), S0=(o, [5]), COUT=(o, [9])),
        "ff1": cell("TRELLIS_FF", CLK=(i, [1]), DI=(i, [5]), Q=(o, [6])),
        "ff2": cell("TRELLIS_FF", CLK=(i, [1]), DI=(i, [2]), Q=(o, [7])),
    }
    names = {"clk": [1], "acc": [2, 6, 7], "sum": [3], "carry": [4], "s": [5], "x": [8, 9]}
    netnames = {k: {"bits": v, "hide_name": 0} for k, v in names.items()}
    return {"modules": {"npu": {"cells": cells, "netnames": netnames}}}


def test_arrival_adds_cell_and_route_delays_and_carry_chains_are_free():
    est = timing.estimate(_netlist(), period_ns=3.0)
    # clk->Q 400, hop 700 + LUT 150, hop 700 + A0->COUT 300, CIN->S0 250 (no hop),
    # hop 700 + set-up 100
    assert est.worst_ns == (400 + 700 + 150 + 700 + 300 + 250 + 700 + 100) / 1000
    assert est.endpoints == 3 and est.failing == 1
    (group,) = est.groups
    assert group.name == "acc" and group.failing == 1
    assert [cell for cell, _, _ in group.path] == ["TRELLIS_FF", "LUT4", "CCU2C", "CCU2C"]
    text = timing.format_estimate(est)
    assert "worst 3.3 ns; 1 of 3 endpoints over 3.0 ns" in text


def test_nothing_over_a_long_period():
    est = timing.estimate(_netlist(), period_ns=10.0)
    assert est.failing == 0
    assert len(timing.format_estimate(est).splitlines()) == 1  # no path groups listed


def test_connections_can_be_priced_per_driver_and_reader():
    # the hop into ff1 (from c1) costs 5 ns, every other connection 0.1 ns; carries stay free
    def route_ps(driver: str | None, reader: str) -> float:
        return 5000 if (driver, reader) == ("c1", "ff1") else 100

    est = timing.estimate(_netlist(), period_ns=3.0, route_ps=route_ps)
    assert est.worst_ns == (400 + 100 + 150 + 100 + 300 + 250 + 5000 + 100) / 1000
    text = timing.format_estimate(est, routes="test prices")
    assert text.startswith("estimated delay (unit cell delays, test prices): worst 6.4 ns")


def _mult_netlist(**params: str) -> dict:
    """ff0 -> MULT18X18D (A0 -> P0) -> ff1, the multiplier with ``params``."""
    i, o = "input", "output"
    mult = cell("MULT18X18D", A0=(i, [2]), B0=(i, ["0"]), CLK0=(i, [1]), P0=(o, [3]))
    mult["parameters"] = params
    cells = {
        "ff0": cell("TRELLIS_FF", CLK=(i, [1]), DI=(i, ["0"]), Q=(o, [2])),
        "mul": mult,
        "ff1": cell("TRELLIS_FF", CLK=(i, [1]), DI=(i, [3]), Q=(o, [4])),
    }
    names = {"clk": [1], "a": [2], "p": [3], "q": [4]}
    netnames = {k: {"bits": v, "hide_name": 0} for k, v in names.items()}
    return {"modules": {"npu": {"cells": cells, "netnames": netnames}}}


def test_a_multiplier_without_registers_is_logic_on_the_path():
    est = timing.estimate(_mult_netlist(), period_ns=3.0)
    # clk->Q 400, hop 700 + the array, hop 700 + set-up 100; the multiplier is no endpoint
    assert est.worst_ns == (400 + 700 + timing.MULT_COMB_PS + 700 + 100) / 1000
    assert est.endpoints == 1
    (group,) = est.groups
    assert [c for c, _, _ in group.path] == ["TRELLIS_FF", "MULT18X18D"]


def test_a_registered_multiplier_starts_and_ends_paths():
    regs = {"REG_INPUTA_CLK": "CLK0", "REG_OUTPUT_CLK": "CLK0"}
    est = timing.estimate(_mult_netlist(**regs), period_ns=3.0)
    # ff0 -> the multiplier's A register; its P (clock-to-output 1 ns) -> ff1
    assert est.endpoints == 2
    assert est.worst_ns == (1000 + 700 + 100) / 1000


def test_a_wide_function_mux_takes_its_luts_over_dedicated_wires():
    """LUT4 -> PFUMX (ALUT) -> L6MUX21 (D0) costs no routing hop; the PFUMX's select does."""
    i, o = "input", "output"
    cells = {
        "ff0": cell("TRELLIS_FF", CLK=(i, [1]), DI=(i, ["0"]), Q=(o, [2])),
        "lut": cell("LUT4", A=(i, [2]), B=(i, ["0"]), C=(i, ["0"]), D=(i, ["0"]), Z=(o, [3])),
        "mux": cell("PFUMX", ALUT=(i, [3]), BLUT=(i, ["0"]), C0=(i, ["0"]), Z=(o, [4])),
        "l6": cell("L6MUX21", D0=(i, [4]), D1=(i, ["0"]), SD=(i, ["0"]), Z=(o, [5])),
        "ff1": cell("TRELLIS_FF", CLK=(i, [1]), DI=(i, [5]), Q=(o, [6])),
    }
    names = {"clk": [1], "a": [2], "l": [3], "m": [4], "w": [5], "q": [6]}
    netnames = {k: {"bits": v, "hide_name": 0} for k, v in names.items()}
    est = timing.estimate({"modules": {"npu": {"cells": cells, "netnames": netnames}}}, 3.0)
    # clk->Q 400, hop 700 + LUT 150, PFUMX 150, L6MUX21 150 (no hops), hop 700 + set-up 100
    assert est.worst_ns == (400 + 700 + 150 + 150 + 150 + 700 + 100) / 1000
