"""The golden instruction-set simulator.

It sees only what the hardware sees: the instruction words and a DRAM image. Control
registers, exponent registers, the tile buffer and the vector register file are modelled
as state; a chain is executed as a whole (it sweeps a whole feature map) with the
numerics of :mod:`tessera.numerics`, vectorised over pixels and blocks. The cycle model
(:mod:`tessera.sim.cycles`) walks the same instruction stream with the values the run's
``s_ld`` loaded: the timing is a function of nothing else, so it is computed once per
program and those values, and kept.

For speed, products are exact float64 or byte-digit matrix products
(:mod:`tessera.sim.kernels`), everything after them per vector is compiled
(:mod:`tessera.sim.vector`), and the chains of one layer (same input windows, one per
output-block group) are computed together when the first of them runs: one matrix
product and one pass of their (alike) bodies over stacked vectors, a band of output
pixels at a time on a thread pool. That look-ahead is only a guess at what the program
will do; each chain then uses its share only after checking, against the state it
actually has when it runs, everything the share was computed from: the input windows,
the tiles in its tile-buffer slots (loaded by the same m_rd addresses, no DRAM write
over them since), its VRF entries (compared), its AUX tensor (no DRAM write over it
since), its body and registers. Otherwise it computes on its own. Either way the bytes
written, the exponent registers and the cycle count are the same.

A run of a compiled program from its read-only image leaves a trace (:class:`_Trace`):
the groups it computed, its other chains and its exponent-register writes, with
everything about them that follows from the program and the image alone. Later runs
from the same image follow it (``Simulator.replayed``) and compute only the data,
without decoding, checking or walking ahead in Python; a run is traced only where every
decision it made is sure to be the same in those runs.
"""

from __future__ import annotations

import functools
import itertools
import operator
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from tessera import isa, layout, numerics
from tessera.config import NPUConfig
from tessera.isa import Instr, Operand, PoolOp, Reg
from tessera.sim import cycles as cycle_model
from tessera.sim import kernels, vector
from tessera.sim.cycles import CycleModel

if TYPE_CHECKING:
    from tessera.runtime.host import DramOrigin


class SimulationError(RuntimeError):
    """The program did something the hardware would flag as an error."""


#: Decoded programs, keyed by the exact instruction words (decoding is pure).
_DECODED: OrderedDict[bytes, list[Instr]] = OrderedDict()
#: Weight grids of whole layers (with their byte digits once made), keyed by where their
#: tiles come from and checked against a snapshot of those DRAM bytes before every reuse
#: (or known unchanged: see :class:`_CachedWeights`).
_WEIGHTS: OrderedDict[tuple, _CachedWeights] = OrderedDict()
_WEIGHTS_MAX_BYTES = 384 << 20
#: Accumulators per band of a layer's pixels (1 MiB of float64): one band's product and
#: vector path work in cache.
_BAND_VALUES = 1 << 17
#: Cycle-model walks of whole programs, keyed by the program, the configuration and the
#: values its ``s_ld`` loaded into registers the model reads (see :meth:`Simulator._timing`).
_TIMINGS: OrderedDict[tuple, CycleModel] = OrderedDict()
#: Traces of whole runs (:class:`_Trace`), keyed by the configuration and the program.
_TRACES: OrderedDict[tuple, _Trace] = OrderedDict()
_EXP_REGS = range(isa.EXP_REG_BASE, isa.EXP_REG_BASE + isa.EXP_REG_COUNT)


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Equality of two uint8 arrays, compared eight bytes at a time where possible."""
    if a.shape != b.shape:
        return False
    k = a.size - a.size % 8
    return np.array_equal(a[:k].view(np.uint64), b[:k].view(np.uint64)) and np.array_equal(
        a[k:], b[k:]
    )


@dataclass
class _CachedWeights:
    """A weight grid and the DRAM bytes (``snaps``, per chain) it was made from.

    ``image``: a weak reference to the run origin's read-only image these bytes were
    last found equal to. A run copied from that same image that has written none of them
    since needs no comparison (the image cannot change; while the reference is alive no
    other array can be that one, and the cache does not keep images alive).
    """

    snaps: list[np.ndarray]
    grid: kernels.WeightOperand
    chans: np.ndarray | None
    image: weakref.ref | None = None

    def matches(self, image: np.ndarray | None) -> bool:
        return image is not None and self.image is not None and self.image() is image

    def remember(self, image: np.ndarray | None) -> None:
        self.image = None if image is None else weakref.ref(image)


@dataclass(frozen=True)
class _GroupStep:
    """A group of mv_mul chains that a traced run computed together (see
    :meth:`Simulator._plan_group`), all of them using their share: where its input,
    weights, AUX operands and outputs are, and its body's op table and VRF constants.

    ``group``: per chain (pc, tile address, tiles, output blocks, weight floor);
    ``source``: the input tensor (address, H, W, CB, block offset, block count);
    ``aux``: per chain (address, H, W, CB, block offset) of its AUX blocks, or None;
    ``outs``: per chain (address, H, W, CB, block offset, exponent register);
    ``direct``: no output overlaps another output or anything the group reads, so the
    bands may write DRAM themselves and read the input without a copy.
    """

    group: tuple
    kpos: int
    window: tuple
    source: tuple[int, int, int, int, int, int]
    in_ereg: int
    table: np.ndarray
    const_q: np.ndarray
    const_e: np.ndarray
    aux: tuple
    outs: tuple
    direct: bool


@dataclass(frozen=True)
class _ChainStep:
    """Any other chain of a traced run: run again as it is, on the control registers
    and VRF entries it had then (the same in every run the trace is used for)."""

    ops: tuple
    regs: tuple[int, ...]
    vrf_q: np.ndarray
    vrf_e: np.ndarray


@dataclass(frozen=True)
class _ExpStep:
    """An ``s_wr`` (``value``) or ``s_ld`` (from address ``value``) of an exponent
    register: exponent registers hold data, so these are done again in every run."""

    reg: int
    value: int
    load: bool


@dataclass
class _Trace:
    """What one run of a program did, for later runs of it to do without decoding,
    checking and walking ahead instruction by instruction in Python.

    Everything in a run but the values of activations and exponent registers follows
    from the instruction words and the DRAM bytes the program reads as control: tiles
    (m_rd), VRF constants (c_rd) and control registers (s_ld). A run is traced only
    where those bytes all came unchanged from its origin's read-only ``image`` (not
    written by the run, not among the input bytes ``changed``), every mv_mul chain used
    the share its group computed for it, and no exponent register was written inside
    a group. Then any run whose DRAM is a copy of the same image with the same
    ``changed`` ranges makes every decision the traced run made, and the trace's
    ``steps`` are that run with only the data left to compute. ``regs``, ``vrf``,
    ``tiles`` and ``loaded`` are the state the traced run ended with.
    """

    image: weakref.ref
    changed: tuple[tuple[int, int], ...]
    steps: list[_GroupStep | _ChainStep | _ExpStep]
    regs: list[int]
    vrf: tuple[np.ndarray, np.ndarray]
    tiles: tuple[np.ndarray, np.ndarray]
    loaded: list[tuple[int, int]]

    def fits(self, origin: DramOrigin | None) -> bool:
        return (
            origin is not None
            and self.image() is origin.image
            and self.changed == tuple(origin.changed)
        )


class _LoadMap:
    """Which load (m_rd or c_rd) last filled each entry of an on-chip buffer.

    Loads are numbered in issue order; ``loads[i]`` is the i-th load's (first entry,
    DRAM address, DRAM writes done before it).
    """

    def __init__(self, size: int, stride: int) -> None:
        self.ids = np.full(size, -1, dtype=np.int64)
        self.loads: list[tuple[int, int, int]] = []
        self.stride = stride  # DRAM bytes per entry

    def copy(self) -> _LoadMap:
        other = _LoadMap(0, self.stride)
        other.ids, other.loads = self.ids.copy(), list(self.loads)
        return other

    def load(self, first: int, count: int, addr: int, epoch: int) -> None:
        self.ids[first : first + count] = len(self.loads)
        self.loads.append((first, addr, epoch))

    def source(self, first: int, count: int) -> tuple[int, int] | None:
        """(DRAM address, epoch) of entries ``first..first+count`` if they hold DRAM bytes
        from one address on: filled by one load, or by several whose parts continue each
        other's bytes (a large layer's tiles come in several m_rd); the epoch is then the
        earliest load's."""
        if count <= 0 or first < 0 or first + count > self.ids.size:
            return None
        lid = _single_load(self.ids, first, count)
        if lid >= 0:
            start, addr, epoch = self.loads[lid]
            return addr + (first - start) * self.stride, epoch
        ids = self.ids[first : first + count]
        if ids.min() < 0:
            return None
        runs = np.flatnonzero(np.diff(ids)) + 1  # where another load's entries begin
        base, epochs = None, []
        for slot in (first, *(first + int(r) for r in runs)):
            start, addr, epoch = self.loads[int(self.ids[slot])]
            at = addr + (slot - start) * self.stride
            if base is None:
                base = at
            elif at != base + (slot - first) * self.stride:
                return None
            epochs.append(epoch)
        return base, min(epochs)


