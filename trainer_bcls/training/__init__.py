"""Training: the ``transformers.Trainer`` subclass and everything a BCLS training step needs.

Holds :class:`BCLSTrainer`, :class:`BCLSTrainingArguments`, the collator (pair-view rows → a batch with binary and
continuous labels), the global-batch loss across processes, GradCache, the lock-boundary feature caches, tower
freezing and the towers' own learning rate, and checkpoint resolution for ``--resume_from_checkpoint``. May import
``modeling_bcls``, ``trainer_bcls.data``, ``.labels``, ``.evaluation`` (metrics at evaluation time), ``.hub`` (the
card) and the shared root modules (``distributed``, ``fingerprint``, ``cache``); nothing from ``retrieval``.
"""

from .collator import BCLSDataCollator
from .tower_freezing import freeze_tower, freeze_towers, is_tower_locked, layer_groups, unfreeze_tower
from .tower_learning_rate import tower_parameter_groups
from .trainer import BCLSTrainer
from .training_args import BCLSTrainingArguments

__all__ = [
    "BCLSDataCollator",
    "BCLSTrainer",
    "BCLSTrainingArguments",
    "freeze_tower",
    "freeze_towers",
    "is_tower_locked",
    "layer_groups",
    "tower_parameter_groups",
    "unfreeze_tower",
]
