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

Every module has a manifest beside it, `<stem>.so.json`, written at build time: module name,
target, source key, compiler version, size and sha256. A module is checked against it and its ELF
header before it is loaded, because dlopen of a truncated file dies of SIGBUS and a garbage file
gives an unhelpful ImportError. A bad or manifest-less module in the cache is rebuilt; one in
MOJOLLM_KERNEL_DIR is a one-line KernelBuildError (nothing to rebuild it with there).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import threading
from contextlib import contextmanager
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


def _host_cpu() -> str:
    """The host CPU's model and instruction-set flags. Host modules are compiled for the CPU they
    are built on (AVX-512/VNNI paths chosen at compile time), so a cache that outlives a move to
    another CPU (this VM kind is an AVX-512 Xeon one day, an AVX2 EPYC the next) must not serve
    them there: they would die of an illegal instruction."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(dict.fromkeys(lines))  # one copy of each distinct line (every core repeats them)
    except OSError:
        import platform

        return f"{platform.machine()} {platform.processor()}"


def specialisation_tag(defines: dict[str, int] | None) -> str:
    """The file-name tag of a module built with compile-time `defines` ('' for none)."""
    if not defines:
        return ""
    text = ",".join(f"{k}={int(v)}" for k, v in sorted(defines.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def module_file(name: str, defines: dict[str, int] | None = None) -> str:
    tag = specialisation_tag(defines)
    return f"{name}-{tag}.so" if tag else f"{name}.so"


_IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.M)


def _local_sources(src: Path) -> set[Path]:
    """`src` and every .mojo file of its folder or the include dirs that it imports, transitively:
    what its build depends on besides the compiler (a module of Modular's library does not
    change without the compiler's version)."""
    dirs = [src.parent, *_include_dirs()]
    seen, todo = set(), [src]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in _IMPORT.findall(f.read_text()):
            todo += [d / f"{name}.mojo" for d in dirs if (d / f"{name}.mojo").is_file()]
    return seen


def _source_key(src: Path, target: Target, version: str, defines: dict[str, int] | None = None) -> str:
    h = hashlib.sha256()
    h.update(version.encode())
    h.update(str(target).encode())
    h.update(specialisation_tag(defines).encode())
    if target.kind == "host":
        h.update(_host_cpu().encode())
    for f in sorted(_local_sources(src)):
        h.update(f.name.encode())
        # Comment lines do not change what is built: editing them costs no rebuild (a GPU module
        # specialised for a model takes minutes).
        code = [ln for ln in f.read_bytes().splitlines() if not ln.lstrip().startswith(b"#")]
        h.update(b"\n".join(code))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- checking a module before dlopen

class BadModule(Exception):
    """Why a module file must not be loaded; the message completes "kernel module PATH ..."."""


def manifest_path(so: Path) -> Path:
    return so.with_name(so.name + ".json")


# e_machine of the CPUs Mojo runs on, keyed by platform.machine().
_ELF_MACHINE = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}
_ELF_MACHINE_NAME = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 190: "cuda", 224: "amdgpu"}
_HOST_ELF_CLASS = 2 if sys.maxsize > 2**32 else 1
_HOST_ELF_DATA = 1 if sys.byteorder == "little" else 2
_ET_DYN = 3


