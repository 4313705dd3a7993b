"""``tessera serve``, ``tessera client score``, ``tessera deploy``, ``tessera services``.

The service commands of the seeds' workflow: serve a package over TF-Serving gRPC and REST
in the foreground, or deploy it as a background service, list and delete services, and
score an image against a running service from the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tessera.errors import TesseraError


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a package over TF-Serving gRPC Predict and REST (foreground)",
        description="Serve MODEL.tpkg: gRPC tensorflow.serving.PredictionService (Predict, "
        "GetModelMetadata) and REST /v1/models/NAME:predict, /healthz, /metrics. SIGHUP "
        "re-reads the keys file; SIGTERM/SIGINT drain in-flight requests and stop.",
    )
    s.add_argument("package", type=Path, help="package file (.tpkg)")
    _serve_options(s)
    s.add_argument("--name", help="model name clients use (default: the package's name)")
    s.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    s.set_defaults(func=_cmd_serve)

    d = sub.add_parser(
        "deploy",
        help="start a package as a background service and record it",
        description="Start `tessera serve` in the background, wait until it listens, and "
        "record it for `tessera services`. One model per device: a device held by a running "
        "service is refused unless other devices are given (--device).",
    )
    d.add_argument("package", type=Path, help="package file (.tpkg)")
    d.add_argument("--name", required=True, help="service and model name")
    _serve_options(d)
    d.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait")
    d.set_defaults(func=_cmd_deploy)

    sv = sub.add_parser("services", help="list, delete or signal deployed services")
    ssub = sv.add_subparsers(dest="services_command", required=True)
    ls = ssub.add_parser("list", help="name, model, ports, devices, state")
    ls.add_argument("--json", action="store_true", help="one JSON object")
    ls.set_defaults(func=_cmd_list)
    rm = ssub.add_parser("delete", help="stop a service cleanly (drain) and forget it")
    rm.add_argument("name")
    rm.add_argument("--grace", type=float, default=15.0, help="seconds to drain before kill")
    rm.set_defaults(func=_cmd_delete)
    rk = ssub.add_parser("reload-keys", help="send SIGHUP: the service re-reads its keys file")
    rk.add_argument("name")
    rk.set_defaults(func=_cmd_reload)

    c = sub.add_parser("client", help="talk to a running service")
    csub = c.add_subparsers(dest="client_command", required=True)
    sc = csub.add_parser(
        "score",
        help="score an image over gRPC and print the top classes",
        description="Send IMAGE (JPEG/PNG bytes) to HOST:PORT's Predict and print labels "
        "and confidences. The key comes from --key-file, $TESSERA_KEY or --key (a key on "
        "the command line is visible to other users of the machine).",
    )
    sc.add_argument("address", help="HOST:PORT of the gRPC endpoint")
    sc.add_argument("image", type=Path)
    sc.add_argument("--top", type=int, default=5)
    sc.add_argument("--tls", action="store_true", help="use TLS (implied by --tls-root)")
    sc.add_argument("--tls-root", type=Path, help="root certificate(s) to trust, PEM")
    sc.add_argument("--key", help="access key (prefer --key-file or $TESSERA_KEY)")
    sc.add_argument("--key-file", type=Path, help="file whose first line is the access key")
    sc.add_argument("--name", default="", help="model name (default: the server's model)")
    sc.add_argument("--input-name", default="images")
    sc.add_argument("--output", default=None, help="output name (default: the first)")
    sc.add_argument(
        "--labels",
        type=Path,
        help="labels file or .tpkg to name classes (default: ImageNet for 1000 classes)",
    )
    sc.add_argument("--timeout", type=float, default=30.0)
    sc.add_argument("--json", action="store_true")
    sc.set_defaults(func=_cmd_client_score)


def _serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--backend", default="sim", help="device backend (default: sim)")
    p.add_argument(
        "--device",
        action="append",
        dest="device_ids",
        metavar="ID",
        help="device id to claim (repeatable; default BACKEND:0..N-1)",
    )
    p.add_argument("--grpc-port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--rest-port", type=int, default=8501, help="0 picks a free port")
    p.add_argument("--devices", type=int, default=1, help="devices behind the model")
    p.add_argument("--queue-depth", type=int, default=8, help="requests waiting per device")
    p.add_argument(
        "--device-mode",
        choices=("auto", "process", "thread"),
        default="auto",
        help="run each device in a worker process of its own or as a thread of the server "
        "(auto: processes for sim/reference with more than one device)",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--keys", type=Path, help="keys file: primary key, secondary key")
    p.add_argument(
        "--insecure-dev-keys",
        action="store_true",
        help="allow keys without TLS (development on loopback only)",
    )
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body")
    p.add_argument("--max-batch", type=int, default=32, help="most inputs per request")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain on shutdown")


def _options(args: argparse.Namespace) -> Any:
    from tessera.runtime.server import ServeOptions

    return ServeOptions(
        name=args.name,
        host=args.host,
        grpc_port=args.grpc_port,
        rest_port=args.rest_port,
        backend=args.backend,
        devices=args.devices,
        device_ids=args.device_ids,
        queue_depth=args.queue_depth,
        device_process={"auto": None, "process": True, "thread": False}[args.device_mode],
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        keys_file=args.keys,
        allow_insecure_keys=args.insecure_dev_keys,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_batch=args.max_batch,
        grace_s=args.grace,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from tessera.package import load_package
    from tessera.runtime.server import Server
    from tessera.runtime.service import configure_logging

    configure_logging()
    options = _options(args)
    options.validate()
    server = Server(load_package(args.package), options)
    server.install_signal_handlers()
    server.start()
    assert server.pool is not None
    if args.ready_file is not None:
        info = {
            "pid": os.getpid(),
            "grpc_port": server.grpc_port,
            "rest_port": server.rest_port,
            "devices": [d.device_id for d in server.pool.devices],
        }
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(args.ready_file)
    scheme = "https" if server.uses_tls else "http"
    print(
        f"serving {server.service.name if server.service else '?'}: gRPC "
        f"{options.host}:{server.grpc_port}, REST {scheme}://{options.host}:{server.rest_port}"
        f" ({len(server.pool.devices)} x {options.backend}"
        f"{', worker processes' if server.pool.process else ''})",
        file=sys.stderr,
        flush=True,
    )
    # Signal handlers run on this thread, so wait in short slices.
    while not server.wait(0.5):
        pass
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from tessera.runtime import lifecycle

    options = _options(args)
    options.validate()
    passthrough = [
        "--grpc-port",
        str(args.grpc_port),
        "--rest-port",
        str(args.rest_port),
        "--devices",
        str(args.devices),
        "--queue-depth",
        str(args.queue_depth),
        "--device-mode",
        args.device_mode,
        "--max-request-mb",
        str(args.max_request_mb),
        "--max-batch",
        str(args.max_batch),
        "--grace",
        str(args.grace),
    ]
    for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if value is not None:
            passthrough += [flag, str(Path(value).resolve())]
    if args.keys is not None:
        passthrough += ["--keys", str(Path(args.keys).resolve())]
    if args.insecure_dev_keys:
        passthrough.append("--insecure-dev-keys")
    rec = lifecycle.deploy(
        args.package,
        args.name,
        passthrough,
        backend=args.backend,
        devices=args.devices,
        device_ids=args.device_ids,
        host=args.host,
        tls=args.tls_cert is not None,
        timeout=args.start_timeout,
    )
    print(
        f"deployed {rec.name}: pid {rec.pid}, gRPC {rec.host}:{rec.grpc_port}, REST "
        f"{rec.host}:{rec.rest_port}, devices {', '.join(rec.devices)}; log {rec.log}"
    )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from tessera.runtime import lifecycle

    services = lifecycle.list_services()
    if args.json:
        out = [{**vars(rec), "state": state} for rec, state in services]
        print(json.dumps({"services": out}))
        return 0
    if not services:
        print("no services deployed")
        return 0
    rows = [("NAME", "MODEL", "GRPC", "REST", "DEVICES", "STATE", "UPTIME")]
    now = time.time()
    for rec, state in services:
        up = f"{(now - rec.started) / 60:.1f} min" if state == "running" else "-"
        rows.append(
            (
                rec.name,
                Path(rec.model).name,
                f"{rec.host}:{rec.grpc_port}",
                f"{rec.host}:{rec.rest_port}",
                ",".join(rec.devices),
                state,
                up,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    from tessera.runtime import lifecycle

    rec, clean = lifecycle.delete(args.name, grace=args.grace)
    how = "stopped cleanly" if clean else f"killed after {args.grace:.0f} s without draining"
    print(f"deleted {rec.name} (pid {rec.pid}, {how})")
    return 0 if clean else 1


def _cmd_reload(args: argparse.Namespace) -> int:
    from tessera.runtime import lifecycle

    rec = lifecycle.send_signal(args.name, signal.SIGHUP)
    print(f"sent SIGHUP to {rec.name} (pid {rec.pid}); see {rec.log} for the result")
    return 0


def _read_key(args: argparse.Namespace) -> str:
    if args.key_file is not None:
        try:
            lines = args.key_file.read_text().split()
        except OSError as exc:
            raise TesseraError(f"cannot read key file {args.key_file}: {exc.strerror}") from None
        if not lines:
            raise TesseraError(f"key file {args.key_file} is empty")
        return lines[0]
    return args.key or os.environ.get("TESSERA_KEY", "")


def _labels_for(args: argparse.Namespace, classes: int) -> list[str]:
    from tessera.labels import IMAGENET_CLASSES, load_labels

    if args.labels is not None:
        if args.labels.suffix == ".tpkg":
            from tessera.package import load_package

            labels = list(load_package(args.labels).labels)
        else:
            labels = load_labels(args.labels)
        if len(labels) != classes:
            raise TesseraError(f"{args.labels} has {len(labels)} labels for {classes} classes")
        return labels
    if classes == IMAGENET_CLASSES:
        return load_labels()
    return [f"class {i}" for i in range(classes)]


def _print_detections(args: argparse.Namespace, outputs: dict[str, np.ndarray]) -> int:
    """A detector service answers with TF object-detection tensors (see tessera.ssd)."""
    from tessera.ssd import VOC_LABELS

    count = int(np.asarray(outputs["num_detections"]).reshape(-1)[0])
    boxes = np.asarray(outputs["detection_boxes"], dtype=np.float32).reshape(-1, 4)[:count]
    scores = np.asarray(outputs["detection_scores"], dtype=np.float32).reshape(-1)[:count]
    classes = np.asarray(outputs["detection_classes"]).reshape(-1)[:count].astype(int)
    labels = _labels_for(args, len(VOC_LABELS)) if args.labels is not None else VOC_LABELS
    detections = [
        {
            "class_id": int(c),
            "label": labels[c] if 0 <= c < len(labels) else str(c),
            "score": float(sc),
            "box": [float(v) for v in box],
        }
        for c, sc, box in zip(classes, scores, boxes, strict=True)
    ][: args.top]
    if args.json:
        print(json.dumps({"image": str(args.image), "detections": detections}))
        return 0
    print(args.image)
    for rank, d in enumerate(detections, start=1):
        box = ", ".join(f"{v:.3f}" for v in d["box"])
        print(f"  {rank:>2}. {d['score']:7.4f}  {d['label']} ({d['class_id']})  [{box}]")
    return 0


def _cmd_client_score(args: argparse.Namespace) -> int:
    from tessera.runtime.client import PredictionClient

    if args.top < 1:
        raise TesseraError(f"--top must be at least 1, got {args.top}")
    try:
        data = args.image.read_bytes()
    except OSError as exc:
        raise TesseraError(f"cannot read {args.image}: {exc.strerror}") from None
    use_ssl = args.tls or args.tls_root is not None
    with PredictionClient(
        args.address,
        use_ssl=use_ssl,
        access_token=_read_key(args),
        service_name=args.name,
        root_certificates=args.tls_root,
    ) as client:
        outputs = client.score_image_bytes(
            data, input_name=args.input_name, outputs=args.output, timeout=args.timeout
        )
    if isinstance(outputs, dict) and "detection_boxes" in outputs:
        return _print_detections(args, outputs)
    if isinstance(outputs, dict):
        name = next(iter(outputs))
        probs = outputs[name]
    else:
        name, probs = args.output, outputs
    p = np.asarray(probs, dtype=np.float32).reshape(-1)
    labels = _labels_for(args, len(p))
    order = np.argsort(-p, kind="stable")[: args.top]
    top = [{"class_id": int(i), "label": labels[i], "confidence": float(p[i])} for i in order]
    if args.json:
        print(json.dumps({"image": str(args.image), "output": name, "top": top}))
        return 0
    print(args.image)
    for rank, t in enumerate(top, start=1):
        print(f"  {rank:>2}. {t['confidence']:7.4f}  {t['label']} ({t['class_id']})")
    return 0
