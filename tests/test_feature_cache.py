"""Lock-boundary caches (issue 25): for each tower family the tail on cached boundary states equals the full forward
and gives the unlocked layers the same gradients; a cached training step has the loss and gradients of the
uncached one; the collator stops decoding; the caches persist, memory-map and fall back where a tower cannot be cut."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, EfficientNetConfig

from modeling_bcls import BCLSConfig, BCLSModel
from trainer_bcls import (
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    RelevanceLabels,
    TfidfRelevance,
    build_tiny_model_and_processor,
    freeze_tower,
    freeze_towers,
    load_pairs,
)
from trainer_bcls.training.feature_cache import TowerFeatureCache, cached_text_pooled
from trainer_bcls.training.feature_store import FeatureStore, PackedRows, ShardedRows
from trainer_bcls.training.lock_boundary import LockBoundary


@pytest.fixture(scope="module")
def train_pairs(synthetic_dir):
    return load_pairs(str(synthetic_dir), "train").select(range(96))


@pytest.fixture(scope="module")
def relevance(train_pairs):
    return RelevanceLabels.build(train_pairs, TfidfRelevance())


def tiny_efficientnet_config() -> EfficientNetConfig:
    return EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320, kernel_sizes=[3, 3, 5],
        in_channels=[32, 16, 24], out_channels=[16, 24, 40], depthwise_padding=[], strides=[1, 2, 2],
        num_block_repeats=[1, 2, 1], expand_ratios=[1, 6, 6], drop_connect_rate=0.0, dropout_rate=0.0,
    )


def tiny_model(train_pairs, vision: str = "resnet"):
    """Tiny towers; `vision` "resnet", "vit", "efficientnet" (BatchNorm CNN) or text "clip" (CLIP text tower)."""
    torch.manual_seed(0)
    base, processor = build_tiny_model_and_processor(
        train_pairs["caption"], image_size=32, projection_dim=16, vision="vit" if vision == "vit" else "resnet"
    )
    if vision != "efficientnet":
        return base, processor
    config = BCLSConfig.from_vision_text_configs(
        tiny_efficientnet_config(), base.config.text_config, projection_dim=16, text_pooling="mean"
    )
    torch.manual_seed(0)
    return BCLSModel(config), processor


def _batch(processor, pairs, n=6):
    rows = [pairs[i] for i in range(0, 5 * n, 5)]
    return BCLSDataCollator(processor, max_length=32)(rows)


def _randomise_batchnorm(model):
    """Non-trivial BatchNorm statistics (a fresh tower has mean 0 / var 1, which hides folding mistakes)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# The tail on captured states equals the full forward, for each tower family
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vision, unlocked", [("resnet", 1), ("resnet", 2), ("vit", 1), ("vit", 2),
                                              ("efficientnet", 1), ("efficientnet", 2)])
