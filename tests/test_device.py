"""The device API: backend registry, one model per device, bounded queues, pools, cycles,
and devices in worker processes (bit-exact, crash handling, concurrency, CPU shares)."""

from __future__ import annotations

import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serve_helpers import (
    TINY_SPEC,
    GatedBackend,
    float_input,
    real_tiny_package,
    tiny_package,
)

from tessera.errors import TesseraError
from tessera.runtime.device import (
    DeviceBusyError,
    DeviceError,
    DevicePool,
    DeviceUnavailableError,
    QueueFullError,
    backends,
    default_process,
    model_cycles,
    open_device,
    register_backend,
)
from tessera.runtime.memory import MALLOC_ENV, keep_freed_memory
from tessera.runtime.procdevice import cpu_share, default_threads
from tessera.sim.run import run_program

pytestmark = pytest.mark.usefixtures("gated")


def direct(pkg, x: np.ndarray) -> np.ndarray:
    return run_program(pkg.program, {"images": x}, "sim").outputs["probs"]


def test_registry_names_and_errors() -> None:
    assert {"sim", "reference", "gated"} <= set(backends())
    with pytest.raises(DeviceError, match=r"unknown device backend 'board'.*available: .*sim"):
        open_device("board")
    with pytest.raises(DeviceError, match="already registered"):
        register_backend("sim", GatedBackend)


def test_plugin_backend_is_used_without_touching_callers() -> None:
    calls = []

    class Recording:
        name = "recording"

        def run(self, program, inputs):
            calls.append(sorted(inputs))
            out = run_program(program, inputs, "sim")
            return out.outputs, None  # counts no cycles: the cycle model fills in

    register_backend("recording", Recording, replace=True)
    pkg = tiny_package()
    with open_device("recording") as dev:
        dev.load(pkg)
        res = dev.run({"images": float_input()}, timeout=30)
    assert calls == [["images"]]
    assert res.cycles == model_cycles(pkg.program) > 0


def test_sim_device_outputs_cycles_and_latency() -> None:
    pkg = tiny_package()
    x = float_input(3)
    with open_device("sim") as dev:
        dev.load(pkg)
        res = dev.run({"images": x}, timeout=30)
        stats = dev.stats()
    sim = run_program(pkg.program, {"images": x}, "sim")
    np.testing.assert_array_equal(res.outputs["output_alias"], sim.outputs["probs"])
    assert res.cycles == sim.cycles
    assert res.npu_latency_s == pytest.approx(sim.cycles / pkg.program.config.clock_hz)
    assert res.run_s > 0 and res.queue_s >= 0
    assert stats.runs == 1 and stats.cycles == sim.cycles and stats.busy_seconds > 0
    assert stats.model == "tiny" and stats.backend == "sim"


