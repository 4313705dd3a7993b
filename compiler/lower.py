"""Lowering: quantize, place in DRAM, and emit instruction chains.

Three named steps after the graph passes, each visible in the plan:

``quantize_weights``
    conv weights to storage BFP tiles (one exponent per row of N input channels at one
    kernel position, clamped to the layer's window ``Dw``), biases / scales / shifts to
    wide constant vectors. No calibration data: every exponent comes from the weights.
``plan_memory``
    every tensor becomes a *view* (buffer, first channel block, blocks) of a DRAM
    buffer; channel concats place their inputs inside the output buffer (zero-copy);
    buffers are reused once dead; each live buffer gets an exponent register.
``emit_chains``
    one chain per layer and output-channel group (the group's weight tiles fill half of
    the double-buffered tile buffer), with only changed control registers rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tessera import isa, layout, numerics
from tessera.compiler.ir import Graph, Node, Tensor
from tessera.config import NPUConfig
from tessera.errors import CapacityError, UnsupportedModelError
from tessera.isa import Operand, PoolOp, Reg

#: DRAM byte address of the input tensor's exponent maximum (int32), written by the host.
INPUT_EMAX_ADDR = 0
HEADER_BYTES = layout.ALIGN


@dataclass
class Buffer:
    """A DRAM activation buffer: ``H x W x CB`` blocks, live over ``[first, last]``."""

    id: int
    h: int
    w: int
    cb: int
    first: int
    last: int
    addr: int = -1
    ereg: int = -1
    nbytes: int = 0


@dataclass
class View:
    """Where a tensor lives: blocks ``cb_off .. cb_off + cb_cnt`` of a buffer."""

    buffer: int
    cb_off: int
    cb_cnt: int
    channels: int


@dataclass
class Lowered:
    """Everything the program file needs, plus the plan text."""

    instructions: list[int]
    segments: list[tuple[int, bytes]]
    layers: list[dict]
    buffers: list[Buffer]
    views: dict[str, View]
    dram_needed: int
    static_bytes: int
    plan: list[str] = field(default_factory=list)


def _blocks(c: int, n: int) -> int:
    return -(-c // n)


# ------------------------------------------------------------------ quantize_weights


def quantize_conv(node: Node, cfg: NPUConfig, cin_blocks: int) -> dict:
    """Conv weights -> tiles ``[OB][kh][kw][CB]`` of N x N, plus wide bias vectors."""
    n, m = cfg.native_dim, cfg.mantissa_bits
    w = node.params["weight"]
    cout, cin, kh, kw = w.shape
    ob = _blocks(cout, n)
    wp = np.zeros((ob * n, kh, kw, cin_blocks * n))
    wp[:cout, :, :, :cin] = np.transpose(w, (0, 2, 3, 1))
    blocks = wp.reshape(ob * n, kh, kw, cin_blocks, n)
    _, e_nat = numerics.quantize_float(blocks, m)
    emax = int(e_nat.max())
    floor = (
        numerics.E_MIN
        if emax == numerics.E_ZERO
        else max(emax - cfg.weight_exp_window, numerics.E_MIN)
    )
    q, e = numerics.quantize_float(blocks, m, min_exp=floor)
    # [OB*N, kh, kw, CB, N] -> tiles [OB, kh, kw, CB][row N][col N]
    q = q.reshape(ob, n, kh, kw, cin_blocks, n).transpose(0, 2, 3, 4, 1, 5)
    e = e.reshape(ob, n, kh, kw, cin_blocks).transpose(0, 2, 3, 4, 1)
    tiles_q = q.reshape(-1, n, n)
    tiles_e = e.reshape(-1, n)
    bias = np.zeros(ob * n)
    bias[:cout] = node.params["bias"]
    bq, be = numerics.quantize_wide(bias.reshape(ob, n), cfg.mfu_mantissa_bits)
    return {"tiles_q": tiles_q, "tiles_e": tiles_e, "w_floor": floor, "bias_q": bq, "bias_e": be}


def _wide_vectors(
    values: np.ndarray, cblocks: int, cfg: NPUConfig
) -> tuple[np.ndarray, np.ndarray]:
    n = cfg.native_dim
    v = np.zeros(cblocks * n)
    v[: values.shape[0]] = values
    return numerics.quantize_wide(v.reshape(cblocks, n), cfg.mfu_mantissa_bits)


# ------------------------------------------------------------------ plan_memory


class _Planner:
    def __init__(self, g: Graph, cfg: NPUConfig) -> None:
        self.g = g
        self.cfg = cfg
        self.n = cfg.native_dim
        self.views: dict[str, View] = {}
        self.buffers: list[Buffer] = []

    def new_buffer(self, t: Tensor) -> int:
        c, h, w = t.shape
        b = Buffer(len(self.buffers), h, w, _blocks(c, self.n), first=10**9, last=-1)
        self.buffers.append(b)
        return b.id

    def place(self) -> None:
        g, n = self.g, self.n
        npu_nodes = [x for x in g.nodes if not x.on_host]
        # Outermost concats first, so inner ones become views of the outer buffer.
        for node in reversed(npu_nodes):
            if node.op != "concat":
                continue
            out = node.outputs[0]
            if out not in self.views:
                self.views[out] = View(
                    self.new_buffer(g.tensors[out]),
                    0,
                    _blocks(g.tensors[out].channels, n),
                    g.tensors[out].channels,
                )
            base = self.views[out]
            off = base.cb_off
            for i, t in enumerate(list(node.inputs)):
                c = g.tensors[t].channels
                if c % n and i != len(node.inputs) - 1:
                    raise UnsupportedModelError(
                        f"node {node.name!r} (Concat): input {t!r} has {c} channels, not a "
                        f"multiple of the native dimension {n}; zero-copy concat needs "
                        "block-aligned inputs (all but the last)"
                    )
                prod = g.producer(t)
                movable = (
                    prod is not None
                    and not prod.on_host
                    and t not in self.views
                    and sum(1 for x in npu_nodes if x.op == "concat" and t in x.inputs) == 1
                )
                if not movable:
                    t = self._insert_copy(node, i, t)
                self.views[t] = View(base.buffer, off, _blocks(c, n), c)
                off += _blocks(c, n)
        for t in g.tensors.values():
            if t.name not in self.views:
                self.views[t.name] = View(self.new_buffer(t), 0, _blocks(t.channels, n), t.channels)

    def _insert_copy(self, concat: Node, i: int, t: str) -> str:
        g = self.g
        name = f"{t}__copy"
        g.tensors[name] = Tensor(name, g.tensors[t].shape)
        copy = Node(
            "eltwise",
            f"{concat.name}/copy{i}",
            [t],
            [name],
            {"relu": False},
            {},
            source=concat.source,
        )
        g.nodes.insert(g.nodes.index(concat), copy)
        concat.inputs[i] = name
        g.log.append(f"plan_memory: inserted a copy of {t!r} into concat {concat.name!r}")
        return name

    def liveness(self) -> None:
        g = self.g
        order = {id(x): i for i, x in enumerate(g.nodes)}
        for inp in g.inputs:
            self.buffers[self.views[inp.tensor].buffer].first = -1
        for x in g.nodes:
            i = order[id(x)]
            for t in x.outputs:
                b = self.buffers[self.views[t].buffer]
                b.first = min(b.first, i)
                b.last = max(b.last, i)
            for t in x.inputs:
                b = self.buffers[self.views[t].buffer]
                b.last = max(b.last, i)
        end = len(g.nodes)
        for o in g.outputs:
            self.buffers[self.views[o.tensor].buffer].last = end
        for b in self.buffers:
            if b.first == 10**9:
                b.first = -1

    def allocate(self, static_end: int) -> int:
        """First-fit reuse of dead buffers; returns the DRAM high-water mark."""
        cfg = self.cfg
        live: list[Buffer] = []
        free_regs = list(range(isa.EXP_REG_COUNT))
        used_regs: dict[int, int] = {}
        high = static_end
        for b in sorted(self.buffers, key=lambda b: (b.first, b.id)):
            b.nbytes = layout.tensor_bytes(b.h, b.w, b.cb, cfg.native_dim, cfg.mantissa_bits)
            for d in [x for x in live if x.last < max(b.first, 0)]:
                live.remove(d)
                free_regs.append(used_regs.pop(d.id))
            if not free_regs:
                raise CapacityError(
                    f"more than {isa.EXP_REG_COUNT} activation buffers are live at once; "
                    "the NPU has that many exponent registers"
                )
            free_regs.sort()
            b.ereg = free_regs.pop(0)
            used_regs[b.id] = b.ereg
            addr = static_end
            for x in sorted(live, key=lambda x: x.addr):
                if addr + b.nbytes <= x.addr:
                    break
                addr = max(addr, x.addr + x.nbytes)
            b.addr = addr
            live.append(b)
            high = max(high, addr + b.nbytes)
        return high


# ------------------------------------------------------------------ emit_chains


class _Emitter:
    def __init__(self, cfg: NPUConfig) -> None:
        self.cfg = cfg
        self.words: list[int] = []
        self.regs: dict[int, int] = {}
        self.chain_count = 0

    def op(self, mnemonic: str, **args: int) -> None:
        self.words.append(isa.encode(mnemonic, **args))

    def set(self, **values: int) -> None:
        for name, v in values.items():
            r = int(Reg[name])
            if self.regs.get(r) != v:
                if v >= 1 << 31:
                    v -= 1 << 32  # addresses travel as the 32-bit pattern
                self.op("s_wr", reg=r, value=v)
                self.regs[r] = values[name]

    def set_exp(self, ereg: int, value: int) -> None:
        r = isa.EXP_REG_BASE + ereg
        self.op("s_wr", reg=r, value=value)
        self.regs.pop(r, None)

    def m_rd(self, tile: int, count: int, addr: int) -> None:
        step = (1 << 11) - 1
        tb = layout.tile_bytes(self.cfg.native_dim, self.cfg.mantissa_bits)
        for i in range(0, count, step):
            c = min(step, count - i)
            self.op("m_rd", tile=tile + i, count=c, addr=addr + i * tb)

    def c_rd(self, vrf: int, count: int, addr: int) -> None:
        step = (1 << 13) - 1
        cb = layout.const_bytes(self.cfg.native_dim)
        for i in range(0, count, step):
            c = min(step, count - i)
            self.op("c_rd", vrf=vrf + i, count=c, addr=addr + i * cb)


def lower(g: Graph, cfg: NPUConfig) -> Lowered:
    """Quantize, plan memory and emit the program for a graph after the passes."""
    n, m = cfg.native_dim, cfg.mantissa_bits
    planner = _Planner(g, cfg)
    planner.place()
    planner.liveness()
    views, buffers = planner.views, planner.buffers

    # quantize_weights: static region right after the header.
    segments: list[tuple[int, bytes]] = []
    static = HEADER_BYTES
    tile_half = cfg.tile_buffer_tiles
    vrf_half = cfg.vrf_depth // 2
    qparams: dict[int, dict] = {}
    tile_shortfalls: list[str] = []

    def put(data: bytes) -> int:
        nonlocal static
        addr = static
        segments.append((addr, data))
        static = layout.align_up(static + len(data))
        return addr

    npu_nodes = [x for x in g.nodes if not x.on_host]
    for x in npu_nodes:
        info: dict = {}
        if x.op == "conv":
            vin = views[x.inputs[0]]
            kh, kw = x.attrs["kernel"]
            k_elems = kh * kw * vin.cb_cnt * n
            bits = numerics.accumulator_bound_bits(
                k_elems, m, cfg.act_exp_window, cfg.weight_exp_window
            )
            limit = min(cfg.accumulator_bits, 54)
            if bits > limit:
                raise UnsupportedModelError(
                    f"node {x.name!r} (Conv): reduction of {k_elems} elements needs a "
                    f"{bits}-bit accumulator; the NPU has {limit} bits"
                )
            qp = quantize_conv(x, cfg, vin.cb_cnt)
            info["tiles_addr"] = put(layout.pack_tiles(qp["tiles_q"], qp["tiles_e"], m))
            info["consts_addr"] = put(layout.pack_consts(qp["bias_q"], qp["bias_e"]))
            info["w_floor"] = qp["w_floor"]
            info["tiles_per_ob"] = kh * kw * vin.cb_cnt
            if info["tiles_per_ob"] > tile_half:
                tile_shortfalls.append(
                    f"node {x.name!r} (Conv): one output block needs {info['tiles_per_ob']} "
                    f"weight tiles; the {cfg.name} tile buffer holds {tile_half} per half "
                    f"(short by {info['tiles_per_ob'] - tile_half} tiles)"
                )
        elif x.op == "eltwise":
            ob = views[x.outputs[0]].cb_cnt
            for key in ("scale", "shift"):
                if key in x.params:
                    q, e = _wide_vectors(x.params[key], ob, cfg)
                    info[f"{key}_addr"] = put(layout.pack_consts(q, e))
        elif x.op == "pool" and x.attrs["kind"] == "avg":
            ob = views[x.outputs[0]].cb_cnt
            kh, kw = x.attrs["kernel"]
            q, e = _wide_vectors(np.full(ob * n, 1.0 / (kh * kw)), ob, cfg)
            info["scale_addr"] = put(layout.pack_consts(q, e))
        qparams[id(x)] = info
    static_end = layout.align_up(static)
    high = planner.allocate(static_end)
    dram_needed = high
    # DRAM first: it is the limit a user can do something about (a bigger board), and the
    # one the tile-buffer shortfalls of the same model are usually a symptom of.
    if dram_needed > cfg.dram_bytes:
        weights = static_end - HEADER_BYTES
        acts = high - static_end
        also = (
            f"; also {len(tile_shortfalls)} layer(s) exceed the tile buffer, "
            f"e.g. {tile_shortfalls[0]}"
            if tile_shortfalls
            else ""
        )
        raise CapacityError(
            f"the model needs {dram_needed / 2**20:.1f} MiB of DRAM ({weights / 2**20:.1f} MiB "
            f"of weights and constants at {m}-bit mantissas, {acts / 2**20:.1f} MiB of "
            f"activations at peak); {cfg.name} has {cfg.dram_bytes / 2**20:.1f} MiB: over by "
            f"{(dram_needed - cfg.dram_bytes) / 2**20:.1f} MiB{also}"
        )
    if tile_shortfalls:
        raise CapacityError("; ".join(tile_shortfalls))

    # emit_chains
    em = _Emitter(cfg)
    layers: list[dict] = []
    input_buf = buffers[views[g.inputs[0].tensor].buffer]
    em.op("s_ld", reg=isa.EXP_REG_BASE + input_buf.ereg, addr=INPUT_EMAX_ADDR)
    started: set[int] = {input_buf.id}
    for x in npu_nodes:
        if x.op == "concat":
            layers.append(
                {"op": "concat", "name": x.name, "source": x.source, "chains": 0, "macs": 0}
            )
            continue
        vout = views[x.outputs[0]]
        bout = buffers[vout.buffer]
        if bout.id not in started:
            em.set_exp(bout.ereg, numerics.E_ZERO)
            started.add(bout.id)
        layers.append(
            _emit_layer(em, g, x, views, buffers, qparams[id(x)], cfg, tile_half, vrf_half)
        )

    em.op("halt")
    return Lowered(em.words, segments, layers, buffers, views, dram_needed, static_end)


def tensor_desc(views: dict[str, View], buffers: list[Buffer], t: str) -> dict:
    """Where tensor ``t`` lives: its buffer's geometry and address and its block window."""
    v = views[t]
    b = buffers[v.buffer]
    return {
        "tensor": t,
        "addr": b.addr,
        "h": b.h,
        "w": b.w,
        "cb": b.cb,
        "cb_off": v.cb_off,
        "cb_cnt": v.cb_cnt,
        "channels": v.channels,
        "ereg": b.ereg,
        "buffer": b.id,
    }


