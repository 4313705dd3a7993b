"""``tessera score`` (issue 3, sections 6 and 7): all stages on image files, text and JSON.

Bad images are reported per image (an ``error`` entry in JSON, a line on stderr) while the
others are still scored, and the exit status is then 1; a bad package is status 2.
The ResNet-50 case scores a real photo end to end (JPEG bytes -> preprocessing ->
featurizer on the simulator -> host head) and checks the result against onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from photos import encode, photos, tiny_classifier

from tessera import zoo
from tessera.cli import main
from tessera.errors import TesseraError
from tessera.heads import cached_featurizer
from tessera.labels import load_labels
from tessera.package import build_package, load_package
from tessera.score import score_images, top_classes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("score")
    labels = [f"class_{i}" for i in range(10)]
    path = root / "tiny.tpkg"
    build_package(tiny_classifier(10), labels=labels, name="tiny").save(path)
    images = {}
    for name, fmt in (("coffee", "PNG"), ("chelsea", "JPEG")):
        images[name] = root / f"{name}.{fmt.lower().replace('jpeg', 'jpg')}"
        images[name].write_bytes(encode(photos()[name], fmt))
    bad = {
        "corrupt": root / "corrupt.jpg",
        "text": root / "notes.png",
        "empty": root / "empty.png",
        "missing": root / "missing.jpg",
    }
    bad["corrupt"].write_bytes(encode(photos()["coffee"], "JPEG")[:300])
    bad["text"].write_text("this is not an image")
    bad["empty"].write_bytes(b"")
    return {"path": path, "labels": labels, "images": images, "bad": bad, "root": root}


def test_top_classes_order_and_ties() -> None:
    p = np.array([[0.1, 0.3, 0.3, 0.2, 0.1]], np.float32)
    top = top_classes(p, list("abcde"), 3)
    assert [t["class_id"] for t in top] == [1, 2, 3]
    assert top[0] == {"class_id": 1, "label": "b", "confidence": float(np.float32(0.3))}
    assert len(top_classes(p, list("abcde"), 50)) == 5
    with pytest.raises(TesseraError, match="5 probabilities for 4 labels"):
        top_classes(p, list("abcd"))


def test_score_json_format(tiny: dict[str, Any], capsys) -> None:
    paths = [str(p) for p in tiny["images"].values()]
    assert main(["score", str(tiny["path"]), *paths, "--json", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["results"] and [r["image"] for r in out["results"]] == paths
    pkg = load_package(tiny["path"])
    for r in out["results"]:
        assert list(r) == ["image", "top"] and len(r["top"]) == 3
        for t in r["top"]:
            assert list(t) == ["class_id", "label", "confidence"]
            assert t["label"] == tiny["labels"][t["class_id"]]
        # The same numbers as the package API gives.
        x = pkg.preprocess_image(Path(r["image"]).read_bytes())
        probs = pkg.run({"images": x})["output_alias"][0]
        assert [t["confidence"] for t in r["top"]] == sorted(probs.tolist(), reverse=True)[:3]


def test_score_text_format(tiny: dict[str, Any], capsys) -> None:
    image = str(tiny["images"]["coffee"])
    assert main(["score", str(tiny["path"]), image]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == image and len(lines) == 6
    assert lines[1].lstrip().startswith("1. ") and "class_" in lines[1]


def test_bad_images_are_reported_and_the_rest_scored(tiny: dict[str, Any], capsys) -> None:
    good = str(tiny["images"]["chelsea"])
    bad = {k: str(v) for k, v in tiny["bad"].items()}
    argv = ["score", str(tiny["path"]), bad["corrupt"], good, bad["text"], bad["empty"]]
    assert main([*argv, bad["missing"], "--json"]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)["results"]
    assert [r["image"] for r in results] == [
        bad["corrupt"],
        good,
        *(bad[k] for k in ("text", "empty", "missing")),
    ]
    errors = {r["image"]: r["error"] for r in results if "error" in r}
    assert list(results[1]) == ["image", "top"]
    assert "corrupt or truncated image" in errors[bad["corrupt"]]
    assert "not a JPEG or PNG image" in errors[bad["text"]]
    assert errors[bad["empty"]] == "empty image: 0 bytes"
    assert errors[bad["missing"]] == "cannot read the file: No such file or directory"
    assert "scoring" in captured.err  # the progress bar, on stderr, for several images
    # Text mode: errors on stderr with the path, the good image on stdout.
    assert main(["score", str(tiny["path"]), bad["text"], good]) == 1
    captured = capsys.readouterr()
    assert f"tessera score: error: {bad['text']}: not a JPEG or PNG image" in captured.err
    assert captured.out.splitlines()[0] == good


def test_bad_package_fails_the_command(tiny: dict[str, Any], tmp_path: Path, capsys) -> None:
    damaged = tmp_path / "damaged.tpkg"
    data = bytearray(tiny["path"].read_bytes())
    data[-5] ^= 1
    damaged.write_bytes(bytes(data))
    assert main(["score", str(damaged), str(tiny["images"]["coffee"])]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert main(["score", str(tiny["path"]), str(tiny["images"]["coffee"]), "--top", "0"]) == 2


def test_featurizer_package_is_not_scored(tiny: dict[str, Any], tmp_path: Path) -> None:
    feat = build_package(tiny_classifier(10), kind="featurizer", name="f")
    with pytest.raises(TesseraError, match="'f' is a featurizer; tessera score handles"):
        score_images(feat, [tiny["images"]["coffee"]])


def test_reference_backend(tiny: dict[str, Any], capsys) -> None:
    image = str(tiny["images"]["coffee"])
    assert main(["score", str(tiny["path"]), image, "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert main(["score", str(tiny["path"]), image, "--json", "--backend", "reference"]) == 0
    assert json.loads(capsys.readouterr().out) == sim


def test_resnet50_scores_a_real_photo_end_to_end(tmp_path: Path, capsys) -> None:
    """Zoo featurizer + ImageNet head -> package -> score a JPEG; compared with the FP32
    pipeline in onnxruntime (same preprocessing, full zoo export)."""
    feat, head = tmp_path / "feat.onnx", tmp_path / "head.onnx"
    argv = ["zoo", "export", "resnet50", "--featurizer", "-o", str(feat), "--head-output"]
    assert main([*argv, str(head)]) == 0
    pkg_path = tmp_path / "resnet50.tpkg"
    assert (
        main(["package", str(feat), "--head", str(head), "--name", "resnet50", "-o", str(pkg_path)])
        == 0
    )
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(encode(photos()["chelsea"], "JPEG"))
    capsys.readouterr()
    assert main(["score", str(pkg_path), str(photo), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["image"] == str(photo) and len(result["top"]) == 5
    labels = load_labels()
    assert all(t["label"] == labels[t["class_id"]] for t in result["top"])
    pkg = load_package(pkg_path)
    x = pkg.preprocess_image(photo.read_bytes())
    session = ort.InferenceSession(
        str(zoo.cached_export("resnet50")), providers=["CPUExecutionProvider"]
    )
    (expected,) = session.run(None, {zoo.INPUT_NAME: x})
    assert result["top"][0]["class_id"] == int(expected.argmax())
    for t in result["top"]:
        assert abs(t["confidence"] - float(expected[0, t["class_id"]])) <= 0.06
    assert cached_featurizer("resnet50")[0].read_bytes() == feat.read_bytes()
