"""The model runner: everything device-side of a step, between the engine and the model.

The engine plans a step (a StepBatch) and says, for each logits row, whether the runner may sample
it itself (`device_rows[r]` is that row's Sequence) or must hand the row back (None: beam search,
teacher-forced scoring, the first draw of n > 1 samples, penalties, logprobs). The runner returns
the sampled token ids and the handed-back rows only:

    runner.execute(batch, device_rows, layers=None) -> StepOutput(tokens [L] int32, logits [L_host, V] float32)

`tokens[r]` is the token drawn for a device row r (-1 for host rows, and -2 when row r's logits
were not finite, so the engine fails that request); `logits` holds the host rows in order.

This base runner samples nothing on the device: it runs `model.forward` and returns every row to
the host (the cpu and tpu backends, and any model object without a backend). A backend with a
faster step (persistent device buffers, CUDA graphs, sampling on the device) returns its own
runner from `Backend.create_runner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mojollm.engine.step import StepBatch

if TYPE_CHECKING:
    from mojollm.engine.sequence import Sequence

TOKEN_HOST = -1      # tokens[r]: the row's logits are in StepOutput.logits
TOKEN_NOT_FINITE = -2  # tokens[r]: the device row's logits held NaN/inf


@dataclass
class StepOutput:
    tokens: np.ndarray | None  # [L] int32, None when every row went to the host
    logits: np.ndarray         # [L_host, V] float32: the host rows, in row order
    kv_mass: dict | None = None  # batch.kv_mass_seqs: sequence index -> attention mass per cache row


class ModelRunner:
    samples_on_device = False

    def __init__(self, model, max_num_seqs: int, max_model_len: int):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len

    def allocate_kv_cache(self, num_blocks: int, block_size: int, progress=None) -> None:
        """The KV pool, and whatever the runner prepares with it (graphs); `progress(msg)` reports."""
        self.model.allocate_kv_cache(num_blocks, block_size)

    def execute(self, batch: StepBatch, device_rows: list[Sequence | None] | None = None,
                layers: list[int] | None = None) -> StepOutput:
        """layers: run only these layers of the model (a self-speculative draft; every row to the host)."""
        logits = self.model.forward(batch) if layers is None else self.model.forward(batch, layers)
        mass = self.model.take_kv_mass() if batch.kv_mass_seqs is not None else None
        return StepOutput(tokens=None, logits=np.asarray(logits), kv_mass=mass)

    def copy_kv_rows(self, src_slots: np.ndarray, dst_slots: np.ndarray) -> None:
        """Move KV rows (every layer) before the next step: a KV policy's compaction. All
        sources are read before any destination is written; destinations are distinct."""
        self.model.copy_kv_rows(src_slots, dst_slots)


# ---- shape buckets of runners that compile or capture per shape (cuda graphs, jax.jit)

def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, ... below max_num_seqs, then max_num_seqs itself."""
    return [b for b in (2 ** i for i in range(16)) if b < max_num_seqs] + [max_num_seqs]


def width_buckets(max_blocks: int, min_blocks: int = 1) -> list[int]:
    """Block-table widths: powers of two of blocks from min_blocks (rounded up to a power of
    two) below max_blocks, then max_blocks."""
    w, out = 1 << max(0, min_blocks - 1).bit_length(), []
    while w < max_blocks:
        out.append(w)
        w *= 2
    return out + [max_blocks]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket >= n (None past the last)."""
    for b in buckets:
        if b >= n:
            return b
    return None


def create_runner(model, max_num_seqs: int, max_model_len: int) -> ModelRunner:
    """The model's backend's runner where it has one, else the base runner."""
    factory = getattr(getattr(model, "backend", None), "create_runner", None)
    if factory is None:
        return ModelRunner(model, max_num_seqs, max_model_len)
    return factory(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
