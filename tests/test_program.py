"""The ``.tsr`` container: round trips, determinism, and detection of every kind of damage."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.config import PRESETS
from tessera.errors import ProgramFormatError
from tessera.isa import INSTRUCTIONS, encode
from tessera.program import FORMAT_VERSION, HEADER, MAGIC, Program

CONFIG = PRESETS["ulx3s-85f"]


def make_program(**manifest_extra: Any) -> Program:
    manifest = {
        "format_version": FORMAT_VERSION,
        "tessera_version": "0.1.0",
        "config": CONFIG.to_dict(),
        "inputs": [{"name": "input", "shape": [1, 3, 32, 32], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [1, 10], "dtype": "float32"}],
        "memory_map": [{"name": "weights", "address": 0, "size": 4096}],
        "host_stages": [],
        "dram_bytes_needed": 8192,
        "layers": [{"name": "conv1", "op": "Conv"}],
        **manifest_extra,
    }
    words = [
        encode("s_wr", reg=0, value=4096),
        encode("m_rd", tile=0, count=3, addr=0),
        encode("v_rd"),
        encode("mv_mul", tile=0),
        encode("vv_add", src=0, vrf=2),
        encode("v_relu"),
        encode("v_wr"),
        encode("end_chain"),
        encode("halt"),
    ]
    segments = [(0, bytes(range(256)) * 3), (8192, b"\x01\x02\x03"), (4096, b"")]
    return Program(manifest, np.array(words, dtype=np.uint64), segments)


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The stored manifest (layout keys included) and the payload of a valid file."""
    _, _, _, _, manifest_size, _ = HEADER.unpack_from(data)
    start = -(-(HEADER.size + manifest_size) // 8) * 8
    return json.loads(data[HEADER.size : HEADER.size + manifest_size]), data[start:]


def forge(manifest: dict[str, Any] | bytes, payload: bytes) -> bytes:
    """A file with a consistent header around any manifest, to reach the content checks."""
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    pad = bytes(-(HEADER.size + len(raw)) % 8)
    size = HEADER.size + len(raw) + len(pad) + len(payload)
    header = HEADER.pack(
        MAGIC, FORMAT_VERSION, HEADER.size, size, len(raw), hashlib.sha256(raw).digest()
    )
    return header + raw + pad + payload


def load_error(data: bytes) -> str:
    with pytest.raises(ProgramFormatError) as info:
        Program.from_bytes(data, source="prog.tsr")
    message = str(info.value)
    assert message.startswith("prog.tsr: ")
    return message


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    program = make_program()
    path = tmp_path / "prog.tsr"
    program.save(path)
    loaded = Program.load(path)
    assert loaded == program
    assert loaded.instructions.dtype == np.uint64
    assert loaded.config == CONFIG
    assert os.listdir(tmp_path) == ["prog.tsr"]


def test_save_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "prog.tsr"
    path.write_bytes(b"old contents")
    make_program().save(path)
    assert Program.load(path) == make_program()
    assert os.listdir(tmp_path) == ["prog.tsr"]


def test_packaging_is_deterministic() -> None:
    first = make_program().to_bytes()
    reordered = make_program()
    reordered.manifest = dict(reversed(list(reordered.manifest.items())))
    assert reordered.to_bytes() == first
    assert Program.from_bytes(first).to_bytes() == first


def test_sections_are_aligned_and_described_in_the_manifest() -> None:
    data = make_program().to_bytes()
    stored, payload = split(data)
    assert (len(data) - len(payload)) % 8 == 0
    assert set(stored["sections"]) == {"instructions", "dram"}
    for entry in stored["sections"].values():
        assert entry["offset"] % 8 == 0
        body = payload[entry["offset"] : entry["offset"] + entry["length"]]
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    assert [s["address"] for s in stored["dram_segments"]] == [0, 8192, 4096]


def test_numpy_values_in_the_manifest_are_stored_as_json() -> None:
    program = make_program(dram_bytes_needed=np.int64(8192), scale=np.array([1.5, 2.0]))
    loaded = Program.from_bytes(program.to_bytes())
    assert loaded.manifest["dram_bytes_needed"] == 8192
    assert loaded.manifest["scale"] == [1.5, 2.0]


def test_disassemble() -> None:
    lines = make_program().disassemble()
    assert lines[0] == "0: s_wr reg=IN_ADDR, value=4096"
    assert lines[4] == "4: vv_add src=VRF, vrf=2"
    assert lines[-1] == "8: halt"


def _instruction_byte(data: bytes) -> int:
    stored, payload = split(data)
    return len(data) - len(payload) + stored["sections"]["instructions"]["offset"] + 3


def _dram_byte(data: bytes) -> int:
    stored, payload = split(data)
    return len(data) - len(payload) + stored["sections"]["dram"]["offset"] + 100


@pytest.mark.parametrize(
    ("locate", "expected"),
    [
        (lambda data: 2, "not a tessera program"),
        (lambda data: 8, "format version"),
        (lambda data: 12, "header size field"),
        (lambda data: 19, "truncated"),
        (lambda data: 40, "corrupted: manifest sha256 mismatch"),
        (lambda data: HEADER.size + 20, "corrupted: manifest sha256 mismatch"),
        (_instruction_byte, "corrupted: instruction section sha256 mismatch"),
        (_dram_byte, "corrupted: DRAM image section sha256 mismatch"),
        (lambda data: len(data) - 1, "corrupted: DRAM image section sha256 mismatch"),
    ],
    ids=[
        "magic",
        "version",
        "header-size",
        "file-size",
        "manifest-sha",
        "manifest",
        "instructions",
        "dram",
        "last-byte",
    ],
)
def test_a_flipped_byte_is_reported(locate: Any, expected: str) -> None:
    data = bytearray(make_program().to_bytes())
    data[locate(data)] ^= 0x40
    assert expected in load_error(bytes(data))


@pytest.mark.parametrize("length", [0, 5, 8, 30, HEADER.size, HEADER.size + 100, -1])
def test_truncation_says_expected_and_actual_length(length: int) -> None:
    data = make_program().to_bytes()
    cut = data[:length]
    message = load_error(cut)
    assert "truncated" in message
    assert f"got {len(cut)}" in message
    expected = HEADER.size if len(cut) < HEADER.size else len(data)
    assert f"expected{' at least' if len(cut) < HEADER.size else ''} {expected} bytes" in message


def test_trailing_bytes_are_reported() -> None:
    assert "unexpected bytes after the end" in load_error(make_program().to_bytes() + b"\0")


def test_wrong_magic() -> None:
    message = load_error(b"PK\x03\x04" + make_program().to_bytes()[4:])
    assert "not a tessera program" in message


def test_other_format_version_asks_to_recompile() -> None:
    data = bytearray(make_program().to_bytes())
    struct.pack_into("<I", data, len(MAGIC), FORMAT_VERSION + 1)
    message = load_error(bytes(data))
    assert f"version {FORMAT_VERSION + 1} is not supported" in message
    assert f"reads version {FORMAT_VERSION}" in message
    assert "tessera compile" in message


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ProgramFormatError, match=r"missing\.tsr: No such file"):
        Program.load(tmp_path / "missing.tsr")


