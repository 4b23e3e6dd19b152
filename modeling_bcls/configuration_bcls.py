# Licensed under the Apache License, Version 2.0.
"""BCLS model configuration.

BCLS (Binary and Continuous Label Supervision) is an image-text retrieval dual encoder: any AutoModel vision tower and
any encoder-only AutoModel text tower, each followed by a projection (bias-free linear, or an MLP) to `projection_dim`, scored by
cosine similarity. The loss hyperparameters live in the config so that a saved model knows how it was trained.

This file is copied next to saved checkpoints (remote code): it imports only transformers / huggingface_hub / stdlib.
"""

import math
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


PoolingMode = Literal["auto", "pooler", "mean", "cls"]

# Keyword arguments of `losses.bcls_loss` that the config owns (the per-batch tensors are not config).
LOSS_KWARG_NAMES = (
    "binary_loss",
    "objective",  # None after construction; a legacy name set later is still resolved by `bcls_loss`
    "margin",
    "soft_negative_temperature",
    "kendall_weight",
    "kendall_window_size",
    "kendall_label_gap",
    "kendall_surrogate",
    "kendall_temperature",
    "kendall_hard_mining",
    "infonce_temperature",
    "false_negative_threshold",
    "false_negative_ramp",
)

# Float knobs and their ranges: name -> (lowest value, whether the lowest value itself is allowed).
FLOAT_KNOB_RANGES = {
    "logit_scale": (0.0, False),
    "soft_negative_temperature": (0.0, False),
    "kendall_temperature": (0.0, False),
    "infonce_temperature": (0.0, False),
    "margin": (0.0, True),
    "kendall_weight": (0.0, True),
    "kendall_label_gap": (0.0, True),
    "false_negative_ramp": (0.0, True),
}


def float_knob_problem(name: str, value: Any) -> str | None:
    """Why `value` is not valid for the float knob `name` (finite and in range), or `None` when it is."""
    low, inclusive = FLOAT_KNOB_RANGES[name]
    bound = f">= {low:g}" if inclusive else f"> {low:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number {bound}, got {value!r}"
    if not math.isfinite(value):
        return f"{name} must be a finite number {bound}, got {value}"  # NaN passes `nan < 0`, so test finiteness first
    if value < low or (value == low and not inclusive):
        return f"{name} must be {bound}, got {value}"
    return None


