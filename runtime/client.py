"""``PredictionClient``: the seeds' client API for a TF-Serving ``Predict`` endpoint.

Same constructor and methods as the seeds' client (``score_file``, ``score_numpy_arrays``,
``score_tensors``), with two things it got wrong fixed:

* the access token is actually sent, as ``authorization: Bearer <key>`` call metadata on
  every request (the old clients built the metadata and then never attached it);
* retries: UNAVAILABLE and DEADLINE_EXCEEDED are retried with exponential back-off and
  jitter, honouring the server's ``retry-after-ms`` advice, within the call's overall
  timeout; INVALID_ARGUMENT and every other code are final, because repeating a bad request
  cannot make it good.

With ``use_ssl`` the channel is TLS; ``root_certificates`` (PEM bytes or a path) lets a
development client trust a self-signed chain.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tessera.errors import TesseraError
from tessera.runtime import tfs_protos

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
DEFAULT_GRPC_PORT = 50051
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"


class PredictionError(TesseraError):
    """A request failed with a final status (or retries ran out); ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str, attempts: int) -> None:
        super().__init__(
            f"{code.name}: {details}" + (f" (after {attempts} attempts)" if attempts > 1 else "")
        )
        self.code = code
        self.details = details
        self.attempts = attempts


class PredictionClient:
    """A gRPC client of ``tensorflow.serving.PredictionService/Predict``.

    ``address`` is a host name or ``host:port``; ``port`` overrides the port (default 50051,
    or 443 with ``use_ssl`` and no port anywhere, as a hosted endpoint would have).
    ``service_name`` is the model name sent in ``model_spec`` (empty: the server's model).
    """

    def __init__(
        self,
        address: str,
        port: int | None = None,
        use_ssl: bool = False,
        access_token: str = "",
        service_name: str = "",
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        *,
        max_attempts: int = 5,
        initial_backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        host, parsed_port = _split_address(address)
        self.host = host
        self.port = port or parsed_port or (443 if use_ssl else DEFAULT_GRPC_PORT)
        self.use_ssl = use_ssl
        self.service_name = service_name
        self.max_attempts = max(1, max_attempts)
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {access_token}"),) if access_token else ()
        )
        target = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        options = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            *channel_options,
        ]
        if use_ssl:
            roots = _read_roots(root_certificates)
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            if access_token and host not in ("localhost", "127.0.0.1", "::1"):
                raise TesseraError(
                    "refusing to send an access token without TLS to a non-loopback host; "
                    "pass use_ssl=True"
                )
            self._channel = grpc.insecure_channel(target, options=options)
        self._protos = tfs_protos.protos()
        self._stub = self._protos.prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        # Predict as the stock stub calls it, but taking requests already serialised.
        self._predict_bytes = self._channel.unary_unary(
            PREDICT_METHOD,
            request_serializer=None,
            response_deserializer=self._protos.predict_pb2.PredictResponse.FromString,
        )
        #: gRPC status of the last call's attempts, for diagnostics and tests.
        self.last_attempts = 0

    def __repr__(self) -> str:  # never the token
        auth = ", access_token=<set>" if self._metadata else ""
        return f"PredictionClient({self.host!r}, {self.port}, use_ssl={self.use_ssl}{auth})"

    # ------------------------------------------------------------------ API
    def score_file(
        self,
        path: str | os.PathLike[str],
        input_name: str = "images",
        outputs: str | Sequence[str] | None = None,
        timeout: float = 10.0,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Send an encoded image file (JPEG/PNG) as a DT_STRING [1] tensor."""
        data = Path(path).read_bytes()
        return self._score({input_name: [data]}, outputs, timeout)

    def score_image_bytes(
        self,
        data: bytes,
        input_name: str = "images",
        outputs: str | Sequence[str] | None = None,
        timeout: float = 10.0,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Send encoded image bytes as a DT_STRING [1] tensor."""
        return self._score({input_name: [data]}, outputs, timeout)

    def score_numpy_arrays(
        self,
        input_map: Mapping[str, np.ndarray],
        outputs: str | Sequence[str] | None = None,
        timeout: float = 10.0,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Send preprocessed float arrays (e.g. ``{"images": x}`` with x [1,224,224,3])."""
        return self._score({k: np.asarray(v) for k, v in input_map.items()}, outputs, timeout)

    def score_tensors(
        self,
        input_map: Mapping[str, Any],
        outputs: str | Sequence[str] | None = None,
        timeout: float = 10.0,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Send ``TensorProto`` inputs; one output name gives its array, else a dict."""
        request = self._request(outputs)
        for name, tensor in input_map.items():
            request.inputs[name].CopyFrom(tensor)
        return self._predict(request.SerializeToString(), outputs, timeout)

    def _score(
        self,
        values: Mapping[str, np.ndarray | list[bytes]],
        outputs: str | Sequence[str] | None,
        timeout: float,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Lists of encoded images go into the request's tensors; arrays are serialised
        around their own data, copied once (see ``tfs_protos.serialize_predict_request``)."""
        request = self._request(outputs)
        arrays: dict[str, np.ndarray] = {}
        for name, value in values.items():
            if isinstance(value, list):
                tfs_protos.from_ndarray(value, into=request.inputs[name])
            else:
                arrays[name] = value
        data = tfs_protos.serialize_predict_request(request, arrays)
        return self._predict(data, outputs, timeout)

    def _request(self, outputs: str | Sequence[str] | None) -> Any:
        request = self._protos.predict_pb2.PredictRequest()
        request.model_spec.name = self.service_name
        request.output_filter.extend([outputs] if isinstance(outputs, str) else outputs or [])
        return request

    def _predict(
        self, request: bytes, outputs: str | Sequence[str] | None, timeout: float
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Send a serialised ``PredictRequest``; the outputs as arrays."""
        response = self._call(self._predict_bytes, request, timeout)
        result = {k: np.asarray(tfs_protos.to_ndarray(v)) for k, v in response.outputs.items()}
        if isinstance(outputs, str):
            return result[outputs]
        return result

    def get_model_metadata(self, timeout: float = 10.0) -> Any:
        """The stock ``GetModelMetadataResponse`` (signature_def)."""
        p = self._protos
        request = p.get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = self.service_name
        request.metadata_field.append("signature_def")
        return self._call(self._stub.GetModelMetadata, request, timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ retries
    def _call(self, method: Any, request: Any, timeout: float) -> Any:
        """Call with retries on UNAVAILABLE/DEADLINE_EXCEEDED until ``timeout`` is used up."""
        end = time.monotonic() + timeout
        backoff = self.initial_backoff_s
        attempt = 0
        while True:
            attempt += 1
            self.last_attempts = attempt
            left = end - time.monotonic()
            if left <= 0:
                raise PredictionError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout} s", attempt - 1
                )
            try:
                return method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()
                details = exc.details() or ""
                if code not in RETRYABLE or attempt >= self.max_attempts:
                    raise PredictionError(code, details, attempt) from None
                pause = backoff * (0.5 + random.random())
                advice = _retry_advice(exc)
                if advice is not None:
                    pause = max(pause, advice)
                if time.monotonic() + pause >= end:
                    raise PredictionError(code, details, attempt) from None
                time.sleep(pause)
                backoff = min(backoff * 2, self.max_backoff_s)


def _retry_advice(exc: grpc.RpcError) -> float | None:
    try:
        trailing = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:
        return None
    for key, value in trailing:
        if key == "retry-after-ms":
            try:
                return min(float(value) / 1e3, 10.0)
            except ValueError:
                return None
    return None


def _split_address(address: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port``; a scheme prefix (grpc://) is dropped."""
    address = address.split("://", 1)[-1].rstrip("/")
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:
        host, port = address, ""
    if port and not port.isdigit():
        raise TesseraError(f"bad port in address {address!r}")
    return host, int(port) if port else None


def _read_roots(roots: bytes | str | os.PathLike[str] | None) -> bytes | None:
    if roots is None or isinstance(roots, bytes):
        return roots
    try:
        return Path(roots).read_bytes()
    except OSError as exc:
        raise TesseraError(f"cannot read root certificates {roots}: {exc.strerror}") from None