def conv_group(cfg: NPUConfig, tiles_per_ob: int, ob_total: int) -> int:
    """Output blocks per conv chain: as many as fit half the tile buffer (the other half
    loads the next group's tiles meanwhile) and half the VRF (the constants likewise).

    Compiler passes that weigh a conv's DRAM reads count its chains with this too.
    """
    return max(1, min(cfg.tile_buffer_tiles // tiles_per_ob, cfg.vrf_depth // 2, ob_total))


def _emit_layer(
    em: _Emitter,
    g: Graph,
    x: Node,
    views,
    buffers,
    info: dict,
    cfg: NPUConfig,
    tile_half: int,
    vrf_half: int,
) -> dict:
    n = cfg.native_dim
    src = tensor_desc(views, buffers, x.inputs[0])
    dst = tensor_desc(views, buffers, x.outputs[0])
    oc, oh, ow = g.shape(x.outputs[0])
    ic = g.shape(x.inputs[0])[0]
    kh, kw = x.attrs.get("kernel", (1, 1))
    stride = x.attrs.get("stride", (1, 1))
    pads = x.attrs.get("pads", (0, 0, 0, 0))
    dil = x.attrs.get("dilation", (1, 1))
    aux = None
    if x.op == "conv" and x.attrs.get("residual"):
        aux = tensor_desc(views, buffers, x.inputs[1])
    elif x.op == "eltwise" and len(x.inputs) == 2:
        aux = tensor_desc(views, buffers, x.inputs[1])
    for d in (src, aux):
        if d is not None and d["buffer"] == dst["buffer"]:
            raise UnsupportedModelError(f"node {x.name!r}: reads and writes the same buffer")
    if aux is not None and (aux["h"], aux["w"]) != (oh, ow):
        raise UnsupportedModelError(f"node {x.name!r}: residual operand shape mismatch")

    ob_total = dst["cb_cnt"]
    if x.op == "conv":
        group = conv_group(cfg, info["tiles_per_ob"], ob_total)
        macs = oc * oh * ow * ic * kh * kw
    elif x.op == "pool":
        # Pool chains read only their own blocks: size the group so the kernel rows fit
        # the activation buffer and the input is streamed once.
        block = n * layout.mantissa_dtype(cfg.mantissa_bits).itemsize + 1
        fit = cfg.act_buffer_bytes // max(1, kh * src["w"] * block)
        group = max(1, min(vrf_half, ob_total, fit))
        macs = 0
    else:
        group = max(1, min(vrf_half // 2, ob_total))
        macs = 0
    em.set(
        IN_ADDR=src["addr"],
        IN_H=src["h"],
        IN_W=src["w"],
        IN_CB=src["cb"],
        IN_EREG=isa.EXP_REG_BASE + src["ereg"],
        K_H=kh,
        K_W=kw,
        STRIDE_H=stride[0],
        STRIDE_W=stride[1],
        PAD_T=pads[0],
        PAD_L=pads[1],
        DIL_H=dil[0],
        DIL_W=dil[1],
        OUT_ADDR=dst["addr"],
        OUT_H=oh,
        OUT_W=ow,
        OUT_CB=dst["cb"],
        OUT_EREG=isa.EXP_REG_BASE + dst["ereg"],
    )
    if aux is not None:
        em.set(AUX_ADDR=aux["addr"], AUX_CB=aux["cb"])
    if x.op == "conv":
        em.set(W_EXP_FLOOR=info["w_floor"])
    chains = 0
    tb = layout.tile_bytes(n, cfg.mantissa_bits)
    cb_bytes = layout.const_bytes(n)
    for g0 in range(0, ob_total, group):
        cnt = min(group, ob_total - g0)
        half = em.chain_count % 2
        tile_base = half * tile_half
        vrf_base = half * vrf_half
        em.set(OUT_CB_OFF=dst["cb_off"] + g0, OUT_CB_CNT=cnt)
        if aux is not None:
            em.set(AUX_CB_OFF=aux["cb_off"] + g0)
        if x.op == "conv":
            em.set(IN_CB_OFF=src["cb_off"], IN_CB_CNT=src["cb_cnt"])
            per_ob = info["tiles_per_ob"]
            em.m_rd(tile_base, cnt * per_ob, info["tiles_addr"] + g0 * per_ob * tb)
            em.c_rd(vrf_base, cnt, info["consts_addr"] + g0 * cb_bytes)
            em.op("v_rd")
            em.op("mv_mul", tile=tile_base)
            em.op("vv_add", src=Operand.VRF, vrf=vrf_base)
        elif x.op == "pool":
            em.set(IN_CB_OFF=src["cb_off"] + g0, IN_CB_CNT=cnt)
            if x.attrs["kind"] == "avg":
                em.c_rd(vrf_base, cnt, info["scale_addr"] + g0 * cb_bytes)
            em.op("v_rd")
            em.op("v_pool", op=PoolOp.MAX if x.attrs["kind"] == "max" else PoolOp.SUM)
            if x.attrs["kind"] == "avg":
                em.op("vv_mul", vrf=vrf_base)
        else:  # eltwise
            em.set(IN_CB_OFF=src["cb_off"] + g0, IN_CB_CNT=cnt)
            if "scale_addr" in info:
                em.c_rd(vrf_base, cnt, info["scale_addr"] + g0 * cb_bytes)
            if "shift_addr" in info:
                em.c_rd(vrf_base + cnt, cnt, info["shift_addr"] + g0 * cb_bytes)
            em.op("v_rd")
            if "scale_addr" in info:
                em.op("vv_mul", vrf=vrf_base)
            if "shift_addr" in info:
                em.op("vv_add", src=Operand.VRF, vrf=vrf_base + cnt)
        if aux is not None:
            em.op("vv_add", src=Operand.AUX, vrf=0)
        if x.attrs.get("relu"):
            em.op("v_relu")
        em.op("v_wr")
        em.op("end_chain")
        em.chain_count += 1
        chains += 1
    layer = {
        "op": x.op,
        "name": x.name,
        "source": x.source,
        "src": src,
        "dst": dst,
        "aux": aux,
        "kernel": [kh, kw],
        "stride": list(stride),
        "pads": list(pads),
        "dilation": list(dil),
        "relu": bool(x.attrs.get("relu")),
        "kind": x.attrs.get("kind"),
        "macs": macs,
        "chains": chains,
        "group": group,
        "out_shape": [oc, oh, ow],
    }
    for key in ("tiles_addr", "consts_addr", "w_floor", "tiles_per_ob", "scale_addr", "shift_addr"):
        if key in info:
            layer[key] = info[key]
    return layer
