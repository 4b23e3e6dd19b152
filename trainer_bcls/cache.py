"""On-disk cache location of BCLS (synthetic data, caption embeddings).

Root: ``$BCLS_CACHE`` if set, else ``$XDG_CACHE_HOME/bcls``, else ``~/.cache/bcls``.
"""

from __future__ import annotations

import os
from pathlib import Path


def bcls_cache_dir(*parts: str) -> Path:
    """Return ``<cache root>/<parts...>`` (not created)."""
    root = os.environ.get("BCLS_CACHE")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "bcls"
    return base.joinpath(*parts).expanduser()
