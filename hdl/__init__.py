"""tessera.hdl"""
