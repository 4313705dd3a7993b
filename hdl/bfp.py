"""Block-floating-point arithmetic as Amaranth logic, one function per rule of numerics.py.

Each function adds combinational logic to a module and returns the result signals; the
units (MVU, MFU, pooling, write path) put pipeline registers between them. Every function
mirrors the function of :mod:`tessera.numerics` with the same name, and the unit tests
check them against it on random data.
"""

from dataclasses import dataclass

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.hdl import Value

from tessera import numerics

#: Internal exponent width (signed). numerics.py says 12 bits in hardware; 16 leaves room for
#: the sums of exponents a chain of vv_mul can build without a wrap.
EXP_BITS = 16


def sat_limit(bits: int) -> int:
    return numerics.sat_limit(bits)


def absolute(m: Module, x: Value, name: str) -> Signal:
    """|x| as an unsigned value of x's width (the most negative value fits unsigned)."""
    w = len(x)
    a = Signal(unsigned(w), name=name)
    m.d.comb += a.eq(Mux(x[w - 1], -x, x))
    return a


def bit_length(m: Module, a: Value, name: str) -> Signal:
    """Bits needed for the unsigned ``a`` (0 for 0): a priority encoder.

    Built as a tree (the upper half's bit length if it has a set bit, else the lower
    half's), log2(width) levels deep; a chain of ``m.If`` per bit would leave a mux per bit
    in series, which on a 54-bit accumulator is the slowest path of the NPU.
    """
    bl = Signal(range(len(a) + 1), name=name)
    m.d.comb += bl.eq(_bit_length_tree(a))
    return bl


def _bit_length_tree(a: Value) -> Value:
    w = len(a)
    if w == 1:
        return a[0]
    lo_w = 1 << ((w - 1).bit_length() - 1)  # the largest power of two below w
    lo, hi = a[:lo_w], a[lo_w:]
    return Mux(hi.any(), _bit_length_tree(hi) + lo_w, _bit_length_tree(lo))


def below_mask(m: Module, s: Value, width: int, name: str) -> Signal:
    """Bits ``i < s - 1`` of a ``width``-bit word: the sticky-bit mask of a right shift by s.

    A thermometer code computed once per shift amount; vectors whose lanes share one shift
    (every normalize) share it, which saves a comparator per bit and lane.
    """
    mask = Signal(width, name=name)
    sm1 = Signal(range(width + 2), name=f"{name}_sm1")
    m.d.comb += sm1.eq(Mux(s > width, width, s) - 1)
    m.d.comb += mask.eq(Cat(*[Const(i, range(width + 2)) < sm1 for i in range(width)]))
    return mask


def saturated_shift(m: Module, amount: Value, limit: int, name: str) -> Signal:
    """``min(amount, limit)`` in ``range(limit + 1)`` (``amount`` <= 0 is the caller's don't
    care): a shift by ``limit`` or more gives the same result as ``limit`` once the value
    is below half an LSB or saturated, so shifters stay ``limit`` wide."""
    out = Signal(range(limit + 1), name=name)
    m.d.comb += out.eq(Mux(amount > limit, limit, amount))
    return out


def _lowest_set(bits: list[Value]) -> tuple[Value, Value]:
    """Whether any of ``bits`` is set, and the index of the lowest set one: a tree."""
    if len(bits) == 1:
        return bits[0], Const(0, 1)
    half = len(bits) // 2
    any_lo, at_lo = _lowest_set(bits[:half])
    any_hi, at_hi = _lowest_set(bits[half:])
    return any_lo | any_hi, Mux(any_lo, at_lo, half + at_hi)


def sticky_limit_parts(
    m: Module, x: Value, name: str, parts: int = 4
) -> list[tuple[Signal, Signal, int]]:
    """Where :func:`rne_split`'s sticky bit starts, searched over ``parts`` slices of ``x``
    and registered: per slice, whether a bit is set, the index of its lowest set bit, and
    the slice's offset (:func:`sticky_limit_join` gives the limit a cycle later).

    The limit is the smallest right shift of ``x`` with a sticky bit: 2 + the index of the
    lowest set bit, or ``len(x) + 1`` (none up to ``len(x)``) when that bit is the top one
    or ``x`` is 0. Worked out while a lane waits for its vector's shift, it turns the
    sticky bit into one small compare instead of a wide mask-and-OR after the shift; split
    over two cycles, each holds a quarter of the search tree."""
    found = []
    for j, (any_w, at_w, lo, size) in enumerate(_slice_search(x, parts)):
        any_r = Signal(name=f"{name}_any{j}")
        at_r = Signal(range(max(2, size)), name=f"{name}_at{j}")
        m.d.sync += [any_r.eq(any_w), at_r.eq(at_w)]
        found.append((any_r, at_r, lo))
    return found


