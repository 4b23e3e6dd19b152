# Licensed under the Apache License, Version 2.0.
"""PyTorch BCLS model: an image-text retrieval dual encoder trained with binary + continuous label supervision.

    v_i = normalize(W_v pool(vision_tower(image_i)))          W_v: [D, H_v], no bias
    t_j = normalize(W_t pool(text_tower(caption_j)))          W_t: [D, H_t], no bias
    s_ij = <v_i, t_j>  (cosine similarity, in [-1, 1]; the model's retrieval score)
    logits_per_image[i, j] = config.logit_scale * s_ij   (zero-shot classification logits, softmax over captions)

The losses see the raw cosines s_ij (their temperatures/margins live in `BCLSConfig`); `logit_scale` is a fixed
config value, not a parameter, because no BCLS loss would ever train it (see `BCLSConfig.logit_scale`).

This file is copied next to saved checkpoints (remote code, see `remote_code_files`). It may import only torch /
transformers / stdlib and, through `from .x import y` relative imports, the sibling modules `configuration_bcls`,
`sentence_transformers_files` and the `losses` folder (saved flat: its `__init__.py` as `losses.py`).
"""

import contextlib
import inspect
import json
import os
import re
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, cached_file, logging
from transformers.utils.generic import can_return_tuple

from .configuration_bcls import BCLSConfig
from .inference_fusion import FusedTowerCache
from .losses import bcls_loss
from .sentence_transformers_files import write_sentence_transformers_files


logger = logging.get_logger(__name__)

# Unprefixed `from_vision_text_pretrained` / `from_clip_pretrained` kwargs that concern loading (both towers).
_LOADING_KWARGS = (
    "dtype",
    "attn_implementation",
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "trust_remote_code",
)
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "trust_remote_code")


@dataclass
class BCLSOutput(ModelOutput):
    r"""
    Output of [`BCLSModel`]. Row i of a batch is one (image, caption) pair; `image_ids` says which rows share an image.

    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
        L = L_triplet + kendall_weight * L_kendall (each the mean of the image->text and text->image directions).
    loss_triplet (`torch.FloatTensor` of shape `()`, *optional*):
        The binary-label term of the chosen objective (Triplet-SN, VSE++ or InfoNCE).
    loss_kendall (`torch.FloatTensor` of shape `()`, *optional*):
        The continuous-label Kendall ranking term (0 without relevance labels).
    logits_per_image (`torch.FloatTensor` of shape `(n_images, n_texts)`):
        Scaled cosine similarities `config.logit_scale * <v_i, t_j>` in float32: row = image of pair i, column =
        caption of pair j. A softmax over a row gives zero-shot label probabilities (as CLIP's); the ranking equals
        the cosine ranking. The loss is computed from the unscaled cosines.
    logits_per_text (`torch.FloatTensor` of shape `(n_texts, n_images)`):
        `logits_per_image.T`.
    image_embeds (`torch.FloatTensor` of shape `(n_images, projection_dim)`):
        L2-normalised projected image embeddings (float32).
    text_embeds (`torch.FloatTensor` of shape `(n_texts, projection_dim)`):
        L2-normalised projected text embeddings (float32).
    """

    loss: torch.FloatTensor | None = None
    loss_triplet: torch.FloatTensor | None = None
    loss_kendall: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


def _fp32_region(device: torch.device):
    """Context in which autocast is off, so that float32 inputs give float32 results (similarities, losses)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


def _l2_normalize_fp32(x: torch.Tensor) -> torch.Tensor:
    """x / ||x||_2 row-wise, computed and returned in float32 even under a lower-precision autocast."""
    with _fp32_region(x.device):
        return F.normalize(x.float(), p=2.0, dim=-1)


def _tower_width(config: PreTrainedConfig, kind: str) -> int:
    """Width of the tower's pooled output, from the first of these config fields that is set.

    `hidden_size` (BERT, ViT, CLIP, Swin), `neck_hidden_sizes[-1]` (MobileViT, whose `hidden_sizes` are its
    transformer widths), the last stage `hidden_sizes[-1]` (ResNet, ConvNeXt, RegNet, PoolFormer), `hidden_dim`
    (EfficientNet's head width).
    """
    hidden_size = getattr(config, "hidden_size", None)
    if isinstance(hidden_size, int):
        return hidden_size
    for field in ("neck_hidden_sizes", "hidden_sizes", "hidden_dim"):
        value = getattr(config, field, None)
        if isinstance(value, (list, tuple)) and value:
            return int(value[-1])
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(
        f"Cannot infer the output width of the {kind} tower (model_type '{config.model_type}'): its config has "
        "none of `hidden_size`, `neck_hidden_sizes`, `hidden_sizes`, `hidden_dim`."
    )


def _check_tower_config(config: PreTrainedConfig, kind: str) -> None:
    """Reject towers that cannot give one vector per input (encoder-decoders, composite dual encoders)."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"BCLS {kind} tower: model_type '{model_type}' is an encoder-decoder model; `AutoModel` builds the full "
            "seq2seq model, which needs decoder inputs and has no pooled output. Use an encoder-only tower "
            f"(e.g. {'BERT, RoBERTa, MiniLM, CLIP text' if kind == 'text' else 'ViT, CLIP vision, DINOv2'})."
        )
    if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
        raise ValueError(
            f"BCLS {kind} tower: model_type '{model_type}' is a composite vision-text model; pass its "
            f"`{kind}_config` (or use `BCLSModel.from_clip_pretrained` / `from_vision_text_pretrained`)."
        )


