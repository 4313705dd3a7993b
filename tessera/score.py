"""``tessera score``: run a package on image files from the command line.

What the seeds' client did against the service, done locally: each image goes through every
stage of the package (decode and preprocess on the host, the program on an NPU backend,
the host head or a detector's decoding) and the top classes are printed with their
confidences, or a detector's boxes.

A bad image (unreadable file, corrupt or non-image bytes) does not stop a batch: it is
reported for that image (an ``"error"`` entry in ``--json`` output, a line on stderr in
text mode), the other images are scored, and the exit status is 1 when any image failed.
Errors about the package itself (damaged file, unknown backend) stop everything with
status 2, like every other ``tessera`` error.

Result formats are per package kind (:data:`RESULT_KINDS`), so a detector registers how
its outputs become JSON and text without changing the command, and kind-specific options
(a detector's ``--score-threshold``, ``--iou-threshold``, ``--max-detections``) override
what the package stores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tessera.errors import TesseraError
from tessera.package import NPU, Package, backend_npu, load_package

#: Exit status when at least one image could not be scored (the package itself was fine).
EXIT_IMAGE_ERRORS = 1


class ImageFileError(TesseraError):
    """An image file that is missing or cannot be read."""


def top_classes(
    probabilities: np.ndarray, labels: Sequence[str], k: int = 5
) -> list[dict[str, Any]]:
    """The ``k`` most probable classes, most probable first; ties keep the lower class id.

    ``confidence`` is the float32 probability as a Python float (exact in JSON).
    """
    p = np.asarray(probabilities, dtype=np.float32).reshape(-1)
    if len(p) != len(labels):
        raise TesseraError(f"{len(p)} probabilities for {len(labels)} labels")
    order = np.argsort(-p, kind="stable")[: max(k, 0)]
    return [{"class_id": int(i), "label": labels[i], "confidence": float(p[i])} for i in order]


@dataclasses.dataclass(frozen=True)
class ResultKind:
    """How a package kind's outputs become a result entry and its text lines."""

    #: ``(package, outputs, top) -> fields`` merged into ``{"image": path, ...}``.
    to_result: Callable[[Package, dict[str, np.ndarray], int], dict[str, Any]]
    #: ``result entry -> lines`` printed under the image path.
    to_text: Callable[[dict[str, Any]], list[str]]
    #: ``(package, options) -> package`` with the kind's options (the detector's
    #: thresholds, :data:`DETECTION_OPTIONS`) overriding the stored ones; None if the kind
    #: has none.
    configure: Callable[[Package, dict[str, Any]], Package] | None = None


#: ``tessera score`` options that only some kinds take: option -> what it sets.
DETECTION_OPTIONS = ("score_threshold", "iou_threshold", "max_detections")


def _classifier_result(pkg: Package, outputs: dict[str, np.ndarray], top: int) -> dict[str, Any]:
    return {"top": top_classes(outputs[pkg.output_names[0]], pkg.labels, top)}


def _classifier_text(result: dict[str, Any]) -> list[str]:
    return [
        f"  {rank:>2}. {t['confidence']:7.4f}  {t['label']} ({t['class_id']})"
        for rank, t in enumerate(result["top"], start=1)
    ]


RESULT_KINDS: dict[str, ResultKind] = {
    "classifier": ResultKind(_classifier_result, _classifier_text),
}


def register_result_kind(kind: str, result: ResultKind) -> None:
    """Teach ``tessera score`` a package kind (the detector's boxes), once per kind."""
    if RESULT_KINDS.get(kind, result) is not result:
        raise ValueError(f"result kind {kind!r} is registered twice")
    RESULT_KINDS[kind] = result


def configure(pkg: Package, options: dict[str, Any]) -> Package:
    """``pkg`` with kind-specific ``options`` (e.g. ``{"iou_threshold": 0.3}`` for a
    detector) overriding the ones stored in it; an error for a kind that has none."""
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return pkg
    kind = RESULT_KINDS.get(pkg.kind)
    if kind is None or kind.configure is None:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise TesseraError(f"{flags}: only for detector packages; {pkg.name!r} is a {pkg.kind}")
    return kind.configure(pkg, options)


