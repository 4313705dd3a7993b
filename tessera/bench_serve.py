"""``tessera bench serve``: direct device call vs gRPC vs REST, and throughput, in one run.

What a service adds on top of the device is what this measures, so every figure comes from
one run and package, with the latency runs interleaved (direct, gRPC, REST, direct, ...;
each round starting one path later) after a few untimed rounds, and medians and 99th
percentiles kept. The direct calls run in the server's process; the protocol paths run in
a client process, as a real client would, and are timed there, one call at a time, over a
pipe (``--same-process-client`` runs them in the server's process instead, where client and
server take turns on one GIL: an upper bound). The throughput cells' clients are threads
of the server's process.

The default package is a small classifier with the seeds' 224x224x3 input (a strided conv,
global pool, FC head on the host), so request payloads have their real size (600 KB of
floats, ~3 MB as JSON text) while a simulator run stays in milliseconds; ``--package``
benchmarks any ``.tpkg`` (ResNet-50 takes seconds per inference on the simulator).

A "bare gRPC floor" row sends the float input's bytes (``tobytes()``: the one copy any
client makes) to a gRPC method with none of the service's code (no protobuf, no checks, no
metrics) that makes the same direct call: what it adds is grpcio's own cost on this
machine, which the Predict overhead cannot go below.

Devices run as the server would run them (``--device-mode auto``: threads for one device,
worker processes for more, see :func:`tessera.runtime.device.default_process`);
``--device-mode thread,process`` measures both side by side.

The load is bounded in count and time and goes to loopback only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def register(bsub: argparse._SubParsersAction) -> None:
    """Adds ``serve`` under ``tessera bench``."""
    s = bsub.add_parser(
        "serve", help="direct device call vs gRPC vs REST latency, throughput by clients/devices"
    )
    s.add_argument("--package", type=Path, help=".tpkg to serve (default: a small 224x224 model)")
    s.add_argument("--repeat", type=int, default=100, help="interleaved latency samples")
    s.add_argument("--clients", default="1,4,16", help="concurrent clients for throughput")
    s.add_argument("--devices", default="1,2", help="device counts for throughput")
    s.add_argument("--requests", type=int, default=96, help="requests per throughput cell")
    s.add_argument(
        "--device-mode",
        default="auto",
        help="comma-separated device modes for throughput: auto, process, thread",
    )
    s.add_argument(
        "--same-process-client",
        action="store_true",
        help="run the latency phase's client in the server's process (default: its own "
        "process, as a real client)",
    )
    s.add_argument("--max-seconds", type=float, default=60.0, help="time cap per phase")
    s.add_argument("--json", action="store_true", help="print one JSON object instead")
    s.set_defaults(func=_bench_serve)


def small_classifier(
    size: int = 224,
    classes: int = 10,
    seed: int = 0,
    *,
    channels: int = 16,
    kernel: int = 8,
    stride: int = 8,
    weight_scale: float = 0.01,
    name: str = "bench_small",
) -> Any:
    """NHWC [1,size,size,3] -> conv ``kernel`` x ``kernel``, ``stride``, ``channels`` filters
    (padded by (kernel - stride) / 2 a side) -> relu -> global pool -> FC -> softmax.

    The defaults are this benchmark's model: the seeds' 224x224x3 input, so payloads have
    their real size, yet a simulator run of milliseconds. The serving tests build their
    16x16 model (3x3 stride 1, 8 filters) here too, so both stay one real compiled network.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    arrays = {
        "w": rng.standard_normal((channels, 3, kernel, kernel)) * weight_scale,
        "b": rng.standard_normal(channels) * 0.5,
        "fw": rng.standard_normal((channels, classes)) * 0.5,
        "fb": rng.standard_normal(classes) * 0.1,
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    pad = (kernel - stride) // 2
    nodes = [
        helper.make_node("Transpose", ["images"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv",
            ["nchw", "w", "b"],
            ["conv"],
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad] * 4,
        ),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, classes])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _default_package() -> Any:
    from tessera.package import build_package

    return build_package(
        small_classifier(),
        preprocess="resnet",
        labels=[f"class {i}" for i in range(10)],
        name="bench-small",
    )


