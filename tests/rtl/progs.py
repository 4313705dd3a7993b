"""Seeded constrained-random NPU programs (DRAM image + instruction words) for RTL tests.

Programs obey what the RTL documents (``docs/hardware.md``): ``vv_mul`` only as a chain's
first MFU op, at most two VRF operands and four MFU ops per chain, the kernel rows of one
output row fit the activation buffer. Within that, shapes, strides, padding, dilation,
channel slices, exponent spreads (so the MVU's clamp to the tensor grid triggers) and op
mixes are random.
"""

from __future__ import annotations

import numpy as np

from tessera import isa, layout, numerics
from tessera.config import NPUConfig
from tessera.isa import Operand, PoolOp, Reg

#: The small NPU the RTL tests build: N=8 with 2 lane groups, so every index path is used,
#: and a vector pipeline of one lane (8 phases), narrower than the MVU as on the 85F, so
#: the sweep's block spacing (within a row and across the row change) and the vector
#: entry's holds are used too.
RTL_TEST_CFG = NPUConfig(
    name="rtl-test",
    native_dim=8,
    lanes=4,
    vector_lanes=1,
    tile_buffer_tiles=32,
    vrf_depth=32,
    act_buffer_bytes=2048,
)

IMAGE_BYTES = 32 * 1024


