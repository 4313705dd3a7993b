"""The block RAM output-register pass on hand-made yosys netlists: a read port whose data
pins each feed one plain flip-flop is folded (the pins take over the flip-flops' nets);
any other load, an enable, a reset or another clock keeps the port as it was."""

import copy

import pytest

from tessera.hdl.outreg import absorb_output_registers

CLK, OTHER_CLK = 2, 3


def _netlist(params: dict, conns: dict, extra_load: bool = False) -> dict:
    """A DP16KD reading two bits on port B into two flip-flops whose outputs leave; the
    second flip-flop's parameters and connections updated from ``params`` and ``conns``."""
    cells = {
        "ram": {
            "type": "DP16KD",
            "parameters": {"REGMODE_A": "NOREG", "REGMODE_B": "NOREG"},
            "port_directions": {
                "CLKB": "input", "OCEB": "input", "RSTB": "input",
                "DOB0": "output", "DOB1": "output",
            },
            "connections": {
                "CLKB": [CLK], "OCEB": ["1"], "RSTB": ["0"], "DOB0": [10], "DOB1": [11],
            },
        },
    }  # fmt: skip
    for i in range(2):
        ff = {
            "type": "TRELLIS_FF",
            "parameters": {"CEMUX": "1 ", "CLKMUX": "CLK", "REGSET": "RESET", "GSR": "DISABLED"},
            "port_directions": {"CLK": "input", "LSR": "input", "DI": "input", "Q": "output"},
            "connections": {"CLK": [CLK], "LSR": ["0"], "DI": [10 + i], "Q": [20 + i]},
        }
        if i == 1:
            ff["parameters"].update(params)
            ff["connections"].update(conns)
            ff["port_directions"].update({port: "input" for port in conns})
        cells[f"ff{i}"] = ff
    if extra_load:
        cells["lut"] = {
            "type": "LUT4",
            "parameters": {},
            "port_directions": {"A": "input", "Z": "output"},
            "connections": {"A": [11], "Z": [30]},
        }
    ports = {"q": {"direction": "output", "bits": [20, 21]}}
    return {"modules": {"top": {"cells": cells, "ports": ports}}}


def test_a_port_into_plain_flip_flops_gets_its_output_register():
    netlist = _netlist({}, {})
    assert absorb_output_registers(netlist, "top") == (1, 1)
    cells = netlist["modules"]["top"]["cells"]
    assert set(cells) == {"ram"}
    ram = cells["ram"]
    assert ram["parameters"]["REGMODE_B"] == "OUTREG"
    assert ram["parameters"]["REGMODE_A"] == "NOREG"  # port A reads nothing
    assert ram["connections"]["DOB0"] == [20] and ram["connections"]["DOB1"] == [21]
    assert ram["connections"]["OCEB"] == ["1"]


@pytest.mark.parametrize(
    "params, conns, extra_load",
    [
        ({}, {"LSR": [5]}, False),  # a synchronous reset
        ({"CEMUX": "CE"}, {"CE": [6]}, False),  # an enable
        ({}, {"CLK": [OTHER_CLK]}, False),  # another clock
        ({"REGSET": "SET"}, {}, False),  # starts at 1
        ({}, {}, True),  # the data pin has a second load
    ],
)
def test_anything_but_a_plain_flip_flop_keeps_the_port_as_it_was(params, conns, extra_load):
    netlist = _netlist(params, conns, extra_load)
    before = copy.deepcopy(netlist)
    assert absorb_output_registers(netlist, "top") == (0, 1)
    assert netlist == before
