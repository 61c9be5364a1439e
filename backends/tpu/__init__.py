"""The tpu backend: its kernels and its Python side."""
