"""CI for the rocm backend on a machine without an AMD GPU: the GPU kernel modules cross-compile
for MI300X (gfx942), MI250X (gfx90a) and Radeon RX 7900 (gfx1100), and each built extension really
carries AMD GPU code objects for that architecture: embedded ELF images with e_machine EM_AMDGPU
whose e_flags name the architecture -- not only a compiler that exited 0."""

from __future__ import annotations

import struct

import pytest

from mojollm.backends.rocm.backend import ROCM_ARCHS
from mojollm.kernels.build import Target, available_modules, build_module

EM_AMDGPU = 224
EF_AMDGPU_MACH_MASK = 0xFF
# LLVM's ELF.h: EF_AMDGPU_MACH_AMDGCN_GFX90A, _GFX942, _GFX1100.
EF_AMDGPU_MACH = {"gfx90a": 0x03F, "gfx942": 0x04C, "gfx1100": 0x041}


def amdgpu_code_objects(blob: bytes) -> list[int]:
    """e_flags of every 64-bit little-endian AMDGPU ELF image embedded in `blob`."""
    flags, i = [], 0
    while (j := blob.find(b"\x7fELF", i)) >= 0:
        i = j + 4
        if len(blob) < j + 52 or blob[j + 4] != 2 or blob[j + 5] != 1:  # ELFCLASS64, little-endian
            continue
        (machine,) = struct.unpack_from("<H", blob, j + 18)
        if machine == EM_AMDGPU:
            flags.append(struct.unpack_from("<I", blob, j + 48)[0])
    return flags


def test_the_arch_table_covers_every_ci_arch():
    assert set(ROCM_ARCHS) == set(EF_AMDGPU_MACH)


def test_rocm_builds_use_the_shared_gpu_sources():
    """Every cuda module but the NVIDIA-only gpu_library (Modular's 26.7 GEMM does not build for AMD)."""
    assert available_modules("rocm") == [m for m in available_modules("cuda") if m != "gpu_library"] != []
    assert "gpu_library" in available_modules("cuda") and "gpu_ops" in available_modules("rocm")


@pytest.mark.parametrize("arch", ROCM_ARCHS)
def test_gpu_modules_carry_amd_code_objects_for_the_arch(arch):
    for name in available_modules("rocm"):
        blob = build_module(name, "rocm", Target("rocm", arch)).read_bytes()
        flags = amdgpu_code_objects(blob)
        assert flags, f"{name} built for {arch} holds no AMDGPU code object"
        machs = {f & EF_AMDGPU_MACH_MASK for f in flags}
        assert machs == {EF_AMDGPU_MACH[arch]}, f"{name}: code objects for machs {sorted(map(hex, machs))}, want {arch}"


def test_the_code_object_check_rejects_other_targets():
    """The check above must be able to fail: a host (CPU) build carries no AMDGPU code object."""
    for name in available_modules("cpu")[:1]:
        assert amdgpu_code_objects(build_module(name, "cpu", Target("host")).read_bytes()) == []
