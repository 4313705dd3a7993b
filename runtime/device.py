"""The device API: one NPU holding one model, a bounded queue in front of it, pools of them.

Brainwave runs one model per FPGA and scales a service out by putting several FPGAs behind
it. The same shape here: a :class:`Device` is one NPU (the simulator today; the RTL
simulation and a board later) that loads one package at a time and executes requests one
after another on its own worker thread, because the hardware has one instruction stream.
Requests wait in a bounded queue in front of it: when the queue is full, :meth:`submit`
fails at once with :class:`QueueFullError` instead of letting latency grow without bound,
and the service turns that into UNAVAILABLE with retry advice. A :class:`DevicePool` puts N
devices behind one model and sends each request to the least loaded one.

Backends register by name (:func:`register_backend`), so ``rtl`` and ``board`` plug in
without touching callers: ``open_device("rtl")`` works as soon as some module has
registered a factory for it.

Every result carries the NPU cycle count and the latency it implies at the build's
clock: from the simulator's own count when the backend counts cycles, else from the cycle
model (:func:`tessera.sim.cycles.estimate`), so the numbers mean the same on every
backend.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from tessera.errors import TesseraError
from tessera.program import Program

NPUFunction = Callable[[Program, dict[str, np.ndarray]], dict[str, np.ndarray]]


class DeviceError(TesseraError):
    """A device cannot take the request (closed, no model loaded, model already loaded)."""


class DeviceBusyError(DeviceError):
    """The device already holds a model: one model per device, as on Brainwave."""


class QueueFullError(DeviceError):
    """Every device queue of the model is full; the caller should retry after a pause."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        #: A pause after which a slot has probably freed up (queue depth x recent run time).
        self.retry_after_s = retry_after_s


@runtime_checkable
class PackageLike(Protocol):
    """What a device needs of a package (:class:`tessera.package.Package` provides it)."""

    name: str
    program: Program
    input_name: str
    output_names: list[str]

    def run(
        self, inputs: dict[str, np.ndarray], npu: NPUFunction | None = None
    ) -> dict[str, np.ndarray]: ...


# --------------------------------------------------------------------------- backends
class Backend(Protocol):
    """Executes a compiled program; one instance per device, used from one thread at a time."""

    name: str

    def run(
        self, program: Program, inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], int | None]:
        """Outputs keyed by the program's output names, and the cycles counted (or None)."""
        ...


class _RunProgramBackend:
    """Backends of :func:`tessera.sim.run.run_program` (``sim``, ``reference``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(
        self, program: Program, inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], int | None]:
        from tessera.sim.run import run_program

        result = run_program(program, inputs, self.name)
        return result.outputs, result.cycles


_BACKENDS: dict[str, Callable[[], Backend]] = {
    "sim": lambda: _RunProgramBackend("sim"),
    "reference": lambda: _RunProgramBackend("reference"),
}
_BACKENDS_LOCK = threading.Lock()


def register_backend(name: str, factory: Callable[[], Backend], *, replace: bool = False) -> None:
    """Make ``open_device(name)`` work; ``factory()`` builds one backend instance per device.

    Registering a taken name is refused unless ``replace`` is set, so two plug-ins cannot
    silently shadow each other.
    """
    if not name or not isinstance(name, str):
        raise DeviceError(f"backend name must be a non-empty string, got {name!r}")
    with _BACKENDS_LOCK:
        if name in _BACKENDS and not replace:
            raise DeviceError(f"backend {name!r} is already registered")
        _BACKENDS[name] = factory


def backends() -> list[str]:
    """Registered backend names, sorted."""
    with _BACKENDS_LOCK:
        return sorted(_BACKENDS)


def _make_backend(name: str) -> Backend:
    with _BACKENDS_LOCK:
        factory = _BACKENDS.get(name)
    if factory is None:
        raise DeviceError(f"unknown device backend {name!r}; available: {', '.join(backends())}")
    return factory()


# Keyed by id(): Program defines __eq__ (so it is unhashable); the weak reference tells a
# live entry from one whose id was reused by a new object.
_MODEL_CYCLES: dict[int, tuple[weakref.ref[Program], int]] = {}
_MODEL_CYCLES_LOCK = threading.RLock()  # re-entrant: the weakref callback may run in GC


def model_cycles(program: Program) -> int:
    """The cycle model's total for ``program`` (computed once per program object)."""
    with _MODEL_CYCLES_LOCK:
        entry = _MODEL_CYCLES.get(id(program))
    if entry is not None and entry[0]() is program:
        return entry[1]
    from tessera.sim.cycles import estimate

    cycles = round(estimate(program.instructions, program.config).finish())
    key = id(program)

    def forget(_: object) -> None:
        with _MODEL_CYCLES_LOCK:
            if key in _MODEL_CYCLES and _MODEL_CYCLES[key][0]() is None:
                del _MODEL_CYCLES[key]

    with _MODEL_CYCLES_LOCK:
        _MODEL_CYCLES[key] = (weakref.ref(program, forget), cycles)
    return cycles


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class DeviceResult:
    """Outputs of one request and what it cost."""

    outputs: dict[str, np.ndarray]
    #: NPU cycles of the run (summed if the package ran several programs).
    cycles: int
    #: ``cycles`` at the build's clock: what the NPU would take in hardware.
    npu_latency_s: float
    #: Wall time the device spent on the request (simulation plus host stages).
    run_s: float
    #: Time the request waited in the device queue.
    queue_s: float
    device_id: str


