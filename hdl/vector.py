"""The vector pipeline: reducer output -> wide BFP -> MFU slots -> storage BFP.

A vector (N mantissas plus an exponent) travels as ``P = N / vector_lanes`` *phases* of
``vector_lanes`` mantissas on consecutive cycles, so every per-lane circuit (aligners,
adders, shifters, saturation) is built ``vector_lanes`` times rather than N times. These
circuits are most of the NPU's logic, which is why ``vector_lanes`` may be below the MVU's
``lanes``: the chain engine starts blocks at least ``P`` cycles apart, which costs nothing
where a block takes that many beats anyway (every convolution of the zoo's networks on the
85F preset: ``N / lanes`` beats per input block and kernel position).

Every renormalization needs the whole vector's largest magnitude before it can shift any
lane, so it takes two steps (:func:`_normalize_phases`): the phases' magnitudes are ORed
together as they pass, while the lanes wait ``P`` cycles in a delay line; then each phase
is shifted, rounded and saturated with the finished OR.

Stage 0 normalizes the reducer's integers (the MVU's accumulators on the grid
``floor + W_EXP_FLOOR``, the pool sums on ``floor``) or takes a raw storage block as is
(elementwise chains). Then ``MFU_SLOTS`` slots, each configured per chain to one MFU op in
program order (or to pass through): a slot registers its input while its operand is read
from the VRF (``vrf + output block``) or taken from the AUX block carried with the vector,
computes with the exponent alignment of ``numerics.wide_*``, and renormalizes. The last
stage re-blocks to storage BFP (``numerics.to_storage``) and collects the phases into one
block for the writer. Only slot 0 multiplies (one MFU multiplier per lane), so ``vv_mul``
must be a chain's first MFU op.
"""

from collections.abc import Callable

from amaranth import Array, Cat, Module, Mux, Signal, signed
from amaranth.hdl import Value
from amaranth.lib import data, wiring
from amaranth.lib.memory import ReadPort
from amaranth.lib.wiring import In, Out

from tessera import numerics
from tessera.config import NPUConfig
from tessera.hdl import bfp
from tessera.hdl.loader import vrf_word_bits
from tessera.hdl.multiplier import Multiplier
from tessera.hdl.params import MFU_SLOTS, VRF_PORTS, ChainOps, MfuOp, Reducer
from tessera.hdl.pipereg import DistributionRegister

POOL_BITS = 48
#: Registers in front of stage 0 (the reducer select and the phase choice, then the 54-bit
#: magnitudes, are a cycle of their own).
ENTRY = 1
#: Registers an MFU slot adds before its renormalization: input, operand, alignment
#: distance, aligned operand, result.
SLOT_REGS = 5
#: The storage stage's registers of the exponent clamp: its decision, then the lanes.
CLAMP = 2
#: The VRF sits wherever the placer finds block RAMs, across the die from the MFU slots
#: (its read was the routed critical path), so a read passes registers on the way there
#: (the address) and back (the word; the first is an instantiated flip-flop, so yosys
#: cannot fold it into the block RAM's output register), where the placer can spread
#: them along the route. The slots address it VRF_AHEAD cycles before their input
#: stream gets there, so the word still meets its phase at the operand stage.
VRF_ADDR_REGS = 2
VRF_WORD_REGS = 3
VRF_AHEAD = VRF_ADDR_REGS + VRF_WORD_REGS - 1


def phases(cfg: NPUConfig) -> int:
    """Cycles a vector takes to pass one point of the pipeline."""
    return cfg.native_dim // cfg.vector_lanes


def spaces_blocks(cfg: NPUConfig) -> bool:
    """A vector takes more phases than the MVU's lane groups: the sweep must start blocks
    ``phases`` apart."""
    return phases(cfg) > cfg.native_dim // cfg.lanes


