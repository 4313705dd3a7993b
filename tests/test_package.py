"""The deployable package (issue 3, sections 5 and 7): format, integrity, API, ResNet-50.

Format and API cases use the small random CNN of ``photos.tiny_classifier`` (compiles and
runs in well under a second). The ResNet-50 cases are the issue's end-to-end checks, on
the real sample photos, with the zoo's seeded weights:

* the featurizer's output is bit-exact between the instruction simulator and the numpy
  reference executor;
* the package's probabilities (8-bit block floating point featurizer on the simulator,
  float32 head on the host) are within ``HOST_HEAD_ATOL`` of the FP32 pipeline run
  entirely in onnxruntime (same preprocessing, the full zoo ONNX), with the same top-1.
  Measured on the five photos: max |dp| 0.016-0.050 (flower 0.050), top-1 and top-5
  identical. With the head compiled onto the NPU as well (its FC quantized too), max
  |dp| 0.022-0.084, bound ``NPU_HEAD_ATOL``.

Package sizes measured: ResNet-50 with the head on the host 31.7 MiB (program 23.9 MiB,
head 8.2 MB float32), head on the NPU 26.0 MiB.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import pytest
from photos import encode, photos, tiny_classifier, tiny_featurizer

import tessera.package
from tessera import zoo
from tessera.cli import main
from tessera.errors import ImageDecodeError, TesseraError
from tessera.heads import LinearHead, cached_featurizer
from tessera.labels import load_labels
from tessera.package import (
    FORMAT_VERSION,
    HEADER,
    HOST_STAGES,
    MAGIC,
    PLUGIN_MODULES,
    ClassifierHeadStage,
    HostStage,
    Package,
    PackageFormatError,
    build_package,
    load_package,
    register_host_stage,
)
from tessera.preprocess import PRESETS
from tessera.program import Program
from tessera.sim.run import run_program

HOST_HEAD_ATOL = 0.06
NPU_HEAD_ATOL = 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 10-class classifier package (head on the host) saved to disk, and its labels."""
    root = tmp_path_factory.mktemp("tiny")
    labels = [f"class {i}" for i in range(10)]
    (root / "labels.txt").write_text("\n".join(labels) + "\n")
    model = root / "tiny.onnx"
    model.write_bytes(tiny_classifier(10).SerializeToString())
    pkg = build_package(model, labels=root / "labels.txt")
    path = root / "tiny.tpkg"
    pkg.save(path)
    return {"root": root, "model": model, "pkg": pkg, "path": path, "labels": labels}


def _x(seed: int = 0) -> np.ndarray:
    return zoo.sample_input(seed)


# --------------------------------------------------------------------------- contents
def test_classifier_package_contents(tiny: dict[str, Any]) -> None:
    pkg = load_package(tiny["path"])
    assert (pkg.name, pkg.kind, pkg.labels) == ("tiny", "classifier", tiny["labels"])
    assert pkg.preprocess == PRESETS["resnet"]
    assert (pkg.input_name, pkg.output_names) == ("images", ["output_alias"])
    assert isinstance(pkg.program, Program) and pkg.program == tiny["pkg"].program
    assert isinstance(pkg.host, ClassifierHeadStage)
    assert pkg.program_outputs == ["features"] and pkg.num_classes == 10
    np.testing.assert_array_equal(pkg.host.head.weight, tiny["pkg"].host.head.weight)


