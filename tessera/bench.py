"""``tessera bench sim``: speed figures measured side by side in one run.

The machine is shared and noisy, so every figure is measured in the same process, with
the runs interleaved (ORT, simulator, reference, ORT, ...) and the median kept; the
ratios are what to read. Beside the simulator it times the run's exact products alone
(the same float64 matrix products on the same thread pool): the part of the simulator's
time no amount of work on the rest can remove.

Each timed run starts after a short pause: OpenBLAS's and onnxruntime's worker threads
keep spinning for a while after they finish, and a run that follows them gets about half
the CPU (measured here: onnxruntime 58 ms alone, 133 ms right after a numpy product).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (not tests): measured side by side")
    bsub = p.add_subparsers(dest="bench", required=True)
    s = bsub.add_parser("sim", help="onnxruntime FP32 vs simulator vs reference, compile time")
    s.add_argument("--model", default="resnet50", help="zoo model name or an .onnx path")
    s.add_argument("--config", default="ulx3s-85f", help="NPU configuration")
    s.add_argument("--repeat", type=int, default=5, help="interleaved repetitions")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_bench_sim)
    from tessera.bench_rtl import register as register_rtl
    from tessera.bench_serve import register as register_serve

    register_serve(bsub)
    register_rtl(bsub)


#: Seconds to wait before each timed run, for the previous run's spinning worker threads
#: to go idle (OpenBLAS's time out after about 0.1 s).
_SETTLE_S = 0.3


def _median_time(fn, times: list[float]) -> None:
    time.sleep(_SETTLE_S)
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)


def _product_replay(shapes: list[tuple[int, int, int, int, int]]):
    """A function making a run's exact products alone, as the simulator makes them
    (float64 or byte-digit products on its thread pool, OpenBLAS held to one thread
    each), on operands that stay in memory: what the simulator would take if nothing
    else cost."""
    from tessera.sim import kernels

    rng = np.random.default_rng(0)
    size_w = max(o * k for o, k, *_ in shapes)
    size_a = max(p * k for _, k, p, *_ in shapes)
    weights = rng.integers(-(2**15), 2**15, size_w).astype(np.float64)
    cols = rng.integers(-(2**23), 2**23, size_a).astype(np.float64)
    w_digits = rng.integers(-128, 128, max(wd for *_, wd in shapes) * size_w, dtype=np.int8)
    a_digits = rng.integers(0, 256, kernels.ACT_DIGITS * size_a, dtype=np.uint8)
    no_correction = np.zeros(max(o for o, *_ in shapes), np.int64)
    # The simulator's warm runs have every weight slice packed once (AMX tiles' layout or
    # an onnxruntime session); one per operand shape does here (the time does not depend
    # on the values).
    packed = {
        (o, k, wd): kernels.pack_digits(
            [w_digits[j * o * k : (j + 1) * o * k].reshape(k, o) for j in range(wd)]
        )
        for o, k, _, ad, wd in shapes
        if ad
    }

    def product(shape: tuple[int, int, int, int, int]) -> None:
        o, k, p, ad, wd = shape
        if ad:
            a = a_digits[: ad * p * k].reshape(ad, p, k)
            first = kernels.ACT_DIGITS - ad
            kernels.digit_accumulators(packed[(o, k, wd)], a, first, no_correction[:o],
                                       np.empty((o, p)))  # fmt: skip
        else:
            weights[: o * k].reshape(o, k) @ cols[: p * k].reshape(p, k).T

    def run() -> None:
        with kernels.blas_single_thread():
            kernels.run_parallel(product, shapes)

    return run


def _bench_sim(args: argparse.Namespace) -> int:
    import onnxruntime as ort
    from rich.console import Console
    from rich.table import Table

    from tessera.compiler.driver import compile_model
    from tessera.config import get_config
    from tessera.sim import kernels
    from tessera.sim.report import build_report
    from tessera.sim.run import run_program

    console = Console()
    path = Path(args.model)
    if not path.suffix == ".onnx":
        from tessera.zoo import cached_export

        with console.status(f"exporting {args.model} (cached after the first run)"):
            path = cached_export(args.model, seed=args.seed)
    cfg = get_config(args.config)
    with console.status("compiling"):
        t0 = time.perf_counter()
        prog, _, _ = compile_model(path, cfg)
        compile_s = time.perf_counter() - t0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
    x = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    feeds = {name: x}
    sess.run(None, feeds)  # warm-up
    with kernels.record_products() as shapes:
        run_program(prog, feeds, "sim")
    products = _product_replay(shapes)
    products()
    t_ort: list[float] = []
    t_sim: list[float] = []
    t_ref: list[float] = []
    t_products: list[float] = []
    for _ in range(args.repeat):
        _median_time(lambda: sess.run(None, feeds), t_ort)
        _median_time(lambda: run_program(prog, feeds, "sim"), t_sim)
        _median_time(products, t_products)
        _median_time(lambda: run_program(prog, feeds, "reference"), t_ref)
    ort_s, sim_s, ref_s, products_s = (
        statistics.median(t) for t in (t_ort, t_sim, t_ref, t_products)
    )
    rep = build_report(prog)

    runs = f"{args.repeat} interleaved runs, medians"
    table = Table(title=f"tessera bench sim: {path.name} on {cfg.name} ({runs})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("ratio / note")
    table.add_row("onnxruntime FP32", f"{ort_s * 1e3:.1f} ms", "1.00x")
    table.add_row(
        "ISA simulator (bit-exact)",
        f"{sim_s * 1e3:.1f} ms",
        f"{sim_s / ort_s:.2f}x ORT (target <= 3x)",
    )
    table.add_row(
        "  its exact products alone",
        f"{products_s * 1e3:.1f} ms",
        f"{products_s / ort_s:.2f}x ORT: the run's {len(shapes)} matrix products "
        f"({sum(1 for *_, d in shapes if d)} of them byte-digit)",
    )
    table.add_row("reference executor", f"{ref_s * 1e3:.1f} ms", f"{ref_s / ort_s:.2f}x ORT")
    table.add_row("compile (excl. ONNX export)", f"{compile_s:.2f} s", "target <= 10 s")
    table.add_row("cycle model latency", f"{rep['latency_ms']:.1f} ms",
                  f"{rep['total_cycles']:,} cycles at {rep['clock_mhz']:.0f} MHz")  # fmt: skip
    table.add_row("MVU utilisation", f"{rep['mvu_utilization']:.1%}", "goal >= 85 %")
    table.add_row("DSP-bound floor", f"{rep['dsp_floor_ms']:.1f} ms",
                  f"{rep['macs'] / 1e9:.2f} GMAC at {rep['macs_per_cycle']} MAC/cycle")  # fmt: skip
    table.add_row("DRAM traffic", f"{rep['dram_bytes'] / 2**20:.1f} MiB",
                  f"{rep['dram_bytes'] / (rep['latency_ms'] / 1e3) / 1e6:.0f} MB/s of "
                  f"{cfg.dram_bytes_per_s / 1e6:.0f} MB/s")  # fmt: skip
    console.print(table)
    return 0
