"""Graph passes: small, named rewrites of the IR, each testable alone.

Every pass takes a :class:`~tessera.compiler.ir.Graph`, rewrites it in place and logs
one line of what it did (``tessera compile --plan`` prints the log). :data:`PIPELINE`
lists them in order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tessera.compiler.ir import HOST_OPS, NPU_OPS, Graph, Node, Tensor
from tessera.compiler.lower import conv_group
from tessera.config import NPUConfig
from tessera.errors import UnsupportedModelError

Pass = Callable[[Graph], None]


def _sole_consumer(g: Graph, tensor: str) -> Node | None:
    users = g.consumers(tensor)
    if len(users) == 1 and not g.is_graph_output(tensor):
        return users[0]
    return None


def _is_affine(n: Node) -> bool:
    return n.op == "eltwise" and len(n.inputs) == 1 and not n.attrs.get("relu") and bool(n.params)


def fuse_pad(g: Graph) -> None:
    """Fold explicit Pad nodes into the padding of the conv or pool that reads them."""
    fused = 0
    for pad in [n for n in g.nodes if n.op == "pad"]:
        user = _sole_consumer(g, pad.outputs[0])
        if user is None or user.op not in ("conv", "pool"):
            raise UnsupportedModelError(
                f"node {pad.name!r} (Pad): padding is supported only when a Conv or Pool "
                "reads it alone"
            )
        p = user.attrs["pads"]
        q = pad.attrs["pads"]
        user.attrs["pads"] = tuple(a + b for a, b in zip(p, q, strict=True))
        if user.op == "pool":
            # Explicit zero padding (Keras ZeroPadding2D) makes padded positions count.
            user.attrs["pad_semantics"] = "zero" if not any(p) else "mixed"
            user.attrs["count_include_pad"] = True
        user.inputs = [pad.inputs[0]]
        g.nodes.remove(pad)
        fused += 1
    g.remove_unused()
    g.log.append(f"fuse_pad: {fused} Pad nodes folded into conv/pool padding")


def fold_affine_into_conv(g: Graph) -> None:
    """BatchNormalization and Mul/Add by per-channel constants after a conv: fold them.

    ``(W x + b) * s + t = (W s) x + (b s + t)``. Only when the conv's output feeds the
    affine alone and no residual or relu sits in between.
    """
    folded = 0
    changed = True
    while changed:
        changed = False
        for n in list(g.nodes):
            if not _is_affine(n):
                continue
            prod = g.producer(n.inputs[0])
            if prod is None or _sole_consumer(g, n.inputs[0]) is not n:
                continue
            if prod.op == "conv" and not prod.attrs["relu"] and "residual" not in prod.attrs:
                s = n.params.get("scale", np.ones(prod.params["bias"].shape))
                t = n.params.get("shift", np.zeros(prod.params["bias"].shape))
                prod.params["weight"] = prod.params["weight"] * s[:, None, None, None]
                prod.params["bias"] = prod.params["bias"] * s + t
            elif _is_affine(prod):
                s1 = prod.params.get("scale")
                t1 = prod.params.get("shift")
                s2 = n.params.get("scale")
                t2 = n.params.get("shift")
                c = g.shape(prod.outputs[0])[0]
                s1 = np.ones(c) if s1 is None else s1
                t1 = np.zeros(c) if t1 is None else t1
                s2 = np.ones(c) if s2 is None else s2
                t2 = np.zeros(c) if t2 is None else t2
                prod.params = {"scale": s1 * s2, "shift": t1 * s2 + t2}
            else:
                continue
            g.rename_tensor(n.outputs[0], prod.outputs[0])
            _inherit_output(g, n.outputs[0], prod)
            g.nodes.remove(n)
            folded += 1
            changed = True
            break
    g.remove_unused()
    g.log.append(f"fold_affine_into_conv: {folded} BatchNorm/constant Mul/Add folded")


def fold_scale_into_conv(g: Graph) -> None:
    """A per-channel Mul whose readers are all convs: fold it into their weights.

    ``W (s * x) = (W diag(s)) x``: each conv's weight column of input channel ``c`` is
    multiplied by ``s[c]``. This is what :func:`fold_affine_into_conv` cannot do (it folds
    into the conv *before* an affine) and what SSD's learnable L2-norm scale needs: it sits
    between the host's normalisation and the ``conv4_3`` heads (``tessera.ssd``), and
    folded it costs no elementwise pass over a 38x38x512 map and no extra rounding of
    the activations; the scale is quantized once, with the weights. Exact with zero
    padding too, since a scaled zero is zero; a shift is not folded, because padded
    positions would then receive it. Only when every reader of the Mul's output reads it
    as its input (not as a residual) and the Mul's output is not a graph output.
    """
    folded = 0
    for n in list(g.nodes):
        if not _is_affine(n) or "scale" not in n.params or np.any(n.params.get("shift", 0)):
            continue
        out = n.outputs[0]
        users = g.consumers(out)
        if (
            not users
            or g.is_graph_output(out)
            or any(u.op != "conv" or u.inputs[0] != out or out in u.inputs[1:] for u in users)
        ):
            continue
        scale = n.params["scale"]
        for u in users:
            u.params["weight"] = u.params["weight"] * scale[None, :, None, None]
            u.inputs[0] = n.inputs[0]
            u.attrs.setdefault("absorbed", []).append(out)
        g.nodes.remove(n)
        folded += 1
    g.remove_unused()
    g.log.append(f"fold_scale_into_conv: {folded} per-channel Mul folded into the convs reading it")


def _inherit_output(g: Graph, old: str, node: Node) -> None:
    """Keep ONNX names readable: when a node absorbs its successor, rename nothing but
    note the absorbed tensor so plans can still show it."""
    node.attrs.setdefault("absorbed", []).append(old)


def fuse_residual_add(g: Graph) -> None:
    """``Add(conv(x), y)``: add ``y`` in the conv's epilogue (read from DRAM on the fly)."""
    fused = 0
    for n in list(g.nodes):
        if n.op != "eltwise" or len(n.inputs) != 2 or n.params or n.attrs.get("relu"):
            continue
        for i in (0, 1):
            prod = g.producer(n.inputs[i])
            other = n.inputs[1 - i]
            if (
                prod is not None
                and prod.op == "conv"
                and not prod.attrs["relu"]
                and "residual" not in prod.attrs
                and _sole_consumer(g, n.inputs[i]) is n
                and other != n.inputs[i]
            ):
                prod.attrs["residual"] = True
                prod.inputs.append(other)
                g.rename_tensor(n.outputs[0], prod.outputs[0])
                _inherit_output(g, n.outputs[0], prod)
                # The conv now reads ``other``, which may be computed after it (a shortcut
                # branch listed second), so it takes the Add's place in the order.
                g.nodes.remove(prod)
                g.nodes[g.nodes.index(n)] = prod
                fused += 1
                break
    g.remove_unused()
    g.log.append(f"fuse_residual_add: {fused} residual adds fused into conv epilogues")


