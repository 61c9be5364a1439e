# Source this on the GPU device machine (python3.12 + torch, no mojo) from the repo root:
#     . bench/device_env.sh
# It makes `import mojollm` work there and points the kernel loader at modules cross-compiled here.
#
# What travels with the call (ignored paths, named in `carry`):
#   .gpu/lib/       the Mojo runtime libraries the kernel modules link against (libKGENCompilerRTShared,
#                   libAsyncRTMojoBindings, libAsyncRTRuntimeGlobals, libMSupportGlobals from
#                   <site-packages>/modular/lib); nothing else of the Mojo install is needed at run time
#   .gpu/kernels/   prebuilt modules: cuda-sm_90/<name>.so
#   (`python bench/build_gpu.py` here fills .gpu/kernels, .gpu/lib and .gpu/ptx)
#   .whl/           wheels of pure-Python dependencies the device image lacks (gguf, platformdirs)
set -e
_repo="$(pwd)"
export LD_LIBRARY_PATH="$_repo/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOJOLLM_KERNEL_DIR="$_repo/.gpu/kernels"
export MOJOLLM_CACHE_DIR="${MOJOLLM_CACHE_DIR:-/tmp/mojollm-cache}"
export PYTHONUNBUFFERED=1
if ls "$_repo"/.whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$_repo"/.whl/*.whl
fi
# mojollm's packages live in three folders (python/, mojo/, backends/<name>/) mapped by pyproject's
# package-dir. Without pip we rebuild that mapping as a tree of symlinks under /tmp/pkgroot.
_root=/tmp/pkgroot/mojollm
rm -rf /tmp/pkgroot && mkdir -p "$_root/backends"
for f in "$_repo"/python/mojollm/*; do
    [ "$(basename "$f")" = backends ] || ln -s "$f" "$_root/"
done
for f in "$_repo"/python/mojollm/backends/*; do ln -s "$f" "$_root/backends/"; done
for b in cuda rocm tpu; do rm -f "$_root/backends/$b"; ln -s "$_repo/backends/$b" "$_root/backends/$b"; done
ln -s "$_repo/mojo" "$_root/mojo_src"
export PYTHONPATH="/tmp/pkgroot:/tmp/site:$_repo${PYTHONPATH:+:$PYTHONPATH}"
set +e
