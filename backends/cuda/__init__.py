"""The cuda backend: its kernels and its Python side."""