@dataclass
class DeviceStats:
    """Counters of one device, read by the metrics endpoint."""

    device_id: str
    backend: str
    model: str | None
    queued: int
    busy: bool
    runs: int
    errors: int
    busy_seconds: float
    cycles: int


@dataclass
class _Job:
    inputs: dict[str, np.ndarray]
    future: Future[DeviceResult]
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()
_ids = itertools.count()


class Device:
    """One NPU: holds one package, runs its requests in order on a worker thread.

    ``queue_depth`` bounds the requests waiting (the one running does not count), so a
    burst larger than the device can absorb is refused quickly instead of queuing for
    seconds.
    """

    def __init__(
        self, backend: str = "sim", *, device_id: str | None = None, queue_depth: int = 8
    ) -> None:
        if not isinstance(queue_depth, int) or queue_depth < 1:
            raise DeviceError(f"queue depth must be a positive integer, got {queue_depth!r}")
        self.backend_name = backend
        self._backend = _make_backend(backend)
        self.device_id = device_id or f"{backend}:{next(_ids)}"
        self.queue_depth = queue_depth
        self._queue: queue.Queue[_Job | object] = queue.Queue(maxsize=queue_depth)
        self._lock = threading.Lock()
        # Signalled whenever a job finishes, so drain() waits without polling.
        self._idle = threading.Condition(self._lock)
        self._outstanding = 0
        self._package: PackageLike | None = None
        self._closed = False
        self._busy = False
        self._runs = 0
        self._errors = 0
        self._busy_s = 0.0
        self._cycles = 0
        self._recent_run_s = 0.0
        self._thread = threading.Thread(
            target=self._work, name=f"tessera-device-{self.device_id}", daemon=True
        )
        self._thread.start()

    # -- model
    @property
    def package(self) -> PackageLike | None:
        return self._package

    def load(self, package: PackageLike) -> None:
        """Put ``package`` on the device; refused while another model is loaded."""
        if not isinstance(package, PackageLike):
            raise DeviceError(f"not a package: {type(package).__name__}")
        with self._lock:
            if self._closed:
                raise DeviceError(f"device {self.device_id} is closed")
            if self._package is not None:
                raise DeviceBusyError(
                    f"device {self.device_id} already runs model {self._package.name!r}; one "
                    "model per device: unload it first or use another device"
                )
            self._package = package

    def unload(self) -> None:
        """Remove the model once queued requests have run, freeing the device for another."""
        self.drain()
        with self._lock:
            self._package = None

    # -- requests
    def submit(self, inputs: dict[str, np.ndarray]) -> Future[DeviceResult]:
        """Queue one request; raises :class:`QueueFullError` at once if the queue is full."""
        future: Future[DeviceResult] = Future()
        with self._lock:
            if self._closed:
                raise DeviceError(f"device {self.device_id} is closed")
            if self._package is None:
                raise DeviceError(f"device {self.device_id} has no model loaded")
            try:
                self._queue.put_nowait(_Job(inputs, future))
            except queue.Full:
                raise QueueFullError(
                    f"device {self.device_id} queue is full ({self.queue_depth} waiting)",
                    self._retry_after_locked(),
                ) from None
            self._outstanding += 1
        return future

    def run(self, inputs: dict[str, np.ndarray], timeout: float | None = None) -> DeviceResult:
        """Submit and wait: the synchronous call for scripts and benchmarks."""
        return self.submit(inputs).result(timeout)

    def pending(self) -> int:
        """Requests queued or running."""
        return self._outstanding

    def retry_after_s(self) -> float:
        """How long a refused caller should wait: one queue's worth of recent run time."""
        with self._lock:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> float:
        return max(0.05, self._recent_run_s * max(self._outstanding, 1))

    def stats(self) -> DeviceStats:
        return DeviceStats(
            device_id=self.device_id,
            backend=self.backend_name,
            model=self._package.name if self._package is not None else None,
            queued=self._queue.qsize(),
            busy=self._busy,
            runs=self._runs,
            errors=self._errors,
            busy_seconds=self._busy_s,
            cycles=self._cycles,
        )

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running; False if ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; run (``drain``) or cancel what is queued; stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if drain:
            self.drain(timeout)
        # Whatever is still queued (not draining, or the timeout ran out) is cancelled.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _Job):
                job.future.cancel()
                self._finished()
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            assert isinstance(job, _Job)
            if not job.future.set_running_or_notify_cancel():
                self._finished()
                continue
            self._busy = True
            try:
                result = self._execute(job)
            except BaseException as exc:  # handed to the caller, never lost in the thread
                self._errors += 1
                self._busy = False
                self._finished()
                job.future.set_exception(exc)
            else:
                self._busy = False
                self._finished()
                job.future.set_result(result)

    def _finished(self) -> None:
        with self._idle:
            self._outstanding -= 1
            self._idle.notify_all()

    def _execute(self, job: _Job) -> DeviceResult:
        package = self._package
        if package is None:
            raise DeviceError(f"device {self.device_id} has no model loaded")
        start = time.perf_counter()
        cycles = 0

        def npu(program: Program, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            nonlocal cycles
            outputs, counted = self._backend.run(program, inputs)
            cycles += counted if counted is not None else model_cycles(program)
            return outputs

        try:
            outputs = package.run(job.inputs, npu=npu)
        finally:
            run_s = time.perf_counter() - start
            self._busy_s += run_s
            self._recent_run_s = run_s if not self._runs else 0.8 * self._recent_run_s + 0.2 * run_s
            self._runs += 1
            self._cycles += cycles
        clock = package.program.config.clock_hz
        return DeviceResult(
            outputs=outputs,
            cycles=cycles,
            npu_latency_s=cycles / clock,
            run_s=run_s,
            queue_s=start - job.enqueued,
            device_id=self.device_id,
        )


def open_device(
    backend: str = "sim", *, device_id: str | None = None, queue_depth: int = 8
) -> Device:
    """A new device of a registered backend (``sim``, ``reference``, or a plug-in's name)."""
    return Device(backend, device_id=device_id, queue_depth=queue_depth)


class DevicePool:
    """N devices with the same model; each request goes to the device with least work.

    The pool refuses a request only when every device's queue is full, and then tells the
    caller how long to back off.
    """

    def __init__(
        self,
        package: PackageLike,
        *,
        backend: str = "sim",
        devices: int = 1,
        queue_depth: int = 8,
        device_ids: list[str] | None = None,
    ) -> None:
        if device_ids is None:
            if not isinstance(devices, int) or devices < 1:
                raise DeviceError(f"device count must be a positive integer, got {devices!r}")
            device_ids = [f"{backend}:{i}" for i in range(devices)]
        if not device_ids or len(set(device_ids)) != len(device_ids):
            raise DeviceError(f"device ids must be distinct and non-empty, got {device_ids}")
        self.package = package
        self.devices: list[Device] = []
        self._lock = threading.Lock()
        try:
            for device_id in device_ids:
                dev = open_device(backend, device_id=device_id, queue_depth=queue_depth)
                self.devices.append(dev)
                dev.load(package)
        except BaseException:
            for dev in self.devices:
                dev.close(drain=False)
            raise

    def submit(self, inputs: dict[str, np.ndarray]) -> Future[DeviceResult]:
        """Queue on the least loaded device; :class:`QueueFullError` if all are full."""
        with self._lock:
            for dev in sorted(self.devices, key=Device.pending):
                try:
                    return dev.submit(inputs)
                except QueueFullError:
                    continue
        retry = min(dev.retry_after_s() for dev in self.devices)
        raise QueueFullError(
            f"all {len(self.devices)} device queues of model {self.package.name!r} are full "
            f"({self.devices[0].queue_depth} waiting each); retry in {retry:.2f} s",
            retry,
        )

    def run(self, inputs: dict[str, np.ndarray], timeout: float | None = None) -> DeviceResult:
        return self.submit(inputs).result(timeout)

    def pending(self) -> int:
        return sum(dev.pending() for dev in self.devices)

    def stats(self) -> list[DeviceStats]:
        return [dev.stats() for dev in self.devices]

    def drain(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        for dev in self.devices:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not dev.drain(left):
                return False
        return True

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        for dev in self.devices:
            dev.close(drain=drain, timeout=timeout)

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
