"""The deployable package (``.tpkg``): everything a service needs to score one model.

The seeds deploy "the converted model plus its stages" as one image: host preprocessing,
the quantized featurizer on the FPGA, the classifier on the CPU. A package is that image
as one file:

* the preprocessing parameters (a :class:`~tessera.preprocess.PreprocessSpec`),
* the compiled NPU program (the ``.tsr`` bytes, with their own checks),
* the host stage after the NPU: the classifier head's weights (or, for detectors, the
  post-processing parameters), see :class:`HostStage`,
* the class labels,
* the tensor names clients use (the seeds' 2018 client: input ``images``, output
  ``output_alias``),
* a format version and a sha256 per part.

Like the program file it is deterministic (no timestamps, sorted keys), so packaging the
same inputs twice gives identical bytes, and every byte is covered by a checksum or an
exact check; loading refuses damaged files and other format versions with a
:class:`PackageFormatError`.

Binary layout (all integers little-endian)
------------------------------------------
======  =====  ==========================================================================
offset  bytes  content
======  =====  ==========================================================================
0       8      magic ``b"TSRPKG\\0\\0"``
8       4      u32 format version (:data:`FORMAT_VERSION`)
12      4      u32 header size (64)
16      8      u64 total file size
24      8      u64 manifest size M
32      32     sha256 of the manifest bytes
64      M      manifest: UTF-8 JSON object, sorted keys, ASCII-only, no whitespace
..             zero padding to a multiple of 8: the start P of the payload
P      ..      sections, each at a multiple of 8 from P, separated by zero padding:
               ``program`` (a whole ``.tsr`` file), then the host stage's arrays
               (``host.<name>``) and extra programs (``host.program.<name>``, ``.tsr``)
======  =====  ==========================================================================

The manifest's ``sections`` maps each section name to its ``offset`` (from P), ``length``
and ``sha256``; the host stage's arrays are described by ``dtype`` (numpy, little-endian)
and ``shape``. Every program inside is checked again by :class:`~tessera.program.Program`
(its own header, checksums and NPU configuration).

Kinds: ``classifier`` (outputs the class probabilities ``[1, classes]``), ``featurizer``
(outputs the features: for ``tessera head train``), ``detector`` (host post-processing
registered by the SSD code through :func:`register_host_stage`: SSD-VGG's package holds the
trunk program as ``program``, the head program as ``host.program.head`` and the default
boxes as ``host.anchors``, and outputs ``detection_boxes`` ``[1, K, 4]``,
``detection_scores`` ``[1, K]``, ``detection_classes`` ``[1, K]`` and ``num_detections``
``[1]``, see :class:`tessera.ssd.SSDDetectionStage`).
"""

from __future__ import annotations

import abc
import argparse
import importlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tessera.errors import ProgramFormatError, TesseraError
from tessera.heads import LinearHead, head_labels, merge_featurizer_and_head, split_classifier
from tessera.preprocess import PRESETS as PREPROCESS_PRESETS
from tessera.preprocess import PreprocessSpec, get_preset, preprocess
from tessera.program import HEADER as HEADER  # the container header, re-exported for tests
from tessera.program import (
    Program,
    layout_sections,
    pack_container,
    read_container,
    read_sections,
    write_atomically,
)

MAGIC = b"TSRPKG\0\0"
FORMAT_VERSION = 1
# The container (header, manifest, alignment) is the program file's: tessera.program.
SUFFIX = ".tpkg"
KINDS = ("classifier", "featurizer", "detector")
#: The seeds' 2018 client's tensor names.
DEFAULT_INPUT_NAME = "images"
DEFAULT_OUTPUT_NAME = "output_alias"
HEAD_PLACEMENTS = ("host", "npu")
#: Manifest keys, all required: a package must not be read with silently defaulted parts.
MANIFEST_KEYS = (
    "format",
    "format_version",
    "tessera_version",
    "name",
    "kind",
    "preprocess",
    "labels",
    "input_name",
    "output_names",
    "host",
    "sections",
)
FORMAT_NAME = "tessera-package"

#: Runs a program on an NPU backend: ``npu(program, {onnx input name: array})`` returns the
#: program's outputs by ONNX name (what :func:`tessera.sim.run.run_program` gives).
NPU = Callable[[Program, dict[str, np.ndarray]], dict[str, np.ndarray]]


class PackageFormatError(TesseraError):
    """A package file is damaged, truncated, of another format version, or inconsistent."""


