"""Portable Mojo kernel sources (CPU). Shipped as package data `mojollm.mojo_src`; built by mojollm.kernels."""
