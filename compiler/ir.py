"""The compiler's one intermediate representation.

A :class:`Graph` is a list of :class:`Node` in topological order over named
:class:`Tensor` values. Activations are always batch 1 and held in the canonical
``(C, H, W)`` shape; a vector (after flatten or global pooling) is ``(C, 1, 1)``. ONNX's
layout (NCHW or the NHWC that tf2onnx keeps at the graph boundary) is resolved by the
import and layout passes; after them only these ops remain:

NPU ops
    ``conv``    kernel, stride, pads, dilation; params ``weight`` [Cout, Cin, kh, kw] and
                ``bias`` [Cout]; optional fused ``residual`` input (added after the bias)
                and ``relu``. Fully connected layers are convs whose kernel covers the map.
    ``pool``    ``kind`` max or avg, kernel, stride, pads; ``count_include_pad``.
    ``eltwise`` per-channel ``scale``/``shift`` params (either may be absent), optional
                second tensor input added (``add``), optional ``relu``.
    ``concat``  channel concatenation, removed by placement (zero-copy).
Host ops
    ``softmax`` over channels.

Passes (``compiler/passes.py``) rewrite the graph in place; each is small and testable
alone, and each appends a line to ``graph.log`` so ``tessera compile --plan`` can show
what happened.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

NPU_OPS = ("conv", "pool", "eltwise", "concat")
HOST_OPS = ("softmax",)


@dataclass
class Tensor:
    """A named activation of canonical shape ``(C, H, W)``."""

    name: str
    shape: tuple[int, int, int]

    @property
    def channels(self) -> int:
        return self.shape[0]


@dataclass
class Node:
    """One operation. ``source`` names the ONNX node(s) it came from, for messages."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    @property
    def on_host(self) -> bool:
        return self.op in HOST_OPS


@dataclass
class GraphInput:
    """A model input: ONNX name and shape, and how its axes map to ``(C, H, W)``.

    ``perm[i]`` is the canonical axis (0=N, 1=C, 2=H, 3=W) of ONNX axis ``i``.
    """

    onnx_name: str
    onnx_shape: tuple[int, ...]
    tensor: str
    perm: tuple[int, ...]
    #: Host-side column expansion (see ``passes.pack_input_columns``): ``kernel_w``,
    #: ``stride_w``, ``dilation_w``, ``pad_left``, ``pad_right``, ``out_w``; or ``None``.
    columns: dict | None = None


@dataclass
class GraphOutput:
    """A model output: which tensor holds it and how to present it in ONNX form.

    ``kind`` is ``"nchw"`` (``perm`` as in :class:`GraphInput`) or ``"flat"`` (a rank-2
    ``[1, C*H*W]`` flattened in ``order``, a tuple of canonical axes).
    """

    onnx_name: str
    onnx_shape: tuple[int, ...]
    tensor: str
    kind: str
    perm: tuple[int, ...] = ()
    order: tuple[int, ...] = ()


@dataclass
class Graph:
    tensors: dict[str, Tensor]
    nodes: list[Node]
    inputs: list[GraphInput]
    outputs: list[GraphOutput]
    log: list[str] = field(default_factory=list)

    def producer(self, tensor: str) -> Node | None:
        for n in self.nodes:
            if tensor in n.outputs:
                return n
        return None

    def consumers(self, tensor: str) -> list[Node]:
        return [n for n in self.nodes if tensor in n.inputs]

    def is_graph_output(self, tensor: str) -> bool:
        return any(o.tensor == tensor for o in self.outputs)

    def shape(self, tensor: str) -> tuple[int, int, int]:
        return self.tensors[tensor].shape

    def copy(self) -> Graph:
        """A deep copy (parameters shared read-only) for passes tested in isolation."""
        return Graph(
            tensors={k: dataclasses.replace(v) for k, v in self.tensors.items()},
            nodes=[
                dataclasses.replace(
                    n,
                    inputs=list(n.inputs),
                    outputs=list(n.outputs),
                    attrs=dict(n.attrs),
                    params=dict(n.params),
                )
                for n in self.nodes
            ],
            inputs=list(self.inputs),
            outputs=list(self.outputs),
            log=list(self.log),
        )

    def remove_unused(self) -> None:
        """Drop nodes whose outputs nobody reads, then tensors nobody mentions."""
        changed = True
        while changed:
            changed = False
            needed = {o.tensor for o in self.outputs}
            for n in self.nodes:
                needed.update(n.inputs)
            keep = [n for n in self.nodes if any(t in needed for t in n.outputs)]
            if len(keep) != len(self.nodes):
                self.nodes = keep
                changed = True
        used = {i.tensor for i in self.inputs} | {o.tensor for o in self.outputs}
        for n in self.nodes:
            used.update(n.inputs)
            used.update(n.outputs)
        self.tensors = {k: v for k, v in self.tensors.items() if k in used}

    def rename_tensor(self, old: str, new: str) -> None:
        """Make every reader of ``old`` read ``new`` instead (outputs included)."""
        for n in self.nodes:
            n.inputs = [new if t == old else t for t in n.inputs]
        self.outputs = [
            dataclasses.replace(o, tensor=new) if o.tensor == old else o for o in self.outputs
        ]

    def summary(self) -> str:
        lines = []
        for n in self.nodes:
            shp = [self.tensors[t].shape for t in n.outputs]
            extra = {k: v for k, v in n.attrs.items() if k not in ("placement",)}
            lines.append(f"{n.op:8s} {n.name:40s} {n.inputs} -> {shp} {extra}")
        return "\n".join(lines)
