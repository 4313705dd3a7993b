"""The cycle model: the timing contract the RTL (``hdl/``) meets within 2 %.

It follows the NPU's structure rather than an ideal machine, because a chain of a few
hundred cycles spends a large share of them in start-up, per-row and drain steps that an
"overlap everything" model does not see. The terms below are the states of the RTL's
finite-state machines, counted per chain, per row and per DRAM burst.

**Sequencer** (``hdl/npu.py``): one instruction per cycle. ``m_rd`` / ``c_rd`` go to the
load unit, which does one load at a time; a load waits for the unit and for the chains in
the engine (running or staged) that read the buffer half it targets. ``end_chain`` waits
for the load unit to be idle (the chain's tiles and constants have landed) and for the
chain engine's set-up stage to be free, i.e. for the previous chain to have launched.

**Set-up stage** (``hdl/chain.py``): latch, reducer decode, 14 products through one
registered multiplier, the ring division (one bit per cycle), the ring product:
``SETUP_FIXED + 2 * MUL_LATENCY + bits`` cycles. It overlaps the previous chain; the chain
launches when it is staged and the engine is idle (``DONE_TO_LAUNCH`` cycles after the
previous chain's ``done``).

**Sweep**, per output row: ``ROW_WRAP`` (one cycle, plus one per ring correction of the
row's ring address), ``ROW_WAIT`` until the activation loader has landed the row's kernel
rows, one beat per cycle in ``RUN`` (``N / lanes`` beats per tile pass for ``mv_mul``, one
per window position and block for ``v_pool``, one per block otherwise; blocks start at
least the vector pipeline's ``N / vector_lanes`` phases apart), ``ROW_NEXT``.

**Activation loader** (``hdl/actloader.py``): input rows in order into a ring of ``R =
act_entries // (IN_W * IN_CB_CNT)`` rows, at most ``R`` rows ahead of the sweep; a row is
one segment (the chain reads the full depth) or one per pixel; a segment is a mantissa
burst train, then an exponent burst train (whole beats: a partial first or last beat
costs a full one), with four cycles of state changes around them, plus one per row. A slice
that fits the ring and was read by the previous ``mv_mul`` / ``v_pool`` chain is resident
and not loaded again.

**DRAM bus** (``hdl/arbiter.py``): one beat of ``dram_bytes_per_cycle`` bytes per cycle,
two bursts queued, a burst's data two cycles after its command, granted in the priority
writer, AUX reader, activation loader, load unit. A chain cannot end before its beats have
moved (activation segments; the AUX reader's mantissa burst and exponent beat per block;
the writer's mantissa runs of up to ``RUN_MAX`` blocks and exponent flushes of up to
``EXP_BUF`` bytes) plus the state cycles between the bursts of the unit that has the most
of them (the others' beats fill the rest). The activation loader keeps two bursts queued,
so between two of its bursts one of the writer's or the AUX reader's gets in: a row lands
that much later. The AUX reader's round trip between blocks (it asks for the next block's
bursts when the last one's beats have come) is filled by the writer's bursts.

**Writer and AUX reader** (``hdl/writer.py``, ``hdl/auxreader.py``) are serial engines,
one burst at a time: the writer cannot finish before its bursts, one after the other,
from the first block (and the last row's blocks from that row); the AUX reader reads a
block per ``beats + AUX_BLOCK_STATES`` cycles, at most its FIFO ahead of the sweep.

**Loads** (``m_rd``, ``c_rd``) are held while the activation loader streams, then share
the bus with the running chain: they wait for its writer's and AUX reader's beats, and
each of those bursts waits behind up to two load bursts while the load lasts, which can
make the chain end later.

**Drain**: after the last beat, the reducer pipeline, the vector pipeline, the writer's
FIFO, its last mantissa burst and its exponent flush.

**Scalar loads** (``s_ld``) wait for the load unit and hold the sequencer until the word
has come (``SCALAR_LOAD_STATES`` plus its beats).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from tessera import isa, layout
from tessera.config import NPUConfig
from tessera.isa import Reg

#: Products the set-up stage computes, one a cycle (``hdl/chain.py`` SETUP_PRODUCTS).
SETUP_PRODUCTS = 14
#: Set-up stage cycles besides the ring division and the set-up multiplier's latency:
#: latch, reducer decode, the products, ring product, the staged state (``hdl/chain.py``,
#: states IDLE, S0, P0..P13, RING, READY; P14.. and RING1.. drain the multiplier).
SETUP_FIXED = 4 + SETUP_PRODUCTS
#: Cycles from a chain's launch to its first ``ROW_WRAP`` (IDLE -> LAUNCH -> ROW_WRAP) and
#: to the activation loader's first ``ROW`` state (its start is seen one cycle later).
LAUNCH_TO_SWEEP = 2
#: ``ROW_NEXT`` and ``ROW_WAIT``: the sweep's cycles per output row besides ``ROW_WRAP``.
ROW_STATES = 2
#: Activation loader state cycles per segment (SEG, the mantissa and the exponent burst's
#: command cycle, NEXT) and per row (ROW: two cycles, as it reads its slot's "free" flag
#: from its second).
SEGMENT_STATES = 4
ROW_LOAD_STATES = 2
#: Registers between the sweep's counters and the activation buffer's read address
#: (``hdl/chain.py`` ADDRESS_STAGES).
ADDRESS_STAGES = 1
#: Registered beat stages between the activation buffer's answer and every reducer (the
#: words, the clamp's decision, the clamp's shifted lanes: ``hdl/chain.py`` BEAT_STAGES).
BEAT_STAGES = 3
#: The activation buffer's register at each of its banks (``hdl/actbuffer.py``).
ACT_READ_STAGES = 1
#: Pooling reducer cycles from a beat to its block (``hdl/chain.py``: the clamped
#: mantissas' register, the grid values' register, the accumulator).
POOL_LATENCY = 3
#: MFU slots of the vector pipeline (``hdl/params.py``).
MFU_SLOTS = 4
#: The MVU multipliers' latency (``hdl/multiplier.py``).
MUL_LATENCY = 2
#: Register stages distributing the MVU's operands to its multipliers (``hdl/mvu.py``).
MVU_OPERAND_STAGES = 4
#: Register stages from the MVU's published rows to its output port (``hdl/mvu.py``).
MVU_OUTPUT_STAGES = 1
#: Writer FIFO (``SyncFIFOBuffered``: two cycles to the read side), its mantissa engine
#: (NEXT, REQ before a burst; NEXT after the last one), the exponent flush's command cycle
#: and its return to COLLECT, and the chain's DRAIN state.
DRAIN_FIXED = 2 + 2 + 1 + 2 + 1 + 1
#: Blocks the writer collects exponents for before a flush (``hdl/writer.py`` EXP_BUF),
#: and the longest mantissa run it writes as one burst (RUN_MAX).
EXP_BUF = 16
RUN_MAX = 8
#: Load unit bursts: LOADER_CHUNK beats each, up to LOADER_QUEUE of them queued on the
#: bus (``hdl/loader.py`` CHUNK, ``hdl/arbiter.py`` QUEUE).
LOADER_CHUNK = 16
LOADER_QUEUE = 2
#: Cycles from a burst's command to its first data beat (arbiter queue, then the bus).
BUS_LATENCY = 2
#: Writer cycles per mantissa burst and per exponent flush besides their beats: the bus
#: latency (the next burst's command goes out with the last beat).
WRITER_BURST_STATES = BUS_LATENCY
#: AUX reader cycles per block besides its beats: NEXT, then the mantissa burst's command
#: and the bus latency; the exponent beat's command follows at once, so its beat comes
#: right after the mantissas (``hdl/auxreader.py``).
AUX_BLOCK_STATES = 1 + BUS_LATENCY
#: Blocks the AUX reader runs ahead of the sweep (its FIFO's depth minus one).
AUX_FIFO = 7
#: Cycles the sequencer waits after ``start`` for its fetch queue's first word
#: (``hdl/npu.py`` FETCH state: the read, the word's register, the decoded word's
#: register, then the queue register).
FETCH_WAIT = 3
#: Cycles from a chain's done to the next chain's earliest launch: the sequencer registers
#: the completion before it updates E[OUT_EREG] (``hdl/chain.py`` SETTLE).
DONE_TO_LAUNCH = 2
#: ``halt`` waits for the engine and the load unit, then ``done`` rises (``hdl/npu.py``
#: DRAIN state), and the host sees it one cycle later.
HALT_TO_DONE = 2
#: The load unit's command register between the sequencer and it, and the register its
#: ``busy`` passes on the way back (``hdl/npu.py``): a load starts a cycle after the
#: sequencer issues it, and the sequencer sees the unit free a cycle after it is.
LOAD_COMMAND_STAGES = 1
LOAD_BUSY_LAG = 1
#: A loaded beat passes a register at the load unit's port (``hdl/loader.py``
#: PORT_STAGES), its bytes the unit's write-port register, then the tile buffer's bank
#: copies (``hdl/tilebuffer.py``); the unit is busy until they land.
LOAD_PORT_STAGES = 1
TILE_WRITE_STAGES = 1
#: The same for a chain's hand-over to the chain engine and the engine's ``ready``.
HANDOVER_STAGES = 1
READY_LAG = 1
#: And the engine's ``busy``: a load into a half the last chain read, and the drain at
#: ``halt``, see the engine idle a cycle after it is.
RUNNING_LAG = 1
#: An ``s_ld`` holds the sequencer (state SCALAR) while the load unit fetches the word:
#: these cycles besides the word's bus beats (measured on the RTL: 7 cycles in all for a
#: 32-bit word in two 16-bit beats, 6 more than an ``s_wr``), the command register's and
#: the port register's among them.
SCALAR_LOAD_STATES = 3 + LOAD_COMMAND_STAGES + LOAD_PORT_STAGES


def act_entries(cfg: NPUConfig) -> int:
    """Blocks the activation buffer holds (N mantissa bytes + 1 exponent byte each)."""
    return cfg.act_buffer_bytes // (cfg.native_dim + 1)


def setup_cycles(cfg: NPUConfig) -> int:
    """Set-up stage cycles: fixed states, the multiplier's pipeline drained twice, and the
    ring division (``DIV``), one cycle per bit of an activation-buffer entry index plus two."""
    return SETUP_FIXED + 2 * MUL_LATENCY + max(1, (act_entries(cfg) - 1).bit_length()) + 2


def lane_groups(cfg: NPUConfig) -> int:
    """Beats the sweep spends on every block per input block and kernel position: the
    MVU's lane groups, ``lanes`` of a tile's N rows per beat."""
    return cfg.native_dim // cfg.lanes


def vector_phases(cfg: NPUConfig) -> int:
    """Cycles a block takes through the vector pipeline, ``vector_lanes`` of its N values
    per cycle: the sweep starts blocks at least that many cycles apart."""
    return cfg.native_dim // cfg.vector_lanes


def vector_latency(cfg: NPUConfig) -> int:
    """Vector pipeline cycles, reducer output to the writer (``hdl/vector.py``): the entry
    register, every renormalization ``P + 3`` (stage 0, each MFU slot with its five
    registers, the re-block), the clamp's two registers, then the block's other ``P - 1``
    phases and the collection register."""
    p = vector_phases(cfg)
    return 1 + (p + 3) + MFU_SLOTS * (p + 8) + (p + 3) + 2 + (p - 1) + 1


def mvu_latency(cfg: NPUConfig) -> int:
    """MVU cycles from an operand beat to its block leaving the accumulator: the operand
    distribution registers, the multiplier, the adder tree, the shift stage, the accumulate
    stage, the published rows' register, the output stages."""
    levels = max(1, (cfg.native_dim - 1).bit_length())
    return MVU_OPERAND_STAGES + MUL_LATENCY + levels + 1 + 1 + 1 + MVU_OUTPUT_STAGES


