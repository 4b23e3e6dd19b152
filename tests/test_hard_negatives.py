"""Mined hard negatives (issue 24, item 2): the miner against a brute-force reference, the collator's extra
candidates and labels, and the training loss with them (against `bcls_loss` on the full candidate matrix), with the
lock-boundary caches and with GradCache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_bcls.losses import bcls_loss, relevance_sort_order
from trainer_bcls import (
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    RelevanceLabels,
    TfidfRelevance,
    build_tiny_model_and_processor,
    load_pairs,
)
from trainer_bcls.data.caption_index import ImageCaptionIndex
from trainer_bcls.evaluation.split_evaluation import EncodedSplit
from trainer_bcls.training.hard_negative_mining import (
    MINED_COLUMNS,
    encode_split_from_caches,
    mine_from_embeddings,
    mine_hard_negatives,
)
from trainer_bcls.evaluation.split_evaluation import encode_split


@pytest.fixture(scope="module")
def train_pairs(synthetic_dir):
    return load_pairs(str(synthetic_dir), "train")


@pytest.fixture(scope="module")
def relevance(train_pairs):
    return RelevanceLabels.build(train_pairs, TfidfRelevance(), use_cache=False)


def brute_force_mining(image_embeds, text_embeds, caption_images, R, k, range_max, threshold, margin):
    mined, relevant = [], 0
    for i in range(image_embeds.shape[0]):
        scores = [(float(image_embeds[i] @ text_embeds[c]), c) for c in range(text_embeds.shape[0])]
        own = [s for s, c in scores if caption_images[c] == i]
        positive_mean = sum(own) / len(own)
        others = sorted([(s, c) for s, c in scores if caption_images[c] != i], key=lambda x: -x[0])[:range_max]
        relevant += sum(R[i, c] >= threshold for _, c in others)
        kept = [c for s, c in others if R[i, c] < threshold and (margin is None or s <= (1 - margin) * positive_mean)]
        mined.append(kept[:k])
    return mined, relevant


def test_relevance_values_and_candidate_matrix_agree_with_matrix(train_pairs, relevance):
    rng = np.random.default_rng(0)
    images = rng.integers(0, relevance.index.num_images, 50)
    captions = rng.integers(0, relevance.index.num_captions, 50)
    full = relevance.matrix(images, captions).numpy()
    np.testing.assert_allclose(relevance.values(images, captions), np.diag(full), rtol=1e-5, atol=1e-6)
    rows = [train_pairs[i] for i in range(8)]
    image_ids = np.array([r["image_id"] for r in rows])
    caption_ids = np.array([r["caption_id"] for r in rows])
    torch.testing.assert_close(relevance.candidate_matrix(image_ids, caption_ids, caption_ids),
                               relevance.batch_matrix(image_ids, caption_ids))
    paired = RelevanceLabels(relevance.index, relevance.embeddings, references="paired")
    torch.testing.assert_close(paired.candidate_matrix(image_ids, caption_ids, caption_ids),
                               paired.batch_matrix(image_ids, caption_ids))


@pytest.mark.parametrize("threshold, margin", [(0.2, None), (0.05, None), (0.3, 0.1)])
def test_mining_matches_brute_force(relevance, threshold, margin):
    index = relevance.index
    g = torch.Generator().manual_seed(1)
    image_embeds = torch.nn.functional.normalize(torch.randn(index.num_images, 8, generator=g), dim=1)
    own_image = image_embeds[torch.as_tensor(index.caption_image_ids)]  # captions near their image: positives score high
    text_embeds = torch.nn.functional.normalize(2 * own_image + torch.randn(index.num_captions, 8, generator=g), dim=1)
    encoded = EncodedSplit(image_embeds=image_embeds, text_embeds=text_embeds, index=index)
    R = relevance.full_matrix().numpy()
    mined, counts = mine_from_embeddings(encoded, relevance, num_negatives=3, range_max=10,
                                         relevance_threshold=threshold, relative_margin=margin, chunk_size=7)
    expected, relevant = brute_force_mining(image_embeds, text_embeds, index.caption_image_ids, R, 3, 10, threshold,
                                            margin)
    assert mined == expected
    assert counts["candidates_left_out_as_relevant"] == relevant > 0  # of the top range_max candidates
    assert any(len(m) == 3 for m in mined)
    assert (counts["candidates_left_out_by_margin"] > 0) == (margin is not None)
    if threshold == 0.05:  # a low threshold leaves many candidates out, so some images get fewer than 3
        assert counts["images_with_fewer_than_num_negatives"] > 0
    for i, chosen in enumerate(mined):
        assert all(index.caption_image_ids[c] != i and R[i, c] < threshold for c in chosen)


def test_mine_hard_negatives_adds_columns_per_image(train_pairs, relevance):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(train_pairs["caption"], image_size=32, projection_dim=16)
    mined, counts = mine_hard_negatives(model, train_pairs, processor, relevance, num_negatives=2, range_max=8,
                                        relevance_threshold=0.3, show_progress=False)
    assert set(MINED_COLUMNS) <= set(mined.column_names) and len(mined) == len(train_pairs)
    captions = relevance.index.captions
    for row in mined.select(range(0, len(mined), 7)):
        assert len(row["hard_negative_caption_ids"]) <= 2
        for c, image, text in zip(row["hard_negative_caption_ids"], row["hard_negative_image_ids"], row["hard_negatives"]):
            assert relevance.index.caption_image_ids[c] == image != row["image_id"] and captions[c] == text
    with pytest.raises(ValueError, match="already have mined columns"):
        mine_hard_negatives(model, mined, processor, relevance, show_progress=False)


def _mined_rows(train_pairs, n_rows, per_row):
    """The first `n_rows` pairs with `per_row` mined captions each, taken from images outside those rows (distinct
    over the rows, so nothing is deduplicated) plus, for row 1, a caption of row 0's image (a positive for row 0)."""
    first_of_image = {}
    for row in train_pairs:
        first_of_image.setdefault(row["image_id"], row)
    rows = [dict(r) for r in list(first_of_image.values())[:n_rows]]  # distinct images
    batch_images = {r["image_id"] for r in rows}
    outside = [r for r in train_pairs if r["image_id"] not in batch_images]
    for k, row in enumerate(rows):
        picks = outside[k * per_row:(k + 1) * per_row]
        row["hard_negative_caption_ids"] = [p["caption_id"] for p in picks]
        row["hard_negative_image_ids"] = [p["image_id"] for p in picks]
        row["hard_negatives"] = [p["caption"] for p in picks]
    other = next(r for r in train_pairs if r["image_id"] == rows[0]["image_id"] and r["caption_id"] not in
                 {x["caption_id"] for x in rows})
    rows[1]["hard_negative_caption_ids"][0] = other["caption_id"]
    rows[1]["hard_negative_image_ids"][0] = other["image_id"]
    rows[1]["hard_negatives"][0] = other["caption"]
    return rows


