"""Build and load the Mojo kernel modules (see build.py)."""

from mojollm.kernels.build import HOST, Target, available_modules, build_module, load_module

__all__ = ["HOST", "Target", "available_modules", "build_module", "load_module"]
