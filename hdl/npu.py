"""The NPU top: control/status port, instruction memory, sequencer, buffers and units.

Host protocol (``docs/hardware.md``): write the program words through ``prog_we`` /
``prog_addr`` / ``prog_data`` while idle, put the DRAM image in DRAM, pulse ``start``;
``busy`` stays high until ``halt`` has retired and every unit is idle, then ``done`` rises
(or ``error`` holds a nonzero code and the NPU stops); ``cycles`` counts from ``start``.

The sequencer issues one instruction per cycle. ``s_wr`` writes the register file. Loads
(``m_rd``, ``c_rd``, ``s_ld``) go to the load unit, which runs beside the chain engine; a
load waits while the running chain reads the buffer half it targets. A chain
(``v_rd`` .. ``end_chain``) is collected into its op configuration; at ``end_chain`` the
sequencer waits for the datapath and the pending loads, latches the control registers into
the chain engine and moves on. When a chain completes, ``E[OUT_EREG]`` is max-updated with
the largest exponent it wrote.
"""

from types import SimpleNamespace

from amaranth import Array, Cat, Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from tessera import isa
from tessera.config import NPUConfig
from tessera.hdl.actbuffer import ActBuffer
from tessera.hdl.actloader import act_entries
from tessera.hdl.arbiter import Arbiter
from tessera.hdl.blockram import BlockRam
from tessera.hdl.bus import MemBus
from tessera.hdl.chain import ChainEngine
from tessera.hdl.decoder import Decoded, Decoder, Opcode
from tessera.hdl.loader import Loader, LoadKind, load_beats, vrf_word_bits
from tessera.hdl.params import MFU_SLOTS, ChainOps, ChainRegs, MfuOp, Reducer
from tessera.hdl.tilebuffer import TileBuffer
from tessera.isa import Reg

#: Instruction memory words (the host loads the program here before ``start``).
IMEM_DEPTH = 4096
CTRL_REGS = 32
#: Fetched instruction words queued behind the one retiring. With it, five keep the
#: sequencer at one per cycle: the one retiring, the one decoded into a register, the one
#: in the memory's output register, the one the memory is reading, the one asked for.
FETCH_QUEUE = 4
#: The load unit sits away from the sequencer: a load's command reaches it through a
#: register, and its ``busy`` comes back through one, so neither crossing has the logic of
#: both ends in one cycle (the placed critical path ran from the load unit's burst length
#: through its busy into the sequencer's retire decision).
LOAD_COMMAND_STAGES = 1
LOAD_BUSY_LAG = 1
#: The same for the chain engine: a chain's hand-over reaches it through a register, and
#: its ``ready`` comes back through one.
HANDOVER_STAGES = 1
READY_LAG = 1
#: And its ``busy``: the sequencer sees the engine idle a cycle after it is (a load into
#: the half a chain read, and the drain at ``halt``, wait that cycle).
RUNNING_LAG = 1


#: The retire decision's classes of opcode, one flag each in a fetch queue entry (set as
#: the word is decoded, so the decision tests flags instead of decoding the opcode).
RetireKind = data.StructLayout(
    {
        "free_exec": 1,  # retires in EXEC whenever the sequencer runs: nop, v_rd
        "free_chain": 1,  # retires inside a chain: its body, v_rd .. end_chain exclusive
        "s_wr": 1,
        "s_ld": 1,
        "load": 1,  # m_rd, c_rd
        "m_rd": 1,
        "end": 1,  # end_chain
    }
)
CHAIN_BODY = (
    Opcode.MV_MUL,
    Opcode.V_POOL,
    Opcode.VV_ADD,
    Opcode.VV_MUL,
    Opcode.VV_MAX,
    Opcode.V_RELU,
    Opcode.V_WR,
)


def _any_of(opcode: Value, *codes: Opcode) -> Value:
    """``opcode`` is one of ``codes``."""
    out = opcode == codes[0]
    for c in codes[1:]:
        out = out | (opcode == c)
    return out


def _registered_into(
    m: Module, unit: wiring.Component, prefix: str, ports: tuple[str, ...]
) -> SimpleNamespace:
    """Signals the sequencer drives, one per named input port of ``unit``, each reaching
    the port through a register (the unit sits away from the sequencer)."""
    drive = SimpleNamespace(
        **{p: Signal.like(getattr(unit, p), name=f"{prefix}_{p}") for p in ports}
    )
    m.d.sync += [getattr(unit, p).eq(getattr(drive, p)) for p in ports]
    return drive


