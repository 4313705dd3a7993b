"""tessera: an open Brainwave-style soft NPU toolchain for Lattice ECP5."""

__version__ = "0.1.0"
