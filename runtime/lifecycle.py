"""Deploy, list and delete background scoring services (the seeds' deploy / clean-up).

``tessera deploy`` starts ``tessera serve`` as a detached process, waits until it reports
its ports (a ready file it writes once both front ends listen) and records the service in
the state folder (``$TESSERA_STATE_DIR``, else ``$XDG_STATE_HOME/tessera``, else
``~/.local/state/tessera``): one JSON file per service, plus its log. ``services list``
reads the records and checks each process is still the one recorded; ``services delete``
sends SIGTERM (the server drains in-flight requests), waits, and removes the record.

One model per device, as on Brainwave: each service claims device ids (``sim:0`` ... by
default, or the ids given), and a deployment that would share a device with a running
service is refused, naming the holder and the free ids to use instead. Records of services
whose process died do not hold devices.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: How long ``deploy`` waits for the server to listen (loading a large package takes a while).
DEFAULT_START_TIMEOUT_S = 120.0


class LifecycleError(TesseraError):
    """A deploy, list or delete that cannot be done as asked."""


def state_dir() -> Path:
    """Where service records and logs live (created on first use)."""
    root = os.environ.get("TESSERA_STATE_DIR")
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(base) / "tessera"
    (path / "services").mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class ServiceRecord:
    """What ``services list`` shows and ``services delete`` needs."""

    name: str
    model: str
    pid: int
    host: str
    grpc_port: int
    rest_port: int
    backend: str
    devices: list[str]
    tls: bool
    started: float
    log: str
    argv: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> ServiceRecord:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise LifecycleError(f"service record {path} is unreadable: {exc}") from None


def _record_path(name: str) -> Path:
    return state_dir() / "services" / f"{name}.json"


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """Serialise deploys and deletes so two cannot claim the same device."""
    fd = os.open(state_dir() / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def process_state(record: ServiceRecord) -> str:
    """``running`` if the recorded process is alive and is our server, else ``exited``."""
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return "exited"
    except PermissionError:
        return "running"
    cmdline = Path(f"/proc/{record.pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return "running"
        if b"serve" not in args or record.name.encode() not in args:
            return "exited"  # the pid now belongs to another process
        stat = Path(f"/proc/{record.pid}/stat")
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return "exited"
        except (OSError, IndexError):
            pass
    return "running"


def list_services() -> list[tuple[ServiceRecord, str]]:
    """Every recorded service with its state, by name."""
    out = []
    for path in sorted((state_dir() / "services").glob("*.json")):
        rec = ServiceRecord.from_file(path)
        out.append((rec, process_state(rec)))
    return out


def _busy_devices(exclude: str | None = None) -> dict[str, ServiceRecord]:
    busy = {}
    for rec, state in list_services():
        if state == "running" and rec.name != exclude:
            for dev in rec.devices:
                busy[dev] = rec
    return busy


def deploy(
    package: str | os.PathLike[str],
    name: str,
    serve_args: Sequence[str] = (),
    *,
    backend: str = "sim",
    devices: int = 1,
    device_ids: Sequence[str] | None = None,
    host: str = "127.0.0.1",
    tls: bool = False,
    timeout: float = DEFAULT_START_TIMEOUT_S,
) -> ServiceRecord:
    """Start ``tessera serve`` in the background and record it.

    ``serve_args`` are passed on to ``tessera serve`` (ports, TLS, keys ...); device and
    name options are added here because the claim is checked here.
    """
    if not NAME_RE.match(name):
        raise LifecycleError(
            f"service name {name!r} must be 1-63 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )
    package = Path(package).resolve()
    if not package.is_file():
        raise LifecycleError(f"package not found: {package}")
    ids = list(device_ids) if device_ids else [f"{backend}:{i}" for i in range(devices)]
    folder = state_dir()
    with _state_lock():
        path = _record_path(name)
        if path.exists():
            old = ServiceRecord.from_file(path)
            if process_state(old) == "running":
                raise LifecycleError(
                    f"service {name!r} is already running (pid {old.pid}, model {old.model}); "
                    f"delete it first: tessera services delete {name}"
                )
            path.unlink()
        busy = _busy_devices()
        taken = [d for d in ids if d in busy]
        if taken:
            holder = busy[taken[0]]
            free = [f"{backend}:{i}" for i in range(len(busy) + len(ids) + 1)]
            free = [d for d in free if d not in busy][: len(ids)]
            raise LifecycleError(
                f"device {taken[0]} is busy: service {holder.name!r} runs model "
                f"{Path(holder.model).name} on it, and a device runs one model at a time. "
                f"Deploy on other devices ({' '.join('--device ' + d for d in free)}) or "
                f"delete {holder.name!r} first (tessera services delete {holder.name})"
            )
        log_path = folder / "services" / f"{name}.log"
        ready = folder / "services" / f".{name}.ready"
        ready.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "tessera.cli",
            "serve",
            str(package),
            "--name",
            name,
            "--host",
            host,
            "--backend",
            backend,
            "--ready-file",
            str(ready),
            *serve_args,
        ]
        for dev in ids:
            argv += ["--device", dev]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the deploying shell; SIGTERM reaches it alone
                close_fds=True,
            )
        info = _wait_ready(proc, ready, log_path, timeout)
        rec = ServiceRecord(
            name=name,
            model=str(package),
            pid=proc.pid,
            host=host,
            grpc_port=int(info["grpc_port"]),
            rest_port=int(info["rest_port"]),
            backend=backend,
            devices=ids,
            tls=tls,
            started=time.time(),
            log=str(log_path),
            argv=argv[2:],
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(rec.to_json())
        tmp.replace(path)
        return rec


def _wait_ready(
    proc: subprocess.Popen[bytes], ready: Path, log_path: Path, timeout: float
) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready.exists():
            try:
                info = json.loads(ready.read_text())
                ready.unlink(missing_ok=True)
                return info
            except ValueError:
                pass  # written atomically, so only a partial read of a rename race
        if proc.poll() is not None:
            raise LifecycleError(
                f"the service exited during start-up (status {proc.returncode}):\n"
                + _tail(log_path)
            )
        time.sleep(0.05)
    _terminate(proc.pid, 5.0)
    raise LifecycleError(f"the service did not start within {timeout:.0f} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _terminate(pid: int, grace: float) -> bool:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL; True if it stopped within the grace."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    # Reap it if it is our child (deploy and delete in one process, as in the tests).
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def delete(name: str, grace: float = 15.0) -> tuple[ServiceRecord, bool]:
    """Stop a service (drain, then SIGKILL after ``grace`` s) and remove its record.

    Returns the record and whether it stopped cleanly within the grace period.
    """
    with _state_lock():
        path = _record_path(name)
        if not path.exists():
            names = [r.name for r, _ in list_services()]
            raise LifecycleError(
                f"no service named {name!r}; deployed: {', '.join(names) if names else 'none'}"
            )
        rec = ServiceRecord.from_file(path)
        clean = True
        if process_state(rec) == "running":
            clean = _terminate(rec.pid, grace)
        path.unlink(missing_ok=True)
        return rec, clean


def send_signal(name: str, signum: int) -> ServiceRecord:
    """Signal a running service (SIGHUP re-reads its keys file)."""
    path = _record_path(name)
    if not path.exists():
        raise LifecycleError(f"no service named {name!r}")
    rec = ServiceRecord.from_file(path)
    if process_state(rec) != "running":
        raise LifecycleError(f"service {name!r} is not running")
    os.kill(rec.pid, signum)
    return rec
