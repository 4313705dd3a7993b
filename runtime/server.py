"""A scoring server: one model on a device pool behind gRPC and REST, with TLS and keys.

:class:`Server` wires :class:`~tessera.runtime.service.ModelService` to both front ends,
owns their life cycle and the graceful shutdown: stop accepting (gRPC refuses new calls,
REST answers 503 and the health check turns 503), let in-flight requests finish within the
grace period, then stop the devices. Keys are only accepted together with TLS, because a
bearer key sent in clear text is a key given away; ``allow_insecure_keys`` exists for
development on loopback and says so in its name. From the first start on, the process
keeps freed memory for reuse (:func:`~tessera.runtime.memory.keep_freed_memory`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from tessera.errors import TesseraError
from tessera.runtime.device import DevicePool, PackageLike
from tessera.runtime.keys import KeyStore
from tessera.runtime.memory import keep_freed_memory
from tessera.runtime.service import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_REQUEST_BYTES,
    ModelService,
)
from tessera.runtime.tls import TLSFiles

log = logging.getLogger("tessera.serve")


@dataclass
class ServeOptions:
    """Everything ``tessera serve`` takes besides the package; ports 0 pick free ones."""

    name: str | None = None
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    rest_port: int = 8501
    backend: str = "sim"
    devices: int = 1
    device_ids: list[str] | None = None
    queue_depth: int = 8
    #: Devices in worker processes (True), as threads (False), or None: processes for the
    #: simulator backends with more than one device (``runtime.device.default_process``).
    device_process: bool | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keys_file: Path | None = None
    allow_insecure_keys: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    grace_s: float = 10.0
    grpc_workers: int = 16

    def validate(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise TesseraError("TLS needs both --tls-cert (PEM chain) and --tls-key (PEM key)")
        if self.keys_file is not None and self.tls_cert is None and not self.allow_insecure_keys:
            raise TesseraError(
                "access keys need TLS (a bearer key sent in clear text is given away): pass "
                "--tls-cert/--tls-key, or --insecure-dev-keys for development on loopback"
            )
        for label, port in (("gRPC", self.grpc_port), ("REST", self.rest_port)):
            if not 0 <= port <= 65535:
                raise TesseraError(f"{label} port must be 0..65535, got {port}")
        if self.grpc_port and self.grpc_port == self.rest_port:
            raise TesseraError(f"gRPC and REST cannot share port {self.grpc_port}")


class Server:
    """Start with :meth:`start` (or ``with``), stop with :meth:`stop`; ports are then known."""

    def __init__(self, package: PackageLike, options: ServeOptions | None = None) -> None:
        self.options = options or ServeOptions()
        self.options.validate()
        self.package = package
        self.tls = (
            TLSFiles(Path(self.options.tls_cert), Path(self.options.tls_key))
            if self.options.tls_cert is not None and self.options.tls_key is not None
            else None
        )
        self._tls_pair = self.tls.read() if self.tls is not None else None
        self._keys = KeyStore(self.options.keys_file) if self.options.keys_file else None
        self.pool: DevicePool | None = None
        self.service: ModelService | None = None
        self._grpc = None
        self._rest = None
        self.grpc_port = 0
        self.rest_port = 0
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        self._stopping = False
        self._drained = True

    @property
    def keys(self) -> KeyStore | None:
        return self._keys

    def _current_keys(self) -> KeyStore | None:
        return self._keys

    @property
    def uses_tls(self) -> bool:
        return self.tls is not None

    def start(self) -> Server:
        from tessera.runtime.grpc_service import build_server, make_servicer
        from tessera.runtime.rest import RestServer

        opts = self.options
        with self._lock:
            if self._started:
                raise TesseraError("server already started")
            self._started = True
        # Requests allocate and free buffers of the input's size; without this each one
        # faults its pages in afresh (~1-2.5 ms per 600 kB float request, see the module).
        keep_freed_memory()
        self.pool = DevicePool(
            self.package,
            backend=opts.backend,
            devices=opts.devices,
            queue_depth=opts.queue_depth,
            device_ids=opts.device_ids,
            process=opts.device_process,
        )
        try:
            self.service = ModelService(
                self.package,
                self.pool,
                name=opts.name,
                max_batch=opts.max_batch,
                max_request_bytes=opts.max_request_bytes,
            )
            servicer = make_servicer(self.service, self._current_keys)
            self._grpc, self.grpc_port = build_server(
                servicer,
                host=opts.host,
                port=opts.grpc_port,
                max_message_bytes=opts.max_request_bytes,
                tls=self._tls_pair,
                workers=opts.grpc_workers,
            )
            ctx = self.tls.server_context() if self.tls is not None else None
            try:
                self._rest = RestServer(
                    (opts.host, opts.rest_port), self.service, self._current_keys, ctx
                )
            except OSError as exc:
                raise TesseraError(
                    f"cannot bind REST port {opts.host}:{opts.rest_port}: {exc.strerror}"
                ) from None
            self.rest_port = self._rest.port
            self._grpc.start()
            self._rest.start()
        except BaseException:
            self._teardown(0.0)
            raise
        log.info(
            "serving",
            extra={
                "fields": {
                    "event": "start",
                    "model": self.service.name,
                    "grpc_port": self.grpc_port,
                    "rest_port": self.rest_port,
                    "host": opts.host,
                    "devices": [d.device_id for d in self.pool.devices],
                    "backend": opts.backend,
                    "device_processes": self.pool.process,
                    "tls": self.uses_tls,
                    "keys": self._keys.count if self._keys else 0,
                }
            },
        )
        return self

    def reload_keys(self) -> bool:
        """Re-read the keys file (SIGHUP); True if the new keys are in force."""
        if self._keys is None:
            log.warning("SIGHUP: no keys file configured; nothing to reload")
            return False
        return self._keys.reload()

    def stop(self, grace: float | None = None) -> bool:
        """Drain in-flight requests for up to ``grace`` s, then stop; True if all finished."""
        grace = self.options.grace_s if grace is None else grace
        with self._lock:
            if not self._started:
                self._stopped.set()
                return True
            if self._stopping:
                second = True
            else:
                second = False
                self._stopping = True
        if second:
            self._stopped.wait(grace + 5.0)
            return self._drained
        self._drained = self._teardown(grace)
        return self._drained

    def _teardown(self, grace: float) -> bool:
        start = time.monotonic()
        drained = True
        if self.service is not None:
            # New requests now get UNAVAILABLE; running ones finish.
            drained = self.service.drain(grace)
        if self._grpc is not None:
            left = max(0.0, grace - (time.monotonic() - start))
            self._grpc.stop(left).wait(left + 1.0)
        if self._rest is not None:
            self._rest.stop()
        if self.pool is not None:
            self.pool.close(drain=drained, timeout=max(0.0, grace - (time.monotonic() - start)))
        self._stopped.set()
        log.info(
            "stopped",
            extra={
                "fields": {
                    "event": "stop",
                    "drained": drained,
                    "seconds": round(time.monotonic() - start, 3),
                }
            },
        )
        return drained

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; True if it has."""
        return self._stopped.wait(timeout)

    def install_signal_handlers(self) -> None:
        """SIGHUP reloads keys; SIGTERM/SIGINT stop gracefully (main thread only)."""

        def hup(signum: int, frame: FrameType | None) -> None:
            threading.Thread(target=self.reload_keys, name="tessera-sighup", daemon=True).start()

        def term(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: draining", signal.Signals(signum).name)
            threading.Thread(target=self.stop, name="tessera-stop", daemon=True).start()

        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, hup)
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGINT, term)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
