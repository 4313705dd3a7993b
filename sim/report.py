"""Per-layer performance report from the cycle model (no data is computed)."""

from __future__ import annotations

from tessera.program import Program
from tessera.sim.cycles import estimate


def build_report(prog: Program) -> dict:
    """MACs, cycles, MVU utilisation and DRAM bytes per layer and in total.

    A layer's cycles are the wall-clock time from the end of the previous chain to the
    end of its last chain, so layer cycles add up to the total and stalls (weight
    loads that could not be hidden) are charged to the layer that waited.
    """
    cfg = prog.config
    model = estimate(prog.instructions, cfg)
    chains = iter(model.chains)
    prev_end = 0.0
    layers = []
    peak = cfg.macs_per_cycle
    for layer in prog.manifest["layers"]:
        cycles = 0.0
        dram = 0
        padded = 0
        for _ in range(layer["chains"]):
            c = next(chains)
            cycles += c.end - prev_end
            prev_end = c.end
            dram += c.dram_bytes + c.load_bytes
            padded += c.macs_padded
        macs = int(layer.get("macs", 0))
        layers.append(
            {
                "name": layer["name"],
                "op": layer["op"] if layer["op"] != "pool" else f"{layer['kind']}pool",
                "out_shape": layer.get("out_shape"),
                "macs": macs,
                "cycles": round(cycles),
                "mvu_utilization": macs / (cycles * peak) if cycles else 0.0,
                "dram_bytes": dram,
            }
        )
    total = model.finish()
    macs = sum(x["macs"] for x in layers)
    # No schedule can beat, layer by layer, the larger of the DSP time of its MACs and the
    # DRAM time of its bytes: this floor says how much of the gap to the DSP floor is the
    # board's memory bandwidth rather than the NPU.
    roofline = sum(
        max(x["macs"] / peak, x["dram_bytes"] / cfg.dram_bytes_per_cycle) for x in layers
    )
    return {
        "config": cfg.name,
        "macs": macs,
        "total_cycles": total,
        "latency_ms": total / cfg.clock_hz * 1e3,
        "mvu_utilization": macs / (total * peak) if total else 0.0,
        "dram_bytes": model.dram_bytes_total,
        "dsp_floor_ms": macs / cfg.macs_per_cycle / cfg.clock_hz * 1e3,
        "roofline_floor_ms": roofline / cfg.clock_hz * 1e3,
        "macs_per_cycle": peak,
        "clock_mhz": cfg.clock_hz / 1e6,
        "layers": layers,
    }


def format_report(rep: dict) -> str:
    lines = [
        f"{'layer':58s} {'op':8s} {'MACs':>13s} {'cycles':>11s} {'MVU util':>8s} {'DRAM B':>11s}"
    ]
    for x in rep["layers"]:
        if x["op"] == "concat":
            continue
        lines.append(
            f"{x['name'][-58:]:58s} {x['op']:8s} {x['macs']:13,d} {x['cycles']:11,d} "
            f"{x['mvu_utilization']:8.1%} {x['dram_bytes']:11,d}"
        )
    lines.append(
        f"total on {rep['config']}: {rep['macs']:,} MACs, {rep['total_cycles']:,} cycles = "
        f"{rep['latency_ms']:.2f} ms at {rep['clock_mhz']:.0f} MHz, MVU utilisation "
        f"{rep['mvu_utilization']:.1%} (DSP-bound floor {rep['dsp_floor_ms']:.2f} ms at "
        f"{rep['macs_per_cycle']} MAC/cycle; DSP-or-DRAM floor per layer "
        f"{rep['roofline_floor_ms']:.2f} ms), DRAM traffic {rep['dram_bytes'] / 2**20:.1f} MiB"
    )
    return "\n".join(lines)
