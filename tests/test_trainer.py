"""BCLSTrainer end to end on the synthetic data: training improves retrieval, logging, saving, model card, Hub push,
gradient caching, bf16 and exact resume (issues 5 and 6)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from modeling_bcls import BCLSModel
from trainer_bcls import (
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    RelevanceLabels,
    TfidfRelevance,
    build_tiny_model_and_processor,
    evaluate_retrieval,
    load_pairs,
)


@pytest.fixture(scope="module")
def splits(synthetic_dir):
    return load_pairs(str(synthetic_dir), "train"), load_pairs(str(synthetic_dir), "val")


def make_trainer(splits, output_dir, seed=0, model=None, processor=None, **overrides) -> BCLSTrainer:
    train, val = splits
    torch.manual_seed(seed)
    if model is None:
        model, processor = build_tiny_model_and_processor(train["caption"], image_size=32, projection_dim=64)
    relevance = RelevanceLabels.build(train, TfidfRelevance())
    arguments = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=1e-3,
        max_steps=20,
        logging_steps=5,
        eval_strategy="no",
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    arguments.update(overrides)
    return BCLSTrainer(
        model=model,
        args=BCLSTrainingArguments(**arguments),
        train_dataset=train,
        eval_dataset=val,
        data_collator=BCLSDataCollator(processor, relevance=relevance, max_length=32),
        processing_class=processor,
        eval_relevance=RelevanceLabels.build(val, TfidfRelevance()),
        data_description="synthetic shapes",
    )


def test_training_improves_rsum_and_logs_loss_parts(splits, tmp_path):
    trainer = make_trainer(splits, tmp_path / "run", max_steps=60, logging_steps=20)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_rsum"] > before["eval_rsum"] + 30, (before["eval_rsum"], after["eval_rsum"])
    assert {"eval_i2t_r1", "eval_t2i_r10", "eval_kendall_tau_b", "eval_ndcg@10"} <= after.keys()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert math.isfinite(entry["loss"]) and entry["loss_triplet"] > 0 and entry["loss_kendall"] >= 0
        # the parts add up to the total: loss = triplet + kendall_weight · kendall (running means of one window)
        expected = entry["loss_triplet"] + trainer.model.config.kendall_weight * entry["loss_kendall"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-3)


def test_save_reload_model_card_and_hub_upload(splits, tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    trainer = make_trainer(splits, output_dir, max_steps=4, eval_strategy="steps", eval_steps=4)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    files = {p.name for p in output_dir.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") or name.endswith(".pt") for name in files)
    card = (output_dir / "README.md").read_text()
    assert "model-index" in card and "Image→text R@1" in card and "kendall_window_size" in card
    from huggingface_hub import ModelCard

    metadata = ModelCard.load(output_dir / "README.md").data  # the YAML front matter parses, as the Hub does
    results = {result.metric_type: result.metric_value for result in metadata.eval_results}
    final_rsum = [e for e in trainer.state.log_history if "eval_rsum" in e][-1]["eval_rsum"]
    assert results["rsum"] == pytest.approx(final_rsum, rel=1e-5) and "i2t_r1" in results

    reloaded = BCLSModel.from_pretrained(output_dir).eval()
    original = trainer.model.eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        reloaded.encode_image(pixel_values=pixel_values),
        original.encode_image(pixel_values=pixel_values),
        rtol=0, atol=1e-6,
    )
    metrics = evaluate_retrieval(reloaded, splits[1], trainer.processing_class, max_length=32, show_progress=False)
    final = [e for e in trainer.state.log_history if "eval_rsum" in e][-1]
    assert metrics["rsum"] == pytest.approx(final["eval_rsum"], abs=1e-4)

    # What `--push_to_hub` would upload, without a network: the standard Trainer push, with the Hub API faked.
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            from types import SimpleNamespace

            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
            import fnmatch
            from pathlib import Path

            kept = [
                p.name for p in Path(folder_path).iterdir()
                if not any(fnmatch.fnmatch(p.name, pattern) for pattern in ignore_patterns or [])
            ]
            uploads.append((repo_id, sorted(kept)))

    import transformers.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "hf_api", lambda *a, **k: FakeApi(), raising=False)
    monkeypatch.setattr(trainer, "init_hf_repo", lambda *a, **k: setattr(trainer, "hub_model_id", "me/bcls-demo"))
    trainer.args.hub_model_id = "me/bcls-demo"
    trainer.push_to_hub()
    assert uploads and uploads[-1][0] == "me/bcls-demo"
    uploaded = set(uploads[-1][1])
    assert {"model.safetensors", "config.json", "README.md", "processor_config.json", "tokenizer.json"} <= uploaded
    assert not any(name.startswith("checkpoint-") for name in uploaded)


def _step_grads(trainer, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _tiny_vit_model(train, dropout: float):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(train["caption"], image_size=32, projection_dim=32, vision="vit")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    return model, processor


def test_gradient_caching_equals_full_batch(splits, tmp_path):
    """Dropout off: GradCache (chunks of 5) gives the loss and gradients of the unchunked batch."""
    train = splits[0]
    model, processor = _tiny_vit_model(train, dropout=0.0)
    full = make_trainer(splits, tmp_path / "a", model=model, processor=processor)
    cached = make_trainer(splits, tmp_path / "b", model=model, processor=processor, embedding_chunk_size=5)
    batch = full.data_collator([train[i] for i in range(16)])
    full_loss, full_grads = _step_grads(full, batch)
    cached_loss, cached_grads = _step_grads(cached, batch)
    assert cached_loss == pytest.approx(full_loss, abs=1e-6)
    assert full_grads.keys() == cached_grads.keys() and len(full_grads) == len(list(model.parameters()))
    for name in full_grads:
        torch.testing.assert_close(cached_grads[name], full_grads[name], rtol=0, atol=1e-5, msg=name)


def test_gradient_caching_replays_dropout(splits, tmp_path):
    """Dropout on: the re-embedding pass replays each chunk's RNG state, so the gradients are those of the loss on
    the very embeddings the loss saw (reference: the same chunks embedded with a graph, in the same RNG order)."""
    from trainer_bcls.training.global_loss import global_bcls_loss

    train = splits[0]
    model, processor = _tiny_vit_model(train, dropout=0.2)
    cached = make_trainer(splits, tmp_path / "c", model=model, processor=processor, embedding_chunk_size=5)
    batch = cached.data_collator([train[i] for i in range(16)])
    torch.manual_seed(1)
    cached_loss, cached_grads = _step_grads(cached, batch)

    model.zero_grad()
    torch.manual_seed(1)
    features = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids") if k in batch}
    chunks = [model(**{k: v[i : i + 5] for k, v in features.items()}, return_loss=False) for i in range(0, 16, 5)]
    image_embeds = torch.cat([c.image_embeds for c in chunks])
    text_embeds = torch.cat([c.text_embeds for c in chunks])
    loss = global_bcls_loss(model.config, image_embeds, text_embeds, batch)["loss"]
    loss.backward()
    assert cached_loss == pytest.approx(loss.item(), abs=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(cached_grads[name], parameter.grad, rtol=0, atol=1e-5, msg=name)


def test_gradient_caching_rejects_batchnorm_in_training_mode(splits, tmp_path):
    trainer = make_trainer(splits, tmp_path / "bn", embedding_chunk_size=4)  # the ResNet tower has BatchNorm
    batch = trainer.data_collator([splits[0][i] for i in range(8)])
    trainer.model.train()
    with pytest.raises(ValueError, match="BatchNorm"):
        trainer.compute_loss(trainer.model, dict(batch))


def test_bf16_training_has_no_nan(splits, tmp_path):
    trainer = make_trainer(splits, tmp_path / "bf16", bf16=True, max_steps=6, logging_steps=2)
    batch = trainer.data_collator([splits[0][i] for i in range(8)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = trainer.model(**batch)
    assert outputs.logits_per_image.dtype == torch.float32 and outputs.loss.dtype == torch.float32
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(value) for value in losses)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_resume_from_checkpoint_matches_unbroken_run(splits, tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, logging_steps=3)
    unbroken = make_trainer(splits, tmp_path / "unbroken", **common)
    unbroken.train()

    class StopAfterThreeSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    stopped = make_trainer(splits, tmp_path / "resumed", **common)
    stopped.add_callback(StopAfterThreeSteps())
    stopped.train()
    assert stopped.state.global_step == 3
    resumed = make_trainer(splits, tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    for (name, a), (_, b) in zip(unbroken.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_trainer_needs_bcls_arguments(splits, tmp_path):
    from transformers import TrainingArguments

    train = splits[0]
    model, processor = build_tiny_model_and_processor(train["caption"], image_size=32, projection_dim=16)
    with pytest.raises(TypeError, match="BCLSTrainingArguments"):
        BCLSTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
                    train_dataset=train, data_collator=BCLSDataCollator(processor), processing_class=processor)


def test_tiny_word_tokenizer_keeps_its_vocabulary():
    from trainer_bcls.towers.tiny_towers import build_word_tokenizer

    tokenizer = build_word_tokenizer(["A large red circle, on the left", "two small blue squares"])
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red square on the right")["input_ids"])
    assert tokens == ["[CLS]", "a", "red", "[UNK]", "on", "the", "[UNK]", "[SEP]"]
