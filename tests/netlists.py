"""Hand-made yosys JSON pieces for the netlist tests (delay estimate, placement)."""


def cell(kind: str, **ports: tuple[str, list[int | str]]) -> dict:
    """A yosys JSON cell of ``kind``; each port is ``(direction, bits)``."""
    return {
        "type": kind,
        "port_directions": {p: d for p, (d, _) in ports.items()},
        "connections": {p: bits for p, (_, bits) in ports.items()},
    }
