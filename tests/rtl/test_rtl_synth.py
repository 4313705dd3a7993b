"""``tessera synth`` on the smallest preset, end to end with the PyPI yosys and nextpnr:
CI synthesizes a real NPU on every run, so synthesizability never regresses.

``ulx3s-25f`` (N=8, 2 lanes: the same units and generators as the 85F build, at a size
that synthesizes in minutes) through ``synth_ecp5`` and ``nextpnr-ecp5 --25k``; the JSON
report must have the contract's keys and the design's own multipliers.
"""

import json

import pytest

from tessera import cli
from tessera.config import get_config

pytestmark = pytest.mark.rtl


def test_smallest_preset_synthesizes_and_reports(tmp_path, capsys):
    cfg = get_config("ulx3s-25f")
    assert cli.main(["synth", "--config", cfg.name, "--out", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["device"] == "LFE5U-25F"
    assert json.loads((tmp_path / "report.json").read_text()) == rep
    for key in ("lut4", "ff", "mult18", "dp16kd"):
        used, avail = rep[key]
        assert 0 < used and 0 < avail, (key, rep[key])
    # the MVU's N x lanes multipliers, registered MULT18X18D instances, plus the MFU's
    assert rep["mult18"][0] >= cfg.native_dim * cfg.lanes
    # each MVU multiplier reads its own copy of the activation: yosys merged the per-lane
    # registers into one set driving every lane's DSPs before they were kept apart
    netlist = json.loads((tmp_path / "npu.json").read_text())["modules"]["npu"]
    mvu_dsps = [
        c for name, c in netlist["cells"].items()
        if c["type"] == "MULT18X18D" and name.startswith("chain.mvu.mul")
    ]  # fmt: skip
    assert len(mvu_dsps) == cfg.native_dim * cfg.lanes
    a_nets = {c["connections"][f"A{i}"][0] for c in mvu_dsps for i in range(cfg.mantissa_bits)}
    assert len(a_nets) == len(mvu_dsps) * cfg.mantissa_bits
    # the flip-flop behind each memory read became the block RAM's output register
    # (hdl/outreg.py), except in the tile buffer, whose depth mux sits behind its block RAMs
    folded, reading = rep["bram_output_registers"]
    assert 0 < folded <= reading
    for name, cell in netlist["cells"].items():
        if cell["type"] == "DP16KD" and not name.startswith("tiles."):
            modes = {cell["parameters"].get(f"REGMODE_{side}") for side in "AB"}
            assert "OUTREG" in modes, name
    assert set(rep["seconds"]) >= {"elaborate", "yosys"}
    # the delay estimate of yosys' netlist, written before nextpnr runs
    est = rep["logic_estimate"]
    assert est["worst_ns"] > 0 and 0 <= est["endpoints_over"] <= est["endpoints"]
    paths = (tmp_path / "paths.txt").read_text()
    assert paths.startswith("estimated delay (unit cell delays, 0.7 ns per connection, before")
    if rep["placed"]:
        assert rep["fmax_mhz"] and set(rep["target_mhz"]) == set(rep["fmax_mhz"])
        assert all(v > 0 for v in rep["fmax_mhz"].values())
        assert rep["timing_met"] == all(
            rep["fmax_mhz"][c] >= rep["target_mhz"][c] for c in rep["fmax_mhz"]
        )
    else:
        assert rep["problem"]
