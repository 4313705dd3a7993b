"""The simulator's timing is the cycle model's walk of the program with the values the
run's ``s_ld`` loaded, and only those: a register loaded from DRAM times the same as the
same value written by ``s_wr``, and a different value is not served a kept walk."""

from __future__ import annotations

import numpy as np
from rtl.progs import RTL_TEST_CFG, random_program

from tessera import isa, layout
from tessera.isa import Reg
from tessera.sim.cycles import estimate
from tessera.sim.executor import Simulator


def _with_loaded_register(words: np.ndarray, image: np.ndarray, reg: Reg, value: int):
    """The program with its first ``s_wr reg`` replaced by an ``s_ld`` of ``value``
    placed at the end of the image."""
    addr = layout.align_up(image.size)
    img = np.zeros(addr + layout.align_up(4), np.uint8)
    img[: image.size] = image
    img[addr : addr + 4] = np.frombuffer(np.array([value], "<i4").tobytes(), np.uint8)
    out = words.copy()
    for i, w in enumerate(words):
        ins = isa.decode(int(w))
        if ins.op == "s_wr" and ins.args["reg"] == reg:
            out[i] = isa.encode("s_ld", reg=int(reg), addr=addr)
            return out, img
    raise AssertionError(f"no s_wr of {reg.name}")


def _with_written_register(words: np.ndarray, reg: Reg, value: int) -> np.ndarray:
    out = words.copy()
    for i, w in enumerate(words):
        ins = isa.decode(int(w))
        if ins.op == "s_wr" and ins.args["reg"] == reg:
            out[i] = isa.encode("s_wr", reg=int(reg), value=value)
            return out
    raise AssertionError(f"no s_wr of {reg.name}")


def _first_value(words: np.ndarray, reg: Reg) -> int:
    for w in words:
        ins = isa.decode(int(w))
        if ins.op == "s_wr" and ins.args["reg"] == reg:
            return ins.args["value"]
    raise AssertionError(f"no s_wr of {reg.name}")


def test_timing_follows_the_values_s_ld_loaded() -> None:
    cfg = RTL_TEST_CFG
    words, image = next(
        (w, i)
        for s in range(100)
        for w, i in [random_program(s, chains=2, kind="conv")]
        if _first_value(w, Reg.OUT_H) >= 3
    )
    oh = _first_value(words, Reg.OUT_H)
    cycles = {}
    for value in (oh, oh - 1, oh):  # the last run must not reuse the second one's walk
        written = _with_written_register(words, Reg.OUT_H, value)
        want = Simulator(cfg, image.copy()).run(written)
        loaded, img = _with_loaded_register(words, image, Reg.OUT_H, value)
        got = Simulator(cfg, img).run(loaded)
        assert got == want
        cycles[value] = got
    assert cycles[oh - 1] < cycles[oh]  # one output row fewer
    # Compiled programs load only exponent registers: their reports' walk, which knows no
    # DRAM values, times them as a run does.
    assert estimate(words, cfg).finish() == Simulator(cfg, image.copy()).run(words)
