"""PredictionClient and ``tessera client score`` against real servers on loopback."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from serve_helpers import (
    GatedBackend,
    float_input,
    png_bytes,
    running_server,
)

from tessera import cli
from tessera.errors import TesseraError
from tessera.preprocess import preprocess
from tessera.runtime import PredictionClient, PredictionError, tfs_protos

KEY = "client-test-key-0123456789"

pytestmark = pytest.mark.usefixtures("gated")


@pytest.fixture(scope="module")
def secure(pkg, certs, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(KEY + "\n")
    with running_server(pkg, tls_cert=certs.chain, tls_key=certs.key, keys_file=keys) as srv:
        yield srv


def expected(pkg, x: np.ndarray) -> np.ndarray:
    return pkg.run({"images": x})["output_alias"]


def test_score_file_numpy_and_tensors(pkg, tmp_path) -> None:
    img = tmp_path / "img.png"
    img.write_bytes(png_bytes(11))
    with running_server(pkg) as srv, PredictionClient("127.0.0.1", srv.grpc_port) as client:
        out = client.score_file(img, input_name="images", outputs="output_alias", timeout=20)
        np.testing.assert_array_equal(
            out, expected(pkg, preprocess(img.read_bytes(), pkg.preprocess))
        )
        x = float_input(12)
        res = client.score_numpy_arrays({"images": x})
        assert set(res) == {"output_alias"}
        np.testing.assert_array_equal(res["output_alias"], expected(pkg, x))
        res = client.score_tensors({"images": tfs_protos.from_ndarray(x)}, ["output_alias"])
        np.testing.assert_array_equal(res["output_alias"], expected(pkg, x))
        meta = client.get_model_metadata()
        assert meta.model_spec.name == "tiny"
    assert repr(client).startswith("PredictionClient('127.0.0.1'")


def test_server_sees_the_access_token(secure, certs) -> None:
    """The seeds' clients never attached the token; this one does, and the server checks it."""
    before = secure.service.auth.value("primary")
    with PredictionClient(
        f"localhost:{secure.grpc_port}",
        use_ssl=True,
        access_token=KEY,
        root_certificates=certs.ca,
        service_name="tiny",
    ) as client:
        out = client.score_numpy_arrays({"images": float_input()}, "output_alias")
        assert out.shape == (1, 10)
        assert KEY not in repr(client)
    assert secure.service.auth.value("primary") == before + 1


def test_wrong_or_missing_token_is_final(secure, certs) -> None:
    for token in ("", "not-the-key-0123456789"):
        with PredictionClient(
            "localhost",
            secure.grpc_port,
            use_ssl=True,
            access_token=token,
            root_certificates=certs.ca.read_bytes(),
        ) as client:
            with pytest.raises(PredictionError) as info:
                client.score_numpy_arrays({"images": float_input()})
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert client.last_attempts == 1  # not retried


def test_invalid_argument_is_not_retried(pkg) -> None:
    with running_server(pkg) as srv, PredictionClient("127.0.0.1", srv.grpc_port) as client:
        with pytest.raises(PredictionError, match=r"INVALID_ARGUMENT.*valid input names"):
            client.score_numpy_arrays({"pixels": float_input()})
        assert client.last_attempts == 1
        with pytest.raises(PredictionError, match="not a JPEG or PNG"):
            client.score_image_bytes(b"garbage")
        assert client.last_attempts == 1


def test_unavailable_is_retried_with_backoff_until_it_succeeds(pkg) -> None:
    """Queue full -> UNAVAILABLE: the client backs off and retries, and gets its answer."""
    with running_server(pkg, backend="gated", devices=1, queue_depth=1) as srv:
        blockers = []
        with PredictionClient("127.0.0.1", srv.grpc_port) as c1:
            for i in range(2):
                t = threading.Thread(
                    target=lambda i=i: c1.score_numpy_arrays({"images": float_input(i)}, timeout=30)
                )
                t.start()
                blockers.append(t)
                if i == 0:
                    assert GatedBackend.entered.acquire(timeout=10)
            for _ in range(500):
                if srv.pool.pending() == 2:
                    break
                time.sleep(0.01)
            assert srv.pool.pending() == 2
            threading.Timer(0.4, GatedBackend.gate.set).start()  # frees the device later
            with PredictionClient(
                "127.0.0.1", srv.grpc_port, max_attempts=20, initial_backoff_s=0.05
            ) as client:
                x = float_input(7)
                out = client.score_numpy_arrays({"images": x}, "output_alias", timeout=30)
                np.testing.assert_array_equal(out, expected(pkg, x))
                assert client.last_attempts > 1
            for t in blockers:
                t.join(30)
        refused = srv.service.requests.value("grpc", "Predict", "UNAVAILABLE")
        assert refused >= 1


def test_retries_stop_at_the_attempt_limit(pkg) -> None:
    with running_server(pkg) as srv:
        port = srv.grpc_port
    # Nothing listens any more: UNAVAILABLE every time.
    with PredictionClient("127.0.0.1", port, max_attempts=3, initial_backoff_s=0.01) as client:
        with pytest.raises(PredictionError) as info:
            client.score_numpy_arrays({"images": float_input()}, timeout=10)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.attempts == 3


def test_token_over_plaintext_refused_for_remote_hosts() -> None:
    with pytest.raises(TesseraError, match="without TLS"):
        PredictionClient("example.org", 50051, access_token=KEY)


def test_cli_client_score_prints_labels(secure, certs, tmp_path, capsys, pkg) -> None:
    img = tmp_path / "cat.png"
    img.write_bytes(png_bytes(21))
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(pkg.labels) + "\n")
    argv = [
        "client",
        "score",
        f"localhost:{secure.grpc_port}",
        str(img),
        "--top",
        "3",
        "--tls-root",
        str(certs.ca),
        "--key-file",
        str(key_file),
        "--labels",
        str(labels),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    probs = expected(pkg, preprocess(img.read_bytes(), pkg.preprocess))[0]
    best = int(np.argmax(probs))
    assert out[0] == str(img) and len(out) == 4
    assert out[1].startswith("   1.") and f"class_{best} ({best})" in out[1]
    assert f"{probs[best]:7.4f}" in out[1]
    # Without the key: a clear error, status 2, no traceback.
    argv = [*argv[: argv.index("--key-file")], "--labels", str(labels)]
    assert cli.main(argv) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
