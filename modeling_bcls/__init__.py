# Licensed under the Apache License, Version 2.0.
"""BCLS: image-text retrieval dual encoder with binary + continuous label supervision.

Importing this package registers the "bcls" model type with `AutoConfig`, `AutoModel`,
`AutoModelForZeroShotImageClassification` (so `pipeline("zero-shot-image-classification", model=folder)` works) and
`AutoProcessor`, and marks the classes for `register_for_auto_class`, so that `save_pretrained` writes an `auto_map`
and copies the code files (`configuration_bcls.py`, `modeling_bcls.py`, `sentence_transformers_files.py`,
`processing_bcls.py` and the `losses/` folder, flattened: `losses.py` + `loss_*.py` + kernels) next to the weights:
the saved folder then loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)` without this package.

Layout (transformers' model-folder convention): `configuration_bcls.py`, `modeling_bcls.py`, `processing_bcls.py`,
`sentence_transformers_files.py`, and `losses/` (one loss per file, the Kendall kernels). Nothing here imports
`trainer_bcls`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

from .configuration_bcls import BCLSConfig
from .losses import (
    bcls_loss,
    infonce_loss,
    kendall_ranking_loss,
    relevance_sort_order,
    triplet_sn_loss,
    vse_triplet_loss,
)
from .modeling_bcls import BCLSModel, BCLSOutput, BCLSPreTrainedModel
from .processing_bcls import BCLSProcessor


AutoConfig.register(BCLSConfig.model_type, BCLSConfig, exist_ok=True)
AutoModel.register(BCLSConfig, BCLSModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(BCLSConfig, BCLSModel, exist_ok=True)
AutoProcessor.register(BCLSConfig, BCLSProcessor, exist_ok=True)

BCLSConfig.register_for_auto_class("AutoConfig")
BCLSModel.register_for_auto_class("AutoModel")
BCLSProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "BCLSConfig",
    "BCLSModel",
    "BCLSOutput",
    "BCLSPreTrainedModel",
    "BCLSProcessor",
    "bcls_loss",
    "infonce_loss",
    "kendall_ranking_loss",
    "relevance_sort_order",
    "triplet_sn_loss",
    "vse_triplet_loss",
]