def test_collator_adds_extra_candidates_with_their_labels(train_pairs, relevance):
    _, processor = build_tiny_model_and_processor(train_pairs["caption"], image_size=32, projection_dim=16)
    rows = _mined_rows(train_pairs, 8, 2)
    collator = BCLSDataCollator(processor, relevance=relevance, hard_negatives_per_row=1)
    batch = collator(rows)
    start = [r["caption_id"] % 2 for r in rows]  # the i-th pair of an image starts at caption_id mod n
    expected = [r["hard_negative_caption_ids"][s] for r, s in zip(rows, start)]
    assert batch["hard_negative_caption_ids"].tolist() == expected
    assert batch["hard_negative_image_ids"].tolist() == [r["hard_negative_image_ids"][s] for r, s in zip(rows, start)]
    B, E = 8, len(expected)
    assert batch["relevance"].shape == (B, B + E) and batch["input_ids"].shape[0] == B
    assert batch["hard_negative_input_ids"].shape[0] == E
    image_ids = batch["image_ids"].numpy()
    torch.testing.assert_close(batch["relevance"][:, B:],
                               relevance.candidate_matrix(image_ids, batch["caption_ids"].numpy(), np.array(expected)))
    assert torch.equal(batch["relevance_order_i2t"], relevance_sort_order(batch["relevance"]))
    assert torch.equal(batch["relevance_order_t2i"], relevance_sort_order(batch["relevance"][:, :B].T.contiguous()))
    # the tokens of the extra captions are those of the texts
    texts = [r["hard_negatives"][s] for r, s in zip(rows, start)]
    alone = processor(text=texts, padding="max_length", max_length=batch["input_ids"].shape[1], truncation=True,
                      return_tensors="pt")
    assert torch.equal(batch["hard_negative_input_ids"], alone["input_ids"])
    # duplicates (in the batch already, or mined twice) are added once
    rows[2]["hard_negative_caption_ids"] = [rows[3]["caption_id"], expected[0]]
    rows[2]["hard_negative_image_ids"] = [rows[3]["image_id"], rows[0]["hard_negative_image_ids"][start[0]]]
    rows[2]["hard_negatives"] = [rows[3]["caption"], "x"]
    ids = collator(rows)["hard_negative_caption_ids"].tolist()
    assert len(ids) == len(set(ids)) and rows[3]["caption_id"] not in ids
    with pytest.raises(KeyError, match="mine them first"):
        collator([dict(train_pairs[0]), dict(train_pairs[1])])