def _accepts_add_pooling_layer(config: PreTrainedConfig) -> bool:
    """Whether the AutoModel class of `config` has an optional pooling head (`add_pooling_layer`, e.g. BERT, ViT)."""
    try:
        model_class = AutoModel._model_mapping[type(config)]
    except (KeyError, ValueError):
        return False
    return "add_pooling_layer" in inspect.signature(model_class.__init__).parameters


def _sentence_transformers_pooling(name_or_path: str, **hub_kwargs) -> str | None:
    """Pooling ("mean" / "cls") of a sentence-transformers folder (`modules.json` + `<pooling>/config.json`)."""
    lookup = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    try:
        modules_file = cached_file(name_or_path, "modules.json", **lookup, **hub_kwargs)
        if modules_file is None:
            return None
        with open(modules_file, encoding="utf-8") as f:
            modules = json.load(f)
        pooling_dirs = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling")]
        if not pooling_dirs:
            return None
        filename = f"{pooling_dirs[0]}/config.json" if pooling_dirs[0] else "config.json"
        pooling_file = cached_file(name_or_path, filename, **lookup, **hub_kwargs)
        if pooling_file is None:
            return None
        with open(pooling_file, encoding="utf-8") as f:
            pooling = json.load(f)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        logger.warning(f"Could not read the sentence-transformers pooling of {name_or_path}: {err}")
        return None
    # Legacy format: one boolean per mode; sentence-transformers >= 5: "pooling_mode": "mean" | [...].
    modes = pooling.get("pooling_mode")
    if modes is None:
        prefix = "pooling_mode_"
        modes = [key[len(prefix) :] for key, value in pooling.items() if key.startswith(prefix) and value]
    modes = [modes] if isinstance(modes, str) else list(modes)
    aliases = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls"}
    if len(modes) == 1 and modes[0] in aliases:
        return aliases[modes[0]]
    logger.warning(
        f"{name_or_path} uses sentence-transformers pooling {modes}, which BCLS does not implement; "
        "keeping text_pooling='auto'."
    )
    return None


def _not_bcls_message(config) -> str:
    """Why `config` cannot build a BCLSModel: it describes another kind of model (e.g. a BERT folder's config)."""
    model_type = getattr(config, "model_type", None)
    if type(config).__name__ != "BCLSConfig" or not model_type:
        return f"config must be a BCLSConfig, got {type(config).__name__}"
    where = f"{config.name_or_path} is" if getattr(config, "name_or_path", "") else "this config is"
    return (
        f"{where} a '{model_type}' model (config.json has model_type '{model_type}'), not a BCLS model "
        f"(model_type '{BCLSConfig.model_type}'). Build a BCLS model from such towers with "
        "BCLSModel.from_vision_text_pretrained(vision, text) or BCLSModel.from_clip_pretrained(clip)."
    )


def _safetensors_problem(path: str) -> str | None:
    """Why a `.safetensors` file cannot be read (truncated, bad header), or `None` when its layout is whole.

    Layout: 8 bytes little-endian header size n, n bytes of JSON header, then the tensor data; the file must end
    exactly where the largest `data_offsets` end says.
    """
    import os

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than the 8-byte header size"
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                return f"{size} bytes, but its header alone says {8 + n}: the file is truncated"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        return f"unreadable header ({type(err).__name__}: {err})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, but its header says {expected}: the file is {'truncated' if size < expected else 'longer than its tensors'}"
    return None


def _weight_files(name_or_path) -> list[str]:
    """The local `.safetensors` files of a model folder (none for a Hub id)."""
    import os

    folder = str(name_or_path)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".safetensors"))


def _projection(in_features: int, out_features: int, hidden: int | None) -> nn.Module:
    """Bias-free `Linear(in, out)` (CLIP), or the MLP `Linear(in, hidden) -> GELU -> Linear(hidden, out)`."""
    if hidden is None:
        layers = [nn.Linear(in_features, out_features, bias=False)]
        projection = layers[0]
    else:
        layers = [nn.Linear(in_features, hidden), nn.Linear(hidden, out_features)]
        projection = nn.Sequential(layers[0], nn.GELU(), layers[1])
    for layer in layers:
        layer._is_bcls_projection = True
    return projection


_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)


