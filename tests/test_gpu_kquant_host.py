"""gpu_kquant's (the cuda backend's Q5_x / k-quant kernels') decoding and arithmetic run on the CPU:
tests/gpu_kquant_host.mojo compiles the kernel file's device functions for the host and runs the
GEMV step lane by lane and the element dequantization, against gguf (no GPU needed).

  * dequantization (embedding rows, the bf16 / float32 matrix above 64 tokens): bit-identical to
    gguf.quants.dequantize, on gguf- / test-quantized rows and on random raw blocks;
  * GEMV: against float64 with the same int8 activations (codes, dx and code sums as
    quantize_q8_kernel writes them), |y - ref| <= 1e-5 max A (A = sum |x q| |w|): a wrong code,
    bit, scale or unit is of order one in these units. 1, 2, 4 rows per warp, 1 and 8 tokens a
    pass, K with and without the two-units-a-lane loop and its tail.
What this does not cover: gemv_kq_kernel's warp / block geometry, shuffles and stores, and the
launches in gpu_ops (tests/test_gpu.py on a GPU)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from mojollm.backends.cuda.backend import _QCODES, repack_gguf_kquant
from mojollm.kernels.build import find_mojo
from mojollm.weights import WeightTensor
from test_kquant import quantize_any, random_blocks

ROOT = Path(__file__).resolve().parent.parent
KQ_TYPES = ["Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    out = tmp_path_factory.mktemp("kq") / "gpu_kquant_host"
    subprocess.run([str(find_mojo()), "build", "-I", str(ROOT / "backends" / "cuda"),
                    str(ROOT / "tests" / "gpu_kquant_host.mojo"), "-o", str(out)], check=True)
    return out


def q8(x):
    """quantize_q8_kernel's output in numpy: int8 codes, (dx, code sum) per 32, and dx q float64."""
    from test_gpu import q8_codes

    f32 = np.float32
    t, k = x.shape
    q, dx = q8_codes(x)
    xs = np.stack([dx, q.astype(np.int32).sum(-1).astype(f32)], -1).astype(f32)
    return q.reshape(t, k), xs, (q * dx[..., None].astype(np.float64)).reshape(t, k)


@pytest.mark.parametrize("qtype", KQ_TYPES)
@pytest.mark.parametrize("case", [(67, 256, 1, 1, 1, 0), (67, 512, 9, 8, 2, 0), (13, 4864, 3, 8, 4, 1),
                                  (5, 4864, 1, 1, 2, 1), (7, 1024, 1, 1, 4, 0), (3, 8192, 2, 8, 1, 0)])
def test_kquant_device_functions_on_host(harness, tmp_path, qtype, case):
    n, k, t, nt, r, raw_blocks = case
    rng = np.random.default_rng(n + k + t)
    if raw_blocks:
        data = random_blocks(rng, qtype, n, k // (256 if qtype.endswith("_K") else 32))
    else:
        data = quantize_any(rng.standard_normal((n, k)).astype(np.float32), qtype)
    wref = dequantize(data, GGMLQuantizationType[qtype]).reshape(n, k).astype(np.float32)
    for name, a in zip(("qs", "d", "m", "h"), repack_gguf_kquant(WeightTensor("w", (n, k), qtype, data))):
        (a if a is not None else np.zeros(16, np.uint8)).tofile(tmp_path / f"{name}.bin")
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[0, :32] *= 1e3
    x[-1, 32:64] = 0
    qx, xs, xq = q8(x)
    qx.tofile(tmp_path / "qx.bin")
    xs.tofile(tmp_path / "xs.bin")
    subprocess.run([str(harness), str(_QCODES[qtype]), str(nt), str(r), str(n), str(k), str(t), str(tmp_path)],
                   check=True)
    deq = np.fromfile(tmp_path / "deq.bin", np.float32).reshape(n, k)
    bad = np.argwhere(deq.view(np.uint32) != wref.view(np.uint32))
    assert not len(bad), f"{len(bad)} weights differ, first {tuple(bad[0])}: {deq[tuple(bad[0])]} vs gguf's " \
        f"{wref[tuple(bad[0])]}"
    y = np.fromfile(tmp_path / "y.bin", np.float32).reshape(t, n)
    ref = xq @ wref.astype(np.float64).T
    a = np.abs(xq) @ np.abs(wref.astype(np.float64)).T
    assert np.abs(y - ref).max() <= 1e-5 * a.max()
