"""Shared locations for the benchmark preparation scripts.

Everything the benchmarks need (converted anchor models, datasets, held-out text) lives under one
cache directory, chosen in this order: ``--cache-dir`` on the command line, the
``STITCHED_LLAMA_CACHE`` environment variable, then ``~/.cache/stitched_llama``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV_VAR = "STITCHED_LLAMA_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/stitched_llama"

# Folder names (relative to the cache dir) of the converted Hugging Face models.
QWEN_SMALL_DIR = "qwen2.5-coder-0.5b-instruct"
QWEN_LARGE_DIR = "qwen2.5-coder-1.5b-instruct"
SMOLLM_DIR = "smollm2-135m-instruct"
GGUF_DIR = "gguf"

# Dataset locations (relative to the cache dir).
WORDNET_DIR = "wordnet"
TEXT_DIR = "text"

# Written last inside every finished output folder; its presence is what makes a step skippable.
COMPLETE_MARKER = ".complete.json"


def default_cache_dir() -> Path:
    """The cache dir used when ``--cache-dir`` is not given."""
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()


def resolve_cache_dir(arg: str | os.PathLike[str] | None) -> Path:
    """Expand and create the cache dir (``arg`` wins over the environment / default)."""
    path = Path(arg).expanduser() if arg else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def make_tmp_dir(cache_dir: Path, prefix: str) -> Path:
    """A scratch dir on the same filesystem as the cache, so the final ``os.replace`` is atomic."""
    root = cache_dir / ".tmp"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def atomic_publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``, replacing an incomplete leftover."""
    # mkdtemp creates 0700 dirs (and some writers 0600 files); publish with normal permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)
    for path in tmp_dir.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_dir, final_dir)


def cleanup_tmp_root(cache_dir: Path) -> None:
    """Remove the scratch root if nothing is left in it (other runs may still be using it)."""
    try:
        (cache_dir / ".tmp").rmdir()
    except OSError:
        pass
