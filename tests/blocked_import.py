"""Run Python in a subprocess that cannot import this project (remote-code checks of saved models)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCK_PREAMBLE = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockBCLS(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_bcls", "trainer_bcls"):
                raise ImportError(f"blocked for this test: {name}")

    sys.meta_path.insert(0, BlockBCLS())
    try:
        import modeling_bcls
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_bcls was importable")
    """
)


def run_without_package(script: str, args: list[str], tmp_path: Path, timeout: int = 240) -> str:
    """Runs `BLOCK_PREAMBLE + script` offline from an unrelated folder; returns stdout (asserts success)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PREAMBLE + textwrap.dedent(script), *args],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout
