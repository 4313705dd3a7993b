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

Where a device runs: on a worker thread of the calling process (``process=False``), or
behind it in a worker process of its own (``process=True``, :mod:`tessera.runtime.procdevice`):
the simulator is Python, so simulated devices as threads of one process share one
interpreter lock and N of them run no faster than one, while N worker processes run side
by side as N boards would. A process device keeps everything else (its thread, bounded
queue, statistics, the pool's dispatch) in the caller's process; only ``package.run``
moves, with the package sent once when it is loaded and tensors as raw bytes per request.
A worker that dies fails its request with :class:`DeviceUnavailableError` (UNAVAILABLE to
a client) and is restarted; after ``max_restarts`` deaths in a row without a successful
run in between the device reports itself failed and the pool sends work elsewhere.
:class:`DevicePool` uses processes by default for the simulator backends (``sim``,
``reference``) when it has more than one device (:func:`default_process`); a single
device stays in-process, where a request costs no inter-process copy.

Every result carries the NPU cycle count and the latency it implies at the build's
clock: from the simulator's own count when the backend counts cycles, else from the cycle
model (:func:`tessera.sim.cycles.estimate`), so the numbers mean the same on every
backend.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from tessera.errors import TesseraError
from tessera.program import Program

if TYPE_CHECKING:
    from tessera.runtime.procdevice import WorkerProcess

log = logging.getLogger("tessera.serve")

NPUFunction = Callable[[Program, dict[str, np.ndarray]], dict[str, np.ndarray]]


class DeviceError(TesseraError):
    """A device cannot take the request (closed, no model loaded, model already loaded)."""


class DeviceBusyError(DeviceError):
    """The device already holds a model: one model per device, as on Brainwave."""


class DeviceUnavailableError(DeviceError):
    """The device cannot complete requests now: its worker process died or it has failed."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        #: A pause after which a restarted worker (or another device) can probably serve.
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.retry_after_s))


class QueueFullError(DeviceError):
    """Every device queue of the model is full; the caller should retry after a pause."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        #: A pause after which a slot has probably freed up (queue depth x recent run time).
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.retry_after_s))


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

    def prepare(self, program: Program) -> None:
        """Run ``program`` once on zeros when it is loaded (simulator only).

        The simulator's compiled kernels load on first use, about 0.7 s here; done at
        load time, the first request does not wait for them (nor, in a pool of process
        devices, one request per worker).
        """
        if self.name != "sim":
            return
        from tessera.sim.run import run_program

        feed = {i["name"]: np.zeros(i["shape"], np.float32) for i in program.manifest["inputs"]}
        run_program(program, feed, self.name)


_BACKENDS: dict[str, Callable[[], Backend]] = {
    "sim": lambda: _RunProgramBackend("sim"),
    "reference": lambda: _RunProgramBackend("reference"),
}
_BACKENDS_LOCK = threading.Lock()
#: Backends whose devices a pool puts in worker processes by default (pure-Python work).
PROCESS_BACKENDS = ("sim", "reference")


def default_process(backend: str, devices: int) -> bool:
    """Whether a pool of ``devices`` devices of ``backend`` uses worker processes by default:
    yes for the simulator backends with more than one device (threads would share one
    interpreter lock), no otherwise (one device gains nothing from a process but pays a
    copy of each request; other backends drive hardware or an external simulator)."""
    return backend in PROCESS_BACKENDS and devices > 1


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


