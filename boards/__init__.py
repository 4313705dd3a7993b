"""tessera.boards"""