class Error:
    """Codes of the ``error`` status register."""

    NONE = 0
    BAD_INSTRUCTION = 0x01
    OUTSIDE_CHAIN = 0x02  # a chain op outside v_rd .. end_chain, or a malformed chain
    TOO_MANY_MFU_OPS = 0x03
    MUL_NOT_FIRST = 0x04
    TOO_MANY_VRF_OPS = 0x05
    BAD_EXP_REG = 0x06
    PC_OVERFLOW = 0x07


class NPU(wiring.Component):
    def __init__(self, cfg: NPUConfig, *, imem_depth: int = IMEM_DEPTH, ecp5: bool = False):
        self.cfg = cfg
        self.imem_depth = imem_depth
        self.ecp5 = ecp5
        super().__init__(
            {
                "prog_we": In(1),
                "prog_addr": In(range(imem_depth)),
                "prog_data": In(isa.WORD_BITS),
                "start": In(1),
                "busy": Out(1),
                "done": Out(1),
                "error": Out(8),
                "cycles": Out(48),
                "pc": Out(range(imem_depth + 1)),
                "mem": Out(MemBus),
            }
        )

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg

        # ------------------------------------------------------------ memories
        # (Every memory is a BlockRam: a read in the cycle that writes its word is undefined.)
        ecp5 = self.ecp5
        m.submodules.imem = imem = BlockRam(width=isa.WORD_BITS, depth=self.imem_depth, ecp5=ecp5)
        iw, ir = imem.wr, imem.rd0
        m.d.comb += [iw.en.eq(self.prog_we), iw.addr.eq(self.prog_addr), iw.data.eq(self.prog_data)]
        # Each word's validity (the decoder's deepest output: its reserved-bit and enum
        # checks) is worked out as the host writes the word, landing a cycle later in a
        # 1-bit memory beside the words, and fetched with it: the decoder in the fetch
        # path then only slices fields.
        m.submodules.imem_ok = imem_ok = BlockRam(width=1, depth=self.imem_depth, ecp5=ecp5)
        m.submodules.dec_prog = dec_prog = Decoder()
        ok_w, ok_r = imem_ok.wr, imem_ok.rd0
        m.d.comb += dec_prog.word.eq(self.prog_data)
        m.d.sync += [
            ok_w.en.eq(self.prog_we),
            ok_w.addr.eq(self.prog_addr),
            ok_w.data.eq(dec_prog.out.valid),
        ]
        m.submodules.tiles = tiles = TileBuffer(cfg, ecp5=self.ecp5)
        m.submodules.vrf = vrf = BlockRam(
            width=vrf_word_bits(cfg), depth=cfg.vrf_depth, reads=2, granularity=16, ecp5=ecp5
        )
        cap = act_entries(cfg)
        m.submodules.act_mant = act_mant = ActBuffer.for_config(cfg, ecp5=ecp5)
        half = (cap + 1) // 2
        m.submodules.act_exp0 = act_exp0 = BlockRam(width=8, depth=half, ecp5=ecp5)
        m.submodules.act_exp1 = act_exp1 = BlockRam(width=8, depth=half, ecp5=ecp5)

        m.submodules.dec_in = dec_in = Decoder()
        m.submodules.loader = loader = Loader(cfg)
        m.submodules.chain = chain = ChainEngine(cfg, ecp5=self.ecp5)
        m.submodules.arb = arb = Arbiter(5)
        wiring.connect(m, wiring.flipped(self.mem), arb.mem)
        wiring.connect(m, chain.out_bus, arb.p0)
        wiring.connect(m, chain.out_ebus, arb.p1)
        wiring.connect(m, chain.aux_bus, arb.p2)
        wiring.connect(m, chain.act_bus, arb.p3)
        wiring.connect(m, loader.bus, arb.p4)
        m.d.comb += loader.hold.eq(chain.act_streaming)
        # The sequencer's load command, registered on its way; the load unit's busy,
        # registered on its way back. The sequencer counts the unit busy from the cycle
        # after it starts a load until the registered busy shows it.
        ld = _registered_into(m, loader, "ld", ("start", "kind", "index", "beats", "addr"))
        # One flip-flop, as the retire decision reads it: the unit's busy of the last cycle,
        # or a load started in the last LOAD_COMMAND_STAGES + LOAD_BUSY_LAG cycles.
        started = Signal(LOAD_COMMAND_STAGES + LOAD_BUSY_LAG - 1)  # the earlier starts
        ld_busy = Signal()
        m.d.sync += [
            ld_busy.eq(loader.busy | ld.start | started.any()),
            started.eq(Cat(ld.start, started[:-1])),
        ]
        wiring.connect(m, loader.tile_wr, tiles.wr)
        wiring.connect(m, loader.vrf_wr, vrf.wr)
        wiring.connect(m, chain.tile_rd, tiles.rd)
        wiring.connect(m, chain.vrf0, vrf.rd0)
        wiring.connect(m, chain.vrf1, vrf.rd1)
        wiring.connect(m, chain.act_mant_wr, act_mant.wr)
        wiring.connect(m, chain.act_exp_wr0, act_exp0.wr)
        wiring.connect(m, chain.act_exp_wr1, act_exp1.wr)
        wiring.connect(m, chain.act_mant_rd, act_mant.rd)
        wiring.connect(m, chain.act_exp_rd0, act_exp0.rd0)
        wiring.connect(m, chain.act_exp_rd1, act_exp1.rd0)

        # ------------------------------------------------------------ registers
        ctrl = Signal(data.ArrayLayout(signed(32), CTRL_REGS))
        eregs = Signal(data.ArrayLayout(signed(16), isa.EXP_REG_COUNT))

        def creg(reg: Reg):
            return ctrl[int(reg)]

        # ------------------------------------------------------------ sequencer
        # Fetch runs ahead of the sequencer into a queue of FETCH_QUEUE registered words, so
        # neither the instruction memory's clock-to-output nor its address set-up is in the
        # cycle that decodes an instruction and decides whether it retires (the program has
        # no jumps: fetch is sequential).
        pc = Signal(range(self.imem_depth + 1))  # the address of the queue's head
        advance = Signal()  # the head retires this cycle
        fpc = Signal(range(self.imem_depth + 1))
        fetching = Signal()
        inflight = Signal()  # the memory answers a read of the last cycle
        count = Signal(range(FETCH_QUEUE + 2), name="iq_count")
        m.d.comb += [ir.addr.eq(fpc), ir.en.eq(1), ok_r.addr.eq(fpc), ok_r.en.eq(1), self.pc.eq(pc)]
        fetch = Signal()
        landed = Signal()  # ``word`` holds the answer to the read before last
        arriving = Signal()  # ``staged`` holds that word decoded, a cycle later
        # (no reset: on ECP5 these are the block RAMs' output registers)
        word = Signal(isa.WORD_BITS, name="fetched", reset_less=True)
        m.d.comb += fetch.eq(fetching & (count + inflight + landed + arriving < FETCH_QUEUE + 1))
        m.d.sync += [
            inflight.eq(fetch),
            landed.eq(inflight),
            arriving.eq(landed),
            fpc.eq(fpc + fetch),
        ]
        word_ok = Signal(name="fetched_ok", reset_less=True)
        m.d.sync += [word.eq(ir.data), word_ok.eq(ok_r.data)]
        pc_next = Signal.like(pc)
        m.d.comb += pc_next.eq(pc + 1)
        # pc >= imem_depth - 1 (no room for another word), kept as a flag beside pc so the
        # retire decision does not compare pc.
        pc_at_end = Signal()
        m.d.sync += [count.eq(count - advance + arriving), pc.eq(Mux(advance, pc_next, pc))]
        with m.If(advance):
            m.d.sync += pc_at_end.eq(pc_next >= self.imem_depth - 1)

        def ereg_ok(v):
            return (v >= isa.EXP_REG_BASE) & (v < isa.EXP_REG_BASE + isa.EXP_REG_COUNT)

        # Words are decoded into a register before they enter the queue, so the queue holds
        # what the retire decision reads: the decoded fields, and flags worked out from
        # them (the decision then only selects, and the decoder is not between it, or the
        # queue's registers, and the next word).
        # ``ereg``: E register ``reg`` as a one-hot mask (0 if ``reg`` is not one), so the
        # hazard check against the chains' E registers is an AND; ``ctrl``: ``reg`` is a
        # control register; ``half``: the buffer half an m_rd / c_rd loads (1 or 2, as the
        # chain engine's half masks).
        tiles_half = cfg.tile_buffer_tiles
        vrf_half = cfg.vrf_depth // 2
        # ``kind``: the opcode's class as the retire decision tests it (one flag each).
        entry = data.StructLayout(
            {
                "dec": Decoded,
                "kind": RetireKind,
                "ereg": isa.EXP_REG_COUNT,
                "ctrl": 1,
                "half": 2,
            }
        )
        m.d.comb += dec_in.word.eq(word)
        dec = dec_in.out
        op_in = dec.opcode
        m_rd_in = op_in == Opcode.M_RD
        upper = Mux(m_rd_in, dec.tile >= tiles_half, dec.vrf >= vrf_half)
        incoming = Signal(entry)
        m.d.comb += [
            incoming.dec.eq(dec),
            incoming.dec.valid.eq(word_ok),
            incoming.kind.free_exec.eq(_any_of(op_in, Opcode.NOP, Opcode.V_RD)),
            incoming.kind.free_chain.eq(_any_of(op_in, *CHAIN_BODY)),
            incoming.kind.s_wr.eq(op_in == Opcode.S_WR),
            incoming.kind.s_ld.eq(op_in == Opcode.S_LD),
            incoming.kind.load.eq(_any_of(op_in, Opcode.M_RD, Opcode.C_RD)),
            incoming.kind.m_rd.eq(m_rd_in),
            incoming.kind.end.eq(op_in == Opcode.END_CHAIN),
            incoming.ereg.eq(Mux(ereg_ok(dec.reg), 1 << dec.reg[:4], 0)),
            incoming.ctrl.eq(dec.reg < CTRL_REGS),
            incoming.half.eq(Mux(upper, 2, 1)),
        ]
        staged = Signal(entry, reset_less=True)
        m.d.sync += staged.eq(incoming)
        # The queue is its head (the instruction retiring when ``advance``) and a ring of
        # the words behind it, which never moves: an arriving word is written at ``wr``
        # every time (only the pointers say whether it was kept), so ``advance`` reaches
        # the head and two pointers, not every entry.
        assert FETCH_QUEUE & (FETCH_QUEUE - 1) == 0, "the ring's pointers wrap by overflow"
        head = Signal(entry, name="iq_head")
        ring = [Signal(entry, name=f"iq{i}") for i in range(FETCH_QUEUE)]
        rd = Signal(range(FETCH_QUEUE), name="iq_rd")
        wr = Signal(range(FETCH_QUEUE), name="iq_wr")
        direct = Signal()  # the arriving word becomes the head
        take = Signal()  # the head is refilled from the ring
        m.d.comb += [
            direct.eq(arriving & ((count == 0) | (advance & (count == 1)))),
            take.eq(advance & (count > 1)),
        ]
        ring_head = Signal(entry)  # the ring's oldest word, the head after this one
        m.d.comb += ring_head.eq(Array(ring)[rd])
        with m.If(direct):
            m.d.sync += head.eq(staged)
        with m.Elif(take):
            m.d.sync += head.eq(ring_head)
        for i in range(FETCH_QUEUE):
            with m.If(arriving & (wr == i)):
                m.d.sync += ring[i].eq(staged)
        m.d.sync += [rd.eq(rd + take), wr.eq(wr + (arriving & ~direct))]
        d, d_ereg, d_ctrl = head.dec, head.ereg, head.ctrl
        kind = head.kind

        # s_wr and s_ld write their register a cycle after they retire, from a write stage
        # (value, register, one-hot E mask, control flag): the retire decision then enables
        # these few flip-flops instead of the 32 control and 16 E registers (1,280 flip-flops,
        # the placed critical path), whose enables come from the stage's flip-flops.
        # Nothing reads the register in that cycle: a v_rd retires between an s_wr / s_ld
        # and the end_chain that hands its registers over, an E register's readers are
        # chains handed over after it, and a chain's own E register update waits for the
        # chain (the S_WR hazard check), so the later write wins in program order too.
        sw_value = Signal(signed(32))
        sw_reg = Signal(5)
        sw_ctrl = Signal()
        sw_ereg = Signal(isa.EXP_REG_COUNT)
        m.d.sync += [sw_reg.eq(d.reg[:5]), sw_ctrl.eq(0), sw_ereg.eq(0)]

        ops = Signal(ChainOps)
        slot = Signal(range(MFU_SLOTS + 1))
        vrf_ops = Signal(2)
        running = Signal()
        # A chain's hand-over crosses to the chain engine through registers (its start, the
        # E registers and buffer halves it names, its control registers and ops), and the
        # engine's ready comes back through one. Until the engine's registered state shows
        # the chain (two cycles), the sequencer counts it in itself: in use, running, the
        # engine not ready.
        ch = _registered_into(
            m, chain, "ch", ("start", "in_ereg", "out_ereg", "halves", "regs", "ops")
        )
        # ``engine_ready``: the engine was ready last cycle and no chain is being handed
        # (one flip-flop, as the retire decision reads it).
        handed = Signal(HANDOVER_STAGES + READY_LAG - 1)  # the earlier hand-overs
        engine_ready = Signal()
        m.d.sync += [
            engine_ready.eq(chain.ready & ~ch.start & ~handed.any()),
            handed.eq(Cat(ch.start, handed[:-1])),
        ]
        handed_eregs = Signal(isa.EXP_REG_COUNT)
        handed_halves = Signal(4)
        with m.If(ch.start):
            m.d.sync += [
                handed_eregs.eq((1 << ch.in_ereg) | (1 << ch.out_ereg)),
                handed_halves.eq(ch.halves),
            ]
        # The head's hazards, as the retire decision reads them: ``e_busy``, it writes an E
        # register an in-flight chain still reads or updates; ``clash``, it loads a buffer
        # half a chain in the engine reads. Each is worked out a cycle ahead for every
        # word that may become the head, into flip-flops, and picked by how the head
        # changed (see the flags' update below).
        e_busy = Signal()
        clash = Signal()

        # chain completion: max-update E[OUT_EREG], from registers: the chain engine's
        # completion logic and the E registers sit apart (the placed critical path ran from
        # the activation loader's state through ``done`` into every E register). The engine
        # launches its next chain a cycle later to match (``chain.DONE_TO_LAUNCH``).
        done_r = Signal()
        done_ereg_r = Signal(4)
        done_emax_r = Signal(signed(16))
        done_error_r = Signal(8)
        m.d.sync += [
            done_r.eq(chain.done),
            done_ereg_r.eq(chain.done_ereg),
            done_emax_r.eq(chain.emax_out),
            done_error_r.eq(chain.error),
        ]
        m.d.comb += chain.emax_val.eq(eregs[chain.emax_idx])
        # A chain failed since ``start`` (the sequencer's own errors stop it at once, so in
        # EXEC this is ``error != 0``, as one flip-flop for the retire decision).
        chain_failed = Signal()
        with m.If(done_r):
            with m.If(done_error_r != 0):
                m.d.sync += [self.error.eq(done_error_r), chain_failed.eq(1)]
            # each E register compares itself with the chain's maximum: no 16-way read of
            # E[done_ereg] in front of the compare and the write back
            for i in range(isa.EXP_REG_COUNT):
                with m.If((done_ereg_r == i) & (done_emax_r > eregs[i])):
                    m.d.sync += eregs[i].eq(done_emax_r)
        # One flip-flop, as the retire decision reads it: the engine was busy last cycle,
        # or a chain is being handed over (the engine's state decode was on the placed
        # critical path into the sequencer's decode).
        m.d.sync += running.eq(chain.busy | ch.start | handed.any())

        with m.If(self.busy):
            m.d.sync += self.cycles.eq(self.cycles + 1)

        def fail(code):
            return [self.error.eq(code)]

        # register the chain's parameters for the engine
        regs = Signal(ChainRegs)
        R = Reg
        m.d.comb += [
            regs.in_addr.eq(creg(R.IN_ADDR)),
            regs.ih.eq(creg(R.IN_H)),
            regs.iw.eq(creg(R.IN_W)),
            regs.icb.eq(creg(R.IN_CB)),
            regs.ioff.eq(creg(R.IN_CB_OFF)),
            regs.icnt.eq(creg(R.IN_CB_CNT)),
            regs.kh.eq(creg(R.K_H)),
            regs.kw.eq(creg(R.K_W)),
            regs.sh.eq(creg(R.STRIDE_H)),
            regs.sw.eq(creg(R.STRIDE_W)),
            regs.pt.eq(creg(R.PAD_T)),
            regs.pl.eq(creg(R.PAD_L)),
            regs.dh.eq(creg(R.DIL_H)),
            regs.dw.eq(creg(R.DIL_W)),
            regs.out_addr.eq(creg(R.OUT_ADDR)),
            regs.oh.eq(creg(R.OUT_H)),
            regs.ow.eq(creg(R.OUT_W)),
            regs.ocb.eq(creg(R.OUT_CB)),
            regs.ooff.eq(creg(R.OUT_CB_OFF)),
            regs.ocnt.eq(creg(R.OUT_CB_CNT)),
            regs.aux_addr.eq(creg(R.AUX_ADDR)),
            regs.acb.eq(creg(R.AUX_CB)),
            regs.aoff.eq(creg(R.AUX_CB_OFF)),
            regs.wfloor.eq(creg(R.W_EXP_FLOOR)),
            ch.regs.eq(regs),
            ch.ops.eq(ops),
        ]
        # The rest of a hand-over and a load's command are driven every cycle too: only
        # ``start`` comes from the retire decision (the units take the rest with it), so
        # the decision does not reach the other flip-flops of either crossing.
        th = Mux(ops.tile >= tiles_half, 2, 1)
        vh = 0
        for i in range(MFU_SLOTS):
            sl = ops.slots[i]
            use = (sl.op != MfuOp.NONE) & (sl.op != MfuOp.RELU) & ~sl.aux
            vh = vh | Mux(use, Mux(sl.vrf >= vrf_half, 2, 1), 0)
        m.d.comb += [
            ch.in_ereg.eq(creg(R.IN_EREG)[:4]),
            ch.out_ereg.eq(creg(R.OUT_EREG)[:4]),
            ch.halves.eq(Cat(Mux(ops.reducer == Reducer.MVU, th, 0)[:2], vh[:2])),
        ]
        m.d.comb += [
            ld.kind.eq(
                Mux(
                    d.opcode == Opcode.S_LD,
                    LoadKind.SCALAR,
                    Mux(kind.m_rd, LoadKind.TILES, LoadKind.CONSTS),
                )
            ),
            ld.index.eq(Mux(kind.m_rd, d.tile, d.vrf)),
            ld.beats.eq(load_beats(cfg, kind.m_rd, d.count)),
            ld.addr.eq(d.addr),
        ]

        # The chain's E register numbers are valid: flags set as the write stage writes
        # IN_EREG / OUT_EREG, so the compares on 32-bit values are not in the cycle of the
        # retire decision and the flags are current when the registers are.
        in_ereg_ok = Signal()
        out_ereg_ok = Signal()
        chain_eregs_ok = Signal()
        m.d.comb += chain_eregs_ok.eq(in_ereg_ok & out_ereg_ok)

        with m.FSM() as seq_fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [
                        pc.eq(0),
                        pc_at_end.eq(self.imem_depth <= 1),
                        fpc.eq(0),
                        count.eq(0),
                        rd.eq(0),
                        wr.eq(0),
                        inflight.eq(0),
                        landed.eq(0),
                        arriving.eq(0),
                        fetching.eq(1),
                        self.busy.eq(1),
                        self.done.eq(0),
                        self.error.eq(0),
                        chain_failed.eq(0),
                        self.cycles.eq(0),
                    ]
                    m.d.sync += [eregs[i].eq(-128) for i in range(isa.EXP_REG_COUNT)]
                    m.d.sync += [ctrl[i].eq(0) for i in range(CTRL_REGS)]
                    m.d.sync += [in_ereg_ok.eq(ereg_ok(0)), out_ereg_ok.eq(ereg_ok(0))]
                    m.next = "FETCH"
            with m.State("FETCH"):
                with m.If(arriving):  # the first word is in the queue next cycle
                    m.next = "EXEC"
            with m.State("EXEC"):
                with m.If(chain_failed):
                    m.next = "STOP"
                with m.Elif(count == 0):
                    pass  # the next word is still on its way
                with m.Elif(~d.valid):
                    m.d.sync += fail(Error.BAD_INSTRUCTION)
                    m.next = "STOP"
                with m.Elif(pc_at_end):
                    m.d.sync += fail(Error.PC_OVERFLOW)
                    m.next = "STOP"
                with m.Else():
                    with m.Switch(d.opcode):
                        with m.Case(Opcode.NOP):
                            pass  # retires (``advance`` below)
                        with m.Case(Opcode.HALT):
                            m.next = "DRAIN"
                        with m.Case(Opcode.S_WR):
                            # An E register an in-flight chain still reads or updates is
                            # written only after that chain (program order).
                            m.d.sync += sw_ctrl.eq(d_ctrl)
                            with m.If(~e_busy):
                                m.d.sync += sw_ereg.eq(d_ereg)
                        with m.Case(Opcode.S_LD):
                            with m.If(~ld_busy & ~e_busy):
                                m.d.comb += ld.start.eq(1)
                                m.next = "SCALAR"
                        with m.Case(Opcode.M_RD, Opcode.C_RD):
                            with m.If(~ld_busy & ~clash):
                                m.d.comb += ld.start.eq(1)
                        with m.Case(Opcode.V_RD):
                            m.d.sync += [ops.eq(0), slot.eq(0), vrf_ops.eq(0)]
                            m.next = "CHAIN"
                        with m.Default():
                            m.d.sync += fail(Error.OUTSIDE_CHAIN)
                            m.next = "STOP"
            with m.State("SCALAR"):
                with m.If(loader.scalar_valid):
                    m.d.sync += [sw_ctrl.eq(d_ctrl), sw_ereg.eq(d_ereg)]
                    m.next = "EXEC"
            with m.State("CHAIN"):
                s = ops.slots[slot[:2]]
                with m.If(count == 0):
                    pass  # the next word is still on its way
                with m.Elif(~d.valid):
                    m.d.sync += fail(Error.BAD_INSTRUCTION)
                    m.next = "STOP"
                with m.Else():
                    with m.Switch(d.opcode):
                        with m.Case(Opcode.MV_MUL):
                            m.d.sync += [ops.reducer.eq(Reducer.MVU), ops.tile.eq(d.tile)]
                        with m.Case(Opcode.V_POOL):
                            m.d.sync += [ops.reducer.eq(Reducer.POOL), ops.pool_sum.eq(d.op)]
                        with m.Case(Opcode.VV_ADD, Opcode.VV_MUL, Opcode.VV_MAX, Opcode.V_RELU):
                            op = Signal(MfuOp)
                            with m.Switch(d.opcode):
                                with m.Case(Opcode.VV_ADD):
                                    m.d.comb += op.eq(MfuOp.ADD)
                                with m.Case(Opcode.VV_MUL):
                                    m.d.comb += op.eq(MfuOp.MUL)
                                with m.Case(Opcode.VV_MAX):
                                    m.d.comb += op.eq(MfuOp.MAX)
                                with m.Case(Opcode.V_RELU):
                                    m.d.comb += op.eq(MfuOp.RELU)
                            aux = (
                                (d.src == isa.Operand.AUX) & (op != MfuOp.MUL) & (op != MfuOp.RELU)
                            )
                            uses_vrf = (op != MfuOp.RELU) & ~aux
                            with m.If(slot == MFU_SLOTS):
                                m.d.sync += fail(Error.TOO_MANY_MFU_OPS)
                                m.next = "STOP"
                            with m.Elif((op == MfuOp.MUL) & (slot != 0)):
                                m.d.sync += fail(Error.MUL_NOT_FIRST)
                                m.next = "STOP"
                            with m.Elif(uses_vrf & (vrf_ops == 2)):
                                m.d.sync += fail(Error.TOO_MANY_VRF_OPS)
                                m.next = "STOP"
                            m.d.sync += [
                                s.op.eq(op),
                                s.aux.eq(aux),
                                s.vrf.eq(d.vrf),
                                s.port.eq(vrf_ops[0]),
                                slot.eq(slot + 1),
                            ]
                            with m.If(aux):
                                m.d.sync += ops.uses_aux.eq(1)
                            with m.If(uses_vrf):
                                m.d.sync += vrf_ops.eq(vrf_ops + 1)
                        with m.Case(Opcode.V_WR):
                            pass  # retires (``advance`` below)
                        with m.Case(Opcode.END_CHAIN):
                            with m.If(~chain_eregs_ok):
                                m.d.sync += fail(Error.BAD_EXP_REG)
                                m.next = "STOP"
                            with m.Elif(engine_ready & ~ld_busy):
                                m.d.comb += ch.start.eq(1)
                                m.next = "EXEC"
                        with m.Default():
                            m.d.sync += fail(Error.OUTSIDE_CHAIN)
                            m.next = "STOP"
            with m.State("DRAIN"):
                with m.If(~running & ~ld_busy):
                    m.d.sync += [self.busy.eq(0), self.done.eq(1), fetching.eq(0)]
                    m.next = "IDLE"
            with m.State("STOP"):
                with m.If(~running & ~ld_busy):
                    m.d.sync += [self.busy.eq(0), self.done.eq(1), fetching.eq(0)]
                    m.next = "IDLE"

        # The retire decision: the head's class against flip-flops only (the FSM above
        # has the same cases, for what each does besides retiring).
        in_chain = seq_fsm.ongoing("CHAIN")
        present = (count != 0) & d.valid
        exec_go = kind.free_exec | (kind.s_wr & ~e_busy) | (kind.load & ~ld_busy & ~clash)
        chain_go = kind.free_chain | (kind.end & chain_eregs_ok & engine_ready & ~ld_busy)
        m.d.comb += advance.eq(
            (seq_fsm.ongoing("EXEC") & present & ~pc_at_end & ~chain_failed & exec_go)
            | (in_chain & present & chain_go)
            | (seq_fsm.ongoing("SCALAR") & loader.scalar_valid)
        )

        # The hazard flags for next cycle's head. What is in use next cycle, from this
        # cycle's registers: the engine's masks (the sequencer has always seen them a
        # cycle late), the chain handed over last cycle, and the chain this cycle may hand
        # over. That last is only possible in CHAIN, where no s_wr or load retires, so the
        # flags are exact wherever they are read (a buffer half frees a cycle later).
        offered_eregs = (1 << ch.in_ereg) | (1 << ch.out_ereg)
        eregs_next = (
            chain.eregs_in_use
            | Mux(handed.any(), handed_eregs, 0)
            | Mux(in_chain, offered_eregs, 0)
        )
        halves_next = (
            chain.halves_in_use | Mux(handed.any(), handed_halves, 0) | Mux(in_chain, ch.halves, 0)
        )
        running_next = chain.busy | in_chain | handed.any()

        def hazards(e) -> tuple:
            """(e_busy, clash) of queue entry ``e`` as the head next cycle."""
            half = Mux(e.kind.m_rd, halves_next[:2], halves_next[2:])
            return (eregs_next & e.ereg).any(), running_next & (half & e.half).any()

        # One pair of flip-flops per word that may be the head next cycle: the decoded word
        # (taken straight to the head), the ring's oldest, the head itself; the retire
        # decision is not in front of them (its select was in front of a 7-input
        # function: the unit-delay estimate's deepest path).
        candidates = (staged, ring_head, head)
        flags = [Signal(2, name=f"hazards_{i}") for i in range(len(candidates))]
        m.d.sync += [f.eq(Cat(*hazards(e))) for f, e in zip(flags, candidates, strict=True)]
        became = Signal(2)  # how the head changed: 0 staged, 1 ring, 2 it stayed
        m.d.sync += became.eq(Mux(direct, 0, Mux(take, 1, 2)))
        m.d.comb += Cat(e_busy, clash).eq(Array(flags)[became])

        # The write stage lands (after a chain's completion update of this cycle: the
        # s_wr / s_ld comes later in program order).
        m.d.sync += sw_value.eq(Mux(seq_fsm.ongoing("SCALAR"), loader.scalar, d.value))
        for i in range(CTRL_REGS):
            with m.If(sw_ctrl & (sw_reg == i)):
                m.d.sync += ctrl[i].eq(sw_value)
        for i in range(isa.EXP_REG_COUNT):
            with m.If(sw_ereg[i]):
                m.d.sync += eregs[i].eq(sw_value)
        with m.If(sw_ctrl & (sw_reg == R.IN_EREG)):
            m.d.sync += in_ereg_ok.eq(ereg_ok(sw_value))
        with m.If(sw_ctrl & (sw_reg == R.OUT_EREG)):
            m.d.sync += out_ereg_ok.eq(ereg_ok(sw_value))
        return m
