"""The Amaranth decoder agrees with ``isa.decode`` on valid and invalid words."""

import random

import pytest
from amaranth.sim import Simulator

from tessera import isa
from tessera.hdl.decoder import FIELD_SHAPES, Decoder, Opcode

pytestmark = pytest.mark.rtl


def test_opcode_enum_is_the_isa_table():
    assert {m.name.lower(): m.value for m in Opcode} == {
        s.mnemonic: s.opcode for s in isa.INSTRUCTIONS
    }


def _random_words(rng: random.Random, count: int) -> list[int]:
    words = []
    for _ in range(count):
        spec = rng.choice(isa.INSTRUCTIONS)
        args = {f.name: rng.randint(f.min, f.max) for f in spec.fields}
        for f in spec.fields:
            if f.enum is not None:
                args[f.name] = rng.choice(list(f.enum))
        w = isa.encode(spec.mnemonic, **args)
        kind = rng.random()
        if kind < 0.15:
            w ^= 1 << rng.randrange(64 - spec.used_bits) if spec.used_bits < 64 else 0
        elif kind < 0.25:
            w = rng.getrandbits(64)
        words.append(w)
    return words


def test_decoder_matches_isa_decode_on_random_words():
    dut = Decoder()
    rng = random.Random(4)
    words = _random_words(rng, 3000)
    seen_valid = seen_invalid = 0

    async def bench(ctx):
        nonlocal seen_valid, seen_invalid
        for w in words:
            ctx.set(dut.word, w)
            try:
                ref = isa.decode(w)
            except isa.DecodeError:
                ref = None
            assert ctx.get(dut.out.valid) == (ref is not None), hex(w)
            if ref is None:
                seen_invalid += 1
                continue
            seen_valid += 1
            assert ctx.get(dut.out.opcode).value == isa.BY_MNEMONIC[ref.op].opcode
            for name, v in ref.args.items():
                assert ctx.get(getattr(dut.out, name)) == v, (ref, name)

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
    assert seen_valid > 2000 and seen_invalid > 300
    assert set(FIELD_SHAPES) == {f.name for s in isa.INSTRUCTIONS for f in s.fields}
