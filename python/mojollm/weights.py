"""A loaded weight tensor, float or GGUF-quantized, before a backend prepares it.

GGUF block layouts (ggml), 32 weights per block along the row (K) dimension:
    Q4_0: f16 d, 16 bytes of nibbles            w = (q - 8) * d      (18 bytes)
    Q4_1: f16 d, f16 m, 16 bytes of nibbles     w = q * d + m        (20 bytes)
    Q5_0: f16 d, u32 high bits, 16 B nibbles    w = (q - 16) * d     (22 bytes)
    Q5_1: f16 d, f16 m, u32 high bits, 16 B     w = q * d + m        (24 bytes)
    Q8_0: f16 d, 32 x int8                      w = q * d            (34 bytes)
    W8A8: Q8_0's blocks; the activations are quantized to int8 per token at run time (SmoothQuant;
          a GGUF stores these tensors as Q8_0 and names them in `mojollm.w8a8_tensors`; a HF directory
          as compressed-tensors int-quantized, mojollm.models.compressed_tensors)
    F8_E4M3: f16 d, 32 x E4M3 (OCP FP8)         w = d * e4m3(q)      (34 bytes)
          not a ggml type: FP8 checkpoints (mojollm.fp8); E4M3 is 1 sign bit, 4 exponent bits
          (bias 7), 3 mantissa bits, max 448, no infinities, 0x7F / 0xFF NaN
Nibble order: byte j holds element j (low 4 bits) and element j + 16 (high 4 bits).
k-quants, 256 weights per super-block in groups of 16 or 32 with their own 4- to 8-bit scales
(layouts in mojo/kquant.mojo): Q2_K 84 bytes, Q3_K 110, Q4_K 144, Q5_K 176, Q6_K 210. Rows
(the last dimension) must be whole blocks, so k-quant rows are multiples of 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mojollm.errors import ModelLoadError

QK = 32  # weights per block of the 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
QK_K = 256  # weights per k-quant super-block
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "W8A8": 34,
               "Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
BLOCK_BYTES["F8_E4M3"] = 2 + QK  # f16 d + 32 E4M3 codes (mojollm.fp8)
BLOCK_SIZE = {qtype: QK_K if qtype.endswith("_K") else QK for qtype in BLOCK_BYTES}  # weights per block
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = FLOAT_TYPES + tuple(BLOCK_BYTES)


def bf16_to_float32(a: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact)."""
    return (a.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits in uint16, round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


@dataclass
class WeightTensor:
    """`shape` is the logical row-major shape ([out, in] for a linear, torch's convention).
    `data` is float32 / float16 / uint16 (BF16 bits) of that shape, or for quantized types
    uint8 of shape [rows, row_bytes] holding the GGUF blocks of each row."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    data: np.ndarray

    def __post_init__(self):
        if self.qtype not in SUPPORTED_TYPES:
            raise ModelLoadError(f"tensor {self.name}: type {self.qtype} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_TYPES)})")
        if not self.shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                                 for d in self.shape):
            raise ModelLoadError(f"tensor {self.name}: shape {self.shape} is not a list of positive sizes")
        if self.is_quantized:
            k, block = self.shape[-1], BLOCK_SIZE[self.qtype]
            if k % block:
                raise ModelLoadError(f"tensor {self.name}: row length {k} is not a multiple of {block} "
                                     f"(the {self.qtype} block)")
            rows = math.prod(self.shape[:-1])  # Python ints: np.prod would wrap around on a forged shape
            want = (rows, k // block * BLOCK_BYTES[self.qtype])
            if self.data.dtype != np.uint8 or self.data.shape != want:
                raise ModelLoadError(f"tensor {self.name}: {self.qtype} data has shape {self.data.shape}, expected {want}")

    @property
    def is_quantized(self) -> bool:
        return self.qtype in BLOCK_BYTES

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def to_float32(self) -> np.ndarray:
        """Dequantized / widened copy as float32 of `shape` (reference path, uses the gguf package)."""
        if self.qtype == "F32":
            return np.asarray(self.data, dtype=np.float32).reshape(self.shape)
        if self.qtype == "F16":
            return np.asarray(self.data).astype(np.float32).reshape(self.shape)
        if self.qtype == "BF16":
            return bf16_to_float32(np.asarray(self.data)).reshape(self.shape)
        if self.qtype == "F8_E4M3":
            from mojollm import fp8

            return fp8.blocks_to_float32(np.asarray(self.data), self.shape)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        ggml = "Q8_0" if self.qtype == "W8A8" else self.qtype  # W8A8 holds Q8_0's blocks
        return dequantize(np.asarray(self.data), GGMLQuantizationType[ggml]).astype(np.float32).reshape(self.shape)

    @classmethod
    def from_float(cls, name: str, a: np.ndarray) -> "WeightTensor":
        a = np.ascontiguousarray(a, dtype=np.float32)
        return cls(name, tuple(a.shape), "F32", a)
