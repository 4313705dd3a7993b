"""Reusable cocotb pieces for the NPU: a DRAM model, a host driver and a cycle monitor.

They run inside the HDL simulator (imported by the cocotb test module ``tb_npu``); the
Python side that prepares jobs and checks results is :mod:`tessera.hdl.rtlrun`.
"""
