"""The scoring service against real servers on loopback: the stock TF-Serving gRPC stub and a
plain HTTP client, plain and TLS, keys, string and float inputs, every error of the matrix,
concurrency with N devices, graceful drain, metrics and logs.

Error/status matrix exercised here (gRPC code / HTTP status):

==========================  ===================  =====================================
condition                   gRPC                 REST
==========================  ===================  =====================================
unknown input name          INVALID_ARGUMENT     400 INVALID_ARGUMENT (names listed)
unknown output name         INVALID_ARGUMENT     400
undecodable image           INVALID_ARGUMENT     400
wrong float shape / dtype   INVALID_ARGUMENT     400
bad JSON / bad base64       -                    400
oversized request           RESOURCE_EXHAUSTED   413 RESOURCE_EXHAUSTED
batch over the limit        RESOURCE_EXHAUSTED   413
queue full                  UNAVAILABLE +        503 + Retry-After
                            retry-after-ms
draining                    UNAVAILABLE          503, /healthz 503
missing / wrong key         UNAUTHENTICATED      401
unknown model / version     NOT_FOUND            404
unknown signature           NOT_FOUND            404
deadline passed             DEADLINE_EXCEEDED    -
Classify (not served)       UNIMPLEMENTED        -
==========================  ===================  =====================================
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from serve_helpers import (
    GatedBackend,
    float_input,
    make_certs,
    png_bytes,
    running_server,
)

from tessera.errors import TesseraError
from tessera.preprocess import preprocess
from tessera.runtime import tfs_protos
from tessera.runtime.server import ServeOptions, Server

P = tfs_protos.protos()
KEY1 = "primary-key-0123456789abcdef"
KEY2 = "secondary-key-0123456789abcdef"
TIMEOUT = 20

pytestmark = pytest.mark.usefixtures("gated")


@pytest.fixture(scope="module")
def server(pkg):
    with running_server(pkg, devices=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"{KEY1}\n{KEY2}\n")
    return path


@pytest.fixture(scope="module")
def tls_server(pkg, certs, keys_file):
    with running_server(pkg, tls_cert=certs.chain, tls_key=certs.key, keys_file=keys_file) as srv:
        yield srv


def expected(pkg, x: np.ndarray) -> np.ndarray:
    """What the package computes for a preprocessed input, without any service in between."""
    return pkg.run({"images": x})["output_alias"]


def stub_for(srv: Server, certs=None):
    target = f"localhost:{srv.grpc_port}"
    if certs is None:
        channel = grpc.insecure_channel(target)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
        channel = grpc.secure_channel(target, creds)
    return P.prediction_service_pb2_grpc.PredictionServiceStub(channel), channel


def predict_request(value, name: str = "images", model: str = "tiny", outputs=()):
    req = P.predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.inputs[name].CopyFrom(tfs_protos.from_ndarray(value))
    req.output_filter.extend(outputs)
    return req


def rpc_error(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=TIMEOUT, **kw)
    return info.value


def rest(srv: Server, path: str) -> str:
    return f"http://127.0.0.1:{srv.rest_port}{path}"


# --------------------------------------------------------------------------- protos
def test_stock_protos_are_the_tf_serving_ones() -> None:
    svc = P.prediction_service_pb2_grpc
    assert P.predict_pb2.PredictRequest.DESCRIPTOR.full_name == "tensorflow.serving.PredictRequest"
    assert P.predict_pb2.__name__ == "tensorflow_serving.apis.predict_pb2"
    assert hasattr(svc, "PredictionServiceStub")
    assert P.tensor_pb2.TensorProto.DESCRIPTOR.full_name == "tensorflow.TensorProto"


def test_tensorflow_still_imports_after_the_light_proto_load() -> None:
    """The proto loader bypasses TF's initialiser; TF must still work in the same process."""
    code = (
        "from tessera.runtime import tfs_protos; import sys; p = tfs_protos.protos(); "
        "assert 'tensorflow.python' not in sys.modules; "
        "import tensorflow as tf; from tensorflow.core.framework import tensor_pb2; "
        "assert tensor_pb2.TensorProto is p.tensor_pb2.TensorProto; "
        "t = tf.make_tensor_proto([1.0, 2.0]); print(tf.make_ndarray(t).sum())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "3.0"


def test_tensor_conversion_round_trip_and_val_fields() -> None:
    x = float_input(1)
    np.testing.assert_array_equal(tfs_protos.to_ndarray(tfs_protos.from_ndarray(x)), x)
    assert tfs_protos.to_ndarray(tfs_protos.from_ndarray([b"a", b"bc"])) == [b"a", b"bc"]
    tp = P.tensor_pb2.TensorProto(dtype=P.types_pb2.DT_FLOAT)
    tp.tensor_shape.dim.add(size=3)
    tp.float_val.append(2.5)  # one value fills the tensor, as in TF
    np.testing.assert_array_equal(tfs_protos.to_ndarray(tp), [2.5, 2.5, 2.5])
    tp.tensor_content = b"\0" * 8
    with pytest.raises(ValueError, match="needs 12"):
        tfs_protos.to_ndarray(tp)


@pytest.mark.parametrize(
    "arrays",
    [
        {"images": float_input(2)},
        {"images": np.zeros((0, 3), np.float32)},
        {"a": np.arange(300, dtype=np.int64).reshape(3, 100), "b": np.float16([[1.5]])},
        {"images": np.arange(24, dtype=">f4").reshape(2, 3, 4)[:, ::2]},  # big-endian, strided
        {"long name " * 20: np.ones(70_000, np.float64)},  # multi-byte varint lengths
    ],
)
def test_serialized_request_equals_the_stock_one(arrays) -> None:
    """The client's wire encoding parses to the request protobuf itself would build."""
    request = predict_request([png_bytes(3)], name="jpeg", outputs=("output_alias",))
    want = P.predict_pb2.PredictRequest()
    want.CopyFrom(request)
    for name, value in arrays.items():
        want.inputs[name].CopyFrom(tfs_protos.from_ndarray(value))
    got = P.predict_pb2.PredictRequest.FromString(
        tfs_protos.serialize_predict_request(request, arrays)
    )
    assert got == want
    for name, value in arrays.items():
        np.testing.assert_array_equal(tfs_protos.to_ndarray(got.inputs[name]), value)


def _with_contents(parsed: tfs_protos.ParsedPredict):
    request = P.predict_pb2.PredictRequest()
    request.CopyFrom(parsed.request)
    for name, content in parsed.contents.items():
        request.inputs[name].tensor_content = bytes(content)
    return request


def test_request_parsed_around_tensor_data_equals_the_stock_parse() -> None:
    """The server's parser gives what ``FromString`` gives (contents as views), and fails
    where it fails, for requests of every input kind, repeated keys, cut and flipped bytes."""
    rng = np.random.default_rng(5)
    requests_ = []
    for i in range(60):
        req = predict_request(float_input(i), model="m" * (i % 3) * 90, outputs=("a", "b")[: i % 3])
        if i % 2:
            req.model_spec.version.value = 2**40 + i
        other = rng.standard_normal(rng.integers(0, 4, i % 4)).astype(
            (np.float32, np.float64, np.int32, np.uint8)[i % 4]
        )
        tfs_protos.from_ndarray(other, into=req.inputs["x"])
        tfs_protos.from_ndarray([b"jpeg", b""], into=req.inputs["s"])
        req.inputs["v"].float_val.extend([1.0, 2.0])
        requests_.append(req.SerializeToString())
    a, b = predict_request(float_input(1)), predict_request([b"x"])
    requests_ += [a.SerializeToString() + b.SerializeToString(), b.SerializeToString() * 2]
    for data in requests_:
        parsed = tfs_protos.parse_predict_request(data)
        assert _with_contents(parsed) == P.predict_pb2.PredictRequest.FromString(data)
        for _ in range(10):
            bad = bytearray(data[: rng.integers(0, len(data) + 1)])
            if bad and rng.random() < 0.5:
                bad[rng.integers(len(bad))] = rng.integers(256)
            try:
                want = P.predict_pb2.PredictRequest.FromString(bytes(bad))
            except Exception as exc:  # whatever the stock parser raises
                with pytest.raises(type(exc)):
                    tfs_protos.parse_predict_request(bytes(bad))
            else:
                assert _with_contents(tfs_protos.parse_predict_request(bytes(bad))) == want
    # Values sent unpacked (a field each): too many fields for the reader, the stock parser
    # takes the request.
    value = bytes([0x08, 0x01]) + (bytes([0x2D]) + np.float32(1.5).tobytes()) * 5000
    entry = bytes([0x0A, 6]) + b"images" + bytes([0x12]) + tfs_protos._varint(len(value)) + value
    data = bytes([0x12]) + tfs_protos._varint(len(entry)) + entry
    parsed = tfs_protos.parse_predict_request(data)
    assert parsed.contents == {} and list(parsed.request.inputs["images"].float_val) == [1.5] * 5000
    parsed = tfs_protos.parse_predict_request(a.SerializeToString())
    np.testing.assert_array_equal(
        tfs_protos.to_ndarray(parsed.request.inputs["images"], parsed.contents["images"]),
        float_input(1),
    )


# --------------------------------------------------------------------------- gRPC
def test_grpc_string_and_float_inputs(server, pkg) -> None:
    stub, ch = stub_for(server)
    with ch:
        img = png_bytes(7)
        r = stub.Predict(predict_request([img]), timeout=TIMEOUT)
        got = tfs_protos.to_ndarray(r.outputs["output_alias"])
        np.testing.assert_array_equal(got, expected(pkg, preprocess(img, pkg.preprocess)))
        assert r.model_spec.name == "tiny" and r.model_spec.version.value == 1
        x = float_input(5)
        r = stub.Predict(predict_request(x), timeout=TIMEOUT)
        np.testing.assert_array_equal(
            tfs_protos.to_ndarray(r.outputs["output_alias"]), expected(pkg, x)
        )
        # A batch of two images and an output filter naming the output.
        imgs = [png_bytes(1), png_bytes(2)]
        r = stub.Predict(predict_request(imgs, outputs=["output_alias"]), timeout=TIMEOUT)
        got = tfs_protos.to_ndarray(r.outputs["output_alias"])
        assert got.shape == (2, 10)
        for i, im in enumerate(imgs):
            np.testing.assert_array_equal(
                got[i : i + 1], expected(pkg, preprocess(im, pkg.preprocess))
            )


def test_grpc_empty_model_name_means_the_served_model(server) -> None:
    stub, ch = stub_for(server)
    with ch:
        r = stub.Predict(predict_request(float_input(), model=""), timeout=TIMEOUT)
        assert r.outputs["output_alias"].tensor_shape.dim[1].size == 10


def test_grpc_model_metadata(server) -> None:
    stub, ch = stub_for(server)
    with ch:
        req = P.get_model_metadata_pb2.GetModelMetadataRequest()
        req.model_spec.name = "tiny"
        req.metadata_field.append("signature_def")
        r = stub.GetModelMetadata(req, timeout=TIMEOUT)
        sdm = P.get_model_metadata_pb2.SignatureDefMap()
        assert r.metadata["signature_def"].Unpack(sdm)
        sig = sdm.signature_def["serving_default"]
        assert sig.method_name == "tensorflow/serving/predict"
        assert sig.inputs["images"].dtype == P.types_pb2.DT_STRING
        assert [d.size for d in sig.outputs["output_alias"].tensor_shape.dim] == [-1, 10]
        del req.metadata_field[:]
        err = rpc_error(stub.GetModelMetadata, req)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("request_args", "code", "message"),
    [
        ({"name": "pixels"}, grpc.StatusCode.INVALID_ARGUMENT, "valid input names: 'images'"),
        (
            {"outputs": ["logits"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "valid outputs: 'output_alias'",
        ),
        ({"value": [b"not an image"]}, grpc.StatusCode.INVALID_ARGUMENT, "not a JPEG or PNG"),
        ({"value": np.zeros((1, 8, 8, 3), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        ({"value": np.zeros(3, np.int64)}, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        ({"model": "resnet"}, grpc.StatusCode.NOT_FOUND, "serves 'tiny'"),
        ({"value": [b"x"] * 40}, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 32"),
    ],
)
def test_grpc_error_matrix(server, request_args, code, message) -> None:
    args = {"value": float_input(), **request_args}
    value = args.pop("value")
    stub, ch = stub_for(server)
    with ch:
        err = rpc_error(stub.Predict, predict_request(value, **args))
    assert err.code() == code, err.details()
    assert message in err.details()
    assert "Traceback" not in err.details()


def test_grpc_unknown_signature_version_and_unimplemented(server) -> None:
    stub, ch = stub_for(server)
    with ch:
        req = predict_request(float_input())
        req.model_spec.signature_name = "classify_images"
        assert rpc_error(stub.Predict, req).code() == grpc.StatusCode.NOT_FOUND
        req = predict_request(float_input())
        req.model_spec.version.value = 7
        err = rpc_error(stub.Predict, req)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "version 7" in err.details()
        creq = P.get_model_metadata_pb2.GetModelMetadataRequest()
        classify = ch.unary_unary(
            "/tensorflow.serving.PredictionService/Classify",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        assert rpc_error(classify, creq).code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_oversized_request_is_resource_exhausted(pkg) -> None:
    with running_server(pkg, max_request_bytes=64 << 10) as srv:
        stub, ch = stub_for(srv)
        with ch:
            err = rpc_error(stub.Predict, predict_request([b"\xff\xd8\xff" + b"\0" * (100 << 10)]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_deadline_exceeded(pkg) -> None:
    with running_server(pkg, backend="gated") as srv:
        stub, ch = stub_for(srv)
        with ch:
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(predict_request(float_input()), timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            GatedBackend.gate.set()


def test_queue_full_is_unavailable_with_retry_advice(pkg) -> None:
    with running_server(pkg, backend="gated", devices=1, queue_depth=1) as srv:
        stub, ch = stub_for(srv)
        with ch, ThreadPoolExecutor(2) as ex:
            first = ex.submit(stub.Predict, predict_request(float_input(0)), timeout=TIMEOUT)
            assert GatedBackend.entered.acquire(timeout=10)
            second = ex.submit(stub.Predict, predict_request(float_input(1)), timeout=TIMEOUT)
            for _ in range(500):
                if srv.pool.pending() == 2:
                    break
                time.sleep(0.01)
            err = rpc_error(stub.Predict, predict_request(float_input(2)))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "full" in err.details() and "retry" in err.details()
            advice = dict(err.trailing_metadata())
            assert int(advice["retry-after-ms"]) >= 1
            r = requests.post(
                rest(srv, "/v1/models/tiny:predict"),
                json={"inputs": float_input(3).tolist()},
                timeout=TIMEOUT,
            )
            assert r.status_code == 503 and r.json()["code"] == "UNAVAILABLE"
            assert int(r.headers["Retry-After"]) >= 1
            GatedBackend.gate.set()
            assert first.result(TIMEOUT).outputs["output_alias"].tensor_shape.dim[0].size == 1
            assert second.result(TIMEOUT)


# --------------------------------------------------------------------------- REST
def test_rest_predict_row_and_columnar(server, pkg) -> None:
    img = png_bytes(3)
    want_img = expected(pkg, preprocess(img, pkg.preprocess))
    b64 = base64.b64encode(img).decode()
    r = requests.post(
        rest(server, "/v1/models/tiny:predict"), json={"instances": [{"b64": b64}]}, timeout=TIMEOUT
    )
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.float32(r.json()["predictions"]), want_img)
    # Named row instances, and the versioned path.
    r = requests.post(
        rest(server, "/v1/models/tiny/versions/1:predict"),
        json={"instances": [{"images": {"b64": b64}}, {"images": {"b64": b64}}]},
        timeout=TIMEOUT,
    )
    assert np.float32(r.json()["predictions"]).shape == (2, 10)
    x = float_input(9)
    r = requests.post(
        rest(server, "/v1/models/tiny:predict"), json={"inputs": x.tolist()}, timeout=TIMEOUT
    )
    np.testing.assert_array_equal(np.float32(r.json()["outputs"]), expected(pkg, x))
    r = requests.post(
        rest(server, "/v1/models/tiny:predict"),
        json={"instances": x.tolist(), "signature_name": "serving_default"},
        timeout=TIMEOUT,
    )
    np.testing.assert_array_equal(np.float32(r.json()["predictions"]), expected(pkg, x))


def test_rest_status_metadata_health(server) -> None:
    r = requests.get(rest(server, "/v1/models/tiny"), timeout=TIMEOUT).json()
    assert r["model_version_status"][0]["state"] == "AVAILABLE"
    meta = requests.get(rest(server, "/v1/models/tiny/metadata"), timeout=TIMEOUT).json()
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["images"]["dtype"] == "DT_STRING"
    h = requests.get(rest(server, "/healthz"), timeout=TIMEOUT)
    assert h.status_code == 200 and h.json()["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"instances": [{"pixels": [1]}]}, 400, "valid input names: 'images'"),
        ({"inputs": {"pixels": [1]}}, 400, "valid input names: 'images'"),
        ({"instances": [{"b64": base64.b64encode(b"junk").decode()}]}, 400, "not a JPEG or PNG"),
        ({"instances": [{"b64": "%%%"}]}, 400, "not valid base64"),
        ({"instances": [[1, 2], [3]]}, 400, "shapes"),
        ({"inputs": [[1.0, 2.0]]}, 400, "expected [batch, 16, 16, 3]"),
        ({"instances": []}, 400, "non-empty"),
        ({"instances": [1], "inputs": [1]}, 400, "exactly one"),
        ({"inputs": [[1.0]], "output_filter": ["x"]}, 400, "valid outputs"),
        ({"inputs": [[1.0]], "signature_name": "other"}, 404, "signature 'other' not found"),
        ({"instances": [{"b64": "aGk="}] * 33}, 413, "limit of 32"),
    ],
)
def test_rest_error_matrix(server, body, status, message) -> None:
    r = requests.post(rest(server, "/v1/models/tiny:predict"), json=body, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert "Traceback" not in r.text


def test_rest_routes_bad_json_and_model_errors(server) -> None:
    url = rest(server, "/v1/models/tiny:predict")
    r = requests.post(url, data=b"{not json", timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["code"] == "INVALID_ARGUMENT"
    r = requests.post(rest(server, "/v1/models/resnet:predict"), json={"inputs": [1]}, timeout=10)
    assert r.status_code == 404 and "serves 'tiny'" in r.json()["error"]
    assert requests.get(rest(server, "/v1/models/tiny/versions/2"), timeout=10).status_code == 404
    assert requests.get(rest(server, "/nope"), timeout=10).status_code == 404
    assert requests.get(url, timeout=10).status_code == 404


def test_rest_oversized_body_refused_before_reading(pkg) -> None:
    with running_server(pkg, max_request_bytes=1 << 16) as srv:
        r = requests.post(
            rest(srv, "/v1/models/tiny:predict"),
            data=b"{" + b" " * (1 << 17) + b"}",
            headers={"Content-Type": "application/json"},
            timeout=TIMEOUT,
        )
    assert r.status_code == 413
    assert r.json()["code"] == "RESOURCE_EXHAUSTED" and "exceeds the limit" in r.json()["error"]


# --------------------------------------------------------------------------- TLS and keys
def test_keys_require_tls_unless_the_dev_flag(pkg, keys_file) -> None:
    with pytest.raises(TesseraError, match="access keys need TLS"):
        Server(pkg, ServeOptions(keys_file=keys_file))
    with pytest.raises(TesseraError, match="both --tls-cert"):
        Server(pkg, ServeOptions(tls_cert=keys_file))
    with running_server(pkg, keys_file=keys_file, allow_insecure_keys=True) as srv:
        stub, ch = stub_for(srv)
        with ch:
            md = (("authorization", f"Bearer {KEY1}"),)
            assert stub.Predict(predict_request(float_input()), timeout=TIMEOUT, metadata=md)


def test_tls_with_keys_grpc(tls_server, certs) -> None:
    stub, ch = stub_for(tls_server, certs)
    with ch:
        req = predict_request(float_input())
        for key in (KEY1, KEY2):
            md = (("authorization", f"Bearer {key}"),)
            r = stub.Predict(req, timeout=TIMEOUT, metadata=md)
            assert r.outputs["output_alias"].tensor_shape.dim[1].size == 10
        for md in (
            (),
            (("authorization", "Bearer wrong-key-0123456789abcdef"),),
            (("authorization", KEY1),),
        ):
            err = rpc_error(stub.Predict, req, metadata=md)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert KEY1 not in err.details()
        # An unauthenticated caller learns nothing about the model, even with a bad request.
        err = rpc_error(stub.Predict, predict_request(float_input(), name="nope"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    auth = tls_server.service.auth
    assert auth.value("primary") >= 1 and auth.value("secondary") >= 1
    assert auth.value("missing") >= 2 and auth.value("invalid") >= 2


def test_tls_rejects_plaintext_and_unknown_roots(tls_server, tmp_path) -> None:
    stub, ch = stub_for(tls_server)  # plaintext to a TLS port
    with ch:
        assert rpc_error(stub.Predict, predict_request(float_input())).code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.INTERNAL,
        )
    other = make_certs(tmp_path)  # a different CA: the server's chain is not trusted
    stub, ch = stub_for(tls_server, other)
    with ch:
        err = rpc_error(stub.Predict, predict_request(float_input()))
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_with_keys_rest(tls_server, certs) -> None:
    base = f"https://localhost:{tls_server.rest_port}"
    url = f"{base}/v1/models/tiny:predict"
    body = {"inputs": float_input().tolist()}
    ca = str(certs.ca)
    with requests.Session() as session:  # one kept-alive connection through refusals
        for headers in ({}, {"Authorization": "Bearer nope-nope-nope-nope-nope"}):
            r = session.post(url, json=body, headers=headers, verify=ca, timeout=TIMEOUT)
            assert r.status_code == 401 and r.json()["code"] == "UNAUTHENTICATED"
            ok = session.post(
                url,
                json=body,
                headers={"Authorization": f"Bearer {KEY2}"},
                verify=ca,
                timeout=TIMEOUT,
            )
            assert ok.status_code == 200
    # Health and metrics need no key.
    assert requests.get(f"{base}/healthz", verify=ca, timeout=TIMEOUT).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{base}/healthz", timeout=TIMEOUT)  # system roots do not trust it
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://localhost:{tls_server.rest_port}/healthz", timeout=TIMEOUT)


def test_keys_rotate_on_reload_and_bad_files_keep_old_keys(pkg, certs, tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY1}\n")
    with running_server(pkg, tls_cert=certs.chain, tls_key=certs.key, keys_file=keys) as srv:
        stub, ch = stub_for(srv, certs)
        with ch:
            req = predict_request(float_input())

            def code(key: str) -> grpc.StatusCode:
                try:
                    stub.Predict(
                        req, timeout=TIMEOUT, metadata=(("authorization", f"Bearer {key}"),)
                    )
                    return grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    return exc.code()

            assert code(KEY1) == grpc.StatusCode.OK
            assert code(KEY2) == grpc.StatusCode.UNAUTHENTICATED
            keys.write_text(f"{KEY2}\n{KEY1}\n")  # rotate: new primary, old one still valid
            assert srv.reload_keys()
            assert code(KEY2) == grpc.StatusCode.OK and code(KEY1) == grpc.StatusCode.OK
            keys.write_text("short\n")
            assert not srv.reload_keys()  # refused; previous keys stay in force
            assert code(KEY2) == grpc.StatusCode.OK
            keys.write_text(f"{KEY2}\n")
            assert srv.reload_keys()
            assert code(KEY1) == grpc.StatusCode.UNAUTHENTICATED


def test_keys_never_logged(pkg, certs, keys_file, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="tessera.serve")
    logger = logging.getLogger("tessera.serve")
    logger.addHandler(caplog.handler)  # the service logger does not propagate once configured
    try:
        with running_server(
            pkg, tls_cert=certs.chain, tls_key=certs.key, keys_file=keys_file
        ) as srv:
            stub, ch = stub_for(srv, certs)
            with ch:
                for key in (KEY1, "Bearer-guess-0123456789abcdef"):
                    md = (("authorization", f"Bearer {key}"),)
                    try:
                        stub.Predict(predict_request(float_input()), timeout=TIMEOUT, metadata=md)
                    except grpc.RpcError:
                        pass
            url = f"https://localhost:{srv.rest_port}/v1/models/tiny:predict"
            requests.post(
                url,
                json={"inputs": [1]},
                headers={"Authorization": f"Bearer {KEY2}"},
                verify=str(certs.ca),
                timeout=TIMEOUT,
            )
            srv.reload_keys()
    finally:
        logger.removeHandler(caplog.handler)
    text = "\n".join(r.getMessage() + json.dumps(getattr(r, "fields", {})) for r in caplog.records)
    assert "request" in text and "primary" in text
    for secret in (KEY1, KEY2, "Bearer-guess"):
        assert secret not in text


# --------------------------------------------------------------------------- load and shutdown
def test_concurrent_clients_get_their_own_answers(pkg) -> None:
    """Many clients on both protocols, 2 devices: every response matches its own request."""
    n = 48
    inputs = [float_input(1000 + i) for i in range(n)]
    want = [expected(pkg, x) for x in inputs]
    with running_server(pkg, devices=2, queue_depth=64) as srv:
        stub, ch = stub_for(srv)
        session = requests.Session()

        def call(i: int) -> np.ndarray:
            if i % 2:
                r = stub.Predict(predict_request(inputs[i]), timeout=60)
                return tfs_protos.to_ndarray(r.outputs["output_alias"])
            r = requests.post(
                rest(srv, "/v1/models/tiny:predict"),
                json={"inputs": inputs[i].tolist()},
                timeout=60,
            )
            return np.float32(r.json()["outputs"])

        with ch, ThreadPoolExecutor(16) as ex:
            got = list(ex.map(call, range(n)))
        session.close()
        runs = [s.runs for s in srv.pool.stats()]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert sum(runs) == n and min(runs) > 0


def test_graceful_shutdown_drains_in_flight_requests(pkg) -> None:
    srv = Server(pkg, ServeOptions(grpc_port=0, rest_port=0, backend="gated", grace_s=10))
    srv.start()
    try:
        stub, ch = stub_for(srv)
        with ch, ThreadPoolExecutor(2) as ex:
            inflight = ex.submit(stub.Predict, predict_request(float_input(4)), timeout=TIMEOUT)
            assert GatedBackend.entered.acquire(timeout=10)
            stopper = threading.Thread(target=srv.stop)
            stopper.start()
            for _ in range(500):
                if srv.service.draining:
                    break
                time.sleep(0.01)
            # While draining: health says so, new requests are refused with UNAVAILABLE.
            h = requests.get(rest(srv, "/healthz"), timeout=TIMEOUT)
            assert h.status_code == 503
            r = requests.post(
                rest(srv, "/v1/models/tiny:predict"),
                json={"inputs": float_input().tolist()},
                timeout=TIMEOUT,
            )
            assert r.status_code == 503
            GatedBackend.gate.set()
            response = inflight.result(TIMEOUT)  # the in-flight request completed
            stopper.join(TIMEOUT)
            assert not stopper.is_alive()
        np.testing.assert_array_equal(
            tfs_protos.to_ndarray(response.outputs["output_alias"]), expected(pkg, float_input(4))
        )
    finally:
        GatedBackend.gate.set()
        srv.stop(1)


def test_metrics_and_structured_logs(server) -> None:
    requests.post(
        rest(server, "/v1/models/tiny:predict"),
        json={"inputs": float_input().tolist()},
        timeout=TIMEOUT,
    )
    requests.post(rest(server, "/v1/models/tiny:predict"), json={"inputs": [1]}, timeout=TIMEOUT)
    r = requests.get(rest(server, "/metrics"), timeout=TIMEOUT)
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'tessera_requests_total{protocol="rest",method="Predict",code="OK"}' in text
    assert 'code="INVALID_ARGUMENT"' in text
    assert (
        'tessera_request_latency_seconds_bucket{protocol="rest",method="Predict",le="+Inf"}' in text
    )
    assert 'tessera_queue_depth{device="sim:0"} 0' in text
    assert 'tessera_device_busy_seconds_total{device="sim:1"}' in text
    assert "tessera_npu_cycles_total" in text


def test_json_log_lines() -> None:
    from tessera.runtime.service import JsonFormatter

    rec = logging.LogRecord("tessera.serve", logging.INFO, __file__, 1, "request", (), None)
    rec.fields = {"event": "request", "code": "OK", "latency_ms": 1.5}
    line = json.loads(JsonFormatter().format(rec))
    assert line["event"] == "request" and line["code"] == "OK" and line["level"] == "info"


def test_tls_config_errors(pkg, tmp_path, certs) -> None:
    with pytest.raises(TesseraError, match="cannot read TLS file"):
        Server(pkg, ServeOptions(tls_cert=tmp_path / "none.pem", tls_key=certs.key))
    with pytest.raises(TesseraError, match="not a usable PEM pair"):
        Server(pkg, ServeOptions(tls_cert=certs.ca, tls_key=certs.key))
    assert isinstance(ssl.create_default_context(cafile=str(certs.ca)), ssl.SSLContext)


@pytest.mark.slow
def test_resnet50_package_over_grpc_and_rest() -> None:
    """The seeds' model end to end: a JPEG through both protocols, bit-exact with the package
    run locally, and the cycle count of the run reported to the client."""
    from tessera.heads import cached_featurizer
    from tessera.package import build_package

    feat, head = cached_featurizer("resnet50")
    pkg = build_package(feat, head=head, name="resnet50")
    jpeg = _photo_jpeg(pkg.preprocess.size)
    want = pkg.run({"images": pkg.preprocess_image(jpeg)})["output_alias"]
    with running_server(pkg) as srv:
        stub, ch = stub_for(srv)
        with ch:
            response, call = stub.Predict.with_call(
                predict_request([jpeg], model="resnet50"), timeout=300
            )
        got = tfs_protos.to_ndarray(response.outputs["output_alias"])
        np.testing.assert_array_equal(got, want)
        assert got.shape == (1, 1000)
        cycles = int(dict(call.trailing_metadata())["x-npu-cycles"])
        assert cycles > 1_000_000
        r = requests.post(
            rest(srv, "/v1/models/resnet50:predict"),
            json={"instances": [{"b64": base64.b64encode(jpeg).decode()}]},
            timeout=300,
        )
        assert r.status_code == 200
        np.testing.assert_array_equal(np.float32(r.json()["predictions"]), want)


def _photo_jpeg(size: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((size + 40, size + 20), Image.BILINEAR).save(buf, "JPEG")
    return buf.getvalue()


def test_bench_serve_runs_bounded_and_reports_every_path(capsys) -> None:
    from tessera import cli

    argv = [
        "bench",
        "serve",
        "--repeat",
        "3",
        "--requests",
        "4",
        "--clients",
        "1,2",
        "--devices",
        "1",
        "--json",
    ]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["latency"]) == {
        "direct device call (float)",
        "gRPC Predict (float)",
        "bare gRPC floor (same bytes, no service)",
        "REST :predict (float, JSON)",
        "direct: preprocess + device (JPEG)",
        "gRPC Predict (JPEG)",
        "REST :predict (JPEG, b64)",
    }
    assert all(v["p99_ms"] >= v["p50_ms"] > 0 for v in out["latency"].values())
    assert out["latency_client"] == "separate process"
    assert len(out["load_average_1min"]) == 2 and out["cpus"] >= 1
    cells = {(c["devices"], c["clients"]): c for c in out["throughput"]}
    assert set(cells) == {(1, 1), (1, 2)}
    assert all(c["requests"] == 4 and c["errors"] == 0 for c in cells.values())
