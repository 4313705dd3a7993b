"""The activation buffer's mantissas: banks of block RAM whose words are registered at the
bank before they are gathered.

Held as one memory, the buffer's read data was a row mux after its block RAMs: their
outputs are unregistered (about 4 ns of clock-to-output) and, with 200 of the 85F's 208
block RAM sites in use, the buffer's 56 block RAMs land all over the die, so the mux took
inputs from up to 107 tiles away in the same cycle: the largest family of long nets in the
placed design (457 nets).

Here the buffer is ``ceil(entries / BANK_WORDS)`` banks. A read's word is registered at its
bank (the others register zero) and the banks' registers are ORed: a read takes
``READ_STAGES`` cycle more than from one memory, and each long wire starts at a flip-flop.
Writes go to the bank the address selects, as before.
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory, WritePort
from amaranth.lib.wiring import In, Out

from tessera.config import NPUConfig
from tessera.hdl.actloader import ActLoader, act_entries

#: Words per bank: a 128-bit word is eight 1024 x 18 block RAMs side by side, so a bank is
#: one row of block RAMs with no mux inside it.
BANK_WORDS = 1024
#: Cycles a read takes beyond a memory port's one: the register at each bank.
READ_STAGES = 1


class ActBuffer(wiring.Component):
    """``entries`` words of ``width`` bits; ``rd.data`` is the word at ``rd.addr`` of
    ``1 + READ_STAGES`` cycles before (a write in the cycle of the read is not seen)."""

    def __init__(self, *, width: int, entries: int, granularity: int):
        self.width, self.entries = width, entries
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
    def for_config(cfg: NPUConfig) -> "ActBuffer":
        """The NPU's buffer, shaped by the activation loader's write port (a block's N
        mantissa bytes a word, written a beat at a time)."""
        port = ActLoader.port_signature(cfg, "mant_wr")
        return ActBuffer(width=port.shape, entries=act_entries(cfg), granularity=port.granularity)

    def elaborate(self, platform):
        m = Module()
        banks = -(-self.entries // BANK_WORDS)
        # Address bits below ``low`` pick the word in a bank, those above the bank (none
        # for one bank: the empty slice equals 0).
        low = (BANK_WORDS - 1).bit_length() if banks > 1 else len(self.rd.addr)
        read_bank = Signal(range(max(2, banks)))  # the bank answering this cycle
        m.d.sync += read_bank.eq(self.rd.addr[low:])
        gathered = []
        for k in range(banks):
            words = min(BANK_WORDS, self.entries - k * BANK_WORDS)
            bank = Memory(shape=self.width, depth=words, init=[])
            m.submodules[f"bank{k}"] = bank
            wp = bank.write_port(granularity=len(self.wr.data) // len(self.wr.en))
            m.d.comb += [
                wp.addr.eq(self.wr.addr[:low]),
                wp.data.eq(self.wr.data),
                wp.en.eq(Mux(self.wr.addr[low:] == k, self.wr.en, 0)),
            ]
            rp = bank.read_port()
            word = Signal(self.width, name=f"word{k}")
            m.d.comb += rp.addr.eq(self.rd.addr[:low])
            m.d.sync += word.eq(Mux(read_bank == k, rp.data, 0))
            gathered.append(word)
        total = gathered[0]
        for word in gathered[1:]:
            total = total | word
        m.d.comb += self.rd.data.eq(total)
        return m