@njit(cache=True)
def _single_load(ids: np.ndarray, first: int, count: int) -> int:
    """The load that filled all of ``ids[first:first+count]``, or -1 (compiled: it runs
    for every chain, and numpy's fixed cost per call was most of its time)."""
    lid = ids[first]
    for i in range(first + 1, first + count):
        if ids[i] != lid:
            return -1
    return lid


#: Stands in for the AUX operand of a chain whose body reads none.
_NO_AUX = (np.zeros((1, 1), np.int8), np.zeros((1, 1), np.int8))


def _ops_table(body: list[Instr]) -> np.ndarray:
    """A chain body as :func:`tessera.sim.vector.chain_vectors`' op table [K, 2]."""
    rows = []
    for o in body:
        code = vector.OP_CODES.get(o.op)
        if code is None:
            raise SimulationError(f"{o.op} cannot follow the chain head here")
        rows.append((code, vector.SRC_AUX if o.args.get("src") == Operand.AUX else vector.SRC_VRF))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _program_key(words: np.ndarray) -> bytes:
    return np.ascontiguousarray(words, dtype=np.uint64).tobytes()


def _decode_all(words: np.ndarray) -> list[Instr]:
    key = _program_key(words)
    hit = _DECODED.get(key)
    if hit is None:
        hit = [isa.decode(int(w)) for w in words]
        _DECODED[key] = hit
        while len(_DECODED) > 8:
            _DECODED.popitem(last=False)
    return hit


#: The registers an mv_mul chain's input windows depend on (besides the address and
#: the input's exponent maximum).
_WINDOW_REGS = operator.itemgetter(
    *(Reg.IN_H, Reg.IN_W, Reg.IN_CB, Reg.IN_CB_OFF, Reg.IN_CB_CNT, Reg.K_H, Reg.K_W),
    *(Reg.STRIDE_H, Reg.STRIDE_W, Reg.PAD_T, Reg.PAD_L, Reg.DIL_H, Reg.DIL_W),
    *(Reg.OUT_H, Reg.OUT_W),
)


@dataclass
class _Prefetched:
    """One mv_mul chain's results, computed ahead together with its layer's siblings.

    ``acc`` are its accumulators. When the whole chain body could be computed too, ``sq``
    and ``se`` are the storage blocks it writes, valid only if the chain's body, VRF
    entries and AUX operand are still what they were computed from (``body``, ``vrf``,
    ``aux``).
    """

    cols_gen: int
    cols_key: tuple
    w_floor: int
    tile_addr: int  # DRAM address of the first tile the product was computed from
    tiles: int  # how many (consecutive) tiles
    epoch: int  # DRAM writes done before the tiles (and AUX blocks) were read
    acc: np.ndarray | None
    body: tuple = ()
    vrf: list = field(default_factory=list)  # (first slot, count, mantissas + exponents)
    aux_span: tuple[int, int] | None = None  # DRAM bytes of the AUX tensor read
    sq: np.ndarray | None = None
    se: np.ndarray | None = None
    se_max: int = numerics.E_ZERO  # the largest of ``se``


@dataclass
class NPUState:
    cfg: NPUConfig
    mem: np.ndarray
    regs: list[int] = field(init=False)
    tiles_q: np.ndarray = field(init=False)
    tiles_e: np.ndarray = field(init=False)
    vrf_q: np.ndarray = field(init=False)
    vrf_e: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = self.cfg.native_dim
        cap = 2 * self.cfg.tile_buffer_tiles
        self.regs = [0] * 128
        base, count = isa.EXP_REG_BASE, isa.EXP_REG_COUNT
        self.regs[base : base + count] = [numerics.E_ZERO] * count
        # Tiles are kept as the raw stored mantissas and exponents.
        self.tiles_q = np.zeros((cap, n, n), dtype=layout.mantissa_dtype(self.cfg.mantissa_bits))
        self.tiles_e = np.zeros((cap, n), dtype=np.int8)
        self.vrf_q = np.zeros((self.cfg.vrf_depth, n), dtype=np.int64)
        self.vrf_e = np.full(self.cfg.vrf_depth, numerics.E_ZERO, dtype=np.int64)

    def reg(self, r: Reg) -> int:
        return self.regs[r]

    def addr(self, r: Reg) -> int:
        return self.regs[r] & 0xFFFFFFFF

    def ereg(self, r: Reg) -> int:
        """The exponent register a control register points at."""
        idx = self.reg(r)
        if not isa.EXP_REG_BASE <= idx < isa.EXP_REG_BASE + isa.EXP_REG_COUNT:
            raise SimulationError(f"{r.name}={idx} is not an exponent register")
        return idx


@functools.lru_cache(maxsize=4096)  # group shapes: a service may load many programs
def _block_floors(wfloors: tuple[int, ...], cnts: tuple[int, ...]) -> np.ndarray:
    """Each output block's weight floor ([blocks, 1]: chain ``j``'s ``wfloors[j]`` for its
    ``cnts[j]`` blocks), made once per group shape (read-only)."""
    floors = np.repeat(np.array(wfloors, np.int64), cnts)[:, None]
    floors.flags.writeable = False
    return floors


