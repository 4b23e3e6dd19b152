"""Renders the project's `model_card.md` template into a saved model's `README.md` (Hub model card)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from string import Template

METRIC_NAMES = {
    "i2t_r1": "Image→text R@1",
    "i2t_r5": "Image→text R@5",
    "i2t_r10": "Image→text R@10",
    "t2i_r1": "Text→image R@1",
    "t2i_r5": "Text→image R@5",
    "t2i_r10": "Text→image R@10",
    "rsum": "rsum",
    "kendall_tau_b": "Kendall τ-b vs relevance",
    "ndcg@10": "nDCG@10 (relevance gain)",
}


def template_path() -> Path:
    """`model_card.md` at the repository root (editable install) or in `<prefix>/share/bcls` (wheel install)."""
    candidates = [
        Path(__file__).resolve().parents[1] / "model_card.md",
        Path(sys.prefix) / "share" / "bcls" / "model_card.md",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model_card.md template not found in {[str(c) for c in candidates]}")


def final_eval_metrics(log_history: list[dict], prefix: str = "eval_") -> dict[str, float]:
    """The metrics of the last evaluation in a Trainer log history, without the prefix."""
    for entry in reversed(log_history or []):
        metrics = {key[len(prefix) :]: value for key, value in entry.items() if key.startswith(prefix)}
        if any(key in metrics for key in METRIC_NAMES):
            return metrics
    return {}


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = [(METRIC_NAMES[key], metrics[key]) for key in METRIC_NAMES if key in metrics]
    if not rows:
        return "No evaluation was run."
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {value:.4g} |" for name, value in rows]
    return "\n".join(lines)


def _model_index(model_name: str, dataset: str, metrics: dict[str, float]) -> str:
    if not any(key in metrics for key in METRIC_NAMES):
        return ""
    lines = [
        "model-index:",
        f"- name: {json.dumps(model_name)}",
        "  results:",
        "  - task:",
        "      type: image-text-retrieval",
        "      name: Image-Text Retrieval",
        "    dataset:",
        f"      name: {json.dumps(dataset)}",
        "      type: image-text-retrieval",
        "    metrics:",
    ]
    for key, name in METRIC_NAMES.items():
        if key in metrics:
            lines += [f"    - type: {key}", f"      value: {float(metrics[key]):.6g}", f"      name: {json.dumps(name)}"]
    return "\n".join(lines)


def _training_log(log_history: list[dict]) -> str:
    rows = [entry for entry in log_history or [] if "loss" in entry or "eval_rsum" in entry]
    if not rows:
        return "No training log."
    lines = ["| step | epoch | loss | triplet | kendall | eval rsum |", "| --- | --- | --- | --- | --- | --- |"]
    for entry in rows[-20:]:
        cells = [entry.get("step"), entry.get("epoch"), entry.get("loss"), entry.get("loss_triplet")]
        cells += [entry.get("loss_kendall"), entry.get("eval_rsum")]
        lines.append("| " + " | ".join("" if c is None else f"{c:.4g}" for c in cells) + " |")
    return "\n".join(lines)


def render_model_card(
    model,
    log_history: list[dict] | None = None,
    model_name: str | None = None,
    dataset: str | None = None,
    repo_id: str | None = None,
) -> str:
    """The model card text for `model` (a [`BCLSModel`]) and its training log."""
    config = model.config
    metrics = final_eval_metrics(log_history or [])
    model_name = model_name or "bcls-retriever"
    dataset = dataset or "not specified"
    loss_keys = config.loss_kwargs()
    loss_rows = [f"| `{key}` | {value} |" for key, value in loss_keys.items()]
    loss_table = "\n".join(["| hyperparameter | value |", "| --- | --- |", *loss_rows])
    fields = {
        "model_name": model_name,
        "repo_id": repo_id or model_name,
        "dataset": dataset,
        "tags": "",
        "model_index": _model_index(model_name, dataset, metrics),
        "vision_model_type": config.vision_config.model_type,
        "text_model_type": config.text_config.model_type,
        "projection_dim": config.projection_dim,
        "metrics_table": _metrics_table(metrics),
        "loss_table": loss_table,
        "training_log": _training_log(log_history or []),
    }
    return Template(template_path().read_text(encoding="utf-8")).substitute(fields)


def write_model_card(output_dir: str | Path, model, **kwargs) -> Path:
    """Renders the card and writes it to `output_dir/README.md`."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(model, **kwargs), encoding="utf-8")
    return path