def test_sim_device_runs_the_program_once_on_zeros_when_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loading warms the simulator up (its compiled kernels load on first use), so the
    first request does not pay for it; the warm-up is not a request."""
    import tessera.sim.run

    calls: list[tuple[Any, dict, str]] = []
    real = tessera.sim.run.run_program

    def spy(program: Any, feed: dict, backend: str = "sim", **kw: Any) -> Any:
        calls.append((program, feed, backend))
        return real(program, feed, backend, **kw)

    monkeypatch.setattr(tessera.sim.run, "run_program", spy)
    pkg = tiny_package()
    with open_device("sim") as dev:
        dev.load(pkg)
        assert len(calls) == 1
        program, feed, backend = calls[0]
        assert program is pkg.program and backend == "sim"
        (info,) = pkg.program.manifest["inputs"]
        assert list(feed) == [info["name"]] and not feed[info["name"]].any()
        assert list(feed[info["name"]].shape) == list(info["shape"])
        assert dev.stats().runs == 0
    with open_device("reference") as dev:
        dev.load(pkg)
    assert len(calls) == 1  # the reference needs no warm-up


def test_reference_backend_reports_cycle_model_cycles() -> None:
    pkg = tiny_package()
    with open_device("reference") as dev:
        dev.load(pkg)
        res = dev.run({"images": float_input()}, timeout=30)
    np.testing.assert_array_equal(res.outputs["output_alias"], direct(pkg, float_input()))
    assert res.cycles == model_cycles(pkg.program)


def test_one_model_per_device() -> None:
    with open_device("sim") as dev:
        dev.load(tiny_package())
        with pytest.raises(
            DeviceBusyError, match=r"already runs model 'tiny'.*one model per device"
        ):
            dev.load(tiny_package(name="other"))
        dev.unload()
        dev.load(tiny_package(name="other"))
        assert dev.package.name == "other"


def test_no_model_and_closed_device_refuse() -> None:
    dev = open_device("sim")
    with pytest.raises(DeviceError, match="no model loaded"):
        dev.submit({"images": float_input()})
    dev.close()
    with pytest.raises(DeviceError, match="closed"):
        dev.load(tiny_package())


def test_errors_reach_the_caller_and_the_device_keeps_working() -> None:
    pkg = tiny_package()
    with open_device("sim") as dev:
        dev.load(pkg)
        with pytest.raises(TesseraError, match="shape"):
            dev.run({"images": np.zeros((1, 5, 5, 3), np.float32)}, timeout=30)
        assert dev.stats().errors == 1
        res = dev.run({"images": float_input()}, timeout=30)
        assert res.outputs["output_alias"].shape == (1, 10)


def test_bounded_queue_refuses_at_once_with_retry_advice() -> None:
    pkg = tiny_package()
    with open_device("gated", queue_depth=2) as dev:
        dev.load(pkg)
        running = dev.submit({"images": float_input(0)})
        assert GatedBackend.entered.acquire(timeout=10)  # first job is on the NPU
        queued = [dev.submit({"images": float_input(i)}) for i in (1, 2)]
        with pytest.raises(QueueFullError, match="queue is full") as info:
            dev.submit({"images": float_input(3)})
        assert info.value.retry_after_s > 0
        assert dev.pending() == 3
        GatedBackend.gate.set()
        results = [f.result(30) for f in (running, *queued)]
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs["output_alias"], direct(pkg, float_input(i)))


def test_close_without_drain_cancels_queued_requests() -> None:
    dev = open_device("gated", queue_depth=4)
    dev.load(tiny_package())
    running = dev.submit({"images": float_input()})
    assert GatedBackend.entered.acquire(timeout=10)
    queued = dev.submit({"images": float_input()})
    closer = threading.Thread(target=dev.close, kwargs={"drain": False, "timeout": 10})
    closer.start()
    for _ in range(200):
        if queued.cancelled():
            break
        threading.Event().wait(0.01)
    assert queued.cancelled()
    GatedBackend.gate.set()
    closer.join(10)
    assert running.result(10).outputs["output_alias"].shape == (1, 10)


def test_pool_spreads_load_and_matches_every_response_to_its_request() -> None:
    pkg = tiny_package()
    inputs = [float_input(100 + i) for i in range(24)]
    expected = [direct(pkg, x) for x in inputs]
    with DevicePool(pkg, backend="sim", devices=2, queue_depth=16) as pool:
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda x: pool.run({"images": x}, timeout=60), inputs))
        stats = pool.stats()
    for r, e in zip(results, expected, strict=True):
        np.testing.assert_array_equal(r.outputs["output_alias"], e)
    assert [s.device_id for s in stats] == ["sim:0", "sim:1"]
    assert sum(s.runs for s in stats) == 24
    assert all(s.runs > 0 for s in stats), "both devices should have taken work"


def test_pool_full_only_when_every_device_is_full() -> None:
    pkg = tiny_package()
    with DevicePool(pkg, backend="gated", devices=2, queue_depth=1) as pool:
        futures = [pool.submit({"images": float_input(i)}) for i in range(2)]
        for _ in range(2):
            assert GatedBackend.entered.acquire(timeout=10)
        futures += [pool.submit({"images": float_input(i)}) for i in (2, 3)]
        with pytest.raises(QueueFullError, match="all 2 device queues of model 'tiny' are full"):
            pool.submit({"images": float_input(4)})
        GatedBackend.gate.set()
        for i, f in enumerate(futures):
            np.testing.assert_array_equal(
                f.result(30).outputs["output_alias"], direct(pkg, float_input(i))
            )


def test_pool_arguments_are_checked() -> None:
    with pytest.raises(DeviceError, match="positive"):
        DevicePool(tiny_package(), devices=0)
    with pytest.raises(DeviceError, match="distinct"):
        DevicePool(tiny_package(), device_ids=["sim:0", "sim:0"])
    with pytest.raises(DeviceError, match="queue depth"):
        open_device("sim", queue_depth=0)


# --------------------------------------------------------------------------- process devices
# A process device runs the package in a worker process of its own; everything below must
# finish within bounded waits (every result() has a timeout, every gate gives up).


@dataclass
class GatedPackage:
    """The tiny package, but ``run`` (in the worker) waits for a file: lets a test kill the
    worker while it is known to be running a request. Pickled to the worker by reference
    to this module, which the worker imports from the test's ``sys.path``."""

    inner: Any
    folder: str
    name: str = "tiny"
    input_name: str = "images"
    output_names: list[str] = field(default_factory=lambda: ["output_alias"])

    @property
    def program(self) -> Any:
        return self.inner.program

    def run(self, inputs: dict[str, np.ndarray], npu: Any = None) -> dict[str, np.ndarray]:
        folder = Path(self.folder)
        (folder / f"started.{os.getpid()}").touch()
        end = time.monotonic() + 30
        while not (folder / "go").exists() and time.monotonic() < end:
            time.sleep(0.01)
        return self.inner.run(inputs, npu)