def remote_code_files(module_file: str) -> list[tuple[str, str]]:
    r"""
    The code files a saved model needs to load with `trust_remote_code=True`: `module_file` and, recursively, every
    module it imports with `from .x import y`, as `(source path, file name in the saved folder)`.

    The saved folder is flat (transformers' remote-code loader resolves `.x` to `x.py` beside the model file), so a
    sub-package `x/` is saved as `x.py` (its `__init__.py`) with its modules beside it. Two files that would get one
    name are an error.
    """
    files: dict[str, str] = {}
    todo = [(os.path.abspath(module_file), os.path.basename(module_file))]
    while todo:
        source, saved_name = todo.pop()
        if saved_name in files:
            if files[saved_name] != source:
                raise ValueError(f"remote code: {source} and {files[saved_name]} would both be saved as {saved_name}")
            continue
        files[saved_name] = source
        folder = os.path.dirname(source)
        with open(source, encoding="utf-8") as handle:
            imported = _RELATIVE_IMPORT.findall(handle.read())
        for name in imported:
            module, package = os.path.join(folder, f"{name}.py"), os.path.join(folder, name, "__init__.py")
            if os.path.isfile(module):
                todo.append((module, f"{name}.py"))
            elif os.path.isfile(package):
                todo.append((package, f"{name}.py"))
            else:
                raise FileNotFoundError(f"remote code: `from .{name} import` in {source} names no file in {folder}")
    return sorted(((source, name) for name, source in files.items()), key=lambda item: item[1])