def latency(cfg: NPUConfig) -> int:
    """Cycles from a reducer output (its first phase) to the block at the writer's input.

    The entry register; each renormalization takes ``P + 3`` cycles; stage 0 is one, each
    slot adds its input, operand, alignment-distance, aligned-operand and result registers
    to one, the storage stage one, its two clamp registers and its collection of the last
    phase; the block is complete ``P - 1`` phases after its first.
    """
    p = phases(cfg)
    return ENTRY + (p + 3) + MFU_SLOTS * (p + 3 + SLOT_REGS) + (p + 3) + CLAMP + (p - 1) + 1


class _Stream:
    """One point of the phase stream: valid, phase index, ``lanes`` mantissas and the
    vector's exponent, plus the AUX block's lanes of this phase and its exponent."""

    def __init__(self, cfg: NPUConfig, name: str, width: int):
        lanes = cfg.vector_lanes
        self.v = Signal(name=f"{name}_v")
        self.ph = Signal(range(max(2, phases(cfg))), name=f"{name}_ph")
        self.q = [Signal(signed(width), name=f"{name}_q{i}") for i in range(lanes)]
        self.e = Signal(signed(bfp.EXP_BITS), name=f"{name}_e")
        self.xq = [Signal(signed(8), name=f"{name}_xq{i}") for i in range(lanes)]
        self.xe = Signal(signed(8), name=f"{name}_xe")
        #: (valid, phase) of this point VRF_AHEAD cycles early, where the stream has them
        #: (a renormalization's output): the MFU slot after it addresses the VRF by them.
        self.ahead: tuple[Value, Value] | None = None

    def side(self) -> list[Value]:
        """What travels beside the mantissas unchanged."""
        return [self.v, self.ph, *self.xq, self.xe]


