"""Where the project keeps configs, caches and results."""

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
# configs/ sits beside the package (editable install, as the README sets up); PETL_BENCH_CONFIGS overrides it.
CONFIG_DIR = Path(os.environ.get("PETL_BENCH_CONFIGS", REPO_DIR / "configs"))


def cache_dir() -> Path:
    """Generated data and synthetic backbones: $PETL_BENCH_CACHE, else ~/.cache/petl-bench."""
    return Path(os.environ.get("PETL_BENCH_CACHE", Path.home() / ".cache" / "petl-bench")).expanduser()
