"""The whole of ResNet-50 through the RTL of the ``ulx3s-85f`` build, bit for bit against
the instruction simulator (``tessera bench rtl`` reports the same run with its speed).

About 40 M NPU cycles: about 4 minutes of Verilator with the DRAM inside the simulation,
plus the 85F build's 5 the first time (shared with ``test_rtl_zoo_layer.py``), so ``slow``.
"""

import pytest

pytestmark = [pytest.mark.rtl, pytest.mark.slow]


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