def _with_instruction(data: bytes, index: int, word: int) -> bytes:
    """Replace one instruction word and reseal every checksum around it."""
    stored, payload = split(data)
    entry = stored["sections"]["instructions"]
    start = entry["offset"] + 8 * index
    payload = payload[:start] + struct.pack("<Q", word) + payload[start + 8 :]
    code = payload[entry["offset"] : entry["offset"] + entry["length"]]
    entry["sha256"] = hashlib.sha256(code).hexdigest()
    return forge(stored, payload)


def test_reserved_bits_in_an_instruction_are_reported_with_its_index() -> None:
    data = make_program().to_bytes()
    assert Program.from_bytes(_with_instruction(data, 0, encode("s_wr", reg=0, value=1)))
    message = load_error(_with_instruction(data, 8, encode("halt") | 1))
    assert "instruction 8 is invalid" in message
    assert "reserved bits" in message
    assert "unknown opcode" in load_error(_with_instruction(data, 2, 0x3F << 58))


def test_invalid_instructions_are_refused_on_save(tmp_path: Path) -> None:
    program = make_program()
    program.instructions[3] |= np.uint64(1)
    with pytest.raises(ProgramFormatError, match="instruction 3 is invalid"):
        program.save(tmp_path / "prog.tsr")
    assert os.listdir(tmp_path) == []


