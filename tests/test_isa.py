"""The ISA table is the single source of truth: round trips and the generated doc."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera import isa

ROOT = Path(__file__).resolve().parents[1]


@st.composite
def instructions(draw) -> isa.Instr:
    spec = draw(st.sampled_from(isa.INSTRUCTIONS))
    args = {}
    for f in spec.fields:
        if f.enum is not None:
            args[f.name] = int(draw(st.sampled_from(list(f.enum))))
        else:
            args[f.name] = draw(st.integers(f.min, f.max))
    return isa.Instr(spec.mnemonic, args)


@given(instructions())
def test_encode_decode_encode(instr: isa.Instr) -> None:
    word = isa.encode_instr(instr)
    assert 0 <= word < 1 << isa.WORD_BITS
    back = isa.decode(word)
    assert back == instr
    assert isa.encode_instr(back) == word


def test_opcodes_unique_and_fields_fit() -> None:
    assert len({s.opcode for s in isa.INSTRUCTIONS}) == len(isa.INSTRUCTIONS)
    for s in isa.INSTRUCTIONS:
        assert s.used_bits <= isa.WORD_BITS, s.mnemonic


def test_field_range_checked() -> None:
    with pytest.raises(ValueError, match="out of range"):
        isa.encode("m_rd", tile=0, count=1 << 11, addr=0)
    with pytest.raises(ValueError, match="takes fields"):
        isa.encode("s_wr", reg=0)
    with pytest.raises(ValueError, match="unknown instruction"):
        isa.encode("v_frobnicate")


def test_decode_rejects_reserved_bits_and_unknown_opcodes() -> None:
    with pytest.raises(isa.DecodeError, match="reserved"):
        isa.decode(isa.encode("halt") | 1)
    with pytest.raises(isa.DecodeError, match="unknown opcode"):
        isa.decode(0x3F << (isa.WORD_BITS - isa.OPCODE_BITS))
    bad_reg = (isa.BY_MNEMONIC["s_wr"].opcode << 58) | (0xFF << 50)
    with pytest.raises(isa.DecodeError, match="not a Reg"):
        isa.decode(bad_reg)


def test_signed_fields_round_trip() -> None:
    w = isa.encode("s_wr", reg=isa.Reg.W_EXP_FLOOR, value=-(1 << 31))
    assert isa.decode(w).args["value"] == -(1 << 31)


def test_committed_doc_is_fresh() -> None:
    """docs/isa.md is generated from tessera/isa.py; regenerate it when this fails:
    ``python -m tessera.isa > docs/isa.md``."""
    committed = (ROOT / "docs" / "isa.md").read_text()
    assert committed == isa.render_markdown(), "docs/isa.md is stale"