def _normalize_phases(
    m: Module,
    cfg: NPUConfig,
    src: _Stream,
    lsb: Value,
    keep: Value,
    bits: int,
    name: str,
) -> _Stream:
    """numerics.normalize of the vector arriving as ``src``'s phases, ``P + 3`` cycles later.

    ``lsb`` is the vector's LSB exponent; ``keep`` (per vector) keeps ``lsb`` as the
    exponent even when the lanes are all zero (a raw block, a slot without an op: their
    lanes fit ``bits`` already, so the shift is 0 and they pass unchanged). Both are read
    with the vector's last phase, when its OR is complete. Then one cycle turns the OR into
    the shift, one shifts the lanes (and finds their sticky bits), one rounds and saturates.
    """
    p = phases(cfg)
    union = bfp.magnitude_union(m, src.q, f"{name}_u")
    acc = Signal.like(union, name=f"{name}_acc")
    so_far = Signal.like(union, name=f"{name}_sofar")
    m.d.comb += so_far.eq(Mux(src.ph == 0, union, acc | union))
    whole = Signal.like(union, name=f"{name}_whole")
    lsb_w = Signal(signed(bfp.EXP_BITS), name=f"{name}_lsb")
    keep_w = Signal(name=f"{name}_keep")
    with m.If(src.v):
        m.d.sync += acc.eq(so_far)
        with m.If(src.ph == p - 1):
            m.d.sync += [whole.eq(so_far), lsb_w.eq(lsb), keep_w.eq(keep)]
    shift = bfp.normalize_shift(m, whole, bits, name)
    shift_r = Signal.like(shift, name=f"{name}_shift_r")
    lsb_r = Signal.like(lsb_w, name=f"{name}_lsb_r")
    keep_r = Signal(name=f"{name}_keep_r")
    zero_r = Signal(name=f"{name}_zero_r")
    m.d.sync += [shift_r.eq(shift), lsb_r.eq(lsb_w), keep_r.eq(keep_w), zero_r.eq(whole == 0)]
    # The exponent comes from the registered shift, beside the shifter.
    e_r = Signal(signed(bfp.EXP_BITS), name=f"{name}_e_r")
    m.d.comb += e_r.eq(Mux(keep_r, lsb_r, Mux(zero_r, numerics.E_ZERO, lsb_r + shift_r)))
    # The lanes wait P + 1 cycles, until the vector's shift is known; on their last two
    # waits each works out where its sticky bit starts (the search over quarters of the
    # lane, then their join), so the shift stage only compares.
    lanes, side = src.q, src.side()
    stages = [side]  # the side signals after each register of the delay line
    limits = []
    parts = []
    for k in range(p + 1):
        if k == p - 1:
            parts = [bfp.sticky_limit_parts(m, x, f"{name}_lp{i}") for i, x in enumerate(lanes)]
        if k == p:
            limits = [Signal(range(len(x) + 2), name=f"{name}_lim{i}") for i, x in enumerate(lanes)]
            m.d.sync += [
                lim.eq(bfp.sticky_limit_join(found, len(x)))
                for lim, found, x in zip(limits, parts, lanes, strict=True)
            ]
        nl = [Signal.like(x, name=f"{name}_d{k}_{i}") for i, x in enumerate(lanes)]
        ns = [Signal.like(x, name=f"{name}_ds{k}_{i}") for i, x in enumerate(side)]
        m.d.sync += [a.eq(b) for a, b in zip(nl + ns, lanes + side, strict=True)]
        lanes, side = nl, ns
        stages.append(side)
    # Shift (the exponent goes with the lanes: the next vector's may follow in e_r) ...
    split = _Stream(cfg, f"{name}_s", bits + 1)
    sticky = [Signal(name=f"{name}_st{i}") for i in range(len(lanes))]
    m.d.sync += [a.eq(b) for a, b in zip(split.side(), side, strict=True)] + [split.e.eq(e_r)]
    for i, x in enumerate(lanes):
        # (A normalize's shift is at most the lane's width less ``bits - 1``: no clamp.)
        r, st = bfp.rne_split(m, x, shift_r, f"{name}_rs{i}", None, bits, limits[i], clamped=True)
        m.d.sync += [split.q[i].eq(r), sticky[i].eq(st)]
    # ... then round and saturate.
    out = _Stream(cfg, f"{name}_o", bits)
    m.d.sync += [a.eq(b) for a, b in zip(out.side(), split.side(), strict=True)]
    m.d.sync += out.e.eq(split.e)
    for i in range(len(lanes)):
        rounded = bfp.rne_round(m, split.q[i], sticky[i], f"{name}_rr{i}")
        m.d.sync += out.q[i].eq(bfp.saturate(m, rounded, bits, f"{name}_sat{i}"))
    # The output is two registers after the delay line (split, then out).
    early = stages[p + 3 - VRF_AHEAD]
    out.ahead = (early[0], early[1])
    return out