@dataclass
class ChainTiming:
    start: float
    end: float
    compute: int
    dram_bytes: int
    macs_padded: int
    load_bytes: int


@dataclass
class _Sweep:
    """One chain's geometry as the chain engine sees it (after the set-up stage)."""

    ih: int
    iw: int
    icnt: int
    icb: int
    exp_addr: int  # first exponent byte of the input slice
    oh: int
    ow: int
    ocnt: int
    ocb: int
    out_exp_addr: int
    sh: int
    pt: int
    span: int  # input rows an output row reads, minus one
    beats_per_row: int
    spacing: int  # least cycles between two blocks' starts where it holds the sweep, else 0
    last_block: int  # cycles from a row's first beat to its last block's start
    resident: bool
    aux: bool

    @property
    def blocks(self) -> int:
        return self.oh * self.ow * self.ocnt


@dataclass
class _Running:
    """The chain the engine runs last: launch and done cycle, the cycle each output row's
    sweep starts, its writer's beats and bursts and its AUX reader's blocks."""

    start: int
    end: int
    row_runs: list[int]
    writer_beats: int
    writer_bursts: int
    aux_blocks: int  # 0 without an AUX operand
    aux_block_beats: int
    aux_period: int  # the AUX reader's cycles per block on its own

    def share_after(self, t: int) -> float:
        """The share of the chain's output blocks its sweep produces from cycle ``t`` on."""
        later = len(self.row_runs) - bisect.bisect_left(self.row_runs, t)
        return later / max(1, len(self.row_runs))

    def aux_left(self, t: int) -> int:
        """AUX blocks not yet read at cycle ``t``: the reader runs ahead of the sweep by at
        most its FIFO, at its own pace."""
        consumed = round((1 - self.share_after(t)) * self.aux_blocks)
        fetched = min(self.aux_blocks, (t - self.start) // self.aux_period, consumed + AUX_FIFO)
        return self.aux_blocks - max(0, fetched)


@dataclass
class CycleModel:
    """Cycle accounting fed the instruction stream: ``issue`` per scalar instruction,
    ``load`` per ``m_rd`` / ``c_rd``, ``chain`` per chain, ``finish`` after ``halt``."""

    cfg: NPUConfig
    t_issue: int = FETCH_WAIT
    loader_free: int = 0  # the load unit is idle from this cycle
    hold_until: int = 0  # the activation loader streams (loads are held) until then
    running: _Running | None = None  # the last chain handed to the engine
    setup_free: int = 0  # the set-up stage can take a chain
    engine_done: int = -1  # last chain's done cycle
    half_done: dict = field(default_factory=dict)  # buffer half -> done of its last reader
    chains: list[ChainTiming] = field(default_factory=list)
    dram_bytes_total: int = 0
    pending_bytes: int = 0
    resident_input: tuple | None = None

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.bus = cfg.dram_bytes_per_cycle  # bytes per beat
        # byte lanes of a beat, for where a burst of exponent bytes starts (0: not integral)
        self.beat_lanes = round(self.bus) if float(self.bus).is_integer() else 0
        self.mant_bytes = cfg.native_dim * layout.mantissa_dtype(cfg.mantissa_bits).itemsize
        self.mant_beats = self._beats(self.mant_bytes)
        self.setup = setup_cycles(cfg)
        self.entries = act_entries(cfg)

    # ------------------------------------------------------------------ bus helpers
    def _beats(self, nbytes: float, offset: int = 0) -> int:
        """Whole bus beats of a burst of ``nbytes`` starting ``offset`` bytes into a beat."""
        return math.ceil((offset + nbytes) / self.bus)

    def _train(self, addr: int, step: int, count: int, nbytes: int) -> int:
        """Beats of ``count`` bursts of ``nbytes`` at ``addr``, ``addr + step``, ...; where
        a burst starts in a beat repeats with a short period, so one period is summed."""
        if count <= 0:
            return 0
        if not self.beat_lanes:
            return count * self._beats(nbytes)
        lanes = self.beat_lanes
        period = lanes // math.gcd(step % lanes, lanes)
        one = [self._beats(nbytes, (addr + i * step) % lanes) for i in range(min(period, count))]
        whole, rest = divmod(count, len(one))
        return whole * sum(one) + sum(one[:rest])

    # ------------------------------------------------------------------ sequencer
    def issue(self) -> None:
        self.t_issue += 1

    def scalar_load(self) -> None:
        """An ``s_ld``: the sequencer waits for the load unit, then for the word (the
        caller's issue() counts the last cycle)."""
        start = max(self.t_issue, self.loader_free)
        self.t_issue = start + SCALAR_LOAD_STATES + self._beats(4) - 1
        # (the word is handed over a cycle after the unit is idle: no busy lag shows)
        self.loader_free = self.t_issue + 1

    def load(self, nbytes: int, tile_slot: int | None) -> None:
        """An ``m_rd`` (``tile_slot`` given) or ``c_rd``: one load unit, halves guarded.

        The constants' VRF half is not passed: compiled (and test) programs alternate
        halves with the chain index, as the tile halves, so the next chain's parity is used.
        """
        if tile_slot is not None:
            half = ("t", tile_slot // self.cfg.tile_buffer_tiles)
        else:
            half = ("v", len(self.chains) % 2)
        accept = max(self.t_issue, self.loader_free, self.half_done.get(half, -1) + 1 + RUNNING_LAG)
        first = max(accept + 1 + LOAD_COMMAND_STAGES, self.hold_until)
        end = first + self._beats(nbytes)
        run = self.running
        if run is not None and first < run.end:
            # The load shares the bus with the running chain's writer and AUX reader: it
            # is delayed by their beats, and each of their bursts waits behind up to
            # LOADER_QUEUE load bursts while the load lasts.
            frac = run.share_after(first)
            aux_left = run.aux_left(first)
            beats_left = math.ceil(run.writer_beats * frac) + aux_left * run.aux_block_beats
            # + the writer's burst under way; the AUX reader's two bursts per block
            bursts_left = math.ceil(run.writer_bursts * frac) + 1 + 2 * aux_left
            load_beats = end - first
            end += beats_left
            stretched = (
                first
                + beats_left
                + min(load_beats, bursts_left * LOADER_QUEUE * LOADER_CHUNK)
                + bursts_left * WRITER_BURST_STATES
            )
            if stretched > run.end:
                self._extend_running(stretched)
        self.loader_free = end + 1 + LOAD_PORT_STAGES + TILE_WRITE_STAGES + LOAD_BUSY_LAG
        self.t_issue = accept  # the caller's issue() counts the instruction's cycle
        self.pending_bytes += nbytes
        self.dram_bytes_total += nbytes

    # ------------------------------------------------------------------ chains
    def _sweep(self, ops: list[str], regs, aux: bool) -> tuple[_Sweep, int, int, int]:
        """The chain's sweep geometry, compute beats, activation bytes and padded MACs."""
        cfg = self.cfg
        n = cfg.native_dim
        r = regs.reg
        oh, ow, ocnt = r(Reg.OUT_H), r(Reg.OUT_W), r(Reg.OUT_CB_CNT)
        ih, iw, icnt, icb = r(Reg.IN_H), r(Reg.IN_W), r(Reg.IN_CB_CNT), r(Reg.IN_CB)
        kh, kw = r(Reg.K_H), r(Reg.K_W)
        in_addr = r(Reg.IN_ADDR)
        macs = 0
        reads_window = "mv_mul" in ops or "v_pool" in ops
        if "mv_mul" in ops:
            span = (kh - 1) * r(Reg.DIL_H)
            passes = math.ceil(kh * kw * icnt * ocnt / cfg.tile_engines)
            per_pixel = passes * lane_groups(cfg)
            macs = oh * ow * kh * kw * icnt * ocnt * n * n
        elif "v_pool" in ops:
            span = kh - 1
            per_pixel = kh * kw * ocnt * lane_groups(cfg)
        else:
            span = 0
            per_pixel = ocnt * lane_groups(cfg)
        # Blocks start at least the vector's phases apart (``spacing``, where a block takes
        # fewer beats): a row's blocks, and its first one after the last row's last.
        row_beats, spacing, last_block = ow * per_pixel, 0, 0
        if vector_phases(cfg) > lane_groups(cfg) and ow * ocnt:
            per_block = per_pixel // ocnt
            if vector_phases(cfg) > per_block:
                spacing = vector_phases(cfg)
                row_beats = (ow * ocnt - 1) * spacing + per_block
                last_block = row_beats - per_block
        key = (in_addr, r(Reg.IN_CB_OFF), icnt, ih, iw)
        rows_fit = self.entries // max(1, iw * icnt) >= ih
        resident = reads_window and key == self.resident_input
        self.resident_input = key if reads_window and rows_fit else None
        sw = _Sweep(
            ih=ih, iw=iw, icnt=icnt, icb=icb,
            exp_addr=in_addr + ih * iw * icb * n + r(Reg.IN_CB_OFF),
            oh=oh, ow=ow, ocnt=ocnt, ocb=r(Reg.OUT_CB),
            out_exp_addr=r(Reg.OUT_ADDR) + oh * ow * r(Reg.OUT_CB) * n + r(Reg.OUT_CB_OFF),
            sh=r(Reg.STRIDE_H), pt=r(Reg.PAD_T), span=span,
            beats_per_row=row_beats, spacing=spacing, last_block=last_block,
            resident=resident, aux=aux,
        )  # fmt: skip
        in_bytes = 0 if resident else ih * iw * icnt * (self.mant_bytes + 1)
        return sw, oh * ow * per_pixel, in_bytes, macs

    def _row_loads(self, sw: _Sweep) -> tuple[list[int], int, int]:
        """Cycles the activation loader spends per input row, all its bus beats, and its
        bursts per row (mantissa bursts of up to LOADER_CHUNK beats, an exponent burst)."""
        if sw.resident:
            return [], 0, 0
        costs = []
        beats = 0
        if sw.icnt == sw.icb:  # the full depth: a row is one segment
            rowblocks = sw.iw * sw.icnt
            mant = self._beats(rowblocks * self.mant_bytes)
            for y in range(sw.ih):
                b = mant + self._train(sw.exp_addr + y * rowblocks, 0, 1, rowblocks)
                costs.append(ROW_LOAD_STATES + b + SEGMENT_STATES)
                beats += b
            return costs, beats, math.ceil(mant / LOADER_CHUNK) + 1
        seg = self._beats(sw.icnt * self.mant_bytes)  # a segment per pixel
        for y in range(sw.ih):
            e0 = sw.exp_addr + y * sw.iw * sw.icb
            b = sw.iw * seg + self._train(e0, sw.icb, sw.iw, sw.icnt)
            costs.append(ROW_LOAD_STATES + b + sw.iw * SEGMENT_STATES)
            beats += b
        return costs, beats, sw.iw * (math.ceil(seg / LOADER_CHUNK) + 1)

    def _writer_traffic(self, sw: _Sweep) -> tuple[int, int]:
        """The writer's bus beats and bursts: mantissa runs of up to RUN_MAX contiguous
        blocks, exponent flushes of up to EXP_BUF contiguous bytes (counted as when the
        blocks queue up, i.e. when the writer is the bottleneck)."""
        blocks = sw.blocks
        beats = blocks * self.mant_beats
        if sw.ocb == sw.ocnt:  # the chain writes the tensor's full depth: one long run
            full, rest = divmod(blocks, EXP_BUF)
            beats += self._train(sw.out_exp_addr, EXP_BUF, full, EXP_BUF)
            beats += self._train(sw.out_exp_addr + full * EXP_BUF, 0, 1 if rest else 0, rest)
            return beats, math.ceil(blocks / RUN_MAX) + math.ceil(blocks / EXP_BUF)
        pixels = sw.oh * sw.ow
        for k in range(0, sw.ocnt, EXP_BUF):
            beats += self._train(sw.out_exp_addr + k, sw.ocb, pixels, min(EXP_BUF, sw.ocnt - k))
        runs = pixels * math.ceil(sw.ocnt / RUN_MAX)
        return beats, runs + pixels * math.ceil(sw.ocnt / EXP_BUF)

    def _run(
        self, sw: _Sweep, launch: int, reducer_latency: int, writer: tuple[int, int]
    ) -> tuple[int, int, list[int]]:
        """The chain's done cycle (sweep rows against the activation loader, bus, drain),
        the cycle its activation loader first stops streaming (ring full or done), and the
        cycle each output row's sweep starts."""
        rowblocks = max(1, sw.iw * sw.icnt)
        ring_rows = self.entries // rowblocks
        ring = ring_rows * rowblocks
        costs, act_beats, row_bursts = self._row_loads(sw)
        writer_beats, writer_bursts = writer
        aux_beats = sw.blocks * (self.mant_beats + 1) if sw.aux else 0
        # the loader's timeline: row y lands (rows_loaded > y visible) at landed[y]
        landed: list[int] = []
        row_start = launch + LAUNCH_TO_SWEEP  # the loader's ROW state for the next row
        need_lo_at: list[tuple[int, int]] = []  # (cycle need_lo is visible, need_lo)
        pause: list[int | None] = [None]  # first cycle the loader waits for ring space
        row_runs: list[int] = []
        # The writer and the AUX reader have priority on the bus, but the loader keeps two
        # bursts queued: between two of its bursts at most one of theirs gets in. So a row
        # lands later by the output beats swept meanwhile, up to one of their bursts (of
        # the average length) per loader burst.
        out_row_beats = (writer_beats + aux_beats) / max(1, sw.oh)
        foreign = (writer_beats + aux_beats) / max(
            1, writer_bursts + (2 * sw.blocks if sw.aux else 0)
        )
        served = 0  # output rows swept before the loader's timeline
        pending = 0.0  # their beats not yet interleaved with the loader's

        def load_until(y_max: int) -> None:
            nonlocal row_start, served, pending
            while len(landed) <= y_max:
                y = len(landed)
                permit = row_start
                if y >= ring_rows:  # the slot's previous row must be released
                    permit = next(t for t, lo in need_lo_at if lo + ring_rows > y)
                if permit > row_start and pause[0] is None:
                    pause[0] = row_start  # the ring is full: the loader stops streaming
                start = max(row_start, permit)
                end = start + costs[y]
                while served < len(row_runs) and row_runs[served] < end:
                    pending += out_row_beats
                    served += 1
                taken = min(pending, row_bursts * foreign)
                pending -= taken
                end += round(taken)
                landed.append(end)
                row_start = end

        t = launch + LAUNCH_TO_SWEEP
        ring_addr = ring - sw.pt * rowblocks
        sh_rb = sw.sh * rowblocks
        for oy in range(sw.oh):
            corrections = 0
            while ring_addr >= ring or ring_addr < 0:
                ring_addr += -ring if ring_addr >= ring else ring
                corrections += 1
            wrap_end = t + corrections
            first = oy * sw.sh - sw.pt
            need_lo_at.append((wrap_end + 1, max(first, 0)))
            ready = wrap_end + 1
            if not sw.resident:
                need = min(first + sw.span, sw.ih - 1)
                load_until(need)
                ready = max(ready, landed[need])
            run = ready + 1
            if sw.spacing and row_runs:
                run = max(run, row_runs[-1] + sw.last_block + sw.spacing)
            row_runs.append(run)
            t = run + sw.beats_per_row + ROW_STATES - 1  # ROW_NEXT, then the next ROW_WRAP
            ring_addr += sh_rb
        last_beat = t - ROW_STATES
        if not sw.resident and sw.ih:
            load_until(sw.ih - 1)
        loader_idle = landed[-1] + 1 if landed else launch
        tail = self.mant_beats + self._beats(min(EXP_BUF, sw.ocnt) if sw.ocb != sw.ocnt else 1)
        vec_latency = vector_latency(self.cfg)
        drain = 1 + reducer_latency + vec_latency + DRAIN_FIXED + tail
        # One bus: beats of the activation loader, the writer and the AUX reader; each of
        # the first two has state cycles between its bursts, which the other one's bursts
        # fill as far as they reach.
        writer_states = writer_bursts * WRITER_BURST_STATES
        idle = max(sum(costs) - act_beats, writer_states)
        # (The AUX reader's round trip between two blocks is filled by the writer's
        # bursts: it asks for a block's exponent burst right after its mantissas'.)
        bus = launch + LAUNCH_TO_SWEEP + act_beats + writer_beats + aux_beats + idle
        # the writer and the AUX reader are serial engines: one burst at a time
        first_out = row_runs[0] + reducer_latency + vec_latency + 2 if row_runs else launch
        serial = first_out + writer_beats + writer_states
        if row_runs:  # the last row's blocks queue up when the writer is slower than the sweep
            last_out = row_runs[-1] + reducer_latency + vec_latency + 2
            serial = max(serial, last_out + math.ceil((writer_beats + writer_states) / sw.oh))
        if sw.aux:
            aux_end = launch + 1 + sw.blocks * (self.mant_beats + 1 + AUX_BLOCK_STATES)
            serial = max(serial, aux_end + vec_latency + DRAIN_FIXED + tail)
        if sw.resident or not landed:
            streams_until = launch
        else:
            streams_until = landed[-1] if pause[0] is None else pause[0]
        return max(last_beat + drain, loader_idle, bus + 1, serial), streams_until, row_runs

    def chain(self, ops: list[str], regs, aux: bool) -> int:
        """Account one chain; ``regs.reg(Reg)`` gives the latched control registers."""
        sw, compute, in_bytes, macs = self._sweep(ops, regs, aux)
        nbytes = in_bytes + sw.blocks * (self.mant_bytes + 1) * (2 if aux else 1)
        # v_rd .. end_chain issue one per cycle; end_chain waits for set-up and loads
        accept = max(self.t_issue + len(ops) - 1, self.setup_free, self.loader_free)
        launch = max(accept + HANDOVER_STAGES + self.setup, self.engine_done + DONE_TO_LAUNCH)
        beat = ADDRESS_STAGES + ACT_READ_STAGES + BEAT_STAGES
        if "mv_mul" in ops:
            latency = beat + mvu_latency(self.cfg)
        elif "v_pool" in ops:
            latency = beat + POOL_LATENCY
        else:
            latency = beat
        writer = self._writer_traffic(sw)
        done, self.hold_until, row_runs = self._run(sw, launch, latency, writer)
        self.setup_free = launch + 1 + READY_LAG
        self.engine_done = done
        self.t_issue = accept + 1
        self.running = _Running(
            start=launch,
            end=done,
            row_runs=row_runs,
            writer_beats=writer[0],
            writer_bursts=writer[1],
            aux_blocks=sw.blocks if aux else 0,
            aux_block_beats=self.mant_beats + 1,
            aux_period=self.mant_beats + 1 + AUX_BLOCK_STATES,
        )
        index = len(self.chains)
        if "mv_mul" in ops:
            self.half_done[("t", index % 2)] = done
        if any(op in ("vv_add", "vv_mul", "vv_max") for op in ops):
            self.half_done[("v", index % 2)] = done
        self.dram_bytes_total += nbytes
        self.chains.append(ChainTiming(launch, done + 1, compute, nbytes, macs, self.pending_bytes))
        self.pending_bytes = 0
        return done + 1 - launch

    def _extend_running(self, done: int) -> None:
        """A load kept the running chain's writer from the bus: it completes at ``done``."""
        old = self.running.end
        self.running.end = self.engine_done = done
        self.chains[-1].end = done + 1
        for key, t in self.half_done.items():
            if t == old:
                self.half_done[key] = done

    def finish(self) -> int:
        return (
            max(self.t_issue, self.engine_done + 1 + RUNNING_LAG, self.loader_free) + HALT_TO_DONE
        )


class _Registers:
    """Control-register file for timing-only walks of a program."""

    def __init__(self) -> None:
        self.values: dict[int, int] = {}

    def reg(self, r: Reg) -> int:
        return self.values.get(int(r), 0)


def estimate(words, cfg: NPUConfig) -> CycleModel:
    """Run the cycle model over a program without computing any data (for reports).

    ``s_ld`` values are data; here the registers they load keep their previous value
    (compiled programs load only exponent registers, which the model does not read).
    """
    return walk([isa.decode(int(w)) for w in words], cfg, None)


def walk(program: list, cfg: NPUConfig, loaded: tuple[tuple[int, int], ...] | None) -> CycleModel:
    """The cycle model over decoded instructions up to ``halt``: what the NPU's timing is
    a function of. ``loaded`` gives, in program order, the ``(register, value)`` of every
    ``s_ld`` that loaded a register the model reads (see :func:`reads_register`); with
    ``None`` those registers keep their previous value.

    The model reads only control registers, and only ``s_wr`` and ``s_ld`` write those
    (chains write exponent registers), so this walk gives a simulator's run exactly the
    timing it would get fed instruction by instruction alongside the data.
    """
    model = CycleModel(cfg)
    regs = _Registers()
    loads = iter(loaded or ())
    chain: list = []
    tile_bytes = layout.tile_bytes(cfg.native_dim, cfg.mantissa_bits)
    const_bytes = layout.const_bytes(cfg.native_dim)
    for ins in program:
        op = ins.op
        if isa.BY_MNEMONIC[op].in_chain:
            chain.append(ins)
            if op == "end_chain":
                aux = any(i.args.get("src") == isa.Operand.AUX for i in chain)
                model.chain([i.op for i in chain], regs, aux)
                chain = []
            continue
        if op == "halt":
            break
        if op == "s_wr":
            regs.values[ins.args["reg"]] = ins.args["value"]
        elif op == "s_ld":
            model.scalar_load()
            if loaded is not None and reads_register(ins.args["reg"]):
                reg, value = next(loads)
                if reg != ins.args["reg"]:
                    raise ValueError(f"s_ld of register {ins.args['reg']} given {reg}'s value")
                regs.values[reg] = value
        elif op == "m_rd":
            model.load(ins.args["count"] * tile_bytes, ins.args["tile"])
        elif op == "c_rd":
            model.load(ins.args["count"] * const_bytes, None)
        model.issue()
    return model


def reads_register(reg: int) -> bool:
    """Whether the model reads register ``reg`` (every one but the exponent registers)."""
    return not isa.EXP_REG_BASE <= reg < isa.EXP_REG_BASE + isa.EXP_REG_COUNT
