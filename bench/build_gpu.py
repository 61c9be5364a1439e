"""Prepare the ignored .gpu/ folder that travels to a GPU machine without a Mojo compiler:

    .gpu/kernels/cuda-sm_90/<module>.so   every module of backends/cuda, cross-compiled here (+ .so.json manifests)
    .gpu/lib/                             the four Mojo runtime libraries the modules link against
    .gpu/ptx/<module>.ptx                 the embedded PTX, for `ptxas -v` resource reports there

Usage (here):  python bench/build_gpu.py [--arch sm_90] [--model-shape llama-3-8b] [--gemm-shape 8192x8192]
               then on the device: . bench/device_env.sh
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mojollm.kernels.build import (Target, _runtime_lib_dir, available_modules, build_module, copy_module,
                                  embedded_ptx)

RUNTIME_LIBS = ("libKGENCompilerRTShared.so", "libAsyncRTMojoBindings.so", "libAsyncRTRuntimeGlobals.so",
                "libMSupportGlobals.so")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--host", action="store_true", help="also prebuild the cpu backend's modules (.gpu/kernels/host)")
    ap.add_argument("--model-shape", action="append", default=[], metavar="PRESET",
                    help="also build gpu_library specialised for a bench/random_llama.py preset (bf16 weights), "
                         "as `mojollm build --model` would for that checkpoint; repeatable")
    ap.add_argument("--gemm-shape", action="append", default=[], metavar="NxK",
                    help="also build gpu_library with these bf16 GEMM shapes only (bench/cuda.py's 8192x8192)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent / ".gpu"
    target = Target("cuda", args.arch)
    kdir, ldir, pdir = root / "kernels" / target.dirname, root / "lib", root / "ptx"
    for d in (kdir, ldir, pdir):
        d.mkdir(parents=True, exist_ok=True)
    for name in available_modules("cuda"):
        so = build_module(name, "cuda", target, progress=print)
        copy_module(so, kdir)  # with its manifest: the loader refuses a prebuilt module without one
        texts = embedded_ptx(so.read_bytes())
        for n, t in enumerate(texts):
            (pdir / f"{name}.{n:03d}.ptx").write_text(t)
        print(f"{kdir / name}.so: {len(texts)} PTX modules")
    for preset in args.model_shape:
        from mojollm.backends.cuda.backend import CudaBackend, library_defines
        from mojollm.models.llama import kernel_specialisation
        from random_llama import preset_checkpoint

        c, weights = preset_checkpoint(preset)
        defines = library_defines(*kernel_specialisation(c, weights, CudaBackend.kv_cache_dtype))
        copy_module(build_module("gpu_library", "cuda", target, progress=print, defines=defines), kdir)
    if args.gemm_shape:
        from mojollm.backends.cuda.backend import library_defines

        shapes = [tuple(int(x) for x in s.split("x")) for s in args.gemm_shape]
        copy_module(build_module("gpu_library", "cuda", target, progress=print,
                                 defines=library_defines(shapes, None)), kdir)
    if args.host:  # the cpu backend as a reference on the GPU machine, which has no Mojo compiler
        hdir = root / "kernels" / "host"
        hdir.mkdir(parents=True, exist_ok=True)
        for name in available_modules("cpu"):
            try:
                copy_module(build_module(name, "cpu", Target("host"), progress=print), hdir)
            except Exception as e:  # report and go on: the GPU modules are what this script is for
                print(f"host module {name} failed to build: {e}")
    lib = _runtime_lib_dir()
    for f in RUNTIME_LIBS:
        shutil.copy2(lib / f, ldir / f)


if __name__ == "__main__":
    main()
