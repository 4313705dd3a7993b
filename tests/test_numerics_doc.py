"""docs/numerics.md stays true: its constant tables match the code, its examples run."""

from __future__ import annotations

import doctest
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from tessera import layout
from tessera import numerics as nx
from tessera.compiler import lower
from tessera.config import DEFAULT_PRESET, PRESETS, get_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "numerics.md"
ACC_LIMIT = 54  # min(cfg.accumulator_bits, 54) in compiler/lower.py, checked below


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def table(name: str) -> list[list[str]]:
    """Rows (cells without backticks) of the table between ``<!-- name:begin/end -->``."""
    m = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", doc_text(), re.S)
    assert m, f"docs/numerics.md has no {name} table"
    rows = [line.strip().strip("|").split("|") for line in m.group(1).strip().splitlines()]
    return [[c.strip().strip("`") for c in r] for r in rows[2:]]  # skip header and rule


def max_k(m: int, d: int, dw: int, limit: int = ACC_LIMIT) -> int:
    """Largest K whose accumulator bound fits ``limit`` bits (the bound grows with K)."""
    lo, hi = 0, 1 << 40
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if nx.accumulator_bound_bits(mid, m, d, dw) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def test_constants_table_matches_code() -> None:
    cfg = get_config(DEFAULT_PRESET)
    m, big = cfg.mantissa_bits, cfg.mfu_mantissa_bits
    d, dw = cfg.act_exp_window, cfg.weight_exp_window
    kmax = max_k(m, d, dw)
    expected = {
        "native_dim": cfg.native_dim,
        "mantissa_bits": m,
        "mantissa_max": nx.sat_limit(m),
        "mfu_mantissa_bits": big,
        "mfu_mantissa_max": nx.sat_limit(big),
        "E_ZERO": nx.E_ZERO,
        "E_MIN": nx.E_MIN,
        "E_MAX": nx.E_MAX,
        "act_exp_window": d,
        "weight_exp_window": dw,
        "max_grid_shift": d + dw,
        "accumulator_bits": cfg.accumulator_bits,
        "accumulator_limit": min(cfg.accumulator_bits, ACC_LIMIT),
        "float64_exact_bits": np.finfo(np.float64).nmant + 1,
        "max_K": kmax,
        "bound_bits_at_max_K": nx.accumulator_bound_bits(kmax, m, d, dw),
        "shift_cap": nx._MAX_SHIFT,
        "mantissa_bytes": cfg.mantissa_bytes,
        "tile_bytes": layout.tile_bytes(cfg.native_dim, m),
        "const_vector_bytes": layout.const_bytes(cfg.native_dim),
        "input_emax_addr": lower.INPUT_EMAX_ADDR,
    }
    got = {r[0]: int(r[1]) for r in table("constants")}
    assert got == expected


def test_compiler_limit_is_the_documented_one() -> None:
    # The doc's accumulator_limit and max_K assume this exact check in the compiler.
    assert f"min(cfg.accumulator_bits, {ACC_LIMIT})" in inspect.getsource(lower)
    # 54-bit two's complement and float64 integers share the same magnitude limit.
    assert 1 << (ACC_LIMIT - 1) == 2 ** (np.finfo(np.float64).nmant + 1)
    k = max_k(8, 16, 8)
    assert k * nx.sat_limit(8) ** 2 << 24 < 2**53 <= (k + 1) * nx.sat_limit(8) ** 2 << 24


def test_presets_table_matches_config() -> None:
    rows = {r[0]: [int(c) for c in r[1:]] for r in table("presets")}
    assert set(rows) == set(PRESETS)
    for name, c in PRESETS.items():
        assert rows[name] == [
            c.native_dim,
            c.mantissa_bits,
            c.mfu_mantissa_bits,
            c.act_exp_window,
            c.weight_exp_window,
            c.accumulator_bits,
            max_k(
                c.mantissa_bits,
                c.act_exp_window,
                c.weight_exp_window,
                min(c.accumulator_bits, ACC_LIMIT),
            ),
        ], name


def test_kmax_by_mantissa_width() -> None:
    rows = table("kmax")
    assert rows
    for m, k in rows:
        assert max_k(int(m), 16, 8) == int(k), m


def test_worked_examples_run() -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(doc_text(), {}, "numerics.md", str(DOC), 0)
    assert len(test.examples) >= 40, "the worked examples went missing"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append)
    if runner.failures:
        pytest.fail("stale example in docs/numerics.md:\n" + "".join(out))


def test_function_map_names_real_functions() -> None:
    m = re.search(r"## 9\..*?\n\|.*?\n\|---\|---\|\n(.*?)\n\n", doc_text(), re.S)
    assert m
    names = re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)`", m.group(1))
    public = [n for n in names if hasattr(nx, n)]
    assert len(public) >= 15
    # Every public function of tessera.numerics is mapped to a spec item.
    funcs = {n for n, f in vars(nx).items() if inspect.isfunction(f) and not n.startswith("_")}
    assert funcs <= set(names), funcs - set(names)
