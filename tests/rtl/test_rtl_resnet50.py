"""The whole of ResNet-50 through the RTL of the ``ulx3s-85f`` build, bit for bit against
the instruction simulator (``tessera bench rtl`` reports the same run with its speed).

About 41 M NPU cycles: tens of minutes of Verilator plus its first build, so ``huge``
(not in CI): ``pytest -m huge tests/rtl/test_rtl_resnet50.py``.
"""

import pytest

pytestmark = [pytest.mark.rtl, pytest.mark.slow, pytest.mark.huge]


def test_resnet50_whole_network_bit_exact_in_rtl():
    from tessera.bench_rtl import compare_network

    r = compare_network("resnet50", "ulx3s-85f", seed=0)
    print(
        f"ResNet-50 RTL: {r.rtl_cycles} cycles (model {r.model_cycles}, "
        f"{100 * r.cycle_difference:+.2f} %), {r.rtl_seconds:.0f} s, "
        f"{r.rtl_cycles_per_second:.0f} cycles/s"
    )
    assert r.rtl_error == 0
    assert r.bit_exact, f"{r.bytes_differing} DRAM bytes differ"
    assert abs(r.cycle_difference) <= 0.02  # the cycle model's contract