def _prepare(backend: Backend, program: Program) -> None:
    """Let a backend get ready for ``program`` (backends without ``prepare`` need nothing)."""
    prepare = getattr(backend, "prepare", None)
    if prepare is not None:
        prepare(program)


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
    #: Whether the device runs in a worker process, that process's id (None when not
    #: running), and how often it was restarted after dying.
    process: bool = False
    worker_pid: int | None = None
    restarts: int = 0
    #: ``ok``, or ``failed`` once a process device's worker kept dying.
    state: str = "ok"


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

    With ``process=True`` the package runs in a worker process of this device (started by
    :meth:`load`, stopped by :meth:`unload` and :meth:`close`), limited to ``threads``
    threads on the CPUs ``cpus`` (default: all the CPUs this process may use). A worker
    that dies is restarted up to ``max_restarts`` times in a row; then the device fails.
    """

    def __init__(
        self,
        backend: str = "sim",
        *,
        device_id: str | None = None,
        queue_depth: int = 8,
        process: bool = False,
        threads: int | None = None,
        cpus: list[int] | None = None,
        max_restarts: int = 3,
    ) -> None:
        if not isinstance(queue_depth, int) or queue_depth < 1:
            raise DeviceError(f"queue depth must be a positive integer, got {queue_depth!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise DeviceError(f"threads must be a positive integer, got {threads!r}")
        self.backend_name = backend
        self.process = bool(process)
        self.threads = threads
        self.cpus = cpus
        self.max_restarts = max_restarts
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
        # Process devices: the worker, what it was started with (for restarts), deaths in a
        # row, restarts so far, and why the device failed (None while it works).
        self._worker: WorkerProcess | None = None
        self._worker_lock = threading.Lock()
        self._blob: tuple[str, bytes] | None = None
        self._crashes_in_row = 0
        self._restarts = 0
        self._restart_pending = False
        self._failed: str | None = None
        self._thread = threading.Thread(
            target=self._work, name=f"tessera-device-{self.device_id}", daemon=True
        )
        self._thread.start()

    # -- model
    @property
    def package(self) -> PackageLike | None:
        return self._package

    def load(self, package: PackageLike, *, blob: tuple[str, bytes] | None = None) -> None:
        """Put ``package`` on the device; refused while another model is loaded.

        A process device starts its worker here and returns once the worker holds the
        package (``blob``: the package as :func:`~tessera.runtime.procdevice.package_blob`
        made it, when the caller has it already).
        """
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
            if self.process:
                from tessera.runtime.procdevice import WorkerCrashedError, package_blob

                self._blob = blob if blob is not None else package_blob(package)
                try:
                    self._start_worker(package)
                except WorkerCrashedError as exc:
                    self._blob = None
                    raise DeviceError(f"device {self.device_id}: {exc}") from None
                self._crashes_in_row = 0
                self._failed = None
            else:
                _prepare(self._backend, package.program)
            self._package = package

    def unload(self) -> None:
        """Remove the model once queued requests have run, freeing the device for another."""
        self.drain()
        with self._lock:
            self._package = None
            self._blob = None
        self._stop_worker()

    # -- worker process (process devices)
    def _start_worker(self, package: PackageLike) -> None:
        from tessera.runtime.procdevice import WorkerProcess

        with self._worker_lock:
            assert self._blob is not None
            self._worker = WorkerProcess(
                package,
                self.backend_name,
                label=f"device {self.device_id}",
                threads=self.threads,
                cpus=self.cpus,
                blob=self._blob,
            )

    def _stop_worker(self, timeout: float = 10.0) -> None:
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.close(timeout)

    def _restart_worker(self) -> None:
        """After a worker died (on the device thread): a new one, or the device fails."""
        from tessera.runtime.procdevice import WorkerCrashedError

        self._restart_pending = False
        self._stop_worker(1.0)
        package = self._package
        if self._closed or package is None or self._failed is not None:
            return
        if self._crashes_in_row > self.max_restarts:
            self._failed = (
                f"its worker process died {self._crashes_in_row} times in a row; the device "
                "is out of service"
            )
        else:
            try:
                self._start_worker(package)
                self._restarts += 1
                return
            except WorkerCrashedError as exc:
                self._failed = f"its worker process cannot be restarted: {exc}"
            except BaseException as exc:  # e.g. the package no longer loads
                self._failed = f"its worker process cannot be restarted: {exc}"
        log.error("device %s failed: %s", self.device_id, self._failed)

    def kill_worker(self, wait: float = 5.0) -> int | None:
        """Kill the worker process (tests, operators) and wait up to ``wait`` s until it is
        gone; the device starts a new one. The killed worker's pid (None if it had none)."""
        with self._worker_lock:
            worker = self._worker
        if worker is None:
            return None
        worker.kill(wait)
        return worker.pid

    # -- requests
    def submit(self, inputs: dict[str, np.ndarray]) -> Future[DeviceResult]:
        """Queue one request; raises :class:`QueueFullError` at once if the queue is full."""
        future: Future[DeviceResult] = Future()
        with self._lock:
            if self._closed:
                raise DeviceError(f"device {self.device_id} is closed")
            if self._package is None:
                raise DeviceError(f"device {self.device_id} has no model loaded")
            if self._failed is not None:
                raise DeviceUnavailableError(f"device {self.device_id} failed: {self._failed}")
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
        worker = self._worker
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
            process=self.process,
            worker_pid=worker.pid if worker is not None else None,
            restarts=self._restarts,
            state="failed" if self._failed is not None else "ok",
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
        if self._thread.is_alive() and self.process:
            # A request still runs past the timeout: stop its worker so the thread ends.
            with self._worker_lock:
                if self._worker is not None:
                    self._worker.kill()
            self._thread.join(5.0)
        self._stop_worker(5.0 if timeout is None else max(1.0, timeout))

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
                if self._restart_pending:
                    # The caller hears of the dead worker at once; the device counts as
                    # busy (drain and close wait) until its replacement is up.
                    job.future.set_exception(exc)
                    self._restart_worker()
                    self._finished()
                    continue
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

    def _run_in_worker(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        from tessera.runtime.procdevice import WorkerCrashedError

        if self._failed is not None:
            raise DeviceUnavailableError(f"device {self.device_id} failed: {self._failed}")
        worker = self._worker
        if worker is None or not worker.alive():
            # Died while idle (or a restart is owed): replace it before running.
            self._crashes_in_row += 1
            self._restart_worker()
            worker = self._worker
            if worker is None:
                raise self._no_worker_error()
        try:
            try:
                result = worker.run(inputs)
            except WorkerCrashedError as exc:
                if exc.delivered:
                    raise
                # Found dead before it had the request: a new worker runs it instead.
                self._crashes_in_row += 1
                self._restart_worker()
                if self._worker is None:
                    raise self._no_worker_error() from None
                result = self._worker.run(inputs)
        except WorkerCrashedError as exc:
            self._crashes_in_row += 1
            self._restart_pending = True
            raise DeviceUnavailableError(
                f"{exc}; the request was not completed and the device is restarting its "
                "worker: retry",
                max(1.0, self._recent_run_s),
            ) from None
        self._crashes_in_row = 0
        return result

    def _no_worker_error(self) -> DeviceUnavailableError:
        if self._failed is not None:
            return DeviceUnavailableError(f"device {self.device_id} failed: {self._failed}")
        return DeviceUnavailableError(
            f"device {self.device_id} is shutting down and its worker process is gone"
        )

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
            if self.process:
                outputs, cycles = self._run_in_worker(job.inputs)
            else:
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
    backend: str = "sim",
    *,
    device_id: str | None = None,
    queue_depth: int = 8,
    process: bool = False,
    threads: int | None = None,
) -> Device:
    """A new device of a registered backend (``sim``, ``reference``, or a plug-in's name);
    ``process=True`` runs it in a worker process of its own (see :class:`Device`)."""
    return Device(
        backend, device_id=device_id, queue_depth=queue_depth, process=process, threads=threads
    )