def fuse_relu(g: Graph) -> None:
    """A Relu after a conv or eltwise op becomes that op's last MFU step."""
    fused = 0
    for n in list(g.nodes):
        if n.op != "eltwise" or n.params or len(n.inputs) != 1 or not n.attrs.get("relu"):
            continue
        prod = g.producer(n.inputs[0])
        if prod is None or prod.op not in ("conv", "eltwise") or prod.attrs.get("relu"):
            continue
        if _sole_consumer(g, n.inputs[0]) is not n:
            continue
        prod.attrs["relu"] = True
        g.rename_tensor(n.outputs[0], prod.outputs[0])
        _inherit_output(g, n.outputs[0], prod)
        g.nodes.remove(n)
        fused += 1
    g.remove_unused()
    g.log.append(f"fuse_relu: {fused} Relu fused into the producing chain")


def _non_negative(g: Graph, tensor: str) -> bool:
    prod = g.producer(tensor)
    if prod is None:
        return False
    if prod.op in ("conv", "eltwise"):
        return bool(prod.attrs.get("relu"))
    if prod.op == "pool":
        return _non_negative(g, prod.inputs[0])
    if prod.op == "concat":
        return all(_non_negative(g, t) for t in prod.inputs)
    return False


def check_pooling(g: Graph) -> None:
    """Padded pooling: the NPU reads padding as zeros; prove that is what ONNX means.

    ONNX MaxPool pads behave like -inf; zeros give the same maximum when the input is
    non-negative (after a ReLU), which the compiler checks. Average pooling with pads
    must count the padding (``count_include_pad=1``), since the divisor is one constant.
    """
    for n in g.nodes:
        if n.op != "pool" or not any(n.attrs["pads"]):
            continue
        sem = n.attrs["pad_semantics"]
        if n.attrs["kind"] == "max" and sem != "zero" and not _non_negative(g, n.inputs[0]):
            raise UnsupportedModelError(
                f"node {n.name!r} (MaxPool): attribute 'pads'={n.attrs['pads']} on an input "
                "that may be negative is not supported (the NPU pads with zeros; supported: "
                "padded max pooling after a ReLU)"
            )
        if n.attrs["kind"] == "avg" and not n.attrs["count_include_pad"]:
            raise UnsupportedModelError(
                f"node {n.name!r} (AveragePool): attribute 'pads'={n.attrs['pads']} with "
                "count_include_pad=0 is not supported (the divisor must be constant; "
                "supported: no padding, or count_include_pad=1)"
            )
    g.log.append("check_pooling: padded pooling is zero-padding compatible")