def _trainer(train_pairs, relevance, model, processor, tmp_path, **overrides):
    args = BCLSTrainingArguments(**{**dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2,
                                          use_cpu=True, disable_tqdm=True, report_to="none"), **overrides})
    collator = BCLSDataCollator(processor, relevance=relevance, hard_negatives_per_row=2, max_length=32)
    return BCLSTrainer(model=model, args=args, train_dataset=train_pairs, data_collator=collator,
                       processing_class=processor)


def _reference_loss(model, batch):
    """`bcls_loss` on the full candidate matrix: images × (paired + extra captions), text queries = paired only."""
    B = batch["image_ids"].shape[0]
    texts = {k: torch.cat([batch[k], batch[f"hard_negative_{k}"]]) for k in ("input_ids", "attention_mask")}
    out = model(pixel_values=batch["pixel_values"], **texts, return_loss=False)
    candidates = torch.cat([batch["image_ids"], batch["hard_negative_image_ids"]])
    mask = batch["image_ids"][:, None] == candidates[None, :]
    sim = out.image_embeds @ out.text_embeds.T
    R = batch["relevance"]
    return bcls_loss(sim, mask, R, sim_t2i=sim[:, :B].T, positive_mask_t2i=mask[:, :B].T, relevance_t2i=R[:, :B].T,
                     **model.config.loss_kwargs())["loss"]


@pytest.mark.parametrize("false_negative_threshold", [None, 0.2])
def test_training_loss_with_mined_candidates_equals_reference(train_pairs, relevance, tmp_path,
                                                               false_negative_threshold):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(train_pairs["caption"], image_size=32, projection_dim=16,
                                                      vision="vit")
    model.config.false_negative_threshold = false_negative_threshold
    model.train()
    rows = _mined_rows(train_pairs, 8, 2)
    trainer = _trainer(train_pairs, relevance, model, processor, tmp_path / "a")
    batch = trainer.data_collator(rows)
    assert batch["relevance"][0, 8:].max() == 1.0  # row 1's extra caption is a positive of row 0
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = _reference_loss(model, batch)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    without = BCLSDataCollator(processor, relevance=relevance)(rows)
    assert loss.item() != pytest.approx(trainer.compute_loss(model, dict(without)).item(), abs=1e-4)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=0, atol=1e-6, msg=name)

    # GradCache (chunks of 3 rows: the text side, 8 + 16 rows, is chunked further than the image side)
    cached = _trainer(train_pairs, relevance, model, processor, tmp_path / "b", embedding_chunk_size=3)
    model.zero_grad()
    cached_loss = cached.compute_loss(model, dict(batch))
    cached_loss.backward()
    assert cached_loss.item() == pytest.approx(reference.item(), abs=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=0, atol=1e-5, msg=name)