def score_image(
    pkg: Package, path: str | Path, top: int = 5, npu: NPU | None = None
) -> dict[str, Any]:
    """Score one image file.

    A missing or unreadable file raises :class:`ImageFileError`, bytes that are no usable
    image :class:`~tessera.errors.ImageDecodeError`.
    """
    kind = RESULT_KINDS.get(pkg.kind)
    if kind is None:
        raise TesseraError(
            f"package {pkg.name!r} is a {pkg.kind}; tessera score handles "
            f"{', '.join(RESULT_KINDS)} packages"
        )
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageFileError(f"cannot read the file: {exc.strerror or exc}") from None
    x = pkg.preprocess_image(data)
    outputs = pkg.run({pkg.input_name: x}, npu)
    return {"image": str(path), **kind.to_result(pkg, outputs, top)}


def score_images(
    pkg: Package,
    paths: Sequence[str | Path],
    top: int = 5,
    npu: NPU | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Score every image; one that fails gets ``{"image": path, "error": message}``.

    Only image-level problems (:class:`~tessera.errors.ImageDecodeError`, unreadable
    files) become error entries; anything else is a problem with the package or backend,
    which would fail every image the same way, and is raised.
    """
    from tessera.errors import ImageDecodeError

    if pkg.kind not in RESULT_KINDS:
        raise TesseraError(
            f"package {pkg.name!r} is a {pkg.kind}; tessera score handles "
            f"{', '.join(RESULT_KINDS)} packages"
        )
    results = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="scoring", unit="image", file=sys.stderr)
    try:
        for path in paths:
            try:
                results.append(score_image(pkg, path, top, npu))
            except (ImageDecodeError, ImageFileError) as exc:
                results.append({"image": str(path), "error": str(exc)})
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results


def _cmd_score(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise TesseraError(f"--top must be at least 1, got {args.top}")
    pkg = load_package(args.package)
    pkg = configure(pkg, {k: getattr(args, k) for k in DETECTION_OPTIONS})
    npu = backend_npu(args.backend)
    results = score_images(pkg, args.images, top=args.top, npu=npu, progress=len(args.images) > 1)
    failed = [r for r in results if "error" in r]
    if args.json:
        print(json.dumps({"results": results}))
    else:
        kind = RESULT_KINDS[pkg.kind]
        for r in results:
            if "error" in r:
                print(f"tessera score: error: {r['image']}: {r['error']}", file=sys.stderr)
                continue
            print(r["image"])
            for line in kind.to_text(r):
                print(line)
    return EXIT_IMAGE_ERRORS if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tessera score`` to the CLI."""
    from tessera.sim.run import BACKENDS

    p = sub.add_parser(
        "score",
        help="run a package on image files and print the top classes or the detections",
        description="Run every stage of a package (preprocessing, NPU program, host head or "
        "detector post-processing) on JPEG/PNG files and print the top classes with "
        "confidences, or a detector's boxes. A bad image is reported for that image (an "
        "'error' entry with --json) and the others are still scored; the exit status is "
        "then 1.",
    )
    p.add_argument("package", help="package file (.tpkg)")
    p.add_argument("images", nargs="+", help="JPEG or PNG files")
    p.add_argument(
        "--top", type=int, default=5, help="classes to show per image (classifiers; default 5)"
    )
    p.add_argument("--backend", default="sim", choices=BACKENDS, help="NPU backend (default sim)")
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"results": [{"image", "top": [{"class_id", "label", "confidence"}]}]}; '
        'detectors: {"results": [{"image", "detections": [{"class_id", "label", "score", '
        '"box": [ymin, xmin, ymax, xmax]}]}]}, boxes relative to the image',
    )
    det = p.add_argument_group("detectors", "override the defaults stored in the package")
    det.add_argument("--score-threshold", type=float, help="report boxes scoring above this")
    det.add_argument(
        "--iou-threshold", type=float, help="per-class NMS IoU above which a box is dropped"
    )
    det.add_argument("--max-detections", type=int, help="detections per image, best first")
    p.set_defaults(func=_cmd_score)