class BCLSPreTrainedModel(PreTrainedModel):
    config: BCLSConfig
    config_class = BCLSConfig
    base_model_prefix = "bcls"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    # The BCLS loss is normalised by its own term counts, not by a token count: Trainer must not pass
    # `num_items_in_batch`.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        """Projections: N(0, in_features^-1/2) as in CLIP; everything else: the generic transformers init."""
        if isinstance(module, nn.Linear) and getattr(module, "_is_bcls_projection", False):
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class BCLSModel(BCLSPreTrainedModel):
    r"""
    BCLS dual encoder: `vision_model` and `text_model` are any `AutoModel` towers, `visual_projection` and
    `text_projection` map their pooled outputs to `projection_dim`, and the score of (image i, caption j) is the cosine
    similarity of the L2-normalised projections.

    Pooling (`config.vision_pooling` / `config.text_pooling`): `"auto"` uses the tower's `pooler_output` when it
    returns one (CLIP text: EOS token, CLIP vision: post-layernormed CLS, BERT/ViT: tanh dense on CLS) and otherwise
    mean-pools the text over the attention mask / takes the first (CLS) token of the image. Sentence-embedding towers
    such as all-MiniLM-L6-v2 were trained with mean pooling: use `text_pooling="mean"` (picked automatically by
    `from_vision_text_pretrained` from a sentence-transformers folder). With `"mean"` / `"cls"` a tower that has an
    optional pooling head (`add_pooling_layer`) is built without it, so no parameter is left unused (DDP-safe).
    """

    def __init__(
        self,
        config: BCLSConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        r"""
        config ([`BCLSConfig`]): the composite config; its sub-configs describe the towers.
        vision_model / text_model (`PreTrainedModel`, *optional*): already built (e.g. pretrained) towers to use
            instead of building them from `config.vision_config` / `config.text_config`.
        """
        # Compare the model type, not the class: remote code may load `configuration_bcls` under another module name.
        if getattr(config, "model_type", None) != BCLSConfig.model_type:
            raise TypeError(_not_bcls_message(config))
        super().__init__(config)

        self.vision_model = self._build_tower(config.vision_config, config.vision_pooling, "vision", vision_model)
        self.text_model = self._build_tower(config.text_config, config.text_pooling, "text", text_model)
        # The towers read the composite's sub-configs, so that updates to `model.config` reach them.
        for tower, key in ((self.vision_model, "vision_config"), (self.text_model, "text_config")):
            getattr(self.config, key)._attn_implementation = tower.config._attn_implementation
            tower.config = getattr(self.config, key)

        self.vision_embed_dim = _tower_width(config.vision_config, "vision")
        self.text_embed_dim = _tower_width(config.text_config, "text")
        self.projection_dim = config.projection_dim
        self.visual_projection = _projection(self.vision_embed_dim, self.projection_dim, config.projection_hidden_dim)
        self.text_projection = _projection(self.text_embed_dim, self.projection_dim, config.projection_hidden_dim)

        self.post_init()
        # inference fast path of a frozen CNN image tower (`inference_fusion.py`); not a submodule, never saved
        self.fast_inference = True
        self._fused_vision = FusedTowerCache()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True, **kwargs):
        r"""
        `PreTrainedModel.from_pretrained` of a saved BCLS model, strict about its weights.

        `transformers` initialises a parameter missing from the weights file at random and drops an unexpected one,
        with a log report only: a BCLS folder whose `visual_projection.weight` did not load would then retrieve with
        random projections. Here missing, unexpected or wrongly shaped weights are a `ValueError` naming them
        (`strict=False`: the lenient behaviour, with a warning). A folder of another kind of model (BERT, CLIP, ...)
        is an error that says what it is, and a truncated or corrupt weights file an error naming the file.
        A new model from pretrained towers (new projections) is `from_vision_text_pretrained` /
        `from_clip_pretrained`, not this method.
        """
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except Exception as err:
            problems = [(f, _safetensors_problem(f)) for f in _weight_files(pretrained_model_name_or_path)]
            problems = [(f, why) for f, why in problems if why is not None]
            if not problems:
                raise
            files = "; ".join(f"{f}: {why}" for f, why in problems)
            raise OSError(
                f"cannot load the BCLS model {pretrained_model_name_or_path}: broken weights file ({files}). "
                f"Save or copy the model again. ({type(err).__name__}: {err})"
            ) from err
        bad = {
            kind: sorted(str(k) for k in info.get(key) or ())
            for kind, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("mismatched", "mismatched_keys"))
        }
        bad = {kind: keys for kind, keys in bad.items() if keys}
        if bad:
            detail = "; ".join(f"{kind}: {keys[:10]}{' ...' if len(keys) > 10 else ''}" for kind, keys in bad.items())
            message = (
                f"the weights of {pretrained_model_name_or_path} do not match the BCLS model its config describes "
                f"({detail})."
            )
            if strict:
                raise ValueError(
                    message + " Missing weights would be random and the model would retrieve nonsense; fix the "
                    "folder, or pass strict=False to load it anyway."
                )
            logger.warning(message + " strict=False: loading anyway, the missing weights are random.")
        return (model, info) if want_info else model

    @staticmethod
    def _build_tower(
        config: PreTrainedConfig, pooling: str, kind: str, tower: PreTrainedModel | None
    ) -> PreTrainedModel:
        if tower is not None and not isinstance(tower, PreTrainedModel):
            raise TypeError(f"{kind}_model must be a transformers PreTrainedModel, got {type(tower).__name__}")
        _check_tower_config(config if tower is None else tower.config, kind)
        if tower is None:
            drop_pooler = pooling in ("mean", "cls") and _accepts_add_pooling_layer(config)
            tower = AutoModel.from_config(config, **({"add_pooling_layer": False} if drop_pooler else {}))
        elif pooling in ("mean", "cls") and isinstance(getattr(tower, "pooler", None), nn.Module):
            if _accepts_add_pooling_layer(tower.config):
                # Same module tree as `AutoModel.from_config(config, add_pooling_layer=False)`: the unused pooler
                # would otherwise be saved, trained by nothing and break DDP's unused-parameter check.
                tower.pooler = None
        return tower

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        r"""
        `PreTrainedModel.save_pretrained`, plus:

        - the `auto_map` names this class for `AutoModel` and `AutoModelForZeroShotImageClassification` (when the
          code files are saved), so `pipeline("zero-shot-image-classification", model=folder,
          trust_remote_code=True)` works without this package;
        - the sentence-transformers files (`modules.json`, ...; see `sentence_transformers_files.py`), so that
          `SentenceTransformer(folder)` embeds texts and images as `encode_text` / `encode_image`.
        """
        if kwargs.get("is_main_process", True):
            os.makedirs(save_directory, exist_ok=True)
            if self._auto_class is not None:
                name = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
                auto_map = dict(getattr(self.config, "auto_map", None) or {})
                for auto_class in (self._auto_class, "AutoModel", "AutoModelForZeroShotImageClassification"):
                    auto_map.setdefault(auto_class, name)
                self.config.auto_map = auto_map
                # transformers' own copy (`custom_object_save`) follows flat sibling files only; the losses are a
                # folder, so the code files are copied here, flattened.
                for source, saved_name in remote_code_files(inspect.getfile(type(self))):
                    shutil.copyfile(source, os.path.join(save_directory, saved_name))
            versions = {"transformers": transformers.__version__, "pytorch": torch.__version__}
            write_sentence_transformers_files(save_directory, versions)
        # `PreTrainedModel.save_pretrained` would run its own flat-only copy while `is_remote_code()` (a classmethod
        # reading `cls._auto_class`) is true: shadow the attribute on the class for the call, then restore it.
        cls, had_own = type(self), "_auto_class" in type(self).__dict__
        own = cls.__dict__.get("_auto_class")
        cls._auto_class = None
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if had_own:
                cls._auto_class = own
            else:
                del cls._auto_class

    # ----------------------------------------------------------------------------------------------------------------
    # Pooling
    # ----------------------------------------------------------------------------------------------------------------
    def _pool(self, outputs, pooling: str, attention_mask: torch.Tensor | None, kind: str) -> torch.Tensor:
        model_type = getattr(self.config, f"{kind}_config").model_type
        pooled = getattr(outputs, "pooler_output", None)
        hidden = getattr(outputs, "last_hidden_state", None)
        if pooling == "auto":
            cnn_map = hidden is not None and hidden.dim() == 4  # [batch, channels, height, width]
            pooling = "pooler" if pooled is not None else ("mean" if kind == "text" or cnn_map else "cls")
        if pooling == "pooler":
            if pooled is None:
                raise ValueError(
                    f"{kind}_pooling='pooler' but the {kind} tower (model_type '{model_type}') returns no "
                    f"`pooler_output`; use {kind}_pooling='mean' or 'cls'."
                )
            return pooled.flatten(1) if pooled.dim() > 2 else pooled
        if hidden is None:
            raise ValueError(
                f"The {kind} tower (model_type '{model_type}') returns neither `pooler_output` nor "
                "`last_hidden_state`; BCLS cannot pool it into one vector per input."
            )
        if pooling == "cls":
            if hidden.dim() != 3:
                raise ValueError(
                    f"{kind}_pooling='cls' needs token states [batch, tokens, hidden], but the {kind} tower "
                    f"(model_type '{model_type}') returns shape {tuple(hidden.shape)}; use 'mean' or 'pooler'."
                )
            return hidden[:, 0]
        # mean
        if hidden.dim() == 4:  # CNN feature map [batch, channels, height, width]
            return hidden.mean(dim=(2, 3))
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.to(device=hidden.device, dtype=torch.float32).unsqueeze(-1)
        summed = (hidden.float() * mask).sum(dim=1)
        return (summed / mask.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype)

    @staticmethod
    def _with_projection(outputs, projected: torch.Tensor) -> BaseModelOutputWithPooling:
        """The tower's outputs with `pooler_output` replaced by the projected features (as CLIP's)."""
        return BaseModelOutputWithPooling(
            last_hidden_state=getattr(outputs, "last_hidden_state", None),
            pooler_output=projected,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    def _inference_vision_tower(self, pixel_values: torch.Tensor) -> nn.Module | None:
        """The fused copy of the vision tower (`inference_fusion.py`: BatchNorm folded, channels_last) when the
        tower is a CNN in eval mode and no gradient can flow into it or into the pixels; else None."""
        tower = self.vision_model
        if not getattr(self, "fast_inference", False) or pixel_values.requires_grad or tower.training:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters()):
            return None
        if any(m.training for m in tower.modules()):
            return None
        return self._fused_vision.get(tower, pixel_values)

    def optimize_for_inference(self) -> "BCLSModel":
        """Eval mode with the inference fast path on (`fast_inference = True`): a frozen CNN image tower runs as a
        fused copy (BatchNorm folded into its convolutions, channels_last; built on the first batch, rebuilt when
        the weights change). The model's weights and what `save_pretrained` writes never change. Returns self."""
        self.fast_inference = True
        return self.eval()

    def _vision_tower(self, pixel_values: torch.Tensor, **tower_kwargs):
        """(the vision tower's outputs, its pooled output [N, vision_embed_dim] before the projection)."""
        fused = self._inference_vision_tower(pixel_values)
        if fused is not None:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():  # nothing here can need a gradient (checked above); callers may add inference_mode
                outputs = fused(pixel_values=pixel_values, return_dict=True, **tower_kwargs)
                return outputs, self._pool(outputs, self.config.vision_pooling, None, "vision")
        outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **tower_kwargs)
        return outputs, self._pool(outputs, self.config.vision_pooling, None, "vision")

    def _text_tower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **tower_kwargs):
        """(the text tower's outputs, its pooled output [N, text_embed_dim] before the projection)."""
        tower_kwargs = {k: v for k, v in tower_kwargs.items() if v is not None}
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **tower_kwargs)
        return outputs, self._pool(outputs, self.config.text_pooling, attention_mask, "text")

    def _pool_image(self, pixel_values: torch.Tensor, **tower_kwargs) -> torch.Tensor:
        """Pooled vision-tower output before the projection (what a locked tower's cache holds)."""
        return self._vision_tower(pixel_values, **tower_kwargs)[1]

    # ----------------------------------------------------------------------------------------------------------------
    # Features
    # ----------------------------------------------------------------------------------------------------------------
    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **tower_kwargs) -> BaseModelOutputWithPooling:
        r"""
        The vision tower's outputs with `pooler_output` = W_v pool(vision_tower(pixel_values)): the projected image
        features, shape [N, projection_dim], in the model's dtype and NOT normalised (the transformers 5 contract of
        `CLIPModel.get_image_features`). `last_hidden_state` / `hidden_states` / `attentions` are the tower's.
        For search use [`encode_image`] (L2-normalised, float32).
        """
        outputs, pooled = self._vision_tower(pixel_values, **tower_kwargs)
        return self._with_projection(outputs, self.visual_projection(pooled))

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **tower_kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        The text tower's outputs with `pooler_output` = W_t pool(text_tower(input_ids, attention_mask)): the
        projected text features, shape [N, projection_dim], model dtype, NOT normalised (as
        `CLIPModel.get_text_features`). For search use [`encode_text`] (L2-normalised, float32).
        """
        outputs, pooled = self._text_tower(
            input_ids, attention_mask, token_type_ids=token_type_ids, position_ids=position_ids, **tower_kwargs
        )
        return self._with_projection(outputs, self.text_projection(pooled))

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True, **tower_kwargs) -> torch.Tensor:
        r"""
        Search embeddings of images, float32 [N, projection_dim]: v = W_v pool(vision_tower(pixel_values)) / ||.||_2
        (unnormalised when `normalize=False`; open_clip's `encode_image`). The one call to use for indexing and
        search: the dot product of two such embeddings is the model's retrieval score.
        """
        features = self.get_image_features(pixel_values, **tower_kwargs).pooler_output
        return _l2_normalize_fp32(features) if normalize else features.float()

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        normalize: bool = True,
        **tower_kwargs,
    ) -> torch.Tensor:
        r"""
        Search embeddings of texts, float32 [N, projection_dim]: t = W_t pool(text_tower(input_ids, attention_mask))
        / ||.||_2 (unnormalised when `normalize=False`; open_clip's `encode_text`). Extra tower inputs
        (`token_type_ids`, `position_ids`) may be passed as keywords.
        """
        features = self.get_text_features(input_ids, attention_mask, **tower_kwargs).pooler_output
        return _l2_normalize_fp32(features) if normalize else features.float()

    # ----------------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------------
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.LongTensor | None = None,
        caption_ids: torch.LongTensor | None = None,
        relevance: torch.FloatTensor | None = None,
        relevance_order_i2t: torch.LongTensor | None = None,
        relevance_order_t2i: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        vision_pooled_output: torch.FloatTensor | None = None,
        text_pooled_output: torch.FloatTensor | None = None,
        **kwargs,
    ) -> BCLSOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`, *optional*): images, row i = image of pair i.
        input_ids / attention_mask (`(B, L)`, *optional*): captions, row j = caption of pair j.
        image_ids (`torch.LongTensor` of shape `(B,)`, *optional*): image identity of each pair; rows with equal ids
            share the image, so positive_mask[i, j] = image_ids[i] == image_ids[j] (identity when omitted).
        caption_ids (`torch.LongTensor` of shape `(B,)`, *optional*): caption identity of each pair. Not used by the
            loss (`relevance` already encodes the captions); accepted so that collator batches pass as they are (the
            multi-process trainer uses it to rebuild the global relevance matrix).
        relevance (`torch.FloatTensor` of shape `(B, B)`, *optional*): continuous relevance of caption j to image i
            (rows = images, as `logits_per_image`), used by the Kendall term.
        relevance_order_i2t / relevance_order_t2i (`torch.LongTensor` of shape `(B, B)`, *optional*): precomputed
            `relevance_sort_order` of `relevance` / `relevance.T` (the collator's), passed to the loss as `sort_order`.
        return_loss (`bool`, *optional*): compute `bcls_loss(cosines, positive_mask, relevance, ...)` on the unscaled
            cosine similarities with the config's loss hyperparameters (needs both modalities and B images = B captions).
        token_type_ids / position_ids (*optional*): passed to the text tower when given.
        vision_pooled_output (`torch.FloatTensor` of shape `(B, vision_embed_dim)`, *optional*): the pooled vision-tower
            output of the images, used instead of running the tower on `pixel_values` (the cached features of a
            locked tower, `trainer_bcls.training.feature_cache`); the projection still runs.
        text_pooled_output (`torch.FloatTensor` of shape `(B, text_embed_dim)`, *optional*): the same for the text
            tower (pooled output before `text_projection`), used instead of `input_ids`.

        Either modality alone may be given; then only its embeddings are returned. Similarities and loss are float32.
        """
        kwargs.pop("num_items_in_batch", None)
        if kwargs:
            raise TypeError(f"BCLSModel.forward() got unexpected keyword arguments: {sorted(kwargs)}")
        if pixel_values is None and input_ids is None and vision_pooled_output is None and text_pooled_output is None:
            raise ValueError("BCLSModel.forward() needs pixel_values, input_ids or both.")

        if vision_pooled_output is not None:
            if pixel_values is not None:
                raise ValueError("Pass pixel_values or vision_pooled_output (a locked tower's cached output), not both.")
            projection_dtype = next(self.visual_projection.parameters()).dtype
            image_embeds = _l2_normalize_fp32(self.visual_projection(vision_pooled_output.to(projection_dtype)))
        else:
            image_embeds = self.encode_image(pixel_values) if pixel_values is not None else None
        if text_pooled_output is not None:
            if input_ids is not None:
                raise ValueError("Pass input_ids or text_pooled_output (a locked tower's cached output), not both.")
            projection_dtype = next(self.text_projection.parameters()).dtype
            text_embeds = _l2_normalize_fp32(self.text_projection(text_pooled_output.to(projection_dtype)))
        else:
            text_embeds = (
                self.encode_text(input_ids, attention_mask, token_type_ids=token_type_ids, position_ids=position_ids)
                if input_ids is not None
                else None
            )

        cosines = logits_per_image = logits_per_text = None
        if image_embeds is not None and text_embeds is not None:
            with _fp32_region(image_embeds.device):
                cosines = image_embeds @ text_embeds.to(image_embeds.device).t()
                logits_per_image = cosines * float(self.config.logit_scale)
            logits_per_text = logits_per_image.t()

        loss = loss_triplet = loss_kendall = None
        if return_loss:
            if cosines is None:
                raise ValueError("return_loss=True needs both pixel_values and input_ids.")
            losses = self._compute_loss(cosines, image_ids, relevance, relevance_order_i2t, relevance_order_t2i)
            loss, loss_triplet, loss_kendall = losses["loss"], losses["triplet"], losses["kendall"]

        return BCLSOutput(
            loss=loss,
            loss_triplet=loss_triplet,
            loss_kendall=loss_kendall,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )

    def _compute_loss(
        self,
        cosines: torch.Tensor,
        image_ids: torch.Tensor | None,
        relevance: torch.Tensor | None,
        relevance_order_i2t: torch.Tensor | None,
        relevance_order_t2i: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        n_images, n_texts = cosines.shape
        if n_images != n_texts:
            raise ValueError(
                f"return_loss=True needs one image per caption (pairs), got {n_images} images and {n_texts} captions."
            )
        device = cosines.device
        if image_ids is None:
            positive_mask = torch.eye(n_images, dtype=torch.bool, device=device)
        else:
            image_ids = torch.as_tensor(image_ids, device=device)
            if image_ids.shape != (n_images,):
                raise ValueError(f"image_ids must have shape ({n_images},), got {tuple(image_ids.shape)}.")
            positive_mask = image_ids[:, None] == image_ids[None, :]
        if relevance is not None:
            relevance = torch.as_tensor(relevance, device=device).float()
            if relevance.shape != (n_images, n_texts):
                raise ValueError(
                    f"relevance must have shape ({n_images}, {n_texts}) (rows = images), got {tuple(relevance.shape)}."
                )
        if relevance_order_i2t is not None:
            relevance_order_i2t = relevance_order_i2t.to(device)
        if relevance_order_t2i is not None:
            relevance_order_t2i = relevance_order_t2i.to(device)
        with _fp32_region(device):
            return bcls_loss(
                cosines,
                positive_mask,
                relevance,
                sort_order_i2t=relevance_order_i2t,
                sort_order_t2i=relevance_order_t2i,
                **self.config.loss_kwargs(),
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Construction from pretrained towers
    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def _split_kwargs(cls, kwargs: dict) -> tuple[dict, dict, dict]:
        """Split `from_*_pretrained` kwargs into (vision tower, text tower, BCLSConfig) kwargs."""
        config_fields = set(BCLSConfig.__dataclass_fields__) - set(_LOADING_KWARGS)
        vision_kwargs, text_kwargs, config_kwargs = {}, {}, {}
        for key, value in kwargs.items():
            if key in _LOADING_KWARGS:
                vision_kwargs.setdefault(key, value)
                text_kwargs.setdefault(key, value)
            elif key in config_fields:  # includes text_pooling / vision_pooling
                config_kwargs[key] = value
            elif key.startswith("vision_"):
                vision_kwargs[key[len("vision_") :]] = value
            elif key.startswith("text_"):
                text_kwargs[key[len("text_") :]] = value
            else:
                config_kwargs[key] = value
        # A prefixed key wins over the same unprefixed loading key.
        for key in _LOADING_KWARGS:
            if f"vision_{key}" in kwargs:
                vision_kwargs[key] = kwargs[f"vision_{key}"]
            if f"text_{key}" in kwargs:
                text_kwargs[key] = kwargs[f"text_{key}"]
        return vision_kwargs, text_kwargs, config_kwargs

    @staticmethod
    def _load_tower(name_or_path: str | None, kind: str, pooling: str, kwargs: dict) -> PreTrainedModel:
        kwargs = dict(kwargs)
        tower = kwargs.pop("model", None)
        if tower is not None:
            return tower
        if name_or_path is None:
            raise ValueError(f"Pass `{kind}_model_name_or_path` or an already built `{kind}_model=`.")
        config = kwargs.pop("config", None)
        if config is None:
            config = AutoConfig.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k in _HUB_KWARGS})
        if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
            # A composite dual encoder (CLIP-like): load it and keep the requested tower.
            full = AutoModel.from_pretrained(name_or_path, config=config, **kwargs)
            tower = getattr(full, f"{kind}_model", None)
            if not isinstance(tower, PreTrainedModel):
                raise ValueError(
                    f"{name_or_path} (model_type '{config.model_type}') has no `{kind}_model` PreTrainedModel to use "
                    f"as the BCLS {kind} tower."
                )
            return tower
        _check_tower_config(config, kind)
        if pooling in ("mean", "cls") and _accepts_add_pooling_layer(config):
            kwargs.setdefault("add_pooling_layer", False)
        return AutoModel.from_pretrained(name_or_path, config=config, **kwargs)

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str | None = None,
        text_model_name_or_path: str | None = None,
        **kwargs,
    ) -> "BCLSModel":
        r"""
        Build a BCLS model from a pretrained vision tower and a pretrained text tower (projections are new).

        Keyword arguments: `vision_<name>` / `text_<name>` go to that tower's `AutoModel.from_pretrained`
        (`vision_model=` / `text_model=` pass already built towers); loading arguments without a prefix (`dtype`,
        `attn_implementation`, `cache_dir`, `revision`, `token`, `local_files_only`, ...) go to both towers; every
        other argument (`projection_dim`, `text_pooling`, `vision_pooling`, loss hyperparameters) goes to
        [`BCLSConfig`]. A CLIP-like checkpoint may be given for either tower: its `vision_model` / `text_model` is
        used.

        When `text_pooling` is not given (or "auto") and the text folder is a sentence-transformers model
        (`modules.json` + pooling `config.json`) with mean or CLS pooling, `text_pooling` is set to match it.

        Example:

        ```python
        >>> model = BCLSModel.from_vision_text_pretrained(
        ...     "google/vit-base-patch16-224-in21k", "sentence-transformers/all-MiniLM-L6-v2", projection_dim=256
        ... )  # text_pooling == "mean"
        ```"""
        vision_kwargs, text_kwargs, config_kwargs = cls._split_kwargs(kwargs)
        if (
            config_kwargs.get("text_pooling", "auto") == "auto"
            and "model" not in text_kwargs
            and text_model_name_or_path is not None
        ):
            hub_kwargs = {k: v for k, v in text_kwargs.items() if k in _HUB_KWARGS and k != "trust_remote_code"}
            st_pooling = _sentence_transformers_pooling(str(text_model_name_or_path), **hub_kwargs)
            if st_pooling is not None:
                logger.info(f"{text_model_name_or_path} is a sentence-transformers model: text_pooling={st_pooling!r}")
                config_kwargs["text_pooling"] = st_pooling

        vision_model = cls._load_tower(
            vision_model_name_or_path, "vision", config_kwargs.get("vision_pooling", "auto"), vision_kwargs
        )
        text_model = cls._load_tower(
            text_model_name_or_path, "text", config_kwargs.get("text_pooling", "auto"), text_kwargs
        )
        config = BCLSConfig.from_vision_text_configs(vision_model.config, text_model.config, **config_kwargs)
        model = cls(config, vision_model=vision_model, text_model=text_model)
        model.visual_projection.to(vision_model.dtype)
        model.text_projection.to(text_model.dtype)
        logger.warning(
            "The projections `visual_projection` and `text_projection` are newly initialized: train the "
            "model before using it for retrieval."
        )
        return model

    @classmethod
    def from_clip_pretrained(cls, clip_name_or_path: str, **kwargs) -> "BCLSModel":
        r"""
        Convert a CLIP checkpoint (`CLIPModel`-like: `vision_model`, `text_model`, `visual_projection`,
        `text_projection`) into a BCLS model: both towers and both projections are copied and `projection_dim` is
        CLIP's, so that `get_image_features` / `get_text_features` equal CLIP's projected features. CLIP's learned
        `logit_scale.exp()` becomes the fixed `config.logit_scale` (unless `logit_scale=` is given), so zero-shot
        logits match CLIP's. Unprefixed loading kwargs (`dtype`, `revision`, ...)
        go to `AutoModel.from_pretrained`; the others to [`BCLSConfig`].
        """
        vision_kwargs, text_kwargs, config_kwargs = cls._split_kwargs(kwargs)
        tower_only = sorted((set(vision_kwargs) | set(text_kwargs)) - set(_LOADING_KWARGS))
        if tower_only:
            raise TypeError(f"from_clip_pretrained() takes no per-tower arguments, got vision_/text_ {tower_only}.")
        loading_kwargs = {k: v for k, v in kwargs.items() if k in _LOADING_KWARGS}
        clip = AutoModel.from_pretrained(clip_name_or_path, **loading_kwargs)
        missing = [
            name
            for name in ("vision_model", "text_model", "visual_projection", "text_projection")
            if not isinstance(getattr(clip, name, None), nn.Module)
        ]
        if missing:
            raise ValueError(
                f"{clip_name_or_path} (model_type '{clip.config.model_type}', {type(clip).__name__}) is not "
                f"CLIP-like: it lacks {missing}."
            )
        clip_dim = clip.visual_projection.out_features
        if config_kwargs.get("projection_dim", clip_dim) != clip_dim:
            raise ValueError(
                f"projection_dim={config_kwargs['projection_dim']} differs from the CLIP projection width {clip_dim}; "
                "the projections are copied, so it cannot change."
            )
        if config_kwargs.get("projection_hidden_dim") is not None:
            raise ValueError("from_clip_pretrained() copies CLIP's linear projections: projection_hidden_dim must be None.")
        config_kwargs["projection_dim"] = clip_dim
        config_kwargs.setdefault("vision_pooling", "pooler")
        config_kwargs.setdefault("text_pooling", "pooler")
        if isinstance(getattr(clip, "logit_scale", None), torch.Tensor):
            config_kwargs.setdefault("logit_scale", float(clip.logit_scale.detach().float().exp()))
        config = BCLSConfig.from_vision_text_configs(clip.vision_model.config, clip.text_model.config, **config_kwargs)
        # Both towers come from this checkpoint (the model card lists it as the base model).
        config.vision_config._name_or_path = config.text_config._name_or_path = str(clip_name_or_path)
        model = cls(config, vision_model=clip.vision_model, text_model=clip.text_model)
        model.visual_projection.to(clip.visual_projection.weight.dtype)
        model.text_projection.to(clip.text_projection.weight.dtype)
        with torch.no_grad():
            model.visual_projection.weight.copy_(clip.visual_projection.weight)
            model.text_projection.weight.copy_(clip.text_projection.weight)
        return model


__all__ = ["BCLSModel", "BCLSOutput", "BCLSPreTrainedModel"]
