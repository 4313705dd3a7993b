"""Block RAM output registers: the flip-flop behind each read moved into the block RAM.

An ECP5 DP16KD without its output register (``REGMODE_x = "NOREG"``, the only mode yosys'
memory inference emits) has a clock-to-output of about 5.8 ns on speed grade 6; with it
(``"OUTREG"``) about 0.95 ns, for one more cycle of read latency. The NPU's memories
(:class:`tessera.hdl.blockram.BlockRam`) therefore read through a flip-flop that takes
the port's data and nothing else, which this pass, run on yosys' netlist before nextpnr,
folds into the block RAM: the port's ``DO`` pins then drive what the flip-flops drove.

That is the same circuit: the output register loads the port's data on every clock edge
(``OCE`` = 1), as the flip-flops did, and neither resets (the flip-flops' ``LSR`` is 0; the
port's ``RST`` stays 0). A port is folded only if every used data pin drives exactly one
such flip-flop, clocked by the port's clock, with no enable and no set or reset.
"""

from collections import defaultdict

#: Per DP16KD port: its data pins, clock, output clock enable, reset and mode parameter.
PORTS = {
    side: {
        "data": [f"DO{side}{i}" for i in range(18)],
        "clk": f"CLK{side}",
        "oce": f"OCE{side}",
        "rst": f"RST{side}",
        "mode": f"REGMODE_{side}",
    }
    for side in "AB"
}


def _is_plain_ff(cell: dict, clk: list) -> bool:
    """A TRELLIS_FF that loads D on every edge of ``clk``: no enable, set or reset."""
    if cell["type"] != "TRELLIS_FF":
        return False
    p, c = cell["parameters"], cell["connections"]
    return (
        p.get("CEMUX", "1").strip() == "1"
        and p.get("CLKMUX", "CLK").strip() == "CLK"
        and c.get("CLK") == clk
        and c.get("LSR", ["0"]) == ["0"]
        and p.get("REGSET", "RESET").strip() == "RESET"
    )


def absorb_output_registers(netlist: dict, top: str) -> tuple[int, int]:
    """Fold each DP16KD read port's output flip-flops into its output register, in place.

    Returns (ports folded, ports reading): a port that reads but cannot be folded keeps
    its 5.8 ns clock-to-output, and the synthesis report says how many did.
    """
    cells = netlist["modules"][top]["cells"]
    sinks: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for name, cell in cells.items():
        for port, bits in cell["connections"].items():
            if cell["port_directions"].get(port) != "output":
                for bit in bits:
                    if isinstance(bit, int):
                        sinks[bit].append((name, port))
    for spec in netlist["modules"][top]["ports"].values():
        for bit in spec["bits"]:
            if isinstance(bit, int):
                sinks[bit].append(("", "port"))

    folded = reading = 0
    for cell in list(cells.values()):
        if cell["type"] != "DP16KD":
            continue
        conn, params = cell["connections"], cell["parameters"]
        for pins in PORTS.values():
            used = [
                (pin, conn[pin][0])
                for pin in pins["data"]
                if pin in conn and isinstance(conn[pin][0], int) and sinks.get(conn[pin][0])
            ]
            if not used:
                continue
            reading += 1
            if params.get(pins["mode"], "NOREG").strip() != "NOREG" or conn.get(pins["rst"]) != [
                "0"
            ]:
                continue
            ffs = []
            for _pin, net in used:
                loads = sinks[net]
                if len(loads) != 1 or loads[0][1] != "DI":
                    break
                ff = cells.get(loads[0][0])
                if ff is None or not _is_plain_ff(ff, conn[pins["clk"]]):
                    break
                ffs.append(loads[0][0])
            else:
                for (pin, _net), ff_name in zip(used, ffs, strict=True):
                    conn[pin] = cells.pop(ff_name)["connections"]["Q"]
                params[pins["mode"]] = "OUTREG"
                conn[pins["oce"]] = ["1"]
                folded += 1
    return folded, reading
