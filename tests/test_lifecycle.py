"""deploy / services list / services delete with real background servers on loopback."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests
from serve_helpers import float_input, real_tiny_package

from tessera import cli
from tessera.runtime import lifecycle

KEY1 = "lifecycle-key-one-0123456789"
KEY2 = "lifecycle-key-two-0123456789"


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A private state folder; every service deployed in the test is deleted afterwards."""
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path / "state"))
    yield tmp_path / "state"
    for rec, _ in lifecycle.list_services():
        lifecycle.delete(rec.name, grace=5)


@pytest.fixture(scope="module")
def package_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pkg") / "tiny.tpkg"
    real_tiny_package().save(path)
    return path


def deploy(package_file: Path, name: str, *extra: str) -> int:
    return cli.main(
        [
            "deploy",
            str(package_file),
            "--name",
            name,
            "--grpc-port",
            "0",
            "--rest-port",
            "0",
            "--start-timeout",
            "60",
            *extra,
        ]
    )


def listed(capsys) -> dict[str, dict]:
    assert cli.main(["services", "list", "--json"]) == 0
    return {s["name"]: s for s in json.loads(capsys.readouterr().out)["services"]}


def predict(rec: dict, headers: dict | None = None) -> requests.Response:
    url = f"http://127.0.0.1:{rec['rest_port']}/v1/models/{rec['name']}:predict"
    return requests.post(url, json={"inputs": float_input().tolist()}, headers=headers, timeout=30)


def test_deploy_list_delete_and_one_model_per_device(state, package_file, capsys) -> None:
    assert deploy(package_file, "alpha") == 0
    assert "deployed alpha" in capsys.readouterr().out
    services = listed(capsys)
    alpha = services["alpha"]
    assert alpha["state"] == "running" and alpha["devices"] == ["sim:0"]
    assert alpha["model"] == str(package_file.resolve())
    assert predict(alpha).status_code == 200

    # A second model on the busy device is refused, naming the holder and a free device.
    assert deploy(package_file, "beta") == 2
    err = capsys.readouterr().err
    assert "device sim:0 is busy" in err and "'alpha'" in err and "--device sim:1" in err
    assert "beta" not in listed(capsys)
    # Given another device, it deploys.
    assert deploy(package_file, "beta", "--device", "sim:1") == 0
    capsys.readouterr()
    # The same name twice is refused while it runs.
    assert deploy(package_file, "beta", "--device", "sim:2") == 2
    assert "already running" in capsys.readouterr().err

    assert cli.main(["services", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "GRPC", "REST", "DEVICES", "STATE", "UPTIME"]
    assert [line.split()[0] for line in table[1:]] == ["alpha", "beta"]
    assert all("running" in line for line in table[1:])

    pid = alpha["pid"]
    assert cli.main(["services", "delete", "alpha"]) == 0
    out = capsys.readouterr().out
    assert "deleted alpha" in out and "stopped cleanly" in out
    assert not lifecycle._alive(pid)
    assert set(listed(capsys)) == {"beta"}
    assert cli.main(["services", "delete", "alpha"]) == 2
    assert "no service named 'alpha'" in capsys.readouterr().err
    # sim:0 is free again.
    assert deploy(package_file, "gamma") == 0
    capsys.readouterr()
    assert listed(capsys)["gamma"]["devices"] == ["sim:0"]


def test_sighup_rotates_keys_of_a_deployed_service(state, package_file, tmp_path, capsys) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY1 + "\n")
    assert deploy(package_file, "keyed", "--keys", str(keys), "--insecure-dev-keys") == 0
    capsys.readouterr()
    rec = listed(capsys)["keyed"]
    assert predict(rec, {"Authorization": f"Bearer {KEY1}"}).status_code == 200
    assert predict(rec, {"Authorization": f"Bearer {KEY2}"}).status_code == 401
    keys.write_text(f"{KEY2}\n{KEY1}\n")
    assert cli.main(["services", "reload-keys", "keyed"]) == 0
    capsys.readouterr()
    for _ in range(100):  # the reload runs on the server's own thread
        if predict(rec, {"Authorization": f"Bearer {KEY2}"}).status_code == 200:
            break
        time.sleep(0.05)
    assert predict(rec, {"Authorization": f"Bearer {KEY2}"}).status_code == 200
    assert predict(rec, {"Authorization": f"Bearer {KEY1}"}).status_code == 200
    log = Path(rec["log"]).read_text()
    assert "keys reloaded" in log
    assert KEY1 not in log and KEY2 not in log


def test_a_dead_service_holds_no_device(state, package_file, capsys) -> None:
    assert deploy(package_file, "doomed") == 0
    capsys.readouterr()
    rec = listed(capsys)["doomed"]
    os.kill(rec["pid"], signal.SIGKILL)
    for _ in range(100):
        if not lifecycle._alive(rec["pid"]):
            break
        time.sleep(0.05)
    assert listed(capsys)["doomed"]["state"] == "exited"
    assert deploy(package_file, "phoenix") == 0  # sim:0 is free: its holder is dead
    capsys.readouterr()
    assert cli.main(["services", "delete", "doomed"]) == 0  # removes the stale record


def test_deploy_failures_are_reported(state, package_file, tmp_path, capsys) -> None:
    assert cli.main(["deploy", str(tmp_path / "none.tpkg"), "--name", "x"]) == 2
    assert "package not found" in capsys.readouterr().err
    assert cli.main(["deploy", str(package_file), "--name", "bad name"]) == 2
    assert "letters, digits" in capsys.readouterr().err
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY1 + "\n")
    assert cli.main(["deploy", str(package_file), "--name", "k", "--keys", str(keys)]) == 2
    assert "access keys need TLS" in capsys.readouterr().err
    broken = tmp_path / "broken.tpkg"
    broken.write_bytes(b"not a package")
    assert deploy(broken, "broken") == 2
    assert "exited during start-up" in capsys.readouterr().err
    assert lifecycle.list_services() == []
