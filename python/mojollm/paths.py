"""Where mojollm keeps its caches: `MOJOLLM_CACHE_DIR`, else the XDG user cache dir."""

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    env = os.environ.get("MOJOLLM_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("mojollm"))


def model_cache_dir() -> Path:
    return cache_dir() / "models"
