"""The inference fast path of frozen CNN towers (modeling_bcls/inference_fusion.py): BatchNorm folded into the
convolutions and identity squeeze-excite layers dropped give the unfolded tower's outputs to float rounding; it is
used in eval mode without gradients only, rebuilt when the weights change, and never changes the saved weights."""

from __future__ import annotations

import pytest
import torch
from transformers import EfficientNetConfig, EfficientNetModel, ResNetConfig, ResNetModel

from modeling_bcls.inference_fusion import fuse_for_inference


def _randomise(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def tiny_towers():
    efficientnet = EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320, kernel_sizes=[3, 3, 5],
        in_channels=[32, 16, 24], out_channels=[16, 24, 40], depthwise_padding=[], strides=[1, 2, 2],
        num_block_repeats=[1, 2, 1], expand_ratios=[1, 6, 6], drop_connect_rate=0.0,
    )
    resnet = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    torch.manual_seed(0)
    return {"efficientnet": _randomise(EfficientNetModel(efficientnet)), "resnet": _randomise(ResNetModel(resnet))}


@pytest.mark.parametrize("family", ["efficientnet", "resnet"])
def test_fused_tower_equals_the_unfolded_tower(family):
    tower = tiny_towers()[family]
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    pixels = torch.randn(5, 3, 32, 32)
    fused = fuse_for_inference(tower, pixels)
    assert fused is not None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())  # every BatchNorm folded
    with torch.no_grad():
        want = tower(pixel_values=pixels)
        got = fused(pixel_values=pixels.contiguous(memory_format=torch.channels_last))
    for key in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in tower.state_dict().items())  # the tower itself is untouched


def test_identity_squeeze_excite_is_dropped_and_a_real_one_kept():
    tower = tiny_towers()["efficientnet"]
    with torch.no_grad():
        for name, module in tower.named_modules():
            if name.endswith("squeeze_excite"):
                module.expand.weight.zero_()
                module.expand.bias.fill_(100.0)  # sigmoid(100) == 1.0 in float32: an exact identity
    fused = fuse_for_inference(tower, torch.randn(2, 3, 32, 32))
    assert not any("SqueezeExcite" in type(m).__name__ for m in fused.modules())
    with torch.no_grad():
        next(m for n, m in tower.named_modules() if n.endswith("squeeze_excite")).expand.bias.fill_(1.0)
    fused = fuse_for_inference(tower, torch.randn(2, 3, 32, 32))
    assert sum("SqueezeExcite" in type(m).__name__ for m in fused.modules()) == 1


def test_training_mode_towers_are_not_fused():
    tower = tiny_towers()["resnet"].train()
    assert fuse_for_inference(tower, torch.randn(2, 3, 32, 32)) is None


def test_bcls_model_uses_the_fast_path_in_eval_mode_only(train_pairs_for_fusion):
    from trainer_bcls import build_tiny_model_and_processor

    model, _ = build_tiny_model_and_processor(train_pairs_for_fusion, image_size=32, projection_dim=16)
    _randomise(model.vision_model)
    calls = []
    model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    pixels = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        model.fast_inference = False
        plain = model.encode_image(pixels)
        model.fast_inference = True
        calls.clear()
        fast = model.encode_image(pixels)
        assert len(calls) == 1  # the tower ran once, to check the fused copy; the search embedding came from it
        calls.clear()
        again = model.encode_image(pixels)
        assert calls == []
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, fast, rtol=0, atol=0)
    # gradients wanted: the tower itself runs
    model.train()
    calls.clear()
    model.encode_image(pixels).sum().backward()
    assert calls == [1] and model.vision_model.embedder.embedder.convolution.weight.grad is not None
    # changed weights: the copy is rebuilt (outputs follow the new weights)
    model.eval()
    with torch.no_grad():
        model.vision_model.embedder.embedder.convolution.weight.mul_(2)
        model.fast_inference = False
        changed = model.encode_image(pixels)
        model.fast_inference = True
        torch.testing.assert_close(model.encode_image(pixels), changed, rtol=0, atol=1e-5)
    assert "_fused_vision" not in str(model.state_dict().keys())


@pytest.fixture
def train_pairs_for_fusion():
    return ["a red circle", "a blue square on the left", "two green triangles"]
