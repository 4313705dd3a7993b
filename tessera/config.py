"""The NPU configuration: the one object every part of tessera is specialised by.

Brainwave fixes its native dimension and precision per bitstream ("synthesis
specialisation"); so do we. The compiler tiles for it, the simulator and cycle model
execute with it, the HDL is elaborated from it and the program file records it, so a
program can never run on a build it was not compiled for.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from tessera.errors import TesseraError


@dataclass(frozen=True)
class NPUConfig:
    """Every build-time parameter of one NPU.

    Attributes are grouped by the unit they size. Derived quantities are properties so
    they cannot disagree with the parameters.
    """

    name: str
    #: Native dimension N: vector length, BFP block size along channels, MVU dot-product width.
    native_dim: int = 16
    #: Tile engines, each holding one N x N weight tile and working on its own input block.
    tile_engines: int = 1
    #: Dot-product lanes per tile engine (rows of a tile computed per cycle).
    lanes: int = 8
    #: Values of a vector the vector pipeline (normalizers, MFU slots, re-block) handles per
    #: cycle; a vector passes it in ``N / vector_lanes`` phases. Its per-lane circuits are
    #: most of the NPU's logic, so fewer lanes than the MVU's shrink it, at no cost where a
    #: block takes at least that many beats to compute (the sweep spaces blocks that take
    #: fewer). 0: as many as ``lanes``.
    vector_lanes: int = 0
    #: Storage mantissa width m (sign included) of activations and weights.
    mantissa_bits: int = 8
    #: Mantissa width (sign included) of the multifunction units' wide vectors.
    mfu_mantissa_bits: int = 16
    #: Activation exponent window D: blocks more than D below the tensor's largest
    #: exponent are shifted onto the tensor grid when read by the MVU.
    act_exp_window: int = 16
    #: Weight exponent window Dw, applied per layer by the compiler.
    weight_exp_window: int = 8
    #: Accumulator width in bits (sign included); the ECP5 ALU54B holds 54.
    accumulator_bits: int = 54
    #: Vector register file entries (N-vectors, wide format) for constants such as bias.
    vrf_depth: int = 512
    #: Tile buffer capacity in N x N tiles, per half (it is double buffered).
    tile_buffer_tiles: int = 512
    #: On-chip activation buffer in bytes: holds the kernel rows a sweep needs, and a whole
    #: input slice when it fits, so the chains of one layer read it from DRAM only once.
    act_buffer_bytes: int = 96 * 1024
    #: Scalar (exponent / control) registers.
    scalar_regs: int = 32
    #: Board DRAM size in bytes.
    dram_bytes: int = 32 * 1024 * 1024
    #: Sustained DRAM bandwidth in bytes per second (ULX3S: 16-bit SDR SDRAM at 125 MHz,
    #: 250 MB/s peak, 80 % after refresh and row switches).
    dram_bytes_per_s: float = 200e6
    #: Core clock in Hz.
    clock_hz: float = 100e6
    #: FPGA resources the preset is sized for (informational; synthesis reports the truth).
    device: str = "LFE5U-85F"
    dsp_blocks: int = 156
    ebr_blocks: int = 208

    def __post_init__(self) -> None:
        problems = []
        if self.native_dim < 2 or self.native_dim & (self.native_dim - 1):
            problems.append(f"native_dim must be a power of two >= 2, got {self.native_dim}")
        if self.lanes < 1 or self.native_dim % self.lanes:
            problems.append(f"lanes ({self.lanes}) must divide native_dim ({self.native_dim})")
        if self.vector_lanes == 0:
            object.__setattr__(self, "vector_lanes", self.lanes)
        if self.vector_lanes < 1 or self.lanes % self.vector_lanes:
            problems.append(f"vector_lanes ({self.vector_lanes}) must divide lanes ({self.lanes})")
        if self.tile_engines < 1:
            problems.append("tile_engines must be >= 1")
        if not 3 <= self.mantissa_bits <= 16:
            problems.append(f"mantissa_bits must be 3..16, got {self.mantissa_bits}")
        # Wide constants are stored as int16 (layout.pack_consts) and the MFU multiplier
        # takes 18-bit operands, so 16 bits is the ceiling.
        if not self.mantissa_bits <= self.mfu_mantissa_bits <= 16:
            problems.append("mfu_mantissa_bits must be in mantissa_bits..16")
        if problems:
            raise TesseraError(f"invalid NPU config {self.name!r}: " + "; ".join(problems))

    @property
    def macs_per_cycle(self) -> int:
        """Peak multiply-accumulates per cycle of the MVU."""
        return self.tile_engines * self.lanes * self.native_dim

    @property
    def dram_bytes_per_cycle(self) -> float:
        return self.dram_bytes_per_s / self.clock_hz

    @property
    def mantissa_bytes(self) -> int:
        """Bytes one stored mantissa takes in DRAM (int8 up to 8 bits, else int16)."""
        return 1 if self.mantissa_bits <= 8 else 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NPUConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TesseraError(f"unknown NPU config fields {unknown}")
        return cls(**data)

    def fingerprint(self) -> str:
        """A stable text form, used to key caches and to check program compatibility."""
        return json.dumps(self.to_dict(), sort_keys=True)


#: Named presets. The ECP5 ones are sized by the DSP and block-RAM budget of their device:
#: MVU multipliers plus one MFU multiplier per lane must fit the MULT18X18D count.
PRESETS: dict[str, NPUConfig] = {
    # 128 MVU + 2 MFU multipliers (a vector in 8 phases of 2 values: the MVU gives a block
    # every 8 cycles or slower on every ResNet / DenseNet layer) = 130 of 156 MULT18X18D
    # (132 in synthesis: the set-up stage's multiplier and one more); 32 MB 16-bit SDRAM.
    # Block RAM:
    # the tile buffer (2 x 384 tiles: a 3x3 conv over 512 channels needs 288 per output
    # block) takes 102 DP16KD, so the activation buffer gets 7 rows of 1K-entry blocks
    # (7168 entries of 16 mantissas + 1 exponent, 56 + 4 DP16KD): 200 of 208 in all.
    "ulx3s-85f": NPUConfig(
        name="ulx3s-85f",
        native_dim=16,
        lanes=8,
        vector_lanes=2,
        tile_buffer_tiles=384,
        act_buffer_bytes=7168 * 17,
        dram_bytes=32 * 1024 * 1024,
        dram_bytes_per_s=200e6,
        clock_hz=100e6,
        device="LFE5U-85F",
        dsp_blocks=156,
        ebr_blocks=208,
    ),
    # 64 MVU + 8 MFU = 72 of 72 MULT18X18D.
    "ulx3s-45f": NPUConfig(
        name="ulx3s-45f",
        native_dim=8,
        lanes=8,
        tile_buffer_tiles=160,
        act_buffer_bytes=48 * 1024,
        vrf_depth=256,
        dram_bytes=32 * 1024 * 1024,
        dram_bytes_per_s=200e6,
        clock_hz=100e6,
        device="LFE5U-45F",
        dsp_blocks=72,
        ebr_blocks=108,
    ),
    # 16 + 8 = 24 of 28 MULT18X18D.
    "ulx3s-25f": NPUConfig(
        name="ulx3s-25f",
        native_dim=8,
        lanes=2,
        tile_buffer_tiles=256,
        act_buffer_bytes=24 * 1024,
        vrf_depth=256,
        dram_bytes=32 * 1024 * 1024,
        dram_bytes_per_s=200e6,
        clock_hz=100e6,
        device="LFE5U-25F",
        dsp_blocks=28,
        ebr_blocks=56,
    ),
    # A projection to a Brainwave-class device (Stratix 10 scale): 32 tile engines of
    # 32 x 32, 8 GB of HBM-class memory. Used for what-if reports, never synthesized here.
    "large": NPUConfig(
        name="large",
        native_dim=32,
        tile_engines=32,
        lanes=32,
        tile_buffer_tiles=16384,
        act_buffer_bytes=8 * 1024 * 1024,
        vrf_depth=4096,
        dram_bytes=8 * 1024 * 1024 * 1024,
        dram_bytes_per_s=64e9,
        clock_hz=250e6,
        device="projection",
        dsp_blocks=5760,
        ebr_blocks=11721,
    ),
}

DEFAULT_PRESET = "ulx3s-85f"


def get_config(name: str) -> NPUConfig:
    """Look up a preset by name, with an error that lists the presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise TesseraError(
            f"unknown NPU config {name!r}; presets are: {', '.join(PRESETS)}"
        ) from None
