"""The ``.tsr`` program file: everything a board needs to run one compiled model.

A program is compiled once and then copied around (to a board, into a cache, between
machines), so the file has to be self-describing, refuse to run on an NPU build it was not
compiled for, and detect any damage before a single word reaches the hardware. Every byte
of the file is covered by either a sha256 or an exact check, and packaging is
deterministic (no timestamps, sorted keys), so equal programs give equal files and files
can be compared or cached by hash.

Binary layout (all integers little-endian)
------------------------------------------
======  =====  ==========================================================================
offset  bytes  content
======  =====  ==========================================================================
0       8      magic ``b"TSRPROG\\0"``
8       4      u32 format version (:data:`FORMAT_VERSION`)
12      4      u32 header size (64 in version 1)
16      8      u64 total file size
24      8      u64 manifest size M
32      32     sha256 of the manifest bytes
64      M      manifest: UTF-8 JSON object, sorted keys, ASCII-only, no whitespace
..             zero padding up to the next multiple of 8: the start P of the payload
P      ..      payload: the instruction section, then the DRAM image section, each
               starting at a multiple of 8 and separated by zero padding
======  =====  ==========================================================================

The instruction section holds the 64-bit instruction words (:mod:`tessera.isa`) as
little-endian u64. The DRAM image section is the concatenation of the DRAM segments the
host writes into board DRAM before running.

Besides the compiler's keys, the stored manifest carries the file layout under two keys
that :class:`Program` strips on load and refuses on save: ``sections`` (for
``instructions`` and ``dram``: ``offset`` from P, ``length`` and ``sha256``) and
``dram_segments`` (``address``, ``offset`` into the DRAM image section, ``length``, one
entry per segment, in order and back to back). Offsets are relative to P because P
depends on the manifest's own length.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tessera.config import NPUConfig
from tessera.errors import ProgramFormatError, TesseraError
from tessera.isa import DecodeError, decode

MAGIC = b"TSRPROG\0"
#: 1: the first layout. 2: the manifest's NPU config no longer has
#: ``mvu_pipeline_depth``, ``mfu_pipeline_depth`` and ``chain_overhead_cycles`` (the
#: cycle model derives those from the RTL's structure), so a version-1 file is refused
#: with a request to recompile rather than with an unknown-field error.
FORMAT_VERSION = 2
#: magic, format version, header size, file size, manifest size, manifest sha256.
HEADER = struct.Struct("<8sIIQQ32s")
#: Every section starts at a multiple of this, so a reader can map the words in place.
ALIGN = 8
#: Manifest keys the loader relies on; everything else is the compiler's business.
REQUIRED_KEYS = ("format_version", "config", "inputs", "outputs")
#: Manifest keys holding the file layout, owned by this module.
LAYOUT_KEYS = ("sections", "dram_segments")
#: Payload sections in file order, with the name error messages use for them.
SECTIONS = {"instructions": "instruction section", "dram": "DRAM image section"}


@dataclass(eq=False)
class Program:
    """A compiled program: manifest, instruction words and initial DRAM contents.

    The manifest is stored as JSON, so it must be a dict with string keys and JSON values
    (numpy scalars and arrays are converted); tuples come back as lists.
    """

    manifest: dict[str, Any]
    #: 1-D uint64 array of instruction words.
    instructions: np.ndarray
    #: ``(address, data)`` pairs, written to DRAM in this order before the program runs.
    dram_segments: list[tuple[int, bytes]]

    def __eq__(self, other: object) -> bool:
        # Spelled out because ``==`` on the instruction array is elementwise.
        if not isinstance(other, Program):
            return NotImplemented
        return (
            self.manifest == other.manifest
            and self.instructions.dtype == other.instructions.dtype
            and np.array_equal(self.instructions, other.instructions)
            and _plain_segments(self.dram_segments) == _plain_segments(other.dram_segments)
        )

    @property
    def config(self) -> NPUConfig:
        """The NPU build this program was compiled for."""
        return NPUConfig.from_dict(self.manifest["config"])

    def to_bytes(self) -> bytes:
        """The file contents; raises :class:`ProgramFormatError` if the loader would reject them."""
        return self._pack("cannot package program")

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Program:
        """Parse and fully validate file contents; ``source`` names them in error messages."""
        manifest, words, segments = _unpack(bytes(data), source)
        return cls(manifest, words, segments)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the program atomically: readers see the old file or the new one, never half.

        The temporary file is created next to the target so the final rename stays within
        one file system, and with mode 0666 so the user's umask decides the permissions.
        """
        path = Path(path)
        data = self._pack(f"cannot save {path}")
        write_atomically(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Program:
        """Read and fully validate a ``.tsr`` file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ProgramFormatError(f"cannot read program {path}: {exc.strerror or exc}") from None
        return cls.from_bytes(data, source=str(path))

    def disassemble(self) -> list[str]:
        """One line per instruction word, ``index: mnemonic fields``."""
        width = len(str(max(len(self.instructions) - 1, 0)))
        return [f"{i:>{width}}: {decode(w)}" for i, w in enumerate(self.instructions.tolist())]

    def _pack(self, source: str) -> bytes:
        words = _instruction_array(self.instructions, source)
        segments = _segment_list(self.dram_segments, source)
        if not isinstance(self.manifest, dict):
            raise ProgramFormatError(f"{source}: the manifest must be a dict")
        reserved = sorted(set(LAYOUT_KEYS) & set(self.manifest))
        if reserved:
            raise ProgramFormatError(
                f"{source}: manifest keys {reserved} are reserved for the file layout"
            )
        _check_contents(self.manifest, words, segments, source)

        bodies = {
            "instructions": words.astype("<u8").tobytes(),
            "dram": b"".join(data for _, data in segments),
        }
        sections, payload, size = layout_sections(bodies)
        table = []
        offset = 0
        for address, data in segments:
            table.append({"address": address, "offset": offset, "length": len(data)})
            offset += len(data)

        try:
            manifest = json.dumps(
                {**self.manifest, "sections": sections, "dram_segments": table},
                sort_keys=True,
                separators=(",", ":"),
                allow_nan=False,
                default=_json_default,
            ).encode("ascii")
        except (TypeError, ValueError) as exc:
            raise ProgramFormatError(
                f"{source}: manifest is not JSON-serialisable: {exc}"
            ) from None
        return pack_container(MAGIC, FORMAT_VERSION, manifest, payload, size)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _is_uint(value: object) -> bool:
    # JSON true/false load as bool, a subclass of int; they are never valid sizes.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain_segments(segments: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [(int(address), bytes(data)) for address, data in segments]


def _json_default(value: object) -> Any:
    """Let compiler code put numpy scalars and arrays (shapes, sizes) in the manifest."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} value {value!r:.60} is not JSON-serialisable")


