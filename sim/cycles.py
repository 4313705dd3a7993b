"""The cycle model: the timing contract the RTL must meet within 2 %.

Three resources work concurrently:

* the **sequencer** issues one instruction per cycle; it runs ahead of a chain because
  the chain latches its control registers when it starts;
* the **DRAM channel** moves ``dram_bytes_per_cycle``; weight/constant loads
  (``m_rd``, ``c_rd``) and a chain's activation traffic are serialized on it;
* the **datapath** (MVU then MFUs, one pipeline) runs one chain at a time.

A load targets one half of the double-buffered tile buffer (or VRF) and may start only
when the chain that last used that half has finished, so the loads for chain *i+1*
overlap chain *i*. A chain starts when the datapath is free and its loads have landed,
and lasts ``overhead + max(compute, its own DRAM time) + pipeline fill``:

* ``mv_mul``: per output pixel, ``ceil(K_H*K_W*IN_CB_CNT*OUT_CB_CNT / tile_engines)``
  tile passes of ``N / lanes`` cycles each;
* ``v_pool``: one vector per cycle per window position and block;
* otherwise (elementwise): one vector per cycle per block.

Activation DRAM traffic: the input slice once per chain when ``K_H`` rows of it fit the
activation buffer (else once per kernel row); not at all when the previous chain read the
same slice and the whole slice fits the buffer (it is still resident); the AUX operand
and the output once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tessera import layout
from tessera.config import NPUConfig
from tessera.isa import Reg


@dataclass
class ChainTiming:
    start: float
    end: float
    compute: int
    dram_bytes: int
    macs_padded: int
    load_bytes: int


@dataclass
class CycleModel:
    cfg: NPUConfig
    t_issue: float = 0.0
    dram_free: float = 0.0
    unit_free: float = 0.0
    pending_ready: float = 0.0
    half_free: dict = field(default_factory=dict)
    pending_halves: set = field(default_factory=set)
    chains: list[ChainTiming] = field(default_factory=list)
    dram_bytes_total: int = 0
    pending_bytes: int = 0
    resident_input: tuple | None = None

    def issue(self) -> None:
        self.t_issue += 1

    def load(self, nbytes: int, tile_slot: int | None) -> None:
        half = 0 if tile_slot is None else tile_slot // self.cfg.tile_buffer_tiles
        half_key = ("t", half) if tile_slot is not None else ("v", len(self.chains) % 2)
        start = max(self.t_issue, self.dram_free, self.half_free.get(half_key, 0.0))
        self.dram_free = start + nbytes / self.cfg.dram_bytes_per_cycle
        self.pending_ready = max(self.pending_ready, self.dram_free)
        self.pending_halves.add(half_key)
        self.pending_bytes += nbytes
        self.dram_bytes_total += nbytes

    def chain_cost(self, ops: list[str], regs, aux: bool) -> tuple[int, int, int]:
        """(compute cycles, activation DRAM bytes, padded MACs) of one chain."""
        cfg = self.cfg
        n = cfg.native_dim
        r = regs.reg
        oh, ow, ocnt = r(Reg.OUT_H), r(Reg.OUT_W), r(Reg.OUT_CB_CNT)
        iw, ih, icnt = r(Reg.IN_W), r(Reg.IN_H), r(Reg.IN_CB_CNT)
        kh, kw = r(Reg.K_H), r(Reg.K_W)
        p = oh * ow
        block = n * layout.mantissa_dtype(cfg.mantissa_bits).itemsize + 1
        rows = (kh - 1) * r(Reg.DIL_H) + 1
        macs = 0
        if "mv_mul" in ops or "v_pool" in ops:
            slice_bytes = ih * iw * icnt * block
            fits = rows * iw * icnt * block <= cfg.act_buffer_bytes
            key = (r(Reg.IN_ADDR), r(Reg.IN_CB_OFF), icnt, ih, iw)
            if key == self.resident_input:
                in_bytes = 0  # still in the activation buffer from the previous chain
            else:
                in_bytes = slice_bytes * (1 if fits else kh)
            self.resident_input = key if slice_bytes <= cfg.act_buffer_bytes else None
            if "mv_mul" in ops:
                passes = math.ceil(kh * kw * icnt * ocnt / cfg.tile_engines)
                compute = p * passes * (n // cfg.lanes)
                macs = p * kh * kw * icnt * ocnt * n * n
            else:
                compute = p * kh * kw * ocnt
        else:
            in_bytes = p * ocnt * block
            compute = p * ocnt
            self.resident_input = None
        aux_bytes = p * ocnt * block if aux else 0
        out_bytes = p * ocnt * block
        return compute, in_bytes + aux_bytes + out_bytes, macs

    def chain(self, ops: list[str], regs, aux: bool) -> int:
        """Account one chain; ``regs.reg(Reg)`` gives the latched control registers."""
        cfg = self.cfg
        compute, nbytes, macs = self.chain_cost(ops, regs, aux)
        start = max(self.t_issue, self.unit_free, self.pending_ready)
        dram_start = max(start, self.dram_free)
        dram_end = dram_start + nbytes / cfg.dram_bytes_per_cycle
        fill = cfg.mfu_pipeline_depth + (cfg.mvu_pipeline_depth if "mv_mul" in ops else 0)
        end = max(start + cfg.chain_overhead_cycles + compute, dram_end) + fill
        self.dram_free = dram_end
        self.unit_free = end
        for key in self.pending_halves:
            self.half_free[key] = end
        self.pending_halves = set()
        self.pending_ready = 0.0
        self.t_issue = max(self.t_issue, start) + len(ops)
        self.dram_bytes_total += nbytes
        self.chains.append(ChainTiming(start, end, compute, nbytes, macs, self.pending_bytes))
        self.pending_bytes = 0
        return round(end - start)

    def finish(self) -> int:
        return math.ceil(max(self.unit_free, self.t_issue, self.dram_free))


class _Registers:
    """Control-register file for timing-only walks of a program."""

    def __init__(self) -> None:
        self.values: dict[int, int] = {}

    def reg(self, r: Reg) -> int:
        return self.values.get(int(r), 0)


def estimate(words, cfg: NPUConfig) -> CycleModel:
    """Run the cycle model over a program without computing any data (for reports)."""
    from tessera import isa

    model = CycleModel(cfg)
    regs = _Registers()
    chain: list = []
    for w in words:
        ins = isa.decode(int(w))
        spec = isa.BY_MNEMONIC[ins.op]
        if spec.in_chain:
            chain.append(ins)
            if ins.op == "end_chain":
                aux = any(i.args.get("src") == isa.Operand.AUX for i in chain)
                model.chain([i.op for i in chain], regs, aux)
                chain = []
            continue
        if ins.op == "halt":
            break
        if ins.op == "s_wr":
            regs.values[ins.args["reg"]] = ins.args["value"]
        elif ins.op == "m_rd":
            nbytes = ins.args["count"] * layout.tile_bytes(cfg.native_dim, cfg.mantissa_bits)
            model.load(nbytes, ins.args["tile"])
        elif ins.op == "c_rd":
            model.load(ins.args["count"] * layout.const_bytes(cfg.native_dim), None)
        model.issue()
    return model
