"""The ``tessera`` command line.

Each sub-command lives next to the code it drives and registers itself here through a
``register(subparsers)`` function, so this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tessera import __version__
from tessera.errors import TesseraError

# Modules that contribute sub-commands, in the order they appear in ``tessera --help``.
_COMMAND_MODULES = (
    "tessera.zoo",
    "tessera.compiler.cli",
    "tessera.sim.cli",
    "tessera.bench",
    "tessera.convert",
    "tessera.hdl.cli",
    "tessera.serve_cli",
    "tessera.heads",
    "tessera.package",
    "tessera.score",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="Compile ONNX models for the tessera soft NPU, simulate, report and benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"tessera {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TesseraError as exc:
        print(f"tessera {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