def _sample_jpeg(size: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((size * 5 // 4, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


#: Untimed rounds before the latency samples.
_WARMUP = 3


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99


def _bare_grpc(run: Callable[[], object]) -> tuple[Any, int]:
    """A gRPC method with none of the service's code: the request stays raw bytes (not
    parsed), the handler makes the direct device call and answers two bytes.

    What it adds over the direct call is what gRPC itself costs on this machine (HTTP/2 on
    loopback, grpcio's hand-offs between its threads): the floor under the Predict overhead.
    Returns the server and its port.
    """
    from concurrent import futures

    import grpc

    size = 64 << 20
    options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]

    def handler(request: bytes, context: Any) -> bytes:
        run()
        return b"ok"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    method = grpc.unary_unary_rpc_method_handler(handler)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tessera.bench.Bare", {"Run": method}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


#: The rows a client runs, in the order of the table.
_PROTOCOL_ROWS = (
    "gRPC Predict (float)",
    "bare gRPC floor (same bytes, no service)",
    "REST :predict (float, JSON)",
    "gRPC Predict (JPEG)",
    "REST :predict (JPEG, b64)",
)


def _client_calls(
    grpc_port: int,
    rest_port: int,
    model: str,
    input_name: str,
    x: np.ndarray,
    jpeg: bytes,
    bare_port: int,
) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """The protocol paths as a client runs them, keyed by row name, and a closer.

    Built in whichever process plays the client, so the same calls run in-process or in
    the client process of :func:`_client_process`.
    """
    import grpc
    import requests

    from tessera.runtime.client import PredictionClient

    url = f"http://127.0.0.1:{rest_port}/v1/models/{model}:predict"
    float_body = json.dumps({"inputs": x.tolist()})
    image_body = json.dumps({"instances": [{"b64": base64.b64encode(jpeg).decode()}]})
    session = requests.Session()
    client = PredictionClient("127.0.0.1", grpc_port, max_attempts=1)
    headers = {"Content-Type": "application/json"}
    size = 64 << 20
    bare_channel = grpc.insecure_channel(
        f"127.0.0.1:{bare_port}",
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ],
    )
    bare = bare_channel.unary_unary("/tessera.bench.Bare/Run")

    def rest_post(body: str) -> None:
        r = session.post(url, data=body, headers=headers, timeout=60)
        r.raise_for_status()
        r.json()

    calls: dict[str, Callable[[], object]] = {
        "gRPC Predict (float)": lambda: client.score_numpy_arrays({input_name: x}, timeout=60),
        "bare gRPC floor (same bytes, no service)": lambda: bare(x.tobytes(), timeout=60),
        "REST :predict (float, JSON)": lambda: rest_post(float_body),
        "gRPC Predict (JPEG)": lambda: client.score_image_bytes(
            jpeg, input_name=input_name, timeout=60
        ),
        "REST :predict (JPEG, b64)": lambda: rest_post(image_body),
    }

    def close() -> None:
        client.close()
        session.close()
        bare_channel.close()

    return calls, close


def _client_process(conn: Any, spec: dict[str, Any]) -> None:
    """Client side of the latency phase in its own process: answers each row name received
    with the seconds that call took, until it receives ``None``.

    A real client is another process; here it has its own interpreter and GIL, so the
    figures are the server's cost, not the server and client taking turns on one GIL.
    """
    calls, close = _client_calls(**spec)
    try:
        while (name := conn.recv()) is not None:
            t0 = time.perf_counter()
            calls[name]()
            conn.send(time.perf_counter() - t0)
    finally:
        close()
        conn.close()


class _RemoteCalls:
    """The protocol paths run by a client process, one call at a time, timed there."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no forked grpcio state
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_client_process, args=(child, spec), daemon=True)
        self._proc.start()
        child.close()

    def time(self, name: str) -> float:
        self._conn.send(name)
        if not self._conn.poll(120):
            raise TimeoutError(f"the client process did not answer {name!r} within 120 s")
        return float(self._conn.recv())

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:  # the process has gone already
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _latency_phase(
    server: Any, pkg: Any, repeat: int, max_s: float, client_process: bool = True
) -> dict[str, Any]:
    x = np.random.default_rng(1).standard_normal(pkg.preprocess.output_shape).astype(np.float32)
    x *= 60
    jpeg = _sample_jpeg(pkg.preprocess.size)
    device = server.pool.devices[0]
    bare_server, bare_port = _bare_grpc(lambda: device.run({pkg.input_name: x}, timeout=60))
    spec = {
        "grpc_port": server.grpc_port,
        "rest_port": server.rest_port,
        "model": server.service.name,
        "input_name": pkg.input_name,
        "x": x,
        "jpeg": jpeg,
        "bare_port": bare_port,
    }
    direct: dict[str, Callable[[], object]] = {
        "direct device call (float)": lambda: device.run({pkg.input_name: x}, timeout=60),
        "direct: preprocess + device (JPEG)": lambda: device.run(
            {pkg.input_name: pkg.preprocess_image(jpeg)}, timeout=60
        ),
    }
    timers: dict[str, Callable[[], float]] = {
        name: (lambda fn=fn: _timed(fn)) for name, fn in direct.items()
    }
    if client_process:
        remote = _RemoteCalls(spec)
        close = remote.close
        timers.update({name: (lambda name=name: remote.time(name)) for name in _PROTOCOL_ROWS})
    else:
        calls, close = _client_calls(**spec)
        timers.update({name: (lambda fn=fn: _timed(fn)) for name, fn in calls.items()})
    float_direct, jpeg_direct = direct
    order = [float_direct, *_PROTOCOL_ROWS[:3], jpeg_direct, *_PROTOCOL_ROWS[3:]]
    times: dict[str, list[float]] = {k: [] for k in order}
    try:
        for _ in range(_WARMUP):  # connections, HTTP/2 flow-control windows, caches
            for name in order:
                timers[name]()
        end = time.monotonic() + max_s
        for r in range(repeat):
            # Each round starts one path later, so no path always runs right after the same
            # other one (after the 3 MB JSON body, say, whose memory traffic it would inherit).
            for name in order[r % len(order) :] + order[: r % len(order)]:
                times[name].append(timers[name]())
            if time.monotonic() > end:
                break
    finally:
        close()
        bare_server.stop(0)
    return {
        "samples": len(times[order[0]]),
        "client": "separate process" if client_process else "server's process",
        "payload_bytes": {
            "float_grpc": x.nbytes,
            "float_json": len(json.dumps({"inputs": x.tolist()})),
            "jpeg": len(jpeg),
        },
        "rows": {k: _percentiles(v) for k, v in times.items()},
    }


_MODES = {"auto": None, "process": True, "thread": False}


def _throughput_cell(
    pkg: Any, devices: int, clients: int, requests_n: int, max_s: float, mode: str = "auto"
) -> dict[str, Any]:
    from tessera.runtime.client import PredictionClient, PredictionError
    from tessera.runtime.server import ServeOptions, Server

    x = np.random.default_rng(2).standard_normal(pkg.preprocess.output_shape).astype(np.float32)
    opts = ServeOptions(
        grpc_port=0,
        rest_port=0,
        devices=devices,
        queue_depth=max(8, clients * 2),
        grace_s=10,
        device_process=_MODES[mode],
    )
    lock = threading.Lock()
    done = 0
    errors = 0
    latencies: list[float] = []
    with Server(pkg, opts) as server:
        processes = server.pool.process
        client = PredictionClient("127.0.0.1", server.grpc_port, max_attempts=1)
        client.score_numpy_arrays({pkg.input_name: x}, timeout=60)  # warm-up
        end = time.monotonic() + max_s
        counter = iter(range(requests_n))

        def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < end:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    client.score_numpy_arrays({pkg.input_name: x}, timeout=60)
                except PredictionError:
                    with lock:
                        errors += 1
                    continue
                with lock:
                    done += 1
                    latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex:
            for f in [ex.submit(worker) for _ in range(clients)]:
                f.result()
        wall = time.perf_counter() - t0
        client.close()
    p50, p99 = _percentiles(latencies) if latencies else (float("nan"), float("nan"))
    return {
        "devices": devices,
        "mode": "process" if processes else "thread",
        "clients": clients,
        "requests": done,
        "errors": errors,
        "seconds": wall,
        "throughput": done / wall if wall else 0.0,
        "p50": p50,
        "p99": p99,
    }


def _load_average() -> float | None:
    """The 1-minute load average: the overhead figures depend on what else the machine runs."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return None


def _ints(text: str, what: str) -> list[int]:
    from tessera.errors import TesseraError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise TesseraError(f"{what} must be positive integers separated by commas, got {text!r}")
    return values


def _bench_serve(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tessera.errors import TesseraError
    from tessera.package import load_package
    from tessera.runtime.server import ServeOptions, Server
    from tessera.runtime.tfs_protos import protos

    clients_list = _ints(args.clients, "--clients")
    devices_list = _ints(args.devices, "--devices")
    modes = [m.strip() for m in args.device_mode.split(",") if m.strip()]
    if not modes or any(m not in _MODES for m in modes):
        raise TesseraError(
            f"--device-mode must be auto, process or thread (comma-separated), got "
            f"{args.device_mode!r}"
        )
    console = Console(stderr=args.json)
    with console.status("building the package"):
        pkg = load_package(args.package) if args.package else _default_package()
        protos()
    with console.status("latency: direct vs gRPC vs REST"):
        opts = ServeOptions(grpc_port=0, rest_port=0, devices=1, queue_depth=8)
        load = [_load_average()]
        with Server(pkg, opts) as server:
            lat = _latency_phase(
                server, pkg, args.repeat, args.max_seconds, not args.same_process_client
            )
        load.append(_load_average())
    cells = []
    for devices in devices_list:  # modes innermost: compared cells run back to back
        for clients in clients_list:
            for mode in modes:
                with console.status(
                    f"throughput: {devices} device(s) ({mode}), {clients} client(s)"
                ):
                    cells.append(
                        _throughput_cell(
                            pkg, devices, clients, args.requests, args.max_seconds, mode
                        )
                    )
    cfg = pkg.program.config
    result = {
        "package": pkg.name,
        "config": cfg.name,
        "latency": {k: {"p50_ms": a * 1e3, "p99_ms": b * 1e3} for k, (a, b) in lat["rows"].items()},
        "samples": lat["samples"],
        "latency_client": lat["client"],
        "payload_bytes": lat["payload_bytes"],
        "load_average_1min": load,
        "cpus": os.cpu_count(),
        "throughput": cells,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    rows = lat["rows"]
    table = Table(
        title=f"tessera bench serve: {pkg.name} on the simulator ({cfg.name}), "
        f"{lat['samples']} interleaved samples, client in the {lat['client']}"
    )
    for col, just in (
        ("path", "left"),
        ("p50", "right"),
        ("p99", "right"),
        ("p50 overhead vs direct", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    base = {
        "float": rows["direct device call (float)"][0],
        "JPEG": rows["direct: preprocess + device (JPEG)"][0],
    }
    for name, (p50, p99) in rows.items():
        kind = "JPEG" if "JPEG" in name else "float"
        over = "" if name.startswith("direct") else f"{(p50 - base[kind]) * 1e3:+.2f} ms"
        if kind == "float" and name.startswith("gRPC"):
            over += " (goal < 2 ms)"
        table.add_row(name, f"{p50 * 1e3:.2f} ms", f"{p99 * 1e3:.2f} ms", over)
    console.print(table)
    pb = lat["payload_bytes"]
    console.print(
        f"payloads: float {pb['float_grpc'] / 1e3:.0f} kB as gRPC tensor_content, "
        f"{pb['float_json'] / 1e6:.2f} MB as JSON; JPEG {pb['jpeg'] / 1e3:.1f} kB"
    )
    if None not in load:
        console.print(
            f"load average (1 min) before/after the latency runs: {load[0]:.2f}/{load[1]:.2f} "
            f"on {os.cpu_count()} CPUs (other processes' load delays the thread wake-ups of "
            "the protocol paths more than the direct call)"
        )
    tp = Table(title="throughput over gRPC (float inputs, bounded load on loopback)")
    for col in ("devices", "mode", "clients", "requests", "errors", "req/s", "p50", "p99"):
        tp.add_column(col, justify="right")
    for c in cells:
        tp.add_row(
            str(c["devices"]),
            c["mode"],
            str(c["clients"]),
            str(c["requests"]),
            str(c["errors"]),
            f"{c['throughput']:.1f}",
            f"{c['p50'] * 1e3:.1f} ms",
            f"{c['p99'] * 1e3:.1f} ms",
        )
    console.print(tp)
    return 0