def _instruction_array(instructions: object, source: str) -> np.ndarray:
    if (
        not isinstance(instructions, np.ndarray)
        or instructions.dtype != np.uint64
        or instructions.ndim != 1
    ):
        got = (
            f"{instructions.dtype} array of shape {instructions.shape}"
            if isinstance(instructions, np.ndarray)
            else type(instructions).__name__
        )
        raise ProgramFormatError(f"{source}: instructions must be a 1-D uint64 array, got {got}")
    return instructions


def _segment_list(segments: Iterable[Any], source: str) -> list[tuple[int, bytes]]:
    """Normalise to ``(int, bytes)``; numpy integer addresses are accepted."""
    out = []
    for i, segment in enumerate(segments):
        try:
            address, data = segment
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError
            out.append((operator.index(address), bytes(data)))
        except (TypeError, ValueError):
            raise ProgramFormatError(
                f"{source}: DRAM segment {i} must be an (address: int, data: bytes) pair,"
                f" got {type(segment).__name__}"
            ) from None
    return out


def _check_contents(
    manifest: dict[str, Any],
    words: np.ndarray,
    segments: list[tuple[int, bytes]],
    source: str,
) -> None:
    """The checks shared by save and load, so no file is written that would not load."""
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ProgramFormatError(f"{source}: manifest lacks required keys {missing}")
    version = manifest["format_version"]
    if not _is_uint(version) or version != FORMAT_VERSION:
        raise ProgramFormatError(
            f"{source}: manifest format_version {version!r} disagrees with the file format"
            f" version {FORMAT_VERSION}"
        )
    for key in ("inputs", "outputs"):
        if not isinstance(manifest[key], list) or not all(
            isinstance(item, dict) for item in manifest[key]
        ):
            raise ProgramFormatError(f"{source}: manifest {key!r} must be a list of objects")
    raw = manifest["config"]
    if not isinstance(raw, dict):
        raise ProgramFormatError(f"{source}: manifest 'config' must be an object")
    try:
        config = NPUConfig.from_dict(raw)
    except (TesseraError, TypeError) as exc:
        raise ProgramFormatError(f"{source}: invalid NPU config: {exc}") from None

    for i, word in enumerate(words.tolist()):
        try:
            decode(word)
        except DecodeError as exc:
            raise ProgramFormatError(f"{source}: instruction {i} is invalid: {exc}") from None

    end_of_previous = 0
    previous = None
    for i in sorted(range(len(segments)), key=lambda i: segments[i][0]):
        address, data = segments[i]
        if address < 0 or address + len(data) > config.dram_bytes:
            raise ProgramFormatError(
                f"{source}: DRAM segment {i} ({len(data)} bytes at {address:#x}) lies outside"
                f" the {config.dram_bytes} bytes of DRAM of config {config.name!r}"
            )
        if previous is not None and address < end_of_previous:
            raise ProgramFormatError(f"{source}: DRAM segments {previous} and {i} overlap")
        previous, end_of_previous = i, address + len(data)


