"""The wheel carries every Python package of the checkout (an editable install, which CI
uses, finds a package that ``packages`` leaves out, so only a check like this notices)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    # tessera.hdl.testbench is what `tessera run --backend rtl` imports
    assert "tessera.hdl.testbench" in found
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
