"""REST front end in TensorFlow Serving's dialect, on the standard library's HTTP server.

Routes:

* ``POST /v1/models/NAME[/versions/V]:predict`` with ``{"instances": [...]}`` (row format,
  answered as ``{"predictions": [...]}``) or ``{"inputs": ...}`` (columnar, answered as
  ``{"outputs": ...}``); images as ``{"b64": "<base64 JPEG/PNG>"}``, preprocessed inputs as
  nested lists of numbers. Optional ``"signature_name"`` and ``"output_filter"``.
* ``GET /v1/models/NAME[/versions/V]``: version status, ``/metadata``: the signature.
* ``GET /healthz``: 200 while serving, 503 while draining (load balancers stop sending).
* ``GET /metrics``: Prometheus text.

Errors are ``{"error": message, "code": "INVALID_ARGUMENT"}`` with the HTTP status of
:class:`~tessera.runtime.service.Code`; UNAVAILABLE carries ``Retry-After``. Bodies larger
than the limit are refused from their ``Content-Length`` before being read. Health and
metrics need no key: probes and scrapers carry none, and neither page shows model data.

TLS handshakes run on the connection's own thread (not in the accept loop), so a client
that stalls during the handshake cannot block other connections.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import socket
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from tessera.runtime.keys import KeyStore
from tessera.runtime.service import Code, ModelService, ServiceError, new_request_id

log = logging.getLogger("tessera.serve")

_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<rest>/metadata|:predict)?$"
)
#: Seconds an idle keep-alive connection (or a slow client mid-request) may hold a thread.
CONNECTION_TIMEOUT_S = 30.0
#: Longest wait for a client to stop sending an unread (oversized) body after our answer.
LINGER_S = 2.0


class RestServer(ThreadingHTTPServer):
    """HTTP(S) server bound to one :class:`ModelService`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        service: ModelService,
        keys: Any,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.service = service
        self.keys = keys  # callable returning the current KeyStore or None
        self.tls = tls
        self.thread: threading.Thread | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONNECTION_TIMEOUT_S)
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.info(
                    "TLS handshake failed",
                    extra={
                        "fields": {
                            "event": "tls_error",
                            "peer": client_address[0],
                            "error": type(exc).__name__,
                        }
                    },
                )
                request.close()
                return
        super().finish_request(request, client_address)

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="tessera-rest",
            daemon=True,
        )
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self.thread is not None:
            self.thread.join(5)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: an answer is written as headers, then body; with Nagle's algorithm the
    # body waits for the client's delayed ACK of the headers (40 ms on Linux) whenever it
    # is small, which made a JPEG :predict over keep-alive take ~45 ms instead of ~5.
    disable_nagle_algorithm = True
    server: RestServer
    server_version = "tessera"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one structured line per request is written by ModelService.record instead

    # ------------------------------------------------------------------ routing
    def do_GET(self) -> None:
        self._body_read = True  # a GET carries no body
        path = self.path.split("?", 1)[0]
        if path in ("/healthz", "/v1/health"):
            svc = self.server.service
            if svc.draining:
                self._json(503, {"status": "draining"})
            else:
                self._json(200, {"status": "ok", "model": svc.name})
            return
        if path == "/metrics":
            text, ctype = self.server.service.metrics_text()
            self._send(200, text.encode(), ctype)
            return
        self._dispatch("GET", path)

    def do_POST(self) -> None:
        self._dispatch("POST", self.path.split("?", 1)[0])

    def _dispatch(self, verb: str, path: str) -> None:
        svc = self.server.service
        start = time.perf_counter()
        request_id = new_request_id()
        fields: dict[str, Any] = {"request_id": request_id, "peer": self.client_address[0]}
        method = "unknown"
        code = Code.OK
        counted = False
        self._body_read = verb != "POST"
        try:
            m = _MODEL_PATH.match(path)
            if m is None:
                method = "unknown"
                raise ServiceError(
                    Code.NOT_FOUND,
                    f"no route {verb} {path}; try POST /v1/models/{svc.name}:predict, "
                    f"GET /v1/models/{svc.name}, /healthz, /metrics",
                )
            rest = m.group("rest") or ""
            method = {":predict": "Predict", "/metadata": "GetModelMetadata"}.get(
                rest, "GetModelStatus"
            )
            if (verb == "POST") != (rest == ":predict"):
                raise ServiceError(Code.NOT_FOUND, f"{verb} is not supported on {path}")
            self._authenticate(fields)
            body = self._read_body() if verb == "POST" else b""
            svc.begin()
            counted = True
            version = int(m.group("version")) if m.group("version") else None
            svc.check_model(m.group("name"), version)
            if rest == ":predict":
                payload = self._predict(body)
            elif rest == "/metadata":
                payload = _metadata_json(svc)
            else:
                payload = _status_json(svc)
            self._json(200, payload)
        except ServiceError as exc:
            code = exc.code
            fields["error"] = exc.message
            headers = {"X-Request-Id": request_id}
            if exc.retry_after_s is not None:
                headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
            payload = {"error": exc.message, "code": exc.code.name}
            if exc.retry_after_s is not None:
                payload["retry_after_ms"] = max(1, round(exc.retry_after_s * 1e3))
            self._json(code.http_status, payload, headers, close=not self._skip_body())
        except Exception:
            code = Code.INTERNAL
            log.exception("internal error in REST %s (request id %s)", method, request_id)
            payload = {"error": f"internal error (request id {request_id})", "code": "INTERNAL"}
            self._json(500, payload, close=not self._skip_body())
        finally:
            if counted:
                svc.end()
            svc.record("rest", method, code, time.perf_counter() - start, **fields)

    # ------------------------------------------------------------------ pieces
    def _authenticate(self, fields: dict[str, Any]) -> None:
        keys: KeyStore | None = self.server.keys()
        if keys is None:
            return
        result = keys.check(self.headers.get("Authorization"))
        self.server.service.auth.inc(result.value)
        fields["auth"] = result.value
        if not result.ok:
            raise ServiceError(
                Code.UNAUTHENTICATED,
                "missing or invalid access key: send header 'Authorization: Bearer <key>'",
            )

    def _read_body(self) -> bytes:
        limit = self.server.service.max_request_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ServiceError(
                Code.INVALID_ARGUMENT,
                "chunked request bodies are not supported; send Content-Length",
            )
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            raise ServiceError(Code.INVALID_ARGUMENT, "POST needs a valid Content-Length header")
        if length > limit:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"request body of {length} bytes exceeds the limit of {limit} bytes",
            )
        body = self.rfile.read(length)
        self._body_read = True
        return body

    def _skip_body(self) -> bool:
        """Consume an unread request body of acceptable size; False if the connection
        must close (the body is too large to read, or its length is unknown).

        Answering early (bad key, unknown route) without reading the body would leave it
        in the socket: the connection could not be reused, and closing a socket with
        unread data makes the kernel send a reset that can destroy the answer in flight.
        """
        if self._body_read:
            return True
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return False
        if not 0 <= length <= self.server.service.max_request_bytes:
            return False
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                return False
            length -= len(chunk)
        self._body_read = True
        return True

    def _linger(self) -> None:
        """After answering a request whose body was not read: stop sending, then discard
        what the client is still sending for a moment, so its read of our answer is not cut
        off by a reset (the "lingering close" of HTTP servers)."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            end = time.monotonic() + LINGER_S
            while time.monotonic() < end and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass

    def _predict(self, body: bytes) -> dict[str, Any]:
        svc = self.server.service
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServiceError(Code.INVALID_ARGUMENT, f"body is not valid JSON: {exc}") from None
        if not isinstance(req, dict):
            raise ServiceError(Code.INVALID_ARGUMENT, "body must be a JSON object")
        svc.check_signature(str(req.get("signature_name", "")))
        output_filter = req.get("output_filter")
        if output_filter is not None and (
            not isinstance(output_filter, list)
            or not all(isinstance(o, str) for o in output_filter)
        ):
            raise ServiceError(Code.INVALID_ARGUMENT, "output_filter must be a list of names")
        has_rows, has_cols = "instances" in req, "inputs" in req
        if has_rows == has_cols:
            raise ServiceError(
                Code.INVALID_ARGUMENT,
                "send exactly one of 'instances' (row) or 'inputs' (columnar)",
            )
        input_name = svc.package.input_name
        if has_rows:
            inputs = {input_name: _rows(req["instances"], input_name)}
        else:
            inputs = _columns(req["inputs"], input_name)
        result = svc.predict(inputs, output_filter)
        outs = {n: v.tolist() for n, v in result.outputs.items()}
        if has_cols:
            return {"outputs": next(iter(outs.values())) if len(outs) == 1 else outs}
        names = list(outs)
        batch = len(next(iter(outs.values())))
        if len(names) == 1:
            return {"predictions": outs[names[0]]}
        return {"predictions": [{n: outs[n][i] for n in names} for i in range(batch)]}

    def _json(
        self,
        status: int,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
        *,
        close: bool = False,
    ) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers, close)

    def _send(
        self,
        status: int,
        data: bytes,
        ctype: str,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            # The unread body is still on the socket: the connection cannot be reused.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        if close and not self._body_read:
            self._linger()


# --------------------------------------------------------------------------- JSON values
def _value(v: Any, where: str) -> np.ndarray | list[bytes]:
    """One JSON value: {"b64": ...}, a list of those, a string, or nested numbers."""
    if isinstance(v, dict):
        return [_b64(v, where)]
    if isinstance(v, str):
        return [v.encode()]
    if isinstance(v, list) and v and all(isinstance(x, (dict, str)) for x in v):
        return [_b64(x, where) if isinstance(x, dict) else x.encode() for x in v]
    try:
        arr = np.asarray(v, dtype=np.float32)
    except (ValueError, TypeError):
        raise ServiceError(
            Code.INVALID_ARGUMENT,
            f'{where}: expected {{"b64": ...}} images or a rectangular list of numbers',
        ) from None
    return arr


def _b64(obj: dict[str, Any], where: str) -> bytes:
    if set(obj) != {"b64"} or not isinstance(obj["b64"], str):
        raise ServiceError(
            Code.INVALID_ARGUMENT, f'{where}: binary values must be {{"b64": "<base64>"}}'
        )
    try:
        return base64.b64decode(obj["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(Code.INVALID_ARGUMENT, f"{where}: 'b64' is not valid base64") from None


def _is_named(x: Any) -> bool:
    return isinstance(x, dict) and set(x) != {"b64"}


def _rows(instances: Any, input_name: str) -> np.ndarray | list[bytes]:
    """Row format: one entry per batch item, either the value or {input_name: value}."""
    if not isinstance(instances, list) or not instances:
        raise ServiceError(Code.INVALID_ARGUMENT, "'instances' must be a non-empty list")
    values = []
    for i, inst in enumerate(instances):
        if _is_named(inst):
            unknown = [k for k in inst if k != input_name]
            if unknown:
                raise ServiceError(
                    Code.INVALID_ARGUMENT,
                    f"instance {i}: unknown input {', '.join(map(repr, unknown))}; valid input "
                    f"names: {input_name!r}",
                )
            if input_name not in inst:
                raise ServiceError(Code.INVALID_ARGUMENT, f"instance {i}: missing {input_name!r}")
            inst = inst[input_name]
        values.append(_value(inst, f"instance {i}"))
    if all(isinstance(v, list) for v in values):
        return [b for v in values for b in v]  # type: ignore[union-attr]
    if any(isinstance(v, list) for v in values):
        raise ServiceError(
            Code.INVALID_ARGUMENT, "instances mix images and numeric tensors; send one kind"
        )
    shapes = {v.shape for v in values}  # type: ignore[union-attr]
    if len(shapes) != 1:
        raise ServiceError(
            Code.INVALID_ARGUMENT, f"instances have different shapes: {sorted(shapes)}"
        )
    return np.stack(values)  # type: ignore[arg-type]


def _columns(inputs: Any, input_name: str) -> dict[str, np.ndarray | list[bytes]]:
    """Columnar format: the batched value, or {name: batched value}."""
    if _is_named(inputs):
        return {k: _value(v, f"input {k!r}") for k, v in inputs.items()}
    return {input_name: _value(inputs, f"input {input_name!r}")}


def _status_json(svc: ModelService) -> dict[str, Any]:
    state = "UNLOADING" if svc.draining else "AVAILABLE"
    return {
        "model_version_status": [
            {
                "version": str(svc.version),
                "state": state,
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }


def _metadata_json(svc: ModelService) -> dict[str, Any]:
    sig = svc.signature()

    def info(name: str, d: dict[str, Any]) -> dict[str, Any]:
        return {
            "dtype": d["dtype"],
            "tensor_shape": {"dim": [{"size": str(s), "name": ""} for s in d["shape"]]},
            "name": name,
        }

    return {
        "model_spec": {"name": svc.name, "signature_name": "", "version": str(svc.version)},
        "metadata": {
            "signature_def": {
                "signature_def": {
                    "serving_default": {
                        "inputs": {n: info(n, d) for n, d in sig["inputs"].items()},
                        "outputs": {n: info(n, d) for n, d in sig["outputs"].items()},
                        "method_name": sig["method_name"],
                    }
                }
            }
        },
    }
