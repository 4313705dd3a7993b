"""Exceptions meant for the user.

Every error the toolchain raises on bad input derives from :class:`TesseraError`; the CLI
prints its message without a traceback and exits with status 2, so the message must say
what was wrong, where, and what is accepted instead.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Base class of all user-facing errors."""


class UnsupportedModelError(TesseraError):
    """The ONNX graph uses an operator, attribute or shape the compiler cannot lower."""


class ModelLoadError(TesseraError):
    """A model file is missing, truncated or not valid ONNX."""


class CapacityError(TesseraError):
    """The compiled model does not fit the chosen NPU configuration (DRAM, buffers, ...)."""


class ProgramFormatError(TesseraError):
    """A ``.tsr`` program file is corrupted, truncated or of another format version."""


class ImageDecodeError(TesseraError):
    """Image bytes are empty, corrupt, truncated, or not a JPEG or PNG image."""
