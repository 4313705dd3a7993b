"""The chain engine: one chain sweeps a whole output feature map without further instructions.

It owns the datapath of a chain: the activation loader filling the ring buffer, the loop
nest over output rows, pixels, output blocks, kernel rows and columns, input blocks and
lane groups (one MVU beat per cycle), the MVU or the pooling reducer, the vector pipeline
(normalize, MFU slots, re-block), the AUX reader and the output writer.

Loop order, innermost first: lane group ``g`` (MVU only), input block ``cb`` (MVU only),
kernel column, kernel row, output block, output column, output row: the order of the
tiles in the tile buffer ([output block][kernel row][kernel col][input block]), so the tile
address is a counter. Every address is kept incrementally (no multiply per beat); the few
products a chain needs are computed once at its start by a shared multiplier.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.hdl import Value
from amaranth.lib import data, wiring
from amaranth.lib.memory import ReadPort
from amaranth.lib.wiring import In, Out

from tessera import numerics
from tessera.config import NPUConfig
from tessera.hdl import actbuffer, bfp
from tessera.hdl.actbuffer import ActBuffer
from tessera.hdl.actloader import ActLoader, act_entries, entry_bits
from tessera.hdl.auxreader import AuxReader
from tessera.hdl.bus import BurstPort
from tessera.hdl.loader import lg
from tessera.hdl.multiplier import LATENCY as MUL_LATENCY
from tessera.hdl.multiplier import Multiplier
from tessera.hdl.mvu import MVU, SHIFT_BITS
from tessera.hdl.mvu import OPERAND_STAGES as MVU_OPERAND_STAGES
from tessera.hdl.mvu import WEIGHT_STAGES as MVU_WEIGHT_STAGES
from tessera.hdl.params import ChainOps, ChainRegs, Reducer
from tessera.hdl.pipereg import DistributionRegister
from tessera.hdl.tilebuffer import read_signature as tile_read_signature
from tessera.hdl.vector import POOL_BITS, VectorPipe, phases, spaces_blocks
from tessera.hdl.writer import DEPTH as WRITER_DEPTH
from tessera.hdl.writer import Writer

GRID_BITS = 40
#: Registers between the sweep's counters and the activation buffer's address pins.
ADDRESS_STAGES = 1
#: Registered stages between the block RAMs' answer and the reducers: the words, the
#: clamp's decision, the clamp's shifted lanes.
BEAT_STAGES = 3


#: Cycles from a chain's ``done`` to the earliest launch of the next: the sequencer
#: registers the completion before it updates E[OUT_EREG], which the next chain may read
#: at its launch (state ``SETTLE``).
DONE_TO_LAUNCH = 2
#: Products the set-up stage computes on its multiplier, one a cycle (states P0, P1, ...).
SETUP_PRODUCTS = 14


class ChainError:
    """Error codes a chain can raise (the NPU's error register)."""

    WINDOW_TOO_TALL = 0x10  # the kernel rows of one output row do not fit the buffer


class ChainEngine(wiring.Component):
    def __init__(self, cfg: NPUConfig, *, ecp5: bool = False):
        self.cfg = cfg
        self.ecp5 = ecp5
        n, lanes = cfg.native_dim, cfg.lanes
        self.groups = n // lanes
        eb = entry_bits(cfg)
        half = (act_entries(cfg) + 1) // 2
        super().__init__(
            {
                "start": In(1),
                "regs": In(ChainRegs),
                "ops": In(ChainOps),
                "in_ereg": In(4),
                "out_ereg": In(4),
                "halves": In(4),  # tile-buffer and VRF halves the chain reads (2 + 2 bits)
                "ready": Out(1),  # the set-up stage takes a chain (start)
                "busy": Out(1),
                "done": Out(1),  # a chain completed: update E[done_ereg] with emax_out
                "done_ereg": Out(4),
                "emax_idx": Out(4),  # E register of the staged chain's input...
                "emax_val": In(signed(16)),  # ...and its value, read when the chain launches
                "halves_in_use": Out(4),
                "act_streaming": Out(1),
                "eregs_in_use": Out(16),  # E registers in-flight chains will read or update
                # performance counters since reset: cycles waiting for input rows, and cycles
                # a block waited for room in the writer or for its AUX operand
                "stall_rows": Out(32),
                "stall_credit": Out(32),
                "error": Out(8),
                "emax_out": Out(signed(16)),
                "act_bus": Out(BurstPort),
                "aux_bus": Out(BurstPort),
                "out_bus": Out(BurstPort),
                "out_ebus": Out(BurstPort),
                "act_mant_wr": In(ActLoader.port_signature(cfg, "mant_wr")),
                "act_exp_wr0": In(ActLoader.port_signature(cfg, "exp_wr0")),
                "act_exp_wr1": In(ActLoader.port_signature(cfg, "exp_wr1")),
                "act_mant_rd": In(ActBuffer.read_signature(eb, n * 8)),
                "act_exp_rd0": In(
                    ReadPort.Signature(addr_width=max(1, (half - 1).bit_length()), shape=8)
                ),
                "act_exp_rd1": In(
                    ReadPort.Signature(addr_width=max(1, (half - 1).bit_length()), shape=8)
                ),
                "tile_rd": In(tile_read_signature(cfg)),
                "vrf0": In(VectorPipe.port_signature(cfg, "vrf0")),
                "vrf1": In(VectorPipe.port_signature(cfg, "vrf1")),
            }
        )

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        n, lanes, groups = cfg.native_dim, cfg.lanes, self.groups
        eb = entry_bits(cfg)
        cap = act_entries(cfg)

        m.submodules.act = act = ActLoader(cfg)
        m.submodules.aux = aux = AuxReader(cfg)
        m.submodules.writer = writer = Writer(cfg)
        m.submodules.mvu = mvu = MVU(cfg, ecp5=self.ecp5)
        m.submodules.vec = vec = VectorPipe(cfg, ecp5=self.ecp5)
        wiring.connect(m, wiring.flipped(self.act_bus), act.bus)
        wiring.connect(m, wiring.flipped(self.aux_bus), aux.bus)
        wiring.connect(m, wiring.flipped(self.out_bus), writer.bus)
        wiring.connect(m, wiring.flipped(self.out_ebus), writer.ebus)
        wiring.connect(m, wiring.flipped(self.act_mant_wr), act.mant_wr)
        wiring.connect(m, wiring.flipped(self.act_exp_wr0), act.exp_wr0)
        wiring.connect(m, wiring.flipped(self.act_exp_wr1), act.exp_wr1)
        wiring.connect(m, wiring.flipped(self.vrf0), vec.vrf0)
        wiring.connect(m, wiring.flipped(self.vrf1), vec.vrf1)

        # Two register sets: the set-up stage prepares chain i+1 (latches its registers,
        # computes the products and the ring division) while chain i runs; launching copies
        # the staged set into the active one. So set-up costs nothing after the first chain.
        def pair(name, shape):
            return Signal(shape, name=name), Signal(shape, name=f"n_{name}")

        r, nr = pair("r", ChainRegs)
        ops, nops = pair("ops", ChainOps)
        shapes = {
            "pix_in": 32, "in_plane": 32, "pix_out": 32, "out_plane": 32, "aux_plane": 32,
            "total": 32, "rowblocks": 32, "dh_rb": 32, "sh_rb": 32, "pt_rb": 32, "dw_c": 32,
            "sw_c": 32, "pl_c": 32, "span": 16, "ring_rows": 32, "ring": 32,
            # the first output row whose window reaches the input's last row
            "last_row_first": signed(18),
            # the ring holds fewer rows than a window (ChainError.WINDOW_TOO_TALL)
            "too_tall": 1,
            "dh": 8, "dw": 8, "is_mvu": 1, "is_pool": 1,
            "in_ereg": 4, "out_ereg": 4, "out_mask": 16, "halves": 4,
            # the sweep's loop bounds less one, so its "last" tests compare registers, and
            # less two, so a step's "last" is a compare of the counter (not of its sum)
            "kh_m1": signed(9), "kw_m1": signed(9), "cbn_m1": signed(17),
            "ocnt_m1": signed(17), "ow_m1": signed(17), "oh_m1": signed(17),
            "kh_m2": signed(9), "kw_m2": signed(9), "cbn_m2": signed(17),
            "ocnt_m2": signed(17), "ow_m2": signed(17),
            # the activation loader's segments of an input row
            "seg_blocks": 32, "segs_per_row": 16, "seg_mstep": 32, "seg_estep": 32,
        }  # fmt: skip
        act_s, stg = {}, {}
        for k, shape in shapes.items():
            act_s[k], stg[k] = pair(k, shape)
        in_plane = act_s["in_plane"]
        out_plane, aux_plane, total = act_s["out_plane"], act_s["aux_plane"], act_s["total"]
        rowblocks, dh_rb, sh_rb = act_s["rowblocks"], act_s["dh_rb"], act_s["sh_rb"]
        pt_rb, dw_c, sw_c, pl_c = act_s["pt_rb"], act_s["dw_c"], act_s["sw_c"], act_s["pl_c"]
        span, ring_rows, ring = act_s["span"], act_s["ring_rows"], act_s["ring"]
        dh, dw, is_mvu, is_pool = act_s["dh"], act_s["dw"], act_s["is_mvu"], act_s["is_pool"]
        m.d.comb += [
            self.done_ereg.eq(act_s["out_ereg"]),
            self.emax_idx.eq(stg["in_ereg"]),
        ]

        m.d.comb += [vec.ops.eq(ops), vec.ocnt.eq(r.ocnt), vec.wfloor.eq(r.wfloor)]
        floor = Signal(signed(16))
        m.d.comb += [vec.floor.eq(floor), writer.in_valid.eq(vec.out_valid)]
        m.d.comb += [writer.in_q.eq(vec.out_q), writer.in_e.eq(vec.out_e)]
        m.d.comb += [vec.aux_q.eq(aux.out_q), vec.aux_e.eq(aux.out_e), aux.pop.eq(vec.aux_pop)]
        m.d.comb += self.emax_out.eq(writer.emax)

        # ---------------------------------------------------------------- set-up products
        # One registered MULT18X18D (yosys made the inferred multiply a combinational one,
        # the routed design's critical path): every operand (pixels per tensor, blocks per
        # row, strides) is below 2**18, i.e. tensors up to 512 x 512 pixels.
        m.submodules.setup_mul = setup_mul = Multiplier(18, 18, ecp5=self.ecp5, is_signed=False)
        mul_a, mul_b, prod = setup_mul.a, setup_mul.b, setup_mul.p
        rem = Signal(eb + 3)
        div_i = Signal(range(eb + 3))
        # residency of the input slice (mv_mul / v_pool chains only, as the cycle model)
        last_key = Signal(32 + 16 * 4)
        last_valid = Signal()

        def input_key(regs) -> Value:
            return Cat(regs.in_addr, regs.ioff, regs.icnt, regs.ih, regs.iw)

        # The chain about to launch reads the slice the last one left: compared as the
        # chain is taken from the set-up stage (a 96-bit compare; the activation loader's
        # start, which it steers, had it in the same cycle).
        resident = Signal()

        # ---------------------------------------------------------------- sweep state
        oy = Signal(16)
        ox = Signal(16)
        row_first = Signal(signed(18))
        row_last = Signal(signed(18))  # row_first + span: the window's last input row
        col_first = Signal(signed(18))
        row_addr_first = Signal(signed(34))
        col_addr_first = Signal(signed(34))
        ky = Signal(8)
        kx = Signal(8)
        cb = Signal(16)
        g = Signal(range(max(2, groups)))
        ob = Signal(16)
        iy = Signal(signed(18))
        ix = Signal(signed(18))
        row_addr = Signal(signed(34))
        col_addr = Signal(signed(34))
        tile = Signal(16)
        issued = Signal(32)  # blocks started
        need = Signal(signed(18))  # the input row a row of output waits for
        # The rows it needs are loaded: a flag worked out a cycle ahead, so that the
        # compare of the loader's count and the start of a row (every sweep counter's
        # restart) are in different cycles (routed: the sweep's counters up to 13.2 ns).
        rows_ok = Signal()

        m.d.comb += [
            act.mant_addr.eq(r.in_addr + (r.ioff << lg(n))),
            act.exp_addr.eq(r.in_addr + (in_plane << lg(n)) + r.ioff),
            act.ih.eq(r.ih),
            act.rowblocks.eq(rowblocks),
            act.ring.eq(ring),
            act.ring_rows.eq(ring_rows),
        ]
        m.d.comb += [
            act.seg_blocks.eq(act_s["seg_blocks"]),
            act.segs_per_row.eq(act_s["segs_per_row"]),
            act.seg_mstep.eq(act_s["seg_mstep"]),
            act.seg_estep.eq(act_s["seg_estep"]),
        ]
        m.d.comb += [
            writer.mant_addr.eq(r.out_addr + (r.ooff << lg(n))),
            writer.exp_addr.eq(r.out_addr + (out_plane << lg(n)) + r.ooff),
            writer.pixel_mstep.eq(r.ocb << lg(n)),
            writer.pixel_estep.eq(r.ocb),
            writer.ocnt.eq(r.ocnt),
            writer.total.eq(total),
            aux.mant_addr.eq(r.aux_addr + (r.aoff << lg(n))),
            aux.exp_addr.eq(r.aux_addr + (aux_plane << lg(n)) + r.aoff),
            aux.pixel_mstep.eq(r.acb << lg(n)),
            aux.pixel_estep.eq(r.acb),
            aux.ocnt.eq(r.ocnt),
            aux.total.eq(total),
        ]

        # ---------------------------------------------------------------- beat issue
        issue = Signal()
        first = Signal()
        last = Signal()
        entry = Signal(signed(35))
        inwin = Signal()
        # Each loop counter has a flag "at its last value", kept with it, and ``at_first``
        # says the three inner ones are at 0: the sweep's decisions read flip-flops, not
        # compares of 16-bit counters with their bounds (a routed critical path ran
        # through the cascade of them into the output column's registers).
        cb_last, kx_last, ky_last = Signal(), Signal(), Signal()
        ob_last, ox_last, at_first = Signal(), Signal(), Signal()

        def restart(counter: Signal, at_last: Signal, bound: str) -> list:
            return [counter.eq(0), at_last.eq(act_s[f"{bound}_m1"] == 0)]

        def step(counter: Signal, at_last: Signal, bound: str) -> list:
            return [counter.eq(counter + 1), at_last.eq(counter == act_s[f"{bound}_m2"])]

        m.d.comb += [
            first.eq(at_first),
            last.eq(ky_last & kx_last & cb_last),
            entry.eq(row_addr + col_addr + Mux(is_mvu, cb, ob)),
            inwin.eq((iy >= 0) & (iy < r.ih) & (ix >= 0) & (ix < r.iw)),
        ]
        # Address stage: the entry and the beat's control are registered, so the
        # three-operand add does not reach the block RAMs' address pins in its cycle.
        ent = Signal(eb, name="act_entry")
        q_issue, q_first, q_last, q_inwin = Signal(), Signal(), Signal(), Signal()
        q_g = Signal.like(g)
        m.d.sync += [
            ent.eq(entry.as_unsigned()[:eb]),
            q_issue.eq(issue),
            q_first.eq(first),
            q_last.eq(last),
            q_g.eq(g),
            q_inwin.eq(inwin),
        ]
        m.d.comb += [
            self.act_mant_rd.addr.eq(ent),
            self.act_exp_rd0.addr.eq(ent[1:]),
            self.act_exp_rd1.addr.eq(ent[1:]),
            self.act_exp_rd0.en.eq(1),
            self.act_exp_rd1.en.eq(1),
        ]
        # The tile read goes out BEAT_STAGES + actbuffer.READ_STAGES cycles after the
        # activation read, and the activation block's extra distribution stages later
        # (its OPERAND_STAGES - WEIGHT_STAGES), so that its word meets the clamped
        # block at the multipliers. The last of those registers is the tile buffer's (a
        # copy per bank), so here are the others.
        weight_lag = MVU_OPERAND_STAGES - MVU_WEIGHT_STAGES
        tile_addr = [
            Signal.like(self.tile_rd.addr, name=f"tile_a{i}")
            for i in range(ADDRESS_STAGES + BEAT_STAGES + actbuffer.READ_STAGES + weight_lag - 1)
        ]
        m.d.sync += tile_addr[0].eq((tile << lg(groups)) | g if groups > 1 else tile)
        m.d.sync += [a.eq(b) for a, b in zip(tile_addr[1:], tile_addr, strict=False)]
        m.d.comb += self.tile_rd.addr.eq(tile_addr[-1])
        # One cycle later the memories answer; the beat's control follows in registers.
        d_issue = Signal()
        d_first = Signal()
        d_last = Signal()
        d_g = Signal.like(g)
        d_inwin = Signal()
        d_odd = Signal()
        m.d.sync += [
            d_issue.eq(q_issue),
            d_first.eq(q_first),
            d_last.eq(q_last),
            d_g.eq(q_g),
            d_inwin.eq(q_inwin),
            d_odd.eq(ent[0]),
        ]
        # The exponent memories answer now; the mantissa banks register their words first
        # (actbuffer.READ_STAGES), so the exponents and the beat's control wait for them.
        # Both memories' words wait as they are (the wait is the block RAMs' output
        # register on ECP5) and the odd or even one is picked after.
        beat = [d_issue, d_first, d_last, d_g, d_inwin, d_odd]
        exps = [self.act_exp_rd0.data, self.act_exp_rd1.data]
        for stage in range(actbuffer.READ_STAGES):
            held = [Signal(v.shape(), name=f"a{stage}_{i}") for i, v in enumerate(beat)]
            # (no reset on the words' registers, as on a block RAM's output register)
            held_exps = [Signal(8, name=f"a{stage}_e{j}", reset_less=True) for j in range(2)]
            m.d.sync += [h.eq(v) for h, v in zip(held + held_exps, beat + exps, strict=True)]
            beat, exps = held, held_exps
        a_issue, a_first, a_last, a_g, a_inwin, a_odd = beat
        a_e = Mux(a_odd, exps[1], exps[0]).as_signed()
        # Beat stage B: the block's words, registered, with the beat's control.
        b_issue, b_first, b_last, b_g = Signal(), Signal(), Signal(), Signal.like(g)
        raw_q = Signal(n * 8)
        raw_e = Signal(signed(8))
        m.d.sync += [
            b_issue.eq(a_issue),
            b_first.eq(a_first),
            b_last.eq(a_last),
            b_g.eq(a_g),
            raw_q.eq(Mux(a_inwin, self.act_mant_rd.data, 0)),
            raw_e.eq(Mux(a_inwin, a_e, numerics.E_ZERO)),
        ]
        # Beat stage K: the clamp to the tensor grid (blocks below floor are shifted and
        # rounded onto it) worked out from the exponent, registered before the lanes move.
        k_issue, k_first, k_last, k_g = Signal(), Signal(), Signal(), Signal.like(g)
        k_q = Signal(n * 8)
        k_e = Signal(signed(8))
        # A shift down by 8 or more rounds every int8 lane to 0, as 8 does: saturated in
        # the register, the lanes' shifters see 4 bits. A block on or above the grid
        # shifts by 0, which leaves its lanes as they are (no round bit).
        down = Signal(range(9))
        k_shift = Signal(SHIFT_BITS)
        upsh = Signal(unsigned(16))
        m.d.comb += upsh.eq(raw_e - floor)
        m.d.sync += [
            k_issue.eq(b_issue),
            k_first.eq(b_first),
            k_last.eq(b_last),
            k_g.eq(b_g),
            k_q.eq(raw_q),
            k_e.eq(raw_e),
            down.eq(Mux(raw_e < floor, bfp.saturated_shift(m, floor - raw_e, 8, "clamp_down"), 0)),
            k_shift.eq(Mux(raw_e < floor, 0, Mux(upsh > 63, 63, upsh))),
        ]
        # Each lane's sticky limit is found as its word is registered into stage K, so the
        # clamp's sticky bit is a compare with the shift instead of a mask and an OR.
        limits = [Signal(range(10), name=f"clamp_lim{i}") for i in range(n)]
        m.d.sync += [
            lim.eq(bfp.sticky_limit(m, raw_q.word_select(i, 8), f"clamp_lw{i}"))
            for i, lim in enumerate(limits)
        ]
        # Beat stage C: the lanes shifted (quotient, round and sticky bits) and registered,
        # then rounded on their way to the reducers: the shifter and the rounding's carry
        # chain in one cycle ran into the MVU's port register (routed: 94 endpoints at
        # 12.6 ns).
        c_issue, c_first, c_last, c_g = Signal(), Signal(), Signal(), Signal.like(g)
        c_q = Signal(n * 8)
        c_e = Signal(signed(8))
        shift = Signal(SHIFT_BITS)
        m.d.sync += [
            c_issue.eq(k_issue),
            c_first.eq(k_first),
            c_last.eq(k_last),
            c_g.eq(k_g),
            c_q.eq(k_q),
            c_e.eq(k_e),
            shift.eq(k_shift),
        ]
        cq = []
        for i in range(n):
            qi = k_q.word_select(i, 8).as_signed()
            quot, sticky = bfp.rne_split(m, qi, down, f"clamp{i}", limit=limits[i], clamped=True)
            r_c = Signal.like(quot, name=f"clamp{i}_rq")
            sticky_c = Signal(name=f"clamp{i}_stq")
            m.d.sync += [r_c.eq(quot), sticky_c.eq(sticky)]
            cq.append(bfp.rne_round(m, r_c, sticky_c, f"clamp{i}"))
        tw = self.tile_rd.data
        m.d.comb += [
            mvu.valid.eq(c_issue & is_mvu),
            mvu.first.eq(c_first),
            mvu.last.eq(c_last),
            mvu.group.eq(c_g),
            mvu.act_shift.eq(shift),
        ]
        for i in range(n):
            m.d.comb += mvu.act[i].eq(cq[i])
        for lane in range(lanes):
            for c in range(n):
                m.d.comb += mvu.w[lane][c].eq(tw.word_select(lane * n + c, 8).as_signed())
            m.d.comb += mvu.w_exp[lane].eq(tw.word_select(lanes * n + lane, 8).as_signed())
        m.d.comb += mvu.wfloor.eq(r.wfloor)
        m.d.comb += [vec.mvu_valid.eq(mvu.out_valid), vec.mvu_acc.eq(mvu.acc)]

        # Pooling and elementwise chains sweep every beat once per lane group too (the
        # reducer works on the first group's beat), so every block takes at least N / lanes
        # beats; the sweep starts blocks at least as far apart as the vector pipeline's
        # phases (``spaced`` below).
        reduce_beat = Signal()
        m.d.comb += reduce_beat.eq(c_issue & (c_g == 0))

        # Pooling reducer: lane-wise max or sum of the grid values over the window. The
        # clamped mantissas are registered, then their grid values, so the clamp, the
        # shift onto the grid and the 48-bit add each have a cycle.
        # The reducer's copy of the block is its own register: as a plain one, synthesis
        # shared it with the MVU's port register (the same data), by the DSPs, and the
        # grid shifters read it from there (routed: 45 endpoints at 11.5 ns).
        pool_in = DistributionRegister(n * 8 + SHIFT_BITS, ecp5=self.ecp5)
        m.submodules.pool_in = pool_in
        m.d.comb += pool_in.d.eq(Cat(*[q[:8] for q in cq], shift))
        pool_q = [pool_in.q.word_select(i, 8).as_signed() for i in range(n)]
        pool_shift = pool_in.q[n * 8 :]
        p_beat, p_first, p_last = Signal(), Signal(), Signal()
        m.d.sync += [p_beat.eq(reduce_beat & is_pool), p_first.eq(c_first), p_last.eq(c_last)]
        grid = [Signal(signed(GRID_BITS), name=f"grid{i}") for i in range(n)]
        g_beat, g_first, g_last = Signal(), Signal(), Signal()
        m.d.sync += [a.eq(q << pool_shift) for a, q in zip(grid, pool_q, strict=True)]
        m.d.sync += [g_beat.eq(p_beat), g_first.eq(p_first), g_last.eq(p_last)]
        pacc = Signal(data.ArrayLayout(signed(POOL_BITS), n))
        pvalid = Signal()
        m.d.sync += pvalid.eq(0)
        with m.If(g_beat):
            for i in range(n):
                nv = Signal(signed(POOL_BITS), name=f"pnv{i}")
                with m.If(g_first):
                    m.d.comb += nv.eq(grid[i])
                with m.Elif(ops.pool_sum):
                    m.d.comb += nv.eq(pacc[i] + grid[i])
                with m.Else():
                    m.d.comb += nv.eq(Mux(grid[i] > pacc[i], grid[i], pacc[i]))
                m.d.sync += pacc[i].eq(nv)
            m.d.sync += pvalid.eq(g_last)
        m.d.comb += [vec.pool_valid.eq(pvalid), vec.pool_acc.eq(pacc)]
        m.d.comb += [
            vec.raw_valid.eq(reduce_beat & ~is_mvu & ~is_pool),
            vec.raw_q.eq(c_q),
            vec.raw_e.eq(c_e),
        ]

        # ---------------------------------------------------------------- control
        # Whether the next block may start: the writer has room for it and, with an AUX
        # operand, the AUX reader has queued it. A register, worked out for both values the
        # started-block count can take next (the 32-bit compares and the issue decision
        # then sit in different cycles; the routed critical path ran through both into the
        # sweep); the writer's and the AUX reader's counts are a cycle old there, which
        # only ever withholds a block for that cycle (all three counts restart at LAUNCH,
        # at least a cycle before RUN reads the credit).
        def fits(blocks: Value) -> Value:
            room = blocks - writer.written < WRITER_DEPTH - 2
            return room & (~ops.uses_aux | (aux.queued > blocks))

        credit = Signal()
        block_issued = Signal()  # a block starts this cycle
        m.d.sync += credit.eq(Mux(block_issued, fits(issued + 1), fits(issued)))
        # Blocks start at least P (the vector pipeline's phases) cycles apart: a down-count
        # from the last block's start, across the row change too. Only a vector taking
        # more phases than the MVU's lane groups needs it.
        vector_phases = phases(cfg)
        spacing = spaces_blocks(cfg)
        spaced = Signal(init=1)
        space_left = Signal(range(max(2, vector_phases)))
        launch = Signal()
        # (a, b, dst): stg[dst] = a * b, one a cycle through the multiplier's pipeline, so a
        # product another one reads comes at least MUL_LATENCY + 1 entries before it.
        setup = [
            (nr.ih, nr.iw, "pix_in"),
            (nr.oh, nr.ow, "pix_out"),
            (nr.iw, nr.icnt, "rowblocks"),
            ("dw", nr.icnt, "dw_c"),
            (nr.sw, nr.icnt, "sw_c"),
            (nr.pl, nr.icnt, "pl_c"),
            ("pix_in", nr.icb, "in_plane"),
            ("pix_out", nr.ocb, "out_plane"),
            ("pix_out", nr.acb, "aux_plane"),
            ("pix_out", nr.ocnt, "total"),
            ("dh", "rowblocks", "dh_rb"),
            (nr.sh, "rowblocks", "sh_rb"),
            (nr.pt, "rowblocks", "pt_rb"),
            # the rows a window spans less one (a v_pool's dh is 1, a chain without a
            # window's kh_m1 0); inferred, this product was a combinational MULT18X18D
            ("kh_m1", "dh", "span"),
        ]
        assert len(setup) == SETUP_PRODUCTS
        made_at = {dst: i for i, (_, _, dst) in enumerate(setup)}
        for j, (a, b, _) in enumerate(setup):
            for operand in (a, b):
                if isinstance(operand, str) and operand in made_at:
                    assert j > made_at[operand] + MUL_LATENCY, (operand, j)
        # The E registers in use as one-hot masks, so the sequencer's hazard check is an AND.
        stg_in_mask = Signal(16)
        # the masks of the chain the sequencer presents (staged as they are, and in use
        # from the cycle after it is taken: see the in-use registers below)
        offered_in_mask = Signal(16)
        offered_out_mask = Signal(16)
        m.d.comb += [
            offered_in_mask.eq(1 << self.in_ereg),
            offered_out_mask.eq(1 << self.out_ereg),
        ]
        m.d.comb += self.ready.eq(0)
        with m.FSM(name="setup") as setup_fsm:
            with m.State("IDLE"):
                m.d.comb += self.ready.eq(1)
                # Taken every idle cycle, not only on ``start``: the ~700 flip-flops'
                # enable is then this state's decode, not the sequencer's retire decision
                # (nothing reads them before the chain is staged).
                m.d.sync += [
                    nr.eq(self.regs),
                    nops.eq(self.ops),
                    stg["in_ereg"].eq(self.in_ereg),
                    stg["out_ereg"].eq(self.out_ereg),
                    stg["out_mask"].eq(offered_out_mask),
                    stg_in_mask.eq(offered_in_mask),
                    stg["halves"].eq(self.halves),
                ]
                with m.If(self.start):
                    m.next = "S0"
            with m.State("S0"):
                red = nops.reducer
                m.d.sync += [
                    stg["is_mvu"].eq(red == Reducer.MVU),
                    stg["is_pool"].eq(red == Reducer.POOL),
                    stg["ocnt_m1"].eq(nr.ocnt - 1),
                    stg["ow_m1"].eq(nr.ow - 1),
                    stg["oh_m1"].eq(nr.oh - 1),
                ]
                with m.If(red == Reducer.MVU):
                    m.d.sync += [
                        stg["dh"].eq(nr.dh), stg["dw"].eq(nr.dw),
                        stg["kh_m1"].eq(nr.kh - 1), stg["kw_m1"].eq(nr.kw - 1),
                        stg["cbn_m1"].eq(nr.icnt - 1),
                    ]  # fmt: skip
                with m.Elif(red == Reducer.POOL):
                    m.d.sync += [
                        stg["dh"].eq(1), stg["dw"].eq(1),
                        stg["kh_m1"].eq(nr.kh - 1), stg["kw_m1"].eq(nr.kw - 1),
                        stg["cbn_m1"].eq(0),
                    ]  # fmt: skip
                with m.Else():
                    m.d.sync += [
                        stg["dh"].eq(1), stg["dw"].eq(1),
                        stg["kh_m1"].eq(0), stg["kw_m1"].eq(0), stg["cbn_m1"].eq(0),
                    ]  # fmt: skip
                m.next = "P0"
            # P<i> feeds product i to the multiplier and takes product i - MUL_LATENCY.
            steps = len(setup) + MUL_LATENCY
            for i in range(steps):
                with m.State(f"P{i}"):
                    if i < len(setup):
                        a, b, _ = setup[i]
                        m.d.comb += [
                            mul_a.eq(stg[a] if isinstance(a, str) else a),
                            mul_b.eq(stg[b] if isinstance(b, str) else b),
                        ]
                    if i >= MUL_LATENCY:
                        m.d.sync += stg[setup[i - MUL_LATENCY][2]].eq(prod)
                    if i == 0:
                        m.d.sync += [
                            stg[f"{k}_m2"].eq(stg[f"{k}_m1"] - 1)
                            for k in ("kh", "kw", "cbn", "ocnt", "ow")
                        ]
                    if i + 1 < steps:
                        m.next = f"P{i + 1}"
                    else:
                        m.d.sync += [rem.eq(0), stg["ring_rows"].eq(0), div_i.eq(eb + 2)]
                        m.next = "DIV"
            # ring_rows = cap // rowblocks by restoring division, one bit per cycle.
            with m.State("DIV"):
                rr = stg["ring_rows"]
                bit = Const(cap, eb + 2).bit_select((div_i - 1)[: (eb + 2).bit_length()], 1)
                trial = Signal(eb + 4)
                m.d.comb += trial.eq((rem << 1) | bit)
                with m.If(trial >= stg["rowblocks"]):
                    m.d.sync += [rem.eq(trial - stg["rowblocks"]), rr.eq((rr << 1) | 1)]
                with m.Else():
                    m.d.sync += [rem.eq(trial), rr.eq(rr << 1)]
                m.d.sync += div_i.eq(div_i - 1)
                with m.If(div_i == 1):
                    m.next = "RING"
            with m.State("RING"):
                m.d.comb += [mul_a.eq(stg["ring_rows"]), mul_b.eq(stg["rowblocks"])]
                # A row is one segment when the chain reads every channel block of it.
                contiguous = nr.icnt == nr.icb
                rb = stg["rowblocks"]
                m.d.sync += [
                    stg["last_row_first"].eq(nr.ih - stg["span"]),
                    stg["too_tall"].eq(
                        (stg["ring_rows"] == 0) | (stg["ring_rows"] < stg["span"] + 1)
                    ),
                    stg["seg_blocks"].eq(Mux(contiguous, rb, nr.icnt)),
                    stg["segs_per_row"].eq(Mux(contiguous, 1, nr.iw)),
                    stg["seg_mstep"].eq(Mux(contiguous, rb << lg(n), nr.icb << lg(n))),
                    stg["seg_estep"].eq(Mux(contiguous, rb, nr.icb)),
                ]
                m.next = "RING1"
            # The ring product comes out of the multiplier's pipeline.
            for i in range(1, MUL_LATENCY + 1):
                with m.State(f"RING{i}"):
                    if i < MUL_LATENCY:
                        m.next = f"RING{i + 1}"
                    else:
                        m.d.sync += stg["ring"].eq(prod)
                        m.next = "READY"
            with m.State("READY"):
                with m.If(launch):
                    m.next = "IDLE"

        setup_ready = setup_fsm.ongoing("READY")

        def rows_loaded_for(row: Value) -> Value:
            """The activation loader has loaded input row ``row`` (or the whole input)."""
            return (act.rows_loaded.as_signed() > row) | (act.rows_loaded == r.ih)

        m.d.comb += self.done.eq(0)
        with m.FSM(name="run") as run_fsm:
            with m.State("IDLE"):
                m.d.comb += launch.eq(setup_ready)
                with m.If(setup_ready):
                    m.d.sync += [r.eq(nr), ops.eq(nops)]
                    staged_reduces = stg["is_mvu"] | stg["is_pool"]
                    same = last_valid & (last_key == input_key(nr))
                    m.d.sync += resident.eq(same & staged_reduces)
                    m.d.sync += [act_s[k].eq(stg[k]) for k in shapes]
                    m.d.sync += [
                        floor.eq(self.emax_val - cfg.act_exp_window),
                        self.error.eq(0),
                    ]
                    m.next = "LAUNCH"
            with m.State("LAUNCH"):
                m.d.comb += self.busy.eq(1)
                with m.If(act_s["too_tall"]):
                    m.d.sync += self.error.eq(ChainError.WINDOW_TOO_TALL)
                    m.next = "DRAIN"
                with m.Else():
                    m.d.comb += [
                        act.start.eq(1),
                        act.resident.eq(resident),
                        writer.start.eq(1),
                        aux.start.eq(ops.uses_aux),
                        vec.start.eq(1),
                    ]
                    m.d.sync += [
                        last_key.eq(input_key(r)),
                        last_valid.eq((is_mvu | is_pool) & (ring_rows >= r.ih)),
                        oy.eq(0),
                        ox.eq(0),
                        row_first.eq(-r.pt),
                        row_last.eq(span - r.pt),
                        col_first.eq(-r.pl),
                        row_addr_first.eq(ring - pt_rb),
                        col_addr_first.eq(-pl_c),
                        issued.eq(0),
                        act.need_lo.eq(0),
                    ]
                    m.next = "ROW_WRAP"
            # Bring the ring address of the row's first kernel row into [0, ring).
            with m.State("ROW_WRAP"):
                m.d.comb += self.busy.eq(1)
                with m.If(row_addr_first < 0):
                    m.d.sync += row_addr_first.eq(row_addr_first + ring)
                with m.Elif(row_addr_first >= ring):
                    m.d.sync += row_addr_first.eq(row_addr_first - ring)
                with m.Else():
                    # The window's last row, or the input's: compared with the first row
                    # rather than summed then compared, so that ROW_WAIT starts from a
                    # register (the sum, compare and clamp there were a routed critical path).
                    beyond = row_first >= act_s["last_row_first"]
                    # rows_loaded_for(ih - 1) is rows_loaded >= ih: both compares side by
                    # side, from registers, and the choice after them
                    m.d.sync += [
                        need.eq(Mux(beyond, r.ih - 1, row_last)),
                        rows_ok.eq(Mux(beyond, act.rows_loaded >= r.ih, rows_loaded_for(row_last))),
                        act.need_lo.eq(Mux(row_first < 0, 0, row_first)),
                    ]
                    m.next = "ROW_WAIT"
            with m.State("ROW_WAIT"):
                m.d.sync += self.stall_rows.eq(self.stall_rows + 1)
                # the loader's count seen a cycle late: it only grows during a chain
                m.d.sync += rows_ok.eq(rows_loaded_for(need))
                with m.If(rows_ok):
                    m.d.sync += [
                        col_first.eq(-r.pl),
                        col_addr_first.eq(-pl_c),
                        ix.eq(-r.pl),
                        col_addr.eq(-pl_c),
                        iy.eq(row_first),
                        row_addr.eq(row_addr_first),
                        g.eq(0),
                        tile.eq(ops.tile),
                        *restart(cb, cb_last, "cbn"),
                        *restart(kx, kx_last, "kw"),
                        *restart(ky, ky_last, "kh"),
                        *restart(ob, ob_last, "ocnt"),
                        *restart(ox, ox_last, "ow"),
                        at_first.eq(1),
                    ]
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += self.busy.eq(1)
                block_start = first & (g == 0)
                with m.If(block_start & ~credit):
                    m.d.sync += self.stall_credit.eq(self.stall_credit + 1)
                with m.If(~block_start | (credit & spaced)):
                    m.d.comb += issue.eq(1)
                    with m.If(block_start):
                        m.d.comb += block_issued.eq(1)
                        m.d.sync += issued.eq(issued + 1)
                        if spacing:
                            m.d.sync += [spaced.eq(0), space_left.eq(vector_phases - 2)]
                    with m.If(is_mvu):
                        m.d.sync += tile.eq(Mux(g == groups - 1, tile + 1, tile))
                    m.d.sync += g.eq(g + 1)
                    with m.If(g == groups - 1):
                        m.d.sync += [g.eq(0), *step(cb, cb_last, "cbn")]
                        m.d.sync += at_first.eq(cb_last & kx_last & ky_last)
                        with m.If(cb_last):
                            m.d.sync += restart(cb, cb_last, "cbn") + step(kx, kx_last, "kw")
                            m.d.sync += [ix.eq(ix + dw), col_addr.eq(col_addr + dw_c)]
                            with m.If(kx_last):
                                m.d.sync += [*restart(kx, kx_last, "kw"), ix.eq(col_first)]
                                m.d.sync += col_addr.eq(col_addr_first)
                                m.d.sync += step(ky, ky_last, "kh")
                                m.d.sync += iy.eq(iy + dh)
                                nra = row_addr + dh_rb
                                m.d.sync += row_addr.eq(Mux(nra >= ring, nra - ring, nra))
                                with m.If(ky_last):
                                    m.d.sync += [
                                        *restart(ky, ky_last, "kh"),
                                        iy.eq(row_first),
                                        row_addr.eq(row_addr_first),
                                        *step(ob, ob_last, "ocnt"),
                                    ]
                                    with m.If(ob_last):
                                        m.d.sync += restart(ob, ob_last, "ocnt")
                                        m.d.sync += tile.eq(ops.tile)
                                        nxt_c = col_first + r.sw
                                        nxt_ca = col_addr_first + sw_c
                                        m.d.sync += [
                                            *step(ox, ox_last, "ow"),
                                            col_first.eq(nxt_c),
                                            col_addr_first.eq(nxt_ca),
                                            ix.eq(nxt_c),
                                            col_addr.eq(nxt_ca),
                                        ]
                                        with m.If(ox_last):
                                            m.next = "ROW_NEXT"
            with m.State("ROW_NEXT"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [
                    oy.eq(oy + 1),
                    row_first.eq(row_first + r.sh),
                    row_last.eq(row_last + r.sh),
                    row_addr_first.eq(row_addr_first + sh_rb),
                ]
                with m.If(oy == act_s["oh_m1"]):
                    m.next = "DRAIN"
                with m.Else():
                    m.next = "ROW_WRAP"
            with m.State("DRAIN"):
                with m.If(self.error != 0):
                    m.d.comb += self.done.eq(1)
                    m.next = "SETTLE"
                with m.Elif(~writer.busy & (writer.written == total) & ~act.busy):
                    m.d.comb += self.done.eq(1)
                    m.next = "SETTLE"
            # The chain is complete (not busy) while the sequencer's E register update lands.
            with m.State("SETTLE"):
                m.next = "IDLE"
        if spacing:
            with m.If(~spaced):
                m.d.sync += space_left.eq(space_left - 1)
                with m.If(space_left == 0):
                    m.d.sync += spaced.eq(1)
        m.d.comb += self.act_streaming.eq(act.streaming)
        run_busy = ~run_fsm.ongoing("IDLE") & ~run_fsm.ongoing("SETTLE")
        staged = ~setup_fsm.ongoing("IDLE")
        m.d.comb += self.busy.eq(run_busy | staged)
        # The in-use masks are registered, so the sequencer's hazard checks start from
        # flip-flops rather than from this engine's state decode (a routed critical path).
        # Each cycle they take what is in use now plus the chain being accepted: always a
        # superset of what is in use (a chain moves from staged to running, never back),
        # which frees a resource one cycle late at worst.
        accepted = self.ready & self.start
        m.d.sync += [
            self.eregs_in_use.eq(
                Mux(run_busy, act_s["out_mask"], 0)
                | Mux(staged, stg["out_mask"] | stg_in_mask, 0)
                | Mux(accepted, offered_out_mask | offered_in_mask, 0)
            ),
            self.halves_in_use.eq(
                Mux(run_busy, act_s["halves"], 0)
                | Mux(staged, stg["halves"], 0)
                | Mux(accepted, self.halves, 0)
            ),
        ]
        return m
