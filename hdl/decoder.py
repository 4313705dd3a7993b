"""Instruction decoder, generated from the ISA tables in :mod:`tessera.isa`.

Nothing here names an opcode or a bit position: the opcode enum and every field's slice come
from ``isa.INSTRUCTIONS``, so adding an instruction to the ISA adds it here, and
``tests/rtl/test_rtl_decoder.py`` checks this decoder against ``isa.decode`` on random words.
"""

from amaranth import Module, Signal, unsigned
from amaranth.lib import data, enum, wiring
from amaranth.lib.wiring import In, Out

from tessera import isa


def _opcode_enum() -> type[enum.Enum]:
    """An Amaranth enum of OPCODE_BITS bits, built from the ISA table (class form, by hand)."""
    ns = enum.EnumType.__prepare__("Opcode", (enum.Enum,), shape=isa.OPCODE_BITS)
    for spec in isa.INSTRUCTIONS:
        ns[spec.mnemonic.upper()] = spec.opcode
    return enum.EnumType("Opcode", (enum.Enum,), ns, shape=isa.OPCODE_BITS)


#: The opcode enum, one member per mnemonic (upper case), values from the ISA table.
Opcode = _opcode_enum()


def _field_shapes() -> dict[str, tuple[int, bool]]:
    """Every field name of the ISA with the widest width it has in any instruction."""
    shapes: dict[str, tuple[int, bool]] = {}
    for spec in isa.INSTRUCTIONS:
        for f in spec.fields:
            width, signed = shapes.get(f.name, (0, f.signed))
            if signed != f.signed:
                raise AssertionError(f"field {f.name} is signed in one instruction only")
            shapes[f.name] = (max(width, f.width), f.signed)
    return shapes


FIELD_SHAPES = _field_shapes()
if {"opcode", "valid"} & set(FIELD_SHAPES):
    raise AssertionError("ISA field names clash with the decoder's own outputs")

#: The decoder's output: the opcode, validity and every field (``op`` is v_pool's PoolOp).
Decoded = data.StructLayout(
    {
        "opcode": Opcode,
        "valid": unsigned(1),
        **{
            name: (data.signed(w) if s else data.unsigned(w))
            for name, (w, s) in FIELD_SHAPES.items()
        },
    }
)


def field_slices(spec: isa.InstrSpec) -> list[tuple[isa.Field, int]]:
    """(field, low bit) of each field of ``spec``, packed MSB-first below the opcode."""
    out = []
    pos = isa.WORD_BITS - isa.OPCODE_BITS
    for f in spec.fields:
        pos -= f.width
        out.append((f, pos))
    return out


class Decoder(wiring.Component):
    """Combinational decode of one 64-bit word.

    ``valid`` is low for an unknown opcode, nonzero reserved bits or an enum field out of its
    enum, exactly where ``isa.decode`` raises ``DecodeError``; the sequencer turns that into
    the NPU's error status instead of executing garbage.
    """

    word: In(isa.WORD_BITS)
    out: Out(Decoded)

    def elaborate(self, platform):
        m = Module()
        word = self.word
        opcode = word[isa.WORD_BITS - isa.OPCODE_BITS :]
        m.d.comb += self.out.opcode.eq(opcode)
        with m.Switch(opcode):
            for spec in isa.INSTRUCTIONS:
                with m.Case(spec.opcode):
                    ok = Signal(name=f"{spec.mnemonic}_ok")
                    reserved = isa.WORD_BITS - spec.used_bits
                    checks = [word[:reserved] == 0] if reserved else []
                    for f, lo in field_slices(spec):
                        bits = word[lo : lo + f.width]
                        target = getattr(self.out, f.name)
                        m.d.comb += target.eq(bits.as_signed() if f.signed else bits)
                        if f.enum is not None:
                            values = sorted(int(v) for v in f.enum)
                            if values != list(range(1 << f.width)):
                                checks.append(bits.matches(*values))
                    ok_expr = 1
                    for c in checks:
                        ok_expr = c & ok_expr
                    m.d.comb += [ok.eq(ok_expr), self.out.valid.eq(ok)]
            with m.Default():
                m.d.comb += self.out.valid.eq(0)
        return m