def _with_manifest(data: bytes, change: Any) -> bytes:
    stored, payload = split(data)
    change(stored)
    return forge(stored, payload)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m.pop("inputs"), "manifest lacks required keys ['inputs']"),
        (lambda m: m.pop("config"), "manifest lacks required keys ['config']"),
        (lambda m: m.update(format_version=True), "manifest format_version True disagrees"),
        (lambda m: m.update(outputs={"name": "y"}), "'outputs' must be a list of objects"),
        (lambda m: m["config"].update(native_dim=12), "invalid NPU config"),
        (lambda m: m["config"].update(frobs=1), "invalid NPU config"),
        (lambda m: m["config"].pop("name"), "invalid NPU config"),
        (lambda m: m.pop("sections"), "section table"),
        (lambda m: m.pop("dram_segments"), "no DRAM segment table"),
        (lambda m: m["sections"]["dram"].update(offset=4), "payload offset 4"),
        (lambda m: m["dram_segments"][1].update(offset=0), "DRAM segment 1 starts at offset 0"),
        (lambda m: m["dram_segments"].pop(), "2 bytes of the DRAM image are in no segment"),
        (lambda m: m["dram_segments"][1].update(address=500), "DRAM segments 0 and 1 overlap"),
        (lambda m: m["dram_segments"][1].update(address=2**25 - 1), "lies outside"),
    ],
)
def test_inconsistent_manifest_is_reported(change: Any, expected: str) -> None:
    program = make_program()
    program.dram_segments[1] = (8192, b"\x01\x02\x03\x04\x05")
    program.dram_segments.append((9000, b"xy"))
    assert expected in load_error(_with_manifest(program.to_bytes(), change))


def test_manifest_that_is_not_json() -> None:
    _, payload = split(make_program().to_bytes())
    assert "manifest is not valid JSON" in load_error(forge(b"{not json", payload))
    assert "manifest is not a JSON object" in load_error(forge(b"[]", payload))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: setattr(p, "instructions", [1, 2]), "1-D uint64 array, got list"),
        (lambda p: setattr(p, "instructions", p.instructions.astype(np.int64)), "got int64"),
        (lambda p: p.dram_segments.append((0, "text")), "DRAM segment 3 must be"),
        (lambda p: p.manifest.update(sections={}), "reserved for the file layout"),
        (lambda p: p.manifest.update(when=object()), "not JSON-serialisable"),
        (lambda p: p.manifest.update(gain=float("nan")), "not JSON-serialisable"),
    ],
)
def test_packaging_refuses_malformed_programs(change: Any, expected: str) -> None:
    program = make_program()
    change(program)
    with pytest.raises(ProgramFormatError, match="cannot package program") as info:
        program.to_bytes()
    assert expected in str(info.value)


@st.composite
def instruction_words(draw: st.DrawFn) -> int:
    spec = draw(st.sampled_from(INSTRUCTIONS))
    # Packed here rather than with ``encode``, whose ``op`` parameter clashes with the
    # ``op`` field of ``v_pool``.
    word = spec.opcode
    for f in spec.fields:
        value = draw(st.sampled_from(list(f.enum)) if f.enum else st.integers(f.min, f.max))
        word = (word << f.width) | (int(value) & ((1 << f.width) - 1))
    return word << (64 - spec.used_bits)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)

programs = st.builds(
    lambda extra, words, blobs: Program(
        {
            **extra,
            "format_version": FORMAT_VERSION,
            "config": CONFIG.to_dict(),
            "inputs": [],
            "outputs": [{"name": "y"}],
        },
        np.array(words, dtype=np.uint64),
        [(1024 * i, blob) for i, blob in enumerate(blobs)],
    ),
    st.dictionaries(
        st.text().filter(lambda k: k not in ("sections", "dram_segments")), json_values
    ),
    st.lists(instruction_words(), max_size=20),
    st.lists(st.binary(max_size=40), max_size=4),
)


@settings(max_examples=50, deadline=None)
@given(programs)
def test_property_round_trip_is_exact_and_deterministic(program: Program) -> None:
    data = program.to_bytes()
    loaded = Program.from_bytes(data)
    assert loaded == program
    assert loaded.to_bytes() == data


@settings(max_examples=100, deadline=None)
@given(programs, st.data())
def test_property_any_flipped_byte_or_truncation_is_detected(
    program: Program, data: st.DataObject
) -> None:
    blob = program.to_bytes()
    damaged = bytearray(blob)
    damaged[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ProgramFormatError):
        Program.from_bytes(bytes(damaged))
    with pytest.raises(ProgramFormatError):
        Program.from_bytes(blob[: data.draw(st.integers(0, len(blob) - 1))])
