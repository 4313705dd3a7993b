"""SSD-VGG as a ``detector`` package (issue 3, sections 4-7): package -> score end to end.

The zoo's SSD300 (seeded random weights, ``zoo.cached_export``: ~50 s and 2.5 GB cold) is
packaged for the ``large`` preset exactly as the README says, ``tessera package ssd.onnx
--preprocess ssd --config large`` (compilation ~4 s), and scored on a real photo (the
astronaut; ~3.5 s a run on the simulator). The package's detections must equal
``ssd.detect`` on the heads of an independently compiled SSD run through
``ssd.run_heads``, value for value (float32, as the package stores them). Measured: the
package is 26.6 MiB (trunk program 25.7 MiB, head program 0.6 MiB, anchors 273 KiB).

The runs are shared (one ``run_heads``, one ``Package.run``, two ``tessera score`` and one
REST batch of two images), so the whole file takes ~50 s with a warm export cache and is
not marked slow.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from photos import encode, photos, tiny_classifier

from tessera import ssd, zoo
from tessera.cli import main
from tessera.config import get_config
from tessera.errors import TesseraError
from tessera.package import (
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    Package,
    PackageFormatError,
    backend_npu,
    build_package,
    load_package,
)
from tessera.preprocess import PRESETS
from tessera.program import Program
from tessera.score import configure
from tessera.sim.run import run_program

needs_zoo = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tf2onnx") is None,
    reason="the model zoo needs TensorFlow and tf2onnx (pip install .[zoo])",
)
DEFAULTS = ssd.DetectionOptions()
K = DEFAULTS.max_detections


# --------------------------------------------------------------------------- no model needed
def test_detection_options_are_checked() -> None:
    assert (DEFAULTS.score_threshold, DEFAULTS.iou_threshold, K) == (0.5, 0.45, 100)
    assert ssd.DetectionOptions.from_dict(DEFAULTS.to_dict()) == DEFAULTS
    assert DEFAULTS.replace(iou_threshold=0.3, max_detections=None).iou_threshold == 0.3
    for bad, message in (
        ({"score_threshold": 1.0}, "score threshold must be in"),
        ({"iou_threshold": -0.1}, "IoU threshold must be in"),
        ({"max_detections": 0}, "max detections must be a positive integer"),
        ({"pre_nms_top_k": 2.5}, "pre-NMS top k"),
        ({"clip": 1}, "clip must be true or false"),
        ({"nms": 0.5}, r"unknown \['nms'\]"),
    ):
        with pytest.raises(TesseraError, match=message):
            ssd.DetectionOptions.from_dict({**DEFAULTS.to_dict(), **bad})


def test_detection_tensors_round_trip_and_padding() -> None:
    dets = np.array([[15, 0.9, 0.1, 0.2, 0.3, 0.4], [3, 0.6, 0.0, 0.5, 1.0, 0.75]])
    options = DEFAULTS.replace(max_detections=4)
    boxes, scores, classes, count = ssd.detection_tensors(dets, options)
    assert boxes.shape == (1, 4, 4) and scores.shape == classes.shape == (1, 4)
    assert count.tolist() == [2.0] and all(a.dtype == np.float32 for a in (boxes, scores, count))
    assert not boxes[0, 2:].any() and not scores[0, 2:].any() and not classes[0, 2:].any()
    np.testing.assert_array_equal(
        ssd.detections_from_tensors(boxes, scores, classes, count), dets.astype(np.float32)
    )
    # More detections than K: the best K are kept (they come best first).
    _, _, _, count = ssd.detection_tensors(dets, DEFAULTS.replace(max_detections=1))
    assert count.tolist() == [1.0]
    with pytest.raises(TesseraError, match="num_detections 5 for 4 rows"):
        ssd.detections_from_tensors(boxes, scores, classes, np.array([5.0]))


def test_detector_options_refused_for_classifiers(tmp_path: Path, capsys) -> None:
    pkg = build_package(tiny_classifier(10), labels=[f"c{i}" for i in range(10)], name="tiny")
    with pytest.raises(TesseraError, match="--iou-threshold: only for detector packages"):
        configure(pkg, {"iou_threshold": 0.3, "score_threshold": None})
    assert configure(pkg, {"iou_threshold": None}) is pkg
    path, image = tmp_path / "tiny.tpkg", tmp_path / "coffee.png"
    pkg.save(path)
    image.write_bytes(encode(photos()["coffee"]))
    assert main(["score", str(path), str(image), "--max-detections", "3"]) == 2
    assert "--max-detections: only for detector packages; 'tiny' is a classifier" in (
        capsys.readouterr().err
    )
    with pytest.raises(TesseraError, match="apply to detector packages only"):
        build_package(tiny_classifier(10), labels=[], detection={"iou_threshold": 0.3})


# --------------------------------------------------------------------------- the zoo SSD
@pytest.fixture(scope="module")
def ssd_path() -> Path:
    return zoo.cached_export("ssd_vgg", seed=0)


@pytest.fixture(scope="module")
def compiled(ssd_path: Path) -> ssd.CompiledSSD:
    """Compiled separately from the package, for the comparisons."""
    return ssd.compile_ssd(str(ssd_path), get_config("large"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, ssd_path: Path) -> dict[str, Path]:
    """The package as the README makes it (``tessera package``) and two photos as JPEG."""
    root = tmp_path_factory.mktemp("ssd_package")
    out = {"pkg": root / "ssd.tpkg"}
    argv = ["package", str(ssd_path), "--preprocess", "ssd", "--config", "large"]
    assert main([*argv, "--name", "ssd", "-o", str(out["pkg"])]) == 0
    for name in ("astronaut", "chelsea"):
        out[name] = root / f"{name}.jpg"
        out[name].write_bytes(encode(photos()[name], "JPEG"))
    return out


@pytest.fixture(scope="module")
def pkg(files: dict[str, Path]) -> Package:
    return load_package(files["pkg"])


@pytest.fixture(scope="module")
def astronaut(files: dict[str, Path], pkg: Package, compiled: ssd.CompiledSSD) -> dict[str, Any]:
    """The astronaut photo's preprocessed input and the heads of the separately compiled
    SSD (trunk, host L2 norm, head program on the simulator)."""
    x = pkg.preprocess_image(files["astronaut"].read_bytes())
    return {"x": x, "heads": ssd.run_heads(compiled, x, backend_npu("sim"))}


def _detect(heads: dict[str, np.ndarray], options: ssd.DetectionOptions) -> np.ndarray:
    return ssd.detect(
        heads,
        score_threshold=options.score_threshold,
        iou_threshold=options.iou_threshold,
        pre_nms_top_k=options.pre_nms_top_k,
        top_k=options.max_detections,
        clip=options.clip,
    )


@needs_zoo
def test_package_contents(pkg: Package, compiled: ssd.CompiledSSD) -> None:
    assert (pkg.name, pkg.kind, pkg.labels) == ("ssd", "detector", list(ssd.VOC_LABELS))
    assert pkg.preprocess == PRESETS["ssd"] and pkg.input_name == "images"
    assert pkg.output_names == list(ssd.DETECTION_OUTPUTS)
    assert isinstance(pkg.host, ssd.SSDDetectionStage) and pkg.num_classes == 21
    # The same programs as a separate compilation, and the SSD300 anchors.
    assert pkg.program == compiled.trunk and pkg.host.head == compiled.head
    assert pkg.program.config.name == "large"
    np.testing.assert_array_equal(pkg.host.anchors, ssd.default_anchors())
    assert pkg.host.options == DEFAULTS and pkg.host.l2norm == compiled.stage
    assert ssd.compiled_from_package(pkg).output_names == ssd.OUTPUT_NAMES
    assert pkg.host.output_shapes() == [(1, K, 4), (1, K), (1, K), (1,)]
    assert "SSD: L2 norm and head program after the trunk, 8732 default boxes" in pkg.describe()


@needs_zoo
def test_packaging_is_reproducible(
    files: dict[str, Path], compiled: ssd.CompiledSSD, tmp_path: Path, capsys
) -> None:
    """Same inputs, same bytes: the CLI twice, the API on a separate compilation, a
    load-and-save; options given at packaging time are what the package stores."""
    data = files["pkg"].read_bytes()
    again = tmp_path / "again.tpkg"
    argv = ["package", str(zoo.cached_export("ssd_vgg")), "--config", "large", "--name", "ssd"]
    assert main([*argv, "-o", str(again)]) == 0  # --preprocess ssd is the detector default
    assert "detector 'ssd', 21 classes" in capsys.readouterr().out
    assert again.read_bytes() == data
    assert ssd.detector_package(compiled, name="ssd").to_bytes() == data
    assert load_package(files["pkg"]).to_bytes() == data
    print(f"package {len(data) / 2**20:.1f} MiB, sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    other = ssd.detector_package(compiled, name="ssd", options={"iou_threshold": 0.3})
    assert other.to_bytes() != data
    assert Package.from_bytes(other.to_bytes()).host.options.iou_threshold == 0.3


@needs_zoo
def test_does_not_fit_the_ulx3s_85f(tmp_path: Path, capsys) -> None:
    """The default configuration fails before writing anything, with the sizes."""
    out = tmp_path / "ssd.tpkg"
    argv = ["package", str(zoo.cached_export("ssd_vgg")), "--preprocess", "ssd"]
    assert main([*argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tessera package: error: SSD does not fit ulx3s-85f: the model needs 39.5 MiB" in err
    assert "ulx3s-85f has 32.0 MiB: over by 7.5 MiB" in err
    assert "576 weight tiles" in err and err.rstrip().endswith("--config large")
    assert not out.exists()
    assert main([*argv[:-2], "--preprocess", "resnet", "--config", "large", "-o", str(out)]) == 2
    assert "presets that fit: ssd" in capsys.readouterr().err


@needs_zoo
def test_run_equals_detect_on_run_heads(pkg: Package, astronaut: dict[str, Any]) -> None:
    """Package.run (both programs through the given NPU) gives the TF object-detection
    tensors of exactly ``ssd.detect`` on the separately compiled SSD's heads."""
    ran = []

    def npu(program: Program, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ran.append(program)
        return run_program(program, inputs, "sim").outputs

    out = pkg.run({"images": astronaut["x"]}, npu)
    assert ran == [pkg.program, pkg.host.head]
    assert list(out) == list(ssd.DETECTION_OUTPUTS)
    boxes, scores, classes, count = out.values()
    assert boxes.shape == (1, K, 4) and scores.shape == classes.shape == (1, K)
    assert count.shape == (1,) and all(v.dtype == np.float32 for v in out.values())
    want = _detect(astronaut["heads"], DEFAULTS)
    n = int(count[0])
    assert n == len(want) and 10 <= n <= K
    for got, expected in zip(out.values(), ssd.detection_tensors(want, DEFAULTS), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert not boxes[0, n:].any() and not scores[0, n:].any() and not classes[0, n:].any()
    assert np.all(scores[0, :n] > DEFAULTS.score_threshold)
    assert np.all(np.diff(scores[0, :n]) <= 0)


@needs_zoo
def test_score_json_on_a_real_photo(
    files: dict[str, Path], pkg: Package, astronaut: dict[str, Any], capsys
) -> None:
    """``tessera score --json``: exactly {"results": [{"image", "detections": [{"class_id",
    "label", "score", "box": [ymin, xmin, ymax, xmax]}]}]}, boxes relative, the values of
    ``ssd.detect`` (as float32) on the same photo."""
    image = str(files["astronaut"])
    assert main(["score", str(files["pkg"]), image, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["results"]
    (result,) = out["results"]
    assert list(result) == ["image", "detections"] and result["image"] == image
    want = _detect(astronaut["heads"], DEFAULTS).astype(np.float32)
    assert len(result["detections"]) == len(want) > 0
    for d, w in zip(result["detections"], want, strict=True):
        assert list(d) == ["class_id", "label", "score", "box"]
        assert isinstance(d["class_id"], int) and 1 <= d["class_id"] < 21
        assert d["label"] == ssd.VOC_LABELS[d["class_id"]]
        assert all(isinstance(v, float) for v in (d["score"], *d["box"])) and len(d["box"]) == 4
        ymin, xmin, ymax, xmax = d["box"]
        assert 0 <= ymin <= ymax <= 1 and 0 <= xmin <= xmax <= 1
        assert [d["class_id"], d["score"], *d["box"]] == [float(v) for v in w]


@needs_zoo
def test_score_overrides_and_text(
    files: dict[str, Path], astronaut: dict[str, Any], capsys
) -> None:
    """--score-threshold, --iou-threshold, --max-detections override the stored defaults;
    text output: one line per detection with label, score and box."""
    argv = ["score", str(files["pkg"]), str(files["astronaut"]), "--score-threshold", "0.6"]
    assert main([*argv, "--iou-threshold", "0.2", "--max-detections", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    options = ssd.DetectionOptions(score_threshold=0.6, iou_threshold=0.2, max_detections=7)
    want = _detect(astronaut["heads"], options)
    assert len(want) == 7 and lines[0] == str(files["astronaut"]) and len(lines) == 8
    for rank, (line, (c, score, *box)) in enumerate(zip(lines[1:], want, strict=True), start=1):
        label = ssd.VOC_LABELS[int(c)]
        coords = ", ".join(f"{v:.3f}" for v in np.float32(box))
        assert line == (
            f"  {rank:>2}. {np.float32(score):7.4f}  {label} ({int(c)})  box [ymin, xmin, "
            f"ymax, xmax] = [{coords}]"
        )
    # The same through the API, no NPU run needed: the stage decodes given heads.
    pkg = configure(load_package(files["pkg"]), {"iou_threshold": 0.2, "max_detections": 7})
    assert pkg.host.options == ssd.DetectionOptions(iou_threshold=0.2, max_detections=7)
    np.testing.assert_array_equal(
        pkg.host.detections(astronaut["heads"]),
        _detect(astronaut["heads"], pkg.host.options),
    )
    with pytest.raises(TesseraError, match="IoU threshold must be in"):
        configure(pkg, {"iou_threshold": 2.0})


def _manifest(data: bytes) -> tuple[dict, int, int]:
    """The manifest, its size and the payload start."""
    _, _, _, _, size, _ = HEADER.unpack_from(data)
    start = -(-(HEADER.size + size) // 8) * 8
    return json.loads(data[HEADER.size : HEADER.size + size]), size, start


def _with_manifest(data: bytes, manifest: dict) -> bytes:
    """The file with an edited manifest of the same length and a valid checksum."""
    _, size, _ = _manifest(data)
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert len(text) == size, "keep the manifest length"
    header = HEADER.pack(
        MAGIC, FORMAT_VERSION, HEADER.size, len(data), size, hashlib.sha256(text).digest()
    )
    return header + text + data[HEADER.size + size :]


@needs_zoo
@pytest.mark.parametrize(
    ("section", "at"),
    [("program", 100), ("program", -1), ("host.program.head", 70), ("host.anchors", 8 * 4 * 77)],
)
def test_tampered_sections_are_refused(files: dict[str, Path], section: str, at: int) -> None:
    data = files["pkg"].read_bytes()
    manifest, _, start = _manifest(data)
    entry = manifest["sections"][section]
    damaged = bytearray(data)
    damaged[start + entry["offset"] + (at if at >= 0 else entry["length"] + at)] ^= 0x08
    with pytest.raises(PackageFormatError, match=rf"corrupted: section '{section}' sha256"):
        Package.from_bytes(bytes(damaged), "ssd.tpkg")


@needs_zoo
def test_tampered_manifest_is_refused(files: dict[str, Path]) -> None:
    """A flipped manifest byte fails its checksum; a consistent but invalid manifest (the
    checksum recomputed) fails the detector's own checks."""
    data = files["pkg"].read_bytes()
    damaged = bytearray(data)
    damaged[HEADER.size + 30] ^= 1
    with pytest.raises(PackageFormatError, match="manifest sha256 mismatch"):
        Package.from_bytes(bytes(damaged))
    manifest, _, _ = _manifest(data)
    edits = [
        (("options", "iou_threshold"), 0.45, 4.05, "IoU threshold must be in"),
        (("options", "max_detections"), 100, -10, "max detections must be a positive"),
        (("num_classes",), 21, 12, "does not hold 12 classes"),
        (("l2norm", "op"), "l2_normalize", "l2_normalise", "unknown SSD host stage"),
    ]
    for path, old, new, message in edits:
        edited = json.loads(json.dumps(manifest))
        params = edited["host"]["params"]
        target = params
        for key in path[:-1]:
            target = target[key]
        assert target[path[-1]] == old
        target[path[-1]] = new
        with pytest.raises(PackageFormatError, match=rf"invalid package: .*{message}"):
            Package.from_bytes(_with_manifest(data, edited), "ssd.tpkg")
    edited = json.loads(json.dumps(manifest))
    edited["labels"] = edited["labels"][:-1]  # 12 bytes shorter: ,"tvmonitor"
    edited["name"] += "_" * 12
    with pytest.raises(PackageFormatError, match="20 labels for 21 classes"):
        Package.from_bytes(_with_manifest(data, edited))


@needs_zoo
def test_head_program_for_another_npu_is_refused(pkg: Package, ssd_path: Path) -> None:
    """Both programs of a request run on one device: the head program must be compiled for
    the trunk's configuration (the head alone would fit the ULX3S)."""
    import onnx

    from tessera.compiler.driver import compile_model

    split = ssd.split_model(onnx.load(ssd_path))
    head, _, _ = compile_model(split.head, get_config("ulx3s-85f"))
    stage = ssd.SSDDetectionStage(
        head,
        pkg.host.l2norm,
        pkg.host.loc_names,
        pkg.host.conf_names,
        pkg.host.anchors,
        21,
    )
    with pytest.raises(TesseraError, match="host program 'head' is compiled for NPU ulx3s-85f"):
        Package(
            "x",
            "detector",
            pkg.preprocess,
            pkg.program,
            pkg.labels,
            output_names=pkg.output_names,
            host=stage,
        )


# --------------------------------------------------------------------------- the service
@needs_zoo
def test_rest_batch_and_metadata(
    files: dict[str, Path], pkg: Package, astronaut: dict[str, Any]
) -> None:
    """The scoring service stacks the fixed-size outputs of a batch of two JPEGs:
    predictions rows with the four tensors, the astronaut's equal to Package.run's; the
    signature shows their shapes."""
    requests = pytest.importorskip("requests")
    pytest.importorskip("grpc")
    from serve_helpers import running_server

    jpegs = [files["astronaut"].read_bytes(), files["chelsea"].read_bytes()]
    want = ssd.detection_tensors(_detect(astronaut["heads"], DEFAULTS), DEFAULTS)
    with running_server(pkg) as srv:
        base = f"http://127.0.0.1:{srv.rest_port}/v1/models/ssd"
        r = requests.post(
            f"{base}:predict",
            json={"instances": [{"b64": base64.b64encode(j).decode()} for j in jpegs]},
            timeout=300,
        )
        assert r.status_code == 200, r.text
        rows = r.json()["predictions"]
        meta = requests.get(f"{base}/metadata", timeout=30).json()
    assert len(rows) == 2 and all(list(row) == list(ssd.DETECTION_OUTPUTS) for row in rows)
    for name, expected in zip(ssd.DETECTION_OUTPUTS, want, strict=True):
        np.testing.assert_array_equal(np.float32(rows[0][name]), expected[0])
    chelsea = rows[1]
    n = int(chelsea["num_detections"])
    assert np.float32(chelsea["detection_boxes"]).shape == (K, 4)
    assert not np.any(np.float32(chelsea["detection_scores"])[n:])
    outputs = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["outputs"]
    shapes = {k: [int(d["size"]) for d in v["tensor_shape"]["dim"]] for k, v in outputs.items()}
    assert shapes == {
        "detection_boxes": [-1, K, 4],
        "detection_scores": [-1, K],
        "detection_classes": [-1, K],
        "num_detections": [-1],
    }


@needs_zoo
def test_client_score_prints_detections(
    files: dict[str, Path], pkg: Package, astronaut: dict[str, Any], capsys
) -> None:
    """``tessera client score`` against a detector service prints its detections (the same
    as ``ssd.detect``), not a top-k over the box tensors."""
    pytest.importorskip("grpc")
    from serve_helpers import running_server

    want = _detect(astronaut["heads"], DEFAULTS).astype(np.float32)
    image = str(files["astronaut"])
    with running_server(pkg) as srv:
        args = ["client", "score", f"127.0.0.1:{srv.grpc_port}", image, "--json"]
        assert main([*args, "--top", "100", "--timeout", "300"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image"] == image and len(out["detections"]) == len(want) > 0
    for d, w in zip(out["detections"], want, strict=True):
        assert d["label"] == ssd.VOC_LABELS[d["class_id"]]
        assert [d["class_id"], d["score"], *d["box"]] == [float(v) for v in w]
