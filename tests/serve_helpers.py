"""Shared pieces of the serving tests: a tiny real classifier, certificates, free ports.

The classifier is a real compiled program (conv, relu, global pool, FC, softmax on a
16x16 RGB input, built by :func:`tessera.bench_serve.small_classifier`) so the service
tests exercise the true simulator path, but small enough that one inference takes
milliseconds. :class:`TinyPackage` follows the agreed ``tessera.package.Package`` API
(name, kind, preprocess, program, labels, input_name, output_names, preprocess_image, run)
for tests of the layers below the package format.
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image

from tessera.bench_serve import small_classifier
from tessera.config import get_config
from tessera.preprocess import PreprocessSpec, preprocess
from tessera.program import Program

SIZE = 16
CLASSES = 10


def tiny_classifier_onnx(seed: int = 0) -> onnx.ModelProto:
    """NHWC [1,16,16,3] -> conv 3x3 (8) -> relu -> global average pool -> FC 10 -> softmax."""
    return small_classifier(
        SIZE, CLASSES, seed, channels=8, kernel=3, stride=1, weight_scale=0.05, name="tiny"
    )


@functools.lru_cache(maxsize=2)
def tiny_program(seed: int = 0) -> Program:
    from tessera.compiler.driver import compile_model

    prog, _, _ = compile_model(tiny_classifier_onnx(seed), get_config("ulx3s-85f"))
    return prog


TINY_SPEC = PreprocessSpec(name="tiny", size=SIZE, resize_shorter=SIZE + 2)


@dataclass
class TinyPackage:
    """A package in memory, following the ``tessera.package.Package`` API."""

    program: Program
    name: str = "tiny"
    kind: str = "classifier"
    preprocess: PreprocessSpec = TINY_SPEC
    labels: list[str] = field(default_factory=lambda: [f"class_{i}" for i in range(CLASSES)])
    input_name: str = "images"
    output_names: list[str] = field(default_factory=lambda: ["output_alias"])

    def preprocess_image(self, data: bytes) -> np.ndarray:
        return preprocess(data, self.preprocess)

    def run(
        self,
        inputs: dict[str, np.ndarray],
        npu: Callable[[Program, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    ) -> dict[str, np.ndarray]:
        if npu is None:
            from tessera.sim.run import run_program

            def npu(p: Program, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return run_program(p, x, "sim").outputs

        prog_input = self.program.manifest["inputs"][0]["name"]
        out = npu(self.program, {prog_input: inputs[self.input_name]})
        values = list(out.values())
        return dict(zip(self.output_names, values, strict=True))


def tiny_package(seed: int = 0, **kw: object) -> TinyPackage:
    """The in-memory stand-in (device-layer tests: the device needs only this API)."""
    return TinyPackage(tiny_program(seed), **kw)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=2)
def real_tiny_package(name: str = "tiny") -> Any:
    """A real :class:`tessera.package.Package` of the tiny classifier (head on the host)."""
    from tessera.package import build_package

    return build_package(
        tiny_classifier_onnx(),
        preprocess=TINY_SPEC,
        labels=[f"class_{i}" for i in range(CLASSES)],
        name=name,
    )


class GatedBackend:
    """The simulator behind a gate: runs wait until the test opens it (queue-full tests).

    Registered as backend ``gated``; every instance shares the class-level gate, and
    ``entered`` counts runs that reached the gate.
    """

    name = "gated"
    gate = threading.Event()
    entered = threading.Semaphore(0)

    def run(
        self, program: Program, inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], int | None]:
        from tessera.sim.run import run_program

        GatedBackend.entered.release()
        if not GatedBackend.gate.wait(30):
            raise TimeoutError("gate never opened")
        result = run_program(program, inputs, "sim")
        return result.outputs, result.cycles

    @classmethod
    def reset(cls) -> None:
        cls.gate = threading.Event()
        cls.entered = threading.Semaphore(0)


@functools.cache
def warm_simulator() -> None:
    """Run the tiny program on the simulator once in this process: the first run compiles
    the simulator's numba kernels (seconds, more on a loaded machine, in a fresh checkout
    with no kernel cache), which must not count against a test's timeouts."""
    from tessera.sim.run import run_program

    prog = tiny_program()
    run_program(prog, {prog.manifest["inputs"][0]["name"]: float_input()}, "sim")


def register_gated() -> None:
    from tessera.runtime.device import register_backend

    register_backend("gated", GatedBackend, replace=True)


@contextlib.contextmanager
def running_server(package: Any, **options: Any) -> Iterator[Any]:
    """A started :class:`~tessera.runtime.server.Server` on free loopback ports, always stopped."""
    from tessera.runtime.server import ServeOptions, Server

    opts = ServeOptions(grpc_port=0, rest_port=0, grace_s=5.0, **options)
    server = Server(package, opts)
    server.start()
    try:
        yield server
    finally:
        GatedBackend.gate.set()  # never leave a gated run blocking the shutdown
        server.stop(5.0)


def png_bytes(seed: int = 0, size: tuple[int, int] = (24, 20)) -> bytes:
    """A small random RGB PNG."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def float_input(seed: int = 0) -> np.ndarray:
    """A preprocessed-scale float input [1,16,16,3]."""
    return (np.random.default_rng(seed).standard_normal((1, SIZE, SIZE, 3)) * 60).astype(np.float32)


@dataclass
class CertSet:
    """A self-signed CA, and a server chain and key signed by it, as PEM files."""

    ca: Path
    chain: Path
    key: Path


def make_certs(folder: Path, hostname: str = "localhost") -> CertSet:
    """Generate a CA and a server certificate for ``hostname`` and 127.0.0.1 (dev only)."""
    from tessera.runtime.tls import generate_self_signed

    return CertSet(*generate_self_signed(folder, hostname=hostname, days=1))
