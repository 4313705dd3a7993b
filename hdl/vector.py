"""The vector pipeline: reducer output -> wide BFP -> MFU slots -> storage BFP.

One wide vector (N mantissas of ``mfu_mantissa_bits`` plus an exponent) enters per cycle at
most. Stage 0 normalizes the reducer's integers (the MVU's accumulators on the grid
``floor + W_EXP_FLOOR``, the pool sums on ``floor``) or takes a raw storage block as is
(elementwise chains). Then ``MFU_SLOTS`` slots, each configured per chain to one MFU op in
program order (or to pass through): a slot registers its input while its operand is read
from the VRF (``vrf + output block``) or taken from the AUX FIFO, then computes with the
exponent alignment and renormalization of ``numerics.wide_*``. The last stage re-blocks to
storage BFP (``numerics.to_storage``) for the writer. Only slot 0 multiplies (one MFU
multiplier per lane), so ``vv_mul`` must be a chain's first MFU op.
"""

from amaranth import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import ReadPort
from amaranth.lib.wiring import In, Out

from tessera.config import NPUConfig
from tessera.hdl import bfp
from tessera.hdl.loader import vrf_word_bits
from tessera.hdl.params import MFU_SLOTS, VRF_PORTS, ChainOps, MfuOp, Reducer

POOL_BITS = 48
#: Cycles from a reducer output to the writer's input.
LATENCY = 1 + 2 * MFU_SLOTS + 1