@dataclass
class ExitingPackage:
    """A package whose run ends the worker process (a crash in native code, say)."""

    inner: Any
    name: str = "tiny"
    input_name: str = "images"
    output_names: list[str] = field(default_factory=lambda: ["output_alias"])
    preprocess: Any = TINY_SPEC

    @property
    def program(self) -> Any:
        return self.inner.program

    def run(self, inputs: dict[str, np.ndarray], npu: Any = None) -> dict[str, np.ndarray]:
        os._exit(3)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("which", ["package", "stand-in"])
def test_process_device_is_bit_exact_with_the_in_process_one(which: str) -> None:
    # A real Package travels as its .tpkg bytes, the stand-in pickled: both paths.
    pkg = real_tiny_package() if which == "package" else tiny_package()
    inputs = [float_input(200 + i) for i in range(4)]
    with open_device("sim") as local, open_device("sim", process=True) as remote:
        local.load(pkg)
        remote.load(pkg)
        pid = remote.stats().worker_pid
        assert pid is not None and pid != os.getpid() and _alive(pid)
        for x in inputs:
            a = local.run({"images": x}, timeout=30)
            b = remote.run({"images": x}, timeout=30)
            assert sorted(a.outputs) == sorted(b.outputs) == ["output_alias"]
            for name in a.outputs:
                assert a.outputs[name].dtype == b.outputs[name].dtype
                assert a.outputs[name].tobytes() == b.outputs[name].tobytes()
            assert a.cycles == b.cycles > 0
            assert b.npu_latency_s == a.npu_latency_s
        stats = remote.stats()
    assert stats.process and stats.runs == 4 and stats.cycles == 4 * a.cycles
    assert stats.state == "ok" and stats.restarts == 0
    assert _wait_for(lambda: not _alive(pid)), "close() must stop the worker"


def test_process_device_returns_package_errors_and_keeps_its_worker() -> None:
    with open_device("sim", process=True) as dev:
        dev.load(real_tiny_package())
        pid = dev.stats().worker_pid
        with pytest.raises(TesseraError, match=r"must have shape \[1, 16, 16, 3\]"):
            dev.run({"images": np.zeros((1, 5, 5, 3), np.float32)}, timeout=30)
        res = dev.run({"images": float_input()}, timeout=30)
        assert res.outputs["output_alias"].shape == (1, 10)
        stats = dev.stats()
    assert stats.errors == 1 and stats.worker_pid == pid and stats.restarts == 0


