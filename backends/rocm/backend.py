"""The rocm backend: the cuda backend's Mojo GPU kernels built for AMD Instinct / Radeon.

Mojo compiles one kernel source for NVIDIA and AMD, so this backend shares every kernel and all
of the Python side with backends/cuda; it differs only where the hardware does:

* the target is `rocm:<gfx arch>` (torch reports it as gcnArchName, e.g. "gfx942:sramecc+:xnack-");
* the NVIDIA-only fast paths (Modular's GEMM and flash attention through gpu_library, whose 26.7
  AMD GEMM does not build here, and our mma.sync attention tiles) are switched off, so GEMM and
  prefill attention take the portable SIMT kernels (wavefront-size agnostic: they use the
  portable block reductions of gpu_common);
* torch built for HIP exposes the device through the same `torch.cuda` API and memory pointers,
  so tensors, streams and CUDA-graph-style capture work through the same code.
"""

from __future__ import annotations

from mojollm.backends.cuda.backend import CudaBackend

# Architectures `mojollm build` and CI cross-compile for: MI300X, MI250X, Radeon RX 7900.
ROCM_ARCHS = ("gfx942", "gfx90a", "gfx1100")


def _rocm_target(torch, index: int):
    from mojollm.kernels.build import Target

    arch = torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
    return Target("rocm", arch)


class RocmBackend(CudaBackend):
    name = "rocm"

    _device_nodes = "/dev/kfd"
    _absent = "no ROCm device"
    _torch_hint = "install torch built for ROCm"
    _needs_hip = True

    @staticmethod
    def _device_target(torch, index: int):
        return _rocm_target(torch, index)
