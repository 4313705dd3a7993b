"""The matrix-vector unit: ``lanes`` dot products of ``native_dim`` BFP mantissa pairs per cycle.

One *pass* multiplies an N x N weight tile by one activation block in ``N / lanes`` cycles:
in cycle ``g`` lane ``l`` computes row ``g * lanes + l``. A dot product is exact
(``2m + log2 N`` bits); it is then shifted onto the accumulator grid by the activation
block's shift (its exponent minus the tensor floor ``E[IN_EREG] - D``, after the clamp) plus
the weight row's shift (row exponent minus ``W_EXP_FLOOR``) and added to the row's
accumulator, exactly as ``numerics.to_grid`` / ``kernels.weight_grid`` define the sum: the
integer sum is order-independent, so the hardware's order gives the simulator's bits.

Pipeline: operand distribution (the activation block passes four register stages: its
register at the port, so the chain engine's clamp in front of it is not pulled towards the
regions, a copy per region of ``LANES_PER_REGION`` lanes, a second one, then a private
copy per lane, so its way from the chain engine across the die is split over four cycles;
each weight row passes two registers on its own way from its lane's tile-buffer bank,
which sits by the lane's DSPs, and arrives two cycles after the activation block to meet
it) -> registered multipliers -> a registered adder tree -> a registered shift onto the
grid -> accumulate. ``first`` starts a row's sum, ``last`` publishes it, and it reaches
``acc`` ``OUTPUT_STAGES`` registers later. The copies are
:class:`~tessera.hdl.pipereg.DistributionRegister`, which synthesis does not merge back
into one.
"""

from amaranth import Module, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from tessera.config import NPUConfig
from tessera.hdl.multiplier import LATENCY as MUL_LATENCY
from tessera.hdl.multiplier import Multiplier
from tessera.hdl.pipereg import DistributionRegister

SHIFT_BITS = 6
#: Register stages between the MVU's activation port and the multipliers' inputs ...
OPERAND_STAGES = 4
#: ... and between its weight ports and theirs: the weights (and their row shifts) come
#: OPERAND_STAGES - WEIGHT_STAGES cycles after the activation block they meet.
WEIGHT_STAGES = 2
#: Register stages between a lane's published rows and the ``acc`` port: a copy on the
#: way from the lanes, spread over the die by the floorplan, to the vector unit.
OUTPUT_STAGES = 1
#: Lanes fed from one regional copy of the activation block (the first stage's fan-out).
LANES_PER_REGION = 4


def tree_levels(n: int) -> int:
    return max(1, (n - 1).bit_length())


def latency(cfg: NPUConfig) -> int:
    """Cycles from an operand beat to its contribution landing in the accumulator."""
    return OPERAND_STAGES + MUL_LATENCY + tree_levels(cfg.native_dim) + 2


