"""Runs that follow the trace of an earlier run (``Simulator.replayed``).

A run of a compiled program from its read-only image leaves a trace; later runs from the
same image follow it and compute only the data. They must leave DRAM, the exponent
registers and the cycle count exactly as a run that decodes the program does, on data the
traced run never saw, and must not follow a trace whose decisions could differ: another
image, or control bytes (tiles, VRF constants) that are not the image's.
(Compiled networks: every ``tests/test_ops.py`` check and the ResNet-50 / DenseNet-121
test run a second input through the trace and compare it with the reference executor.)
"""

from __future__ import annotations

import numpy as np
import pytest
from rtl.progs import RTL_TEST_CFG, random_program

from tessera import isa, layout, numerics
from tessera.isa import Reg
from tessera.runtime.host import DramOrigin
from tessera.sim.executor import Simulator


def _first_writes(words: np.ndarray) -> dict[int, int]:
    """Each register's first ``s_wr`` value."""
    values: dict[int, int] = {}
    for w in words:
        ins = isa.decode(int(w))
        if ins.op == "s_wr":
            values.setdefault(ins.args["reg"], ins.args["value"])
    return values


def _input_span(words: np.ndarray) -> tuple[int, int]:
    """The DRAM bytes of a random program's first input tensor (its data)."""
    regs = _first_writes(words)
    n, m = RTL_TEST_CFG.native_dim, RTL_TEST_CFG.mantissa_bits
    shape = (regs[Reg.IN_H], regs[Reg.IN_W], regs[Reg.IN_CB])
    return regs[Reg.IN_ADDR], regs[Reg.IN_ADDR] + layout.tensor_bytes(*shape, n, m)


def _reads(words: np.ndarray, op: str) -> list[tuple[int, int]]:
    """The DRAM bytes each ``m_rd`` or ``c_rd`` reads."""
    n, m = RTL_TEST_CFG.native_dim, RTL_TEST_CFG.mantissa_bits
    size = layout.tile_bytes(n, m) if op == "m_rd" else layout.const_bytes(n)
    spans = []
    for w in words:
        ins = isa.decode(int(w))
        if ins.op == op:
            spans.append((ins.args["addr"], ins.args["addr"] + ins.args["count"] * size))
    return spans


def _new_input(image: np.ndarray, span: tuple[int, int], seed: int) -> np.ndarray:
    """A copy of ``image`` with other random blocks in the input tensor ``span``."""
    n, m = RTL_TEST_CFG.native_dim, RTL_TEST_CFG.mantissa_bits
    rng = np.random.default_rng(seed)
    blocks = (span[1] - span[0]) // (n * np.dtype(layout.mantissa_dtype(m)).itemsize + 1)
    x = rng.normal(size=(blocks, n)) * np.exp2(rng.integers(-14, 15, (blocks, 1)))
    q, e = numerics.quantize_float(x, m)
    mem = image.copy()
    mem[span[0] : span[1]] = np.frombuffer(layout.pack_tensor(q, e, m), np.uint8)
    return mem


def _decoded_run(words: np.ndarray, mem: np.ndarray) -> tuple[np.ndarray, int, list[int]]:
    """DRAM, cycles and registers of a run that decodes the program (no origin: no trace)."""
    sim = Simulator(RTL_TEST_CFG, mem.copy())
    cycles = sim.run(words)
    return sim.state.mem, cycles, sim.state.regs


def test_random_programs_follow_their_trace_bit_exact() -> None:
    replayed = 0
    for seed in range(60):
        words, image = random_program(seed, chains=3)
        image.flags.writeable = False
        origin = DramOrigin(image, (_input_span(words),))
        first = Simulator(RTL_TEST_CFG, image.copy(), origin)
        first.run(words)
        assert not first.replayed
        mem = _new_input(image, origin.changed[0], seed)
        want_mem, want_cycles, want_regs = _decoded_run(words, mem)
        again = Simulator(RTL_TEST_CFG, mem, origin)
        cycles = again.run(words)
        assert np.array_equal(mem, want_mem), seed
        assert cycles == want_cycles and again.state.regs == want_regs, seed
        replayed += again.replayed
    # Only runs that computed every mv_mul chain ahead with its group are traced: in
    # these random programs that is most of them.
    assert replayed >= 50


