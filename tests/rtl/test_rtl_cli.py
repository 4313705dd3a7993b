"""``tessera run --backend rtl`` gives exactly the outputs of ``--backend sim``."""

import numpy as np
import pytest
from nets import residual_net
from progs import RTL_TEST_CFG

from tessera import cli
from tessera.compiler.driver import compile_model

pytestmark = pytest.mark.rtl


def test_run_backend_rtl_matches_sim(tmp_path, capsys):
    prog, _, _ = compile_model(residual_net(), RTL_TEST_CFG)
    prog.save(tmp_path / "net.tsr")
    shape = prog.manifest["inputs"][0]["shape"]
    np.save(tmp_path / "x.npy", np.random.default_rng(5).standard_normal(shape).astype("f4"))
    for backend in ("sim", "rtl"):
        out_file = str(tmp_path / f"{backend}.npz")
        argv = ["run", str(tmp_path / "net.tsr"), "--backend", backend,
                "--input", str(tmp_path / "x.npy"), "--output", out_file]  # fmt: skip
        assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert "rtl:" in out.out + out.err
    sim, rtl = np.load(tmp_path / "sim.npz"), np.load(tmp_path / "rtl.npz")
    assert sorted(sim.files) == sorted(rtl.files)
    for k in sim.files:
        np.testing.assert_array_equal(sim[k], rtl[k])