def test_killed_worker_fails_its_request_clearly_and_is_restarted(tmp_path: Path) -> None:
    pkg = tiny_package()
    gated = GatedPackage(pkg, str(tmp_path))
    with open_device("sim", process=True) as dev:
        dev.load(gated)
        pid = dev.stats().worker_pid
        running = dev.submit({"images": float_input(1)})
        queued = dev.submit({"images": float_input(2)})
        assert _wait_for(lambda: (tmp_path / f"started.{pid}").exists())
        assert dev.kill_worker() == pid
        (tmp_path / "go").touch()  # the restarted worker runs freely
        with pytest.raises(DeviceUnavailableError) as info:
            running.result(30)
        message = str(info.value)
        assert f"worker process {pid} was killed by SIGKILL while running a request" in message
        assert "retry" in message and info.value.retry_after_s > 0
        # The queued request runs on the new worker, with the right answer.
        np.testing.assert_array_equal(
            queued.result(30).outputs["output_alias"], direct(pkg, float_input(2))
        )
        stats = dev.stats()
        assert stats.restarts == 1 and stats.state == "ok" and stats.errors == 1
        assert stats.worker_pid not in (None, pid)
        assert not _alive(pid)


def test_worker_dead_while_idle_is_replaced_before_the_next_request() -> None:
    pkg = real_tiny_package()
    with open_device("sim", process=True) as dev:
        dev.load(pkg)
        expected = dev.run({"images": float_input(5)}, timeout=30).outputs["output_alias"]
        pid = dev.kill_worker()
        res = dev.run({"images": float_input(5)}, timeout=30)
        assert res.outputs["output_alias"].tobytes() == expected.tobytes()
        assert dev.stats().restarts == 1 and dev.stats().worker_pid != pid


def test_worker_that_keeps_dying_fails_the_device() -> None:
    dev = open_device("sim", process=True, device_id="dying")
    dev.max_restarts = 1
    dev.load(ExitingPackage(tiny_package()))
    try:
        for _ in range(2):
            with pytest.raises(DeviceUnavailableError, match="exited with status 3"):
                dev.run({"images": float_input()}, timeout=30)
        assert dev.stats().state == "failed"
        with pytest.raises(DeviceUnavailableError, match=r"dying failed: .*died 2 times in a row"):
            dev.submit({"images": float_input()})
    finally:
        dev.close(timeout=10)


def test_pool_routes_around_a_failed_device() -> None:
    pkg = real_tiny_package()
    with DevicePool(pkg, devices=2, process=True) as pool:
        pool.devices[0].max_restarts = 0
        pool.devices[0].kill_worker()
        outcomes = []
        for i in range(6):  # sequential: the least loaded is sim:0 while it takes work
            try:
                outcomes.append(pool.run({"images": float_input(i)}, timeout=30).device_id)
            except DeviceUnavailableError as exc:
                outcomes.append(str(exc))
        assert "device sim:0 failed" in outcomes[0]
        assert outcomes[1:] == ["sim:1"] * 5
        assert [s.state for s in pool.stats()] == ["failed", "ok"]


def test_pool_with_every_device_failed_is_unavailable_and_service_says_so() -> None:
    from tessera.runtime.service import Code, ModelService, ServiceError

    pkg = ExitingPackage(tiny_package())
    with DevicePool(pkg, devices=2, process=True) as pool:
        for dev in pool.devices:
            dev.max_restarts = 0
        service = ModelService(pkg, pool)
        for _ in range(2):  # one crash per device, each then fails
            with pytest.raises(ServiceError) as info:
                service.predict({"images": float_input()}, timeout=30)
            assert info.value.code is Code.UNAVAILABLE
            assert "worker process" in info.value.message
        assert [s.state for s in pool.stats()] == ["failed", "failed"]
        with pytest.raises(ServiceError, match="every device of model 'tiny' has failed") as info:
            service.predict({"images": float_input()}, timeout=30)
        assert info.value.code is Code.UNAVAILABLE and info.value.retry_after_s


