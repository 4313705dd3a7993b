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

#: An exponent register the test programs leave alone (the cycle model never reads one).
SPARE_EREG = isa.EXP_REG_BASE + isa.EXP_REG_COUNT - 1


def _with_word(image: np.ndarray, value: int) -> tuple[np.ndarray, int]:
    """The image with ``value`` appended as a 32-bit word, and the word's address."""
    addr = layout.align_up(image.size)
    img = np.zeros(addr + layout.align_up(4), np.uint8)
    img[: image.size] = image
    img[addr : addr + 4] = np.frombuffer(np.array([value], "<i4").tobytes(), np.uint8)
    return img, addr


def _replace_first_write(words: np.ndarray, reg: Reg, new: list[int]) -> np.ndarray:
    for i, w in enumerate(words):
        ins = isa.decode(int(w))
        if ins.op == "s_wr" and ins.args["reg"] == reg:
            return np.concatenate([words[:i], np.array(new, np.uint64), words[i + 1 :]])
    raise AssertionError(f"no s_wr of {reg.name}")


def _loaded(words: np.ndarray, image: np.ndarray, reg: Reg, value: int):
    """The first ``s_wr reg`` replaced by an ``s_ld`` of ``value`` and a ``nop``."""
    img, addr = _with_word(image, value)
    ld = isa.encode("s_ld", reg=int(reg), addr=addr)
    return _replace_first_write(words, reg, [ld, isa.encode("nop")]), img


def _written(words: np.ndarray, image: np.ndarray, reg: Reg, value: int):
    """The first ``s_wr reg`` writing ``value``, after an ``s_ld`` of a spare exponent
    register: the same instruction kinds as :func:`_loaded` in the same slots."""
    img, addr = _with_word(image, value)
    ld = isa.encode("s_ld", reg=SPARE_EREG, addr=addr)
    wr = isa.encode("s_wr", reg=int(reg), value=value)
    return _replace_first_write(words, reg, [ld, wr]), img


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
        written, img = _written(words, image, Reg.OUT_H, value)
        want = Simulator(cfg, img).run(written)
        loaded, img = _loaded(words, image, Reg.OUT_H, value)
        got = Simulator(cfg, img).run(loaded)
        assert got == want
        cycles[value] = got
    assert cycles[oh - 1] < cycles[oh]  # one output row fewer
    # Compiled programs load only exponent registers: their reports' walk, which knows no
    # DRAM values, times them as a run does.
    assert estimate(words, cfg).finish() == Simulator(cfg, image.copy()).run(words)