class Builder:
    def __init__(self, cfg: NPUConfig, rng: np.random.Generator) -> None:
        self.cfg, self.rng = cfg, rng
        self.image = np.zeros(IMAGE_BYTES, dtype=np.uint8)
        self.top = 64
        self.words: list[int] = []

    def alloc(self, nbytes: int) -> int:
        addr = self.top
        self.top = layout.align_up(self.top + nbytes)
        if self.top > IMAGE_BYTES:
            raise ValueError("image full")
        return addr

    def put(self, data: bytes) -> int:
        addr = self.alloc(len(data))
        self.image[addr : addr + len(data)] = np.frombuffer(data, np.uint8)
        return addr

    def tensor(self, h: int, w: int, cb: int, spread: int = 24) -> tuple[int, int]:
        """A random storage tensor with block exponents spread over ``spread``."""
        n, m = self.cfg.native_dim, self.cfg.mantissa_bits
        x = self.rng.normal(size=(h, w, cb, n))
        x *= np.exp2(self.rng.integers(-spread // 2, spread // 2 + 1, (h, w, cb, 1)))
        x[self.rng.random((h, w, cb)) < 0.08] = 0
        q, e = numerics.quantize_float(x, m)
        return self.put(layout.pack_tensor(q, e, m)), int(e.max())

    def s(self, reg: Reg | int, value: int) -> None:
        if value >= 1 << 31:
            value -= 1 << 32
        self.words.append(isa.encode("s_wr", reg=int(reg), value=int(value)))

    def op(self, name: str, **args: int) -> None:
        self.words.append(isa.encode(name, **args))


def random_program(
    seed: int,
    cfg: NPUConfig = RTL_TEST_CFG,
    chains: int = 2,
    kind: str | None = None,
    mfu_ops: list[tuple[str, int]] | None = None,
    pool_op: PoolOp | None = None,
):
    """(words, image) of a program with ``chains`` chains, each reading the previous output.

    ``kind`` ("elt", "pool", "conv"), ``mfu_ops`` ([(mnemonic, Operand)]) and ``pool_op``
    pin the first chain's shape of work; everything else stays random.
    """
    rng = np.random.default_rng(seed)
    b = Builder(cfg, rng)
    n, m = cfg.native_dim, cfg.mantissa_bits
    ih, iw = (int(v) for v in rng.integers(1, 6, 2))
    icb = int(rng.integers(1, 4))
    in_addr, emax = b.tensor(ih, iw, icb)
    # the input's exponent maximum comes from DRAM through s_ld, as compiled programs do
    emax_addr = b.put(np.array([emax + int(rng.integers(0, 3))], "<i4").tobytes())
    b.op("s_ld", reg=isa.EXP_REG_BASE, addr=emax_addr)
    ereg = 0
    for c in range(chains):
        forced = c == 0 and kind is not None
        ckind = kind if forced else str(rng.choice(["elt", "pool", "conv"], p=[0.3, 0.25, 0.45]))
        if ckind == "conv":
            kh, kw = (int(v) for v in rng.integers(1, 4, 2))
            icnt = int(rng.integers(1, min(icb, cfg.tile_buffer_tiles // (kh * kw)) + 1))
            ioff = int(rng.integers(0, icb - icnt + 1))
            sh, sw = (int(v) for v in rng.integers(1, 3, 2))
            dh, dw = (int(v) for v in rng.integers(1, 3, 2)) if rng.random() < 0.3 else (1, 1)
            pt = int(rng.integers(0, kh))
            pl = int(rng.integers(0, kw))
            k = kh * kw * icnt
            ocnt = int(rng.integers(1, max(2, min(4, cfg.tile_buffer_tiles // k) + 1)))
        else:
            icnt = int(rng.integers(1, icb + 1))
            ioff = int(rng.integers(0, icb - icnt + 1))
            ocnt = icnt
            dh = dw = 1
            if ckind == "pool":
                kh, kw = (int(v) for v in rng.integers(1, 4, 2))
                sh, sw = (int(v) for v in rng.integers(1, 3, 2))
                pt, pl = int(rng.integers(0, kh)), int(rng.integers(0, kw))
            else:
                kh = kw = 1
                sh, sw = (int(v) for v in rng.integers(1, 3, 2)) if rng.random() < 0.3 else (1, 1)
                pt = pl = 0
        oh = max(1, (ih + pt - (kh - 1) * dh - 1) // sh + 1 + int(rng.integers(0, 2)))
        ow = max(1, (iw + pl - (kw - 1) * dw - 1) // sw + 1 + int(rng.integers(0, 2)))
        ooff = int(rng.integers(0, 2))
        ocb = ooff + ocnt + int(rng.integers(0, 2))
        out_addr = b.alloc(layout.tensor_bytes(oh, ow, ocb, n, m))
        half = c % 2
        for reg, v in (
            (Reg.IN_ADDR, in_addr), (Reg.IN_H, ih), (Reg.IN_W, iw), (Reg.IN_CB, icb),
            (Reg.IN_CB_OFF, ioff), (Reg.IN_CB_CNT, icnt), (Reg.IN_EREG, isa.EXP_REG_BASE + ereg),
            (Reg.K_H, kh), (Reg.K_W, kw), (Reg.STRIDE_H, sh), (Reg.STRIDE_W, sw),
            (Reg.PAD_T, pt), (Reg.PAD_L, pl), (Reg.DIL_H, dh), (Reg.DIL_W, dw),
            (Reg.OUT_ADDR, out_addr), (Reg.OUT_H, oh), (Reg.OUT_W, ow), (Reg.OUT_CB, ocb),
            (Reg.OUT_CB_OFF, ooff), (Reg.OUT_CB_CNT, ocnt),
            (Reg.OUT_EREG, isa.EXP_REG_BASE + ereg + 1),
        ):  # fmt: skip
            b.s(reg, v)
        b.s(isa.EXP_REG_BASE + ereg + 1, numerics.E_ZERO)
        vrf_base = half * (cfg.vrf_depth // 2)
        if ckind == "conv":
            tiles = ocnt * k
            wfloor = int(rng.integers(-12, -4))
            tq = rng.integers(-127, 128, (tiles, n, n))
            te = rng.integers(wfloor, wfloor + cfg.weight_exp_window + 1, (tiles, n))
            taddr = b.put(layout.pack_tiles(tq, te, m))
            tbase = half * cfg.tile_buffer_tiles
            b.s(Reg.W_EXP_FLOOR, wfloor)
            b.op("m_rd", tile=tbase, count=tiles, addr=taddr)
        # MFU ops
        mfu: list[tuple[str, dict]] = []
        vrf_used = 0
        if c == 0 and mfu_ops is not None:
            plan = list(mfu_ops)
        else:
            plan = [("vv_mul", Operand.VRF)] if rng.random() < 0.3 else []
            for _ in range(int(rng.integers(0, 4 - len(plan)))):
                name = str(rng.choice(["vv_add", "vv_max", "v_relu"]))
                aux = vrf_used + len(plan) >= 2 or rng.random() < 0.4
                plan.append((name, Operand.AUX if aux else Operand.VRF))
        for name, src in plan:
            if name == "vv_mul":
                mfu.append(("vv_mul", {"vrf": vrf_base + vrf_used * ocnt}))
                vrf_used += 1
                continue
            if name == "v_relu":
                mfu.append((name, {}))
                continue
            if vrf_used >= 2:
                src = Operand.AUX
            if src == Operand.VRF:
                mfu.append((name, {"src": int(src), "vrf": vrf_base + vrf_used * ocnt}))
                vrf_used += 1
            else:
                mfu.append((name, {"src": int(src), "vrf": 0}))
        if any(a.get("src") == Operand.AUX for _, a in mfu):
            acb = ocnt + int(rng.integers(0, 2))
            aoff = acb - ocnt
            aux_addr, _ = b.tensor(oh, ow, acb)
            b.s(Reg.AUX_ADDR, aux_addr)
            b.s(Reg.AUX_CB, acb)
            b.s(Reg.AUX_CB_OFF, aoff)
        if vrf_used:
            count = vrf_used * ocnt
            cq, ce = numerics.quantize_wide(
                rng.normal(size=(count, n)) * np.exp2(rng.integers(-6, 7, (count, 1))),
                cfg.mfu_mantissa_bits,
            )
            b.op("c_rd", vrf=vrf_base, count=count, addr=b.put(layout.pack_consts(cq, ce)))
        if rng.random() < 0.2:
            b.op("nop")
        b.op("v_rd")
        if ckind == "conv":
            b.op("mv_mul", tile=tbase)
        elif ckind == "pool":
            op = pool_op if forced and pool_op is not None else rng.choice(list(PoolOp))
            b.op("v_pool", op=int(op))
        for name, args in mfu:
            b.op(name, **args)
        b.op("v_wr")
        b.op("end_chain")
        in_addr, ih, iw, icb = out_addr, oh, ow, ocb
        ereg += 1
    b.op("halt")
    return np.array(b.words, dtype=np.uint64), b.image