def test_two_process_devices_run_concurrently_and_match_every_response() -> None:
    pkg = real_tiny_package()
    inputs = [float_input(300 + i) for i in range(32)]
    with open_device("sim") as local:
        local.load(pkg)
        expected = [local.run({"images": x}, timeout=30).outputs["output_alias"] for x in inputs]
    with DevicePool(pkg, devices=2, queue_depth=32) as pool:  # sim, 2 devices: processes
        assert pool.process
        pids = [s.worker_pid for s in pool.stats()]
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda x: pool.run({"images": x}, timeout=60), inputs))
        stats = pool.stats()
    for r, e in zip(results, expected, strict=True):
        assert r.outputs["output_alias"].tobytes() == e.tobytes()
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert sum(s.runs for s in stats) == 32 and all(s.runs > 0 for s in stats)
    assert {r.device_id for r in results} == {"sim:0", "sim:1"}
    assert all(_wait_for(lambda p=p: not _alive(p)) for p in pids)


def test_process_workers_share_the_cpus_instead_of_oversubscribing() -> None:
    threads = default_threads(2)
    with DevicePool(real_tiny_package(), devices=2) as pool:
        for i, s in enumerate(pool.stats()):
            env = dict(
                item.split("=", 1)
                for item in Path(f"/proc/{s.worker_pid}/environ").read_text().split("\0")
                if "=" in item
            )
            for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                assert env[key] == str(threads)
            for key, value in MALLOC_ENV.items():  # freed memory kept for the next request
                assert env[key] == os.environ.get(key, value)
            # The simulator's band pool sizes itself from the affinity.
            assert sorted(os.sched_getaffinity(s.worker_pid)) == cpu_share(i, threads)
            assert len(cpu_share(i, threads)) == min(threads, len(os.sched_getaffinity(0)))
    assert default_process("sim", 2) and default_process("reference", 3)
    assert not default_process("sim", 1) and not default_process("gated", 2)


def test_server_process_keeps_freed_memory() -> None:
    """glibc takes the thresholds the server sets at start; other C libraries are left be."""
    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_process_device_close_drains_queued_requests_then_stops_the_worker() -> None:
    pkg = real_tiny_package()
    dev = open_device("sim", process=True, queue_depth=8)
    dev.load(pkg)
    pid = dev.stats().worker_pid
    futures = [dev.submit({"images": float_input(i)}) for i in range(6)]
    dev.close(drain=True, timeout=30)
    assert all(f.done() and not f.cancelled() for f in futures)
    assert [f.result(0).outputs["output_alias"].shape for f in futures] == [(1, 10)] * 6
    assert _wait_for(lambda: not _alive(pid))
    with pytest.raises(DeviceError, match="closed"):
        dev.submit({"images": float_input()})


def test_unload_stops_the_worker_and_load_starts_a_new_one() -> None:
    with open_device("sim", process=True) as dev:
        dev.load(tiny_package())
        first = dev.stats().worker_pid
        dev.unload()
        assert dev.stats().worker_pid is None and _wait_for(lambda: not _alive(first))
        dev.load(tiny_package(name="other"))
        assert dev.stats().worker_pid not in (None, first)
        assert dev.run({"images": float_input()}, timeout=30).outputs["output_alias"].shape == (
            1,
            10,
        )


def test_package_that_cannot_reach_a_worker_is_refused_clearly() -> None:
    pkg = tiny_package()
    unpicklable = GatedPackage(pkg, "")
    unpicklable.lock = threading.Lock()  # type: ignore[attr-defined]
    with open_device("sim", process=True) as dev:
        with pytest.raises(TesseraError, match="cannot be sent to a device worker process"):
            dev.load(unpicklable)
        dev.load(pkg)  # still usable
        assert dev.run({"images": float_input()}, timeout=30).outputs["output_alias"].shape == (
            1,
            10,
        )