def test_run_matches_the_simulated_featurizer_plus_numpy_head(tiny: dict[str, Any]) -> None:
    pkg = load_package(tiny["path"])
    x = _x()
    out = pkg.run({"images": x})
    assert list(out) == ["output_alias"]
    probs = out["output_alias"]
    assert probs.shape == (1, 10) and probs.dtype == np.float32
    features = run_program(pkg.program, {"input": x}, "sim").outputs["features"]
    np.testing.assert_array_equal(probs, pkg.host.head(features))
    # A caller-supplied NPU (the service's device) is used instead of the simulator.
    calls = []

    def npu(program: Program, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(sorted(inputs))
        return run_program(program, inputs, "reference").outputs

    np.testing.assert_array_equal(pkg.run({"images": x}, npu)["output_alias"], probs)
    assert calls == [["input"]]


def test_preprocess_image(tiny: dict[str, Any]) -> None:
    pkg = tiny["pkg"]
    x = pkg.preprocess_image(encode(photos()["coffee"]))
    assert x.shape == (1, 224, 224, 3) and x.dtype == np.float32
    with pytest.raises(ImageDecodeError):
        pkg.preprocess_image(b"GIF89a not supported")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input": np.zeros((1, 224, 224, 3), np.float32)}, "missing input 'images'"),
        ({"images": np.zeros((1, 3, 224, 224), np.float32)}, r"must have shape \[1, 224, 224, 3\]"),
        ({"images": np.zeros((1, 224, 224, 3), np.uint8)}, "must be float32"),
    ],
)
def test_run_rejects_bad_inputs(tiny: dict[str, Any], inputs: dict, message: str) -> None:
    with pytest.raises(TesseraError, match=message):
        tiny["pkg"].run(inputs)


def test_head_on_npu_and_featurizer_kinds(tiny: dict[str, Any]) -> None:
    on_npu = build_package(tiny["model"], head_on="npu", labels=tiny["labels"])
    assert on_npu.kind == "classifier" and on_npu.host is None and on_npu.num_classes == 10
    x = _x(1)
    p_npu = on_npu.run({"images": x})["output_alias"]
    p_host = tiny["pkg"].run({"images": x})["output_alias"]
    assert p_npu.shape == (1, 10) and abs(float(p_npu.sum()) - 1) < 1e-5
    assert np.abs(p_npu - p_host).max() < 0.05
    # Explicit featurizer + head, merged onto the NPU: the same program as the whole model.
    feat_only = build_package(tiny["model"], kind="featurizer")
    assert feat_only.kind == "featurizer" and feat_only.labels == [] and feat_only.host is None
    assert feat_only.program == tiny["pkg"].program
    merged = build_package(
        tiny_featurizer(), head=tiny["pkg"].host.head, head_on="npu", labels=tiny["labels"]
    )
    np.testing.assert_array_equal(merged.run({"images": x})["output_alias"], p_npu)
    features = feat_only.run({"images": x})["output_alias"]
    assert features.shape == (1, 64)


