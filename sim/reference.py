"""The numpy reference executor: the quantized graph, layer by layer.

It never looks at the instruction stream. It walks the program's layer table (what the
compiler meant: op, kernel, stride, padding, which tensor views are read and written,
where the quantized weights are) and applies :mod:`tessera.numerics` to whole tensors
kept in its own arrays. The instruction simulator must agree with it bit for bit; any
disagreement is a bug in code generation, register handling, tiling or the simulator.

Every layer also writes its output into the DRAM image at the buffer's address, as the
hardware does, so a run leaves the same bytes in DRAM as the instruction simulator: the
comparison covers every intermediate activation still resident, not just the outputs.

Exponent maxima follow the hardware's rule, stated at the level of buffers: a buffer's
maximum starts at ``E_ZERO`` when its first producer runs and grows with every write; a
layer reads the maximum as it is when the layer starts.
"""

from __future__ import annotations

import numpy as np

from tessera import layout, numerics
from tessera.program import Program
from tessera.sim import kernels


class ReferenceExecutor:
    def __init__(self, prog: Program, mem: np.ndarray) -> None:
        self.prog = prog
        self.cfg = prog.config
        self.mem = mem
        self.q: dict[int, np.ndarray] = {}
        self.e: dict[int, np.ndarray] = {}
        self.emax: dict[int, int] = {}
        self.buffers = {b["buffer"]: b for b in prog.manifest["memory_map"] if "buffer" in b}
        n, m = self.cfg.native_dim, self.cfg.mantissa_bits
        for info in prog.manifest["inputs"]:
            b = info["buffer"]
            self.q[b], self.e[b] = layout.unpack_tensor(
                mem, info["addr"], info["h"], info["w"], info["cb"], n, m
            )
            self.emax[b] = int(mem[info["emax_addr"] : info["emax_addr"] + 4].view("<i4")[0])

    def read(self, d: dict) -> tuple[np.ndarray, np.ndarray]:
        b, off, cnt = d["buffer"], d["cb_off"], d["cb_cnt"]
        return self.q[b][:, :, off : off + cnt], self.e[b][:, :, off : off + cnt]

    def run(self, progress=None) -> np.ndarray:
        for layer in self.prog.manifest["layers"]:
            if layer["op"] != "concat":
                self.layer(layer)
            if progress is not None:
                progress(1)
        return self.mem

    def layer(self, L: dict) -> None:
        cfg = self.cfg
        n, m, big = cfg.native_dim, cfg.mantissa_bits, cfg.mfu_mantissa_bits
        src, dst = L["src"], L["dst"]
        _oc, oh, ow = L["out_shape"]
        ob = dst["cb_cnt"]
        p = oh * ow
        kernel, stride = tuple(L["kernel"]), tuple(L["stride"])
        pads_tl = (L["pads"][0], L["pads"][1])
        q, e = self.read(src)
        if dst["buffer"] not in self.q:
            self.q[dst["buffer"]] = np.zeros((dst["h"], dst["w"], dst["cb"], n), dtype=np.int64)
            self.e[dst["buffer"]] = np.full((dst["h"], dst["w"], dst["cb"]), numerics.E_ZERO)
            self.emax[dst["buffer"]] = numerics.E_ZERO
        emax = self.emax[src["buffer"]]
        if L["op"] == "conv":
            grid, floor = kernels.read_clamped_grid(q, e, emax, cfg.act_exp_window)
            tq, te = layout.unpack_tiles(self.mem, L["tiles_addr"], ob * L["tiles_per_ob"], n, m)
            wg = kernels.weight_grid(tq, te, L["w_floor"], ob)
            acc = kernels.mvu(grid, wg, kernel, stride, pads_tl, tuple(L["dilation"]), (oh, ow))
            vq, ve = numerics.normalize(acc.reshape(p, ob, n), floor + L["w_floor"], big)
            cq, ce = layout.unpack_consts(self.mem, L["consts_addr"], ob, n)
            vq, ve = numerics.wide_add(vq, ve, cq[None], ce[None], big)
        elif L["op"] == "pool":
            grid, floor = kernels.read_clamped_grid(q, e, emax, cfg.act_exp_window)
            red = kernels.pool(grid, L["kind"] == "max", kernel, stride, pads_tl, (oh, ow))
            vq, ve = numerics.normalize(red.reshape(p, ob, n), floor, big)
            if L["kind"] == "avg":
                cq, ce = layout.unpack_consts(self.mem, L["scale_addr"], ob, n)
                vq, ve = numerics.wide_mul(vq, ve, cq[None], ce[None], big)
        else:
            vq, ve = q.reshape(p, ob, n), e.reshape(p, ob)
            if "scale_addr" in L:
                cq, ce = layout.unpack_consts(self.mem, L["scale_addr"], ob, n)
                vq, ve = numerics.wide_mul(vq, ve, cq[None], ce[None], big)
            if "shift_addr" in L:
                cq, ce = layout.unpack_consts(self.mem, L["shift_addr"], ob, n)
                vq, ve = numerics.wide_add(vq, ve, cq[None], ce[None], big)
        if L.get("aux"):
            aq, ae = self.read(L["aux"])
            vq, ve = numerics.wide_add(vq, ve, aq.reshape(p, ob, n), ae.reshape(p, ob), big)
        if L["relu"]:
            vq, ve = numerics.wide_relu(vq, ve, big)
        sq, se = numerics.to_storage(vq, ve, m)
        b, off = dst["buffer"], dst["cb_off"]
        self.q[b][:, :, off : off + ob] = sq.reshape(oh, ow, ob, n)
        self.e[b][:, :, off : off + ob] = se.reshape(oh, ow, ob)
        buf = self.buffers[b]
        layout.write_tensor_blocks(
            self.mem,
            buf["addr"],
            (buf["h"], buf["w"], buf["cb"]),
            off,
            sq.reshape(oh, ow, ob, n),
            se.reshape(oh, ow, ob),
            n,
            m,
        )
        self.emax[b] = max(self.emax[b], int(se.max()))
