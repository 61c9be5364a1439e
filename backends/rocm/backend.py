"""The rocm backend: the cuda backend's Mojo GPU kernels built for AMD Instinct / Radeon.

Mojo compiles one kernel source for NVIDIA and AMD, so this backend shares every kernel and all
of the Python side with backends/cuda; it differs only where the hardware does:

* the target is `rocm:<gfx arch>` (torch reports it as gcnArchName, e.g. "gfx942:sramecc+:xnack-");
* the NVIDIA-only fast paths (mma.sync / wgmma tensor-core GEMM and flash-attention tiles, which
  use PTX instructions) are switched off, so GEMM and prefill attention take the portable SIMT
  kernels (wavefront-size agnostic: they use the portable block reductions of gpu_common).
  MFMA variants are the AMD counterpart still to be written;
* torch built for HIP exposes the device through the same `torch.cuda` API and memory pointers,
  so tensors, streams and CUDA-graph-style capture work through the same code.
"""

from __future__ import annotations

import glob

from mojollm.backends.base import Probe
from mojollm.backends.cuda.backend import CudaBackend, _kernel_problem, _torch

# Architectures `mojollm build` and CI cross-compile for: MI300X, MI250X, Radeon RX 7900.
ROCM_ARCHS = ("gfx942", "gfx90a", "gfx1100")


def _rocm_target(torch, index: int):
    from mojollm.kernels.build import Target

    arch = torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
    return Target("rocm", arch)


class RocmBackend(CudaBackend):
    name = "rocm"

    @classmethod
    def probe(cls) -> Probe:
        if not glob.glob("/dev/kfd"):
            return Probe(cls.name, False, "", "no ROCm device")
        try:
            torch = _torch()
        except ImportError:
            return Probe(cls.name, False, "", "torch not installed (install torch built for ROCm)")
        if not getattr(torch.version, "hip", None):
            return Probe(cls.name, False, "", "torch is not a ROCm build (torch.version.hip is None)")
        if not torch.cuda.is_available():
            return Probe(cls.name, False, "", "no ROCm device (torch.cuda.is_available() is False)")
        problem = _kernel_problem(_rocm_target(torch, 0))
        if problem:
            return Probe(cls.name, False, "", problem)
        return Probe(cls.name, True, torch.cuda.get_device_name(0), "")

    def _select_target(self, torch, device_index: int):
        target = _rocm_target(torch, device_index)
        # No PTX tensor-core paths on AMD: the portable SIMT kernels run instead.
        self.nvidia = False
        self.hopper = False
        return target