@pytest.mark.parametrize("op", ["m_rd", "c_rd"])
def test_control_bytes_that_are_not_the_images_leave_no_trace(op: str) -> None:
    """Tiles or VRF constants read from bytes a run changes (here: declared input bytes)
    may differ from run to run, so no decision made on them is kept."""
    checked = 0
    for seed in range(40):
        words, image = random_program(seed, chains=3)
        reads = _reads(words, op)
        if not reads:
            continue
        image.flags.writeable = False
        origin = DramOrigin(image, (_input_span(words), reads[0]))
        Simulator(RTL_TEST_CFG, image.copy(), origin).run(words)
        again = Simulator(RTL_TEST_CFG, image.copy(), origin)
        again.run(words)
        assert not again.replayed, seed
        checked += 1
    assert checked >= 10


def test_a_trace_is_only_followed_from_its_own_image() -> None:
    """Another image, even with equal bytes, is not known to be equal for later runs;
    one with other VRF constants must give other results."""
    words, image = next(
        (w, i) for s in range(100) for w, i in [random_program(s, chains=2)] if _reads(w, "c_rd")
    )
    image.flags.writeable = False
    span = _input_span(words)
    Simulator(RTL_TEST_CFG, image.copy(), DramOrigin(image, (span,))).run(words)
    same = Simulator(RTL_TEST_CFG, image.copy(), DramOrigin(image, (span,)))
    same.run(words)
    assert same.replayed
    other = image.copy()
    lo, hi = _reads(words, "c_rd")[0]
    other[lo : hi - 2] ^= 0x11  # mantissas of the constants (not the last exponent)
    other.flags.writeable = False
    sim = Simulator(RTL_TEST_CFG, other.copy(), DramOrigin(other, (span,)))
    sim.run(words)
    assert not sim.replayed
    assert np.array_equal(sim.state.mem, _decoded_run(words, other)[0])


def test_tiles_from_several_loads_still_run_ahead_and_leave_a_trace() -> None:
    """A layer's tiles loaded by several m_rd that continue each other's bytes (large
    layers need them) are one source: its chains are computed ahead with their group
    and the run is traced, giving what one m_rd gives."""
    n, m = RTL_TEST_CFG.native_dim, RTL_TEST_CFG.mantissa_bits
    tb = layout.tile_bytes(n, m)
    checked = 0
    for seed in range(40):
        words, image = random_program(seed, chains=3, kind="conv")
        loads = [i for i, w in enumerate(words) if isa.decode(int(w)).op == "m_rd"]
        ins = isa.decode(int(words[loads[0]]))
        count = ins.args["count"]
        if count < 2:
            continue
        half = count // 2
        split = [
            isa.encode("m_rd", tile=ins.args["tile"], count=half, addr=ins.args["addr"]),
            isa.encode("m_rd", tile=ins.args["tile"] + half, count=count - half,
                       addr=ins.args["addr"] + half * tb),
        ]  # fmt: skip
        two = np.concatenate([words[: loads[0]], np.array(split, np.uint64), words[loads[0] + 1 :]])
        image.flags.writeable = False
        origin = DramOrigin(image, (_input_span(words),))
        Simulator(RTL_TEST_CFG, image.copy(), origin).run(two)
        mem = _new_input(image, origin.changed[0], seed)
        want_mem, _, _ = _decoded_run(words, mem)
        again = Simulator(RTL_TEST_CFG, mem, origin)
        again.run(two)
        assert again.replayed, seed
        assert np.array_equal(mem, want_mem), seed
        checked += 1
    assert checked >= 10
