"""Where the default model lives (introduced in chapter 01).

The course runs on SmolLM2-135M-Instruct. ``tools/prepare_model.py`` converts it once into a normal
Hugging Face folder under the cache folder; every chapter, test, notebook and benchmark then asks
this module where that folder is. Set ``MINISGL_CACHE`` to move the cache (default
``~/.cache/minisgl``).
"""

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("MINISGL_CACHE", Path.home() / ".cache" / "minisgl")).expanduser()


def default_model_path() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def require_default_model() -> Path:
    """The default model's folder, or an error that says how to make it."""
    path = default_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the default model is not prepared at {path}; run `make setup` "
            "(or `python tools/prepare_model.py`) first"
        )
    return path