def _slice_search(x: Value, parts: int) -> list[tuple[Value, Value, int, int]]:
    """Per slice of ``x``'s bits below its top one: any set, the lowest's index, offset, size."""
    bits = [x[i] for i in range(max(0, len(x) - 1))]
    size = -(-len(bits) // parts) if bits else 0
    out = []
    for lo in range(0, len(bits), max(1, size)):
        part = bits[lo : lo + size]
        out.append((*_lowest_set(part), lo, len(part)))
    return out


def sticky_limit_join(parts: list[tuple[Value, Value, int]], width: int) -> Value:
    """The sticky limit of a ``width``-bit value from its :func:`sticky_limit_parts`."""
    limit: Value = Const(width + 1, range(width + 2))
    for any_r, at_r, lo in reversed(parts):
        limit = Mux(any_r, at_r + (lo + 2), limit)
    return limit


def sticky_limit(m: Module, x: Value, name: str) -> Signal:
    """The sticky limit of :func:`sticky_limit_parts` in one cycle, for a value that has no
    wait to spread the search over (an MFU operand read a cycle before its alignment)."""
    limit = Signal(range(len(x) + 2), name=name)
    found = [(any_w, at_w, lo) for any_w, at_w, lo, _ in _slice_search(x, 1)]
    m.d.comb += limit.eq(sticky_limit_join(found, len(x)))
    return limit


def rne_split(
    m: Module,
    x: Value,
    s: Value,
    name: str,
    mask: Value | None = None,
    out_bits: int | None = None,
    limit: Value | None = None,
    clamped: bool = False,
) -> tuple[Signal, Signal]:
    """The shifter half of :func:`rne_shift`: ``(x << 1) >> s`` (the quotient above its
    round bit) and the sticky bit. A pipeline register may sit between it and
    :func:`rne_round`.

    A shift of ``len(x)`` or more gives the same result as ``len(x)`` (the value is below
    half an LSB), so the shift is clamped there to keep the shifter small. ``mask`` is
    :func:`below_mask` of ``s`` when the caller shares one across lanes. ``out_bits``: the
    caller guarantees ``x >> s`` fits that many signed bits (a normalize knows it from its
    shift), so the shifter builds only those output bits instead of ``len(x)`` of them.
    ``limit``: :func:`sticky_limit_join` for ``x``, instead of a mask. ``clamped``: the
    caller has clamped ``s`` to ``len(x)`` already (a register, so the shifter's selects
    come straight from flip-flops).
    """
    w = len(x)
    ob = w if out_bits is None else min(out_bits, w)
    xs = x.as_signed()
    sc = Signal(range(w + 1), name=f"{name}_s")
    m.d.comb += sc.eq(s if clamped else Mux(s > w, w, s))
    # One shifter gives the quotient and the round bit: bit 0 of (x << 1) >> s is bit
    # s - 1 of x (0 when s == 0, where no rounding happens).
    r = Signal(signed(ob + 1), name=f"{name}_r")
    m.d.comb += r.eq(((xs << 1) >> sc)[: ob + 1])
    sticky = Signal(name=f"{name}_st")
    if limit is not None:
        m.d.comb += sticky.eq(limit <= sc)
        return r, sticky
    if mask is None:
        mask = below_mask(m, sc, w, f"{name}_mask")
    m.d.comb += sticky.eq((x.as_unsigned() & mask[:w]).any())
    return r, sticky


def rne_round(m: Module, r: Value, sticky: Value, name: str) -> Signal:
    """The rounding half of :func:`rne_shift`: up when the round bit is set and the
    remainder is above half or the quotient odd."""
    q = r[1:].as_signed()
    out = Signal(signed(len(r)), name=name)
    m.d.comb += out.eq(q + (r[0] & (sticky | q[0])))
    return out


def rne_shift(
    m: Module,
    x: Value,
    s: Value,
    name: str,
    mask: Value | None = None,
    out_bits: int | None = None,
    limit: Value | None = None,
    clamped: bool = False,
) -> Signal:
    """``x / 2**s`` rounded half to even (numerics.rne_shift), for signed ``x``, ``s >= 0``
    (see :func:`rne_split` for ``mask``, ``out_bits``, ``limit`` and ``clamped``)."""
    r, sticky = rne_split(m, x, s, name, mask, out_bits, limit, clamped)
    return rne_round(m, r, sticky, name)


def saturate(m: Module, x: Value, bits: int, name: str) -> Signal:
    """Clip signed ``x`` to the symmetric ``bits``-wide range."""
    lim = sat_limit(bits)
    out = Signal(signed(bits), name=name)
    xs = x.as_signed()
    m.d.comb += out.eq(Mux(xs > lim, lim, Mux(xs < -lim, -lim, xs)))
    return out


def magnitude_union(m: Module, xs: list[Value], name: str) -> Signal:
    """Bitwise OR of the lanes' magnitudes: its bit length is the largest magnitude's.

    An OR tree instead of a comparator tree, and it can be built up over several cycles
    when a vector arrives a few lanes at a time.
    """
    mags = [absolute(m, x, f"{name}_abs{i}") for i, x in enumerate(xs)]
    union = Signal(max(len(x) for x in xs), name=f"{name}_or")
    acc = mags[0]
    for mag in mags[1:]:
        acc = acc | mag
    m.d.comb += union.eq(acc)
    return union


def normalize_shift(m: Module, union: Value, bits: int, name: str) -> Signal:
    """The right shift that fits a vector with :func:`magnitude_union` ``union`` into
    ``bits`` signed bits (its sticky mask is :func:`below_mask` of it).

    That is ``max(0, bit_length(union) - (bits - 1))``, which is the bit length of the
    union's bits above its low ``bits - 1``: one priority encoder over those, with no
    compare and subtract behind it."""
    width = len(union)
    shift = Signal(range(width + 1), name=f"{name}_shift")
    if width > bits - 1:
        m.d.comb += shift.eq(bit_length(m, union[bits - 1 :], f"{name}_bl"))
    return shift


@dataclass
class Clamp:
    """The int8 exponent clamp's decision for one vector (:func:`clamp_decision`)."""

    over: Signal  # the exponent is above E_MAX: lanes shift up by ``up`` and saturate
    under: Signal  # below E_MIN (E_ZERO too): lanes shift down by ``down``, rounded
    up: Signal
    down: Signal
    e: Signal  # the clamped exponent

    def signals(self) -> list[Signal]:
        return [self.over, self.under, self.up, self.down, self.e]


def clamp_decision(m: Module, e1: Value, bits: int, name: str) -> Clamp:
    """The first half of numerics.to_storage's int8 exponent clamp on normalized lanes of
    exponent ``e1``: what happens to the lanes (:func:`clamp_lanes` does it) and the
    clamped exponent. An all-zero result still needs ``E_ZERO``, which the caller decides
    once it has seen every lane."""
    over = Signal(name=f"{name}_over")
    under = Signal(name=f"{name}_under")
    m.d.comb += [
        over.eq(e1 > numerics.E_MAX),
        # An all-zero vector (E_ZERO) shifts too and stays zero; the caller gives it E_ZERO
        # back, and a non-zero vector whose exponent is E_ZERO is clamped like the rest.
        under.eq(e1 < numerics.E_MIN),
    ]
    # Any non-zero mantissa shifted up by ``bits`` or more saturates, as it would by the
    # reference's up-to-40 bits: clamping there keeps the shifter ``bits`` wide.
    up = saturated_shift(m, e1 - numerics.E_MAX, bits, f"{name}_up")
    # Likewise a shift down by ``bits`` or more rounds every lane to 0, as ``bits`` does.
    down = saturated_shift(m, numerics.E_MIN - e1, bits, f"{name}_down")
    e = Signal(signed(8), name=f"{name}_e")
    m.d.comb += e.eq(Mux(over, numerics.E_MAX, Mux(under, numerics.E_MIN, e1)))
    return Clamp(over, under, up, down, e)


def clamp_lanes(
    m: Module, q1: list[Value], c: Clamp, bits: int, name: str, limits: list[Value]
) -> list[Signal]:
    """The second half of the clamp: each lane shifted as ``c`` decided (``limits``: the
    lanes' :func:`sticky_limit`, for the rounding of a shift down)."""
    qs = []
    for i, q in enumerate(q1):
        shifted_up = Signal(signed(2 * bits + 1), name=f"{name}_up{i}")
        m.d.comb += shifted_up.eq(q << c.up)
        hi = saturate(m, shifted_up, bits, f"{name}_hi{i}")
        lo = rne_shift(m, q, c.down, f"{name}_lo{i}", limit=limits[i], clamped=True)
        out = Signal(signed(bits), name=f"{name}_q{i}")
        m.d.comb += out.eq(Mux(c.over, hi, Mux(c.under, lo, q)))
        qs.append(out)
    return qs


def const_signed(v: int, width: int) -> Const:
    return Const(v, signed(width))
