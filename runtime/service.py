"""The scoring service's core, shared by the gRPC and REST front ends.

Both protocols carry the same request: tensors keyed by input name, an optional list of
wanted outputs. This module validates it against the package, preprocesses encoded images
on the request thread (host CPU work, so several requests decode in parallel while the
devices run), sends each batch item to the device pool, and gathers the outputs. Every
failure becomes a :class:`ServiceError` with a gRPC status code and a message that says
what was wrong and what is accepted; the front ends map it to their status, never to a
traceback.

Status codes (gRPC name -> HTTP status):

=====================  ====  ==============================================================
INVALID_ARGUMENT       400   unknown input/output name (valid names listed), wrong dtype or
                             shape, undecodable image, bad JSON
UNAUTHENTICATED        401   missing or wrong ``authorization: Bearer`` key
NOT_FOUND              404   unknown model name or version, unknown signature
RESOURCE_EXHAUSTED     413   request larger than the size limit, batch larger than allowed
UNAVAILABLE            503   every device queue full (retry advice attached), draining, a
                             device's worker process died (restarting) or every device failed
DEADLINE_EXCEEDED      504   the caller's deadline passed before the devices finished
INTERNAL               500   a bug: logged with its traceback, reported without it
=====================  ====  ==============================================================
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from tessera.errors import ImageDecodeError, TesseraError
from tessera.runtime.device import (
    DevicePool,
    DeviceResult,
    DeviceUnavailableError,
    PackageLike,
    QueueFullError,
)
from tessera.runtime.metrics import CONTENT_TYPE, Registry

log = logging.getLogger("tessera.serve")

#: Largest request body accepted (gRPC message or HTTP body): a few JPEGs, or a batch of
#: float tensors of 224x224x3 (600 KB each; JSON text takes ~4x that).
DEFAULT_MAX_REQUEST_BYTES = 64 << 20
DEFAULT_MAX_BATCH = 32


class Code(Enum):
    """gRPC status codes used by the service, with their HTTP statuses."""

    OK = 200
    INVALID_ARGUMENT = 400
    UNAUTHENTICATED = 401
    NOT_FOUND = 404
    RESOURCE_EXHAUSTED = 413
    UNAVAILABLE = 503
    DEADLINE_EXCEEDED = 504
    INTERNAL = 500

    @property
    def http_status(self) -> int:
        return self.value


class ServiceError(TesseraError):
    """A request failed for a reason the caller can act on."""

    def __init__(self, code: Code, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class PredictResult:
    outputs: dict[str, np.ndarray]
    runs: list[DeviceResult]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: machine-readable logs for the service.

    Fields passed through ``extra={"fields": {...}}`` are merged into the object; nothing
    from request headers is ever passed, so keys cannot reach the log.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Send ``tessera.serve`` logs as JSON lines to stderr (idempotent)."""
    logger = logging.getLogger("tessera.serve")
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class ModelService:
    """One model served from a device pool: validation, batching, metrics, drain."""

    def __init__(
        self,
        package: PackageLike,
        pool: DevicePool,
        *,
        name: str | None = None,
        version: int = 1,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.package = package
        self.pool = pool
        self.name = name or package.name
        self.version = version
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes
        self.started = time.time()
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self._draining = False
        self.metrics = Registry()
        self.requests = self.metrics.counter(
            "tessera_requests_total",
            "Requests by protocol, method and status code.",
            ("protocol", "method", "code"),
        )
        self.latency = self.metrics.histogram(
            "tessera_request_latency_seconds",
            "Request latency as the server sees it.",
            ("protocol", "method"),
        )
        self.auth = self.metrics.counter(
            "tessera_auth_total",
            "Credential checks by outcome (key slot, never the key).",
            ("result",),
        )
        self.metrics.gauge(
            "tessera_inflight_requests",
            "Requests being handled.",
            (),
            lambda: [((), self._inflight)],
        )
        self.metrics.gauge(
            "tessera_queue_depth",
            "Requests queued or running per device.",
            ("device",),
            lambda: [((s.device_id,), s.queued + s.busy) for s in pool.stats()],
        )
        self.metrics.gauge(
            "tessera_device_busy_seconds_total",
            "Wall time each device spent running.",
            ("device",),
            lambda: [((s.device_id,), s.busy_seconds) for s in pool.stats()],
            kind="counter",
        )
        self.metrics.gauge(
            "tessera_device_runs_total",
            "Inferences each device ran.",
            ("device",),
            lambda: [((s.device_id,), s.runs) for s in pool.stats()],
            kind="counter",
        )
        self.metrics.gauge(
            "tessera_npu_cycles_total",
            "NPU cycles (cycle model) each device ran.",
            ("device",),
            lambda: [((s.device_id,), s.cycles) for s in pool.stats()],
            kind="counter",
        )

    # ------------------------------------------------------------------ description
    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed float input, batch 1 (e.g. 1, 224, 224, 3)."""
        return tuple(int(d) for d in self.package.preprocess.output_shape)

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each output for one input; -1 where only a run would tell.

        A classifier's single output is its class probabilities; without a host stage the
        outputs are the program's own; a host stage (detector) reports its shapes itself
        (``output_shapes()``; SSD: boxes [1, K, 4], scores and classes [1, K], count [1]).
        """
        names = list(self.package.output_names)
        classes = getattr(self.package, "num_classes", None)
        if getattr(self.package, "kind", "") == "classifier" and len(names) == 1 and classes:
            return {names[0]: (1, int(classes))}
        host = getattr(self.package, "host", None)
        fixed = host.output_shapes() if hasattr(host, "output_shapes") else None
        if fixed is not None and len(fixed) == len(names):
            return {n: tuple(int(d) for d in s) for n, s in zip(names, fixed, strict=True)}
        outs = self.package.program.manifest["outputs"]
        if host is None and len(outs) == len(names):
            return {n: tuple(int(d) for d in o["shape"]) for n, o in zip(names, outs, strict=True)}
        return {n: (1, -1) for n in names}

    def signature(self) -> dict[str, Any]:
        """The ``serving_default`` signature: inputs (string or float) and outputs, -1 = batch."""
        h, w, c = self.input_shape[1:]
        return {
            "inputs": {
                self.package.input_name: {
                    "dtype": "DT_STRING",
                    "shape": [-1],
                    "alternative": {"dtype": "DT_FLOAT", "shape": [-1, h, w, c]},
                }
            },
            "outputs": {
                n: {"dtype": "DT_FLOAT", "shape": [-1, *s[1:]]}
                for n, s in self.output_shapes().items()
            },
            "method_name": "tensorflow/serving/predict",
        }

    def check_model(self, name: str, version: int | None = None) -> None:
        """NOT_FOUND unless ``name`` (empty = the served model) and ``version`` are ours."""
        if name and name != self.name:
            raise ServiceError(
                Code.NOT_FOUND,
                f"model {name!r} is not served here; this server serves {self.name!r}",
            )
        if version is not None and version not in (0, self.version):
            raise ServiceError(
                Code.NOT_FOUND,
                f"model {self.name!r} has no version {version}; served version: {self.version}",
            )

    def check_signature(self, signature: str) -> None:
        if signature not in ("", "serving_default"):
            raise ServiceError(
                Code.NOT_FOUND,
                f"signature {signature!r} not found; model {self.name!r} has 'serving_default'",
            )

    # ------------------------------------------------------------------ requests
    def begin(self) -> None:
        """Count a request in; refused with UNAVAILABLE once the server is draining."""
        with self._inflight_cv:
            if self._draining:
                raise ServiceError(
                    Code.UNAVAILABLE, "server is shutting down; retry on another replica", 1.0
                )
            self._inflight += 1

    def end(self) -> None:
        with self._inflight_cv:
            self._inflight -= 1
            self._inflight_cv.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait for in-flight ones; False if ``timeout`` ran out."""
        with self._inflight_cv:
            self._draining = True
            return self._inflight_cv.wait_for(lambda: self._inflight == 0, timeout)

    @property
    def draining(self) -> bool:
        return self._draining

    def record(self, protocol: str, method: str, code: Code, seconds: float, **fields: Any) -> None:
        """Count and log one finished request (one JSON log line per request)."""
        self.requests.inc(protocol, method, code.name)
        self.latency.observe(seconds, protocol, method)
        level = logging.INFO if code in (Code.OK,) else logging.WARNING
        if code is Code.INTERNAL:
            level = logging.ERROR
        log.log(
            level,
            "request",
            extra={
                "fields": {
                    "event": "request",
                    "protocol": protocol,
                    "method": method,
                    "model": self.name,
                    "code": code.name,
                    "latency_ms": round(seconds * 1e3, 3),
                    **fields,
                }
            },
        )

    def metrics_text(self) -> tuple[str, str]:
        return self.metrics.exposition(), CONTENT_TYPE

    def predict(
        self,
        inputs: Mapping[str, np.ndarray | Sequence[bytes]],
        output_filter: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> PredictResult:
        """Run one request: ``inputs`` maps the input name to a float array [B, H, W, C]
        (or [H, W, C]) or to a list of encoded images; returns outputs stacked over B."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wanted = self._wanted_outputs(output_filter)
        items = self._batch_items(inputs)
        futures: list[Future[DeviceResult]] = []
        try:
            for item in items:
                try:
                    futures.append(self.pool.submit({self.package.input_name: item}))
                except (QueueFullError, DeviceUnavailableError) as exc:
                    raise ServiceError(
                        Code.UNAVAILABLE,
                        f"{exc}; retry with back-off",
                        exc.retry_after_s,
                    ) from None
            runs = []
            for fut in futures:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    runs.append(fut.result(left))
                except FutureTimeout:
                    raise ServiceError(
                        Code.DEADLINE_EXCEEDED,
                        f"deadline of {timeout:.3f} s passed before the devices finished",
                    ) from None
                except CancelledError:
                    raise ServiceError(
                        Code.UNAVAILABLE, "request cancelled: the server is shutting down", 1.0
                    ) from None
                except DeviceUnavailableError as exc:
                    raise ServiceError(Code.UNAVAILABLE, str(exc), exc.retry_after_s) from None
                except TesseraError as exc:
                    raise ServiceError(Code.INVALID_ARGUMENT, str(exc)) from None
        finally:
            for fut in futures:
                fut.cancel()  # no-op for started or finished ones; frees queue slots otherwise
        outputs = {
            n: np.concatenate([r.outputs[n] for r in runs], axis=0).astype(np.float32)
            for n in wanted
        }
        return PredictResult(outputs, runs)

    def _wanted_outputs(self, output_filter: Sequence[str] | None) -> list[str]:
        names = list(self.package.output_names)
        if not output_filter:
            return names
        unknown = [n for n in output_filter if n not in names]
        if unknown:
            raise ServiceError(
                Code.INVALID_ARGUMENT,
                f"unknown output {', '.join(map(repr, unknown))}; valid outputs: "
                f"{', '.join(map(repr, names))}",
            )
        return list(dict.fromkeys(output_filter))

    def _batch_items(self, inputs: Mapping[str, np.ndarray | Sequence[bytes]]) -> list[np.ndarray]:
        name = self.package.input_name
        unknown = [k for k in inputs if k != name]
        if unknown or name not in inputs:
            got = ", ".join(map(repr, inputs)) or "none"
            raise ServiceError(
                Code.INVALID_ARGUMENT,
                f"unknown or missing input tensor (got {got}); valid input names: {name!r}",
            )
        value = inputs[name]
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            return self._float_items(value)
        if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
            value = [bytes(v) for v in value.reshape(-1)]
        if isinstance(value, (list, tuple)) and all(isinstance(v, bytes) for v in value):
            return self._image_items(list(value))
        raise ServiceError(
            Code.INVALID_ARGUMENT,
            f"input {name!r} must be DT_STRING (encoded JPEG/PNG images) or DT_FLOAT "
            f"[batch, {', '.join(map(str, self.input_shape[1:]))}]",
        )

    def _check_batch(self, n: int) -> None:
        if n < 1:
            raise ServiceError(Code.INVALID_ARGUMENT, "empty batch: send at least one input")
        if n > self.max_batch:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"batch of {n} exceeds the limit of {self.max_batch} per request",
            )

    def _image_items(self, images: list[bytes]) -> list[np.ndarray]:
        self._check_batch(len(images))
        items = []
        for i, data in enumerate(images):
            try:
                items.append(self.package.preprocess_image(data))
            except ImageDecodeError as exc:
                where = f"image {i}: " if len(images) > 1 else ""
                raise ServiceError(Code.INVALID_ARGUMENT, f"{where}{exc}") from None
        return items

    def _float_items(self, arr: np.ndarray) -> list[np.ndarray]:
        one = self.input_shape  # (1, H, W, C)
        if arr.ndim == len(one) - 1:
            arr = arr[None]
        if arr.ndim != len(one) or arr.shape[1:] != one[1:]:
            raise ServiceError(
                Code.INVALID_ARGUMENT,
                f"input {self.package.input_name!r} has shape {list(arr.shape)}; expected "
                f"[batch, {', '.join(map(str, one[1:]))}] float32 (preprocessed) or encoded "
                "images as DT_STRING",
            )
        self._check_batch(arr.shape[0])
        arr = arr.astype(np.float32, copy=False)
        if not np.all(np.isfinite(arr)):
            raise ServiceError(Code.INVALID_ARGUMENT, "input contains NaN or Inf")
        return [arr[i : i + 1] for i in range(arr.shape[0])]


def new_request_id() -> str:
    """A short id for correlating a request's log line with the client's report."""
    return uuid.uuid4().hex[:16]
