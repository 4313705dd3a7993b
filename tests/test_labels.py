"""The shipped ImageNet class names and the labels file reader."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.errors import TesseraError
from tessera.labels import IMAGENET_CLASSES, imagenet_labels_path, load_labels

# SHA-256 of the shipped file: a wrong or reordered name must be a deliberate change.
IMAGENET_LABELS_SHA256 = "734ac9d9fdc5b3594443cca61021e5b9eb96e0473c607ed03d8810c63fe48291"


def test_imagenet_labels_in_keras_order() -> None:
    labels = load_labels()
    assert len(labels) == IMAGENET_CLASSES
    digest = hashlib.sha256(imagenet_labels_path().read_bytes()).hexdigest()
    assert digest == IMAGENET_LABELS_SHA256
    # Spot checks across the index (Keras' decode_predictions names).
    assert labels[0] == "tench"
    assert labels[281] == "tabby"
    assert labels[285] == "Egyptian_cat"
    assert labels[504] == "coffee_mug"
    assert labels[999] == "toilet_tissue"
    # ImageNet's own duplicates, at their own ids.
    assert labels[134] == labels[517] == "crane"
    assert labels[638] == labels[639] == "maillot"
    assert len(set(labels)) == IMAGENET_CLASSES - 2


def test_labels_found_from_any_working_directory(tmp_path: Path) -> None:
    """The file is looked up through importlib.resources, not relative to the cwd (it is
    package data in pyproject.toml, so wheels carry it too)."""
    code = "from tessera.labels import load_labels; assert len(load_labels()) == 1000"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60)


def test_custom_labels(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("\ufeffcat\n  dog \r\nbird\n\n\n", encoding="utf-8")
    assert load_labels(path) == ["cat", "dog", "bird"]
    assert load_labels(str(path), num_classes=3) == ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\n \n", "is empty"),
        (b"cat\n\ndog\n", "blank line at line 2"),
        (b"caf\xe9\n", "not UTF-8"),
    ],
)
def test_bad_labels_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "labels.txt"
    path.write_bytes(content)
    with pytest.raises(TesseraError, match=message):
        load_labels(path)


def test_labels_count_must_match_the_classifier(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n")
    with pytest.raises(TesseraError, match="has 2 names but the classifier has 1000 classes"):
        load_labels(path, num_classes=1000)


def test_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(TesseraError, match="labels file not found"):
        load_labels(tmp_path / "nope.txt")