def layout_sections(
    bodies: Mapping[str, bytes],
) -> tuple[dict[str, dict[str, Any]], list[bytes], int]:
    """Sections back to back in the given order, each at an ``ALIGN`` boundary after zero
    padding and checksummed: the manifest's section table, the payload pieces and the
    payload size (shared by programs and packages; :func:`read_sections` reads it)."""
    sections: dict[str, dict[str, Any]] = {}
    payload: list[bytes] = []
    pos = 0
    for name, body in bodies.items():
        payload.append(bytes(_align(pos) - pos))
        pos = _align(pos)
        sections[name] = {
            "offset": pos,
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        payload.append(body)
        pos += len(body)
    return sections, payload, pos


def read_sections(
    payload: memoryview,
    sections: Mapping[str, Any],
    labels: Mapping[str, str],
    fail: Callable[[str], Exception],
) -> dict[str, memoryview]:
    """Check and cut out the sections :func:`layout_sections` laid out.

    ``labels`` names the sections to read (with how messages call them); every entry must
    be well formed and the sections must sit back to back in offset order, aligned, with
    zero padding, inside the payload, checksums right and nothing after the last.
    """
    for name, label in labels.items():
        entry = sections.get(name)
        if not (
            isinstance(entry, dict)
            and set(entry) == {"offset", "length", "sha256"}
            and _is_uint(entry["offset"])
            and _is_uint(entry["length"])
            and isinstance(entry["sha256"], str)
        ):
            raise fail(f"corrupted: malformed manifest entry for the {label}")
    bodies: dict[str, memoryview] = {}
    pos = 0
    for name in sorted(labels, key=lambda n: sections[n]["offset"]):
        entry, label = sections[name], labels[name]
        if entry["offset"] != _align(pos):
            raise fail(
                f"corrupted: the {label} is at payload offset {entry['offset']},"
                f" expected {_align(pos)}"
            )
        if any(payload[pos : entry["offset"]]):
            raise fail(f"corrupted: nonzero padding before the {label}")
        pos = entry["offset"] + entry["length"]
        if pos > len(payload):
            raise fail(f"truncated: the {label} runs past the end of the file")
        body = payload[entry["offset"] : pos]
        if hashlib.sha256(body).hexdigest() != entry["sha256"]:
            raise fail(f"corrupted: {label} sha256 mismatch")
        bodies[name] = body
    if pos != len(payload):
        raise fail(f"corrupted: {len(payload) - pos} bytes after the last section")
    return bodies


def pack_container(
    magic: bytes, version: int, manifest: bytes, payload: list[bytes], payload_size: int
) -> bytes:
    """Header, manifest, zero padding to ``ALIGN``, then the payload (``read_container``'s
    inverse, shared by programs and packages)."""
    start = _align(HEADER.size + len(manifest))
    header = HEADER.pack(
        magic,
        version,
        HEADER.size,
        start + payload_size,
        len(manifest),
        hashlib.sha256(manifest).digest(),
    )
    return b"".join([header, manifest, bytes(start - HEADER.size - len(manifest)), *payload])


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a
    partial one: a synced temporary file beside it, renamed over it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_container(
    data: bytes,
    magic: bytes,
    version: int,
    kind: str,
    rebuild: str,
    fail: Callable[[str], Exception],
) -> tuple[dict[str, Any], memoryview, int, int]:
    """Check the container shared by programs and packages; return its manifest.

    Both files are ``HEADER`` (magic, version, header size, file size, manifest size,
    manifest sha256), the JSON manifest, zero padding to ``ALIGN``, then the payload. The
    version is checked before anything else so a newer file, whose header may differ, is
    reported as such and not as corrupted. Returns the manifest, a view of ``data``, the
    payload start and the file size; ``fail`` makes the caller's exception type.
    """
    if data[: len(magic)] != magic:
        if len(data) < len(magic) and magic.startswith(data):
            raise fail(f"truncated: expected at least {HEADER.size} bytes, got {len(data)}")
        raise fail(f"not a tessera {kind} (starts with {data[:8]!r}, expected {magic!r})")
    if len(data) >= len(magic) + 4:
        (found,) = struct.unpack_from("<I", data, len(magic))
        if found != version:
            raise fail(
                f"{kind} format version {found} is not supported (this tessera reads"
                f" version {version}); {rebuild}"
            )
    if len(data) < HEADER.size:
        raise fail(f"truncated: expected at least {HEADER.size} bytes, got {len(data)}")
    _, _, header_size, size, manifest_size, manifest_sha = HEADER.unpack_from(data)
    if header_size != HEADER.size:
        raise fail(f"corrupted: header size field is {header_size}, expected {HEADER.size}")
    if size > len(data):
        raise fail(f"truncated: expected {size} bytes, got {len(data)}")
    if size < len(data):
        raise fail(f"corrupted: {len(data) - size} unexpected bytes after the end at {size}")
    start = _align(HEADER.size + manifest_size)
    if start > size:
        raise fail(f"corrupted: manifest size {manifest_size} runs past the end of the file")
    view = memoryview(data)
    manifest_bytes = view[HEADER.size : HEADER.size + manifest_size]
    if hashlib.sha256(manifest_bytes).digest() != manifest_sha:
        raise fail("corrupted: manifest sha256 mismatch")
    if any(view[HEADER.size + manifest_size : start]):
        raise fail("corrupted: nonzero padding after the manifest")
    try:
        manifest = json.loads(bytes(manifest_bytes).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise fail("manifest is not a JSON object")
    return manifest, view, start, size


def _unpack(data: bytes, source: str) -> tuple[dict[str, Any], np.ndarray, list[tuple[int, bytes]]]:
    """Check the container (header, checksums, layout), then the contents."""

    def fail(problem: str) -> ProgramFormatError:
        return ProgramFormatError(f"{source}: {problem}")

    manifest, view, start, size = read_container(
        data, MAGIC, FORMAT_VERSION, "program", "recompile the model with `tessera compile`", fail
    )
    sections = manifest.pop("sections", None)
    if not isinstance(sections, dict) or set(sections) != set(SECTIONS):
        raise fail(f"corrupted: the manifest's section table must describe {list(SECTIONS)}")
    bodies = read_sections(view[start:size], sections, SECTIONS, fail)

    code = bodies["instructions"]
    if len(code) % 8:
        raise fail(f"corrupted: instruction section length {len(code)} is not a multiple of 8")
    words = np.frombuffer(code, dtype="<u8").astype(np.uint64)

    table = manifest.pop("dram_segments", None)
    if not isinstance(table, list):
        raise fail("corrupted: the manifest has no DRAM segment table")
    blob = bodies["dram"]
    segments = []
    offset = 0
    for i, entry in enumerate(table):
        if not (
            isinstance(entry, dict)
            and all(_is_uint(entry.get(key)) for key in ("address", "offset", "length"))
        ):
            raise fail(f"corrupted: malformed DRAM segment table entry {i}")
        if entry["offset"] != offset:
            raise fail(
                f"corrupted: DRAM segment {i} starts at offset {entry['offset']} of the DRAM"
                f" image section, expected {offset}"
            )
        offset += entry["length"]
        if offset > len(blob):
            raise fail(f"corrupted: DRAM segment {i} runs past the end of the DRAM image section")
        segments.append((entry["address"], bytes(blob[entry["offset"] : offset])))
    if offset != len(blob):
        raise fail(f"corrupted: {len(blob) - offset} bytes of the DRAM image are in no segment")

    _check_contents(manifest, words, segments, source)
    return manifest, words, segments
