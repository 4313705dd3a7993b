"""The NPU with its DRAM inside the simulation: whole networks at the simulator's own speed.

The cocotb ``DramModel`` (``dram.py``) is Python called on every clock edge, which holds a
Verilator run to a few thousand cycles a second: a ResNet-50 (41 M cycles) would take
hours. ``npu_dram`` wraps the NPU top with ``tessera_dram``, a Verilog model with exactly
the DramModel's timing (one beat per cycle, up to two bursts outstanding, read data one
cycle after the command; its falling-edge step becomes logic between rising edges), so
Python only loads the program, pulses ``start`` and waits for ``done``; even the clock is
generated inside. The image goes in with ``$readmemh`` and comes out with ``$writememh``
(file names and sizes as plusargs), so one build serves every program of a configuration.
``tests/rtl/test_rtl_networks.py`` runs networks through both models and checks they give
the same memory and the same cycle counts.

Accesses outside the memory do not stop the simulation (Verilog cannot raise): they set the
sticky ``fault`` output with the offending byte address in ``fault_addr``, which the
harness turns into an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOPLEVEL = "npu_dram"

_DRAM = """\
// DRAM model behind the NPU's MemBus (see tessera.hdl.testbench.dram_top).
module tessera_dram #(parameter WORDS = 16) (
    input clk,
    input cmd_valid, output cmd_ready, input cmd_write,
    input [31:0] cmd_addr, input [11:0] cmd_len,
    output [15:0] rdata, output rvalid,
    input [15:0] wdata, input [1:0] wstrb, input wvalid, output wready,
    input dump, output reg fault, output reg [31:0] fault_addr
);
    reg [15:0] mem [0:WORDS-1];
    reg [8*4096-1:0] in_file;
    reg [8*4096-1:0] out_file;
    integer dump_words;
    // the burst moving data, and up to two commanded behind it
    reg cur_v, cur_w;
    reg [31:0] cur_addr;
    reg [12:0] cur_left;
    reg [1:0] qn;
    reg q0_w, q1_w;
    reg [31:0] q0_addr, q1_addr;
    reg [12:0] q0_len, q1_len;
    reg [15:0] rdata_hold;

    initial begin
        fault = 0; fault_addr = 0; rdata_hold = 0;
        cur_v = 0; cur_w = 0; cur_addr = 0; cur_left = 0; qn = 0;
        if ($value$plusargs("dram_in=%s", in_file)) $readmemh(in_file, mem);
        if (!$value$plusargs("dram_out=%s", out_file)) out_file = "dram_out.hex";
        if (!$value$plusargs("dram_words=%d", dump_words)) dump_words = WORDS;
    end

    // The DramModel's step (take the next burst, move one beat, accept a command if fewer
    // than two bursts are held) as logic: it ran at the falling edge on the NPU's outputs
    // of that cycle, which hold until the rising edge, so its outputs are combinational
    // here and its state moves at the rising edge. The NPU is then evaluated once a cycle.
    wire take = !cur_v && qn != 0;
    wire e_v = cur_v || take;
    wire e_w = cur_v ? cur_w : q0_w;
    wire [31:0] e_addr = cur_v ? cur_addr : q0_addr;
    wire [12:0] e_left = cur_v ? cur_left : q0_len;
    wire [1:0] e_qn = take ? qn - 2'd1 : qn;
    wire beat = e_v && (!e_w || wvalid);
    wire [12:0] n_left = e_left - {12'd0, beat};
    wire n_v = e_v && n_left != 0;
    wire room = ({1'b0, n_v} + e_qn) < 2'd2;
    wire in_range = e_addr[31:1] < WORDS;
    wire accept = room && cmd_valid;
    assign cmd_ready = room;
    assign rvalid = e_v && !e_w;
    assign wready = e_v && e_w;
    assign rdata = rvalid && in_range ? mem[e_addr[31:1]] : rdata_hold;

    always @(posedge clk) begin
        if (e_v && !in_range) begin
            if (!fault) fault_addr <= e_addr;
            fault <= 1;
        end
        if (accept && (cmd_addr[0] || cmd_len == 0)) begin
            if (!fault && !(e_v && !in_range)) fault_addr <= cmd_addr;
            fault <= 1;
        end
        if (wready && wvalid && in_range) begin
            if (wstrb[0]) mem[e_addr[31:1]][7:0] <= wdata[7:0];
            if (wstrb[1]) mem[e_addr[31:1]][15:8] <= wdata[15:8];
        end
        rdata_hold <= rdata;
        cur_v <= n_v;
        cur_w <= e_w;
        cur_addr <= beat ? e_addr + 32'd2 : e_addr;
        cur_left <= n_left;
        if (take) begin q0_w <= q1_w; q0_addr <= q1_addr; q0_len <= q1_len; end
        if (accept) begin
            if (e_qn == 0) begin
                q0_w <= cmd_write; q0_addr <= cmd_addr; q0_len <= {1'b0, cmd_len};
            end else begin
                q1_w <= cmd_write; q1_addr <= cmd_addr; q1_len <= {1'b0, cmd_len};
            end
        end
        qn <= e_qn + {1'b0, accept};
        if (dump) $writememh(out_file, mem, 0, dump_words - 1);
    end
endmodule

module npu_dram #(parameter WORDS = 16) (
    // What the harness drives and reads (the build turns Verilator's "every signal is
    // writable through VPI" off, see tessera.hdl.rtlsim), up to `public_off` below.
    /*verilator public_flat_rw_on*/
    input rst, input start,
    input prog_we, input [{addr_msb}:0] prog_addr, input [63:0] prog_data,
    input dump,
    output busy, output done, output [7:0] error, output [47:0] cycles,
    output [{pc_msb}:0] pc,
    output fault, output [31:0] fault_addr
);
    // The clock runs inside the simulation (10 ns), so no Python or VPI call happens per
    // edge; cocotb still sees `clk` and can wait for its edges.
    reg clk = 0;
    always #5 clk = ~clk;
    /*verilator public_off*/
    // The host inputs reach the core through registers, one cycle late: Verilator
    // re-evaluates all logic that depends combinationally on a top-level input at every
    // time step (its "ico" region), and every register's reset mux depends on `rst`.
    reg rst_q = 1, start_q = 0, prog_we_q = 0;
    reg [{addr_msb}:0] prog_addr_q = 0;
    reg [63:0] prog_data_q = 0;
    always @(posedge clk) begin
        rst_q <= rst;
        start_q <= start;
        prog_we_q <= prog_we;
        prog_addr_q <= prog_addr;
        prog_data_q <= prog_data;
    end
    wire cmd_valid, cmd_ready, cmd_write, rvalid, wvalid, wready;
    wire [31:0] cmd_addr;
    wire [11:0] cmd_len;
    wire [15:0] rdata, wdata;
    wire [1:0] wstrb;
    npu core (
        .clk(clk), .rst(rst_q), .start(start_q),
        .prog_we(prog_we_q), .prog_addr(prog_addr_q), .prog_data(prog_data_q),
        .busy(busy), .done(done), .error(error), .cycles(cycles), .pc(pc),
        .mem__cmd_valid(cmd_valid), .mem__cmd_ready(cmd_ready), .mem__cmd_write(cmd_write),
        .mem__cmd_addr(cmd_addr), .mem__cmd_len(cmd_len),
        .mem__rdata(rdata), .mem__rvalid(rvalid),
        .mem__wdata(wdata), .mem__wstrb(wstrb), .mem__wvalid(wvalid), .mem__wready(wready)
    );
    tessera_dram #(.WORDS(WORDS)) dram (
        .clk(clk),
        .cmd_valid(cmd_valid), .cmd_ready(cmd_ready), .cmd_write(cmd_write),
        .cmd_addr(cmd_addr), .cmd_len(cmd_len),
        .rdata(rdata), .rvalid(rvalid),
        .wdata(wdata), .wstrb(wstrb), .wvalid(wvalid), .wready(wready),
        .dump(dump), .fault(fault), .fault_addr(fault_addr)
    );
endmodule
"""


def wrapper_verilog(imem_depth: int, dram_bytes: int) -> str:
    """``tessera_dram`` and the ``npu_dram`` top for an NPU built with ``imem_depth`` words
    of instruction memory, with ``dram_bytes`` of DRAM (the configuration's)."""
    addr_bits = max(1, (imem_depth - 1).bit_length())
    pc_bits = imem_depth.bit_length()  # the NPU's pc counts to imem_depth inclusive
    text = _DRAM.replace("{addr_msb}", str(addr_bits - 1)).replace("{pc_msb}", str(pc_bits - 1))
    words = (dram_bytes + 1) // 2
    return text.replace(
        "module npu_dram #(parameter WORDS = 16)", f"module npu_dram #(parameter WORDS = {words})"
    )


#: "xxxx\n" for every 16-bit value: images become hex text by one table lookup.
_HEX = np.array([f"{i:04x}\n".encode() for i in range(1 << 16)], dtype="S5")


def write_hex(image: np.ndarray, path: Path) -> int:
    """Writes the byte image as ``$readmemh`` text of little-endian 16-bit words; returns
    the word count."""
    data = np.asarray(image, dtype=np.uint8)
    if data.size % 2:
        data = np.concatenate([data, np.zeros(1, np.uint8)])
    words = data.view("<u2")
    path.write_bytes(_HEX[words].tobytes())
    return int(words.size)


#: ASCII hex digit -> its value (other bytes never reach it: lines are checked first).
_NIBBLE = np.zeros(256, dtype=np.uint16)
for _digit in b"0123456789abcdef":
    _NIBBLE[_digit] = int(chr(_digit), 16)
    _NIBBLE[ord(chr(_digit).upper())] = int(chr(_digit), 16)


def read_hex(path: Path, nbytes: int) -> np.ndarray:
    """The first ``nbytes`` of a ``$writememh`` dump of 16-bit words, as bytes."""
    raw = path.read_bytes()
    if b"/" in raw or b"@" in raw:  # comments or addresses: drop those lines first
        lines = [ln.strip() for ln in raw.splitlines()]
        raw = b"".join(ln + b"\n" for ln in lines if ln and not ln.startswith((b"//", b"@")))
    # One "xxxx\n" line per word: 16 M words are reshaped, not split into 16 M strings.
    rows = np.frombuffer(raw, dtype=np.uint8)
    if rows.size % 5 or np.any(rows.reshape(-1, 5)[:, 4] != ord("\n")):
        raise ValueError(f"{path}: expected one 4-digit hex word per line")
    digits = _NIBBLE[rows.reshape(-1, 5)[:, :4]]
    words = (digits[:, 0] << 12) | (digits[:, 1] << 8) | (digits[:, 2] << 4) | digits[:, 3]
    return words.astype("<u2").view(np.uint8)[:nbytes].copy()