def test_locked_towers_train_from_the_caches_with_mined_candidates(train_pairs, relevance, tmp_path):
    """Locked towers: train() runs on mined data from the lock-boundary caches (every image and caption, the mined
    ones included, embedded once); the cached step gives the loss of the uncached forward on the same batch."""
    from trainer_bcls import freeze_towers

    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(train_pairs["caption"], image_size=32, projection_dim=16,
                                                      vision="vit")
    mined, _ = mine_hard_negatives(model, train_pairs, processor, relevance, num_negatives=2, range_max=8,
                                   relevance_threshold=0.3, show_progress=False)
    freeze_towers(model, freeze_vision_model=True, freeze_text_model=True)
    trainer = _trainer(mined, relevance, model, processor, tmp_path / "c", max_steps=3)
    trainer.train()
    assert trainer.feature_caches.vision is not None and trainer.feature_caches.text is not None
    rows = [mined[i] for i in range(0, 40, 5)]
    collator = trainer.data_collator
    collator.load_images, collator.tokenize = False, False  # what train() sets: ids only
    ids_only = collator(rows)
    collator.load_images, collator.tokenize = True, True
    assert "pixel_values" not in ids_only and "hard_negative_input_ids" not in ids_only
    assert ids_only["hard_negative_caption_ids"].numel() > 0
    model.train()
    cached = trainer.compute_loss(model, dict(ids_only)).item()
    plain = _trainer(mined, relevance, model, processor, tmp_path / "d", cache_locked_features=False)
    uncached = plain.compute_loss(model, dict(plain.data_collator(rows))).item()
    assert cached == pytest.approx(uncached, abs=1e-5)


def test_mine_then_train_from_the_command_line(synthetic_dir, tmp_path):
    """examples/mine_hard_negatives.py writes a DatasetDict that train.py --hard_negatives_per_row trains on."""
    import json

    from conftest import load_example

    common = ["--relevance", "tfidf"]
    first = tmp_path / "first"
    load_example("train").main(["--data", str(synthetic_dir), "--output_dir", str(first), "--tiny_image_size", "32",
                                "--max_steps", "2", "--per_device_train_batch_size", "16", "--eval_split", "none",
                                "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none", *common])
    mined_dir = tmp_path / "mined"
    counts = load_example("mine_hard_negatives").main(
        ["--model", str(first), "--data", str(synthetic_dir), "--output", str(mined_dir), "--num_negatives", "3",
         "--range_max", "20", "--relevance_threshold", "0.3", *common])
    assert counts["mined_per_image"] > 0 and json.loads((mined_dir / "mining.json").read_text())["num_negatives"] == 3
    mined = load_pairs(str(mined_dir), "train")
    assert set(MINED_COLUMNS) <= set(mined.column_names)
    # the images are saved as their paths, not copied, and load back as the same files
    from datasets import Image

    assert sum(f.stat().st_size for f in mined_dir.rglob("*.arrow")) < 200_000
    source = load_pairs(str(synthetic_dir), "train").cast_column("image", Image(decode=False))
    assert mined.cast_column("image", Image(decode=False))[:3]["image"] == source[:3]["image"]
    assert len(load_pairs(str(mined_dir), "val")) == len(load_pairs(str(synthetic_dir), "val"))
    metrics = load_example("train").main(
        ["--model_name_or_path", str(first), "--data", str(mined_dir), "--output_dir", str(tmp_path / "second"),
         "--hard_negatives_per_row", "1", "--false_negative_threshold", "0.5", "--max_steps", "2",
         "--per_device_train_batch_size", "16", "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none",
         *common])
    assert metrics["eval_rsum"] > 0
    with pytest.raises(ValueError, match="no mined hard negatives"):
        load_example("train").main(["--data", str(synthetic_dir), "--output_dir", str(tmp_path / "third"),
                                    "--hard_negatives_per_row", "1", "--max_steps", "1", "--use_cpu", "true"])
    with pytest.raises(ValueError, match="exists and is not empty"):
        load_example("mine_hard_negatives").main(["--model", str(first), "--data", str(synthetic_dir),
                                                  "--output", str(mined_dir)])


def test_mining_from_the_training_feature_caches_equals_running_the_towers(train_pairs, relevance, tmp_path):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(train_pairs["caption"], image_size=32, projection_dim=16,
                                                      vision="vit")
    direct = encode_split(model, train_pairs, processor, show_progress=False)
    for attempt in range(2):  # the first fills the cache folder, the second reads it
        cached = encode_split_from_caches(model, train_pairs, processor, tmp_path / "features", show_progress=False)
        torch.testing.assert_close(cached.image_embeds, direct.image_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(cached.text_embeds, direct.text_embeds, rtol=0, atol=1e-5)
    assert any((tmp_path / "features").rglob("*.safetensors"))
    a, _ = mine_from_embeddings(direct, relevance, num_negatives=2, range_max=8, relevance_threshold=0.3)
    b, _ = mine_from_embeddings(cached, relevance, num_negatives=2, range_max=8, relevance_threshold=0.3)
    assert a == b
