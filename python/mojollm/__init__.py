"""mojollm: an LLM inference engine whose hot paths are Mojo kernels.

`from mojollm import LLM, SamplingParams`. Names are resolved lazily so that `import mojollm`
stays fast (no numpy, no kernels, no model code until they are used).
"""

__version__ = "0.1.0"

_LAZY = {
    "LLM": ("mojollm.llm", "LLM"),
    "SamplingParams": ("mojollm.sampling_params", "SamplingParams"),
    "Engine": ("mojollm.engine.engine", "Engine"),
    "RequestOutput": ("mojollm.engine.sequence", "RequestOutput"),
    "CompletionOutput": ("mojollm.engine.sequence", "CompletionOutput"),
}

__all__ = ["LLM", "SamplingParams", "Engine", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mojollm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
