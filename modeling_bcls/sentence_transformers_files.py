# Licensed under the Apache License, Version 2.0.
"""The sentence-transformers description of a saved BCLS folder, so that `SentenceTransformer(folder)` embeds texts
and images with the model:

    modules.json                      0: Transformer (the folder itself), 1: Normalize
    sentence_bert_config.json         text  -> model.get_text_features(...).pooler_output
                                      image -> model.get_image_features(...).pooler_output
    1_Normalize/config.json           e = x / ||x||_2 on "sentence_embedding"
    config_sentence_transformers.json similarity "cosine"

so that `SentenceTransformer(folder).encode(texts_or_images)` equals `model.encode_text` / `model.encode_image`.
The module types use the `sentence_transformers.models.*` names, which every sentence-transformers version
resolves; the per-modality `modality_config` needs a multimodal release (>= 5.4; checked with 6.2).

This file is copied next to saved checkpoints (remote code): stdlib only.
"""

from __future__ import annotations

import json
import os

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Normalize", "type": "sentence_transformers.models.Normalize"},
]
TRANSFORMER_CONFIG = {
    "transformer_task": "feature-extraction",
    "modality_config": {
        "text": {"method": "get_text_features", "method_output_name": "pooler_output"},
        "image": {"method": "get_image_features", "method_output_name": "pooler_output"},
    },
    "module_output_name": "sentence_embedding",
}
NORMALIZE_CONFIG = {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"}


def _write_json(path: str, content: dict | list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def write_sentence_transformers_files(save_directory: str | os.PathLike, versions: dict[str, str]) -> list[str]:
    """Writes the four files above into `save_directory` (next to `config.json`); returns their paths.

    `versions` (e.g. `{"transformers": "5.2.0", "pytorch": "2.6.0"}`) goes to `config_sentence_transformers.json`.
    The folder also needs the processor (`BCLSProcessor.save_pretrained`), which sentence-transformers loads with
    `AutoProcessor`.
    """
    save_directory = os.fspath(save_directory)
    os.makedirs(os.path.join(save_directory, "1_Normalize"), exist_ok=True)
    files = {
        "modules.json": MODULES,
        "sentence_bert_config.json": TRANSFORMER_CONFIG,
        os.path.join("1_Normalize", "config.json"): NORMALIZE_CONFIG,
        "config_sentence_transformers.json": {
            "__version__": dict(versions),
            "model_type": "SentenceTransformer",
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    }
    paths = []
    for name, content in files.items():
        path = os.path.join(save_directory, name)
        _write_json(path, content)
        paths.append(path)
    return paths
