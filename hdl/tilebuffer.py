"""The weight tile buffer: one block RAM bank per MVU lane, each with its own port registers.

A tile-buffer word holds, for every lane, the lane's ``N`` weight bytes of one row and the
row's exponent byte (``tessera.layout``; the loader's byte order). Held as one memory, its
write port (address, the beat's two bytes copied to every byte pair, 136 byte enables) and
its read address were single registers driving every block RAM of the buffer, which the
floorplan spreads over the die under each lane's DSPs: the placed design's longest nets
(1,872 block RAM inputs from the load unit's data register alone).

So each lane's bytes are a bank of their own (``N + 1`` bytes wide), and each bank gets
private copies of the port registers
(:class:`~tessera.hdl.pipereg.DistributionRegister`, which synthesis does not merge):

* write: the loader's registered write, copied once more per bank, so its way from the load
  unit to a bank is two register hops (``WRITE_STAGES``: the bytes land one cycle later
  than from a single memory, which the load unit's ``busy`` covers);
* read: the address is taken one cycle *before* a memory port would take it and the bank's
  copy is that port register, so the read latency is unchanged.

The read data is the word in the single memory's layout, so readers are unaffected. The
banks are :class:`~tessera.hdl.blockram.BlockRam`: the MVU's first weight register takes
their data and nothing else, so on ECP5 it becomes the block RAMs' output register.
"""

from amaranth import Cat, Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from tessera.config import NPUConfig
from tessera.hdl.blockram import BlockRam
from tessera.hdl.pipereg import DistributionRegister

#: Register stages a write takes past the loader's own port register (the bank copies).
WRITE_STAGES = 1


def tile_word_bits(cfg: NPUConfig) -> int:
    """Bits of one tile-buffer word: every lane's weight row and its exponent byte."""
    return cfg.lanes * (cfg.native_dim + 1) * 8


def tile_depth(cfg: NPUConfig) -> int:
    """Words in the buffer: both halves, ``N / lanes`` words per tile."""
    return 2 * cfg.tile_buffer_tiles * (cfg.native_dim // cfg.lanes)


def _addr_width(cfg: NPUConfig) -> int:
    return max(1, (tile_depth(cfg) - 1).bit_length())


def write_signature(cfg: NPUConfig) -> wiring.Signature:
    """A write of one DRAM beat: ``pair`` lands in every byte pair of word ``addr`` whose
    byte enables are set (the loader sets one pair: no shifter in front of the banks)."""
    return wiring.Signature(
        {
            "addr": In(_addr_width(cfg)),
            "pair": In(16),
            "en": In(tile_word_bits(cfg) // 8),
        }
    )


def read_signature(cfg: NPUConfig) -> wiring.Signature:
    """A read: ``addr`` one cycle before a memory port's, ``data`` two cycles after it."""
    return wiring.Signature({"addr": In(_addr_width(cfg)), "data": Out(tile_word_bits(cfg))})


class TileBuffer(wiring.Component):
    def __init__(self, cfg: NPUConfig, *, ecp5: bool = False):
        self.cfg = cfg
        self.ecp5 = ecp5
        super().__init__({"wr": Out(write_signature(cfg)), "rd": Out(read_signature(cfg))})

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        n, lanes = cfg.native_dim, cfg.lanes
        aw = _addr_width(cfg)
        exp_byte = lanes * n  # the word's first exponent byte
        for lane in range(lanes):
            bank = BlockRam(width=(n + 1) * 8, depth=tile_depth(cfg), granularity=8, ecp5=self.ecp5)
            m.submodules[f"bank{lane}"] = bank

            # The lane's byte enables: its N weight bytes, then its exponent byte.
            en = Cat(self.wr.en[lane * n : (lane + 1) * n], self.wr.en[exp_byte + lane])
            wcopy = DistributionRegister(aw + 16 + n + 1, ecp5=self.ecp5)
            m.submodules[f"wr{lane}"] = wcopy
            m.d.comb += wcopy.d.eq(Cat(self.wr.addr, self.wr.pair, en))
            w_addr, pair, w_en = wcopy.q[:aw], wcopy.q[aw : aw + 16], wcopy.q[aw + 16 :]
            # Weight bytes come in pairs; the exponent bytes of lanes 2k, 2k+1 share a beat.
            exp = pair[:8] if lane % 2 == 0 else pair[8:]
            wp = bank.wr
            m.d.comb += [wp.addr.eq(w_addr), wp.data.eq(Cat(pair.replicate(n // 2), exp))]
            m.d.comb += wp.en.eq(w_en)

            rcopy = DistributionRegister(aw, ecp5=self.ecp5)
            m.submodules[f"rd{lane}"] = rcopy
            m.d.comb += rcopy.d.eq(self.rd.addr)
            rp = bank.rd0
            m.d.comb += rp.addr.eq(rcopy.q)
            m.d.comb += [
                self.rd.data.word_select(lane, n * 8).eq(rp.data[: n * 8]),
                self.rd.data.word_select(exp_byte + lane, 8).eq(rp.data[n * 8 :]),
            ]
        return m