def check_elf(f, size: int) -> None:
    """Raise BadModule unless open file `f` (of `size` bytes) is a shared library for this host
    whose header tables and segments all lie inside the file: what dlopen maps must exist, since
    touching a mapped page past the end of a truncated file is a SIGBUS, not an error."""
    f.seek(0)
    head = f.read(64)
    if size == 0:
        raise BadModule("is an empty file")
    if head[:4] != b"\x7fELF":
        raise BadModule("is not an ELF shared library")
    elf_class, data = head[4], head[5]
    if elf_class != _HOST_ELF_CLASS:
        raise BadModule(f"is a {32 * elf_class}-bit ELF file, this Python is {32 * _HOST_ELF_CLASS}-bit")
    if data != _HOST_ELF_DATA:
        raise BadModule("has the wrong byte order for this machine")
    endian = "<" if data == 1 else ">"
    header = endian + ("HHIQQQIHHHHHH" if elf_class == 2 else "HHIIIIIHHHHHH")
    if len(head) < 16 + struct.calcsize(header):
        raise BadModule(f"is truncated ({size} bytes, shorter than an ELF header)")
    (e_type, machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = \
        struct.unpack_from(header, head, 16)
    if e_type != _ET_DYN:
        raise BadModule("is an ELF file but not a shared library")
    host = platform.machine().lower()
    if _ELF_MACHINE.get(host, machine) != machine:
        raise BadModule(f"is built for {_ELF_MACHINE_NAME.get(machine, f'ELF machine {machine}')}, "
                        f"this machine is {host}")
    phdr = endian + ("IIQQQQQQ" if elf_class == 2 else "IIIIIIII")
    if phnum == 0 or phentsize < struct.calcsize(phdr):
        raise BadModule("is a malformed ELF file (no program headers)")
    if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
        raise BadModule(f"is truncated ({size} bytes; its ELF header points past the end)")
    f.seek(phoff)
    table = f.read(phnum * phentsize)
    for i in range(phnum):
        fields = struct.unpack_from(phdr, table, i * phentsize)
        offset, filesz = (fields[2], fields[5]) if elf_class == 2 else (fields[1], fields[4])
        if offset + filesz > size:
            raise BadModule(f"is truncated ({size} bytes; a segment ends at byte {offset + filesz})")


# Modules found good in this process, by (path, identity of the file and its manifest, what was
# asked): hashing takes tens of ms per module, once is enough.
_verified: set[tuple] = set()


def _file_id(st: os.stat_result) -> tuple:
    # ctime too: an edit can put the mtime back, but nothing can set the ctime.
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def verify_module(so: Path, name: str, target: Target, key: str | None = None,
                  defines: dict[str, int] | None = None) -> None:
    """Raise BadModule unless `so` is module `name` for `target` (and source key `key`, if given),
    specialised for `defines`, exactly as built: by its manifest (size, then sha256) and its ELF header."""
    man_file = manifest_path(so)
    try:
        with open(so, "rb") as f:
            st = os.fstat(f.fileno())
            try:
                man_st = man_file.stat()
                manifest = json.loads(man_file.read_bytes())
            except FileNotFoundError:
                raise BadModule(f"has no manifest {man_file.name} (written when it is built)") from None
            except (OSError, ValueError):
                raise BadModule(f"has an unreadable manifest {man_file.name}") from None
            want = {k: int(v) for k, v in (defines or {}).items()}
            stamp = (str(so), _file_id(st), _file_id(man_st), name, str(target), key, tuple(sorted(want.items())))
            if stamp in _verified:
                return
            if not isinstance(manifest, dict):
                raise BadModule(f"has an unreadable manifest {man_file.name}")
            if manifest.get("module") != name:
                raise BadModule(f"holds module {manifest.get('module')!r} by its manifest, not {name!r}")
            if manifest.get("target") != str(target):
                raise BadModule(f"is built for target {manifest.get('target')!r} by its manifest, not {target}")
            if manifest.get("defines", {}) != want:
                raise BadModule(f"is specialised for {manifest.get('defines', {})} by its manifest, not {want}")
            if key is not None and manifest.get("key") != key:
                raise BadModule("is built from other sources or by another compiler")
            if manifest.get("size") != st.st_size:
                raise BadModule(f"is truncated or changed ({st.st_size} bytes, its manifest says {manifest.get('size')})")
            check_elf(f, st.st_size)
            f.seek(0)
            if hashlib.file_digest(f, "sha256").hexdigest() != manifest.get("sha256"):
                raise BadModule("has changed since it was built (its sha256 differs from its manifest's)")
    except FileNotFoundError:
        raise BadModule("is missing") from None
    except OSError as e:
        raise BadModule(f"cannot be read ({e.strerror})") from None
    _verified.add(stamp)


def _write_manifest(so: Path, name: str, target: Target, key: str, version: str,
                    defines: dict[str, int] | None = None) -> None:
    with open(so, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    manifest = {"module": name, "target": str(target), "key": key, "compiler": version,
                "size": so.stat().st_size, "sha256": digest}
    if defines:
        manifest["defines"] = {k: int(v) for k, v in sorted(defines.items())}
    path = manifest_path(so)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def copy_module(so: Path, dest_dir: Path) -> Path:
    """Copy a built module and its manifest into `dest_dir` (e.g. DIR/<target> of a MOJOLLM_KERNEL_DIR)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / so.name
    shutil.copy2(so, dest)
    shutil.copy2(manifest_path(so), manifest_path(dest))
    return dest


# ---------------------------------------------------------------- building

_build_lock = threading.Lock()


@contextmanager
def _locked_dir(path: Path):
    """Hold an exclusive lock on directory `path` against other processes building into it, so a
    module and its manifest are always written as a pair."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _run_compiler(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def build_module(name: str, backend: str = "cpu", target: Target = HOST, out_dir: Path | None = None,
                 progress=None, defines: dict[str, int] | None = None) -> Path:
    """Build (or find in the cache) kernel module `name` for `target`; returns the .so path.
    `defines` (-D NAME=VALUE) specialise it, e.g. for one model's weight shapes: each set is its
    own file, `name-<tag>.so`. An existing module that fails verification (corrupted, from older
    sources, or without a manifest) is rebuilt."""
    src = module_source(name, backend)
    mojo = find_mojo()
    version = compiler_version(mojo)
    key = _source_key(src, target, version, defines)
    if out_dir is None:
        out_dir = cache_dir() / "kernels" / target.dirname / key
    out = out_dir / module_file(name, defines)
    try:
        verify_module(out, name, target, key, defines)
        return out
    except BadModule:
        pass
    out_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock, _locked_dir(out_dir):
        try:  # again under the lock: another process may have just built it
            verify_module(out, name, target, key, defines)
            return out
        except BadModule as e:
            problem = e if out.exists() else None
        if progress is not None:
            why = f", replacing {out.name}, which {problem}" if problem else ""
            spec = f" specialised for {len(defines)} shape values" if defines else ""
            progress(f"compiling {backend}/{name}.mojo for {target}{spec}{why}")
        tmp = out_dir / f".{name}.{os.getpid()}.so"
        cmd = [str(mojo), "build", "--emit", "shared-lib", *target.compiler_flags()]
        for k, v in sorted((defines or {}).items()):
            cmd += ["-D", f"{k}={int(v)}"]
        for inc in _include_dirs():
            cmd += ["-I", str(inc)]
        cmd += [str(src), "-o", str(tmp)]
        try:
            res = _run_compiler(cmd)
            if res.returncode != 0 or not tmp.is_file():
                errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
                first = errors[0] if errors else (res.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise KernelBuildError(f"building {src.name} for {target} failed: {first}", details=res.stderr)
            os.replace(tmp, out)
            _write_manifest(out, name, target, key, version, defines)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def _runtime_lib_dir() -> Path | None:
    try:
        import modular  # noqa: F401  (the pip `max`/`mojo` packages install `modular/lib`)
    except ImportError:
        return None
    p = Path(modular.__path__[0]) / "lib"
    return p if p.is_dir() else None


_loaded: dict[tuple[str, str, str, str], ModuleType] = {}

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


def _prebuilt_module(name: str, target: Target, defines: dict[str, int] | None = None) -> Path | None:
    """Module `name` (specialised for `defines`) from MOJOLLM_KERNEL_DIR, verified; None if that has none."""
    prebuilt = os.environ.get("MOJOLLM_KERNEL_DIR")
    if not prebuilt:
        return None
    path = Path(prebuilt) / target.dirname / module_file(name, defines)
    if not path.is_file():
        return None
    try:
        verify_module(path, name, target, defines=defines)
    except BadModule as e:
        raise KernelBuildError(f"prebuilt kernel module {path} {e}: rebuild it with "
                               f"`mojollm build --target {target} --out {prebuilt}` (MOJOLLM_KERNEL_DIR)") from None
    return path


def load_module(name: str, backend: str = "cpu", target: Target = HOST, progress=None,
                defines: dict[str, int] | None = None) -> ModuleType:
    """Import kernel module `name` (specialised for `defines`), building it first unless
    MOJOLLM_KERNEL_DIR supplies it."""
    key = (name, backend, str(target), specialisation_tag(defines))
    if key in _loaded:
        return _loaded[key]
    path = (_prebuilt_module(name, target, defines)
            or build_module(name, backend, target, progress=progress, defines=defines))
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    try:
        mod = importlib.util.module_from_spec(spec)  # the dlopen
        loader.exec_module(mod)
    except (ImportError, OSError) as e:
        reason = " ".join(str(e).split())
        if "cannot open shared object file" in reason:
            hint = "install `mojo==1.2.0`, or put the Mojo runtime libraries on LD_LIBRARY_PATH"
        elif (prebuilt := os.environ.get("MOJOLLM_KERNEL_DIR")) and path.is_relative_to(prebuilt):
            hint = f"rebuild it with `mojollm build --target {target} --out {prebuilt}` (MOJOLLM_KERNEL_DIR)"
        else:
            hint = f"delete {path.parent} to rebuild it"
        raise KernelBuildError(f"kernel module {path} does not load ({reason}): {hint}") from e
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


_NVIDIA_ONLY = "# mojollm: nvidia-only"  # a module's marker line: not built for the rocm backend


def available_modules(backend: str = "cpu") -> list[str]:
    root = _source_roots().get(backend)
    if root is None:
        return []
    texts = {p.stem: p.read_text() for p in root.glob("*.mojo")}
    return sorted(name for name, text in texts.items()
                  if "PyInit_" in text and not (backend == "rocm" and _NVIDIA_ONLY in text))


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
