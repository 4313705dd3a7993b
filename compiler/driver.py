"""The compiler driver: ONNX file -> :class:`~tessera.program.Program`.

``import_onnx`` -> graph passes -> ``lower`` (quantize_weights, plan_memory,
emit_chains) -> manifest. :func:`format_plan` renders what ran where, the tiling and the
memory map for ``tessera compile --plan``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

import tessera
from tessera.compiler import passes
from tessera.compiler.ir import Graph
from tessera.compiler.lower import INPUT_EMAX_ADDR, Lowered, lower, tensor_desc
from tessera.compiler.onnx_import import import_onnx, load_model
from tessera.config import NPUConfig
from tessera.errors import UnsupportedModelError
from tessera.program import FORMAT_VERSION, Program


def cut_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Make ``names`` the graph outputs (a featurizer cut), dropping what follows them."""
    known = {o for n in model.graph.node for o in n.output}
    missing = [n for n in names if n not in known]
    if missing:
        raise UnsupportedModelError(
            f"requested outputs {missing} are not tensors of the graph; e.g. "
            + ", ".join(sorted(known)[:8])
        )
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for name in names:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m


def build_graph(model: onnx.ModelProto) -> Graph:
    g = import_onnx(model)
    passes.run_pipeline(g)
    return g


def compile_model(
    model: str | Path | onnx.ModelProto, cfg: NPUConfig, outputs: list[str] | None = None
) -> tuple[Program, Graph, Lowered]:
    """Compile an ONNX model for ``cfg``."""
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    if outputs:
        model = cut_outputs(model, outputs)
    g = build_graph(model)
    passes.pack_input_columns(g, cfg.native_dim)
    passes.subsample_strided_pointwise(g, cfg)
    low = lower(g, cfg)
    g.log.append(
        f"quantize_weights: {sum(1 for x in g.nodes if x.op == 'conv')} conv/FC layers to "
        f"{cfg.mantissa_bits}-bit BFP tiles of {cfg.native_dim}x{cfg.native_dim}"
    )
    g.log.append(
        f"plan_memory: {len(low.buffers)} activation buffers, "
        f"{low.dram_needed} bytes of DRAM ({low.static_bytes} static)"
    )
    g.log.append(
        f"emit_chains: {len(low.instructions)} instructions, "
        f"{sum(layer['chains'] for layer in low.layers)} chains"
    )
    views = low.views
    buffers = low.buffers

    inputs = [
        {
            "name": i.onnx_name,
            "shape": list(i.onnx_shape),
            "dtype": "float32",
            "perm": list(i.perm),
            "columns": i.columns,
            "emax_addr": INPUT_EMAX_ADDR,
            **tensor_desc(views, buffers, i.tensor),
        }
        for i in g.inputs
    ]
    host_stages = []
    outputs_info = []
    for o in g.outputs:
        src = o.tensor
        prod = g.producer(src)
        stages = []
        while prod is not None and prod.on_host:
            stages.insert(0, {"op": prod.op, "name": prod.name})
            src = prod.inputs[0]
            prod = g.producer(src)
        host_stages.extend(dict(s, output=o.onnx_name) for s in stages)
        outputs_info.append(
            {
                "name": o.onnx_name,
                "shape": list(o.onnx_shape),
                "dtype": "float32",
                "kind": o.kind,
                "perm": list(o.perm),
                "order": list(o.order),
                "host_stages": [s["op"] for s in stages],
                **tensor_desc(views, buffers, src),
            }
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "tessera_version": tessera.__version__,
        "config": cfg.to_dict(),
        "inputs": inputs,
        "outputs": outputs_info,
        "memory_map": [
            {
                "buffer": b.id,
                "addr": b.addr,
                "bytes": b.nbytes,
                "h": b.h,
                "w": b.w,
                "cb": b.cb,
                "ereg": b.ereg,
                "live": [b.first, b.last],
            }
            for b in buffers
        ]
        + [{"region": "static", "addr": 0, "bytes": low.static_bytes}],
        "host_stages": host_stages,
        "dram_bytes_needed": low.dram_needed,
        "static_bytes": low.static_bytes,
        "layers": low.layers,
        "passes": list(g.log),
    }
    prog = Program(
        manifest=manifest,
        instructions=np.array(low.instructions, dtype=np.uint64),
        dram_segments=low.segments,
    )
    return prog, g, low


def format_plan(prog: Program) -> str:
    """Human-readable plan: passes, per-layer placement and tiling, memory map."""
    man = prog.manifest
    cfg = prog.config
    lines = [f"tessera plan for {cfg.name}: N={cfg.native_dim}, {cfg.macs_per_cycle} MAC/cycle"]
    lines.append("passes:")
    lines += [f"  {p}" for p in man["passes"]]
    lines.append("layers (unit, op, output CxHxW, chains x output blocks, weights, buffers):")
    for i, layer in enumerate(man["layers"]):
        if layer["op"] == "concat":
            lines.append(f"  {i:3d} NPU  concat  zero-copy placement  {layer['name']}")
            continue
        c, h, w = layer["out_shape"]
        dst = layer["dst"]
        what = layer["op"] if layer["op"] != "pool" else f"{layer['kind']}pool"
        extra = ""
        if "tiles_per_ob" in layer:
            extra = f" {layer['tiles_per_ob']} tiles/block @0x{layer['tiles_addr']:x}"
        if layer.get("aux"):
            extra += f" +residual(buf{layer['aux']['buffer']})"
        if layer.get("relu"):
            extra += " +relu"
        lines.append(
            f"  {i:3d} NPU  {what:8s} {c}x{h}x{w:<4d} {layer['chains']}x{layer['group']}"
            f"{extra}  buf{layer['src']['buffer']}[{layer['src']['cb_off']}:"
            f"{layer['src']['cb_off'] + layer['src']['cb_cnt']}] -> "
            f"buf{dst['buffer']}[{dst['cb_off']}:{dst['cb_off'] + dst['cb_cnt']}]"
            f"  {layer['name']}"
        )
    for s in man["host_stages"]:
        lines.append(f"      HOST {s['op']:8s} -> output {s['output']!r}  {s['name']}")
    lines.append("memory map:")
    for b in man["memory_map"]:
        if "region" in b:
            lines.append(
                f"  0x{b['addr']:08x} {b['bytes']:>10d} B  {b['region']} (weights, constants)"
            )
        else:
            lines.append(
                f"  0x{b['addr']:08x} {b['bytes']:>10d} B  buf{b['buffer']} {b['h']}x{b['w']}x"
                f"{b['cb']} blocks, E{b['ereg']}, live {b['live'][0]}..{b['live'][1]}"
            )
    lines.append(
        f"DRAM needed: {man['dram_bytes_needed']} bytes "
        f"({man['dram_bytes_needed'] / 2**20:.2f} MiB of {cfg.dram_bytes / 2**20:.0f} MiB)"
    )
    return "\n".join(lines)
