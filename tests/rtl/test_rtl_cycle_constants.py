"""The cycle model's structural constants are the RTL's (``sim/cycles.py`` cannot import
``hdl/``, which needs Amaranth): a change to a buffer depth, a burst length or a pipeline
in the RTL must show up in the model that promises its timing."""

import pytest
from progs import RTL_TEST_CFG

from tessera.config import get_config
from tessera.hdl import (
    actbuffer,
    actloader,
    arbiter,
    auxreader,
    chain,
    loader,
    multiplier,
    mvu,
    npu,
    params,
    tilebuffer,
    vector,
    writer,
)
from tessera.sim import cycles

pytestmark = pytest.mark.rtl


def test_burst_and_buffer_constants_match_the_rtl():
    assert cycles.EXP_BUF == writer.EXP_BUF
    assert cycles.RUN_MAX == writer.RUN_MAX
    assert cycles.LOADER_CHUNK == loader.CHUNK
    assert cycles.LOADER_QUEUE == arbiter.QUEUE
    assert cycles.AUX_FIFO == auxreader.DEPTH - 1
    assert cycles.MFU_SLOTS == params.MFU_SLOTS
    assert cycles.MUL_LATENCY == multiplier.LATENCY
    assert cycles.MVU_OPERAND_STAGES == mvu.OPERAND_STAGES
    assert cycles.MVU_OUTPUT_STAGES == mvu.OUTPUT_STAGES
    assert cycles.BEAT_STAGES == chain.BEAT_STAGES
    assert cycles.ADDRESS_STAGES == chain.ADDRESS_STAGES
    assert cycles.ACT_READ_STAGES == actbuffer.READ_STAGES
    assert cycles.DONE_TO_LAUNCH == chain.DONE_TO_LAUNCH
    assert cycles.SETUP_PRODUCTS == chain.SETUP_PRODUCTS
    assert cycles.LOAD_COMMAND_STAGES == npu.LOAD_COMMAND_STAGES
    assert cycles.LOAD_BUSY_LAG == npu.LOAD_BUSY_LAG
    assert cycles.TILE_WRITE_STAGES == tilebuffer.WRITE_STAGES
    assert cycles.LOAD_PORT_STAGES == loader.PORT_STAGES
    assert cycles.HANDOVER_STAGES == npu.HANDOVER_STAGES
    assert cycles.READY_LAG == npu.READY_LAG
    assert cycles.RUNNING_LAG == npu.RUNNING_LAG


@pytest.mark.parametrize("cfg", [RTL_TEST_CFG, get_config("ulx3s-85f")], ids=lambda c: c.name)
def test_per_config_terms_match_the_rtl(cfg):
    assert cycles.act_entries(cfg) == actloader.act_entries(cfg)
    assert cycles.vector_phases(cfg) == vector.phases(cfg)
    assert cycles.vector_latency(cfg) == vector.latency(cfg)
    # + the published rows' register and the output stages
    assert cycles.mvu_latency(cfg) == mvu.latency(cfg) + 1 + mvu.OUTPUT_STAGES
