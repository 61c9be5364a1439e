"""CI for the cuda backend's kernels on a machine without a GPU: every Mojo module in backends/cuda
cross-compiles for sm_90 (Hopper), and the built extension really carries NVIDIA device code for
that target -- PTX for sm_90(a) with the instructions the fast paths rely on -- not just a host
library that happened to link."""

from __future__ import annotations

import re

import pytest

from mojollm.kernels.build import Target, available_modules, build_module, embedded_ptx

SM90 = Target("cuda", "sm_90")


@pytest.fixture(scope="module")
def built():
    names = available_modules("cuda")
    assert "gpu_ops" in names, names
    return {name: build_module(name, "cuda", SM90) for name in names}


def test_every_cuda_module_builds_for_sm90_with_nvidia_code(built):
    for name, path in built.items():
        mods = embedded_ptx(path.read_bytes())
        assert mods, f"{name}: no PTX in {path}"
        for m in mods:
            assert re.search(r"^\.target sm_90a?\b", m, re.M), f"{name}: PTX not for sm_90: {m[:200]}"


def test_gpu_ops_carries_every_kernel_and_the_tensor_core_paths(built):
    ptx = "\n".join(embedded_ptx(built["gpu_ops"].read_bytes()))
    entries = re.findall(r"\.entry\s+(\S+)\(", ptx)
    # Entry names carry the first 16 characters of the kernel's name.
    for kernel in ("embedding_dense", "embedding_quant", "rms_norm_kernel", "add_rms_norm_ke", "add_kernel",
                   "rope_kernel", "silu_mul_kernel", "store_kv_kernel", "gemv_dense_kerne", "gemv_quant_kerne",
                   "gemm_simt_kernel", "gemv_kq_kernel", "dequant_kq_kerne", "embedding_kq_ker", "attn_prefill_sim", "attn_prefill_mma",
                   "attn_decode_kern", "attn_combine_ker"):
        assert any(kernel in e for e in entries), f"kernel {kernel} missing from the PTX"
    # Tensor cores, ldmatrix and cp.async in the flash-attention kernels; 16-byte loads in GEMV.
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx
    assert "cp.async.cg.shared.global" in ptx or "cp.async.ca.shared.global" in ptx
    assert "ld.global.v4" in ptx
    # No kernel keeps an array in local memory (register tiles are indexed at compile time).
    assert ".local" not in ptx


def test_gpu_library_specialisation_carries_modulars_hopper_kernels():
    """gpu_library built for the small-gqa preset's shapes (as loading that checkpoint asks): the
    static-shape GEMMs are Modular's sm90 TMA/wgmma kernels and flash attention its sm90 MHA for 6
    heads over 2 kv heads of 64; built without defines it holds only the dynamic-shape GEMM."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from random_llama import preset_checkpoint

    from mojollm.backends.cuda.backend import library_defines
    from mojollm.models.llama import gemm_shapes

    c, weights = preset_checkpoint("small-gqa")
    defines = library_defines(gemm_shapes(c, weights), (6, 2, 64))
    path = build_module("gpu_library", "cuda", SM90, defines=defines)
    assert path.name.startswith("gpu_library-")
    entries = re.findall(r"\.entry\s+(\S+)\(", "\n".join(embedded_ptx(path.read_bytes())))
    assert any(e.startswith("sm90_matmul_bfloat16_bfloat16_float32") for e in entries), entries
    assert any(e.startswith("sm90_mha_depth64_bfloat16_bfloat16_nqh6_nkvh2") for e in entries), entries
    generic = re.findall(r"\.entry\s+(\S+)\(", "\n".join(embedded_ptx(
        build_module("gpu_library", "cuda", SM90).read_bytes())))
    assert not any(e.startswith(("sm90_matmul", "sm90_mha")) for e in generic)
