"""An ``s_ld`` costs the RTL what the cycle model charges: the load unit's word fetch
while the sequencer waits, whichever register it loads."""

import numpy as np
import pytest
from progs import RTL_TEST_CFG

from tessera import isa
from tessera.isa import Reg
from tessera.sim.executor import Simulator

pytestmark = pytest.mark.rtl

WORD_ADDR = 256


def _programs() -> dict[str, list[int]]:
    ld = lambda reg: isa.encode("s_ld", reg=int(reg), addr=WORD_ADDR)  # noqa: E731
    halt = isa.encode("halt")
    return {
        "s_wr": [isa.encode("s_wr", reg=int(Reg.K_H), value=5), halt],
        "s_ld exponent register": [ld(isa.EXP_REG_BASE), halt],
        "s_ld control register": [ld(Reg.K_H), halt],
        "two s_ld": [ld(Reg.K_H), ld(Reg.K_W), halt],
    }


def test_scalar_load_cycles_match_the_rtl():
    from tessera.hdl.rtlrun import run_jobs

    image = np.zeros(1024, np.uint8)
    image[WORD_ADDR : WORD_ADDR + 4] = np.frombuffer(np.array([5], "<i4").tobytes(), np.uint8)
    progs = {k: np.array(w, np.uint64) for k, w in _programs().items()}
    results = run_jobs(RTL_TEST_CFG, [(w, image.copy()) for w in progs.values()], 10_000)
    rtl = {k: r.cycles for k, r in zip(progs, results, strict=True)}
    model = {k: Simulator(RTL_TEST_CFG, image.copy()).run(w) for k, w in progs.items()}
    # Compared against the s_wr program, so the constant halt-to-done offset cancels.
    for k in progs:
        assert rtl[k] - rtl["s_wr"] == model[k] - model["s_wr"], (k, rtl, model)
    assert model["two s_ld"] > model["s_ld control register"] > model["s_wr"]
