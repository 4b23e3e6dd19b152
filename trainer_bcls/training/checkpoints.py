"""Which checkpoint `--resume_from_checkpoint` means, and whether a checkpoint folder was written to the end.

`Trainer._save_checkpoint` writes a `checkpoint-<step>` folder in this order: the model (`model.safetensors`,
config, processor), the optimizer, scheduler and RNG states, and `trainer_state.json` last. A folder without a
readable `trainer_state.json`, or whose weights file is shorter than its header says, was left half-written (the
run was killed while saving) and cannot be resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

LATEST = ("true", "last", "latest")  # what `--resume_from_checkpoint` may say for "the newest checkpoint"
NONE = ("", "false", "none")
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a complete Trainer checkpoint (``None`` when it is)."""
    from modeling_bcls.modeling_bcls import _safetensors_problem

    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json, which the Trainer writes last"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        return f"its trainer_state.json is unreadable ({type(err).__name__}: {err})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not (folder / "pytorch_model.bin").is_file():
        return "it has no model weights file"
    for path in weights:
        problem = _safetensors_problem(str(path))
        if problem is not None:
            return f"{path.name}: {problem}"
    return None


def loss_config_changes(folder: str | os.PathLike, config) -> list[str]:
    """The loss hyperparameters of ``config`` that differ from those saved in checkpoint ``folder``'s config.json,
    as ``"name: checkpoint <old>, now <new>"`` (empty when they agree or the checkpoint has no readable config)."""
    from modeling_bcls.configuration_bcls import LOSS_KWARG_NAMES

    path = Path(folder) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    changes = []
    for name in LOSS_KWARG_NAMES:
        if name == "objective" or name not in saved:
            continue
        old, new = saved[name], getattr(config, name, None)
        if old != new and not (isinstance(old, (int, float)) and isinstance(new, (int, float)) and float(old) == float(new)):
            changes.append(f"{name}: checkpoint {old!r}, now {new!r}")
    return changes


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``output_dir``, newest (largest step) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def resolve_checkpoint(resume: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder to resume from, or ``None`` to start afresh.

    ``resume``: ``None``/``False``/``"false"``/``"none"``/``""`` → ``None``; ``True`` or ``"true"``/``"last"``/
    ``"latest"`` (any case, as the command line gives it) → the newest *complete* checkpoint of ``output_dir``
    (half-written newer ones are skipped with a warning naming them; none at all is an error); a path → that
    folder, which must be complete.
    """
    if resume is None or resume is False or (isinstance(resume, str) and resume.strip().lower() in NONE):
        return None
    if resume is True or (isinstance(resume, str) and resume.strip().lower() in LATEST):
        candidates = list_checkpoints(output_dir)
        if not candidates:
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no {PREFIX_CHECKPOINT_DIR}-* folder in {output_dir}")
        skipped = []
        for folder in candidates:
            problem = checkpoint_problem(folder)
            if problem is None:
                if skipped:
                    logger.warning(
                        "resuming from %s, not from the newer %s: left half-written (a run killed while saving?): %s",
                        folder.name, ", ".join(name for name, _ in skipped), "; ".join(f"{n}: {w}" for n, w in skipped),
                    )
                return str(folder)
            skipped.append((folder.name, problem))
        raise ValueError(
            f"--resume_from_checkpoint {resume}: every checkpoint in {output_dir} is half-written: "
            + "; ".join(f"{name}: {why}" for name, why in skipped)
        )
    folder = Path(resume)
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    problem = checkpoint_problem(folder)
    if problem is not None:
        complete = [p.name for p in list_checkpoints(folder.parent) if checkpoint_problem(p) is None]
        hint = f"; the newest complete one is {complete[0]}" if complete else ""
        raise ValueError(
            f"checkpoint {folder} is incomplete, left half-written (a run killed while saving?): {problem}{hint}"
        )
    return str(folder)


__all__ = ["checkpoint_problem", "list_checkpoints", "loss_config_changes", "resolve_checkpoint"]
