"""tessera.runtime: host side of a run, devices, the scoring service and its client.

The public names are loaded on first use, so importing :mod:`tessera.runtime.host` (which
every simulator run does) does not pull in gRPC.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PredictionClient": "tessera.runtime.client",
    "PredictionError": "tessera.runtime.client",
    "open_device": "tessera.runtime.device",
    "register_backend": "tessera.runtime.device",
    "Device": "tessera.runtime.device",
    "DevicePool": "tessera.runtime.device",
    "Server": "tessera.runtime.server",
    "ServeOptions": "tessera.runtime.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tessera.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
