"""Layouts of what a chain latches when it starts: its control registers and its ops."""

from amaranth import signed, unsigned
from amaranth.lib import data, enum

#: MFU op slots of the vector pipeline; a chain may have at most this many MFU ops.
MFU_SLOTS = 4
#: VRF read ports: at most this many MFU ops of one chain may read the VRF.
VRF_PORTS = 2


class Reducer(enum.Enum, shape=2):
    NONE = 0
    MVU = 1
    POOL = 2


class MfuOp(enum.Enum, shape=3):
    NONE = 0
    ADD = 1
    MUL = 2
    MAX = 3
    RELU = 4


Slot = data.StructLayout(
    {"op": MfuOp, "aux": unsigned(1), "vrf": unsigned(13), "port": unsigned(1)}
)

ChainOps = data.StructLayout(
    {
        "reducer": Reducer,
        "tile": unsigned(15),
        "pool_sum": unsigned(1),
        "slots": data.ArrayLayout(Slot, MFU_SLOTS),
        "uses_aux": unsigned(1),
    }
)

#: The control registers a chain reads, by name (values as the sequencer holds them).
ChainRegs = data.StructLayout(
    {
        "in_addr": unsigned(32),
        "ih": unsigned(16),
        "iw": unsigned(16),
        "icb": unsigned(16),
        "ioff": unsigned(16),
        "icnt": unsigned(16),
        "kh": unsigned(8),
        "kw": unsigned(8),
        "sh": unsigned(8),
        "sw": unsigned(8),
        "pt": unsigned(8),
        "pl": unsigned(8),
        "dh": unsigned(8),
        "dw": unsigned(8),
        "out_addr": unsigned(32),
        "oh": unsigned(16),
        "ow": unsigned(16),
        "ocb": unsigned(16),
        "ooff": unsigned(16),
        "ocnt": unsigned(16),
        "aux_addr": unsigned(32),
        "acb": unsigned(16),
        "aoff": unsigned(16),
        "wfloor": signed(16),
    }
)
