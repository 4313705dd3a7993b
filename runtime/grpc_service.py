"""gRPC front end: ``tensorflow.serving.PredictionService`` with the stock protos.

``Predict`` and ``GetModelMetadata`` are implemented; ``Classify``, ``Regress`` and
``MultiInference`` answer UNIMPLEMENTED (the stock servicer base class does that), as the
seeds' service supported Predict only. Authentication happens before anything of the
request is looked at, so an unauthenticated caller learns nothing about the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from tessera.runtime import tfs_protos
from tessera.runtime.keys import KeyStore
from tessera.runtime.service import Code, ModelService, ServiceError, new_request_id

log = logging.getLogger("tessera.serve")

_GRPC_CODES = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}

#: Trailing metadata key carrying the server's back-off advice on UNAVAILABLE.
RETRY_AFTER_KEY = "retry-after-ms"


def make_servicer(service: ModelService, keys: Callable[[], KeyStore | None]) -> Any:
    """A ``PredictionServiceServicer`` for ``service``; ``keys()`` gives the current key store."""
    p = tfs_protos.protos()
    base = p.prediction_service_pb2_grpc.PredictionServiceServicer

    class Servicer(base):  # type: ignore[misc, valid-type]
        def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
            return _handle(
                service, keys(), context, "Predict", lambda: _predict(service, request, context)
            )

        def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
            return _handle(
                service, keys(), context, "GetModelMetadata", lambda: _metadata(service, request)
            )

    return Servicer()


def _handle(
    service: ModelService,
    keys: KeyStore | None,
    context: grpc.ServicerContext,
    method: str,
    body: Callable[[], Any],
) -> Any:
    start = time.perf_counter()
    request_id = new_request_id()
    code = Code.OK
    fields: dict[str, Any] = {"request_id": request_id, "peer": context.peer()}
    counted = False
    try:
        if keys is not None:
            meta = dict(context.invocation_metadata())
            result = keys.check(meta.get("authorization"))
            service.auth.inc(result.value)
            fields["auth"] = result.value
            if not result.ok:
                raise ServiceError(
                    Code.UNAUTHENTICATED,
                    "missing or invalid access key: send metadata 'authorization: Bearer <key>'",
                )
        service.begin()
        counted = True
        return body()
    except ServiceError as exc:
        code = exc.code
        fields["error"] = exc.message
        trailing = [("x-request-id", request_id)]
        if exc.retry_after_s is not None:
            trailing.append((RETRY_AFTER_KEY, str(max(1, round(exc.retry_after_s * 1e3)))))
        context.set_trailing_metadata(tuple(trailing))
        context.abort(_GRPC_CODES[exc.code], exc.message)
    except Exception:
        # A bug: the traceback goes to the log, the caller gets the request id only.
        code = Code.INTERNAL
        log.exception("internal error in %s (request id %s)", method, request_id)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
    finally:
        if counted:
            service.end()
        service.record("grpc", method, code, time.perf_counter() - start, **fields)


def _predict(service: ModelService, request: Any, context: grpc.ServicerContext) -> Any:
    """``request``: a :class:`~tessera.runtime.tfs_protos.ParsedPredict` (as this server
    registers Predict) or a plain ``PredictRequest``."""
    p = tfs_protos.protos()
    if not isinstance(request, tfs_protos.ParsedPredict):
        request = tfs_protos.ParsedPredict(request, {})
    contents = request.contents
    request = request.request
    spec = request.model_spec
    version = spec.version.value if spec.HasField("version") else None
    service.check_model(spec.name, version)
    service.check_signature(spec.signature_name)
    inputs = {}
    for name, tp in request.inputs.items():
        try:
            inputs[name] = tfs_protos.to_ndarray(tp, contents.get(name))
        except ValueError as exc:
            raise ServiceError(Code.INVALID_ARGUMENT, f"input {name!r}: {exc}") from None
    remaining = context.time_remaining()
    result = service.predict(inputs, list(request.output_filter), remaining)
    response = p.predict_pb2.PredictResponse()
    _fill_spec(service, response.model_spec)
    for name, value in result.outputs.items():
        tfs_protos.from_ndarray(value, into=response.outputs[name])
    cycles = sum(r.cycles for r in result.runs)
    context.set_trailing_metadata((("x-npu-cycles", str(cycles)),))
    return response


def _fill_spec(service: ModelService, spec: Any) -> None:
    spec.name = service.name
    spec.version.value = service.version
    spec.signature_name = "serving_default"


def _metadata(service: ModelService, request: Any) -> Any:
    p = tfs_protos.protos()
    spec = request.model_spec
    version = spec.version.value if spec.HasField("version") else None
    service.check_model(spec.name, version)
    fields = list(request.metadata_field)
    if fields != ["signature_def"]:
        raise ServiceError(
            Code.INVALID_ARGUMENT,
            f"metadata_field must be ['signature_def'] (the only metadata served), got {fields}",
        )
    t = p.types_pb2
    sig = service.signature()
    sdm = p.get_model_metadata_pb2.SignatureDefMap()
    sd = sdm.signature_def["serving_default"]
    sd.method_name = sig["method_name"]
    for name, info in sig["inputs"].items():
        ti = sd.inputs[name]
        ti.name = name
        ti.dtype = t.DT_STRING
        for d in info["shape"]:
            ti.tensor_shape.dim.add(size=d)
    for name, info in sig["outputs"].items():
        ti = sd.outputs[name]
        ti.name = name
        ti.dtype = t.DT_FLOAT
        for d in info["shape"]:
            ti.tensor_shape.dim.add(size=d)
    response = p.get_model_metadata_pb2.GetModelMetadataResponse()
    _fill_spec(service, response.model_spec)
    response.metadata["signature_def"].Pack(sdm)
    return response


def build_server(
    servicer: Any,
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    tls: tuple[bytes, bytes] | None,
    workers: int = 16,
) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) gRPC server and the port it bound.

    Messages over ``max_message_bytes`` are refused by gRPC itself with
    RESOURCE_EXHAUSTED before any of our code runs.
    """
    p = tfs_protos.protos()
    # Predict with the request parsed around its tensor data (no copies of it); the stock
    # registration below serves the other methods (generic handlers answer in order).
    predict = grpc.unary_unary_rpc_method_handler(
        servicer.Predict,
        request_deserializer=tfs_protos.parse_predict_request,
        response_serializer=p.predict_pb2.PredictResponse.SerializeToString,
    )
    service_name = "tensorflow.serving.PredictionService"
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tessera-grpc"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service_name, {"Predict": predict}),)
    )
    p.prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if tls is not None:
        chain, key = tls
        creds = grpc.ssl_server_credentials([(key, chain)])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise ServiceError(Code.UNAVAILABLE, f"cannot bind gRPC port {address}")
    return server, bound