class MVU(wiring.Component):
    def __init__(self, cfg: NPUConfig, *, ecp5: bool = False):
        self.cfg = cfg
        self.ecp5 = ecp5
        n, lanes, mb = cfg.native_dim, cfg.lanes, cfg.mantissa_bits
        self.groups = n // lanes
        super().__init__(
            {
                "valid": In(1),
                "first": In(1),
                "last": In(1),
                "group": In(range(max(2, self.groups))),
                "act": In(data.ArrayLayout(signed(mb), n)),
                "act_shift": In(unsigned(SHIFT_BITS)),
                "w": In(data.ArrayLayout(data.ArrayLayout(signed(mb), n), lanes)),
                # The weight rows' exponents as the tile buffer holds them, and the grid's
                # weight floor: a row's shift is their difference.
                "w_exp": In(data.ArrayLayout(signed(8), lanes)),
                "wfloor": In(signed(16)),
                "out_valid": Out(1),
                "acc": Out(data.ArrayLayout(signed(cfg.accumulator_bits), n)),
            }
        )

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        n, lanes, mb, ab = cfg.native_dim, cfg.lanes, cfg.mantissa_bits, cfg.accumulator_bits
        levels = tree_levels(n)

        # Control travels beside the data, delayed to the accumulate stage (after the
        # shift stage).
        depth = OPERAND_STAGES + MUL_LATENCY + levels + 1
        ctrl = [Signal(4 + SHIFT_BITS + 8, name=f"ctrl{i}") for i in range(depth)]
        m.d.sync += ctrl[0].eq(
            (self.valid | (self.first << 1) | (self.last << 2)) | (self.group << 3)
        )
        for i in range(1, depth):
            m.d.sync += ctrl[i].eq(ctrl[i - 1])
        # The activation block's shift waits for its weight rows' shifts: each row's
        # exponent is registered as it comes from the tile buffer (whose block RAMs answer
        # 5.8 ns into the cycle: no room for the subtract there), then its difference from
        # the floor, then the sum.
        lag = OPERAND_STAGES - WEIGHT_STAGES
        act_shift = self.act_shift
        for i in range(lag + 2):
            held = Signal.like(act_shift, name=f"act_shift{i}")
            m.d.sync += held.eq(act_shift)
            act_shift = held
        shifts = []
        for lane in range(lanes):
            w_exp = Signal(signed(8), name=f"w_exp{lane}", reset_less=True)
            w_shift = Signal(unsigned(SHIFT_BITS), name=f"w_shift{lane}")
            # The chain's weight floor, copied at the lane: it is the same all chain long,
            # and comes from the chain engine's registers across the die (routed: 45
            # endpoints at 11.4 ns). The copy lags a cycle behind a launch, long before
            # the chain's first beat gets here.
            wfloor = DistributionRegister(16, ecp5=self.ecp5)
            m.submodules[f"wfloor{lane}"] = wfloor
            m.d.comb += wfloor.d.eq(self.wfloor)
            m.d.sync += [w_exp.eq(self.w_exp[lane]), w_shift.eq(w_exp - wfloor.q.as_signed())]
            sh = [Signal(SHIFT_BITS + 1, name=f"sh{lane}_{i}") for i in range(depth - 3 - lag)]
            m.d.sync += sh[0].eq(act_shift + w_shift)
            for i in range(1, len(sh)):
                m.d.sync += sh[i].eq(sh[i - 1])
            shifts.append(sh[-1])

        block_bits = n * mb  # an activation block or a weight row
        at_port = Signal(block_bits, name="act_port")
        m.d.sync += at_port.eq(self.act.as_value())
        regions = []
        for region in range(-(-lanes // LANES_PER_REGION)):
            copy = at_port
            for stage in range(OPERAND_STAGES - 2):
                reg = DistributionRegister(block_bits, ecp5=self.ecp5)
                m.submodules[f"act_region{region}_{stage}"] = reg
                m.d.comb += reg.d.eq(copy)
                copy = reg.q
            regions.append(copy)
        dots = []
        for lane in range(lanes):
            a_lane = DistributionRegister(block_bits, ecp5=self.ecp5)
            w_first = DistributionRegister(block_bits, ecp5=self.ecp5)
            w_lane = DistributionRegister(block_bits, ecp5=self.ecp5)
            m.submodules[f"act_lane{lane}"] = a_lane
            m.submodules[f"w_first{lane}"] = w_first
            m.submodules[f"w_lane{lane}"] = w_lane
            m.d.comb += [
                a_lane.d.eq(regions[lane // LANES_PER_REGION]),
                w_first.d.eq(self.w[lane].as_value()),
                w_lane.d.eq(w_first.q),
            ]
            prods = []
            for k in range(n):
                mul = Multiplier(mb, mb, ecp5=self.ecp5)
                m.submodules[f"mul{lane}_{k}"] = mul
                m.d.comb += [
                    mul.a.eq(a_lane.q.word_select(k, mb).as_signed()),
                    mul.b.eq(w_lane.q.word_select(k, mb).as_signed()),
                ]
                prods.append(mul.p)
            level = prods
            for lv in range(levels):
                nxt = []
                for i in range(0, len(level), 2):
                    s = Signal(signed(2 * mb + lv + 1), name=f"t{lane}_{lv}_{i // 2}")
                    if i + 1 < len(level):
                        m.d.sync += s.eq(level[i] + level[i + 1])
                    else:
                        m.d.sync += s.eq(level[i])
                    nxt.append(s)
                level = nxt
            # Shift stage: the lane's dot product onto the accumulator grid, registered so
            # the shifter and the 54-bit add are in different cycles.
            term = Signal(signed(ab), name=f"term{lane}")
            m.d.sync += term.eq(level[0] << shifts[lane])
            dots.append(term)

        # Each lane's accumulators (rows g * lanes + lane) take the control's last stage
        # from a copy of their own, so they sit by the lane's adder tree rather than
        # around one register driving all of them (1,272 readers across the die).
        ctrl_bits = 3 + len(self.group)  # valid, first, last, group
        accs = [Signal(signed(ab), name=f"acc{r}") for r in range(n)]
        published = [Signal(signed(ab), name=f"pub{r}") for r in range(n)]
        for lane in range(lanes):
            lane_ctrl = DistributionRegister(ctrl_bits, ecp5=self.ecp5)
            m.submodules[f"ctrl_lane{lane}"] = lane_ctrl
            m.d.comb += lane_ctrl.d.eq(ctrl[-2][:ctrl_bits])
            c = lane_ctrl.q
            valid, first, last, group = c[0], c[1], c[2], c[3:]
            for g in range(self.groups):
                r = g * lanes + lane
                with m.If(valid & (group == g)):
                    nv = Signal(signed(ab), name=f"nv{r}")
                    with m.If(first):
                        m.d.comb += nv.eq(dots[lane])
                    with m.Else():
                        m.d.comb += nv.eq(accs[r] + dots[lane])
                    m.d.sync += accs[r].eq(nv)
                    with m.If(last):
                        m.d.sync += published[r].eq(nv)
        c = ctrl[-1]
        done = [Signal(name=f"done{i}") for i in range(1 + OUTPUT_STAGES)]
        m.d.sync += done[0].eq(c[0] & c[2] & (c[3:] == self.groups - 1))
        m.d.sync += [a.eq(b) for a, b in zip(done[1:], done, strict=False)]
        rows = published
        for stage in range(OUTPUT_STAGES):
            held = [Signal(signed(ab), name=f"out{stage}_{r}") for r in range(n)]
            m.d.sync += [a.eq(b) for a, b in zip(held, rows, strict=True)]
            rows = held
        m.d.comb += [self.acc[r].eq(rows[r]) for r in range(n)]
        m.d.comb += self.out_valid.eq(done[-1])
        return m
