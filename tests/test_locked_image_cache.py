"""The locked-image feature cache (issue 11, section 3): cached features equal the tower's, the loss and gradients of
a cached step equal the uncached ones (with and without GradCache), the second epoch runs no image forward, changed
weights empty the cache, and augmentation bypasses it."""

from __future__ import annotations

import logging

import pytest
import torch

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
    unfreeze_tower,
)
from trainer_bcls.data.augmentation import RandomResizedCropFlip
from trainer_bcls.training.locked_image_cache import LockedImageFeatureCache, image_digests
from transformers import TrainerCallback


@pytest.fixture(scope="module")
def train_pairs(synthetic_dir):
    return load_pairs(str(synthetic_dir), "train")


@pytest.fixture(scope="module")
def relevance(train_pairs):
    return RelevanceLabels.build(train_pairs, TfidfRelevance())


def locked_model(train_pairs, vision="resnet", **config_kwargs):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(
        train_pairs["caption"], image_size=32, projection_dim=32, vision=vision, **config_kwargs
    )
    freeze_towers(model, freeze_vision_model=True)
    model.fast_inference = False  # count the tower's own forward calls (the fused copy is tested elsewhere)
    return model, processor


class TowerCalls:
    """Counts forward calls of a module (a forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1


def test_cached_features_equal_the_tower_and_each_image_runs_once(train_pairs, relevance):
    model, processor = locked_model(train_pairs)
    batch = BCLSDataCollator(processor, relevance=relevance)([train_pairs[i] for i in range(12)])
    pixel_values = batch["pixel_values"]
    calls = TowerCalls(model.vision_model)
    cache = LockedImageFeatureCache()
    pooled = cache.pooled_features(model, pixel_values)
    assert calls.count == 1
    with torch.no_grad():
        reference = model._pool_image(pixel_values)
    # the cache ran the tower on the distinct images only: a different batch, so equal up to rounding
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-6)
    distinct = len(set(batch["image_ids"].tolist()))
    assert distinct < 12 and len(cache) == distinct  # 5 captions per image: rows with one image share an entry
    assert len(set(image_digests(pixel_values))) == distinct
    assert (cache.tower_calls, cache.misses, cache.hits) == (1, 12, 0)
    again = cache.pooled_features(model, pixel_values.flip(0))
    torch.testing.assert_close(again, pooled.flip(0), rtol=0, atol=0)
    assert (calls.count, cache.tower_calls, cache.hits) == (2, 1, 12)


def test_changed_weights_empty_the_cache_and_unlocked_towers_are_refused(train_pairs, relevance):
    model, processor = locked_model(train_pairs)
    pixel_values = BCLSDataCollator(processor)([train_pairs[i] for i in range(4)])["pixel_values"]
    cache = LockedImageFeatureCache()
    first = cache.pooled_features(model, pixel_values)
    unfreeze_tower(model.vision_model)
    with pytest.raises(ValueError, match="locked vision tower"):
        cache.pooled_features(model, pixel_values)
    with torch.no_grad():
        model.vision_model.embedder.embedder.convolution.weight.mul_(2.0)
    freeze_tower(model.vision_model)
    second = cache.pooled_features(model, pixel_values)
    with torch.no_grad():
        torch.testing.assert_close(second, model._pool_image(pixel_values), rtol=0, atol=1e-6)
    assert not torch.allclose(first, second) and cache.tower_calls == 2


def make_trainer(model, processor, train_pairs, relevance, tmp_path, **overrides):
    arguments = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=16, learning_rate=1e-3, max_steps=4,
        eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, seed=0, logging_steps=1000,
    )
    arguments.update(overrides)
    collator_kwargs = arguments.pop("collator_kwargs", {})
    return BCLSTrainer(
        model=model, args=BCLSTrainingArguments(**arguments), train_dataset=train_pairs,
        data_collator=BCLSDataCollator(processor, relevance=relevance, max_length=32, **collator_kwargs),
        processing_class=processor,
    )


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    inputs = trainer._prepare_inputs(dict(batch))
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("chunk_size, projection_hidden_dim", [(None, None), (5, None), (None, 16)])
def test_cached_step_has_the_loss_and_gradients_of_the_uncached_step(
    train_pairs, relevance, tmp_path, chunk_size, projection_hidden_dim
):
    model, processor = locked_model(train_pairs, projection_hidden_dim=projection_hidden_dim)
    trainer = make_trainer(model, processor, train_pairs, relevance, tmp_path, embedding_chunk_size=chunk_size)
    rows = [train_pairs[i] for i in range(0, 64, 4)]
    batch = trainer.data_collator(rows)
    calls = TowerCalls(model.vision_model)

    trainer.args.cache_locked_image_features = False
    loss, grads = loss_and_grads(trainer, batch)
    uncached_calls = calls.count
    trainer.args.cache_locked_image_features = True
    trainer.locked_image_cache.pooled_features(model, trainer.data_collator(rows[::-1])["pixel_values"])  # warm
    calls.count = 0
    cached_loss, cached_grads = loss_and_grads(trainer, batch)

    assert calls.count == 0 and uncached_calls >= 1  # the cached step ran no image forward
    assert loss.item() > 0
    torch.testing.assert_close(cached_loss, loss, rtol=0, atol=1e-6)
    assert cached_grads.keys() == grads.keys() and not any(n.startswith("vision_model.") for n in grads)
    head = "visual_projection.weight" if projection_hidden_dim is None else "visual_projection.0.weight"
    assert head in grads and "text_model.embeddings.word_embeddings.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


class EpochCalls(TrainerCallback):
    def __init__(self, calls: TowerCalls) -> None:
        self.calls, self.per_epoch = calls, []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = self.calls.count

    def on_epoch_end(self, args, state, control, **kwargs):
        self.per_epoch.append(self.calls.count - self.start)


def test_no_epoch_runs_an_image_forward_and_training_matches_the_uncached_run(train_pairs, relevance, tmp_path):
    """The lock-boundary cache (`feature_cache`) embeds every image before the first step; `cache_locked_features`
    off runs the tower every step; the per-step cache of this file serves datasets the trainer cannot list."""
    pairs = train_pairs.select(range(96))  # 20 images, 6 steps of 16 per epoch
    results = {}
    for cached in (True, False):
        model, processor = locked_model(train_pairs)
        calls = TowerCalls(model.vision_model)
        counter = EpochCalls(calls)
        trainer = make_trainer(
            model, processor, pairs, relevance, tmp_path / str(cached), max_steps=-1, num_train_epochs=2,
            cache_locked_features=cached,
        )
        trainer.add_callback(counter)
        trainer.train()
        results[cached] = (counter.per_epoch, calls.count, model.visual_projection.weight.detach().clone(), trainer)
    (cached_calls, cached_total, cached_weight, trainer), (plain_calls, _, plain_weight, _) = results[True], results[False]
    steps_per_epoch = len(pairs) // 16
    assert plain_calls == [steps_per_epoch, steps_per_epoch]
    assert cached_calls == [0, 0] and cached_total == 2  # 20 distinct images, embedded in batches of 16 up front
    assert len(trainer.feature_caches.vision.rows) == len(set(pairs["image_id"]))
    torch.testing.assert_close(cached_weight, plain_weight, rtol=1e-4, atol=1e-6)


def test_augmentation_bypasses_the_cache(train_pairs, relevance, tmp_path, caplog):
    model, processor = locked_model(train_pairs)
    calls = TowerCalls(model.vision_model)
    trainer = make_trainer(
        model, processor, train_pairs, relevance, tmp_path, max_steps=3,
        collator_kwargs={"image_transform": RandomResizedCropFlip(scale=(0.8, 1.0))},
    )
    with caplog.at_level(logging.WARNING, logger="trainer_bcls.training.trainer"):
        trainer.train()
    assert calls.count == 3 and len(trainer.locked_image_cache) == 0
    assert "cache is bypassed" in caplog.text
