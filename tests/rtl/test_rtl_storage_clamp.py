"""The write path's int8 exponent clamp at its edge: a non-zero block whose exponent
comes out exactly ``E_ZERO`` (-128) is shifted onto ``E_MIN`` like any block below it,
in the RTL as in numerics.to_storage, and an all-zero block still gets ``E_ZERO``."""

import numpy as np
import pytest
from progs import RTL_TEST_CFG, Builder

from tessera import isa, layout, numerics
from tessera.isa import Reg
from tessera.sim.executor import Simulator

pytestmark = pytest.mark.rtl


def _program():
    """One elementwise chain over two pixels: x * 0.5 with x = 127 * 2**-127 in lane 0
    (-> 127 * 2**-128 before the clamp) and an all-zero block."""
    cfg = RTL_TEST_CFG
    n, m = cfg.native_dim, cfg.mantissa_bits
    b = Builder(cfg, np.random.default_rng(0))
    q = np.zeros((1, 2, 1, n), np.int64)
    q[0, 0, 0, :2] = [127, -3]
    e = np.array([[[numerics.E_MIN], [numerics.E_ZERO]]])
    in_addr = b.put(layout.pack_tensor(q, e, m))
    out_addr = b.alloc(layout.tensor_bytes(1, 2, 1, n, m))
    cq, ce = numerics.quantize_wide(np.full((1, n), 0.5), cfg.mfu_mantissa_bits)
    emax_addr = b.put(np.array([numerics.E_MIN], "<i4").tobytes())
    b.op("s_ld", reg=isa.EXP_REG_BASE, addr=emax_addr)
    for reg, v in (
        (Reg.IN_ADDR, in_addr), (Reg.IN_H, 1), (Reg.IN_W, 2), (Reg.IN_CB, 1),
        (Reg.IN_CB_OFF, 0), (Reg.IN_CB_CNT, 1), (Reg.IN_EREG, isa.EXP_REG_BASE),
        (Reg.K_H, 1), (Reg.K_W, 1), (Reg.STRIDE_H, 1), (Reg.STRIDE_W, 1),
        (Reg.PAD_T, 0), (Reg.PAD_L, 0), (Reg.DIL_H, 1), (Reg.DIL_W, 1),
        (Reg.OUT_ADDR, out_addr), (Reg.OUT_H, 1), (Reg.OUT_W, 2), (Reg.OUT_CB, 1),
        (Reg.OUT_CB_OFF, 0), (Reg.OUT_CB_CNT, 1), (Reg.OUT_EREG, isa.EXP_REG_BASE + 1),
    ):  # fmt: skip
        b.s(reg, v)
    b.s(isa.EXP_REG_BASE + 1, numerics.E_ZERO)
    b.op("c_rd", vrf=0, count=1, addr=b.put(layout.pack_consts(cq, ce)))
    b.op("v_rd")
    b.op("vv_mul", vrf=0)
    b.op("v_wr")
    b.op("end_chain")
    b.op("halt")
    return np.array(b.words, dtype=np.uint64), b.image, out_addr


def test_clamp_at_e_zero_matches_the_rtl():
    from tessera.hdl.rtlrun import run_jobs

    cfg = RTL_TEST_CFG
    words, image, out_addr = _program()
    mem = image.copy()
    Simulator(cfg, mem).run(words)
    q, e = layout.unpack_tensor(mem, out_addr, 1, 2, 1, cfg.native_dim, cfg.mantissa_bits)
    assert e[0, :, 0].tolist() == [numerics.E_MIN, numerics.E_ZERO]
    assert q[0, 0, 0, :2].tolist() == [64, -2] and not q[0, 1].any()
    (rtl,) = run_jobs(cfg, [(words, image.copy())], max_cycles=10_000)
    np.testing.assert_array_equal(rtl.mem, mem)