def test_vision_tail_on_cached_states_equals_the_full_forward(train_pairs, vision, unlocked):
    model, processor = tiny_model(train_pairs, vision)
    with torch.no_grad():
        _randomise_batchnorm(model)
    freeze_tower(model.vision_model, unlocked_layers=unlocked)
    boundary = LockBoundary.of(model.vision_model)
    assert boundary is not None
    pixel_values = _batch(processor, train_pairs)["pixel_values"]
    model.train()  # frozen groups stay in eval mode; the tail trains (tiny towers have no dropout)
    full = model._pool_image(pixel_values)
    with torch.no_grad():
        states = boundary.capture(model.vision_model, pixel_values=pixel_values)
    assert states.shape[0] == len(pixel_values)
    with boundary.tail_only(model.vision_model):
        cut = model._pool(model.vision_model(pixel_values=states, return_dict=True), model.config.vision_pooling, None, "vision")
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)
    grads = {}
    for name, value in (("full", full), ("cut", cut)):
        model.zero_grad()
        (value * torch.linspace(-1, 1, value.shape[-1])).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.vision_model.named_parameters() if p.grad is not None}
    assert grads["full"] and grads["full"].keys() == grads["cut"].keys()
    for name, grad in grads["full"].items():
        torch.testing.assert_close(grads["cut"][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # the tower is whole again after the tail
    with torch.no_grad():
        torch.testing.assert_close(model._pool_image(pixel_values), full.detach(), rtol=0, atol=0)


def test_a_tower_with_only_its_embeddings_frozen_has_no_boundary_to_cache(train_pairs):
    model, _ = tiny_model(train_pairs)
    freeze_tower(model.text_model, unlocked_layers=2)  # 2 layers: everything but the embeddings trains
    assert LockBoundary.of(model.text_model) is None
    freeze_tower(model.vision_model)
    assert LockBoundary.of(model.vision_model) is None  # locked: pooled outputs, no boundary


@pytest.mark.parametrize("unlocked", [1])
def test_text_tail_on_cached_token_states_equals_the_full_forward(train_pairs, unlocked):
    model, processor = tiny_model(train_pairs)
    freeze_tower(model.text_model, unlocked_layers=unlocked)
    boundary = LockBoundary.of(model.text_model)
    batch = _batch(processor, train_pairs)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    model.train()
    full = model._text_tower(**inputs)[1]
    with torch.no_grad():
        states = boundary.capture(model.text_model, **inputs)
    # pack without padding, then a re-padded batch (other widths) through the tail, in chunks of similar length
    lengths = inputs["attention_mask"].sum(1)
    rows = PackedRows(states[inputs["attention_mask"].bool()], lengths)
    cache = TowerFeatureCache("text", "boundary", rows, np.arange(len(lengths)), boundary)
    cut = cached_text_pooled(model, cache, torch.arange(len(lengths)), contextlib.nullcontext, chunk=2)
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)
    grads = {}
    for name, value in (("full", full), ("cut", cut)):
        model.zero_grad()
        (value * torch.linspace(-1, 1, value.shape[-1])).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.text_model.named_parameters() if p.grad is not None}
    assert grads["full"] and grads["full"].keys() == grads["cut"].keys()
    assert {n.split(".")[2] for n in grads["full"]} == {str(k) for k in range(2 - unlocked, 2)}  # encoder.layer.<k>
    for name, grad in grads["full"].items():
        torch.testing.assert_close(grads["cut"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Through BCLSTrainer
# ---------------------------------------------------------------------------------------------------------------------
def make_trainer(model, processor, pairs, relevance, tmp_path, **overrides):
    arguments = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=16, learning_rate=1e-3, max_steps=4,
        eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, seed=0, logging_steps=1000,
    )
    arguments.update(overrides)
    return BCLSTrainer(
        model=model, args=BCLSTrainingArguments(**arguments), train_dataset=pairs,
        data_collator=BCLSDataCollator(processor, relevance=relevance, max_length=32), processing_class=processor,
    )


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(dict(batch)))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