class Simulator:
    """Runs a program on a DRAM image; ``run`` returns the cycle count (the timing is in
    ``cycles``, a :class:`~tessera.sim.cycles.CycleModel`, after the run).

    ``replayed`` says whether the run followed the trace of an earlier run of the same
    program from the same image (:class:`_Trace`) instead of decoding it.
    """

    def __init__(self, cfg: NPUConfig, mem: np.ndarray, origin: DramOrigin | None = None) -> None:
        self.cfg = cfg
        self.state = NPUState(cfg, mem)
        # What ``mem`` was copied from, if the caller knows (runs of a compiled program).
        self._origin = origin
        # Tensor views into DRAM by (address, shape): a chain asks for several, and the
        # same ones recur (mem is this run's for the simulator's whole life).
        self._views: dict[tuple[int, int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.cycles = CycleModel(cfg)
        # (register, value) of each s_ld into a register the cycle model reads.
        self._loaded: list[tuple[int, int]] = []
        # Consecutive chains of one layer read the same input window (one per output
        # group); the unrolled windows are kept until anything writes over the input.
        self._cols_key: tuple | None = None
        self._grid_src: tuple = ()
        self._cols: dict[bytes | None, kernels.Windows] = {}
        self._cols_span = (0, 0)
        self._cols_gen = 0
        self._window: tuple = ()
        # DRAM address each tile-buffer slot was last loaded from (-1: never loaded).
        n, m = cfg.native_dim, cfg.mantissa_bits
        self._tmap = _LoadMap(self.state.tiles_q.shape[0], layout.tile_bytes(n, m))
        self._vmap = _LoadMap(self.state.vrf_q.shape[0], layout.const_bytes(n))
        # m_rd copies into the tile buffer lazily: a pending load is copied when the tile
        # buffer is read, or before a DRAM write touches its source bytes (so the copy
        # holds what DRAM held at the m_rd). Pending loads never share a slot.
        self._pending: list[tuple[int, int, int]] = []  # (first slot, count, address)
        # DRAM writes so far (byte ranges, in order); a slot's load time in that count.
        self._writes: list[tuple[int, int]] = []
        # The lowest and highest byte written so far: spans outside them need no scan
        # of the writes (weights and constants lie outside the activations).
        self._written_box = (0, 0)
        # Chains of one layer (same input window, one per output group) have their
        # products computed in one matrix product when the first of them runs; each
        # chain uses its share only if its tile buffer holds exactly the tiles that
        # product was computed from (see _mv_mul).
        self._prefetched: dict[int, _Prefetched] = {}
        self._decoded: list[Instr] = []
        self._body_ops: dict[int, tuple] = {}  # chain pc -> its body's instructions
        # The steps of this run's trace while it can still become one (None: it cannot),
        # and the pcs of the chains of the last group planned that have not run yet.
        self._steps: list[_GroupStep | _ChainStep | _ExpStep] | None = None
        self._open: set[int] = set()
        self.replayed = False

    def run(self, words: np.ndarray, progress=None) -> int:
        # BLAS on one thread: the simulator splits its work over its own thread pool,
        # and OpenBLAS's threads degrade badly when the machine is shared.
        with kernels.blas_single_thread():
            try:
                return self._run(words, progress)
            finally:
                self.sync_tiles()

    def _run(self, words: np.ndarray, progress=None) -> int:
        decoded = self._decoded = _decode_all(words)
        key = (self.cfg, _program_key(words))
        trace = _TRACES.get(key)
        if trace is not None and trace.fits(self._origin):
            _TRACES.move_to_end(key)
            self._replay(trace, progress)
            self.replayed = True
            self.cycles = self._timing(words)
            return self.cycles.finish()
        self._steps = [] if self._origin is not None else None
        pc = 0
        while pc < len(decoded):
            ins = decoded[pc]
            if ins.op == "halt":
                break
            if ins.op == "v_rd":
                end = pc
                while decoded[end].op != "end_chain":
                    end += 1
                    if end >= len(decoded) or not isa.BY_MNEMONIC[decoded[end].op].in_chain:
                        raise SimulationError(f"chain starting at {pc} has no end_chain")
                self.chain(decoded[pc : end + 1], pc)
                if progress is not None:
                    progress(1)
                pc = end + 1
                continue
            if ins.op == "s_wr":  # the most frequent instruction, inlined
                reg, value = ins.args["reg"], ins.args["value"]
                self.state.regs[reg] = value
                if reg in _EXP_REGS and self._steps is not None:
                    self._trace_exp(_ExpStep(reg, value, load=False))
            else:
                self.scalar(ins)
            pc += 1
        else:
            raise SimulationError("program ran off its end without halt")
        self._keep_trace(key)
        self.cycles = self._timing(words)
        return self.cycles.finish()

    # ------------------------------------------------------------------ traces
    def _trace_exp(self, step: _ExpStep) -> None:
        """Trace an exponent register's write, unless it falls inside a group (whose
        chains were computed with the value it had at the group's start)."""
        if self._open:
            self._steps = None
        else:
            self._steps.append(step)

    def _trace_control_read(self, lo: int, hi: int) -> None:
        """Stop tracing if DRAM bytes ``lo..hi``, read as control, may differ by run."""
        if self._steps is not None and self._origin_image([(lo, hi)]) is None:
            self._steps = None

    def _keep_trace(self, key: tuple) -> None:
        """Keep this run's trace for later runs of the program (see :class:`_Trace`)."""
        if self._steps is None or self._open or self._origin is None:
            return
        self.sync_tiles()
        st = self.state
        _TRACES[key] = _Trace(
            weakref.ref(self._origin.image), tuple(self._origin.changed), self._steps,
            list(st.regs), (st.vrf_q.copy(), st.vrf_e.copy()),
            (st.tiles_q.copy(), st.tiles_e.copy()), list(self._loaded),
        )  # fmt: skip
        while len(_TRACES) > 8:
            _TRACES.popitem(last=False)

    def _replay(self, trace: _Trace, progress=None) -> None:
        """Run the program as ``trace`` says it goes (see :class:`_Trace`)."""
        st = self.state
        for step in trace.steps:
            if isinstance(step, _GroupStep):
                self._replay_group(step)
                if progress is not None:
                    progress(len(step.group))
            elif isinstance(step, _ChainStep):
                self._set_control(step.regs)
                st.vrf_q[:], st.vrf_e[:] = step.vrf_q, step.vrf_e
                self.chain(list(step.ops))
                if progress is not None:
                    progress(1)
            elif step.load:
                st.regs[step.reg] = self._load_word(step.value)
            else:
                st.regs[step.reg] = step.value
        self._set_control(trace.regs)
        (st.vrf_q[:], st.vrf_e[:]), (st.tiles_q[:], st.tiles_e[:]) = trace.vrf, trace.tiles
        self._loaded = list(trace.loaded)

    def _trace_chain(self, ops: list[Instr]) -> None:
        """Trace a chain that is not an mv_mul one, with the registers and VRF it runs on
        (the VRF arrays of the step before when they are the same)."""
        if self._open:
            self._steps = None
            return
        st = self.state
        vrf_q, vrf_e = st.vrf_q.copy(), st.vrf_e.copy()
        last = next((s for s in reversed(self._steps) if isinstance(s, _ChainStep)), None)
        if (
            last is not None
            and np.array_equal(last.vrf_q, vrf_q)
            and np.array_equal(last.vrf_e, vrf_e)
        ):
            vrf_q, vrf_e = last.vrf_q, last.vrf_e
        self._steps.append(_ChainStep(tuple(ops), tuple(st.regs), vrf_q, vrf_e))

    def _set_control(self, regs) -> None:
        """Every register but the exponent registers (data) from ``regs``."""
        live = self.state.regs[_EXP_REGS.start : _EXP_REGS.stop]
        self.state.regs = [*regs[: _EXP_REGS.start], *live, *regs[_EXP_REGS.stop :]]

    def _load_word(self, addr: int) -> int:
        """The little-endian int32 an ``s_ld`` reads at ``addr``."""
        raw = self.state.mem[addr : addr + 4]
        if raw.size != 4:
            raise SimulationError(f"s_ld beyond DRAM at {addr:#x}")
        return int(raw.view("<i4")[0])

    def _replay_group(self, step: _GroupStep) -> None:
        """A traced group: its products and bodies on this run's data, its outputs
        written and its exponent registers raised."""
        st, cfg = self.state, self.cfg
        n = cfg.native_dim
        addr, ih, iw, icb, ioff, icnt = step.source
        qv, ev = self._tensor(addr, ih, iw, icb)
        floor = st.regs[step.in_ereg] - cfg.act_exp_window
        wg, chans, snaps = self._group_weights(list(step.group), step.kpos)
        if len(snaps) != len(step.group):
            raise SimulationError("a traced group's weights changed (the trace is stale)")
        cols = kernels.Windows(
            qv[:, :, ioff : ioff + icnt], ev[:, :, ioff : ioff + icnt], floor, chans,
            *step.window, copy=not step.direct,
        )  # fmt: skip
        aux = [None if a is None else self._aux_blocks(*a, cnt) for a, (*_, cnt, _w) in
               zip(step.aux, step.group, strict=True)]  # fmt: skip
        targets = []
        for oaddr, oh, ow, ocb, ooff, _ereg in step.outs:
            oq, oe = self._tensor(oaddr, oh, ow, ocb)
            targets.append((oq.reshape(oh * ow, ocb * n), oe.reshape(oh * ow, ocb), ooff))
        cnts = [g[3] for g in step.group]
        if step.direct:
            outs = [(q[:, o * n : (o + c) * n], e[:, o : o + c])
                    for (q, e, o), c in zip(targets, cnts, strict=True)]  # fmt: skip
        else:
            outs = [(np.empty((len(q), c * n), q.dtype), np.empty((len(e), c), np.int8))
                    for (q, e, _o), c in zip(targets, cnts, strict=True)]  # fmt: skip
        largest = self._band_bodies(
            cols, wg, floor, [g[4] for g in step.group], cnts, step.table, step.const_q,
            step.const_e, aux, outs,
        )  # fmt: skip
        for j, (oaddr, oh, ow, ocb, _ooff, ereg) in enumerate(step.outs):
            self._before_write(
                oaddr, oaddr + layout.tensor_bytes(oh, ow, ocb, n, cfg.mantissa_bits)
            )
            if not step.direct:
                q, e, o = targets[j]
                q[:, o * n : (o + cnts[j]) * n], e[:, o : o + cnts[j]] = outs[j]
            st.regs[ereg] = max(st.regs[ereg], largest[j])

    def _timing(self, words: np.ndarray) -> CycleModel:
        """The cycle model's walk of this run's program (kept for later runs alike)."""
        key = (self.cfg, _program_key(words), tuple(self._loaded))
        model = _TIMINGS.get(key)
        if model is None:
            model = _TIMINGS[key] = cycle_model.walk(self._decoded, self.cfg, key[2])
            while len(_TIMINGS) > 8:
                _TIMINGS.popitem(last=False)
        _TIMINGS.move_to_end(key)
        return model

    # ------------------------------------------------------------------ scalar / loads
    def scalar(self, ins: Instr) -> None:
        st, a = self.state, ins.args
        n, m = self.cfg.native_dim, self.cfg.mantissa_bits
        if ins.op == "s_ld":
            st.regs[a["reg"]] = self._load_word(a["addr"])
            if cycle_model.reads_register(a["reg"]):
                self._loaded.append((a["reg"], st.regs[a["reg"]]))
            if a["reg"] in _EXP_REGS and self._steps is not None:
                self._trace_exp(_ExpStep(a["reg"], a["addr"], load=True))
            else:
                self._trace_control_read(a["addr"], a["addr"] + 4)
        elif ins.op == "m_rd":
            if a["tile"] + a["count"] > st.tiles_q.shape[0]:
                raise SimulationError("m_rd beyond the tile buffer")
            tb, cnt, t0 = layout.tile_bytes(n, m), a["count"], a["tile"]
            if a["addr"] + cnt * tb > st.mem.size:
                raise SimulationError("m_rd beyond DRAM")
            self._trace_control_read(a["addr"], a["addr"] + cnt * tb)
            keep = []
            for p in self._pending:
                if p[0] < t0 + cnt and t0 < p[0] + p[1]:  # shares slots with this load
                    if not (t0 <= p[0] and p[0] + p[1] <= t0 + cnt):
                        self._copy_tiles(p)  # partly overwritten: its other slots stay
                    continue
                keep.append(p)
            self._pending = [*keep, (t0, cnt, a["addr"])]
            self._tmap.load(t0, cnt, a["addr"], len(self._writes))
        elif ins.op == "c_rd":
            if a["vrf"] + a["count"] > st.vrf_q.shape[0]:
                raise SimulationError("c_rd beyond the vector register file")
            cb, cnt = layout.const_bytes(n), a["count"]
            raw = st.mem[a["addr"] : a["addr"] + cnt * cb]
            if raw.size != cnt * cb:
                raise SimulationError("c_rd beyond DRAM")
            self._trace_control_read(a["addr"], a["addr"] + cnt * cb)
            raw = raw.view("<i2").reshape(cnt, n + 1)
            st.vrf_q[a["vrf"] : a["vrf"] + cnt] = raw[:, :n]
            st.vrf_e[a["vrf"] : a["vrf"] + cnt] = raw[:, n]
            self._vmap.load(a["vrf"], cnt, a["addr"], len(self._writes))
        elif ins.op == "nop":
            pass
        else:
            raise SimulationError(f"{ins.op} outside a chain")

    def _copy_tiles(self, p: tuple[int, int, int]) -> None:
        """Copy one pending m_rd into the tile buffer (DRAM still holds its bytes)."""
        st, n, m = self.state, self.cfg.native_dim, self.cfg.mantissa_bits
        t0, cnt, addr = p
        tb, mb = layout.tile_bytes(n, m), n * n * st.tiles_q.itemsize
        raw = st.mem[addr : addr + cnt * tb].reshape(cnt, tb)
        st.tiles_q[t0 : t0 + cnt] = raw[:, :mb].view(st.tiles_q.dtype).reshape(cnt, n, n)
        st.tiles_e[t0 : t0 + cnt] = raw[:, mb:].view(np.int8)

    def sync_tiles(self) -> None:
        """Bring the tile buffer (``state.tiles_q``/``tiles_e``) up to date."""
        for p in self._pending:
            self._copy_tiles(p)
        self._pending = []

    def _before_write(self, lo: int, hi: int) -> None:
        """A chain is about to write DRAM bytes ``lo..hi``: log it, and copy pending
        tile loads whose source bytes it overwrites."""
        tb = self._tmap.stride
        if self._pending and any(a < hi and lo < a + c * tb for _, c, a in self._pending):
            keep = []
            for p in self._pending:
                if p[2] < hi and lo < p[2] + p[1] * tb:
                    self._copy_tiles(p)
                else:
                    keep.append(p)
            self._pending = keep
        self._writes.append((lo, hi))
        box_lo, box_hi = self._written_box
        self._written_box = (lo, hi) if box_lo == box_hi else (min(lo, box_lo), max(hi, box_hi))

    # ------------------------------------------------------------------ chains
    def _tensor(self, addr: int, h: int, w: int, cb: int) -> tuple[np.ndarray, np.ndarray]:
        """Views (no copies) of a tensor's mantissas [H, W, CB, N] and exponents [H, W, CB]."""
        key = (addr, h, w, cb)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = self._make_tensor_views(addr, h, w, cb)
        return views

    def _make_tensor_views(self, addr: int, h: int, w: int, cb: int):
        n, m = self.cfg.native_dim, self.cfg.mantissa_bits
        if addr + layout.tensor_exp_offset(h, w, cb, n, m) + h * w * cb > self.state.mem.size:
            raise SimulationError(f"tensor at {addr:#x} ({h}x{w}x{cb} blocks) runs past DRAM")
        return layout.tensor_planes(self.state.mem, addr, h, w, cb, n, m)

    def chain(self, ops: list[Instr], pc: int | None = None) -> None:
        """Execute one chain over the whole output map.

        Vectors are lane-major: the reducer gives exact integer lanes [blocks*N,
        pixels] (float64 accumulators or sums, or the stored mantissas of a plain
        read), which :meth:`_vector_path` takes through the body to storage blocks.
        """
        cfg, st = self.cfg, self.state
        n, m = cfg.native_dim, cfg.mantissa_bits
        names = [o.op for o in ops]
        if names[-2:] != ["v_wr", "end_chain"]:
            raise SimulationError(f"chain {names} does not end with v_wr, end_chain")
        reducer = names[1] if names[1] in ("mv_mul", "v_pool") else None
        body = ops[2:-2] if reducer else ops[1:-2]
        R = Reg
        ih, iw, icb = st.reg(R.IN_H), st.reg(R.IN_W), st.reg(R.IN_CB)
        ioff, icnt = st.reg(R.IN_CB_OFF), st.reg(R.IN_CB_CNT)
        oh, ow = st.reg(R.OUT_H), st.reg(R.OUT_W)
        ocb, ooff, ocnt = st.reg(R.OUT_CB), st.reg(R.OUT_CB_OFF), st.reg(R.OUT_CB_CNT)
        kernel = (st.reg(R.K_H), st.reg(R.K_W))
        stride = (st.reg(R.STRIDE_H), st.reg(R.STRIDE_W))
        pads = (st.reg(R.PAD_T), st.reg(R.PAD_L))
        dil = (st.reg(R.DIL_H), st.reg(R.DIL_W))
        if ioff + icnt > icb or ooff + ocnt > ocb:
            raise SimulationError("chain block range exceeds its tensor")
        in_addr = st.addr(R.IN_ADDR)
        qv, ev = self._tensor(in_addr, ih, iw, icb)
        q, e = qv[:, :, ioff : ioff + icnt], ev[:, :, ioff : ioff + icnt]
        emax = st.regs[st.ereg(R.IN_EREG)]
        p = oh * ow
        stored = None  # the storage blocks, when computed ahead with sibling chains
        if reducer != "mv_mul" and self._steps is not None:
            self._trace_chain(ops)
        if reducer == "mv_mul":
            floor = emax - cfg.act_exp_window
            key = self._cols_key_of(st.regs)
            if key != self._cols_key:
                self._grid_src = (q, e, floor)
                self._window = (kernel, stride, pads, dil, (oh, ow))
                self._cols = {}
                self._cols_key = key
                self._cols_span = (in_addr, in_addr + layout.tensor_bytes(ih, iw, icb, n, m))
                self._cols_gen += 1
            wfloor = st.reg(R.W_EXP_FLOOR)
            acc = self._mv_mul(pc, ops, ocnt, kernel[0] * kernel[1] * icnt)
            if isinstance(acc, tuple):
                stored = acc
            else:
                x, e_in, first = acc, np.full((ocnt, 1), floor + wfloor, np.int64), True
            if self._steps is not None:
                if stored is None or pc not in self._open:
                    self._steps = None  # computed on its own: not traced
                self._open.discard(pc)
        elif reducer == "v_pool":
            if icnt != ocnt:
                raise SimulationError("v_pool needs IN_CB_CNT == OUT_CB_CNT")
            floor = emax - cfg.act_exp_window
            is_max = ops[1].args["op"] == PoolOp.MAX
            x = kernels.pool_lanes(q, e, floor, is_max, kernel, stride, pads, (oh, ow))
            e_in, first = np.full((ocnt, 1), floor, np.int64), True
        else:
            if icnt != ocnt:
                raise SimulationError("an elementwise chain needs IN_CB_CNT == OUT_CB_CNT")
            wq = kernels.gather_windows(
                q.reshape(ih, iw, -1), (1, 1), stride, pads, (1, 1), (oh, ow)
            )
            we = kernels.gather_windows(e, (1, 1), stride, pads, (1, 1), (oh, ow), numerics.E_ZERO)
            x = np.ascontiguousarray(wq.reshape(p, ocnt * n).T)
            e_in, first = np.ascontiguousarray(we.reshape(p, ocnt).T, dtype=np.int64), False
        if stored is None:
            sq, se, se_max = self._vector_path(x, e_in, first, body, ocnt)
        else:
            sq, se, se_max = stored
        out_addr = st.addr(R.OUT_ADDR)
        out_end = out_addr + layout.tensor_bytes(oh, ow, ocb, n, m)
        if out_addr < self._cols_span[1] and self._cols_span[0] < out_end:
            self._cols_key = None
        oq, oe = self._tensor(out_addr, oh, ow, ocb)
        self._before_write(out_addr, out_end)
        oq[:, :, ooff : ooff + ocnt, :] = sq.reshape(oh, ow, ocnt, n)
        oe[:, :, ooff : ooff + ocnt] = se.reshape(oh, ow, ocnt)
        er = st.ereg(R.OUT_EREG)
        st.regs[er] = max(st.regs[er], se_max)

    # ------------------------------------------------------------------ MVU
    @staticmethod
    def _cols_key_of(regs: list[int]) -> tuple | None:
        """What an mv_mul chain's unrolled input windows depend on, from a register file."""
        ereg = regs[Reg.IN_EREG]
        if not isa.EXP_REG_BASE <= ereg < isa.EXP_REG_BASE + isa.EXP_REG_COUNT:
            return None
        return (regs[Reg.IN_ADDR] & 0xFFFFFFFF, regs[ereg], *_WINDOW_REGS(regs))

    def _mv_mul(self, pc: int | None, ops: list[Instr], ocnt: int, k: int):
        """The current chain's exact accumulators [ocnt*N, P] (float64), or its storage
        blocks and their largest exponent ``(sq, se, se_max)`` when they were computed
        ahead and are still valid."""
        st = self.state
        t = ocnt * k
        base = ops[1].args["tile"]
        wfloor = st.reg(Reg.W_EXP_FLOOR)
        pf = self._prefetched.pop(pc, None) if pc is not None else None
        if pf is None and pc is not None:
            self._prefetched, step = self._plan_group(pc)
            pf = self._prefetched.pop(pc, None)
            if self._steps is not None:
                if self._open or step is None:
                    self._steps = None  # chains of a group skipped, or bodies not run ahead
                else:
                    self._steps.append(step)
                    self._open = {g[0] for g in step.group}
        if (
            pf is not None
            and pf.cols_gen == self._cols_gen
            and pf.cols_key == self._cols_key
            and pf.w_floor == wfloor
            and self._tiles_unchanged(pf, base, t)
        ):
            if pf.sq is not None and self._body_unchanged(pf, pc, ops[2:-2]):
                return pf.sq, pf.se, pf.se_max
            if pf.acc is not None:
                return pf.acc
        self.sync_tiles()
        tq, te = st.tiles_q[base : base + t], st.tiles_e[base : base + t]
        try:
            wg = kernels.weight_grid_f64(tq, te, wfloor, ocnt)
        except ValueError as exc:
            raise SimulationError(str(exc)) from None
        cols = self._unrolled(None).rows(0, self._window[4][0])
        return kernels.gemm_exact(cols, wg)

    def _body_sig(self, pc: int, body: list[Instr], regs: list[int]) -> tuple:
        """What the body of the chain at ``pc`` computes from besides its operands'
        contents: its instructions and, if it reads AUX, the AUX registers."""
        ops = self._body_ops.get(pc)
        if ops is None:
            aux = any(o.args.get("src") == Operand.AUX for o in body)
            ops = self._body_ops[pc] = (
                tuple((o.op, tuple(sorted(o.args.items()))) for o in body),
                aux,
            )
        if ops[1]:
            return ops[0], (regs[Reg.AUX_ADDR], regs[Reg.AUX_CB], regs[Reg.AUX_CB_OFF])
        return ops[0], ()

    @staticmethod
    def _aux_source(regs: list[int]) -> tuple[int, int, int, int, int]:
        """Where a chain's AUX blocks are: (address, H, W, CB, block offset)."""
        addr = int(regs[Reg.AUX_ADDR]) & 0xFFFFFFFF
        return addr, *(int(regs[r]) for r in (Reg.OUT_H, Reg.OUT_W, Reg.AUX_CB, Reg.AUX_CB_OFF))

    def _aux_view(self, regs: list[int], ocnt: int):
        """The AUX blocks a chain reads, pixel-major views into DRAM: [P, ocnt*N], [P, ocnt]."""
        return self._aux_blocks(*self._aux_source(regs), ocnt)

    def _aux_blocks(self, addr: int, oh: int, ow: int, acb: int, aoff: int, ocnt: int):
        """:meth:`_aux_view` of the AUX tensor at ``addr``."""
        if aoff + ocnt > acb:
            raise SimulationError("AUX block range exceeds its tensor")
        q, e = self._tensor(addr, oh, ow, acb)
        n, p = q.shape[3], oh * ow
        return (
            q.reshape(p, acb * n)[:, aoff * n : (aoff + ocnt) * n],
            e.reshape(p, acb)[:, aoff : aoff + ocnt],
        )

    def _body_unchanged(self, pf: _Prefetched, pc: int, body: list[Instr]) -> bool:
        st = self.state
        if self._body_sig(pc, body, st.regs) != pf.body:
            return False
        for slot, count, snap in pf.vrf:
            vrf = (st.vrf_q[slot : slot + count], st.vrf_e[slot : slot + count])
            if b"".join(v.tobytes() for v in vrf) != snap:
                return False
        return pf.aux_span is None or not self._written_since(pf.epoch, *pf.aux_span)

    def _written_since(self, epoch: int, lo: int, hi: int) -> bool:
        """Whether a DRAM write since the ``epoch``-th touched bytes ``lo..hi``."""
        box_lo, box_hi = self._written_box
        if not (box_lo < hi and lo < box_hi):
            return False
        return any(a < hi and lo < b for a, b in self._writes[epoch:])

    def _tiles_unchanged(self, pf: _Prefetched, base: int, t: int) -> bool:
        """Whether tile slots ``base..base+t`` hold the bytes ``pf`` was computed from.

        Slots change only by m_rd, which copies DRAM as it is then; DRAM changes only by
        chain writes, which are logged. So the slots hold those bytes when they were
        loaded from the same addresses and no write touched them between that load and
        the moment ``pf`` read them (both are after the earlier of the two epochs).
        """
        src = self._tmap.source(base, t) if t == pf.tiles else None
        if src is None or src[0] != pf.tile_addr:
            return False
        since = min(pf.epoch, src[1])
        return not self._written_since(since, pf.tile_addr, pf.tile_addr + t * self._tmap.stride)

    def _unrolled(self, chans: np.ndarray | None) -> kernels.Windows:
        """The current input's windows (only channels ``chans`` if given)."""
        ck = None if chans is None else chans.tobytes()
        cols = self._cols.get(ck)
        if cols is None:
            cols = self._cols[ck] = kernels.Windows(*self._grid_src, chans, *self._window)
        return cols

    def _plan_group(self, pc: int) -> tuple[dict[int, _Prefetched], _GroupStep | None]:
        """Compute the chain at ``pc`` and the sibling chains after it, together.

        Walks the instruction stream ahead on a copy of the registers and of the tile
        buffer's and VRF's load addresses, collecting the following mv_mul chains that
        read the same input windows, up to anything it does not model (then it stops).
        Their products are one matrix product; when their bodies are alike, the bodies
        run once on the stacked vectors too, with VRF and AUX operands read from DRAM
        now. It is only a guess: each chain checks its share before using it.

        Also returns the group as a trace step when its bodies ran ahead (else None).
        """
        st, cfg = self.state, self.cfg
        n, m = cfg.native_dim, cfg.mantissa_bits
        decoded = self._decoded
        regs = st.regs.copy()
        tmap, vmap = self._tmap.copy(), self._vmap.copy()
        key0 = self._cols_key
        in_lo, in_hi = self._cols_span
        group: list[tuple[int, int, int, int, int]] = []  # pc, addr, tiles, ocnt, w_floor
        plans: list[tuple] = []  # per chain: body, signature, VRF sources, registers
        i = pc
        while i < len(decoded):
            ins = decoded[i]
            a = ins.args
            if ins.op == "v_rd":
                end = i
                while end < len(decoded) and decoded[end].op != "end_chain":
                    end += 1
                if end >= len(decoded) or decoded[i + 1].op != "mv_mul":
                    break
                if self._cols_key_of(regs) != key0:
                    break
                kk = regs[Reg.K_H] * regs[Reg.K_W] * regs[Reg.IN_CB_CNT]
                ocnt = regs[Reg.OUT_CB_CNT]
                base, t = decoded[i + 1].args["tile"], ocnt * kk
                tsrc = tmap.source(base, t)
                if tsrc is None:
                    break
                group.append((i, tsrc[0], t, ocnt, regs[Reg.W_EXP_FLOOR]))
                body = decoded[i + 2 : end - 1]
                vsrcs = []
                for o in body:
                    if "vrf" in o.args and o.args.get("src", Operand.VRF) == Operand.VRF:
                        v = vmap.source(o.args["vrf"], ocnt)
                        vsrcs.append((o.args["vrf"], -1 if v is None else v[0]))
                plans.append((body, self._body_sig(i, body, regs), vsrcs, regs.copy()))
                # Stop where this chain's write changes what later chains would read.
                out = int(regs[Reg.OUT_ADDR]) & 0xFFFFFFFF
                oh, ow, ocb = (int(regs[r]) for r in (Reg.OUT_H, Reg.OUT_W, Reg.OUT_CB))
                out_end = out + layout.tensor_bytes(oh, ow, ocb, n, m)
                if out < in_hi and in_lo < out_end:
                    break
                if int(regs[Reg.OUT_EREG]) == int(regs[Reg.IN_EREG]):
                    break
                i = end + 1
            elif ins.op == "s_wr":
                regs[a["reg"]] = a["value"]
                i += 1
            elif ins.op == "m_rd":
                tmap.load(a["tile"], a["count"], a["addr"], -1)
                i += 1
            elif ins.op == "c_rd":
                vmap.load(a["vrf"], a["count"], a["addr"], -1)
                i += 1
            elif ins.op == "nop":
                i += 1
            else:
                break
        kpos = self._window[0][0] * self._window[0][1]
        wg, chans, snaps = self._group_weights(group, kpos)
        if wg is None:
            return {}, None
        group, plans = group[: len(snaps)], plans[: len(snaps)]
        cols = self._unrolled(chans)
        out: dict[int, _Prefetched] = {}
        epoch = len(self._writes)
        for cpc, addr, t, _ocnt, wfloor in group:
            out[cpc] = _Prefetched(self._cols_gen, key0, wfloor, addr, t, epoch, None)
        try:
            prep = self._prepare_bodies(group, plans)
        except (SimulationError, ValueError, IndexError):
            prep = None  # left to the chains themselves, which report what is wrong
        if prep is not None:
            self._run_bodies(group, plans, cols, wg, prep, out)
            return out, self._group_step(group, plans, prep, kpos)
        acc = wg.product(cols, 0, cols.out_hw[0], 0, wg.grid.shape[0])
        b0 = 0
        for cpc, _addr, _t, ocnt, _wf in group:
            out[cpc].acc = acc[b0 * n : (b0 + ocnt) * n]
            b0 += ocnt
        return out, None

    def _group_step(self, group, plans, prep, kpos: int) -> _GroupStep:
        """A planned group (whose bodies ran ahead) as a trace step."""
        n, m = self.cfg.native_dim, self.cfg.mantissa_bits
        cnts, table, const_q, const_e, aux, _vrf_snaps, aux_spans = prep
        regs = plans[0][3]
        source = (
            int(regs[Reg.IN_ADDR]) & 0xFFFFFFFF,
            *(int(regs[r]) for r in (Reg.IN_H, Reg.IN_W, Reg.IN_CB, Reg.IN_CB_OFF, Reg.IN_CB_CNT)),
        )
        outs = []
        for *_, chain_regs in plans:
            out = int(chain_regs[Reg.OUT_ADDR]) & 0xFFFFFFFF
            shape = (int(chain_regs[r]) for r in (Reg.OUT_H, Reg.OUT_W, Reg.OUT_CB, Reg.OUT_CB_OFF))
            outs.append((out, *shape, int(chain_regs[Reg.OUT_EREG])))
        # Bands may write DRAM themselves only if no output is read by the group or
        # written twice (the bands run in any order).
        reads = [self._cols_span, *(sp for sp in aux_spans if sp is not None)]
        spans = [(o[0], o[0] + layout.tensor_bytes(*o[1:4], n, m)) for o in outs]
        blocks = [(o[:4], o[4], o[4] + c) for o, c in zip(outs, cnts, strict=True)]
        direct = not any(lo < b and a < hi for lo, hi in spans for a, b in reads) and not any(
            (t1 == t2 and lo1 < hi2 and lo2 < hi1) or (t1 != t2 and s1[0] < s2[1] and s2[0] < s1[1])
            for i, ((t1, lo1, hi1), s1) in enumerate(zip(blocks, spans, strict=True))
            for (t2, lo2, hi2), s2 in zip(blocks[i + 1 :], spans[i + 1 :], strict=True)
        )
        return _GroupStep(
            tuple(group), kpos, self._window, source, int(regs[Reg.IN_EREG]), table, const_q,
            const_e, tuple(None if a is None else self._aux_source(r) for a, (*_, r) in
                           zip(aux, plans, strict=True)),
            tuple(outs), direct,
        )  # fmt: skip

    def _prepare_bodies(self, group, plans):
        """Operands of the (alike) bodies of a group of chains, read from DRAM now.

        Returns ``None`` when the bodies differ in shape or use an operand whose source
        the walk ahead could not tell; else the blocks per chain, the body's op table,
        its VRF constants stacked over the group's blocks, each chain's AUX blocks, and
        each chain's snapshots (VRF entries, AUX span) to check before use.
        """
        st, cfg = self.state, self.cfg
        n = cfg.native_dim
        shape = [tuple((o.op, o.args.get("src")) for o in body) for body, *_ in plans]
        if len(set(shape)) != 1 or any(v < 0 for *_, vs, _ in plans for _, v in vs):
            return None
        body0 = plans[0][0]
        if any(o.op not in vector.OP_CODES for o in body0):
            return None
        table = _ops_table(body0)
        cnts = [ocnt for _, _, _, ocnt, _ in group]
        blocks = sum(cnts)
        const_q = np.zeros((max(len(body0), 1), blocks, n), np.int64)
        const_e = np.zeros((max(len(body0), 1), blocks), np.int64)
        vrf_snaps: list[list] = [[] for _ in group]
        aux: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(group)
        aux_spans: list = [None] * len(group)
        b0 = 0
        for j, (body, _sig, vsrcs, regs) in enumerate(plans):
            vs = iter(vsrcs)
            b1 = b0 + cnts[j]
            for k in range(len(body)):
                if table[k, 0] == vector.OP_RELU:
                    continue
                if table[k, 1] == vector.SRC_VRF:
                    slot, addr = next(vs)
                    cq, ce = layout.unpack_consts(st.mem, addr, cnts[j], n)
                    vrf_snaps[j].append((slot, cnts[j], cq.tobytes() + ce.tobytes()))
                    const_q[k, b0:b1], const_e[k, b0:b1] = cq, ce
                elif aux[j] is None:
                    lo, oh, ow, acb, aoff = self._aux_source(regs)
                    aux[j] = self._aux_blocks(lo, oh, ow, acb, aoff, cnts[j])
                    aux_spans[j] = (lo, lo + layout.tensor_bytes(oh, ow, acb, n, cfg.mantissa_bits))
            b0 = b1
        return cnts, table, const_q, const_e, aux, vrf_snaps, aux_spans

    def _run_bodies(self, group, plans, cols, wg, prep, out: dict[int, _Prefetched]):
        """Products and bodies of a group of chains on their stacked vectors, into each
        chain's share in ``out``."""
        n, m = self.cfg.native_dim, self.cfg.mantissa_bits
        cnts, table, const_q, const_e, aux, vrf_snaps, aux_spans = prep
        blocks = sum(cnts)
        p = cols.out_hw[0] * cols.out_hw[1]
        sq_all = np.empty((p, blocks * n), layout.mantissa_dtype(m))
        se_all = np.empty((p, blocks), np.int8)
        edges = np.cumsum([0, *cnts])
        outs = [
            (sq_all[:, b0 * n : b1 * n], se_all[:, b0:b1]) for b0, b1 in itertools.pairwise(edges)
        ]
        floor = int(self._cols_key[1]) - self.cfg.act_exp_window
        wfloors = [wf for *_, wf in group]
        largest = self._band_bodies(
            cols, wg, floor, wfloors, cnts, table, const_q, const_e, aux, outs
        )
        for j, (cpc, *_rest) in enumerate(group):
            pf = out[cpc]
            pf.body, pf.vrf, pf.aux_span = plans[j][1], vrf_snaps[j], aux_spans[j]
            pf.sq, pf.se = outs[j]
            pf.se_max = largest[j]

    def _band_bodies(self, cols, wg, floor, wfloors, cnts, table, const_q, const_e, aux, outs):
        """Products and bodies of a group of chains (``cnts[j]`` output blocks each) on
        their stacked vectors, a band of output pixels at a time (every step is per
        pixel, so the bands are independent) to keep each band's working set in cache.

        Chain ``j``'s storage blocks go to ``outs[j]`` (pixel-major mantissas and
        exponents, [P, cnts[j]*N] and [P, cnts[j]]); returns each chain's largest
        exponent written.
        """
        cfg = self.cfg
        n, m = cfg.native_dim, cfg.mantissa_bits
        blocks = sum(cnts)
        oh, ow = cols.out_hw
        p = oh * ow
        lsb = floor + _block_floors(tuple(wfloors), tuple(cnts))
        has_aux = aux[0] is not None
        workers = kernels.parallel_workers()
        step = max(64, min(_BAND_VALUES // (blocks * n), -(-p // (2 * workers))))
        step = max(1, -(-step // ow))  # whole output rows
        # Few output rows (late layers): split the output blocks too, so there are a
        # few items per worker to balance.
        splits = max(1, min(blocks, -(-2 * workers // -(-oh // step))))
        cuts = [blocks * i // splits for i in range(splits + 1)]

        def band(item: tuple[int, int, int]) -> None:
            y0, b0, b1 = item
            y1 = min(oh, y0 + step)
            p0, p1 = y0 * ow, y1 * ow
            acc = wg.product(cols, y0, y1, b0 * n, b1 * n)
            # Each chain's blocks of the item apart: they read their own AUX tensor, and
            # the chain's largest exponent is its own.
            a0 = 0
            for j, c in enumerate(cnts):
                lo, hi = max(a0, b0), min(a0 + c, b1)  # blocks of chain j in the item
                if lo < hi:
                    aq, ae = _NO_AUX
                    if has_aux:
                        q, e = aux[j]
                        aq, ae = (
                            q[p0:p1, (lo - a0) * n : (hi - a0) * n],
                            e[p0:p1, lo - a0 : hi - a0],
                        )
                    sq, se = outs[j]
                    largest = vector.chain_vectors(
                        acc[(lo - b0) * n : (hi - b0) * n], lsb[lo:hi], True,
                        cfg.mfu_mantissa_bits, m, table, const_q[:, lo:hi], const_e[:, lo:hi],
                        aq, ae, sq[p0:p1, (lo - a0) * n : (hi - a0) * n],
                        se[p0:p1, lo - a0 : hi - a0],
                    )  # fmt: skip
                    exps.append((j, largest))
                a0 += c

        items = [(y0, lo, hi) for y0 in range(0, oh, step) for lo, hi in itertools.pairwise(cuts)]
        exps: list[tuple[int, int]] = []  # (chain, largest exponent of one of its parts)
        wg.prepare(cols)
        kernels.run_parallel(band, items)
        largest = [numerics.E_ZERO] * len(cnts)
        for j, e in exps:
            largest[j] = max(largest[j], e)
        return largest

    def _group_weights(self, group, kpos: int):
        """Weight grid of a group of chains (stacked rows), reused across runs."""
        st, cfg = self.state, self.cfg
        n, m = cfg.native_dim, cfg.mantissa_bits
        tb = layout.tile_bytes(n, m)
        mem = st.mem
        key = (n, m, kpos, tuple((addr, t, ocnt, wf) for _, addr, t, ocnt, wf in group))
        hit = _WEIGHTS.get(key)
        spans = [(addr, addr + t * tb) for _, addr, t, _, _ in group]
        image = self._origin_image(spans)
        if hit is not None:
            if hit.matches(image) or all(
                _same_bytes(mem[lo:hi], s) for (lo, hi), s in zip(spans, hit.snaps, strict=True)
            ):
                hit.remember(image)
                _WEIGHTS.move_to_end(key)
                return hit.grid, hit.chans, hit.snaps
        snaps, parts = [], []
        mb = n * n * st.tiles_q.itemsize
        for _, addr, t, ocnt, wfloor in group:
            snap = mem[addr : addr + t * tb].copy()
            if snap.size != t * tb or (parts and t // ocnt != parts[0][0].shape[0] // parts[0][2]):
                break
            raw = snap.reshape(t, tb)
            te = raw[:, mb:].view(np.int8)
            if np.any(te < wfloor):
                break  # the chain itself reports it when it runs
            parts.append((raw[:, :mb].view(st.tiles_q.dtype).reshape(t, n, n), te, ocnt, wfloor))
            snaps.append(snap)
        if not parts:
            return None, None, []
        # Tiles are [output block][kernel position][input block] of [row][col]; the grid
        # is built in weight_grid()'s layout: rows [output block][lane (tile row)],
        # columns [kernel position][input channel].
        icnt = parts[0][0].shape[0] // parts[0][2] // kpos
        blocks = sum(ocnt for _, _, ocnt, _ in parts)
        # Input channels whose weights are all zero (channel padding) add nothing: drop
        # them from both operands.
        nz = np.zeros((icnt, n), dtype=bool)
        for tq, _, ocnt, _ in parts:
            nz |= np.any(tq.reshape(ocnt, kpos, icnt, n, n) != 0, axis=(0, 1, 3))
        nz = nz.ravel()
        chans = np.flatnonzero(nz) if nz.mean() < 0.75 else None
        width = icnt * n if chans is None else len(chans)
        out = np.empty((blocks, n, kpos, width))
        b0 = 0
        for tq, te, ocnt, wfloor in parts:
            q5 = tq.reshape(ocnt, kpos, icnt, n, n).transpose(0, 3, 1, 2, 4)
            scale = kernels.pow2(te.astype(np.int64) - wfloor)
            s5 = scale.reshape(ocnt, kpos, icnt, n, 1).transpose(0, 3, 1, 2, 4)
            dst = out[b0 : b0 + ocnt]
            if chans is None:
                np.multiply(q5, s5, out=dst.reshape(ocnt, n, kpos, icnt, n))
            else:
                dst[...] = (q5 * s5).reshape(ocnt, n, kpos, icnt * n)[..., chans]
            b0 += ocnt
        wg = kernels.WeightOperand(out.reshape(blocks * n, kpos * width))
        key = (n, m, kpos, tuple((a, t, oc, wf) for _, a, t, oc, wf in group[: len(snaps)]))
        _WEIGHTS[key] = entry = _CachedWeights(snaps, wg, chans)
        entry.remember(self._origin_image(spans[: len(snaps)]))
        total = sum(v.grid.nbytes for v in _WEIGHTS.values())
        while total > _WEIGHTS_MAX_BYTES and len(_WEIGHTS) > 1:
            _, old = _WEIGHTS.popitem(last=False)
            total -= old.grid.nbytes
        return wg, chans, snaps

    def _origin_image(self, spans: list[tuple[int, int]]) -> np.ndarray | None:
        """The origin's image if DRAM still holds its bytes in all of ``spans``."""
        origin = self._origin
        if origin is None or any(
            self._written_since(0, lo, hi) or any(a < hi and lo < b for a, b in origin.changed)
            for lo, hi in spans
        ):
            return None
        return origin.image

    def _vector_path(self, x, e_in, first: bool, body: list[Instr], ocnt: int):
        """A chain's MFU ops and its re-blocking to storage, on lane-major vectors ``x``
        [ocnt*N, P] at exponents ``e_in`` [ocnt, P or 1] (see
        :func:`tessera.sim.vector.chain_vectors`).

        Returns the storage blocks (mantissas [P, ocnt*N], exponents [P, ocnt]) and the
        largest exponent, computed in bands of pixels on the thread pool.
        """
        st, cfg = self.state, self.cfg
        n, m = cfg.native_dim, cfg.mantissa_bits
        table = _ops_table(body)
        const_q = np.zeros((max(len(body), 1), ocnt, n), np.int64)
        const_e = np.zeros((max(len(body), 1), ocnt), np.int64)
        aq, ae = _NO_AUX
        for k, ins in enumerate(body):
            if table[k, 0] == vector.OP_RELU:
                continue
            if table[k, 1] == vector.SRC_VRF:
                base = ins.args["vrf"]
                if base + ocnt > st.vrf_q.shape[0]:
                    raise SimulationError(f"{ins.op} reads beyond the vector register file")
                const_q[k], const_e[k] = st.vrf_q[base : base + ocnt], st.vrf_e[base : base + ocnt]
            else:
                aq, ae = self._aux_view(st.regs, ocnt)
        p = x.shape[1]
        sq = np.empty((p, ocnt * n), layout.mantissa_dtype(m))
        se = np.empty((p, ocnt), np.int8)
        step = max(256, -(-p // (2 * kernels.parallel_workers())))

        exps: list[int] = []

        def band(p0: int) -> None:
            p1 = min(p, p0 + step)
            largest = vector.chain_vectors(
                x[:, p0:p1], e_in[:, p0:p1] if e_in.shape[1] > 1 else e_in, first,
                cfg.mfu_mantissa_bits, m, table, const_q, const_e,
                aq[p0:p1] if aq.shape[0] == p else aq,
                ae[p0:p1] if ae.shape[0] == p else ae, sq[p0:p1], se[p0:p1],
            )  # fmt: skip
            exps.append(largest)

        kernels.run_parallel(band, range(0, p, step))
        return sq, se, max(exps, default=numerics.E_ZERO)
