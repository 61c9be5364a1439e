"""Kernel modules are verified before dlopen (issue 11): a truncated, empty, garbage, renamed,
foreign-machine or modified `.so` in MOJOLLM_KERNEL_DIR is a one-line KernelBuildError -- in a
child process too, where an unchecked truncated module dies of SIGBUS inside dlopen -- and a bad
entry in the build cache is rebuilt. Every case starts from a good copy of the real `nn` module
(the smallest cpu one), which loads: the failures come from the damage, not from the setup."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mojollm.errors import KernelBuildError
from mojollm.kernels import build
from mojollm.kernels.build import HOST, BadModule, build_module, check_elf, copy_module, manifest_path, verify_module

EM_AARCH64 = 183


@pytest.fixture(scope="module")
def built_nn() -> Path:
    return build_module("nn")


@pytest.fixture
def kernel_dir(tmp_path, built_nn, monkeypatch) -> Path:
    """A MOJOLLM_KERNEL_DIR holding a good copy of nn and its manifest (as `mojollm build --out` makes)."""
    copy_module(built_nn, tmp_path / "host")
    monkeypatch.setenv("MOJOLLM_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", {})
    return tmp_path


def _rewrite_manifest(so: Path, **fields) -> None:
    """Make the manifest agree with the current bytes of `so` (plus `fields`), as if built so."""
    manifest = json.loads(manifest_path(so).read_text())
    manifest.update(module=so.stem, size=so.stat().st_size, sha256=hashlib.sha256(so.read_bytes()).hexdigest(),
                    **fields)
    manifest_path(so).write_text(json.dumps(manifest))


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


# Each damage: (what it does to DIR/host, the module then loaded, a fragment of the error).
def truncated(d):
    so = d / "nn.so"
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])


def empty(d):
    (d / "nn.so").write_bytes(b"")


def garbage(d):
    so = d / "nn.so"
    so.write_bytes(os.urandom(so.stat().st_size))  # same size: only the ELF check can tell


def modified(d):
    so = d / "nn.so"
    data = so.read_bytes()
    so.write_bytes(_flip_byte(data, len(data) // 2))


def no_manifest(d):
    manifest_path(d / "nn.so").unlink()


def renamed(d):
    """nn copied (with its manifest) over the name of another module."""
    copy_module(d / "nn.so", d / "tmp")
    os.replace(d / "tmp" / "nn.so", d / "linalg.so")
    os.replace(d / "tmp" / "nn.so.json", d / "linalg.so.json")


def renamed_with_forged_manifest(d):
    """A valid ELF whose manifest agrees with it, but which exports PyInit_nn, not PyInit_linalg:
    this one reaches dlopen, and its ImportError must still come out as one line."""
    renamed(d)
    _rewrite_manifest(d / "linalg.so")


def other_machine(d):
    """A consistent set built on an aarch64 machine (e_machine patched, manifest to match)."""
    so = d / "nn.so"
    data = bytearray(so.read_bytes())
    data[18:20] = EM_AARCH64.to_bytes(2, "little")
    so.write_bytes(bytes(data))
    _rewrite_manifest(so)


DAMAGES = [
    (truncated, "nn", "truncated"),
    (empty, "nn", "truncated or changed"),
    (garbage, "nn", "not an ELF shared library"),
    (modified, "nn", "sha256"),
    (no_manifest, "nn", "no manifest nn.so.json"),
    (renamed, "linalg", "holds module 'nn'"),
    (renamed_with_forged_manifest, "linalg", "does not load"),
    (other_machine, "nn", "built for aarch64"),
]
IDS = [d[0].__name__ for d in DAMAGES]


def _one_line(msg: str) -> str:
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("damage, module, fragment", DAMAGES, ids=IDS)
def test_damaged_prebuilt_module_is_a_one_line_error(kernel_dir, damage, module, fragment):
    damage(kernel_dir / "host")
    with pytest.raises(KernelBuildError) as err:
        build.load_module(module)
    msg = _one_line(str(err.value))
    assert fragment in msg and f"{module}.so" in msg, msg
    if damage is not renamed_with_forged_manifest:  # the others never reach dlopen
        assert "mojollm build --target host --out" in msg, msg


def _load_in_child(kernel_dir: Path, module: str) -> subprocess.CompletedProcess:
    code = f"from mojollm.kernels.build import load_module; load_module({module!r}); print('loaded')"
    env = {**os.environ, "MOJOLLM_KERNEL_DIR": str(kernel_dir)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_good_prebuilt_module_loads_in_a_child(kernel_dir):
    verify_module(kernel_dir / "host" / "nn.so", "nn", HOST)
    res = _load_in_child(kernel_dir, "nn")
    assert res.returncode == 0 and res.stdout.strip() == "loaded", res.stderr


@pytest.mark.parametrize("damage, module, fragment", DAMAGES, ids=IDS)
def test_damaged_prebuilt_module_does_not_kill_a_child(kernel_dir, damage, module, fragment):
    damage(kernel_dir / "host")
    res = _load_in_child(kernel_dir, module)
    assert res.returncode == 1, (res.returncode, res.stderr)  # an exception, not a signal (SIGBUS: -7)
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("mojollm.errors.KernelBuildError: ") and fragment in last, res.stderr


@pytest.mark.parametrize("damage", [truncated, garbage])
def test_cli_reports_a_damaged_prebuilt_module_in_one_line(kernel_dir, default_gguf, damage):
    # The cpu backend loads attention first: damage a copy of nn standing in for it.
    host = kernel_dir / "host"
    os.replace(host / "nn.so", host / "attention.so")
    manifest = json.loads(manifest_path(host / "nn.so").read_text())
    manifest_path(host / "nn.so").unlink()
    manifest_path(host / "attention.so").write_text(json.dumps({**manifest, "module": "attention"}))
    so = host / "attention.so"
    if damage is truncated:
        so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])
    else:
        so.write_bytes(os.urandom(so.stat().st_size))
    env = {**os.environ, "MOJOLLM_KERNEL_DIR": str(kernel_dir)}
    env.pop("MOJOLLM_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "mojollm.cli", "generate", "hi", "--model", str(default_gguf),
                          "--backend", "cpu", "--max-tokens", "1", "-q"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prebuilt kernel module "), res.stderr
    assert "attention.so" in lines[0] and "Traceback" not in res.stderr


@pytest.mark.parametrize("cut", ["half", "last_byte", "header_only"])
def test_elf_check_alone_rejects_a_truncated_module(built_nn, tmp_path, cut):
    """Without a manifest to compare against, the ELF header still tells a truncated file: its
    segments or section table end past the end of the file."""
    data = built_nn.read_bytes()
    short = {"half": data[: len(data) // 2], "last_byte": data[:-1], "header_only": data[:64]}[cut]
    with open(built_nn, "rb") as f:
        check_elf(f, len(data))  # the whole module passes
    path = tmp_path / "nn.so"
    path.write_bytes(short)
    with open(path, "rb") as f, pytest.raises(BadModule, match="truncated"):
        check_elf(f, len(short))


def test_a_module_changed_in_place_is_caught_despite_the_verified_cache(kernel_dir):
    so = kernel_dir / "host" / "nn.so"
    verify_module(so, "nn", HOST)  # now remembered as good
    st = so.stat()
    so.write_bytes(_flip_byte(so.read_bytes(), st.st_size // 2))
    os.utime(so, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    with pytest.raises(BadModule, match="sha256"):
        verify_module(so, "nn", HOST)


# ---------------------------------------------------------------- the build cache heals itself

@pytest.fixture
def cache(tmp_path, monkeypatch, built_nn):
    """An empty build cache whose 'compiler' copies the real nn module (no 60 s compile); returns
    the list of modules it compiled."""
    monkeypatch.setenv("MOJOLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MOJOLLM_KERNEL_DIR", raising=False)
    monkeypatch.setattr(build, "_loaded", {})
    compiled = []

    def fake_compiler(cmd):
        out = Path(cmd[cmd.index("-o") + 1])
        shutil.copyfile(built_nn, out)
        compiled.append(out)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(build, "_run_compiler", fake_compiler)
    return compiled


CACHE_DAMAGES = [truncated, empty, garbage, modified, no_manifest]


@pytest.mark.parametrize("damage", CACHE_DAMAGES, ids=[d.__name__ for d in CACHE_DAMAGES])
def test_damaged_cache_entry_is_rebuilt(cache, built_nn, tmp_path, damage):
    path = build_module("nn")
    assert path.is_relative_to(tmp_path) and len(cache) == 1
    assert build_module("nn") == path and len(cache) == 1  # a good entry is reused
    damage(path.parent)
    said = []
    mod = build.load_module("nn", progress=said.append)
    assert len(cache) == 2, "the damaged entry was not rebuilt"
    assert path.read_bytes() == built_nn.read_bytes() and mod.__file__ == str(path)
    assert "replacing nn.so" in said[0], said


def test_build_out_rebuilds_a_module_from_older_sources(cache, tmp_path):
    out = tmp_path / "set" / "host"
    build_module("nn", out_dir=out)
    _rewrite_manifest(out / "nn.so", key="0123456789abcdef")  # as if built before a source edit
    build_module("nn", out_dir=out)
    assert len(cache) == 2
    verify_module(out / "nn.so", "nn", HOST)


def test_host_modules_are_cached_per_cpu(monkeypatch):
    """A cache that outlives a move to another CPU (an AVX-512 Xeon one day, an AVX2 EPYC the
    next) must not serve modules compiled for the first: the host key follows the CPU's flags,
    while cross-compiled GPU modules do not depend on the host."""
    import mojollm.kernels.build as build

    src = build._source_roots()["cpu"] / "nn.mojo"
    gpu = build.Target("cuda", "sm_90")
    here_host, here_gpu = build._source_key(src, build.HOST, "v"), build._source_key(src, gpu, "v")
    monkeypatch.setattr(build, "_host_cpu", lambda: "model name : AMD EPYC\nflags : fpu sse2 avx2 fma\n")
    assert build._source_key(src, build.HOST, "v") != here_host
    assert build._source_key(src, gpu, "v") == here_gpu