class VectorPipe(wiring.Component):
    @staticmethod
    def port_signature(cfg: NPUConfig, name: str) -> ReadPort.Signature:
        """Signature of a VRF read port (the chain engine passes them through)."""
        del name
        aw = max(1, (cfg.vrf_depth - 1).bit_length())
        return ReadPort.Signature(addr_width=aw, shape=vrf_word_bits(cfg))

    def __init__(self, cfg: NPUConfig, *, ecp5: bool = False):
        self.cfg, self.ecp5 = cfg, ecp5
        n = cfg.native_dim
        vw = vrf_word_bits(cfg)
        aw = max(1, (cfg.vrf_depth - 1).bit_length())
        super().__init__(
            {
                "start": In(1),
                "ops": In(ChainOps),
                "ocnt": In(16),
                "floor": In(signed(16)),
                "wfloor": In(signed(16)),
                # Blocks come at least P cycles apart (the chain engine's sweep spaces
                # them); the entry takes each with its valid.
                "mvu_valid": In(1),
                "mvu_acc": In(data.ArrayLayout(signed(cfg.accumulator_bits), n)),
                "pool_valid": In(1),
                "pool_acc": In(data.ArrayLayout(signed(POOL_BITS), n)),
                "raw_valid": In(1),
                "raw_q": In(n * 8),
                "raw_e": In(signed(8)),
                "aux_q": In(n * 8),
                "aux_e": In(signed(8)),
                "aux_pop": Out(1),
                **{
                    f"vrf{p}": In(ReadPort.Signature(addr_width=aw, shape=vw))
                    for p in range(VRF_PORTS)
                },
                "out_valid": Out(1),
                "out_q": Out(n * 8),
                "out_e": Out(signed(8)),
            }
        )

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        lanes, big = cfg.vector_lanes, cfg.mfu_mantissa_bits
        p = phases(cfg)
        ops = self.ops

        s, raw_e = self._enter(m)
        lsb = Mux(
            ops.reducer == Reducer.MVU,
            self.floor + self.wfloor,
            Mux(ops.reducer == Reducer.POOL, self.floor, raw_e),
        )
        s = _normalize_phases(m, cfg, s, lsb, ops.reducer == Reducer.NONE, big, "n0")

        # Each port's address and word pass their registers (VRF_ADDR_REGS, VRF_WORD_REGS).
        ports = [getattr(self, f"vrf{k}") for k in range(VRF_PORTS)]
        addrs, words = [], []
        for pi, port in enumerate(ports):
            addr = Signal.like(port.addr, name=f"vrf{pi}_a")
            a = addr
            for i in range(VRF_ADDR_REGS):
                nxt = port.addr if i == VRF_ADDR_REGS - 1 else Signal.like(a, name=f"vrf{pi}_a{i}")
                m.d.sync += nxt.eq(a)
                a = nxt
            near = DistributionRegister(len(port.data), ecp5=self.ecp5)
            m.submodules[f"vrf{pi}_near"] = near
            m.d.comb += [port.en.eq(1), near.d.eq(port.data)]
            word = near.q
            for i in range(1, VRF_WORD_REGS):
                nxt = Signal.like(port.data, name=f"vrf{pi}_q{i}")
                m.d.sync += nxt.eq(word)
                word = nxt
            addrs.append(addr)
            words.append(word)
        for k in range(MFU_SLOTS):
            s = self._slot(m, k, s, addrs, words)

        # Re-block to storage BFP and collect the phases into one block for the writer.
        st = _normalize_phases(m, cfg, s, s.e, 0, cfg.mantissa_bits, "st")
        # The int8 exponent clamp: its decision, registered, then the lanes' shifts.
        decision = bfp.clamp_decision(m, st.e, cfg.mantissa_bits, "st_c")
        held = _Stream(cfg, "ch", cfg.mantissa_bits)
        held_clamp = bfp.Clamp(*[Signal.like(x, name=f"ch_{x.name}") for x in decision.signals()])
        m.d.sync += [held.v.eq(st.v), held.ph.eq(st.ph)]
        m.d.sync += [a.eq(b) for a, b in zip(held.q, st.q, strict=True)]
        m.d.sync += [a.eq(b) for a, b in zip(held_clamp.signals(), decision.signals(), strict=True)]
        held_limits = [
            Signal(range(cfg.mantissa_bits + 2), name=f"ch_lim{i}") for i in range(lanes)
        ]
        m.d.sync += [
            lim.eq(bfp.sticky_limit(m, q, f"st_lim{i}"))
            for i, (lim, q) in enumerate(zip(held_limits, st.q, strict=True))
        ]
        cq = bfp.clamp_lanes(m, held.q, held_clamp, cfg.mantissa_bits, "st_c", held_limits)
        clamped = _Stream(cfg, "cl", cfg.mantissa_bits)
        m.d.sync += [clamped.v.eq(held.v), clamped.ph.eq(held.ph), clamped.e.eq(held_clamp.e)]
        m.d.sync += [a.eq(b) for a, b in zip(clamped.q, cq, strict=True)]
        sq, se = clamped.q, clamped.e
        nonzero = Signal(name="st_nz")  # a non-zero lane in this or an earlier phase
        nonzero_before = Signal(name="st_nz_before")
        any_now = Cat(*[q.any() for q in sq]).any()
        m.d.comb += nonzero.eq(any_now | (nonzero_before & (clamped.ph != 0)))
        m.d.sync += self.out_valid.eq(0)
        with m.If(clamped.v):
            m.d.sync += nonzero_before.eq(nonzero)
            for ph in range(p):
                with m.If(clamped.ph == ph):
                    for i in range(lanes):
                        m.d.sync += self.out_q.word_select(ph * lanes + i, 8).eq(sq[i])
            with m.If(clamped.ph == p - 1):
                m.d.sync += [
                    self.out_valid.eq(1),
                    self.out_e.eq(Mux(nonzero, se, numerics.E_ZERO)),
                ]
        return m

    def _enter(self, m: Module) -> tuple[_Stream, Value]:
        """Stage 0's input: the reducer's lanes of phase k, k cycles after its valid; and
        the raw block's exponent for its LSB."""
        cfg = self.cfg
        n, lanes = cfg.native_dim, cfg.vector_lanes
        p = phases(cfg)
        ops = self.ops
        entering = Signal()
        m.d.comb += entering.eq(
            Mux(
                ops.reducer == Reducer.MVU,
                self.mvu_valid,
                Mux(ops.reducer == Reducer.POOL, self.pool_valid, self.raw_valid),
            )
        )
        # The phase, counted from the valid. A block enters only after the one before has
        # had all its phases (the reducers give at most one block per ``p`` cycles), so the
        # phase is this register, not a mux on the valid: the wide lane selections below
        # and the holds then never wait for the reducers' valids, which come from across
        # the die.
        ph = Signal(range(max(2, p)), name="ph0")
        ph_next = Signal.like(ph)
        first_phase = Signal()
        m.d.comb += first_phase.eq(ph == 0)
        s = _Stream(cfg, "in", cfg.accumulator_bits)
        m.d.comb += s.v.eq(entering | ~first_phase)
        m.d.comb += s.ph.eq(ph)
        m.d.comb += ph_next.eq(Mux(s.v & (ph != p - 1), ph + 1, 0))
        m.d.sync += ph.eq(ph_next)
        # Copies of ``first_phase`` for the phase shift register below, one per entry and
        # one for the entry register's lanes: it loads or shifts some 900 flip-flops.
        copies = DistributionRegister(n - lanes + 1, ecp5=self.ecp5)
        m.submodules.first_phase_copies = copies
        m.d.comb += copies.d.eq((ph_next == 0).replicate(n - lanes + 1))

        # The raw block's and the AUX block's exponents are read with the first phase and
        # held for the others (the AUX FIFO pops as its block enters). The holds load on every
        # first-phase cycle, idle ones included: the last load before phase 1 is the
        # entering one.
        raw_e = Signal(signed(8), name="raw_e_hold")
        xe = Signal(signed(8), name="aux_e_hold")
        with m.If(first_phase):
            m.d.sync += [raw_e.eq(self.raw_e), xe.eq(self.aux_e)]
        m.d.comb += self.aux_pop.eq(entering & ops.uses_aux)
        m.d.comb += s.xe.eq(Mux(first_phase, self.aux_e, xe))
        # The phases after the first come from a shift register loaded with the first: the
        # reducer's block (chosen by the chain's reducer, which is fixed while it runs) and
        # the AUX block, less their first phase, move down one phase a cycle. So the entry
        # register's lanes are a two-way choice rather than a P-way mux over the MVU's
        # accumulators across the die (a long placed path), and no reducer needs to hold
        # its block beyond the valid.
        wide = cfg.accumulator_bits
        live = [
            Mux(
                ops.reducer == Reducer.MVU,
                self.mvu_acc[j],
                Mux(
                    ops.reducer == Reducer.POOL,
                    self.pool_acc[j],
                    self.raw_q.word_select(j, 8).as_signed(),
                ),
            )
            for j in range(n)
        ]
        live_x = [self.aux_q.word_select(j, 8).as_signed() for j in range(n)]
        rest = [Signal(signed(wide), name=f"in_rest{j}") for j in range(n - lanes)]
        rest_x = [Signal(signed(8), name=f"in_rest_x{j}") for j in range(n - lanes)]
        for j in range(n - lanes):
            with m.If(copies.q[j]):
                m.d.sync += [rest[j].eq(live[j + lanes]), rest_x[j].eq(live_x[j + lanes])]
            if j + lanes < n - lanes:
                with m.Else():
                    m.d.sync += [rest[j].eq(rest[j + lanes]), rest_x[j].eq(rest_x[j + lanes])]
        entry_first = copies.q[n - lanes]
        for i in range(lanes):
            if p == 1:
                m.d.comb += [s.q[i].eq(live[i]), s.xq[i].eq(live_x[i])]
            else:
                m.d.comb += [
                    s.q[i].eq(Mux(entry_first, live[i], rest[i])),
                    s.xq[i].eq(Mux(entry_first, live_x[i], rest_x[i])),
                ]
        # The entry register: stage 0's OR of magnitudes starts from registered lanes.
        reg = _Stream(cfg, "in_r", cfg.accumulator_bits)
        reg_raw_e = Signal(signed(8), name="raw_e_r")
        m.d.sync += [a.eq(b) for a, b in zip(reg.side(), s.side(), strict=True)]
        m.d.sync += [a.eq(b) for a, b in zip(reg.q, s.q, strict=True)]
        m.d.sync += reg_raw_e.eq(Mux(first_phase, self.raw_e, raw_e))
        return reg, reg_raw_e

    def _slot(self, m: Module, k: int, src: _Stream, addrs: list, words: list) -> _Stream:
        """MFU slot ``k``: operand read (the VRF ports' next addresses ``addrs``, and
        ``words`` their registered data), aligned op, renormalization."""
        cfg = self.cfg
        n, lanes, big = cfg.native_dim, cfg.vector_lanes, cfg.mfu_mantissa_bits
        p = phases(cfg)
        slot = self.ops.slots[k]

        # The operand's address: the slot's VRF base + the vector's output block, which
        # moves on after the vector's last phase. ``ob`` counts blocks on the stream
        # VRF_AHEAD cycles early, and the port's address registers take the block of its
        # next cycle, so the word leaves the port's registers with the phase at A.
        # The address itself (base + ob) and "ob is the last block" are kept with ob, so
        # the next address is one increment and two selects from flip-flops.
        ahead_v, ahead_ph = src.ahead
        ob = Signal(16, name=f"ob{k}")
        ob_last = Signal(name=f"obl{k}")
        here = Signal(16, name=f"oba{k}")  # slot.vrf + ob
        next_addr = Signal(16, name=f"obn{k}")
        with m.If(self.start):
            m.d.comb += next_addr.eq(slot.vrf)
            m.d.sync += [ob.eq(0), ob_last.eq(self.ocnt == 1)]
        with m.Elif(ahead_v & (ahead_ph == p - 1)):
            with m.If(ob_last):
                m.d.comb += next_addr.eq(slot.vrf)
                m.d.sync += [ob.eq(0), ob_last.eq(self.ocnt == 1)]
            with m.Else():
                m.d.comb += next_addr.eq(here + 1)
                m.d.sync += [ob.eq(ob + 1), ob_last.eq(ob + 2 == self.ocnt)]
        with m.Else():
            m.d.comb += next_addr.eq(here)
        m.d.sync += here.eq(next_addr)
        uses_vrf = (slot.op != MfuOp.NONE) & (slot.op != MfuOp.RELU) & ~slot.aux
        for pi, addr in enumerate(addrs):
            with m.If(uses_vrf & (slot.port == pi)):
                m.d.comb += addr.eq(next_addr)

        # Stage A: hold the phase while the operand is read.
        a = _Stream(cfg, f"a{k}", big)
        m.d.sync += [x.eq(y) for x, y in zip(a.side(), src.side(), strict=True)]
        m.d.sync += [x.eq(y) for x, y in zip(a.q, src.q, strict=True)] + [a.e.eq(src.e)]
        # The bounds past which the operand's exponent moves a lane out of the shifter's width.
        e_hi = Signal(signed(bfp.EXP_BITS + 1), name=f"ehi{k}")
        e_lo = Signal(signed(bfp.EXP_BITS + 1), name=f"elo{k}")
        m.d.sync += [e_hi.eq(src.e + big), e_lo.eq(src.e - big)]

        # Stage O: the operand's lanes of this phase and its exponent, registered from the
        # port's word; and beside them how the exponents compare (which operand moves, and
        # whether out of the shifter's width: registered here, as the flags steer every
        # lane's selects at stage D) and the input lanes' sticky limits (rne_split's,
        # should they be the ones to move).
        word = Signal(vrf_word_bits(cfg), name=f"vw{k}")
        m.d.comb += word.eq(Mux(slot.port, words[1], words[0]))
        o = _Stream(cfg, f"o{k}", big)
        oq = [Signal(signed(big), name=f"oq{k}_{i}") for i in range(lanes)]
        oe = Signal(signed(bfp.EXP_BITS), name=f"oe{k}")
        m.d.sync += [x.eq(y) for x, y in zip(o.side(), a.side(), strict=True)]
        m.d.sync += [x.eq(y) for x, y in zip(o.q, a.q, strict=True)] + [o.e.eq(a.e)]
        x_limit = [Signal(range(big + 2), name=f"xl{k}_{i}") for i in range(lanes)]
        m.d.sync += [
            lim.eq(bfp.sticky_limit(m, a.q[i], f"xlw{k}_{i}")) for i, lim in enumerate(x_limit)
        ]
        # The operand's exponent comes from the AUX stream or either VRF port: each is
        # compared as it is, and the slot's choice picks among the results (the choice
        # in front of the compares put two selects before the carry chains).
        candidates = [a.xe, *[w.word_select(n, 16).as_signed() for w in words]]

        def chosen(of: Callable[[Value], Value]) -> Value:
            vals = [of(c) for c in candidates]
            return Mux(slot.aux, vals[0], Mux(slot.port, vals[2], vals[1]))

        y_big = Signal(name=f"yb{k}")
        y_far = Signal(name=f"yf{k}")
        x_far = Signal(name=f"xf{k}")
        m.d.sync += [
            oe.eq(chosen(lambda e: e)),
            y_big.eq(chosen(lambda e: e > a.e)),
            y_far.eq(chosen(lambda e: e > e_hi)),
            x_far.eq(chosen(lambda e: e < e_lo)),
        ]
        with m.If(slot.aux):
            m.d.sync += [oq[i].eq(a.xq[i]) for i in range(lanes)]
        with m.Else():
            for i in range(lanes):
                lane = Array(word.word_select(j * lanes + i, 16).as_signed() for j in range(p))
                m.d.sync += oq[i].eq(lane[a.ph])

        # Stage D: the operand with the smaller exponent (only it moves, so one shifter per
        # lane serves both: ADD and MAX are symmetric), by how much (clamped to the
        # shifter's width here, so the shifter and the sticky compare start from
        # flip-flops) and its lanes' sticky limits.
        d = _Stream(cfg, f"d{k}", big)
        dist = Signal(range(big + 1), name=f"dd{k}")
        to_move = [Signal(signed(big), name=f"tm{k}_{i}") for i in range(lanes)]
        limit = [Signal(range(big + 2), name=f"lm{k}_{i}") for i in range(lanes)]
        kept_d = [Signal(signed(big), name=f"kd{k}_{i}") for i in range(lanes)]
        yq_d = [Signal(signed(big), name=f"yd{k}_{i}") for i in range(lanes)]  # vv_mul's
        emax_d = Signal(signed(bfp.EXP_BITS), name=f"emd{k}")
        ye_d = Signal(signed(bfp.EXP_BITS), name=f"yed{k}")
        m.d.sync += [x.eq(y) for x, y in zip(d.side(), o.side(), strict=True)]
        m.d.sync += [x.eq(y) for x, y in zip(d.q, o.q, strict=True)] + [d.e.eq(o.e)]
        m.d.sync += [
            dist.eq(Mux(y_big, Mux(y_far, big, oe - o.e), Mux(x_far, big, o.e - oe))),
            emax_d.eq(Mux(y_big, oe, o.e)),
            ye_d.eq(oe),
        ]
        for i in range(lanes):
            m.d.sync += [
                to_move[i].eq(Mux(y_big, o.q[i], oq[i])),
                kept_d[i].eq(Mux(y_big, oq[i], o.q[i])),
                yq_d[i].eq(oq[i]),
                limit[i].eq(
                    Mux(
                        y_big,
                        x_limit[i],
                        bfp.sticky_limit(m, oq[i], f"yl{k}_{i}"),
                    )
                ),
            ]

        # Stage AL: the aligned operand, registered after the shift, before the rounding.
        al = _Stream(cfg, f"al{k}", big)  # q: this slot's input lanes, e: their exponent
        m.d.sync += [x.eq(y) for x, y in zip(al.side(), d.side(), strict=True)]
        m.d.sync += [x.eq(y) for x, y in zip(al.q, d.q, strict=True)] + [al.e.eq(d.e)]
        kept = [Signal(signed(big), name=f"kp{k}_{i}") for i in range(lanes)]
        moved = [Signal(signed(big + 1), name=f"mv{k}_{i}") for i in range(lanes)]
        moved_st = [Signal(name=f"mvs{k}_{i}") for i in range(lanes)]
        emax = Signal(signed(bfp.EXP_BITS), name=f"em{k}")
        ye_r = Signal(signed(bfp.EXP_BITS), name=f"yer{k}")
        m.d.sync += [emax.eq(emax_d), ye_r.eq(ye_d)]
        for i in range(lanes):
            r, st = bfp.rne_split(m, to_move[i], dist, f"al{k}_{i}", limit=limit[i], clamped=True)
            m.d.sync += [
                kept[i].eq(kept_d[i]),
                moved[i].eq(r),
                moved_st[i].eq(st),
            ]

        # The op. Only slot 0 multiplies; the others' results are one bit above their
        # operands. Slot 0's multipliers are registered MULT18X18D: their input registers
        # take what stage AL's do and their output register is stage B's, so the product
        # comes from a flip-flop and only the op's select follows it.
        wide = 2 * big + 1 if k == 0 else big + 2
        b = _Stream(cfg, f"b{k}", wide)
        m.d.sync += [x.eq(y) for x, y in zip(b.side(), al.side(), strict=True)]
        for i in range(lanes):
            aligned = bfp.rne_round(m, moved[i], moved_st[i], f"ar{k}_{i}")
            x = al.q[i]
            result = b.q[i]
            if k == 0:
                mul = Multiplier(big, big, ecp5=self.ecp5)
                m.submodules[f"mfu_mul{i}"] = mul
                m.d.comb += [mul.a.eq(d.q[i]), mul.b.eq(yq_d[i])]
                result = Signal(signed(wide), name=f"br{k}_{i}")
                m.d.comb += b.q[i].eq(Mux(slot.op == MfuOp.MUL, mul.p, result))
            with m.Switch(slot.op):
                with m.Case(MfuOp.ADD):
                    m.d.sync += result.eq(kept[i] + aligned)
                with m.Case(MfuOp.MAX):
                    m.d.sync += result.eq(Mux(kept[i] > aligned, kept[i], aligned))
                with m.Case(MfuOp.RELU):
                    m.d.sync += result.eq(Mux(x > 0, x, 0))
                with m.Default():
                    m.d.sync += result.eq(x)
        with m.Switch(slot.op):
            with m.Case(MfuOp.ADD, MfuOp.MAX):
                m.d.sync += b.e.eq(emax)
            with m.Case(MfuOp.MUL):
                m.d.sync += b.e.eq(al.e + ye_r)
            with m.Default():
                m.d.sync += b.e.eq(al.e)
        return _normalize_phases(m, cfg, b, b.e, slot.op == MfuOp.NONE, big, f"mfu{k}")
