"""The activation buffer's mantissas: banks of block RAM whose words are registered at the
bank before they are gathered.

Held as one memory, the buffer's read data was a row mux after its block RAMs: their
outputs are unregistered (about 4 ns of clock-to-output) and, with 200 of the 85F's 208
block RAM sites in use, the buffer's 56 block RAMs land all over the die, so the mux took
inputs from up to 107 tiles away in the same cycle: the largest family of long nets in the
placed design (457 nets).

Here the buffer is ``ceil(entries / BANK_WORDS)`` banks. A read's word is registered at its
bank and the banks' registers are ORed, each gated by whether its bank answers: a read
takes ``READ_STAGES`` cycle more than from one memory, and each long wire starts at a
flip-flop. The register takes the bank's data and nothing else, so on ECP5 it becomes the
block RAMs' own output register (:mod:`tessera.hdl.outreg`). Writes go to the bank the
address selects, as before.
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import WritePort
from amaranth.lib.wiring import In, Out

from tessera.config import NPUConfig
from tessera.hdl.actloader import ActLoader, act_entries
from tessera.hdl.blockram import BlockRam

#: Words per bank: a 128-bit word is eight 1024 x 18 block RAMs side by side, so a bank is
#: one row of block RAMs with no mux inside it.
BANK_WORDS = 1024
#: Cycles a read takes beyond a memory port's one: the register at each bank.
READ_STAGES = 1


class ActBuffer(wiring.Component):
    """``entries`` words of ``width`` bits; ``rd.data`` is the word at ``rd.addr`` of
    ``1 + READ_STAGES`` cycles before (a write in the cycle of the read is not seen)."""

    def __init__(self, *, width: int, entries: int, granularity: int, ecp5: bool = False):
        self.width, self.entries, self.granularity, self.ecp5 = width, entries, granularity, ecp5
        addr_width = max(1, (entries - 1).bit_length())
        super().__init__(
            {
                "wr": Out(
                    WritePort.Signature(addr_width=addr_width, shape=width, granularity=granularity)
                ),
                "rd": Out(ActBuffer.read_signature(addr_width, width)),
            }
        )

    @staticmethod
    def read_signature(addr_width: int, width: int) -> wiring.Signature:
        """A read: ``data`` is the word at ``addr`` of ``1 + READ_STAGES`` cycles before."""
        return wiring.Signature({"addr": In(addr_width), "data": Out(width)})

    @staticmethod
    def for_config(cfg: NPUConfig, *, ecp5: bool = False) -> "ActBuffer":
        """The NPU's buffer, shaped by the activation loader's write port (a block's N
        mantissa bytes a word, written a beat at a time)."""
        port = ActLoader.port_signature(cfg, "mant_wr")
        return ActBuffer(
            width=port.shape, entries=act_entries(cfg), granularity=port.granularity, ecp5=ecp5
        )

    def elaborate(self, platform):
        m = Module()
        banks = -(-self.entries // BANK_WORDS)
        # Address bits below ``low`` pick the word in a bank, those above the bank (none
        # for one bank: the empty slice equals 0).
        low = (BANK_WORDS - 1).bit_length() if banks > 1 else len(self.rd.addr)
        read_bank = Signal(range(max(2, banks)))  # the bank answering the memories' port
        m.d.sync += read_bank.eq(self.rd.addr[low:])
        gathered = []
        for k in range(banks):
            words = min(BANK_WORDS, self.entries - k * BANK_WORDS)
            bank = BlockRam(
                width=self.width, depth=words, granularity=self.granularity, ecp5=self.ecp5
            )
            m.submodules[f"bank{k}"] = bank
            m.d.comb += [
                bank.wr.addr.eq(self.wr.addr[:low]),
                bank.wr.data.eq(self.wr.data),
                bank.wr.en.eq(Mux(self.wr.addr[low:] == k, self.wr.en, 0)),
            ]
            word = Signal(self.width, name=f"word{k}", reset_less=True)
            holds = Signal(name=f"holds{k}")  # the word in the register is the one read
            m.d.comb += bank.rd0.addr.eq(self.rd.addr[:low])
            m.d.sync += [word.eq(bank.rd0.data), holds.eq(read_bank == k)]
            gathered.append(Mux(holds, word, 0))
        total = gathered[0]
        for word in gathered[1:]:
            total = total | word
        m.d.comb += self.rd.data.eq(total)
        return m
