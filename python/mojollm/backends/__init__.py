"""Runtime-selected backends. `get_backend("auto" | "cpu" | "cuda" | "rocm" | "tpu")`."""

from mojollm.backends.base import Backend, Probe
from mojollm.backends.registry import BACKEND_NAMES, get_backend, probe_all

__all__ = ["Backend", "Probe", "BACKEND_NAMES", "get_backend", "probe_all"]