def test_labels_resolution(tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(TesseraError, match="10 classes: pass --labels"):
        build_package(tiny["model"])
    (tmp_path / "few.txt").write_text("a\nb\n")
    with pytest.raises(TesseraError, match="has 2 names but the classifier has 10 classes"):
        build_package(tiny["model"], labels=tmp_path / "few.txt")
    # A head carrying its labels (from `tessera head train`) needs no labels file.
    head = tiny["pkg"].host.head
    names = [f"n{i}" for i in range(10)]
    (tmp_path / "head.onnx").write_bytes(head.to_onnx(labels=names).SerializeToString())
    assert build_package(tiny_featurizer(), head=tmp_path / "head.onnx").labels == names
    # 1000 classes default to the ImageNet names.
    wide = LinearHead(np.zeros((64, 1000), np.float32), np.zeros(1000, np.float32))
    assert build_package(tiny_featurizer(), head=wide).labels == load_labels()


def test_wrong_preprocessing_for_the_model_input(tiny: dict[str, Any]) -> None:
    with pytest.raises(TesseraError, match=r"\[1, 224, 224, 3\] but preprocessing 'ssd'.*presets"):
        build_package(tiny["model"], preprocess="ssd", labels=tiny["labels"])


def test_head_width_mismatch() -> None:
    head = LinearHead(np.zeros((32, 3), np.float32), np.zeros(3, np.float32))
    with pytest.raises(TesseraError, match="outputs 64 features but the head takes 32"):
        build_package(tiny_featurizer(), head=head, labels=["a", "b", "c"])


def test_reproducible_bytes(tiny: dict[str, Any], tmp_path: Path) -> None:
    again = tmp_path / "again.tpkg"
    build_package(tiny["model"], labels=tiny["root"] / "labels.txt").save(again)
    assert again.read_bytes() == tiny["path"].read_bytes()
    assert load_package(again).to_bytes() == again.read_bytes()


def test_package_cli(tiny: dict[str, Any], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.tpkg"
    argv = ["package", str(tiny["model"]), "--labels", str(tiny["root"] / "labels.txt")]
    assert main([*argv, "-o", str(out)]) == 0
    assert "classifier 'tiny', 10 classes, head on the host (64 features -> 10)" in (
        capsys.readouterr().out
    )
    assert out.read_bytes() == tiny["path"].read_bytes()
    assert main(["package", str(tiny["model"]), "-o", str(out)]) == 2
    assert "pass --labels" in capsys.readouterr().err


# --------------------------------------------------------------------------- integrity
def _manifest(data: bytes) -> tuple[dict, int]:
    _, _, _, _, size, _ = HEADER.unpack_from(data)
    return json.loads(data[HEADER.size : HEADER.size + size]), size


def _with_manifest(data: bytes, manifest: dict) -> bytes:
    """Rewrite the manifest with a valid checksum (the payload stays where it was only if
    the manifest keeps its length, which the callers make sure of)."""
    _, size = _manifest(data)
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert len(text) == size, "keep the manifest length"
    header = HEADER.pack(
        MAGIC, FORMAT_VERSION, HEADER.size, len(data), size, hashlib.sha256(text).digest()
    )
    return header + text + data[HEADER.size + size :]


def _offsets(data: bytes) -> dict[str, int]:
    """Absolute file offsets of interesting bytes of a package."""
    manifest, size = _manifest(data)
    start = -(-(HEADER.size + size) // 8) * 8
    sections = manifest["sections"]
    return {
        "header size field": 12,
        "manifest": HEADER.size + 10,
        "manifest sha": 40,
        "program section": start + sections["program"]["offset"] + 100,
        "program tail": start + sections["program"]["offset"] + sections["program"]["length"] - 1,
        "head weight": start + sections["host.weight"]["offset"] + 7,
        "head bias": start + sections["host.bias"]["offset"],
    }


@pytest.mark.parametrize(
    "where",
    [
        "header size field",
        "manifest",
        "manifest sha",
        "program section",
        "program tail",
        "head weight",
        "head bias",
    ],
)
def test_flipped_byte_is_detected(tiny: dict[str, Any], tmp_path: Path, where: str) -> None:
    data = bytearray(tiny["path"].read_bytes())
    data[_offsets(bytes(data))[where]] ^= 0x10
    path = tmp_path / "bad.tpkg"
    path.write_bytes(bytes(data))
    with pytest.raises(PackageFormatError, match=r"bad\.tpkg: (corrupted|truncated)"):
        load_package(path)


def test_every_byte_is_checked(tiny: dict[str, Any]) -> None:
    """A flipped bit anywhere (sampled every 997 bytes, plus padding) fails to load."""
    data = tiny["path"].read_bytes()
    positions = list(range(0, len(data), 997))
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        with pytest.raises(PackageFormatError):
            Package.from_bytes(bytes(damaged))


@pytest.mark.parametrize("keep", [0, 5, 8, 11, 40, 64, 1000, -1])
def test_truncated(tiny: dict[str, Any], keep: int) -> None:
    data = tiny["path"].read_bytes()
    cut = data[:keep] if keep >= 0 else data[:-1]
    with pytest.raises(PackageFormatError, match=r"truncated|not a tessera package"):
        Package.from_bytes(cut, "p.tpkg")


def test_trailing_bytes(tiny: dict[str, Any]) -> None:
    with pytest.raises(PackageFormatError, match="unexpected bytes after the end"):
        Package.from_bytes(tiny["path"].read_bytes() + b"\0")


def test_newer_format_version_is_refused_first(tiny: dict[str, Any]) -> None:
    data = bytearray(tiny["path"].read_bytes())
    struct.pack_into("<I", data, len(MAGIC), FORMAT_VERSION + 1)
    data[200] ^= 0xFF  # also damaged: the version is still what is reported
    with pytest.raises(
        PackageFormatError,
        match=rf"package format version {FORMAT_VERSION + 1} is not supported \(this tessera "
        rf"reads version {FORMAT_VERSION}\); rebuild it",
    ):
        Package.from_bytes(bytes(data), "p.tpkg")


def test_manifest_version_must_agree(tiny: dict[str, Any]) -> None:
    data = tiny["path"].read_bytes()
    manifest, _ = _manifest(data)
    manifest["format_version"] = 9  # same length as 1
    with pytest.raises(
        PackageFormatError, match="manifest says format 'tessera-package' version 9"
    ):
        Package.from_bytes(_with_manifest(data, manifest))


def test_consistent_but_invalid_contents_are_refused(tiny: dict[str, Any]) -> None:
    data = tiny["path"].read_bytes()
    manifest, _ = _manifest(data)
    manifest["kind"] = "clasifier_"  # same length as "classifier"
    with pytest.raises(PackageFormatError, match="unknown kind 'clasifier_'"):
        Package.from_bytes(_with_manifest(data, manifest))
    manifest["kind"] = "classifier"
    manifest["labels"][0] = "x" * len(manifest["labels"][0])
    assert Package.from_bytes(_with_manifest(data, manifest)).labels[0] == "xxxxxxx"
    manifest["host"]["type"] = "linear_hea_"
    with pytest.raises(PackageFormatError, match="host stage 'linear_hea_' is not known"):
        Package.from_bytes(_with_manifest(data, manifest))


def test_not_a_package(tiny: dict[str, Any], tmp_path: Path) -> None:
    tsr = tmp_path / "p.tsr"
    tiny["pkg"].program.save(tsr)
    with pytest.raises(PackageFormatError, match="not a tessera package"):
        load_package(tsr)
    with pytest.raises(PackageFormatError, match="cannot read package"):
        load_package(tmp_path / "missing.tpkg")


# --------------------------------------------------------------------------- extension
@register_host_stage
class _Boxes(HostStage):
    """A stand-in detector post-processing: two outputs from one program output."""

    type_name: ClassVar[str] = "test_boxes"

    def __init__(self, source: str, anchors: np.ndarray, second: Program | None = None) -> None:
        self.source, self.anchors, self.second = source, anchors, second

    def params(self) -> dict[str, Any]:
        return {"source": self.source}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"anchors": self.anchors}

    def programs(self) -> dict[str, Program]:
        return {"second": self.second} if self.second is not None else {}

    @classmethod
    def from_parts(
        cls, params: dict[str, Any], arrays: dict[str, np.ndarray], programs: dict[str, Program]
    ) -> _Boxes:
        return cls(params["source"], arrays["anchors"], programs.get("second"))

    def input_names(self) -> list[str]:
        return [self.source]

    def num_outputs(self) -> int:
        return 2

    def __call__(self, npu_outputs: dict[str, np.ndarray], npu: Any) -> list[np.ndarray]:
        f = npu_outputs[self.source].reshape(-1)
        if self.second is not None:  # back to the NPU, as SSD's head program
            image = np.broadcast_to(f[:3], (1, 224, 224, 3)).astype(np.float32)
            f = npu(self.second, {"input": image})["features"].reshape(-1)
        return [self.anchors + f[: self.anchors.size].reshape(self.anchors.shape), f[:3]]


@pytest.mark.parametrize("second_program", [False, True])
def test_detector_kind_plugs_in_through_a_host_stage(
    tiny: dict[str, Any], second_program: bool
) -> None:
    feat = build_package(tiny["model"], kind="featurizer")
    anchors = np.arange(8, dtype=np.int16).reshape(2, 4)
    second = build_package(tiny_featurizer(seed=5), kind="featurizer").program
    det = Package(
        "det",
        "detector",
        feat.preprocess,
        feat.program,
        ["background", "thing"],
        output_names=["boxes", "scores"],
        host=_Boxes("features", anchors, second if second_program else None),
    )
    data = det.to_bytes()
    loaded = Package.from_bytes(data)
    assert loaded.kind == "detector" and loaded.host.anchors.dtype == np.int16
    np.testing.assert_array_equal(loaded.host.anchors, anchors)
    assert (loaded.host.second == second) if second_program else loaded.host.second is None
    ran = []

    def npu(program: Program, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ran.append(program)
        return run_program(program, inputs, "sim").outputs

    out = loaded.run({"images": _x()}, npu)
    assert list(out) == ["boxes", "scores"] and out["boxes"].shape == (2, 4)
    assert len(ran) == 1 + second_program  # every program went through the given NPU
    if second_program:  # the extra program is checksummed like the main one
        manifest, size = _manifest(data)
        entry = manifest["sections"]["host.program.second"]
        damaged = bytearray(data)
        damaged[-(-(HEADER.size + size) // 8) * 8 + entry["offset"] + 70] ^= 4
        with pytest.raises(PackageFormatError, match=r"section 'host\.program\.second' sha256"):
            Package.from_bytes(bytes(damaged))
    with pytest.raises(TesseraError, match="a detector needs its host post-processing stage"):
        Package("d", "detector", feat.preprocess, feat.program, [], output_names=["x"])


_PLUGIN = """
import numpy as np
from tessera.package import HostStage, register_host_stage


@register_host_stage
class Negate(HostStage):
    type_name = "test_plugin_negate"

    def params(self):
        return {}

    def arrays(self):
        return {}

    @classmethod
    def from_parts(cls, params, arrays, programs):
        return cls()

    def input_names(self):
        return ["features"]

    def num_outputs(self):
        return 1

    def __call__(self, outputs, npu):
        return [-outputs["features"]]
"""


def test_host_stage_module_is_imported_on_load(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package naming a stage defined elsewhere loads once PLUGIN_MODULES names its
    module; unknown stages are refused with the known ones listed."""
    (tmp_path / "tessera_test_plugin.py").write_text(_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    # A registry of its own, so the test's stage does not outlive the test.
    monkeypatch.setattr(tessera.package, "HOST_STAGES", dict(HOST_STAGES))
    feat = build_package(tiny["model"], kind="featurizer")
    data = feat.to_bytes()
    manifest, _ = _manifest(data)
    manifest["host"] = {"type": "test_plugin_negate", "params": {}, "arrays": {}, "programs": {}}
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    # Rebuild the file around the longer manifest (the program section is unchanged).
    _, size = _manifest(data)
    old_start = -(-(HEADER.size + size) // 8) * 8
    start = -(-(HEADER.size + len(text)) // 8) * 8
    body = data[old_start:]
    header = HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        HEADER.size,
        start + len(body),
        len(text),
        hashlib.sha256(text).digest(),
    )
    rebuilt = header + text + bytes(start - HEADER.size - len(text)) + body
    with pytest.raises(PackageFormatError, match=r"'test_plugin_negate' is not known.*linear_head"):
        Package.from_bytes(rebuilt)
    monkeypatch.setitem(PLUGIN_MODULES, "test_plugin_negate", "tessera_test_plugin")
    try:
        loaded = Package.from_bytes(rebuilt)
    finally:
        sys.modules.pop("tessera_test_plugin", None)
    assert type(loaded.host).__name__ == "Negate"
    x = _x()
    np.testing.assert_array_equal(
        loaded.run({"images": x})["output_alias"], -feat.run({"images": x})["output_alias"]
    )


# --------------------------------------------------------------------------- ResNet-50
@pytest.fixture(scope="module")
def resnet50(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    feat, head = cached_featurizer("resnet50")
    path = tmp_path_factory.mktemp("r50") / "resnet50.tpkg"
    build_package(feat, head=head, name="resnet50").save(path)
    session = ort.InferenceSession(
        str(zoo.cached_export("resnet50")), providers=["CPUExecutionProvider"]
    )
    return {"path": path, "pkg": load_package(path), "session": session, "feat": feat, "head": head}


def _photo_inputs(pkg: Package) -> dict[str, np.ndarray]:
    return {name: pkg.preprocess_image(encode(image)) for name, image in photos().items()}


def test_resnet50_package(resnet50: dict[str, Any], tmp_path: Path) -> None:
    pkg = resnet50["pkg"]
    assert pkg.kind == "classifier" and pkg.num_classes == 1000 and pkg.labels == load_labels()
    assert pkg.host.head.num_features == 2048 and pkg.program.manifest["outputs"][0]["shape"] == [
        1,
        2048,
    ]
    size = resnet50["path"].stat().st_size
    print(f"resnet50.tpkg: {size / 2**20:.1f} MiB")
    assert 25 * 2**20 < size < 40 * 2**20
    # Reproducible: the same inputs packaged again give the same bytes.
    again = tmp_path / "again.tpkg"
    build_package(resnet50["feat"], head=resnet50["head"], name="resnet50").save(again)
    assert again.read_bytes() == resnet50["path"].read_bytes()


def test_resnet50_featurizer_bit_exact_simulator_vs_reference(resnet50: dict[str, Any]) -> None:
    pkg = resnet50["pkg"]
    x = pkg.preprocess_image(encode(photos()["chelsea"], "JPEG"))
    sim = run_program(pkg.program, {pkg.program_input: x}, "sim")
    ref = run_program(pkg.program, {pkg.program_input: x}, "reference")
    np.testing.assert_array_equal(sim.mem, ref.mem)
    np.testing.assert_array_equal(sim.outputs["features"], ref.outputs["features"])
    assert sim.outputs["features"].shape == (1, 2048) and np.any(sim.outputs["features"])


def test_resnet50_probabilities_close_to_onnxruntime_fp32(resnet50: dict[str, Any]) -> None:
    pkg, session = resnet50["pkg"], resnet50["session"]
    worst = 0.0
    for name, x in _photo_inputs(pkg).items():
        got = pkg.run({"images": x})["output_alias"]
        (expected,) = session.run(None, {zoo.INPUT_NAME: x})
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        print(f"{name}: max |dp| {diff:.4f}, top-1 {got.argmax()} vs {expected.argmax()}")
        assert got.argmax() == expected.argmax(), name
        assert diff <= HOST_HEAD_ATOL, name
    print(f"worst {worst:.4f} (bound {HOST_HEAD_ATOL})")


def test_resnet50_head_on_npu_close_to_onnxruntime_fp32(resnet50: dict[str, Any]) -> None:
    pkg = build_package(zoo.cached_export("resnet50"), head_on="npu", name="resnet50")
    assert pkg.host is None and pkg.num_classes == 1000
    print(f"head on NPU: {len(pkg.to_bytes()) / 2**20:.1f} MiB")
    session = resnet50["session"]
    for name, x in list(_photo_inputs(pkg).items())[:2]:
        got = pkg.run({"images": x})["output_alias"]
        (expected,) = session.run(None, {zoo.INPUT_NAME: x})
        diff = float(np.abs(got - expected).max())
        print(f"{name}: max |dp| {diff:.4f}")
        assert got.argmax() == expected.argmax(), name
        assert diff <= NPU_HEAD_ATOL, name


def test_package_the_full_export_splits_the_head_off(resnet50: dict[str, Any]) -> None:
    """``tessera package resnet50.onnx`` without --head: the seeds' split, same bytes."""
    whole = build_package(zoo.cached_export("resnet50"), name="resnet50")
    assert whole.to_bytes() == resnet50["path"].read_bytes()
