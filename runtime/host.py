"""Host side of a program run: what the CPU does before and after the NPU.

Before: build the DRAM image (the program's weight segments, the input quantized to
storage BFP in its buffer, the input's exponent maximum in its header word). After:
read the output buffers, dequantize, run the host stages (softmax) and present every
output in its ONNX shape and layout. Every backend (simulator, reference, RTL, board)
goes through these two functions, so they all see identical bytes.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass

import numpy as np
from numba import njit

from tessera import layout, numerics
from tessera.errors import TesseraError
from tessera.program import Program
from tessera.sim import kernels, vector
from tessera.sim.vector import wide_vectors


@njit(cache=True, nogil=True)
def _place_rows(canon, kw, sw, dw, pad_left, y0, y1, out) -> None:
    """Rows ``y0..y1`` of an input as the program's buffer holds it, before quantizing:
    ``out`` [H, W_out, CB*N], channel ``c*kw + j`` of column ``x`` holding ``canon`` [C,
    H, W] at column ``x*sw + j*dw - pad_left`` (0 outside it; the compiler's
    ``pack_input_columns``, or ``kw = 1`` for a plain input), the channels past ``C*kw``
    zero (block padding)."""
    wide_vectors()
    c, _h, w = canon.shape
    w_out, width = out.shape[1], out.shape[2]
    for y in range(y0, y1):
        for ox in range(w_out):
            for ch in range(c):
                for j in range(kw):
                    col = ox * sw + j * dw - pad_left
                    out[y, ox, ch * kw + j] = canon[ch, y, col] if 0 <= col < w else 0.0
            for k in range(c * kw, width):
                out[y, ox, k] = 0.0


def quantize_input(
    x: np.ndarray, info: dict, cfg, out: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ONNX-layout float input -> storage blocks [H, W, CB, N] and exponents [H, W, CB],
    placed (layout, column packing, block padding) and quantized a band of rows at a
    time on the simulator's threads (numpy's passes took 6 ms of every ResNet-50 run);
    int64 arrays, or into ``out`` (C-contiguous integer arrays of those shapes, e.g. the
    tensor's planes in DRAM)."""
    shape = tuple(info["shape"])
    x = np.asarray(x)
    if x.shape != shape:
        raise TesseraError(
            f"input {info['name']!r} must have shape {list(shape)}, got {list(x.shape)}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise TesseraError(f"input {info['name']!r} must be float32, got {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise TesseraError(f"input {info['name']!r} contains NaN or Inf")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    canon = np.transpose(x, np.argsort(info["perm"]))[0]  # [C, H, W], a view
    spec = info.get("columns") or {}
    kw, sw, dw = spec.get("kernel_w", 1), spec.get("stride_w", 1), spec.get("dilation_w", 1)
    pad_left, w_out = spec.get("pad_left", 0), spec.get("out_w", canon.shape[2])
    h, n = canon.shape[1], cfg.native_dim
    padded = np.empty((h, w_out, info["cb"] * n))
    q, e = out or (
        np.empty((h, w_out, info["cb"], n), np.int64),
        np.empty((h, w_out, info["cb"]), np.int64),
    )
    step = max(1, -(-h // (2 * kernels.parallel_workers())))

    def band(y0: int) -> None:
        y1 = min(h, y0 + step)
        _place_rows(canon, kw, sw, dw, pad_left, y0, y1, padded)
        # tessera.numerics.quantize_float, compiled (a test holds the two equal).
        blocks = padded[y0:y1].reshape(y1 - y0, w_out, info["cb"], n)
        vector.quantize_blocks(blocks, cfg.mantissa_bits, out=(q[y0:y1], e[y0:y1]))

    kernels.run_parallel(band, range(0, h, step))
    return q, e


@dataclass
class _SegmentImage:
    """A program's DRAM segments laid out in a zeroed image (``image``, read-only,
    shared), and what it was made from (``(address, bytes)``, held so that an
    identical list means the same bytes).

    On Linux the image lives in an anonymous memory file (``fd``), and a run's DRAM is
    a private copy-on-write mapping of it: only the pages the run writes (activations,
    a few MB) are copied, not the whole image (33 MB for ResNet-50, 9 ms a run).
    """

    size: int
    segments: list[tuple[int, bytes]]
    image: np.ndarray
    fd: int | None

    @classmethod
    def build(cls, size: int, segments: list[tuple[int, bytes]]) -> _SegmentImage:
        fd = None
        if size and hasattr(os, "memfd_create"):
            fd = os.memfd_create("tessera-dram", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            image = np.frombuffer(mmap.mmap(fd, size), dtype=np.uint8)
        else:
            image = np.zeros(size, dtype=np.uint8)
        for addr, data in segments:
            image[addr : addr + len(data)] = np.frombuffer(data, dtype=np.uint8)
        image.flags.writeable = False
        return cls(size, list(segments), image, fd)

    def holds(self, size: int, segments: list[tuple[int, bytes]]) -> bool:
        return (
            self.size == size
            and len(self.segments) == len(segments)
            and all(
                a == b and d is e for (a, d), (b, e) in zip(self.segments, segments, strict=True)
            )
        )

    def writable_copy(self) -> np.ndarray:
        """A copy of the image for one run to write."""
        if self.fd is None:
            return self.image.copy()
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        return np.frombuffer(mmap.mmap(self.fd, self.size, mmap.MAP_PRIVATE, prot), np.uint8)

    def close(self) -> None:
        """Give up the memory file (the image and runs' copies keep their mappings)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


#: The last programs' DRAM images before their inputs.
_IMAGES: list[_SegmentImage] = []
_IMAGES_KEPT = 2
_IMAGES_LOCK = threading.Lock()


def _segment_image(prog: Program) -> _SegmentImage:
    """The program's image (see :class:`_SegmentImage`), made once and kept.

    Runs of one program start from a copy of it: one memory copy (or mapping) instead
    of a fresh image and a copy per segment, which took about half of ``build_dram`` on
    ResNet-50.
    """
    size = int(prog.manifest["dram_bytes_needed"])
    segments = prog.dram_segments
    with _IMAGES_LOCK:  # runs may start on several threads (a service's devices)
        for i, cached in enumerate(_IMAGES):
            if cached.holds(size, segments):
                _IMAGES.append(_IMAGES.pop(i))
                return cached
        _IMAGES.append(_SegmentImage.build(size, segments))
        for old in _IMAGES[:-_IMAGES_KEPT]:
            old.close()
        del _IMAGES[:-_IMAGES_KEPT]
        return _IMAGES[-1]


@dataclass(frozen=True)
class DramOrigin:
    """Where a run's DRAM image came from: a copy of the read-only ``image`` in which
    only the byte ranges ``changed`` were written since (the inputs). The simulator
    uses it to trust bytes it has checked once against the same ``image``."""

    image: np.ndarray
    changed: tuple[tuple[int, int], ...]


def build_dram(prog: Program, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The DRAM image a run starts from, sized to what the program needs."""
    return prepare_dram(prog, inputs)[0]


def prepare_dram(prog: Program, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, DramOrigin]:
    """:func:`build_dram`, and what it was made from."""
    cfg = prog.config
    names = [i["name"] for i in prog.manifest["inputs"]]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise TesseraError(f"missing inputs {missing}; the program takes {names}")
    source = _segment_image(prog)
    mem = source.writable_copy()
    changed: list[tuple[int, int]] = []
    for info in prog.manifest["inputs"]:
        # Quantized straight into the tensor's planes in DRAM (layout.pack_tensor's
        # layout: mantissas, exponents, zeros to the alignment).
        geometry = (info["h"], info["w"], info["cb"], cfg.native_dim, cfg.mantissa_bits)
        q, e = layout.tensor_planes(mem, info["addr"], *geometry)
        quantize_input(inputs[info["name"]], info, cfg, out=(q, e))
        size = layout.tensor_bytes(*geometry)
        mem[info["addr"] + q.nbytes + e.nbytes : info["addr"] + size] = 0
        mem[info["emax_addr"] : info["emax_addr"] + 4] = np.frombuffer(
            np.array([int(e.max())], dtype="<i4").tobytes(), dtype=np.uint8
        )
        changed.append((info["addr"], info["addr"] + size))
        changed.append((info["emax_addr"], info["emax_addr"] + 4))
    return mem, DramOrigin(source.image, tuple(changed))


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=axis, keepdims=True)


def read_output(mem: np.ndarray, info: dict, cfg) -> np.ndarray:
    """One output buffer -> float32 array in the ONNX output's shape and layout."""
    n = cfg.native_dim
    q, e = layout.unpack_tensor(
        mem, info["addr"], info["h"], info["w"], info["cb"], n, cfg.mantissa_bits
    )
    q = q[:, :, info["cb_off"] : info["cb_off"] + info["cb_cnt"]]
    e = e[:, :, info["cb_off"] : info["cb_off"] + info["cb_cnt"]]
    vals = numerics.dequantize(q, e).reshape(info["h"], info["w"], -1)[:, :, : info["channels"]]
    canon = np.transpose(vals, (2, 0, 1))[None]  # [1, C, H, W]
    for stage in info["host_stages"]:
        if stage == "softmax":
            canon = softmax(canon, axis=1)
        else:
            raise TesseraError(f"unknown host stage {stage!r}")
    if info["kind"] == "flat":
        order = info["order"]
        out = np.transpose(canon[0], [a - 1 for a in order]).reshape(1, -1)
    else:
        out = np.transpose(canon, info["perm"])
    return out.astype(np.float32).reshape(info["shape"])


def read_outputs(prog: Program, mem: np.ndarray) -> dict[str, np.ndarray]:
    return {o["name"]: read_output(mem, o, prog.config) for o in prog.manifest["outputs"]}
