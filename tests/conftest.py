"""Test-session policy shared by every test file.

Cases marked ``slow`` (whole large networks: exports of up to 10 GB, minutes each) are
skipped unless the run asks for them, by ``-m slow`` (or any marker expression naming
``slow``) or by ``TESSERA_ALL=1``; the README says how to run everything.
"""

from __future__ import annotations

import os

import pytest


def _slow_requested(config: pytest.Config) -> bool:
    return "slow" in (config.getoption("markexpr") or "") or bool(os.environ.get("TESSERA_ALL"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _slow_requested(config):
        return
    skip = pytest.mark.skip(reason="slow (whole large network); run with -m slow or TESSERA_ALL=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
