"""Test-session policy shared by every test file.

Two levels of expensive cases, each skipped unless the run asks for it:

* ``slow``: whole large networks on the simulator (exports of up to 10 GB, minutes each);
  run by ``-m slow`` (any marker expression naming ``slow``) or ``TESSERA_ALL=1``. CI sets
  ``TESSERA_ALL=1``.
* ``huge``: whole networks through the RTL simulation (up to hours); only by a marker
  expression naming ``huge``, e.g. ``-m "huge or not huge"`` to run everything.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("markexpr") or ""
    run_slow = "slow" in markexpr or bool(os.environ.get("TESSERA_ALL"))
    run_huge = "huge" in markexpr
    skip_slow = pytest.mark.skip(reason="slow (whole large network): -m slow or TESSERA_ALL=1")
    skip_huge = pytest.mark.skip(reason="huge (whole network in RTL): -m huge")
    for item in items:
        if "huge" in item.keywords and not run_huge:
            item.add_marker(skip_huge)
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
