"""Prepare the ignored .gpu/ folder that travels to a GPU machine without a Mojo compiler:

    .gpu/kernels/cuda-sm_90/<module>.so   every module of backends/cuda, cross-compiled here (+ .so.json manifests)
    .gpu/lib/                             the four Mojo runtime libraries the modules link against
    .gpu/ptx/<module>.ptx                 the embedded PTX, for `ptxas -v` resource reports there

Usage (here):  python bench/build_gpu.py [--arch sm_90]   then on the device: . bench/device_env.sh
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
