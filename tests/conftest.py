"""Test-session policy shared by every test file.

Expensive cases are marked ``slow`` (whole large networks on the simulator, exports of up
to 10 GB, the 85F RTL build and whole ResNet-50 through it: minutes each) and skipped unless
the run asks for them: ``-m slow`` (any marker expression naming ``slow``) or
``TESSERA_ALL=1``, which CI sets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("markexpr") or ""
    run_slow = "slow" in markexpr or bool(os.environ.get("TESSERA_ALL"))
    skip_slow = pytest.mark.skip(reason="slow (whole large network): -m slow or TESSERA_ALL=1")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


# --------------------------------------------------------------------------- serving tests
# Shared by the device, service and client tests (``tests/serve_helpers.py`` has the pieces);
# imported inside the fixtures so that other tests do not load them.


@pytest.fixture(scope="module")
def pkg() -> Any:
    """The tiny classifier as a real :class:`tessera.package.Package` (head on the host)."""
    from serve_helpers import real_tiny_package

    return real_tiny_package()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A self-signed CA and a server chain and key for localhost, as PEM files."""
    from serve_helpers import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def gated() -> Iterator[None]:
    """The ``gated`` backend registered with a fresh, closed gate; opened afterwards, so no
    run of a failed test stays blocked (``pytestmark = pytest.mark.usefixtures("gated")``).
    The simulator behind it is warmed first: the tests time what the gate releases."""
    from serve_helpers import GatedBackend, register_gated, warm_simulator

    warm_simulator()
    register_gated()
    GatedBackend.reset()
    yield
    GatedBackend.gate.set()
