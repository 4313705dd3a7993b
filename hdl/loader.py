"""The load unit: ``m_rd`` (weight tiles), ``c_rd`` (wide constants) and ``s_ld`` (a scalar).

It runs beside the chain engine: the sequencer hands it a load and moves on, so the tiles of
chain i+1 stream into the other half of the tile buffer while chain i computes (the
sequencer holds a load whose half the running chain still reads). DRAM bytes land in the
buffers in the byte order of ``tessera.layout``: a tile is N x N mantissas row-major then N
row exponents, and tile-buffer word ``tile * N/lanes + g`` holds rows ``g*lanes ..`` with
their exponents, so a beat's two bytes always fall into one word.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.hdl import Value
from amaranth.lib import enum, wiring
from amaranth.lib.memory import WritePort
from amaranth.lib.wiring import In, Out

from tessera import layout
from tessera.config import NPUConfig
from tessera.hdl.bus import BEAT_BYTES, BurstPort
from tessera.hdl.tilebuffer import WRITE_STAGES as TILE_WRITE_STAGES
from tessera.hdl.tilebuffer import write_signature as tile_write_signature

#: Beats per burst the loader asks for: short enough that the chain's own traffic, which
#: has priority, never waits long behind it.
CHUNK = 16
#: Registers a read beat passes at the unit's port before its write logic: the arbiter's
#: ``rvalid`` comes from across the die, and the beat's 136 tile-write enables and their
#: stepping fan out from it (routed: 13.4 ns, the design's critical path at 9ae08e0).
PORT_STAGES = 1


class BurstBudget:
    """Beats still to request (``left``) and the next burst's length, ``min(left, CHUNK)``
    (``chunk``), both registers stepped together: whether a burst is due and how long it
    is come from ``chunk``, not from 32-bit compares in the request cycle. ``due``
    (``chunk != 0``) is a flip-flop of its own, stepped with them: the request a unit
    raises from it reaches the arbiter, whose grant comes back into the same registers,
    in one cycle."""

    def __init__(self, name: str):
        self.left = Signal(32, name=f"{name}_left")
        self.chunk = Signal(range(CHUNK + 1), name=f"{name}_chunk")
        self.due = Signal(name=f"{name}_due")

    def load(self, beats: Value) -> list:
        """Statements that start a phase of ``beats`` beats."""
        return [
            self.left.eq(beats),
            self.chunk.eq(Mux(beats > CHUNK, CHUNK, beats)),
            self.due.eq(beats != 0),
        ]

    def take(self) -> list:
        """Statements for a granted burst of ``chunk`` beats."""
        left = self.left
        return [
            left.eq(left - self.chunk),
            self.chunk.eq(Mux(left >= 2 * CHUNK, CHUNK, Mux(left > CHUNK, left - CHUNK, 0))),
            self.due.eq(left > CHUNK),
        ]


def lg(x: int) -> int:
    """log2 of a power of two (the config guarantees N and lanes are)."""
    assert x & (x - 1) == 0, x
    return x.bit_length() - 1


class LoadKind(enum.Enum, shape=2):
    TILES = 0
    CONSTS = 1
    SCALAR = 2


def load_beats(cfg: NPUConfig, tiles: Value, count: Value) -> Value:
    """DRAM beats of an ``m_rd`` (``tiles``) or ``c_rd`` of ``count`` items, as shifts and
    adds of ``count``: the sequencer works it out from its queue's head into the load
    command's register, so the cycle that starts the load only registers it (and the
    queue's words do not carry it). (Written as a product by a constant,
    yosys made it a combinational MULT18X18D in that cycle, which was the routed design's
    critical path.)"""

    def times(k: int) -> Value:
        terms = [count << i for i in range(k.bit_length()) if k >> i & 1]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    tile_beats = layout.tile_bytes(cfg.native_dim, cfg.mantissa_bits) // BEAT_BYTES
    return Mux(tiles, times(tile_beats), times(cfg.native_dim + 1))


def vrf_word_bits(cfg: NPUConfig) -> int:
    return (cfg.native_dim + 1) * 16


class Loader(wiring.Component):
    def __init__(self, cfg: NPUConfig):
        self.cfg = cfg
        n, lanes = cfg.native_dim, cfg.lanes
        self.groups = n // lanes
        if lanes < 2 or cfg.mantissa_bits > 8:
            raise ValueError("the RTL needs lanes >= 2 and mantissa_bits <= 8 (int8 storage)")
        super().__init__(
            {
                "start": In(1),
                "kind": In(LoadKind),
                "index": In(16),  # first tile / vector
                "beats": In(32),  # of a TILES or CONSTS load: load_beats()
                "addr": In(32),
                "busy": Out(1),
                # hold DRAM requests while the chain streams its input slice: as the cycle
                # model, a chain's activation traffic goes first, prefetch after it
                "hold": In(1),
                "scalar": Out(signed(32)),
                "scalar_valid": Out(1),
                "bus": Out(BurstPort),
                "tile_wr": In(tile_write_signature(cfg)),
                "vrf_wr": In(
                    WritePort.Signature(
                        addr_width=max(1, (cfg.vrf_depth - 1).bit_length()),
                        shape=vrf_word_bits(cfg),
                        granularity=16,
                    )
                ),
            }
        )

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        n, lanes, groups = cfg.native_dim, cfg.lanes, self.groups
        tbytes = layout.tile_bytes(n, cfg.mantissa_bits)
        kind = Signal(LoadKind)
        budget = BurstBudget("budget")
        addr = Signal(32)
        item = Signal(16)  # tile or vector being written
        off = Signal(range(max(tbytes, 2 * n + 2) + 1))  # byte offset inside the item
        inflight = Signal(range(3))  # bursts granted and not done: up to two, back to back
        # A write is on its way: bit 0 in the buffers' port registers, set with the ports'
        # byte enables (so ``busy`` needs no OR over the tile port's 136 of them), then the
        # tile buffer's bank copies. A c_rd's constants land a cycle earlier; one rule for
        # both loads keeps the cycle model's one constant.
        writing = Signal(1 + TILE_WRITE_STAGES)

        bus = self.bus
        tw, vw = self.tile_wr, self.vrf_wr
        # The read beat as the write logic sees it: PORT_STAGES registers after the bus.
        arrived = Signal()
        beat = Signal(16)
        m.d.sync += [arrived.eq(bus.rvalid), beat.eq(bus.rdata)]
        m.d.comb += [
            bus.write.eq(0),
            bus.addr.eq(addr),
            self.busy.eq(budget.due | (inflight != 0) | arrived | writing.any()),
        ]
        m.d.comb += bus.len.eq(budget.chunk)
        m.d.comb += bus.req.eq(budget.due & (inflight < 2) & ~self.hold)
        with m.If(bus.grant):
            m.d.sync += addr.eq(addr + BEAT_BYTES * budget.chunk)
            m.d.sync += budget.take()
        m.d.sync += inflight.eq(inflight + bus.grant - bus.done)

        m.d.sync += self.scalar_valid.eq(0)
        with m.If(self.start):
            m.d.sync += [kind.eq(self.kind), item.eq(self.index), off.eq(0), addr.eq(self.addr)]
            with m.If(self.kind == LoadKind.SCALAR):
                m.d.sync += budget.load(Const(2, 2))
            with m.Else():
                m.d.sync += budget.load(self.beats)

        # Tile bytes: mantissa byte o -> word o // (lanes*N), lane o % (lanes*N);
        # exponent byte N*N + r -> word r // lanes, lane lanes*N + r % lanes.
        # The buffers' write ports are registered (the buffers span the die; the address
        # and byte-enable logic stays on this side of the long wires), and the beat goes to
        # every byte pair of the word: the byte enables pick where it lands, so no barrel
        # shifter sits in front of the block RAMs. A beat's two bytes always start at an
        # even byte: offsets step by 2 and a row of lanes * N bytes is even.
        mant_bytes = n * n
        row_bytes = lanes * n
        # Where a tile beat lands is kept in registers stepped beat by beat: the word, and
        # the byte enables as a one-hot pair that moves two bytes along the mantissa lanes
        # of a word, then along its exponent lanes (``in_exp``), into the next word at
        # each end. So the registered beat's valid only gates them, and stepping them takes a
        # compare of ``off`` with a constant, not a subtract and a 136-way decode.
        # Whether ``off`` is at the tile's last beat or at its mantissas' last are kept
        # with it as flags (stepped with it on a tile load; a load starts at 0, where
        # neither holds), so the beat's decisions read flip-flops.
        tile_wrap = Signal()  # this beat is the tile's last
        mant_end = Signal()  # this beat is the tile's last mantissa beat
        at_tile_start = [tile_wrap.eq(tbytes == 2), mant_end.eq(mant_bytes == 2)]
        beat_word = Signal(range(max(2, groups)))
        beat_lanes = Signal.like(tw.en)
        in_exp = Signal()

        def rotated(lo: int, hi: int) -> Value:
            """The pair of enables moved two bytes on, within lanes ``lo .. hi - 1``."""
            part = beat_lanes[lo:hi]
            return Cat(Const(0, lo), part[-2:], part[:-2])

        with m.If(self.start):
            m.d.sync += [beat_word.eq(0), beat_lanes.eq(0b11), in_exp.eq(0)]
            m.d.sync += at_tile_start
        m.d.sync += [
            tw.addr.eq(item * groups + beat_word),
            tw.pair.eq(beat),
            vw.addr.eq(item),
            vw.data.eq(beat.replicate(len(vw.data) // 16)),
            tw.en.eq(0),
            vw.en.eq(0),
            writing.eq(
                Cat(arrived & ((kind == LoadKind.TILES) | (kind == LoadKind.CONSTS)), writing)
            ),
        ]

        with m.If(arrived):
            with m.Switch(kind):
                with m.Case(LoadKind.TILES):
                    m.d.sync += [tw.en.eq(beat_lanes), off.eq(off + 2)]
                    m.d.sync += [
                        tile_wrap.eq(off == tbytes - 4),
                        mant_end.eq(off == mant_bytes - 4),
                    ]
                    with m.If(tile_wrap):
                        m.d.sync += [off.eq(0), item.eq(item + 1), beat_word.eq(0)]
                        m.d.sync += [beat_lanes.eq(0b11), in_exp.eq(0)]
                        m.d.sync += at_tile_start
                    with m.Elif(mant_end):
                        m.d.sync += [beat_word.eq(0), beat_lanes.eq(0b11 << row_bytes)]
                        m.d.sync += in_exp.eq(1)
                    with m.Elif(in_exp):
                        m.d.sync += beat_lanes.eq(rotated(row_bytes, row_bytes + lanes))
                        m.d.sync += beat_word.eq(beat_word + beat_lanes[row_bytes + lanes - 1])
                    with m.Else():
                        m.d.sync += beat_lanes.eq(rotated(0, row_bytes))
                        m.d.sync += beat_word.eq(beat_word + beat_lanes[row_bytes - 1])
                with m.Case(LoadKind.CONSTS):
                    m.d.sync += vw.en.eq(1 << off[1:])
                    with m.If(off + 2 == 2 * n + 2):
                        m.d.sync += [off.eq(0), item.eq(item + 1)]
                    with m.Else():
                        m.d.sync += off.eq(off + 2)
                with m.Case(LoadKind.SCALAR):
                    with m.If(off == 0):
                        m.d.sync += [self.scalar[:16].eq(beat), off.eq(2)]
                    with m.Else():
                        m.d.sync += [self.scalar[16:].eq(beat), self.scalar_valid.eq(1)]
        return m
