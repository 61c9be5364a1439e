"""The kernel ABI's tables are defined twice, once per language: the element-type codes, the GGUF
quant-type codes and the error-flag words in backends/cuda/gpu_common.mojo, and the tables
backends/cuda/backend.py passes and reads. A code that drifts on one side would make a kernel
read the wrong type, so both sides are compared here (no GPU needed)."""

from __future__ import annotations

import re
from pathlib import Path

from mojollm.backends.cuda import backend as cuda_backend

COMMON = Path(cuda_backend.__file__).resolve().parent / "gpu_common.mojo"


def _mojo_constants() -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^comptime (\w+) = (\d+)\s*$", COMMON.read_text(), re.M)}


def test_dtype_codes_match():
    c = _mojo_constants()
    mojo = {"float32": c["DT_F32"], "bfloat16": c["DT_BF16"], "float16": c["DT_F16"]}
    assert mojo == cuda_backend._DTYPE_CODES
    assert len(set(mojo.values())) == len(mojo)


def test_quant_codes_match():
    c = _mojo_constants()
    assert {q: c[q] for q in cuda_backend._QCODES} == cuda_backend._QCODES
    assert len(set(cuda_backend._QCODES.values())) == len(cuda_backend._QCODES)


def test_error_words_match():
    c = _mojo_constants()
    words = {name: value for name, value in c.items() if name.startswith("ERR_") and name != "ERR_WORDS"}
    assert [name for name, _ in cuda_backend._ERRORS] == sorted(words, key=words.get)
    assert [words[name] for name, _ in cuda_backend._ERRORS] == list(range(len(words)))
    assert c["ERR_WORDS"] == cuda_backend._ERR_WORDS >= len(words)
