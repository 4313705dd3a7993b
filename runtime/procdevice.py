"""Simulated devices in worker processes: one process per device, as one board per device.

A simulated NPU is Python code, so several of them as threads of the server compete for
one interpreter lock and two devices run no faster than one. Real boards are separate
hardware; :class:`WorkerProcess` makes a simulated device separate too. The device's
thread in the server (its bounded queue, its statistics, the pool's dispatch: all of
:mod:`tessera.runtime.device`) stays as it is and hands each request to its own worker
process, where the package runs with the simulator:

* at start the worker receives the package once (the ``.tpkg`` bytes of a
  :class:`tessera.package.Package`, checked again on arrival; any other package object
  pickled) and the backend name, and answers ``ready``;
* per request it receives the preprocessed float tensors through a shared memory region
  (a memfd mapped by both processes; only a small header with names, dtypes, shapes and
  offsets goes over the socket, no tensor data is pickled), runs
  ``package.run(inputs, npu)`` and hands the outputs back the same way with the NPU
  cycles counted;
* an exception in the package (a wrong shape, say) comes back as that exception and the
  worker carries on; a worker that dies (killed, crashed, out of memory) is seen as the
  socket closing and raised as :class:`WorkerCrashedError` naming the exit code or signal.

Thread limits: every worker gets ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and
``MKL_NUM_THREADS`` set to its share of the CPUs, and its CPU affinity set to that share
(the simulator's band-parallel pool sizes itself from the affinity, see
``tessera.sim.kernels.parallel_workers``), so N workers on C cores run about C threads
between them instead of N x C. Workers also keep freed memory for reuse (glibc's
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``, unless already set, see
:mod:`tessera.runtime.memory`): the simulator's per-layer arrays of a few MB would
otherwise be mapped and faulted in afresh on every request, which doubles the run time of
a small model.

Workers are started with ``subprocess`` (a fresh interpreter, never ``fork``: the server
has gRPC threads running), ignore SIGINT and SIGTERM (the server drains and then stops
them; a Ctrl-C reaching the whole process group must not kill requests in flight), and
exit when their socket closes, so they outlive a server that dies by at most the request
they have in hand.

Run as ``python -m tessera.runtime.procdevice SOCKET_FD SHM_FD`` by :class:`WorkerProcess`
only.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from tessera.errors import TesseraError
from tessera.runtime.memory import MALLOC_ENV

#: Seconds a worker may take to start and load its package before it counts as failed.
DEFAULT_START_TIMEOUT_S = 120.0
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerCrashedError(TesseraError):
    """The worker process died (or could not start); the request it had is lost.

    ``delivered`` is False when the worker was found dead before it had the whole
    request, which it therefore never ran (safe to run again on a new worker).
    """

    def __init__(self, message: str, delivered: bool = True) -> None:
        super().__init__(message)
        self.delivered = delivered


# --------------------------------------------------------------------------- wire format
# Tensors travel through a shared memory region (a memfd both processes map): the sender
# copies each array in at an aligned offset and sends a small pickled header over the
# socket naming them (name, dtype, shape, offset) and the region's size; the receiver
# copies them out. One copy each way, no pickling of tensor data, no socket traffic in
# proportion to the tensors. The two sides take turns (request, then answer), so one
# region serves both directions; the writer grows it when a message does not fit and the
# reader remaps when the header says the size changed.

_ALIGN = 64
_MIN_REGION = 1 << 20


class _Region:
    """The shared memory of one worker: a file descriptor both processes map."""

    def __init__(self, fd: int, size: int, *, grow: bool = True) -> None:
        self.fd = fd
        self.size = 0
        self.mm: mmap.mmap | None = None
        if grow:
            os.ftruncate(fd, size)
        self._map(size)

    def _map(self, size: int) -> None:
        if self.mm is not None:
            self.mm.close()
        self.mm = mmap.mmap(self.fd, size)
        self.size = size

    def put(self, arrays: dict[str, np.ndarray]) -> tuple[int, list]:
        """Copy ``arrays`` in; the region's size and the specs the reader needs."""
        specs: list = []
        plain = []
        offset = 0
        for name, value in arrays.items():
            arr = np.asarray(value)
            if arr.dtype.hasobject:  # rare (a host stage returning objects): pickled whole
                specs.append((name, None, pickle.dumps(arr, protocol=pickle.HIGHEST_PROTOCOL), 0))
                continue
            specs.append((name, arr.dtype.str, arr.shape, offset))
            plain.append((arr, offset))
            offset += -(-arr.nbytes // _ALIGN) * _ALIGN
        if offset > self.size:
            size = max(offset, 2 * self.size, _MIN_REGION)
            size = -(-size // _MIN_REGION) * _MIN_REGION
            os.ftruncate(self.fd, size)
            self._map(size)
        for arr, off in plain:
            if arr.nbytes:
                np.copyto(np.ndarray(arr.shape, arr.dtype, buffer=self.mm, offset=off), arr)
        return self.size, specs

    def get(self, size: int, specs: list) -> dict[str, np.ndarray]:
        """Copy the arrays of a message out (the region is reused by the next one)."""
        if size != self.size:
            self._map(size)
        out = {}
        for name, dtype, shape, off in specs:
            if dtype is None:
                out[name] = pickle.loads(shape)
            else:
                out[name] = np.ndarray(shape, np.dtype(dtype), buffer=self.mm, offset=off).copy()
        return out

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None


def _region_fd(label: str) -> tuple[int, Any]:
    """A descriptor for a worker's shared memory (a memfd; a deleted temporary file where
    there is none) and the object keeping it open."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(f"tessera-{label}")
        return fd, None
    keep = tempfile.TemporaryFile()  # pragma: no cover - not Linux
    return keep.fileno(), keep  # pragma: no cover


def _pack_error(exc: BaseException) -> tuple[bytes | None, str, str]:
    """An exception as (pickle or None, ``Type: message``, the worker's traceback)."""
    text = f"{type(exc).__name__}: {exc}"
    trace = "".join(traceback.format_exception(exc))
    try:
        blob = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        blob = None
    return blob, text, trace


def _unpack_error(blob: bytes | None, text: str, trace: str = "") -> BaseException:
    """The worker's exception, rebuilt (same type and message) when it can be, else a
    :class:`TesseraError` with its text; the worker's traceback is attached as a note."""
    exc: BaseException = TesseraError(text)
    if blob is not None:
        try:
            rebuilt = pickle.loads(blob)
            if isinstance(rebuilt, BaseException):
                exc = rebuilt
        except Exception:
            pass
    if trace and hasattr(exc, "add_note"):
        exc.add_note(f"raised in the device worker process:\n{trace.rstrip()}")
    return exc


def package_blob(package: Any) -> tuple[str, bytes]:
    """How a package travels to a worker: ``("tpkg", bytes)`` or ``("pickle", bytes)``."""
    from tessera.package import Package

    if isinstance(package, Package):
        return "tpkg", package.to_bytes()
    try:
        return "pickle", pickle.dumps(package, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TesseraError(
            f"package {getattr(package, 'name', '?')!r} cannot be sent to a device worker "
            f"process ({type(exc).__name__}: {exc}); use an in-process device"
        ) from None


def default_threads(devices: int) -> int:
    """Each of ``devices`` workers' share of the CPUs this process may use (at least 1)."""
    return max(1, len(_cpus()) // max(1, devices))


def cpu_share(index: int, threads: int) -> list[int]:
    """The CPUs of worker ``index`` when each gets ``threads`` (all of them if that is all)."""
    cpus = _cpus()
    if threads >= len(cpus):
        return cpus
    return sorted({cpus[(index * threads + k) % len(cpus)] for k in range(threads)})


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is unresponsive"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


# --------------------------------------------------------------------------- parent side
class WorkerProcess:
    """One device's worker process, driven from one thread at a time (the device's).

    :meth:`run` and :meth:`close` may be called from different threads only in the way a
    device does: ``close`` after the device thread has stopped, or ``kill`` from anywhere
    to unblock a run (the run then raises :class:`WorkerCrashedError`).
    """

    def __init__(
        self,
        package: Any,
        backend: str,
        *,
        label: str,
        threads: int | None = None,
        cpus: list[int] | None = None,
        blob: tuple[str, bytes] | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        self.label = label
        self.backend = backend
        self.threads = threads if threads is not None else len(_cpus())
        self.cpus = cpus if cpus is not None else cpu_share(0, self.threads)
        kind, data = blob if blob is not None else package_blob(package)
        shm_fd, self._shm_keep = _region_fd(label.replace(" ", "-"))
        parent, child = socket.socketpair()
        env = dict(os.environ)
        for key in _THREAD_ENV:
            env[key] = str(self.threads)
        for key, value in MALLOC_ENV.items():
            env.setdefault(key, value)
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tessera.runtime.procdevice",
                    str(child.fileno()),
                    str(shm_fd),
                ],
                pass_fds=[child.fileno(), shm_fd],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            parent.close()
            os.close(shm_fd)
            raise WorkerCrashedError(f"{label}: cannot start a worker process: {exc}") from None
        finally:
            child.close()
        self._region = _Region(shm_fd, _MIN_REGION)
        self.pid = self._proc.pid
        self._conn = Connection(parent.detach())
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._conn.send(("load", kind, backend, list(sys.path), self.cpus, self._region.size))
            self._conn.send_bytes(data)
            if not self._conn.poll(start_timeout):
                raise WorkerCrashedError(
                    f"{label}: worker process {self.pid} did not load the package within "
                    f"{start_timeout:.0f} s"
                )
            reply = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._crashed("while loading the package", exc) from None
        except BaseException:
            self.kill()
            self._crashed("while loading the package", TimeoutError())
            raise
        if reply[0] != "ready":
            self.close(timeout=5.0)
            raise _unpack_error(*reply[1:])

    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Outputs of ``package.run(inputs)`` in the worker, and the NPU cycles it counted."""
        if self._closed:
            raise WorkerCrashedError(f"{self.label}: worker process {self.pid} is stopped")
        size, specs = self._region.put(inputs)
        try:
            self._conn.send(("run", size, specs))
        except OSError as exc:
            raise self._crashed("before it received a request", exc, delivered=False) from None
        try:
            head = self._conn.recv()
            if head[0] == "error":
                raise _unpack_error(*head[1:])
            _, cycles, size, specs = head
            return self._region.get(size, specs), cycles
        except (EOFError, OSError) as exc:
            raise self._crashed("while running a request", exc) from None

    def _crashed(
        self, when: str, exc: BaseException, *, delivered: bool = True
    ) -> WorkerCrashedError:
        try:
            code = self._proc.wait(2.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = None
            try:
                self._proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        self._close_conn()
        self._closed = True
        return WorkerCrashedError(
            f"{self.label}: worker process {self.pid} {_describe_exit(code)} {when} "
            f"({type(exc).__name__})",
            delivered,
        )

    def _close_conn(self) -> None:
        try:
            self._conn.close()
        except OSError:
            pass
        region, self._region = self._region, None
        if region is not None:
            region.close()
            os.close(region.fd)
            if self._shm_keep is not None:  # pragma: no cover - not Linux
                self._shm_keep.close()

    def kill(self, wait: float = 0.0) -> None:
        """Stop the worker at once (a run in progress raises :class:`WorkerCrashedError`);
        wait up to ``wait`` s for it to be gone."""
        try:
            self._proc.kill()
            if wait:
                self._proc.wait(wait)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit (it is idle: the device has drained); kill it if it lingers."""
        with self._lock:
            if self._closed:
                self._proc.poll()
                return
            self._closed = True
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5.0)
        self._close_conn()


# --------------------------------------------------------------------------- worker side
def _load(kind: str, data: bytes) -> Any:
    if kind == "tpkg":
        from tessera.package import Package

        return Package.from_bytes(data, source="<device worker>")
    return pickle.loads(data)


def _serve(conn: Connection, shm_fd: int) -> int:
    from tessera.runtime.device import _make_backend, _prepare, model_cycles

    try:
        op, kind, backend_name, path, cpus, size = conn.recv()
        data = conn.recv_bytes()
    except EOFError:
        return 0
    if op != "load":
        return 2
    for entry in reversed(path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)
        package = _load(kind, data)
        backend = _make_backend(backend_name)
        _prepare(backend, package.program)
    except BaseException as exc:
        conn.send(("error", *_pack_error(exc)))
        return 1
    del data
    region = _Region(shm_fd, size, grow=False)
    conn.send(("ready",))
    while True:
        try:
            head = conn.recv()
        except EOFError:  # the server is gone
            return 0
        if head[0] == "stop":
            return 0
        inputs = region.get(head[1], head[2])
        cycles = 0

        def npu(program: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            nonlocal cycles
            outputs, counted = backend.run(program, feed)
            cycles += counted if counted is not None else model_cycles(program)
            return outputs

        try:
            outputs = package.run(inputs, npu=npu)
        except Exception as exc:
            conn.send(("error", *_pack_error(exc)))
            continue
        try:
            size, specs = region.put(outputs)
        except Exception as exc:  # e.g. an output no array can be made of
            conn.send(("error", *_pack_error(exc)))
            continue
        conn.send(("ok", cycles, size, specs))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not all(a.isdigit() for a in args):
        print(
            "usage: python -m tessera.runtime.procdevice SOCKET_FD SHM_FD (started by the runtime)"
        )
        return 2
    # The server decides when its devices stop: it drains, then closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(args[0]))
    try:
        return _serve(conn, int(args[1]))
    except (OSError, EOFError):  # the server went away mid-message
        return 0
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
