"""The rocm backend: its kernels and its Python side."""