class VectorPipe(wiring.Component):
    @staticmethod
    def port_signature(cfg: NPUConfig, name: str) -> ReadPort.Signature:
        """Signature of a VRF read port (the chain engine passes them through)."""
        del name
        aw = max(1, (cfg.vrf_depth - 1).bit_length())
        return ReadPort.Signature(addr_width=aw, shape=vrf_word_bits(cfg))

    def __init__(self, cfg: NPUConfig):
        self.cfg = cfg
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
        n, big = cfg.native_dim, cfg.mfu_mantissa_bits
        ops = self.ops

        # Stage 0: the reducer's integers (or a raw block) -> a wide vector. A chain has one
        # reducer, so the MVU's accumulators and the pool sums share one normalizer.
        is_mvu = ops.reducer == Reducer.MVU
        acc = [Mux(is_mvu, self.mvu_acc[i], self.pool_acc[i]) for i in range(n)]
        nq, ne = bfp.normalize(m, acc, self.floor + Mux(is_mvu, self.wfloor, 0), big, "n0")
        v = Signal()
        q = [Signal(signed(big), name=f"s0q{i}") for i in range(n)]
        e = Signal(signed(bfp.EXP_BITS), name="s0e")
        # The AUX block of this (pixel, block) joins the vector here and travels with it, so
        # every AUX op of the chain sees the same block.
        xq = Signal(n * 8, name="s0xq")
        xe = Signal(signed(8), name="s0xe")
        entering = Signal()
        m.d.comb += entering.eq(
            Mux(
                ops.reducer == Reducer.MVU,
                self.mvu_valid,
                Mux(ops.reducer == Reducer.POOL, self.pool_valid, self.raw_valid),
            )
        )
        with m.If(entering & ops.uses_aux):
            m.d.comb += self.aux_pop.eq(1)
            m.d.sync += [xq.eq(self.aux_q), xe.eq(self.aux_e)]
        m.d.sync += v.eq(0)
        with m.If(ops.reducer == Reducer.NONE):
            with m.If(self.raw_valid):
                m.d.sync += [v.eq(1), e.eq(self.raw_e)]
                m.d.sync += [q[i].eq(self.raw_q.word_select(i, 8).as_signed()) for i in range(n)]
        with m.Elif(Mux(is_mvu, self.mvu_valid, self.pool_valid)):
            m.d.sync += [v.eq(1), e.eq(ne)] + [q[i].eq(nq[i]) for i in range(n)]

        ports = [getattr(self, f"vrf{p}") for p in range(VRF_PORTS)]
        for p in ports:
            m.d.comb += p.en.eq(1)
        for s in range(MFU_SLOTS):
            cfg_s = ops.slots[s]
            # Stage A: hold the vector while the operand is read.
            va = Signal(name=f"va{s}")
            qa = [Signal(signed(big), name=f"qa{s}_{i}") for i in range(n)]
            ea = Signal(signed(bfp.EXP_BITS), name=f"ea{s}")
            ob = Signal(16, name=f"ob{s}")
            m.d.sync += [va.eq(v), ea.eq(e)] + [qa[i].eq(q[i]) for i in range(n)]
            xqa = Signal(n * 8, name=f"xqa{s}")
            xea = Signal(signed(8), name=f"xea{s}")
            m.d.sync += [xqa.eq(xq), xea.eq(xe)]
            with m.If(self.start):
                m.d.sync += ob.eq(0)
            with m.Elif(v):
                m.d.sync += ob.eq(Mux(ob + 1 == self.ocnt, 0, ob + 1))
            uses_vrf = (cfg_s.op != MfuOp.NONE) & (cfg_s.op != MfuOp.RELU) & ~cfg_s.aux
            for pi, p in enumerate(ports):
                with m.If(uses_vrf & (cfg_s.port == pi)):
                    m.d.comb += p.addr.eq(cfg_s.vrf + ob)
            # Stage B: operand, op, renormalize.
            yq = [Signal(signed(big), name=f"yq{s}_{i}") for i in range(n)]
            ye = Signal(signed(bfp.EXP_BITS), name=f"ye{s}")
            with m.If(cfg_s.aux):
                m.d.comb += [ye.eq(xea)]
                m.d.comb += [yq[i].eq(xqa.word_select(i, 8).as_signed()) for i in range(n)]
            with m.Else():
                word = Signal(vrf_word_bits(cfg), name=f"vw{s}")
                m.d.comb += word.eq(Mux(cfg_s.port, ports[1].data, ports[0].data))
                m.d.comb += [ye.eq(word.word_select(n, 16).as_signed())]
                m.d.comb += [yq[i].eq(word.word_select(i, 16).as_signed()) for i in range(n)]

            # Alignment: only the operand with the smaller exponent moves, so one shifter per
            # lane serves both (ADD and MAX are symmetric in their operands).
            y_big = Signal(name=f"yb{s}")
            m.d.comb += y_big.eq(ye > ea)
            emax = Signal(signed(bfp.EXP_BITS), name=f"em{s}")
            dist = Signal(unsigned(bfp.EXP_BITS), name=f"dd{s}")
            m.d.comb += [emax.eq(Mux(y_big, ye, ea)), dist.eq(Mux(y_big, ye - ea, ea - ye))]
            # Only slot 0 multiplies; the others' results are one bit above their operands.
            wide = 2 * big + 1 if s == 0 else big + 2
            pre = [Signal(signed(wide), name=f"pre{s}_{i}") for i in range(n)]
            lsb = Signal(signed(bfp.EXP_BITS), name=f"lsb{s}")
            mask = bfp.below_mask(m, dist, big, f"mk{s}")
            for i in range(n):
                kept = Mux(y_big, yq[i], qa[i])
                moved = bfp.rne_shift(m, Mux(y_big, qa[i], yq[i]), dist, f"al{s}_{i}", mask)
                with m.Switch(cfg_s.op):
                    with m.Case(MfuOp.ADD):
                        m.d.comb += pre[i].eq(kept + moved)
                    with m.Case(MfuOp.MAX):
                        m.d.comb += pre[i].eq(Mux(kept > moved, kept, moved))
                    with m.Case(MfuOp.RELU):
                        m.d.comb += pre[i].eq(Mux(qa[i] > 0, qa[i], 0))
                    if s == 0:
                        with m.Case(MfuOp.MUL):
                            m.d.comb += pre[i].eq(qa[i] * yq[i])
            with m.Switch(cfg_s.op):
                with m.Case(MfuOp.ADD, MfuOp.MAX):
                    m.d.comb += lsb.eq(emax)
                with m.Case(MfuOp.MUL):
                    m.d.comb += lsb.eq(ea + ye)
                with m.Default():
                    m.d.comb += lsb.eq(ea)
            nq, ne = bfp.normalize(m, pre, lsb, big, f"mfu{s}")
            vb = Signal(name=f"vb{s}")
            qb = [Signal(signed(big), name=f"qb{s}_{i}") for i in range(n)]
            eb = Signal(signed(bfp.EXP_BITS), name=f"eb{s}")
            m.d.sync += vb.eq(va)
            with m.If(cfg_s.op == MfuOp.NONE):
                m.d.sync += [eb.eq(ea)] + [qb[i].eq(qa[i]) for i in range(n)]
            with m.Else():
                m.d.sync += [eb.eq(ne)] + [qb[i].eq(nq[i]) for i in range(n)]
            xqb = Signal(n * 8, name=f"xqb{s}")
            xeb = Signal(signed(8), name=f"xeb{s}")
            m.d.sync += [xqb.eq(xqa), xeb.eq(xea)]
            v, q, e, xq, xe = vb, qb, eb, xqb, xeb

        # Re-block to storage BFP for the writer.
        sq, se = bfp.to_storage(m, q, e, cfg.mantissa_bits, "st")
        m.d.sync += [self.out_valid.eq(v), self.out_e.eq(se)]
        m.d.sync += [self.out_q.word_select(i, 8).eq(sq[i]) for i in range(n)]
        return m