def partition_host(g: Graph) -> None:
    """Softmax runs on the host, after the NPU; nothing may follow it on the NPU."""
    host = [n for n in g.nodes if n.on_host]
    for n in host:
        for user in g.consumers(n.outputs[0]):
            if not user.on_host:
                raise UnsupportedModelError(
                    f"node {user.name!r} ({user.source.split(':')[0]}) reads the host-side "
                    f"softmax {n.name!r}; only host ops may follow a softmax"
                )
        if g.producer(n.inputs[0]) is None:
            raise UnsupportedModelError(f"node {n.name!r}: softmax of a graph input")
    for n in g.nodes:
        if n.op not in NPU_OPS + HOST_OPS:
            raise UnsupportedModelError(f"node {n.name!r}: internal op {n.op!r} left after passes")
    g.log.append(
        f"partition_host: {len(g.nodes) - len(host)} ops on the NPU, {len(host)} on the host"
    )


def pack_input_columns(g: Graph, native_dim: int) -> None:
    """Fold the kernel width of a conv on a few-channel graph input into its channels.

    An RGB stem conv (3 channels, 7x7, stride 2) fills 3 of the N lanes of each input
    block, so the MVU runs at 3/N utilisation for the most expensive layer of a ResNet.
    The host, which quantizes the input anyway, lays it out as ``C * kw`` channels where
    channel ``c * kw + j`` at output column ``x`` holds input column ``x * sw + j * dw``
    (after the left/right zero padding); the conv becomes ``kh x 1`` with stride ``(sh, 1)``
    over those channels, with the weights rearranged to match. Same products, same sums;
    only the block boundaries (and so the input's block exponents) change. Applied when it
    reduces the tile passes per output pixel, ``ceil(C*kw/N) * kh`` vs ``ceil(C/N) * kh*kw``.
    """
    packed = 0
    for gi in g.inputs:
        users = g.consumers(gi.tensor)
        if len(users) != 1 or users[0].op != "conv" or g.is_graph_output(gi.tensor):
            continue
        conv = users[0]
        if conv.inputs[0] != gi.tensor or len(conv.inputs) != 1 or gi.columns is not None:
            continue
        c, h, _w = g.shape(gi.tensor)
        kh, kw = conv.attrs["kernel"]
        blocks = -(-c // native_dim)
        if -(-(c * kw) // native_dim) * kh >= blocks * kh * kw:
            continue
        sh, sw = conv.attrs["stride"]
        dh, dw = conv.attrs["dilation"]
        top, left, bottom, right = conv.attrs["pads"]
        out_w = g.shape(conv.outputs[0])[2]
        gi.columns = {
            "kernel_w": kw,
            "stride_w": sw,
            "dilation_w": dw,
            "pad_left": left,
            "pad_right": right,
            "out_w": out_w,
        }
        g.tensors[gi.tensor].shape = (c * kw, h, out_w)
        weight = conv.params["weight"]  # [O, C, kh, kw] -> [O, C*kw, kh, 1], channel c*kw+j
        o = weight.shape[0]
        conv.params["weight"] = np.transpose(weight, (0, 1, 3, 2)).reshape(o, c * kw, kh, 1)
        conv.attrs.update(
            kernel=(kh, 1), stride=(sh, 1), dilation=(dh, 1), pads=(top, 0, bottom, 0)
        )
        packed += 1
        g.log.append(
            f"pack_input_columns: {gi.onnx_name!r} -> {conv.name!r}: {c} channels x {kw} "
            f"columns packed into {c * kw} channels, kernel {kh}x{kw} -> {kh}x1 "
            f"({blocks * kh * kw} -> {-(-(c * kw) // native_dim) * kh} tile passes per pixel)"
        )
    if not packed:
        g.log.append("pack_input_columns: no few-channel input conv to pack")


def _blocks(c: int, n: int) -> int:
    return -(-c // n)


def _conv_chains(cfg: NPUConfig, cin: int, cout: int, kernel: tuple[int, int]) -> int:
    """Chains ``lower`` emits for a conv (:func:`lower.conv_group` output blocks each)."""
    n = cfg.native_dim
    ob_total = _blocks(cout, n)
    return -(-ob_total // conv_group(cfg, kernel[0] * kernel[1] * _blocks(cin, n), ob_total))


def _slice_fits(cfg: NPUConfig, shape: tuple[int, int, int]) -> bool:
    """Whether a conv's whole input slice fits the activation buffer's ring, so that a
    chain reading it right after another one reading it finds it resident (no DRAM read;
    ``hdl/actloader.py``, ``sim/cycles.py``)."""
    c, h, w = shape
    entries = cfg.act_buffer_bytes // (cfg.native_dim + 1)
    return entries // max(1, w * _blocks(c, cfg.native_dim)) >= h


def _full_reads(
    g: Graph, cfg: NPUConfig, shape: tuple[int, int, int], convs: list[Node], leaves: set[int]
) -> int:
    """How often ``convs`` read their (common) input of ``shape`` from DRAM: once per chain,
    or, when the slice fits the activation buffer, once per conv unless the chain before
    it (a node of ``leaves``, by id) left the slice resident."""
    fits = _slice_fits(cfg, shape)
    seq = [x for x in g.nodes if x.op != "concat" and not x.on_host]
    pos = {id(x): i for i, x in enumerate(seq)}
    reads = 0
    for conv in convs:
        if fits:
            i = pos[id(conv)]
            reads += 0 if i and id(seq[i - 1]) in leaves else 1
        else:
            cin = g.shape(conv.inputs[0])[0]
            cout = g.shape(conv.outputs[0])[0]
            reads += _conv_chains(cfg, cin, cout, conv.attrs["kernel"])
    return reads


def subsample_strided_pointwise(g: Graph, cfg: NPUConfig) -> None:
    """Strided 1x1 convs: subsample their input once with a 1x1 max pool, then stride 1.

    A conv's chains each stream its whole input slice from DRAM unless the slice fits the
    activation buffer; a 1x1 conv with stride ``s`` uses only one pixel in ``sh * sw`` of
    it. ResNet-50's downsampling bottleneck convs and projection shortcuts (1x1, stride 2)
    read 14x14x1024 .. 56x56x256 maps in up to 22 chains. A 1x1 max pool with the conv's
    stride reads the input once (its chains read only their own blocks) and writes the
    1/(sh*sw) sized subsample; the conv then runs at stride 1 over it, and convs with the
    same stride on the same tensor (ResNet v1's main branch and shortcut) share it.

    Applied when the estimated DRAM traffic drops: full reads of the input by the convs
    (per chain, or per conv when the slice fits the activation buffer and the previous
    chain did not leave it resident) against one read plus the subsample's write and its
    reads. Only kernel 1x1, no padding, dilation 1, and not on a graph input (the host may
    pack it, see :func:`pack_input_columns`).

    Numerics: the pool clamps the blocks to the tensor's exponent floor like any window
    read and a 1x1 max keeps every clamped value; the conv clamps again with its input's
    floor, which is never above the old one. So values agree with the unsubsampled
    program up to the MFU's rounding of the accumulator at that floor.
    """
    graph_inputs = {i.tensor for i in g.inputs}
    groups: dict[tuple[str, tuple[int, int]], list[Node]] = {}
    for x in g.nodes:
        if x.op != "conv" or x.attrs["kernel"] != (1, 1) or any(x.attrs["pads"]):
            continue
        stride = tuple(x.attrs["stride"])
        t = x.inputs[0]
        if (
            stride == (1, 1)
            or tuple(x.attrs["dilation"]) != (1, 1)
            or t in graph_inputs
            or t in x.inputs[1:]
            or g.producer(t) is None
        ):
            continue
        groups.setdefault((t, stride), []).append(x)
    done: list[str] = []
    served = 0
    for (t, (sh, sw)), convs in groups.items():
        c, h, w = g.shape(t)
        sub_shape = (c, (h - 1) // sh + 1, (w - 1) // sw + 1)
        before_leaves = {id(x) for x in g.consumers(t) if x.op == "conv" and x.inputs[0] == t}
        before = _full_reads(g, cfg, (c, h, w), convs, before_leaves)
        after = _full_reads(g, cfg, sub_shape, convs, {id(x) for x in convs})
        full, small = h * w, sub_shape[1] * sub_shape[2]
        if full + small * (1 + after) >= before * full:
            continue
        name = f"{t}__subsample{sh}x{sw}"
        g.tensors[name] = Tensor(name, sub_shape)
        pool = Node(
            "pool",
            f"{t}/subsample{sh}x{sw}",
            [t],
            [name],
            {
                "kind": "max",
                "kernel": (1, 1),
                "stride": (sh, sw),
                "pads": (0, 0, 0, 0),
                "count_include_pad": False,
                "pad_semantics": "onnx",
            },
            {},
            source=", ".join(x.source for x in convs),
        )
        g.nodes.insert(g.nodes.index(convs[0]), pool)
        for x in convs:
            x.inputs[0] = name
            x.attrs["stride"] = (1, 1)
        served += len(convs)
        done.append(
            f"{t!r} {c}x{h}x{w} -> {c}x{sub_shape[1]}x{sub_shape[2]} for "
            f"{', '.join(x.name for x in convs)}: {before} reads -> 1 + {after} of 1/{sh * sw}"
        )
    skipped = sum(len(v) for v in groups.values()) - served
    rest = f"; {skipped} left alone (no DRAM saving)" if skipped else ""
    if done:
        g.log.append(
            f"subsample_strided_pointwise: {len(done)} inputs subsampled for {served} strided "
            f"1x1 convs ({'; '.join(done)}){rest}"
        )
    else:
        g.log.append(f"subsample_strided_pointwise: none{rest}")


PIPELINE: tuple[Pass, ...] = (
    fuse_pad,
    fold_affine_into_conv,
    fold_scale_into_conv,
    fuse_residual_add,
    fuse_relu,
    check_pooling,
    partition_host,
)


def run_pipeline(g: Graph, passes: tuple[Pass, ...] = PIPELINE) -> Graph:
    for p in passes:
        p(g)
    return g
