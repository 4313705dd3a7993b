"""Class names for classifier outputs: ImageNet's 1000 by default, or the user's own.

The seeds' clients map class ids to ImageNet labels and print the top 5. Keras downloads
its ``imagenet_class_index.json`` at run time, which cannot work offline, so the names ship
with tessera in ``tessera/data/imagenet_labels.txt``: one per line, line ``i`` naming output
``i`` of the Keras applications classifiers (the second field of each entry of that index,
e.g. ``tench``, ``great_white_shark``, ``tabby``). The index is ordered by WordNet id, and
ImageNet's own list contains two names twice (``crane``: 134 bird, 517 machine;
``maillot``: 638 and 639), so labels are not unique and are looked up by position only.

A custom head trained on the user's classes comes with a labels file in the same format.
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib

from tessera.errors import TesseraError

IMAGENET_CLASSES = 1000


def imagenet_labels_path() -> pathlib.Path:
    """Location of the shipped ImageNet names (inside the installed package)."""
    return pathlib.Path(str(importlib.resources.files("tessera") / "data" / "imagenet_labels.txt"))


def load_labels(
    path: str | os.PathLike[str] | None = None, *, num_classes: int | None = None
) -> list[str]:
    """Read a labels file, one class name per line; ``None`` means the ImageNet names.

    Leading and trailing whitespace of each name is dropped, as are blank lines at the end
    of the file; a blank line in the middle is an error because it would shift every later
    class id by one. With ``num_classes`` (the classifier's output width) the count must
    match, so a labels file for another model fails here instead of mislabelling results.
    """
    file = pathlib.Path(path) if path is not None else imagenet_labels_path()
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TesseraError(f"labels file not found: {file}") from None
    except UnicodeDecodeError as exc:
        raise TesseraError(f"labels file {file} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise TesseraError(f"cannot read labels file {file}: {exc}") from None
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise TesseraError(f"labels file {file} is empty; expected one class name per line")
    if "" in labels:
        raise TesseraError(
            f"labels file {file} has a blank line at line {labels.index('') + 1}; every line "
            "up to the last must name a class (line i names class id i-1)"
        )
    if num_classes is not None and len(labels) != num_classes:
        raise TesseraError(
            f"labels file {file} has {len(labels)} names but the classifier has "
            f"{num_classes} classes"
        )
    return labels