def backend_npu(backend: str = "sim") -> NPU:
    """An :data:`NPU` running programs on ``tessera.sim.run`` backend ``backend``."""
    from tessera.sim.run import BACKENDS, run_program

    if backend not in BACKENDS:
        raise TesseraError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")

    def npu(program: Program, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_program(program, inputs, backend).outputs

    return npu


# --------------------------------------------------------------------------- host stages
class HostStage(abc.ABC):
    """What the host does with the NPU's outputs: a classifier head, a detector's decoding.

    A stage is stored as its ``type_name``, JSON ``params``, named numpy ``arrays`` and
    named extra NPU ``programs``; the registry (:func:`register_host_stage`) maps the type
    name back to the class on load, so a new kind of post-processing plugs in without
    touching the file format. Extra programs are for pipelines that go back to the NPU
    after a host step (SSD: trunk program, L2 normalisation on the host, head program);
    the stage runs them through the ``npu`` it is called with, the package's own runner,
    so every program of a request runs on the same device.
    """

    #: Identifier stored in the package; unique among registered stages.
    type_name: ClassVar[str]

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters (no arrays)."""

    @abc.abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """Named arrays (weights, anchors), stored as checksummed binary sections."""

    def programs(self) -> dict[str, Program]:
        """Named NPU programs the stage runs besides the package's (none by default)."""
        return {}

    @classmethod
    @abc.abstractmethod
    def from_parts(
        cls,
        params: dict[str, Any],
        arrays: dict[str, np.ndarray],
        programs: dict[str, Program],
    ) -> HostStage:
        """Rebuild from :meth:`params`, :meth:`arrays` and :meth:`programs`; raise
        TesseraError if they are invalid."""

    @abc.abstractmethod
    def input_names(self) -> list[str]:
        """The program outputs the stage reads."""

    @abc.abstractmethod
    def num_outputs(self) -> int:
        """How many arrays :meth:`__call__` returns (one per package output name)."""

    @abc.abstractmethod
    def __call__(self, npu_outputs: Mapping[str, np.ndarray], npu: NPU) -> list[np.ndarray]:
        """The package outputs, in the order of :attr:`Package.output_names`, from the main
        program's outputs; ``npu`` runs any of :meth:`programs`."""

    def num_classes(self) -> int | None:
        """Classes the stage distinguishes (labels must match), if it classifies."""
        return None

    def output_shapes(self) -> list[tuple[int, ...]] | None:
        """Shapes of the :meth:`__call__` outputs for one image, if fixed (the scoring
        service's signature shows them); None if only a run tells."""
        return None

    def describe(self) -> str | None:
        """A few words on what the stage does, for :meth:`Package.describe`."""
        return None


HOST_STAGES: dict[str, type[HostStage]] = {}
#: Host stage type -> module that registers it when imported. Loading a package whose
#: stage is not registered yet imports the module named here first, so a stage defined
#: outside this file (the SSD decoding) needs no import by every caller of
#: :func:`load_package`. Only these fixed names are ever imported, never one from a file.
PLUGIN_MODULES: dict[str, str] = {"ssd_detection": "tessera.ssd"}


def register_host_stage(cls: type[HostStage]) -> type[HostStage]:
    """Class decorator making a :class:`HostStage` loadable from packages."""
    if HOST_STAGES.get(cls.type_name, cls) is not cls:
        raise ValueError(f"host stage type {cls.type_name!r} is registered twice")
    HOST_STAGES[cls.type_name] = cls
    return cls


@register_host_stage
class ClassifierHeadStage(HostStage):
    """The seeds' CPU classifier: a :class:`~tessera.heads.LinearHead` on the features."""

    type_name = "linear_head"

    def __init__(self, head: LinearHead, input_name: str) -> None:
        self.head = head
        self.input_name = input_name

    def params(self) -> dict[str, Any]:
        return {"input": self.input_name, "softmax": self.head.softmax}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weight": self.head.weight, "bias": self.head.bias}

    @classmethod
    def from_parts(
        cls,
        params: dict[str, Any],
        arrays: dict[str, np.ndarray],
        programs: dict[str, Program],
    ) -> ClassifierHeadStage:
        if set(params) != {"input", "softmax"} or set(arrays) != {"weight", "bias"} or programs:
            raise TesseraError(
                f"linear_head needs params input, softmax, arrays weight, bias and no "
                f"programs; got {sorted(params)}, {sorted(arrays)} and {sorted(programs)}"
            )
        if not isinstance(params["input"], str) or not isinstance(params["softmax"], bool):
            raise TesseraError("linear_head params: input must be a string, softmax a boolean")
        if arrays["weight"].dtype != np.float32 or arrays["bias"].dtype != np.float32:
            raise TesseraError("linear_head weights must be float32")
        head = LinearHead(arrays["weight"], arrays["bias"], params["softmax"])
        return cls(head, params["input"])

    def input_names(self) -> list[str]:
        return [self.input_name]

    def num_outputs(self) -> int:
        return 1

    def num_classes(self) -> int:
        return self.head.num_classes

    def __call__(self, npu_outputs: Mapping[str, np.ndarray], npu: NPU) -> list[np.ndarray]:
        return [self.head(npu_outputs[self.input_name])]


# --------------------------------------------------------------------------- the package
@dataclass(eq=False)
class Package:
    """One deployable model: preprocessing, NPU program, host stage, labels, tensor names.

    ``run`` is the whole pipeline after decoding; ``preprocess_image`` the stage before it.
    """

    name: str
    kind: str
    preprocess: PreprocessSpec
    program: Program
    labels: list[str]
    input_name: str = DEFAULT_INPUT_NAME
    output_names: list[str] = field(default_factory=lambda: [DEFAULT_OUTPUT_NAME])
    host: HostStage | None = None

    def __post_init__(self) -> None:
        self.labels = list(self.labels)
        self.output_names = list(self.output_names)
        self._validate()

    # ----------------------------------------------------------------- pipeline
    @property
    def program_input(self) -> str:
        """The ONNX input name the program takes (the package's is :attr:`input_name`)."""
        return self.program.manifest["inputs"][0]["name"]

    @property
    def program_outputs(self) -> list[str]:
        """The program's ONNX output names, in manifest order."""
        return [o["name"] for o in self.program.manifest["outputs"]]

    @property
    def num_classes(self) -> int | None:
        """Classes of a classifier (its output width), else what the host stage reports."""
        if self.host is not None:
            return self.host.num_classes()
        if self.kind == "classifier":
            return int(self.program.manifest["outputs"][0]["shape"][-1])
        return None

    def preprocess_image(self, data: bytes) -> np.ndarray:
        """Encoded JPEG/PNG bytes to the float32 NHWC input ``[1, H, W, 3]``.

        Raises :class:`~tessera.errors.ImageDecodeError` for bytes that are no usable image.
        """
        return preprocess(data, self.preprocess)

    def run_npu(
        self, inputs: Mapping[str, np.ndarray], npu: NPU | None = None
    ) -> dict[str, np.ndarray]:
        """The NPU stage only: the program's outputs by their ONNX names."""
        if self.input_name not in inputs:
            raise TesseraError(
                f"missing input {self.input_name!r}; package {self.name!r} takes "
                f"{self.input_name!r} {list(self.preprocess.output_shape)} float32"
            )
        x = np.asarray(inputs[self.input_name])
        if x.shape != self.preprocess.output_shape:
            raise TesseraError(
                f"input {self.input_name!r} must have shape "
                f"{list(self.preprocess.output_shape)}, got {list(x.shape)}"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise TesseraError(f"input {self.input_name!r} must be float32, got {x.dtype}")
        runner = npu if npu is not None else backend_npu("sim")
        return runner(self.program, {self.program_input: x.astype(np.float32, copy=False)})

    def run(
        self, inputs: Mapping[str, np.ndarray], npu: NPU | None = None
    ) -> dict[str, np.ndarray]:
        """Preprocessed input (keyed by :attr:`input_name`) to the outputs (keyed by
        :attr:`output_names`): the NPU program through ``npu`` (default: the instruction
        simulator), then the host stage. A classifier returns ``[1, classes]`` float32
        probabilities."""
        runner = npu if npu is not None else backend_npu("sim")
        npu_outputs = self.run_npu(inputs, runner)
        missing = [n for n in self._npu_output_names() if n not in npu_outputs]
        if missing:
            raise TesseraError(f"the NPU backend returned no output {missing}")
        if self.host is not None:
            values = self.host(npu_outputs, runner)
        else:
            values = [npu_outputs[n] for n in self.program_outputs]
        return dict(zip(self.output_names, values, strict=True))

    def _npu_output_names(self) -> list[str]:
        return self.host.input_names() if self.host is not None else self.program_outputs

    # ----------------------------------------------------------------- checks
    def _validate(self) -> None:
        """Consistency of the parts, so no package is written that could not be served."""

        def fail(problem: str) -> TesseraError:
            return TesseraError(f"package {self.name!r}: {problem}")

        if not isinstance(self.name, str) or not self.name:
            raise TesseraError(f"package name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise fail(f"unknown kind {self.kind!r}; known: {', '.join(KINDS)}")
        if not isinstance(self.preprocess, PreprocessSpec):
            raise fail("preprocess must be a PreprocessSpec")
        if not isinstance(self.program, Program):
            raise fail("program must be a tessera.program.Program")
        names = [self.input_name, *self.output_names]
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise fail(f"tensor names must be distinct non-empty strings, got {names}")
        if not all(isinstance(label, str) and label for label in self.labels):
            raise fail("labels must be non-empty strings")
        inputs = self.program.manifest["inputs"]
        if len(inputs) != 1:
            raise fail(f"the program takes {len(inputs)} inputs; a package feeds it one image")
        shape = list(inputs[0]["shape"])
        if shape != list(self.preprocess.output_shape):
            suggest = [n for n, s in PREPROCESS_PRESETS.items() if list(s.output_shape) == shape]
            raise fail(
                f"the model input {inputs[0]['name']!r} has shape {shape} but preprocessing "
                f"{self.preprocess.name!r} produces {list(self.preprocess.output_shape)}"
                + (f"; presets that fit: {', '.join(suggest)}" if suggest else "")
            )
        if self.host is not None:
            unknown = [n for n in self.host.input_names() if n not in self.program_outputs]
            if unknown:
                raise fail(
                    f"the host stage reads {unknown}, which the program does not output "
                    f"({self.program_outputs})"
                )
            produced = self.host.num_outputs()
        else:
            produced = len(self.program_outputs)
        if produced != len(self.output_names):
            raise fail(
                f"{produced} outputs but {len(self.output_names)} output names {self.output_names}"
            )
        if self.kind == "classifier":
            if len(self.output_names) != 1:
                raise fail("a classifier has exactly one output")
            classes = self.num_classes
            if len(self.labels) != classes:
                raise fail(f"{len(self.labels)} labels for {classes} classes")
        if self.kind == "detector" and self.host is None:
            raise fail("a detector needs its host post-processing stage")
        if self.kind == "detector" and self.num_classes is not None:
            if len(self.labels) != self.num_classes:
                raise fail(f"{len(self.labels)} labels for {self.num_classes} classes")
        if self.host is not None:
            # Every program of a request runs on the same device: one NPU configuration.
            fingerprint = self.program.config.fingerprint()
            for key, program in self.host.programs().items():
                if program.config.fingerprint() != fingerprint:
                    raise fail(
                        f"host program {key!r} is compiled for NPU {program.config.name}, "
                        f"the package's program for {self.program.config.name}"
                    )

    # ----------------------------------------------------------------- file
    def to_bytes(self) -> bytes:
        """The ``.tpkg`` file contents (deterministic)."""
        self._validate()
        bodies: dict[str, bytes] = {"program": self.program.to_bytes()}
        host = None
        if self.host is not None:
            arrays = {}
            for key, value in sorted(self.host.arrays().items()):
                a = np.asarray(value)
                if a.dtype.hasobject:
                    raise TesseraError(f"host array {key!r} holds Python objects")
                little = a.astype(a.dtype.newbyteorder("<"), copy=False)
                section = f"host.{key}"
                if key.startswith("program."):
                    raise TesseraError(f"host array name {key!r} clashes with host programs")
                bodies[section] = np.ascontiguousarray(little).tobytes()
                arrays[key] = {
                    "dtype": little.dtype.str,
                    "shape": list(a.shape),
                    "section": section,
                }
            programs = {}
            for key, program in sorted(self.host.programs().items()):
                section = f"host.program.{key}"
                bodies[section] = program.to_bytes()
                programs[key] = {"section": section}
            host = {
                "type": self.host.type_name,
                "params": self.host.params(),
                "arrays": arrays,
                "programs": programs,
            }
        sections, payload, size = layout_sections(bodies)
        import tessera

        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tessera_version": tessera.__version__,
            "name": self.name,
            "kind": self.kind,
            "preprocess": self.preprocess.to_dict(),
            "labels": self.labels,
            "input_name": self.input_name,
            "output_names": self.output_names,
            "host": host,
            "sections": sections,
        }
        try:
            text = json.dumps(
                manifest, sort_keys=True, separators=(",", ":"), allow_nan=False
            ).encode("ascii")
        except (TypeError, ValueError) as exc:
            raise TesseraError(f"package manifest is not JSON-serialisable: {exc}") from None
        return pack_container(MAGIC, FORMAT_VERSION, text, payload, size)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (a temporary file renamed into place), like ``Program.save``."""
        path = Path(path)
        data = self.to_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Package:
        """Parse and fully check package contents; ``source`` names them in errors."""
        return _unpack(bytes(data), source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Package:
        """Read and fully check a ``.tpkg`` file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PackageFormatError(f"cannot read package {path}: {exc.strerror or exc}") from None
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def for_program(
        cls,
        program: Program,
        preprocess: str | PreprocessSpec,
        name: str,
        kind: str = "featurizer",
        labels: Sequence[str] = (),
    ) -> Package:
        """A package around an already compiled program, with no host stage."""
        spec = preprocess if isinstance(preprocess, PreprocessSpec) else get_preset(preprocess)
        outputs = [o["name"] for o in program.manifest["outputs"]]
        names = [DEFAULT_OUTPUT_NAME] if len(outputs) == 1 else outputs
        return cls(name, kind, spec, program, list(labels), DEFAULT_INPUT_NAME, names)

    def describe(self) -> str:
        """One line for humans: kind, classes, where the head runs, sizes."""
        what = f"{self.kind} {self.name!r}"
        if self.num_classes is not None:
            what += f", {self.num_classes} classes"
        if isinstance(self.host, ClassifierHeadStage):
            what += (
                f", head on the host ({self.host.head.num_features} features -> "
                f"{self.host.head.num_classes})"
            )
        elif self.kind == "classifier":
            what += ", head on the NPU"
        elif self.host is not None and self.host.describe():
            what += f", {self.host.describe()}"
        cfg = self.program.config
        return (
            f"{what}; preprocessing {self.preprocess.name!r}; NPU {cfg.name}; input "
            f"{self.input_name!r}, outputs {self.output_names}"
        )


def load_package(path: str | os.PathLike[str]) -> Package:
    """Read a ``.tpkg`` file; raises :class:`PackageFormatError` if it is damaged."""
    return Package.load(path)


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unpack(data: bytes, source: str) -> Package:
    """Container checks (header, checksums, layout), then the parts, then consistency."""

    def fail(problem: str) -> PackageFormatError:
        return PackageFormatError(f"{source}: {problem}")

    manifest, view, start, size = read_container(
        data, MAGIC, FORMAT_VERSION, "package", "rebuild it with `tessera package`", fail
    )
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    unknown = sorted(set(manifest) - set(MANIFEST_KEYS))
    if missing or unknown:
        raise fail(f"manifest keys missing {missing}, unknown {unknown}")
    if manifest["format"] != FORMAT_NAME or manifest["format_version"] != FORMAT_VERSION:
        raise fail(
            f"manifest says format {manifest['format']!r} version "
            f"{manifest['format_version']!r}, expected {FORMAT_NAME!r} {FORMAT_VERSION}"
        )

    # Sections: back to back in file order (the manifest lists them sorted by name),
    # aligned, zero-padded, each checksummed.
    sections = manifest["sections"]
    if not isinstance(sections, dict) or "program" not in sections:
        raise fail("corrupted: the manifest has no section table with a program")
    labels = {name: f"section {name!r}" for name in sections}
    bodies = {
        name: bytes(body)
        for name, body in read_sections(view[start:size], sections, labels, fail).items()
    }

    try:
        program = Program.from_bytes(bodies["program"], source=f"{source} (program section)")
    except ProgramFormatError as exc:
        raise fail(f"the program section is not loadable: {exc}") from None
    try:
        spec = PreprocessSpec.from_dict(manifest["preprocess"])
        host = _load_host(manifest["host"], bodies, source)
        host_entry = manifest["host"] or {}
        used = {"program"} | {
            part["section"]
            for key in ("arrays", "programs")
            for part in host_entry.get(key, {}).values()
        }
        if set(bodies) != used:
            raise TesseraError(f"sections {sorted(set(bodies) - used)} belong to no part")
        for key in ("labels", "output_names"):
            if not isinstance(manifest[key], list):
                raise TesseraError(f"{key} must be a list")
        return Package(
            name=manifest["name"],
            kind=manifest["kind"],
            preprocess=spec,
            program=program,
            labels=manifest["labels"],
            input_name=manifest["input_name"],
            output_names=manifest["output_names"],
            host=host,
        )
    except PackageFormatError:
        raise
    except TesseraError as exc:
        raise fail(f"invalid package: {exc}") from None


def _load_host(entry: Any, bodies: dict[str, bytes], source: str) -> HostStage | None:
    if entry is None:
        return None
    if not isinstance(entry, dict) or set(entry) != {"type", "params", "arrays", "programs"}:
        raise TesseraError("host stage entry must have exactly type, params, arrays, programs")
    if entry["type"] not in HOST_STAGES and entry["type"] in PLUGIN_MODULES:
        importlib.import_module(PLUGIN_MODULES[entry["type"]])
    cls = HOST_STAGES.get(entry["type"])
    if cls is None:
        raise TesseraError(
            f"host stage {entry['type']!r} is not known to this tessera (known: "
            f"{', '.join(sorted(HOST_STAGES))})"
        )
    if not all(isinstance(entry[key], dict) for key in ("params", "arrays", "programs")):
        raise TesseraError("host stage params, arrays and programs must be objects")
    programs = {}
    for key, spec in entry["programs"].items():
        if not (isinstance(spec, dict) and set(spec) == {"section"} and spec["section"] in bodies):
            raise TesseraError(f"malformed host program entry {key!r}")
        try:
            programs[key] = Program.from_bytes(
                bodies[spec["section"]], source=f"{source} (host program {key!r})"
            )
        except ProgramFormatError as exc:
            raise TesseraError(f"host program {key!r} is not loadable: {exc}") from None
    arrays = {}
    for key, spec in entry["arrays"].items():
        if not (
            isinstance(spec, dict)
            and set(spec) == {"dtype", "shape", "section"}
            and spec["section"] in bodies
            and isinstance(spec["shape"], list)
            and all(_is_uint(d) for d in spec["shape"])
        ):
            raise TesseraError(f"malformed host array entry {key!r}")
        try:
            dtype = np.dtype(spec["dtype"])
        except TypeError:
            raise TesseraError(f"host array {key!r} has unknown dtype {spec['dtype']!r}") from None
        if dtype.hasobject or dtype.byteorder == ">":
            raise TesseraError(f"host array {key!r} has unsupported dtype {spec['dtype']!r}")
        body = bodies[spec["section"]]
        count = int(np.prod(spec["shape"], dtype=np.int64))
        if count * dtype.itemsize != len(body):
            raise TesseraError(
                f"host array {key!r}: {len(body)} bytes for shape {spec['shape']} {dtype}"
            )
        arrays[key] = (
            np.frombuffer(body, dtype=dtype)
            .reshape(spec["shape"])
            .astype(dtype.newbyteorder("="), copy=True)
        )
    return cls.from_parts(entry["params"], arrays, programs)


# --------------------------------------------------------------------------- building
def build_package(
    model: str | os.PathLike[str] | Any,
    *,
    head: str | os.PathLike[str] | Any | None = None,
    head_on: str = "host",
    preprocess: str | PreprocessSpec | None = None,
    config: str | Any | None = None,
    labels: str | os.PathLike[str] | Sequence[str] | None = None,
    name: str | None = None,
    kind: str | None = None,
    input_name: str = DEFAULT_INPUT_NAME,
    output_names: Sequence[str] | None = None,
    detection: Mapping[str, Any] | None = None,
) -> Package:
    """Compile ``model`` and assemble a package (see ``tessera package --help``).

    * With ``head`` (an ONNX file or model, or a :class:`LinearHead`), ``model`` is the
      featurizer and the package a classifier.
    * Without, a model ending in a linear classifier (Gemm + Softmax) is split at its
      head's input, as the seeds split it: the featurizer is compiled, the head runs on the
      host. A model without such a head is packaged as a ``featurizer``.
    * ``head_on="npu"`` instead compiles featurizer and head into one program (the head's
      input stays in NPU DRAM in block floating point; one program, one run per image).
    * An SSD (the zoo's ``ssd_vgg``: ``loc_*``/``conf_*`` head outputs; or ``kind=
      "detector"``) becomes a ``detector`` package (:func:`tessera.ssd.build_detector_package`):
      trunk and head programs, the host L2 normalisation, decoding and NMS with the
      ``detection`` defaults (``score_threshold``, ``iou_threshold``, ``pre_nms_top_k``,
      ``max_detections``, ``clip``; see :class:`tessera.ssd.DetectionOptions`).

    ``labels``: a labels file or list; default the head's metadata labels, else the ImageNet
    names for 1000 classes (detectors: the VOC names for 21 classes). ``config``: NPU preset
    name or :class:`NPUConfig` (default ``ulx3s-85f``). ``preprocess``: preset name or spec
    (default ``ssd`` for detectors, else ``resnet``). ``kind="featurizer"`` packages the
    featurizer of a classifier alone.
    """
    import onnx

    from tessera.compiler.driver import compile_model
    from tessera.compiler.onnx_import import load_model
    from tessera.config import DEFAULT_PRESET, NPUConfig, get_config

    if head_on not in HEAD_PLACEMENTS:
        raise TesseraError(f"head_on must be one of {', '.join(HEAD_PLACEMENTS)}, got {head_on!r}")
    if kind not in (None, *KINDS):
        raise TesseraError(f"unknown package kind {kind!r}; known: {', '.join(KINDS)}")
    cfg = config if isinstance(config, NPUConfig) else get_config(config or DEFAULT_PRESET)
    if isinstance(preprocess, str):
        get_preset(preprocess)  # an unknown name fails before the model is loaded
    if isinstance(model, onnx.ModelProto):
        proto, default_name = model, model.graph.name or "model"
    else:
        proto, default_name = load_model(model), Path(model).stem
    name = name or default_name

    from tessera import ssd

    if kind == "detector" or (kind is None and head is None and ssd.is_ssd_model(proto)):
        if head is not None or head_on != "host":
            raise TesseraError("a detector package has no classifier head: drop --head/--head-on")
        return ssd.build_detector_package(
            proto,
            cfg,
            name=name,
            preprocess=preprocess if preprocess is not None else "ssd",
            labels=labels,
            input_name=input_name,
            output_names=output_names,
            options=detection,
        )
    if detection:
        raise TesseraError(f"detection options {sorted(detection)} apply to detector packages only")
    preprocess = preprocess if preprocess is not None else "resnet"
    spec = preprocess if isinstance(preprocess, PreprocessSpec) else get_preset(preprocess)

    head_model = None
    linear: LinearHead | None = None
    if isinstance(head, LinearHead):
        linear = head
    elif head is not None:
        head_model = head if isinstance(head, onnx.ModelProto) else load_model(head)
        linear = LinearHead.from_onnx(head_model)
    if kind == "featurizer" and linear is not None:
        raise TesseraError("a featurizer package has no head; drop the head or the kind")

    def assemble(kind: str, program: Program, host: HostStage | None) -> Package:
        return _assemble(
            name, kind, spec, program, host, labels, head_model, input_name, output_names
        )

    featurizer = proto
    if linear is None:
        if head_on == "npu" and kind != "featurizer":
            # A whole classifier compiled as it is: the head is its last layers.
            if not _is_classifier(proto):
                raise TesseraError("--head-on npu needs a head: pass --head or a classifier model")
            return assemble("classifier", compile_model(proto, cfg)[0], None)
        try:
            featurizer, linear = split_classifier(proto)
        except TesseraError:
            linear = None  # no linear classifier at the end: the model is a featurizer
        if kind == "featurizer" or linear is None:
            return assemble("featurizer", compile_model(featurizer, cfg)[0], None)
    if head_on == "npu":
        merged = merge_featurizer_and_head(featurizer, linear)
        return assemble("classifier", compile_model(merged, cfg)[0], None)
    program = compile_model(featurizer, cfg)[0]
    outputs = program.manifest["outputs"]
    if len(outputs) != 1:
        raise TesseraError(
            f"the featurizer has {len(outputs)} outputs {[o['name'] for o in outputs]}; "
            "a head needs exactly one"
        )
    width = int(np.prod(outputs[0]["shape"]))
    if width != linear.num_features:
        raise TesseraError(
            f"the featurizer outputs {width} features but the head takes {linear.num_features}"
        )
    return assemble("classifier", program, ClassifierHeadStage(linear, outputs[0]["name"]))


def _is_classifier(model: Any) -> bool:
    """Whether a model's single output is a Softmax (the zoo's full classifiers)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    outputs = list(model.graph.output)
    return len(outputs) == 1 and getattr(producers.get(outputs[0].name), "op_type", "") == "Softmax"


def _assemble(
    name: str,
    kind: str,
    spec: PreprocessSpec,
    program: Program,
    host: HostStage | None,
    labels: str | os.PathLike[str] | Sequence[str] | None,
    head_model: Any,
    input_name: str,
    output_names: Sequence[str] | None,
) -> Package:
    """Resolve labels and tensor names, then build (and so validate) the package."""
    from tessera.labels import IMAGENET_CLASSES, load_labels

    if output_names is None:
        count = host.num_outputs() if host is not None else len(program.manifest["outputs"])
        output_names = (
            [DEFAULT_OUTPUT_NAME]
            if count == 1
            else [o["name"] for o in program.manifest["outputs"]]
        )
    if kind == "classifier":
        classes = (
            host.num_classes() if host is not None else program.manifest["outputs"][0]["shape"][-1]
        )
        if isinstance(labels, (str, os.PathLike)):
            labels = load_labels(labels, num_classes=classes)
        elif labels is None and head_model is not None and head_labels(head_model) is not None:
            labels = head_labels(head_model)
        elif labels is None and classes == IMAGENET_CLASSES:
            labels = load_labels(None, num_classes=classes)
        elif labels is None:
            raise TesseraError(
                f"the classifier has {classes} classes: pass --labels (one name per line)"
            )
    elif isinstance(labels, (str, os.PathLike)):
        labels = load_labels(labels)
    return Package(
        name, kind, spec, program, list(labels or ()), input_name, list(output_names), host
    )


# --------------------------------------------------------------------------- CLI
def _cmd_package(args: argparse.Namespace) -> int:
    import time

    started = time.perf_counter()
    detection = {
        key: getattr(args, key)
        for key in ("score_threshold", "iou_threshold", "max_detections")
        if getattr(args, key) is not None
    }
    pkg = build_package(
        args.model,
        head=args.head,
        head_on=args.head_on,
        preprocess=args.preprocess,
        config=args.config,
        labels=args.labels,
        name=args.name,
        kind="featurizer" if args.featurizer else None,
        input_name=args.input_name,
        output_names=args.output_names.split(",") if args.output_names else None,
        detection=detection,
    )
    pkg.save(args.output)
    size = Path(args.output).stat().st_size
    programs = [pkg.program, *(pkg.host.programs().values() if pkg.host is not None else ())]
    program_bytes = sum(len(p.to_bytes()) for p in programs)
    print(
        f"wrote {args.output}: {pkg.describe()}; {size / 2**20:.1f} MiB "
        f"(program{'s' if len(programs) > 1 else ''} {program_bytes / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tessera package`` to the CLI."""
    from tessera.config import DEFAULT_PRESET, PRESETS

    p = sub.add_parser(
        "package",
        help="compile a model and bundle it with preprocessing, head and labels (.tpkg)",
        description="Build one deployable file: preprocessing parameters, the compiled NPU "
        "program, the classifier head (host CPU by default), labels and tensor names. A "
        "classifier ONNX without --head is split at its final Gemm: featurizer on the NPU, "
        "head on the host. An SSD (tessera zoo export ssd_vgg) becomes a detector package: "
        "trunk and head programs, host L2 normalisation, box decoding and NMS, outputs "
        "detection_boxes, detection_scores, detection_classes, num_detections. The same "
        "inputs always give the same bytes.",
    )
    p.add_argument(
        "model", help="ONNX model: featurizer (with --head), whole classifier, or SSD detector"
    )
    p.add_argument("-o", "--output", required=True, help="package file to write (.tpkg)")
    p.add_argument("--head", help="classifier head ONNX (Gemm + Softmax), e.g. from head train")
    p.add_argument(
        "--head-on",
        choices=HEAD_PLACEMENTS,
        default="host",
        help="run the head on the host CPU (default, as the seeds) or compile it into the "
        "NPU program",
    )
    p.add_argument(
        "--preprocess",
        choices=sorted(PREPROCESS_PRESETS),
        help="preprocessing preset (default resnet: BGR, ImageNet means, 256 -> crop 224; "
        "for an SSD: ssd, plain resize to 300x300)",
    )
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="NPU config")
    p.add_argument(
        "--labels",
        help="class names, one per line (default: the head's own, or ImageNet's for 1000; "
        "detectors: PASCAL VOC's for 21)",
    )
    p.add_argument("--name", help="model name (default: the ONNX file name)")
    p.add_argument(
        "--featurizer",
        action="store_true",
        help="package only the featurizer (a classifier's head is dropped), for head train",
    )
    p.add_argument(
        "--input-name", default=DEFAULT_INPUT_NAME, help=f"input tensor name ({DEFAULT_INPUT_NAME})"
    )
    p.add_argument(
        "--output-names",
        help=f"comma-separated output tensor names (default {DEFAULT_OUTPUT_NAME}; detectors: "
        "detection_boxes,detection_scores,detection_classes,num_detections)",
    )
    det = p.add_argument_group(
        "detector defaults", "stored in a detector package; tessera score can override them"
    )
    det.add_argument(
        "--score-threshold", type=float, help="report boxes scoring above this (default 0.5)"
    )
    det.add_argument(
        "--iou-threshold",
        type=float,
        help="per-class NMS drops a box overlapping a better one by more (default 0.45)",
    )
    det.add_argument(
        "--max-detections",
        type=int,
        help="detections per image, best first; the outputs' fixed K (default 100)",
    )
    p.set_defaults(func=_cmd_package)