@strict
class BCLSConfig(PreTrainedConfig):
    r"""
    Configuration of a [`BCLSModel`].

    Args:
        vision_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the vision tower; any `AutoConfig` model type (default: a ViT config).
        text_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the text tower; any encoder-only `AutoConfig` model type (default: a BERT config).
        projection_dim (`int`, *optional*, defaults to 256):
            Width D of the shared embedding space (the output width of both projections).
        projection_hidden_dim (`int`, *optional*):
            `None` (default): the projections are bias-free linear maps, as in CLIP. An integer H: each projection is
            an MLP `Linear(hidden, H) -> GELU -> Linear(H, D)` (open_clip's `proj_type="mlp"`), an
            option for locked (frozen) towers; on Flickr8k with both towers locked the linear head was better (VSE++
            val rsum 180.5 vs 168.2 with H = 1024, `benchmarks/studies/RESULTS.md`), so linear stays the default.
        text_pooling (`str`, *optional*, defaults to `"auto"`):
            How a caption becomes one vector before projection. `"pooler"`: the tower's `pooler_output` (CLIP text:
            the EOS token; BERT: tanh(W h_[CLS])). `"mean"`: mean of `last_hidden_state` over the attention mask,
            h = sum_t m_t h_t / max(sum_t m_t, 1e-9) (what sentence-transformers models such as all-MiniLM-L6-v2 are
            trained with). `"cls"`: `last_hidden_state[:, 0]`. `"auto"`: the pooler output when the tower returns
            one, else `"mean"`.
        vision_pooling (`str`, *optional*, defaults to `"auto"`):
            Same choices for images. `"mean"` averages all tokens (3-D hidden states) or all spatial positions (4-D
            feature maps); `"auto"` is the pooler output when the tower returns one (ResNet, ConvNeXt, EfficientNet:
            the global average of the last feature map), else `"mean"` for a CNN feature map, else `"cls"`.
        logit_scale (`float`, *optional*, defaults to 1/0.07 ~= 14.29):
            Fixed multiplier of the cosine similarities in `logits_per_image` / `logits_per_text`, so that a softmax
            over candidate captions gives zero-shot label probabilities (the multiplier CLIP starts training from,
            `exp(logit_scale_init_value)`; `from_clip_pretrained` copies CLIP's learned value). It is not a learned
            parameter: the BCLS losses read the unscaled cosines (their own temperatures and margins set the
            scale), so no loss would train it. It changes no ranking; set it to make probabilities sharper or
            flatter.
        binary_loss (`str`, *optional*, defaults to `"triplet_sn"`):
            The binary-label term: `"triplet_sn"` (Triplet-SN), `"vse"` (VSE++ exact hardest-negative triplet) or
            `"infonce"` (CLIP's InfoNCE). The Kendall term (`kendall_weight`) is added to whichever is chosen.
        objective (`str`, *optional*):
            Legacy name of a (binary loss, Kendall on/off) pair, translated at construction and then stored as None:
            `"bcls"` = Triplet-SN + Kendall, `"triplet_sn"` / `"vse"` / `"infonce"` = that binary loss with
            `kendall_weight=0`. Old `config.json` files that carry it load unchanged in meaning.
        margin (`float`, *optional*, defaults to 0.2):
            Triplet margin alpha.
        soft_negative_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the soft-negative weighting of Triplet-SN.
        kendall_weight (`float`, *optional*, defaults to 0.2):
            lambda in L = L_triplet + lambda * L_kendall.
        kendall_window_size (`int`, *optional*, defaults to 32):
            Sliding window of the Kendall ranking loss over relevance-sorted candidates (`None` = all pairs).
        kendall_label_gap (`float`, *optional*, defaults to 0.15):
            Pairs whose relevance differs by less than this are not ranked.
        kendall_surrogate (`str`, *optional*, defaults to `"hinge"`):
            `"hinge"` or `"logistic"` surrogate of the pairwise discordance indicator.
        kendall_temperature (`float`, *optional*, defaults to 0.1):
            Temperature T of the logistic surrogate T * softplus(d / T) (unused by the hinge surrogate).
        kendall_hard_mining (`bool`, *optional*, defaults to `True`):
            Hard-sample mining of SW-HS: keep, per anchor, only the most discordant pair of its window (else every
            pair of the window).
        infonce_temperature (`float`, *optional*, defaults to 0.05):
            Temperature of the InfoNCE baseline.
        false_negative_threshold (`float`, *optional*):
            Relevance-aware negatives: a negative (a caption of another image) whose relevance R to the query is above
            this threshold θ is left out of the binary term (or down-weighted, see `false_negative_ramp`), since it
            likely describes the query as well as its own captions. `None` (default): every negative counts.
        false_negative_ramp (`float`, *optional*, defaults to 0.0):
            Width of a soft exclusion: negatives weigh w = 1 - clamp((R - θ) / ramp, 0, 1) (full at R <= θ, none at
            R >= θ + ramp); 0 is the hard exclusion w = 1[R <= θ].

    The loss defaults were chosen on Flickr8k val with pretrained towers (`benchmarks/studies/flickr8k_pretrained.py`, tables
    in `benchmarks/studies/RESULTS.md`) by one rule: the highest Kendall tau-b among the settings whose rsum is within 2 % of
    the best binary-only run (Triplet-SN with tau 0.1, which beat VSE++ and InfoNCE). That is Triplet-SN + 0.2 x
    Kendall with a label gap of 0.15 (pairs further apart in the label order): rsum 188.9 vs 191.6 (-1.4 %), tau-b
    0.303 vs 0.281 (3 seeds). Set `kendall_weight=0` for the binary term alone; a larger weight buys more tau-b for
    more recall.

    Example:

    ```python
    >>> from transformers import BertConfig, ViTConfig
    >>> from modeling_bcls import BCLSConfig, BCLSModel

    >>> config = BCLSConfig.from_vision_text_configs(ViTConfig(), BertConfig(), text_pooling="mean")
    >>> model = BCLSModel(config)
    ```"""

    model_type = "bcls"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    projection_dim: int = 256
    projection_hidden_dim: int | None = None
    text_pooling: PoolingMode = "auto"
    vision_pooling: PoolingMode = "auto"
    logit_scale: float | int = 1 / 0.07

    # Loss hyperparameters (see `losses.bcls_loss`).
    binary_loss: Literal["triplet_sn", "vse", "infonce"] = "triplet_sn"
    objective: Literal["bcls", "triplet_sn", "vse", "infonce"] | None = None
    margin: float | int = 0.2
    soft_negative_temperature: float | int = 0.1
    kendall_weight: float | int = 0.2
    kendall_window_size: int | None = 32
    kendall_label_gap: float | int = 0.15
    kendall_surrogate: Literal["hinge", "logistic"] = "hinge"
    kendall_temperature: float | int = 0.1
    kendall_hard_mining: bool = True
    infonce_temperature: float | int = 0.05
    false_negative_threshold: float | int | None = None
    false_negative_ramp: float | int = 0.0

    def __post_init__(self, **kwargs):
        if self.objective is not None:  # legacy name -> the two knobs (same table as `losses.OBJECTIVES`)
            self.binary_loss = "triplet_sn" if self.objective == "bcls" else self.objective
            if self.objective != "bcls":
                self.kendall_weight = 0.0
            self.objective = None
        super().__post_init__(**kwargs)

    def validate_bcls_hyperparameters(self):
        """Range checks (run by `@strict` after `__init__`); types and choices are checked per field."""
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {self.projection_dim}")
        if self.projection_hidden_dim is not None and self.projection_hidden_dim < 1:
            raise ValueError(f"projection_hidden_dim must be None (linear) or >= 1, got {self.projection_hidden_dim}")
        for name in FLOAT_KNOB_RANGES:
            problem = float_knob_problem(name, getattr(self, name))
            if problem is not None:
                raise ValueError(problem)
        threshold = self.false_negative_threshold
        if threshold is not None and (isinstance(threshold, bool) or not math.isfinite(threshold)):
            raise ValueError(f"false_negative_threshold must be a finite number or None, got {threshold!r}")
        if self.kendall_window_size is not None and self.kendall_window_size < 1:
            raise ValueError(
                f"kendall_window_size must be None (unbounded) or >= 1, "
                f"got {self.kendall_window_size}"
            )

    def check_hyperparameters(self) -> None:
        """Run the range checks again, e.g. after fields were set on a loaded config (`setattr` skips them)."""
        self.validate_bcls_hyperparameters()

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `losses.bcls_loss` that come from the config (all of them but the tensors)."""
        return {name: getattr(self, name) for name in LOSS_KWARG_NAMES}

    @classmethod
    def from_vision_text_configs(
        cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs
    ) -> "BCLSConfig":
        r"""
        Instantiate a [`BCLSConfig`] from a vision tower config and a text tower config (copied, not shared);
        `kwargs` set the other fields (`projection_dim`, pooling, loss hyperparameters).
        """
        return cls(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **kwargs)


__all__ = ["BCLSConfig", "FLOAT_KNOB_RANGES", "float_knob_problem"]
