"""Compile Mojo kernel sources into Python extension modules, cache them, and load them.

A *kernel module* is one `.mojo` file that exports `PyInit_<stem>` (PythonModuleBuilder). It is
built with `mojo build --emit shared-lib` for a *target*:

    host            the CPU this process runs on (default)
    cuda:sm_90      NVIDIA, cross-compiled with --target-accelerator (works without the GPU)
    rocm:gfx942     AMD, likewise

Built modules are cached under `<cache>/kernels/<target>/<key>/<stem>.so`, where the key hashes
every source the module can import, the target and the compiler version, so an edit or a compiler
upgrade rebuilds and nothing stale is ever loaded. `MOJOLLM_KERNEL_DIR` points at a directory of
prebuilt modules (`mojollm build --out DIR`), used as-is: the way to carry GPU modules built on one
machine to another that has no compiler.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mojollm.errors import KernelBuildError
from mojollm.paths import cache_dir



def _source_roots() -> dict[str, Path]:
    import mojollm.mojo_src as mojo_src

    roots = {"cpu": Path(mojo_src.__file__).resolve().parent}
    try:
        import mojollm.backends.cuda as cuda_pkg

        # AMD builds compile the very same GPU kernel sources as NVIDIA ones: Mojo targets both
        # from one source. backends/rocm holds only the backend's Python side.
        roots["cuda"] = roots["rocm"] = Path(cuda_pkg.__file__).resolve().parent
    except ImportError:  # pragma: no cover - a broken install
        pass
    return roots


@dataclass(frozen=True)
class Target:
    """Where a kernel module will run: `host`, `cuda:<sm_xx>` or `rocm:<gfxNNN>`."""

    kind: str  # "host" | "cuda" | "rocm"
    arch: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Target":
        text = text.strip()
        if text == "host":
            return cls("host")
        kind, _, arch = text.partition(":")
        if kind == "cuda" and arch.startswith("sm_") and arch[3:].isdigit():
            return cls("cuda", arch)
        if kind == "rocm" and arch.startswith("gfx") and len(arch) > 3:
            return cls("rocm", arch)
        raise ValueError(
            f"unknown kernel target {text!r}: use host, cuda:sm_XX (e.g. cuda:sm_90) or rocm:gfxNNN (e.g. rocm:gfx942)"
        )

    def __str__(self) -> str:
        return self.kind if self.arch is None else f"{self.kind}:{self.arch}"

    @property
    def dirname(self) -> str:
        return str(self).replace(":", "-")

    def compiler_flags(self) -> list[str]:
        return [] if self.arch is None else [f"--target-accelerator={self.arch}"]


HOST = Target("host")


def find_mojo() -> Path:
    """The `mojo` compiler: beside this Python (the pip package), else on PATH."""
    candidates = [Path(sys.executable).parent / "mojo", Path(sys.prefix) / "bin" / "mojo"]
    found = shutil.which("mojo")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise KernelBuildError(
        "the Mojo compiler was not found: install it with `pip install mojo==1.2.0 max==26.7.0` "
        "(or point MOJOLLM_KERNEL_DIR at prebuilt kernels)"
    )


_version_cache: dict[Path, str] = {}


def compiler_version(mojo: Path) -> str:
    if mojo not in _version_cache:
        try:
            out = subprocess.run([str(mojo), "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KernelBuildError(f"the Mojo compiler at {mojo} does not run ({e}): reinstall `mojo==1.2.0`") from e
        if out.returncode != 0:
            raise KernelBuildError(f"the Mojo compiler at {mojo} is broken: {out.stderr.strip()[:200]}")
        _version_cache[mojo] = out.stdout.strip()
    return _version_cache[mojo]


def module_source(name: str, backend: str = "cpu") -> Path:
    root = _source_roots().get(backend)
    if root is None:
        raise KernelBuildError(f"no kernel sources for backend {backend!r}")
    path = root / f"{name}.mojo"
    if not path.is_file():
        raise KernelBuildError(f"kernel module {name!r} not found under {root}")
    return path


def _include_dirs() -> list[Path]:
    # Every kernel may import the shared helpers of mojo/ (e.g. `from common import ...`).
    return [_source_roots()["cpu"]]


def _source_key(src: Path, target: Target, version: str) -> str:
    h = hashlib.sha256()
    h.update(version.encode())
    h.update(str(target).encode())
    # Hash every .mojo file the module could import: its own folder and the include dirs.
    files = sorted({*src.parent.glob("*.mojo"), *(p for d in _include_dirs() for p in d.glob("*.mojo"))})
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


_build_lock = threading.Lock()


def build_module(name: str, backend: str = "cpu", target: Target = HOST, out_dir: Path | None = None,
                 progress=None) -> Path:
    """Build (or find in the cache) kernel module `name` for `target`; returns the .so path."""
    src = module_source(name, backend)
    mojo = find_mojo()
    version = compiler_version(mojo)
    if out_dir is None:
        out_dir = cache_dir() / "kernels" / target.dirname / _source_key(src, target, version)
    out = out_dir / f"{name}.so"
    if out.is_file():
        return out
    with _build_lock:
        if out.is_file():
            return out
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{name}.{os.getpid()}.so"
        cmd = [str(mojo), "build", "--emit", "shared-lib", *target.compiler_flags()]
        for inc in _include_dirs():
            cmd += ["-I", str(inc)]
        cmd += [str(src), "-o", str(tmp)]
        if progress is not None:
            progress(f"compiling {backend}/{name}.mojo for {target}")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not tmp.is_file():
            errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
            first = errors[0] if errors else res.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise KernelBuildError(f"building {src.name} for {target} failed: {first if isinstance(first, str) else first[0]}",
                                   details=res.stderr)
        os.replace(tmp, out)
    return out


def _runtime_lib_dir() -> Path | None:
    try:
        import modular  # noqa: F401  (the pip `max`/`mojo` packages install `modular/lib`)
    except ImportError:
        return None
    p = Path(modular.__path__[0]) / "lib"
    return p if p.is_dir() else None


_loaded: dict[tuple[str, str, str], ModuleType] = {}

# Loading a Mojo extension sets these in the C environment (not in os.environ): PYTHONPATH=":" and
# PYTHONEXECUTABLE=<the first python3 on PATH>. Every child process would inherit them, and a child
# Python then takes another interpreter's site-packages and the cwd as its import path (in the repo
# root, mojo/ then shadows the compiler's own `mojo` package). Put back the Python-side values.
_MOJO_SET_VARS = ("PYTHONPATH", "PYTHONEXECUTABLE")


def _restore_python_env() -> None:
    for key in _MOJO_SET_VARS:
        if key in os.environ:
            os.putenv(key, os.environ[key])
        else:
            os.unsetenv(key)


def load_module(name: str, backend: str = "cpu", target: Target = HOST, progress=None) -> ModuleType:
    """Import kernel module `name`, building it first unless MOJOLLM_KERNEL_DIR supplies it."""
    key = (name, backend, str(target))
    if key in _loaded:
        return _loaded[key]
    prebuilt = os.environ.get("MOJOLLM_KERNEL_DIR")
    path: Path | None = None
    if prebuilt:
        cand = Path(prebuilt) / target.dirname / f"{name}.so"
        if cand.is_file():
            path = cand
    if path is None:
        path = build_module(name, backend, target, progress=progress)
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    try:
        loader.exec_module(mod)
    except ImportError as e:
        raise KernelBuildError(f"kernel module {path} does not load: {e}") from e
    finally:
        _restore_python_env()
    _loaded[key] = mod
    return mod


def kernel_loader(name: str, backend: str = "cpu"):
    """A function returning kernel module `name`, built and loaded on its first call. Wrappers call
    it on every op: after the first call it is one closure lookup, cheaper than load_module's
    cache (~1 us, and a decode step makes hundreds of kernel calls)."""
    module = None

    def get() -> ModuleType:
        nonlocal module
        if module is None:
            module = load_module(name, backend)
        return module

    return get


def available_modules(backend: str = "cpu") -> list[str]:
    root = _source_roots().get(backend)
    if root is None:
        return []
    return sorted(p.stem for p in root.glob("*.mojo") if "PyInit_" in p.read_text())


def embedded_ptx(so_bytes: bytes) -> list[str]:
    """The NUL-terminated PTX texts a module built for an NVIDIA target carries (its device code)."""
    mods, i = [], 0
    while (j := so_bytes.find(b".version", i)) >= 0:
        start = so_bytes.rfind(b"\x00", 0, j) + 1
        end = so_bytes.find(b"\x00", j)
        text = so_bytes[start:end].decode("latin-1")
        if "\n.target " in text:  # skip ELF strings such as ".gnu.version"
            mods.append(text)
        i = end
    return mods
