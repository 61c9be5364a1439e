"""Model loading: `load_model(path_or_None, backend)` -> a LlamaModel with its tokenizer.

path: None (the default model, pulled on first use), a .gguf file, or a Hugging Face directory.
"""

from __future__ import annotations

from pathlib import Path

from mojollm.backends.base import Backend
from mojollm.models.config import ModelConfig
from mojollm.models.llama import LlamaModel

__all__ = ["load_model", "LlamaModel", "ModelConfig"]


def load_checkpoint(path=None, progress=None):
    """(resolved path, checkpoint) of a model: config and memory-mapped weights, nothing on a device."""
    from mojollm.model_store import resolve_model_path

    resolved: Path = resolve_model_path(path, progress=progress)
    if progress is not None:
        progress(f"loading {resolved}")
    if resolved.is_dir():
        from mojollm.models.hf_loader import load_hf

        return resolved, load_hf(resolved)
    from mojollm.models.gguf_loader import load_gguf

    return resolved, load_gguf(resolved)


def load_model(path=None, backend: Backend | str | None = None, progress=None) -> LlamaModel:
    from mojollm.tokenizer import Tokenizer

    if not isinstance(backend, Backend):
        from mojollm.backends import get_backend

        backend = get_backend(backend)
    resolved, ckpt = load_checkpoint(path, progress)
    if resolved.is_dir():
        tokenizer = Tokenizer.from_hf_dir(resolved)
    else:
        tokenizer = Tokenizer.from_gguf_metadata(ckpt.metadata, where=str(resolved))
    backend.load_kernels(progress=progress)  # compile now, not inside the first timed step
    model = LlamaModel(ckpt.config, ckpt.weights, tokenizer, backend, progress=progress)
    model.path = resolved
    model._checkpoint = ckpt  # keeps memory-mapped files open for weights the backend did not copy
    return model
