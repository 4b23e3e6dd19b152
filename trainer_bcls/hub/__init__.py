"""Hub: what a trained model carries to the Hugging Face Hub, its model card.

``model_card.py`` builds ``huggingface_hub.ModelCardData`` / ``EvalResult`` metadata from the trainer's state and
renders the project's ``model_card.md`` Jinja template. May import ``modeling_bcls`` and huggingface_hub; nothing
else of ``trainer_bcls``.
"""

from .model_card import build_model_card, write_model_card

__all__ = ["build_model_card", "write_model_card"]