class DevicePool:
    """N devices with the same model; each request goes to the device with least work.

    The pool refuses a request only when every device's queue is full, and then tells the
    caller how long to back off; a failed device (its worker process kept dying) is passed
    over, and only when every device has failed is the request refused as unavailable.

    ``process``: run each device in a worker process (None: :func:`default_process`, i.e.
    for ``sim``/``reference`` pools of more than one device). ``threads``: threads per
    worker (default: the CPUs divided among the devices, at least one); each worker is
    also confined to its share of the CPUs, so the devices do not oversubscribe them.
    """

    def __init__(
        self,
        package: PackageLike,
        *,
        backend: str = "sim",
        devices: int = 1,
        queue_depth: int = 8,
        device_ids: list[str] | None = None,
        process: bool | None = None,
        threads: int | None = None,
    ) -> None:
        if device_ids is None:
            if not isinstance(devices, int) or devices < 1:
                raise DeviceError(f"device count must be a positive integer, got {devices!r}")
            device_ids = [f"{backend}:{i}" for i in range(devices)]
        if not device_ids or len(set(device_ids)) != len(device_ids):
            raise DeviceError(f"device ids must be distinct and non-empty, got {device_ids}")
        if process is None:
            process = default_process(backend, len(device_ids))
        self.package = package
        self.process = process
        self.devices: list[Device] = []
        self._lock = threading.Lock()
        try:
            if process:
                self._open_processes(backend, device_ids, queue_depth, threads)
            else:
                for device_id in device_ids:
                    dev = open_device(backend, device_id=device_id, queue_depth=queue_depth)
                    self.devices.append(dev)
                    dev.load(package)
        except BaseException:
            for dev in self.devices:
                dev.close(drain=False)
            raise

    def _open_processes(
        self, backend: str, device_ids: list[str], queue_depth: int, threads: int | None
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from tessera.runtime.procdevice import cpu_share, default_threads, package_blob

        threads = threads if threads is not None else default_threads(len(device_ids))
        for i, device_id in enumerate(device_ids):
            self.devices.append(
                Device(
                    backend,
                    device_id=device_id,
                    queue_depth=queue_depth,
                    process=True,
                    threads=threads,
                    cpus=cpu_share(i, threads),
                )
            )
        blob = package_blob(self.package)  # serialised once, loaded by every worker
        with ThreadPoolExecutor(len(self.devices)) as ex:  # workers start side by side
            loads = [ex.submit(dev.load, self.package, blob=blob) for dev in self.devices]
            for f in loads:
                f.result()

    def submit(self, inputs: dict[str, np.ndarray]) -> Future[DeviceResult]:
        """Queue on the least loaded device; :class:`QueueFullError` if all are full,
        :class:`DeviceUnavailableError` if every device has failed."""
        failed = []
        with self._lock:
            for dev in sorted(self.devices, key=Device.pending):
                try:
                    return dev.submit(inputs)
                except QueueFullError:
                    continue
                except DeviceUnavailableError as exc:
                    failed.append(str(exc))
        if len(failed) == len(self.devices):
            raise DeviceUnavailableError(
                f"every device of model {self.package.name!r} has failed: {'; '.join(failed)}",
                5.0,
            )
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
