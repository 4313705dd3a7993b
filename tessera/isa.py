"""The instruction set, defined once.

Every other view of the ISA is derived from the tables in this module: the assembler
(:func:`encode`), the simulator's decoder (:func:`decode`), the Amaranth decoder in
``hdl/`` and ``docs/isa.md`` (:func:`render_markdown`; a test fails when the committed
doc is stale). Run ``python -m tessera.isa > docs/isa.md`` after changing anything here.

Shape of a program
------------------
Instructions are 64-bit words. Scalar instructions (``s_wr``, ``s_ld``) set control
registers that describe a whole loop nest (tensor geometry, kernel window, strides,
padding); load instructions (``m_rd``, ``c_rd``) stream weight tiles and constant vectors
from DRAM into on-chip buffers; a **chain** (``v_rd`` ... ``v_wr`` ``end_chain``) then
sweeps the whole output feature map in hardware, one output pixel and output block at a
time, with no instruction per pixel, as in Brainwave's instruction chains.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass

WORD_BITS = 64
OPCODE_BITS = 6


class Reg(enum.IntEnum):
    """Scalar register file. 0..63 are control registers, 64.. are exponent registers.

    Geometry registers count pixels and channel *blocks* (N channels each). A tensor in
    DRAM is ``H x W x CB`` blocks: first all mantissas (``H*W*CB*N`` of them, pixel-major,
    then block, then lane), then one int8 exponent per block in the same order.
    """

    IN_ADDR = 0  #: DRAM byte address of the input tensor
    IN_H = 1  #: input tensor height
    IN_W = 2  #: input tensor width
    IN_CB = 3  #: channel blocks per input pixel (the tensor's full depth)
    IN_CB_OFF = 4  #: first channel block read (a channel slice of a concat buffer)
    IN_CB_CNT = 5  #: channel blocks read per kernel position
    IN_EREG = 6  #: exponent register holding the input tensor's largest block exponent
    K_H = 7  #: kernel window height
    K_W = 8  #: kernel window width
    STRIDE_H = 9
    STRIDE_W = 10
    PAD_T = 11  #: rows of padding above the input (read as zero by MVU, sum and max)
    PAD_L = 12  #: columns of padding left of the input
    DIL_H = 13  #: kernel dilation
    DIL_W = 14
    OUT_ADDR = 15  #: DRAM byte address of the output tensor
    OUT_H = 16  #: output height swept by the chain
    OUT_W = 17  #: output width swept by the chain
    OUT_CB = 18  #: channel blocks per output pixel (the output tensor's full depth)
    OUT_CB_OFF = 19  #: first output block written (placement inside a concat buffer)
    OUT_CB_CNT = 20  #: output blocks produced by this chain
    OUT_EREG = 21  #: exponent register max-updated with every written block exponent
    AUX_ADDR = 22  #: DRAM address of the second operand tensor (residual), OUT_H x OUT_W
    AUX_CB = 23  #: channel blocks per pixel of the second operand tensor
    AUX_CB_OFF = 24  #: first block of the second operand read for output block 0
    W_EXP_FLOOR = 25  #: weight exponent floor of this layer (signed)
    E0 = 64  #: exponent registers E0..E15 (signed), one per live activation buffer
    E1 = 65
    E2 = 66
    E3 = 67
    E4 = 68
    E5 = 69
    E6 = 70
    E7 = 71
    E8 = 72
    E9 = 73
    E10 = 74
    E11 = 75
    E12 = 76
    E13 = 77
    E14 = 78
    E15 = 79


EXP_REG_BASE = int(Reg.E0)
EXP_REG_COUNT = 16


class PoolOp(enum.IntEnum):
    """Window reduction of ``v_pool``."""

    MAX = 0  #: lane-wise maximum; padded positions read as zero (inputs are >= 0 or zero-padded)
    SUM = 1  #: exact lane-wise sum on the tensor grid; padded positions count as zero


class Operand(enum.IntEnum):
    """Where the second operand of a two-input MFU op comes from."""

    VRF = 0  #: vector register file entry ``vrf + output block index``
    AUX = 1  #: the AUX tensor at the same output pixel and block (storage BFP, exact)


@dataclass(frozen=True)
class Field:
    """One bit field of an instruction word."""

    name: str
    width: int
    signed: bool = False
    enum: type[enum.IntEnum] | None = None
    doc: str = ""

    @property
    def min(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def max(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1


@dataclass(frozen=True)
class InstrSpec:
    """An instruction: mnemonic, opcode, fields packed MSB-first below the opcode."""

    mnemonic: str
    opcode: int
    fields: tuple[Field, ...]
    doc: str
    in_chain: bool = False

    @property
    def used_bits(self) -> int:
        return OPCODE_BITS + sum(f.width for f in self.fields)


INSTRUCTIONS: tuple[InstrSpec, ...] = (
    InstrSpec("nop", 0x00, (), "Does nothing for one issue slot."),
    InstrSpec("halt", 0x01, (), "End of program: the NPU raises done."),
    InstrSpec(
        "s_wr",
        0x02,
        (
            Field("reg", 8, enum=Reg, doc="register to write"),
            Field("value", 32, signed=True, doc="value (addresses are taken as unsigned)"),
        ),
        "Write a scalar/control register.",
    ),
    InstrSpec(
        "s_ld",
        0x03,
        (
            Field("reg", 8, enum=Reg, doc="register to write"),
            Field("addr", 32, doc="DRAM byte address of a little-endian int32"),
        ),
        "Load a scalar register from DRAM (e.g. the input tensor's exponent maximum).",
    ),
    InstrSpec(
        "m_rd",
        0x04,
        (
            Field("tile", 15, doc="first tile-buffer slot"),
            Field("count", 11, doc="tiles to load"),
            Field("addr", 32, doc="DRAM byte address of the first tile"),
        ),
        "Stream weight tiles (N x N mantissas + N row exponents each) into the tile buffer."
        " Double buffered: it overlaps the chain before it.",
    ),
    InstrSpec(
        "c_rd",
        0x05,
        (
            Field("vrf", 13, doc="first vector register"),
            Field("count", 13, doc="vectors to load"),
            Field("addr", 32, doc="DRAM byte address of the first wide vector"),
        ),
        "Load wide constant vectors (N int16 mantissas + int16 exponent) into the VRF.",
    ),
    InstrSpec(
        "v_rd",
        0x10,
        (),
        "Chain head: read input vectors. Followed by mv_mul or v_pool it walks the kernel"
        " window of every output pixel over blocks IN_CB_OFF.. of the input, clamping"
        " blocks to the tensor grid (exponent >= E[IN_EREG] - D); followed directly by an"
        " MFU op it reads one raw block per output pixel and block (1x1 window).",
        in_chain=True,
    ),
    InstrSpec(
        "mv_mul",
        0x11,
        (Field("tile", 15, doc="tile-buffer slot of this chain's first tile"),),
        "Matrix-vector multiply: for each output block, the exact sum over the window and"
        " the input blocks of tile x vector, on the accumulator grid, then normalized to"
        " a wide vector. Tiles are ordered [output block][kernel row][kernel col][input"
        " block].",
        in_chain=True,
    ),
    InstrSpec(
        "v_pool",
        0x12,
        (Field("op", 1, enum=PoolOp, doc="MAX or SUM"),),
        "Reduce the kernel window lane-wise on the tensor grid (per channel block).",
        in_chain=True,
    ),
    InstrSpec(
        "vv_add",
        0x13,
        (
            Field("src", 1, enum=Operand, doc="VRF or AUX"),
            Field("vrf", 13, doc="VRF base (output block b uses vrf + b)"),
        ),
        "Add a vector (bias from the VRF, residual from AUX) with exponent alignment.",
        in_chain=True,
    ),
    InstrSpec(
        "vv_mul",
        0x14,
        (Field("vrf", 13, doc="VRF base (output block b uses vrf + b)"),),
        "Multiply lane-wise by a constant vector (per-channel scale, 1/k of avg pooling).",
        in_chain=True,
    ),
    InstrSpec(
        "vv_max",
        0x15,
        (
            Field("src", 1, enum=Operand, doc="VRF or AUX"),
            Field("vrf", 13, doc="VRF base (output block b uses vrf + b)"),
        ),
        "Lane-wise maximum with a vector, with exponent alignment.",
        in_chain=True,
    ),
    InstrSpec("v_relu", 0x16, (), "Lane-wise max(x, 0).", in_chain=True),
    InstrSpec(
        "v_wr",
        0x17,
        (),
        "Re-block to storage BFP and write to the OUT tensor at blocks OUT_CB_OFF..;"
        " max-update E[OUT_EREG] with every written block exponent.",
        in_chain=True,
    ),
    InstrSpec("end_chain", 0x18, (), "Close the chain; it runs to completion.", in_chain=True),
)

BY_MNEMONIC: dict[str, InstrSpec] = {s.mnemonic: s for s in INSTRUCTIONS}
BY_OPCODE: dict[int, InstrSpec] = {s.opcode: s for s in INSTRUCTIONS}


class DecodeError(ValueError):
    """A word that is not a valid instruction."""


@dataclass(frozen=True)
class Instr:
    """One decoded instruction: mnemonic and field values."""

    op: str
    args: dict[str, int]

    def __str__(self) -> str:
        spec = BY_MNEMONIC[self.op]
        parts = []
        for f in spec.fields:
            v = self.args[f.name]
            parts.append(f"{f.name}={f.enum(v).name if f.enum else v}")
        return f"{self.op} {', '.join(parts)}".rstrip()


def _check_table() -> None:
    seen: set[int] = set()
    for s in INSTRUCTIONS:
        if s.opcode >= 1 << OPCODE_BITS or s.opcode in seen:
            raise AssertionError(f"bad or duplicate opcode for {s.mnemonic}")
        seen.add(s.opcode)
        if s.used_bits > WORD_BITS:
            raise AssertionError(f"{s.mnemonic} needs {s.used_bits} bits")


_check_table()


def encode(op: str, /, **args: int) -> int:
    """Assemble one instruction word. Every field must be given and in range."""
    spec = BY_MNEMONIC.get(op)
    if spec is None:
        raise ValueError(f"unknown instruction {op!r}")
    names = {f.name for f in spec.fields}
    if set(args) != names:
        raise ValueError(f"{op} takes fields {sorted(names)}, got {sorted(args)}")
    word = spec.opcode
    for f in spec.fields:
        v = int(args[f.name])
        if not f.min <= v <= f.max:
            raise ValueError(f"{op}.{f.name}={v} out of range [{f.min}, {f.max}]")
        word = (word << f.width) | (v & ((1 << f.width) - 1))
    return word << (WORD_BITS - spec.used_bits)


def decode(word: int) -> Instr:
    """Disassemble one instruction word; reserved bits must be zero."""
    if not 0 <= word < 1 << WORD_BITS:
        raise DecodeError(f"word {word:#x} is not 64 bits")
    opcode = word >> (WORD_BITS - OPCODE_BITS)
    spec = BY_OPCODE.get(opcode)
    if spec is None:
        raise DecodeError(f"unknown opcode {opcode:#04x} in word {word:#018x}")
    reserved = WORD_BITS - spec.used_bits
    if word & ((1 << reserved) - 1):
        raise DecodeError(f"{spec.mnemonic}: reserved bits set in word {word:#018x}")
    pos = WORD_BITS - OPCODE_BITS
    args: dict[str, int] = {}
    for f in spec.fields:
        pos -= f.width
        v = (word >> pos) & ((1 << f.width) - 1)
        if f.signed and v >> (f.width - 1):
            v -= 1 << f.width
        if f.enum is not None:
            try:
                f.enum(v)
            except ValueError:
                raise DecodeError(
                    f"{spec.mnemonic}.{f.name}: {v} is not a {f.enum.__name__}"
                ) from None
        args[f.name] = v
    return Instr(spec.mnemonic, args)


def encode_instr(instr: Instr) -> int:
    return encode(instr.op, **instr.args)


def render_markdown() -> str:
    """``docs/isa.md``: generated, never edited by hand."""
    out = [
        "# tessera ISA",
        "",
        "<!-- Generated by `python -m tessera.isa > docs/isa.md` from tessera/isa.py. -->",
        "<!-- Do not edit: tests/test_isa.py fails when this file is stale. -->",
        "",
        f"Instruction words are {WORD_BITS} bits. The opcode is the top {OPCODE_BITS} bits;",
        "fields follow MSB-first; the remaining low bits are reserved and must be zero.",
        "",
        "## Instructions",
        "",
        "| mnemonic | opcode | chain | fields (MSB first) | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in INSTRUCTIONS:
        fields = (
            ", ".join(f"`{f.name}`:{f.width}{'s' if f.signed else ''}" for f in s.fields) or "-"
        )
        out.append(
            f"| `{s.mnemonic}` | `{s.opcode:#04x}` | {'yes' if s.in_chain else ''} |"
            f" {fields} | {s.doc} |"
        )
    out += ["", "## Fields", "", "| instruction | field | bits | meaning |", "|---|---|---|---|"]
    for s in INSTRUCTIONS:
        pos = WORD_BITS - OPCODE_BITS
        for f in s.fields:
            hi, lo = pos - 1, pos - f.width
            pos -= f.width
            meaning = f.doc + (f" ({f.enum.__name__})" if f.enum else "")
            out.append(f"| `{s.mnemonic}` | `{f.name}` | [{hi}:{lo}] | {meaning} |")
    out += ["", "## Registers", "", "| register | number | meaning |", "|---|---|---|"]
    for r in Reg:
        out.append(f"| `{r.name}` | {int(r)} | {_member_doc(Reg, r.name)} |")
    for e in (PoolOp, Operand):
        out += ["", f"## {e.__name__}", "", "| name | value | meaning |", "|---|---|---|"]
        for m in e:
            out.append(f"| `{m.name}` | {int(m)} | {_member_doc(e, m.name)} |")
    out += [
        "",
        "## Chains",
        "",
        "A chain is `v_rd`, then at most one reducer (`mv_mul` or `v_pool`), then any",
        "number of MFU ops (`vv_add`, `vv_mul`, `vv_max`, `v_relu`), then `v_wr` and",
        "`end_chain`. It sweeps output pixels `OUT_H x OUT_W` and output blocks",
        "`OUT_CB_CNT`; numerics of every step are defined in `docs/numerics.md`.",
        "",
    ]
    return "\n".join(out)


def _member_doc(cls: type, name: str) -> str:
    """The ``#:`` comment of an enum member, read from this file's source."""
    return _MEMBER_DOCS.get((cls.__name__, name), "")


def _scan_member_docs() -> dict[tuple[str, str], str]:
    import inspect

    docs: dict[tuple[str, str], str] = {}
    for cls in (Reg, PoolOp, Operand):
        for line in inspect.getsource(cls).splitlines():
            line = line.strip()
            if "=" in line and "#:" in line:
                name = line.split("=")[0].strip()
                docs[(cls.__name__, name)] = line.split("#:", 1)[1].strip()
    return docs


_MEMBER_DOCS = _scan_member_docs()


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
