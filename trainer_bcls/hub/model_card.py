"""The Hub model card of a trained BCLS retriever: metadata as `huggingface_hub.ModelCardData` / `EvalResult`, text
rendered from the project's Jinja template `model_card.md` with `ModelCard.from_template`.

Metadata (YAML front matter): `base_model` (the Hub ids of both towers), `datasets`, `license`, `library_name`,
`pipeline_tag: zero-shot-image-classification`, tags, and a `model-index` whose every metric names the split it
was measured on (`dataset.split`). The text adds the towers, the loss hyperparameters, the library versions, the
training log and usage examples.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

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
TASK_TYPE = "image-text-retrieval"
TAGS = ["bcls", "image-text-retrieval", "dual-encoder", "sentence-transformers", "zero-shot-image-classification"]
VERSION_PACKAGES = ("bcls", "transformers", "torch", "datasets", "accelerate", "huggingface_hub", "sentence-transformers")
# A Hub repo id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def template_path() -> Path:
    """`model_card.md` at the repository root (editable install) or in `<prefix>/share/bcls` (wheel install)."""
    candidates = [
        Path(__file__).resolve().parents[2] / "model_card.md",
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


def is_hub_repo_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub repo id rather than a local folder (only those are valid `base_model`s)."""
    return bool(name) and _REPO_ID.match(str(name)) is not None and not Path(str(name)).exists()


def tower_sources(model) -> dict[str, str | None]:
    """Where each tower came from: the `_name_or_path` its sub-config kept (None when built from scratch)."""
    config = model.config
    return {
        kind: (getattr(getattr(config, f"{kind}_config"), "_name_or_path", "") or None) for kind in ("vision", "text")
    }


def library_versions() -> dict[str, str]:
    versions = {}
    for package in VERSION_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def build_card_data(
    model,
    metrics: dict[str, float],
    model_name: str,
    eval_split: str | None = None,
    eval_dataset: str | None = None,
    datasets: str | list[str] | None = None,
    base_models: str | list[str] | None = None,
    license: str | None = "apache-2.0",
) -> ModelCardData:
    """`ModelCardData` of the card: one `EvalResult` per reported metric, each naming `eval_split`.

    `base_models` defaults to the tower sources that are Hub ids; `eval_dataset` (the Hub id or name of the data
    the metrics were measured on) defaults to the first of `datasets`, else "custom".
    """
    if base_models is None:
        base_models = [source for source in tower_sources(model).values() if is_hub_repo_id(source)]
    base_models = list(dict.fromkeys(_as_list(base_models)))  # unique, in order (a CLIP gives both towers)
    datasets = _as_list(datasets)
    eval_dataset = eval_dataset or (datasets[0] if datasets else "custom")
    eval_results = [
        EvalResult(
            task_type=TASK_TYPE,
            task_name="Image-Text Retrieval",
            dataset_type=eval_dataset,
            dataset_name=eval_dataset,
            dataset_split=eval_split or "unspecified",
            metric_type=key,
            metric_name=name,
            metric_value=round(float(metrics[key]), 6),
        )
        for key, name in METRIC_NAMES.items()
        if key in metrics
    ]
    return ModelCardData(
        model_name=model_name,
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        datasets=datasets or None,
        license=license,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=TAGS,
        eval_results=eval_results or None,
    )


def _table(header: tuple[str, str], rows: list[tuple[str, object]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    return "\n".join(lines + [f"| {key} | {value} |" for key, value in rows])


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


BINARY_LOSS_NAMES = {
    "triplet_sn": "a Triplet-SN ranking loss (triplet loss with soft negative mining)",
    "vse": "VSE++'s hardest-negative triplet loss",
    "infonce": "CLIP's InfoNCE loss",
}


def objective_description(config) -> str:
    """One sentence on what the model was trained with, from `binary_loss` and `kendall_weight`."""
    binary = f"{BINARY_LOSS_NAMES[config.binary_loss]} on the binary labels (does caption *j* describe image *i*)"
    if not config.kendall_weight:
        return binary + "."
    return (
        f"{binary} plus {config.kendall_weight:g} × a Kendall ranking loss with sliding-window sampling and hard-sample "
        "mining (SW-HS) on continuous relevance labels (text similarity between captions)."
    )


def build_model_card(
    model,
    log_history: list[dict] | None = None,
    model_name: str | None = None,
    dataset: str | None = None,
    repo_id: str | None = None,
    eval_split: str | None = None,
    eval_dataset: str | None = None,
    datasets: str | list[str] | None = None,
    base_models: str | list[str] | None = None,
    license: str | None = "apache-2.0",
) -> ModelCard:
    """The `ModelCard` of `model` (a [`BCLSModel`]): metadata from [`build_card_data`], text from `model_card.md`.

    `dataset` is a free-text description of the training data; `datasets` are Hub dataset ids (metadata).
    `eval_split` names the split the final evaluation in `log_history` ran on.
    """
    config = model.config
    metrics = final_eval_metrics(log_history or [])
    model_name = model_name or "bcls-retriever"
    card_data = build_card_data(
        model, metrics, model_name, eval_split, eval_dataset, datasets, base_models, license
    )
    sources = tower_sources(model)
    metric_rows = [(name, f"{metrics[key]:.4g}") for key, name in METRIC_NAMES.items() if key in metrics]
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,  # ModelCardData keeps it in the model-index only
        repo_id=repo_id or model_name,
        training_data=dataset or "not specified",
        objective=objective_description(config),
        eval_split=eval_split or "unspecified",
        vision_model_type=config.vision_config.model_type,
        text_model_type=config.text_config.model_type,
        vision_source=sources["vision"] or "trained from scratch",
        text_source=sources["text"] or "trained from scratch",
        projection_dim=config.projection_dim,
        logit_scale=f"{float(getattr(config, 'logit_scale', 1 / 0.07)):.4g}",
        metrics_table=_table(("metric", "value"), metric_rows) if metric_rows else None,
        loss_table=_table(("hyperparameter", "value"), [(f"`{k}`", v) for k, v in config.loss_kwargs().items()]),
        versions_table=_table(("library", "version"), list(library_versions().items())),
        training_log=_training_log(log_history or []),
    )


def render_model_card(model, **kwargs) -> str:
    """The model card text (YAML front matter + markdown); `kwargs` as [`build_model_card`]."""
    return str(build_model_card(model, **kwargs))


def write_model_card(output_dir: str | Path, model, **kwargs) -> Path:
    """Renders the card and writes it to `output_dir/README.md`."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_model_card(model, **kwargs).save(path)
    return path
