"""The device API: backend registry, one model per device, bounded queues, pools, cycles."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import GatedBackend, float_input, register_gated, tiny_package

from tessera.errors import TesseraError
from tessera.runtime.device import (
    DeviceBusyError,
    DeviceError,
    DevicePool,
    QueueFullError,
    backends,
    model_cycles,
    open_device,
    register_backend,
)
from tessera.sim.run import run_program


@pytest.fixture(autouse=True)
def _gate():
    register_gated()
    GatedBackend.reset()
    yield
    GatedBackend.gate.set()


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