RECIPES = {
    "both locked": dict(freeze_vision_model=True, freeze_text_model=True),
    "LiT, last text layer": dict(freeze_vision_model=True, freeze_text_model=True, text_unlocked_layers=1),
    "last image stage": dict(freeze_vision_model=True, vision_unlocked_layers=1),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_cached_step_has_the_loss_and_gradients_of_the_uncached_step(train_pairs, relevance, tmp_path, recipe, chunk_size):
    model, processor = tiny_model(train_pairs, "vit")
    freeze_towers(model, **RECIPES[recipe])
    trainer = make_trainer(model, processor, train_pairs, relevance, tmp_path, embedding_chunk_size=chunk_size)
    rows = [train_pairs[i] for i in range(0, 64, 4)]
    full_batch = trainer.data_collator(rows)
    loss, grads = loss_and_grads(trainer, full_batch)  # no caches yet: the full forward

    trainer._prepare_feature_caches()
    caches = trainer.feature_caches
    expected = {  # (vision, text) cache modes; a partly unlocked tower under GradCache is not cached
        "both locked": ("pooled", "pooled"),
        "LiT, last text layer": ("pooled", "boundary" if chunk_size is None else None),
        "last image stage": ("boundary" if chunk_size is None else None, None),
    }[recipe]
    assert (caches.vision and caches.vision.mode, caches.text and caches.text.mode) == expected
    cached_batch = trainer.data_collator(rows)
    if caches.vision is not None:
        assert "pixel_values" not in cached_batch
    if caches.text is not None:
        assert "input_ids" not in cached_batch
    cached_loss, cached_grads = loss_and_grads(trainer, cached_batch)
    assert loss.item() > 0
    torch.testing.assert_close(cached_loss, loss, rtol=0, atol=1e-6)
    assert cached_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class TowerCalls:
    def __init__(self, module):
        self.count = 0
        module.register_forward_hook(lambda *args: setattr(self, "count", self.count + 1))


def test_training_runs_the_frozen_towers_once_and_trains_like_the_uncached_run(train_pairs, relevance, tmp_path):
    weights = {}
    for cached in (True, False):
        model, processor = tiny_model(train_pairs, "vit")
        freeze_towers(model, **RECIPES["LiT, last text layer"])
        vision_calls, embedding_calls = TowerCalls(model.vision_model), TowerCalls(model.text_model.embeddings)
        trainer = make_trainer(model, processor, train_pairs, relevance, tmp_path / str(cached), max_steps=-1,
                               num_train_epochs=2, cache_locked_features=cached)
        trainer.train()
        images, captions = len(set(train_pairs["image_id"])), len(train_pairs)
        steps = 2 * len(train_pairs) // 16
        if cached:  # one pass over the unique images / captions (+ a 4-caption self-check of the cut), then none
            assert vision_calls.count == -(-images // 16) and embedding_calls.count <= -(-captions // 16) + 2
        else:
            assert vision_calls.count == steps and embedding_calls.count == steps
        assert trainer.data_collator.load_images and trainer.data_collator.tokenize  # restored after training
        weights[cached] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_persisted_caches_start_warm_and_memory_map(train_pairs, relevance, tmp_path):
    folder = tmp_path / "features"
    results = []
    for run, max_gb in enumerate((8.0, 8.0, 0.0)):
        model, processor = tiny_model(train_pairs, "vit")
        freeze_towers(model, **RECIPES["LiT, last text layer"])
        trainer = make_trainer(model, processor, train_pairs, relevance, tmp_path / f"run{run}",
                               feature_cache_dir=str(folder), feature_cache_max_gb=max_gb)
        trainer._prepare_feature_caches()
        caches = trainer.feature_caches
        results.append(caches)
        batch = trainer.data_collator([train_pairs[i] for i in range(16)])
        results[-1].loss = loss_and_grads(trainer, batch)[0]
    first, second, mapped = results
    assert first.vision.computed == len(set(train_pairs["image_id"])) and first.vision.loaded == 0
    assert second.vision.computed == 0 and second.text.computed == 0
    assert second.text.loaded == len(train_pairs)
    assert "memory-mapped" in mapped.text.location and isinstance(mapped.text.rows, ShardedRows)
    assert isinstance(mapped.text.rows.parts[0].values, np.ndarray)
    torch.testing.assert_close(second.loss, first.loss, rtol=0, atol=0)
    torch.testing.assert_close(mapped.loss, first.loss, rtol=0, atol=0)
    assert sorted(p.name.split("-")[0] for p in folder.iterdir()) == ["text", "vision"]

    # other weights: another context, so another folder, nothing reused
    model, processor = tiny_model(train_pairs, "vit")
    with torch.no_grad():
        model.vision_model.embeddings.patch_embeddings.projection.weight.mul_(2)
    freeze_towers(model, **RECIPES["LiT, last text layer"])
    trainer = make_trainer(model, processor, train_pairs, relevance, tmp_path / "other", feature_cache_dir=str(folder))
    trainer._prepare_feature_caches()
    assert trainer.feature_caches.vision.computed == len(set(train_pairs["image_id"]))
    assert len([p for p in folder.iterdir() if p.name.startswith("vision")]) == 2


def test_feature_store_keeps_the_last_complete_manifest(tmp_path):
    store = FeatureStore.open(tmp_path, {"a": 1})
    store.append(["x", "y"], PackedRows(torch.arange(6.0).reshape(3, 2), torch.tensor([1, 2])))
    again = FeatureStore.open(tmp_path, {"a": 1})
    rows = again.load(memory_map=True)
    values, mask = rows.padded(torch.tensor([1, 0]))
    torch.testing.assert_close(values, torch.tensor([[[2.0, 3.0], [4.0, 5.0]], [[0.0, 1.0], [0.0, 0.0]]]))
    assert mask.tolist() == [[1, 1], [1, 0]] and again.keys == ["x", "y"]
    assert FeatureStore.open(tmp_path, {"a": 2}).keys == []  # another context reads nothing


def test_towers_that_cannot_be_cut_fall_back_with_one_log_line(train_pairs, relevance, tmp_path, caplog):
    base, processor = tiny_model(train_pairs)
    text = CLIPTextConfig(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64, eos_token_id=2)
    config = BCLSConfig.from_vision_text_configs(base.config.vision_config, text, projection_dim=16, text_pooling="pooler")
    model = BCLSModel(config)
    freeze_towers(model, freeze_vision_model=True, freeze_text_model=True, text_unlocked_layers=1)
    trainer = make_trainer(model, processor, train_pairs, relevance, tmp_path)
    with caplog.at_level(logging.INFO, logger="trainer_bcls.training.feature_cache"):
        trainer._prepare_feature_caches()
    assert trainer.feature_caches.text is None and trainer.feature_caches.vision is not None
    assert caplog.text.count("cannot be cut at its lock boundary") == 1
    trainer.train()  # the full text forward every step, images from the cache


def test_bad_images_are_skipped_and_counted_with_skip_invalid(train_pairs, relevance, tmp_path):
    from datasets import Image
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    pairs = train_pairs.cast_column("image", Image(decode=False))
    first_image = pairs[0]["image_id"]
    pairs = pairs.map(lambda row: {"image": {"path": str(broken), "bytes": None}} if row["image_id"] == first_image else {})
    model, processor = tiny_model(train_pairs, "vit")
    freeze_towers(model, freeze_vision_model=True, freeze_text_model=True)
    trainer = make_trainer(model, processor, pairs, relevance, tmp_path)
    trainer.data_collator.skip_invalid = True
    trainer._prepare_feature_caches()
    assert trainer.feature_caches.invalid_image_ids == {first_image}
    batch = trainer.data_collator([pairs[i] for i in range(10)])
    bad_rows = sum(1 for i in range(10) if pairs[i]["image_id"] == first_image)
    assert bad_rows and len(batch["image_ids"]) == 10 - bad_rows and trainer.data_collator.num_skipped == bad_rows


def test_cache_context_ignores_the_processor_loading_keys(tiny_processor, tmp_path):
    """A model reloaded from its saved folder (whose processor config gains `auto_map`) finds the caches its
    training run filled: the loading keys are not part of the image cache's context."""
    import copy

    from trainer_bcls.training.feature_cache import _pixel_config

    saved = copy.deepcopy(tiny_processor.image_processor)
    saved.auto_map = {"AutoProcessor": "processing_bcls.BCLSProcessor"}
    assert "auto_map" in saved.to_dict()
    assert _pixel_config(saved) == _pixel_config(tiny_processor.image_processor)
    resized = copy.deepcopy(tiny_processor.image_processor)
    resized.size = {"height": 48, "width": 48}
    assert _pixel_config(resized) != _pixel_config(tiny_processor.image_processor)


def test_text_cache_context_follows_the_tokenizer_not_its_folder(tiny_processor, tmp_path):
    """A tokenizer saved next to a trained model and loaded from there has the same identity as the one training
    used (its folder differs); another vocabulary does not."""
    from transformers import AutoTokenizer, BertTokenizerFast

    from trainer_bcls.training.feature_cache import _tokenizer_identity

    tokenizer = tiny_processor.tokenizer
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded.name_or_path != tokenizer.name_or_path
    assert _tokenizer_identity(reloaded) == _tokenizer_identity(tokenizer)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    assert _tokenizer_identity(BertTokenizerFast(vocab_file=str(vocab))) != _tokenizer_identity(tokenizer)
