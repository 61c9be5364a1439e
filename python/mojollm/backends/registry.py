"""Find backends (entry-point group `mojollm.backends`), probe them, pick one.

`auto` prefers a GPU backend that probes available (cuda, then rocm), then tpu only when JAX
reports real TPU chips, then cpu. Asking for a backend that cannot run raises BackendUnavailable
with its reason; `auto` failing lists every backend's reason.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points

from mojollm.backends.base import Backend, Probe
from mojollm.errors import BackendUnavailable

BACKEND_NAMES = ("cpu", "cuda", "rocm", "tpu")
_AUTO_ORDER = ("cuda", "rocm", "tpu", "cpu")
_BUILTIN = {
    "cpu": "mojollm.backends.cpu:CpuBackend",
    "cuda": "mojollm.backends.cuda.backend:CudaBackend",
    "rocm": "mojollm.backends.rocm.backend:RocmBackend",
    "tpu": "mojollm.backends.tpu.backend:TpuBackend",
}
_instances: dict[str, Backend] = {}


def _backend_classes() -> dict[str, str]:
    found = dict(_BUILTIN)
    for ep in entry_points(group="mojollm.backends"):
        found.setdefault(ep.name, ep.value)
    return found


def backend_class(name: str) -> type[Backend]:
    classes = _backend_classes()
    if name not in classes:
        raise BackendUnavailable(f"unknown backend {name!r}: choose one of auto, {', '.join(classes)}")
    module, _, attr = classes[name].partition(":")
    try:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)
    except (ImportError, AttributeError) as e:
        raise BackendUnavailable(f"backend {name!r} cannot be imported: {e}") from e


def probe(name: str) -> Probe:
    try:
        return backend_class(name).probe()
    except BackendUnavailable as e:
        return Probe(name, False, "", str(e))
    except Exception as e:  # a probe must never take the CLI down
        return Probe(name, False, "", f"probe failed: {type(e).__name__}: {e}")


def probe_all() -> list[Probe]:
    return [probe(n) for n in _backend_classes()]


def _auto_choice() -> str:
    reasons = []
    for name in _AUTO_ORDER:
        p = probe(name)
        # The tpu backend also runs on XLA:CPU/GPU, but auto only picks it on real TPU chips.
        on_tpu_chips = p.device.startswith("TPU")
        if p.available and (name != "tpu" or on_tpu_chips):
            return name
        reasons.append(f"{name}: {p.reason or 'no TPU chips (' + p.device + ')'}")
    raise BackendUnavailable("no backend can run here: " + "; ".join(reasons))


def get_backend(name: str | None = None) -> Backend:
    """The backend instance for `name` (default: $MOJOLLM_BACKEND, else auto)."""
    name = (name or os.environ.get("MOJOLLM_BACKEND") or "auto").lower()
    if name == "auto":
        name = _auto_choice()
    if name in _instances:
        return _instances[name]
    cls = backend_class(name)
    p = cls.probe()
    if not p.available:
        raise BackendUnavailable(f"backend {name!r} is not usable here: {p.reason}")
    _instances[name] = cls()
    return _instances[name]
