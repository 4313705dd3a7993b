"""Signatures shared by the NPU's units: the DRAM burst bus and the internal burst ports.

The external memory interface (``MemBus``, documented in ``docs/hardware.md``) is a
simple in-order burst interface, one command at a time, 16-bit data: ``dram_bytes_per_cycle``
of every preset is 2, which is what a 16-bit SDR SDRAM at the core clock delivers and what
the cycle model charges.

* command: ``cmd_valid``/``cmd_ready`` handshake with ``cmd_write``, ``cmd_addr`` (byte
  address, even) and ``cmd_len`` (beats of 2 bytes, >= 1);
* read data: ``rvalid`` beats in address order (at most one per cycle, any latency);
* write data: ``wvalid``/``wready`` beats with ``wstrb`` byte enables (bit 0 = even byte).

Inside the NPU every unit that moves data owns a ``BurstPort`` towards the arbiter, which
grants whole bursts by fixed priority; data beats of the granted burst flow on that port.
"""

from amaranth.lib.wiring import In, Out, Signature

BEAT_BYTES = 2
BEAT_BITS = 8 * BEAT_BYTES
#: Widest burst one command may ask for (the arbiter's length counter).
LEN_BITS = 12
MAX_BURST = (1 << LEN_BITS) - 1

#: The NPU's DRAM port, seen from the NPU (initiator).
MemBus = Signature(
    {
        "cmd_valid": Out(1),
        "cmd_ready": In(1),
        "cmd_write": Out(1),
        "cmd_addr": Out(32),
        "cmd_len": Out(LEN_BITS),
        "rdata": In(BEAT_BITS),
        "rvalid": In(1),
        "wdata": Out(BEAT_BITS),
        "wstrb": Out(BEAT_BYTES),
        "wvalid": Out(1),
        "wready": In(1),
    }
)

#: A unit's port towards the arbiter, seen from the unit. ``req`` with ``write``, ``addr``
#: and ``len`` is held until ``grant`` pulses; read beats then arrive on ``rvalid``; a write
#: unit must present beat k on ``wdata``/``wstrb`` whenever ``wtake`` pulses (it has the
#: whole burst buffered before requesting). ``done`` pulses when the burst is complete.
BurstPort = Signature(
    {
        "req": Out(1),
        "write": Out(1),
        "addr": Out(32),
        "len": Out(LEN_BITS),
        "grant": In(1),
        "rdata": In(BEAT_BITS),
        "rvalid": In(1),
        "wdata": Out(BEAT_BITS),
        "wstrb": Out(BEAT_BYTES),
        "wtake": In(1),
        "done": In(1),
    }
)
